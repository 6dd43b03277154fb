"""``ldm_sdk.accel.guided_combine``: guidance + the ``(eps, x0)`` conversion as one kernel.

The independent reference is the torch path of :class:`~ldm_sdk.accel.guided_step.GuidedPrediction`
(``fuse_tail = False``), itself tested bit for bit against the eager ``ModelDenoiser(ClassifierFreeGuidance)``
in ``test_guided_step.py``: the kernel must agree with it to float32 rounding for every parameterization, at
integer and fractional timesteps (the float64 look-up's two branches), at the first and last table entries,
with guidance scales on both sides of 0.5 (``lerp``'s two formulas) and negative, fp16 and float32 network
outputs, contiguous and channels_last layouts.

CPU: :func:`fits` and the argument errors; the kernel itself in the Triton interpreter (a subprocess).
GPU (mark ``gpu``): the same comparison on CUDA, and the fused tail inside a captured guided step.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import guided_combine as GC
from ldm_sdk.accel.guided_step import GuidedPrediction
from ldm_sdk.accel.triton_kernels import triton_available
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import DiffusionConfig
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan

SCHEDULE = DiffusionSchedule.from_config(DiffusionConfig(linear_start=0.00085, linear_end=0.012))
#: (timestep, scale): fractional and integer t, the table's ends, scales on both sides of 0.5
CASES = ((981.0, 7.5), (400.25, 3.3), (0.0, 0.25), (999.0, -2.0), (12.5, 0.5), (1.0, 1.0))


def network(out_dtype: torch.dtype, memory_format: torch.memory_format) -> Callable[..., Tensor]:
    """A nonlinear stand-in for a UNet (depends on x, t and the context) with the given output dtype and
    layout."""

    def fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        ctx = cond.crossattn.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        y = torch.tanh(x * (1 + ctx)) * torch.cos(t / 300).reshape(-1, 1, 1, 1)
        return (y + ctx).to(out_dtype).contiguous(memory_format=memory_format)

    return fn


def compare(device: str) -> list[str]:
    """The kernel against the torch path on ``device``: bit for bit on CUDA, to float32 rounding in the
    interpreter; returns what was checked."""
    done = []
    g = torch.Generator().manual_seed(0)
    for param in ("eps", "x0", "v"):
        for out_dtype in (torch.float16, torch.float32):
            for fmt in (torch.contiguous_format, torch.channels_last):
                x = torch.randn(2, 4, 6, 6, generator=g).to(device).contiguous(memory_format=fmt)
                c2 = Conditioning(crossattn=torch.randn(4, 5, 8, generator=g).to(device))
                step = GuidedPrediction(network(out_dtype, fmt), SCHEDULE, param)  # type: ignore[arg-type]
                for t_value, scale in CASES:
                    ts = torch.stack(
                        [torch.full((2,), t_value, dtype=torch.float64), torch.tensor([scale, -scale / 3])]
                    ).to(device, torch.float64)
                    step.fuse_tail = False
                    want = step(x, ts, c2)
                    out = step.model_fn(torch.cat([x, x]), torch.cat([ts[0], ts[0]]), c2)
                    assert GC.fits(out, x, ts, param), (param, out_dtype, fmt)
                    step.fuse_tail = True
                    got = step(x, ts, c2)
                    what = f"{param} {out_dtype} {fmt} t={t_value} scale={scale}"
                    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32, what
                    assert got[0].stride() == x.stride(), what
                    if device == "cuda":
                        assert torch.equal(got, want), f"{what}: {float((got - want).abs().max())}"
                    else:
                        atol = 2e-6 * float(want.abs().max())
                        torch.testing.assert_close(got, want, rtol=2e-6, atol=atol, msg=what)
                    done.append(what)
    return done


def test_fits() -> None:
    x = torch.zeros(2, 4, 6, 6)
    out = torch.zeros(4, 4, 6, 6, dtype=torch.float16)
    ts = torch.zeros(2, 2, dtype=torch.float64)
    assert not GC.fits(out, x, ts, "eps")  # the CPU without the interpreter
    assert not GC.fits(out, x, ts, "score")


def test_errors() -> None:
    x = torch.zeros(2, 4, 6, 6)
    with pytest.raises(ValueError, match="guided_prediction takes"):
        GC.guided_prediction(x, x, torch.zeros(2, 2, dtype=torch.float64), SCHEDULE.tables(), "eps")


def interpreter_checks() -> list[str]:
    with unwritten_memory_is_nan(), torch.no_grad():
        return compare("cpu")


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 3 * 2 * 2 * len(CASES), done


@pytest.mark.gpu
def test_kernel_on_cuda() -> None:
    with torch.no_grad():
        assert len(compare("cuda")) == 3 * 2 * 2 * len(CASES)


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
