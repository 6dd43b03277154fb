"""Weights reordered once for oneDNN / MKL (ldm_sdk.accel.cpu_prepack): bit-identical to the eager
channels_last layers in bf16 (per layer and for a whole UNet), within fp32 rounding in fp32, re-packed when a
weight changes, plain forward where the packed kernel does not apply, state_dict unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm_sdk.accel.cpu_prepack import (
    PackedConv2d,
    PackedLinear,
    prepack_available,
    prepack_cpu_weights,
    unpack_cpu_weights,
)
from ldm_sdk.testing.tiny import ALL, random_bundle
from tests.accel.capture_checks import random_inputs, rel_err

pytestmark = pytest.mark.skipif(not prepack_available(), reason="torch build without mkldnn / MKL")
CL = torch.channels_last


def pair(module: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    plain = module.eval().requires_grad_(False).to(dtype)
    plain.to(memory_format=CL)
    packed = copy.deepcopy(plain)
    prepack_cpu_weights(packed)
    return plain, packed


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "stride", "padding"),
    [(32, 64, 3, 1, 1), (64, 64, 3, 2, 1), (64, 32, 1, 1, 0), (96, 64, 3, 1, 0)],
)
def test_conv_bf16_bit_identical(cin: int, cout: int, kernel: int, stride: int, padding: int) -> None:
    g = torch.Generator().manual_seed(cin + cout + kernel)
    plain, packed = pair(nn.Conv2d(cin, cout, kernel, stride, padding), torch.bfloat16)
    assert type(packed) is PackedConv2d
    with torch.inference_mode():
        # the pack is made for the first shape and reused for the others (batch, size, layout)
        for batch, size, cl in ((2, 16, True), (1, 8, True), (3, 12, False), (2, 16, False)):
            x = torch.randn(batch, cin, size, size, generator=g).bfloat16()
            x = x.contiguous(memory_format=CL) if cl else x
            ref, out = plain(x), packed(x)
            assert torch.equal(out, ref), (batch, size, cl)
            assert out.is_contiguous(memory_format=CL) == ref.is_contiguous(memory_format=CL)
    assert packed.__dict__["_pack"] is not None


def test_linear_bf16_bit_identical() -> None:
    g = torch.Generator().manual_seed(1)
    for bias in (True, False):
        plain, packed = pair(nn.Linear(64, 96, bias=bias), torch.bfloat16)
        assert type(packed) is PackedLinear
        with torch.inference_mode():
            for shape in ((2, 64), (2, 77, 64), (3, 5, 7, 64), (1, 64)):
                x = torch.randn(*shape, generator=g).bfloat16()
                assert torch.equal(packed(x), plain(x)), (bias, shape)


def test_fp32_within_rounding() -> None:
    """fp32: MKL's packed sgemm and oneDNN's convolution round differently from ATen's choice for some shapes
    (gemv at 2 rows, im2col for some 1x1 convolutions), so only fp32 rounding-level agreement holds."""
    g = torch.Generator().manual_seed(2)
    conv_plain, conv_packed = pair(nn.Conv2d(64, 64, 3, padding=1), torch.float32)
    lin_plain, lin_packed = pair(nn.Linear(64, 128), torch.float32)
    with torch.inference_mode():
        x = torch.randn(2, 64, 8, 8, generator=g).contiguous(memory_format=CL)
        assert rel_err(conv_packed(x), conv_plain(x)) < 1e-6
        for rows in (2, 154, 2):  # the MKL pack is per row count: made again when it changes
            h = torch.randn(rows, 64, generator=g)
            assert rel_err(lin_packed(h), lin_plain(h)) < 1e-6


@pytest.mark.parametrize("family", ["sd1", "sd2_v", "ldm_kl_f4_uncond"])
def test_whole_unet_bf16_bit_identical(family: str) -> None:
    bundle = random_bundle(ALL[family])
    plain, packed = pair(bundle.unet, torch.bfloat16)
    report = prepack_cpu_weights(packed)  # idempotent: counts the converted modules again
    n_conv = sum(1 for m in plain.modules() if type(m) is nn.Conv2d)
    n_lin = sum(1 for m in plain.modules() if type(m) is nn.Linear)
    assert (report.convs, report.linears) == (n_conv, n_lin) and n_conv > 0
    assert list(packed.state_dict()) == list(plain.state_dict())
    x, t, cond = random_inputs(bundle, 2, 16, torch.device("cpu"), torch.bfloat16, seed=3)
    kw = {"context": cond.crossattn} if cond.crossattn is not None else {}
    with torch.inference_mode():
        for _ in range(2):
            assert torch.equal(packed(x, t, **kw), plain(x, t, **kw))


def test_first_stage_bf16_bit_identical() -> None:
    bundle = random_bundle(ALL["sd1"])
    plain, packed = pair(bundle.first_stage_model, torch.bfloat16)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)).bfloat16()
    with torch.inference_mode():
        assert torch.equal(packed.decode(z), plain.decode(z))


def test_repacks_when_weights_change() -> None:
    g = torch.Generator().manual_seed(5)
    plain, packed = pair(nn.Conv2d(32, 32, 3, padding=1), torch.bfloat16)
    x = torch.randn(2, 32, 8, 8, generator=g).bfloat16().contiguous(memory_format=CL)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
    with torch.no_grad():  # in place: the version counter moves
        plain.weight.mul_(-0.5)
        packed.weight.mul_(-0.5)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
    state = {k: v * 2 for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    packed.load_state_dict(state)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
    plain.float()  # a cast: new memory, new dtype
    packed.float()
    with torch.inference_mode():
        assert rel_err(packed(x.float()), plain(x.float())) < 1e-6


def test_falls_back_where_the_packed_kernel_does_not_apply() -> None:
    g = torch.Generator().manual_seed(6)
    # an NCHW weight (channels_last off): the plain forward, bit for bit
    conv = nn.Conv2d(16, 16, 3, padding=1).eval().requires_grad_(False).bfloat16()
    ref_conv = copy.deepcopy(conv)
    prepack_cpu_weights(conv)
    x = torch.randn(1, 16, 8, 8, generator=g).bfloat16()
    with torch.inference_mode():
        assert torch.equal(conv(x), ref_conv(x)) and conv.__dict__["_pack"] is None
    # gradients recorded: plain forward, and backward works
    lin = nn.Linear(8, 4)
    ref_lin = copy.deepcopy(lin)
    prepack_cpu_weights(lin)
    h = torch.randn(3, 8, generator=g)
    lin(h).sum().backward()
    ref_lin(h).sum().backward()
    assert lin.weight.grad is not None and ref_lin.weight.grad is not None
    assert torch.equal(lin.weight.grad, ref_lin.weight.grad) and lin.__dict__["_pack"] is None
    # other dtypes (float64) take the plain forward
    lin64 = copy.deepcopy(ref_lin).double()
    prepack_cpu_weights(lin64)
    with torch.inference_mode():
        assert torch.equal(lin64(h.double()), ref_lin.double()(h.double()))
    # reflect padding is not converted
    padded = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3))
    report = prepack_cpu_weights(padded)
    assert report.convs == 1 and len(report.skipped) == 1 and "reflect" in report.skipped[0]
    assert type(padded[0]) is nn.Conv2d and type(padded[1]) is PackedConv2d


def test_unpack_restores_plain_modules() -> None:
    bundle = random_bundle(ALL["sd1"])
    plain, packed = pair(bundle.unet, torch.bfloat16)
    x, t, cond = random_inputs(bundle, 2, 16, torch.device("cpu"), torch.bfloat16, seed=7)
    with torch.inference_mode():
        packed(x, t, context=cond.crossattn)
    unpack_cpu_weights(packed)
    assert not any(isinstance(m, PackedConv2d | PackedLinear) for m in packed.modules())
    assert not any("_pack" in m.__dict__ for m in packed.modules())
    with torch.inference_mode():
        assert torch.equal(packed(x, t, context=cond.crossattn), plain(x, t, context=cond.crossattn))


def test_packable_bytes_counts_each_plain_layers_weight_once() -> None:
    """What prepacking would copy: the weights of plain Conv2d / Linear layers (a shared weight once; not
    biases, not other layers' parameters), in their dtype; and the machine's memory is known here."""
    from ldm_sdk.accel.cpu_prepack import packable_bytes, physical_memory_bytes

    conv, linear = nn.Conv2d(3, 8, 3), nn.Linear(5, 4)
    tied = nn.Linear(5, 4)
    tied.weight = linear.weight
    model = nn.Sequential(conv, linear, tied, nn.GroupNorm(2, 8), nn.Embedding(10, 3))
    assert packable_bytes(model) == (8 * 3 * 9 + 4 * 5) * 4
    assert packable_bytes(model.to(torch.bfloat16)) == (8 * 3 * 9 + 4 * 5) * 2
    memory = physical_memory_bytes()
    assert memory is None or memory > 0


@pytest.mark.skipif(not prepack_available(), reason="this torch build lacks the oneDNN / MKL prepacked ops")
def test_a_convolution_packed_at_one_input_size_serves_every_other_exactly() -> None:
    """The pack is made once, with the first input's size as oneDNN's hint; the tasks then call it at other
    image sizes and batches. Every call equals the plain channels_last convolution bit for bit (bf16)."""
    torch.manual_seed(0)
    for cin, cout, k in [(16, 32, 3), (32, 32, 1), (4, 16, 3)]:
        plain = nn.Conv2d(cin, cout, k, padding=k // 2).to(torch.bfloat16, memory_format=torch.channels_last)
        packed = copy.deepcopy(plain)
        prepack_cpu_weights(packed)
        assert isinstance(packed, PackedConv2d)
        with torch.inference_mode():
            for batch, h, w in [(2, 16, 16), (1, 8, 8), (3, 12, 20), (2, 32, 32)]:
                x = torch.randn(batch, cin, h, w, dtype=torch.bfloat16)
                x = x.contiguous(memory_format=torch.channels_last)
                assert torch.equal(packed(x), plain(x)), (cin, cout, k, batch, h, w)
        assert packed.__dict__.get("_pack") is not None  # the packed kernel ran
