"""Memset nodes of a captured CUDA graph rewritten as fill kernels (``ldm_sdk.accel.graph_memsets``).

GPU only (mark ``gpu``): memsets issued through the driver inside a capture (8- and 32-bit, a 32-bit value
with the top bit set) are found, replaced, and the replayed graph writes the same bytes in the same order
relative to its kernels; a ``CapturedModel`` rewrites them and computes the same result as without.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from ldm_sdk.accel.graph_memsets import replace_memset_nodes


def _memset(kind: str, ptr: int, value: int, count: int) -> None:
    lib = ctypes.CDLL("libcuda.so.1")
    fn = getattr(lib, {"8": "cuMemsetD8Async", "32": "cuMemsetD32Async"}[kind])
    fn.argtypes = [ctypes.c_uint64, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p]
    stream = torch.cuda.current_stream().cuda_stream
    assert fn(ptr, value, count, stream) == 0


@pytest.mark.gpu
def test_memsets_become_kernels_with_the_same_effect() -> None:
    x = torch.arange(1000, device="cuda", dtype=torch.float32)
    bytes_ = torch.zeros(4096, device="cuda", dtype=torch.uint8)
    words = torch.zeros(513, device="cuda", dtype=torch.int32)
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        a = x * 2  # a kernel before the memsets
        _memset("8", bytes_.data_ptr(), 0xA5, bytes_.numel())
        _memset("32", words.data_ptr(), 0x80000001, words.numel())  # top bit set: the signed fill
        y = a + bytes_[:1000].float()  # reads the bytes after the memset
        z = words.to(torch.int64) - 1  # reads the words after theirs
    report = replace_memset_nodes(graph, torch.device("cuda"))
    assert (report.found, report.replaced, report.kept) == (2, 2, None), report
    graph.instantiate()
    bytes_.fill_(1)
    words.fill_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert bool((bytes_ == 0xA5).all())
    assert bool((words == torch.tensor(0x80000001 - 2**32, dtype=torch.int32)).all())
    assert torch.equal(y, x * 2 + 0xA5)
    assert bool((z == 0x80000001 - 2**32 - 1).all())


@pytest.mark.gpu
def test_captured_model_rewrites_and_matches() -> None:
    from ldm_sdk.accel.graphs import CapturedModel
    from ldm_sdk.diffusion.conditioning import Conditioning

    q = torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.float16)

    def fn(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        # cuDNN's attention zeroes workspace before its kernel (a memset node when captured)
        return torch.nn.functional.scaled_dot_product_attention(x, x, x) * t.view(-1, 1, 1, 1)

    t = torch.ones(2, device="cuda")
    plain, rewritten = CapturedModel(fn), CapturedModel(fn)
    plain.rewrite_memsets = False
    with torch.inference_mode():
        expected = plain(q, t, Conditioning())
        got = rewritten(q, t, Conditioning())
    assert torch.equal(got, expected)
    assert plain.stats.memsets_rewritten == 0
    # whether the attention kernel zeroes workspace is the library's choice: the result must not change
    assert rewritten.stats.captures == 1
