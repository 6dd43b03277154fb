"""The fusion pass (``ldm_sdk.accel.fusion``) and its wiring into ``accelerate_denoiser``.

CPU: on every tiny model family the fused model (reference backend, and ``"auto"``, which is the reference
off CUDA) is **bit-identical** to the unfused one in float32 -- not merely within 1e-6: the reference makes
the same torch calls in the same order as ``GroupNorm32`` + ``nn.SiLU`` / ``nn.GroupNorm`` + SiLU /
``GEGLU``, and the absorbed SiLUs become identities. Gradients in training are identical for the same
reason. State dicts (keys, values, the very Parameter objects) are unchanged; the report counts what it
fused; ``use_scale_shift_norm`` keeps its SiLU; fusing twice changes nothing and ``unfuse_model`` restores
the original classes. bf16 on the CPU: the fused model is no less accurate than the unfused one.

GPU (mark ``gpu``, run by ``bench/validate_kernels.py``): the whole SD-1.5-architecture UNet (random
weights) fused in fp16 against eager float32 (TF32 off) is no less accurate than the unfused fp16 UNet (20%
margin), and replays from a CUDA graph; tiny bundles through ``accelerate_denoiser`` (fused on CUDA in half
precision, not in float32) capture and match; the kl-f8 VAE decode fused in fp16, both memory formats.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from ldm_sdk.accel import fuse_model, unfuse_model
from ldm_sdk.accel.fusion import AbsorbedSiLU, FusedGEGLU, FusedGroupNorm, FusionReport
from ldm_sdk.accel.graphs import CapturedModel, accelerate_denoiser
from ldm_sdk.benchmarks.common import randomize_ as bench_randomize_
from ldm_sdk.benchmarks.common import true_float32
from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
from ldm_sdk.models.attention import GEGLU
from ldm_sdk.models.embeddings import GroupNorm32
from ldm_sdk.models.unet import ResBlock, UNetModel
from ldm_sdk.testing.tiny import ALL, SD1, random_bundle, tiny_unet
from tests.accel.capture_checks import sd15_pair

UNET_FAMILIES = [name for name, cfg in ALL.items() if cfg.unet is not None]


def inputs(
    bundle: ModelBundle,
    batch: int = 2,
    size: int = 16,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Conditioning]:
    """``x`` float32 (as the samplers keep it), ``t`` float64, conditioning in the network dtype."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, bundle.latent_channels, size, size, generator=g).to(device)
    t = (torch.rand(batch, generator=g, dtype=torch.float64) * 999).to(device)
    parts: dict[str, Tensor] = {}
    key = bundle.conditioning_key
    if key in ("crossattn", "hybrid"):
        width = bundle.config.unet.context_dim if bundle.config.unet is not None else None
        assert isinstance(width, int)
        parts["crossattn"] = torch.randn(batch, 5, width, generator=g).to(device, dtype)
    if key in ("concat", "hybrid"):
        extra = bundle.unet.in_channels - bundle.latent_channels
        parts["concat"] = torch.randn(batch, extra, size, size, generator=g).to(device, dtype)
    return x, t, Conditioning(**parts)


