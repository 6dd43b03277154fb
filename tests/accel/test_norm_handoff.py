"""GroupNorm statistics handed from the decoder's residual adds and upsamplings, and from the UNet's residual
blocks and spatial transformers, to the next norm (``ldm_sdk.accel.norm_handoff``,
``block_fusion.link_decoder`` / ``link_unet``).

CPU: the handoff gives statistics only for the very tensor offered, unchanged, once, for its group count;
``link_decoder`` marks exactly the blocks whose next module starts with a fused norm and gives them and the
norms one handoff; off CUDA the add is the plain one and offers nothing.

Through the Triton interpreter (``TRITON_INTERPRET=1`` set before Triton is imported, so
:func:`test_handoff_in_the_interpreter` runs this file as a script in a subprocess): the fused add +
statistics kernel writes the same bits as the bias + residual kernel (and the interleave + statistics kernel
as the sub-pixel interleave), the norm fed its statistics returns
the same bits as the norm computing its own (several chunks, groups spanning two column tiles, each
bias / residual variant), mismatched statistics are refused, and the tiny SD-1 decoder with the handoff
decodes to the same bits as without it, with the handoff used; the tiny SD-1 UNet too.

GPU (mark ``gpu``): the kl-f8 decoder in fp16 decodes to the same bits with and without the handoff.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import pickle
import sys

import pytest
import torch
from torch import Tensor

from ldm_sdk.accel import fuse_blocks, fuse_model
from ldm_sdk.accel import norm_handoff as H
from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.accel.block_fusion import FusedResnetBlock, decoder_sequence, link_decoder
from ldm_sdk.accel.fusion import FusedGroupNorm
from ldm_sdk.accel.subpixel import FusedFirstStageUpsample
from ldm_sdk.accel.vae_attention import FusedAttnBlock
from ldm_sdk.models.autoencoder import Decoder
from ldm_sdk.testing.interpreter import run_interpreted, unwritten_memory_is_nan
from ldm_sdk.testing.tiny import SD1, random_bundle


def fused_decoder(backend: str) -> Decoder:
    bundle = random_bundle(SD1).eval()
    fuse_model(bundle, backend=backend)  # type: ignore[arg-type]
    fuse_blocks(bundle, backend=backend)  # type: ignore[arg-type]
    decoder = bundle.first_stage_model.decoder
    assert isinstance(decoder, Decoder)
    return decoder.to(memory_format=torch.channels_last)


def fake_stats() -> K.GroupNormStats:
    plan = K.plan_group_norm((1, 32, 4, 4), 32, channels_last=True, target_programs=4)
    empty = torch.zeros(1)
    return K.GroupNormStats(plan, empty, empty, empty)


# -- CPU -----------------------------------------------------------------------------------------------------
def test_handoff_takes_only_the_offered_unchanged_tensor_once() -> None:
    handoff, stats = H.NormHandoff(32), fake_stats()
    x = torch.zeros(1, 32, 4, 4)
    handoff.offer(x, stats)
    assert handoff.take(x.clone(), 32) is None  # another tensor with the same values
    handoff.offer(x, stats)
    assert handoff.take(x, 16) is None  # another group count
    handoff.offer(x, stats)
    assert handoff.take(x, 32) is stats and handoff.taken == 1
    assert handoff.take(x, 32) is None  # used once
    handoff.offer(x, stats)
    x.add_(1.0)  # changed since the offer
    assert handoff.take(x, 32) is None and handoff.taken == 1
    with torch.inference_mode():  # no version counter: the identity decides
        y = torch.zeros(1, 32, 4, 4)
        handoff.offer(y, stats)
        assert handoff.take(y.clone(), 32) is None
        handoff.offer(y, stats)
        assert handoff.take(y, 32) is stats and handoff.taken == 2


def test_a_handoff_pickles_without_its_offer() -> None:
    handoff = H.NormHandoff(32)
    x = torch.zeros(1, 32, 4, 4)
    handoff.offer(x, fake_stats())
    copied = pickle.loads(pickle.dumps(handoff))
    assert copied.groups == 32 and copied.take(x, 32) is None
    assert handoff.take(x, 32) is not None  # the original keeps its offer


def test_link_decoder_marks_the_blocks_that_feed_a_norm() -> None:
    decoder = fused_decoder("reference")
    seq = decoder_sequence(decoder)
    handoffs = {id(m.norm_handoff) for m in seq if isinstance(m, FusedResnetBlock | FusedAttnBlock)}
    assert len(handoffs) == 1 and None not in handoffs
    assert decoder.norm_out.norm_handoff is seq[0].norm_handoff  # type: ignore[union-attr]
    consumers = (FusedResnetBlock, FusedAttnBlock, FusedGroupNorm)
    producers = 0
    upsamplings = 0
    for module, nxt in zip(seq, [*seq[1:], None], strict=True):
        if isinstance(module, FusedResnetBlock | FusedAttnBlock | FusedFirstStageUpsample):
            assert module.norm_handoff is seq[0].norm_handoff  # type: ignore[union-attr]
            assert module.feeds_norm == isinstance(nxt, consumers), (type(module), type(nxt))
            producers += module.feeds_norm
            upsamplings += isinstance(module, FusedFirstStageUpsample)
    levels = decoder.num_resolutions
    assert upsamplings == levels - 1
    # every module but norm_out and the last block of each upsampling level
    assert producers == link_decoder(decoder) == len(seq) - 1 - (levels - 1)
    decoder.norm_out.num_groups = 16  # type: ignore[union-attr]
    assert link_decoder(decoder) == 0  # group counts differ: no handoff


def test_link_unet_marks_the_layers_that_feed_a_norm_but_not_across_a_skip() -> None:
    from ldm_sdk.accel.block_fusion import FusedResBlock, FusedSpatialTransformer, link_unet, unet_sequence

    bundle = random_bundle(SD1).eval()
    fuse_model(bundle, backend="reference")
    fuse_blocks(bundle, backend="reference")
    unet = bundle.unet
    seq = unet_sequence(unet)
    consumers = (FusedResBlock, FusedSpatialTransformer, FusedGroupNorm)
    producers = 0
    for module, nxt in zip(seq, [*seq[1:], None], strict=True):
        if isinstance(module, FusedResBlock | FusedSpatialTransformer):
            assert module.norm_handoff is unet.out[0].norm_handoff is not None
            assert module.feeds_norm == isinstance(nxt, consumers), (type(module), type(nxt))
            producers += module.feeds_norm
    before_skip = [m for m, nxt in itertools.pairwise(seq) if nxt is None and m is not None]
    assert before_skip and not any(getattr(m, "feeds_norm", False) for m in before_skip)
    assert producers == link_unet(unet) > 0


def test_off_cuda_the_add_is_plain_and_offers_nothing() -> None:
    handoff = H.NormHandoff(32)
    y = torch.randn(1, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    r, b = torch.randn_like(y), torch.randn(32)
    out = H.residual_add_for_norm(y, b, r, handoff=handoff)
    assert torch.equal(out, (y + b[:, None, None]) + r)
    assert handoff.take(out, 32) is None


def test_argument_errors_say_what_is_valid() -> None:
    y = torch.randn(1, 32, 4, 4)
    if K.triton_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="runs CUDA tensors"):
            H.bias_residual_add_with_stats(y, None, None, num_groups=32)
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        H.bias_residual_add_with_stats(y.double(), None, None, num_groups=32)


# -- the kernels through the Triton interpreter --------------------------------------------------------------
def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(shape, generator=g) + 0.5).to(dtype).contiguous(memory_format=torch.channels_last)
    r = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    b = (0.3 * torch.randn(shape[1], generator=g)).to(dtype)
    rb = (0.2 * torch.randn(shape[1], generator=g)).to(dtype)
    return y, r, b, rb


def interpreter_checks() -> list[str]:
    done: list[str] = []
    from ldm_sdk.accel import residual_kernels as R

    cases = [
        # shape, dtype, groups, bias, residual, residual bias
        ((1, 64, 16, 24), torch.float32, 32, True, True, True),  # 4 chunks of the 384 rows
        ((2, 96, 9, 7), torch.float16, 32, True, True, False),  # groups of 3 span two column tiles
        ((1, 64, 8, 8), torch.bfloat16, 16, False, True, False),  # no bias
        ((1, 64, 8, 8), torch.float16, 32, True, False, False),  # no residual
    ]
    with unwritten_memory_is_nan():
        for shape, dtype, groups, has_b, has_r, has_rb in cases:
            y, r, b, rb = _inputs(shape, dtype, len(done))
            bias, res, rbias = (b if has_b else None), (r if has_r else None), (rb if has_rb else None)
            out, stats = H.bias_residual_add_with_stats(y, bias, res, residual_bias=rbias, num_groups=groups)
            plain = R.bias_residual_add_triton(y, bias, res, residual_bias=rbias)
            assert torch.equal(out, plain), f"{shape} {dtype}: the sum differs from bias_residual_add"
            w = torch.randn(shape[1]).to(dtype)
            own = K.group_norm_act_triton(out, w, b, groups, 1e-6, "silu", single_pass=False)
            fed = K.group_norm_act_triton(out, w, b, groups, 1e-6, "silu", stats=stats)
            assert torch.equal(fed, own), f"{shape} {dtype} groups {groups}: the norm differs"
            done.append(f"{shape} {dtype} groups {groups} bias {has_b} residual {has_r} rbias {has_rb}")
        from ldm_sdk.accel import subpixel as P

        # the sub-pixel interleave: (N, 4C, h + 1, w + 1) phases -> (N, C, 2h, 2w), several chunks, a
        # group spanning two column tiles, with and without a bias
        for n, c, h, w, groups, dtype, has_b in (
            (2, 64, 6, 10, 32, torch.float32, True),
            (1, 96, 5, 4, 32, torch.float16, True),
            (1, 64, 4, 4, 16, torch.bfloat16, False),
        ):
            g = torch.Generator().manual_seed(n + c + h)
            full = torch.randn(n, 4 * c, h + 1, w + 1, generator=g).to(dtype)
            full = full.contiguous(memory_format=torch.channels_last)
            bias = (0.3 * torch.randn(c, generator=g)).to(dtype) if has_b else None
            handoff = H.NormHandoff(groups)
            out = P._interleave_with_stats(full, bias, c, h, w, handoff, None)
            plain = P._interleave_triton(full, bias, c, h, w, None)
            assert torch.equal(out, plain), f"{(n, c, h, w)} {dtype}: the interleave differs"
            stats = handoff.take(out, groups)
            assert stats is not None
            wt = torch.randn(c).to(dtype)
            own = K.group_norm_act_triton(out, wt, None, groups, 1e-6, "silu", single_pass=False)
            fed = K.group_norm_act_triton(out, wt, None, groups, 1e-6, "silu", stats=stats)
            assert torch.equal(fed, own), f"{(n, c, h, w)} {dtype} groups {groups}: the norm differs"
        done.append("sub-pixel interleave")

        y, r, b, _ = _inputs((1, 64, 8, 8), torch.float32, 0)
        out, stats = H.bias_residual_add_with_stats(y, b, r, num_groups=32)
        with pytest.raises(ValueError, match="cannot be combined with shift"):
            K.group_norm_act_triton(out, None, None, 32, 1e-6, shift=torch.zeros(1, 64), stats=stats)
        with pytest.raises(ValueError, match="another launch plan"):
            K.group_norm_act_triton(out, None, None, 16, 1e-6, stats=stats)
        done.append("errors")

    # the tiny SD-1 decoder (single-pass norms off, so that its small maps take the statistics pass)
    K.SINGLE_PASS_MAX = 16
    decoder = fused_decoder("triton")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    z = z.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        linked = decoder(z)
        handoff = decoder.norm_out.norm_handoff  # type: ignore[union-attr]
        producers = sum(bool(getattr(m, "feeds_norm", False)) for m in decoder.modules())
        assert handoff is not None and handoff.taken == producers > 0, (handoff.taken, producers)
        plain = copy.deepcopy(decoder)
        for module in plain.modules():
            if hasattr(module, "feeds_norm"):
                module.feeds_norm = False
        assert torch.equal(plain(z), linked), "the decoder differs with the handoff"
    done.append(f"tiny decoder: {handoff.taken} statistics passes handed off")

    # the tiny SD-1 UNet likewise (residual blocks and spatial transformers -> the next norm)
    bundle = random_bundle(SD1).eval()
    fuse_model(bundle, backend="triton")
    fuse_blocks(bundle, backend="triton")
    unet = bundle.unet.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    t, ctx = torch.tensor([3.0, 600.0]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        linked = unet(x, t, ctx)
        handoff = unet.out[0].norm_handoff
        producers = sum(bool(getattr(m, "feeds_norm", False)) for m in unet.modules())
        assert handoff is not None and handoff.taken == producers > 0, (handoff.taken, producers)
        for module in unet.modules():
            if hasattr(module, "feeds_norm"):
                module.feeds_norm = False
        assert torch.equal(unet(x, t, ctx), linked), "the UNet differs with the handoff"
    done.append(f"tiny UNet: {handoff.taken} statistics passes handed off")
    return done


@pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
def test_handoff_in_the_interpreter() -> None:
    done = run_interpreted(__file__, "--interpreter-checks")
    assert len(done) == 8, done


# -- GPU -----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_kl_f8_decoder_same_bits_with_the_handoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics kernel's handoff (cuDNN convolutions): the same bits as each norm's own pass."""
    from ldm_sdk.accel.block_fusion import FusedResnetBlock
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.accel.subpixel import FusedFirstStageUpsample
    from ldm_sdk.benchmarks import common as C

    monkeypatch.setattr(FusedResnetBlock, "implicit_conv", False)
    monkeypatch.setattr(FusedFirstStageUpsample, "implicit_conv", False)
    eng, _ = C.build_ours(C.ARCHS["sd15"], torch.device("cuda"), torch.float16, 0)
    vae = eng.vae.to(memory_format=torch.channels_last)
    prepare_cuda_inference(vae)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator("cuda").manual_seed(1), device="cuda").half()
    decoder = next(m for m in vae.modules() if isinstance(m, Decoder))
    with torch.inference_mode():
        linked = vae.decode(z)
        handoff = decoder.norm_out.norm_handoff  # type: ignore[union-attr]
        # 12 residual / attention blocks and 3 upsamplings feed a two-pass norm at 512 px
        assert handoff is not None and handoff.taken == 15, handoff and handoff.taken
        for module in decoder.modules():
            if hasattr(module, "feeds_norm"):
                module.feeds_norm = False
        assert torch.equal(vae.decode(z), linked)


