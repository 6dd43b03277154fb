"""``conv3x3_fused`` on a Hopper GPU at the kl-f8 decoder's shapes, under the plans the decoder takes: the
output against float32 ``F.conv2d`` (+ bias + skip) within one output ulp plus float32 noise, and the merged
statistics against torch's mean and variance of the output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_sdk.accel.implicit_conv import conv3x3_fused, plan_conv
from ldm_sdk.accel.triton_kernels import compare_ulps
from ldm_sdk.benchmarks.common import true_float32

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cin", "cout", "size"), [(128, 128, 512), (256, 128, 512), (256, 256, 256)])
def test_decoder_shapes_match_float32(cin: int, cout: int, size: int, dtype: torch.dtype) -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs a Hopper GPU (TMA)")
    g = torch.Generator("cuda").manual_seed(cin + size)
    cl = torch.channels_last
    x = torch.randn(1, cin, size, size, generator=g, device="cuda").to(dtype).to(memory_format=cl)
    w = (
        (torch.randn(cout, cin, 3, 3, generator=g, device="cuda") / (3 * cin**0.5))
        .to(dtype)
        .to(memory_format=cl)
    )
    bias, rbias = (torch.randn(cout, generator=g, device="cuda").to(dtype) for _ in range(2))
    skip = torch.randn(1, cout, size, size, generator=g, device="cuda").to(dtype).to(memory_format=cl)
    out, stats = conv3x3_fused(x, w, bias, residual=skip, residual_bias=rbias, stats_groups=32)
    assert out.is_contiguous(memory_format=cl) and out.dtype == dtype
    with true_float32():
        ref = F.conv2d(x.float(), w.float(), bias.float(), padding=1)
    ref = ref + skip.float() + rbias.float()[:, None, None]
    report = compare_ulps(out, ref)
    assert report.within_bound, report
    assert stats is not None and plan_conv(size).block_w == 256
    groups = out.float().reshape(1, 32, -1)
    slots = stats.mean.numel() // 32
    mean = stats.mean.reshape(32, slots)
    m2 = stats.m2.reshape(32, slots)
    count = stats.count.reshape(32, slots)
    assert torch.equal(count[:, 0], torch.full((32,), float(groups.shape[-1]), device="cuda"))
    assert torch.all(count[:, 1:] == 0)
    torch.testing.assert_close(mean[:, 0], groups.mean(-1)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        m2[:, 0] / count[:, 0], groups.var(-1, unbiased=False)[0], rtol=1e-4, atol=1e-6
    )
