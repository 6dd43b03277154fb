"""Helpers of the sampling benchmark (:mod:`ldm_sdk.benchmarks.sampling`): architectures, identical random
weights in both engines, timing.

"ours" is ldm_sdk (``UNetModel`` + first stage + a DDIM loop); "diffusers" is ``UNet2DConditionModel`` +
``DDIMScheduler`` + ``AutoencoderKL`` / ``VQModel`` holding the *same* weights, converted from our state dict
by diffusers' own single-file converters (as in tests/models/test_*_parity.py). diffusers is a bench/test
dependency only.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm_sdk.models.configs import UNetConfig, VQModelConfig
from ldm_sdk.models.first_stage import AutoencoderKL, VQModel
from ldm_sdk.models.unet import UNetModel
from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

# v1-inference.yaml unet_config.params (Stable Diffusion 1.x; 859,520,964 parameters).
SD15_UNET: dict[str, Any] = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": (4, 2, 1),
    "num_res_blocks": 2,
    "channel_mult": (1, 2, 4, 4),
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "legacy": False,
}
# CompVis configs/latent-diffusion/cin256-v2.yaml (LDM-4 class-conditional ImageNet). Its YAML has
# `num_heads: 1` (no num_head_channels; the brief's guess of num_head_channels 32 is NOT what the file
# says) and no `legacy` key (default True, which changes nothing when num_head_channels is -1). The class
# label reaches the UNet as a cross-attention context [B, 1, 512] (ClassEmbedder, conditioning_key crossattn).
CIN256_UNET: dict[str, Any] = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 192,
    "attention_resolutions": (8, 4, 2),
    "num_res_blocks": 2,
    "channel_mult": (1, 2, 3, 5),
    "num_heads": 1,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 512,
}


@dataclass(frozen=True)
class Arch:
    unet: dict[str, Any]
    first_stage: str  # FIRST_STAGE_ZOO key
    image_px: int
    tokens: int  # context length M of [B, M, context_dim]
    linear_start: float
    linear_end: float
    scale_factor: float
    vae_ch: int | None = None  # width override of the first stage (small mode)
    expected_params: int | None = None


ARCHS: dict[str, Arch] = {
    "sd15": Arch(SD15_UNET, "kl-f8", 512, 77, 0.00085, 0.012, 0.18215, expected_params=859_520_964),
    # configs/latent-diffusion/txt2img-1p4B-eval.yaml: SD1 UNet with context_dim 1280 (BERTEmbedder,
    # max_seq_len 77), kl-f8, 256 px -> 32x32 latents, same schedule and scale_factor as SD.
    "ldm-kl8": Arch({**SD15_UNET, "context_dim": 1280}, "kl-f8", 256, 77, 0.00085, 0.012, 0.18215),
    # cin256-v2.yaml: vq-f4 first stage, linear_start 0.0015, linear_end 0.0195, no scale_factor (1.0).
    "cin256": Arch(CIN256_UNET, "vq-f4", 256, 1, 0.0015, 0.0195, 1.0),
}


def small(arch: Arch) -> Arch:
    """CPU smoke size: UNet width 64 (from 320), first stage width 32 (from 128), 256 px."""
    return replace(
        arch, unet={**arch.unet, "model_channels": 64}, image_px=256, vae_ch=32, expected_params=None
    )


def ci(arch: Arch) -> Arch:
    """CPU benchmark size that CI can afford, SD-1.5-shaped: ``small`` (UNet width 64, first stage width 32,
    256 px -> 32x32 latents, the same 37.5 M UNet parameters, levels, attention resolutions, transformer
    depth and 77 x 768 context) with **2 attention heads** instead of 8, so that the head dims are 32 / 64 /
    128, near SD-1.5's 40 / 80 / 160. ``small`` keeps 8 heads, i.e. head dims 8 / 16 / 32: there torch's CPU
    flash-attention kernel (the same in both engines, exp-bound at head dim 8) is about 60 % of the bf16 UNet
    step on the development VM, against about a third at this size."""
    return replace(small(arch), unet={**small(arch).unet, "num_heads": 2})


SIZES: dict[str, Callable[[Arch], Arch]] = {"full": lambda a: a, "small": small, "ci": ci}


@contextmanager
def true_float32() -> Iterator[None]:
    """cuDNN convolutions and matmuls without TF32 (on by default for cuDNN), so float32 is the reference it
    claims to be."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