def outputs(bundle: ModelBundle, image_size: int = 32) -> dict[str, Tensor]:
    """Every network of the bundle on fixed inputs: UNet call, first-stage encode and decode."""
    g = torch.Generator().manual_seed(2)
    fs = bundle.first_stage_model
    device = next(fs.parameters()).device
    dtype = next(fs.parameters()).dtype
    image = torch.rand(1, 3, image_size, image_size, generator=g).to(device, dtype) * 2 - 1
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        z = bundle.encode_first_stage(image)
        out["encode"] = z
        out["decode"] = bundle.decode_first_stage(z)
        if bundle.model is not None:
            out["unet"] = bundle.apply_model(*inputs(bundle, device=str(device), dtype=dtype))
    return out


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def rel_l2(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b||: the accuracy measure for whole networks. The max-based :func:`rel_err` of one
    output element is too noisy there (in bf16 one element's error moves by a rounding of 2^-8 with every
    change of the rounding path), the norm over all elements is not."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def count(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


# -- float32 equality on the CPU -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(ALL))
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fused_model_is_bit_identical_in_float32(family: str, backend: str) -> None:
    bundle = random_bundle(ALL[family]).eval()
    before = outputs(bundle)
    report = fuse_model(bundle, backend=backend)  # type: ignore[arg-type]
    assert report.fused > 0 and report.backend == backend
    after = outputs(bundle)
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{family} {name}: fused output differs"


def test_state_dict_and_parameters_are_unchanged() -> None:
    bundle = random_bundle(SD1).eval()
    state = bundle.state_dict()
    params = list(bundle.parameters())
    fuse_model(bundle)
    fused_state = bundle.state_dict()
    assert list(fused_state) == list(state)
    for key, value in state.items():
        assert fused_state[key].data_ptr() == value.data_ptr() and torch.equal(fused_state[key], value), key
    assert all(a is b for a, b in zip(bundle.parameters(), params, strict=True))
    bundle.load_state_dict(state, strict=True)  # an original checkpoint still loads into the fused model


def test_report_counts_sd1() -> None:
    bundle = random_bundle(SD1).eval()
    # tiny SD1 UNet: 8 ResBlocks (2 norm+SiLU each) + out, 4 SpatialTransformer norms, 4 GEGLU
    assert fuse_model(copy.deepcopy(bundle.unet)) == FusionReport(
        "auto", group_norm=4, group_norm_silu=17, geglu=4
    )
    # tiny kl-f8: encoder 6 + decoder 10 ResnetBlocks (2 each) + 2 norm_out, 2 mid attention norms
    first = fuse_model(copy.deepcopy(bundle.first_stage_model), backend="reference")
    assert first == FusionReport("reference", group_norm=2, group_norm_silu=34)
    silus = count(bundle, nn.SiLU)
    report = fuse_model(bundle)
    assert (report.group_norm, report.group_norm_silu, report.geglu, report.already_fused) == (6, 51, 4, 0)
    assert count(bundle, AbsorbedSiLU) == report.group_norm_silu
    assert count(bundle, nn.SiLU) == silus - report.group_norm_silu  # emb_layers / time_embed SiLUs stay
    assert count(bundle, FusedGroupNorm) == count(bundle, nn.GroupNorm) == 57
    assert count(bundle, FusedGEGLU) == count(bundle, GEGLU) == 4
    unet_sources = {m.source for m in bundle.unet.modules() if isinstance(m, FusedGroupNorm)}
    assert unet_sources == {GroupNorm32, nn.GroupNorm}  # ResBlocks / out, SpatialTransformer
    assert "51 GroupNorm+SiLU, 6 GroupNorm, 4 GEGLU" in str(report)
    assert not any(m.training for m in bundle.modules())  # new modules keep eval mode (capture checks it)


def test_scale_shift_norm_keeps_its_silu_and_updown_blocks_fuse() -> None:
    """With use_scale_shift_norm the FiLM scale / shift sits between out_layers[0] and the SiLU: only the
    norm is fused. resblock_updown runs in_layers[:-1] (norm and SiLU) then resamples: fused."""
    cfg = tiny_unet(4, 4, num_heads=2, use_scale_shift_norm=True, resblock_updown=True)
    torch.manual_seed(0)
    unet = UNetModel.from_config(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0])
    with torch.no_grad():
        before = unet(x, t)
    blocks = [m for m in unet.modules() if isinstance(m, ResBlock)]
    attention_norms = count(unet, GroupNorm32) - 2 * len(blocks) - 1
    report = fuse_model(unet)
    assert report.group_norm_silu == len(blocks) + 1  # in_layers + out
    assert report.group_norm == len(blocks) + attention_norms  # out_layers norms + AttentionBlock norms
    assert len(report.skipped) == len(blocks) and "scale / shift" in report.skipped[0]
    assert all(isinstance(b.out_layers[1], nn.SiLU) and b.out_layers[0].act == "none" for b in blocks)
    assert any(b.updown for b in blocks)
    with torch.no_grad():
        assert torch.equal(unet(x, t), before)


