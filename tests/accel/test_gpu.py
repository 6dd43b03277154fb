"""The fast paths on a CUDA device (mark ``gpu``; skipped without one): captured replay equals eager for
tiny UNets of every conditioning kind and for a full DDIM + CFG run through the SDK sampler (exactly in
fp32, rel. err < 1e-2 in fp16 / bf16), the cache and output modes on the device and refusals that leave the
device usable.

``bench/validate_fast_path.py`` runs these on the GPU machine (``pytest -m gpu tests/accel``)."""

from __future__ import annotations

import pytest
import torch

from tests.accel.capture_checks import (
    FAMILIES,
    check_cache_and_outputs,
    check_capture_refusals,
    check_sampler_capture,
    check_unet_capture,
)

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_captured_unet_equals_eager(family: str, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    check_unet_capture(CUDA, dtype, "graph", family)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_captured_ddim_cfg_equals_eager(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    check_sampler_capture(CUDA, dtype, "graph")


def test_cache_and_output_modes_on_cuda() -> None:
    check_cache_and_outputs(CUDA, "graph")


def test_auto_mode_captures_on_cuda() -> None:
    check_cache_and_outputs(CUDA, "auto")


def test_refusals_leave_the_device_usable() -> None:
    check_capture_refusals(CUDA)
