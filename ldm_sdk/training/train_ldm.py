"""Train a latent diffusion model: a frozen first stage, a UNet, and any condition encoder of the registry.

Reads top to bottom: config, processes, model (first stage, UNet, encoder), data, optimizer, resume, loop
(logging, sample grids, checkpoints), save. Checkpoints are CompVis-layout ``.ckpt`` files that
``ldm_sdk.load`` reads (EMA as ``model_ema.*``) and that ``--resume`` continues exactly::

    python -m ldm_sdk.training.train_ldm --model ldm.yaml --first-stage runs/kl-f4/first_stage.safetensors \\
        --data scenes --cond-encoder minilm --cond-drop 0.1 --out-dir runs/ldm
    # Stable Diffusion inpainting (hybrid: text by cross-attention + mask and masked-image latent concat)
    python -m ldm_sdk.training.train_ldm --model sd1-inpaint --init-from sd-v1-5-inpainting.ckpt \\
        --data scenes --data-options '{"mask": "random"}' --cond-drop 0.1 --out-dir runs/sd-inpaint
    torchrun --standalone --nproc_per_node=2 -m ldm_sdk.training.train_ldm --config ldm.yaml
    ldm-sdk train ldm --config ldm.yaml

As CompVis ``LatentDiffusion``: timesteps uniform in [0, T), the loss of ``p_losses``, AdamW on the UNet
(+ a jointly trained encoder: LDM BERT, layout, class embedder, semantic rescaler; + the learned logvar),
EMA of the UNet after every step (``LitEma``), ``scale_factor = 1 / std`` of the first batch's latents with
``scale_by_std`` (here the std over the global batch), the KL posterior sampled. Added: condition dropout
(``--cond-drop``: a sample's condition becomes the encoder's ``unconditional()``), bf16 autocast, gradient
accumulation and checkpointing, FSDP for the UNet (``--fsdp``), precomputed latents (``--data latents:``).

``hybrid`` models (SD inpainting: UNet input = latent + mask + masked-image latent, and text by
cross-attention) take two encoders: ``--cond-encoder`` (default: the config's cond stage) for the
cross-attention part, and ``--concat-encoder`` (default ``mask``) whose map is built from the batch's
``image`` and ``mask`` by :class:`~ldm_sdk.encoders.mask.MaskConditioner` - the same code, with the same
bundle-derived settings, the inpaint task samples with. Condition dropout replaces only the cross-attention
part; the concat map is kept, as in SD-inpainting training and as classifier-free guidance samples
(the unconditional half has the same mask and masked image, only the prompt is empty).

Rank 0 appends each log line's values (window means over every rank, ``s_per_step``, ``samples_per_s``, on
CUDA ``max_mem_gb``) to ``OUT_DIR/metrics.jsonl``; ``--no-save-final`` skips the final checkpoint and export
(benchmarks: ``training/bench_scaling.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from ldm_sdk.checkpoints.bundle import (
    COND_STAGE_PREFIX,
    FIRST_STAGE_PREFIX,
    UNET_PREFIX,
    ModelBundle,
    split_prefix,
)
from ldm_sdk.checkpoints.loader import load, save
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.models.first_stage import AutoencoderKL
from ldm_sdk.training import checkpointing as ckpt
from ldm_sdk.training import distributed as ddp
from ldm_sdk.training import models
from ldm_sdk.training.batches import BatchStream, build_dataset, collate, to_device
from ldm_sdk.training.config import BaseTrainConfig, parse_config
from ldm_sdk.training.diffusion_step import LatentDiffusionStep, SharedDraws, drop_conditions, scale_from_std
from ldm_sdk.training.ema import LitEma
from ldm_sdk.training.samples import ddim_samples, save_grid


# -- config -------------------------------------------------------------------------------------------------
class TrainLDMConfig(BaseTrainConfig):
    """Options of ``train_ldm`` (flags are the field names with dashes)."""

    model: str | None = Field(None, description="LDM: original .yaml, ModelConfig .json, family or tiny:NAME")
    first_stage: Path | None = Field(None, description="first-stage checkpoint (train_autoencoder output)")
    init_from: Path | None = Field(None, description="LDM checkpoint to fine-tune (all its weights)")
    cond_encoder: str | None = Field(None, description="registry name (default: the config's cond stage)")
    cond_params: dict[str, Any] = Field(default_factory=dict, description="encoder params as JSON")
    cond_key: str | None = Field(None, description="batch key of the condition (default: by modality)")
    cond_drop: float = Field(0.0, ge=0, le=1, description="condition dropout for classifier-free guidance")
    concat_encoder: str | None = Field(
        None, description="hybrid models: registry name of the concat part (default: mask, SD inpainting)"
    )
    concat_key: str | None = Field(
        None, description="batch key of the concat condition (default: by modality)"
    )
    lr: float = Field(2e-6, gt=0, description="base learning rate (CompVis base_learning_rate)")
    scale_lr: bool = Field(True, description="lr x batch x world size x grad accumulation (CompVis main.py)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (torch default, as CompVis)")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon (torch default, as CompVis)")
    ema: bool | None = Field(None, description="keep an EMA of the UNet (default: the config's use_ema)")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="EMA decay (warmed up as LitEma)")
    scale_by_std: bool | None = Field(
        None, description="scale_factor = 1/std of the first batch (default: config)"
    )
    latent_sample: bool = Field(True, description="sample the KL posterior (CompVis) instead of its mode")
    gradient_checkpointing: bool = Field(False, description="recompute UNet activations in backward")
    fsdp: bool = Field(False, description="shard the UNet with FSDP2 (several processes)")
    sample_every: int = Field(1000, ge=0, description="write a DDIM sample grid every N steps (0: never)")
    sample_count: int = Field(8, ge=1, description="samples per grid (conditions: the first data items)")
    sample_steps: int = Field(50, ge=1, description="DDIM steps of the grid")
    sample_cfg: float = Field(3.0, description="classifier-free guidance scale of the grid (1: none)")
    save_final: bool = Field(True, description="write the last checkpoint and the export at the end")


@dataclass
class TrainResult:
    """What ``main`` returns: per-step logs of this rank, the last checkpoint, the trained model."""

    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    export: Path | None = None
    step: int = 0
    bundle: ModelBundle | None = None
    encoder: nn.Module | None = None
    concat_encoder: nn.Module | None = None
    ema: LitEma | None = None


def main(argv: Sequence[str] | None = None, *, dataset: Dataset[Any] | None = None) -> TrainResult:
    cfg = parse_config(TrainLDMConfig, argv, prog="train_ldm")

    # -- processes, device, seeds ---------------------------------------------------------------------------
    info, device = ddp.setup(cfg.device, deterministic=cfg.deterministic)
    out_dir = cfg.out_dir
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ddp.barrier(info)
    log = ddp.rank_zero_logger(info, "ldm_sdk.train_ldm", out_dir / "train.log" if info.is_main else None)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # -- model config: the LDM, its first stage, training switches ------------------------------------------
    init = load(cfg.init_from) if cfg.init_from is not None else None
    if cfg.model is not None:
        model_cfg = models.model_config(cfg.model)
    elif init is not None:
        model_cfg = init.config
    else:
        raise ValueError("no model: pass --model (an LDM .yaml/.json, family or tiny:NAME) or --init-from")
    first = load(cfg.first_stage) if cfg.first_stage is not None else None
    if first is not None:
        model_cfg = model_cfg.model_copy(update={"first_stage": first.config.first_stage})
    if init is None and first is None:
        raise ValueError(
            "the LDM trains on a first stage's latents: pass --first-stage CKPT (or --init-from)"
        )
    if model_cfg.unet is None or model_cfg.diffusion is None:
        raise ValueError(f"--model {cfg.model}: {model_cfg.family!r} is a first-stage config, not an LDM")
    diffusion = model_cfg.diffusion.model_copy(
        update={
            "scale_by_std": model_cfg.diffusion.scale_by_std if cfg.scale_by_std is None else cfg.scale_by_std
        }
    )
    unet_cfg = model_cfg.unet.model_copy(update={"use_checkpoint": cfg.gradient_checkpointing})

    # -- condition encoder from the plugin registry ---------------------------------------------------------
    from ldm_sdk.runtime import Runtime

    with Runtime.create(device="cpu", dtype="fp32") as runtime:
        registry = runtime.registries.condition_encoders
        choice = models.choose_encoder(registry, model_cfg, cfg.cond_encoder)
        concat_choice = models.choose_concat_encoder(registry, model_cfg, cfg.concat_encoder)
    params: dict[str, Any] = {}
    if choice is not None and model_cfg.cond_stage is not None and cfg.cond_encoder is None:
        params.update(model_cfg.cond_stage.params)
    params.update(cfg.cond_params)
    cond_stage = models.cond_stage_config(choice[1], params) if choice is not None else None
    model_cfg = model_cfg.model_copy(
        update={"unet": unet_cfg, "diffusion": diffusion, "cond_stage": cond_stage}
    )
    bundle = ModelBundle(model_cfg)
    encoder = (
        models.build_encoder(*choice, params, first_stage=bundle.first_stage_model, bundle=bundle)
        if choice
        else None
    )
    # hybrid: the concat part (weight-free, built on the bundle as the sampling tasks build it)
    concat_encoder = models.build_concat_encoder(*concat_choice, bundle) if concat_choice else None
    models.check_conditioning(encoder, model_cfg, concat_encoder)
    trainable_encoder = encoder is not None and type(encoder).trainable
    cond_key = cfg.cond_key or (models.MODALITY_KEYS.get(encoder.modality, "") if encoder is not None else "")
    concat_key = cfg.concat_key or (
        models.MODALITY_KEYS.get(concat_encoder.modality, "") if concat_encoder is not None else ""
    )
    if cfg.cond_drop > 0 and not models.can_drop(encoder):
        raise ValueError(
            f"--cond-drop {cfg.cond_drop}: the {choice and choice[0]} condition cannot be dropped "
            "(no unconditional output); use --cond-drop 0"
        )

    # -- weights: fine-tune source, first stage -------------------------------------------------------------
    scale_ready = not diffusion.scale_by_std
    if init is not None:
        bundle.unet.load_state_dict(init.unet.state_dict(), strict=True)
        bundle.first_stage_model.load_state_dict(init.first_stage_model.state_dict(), strict=True)
        if encoder is not None and init.cond_stage_weights:
            encoder.load_state_dict(init.cond_stage_weights, strict=True)
        bundle.scale_factor, scale_ready = init.scale_factor, True
    if first is not None:
        bundle.first_stage_model.load_state_dict(first.first_stage_model.state_dict(), strict=True)
    bundle.to(device)
    bundle.first_stage_model.eval().requires_grad_(False)
    if encoder is not None:
        encoder.to(device)
        encoder.train(trainable_encoder).requires_grad_(trainable_encoder)
    logvar = None
    if diffusion.learn_logvar:
        logvar = nn.Parameter(torch.full((diffusion.timesteps,), diffusion.logvar_init, device=device))
    if cfg.fsdp:
        ddp.shard_unet(bundle.unet, info, mixed_bf16=cfg.precision == "bf16")
    use_ema = diffusion.use_ema if cfg.ema is None else cfg.ema
    assert bundle.model is not None and bundle.schedule is not None
    ema = LitEma(bundle.model, decay=cfg.ema_decay) if use_ema else None
    step_module = LatentDiffusionStep(
        bundle.model,
        bundle.schedule,
        diffusion,
        encoder=encoder if trainable_encoder else None,
        wrap=encoder.conditioning if encoder is not None else None,
        logvar=logvar,
    )
    trainer = (
        step_module if cfg.fsdp else ddp.wrap_ddp(step_module, info, device, find_unused=trainable_encoder)
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    draws = SharedDraws(torch.Generator(device=device).manual_seed(cfg.seed + 1), info)
    log.info(
        "%s: UNet %.2fM parameters, first stage %s (frozen), encoder %s (%s)%s, EMA %s, %d process(es) on %s",
        model_cfg.family,
        sum(p.numel() for p in bundle.unet.parameters()) / 1e6,
        model_cfg.first_stage.kind,
        choice[0] if choice else "none",
        "trained" if trainable_encoder else "frozen",
        f" + concat {concat_choice[0]}" if concat_choice else "",
        "on" if ema is not None else "off",
        info.world_size,
        device,
    )

    # -- data -----------------------------------------------------------------------------------------------
    if dataset is None:
        if cfg.data is None:
            raise ValueError(
                "no data: pass --data (folder:PATH, scenes, fashion_mnist, latents:PATH, synthetic:N)"
            )
        options = dict(cfg.data_options)
        if cfg.data.startswith("latents:"):
            from ldm_sdk.training.data.latents import first_stage_config_hash

            options.setdefault("config_hash", first_stage_config_hash(bundle))
        dataset = build_dataset(cfg.data, image_size=cfg.image_size, seed=cfg.seed, **options)
    stream = BatchStream(
        dataset,
        batch_size=cfg.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    latent_scale = getattr(dataset, "scale_factor", None)  # precomputed latents come scaled by this

    def latents(batch: dict[str, Any]) -> torch.Tensor:
        """Unscaled first-stage latents of a batch: stored ones, or encoded (KL posterior sample or mode)."""
        if "latent" in batch:
            return batch["latent"].float() / (latent_scale or 1.0)
        fs = bundle.first_stage_model
        x = batch["image"]
        with torch.no_grad(), autocast:
            if isinstance(fs, AutoencoderKL):
                posterior = fs.encode(x)
                if not cfg.latent_sample:
                    return posterior.mode().float()
                eps = draws.randn(tuple(posterior.mean.shape), device)
                return (posterior.mean + posterior.std * eps.to(posterior.mean.dtype)).float()
            return fs.encode(x).float()

    def sync_scale() -> None:
        """SD inpainting concatenates SCALED masked-image latents: its encoder follows the bundle's factor."""
        for enc in (encoder, concat_encoder):
            if enc is not None and getattr(enc, "variant", None) == "sd":
                enc.scale_factor = bundle.scale_factor  # type: ignore[union-attr]

    def concat_map(batch: dict[str, Any]) -> torch.Tensor | None:
        """A hybrid model's concat part of ``batch`` (None otherwise), computed without gradients."""
        if concat_encoder is None:
            return None
        with torch.no_grad(), autocast:
            out: torch.Tensor = concat_encoder(models.encoder_input(concat_encoder, batch, concat_key))
        return out

    # -- optimizer ------------------------------------------------------------------------------------------
    params_to_train = [p for p in bundle.model.parameters() if p.requires_grad]
    extra_params = [
        *(encoder.parameters() if trainable_encoder and encoder is not None else []),
        *([logvar] if logvar is not None else []),
    ]
    lr = cfg.lr * (cfg.batch_size * info.world_size * cfg.grad_accum if cfg.scale_lr else 1)
    # two groups: FSDP's DTensor parameters and plain ones may not meet in one foreach kernel
    groups = [{"params": params_to_train}, *([{"params": extra_params}] if extra_params else [])]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    log.info(
        "lr %.3g, %d step(s) of %d x %d x %d samples, cond drop %.2f, %s",
        lr,
        cfg.max_steps,
        cfg.batch_size,
        info.world_size,
        cfg.grad_accum,
        cfg.cond_drop,
        cfg.precision,
    )

    # -- resume ---------------------------------------------------------------------------------------------
    step = 0
    resume = ckpt.resolve_resume(cfg.resume, out_dir)
    if resume is not None:
        state = ckpt.load_training_checkpoint(resume)
        if state.config_json is None or state.config_json != model_cfg.model_dump_json():
            raise ValueError(f"{resume} was trained with another model config; resume with the same options")
        sd = state.state_dict
        ddp.load_full_state(bundle.unet, split_prefix(sd, UNET_PREFIX), info)
        bundle.first_stage_model.load_state_dict(split_prefix(sd, FIRST_STAGE_PREFIX), strict=True)
        if encoder is not None:
            encoder.load_state_dict(split_prefix(sd, COND_STAGE_PREFIX), strict=True)
        if ema is not None:
            ema.load_bundle_weights(sd)
        if logvar is not None:
            logvar.data.copy_(sd["logvar"])
        if "scale_factor" in sd:
            bundle.scale_factor, scale_ready = float(sd["scale_factor"]), True
        ddp.load_optimizer_state(optimizer, step_module, state.optimizers[0], info)
        scheduler.load_state_dict(state.schedulers[0])
        step = state.global_step
        stream.load_state(state.data)
        if len(state.rng) == info.world_size:
            ckpt.restore_rng(state.rng[info.rank], {"draws": draws.generator})
        else:
            log.warning(
                "resuming on %d processes from %d: RNG streams restart", info.world_size, len(state.rng)
            )
        log.info("resumed from %s at step %d (epoch %d)", resume, step, stream.epoch)
    sync_scale()

    def sync_bundle() -> None:
        """Put the encoder, EMA and logvar into the bundle (what compvis_state_dict() writes)."""
        bundle.cond_stage_weights = (
            {k: v.detach() for k, v in encoder.state_dict().items()} if encoder else {}
        )
        bundle.ema_weights = ema.bundle_weights() if ema is not None else {}
        bundle.extra_entries = {"logvar": logvar.detach()} if logvar is not None else {}

    def save_checkpoint() -> Path:
        sync_bundle()
        state_dict = ddp.full_compvis_state(bundle, info)  # FSDP: gathers the UNet (all ranks take part)
        optim_state = ddp.full_optimizer_state(optimizer, step_module, info)
        rng = ddp.gather_objects(ckpt.capture_rng({"draws": draws.generator}), info)
        path = out_dir / f"step-{step:08d}.ckpt"
        if info.is_main:
            ckpt.save_training_checkpoint(
                path,
                state_dict=state_dict,
                config_json=model_cfg.model_dump_json(),
                global_step=step,
                epoch=stream.epoch,
                optimizers=[optim_state],
                schedulers=[scheduler.state_dict()],
                data=stream.state(),
                rng=rng,
                train_config_json=cfg.model_dump_json(),  # type: ignore[arg-type]
            )
            ckpt.publish_last(path, out_dir)
            ckpt.rotate_checkpoints(out_dir, cfg.keep_last)
            log.info("saved %s", path)
        ddp.barrier(info)
        return path

    # fixed conditions for the sample grids: the first items of the data set
    n_grid = min(cfg.sample_count, len(dataset))  # type: ignore[arg-type]
    grid_batch = to_device(collate([dataset[i] for i in range(n_grid)]), device)

    def sample_grid() -> None:
        if encoder is not None:
            encoder.eval()
            with torch.no_grad():
                cond = encoder.conditioning(encoder(models.encoder_input(encoder, grid_batch, cond_key)))
                can_guide = cfg.sample_cfg != 1.0 and models.can_drop(encoder)
                uncond = encoder.conditioning(encoder.unconditional(n_grid)) if can_guide else None
            encoder.train(trainable_encoder)
        else:
            cond, uncond = Conditioning(), None
        concat = concat_map(grid_batch)
        if concat is not None:  # hybrid: the same concat map on both halves of guidance
            cond = cond.with_concat(concat.float())
            if uncond is not None:
                uncond = uncond.with_concat(concat.float())
        if "latent" in grid_batch:
            shape = tuple(grid_batch["latent"].shape[1:])
        else:  # the image size over the first stage's factor (no encoding: it would draw from training's RNG)
            f = bundle.downsampling_factor
            shape = (
                bundle.latent_channels,
                grid_batch["image"].shape[-2] // f,
                grid_batch["image"].shape[-1] // f,
            )
        bundle.eval()
        averaged = ema.average_parameters(bundle.model) if ema is not None else contextlib.nullcontext()
        with averaged, autocast:
            images = ddim_samples(
                bundle,
                cond,
                n=n_grid,
                shape=shape,
                steps=cfg.sample_steps,  # type: ignore[arg-type]
                guidance_scale=cfg.sample_cfg,
                uncond=uncond,
                seed=cfg.seed,
            )
            ddp.reshard(bundle.unet)  # FSDP: back to shards before the EMA swap is undone
        bundle.model.train()
        if info.is_main:
            save_grid(images.float(), out_dir / "samples" / f"step-{step:08d}.png")

    # -- training loop --------------------------------------------------------------------------------------
    metrics_file = out_dir / "metrics.jsonl"
    if info.is_main:
        trim_metrics(metrics_file, step)  # a fresh run starts it over, a resume drops lines past it
    samples_per_step = cfg.batch_size * info.world_size * cfg.grad_accum
    bundle.model.train()
    result = TrainResult(step=step)
    t0 = time.perf_counter()
    window: list[dict[str, float]] = []
    while step < cfg.max_steps:
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = to_device(next(stream), device)
            z = latents(batch)
            if not scale_ready:  # CompVis scale_by_std: 1 / std of the very first batch's latents
                bundle.scale_factor = scale_from_std(z, info)
                scale_ready = True
                log.info("scale_by_std: scale_factor = %.6f", bundle.scale_factor)
                sync_scale()
            z = z * bundle.scale_factor
            b = z.shape[0]
            t = draws.randint(diffusion.timesteps, b, device)
            noise = draws.randn(tuple(z.shape), device)
            drop = draws.bernoulli(cfg.cond_drop, b, device) if cfg.cond_drop > 0 else None
            cond_in = models.encoder_input(encoder, batch, cond_key) if encoder is not None else None
            concat = concat_map(batch)  # hybrid: never dropped (module docstring)
            if encoder is not None and not trainable_encoder:  # frozen: encode (and drop) outside the graph
                with torch.no_grad(), autocast:
                    cond_in = encoder(cond_in)
                    if drop is not None:
                        cond_in = drop_conditions(cond_in, encoder.unconditional(b), drop)
                drop = None
            last = micro == cfg.grad_accum - 1
            no_sync = getattr(trainer, "no_sync", None)
            with no_sync() if no_sync is not None and not last else contextlib.nullcontext(), autocast:
                loss, loss_logs = trainer(z, cond_in, t, noise, drop, concat)
            (loss / cfg.grad_accum).backward()
            for k, v in loss_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        if cfg.fsdp:
            ddp.average_gradients(extra_params, info)  # the UNet's were reduce-scattered by FSDP
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([*params_to_train, *extra_params], cfg.grad_clip)
        if not math.isfinite(logs["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}: {logs}; lower --lr or use fp32")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if ema is not None:
            ema(bundle.model)
        step += 1
        result.history.append(logs)
        window.append(logs)

        # -- logging, samples, checkpoints ------------------------------------------------------------------
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean = ddp.all_reduce_mean(
                {k: sum(w[k] for w in window) / len(window) for k in window[0]}, info, device
            )
            dt = (time.perf_counter() - t0) / len(window)
            log.info(
                "step %d | loss %.5f | simple %.5f | vlb %.5f | lr %.3g | %.2fs/step",
                step,
                mean["loss"],
                mean["loss_simple"],
                mean["loss_vlb"],
                scheduler.get_last_lr()[0],
                dt,
            )
            if info.is_main:
                record = {"step": step, **mean, "lr": scheduler.get_last_lr()[0], "s_per_step": dt}
                record["samples_per_s"] = samples_per_step / dt if dt > 0 else 0.0
                if device.type == "cuda":
                    record["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                with metrics_file.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
            window, t0 = [], time.perf_counter()
        if cfg.sample_every and step % cfg.sample_every == 0 and (info.is_main or cfg.fsdp):
            sample_grid()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            result.checkpoint = save_checkpoint()

    # -- save -----------------------------------------------------------------------------------------------
    if cfg.save_final:
        result.checkpoint = save_checkpoint()
    result.step = step
    if info.is_main and not cfg.fsdp and cfg.save_final:
        result.export = save(bundle, out_dir / "model.safetensors", metadata={"global_step": step})
        log.info("exported %s (ldm_sdk.load; use_ema=True for the EMA weights)", result.export)
    bundle.eval()
    result.bundle, result.encoder, result.ema = bundle, encoder, ema
    result.concat_encoder = concat_encoder
    ddp.cleanup(info)
    return result


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of ``path`` (``metrics.jsonl``) up to ``step`` (all removed for step 0; a line cut
    short by a crash is dropped)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


if __name__ == "__main__":
    main()
