"""Parallel pre-compilation of the fused kernels (``ldm_sdk.accel.precompile``).

CPU: a stand-in JIT kernel (it refuses to launch and logs its ``warmup`` calls) checks the recording pass
-- launches recorded, never made, every fused module's recorder slot restored even when the call raises --
the de-duplication by Triton's specialisation (dtype, 16-byte alignment, divisibility by 16, constexprs),
compilation on worker threads, compile errors re-raised in the caller, models without fused modules left
alone, and ``precompile_once``.

GPU (mark ``gpu``): after ``precompile_kernels`` on the prepared SD-1.5 UNet, its first real call compiles
no further kernel (Triton's in-process caches do not grow), and its output is the eager one.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ldm_sdk.accel.precompile import PRECOMPILED_ATTR, precompile_kernels, precompile_once, recording_modules
from ldm_sdk.accel.triton_kernels import KernelRecorder, launch


class FakeKernel:
    """Stands in for a Triton JIT function: ``kernel[grid](...)`` launches (refused here), ``warmup``
    compiles (logged with the thread it ran on)."""

    def __init__(self, fail: bool = False) -> None:
        self.warmups: list[tuple[tuple[Any, ...], tuple[int, ...], dict[str, Any], str]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __getitem__(self, grid: tuple[int, ...]) -> Any:
        raise AssertionError("a recorded launch must not be made")

    def warmup(self, *args: Any, grid: tuple[int, ...], **kwargs: Any) -> None:
        if self.fail:
            raise RuntimeError("compile failed: bad tile")
        with self.lock:
            self.warmups.append((args, grid, kwargs, threading.current_thread().name))


class Fused(nn.Module):
    """A module with a recorder slot, like the fused modules: launches ``kernel`` once per call with the
    ``block`` constexpr and ``n`` as a size argument."""

    kernel_recorder: KernelRecorder | None = None

    def __init__(self, kernel: FakeKernel, block: int, n: int) -> None:
        super().__init__()
        self.kernel, self.block, self.n = kernel, block, n
        self.seen: list[KernelRecorder | None] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(self.kernel_recorder)
        out = torch.empty_like(x)
        launch(self.kernel, (4,), self.kernel_recorder, x, out, self.n, BLOCK=self.block, num_warps=4)
        return out


def _triton_jit_available() -> bool:
    try:
        from triton.runtime.jit import JITFunction

        from ldm_sdk.kernels.triton_kernels import _gn_apply_nhwc_kernel
    except ImportError:
        return False
    return isinstance(_gn_apply_nhwc_kernel, JITFunction)


def test_launch_without_a_recorder_launches() -> None:
    calls: list[tuple[Any, ...]] = []

    class Kernel:
        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            return lambda *a, **k: calls.append((grid, a, k))

    launch(Kernel(), (2, 3), None, 1, 2, BLOCK=8)
    assert calls == [((2, 3), (1, 2), {"BLOCK": 8})]


def test_records_dedupes_and_compiles_on_threads() -> None:
    kernel = FakeKernel()
    # same variant twice (n 32 and 48: both divisible by 16), another n class (33), another constexpr
    a, b, c, d = Fused(kernel, 64, 32), Fused(kernel, 64, 48), Fused(kernel, 64, 33), Fused(kernel, 128, 32)
    model = nn.Sequential(a, b, c, d)
    x = torch.zeros(8)
    report = precompile_kernels([model], lambda: model(x), threads=3)
    assert (report.launches, report.variants, report.threads) == (4, 3, 3)
    assert len(kernel.warmups) == 3
    assert {w[2]["BLOCK"] for w in kernel.warmups} == {64, 128}
    assert all(w[1] == (4,) and w[2]["num_warps"] == 4 for w in kernel.warmups)
    assert all(w[3].startswith("ldm-sdk-compile") for w in kernel.warmups)
    assert all(isinstance(m.seen[0], KernelRecorder) for m in (a, b, c, d))
    assert all(m.kernel_recorder is None and "kernel_recorder" not in m.__dict__ for m in (a, b, c, d))
    assert "pre-compiled 3 kernel variants" in str(report)


def test_the_recording_pass_frees_its_activations() -> None:
    """Recorded launches hold stand-ins (dtype, device, address), not the tensors: an activation is freed
    when the call drops it, as in a plain call (SD-1.5's guided step at batch 8 otherwise held 9.4 GB more
    during the recording, ``bench/capture_memory.py``), and the variants are the same."""
    import weakref

    from ldm_sdk.accel.triton_kernels import TensorStandIn

    kernel = FakeKernel()
    chain = [Fused(kernel, 64, 16) for _ in range(4)]
    alive: list[weakref.ref[Tensor]] = []

    def call() -> None:
        x = torch.zeros(8)
        for m in chain:
            alive.append(weakref.ref(x))
            x = m(x)  # the previous activation is dropped here

    report = precompile_kernels(chain, call, threads=1)
    assert report.launches == 4 and report.variants == 1
    assert all(ref() is None for ref in alive)
    (args, _, _, _) = kernel.warmups[0]
    assert all(isinstance(a, TensorStandIn) for a in args[:2]) and args[0].dtype == torch.float32
    # a recorder that keeps the tensors (to launch the recorded kernels later) keeps them alive
    alive.clear()
    from ldm_sdk.accel.precompile import recording

    with recording(chain) as recorder:
        call()
    assert all(ref() is not None for ref in alive) and isinstance(recorder.launches[0].args[0], Tensor)


def test_dtype_and_alignment_make_variants() -> None:
    kernel = FakeKernel()
    m = Fused(kernel, 64, 16)
    base = torch.zeros(64)
    inputs = [torch.zeros(8), torch.zeros(8, dtype=torch.float64), base[1:9]]  # misaligned by 4 bytes
    report = precompile_kernels([m], lambda: [m(x) for x in inputs], threads=2)
    assert report.variants == 3


def test_recorder_slots_are_restored_when_the_call_raises() -> None:
    m = Fused(FakeKernel(), 64, 16)

    def boom() -> None:
        m(torch.zeros(4))
        raise ValueError("the call failed")

    with pytest.raises(ValueError, match="the call failed"):
        precompile_kernels([m], boom)
    assert m.kernel_recorder is None


def test_compile_errors_reach_the_caller() -> None:
    m = Fused(FakeKernel(fail=True), 64, 16)
    with pytest.raises(RuntimeError, match="bad tile"):
        precompile_kernels([m], lambda: m(torch.zeros(4)), threads=2)


def test_models_without_fused_modules_are_left_alone() -> None:
    called: list[int] = []
    report = precompile_kernels([nn.Linear(2, 2)], lambda: called.append(1))
    assert report.variants == 0 and called == []
    assert recording_modules([nn.Linear(2, 2)]) == []
    with pytest.raises(ValueError, match="threads must be >= 1"):
        precompile_kernels([nn.Linear(2, 2)], lambda: None, threads=0)


def test_a_plain_callable_with_a_recorder_slot_is_recorded_too() -> None:
    """What :class:`~ldm_sdk.accel.graphs.CapturedModel` passes besides the watched modules: its ``fn``,
    which records its own launches when its class has the slot (the guided step's fused tail); plain
    callables without the slot are ignored."""
    kernel = FakeKernel()

    class Step:
        kernel_recorder: KernelRecorder | None = None

        def __call__(self, x: Tensor) -> Tensor:
            out = torch.empty_like(x)
            launch(kernel, (2,), self.kernel_recorder, x, out, BLOCK=32)
            return out

    step, plain = Step(), (lambda x: x)
    assert recording_modules([nn.Linear(2, 2), step, plain]) == [step]
    report = precompile_kernels([nn.Linear(2, 2), step, plain], lambda: step(torch.zeros(4)), threads=1)
    assert (report.launches, report.variants) == (1, 1) and len(kernel.warmups) == 1
    assert step.kernel_recorder is None and "kernel_recorder" not in step.__dict__


def test_fused_models_have_recorder_slots() -> None:
    from ldm_sdk.accel import fuse_blocks, fuse_model
    from ldm_sdk.testing.tiny import SD1, random_bundle

    bundle = random_bundle(SD1).eval()
    assert recording_modules([bundle]) == []
    fuse_model(bundle)
    fuse_blocks(bundle)
    slots = recording_modules([bundle])
    assert len(slots) > 0 and all(m.kernel_recorder is None for m in slots)
    # on the CPU the reference backend runs: nothing to record, the call runs once, unchanged output
    x = torch.randn(1, 3, 16, 16)
    report = precompile_kernels([bundle], lambda: bundle.encode_first_stage(x))
    assert report.launches == 0 and report.variants == 0


def test_precompile_once_skips_a_shape_done_before() -> None:
    kernel = FakeKernel()
    m = Fused(kernel, 64, 16)
    first = precompile_once(m, ("shape", 4), lambda: m(torch.zeros(4)))
    second = precompile_once(m, ("shape", 4), lambda: m(torch.zeros(4)))
    third = precompile_once(m, ("shape", 8), lambda: m(torch.zeros(8)))
    assert first is not None and first.variants == 1
    assert second is None and third is not None
    assert m.__dict__[PRECOMPILED_ATTR] == {("shape", 4), ("shape", 8)}


def _recorded_variants(monkeypatch: pytest.MonkeyPatch, calls: Any) -> tuple[int, int]:
    """(launches, distinct variants by ``_variant``) of the real GroupNorm / LayerNorm launchers run on CPU
    tensors with a recorder (nothing launches; the CUDA-only input check is lifted as under the
    interpreter). The kernels are the real Triton JIT functions, so their parameter lists (constexprs,
    ``do_not_specialize``) are what ``_variant`` reads."""
    from ldm_sdk.accel import triton_kernels as K
    from ldm_sdk.accel.precompile import _variant

    monkeypatch.setattr(K, "_interpreting", lambda: True)
    recorder = KernelRecorder()
    calls(recorder)
    return len(recorder), len({_variant(launch) for launch in recorder.launches})


@pytest.mark.skipif(not _triton_jit_available(), reason="needs Triton (not in interpreter mode)")
def test_unspecialised_arguments_do_not_split_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """An argument a kernel lists in ``do_not_specialize`` is compiled into one variant whatever its value
    (Triton does not key on its divisibility by 16 or on its being 1): the shift's row stride of the
    GroupNorm statistics / apply kernels (``SHIFT_STRIDE``: 64, 0 for a vector expanded over the batch, 65
    for a row-strided view) and the LayerNorm kernel's row count (``ROWS``). Specialised arguments and
    constexprs still split them."""
    from ldm_sdk.accel.residual_kernels import layer_norm_triton
    from ldm_sdk.accel.triton_kernels import group_norm_act_triton

    x = torch.randn(2, 64, 8, 8).to(memory_format=torch.channels_last)
    w, b = torch.randn(64), torch.randn(64)
    shifts = [torch.randn(2, 64), torch.randn(64).expand(2, 64), torch.randn(2, 65)[:, :64]]

    def norms(recorder: KernelRecorder) -> None:
        for shift in shifts:
            group_norm_act_triton(
                x, w, b, 32, 1e-5, "silu", shift=shift, recorder=recorder, single_pass=False
            )

    assert _recorded_variants(monkeypatch, norms) == (6, 2)  # statistics and apply, one variant each

    def other_act(recorder: KernelRecorder) -> None:
        for act in ("silu", "none"):  # a constexpr: two variants of the apply kernel
            group_norm_act_triton(x, w, b, 32, 1e-5, act, recorder=recorder, single_pass=False)

    assert _recorded_variants(monkeypatch, other_act) == (4, 3)

    def rows(recorder: KernelRecorder) -> None:
        for n in (16, 17, 1):
            layer_norm_triton(torch.randn(n, 320), w.new_ones(320), None, 1e-5, recorder=recorder)
        layer_norm_triton(torch.randn(16, 640), None, None, 1e-5, recorder=recorder)  # another tile

    assert _recorded_variants(monkeypatch, rows) == (4, 3)  # weight / no weight at 320, and 640


# -- GPU -----------------------------------------------------------------------------------------------------
def _jit_cache_sizes() -> int:
    from ldm_sdk.accel import residual_kernels as R
    from ldm_sdk.accel import triton_kernels as K

    kernels = [
        getattr(mod, n) for mod in (K, R) for n in dir(mod) if n.startswith("_") and n.endswith("_kernel")
    ]
    return sum(len(cache[0]) for k in kernels for cache in getattr(k, "device_caches", {}).values())


@pytest.mark.gpu
def test_sd15_unet_first_call_after_precompile_compiles_nothing() -> None:
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.benchmarks.common import random_sd15_unet

    unet = random_sd15_unet("cuda", seed=0).half()
    prepare_cuda_inference(unet)
    g = torch.Generator(device="cuda").manual_seed(1)
    # an odd size, so no earlier test compiled these variants
    x = (
        torch.randn(2, 4, 40, 56, generator=g, device="cuda")
        .half()
        .contiguous(memory_format=torch.channels_last)
    )
    t = torch.tensor([981.0, 421.0], device="cuda")
    ctx = torch.randn(2, 77, 768, generator=g, device="cuda").half()
    report = precompile_kernels([unet], lambda: unet(x, t, context=ctx))
    print(report)
    assert report.variants > 0
    before = _jit_cache_sizes()
    with torch.inference_mode():
        out = unet(x, t, context=ctx)
    assert _jit_cache_sizes() == before, "the first real call compiled kernels the recording pass missed"
    assert torch.isfinite(out).all()
