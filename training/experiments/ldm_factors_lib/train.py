"""Training one factor: the first stage, then LDM segments with throughput and FID after each."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ldm_sdk.models.configs import (
    ModelConfig,
    UNetConfig,
)

from .architectures import first_stage_config, latent_size, ldm_config, placeholder_config
from .data import SceneTensors
from .fid import FIDScorer, to_uint8
from .presets import LATENT_CHANNELS, Preset


def step_rates(fetch_times: Sequence[float], batch: int) -> dict[str, float] | None:
    """it/s and samples/s from batch fetch times, the first ~10% of intervals skipped as warm-up."""
    n = len(fetch_times)
    if n < 2:
        return None
    skip = min(max(2, (n - 1) // 10), (n - 1) // 2)
    span = fetch_times[-1] - fetch_times[skip]
    steps = n - 1 - skip
    if steps < 1 or span <= 0:
        return None
    it_s = steps / span
    return {"it_per_s": it_s, "samples_per_s": it_s * batch, "timed_steps": steps}


# -- one run's context --------------------------------------------------------------------------------------
@dataclass
class Context:
    """What a worker needs: the preset, the out dir, the device, the data and the FID weights."""

    preset: Preset
    out: Path
    device: torch.device
    data: dict[str, Any]
    fid_weights: Path
    standin: bool
    lpips_vgg: Path | None = None
    _scorer: FIDScorer | None = None

    @property
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        enabled = self.preset.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def scorer(self) -> FIDScorer:
        if self._scorer is None:
            p = self.preset
            reference = self.data["ref"]["images"]
            cache = self.out / "cache" / f"fid-ref-{p.fid_layer}-{len(reference)}-{self.fid_weights.stem}.pt"
            self._scorer = FIDScorer(self.fid_weights, p.fid_layer, self.device, reference, cache)
        return self._scorer

    def reference_labels(self, n: int) -> Tensor:
        labels = self.data["ref"]["labels"]
        return labels.repeat(math.ceil(n / len(labels)))[:n]


def factor_dir(out: Path, kind: str, f: int) -> Path:
    return out / f"{kind}-f{f}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_first_stage(ctx: Context, f: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the KL autoencoder of factor ``f`` from scratch (resumes an interrupted one); evaluate PSNR and
    reconstruction FID on the reference scenes."""
    from ldm_sdk.training import train_autoencoder

    p = ctx.preset
    d = factor_dir(ctx.out, "ae", f)
    d.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(family=f"scenes-kl-f{f}", first_stage=first_stage_config(p, f))
    (d / "model.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    perceptual = ["--lpips-vgg", str(ctx.lpips_vgg)] if ctx.lpips_vgg else ["--perceptual-weight", "0"]
    if p.ae_disc_start < 0:  # no GAN term: the trainer still runs its discriminator; keep that one tiny
        gan = ["--disc-start", str(p.ae_steps + 1), "--disc-layers", "1", "--disc-ndf", "8"]
    else:
        gan = ["--disc-start", str(p.ae_disc_start)]
    argv = [
        "--model", str(d / "model.json"),
        "--image-size", str(p.image_size),
        "--batch-size", str(p.ae_batch),
        "--max-steps", str(p.ae_steps),
        "--lr", str(p.ae_lr),
        "--no-scale-lr",
        *perceptual,
        "--kl-weight", str(p.ae_kl_weight),
        *gan,
        "--sample-every", "0",
        "--save-every", str(max(1, p.ae_steps // 4)),
        "--keep-last", "1",
        "--log-every", str(max(1, p.ae_steps // 5)),
        "--device", str(ctx.device),
        "--precision", p.precision,
        "--seed", str(p.seed),
        "--resume", "auto",
        "--out-dir", str(d),
    ]  # fmt: skip
    dataset = SceneTensors(ctx.data["train"]["images"], ctx.data["train"]["labels"], "image")
    t0 = time.perf_counter()
    result = train_autoencoder.main(argv, dataset=dataset)
    _sync(ctx.device)
    wall = time.perf_counter() - t0
    assert result.bundle is not None and result.export is not None
    ae = result.bundle.first_stage_model.eval()
    ref = ctx.data["ref"]["images"][: p.fid_samples]
    recons, sq_err = [], 0.0
    t1 = time.perf_counter()
    with torch.no_grad():  # fp32: the reconstruction error itself is measured
        for i in range(0, len(ref), p.sample_batch):
            x = ref[i : i + p.sample_batch].to(ctx.device).float() / 127.5 - 1
            rec = ae.decode(ae.encode(x).mode()).float().clamp(-1, 1)
            sq_err += float(((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10).log10().sum())
            recons.append(to_uint8(rec))
    rfid = ctx.scorer().score(torch.cat(recons))
    record = {
        "done": True,
        "params": sum(q.numel() for q in ae.parameters()),
        "config": json.loads(config.first_stage.model_dump_json()),
        "steps": result.step,
        "batch": p.ae_batch,
        "wall_s": wall,
        "final_rec_loss": result.history[-1].get("rec_loss") if result.history else None,
        "psnr_db": -10 * sq_err / len(ref),  # mean over images of the per-image PSNR, pixels in [0, 1]
        "rfid": rfid,
        "eval_s": time.perf_counter() - t1,
        "export": os.path.relpath(result.export, ctx.out),
        "device": device_name(ctx.device),
    }
    log(f"f={f}: autoencoder {record['params'] / 1e6:.2f}M, {wall:.0f}s, PSNR {record['psnr_db']:.2f} dB, "
        f"rFID {rfid:.3f}")  # fmt: skip
    del result, ae
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def placeholder_first_stage(ctx: Context) -> Path:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.loader import save

    path = factor_dir(ctx.out, "ae", 1) / "placeholder.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save(
            ModelBundle(
                ModelConfig(family="pixel-space-placeholder", first_stage=placeholder_config(ctx.preset))
            ),
            path,
        )
    return path


@torch.no_grad()
def generate(ctx: Context, f: int, result: Any, n: int) -> Tensor:
    """``n`` class-conditional DDIM samples (eta 0, EMA weights, no guidance) for the reference's labels, as
    uint8; the start noise is fixed (seeded per batch), so evaluations differ only by the weights."""
    from ldm_sdk.samplers import ddim
    from ldm_sdk.samplers.base import ddim_timesteps

    p = ctx.preset
    bundle, encoder, ema = result.bundle, result.encoder, result.ema
    assert bundle is not None and encoder is not None and bundle.schedule is not None
    bundle.eval()
    encoder.eval()
    labels = ctx.reference_labels(n)
    s, c = latent_size(p, f), LATENT_CHANNELS[f]
    timesteps = ddim_timesteps(
        min(p.ddim_steps, bundle.schedule.num_timesteps), bundle.schedule.num_timesteps
    )
    out = []
    averaged = ema.average_parameters(bundle.model) if ema is not None else contextlib.nullcontext()
    with averaged, ctx.autocast:
        for b, i in enumerate(range(0, n, p.sample_batch)):
            y = labels[i : i + p.sample_batch].to(ctx.device)
            cond = encoder.conditioning(encoder(y))
            g = torch.Generator().manual_seed(p.seed * 100_003 + b)
            x = torch.randn((len(y), c, s, s), generator=g).to(ctx.device)
            z = ddim.sample(bundle.denoiser(cond), x, timesteps)
            images = z / bundle.scale_factor if f == 1 else bundle.decode_first_stage(z.float())
            out.append(to_uint8(images))
    return torch.cat(out)


def train_ldm_segment(
    ctx: Context, f: int, unet: UNetConfig, target_step: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Train the LDM of factor ``f`` (UNet ``unet``) up to ``target_step`` (resuming its last checkpoint),
    then evaluate."""
    from ldm_sdk.training import train_ldm
    from ldm_sdk.training.samples import save_grid

    p = ctx.preset
    d = factor_dir(ctx.out, "ldm", f)
    d.mkdir(parents=True, exist_ok=True)
    config = ldm_config(p, f, unet)
    (d / "model.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
    if f == 1:
        first_stage = placeholder_first_stage(ctx)
    else:
        first_stage = factor_dir(ctx.out, "ae", f) / "first_stage.safetensors"
    argv = [
        "--model", str(d / "model.json"),
        "--first-stage", str(first_stage),
        "--image-size", str(p.image_size),
        "--batch-size", str(p.ldm_batch),
        "--max-steps", str(target_step),
        "--lr", str(p.ldm_lr),
        "--no-scale-lr",
        "--warmup-steps", str(p.ldm_warmup),
        "--sample-every", "0",
        "--save-every", "0",
        "--keep-last", "1",
        "--log-every", str(p.eval_every),
        "--device", str(ctx.device),
        "--precision", p.precision,
        "--seed", str(p.seed),
        "--resume", "auto",
        "--out-dir", str(d),
    ]  # fmt: skip
    key = "latent" if f == 1 else "image"
    dataset = SceneTensors(ctx.data["train"]["images"], ctx.data["train"]["labels"], key)
    _sync(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    result = train_ldm.main(argv, dataset=dataset)
    _sync(ctx.device)
    train_s = time.perf_counter() - t0
    rates = step_rates(dataset.fetch_times, p.ldm_batch)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else None
    t1 = time.perf_counter()
    samples = generate(ctx, f, result, p.fid_samples)
    sample_s = time.perf_counter() - t1
    fid = ctx.scorer().score(samples)
    save_grid(samples[:16].float() / 127.5 - 1, d / "samples" / f"step-{result.step:08d}.png", nrow=8)
    record = {
        "step": result.step,
        "steps_run": len(dataset.fetch_times),
        "train_wall_s": train_s,
        **(rates or {}),
        "fid": fid,
        "sample_s": sample_s,
        "sample_images_per_s": len(samples) / sample_s,
        "data_fetch_s": dataset.fetch_s,
        "train_peak_mem_gib": peak,
        "eval_s": time.perf_counter() - t1,
        "loss": sum(h["loss"] for h in result.history) / len(result.history) if result.history else None,
        "scale_factor": float(result.bundle.scale_factor) if result.bundle is not None else None,
        "device": device_name(ctx.device),
    }
    speed = f"{rates['samples_per_s']:.0f} samples/s" if rates else "no timed steps"
    log(f"f={f}: step {result.step}, {speed}, train {train_s:.0f}s, FID {fid:.3f} ({record['eval_s']:.0f}s)")
    del result
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return record


# -- the work of one factor: first stage, then LDM segments -------------------------------------------------
Emit = Callable[[dict[str, Any]], None]


def _fits(deadline: float, expected: float | None, floor: float = 20.0) -> bool:
    left = deadline - time.time()
    return left > (expected * 1.15 + 5 if expected is not None else floor)


def run_factor(
    ctx: Context, f: int, state: dict[str, Any], deadline: float, emit: Emit, log: Callable[[str], None]
) -> str:
    """Run what is left of factor ``f`` (``state``: its results record). Emits one update per unit of work;
    returns ``"done"`` or ``"deadline"``."""
    p = ctx.preset
    if f > 1 and not state.get("first_stage", {}).get("done"):
        if not _fits(deadline, state.get("expected_ae_s"), floor=60.0):
            return "deadline"
        emit({"factor": f, "first_stage": train_first_stage(ctx, f, log)})
    segments = list(state.get("ldm", {}).get("segments", []))
    step = segments[-1]["step"] if segments else 0
    while step < p.ldm_steps:
        expected = segments[-1]["train_wall_s"] + segments[-1]["eval_s"] if segments else None
        if not _fits(deadline, expected, floor=60.0):
            return "deadline"
        unet = UNetConfig.model_validate(state["unet"]["config"])  # the matched design (results.json)
        record = train_ldm_segment(ctx, f, unet, min(p.ldm_steps, step + p.eval_every), log)
        segments.append(record)
        step = record["step"]
        emit({"factor": f, "segment": record})
    emit({"factor": f, "ldm_done": True})
    return "done"