def test_fusing_is_idempotent_and_unfuse_restores() -> None:
    bundle = random_bundle(SD1).eval()
    before = outputs(bundle)
    types = [type(m) for m in bundle.modules()]
    state = bundle.state_dict()
    first = fuse_model(bundle, backend="reference")
    again = fuse_model(bundle)
    assert again.fused == 0 and again.already_fused == first.fused and again.backend == "auto"
    assert all(m.backend == "auto" for m in bundle.modules() if isinstance(m, FusedGroupNorm | FusedGEGLU))
    after = outputs(bundle)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    restored = unfuse_model(bundle)
    assert restored == first.fused + first.group_norm_silu  # modules + the SiLUs given back
    assert [type(m) for m in bundle.modules()] == types
    assert all(torch.equal(bundle.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(outputs(bundle)[k], v) for k, v in before.items())
    assert fuse_model(bundle) == FusionReport(
        "auto", group_norm=first.group_norm, group_norm_silu=51, geglu=4
    )


def test_training_gradients_are_identical() -> None:
    """In training (gradients on) ``auto`` runs the differentiable reference: the same autograd graph."""
    bundle = random_bundle(SD1)
    unet = bundle.unet.train()
    fused = copy.deepcopy(unet)
    fuse_model(fused)
    x, t, cond = inputs(bundle)
    grads = []
    for model in (unet, fused):
        model.zero_grad()
        model(x, t, context=cond.crossattn).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_bf16_fused_model_is_no_less_accurate_on_cpu() -> None:
    bundle = random_bundle(SD1).eval()
    reference = outputs(bundle)
    low = copy.deepcopy(bundle).to(torch.bfloat16)
    unfused = outputs(low)
    fuse_model(low)
    fused = outputs(low)
    for name, ref in reference.items():
        err_unfused, err_fused = rel_err(unfused[name], ref), rel_err(fused[name], ref)
        assert err_fused <= 1.2 * err_unfused + 1e-3, (
            f"{name}: fused {err_fused:.3e}, unfused {err_unfused:.3e}"
        )
        assert fused[name].dtype == unfused[name].dtype


def test_accelerate_denoiser_fuses_only_half_precision_cuda_models() -> None:
    bundle = random_bundle(SD1).eval()
    eager = outputs(bundle)["unet"]
    for mode in ("auto", "emulate", "off"):
        accelerate_denoiser(bundle, mode=mode)  # type: ignore[arg-type]
        assert count(bundle, FusedGroupNorm) == 0, f"mode {mode}: a float32 CPU model must stay unfused"
    captured = accelerate_denoiser(bundle, mode="emulate", fuse=True)  # explicit: fused, reference on CPU
    assert count(bundle, FusedGroupNorm) == 57 and count(bundle, FusedGEGLU) == 4
    x, t, cond = inputs(bundle)
    with torch.no_grad():
        assert torch.equal(captured(x, t, cond), eager)
    module = random_bundle(SD1).eval().model
    assert module is not None
    accelerate_denoiser(module, mode="emulate", fuse=True)  # an nn.Module source: fused itself
    assert count(module, FusedGroupNorm) == 21


class _CustomNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2


def test_custom_norms_are_left_alone_and_errors() -> None:
    model = nn.Sequential(_CustomNorm(2, 4), nn.SiLU(), nn.GroupNorm(2, 4))
    report = fuse_model(model)
    assert (
        type(model[0]) is _CustomNorm
        and isinstance(model[1], nn.SiLU)
        and isinstance(model[2], FusedGroupNorm)
    )
    assert report.group_norm == 1 and report.group_norm_silu == 0 and "_CustomNorm" in report.skipped[0]
    with pytest.raises(ValueError, match="valid: auto, triton, reference"):
        fuse_model(model, backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fuse_model(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid: 'none', 'silu'"):
        FusedGroupNorm(2, 4, act="relu")  # type: ignore[arg-type]


def test_fused_modules_keep_affine_free_norms_and_training_flags() -> None:
    norm = nn.GroupNorm(2, 4, affine=False).train(False)
    fused = FusedGroupNorm.from_norm(norm, act="silu")
    assert fused.weight is None and fused.bias is None and not fused.training
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(fused(x), torch.nn.functional.silu(norm(x)))
    back = fused.unfused()
    assert type(back) is nn.GroupNorm and back.weight is None and torch.equal(back(x), norm(x))
    assert "act='silu'" in repr(fused)


@pytest.mark.parametrize("family", sorted(ALL))
def test_every_family_runs_with_channels_last_weights_and_inputs(family: str) -> None:
    """``prepare_cuda_inference`` turns CUDA half-precision models channels_last: every network (UNet, encode,
    decode) must accept that layout (no ``view`` on a non-contiguous tensor) and give the NCHW result up to
    the convolution algorithm's rounding."""
    bundle = random_bundle(ALL[family]).eval()
    ref = outputs(bundle)
    bundle.to(memory_format=torch.channels_last)
    convs = [p for p in bundle.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    got = outputs(bundle)
    for name in ref:
        assert rel_err(got[name], ref[name]) <= 1e-5, (family, name)


def test_prepare_cuda_inference_leaves_cpu_models_alone() -> None:
    from ldm_sdk.accel.prepare import prepare_cuda_inference

    bundle = random_bundle(SD1).eval()
    before = {k: (v.clone(), v.stride()) for k, v in bundle.state_dict().items()}
    assert prepare_cuda_inference(bundle) is None
    assert count(bundle, FusedGroupNorm) == 0
    for k, v in bundle.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1], k


# -- GPU -----------------------------------------------------------------------------------------------------
def randomize_(model: nn.Module, seed: int) -> None:
    """The benchmarks' variance-preserving random weights, seeded on the model's device."""
    bench_randomize_(model, torch.Generator(next(model.parameters()).device).manual_seed(seed))


@pytest.mark.gpu
def test_sd15_unet_fused_fp16_accuracy_and_capture() -> None:
    pair = sd15_pair("cuda")
    unet16, x, t, ctx, ref, unfused = pair.unet, pair.x, pair.t, pair.ctx, pair.ref, pair.unfused
    with torch.inference_mode():
        report = fuse_model(unet16)
        assert (report.group_norm_silu, report.group_norm, report.geglu) == (45, 16, 16), report
        fused = unet16(x, t, context=ctx.half())
        err_unfused, err_fused = rel_err(unfused, ref), rel_err(fused, ref)
        print(f"SD-1.5 UNet fp16 vs fp32: unfused {err_unfused:.3e}, fused {err_fused:.3e}")
        assert torch.isfinite(fused).all()
        assert err_fused <= 1.2 * err_unfused + 1e-4, f"fused {err_fused:.3e} vs unfused {err_unfused:.3e}"
        captured = CapturedModel(bind_unet(unet16, "crossattn"), mode="graph", modules=[unet16])
        cond = Conditioning(crossattn=ctx.half())
        first = captured(x, t, cond)
        second = captured(x * 0.5, t, cond)
        assert captured.stats.captures == 1 and captured.stats.replays == 2
        assert rel_err(first, fused) <= 1e-3, rel_err(first, fused)
        assert rel_err(second, unet16(x * 0.5, t, context=ctx.half())) <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("family", UNET_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_accelerate_denoiser_fuses_half_precision_and_captures(family: str, dtype: torch.dtype) -> None:
    """Fused in fp16 / bf16 by ``accelerate_denoiser``; captured equals fused eager; no less accurate
    against float32 than the unfused model (20% margin)."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    bundle = random_bundle(ALL[family]).eval().requires_grad_(False)
    assert bundle.model is not None
    bundle.model.to("cuda")
    bundle.first_stage_model.to("cuda")
    x, t, cond32 = inputs(bundle, device="cuda")
    with torch.inference_mode(), true_float32():
        ref = bundle.apply_model(x, t, cond32)
    bundle.model.to(dtype)
    bundle.first_stage_model.to(dtype)
    cond = Conditioning(**{name: value.to(dtype) for name, value in cond32.parts().items()})
    with torch.inference_mode():
        unfused = bundle.apply_model(x, t, cond)
    captured = accelerate_denoiser(bundle, mode="graph")
    assert count(bundle, FusedGroupNorm) > 0 and count(bundle, nn.GroupNorm) == count(bundle, FusedGroupNorm)
    with torch.inference_mode():
        fast = captured(x, t, cond)
        fused_eager = bundle.apply_model(x, t, cond)
    assert captured.stats.captures == 1
    assert rel_err(fast, fused_eager) <= 1e-3
    err_unfused, err_fused = rel_l2(unfused, ref), rel_l2(fast, ref)
    print(f"{family} {dtype} vs fp32 (rel. L2): unfused {err_unfused:.3e}, fused {err_fused:.3e}")
    assert err_fused <= 1.2 * err_unfused + 1e-3, f"fused {err_fused:.3e} vs unfused {err_unfused:.3e}"


@pytest.mark.gpu
def test_accelerate_denoiser_leaves_float32_unfused() -> None:
    bundle = random_bundle(SD1).eval()
    assert bundle.model is not None
    bundle.model.to("cuda")
    accelerate_denoiser(bundle, mode="graph")
    assert count(bundle, FusedGroupNorm) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_vae_decode_fused_fp16(channels_last: bool) -> None:
    from ldm_sdk.models.autoencoder import AttnBlock, ResnetBlock
    from ldm_sdk.models.first_stage import AutoencoderKL
    from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

    with torch.device("meta"):
        vae32 = AutoencoderKL.from_config(FIRST_STAGE_ZOO["kl-f8"])  # type: ignore[arg-type]
    vae32 = vae32.to_empty(device="cuda").eval().requires_grad_(False)
    randomize_(vae32, 3)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    vae16 = copy.deepcopy(vae32).half().to(memory_format=fmt)
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator(device="cuda").manual_seed(4), device="cuda")
    z16 = z.half().contiguous(memory_format=fmt)
    with torch.inference_mode():
        with true_float32():
            ref = vae32.decode(z)
        del vae32
        unfused = vae16.decode(z16)
        blocks, attention = count(vae16, ResnetBlock), count(vae16, AttnBlock)
        report = fuse_model(vae16)
        assert (report.group_norm_silu, report.group_norm) == (2 * blocks + 2, attention), report
        fused = vae16.decode(z16)
        err_unfused, err_fused = rel_err(unfused, ref), rel_err(fused, ref)
        print(f"kl-f8 decode fp16 {fmt}: unfused {err_unfused:.3e}, fused {err_fused:.3e}")
        assert torch.isfinite(fused).all()
        assert err_fused <= 1.2 * err_unfused + 1e-4, f"fused {err_fused:.3e} vs unfused {err_unfused:.3e}"
