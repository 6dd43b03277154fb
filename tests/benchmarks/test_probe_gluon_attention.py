"""``bench/probe_gluon_attention.py`` stays compilable with the installed Triton (its Gluon dialect changes
between releases; the probe's numbers came from Triton 3.6), compiled for sm_90 without a GPU
(:func:`~ldm_sdk.kernels.compile_workers.compile_only_driver`), and its flags change the compiled kernel
the way its docstring says: the row sums as ``P @ ones`` products of width 8, the split head dim as two
k / v blocks, a share of the exponentials off the special-function unit, and the warp-specialized form's
partitions with their register budgets. The timings need an H100."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")

from ldm_sdk.kernels.compile_workers import Target, compile_only_driver

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import probe_gluon_attention as probe


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


def compiled_ptx(d: int = 40, n: int = 4096, **opts: Any) -> str:
    qkv = torch.empty(2, n, 3 * 8 * d, dtype=torch.float16)
    q, k, v = qkv.split(8 * d, dim=-1)
    args, meta, grid = probe.attention(q, k, v, 8, d**-0.5, grid_only=True, **opts)
    with compile_only_driver(Target("cuda", 90, 32)):
        kernel = probe._attention_kernel.warmup(*args, grid=grid, **meta)
    return kernel.asm["ptx"]


def wgmma_shapes(ptx: str) -> dict[str, int]:
    shapes: dict[str, int] = {}
    for shape in re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx):
        shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def test_row_sums_on_the_tensor_cores_add_width_8_products() -> None:
    with_mma = wgmma_shapes(compiled_ptx(sum_mma=1))
    without = wgmma_shapes(compiled_ptx(sum_mma=0))
    assert "m64n8k16" in with_mma and "m64n8k16" not in without
    assert with_mma["m64n64k16"] == without["m64n64k16"]  # q k^T and P v unchanged


def test_split_head_dim_uses_32_and_16_wide_blocks() -> None:
    assert probe.head_blocks(40, True) == (64, 32, 16)
    assert probe.head_blocks(80, True) == (128, 64, 16)
    assert probe.head_blocks(64, True) == (64, 64, 0)
    assert probe.head_blocks(40, False) == (64, 64, 0)
    shapes = wgmma_shapes(compiled_ptx(split=1))
    assert {"m64n32k16", "m64n16k16"} <= set(shapes)  # P v_a (32 wide), P v_b (16 wide)


def test_polynomial_share_takes_exponentials_off_the_sfu() -> None:
    counts = [len(re.findall(r"ex2\.approx", compiled_ptx(poly=poly))) for poly in (0, 1, 2)]
    assert counts[0] > counts[1] > counts[2]


def test_bad_launches_are_refused() -> None:
    q = torch.empty(1, 100, 320, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of 128"):
        probe.attention(q, q, q, 8, 0.1, grid_only=True)
    q = torch.empty(1, 4096, 320, dtype=torch.float16)
    with pytest.raises(ValueError, match="poly in 0/1/2"):
        probe.attention(q, q, q, 8, 0.1, grid_only=True, poly=3)


def test_warp_specialized_form_compiles_with_its_partitions() -> None:
    qkv = torch.empty(2, 4096, 3 * 320, dtype=torch.float16)
    q, k, v = qkv.split(320, dim=-1)
    for pingpong in (0, 1):
        args, meta, grid = probe.ws_attention(q, k, v, 8, 40**-0.5, grid_only=True, pingpong=pingpong)
        with compile_only_driver(Target("cuda", 90, 32)):
            kernel = probe._ws_attention_kernel.warmup(*args, grid=grid, **meta)
        ptx = kernel.asm["ptx"]
        assert kernel.metadata.num_warps == 12  # 4 + 4 + 1 warps, allocated by warp group
        assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+240;", ptx)  # the consumers' registers
        assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+24;", ptx)  # the producer's
        assert "cp.async.bulk.tensor" in ptx and "m64n8k16" in ptx
    with pytest.raises(ValueError, match="multiple of 256"):
        probe.ws_attention(q[:, :1000], k[:, :1000], v[:, :1000], 8, 0.1, grid_only=True)