@pytest.mark.gpu
def test_kl_f8_decoder_handoff_from_the_implicit_convolution() -> None:
    """With the decoder's wide ``conv2`` s and its upsamplings as our own convolutions (statistics merged
    per column in their epilogues, not the norm's own pass): every handoff is still taken, and the decode
    equals the one without handoffs to float32 rounding of the statistics (a few fp16 ulps at most) and
    the float32 decode to half precision."""
    import copy

    from ldm_sdk.accel import block_fusion
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.benchmarks import common as C

    eng, _ = C.build_ours(C.ARCHS["sd15"], torch.device("cuda"), torch.float16, 0)
    reference = copy.deepcopy(eng.vae).float()
    vae = eng.vae.to(memory_format=torch.channels_last)
    prepare_cuda_inference(vae)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator("cuda").manual_seed(1), device="cuda").half()
    decoder = next(m for m in vae.modules() if isinstance(m, Decoder))
    calls = []
    real = block_fusion.conv3x3_fused

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(kwargs.get("stats_groups"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    block_fusion.conv3x3_fused = counted  # type: ignore[assignment]
    try:
        with torch.inference_mode():
            linked = vae.decode(z)
            handoff = decoder.norm_out.norm_handoff  # type: ignore[union-attr]
            assert handoff is not None and handoff.taken == 15, handoff and handoff.taken
            # the 512 and 256 px levels: 3 blocks each; all but the last block of the 256 px level (it
            # feeds the upsampling) hand statistics on
            assert len(calls) == 6 and calls.count(None) == 1, calls
            for module in decoder.modules():
                if hasattr(module, "feeds_norm"):
                    module.feeds_norm = False
            alone = vae.decode(z)
            with C.true_float32():
                expected = reference.decode(z.float())
    finally:
        block_fusion.conv3x3_fused = real  # type: ignore[assignment]
    scale = expected.abs().max()
    assert (linked.float() - alone.float()).abs().max() <= 4e-3 * scale
    assert (linked.float() - expected).abs().max() <= 5e-3 * scale


@pytest.mark.gpu
def test_sd15_unet_same_bits_with_the_handoff() -> None:
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.benchmarks import common as C

    unet = C.random_sd15_unet(torch.device("cuda")).half()
    prepare_cuda_inference(unet)
    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(2, 4, 64, 64, generator=g, device="cuda").half()
    x = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([900.0, 20.0], device="cuda")
    ctx = torch.randn(2, 77, 768, generator=g, device="cuda").half()
    with torch.inference_mode():
        linked = unet(x, t, ctx)
        handoff = unet.out[0].norm_handoff  # type: ignore[union-attr]
        assert handoff is not None and handoff.taken > 0
        for module in unet.modules():
            if hasattr(module, "feeds_norm"):
                module.feeds_norm = False
        assert torch.equal(unet(x, t, ctx), linked)


if __name__ == "__main__" and "--interpreter-checks" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("set TRITON_INTERPRET=1 (before Triton is imported) to run the interpreter checks")
    print(json.dumps(interpreter_checks()))