@torch.no_grad()
def randomize_(model: nn.Module, gen: torch.Generator) -> None:
    """Variance-preserving random values for every parameter, zero-initialised layers included (so the
    outputs are not trivially zero): weights N(0, 1/fan_in), biases 0.2 N(0,1), norms 1 + 0.2 N(0,1)."""
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            noise = torch.randn(p.shape, generator=gen, device=p.device)
            if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                p.copy_((1.0 if name == "weight" else 0.0) + 0.2 * noise)
            elif isinstance(module, nn.Embedding):
                p.copy_(noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.2 * noise)


def random_sd15_unet(device: torch.device | str, seed: int = 0) -> UNetModel:
    """The SD-1.5-architecture UNet in float32 on ``device`` with :func:`randomize_` weights (generator on
    the device, seeded ``seed``), eval mode, no grad: what the GPU tests and validations compare against."""
    with torch.device("meta"):
        unet = UNetModel.from_config(UNetConfig(**SD15_UNET))
    unet = unet.to_empty(device=device).eval().requires_grad_(False)
    randomize_(unet, torch.Generator(device).manual_seed(seed))
    return unet


@dataclass
class Engine:
    name: str
    unet: nn.Module
    vae: nn.Module
    dtype: torch.dtype
    fwd: Callable[..., Any]  # unet or torch.compile(unet)
    call_unet: Callable[[Tensor, Tensor, Tensor], Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    decode: Callable[[Tensor], Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    sample: Callable[..., Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    loop: str = ""
    # the latent dtype and timestep tensor this engine's own loop feeds its UNet (so that the UNet-step
    # metric times the call the loop makes, and a compiled graph is reused rather than recompiled)
    t_like: Callable[[int, float, torch.device], Tensor] = field(repr=False, default=None)  # type: ignore[assignment]
    x_dtype: torch.dtype = torch.float32

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in (self.unet, self.vae) for p in m.parameters())


def timesteps(steps: int, total: int = 1000) -> list[int]:
    """Descending DDIM timesteps, diffusers "leading" + steps_offset 1 (SD1.5's scheduler config); equal
    to CompVis make_ddim_timesteps("uniform") whenever ``steps`` divides 1000 (10, 50 ...)."""
    return [i * (total // steps) + 1 for i in range(steps)][::-1]


def alphas_cumprod(arch: Arch) -> Tensor:
    """CompVis "linear" (diffusers "scaled_linear") schedule, float64."""
    betas = torch.linspace(arch.linear_start**0.5, arch.linear_end**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def build_ours(arch: Arch, device: torch.device, dtype: torch.dtype, seed: int) -> tuple[Engine, dict]:
    fs = FIRST_STAGE_ZOO[arch.first_stage]
    if arch.vae_ch is not None:
        fs = fs.model_copy(update={"ddconfig": fs.ddconfig.model_copy(update={"ch": arch.vae_ch})})
    with torch.device("meta"):  # no default init: every parameter is overwritten by randomize_
        unet = UNetModel.from_config(UNetConfig(**arch.unet))
        vae = VQModel.from_config(fs) if isinstance(fs, VQModelConfig) else AutoencoderKL.from_config(fs)
    gen = torch.Generator(device).manual_seed(seed)
    unet, vae = unet.to_empty(device=device), vae.to_empty(device=device)
    randomize_(unet, gen)
    randomize_(vae, gen)
    n_params = sum(p.numel() for p in unet.parameters())
    if arch.expected_params is not None and n_params != arch.expected_params:
        raise RuntimeError(f"UNet has {n_params} parameters, expected {arch.expected_params}")
    # diffusers' converters read the original YAML shape and a CompVis-prefixed state dict (fp32 here).
    unet_yaml = {k: list(v) if isinstance(v, tuple) else v for k, v in arch.unet.items()}
    dd = {**fs.ddconfig.model_dump(), "ch_mult": list(fs.ddconfig.ch_mult)}
    orig = {
        "model": {
            "params": {
                "scale_factor": arch.scale_factor,
                "unet_config": {"params": unet_yaml},
                "first_stage_config": {"params": {"embed_dim": fs.embed_dim, "ddconfig": dd}},
            }
        }
    }
    ckpt = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    ckpt.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    unet.to(dtype).eval().requires_grad_(False)
    vae.to(dtype).eval().requires_grad_(False)
    eng = Engine("ours", unet, vae, dtype, unet)
    eng.call_unet = lambda x, t, c: eng.fwd(x, t, context=c)
    eng.decode = lambda z: vae.decode((z / arch.scale_factor).to(dtype))
    eng.sample, eng.loop = _ours_sampler(eng, arch)
    t_dtype = torch.float64 if eng.loop.startswith("ldm_sdk") else torch.float32  # samplers' time_batch
    eng.t_like = lambda b, v, dev: torch.full((b,), v, dtype=t_dtype, device=dev)
    eng.x_dtype = torch.promote_types(dtype, torch.float32)  # both loops keep the latents in >= fp32
    return eng, {"orig": orig, "ckpt": ckpt, "fs": fs, "unet_params": n_params}


def _ours_sampler(eng: Engine, arch: Arch) -> tuple[Callable[..., Tensor], str]:
    """DDIM (eta 0) + classifier-free guidance through ldm_sdk's samplers when they import, else inline."""
    try:
        from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
        from ldm_sdk.diffusion.denoiser import ModelDenoiser
        from ldm_sdk.diffusion.guidance import ClassifierFreeGuidance
        from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
        from ldm_sdk.samplers.ddim import sample as ddim_sample

        sched = DiffusionSchedule(make_beta_schedule("linear", 1000, arch.linear_start, arch.linear_end))
        model_fn = bind_unet(lambda x, t, **kw: eng.fwd(x, t, **kw), "crossattn")

        def sample(noise: Tensor, cond: Tensor, uncond: Tensor, steps: int, scale: float) -> Tensor:
            cfg = ClassifierFreeGuidance(model_fn, scale, Conditioning(crossattn=uncond))
            den = ModelDenoiser(cfg, sched, "eps", cond=Conditioning(crossattn=cond))
            ts = torch.tensor(timesteps(steps), dtype=torch.float64)
            return ddim_sample(den, noise, ts, eta=0.0)

        return sample, "ldm_sdk.samplers.ddim.sample + ModelDenoiser(ClassifierFreeGuidance)"
    except Exception as exc:  # the sampler stack is being written concurrently: fall back to the math
        reason = f"{type(exc).__name__}: {exc}"
    ab = alphas_cumprod(arch).tolist()

    def inline(noise: Tensor, cond: Tensor, uncond: Tensor, steps: int, scale: float) -> Tensor:
        x, ts = noise.float(), timesteps(steps)
        ctx = torch.cat([uncond.expand_as(cond), cond])
        for i, t in enumerate(ts):
            a, a_prev = ab[t], ab[ts[i + 1]] if i + 1 < len(ts) else ab[0]
            tt = torch.full((2 * x.shape[0],), float(t), device=x.device)
            u, c = eng.fwd(torch.cat([x, x]), tt, context=ctx).float().chunk(2)
            eps = u + scale * (c - u)
            x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        return x

    return inline, f"inline DDIM (ldm_sdk sampler stack unavailable: {reason})"


def build_diffusers(arch: Arch, device: torch.device, dtype: torch.dtype, built: dict) -> Engine:
    import diffusers
    from diffusers.loaders import single_file_utils as sfu

    diffusers.utils.logging.set_verbosity_error()  # "modules that should be kept in float32: []" noise

    orig, ckpt, fs = built["orig"], built["ckpt"], built["fs"]
    ucfg = sfu.create_unet_diffusers_config_from_ldm(orig, ckpt)
    vcfg = sfu.create_vae_diffusers_config_from_ldm(orig, ckpt)
    usd, vsd = sfu.convert_ldm_unet_checkpoint(ckpt, ucfg), sfu.convert_ldm_vae_checkpoint(ckpt, vcfg)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**ucfg)
        if isinstance(fs, VQModelConfig):  # no LDM VQ converter: the codebook has the same key name
            vsd["quantize.embedding.weight"] = ckpt["first_stage_model.quantize.embedding.weight"]
            vcfg.pop("scaling_factor")
            vae = diffusers.VQModel(**vcfg, num_vq_embeddings=fs.n_embed, vq_embed_dim=fs.embed_dim)
        else:
            vae = diffusers.AutoencoderKL(**vcfg)
    unet.load_state_dict(usd, strict=True)
    vae.load_state_dict(vsd, strict=True)
    unet.to(dtype).eval().requires_grad_(False)
    vae.to(dtype).eval().requires_grad_(False)
    sched = diffusers.DDIMScheduler(  # SD1.5's scheduler_config.json
        beta_start=arch.linear_start,
        beta_end=arch.linear_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    eng = Engine("diffusers", unet, vae, dtype, unet)
    # diffusers computes in its input's dtype (the pipeline's latents are already in the UNet dtype)
    eng.call_unet = lambda x, t, c: eng.fwd(
        x.to(dtype), t, encoder_hidden_states=c.to(dtype), return_dict=False
    )[0]
    eng.decode = lambda z: vae.decode((z / arch.scale_factor).to(dtype), return_dict=False)[0]

    def sample(noise: Tensor, cond: Tensor, uncond: Tensor, steps: int, scale: float) -> Tensor:
        # StableDiffusionPipeline.__call__'s denoising loop (no text encoder, no safety checker).
        sched.set_timesteps(steps, device=noise.device)
        latents = noise.to(dtype) * sched.init_noise_sigma
        prompt_embeds = torch.cat([uncond.expand_as(cond), cond]).to(dtype)
        for t in sched.timesteps:
            latent_model_input = sched.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = eng.call_unet(latent_model_input, t, prompt_embeds)
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + scale * (noise_pred_text - noise_pred_uncond)
            latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    eng.sample, eng.loop = sample, "StableDiffusionPipeline-style loop, DDIMScheduler (eta 0)"
    eng.t_like = lambda b, v, dev: torch.tensor(int(v), device=dev)  # 0-d int64, as sched.timesteps
    eng.x_dtype = dtype  # the pipeline's latents are in the UNet dtype
    return eng


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call after ``warmup`` calls: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        pairs = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        sync(device)
        return [s.elapsed_time(e) / 1e3 for s, e in pairs]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def wall(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rel_err(a: Tensor, b: Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def show(rows: list[list[str]], notes: list[str]) -> None:
    head = ["metric", "ours", "diffusers", "speedup (>1: ours better)"]
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(*head)
        for r in rows:
            t.add_row(*map(escape, r))
        Console(width=max(120, Console().width)).print(t)
    except ImportError:
        w = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        for r in [head, *rows]:
            print(" | ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    for n in notes:
        print("- " + n)


def version(pkg: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(pkg)
    except Exception:
        return None


def git_head() -> str | None:
    try:
        cwd = Path(__file__).resolve().parents[2]  # the checkout, when run from one
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True)
        return out.stdout.strip() if len(out.stdout.strip()) == 40 else None
    except Exception:
        return None


def load_averages() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return list(os.getloadavg())
    except (AttributeError, OSError):
        return None


def load_1min() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    load = load_averages()
    return load[0] if load is not None else None


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except Exception:
        return "cpu"
