"""Train a first-stage autoencoder (KL or VQ) with LDM's loss: L1/L2 + LPIPS + patch GAN + KL / codebook.

Reads top to bottom: config, distributed set-up, data, model and loss, optimizers, resume, loop, save.
The result is a first-stage checkpoint that ``ldm_sdk.load`` reads (and ``train_ldm --first-stage`` takes)::

    python -m ldm_sdk.training.train_autoencoder --model kl-f4 --data folder:/data/faces --image-size 256 \\
        --lpips-vgg vgg16-397923af.pth --disc-start 50001 --out-dir runs/kl-f4
    torchrun --standalone --nproc_per_node=2 -m ldm_sdk.training.train_autoencoder --config ae.yaml
    ldm-sdk train autoencoder --config ae.yaml

Two optimizers as in the original: Adam (betas 0.5, 0.9) on encoder, decoder, quant convs (and the
codebook), and Adam on the discriminator; lr = ``--lr`` x batch x world size x accumulation when
``--scale-lr`` (CompVis ``main.py``). Several processes average gradients explicitly (not DDP: the loss
takes gradients at the decoder's last layer with ``autograd.grad`` and runs the discriminator twice per
step); the adaptive weight is each rank's own, as in CompVis under DDP. The discriminator step reuses the
generator step's reconstructions, detached (the original re-runs the autoencoder for it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.loader import save
from ldm_sdk.models.configs import AutoencoderKLConfig, ModelConfig
from ldm_sdk.models.first_stage import AutoencoderKL
from ldm_sdk.training import checkpointing as ckpt
from ldm_sdk.training import distributed as ddp
from ldm_sdk.training.batches import BatchStream, build_dataset, to_device
from ldm_sdk.training.config import BaseTrainConfig, parse_config
from ldm_sdk.training.diffusion_step import SharedDraws
from ldm_sdk.training.losses import AutoencoderLoss
from ldm_sdk.training.lpips import build_perceptual_loss
from ldm_sdk.training.models import first_stage_config
from ldm_sdk.training.samples import save_grid


# -- config -------------------------------------------------------------------------------------------------
class TrainAutoencoderConfig(BaseTrainConfig):
    """Options of ``train_autoencoder`` (flags are the field names with dashes)."""

    model: str = Field(
        "kl-f4", description="first stage: zoo name (kl-f4, vq-f4 ...), tiny:NAME, .yaml or .json"
    )
    init_from: Path | None = Field(None, description="start from this first-stage checkpoint's weights")
    lr: float = Field(4.5e-6, gt=0, description="base learning rate (CompVis base_learning_rate)")
    scale_lr: bool = Field(True, description="lr x batch x world size x grad accumulation (CompVis main.py)")
    adam_betas: tuple[float, float] = Field((0.5, 0.9), description="Adam betas of both optimizers")
    adam_eps: float = Field(1e-8, gt=0, description="Adam epsilon of both optimizers (torch default)")
    pixel_loss: Literal["l1", "l2"] = Field("l1", description="reconstruction error per pixel")
    pixel_weight: float = Field(1.0, ge=0, description="weight of the pixel term")
    perceptual_weight: float = Field(1.0, ge=0, description="weight of LPIPS (0: off)")
    lpips_vgg: Path | None = Field(
        None, description="VGG16 weights for LPIPS (torchvision or LPIPS state dict)"
    )
    lpips_heads: Path | None = Field(
        None, description="LPIPS linear heads (vgg.pth); default: the lpips package's"
    )
    random_lpips: bool = Field(False, description="without --lpips-vgg, use a random VGG trunk (tests only)")
    kl_weight: float = Field(1e-6, ge=0, description="KL term weight (KL autoencoders)")
    codebook_weight: float = Field(1.0, ge=0, description="codebook/commitment term weight (VQ autoencoders)")
    disc_start: int = Field(50001, ge=0, description="step from which the GAN term is on")
    disc_weight: float = Field(0.5, ge=0, description="scale of the adaptive GAN weight")
    disc_factor: float = Field(1.0, ge=0, description="GAN factor once started")
    disc_loss: Literal["hinge", "vanilla"] = Field("hinge", description="discriminator loss")
    disc_layers: int = Field(3, ge=1, description="PatchGAN layers")
    disc_ndf: int = Field(64, ge=1, description="PatchGAN base width")
    disc_actnorm: bool = Field(False, description="ActNorm instead of BatchNorm in the discriminator")
    sample_every: int = Field(1000, ge=0, description="write a reconstruction grid every N steps (0: never)")
    sample_count: int = Field(8, ge=1, description="images in the reconstruction grid")


@dataclass
class TrainResult:
    """What ``main`` returns: per-step logs of this rank, the last checkpoint, the trained model."""

    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    export: Path | None = None
    step: int = 0
    bundle: ModelBundle | None = None


def main(argv: Sequence[str] | None = None, *, dataset: Dataset[Any] | None = None) -> TrainResult:
    cfg = parse_config(TrainAutoencoderConfig, argv, prog="train_autoencoder")

    # -- processes, device, seeds ---------------------------------------------------------------------------
    info, device = ddp.setup(cfg.device, deterministic=cfg.deterministic)
    out_dir = cfg.out_dir
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ddp.barrier(info)
    log = ddp.rank_zero_logger(
        info, "ldm_sdk.train_autoencoder", out_dir / "train.log" if info.is_main else None
    )
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    # -- data -----------------------------------------------------------------------------------------------
    if dataset is None:
        if cfg.data is None:
            raise ValueError("no data: pass --data (folder:PATH, fashion_mnist, scenes, synthetic:N)")
        dataset = build_dataset(cfg.data, image_size=cfg.image_size, seed=cfg.seed)
    stream = BatchStream(
        dataset,
        batch_size=cfg.batch_size,
        rank=info.rank,
        world_size=info.world_size,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )

    # -- model and loss -------------------------------------------------------------------------------------
    family, fs_config = first_stage_config(cfg.model)
    model_cfg = ModelConfig(family=family, first_stage=fs_config)
    bundle = ModelBundle(model_cfg)
    if cfg.init_from is not None:
        from ldm_sdk.checkpoints.loader import load

        source = load(cfg.init_from, model_cfg)
        bundle.first_stage_model.load_state_dict(source.first_stage_model.state_dict(), strict=True)
    ae = bundle.first_stage_model.to(device).train()
    is_kl = isinstance(fs_config, AutoencoderKLConfig)
    perceptual = None
    if cfg.perceptual_weight > 0:
        perceptual = build_perceptual_loss(
            cfg.lpips_vgg, cfg.lpips_heads, allow_random_trunk=cfg.random_lpips
        )
    loss_fn = (
        AutoencoderLoss(
            "kl" if is_kl else "vq",
            disc_start=cfg.disc_start,
            perceptual=perceptual,
            perceptual_weight=cfg.perceptual_weight,
            pixel_weight=cfg.pixel_weight,
            pixel=cfg.pixel_loss,
            kl_weight=cfg.kl_weight,
            codebook_weight=cfg.codebook_weight,
            disc_in_channels=fs_config.ddconfig.out_ch,
            disc_num_layers=cfg.disc_layers,
            disc_ndf=cfg.disc_ndf,
            disc_factor=cfg.disc_factor,
            disc_weight=cfg.disc_weight,
            disc_loss=cfg.disc_loss,
            use_actnorm=cfg.disc_actnorm,
        )
        .to(device)
        .train()
    )
    ddp.broadcast_module(ae, info)
    ddp.broadcast_module(loss_fn, info)
    last_layer = ae.decoder.conv_out.weight
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    draws = SharedDraws(torch.Generator(device=device).manual_seed(cfg.seed + 1), info)
    log.info(
        "first stage %s (%s), %.2fM parameters; discriminator %.2fM; perceptual loss %s; %d process(es) "
        "on %s",
        family,
        fs_config.kind,
        sum(p.numel() for p in ae.parameters()) / 1e6,
        sum(p.numel() for p in loss_fn.discriminator.parameters()) / 1e6,
        "on" if perceptual is not None else "OFF",
        info.world_size,
        device,
    )

    # -- optimizers (CompVis: opt_ae on the autoencoder, not on loss.logvar; opt_disc on the discriminator)
    lr = cfg.lr * (cfg.batch_size * info.world_size * cfg.grad_accum if cfg.scale_lr else 1)
    ae_params = [p for p in ae.parameters() if p.requires_grad]
    disc_params = list(loss_fn.discriminator.parameters())
    opt_ae = torch.optim.Adam(ae_params, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    opt_disc = torch.optim.Adam(disc_params, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps)
    warmup = cfg.warmup_steps

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in (opt_ae, opt_disc)]
    log.info(
        "lr %.3g (%s), %d step(s) of %d x %d x %d images",
        lr,
        "scaled" if cfg.scale_lr else "as given",
        cfg.max_steps,
        cfg.batch_size,
        info.world_size,
        cfg.grad_accum,
    )

    # -- resume ---------------------------------------------------------------------------------------------
    step = 0
    resume = ckpt.resolve_resume(cfg.resume, out_dir)
    if resume is not None:
        state = ckpt.load_training_checkpoint(resume)
        if state.config_json is not None and ModelConfig.model_validate_json(state.config_json) != model_cfg:
            raise ValueError(f"{resume} was trained with another model config than --model {cfg.model}")
        ae.load_state_dict(
            {k: v for k, v in state.state_dict.items() if not k.startswith("loss.")}, strict=True
        )
        missing, unexpected = loss_fn.load_state_dict(
            {k[5:]: v for k, v in state.state_dict.items() if k.startswith("loss.")}, strict=False
        )
        if unexpected or any(not k.startswith("perceptual_loss.") for k in missing):
            raise ValueError(
                f"{resume}: the loss weights do not fit (missing {missing}, unexpected {unexpected})"
            )
        for opt, opt_state in zip((opt_ae, opt_disc), state.optimizers, strict=True):
            opt.load_state_dict(opt_state)
        for sched, sched_state in zip(schedulers, state.schedulers, strict=True):
            sched.load_state_dict(sched_state)
        step = state.global_step
        stream.load_state(state.data)
        if len(state.rng) == info.world_size:
            ckpt.restore_rng(state.rng[info.rank], {"draws": draws.generator})
        else:
            log.warning(
                "resuming on %d processes from %d: RNG streams restart", info.world_size, len(state.rng)
            )
        log.info("resumed from %s at step %d (epoch %d)", resume, step, stream.epoch)

    def save_checkpoint() -> Path:
        rng = ddp.gather_objects(ckpt.capture_rng({"draws": draws.generator}), info)
        path = out_dir / f"step-{step:08d}.ckpt"
        if info.is_main:
            # CompVis layout: the autoencoder, then loss.* (discriminator, logvar); the frozen LPIPS is not
            # written (it comes from --lpips-vgg), which keeps checkpoints small
            loss_state = {
                k: v for k, v in loss_fn.state_dict().items() if not k.startswith("perceptual_loss.")
            }
            state_dict = {**ae.state_dict(), **{f"loss.{k}": v for k, v in loss_state.items()}}
            ckpt.save_training_checkpoint(
                path,
                state_dict=state_dict,
                config_json=model_cfg.model_dump_json(),
                global_step=step,
                epoch=stream.epoch,
                optimizers=[opt_ae.state_dict(), opt_disc.state_dict()],
                schedulers=[s.state_dict() for s in schedulers],
                data=stream.state(),
                rng=rng,  # type: ignore[arg-type]
                train_config_json=cfg.model_dump_json(),
            )
            ckpt.publish_last(path, out_dir)
            ckpt.rotate_checkpoints(out_dir, cfg.keep_last)
            log.info("saved %s", path)
        ddp.barrier(info)
        return path

    # fixed images for the reconstruction grids: the dataset's first items
    grid_images = torch.stack([dataset[i]["image"] for i in range(min(cfg.sample_count, len(dataset)))])  # type: ignore[arg-type]

    # -- training loop --------------------------------------------------------------------------------------
    result = TrainResult(step=step)
    t0 = time.perf_counter()
    window: list[dict[str, float]] = []
    while step < cfg.max_steps:
        logs: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            x = to_device(next(stream), device)["image"]
            # generator (autoencoder) step: the discriminator only judges, its weights get no gradient
            loss_fn.discriminator.requires_grad_(False)
            with autocast:
                if isinstance(ae, AutoencoderKL):
                    posterior = ae.encode(x)
                    eps = draws.randn(tuple(posterior.mean.shape), device)
                    xrec = ae.decode(posterior.mean + posterior.std * eps.to(posterior.mean.dtype))
                    g_loss, g_logs = loss_fn.generator_loss(x, xrec, step, last_layer, posterior=posterior)
                else:
                    xrec, qloss, _ = ae(x)
                    g_loss, g_logs = loss_fn.generator_loss(x, xrec, step, last_layer, codebook_loss=qloss)
            (g_loss / cfg.grad_accum).backward()
            # discriminator step on the same images, reconstructions detached
            loss_fn.discriminator.requires_grad_(True)
            with autocast:
                d_loss, d_logs = loss_fn.discriminator_loss(x, xrec.detach(), step)
            (d_loss / cfg.grad_accum).backward()
            for k, v in {**g_logs, **d_logs}.items():
                logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
        ddp.average_gradients(ae_params, info)
        ddp.average_gradients(disc_params, info)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ae_params, cfg.grad_clip)
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"non-finite loss at step {step}: {logs}; lower --lr or use fp32")
        opt_ae.step()
        opt_disc.step()
        opt_ae.zero_grad(set_to_none=True)
        opt_disc.zero_grad(set_to_none=True)
        for s in schedulers:
            s.step()
        step += 1
        result.history.append(logs)
        window.append(logs)

        # -- logging, samples, checkpoints ------------------------------------------------------------------
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
            mean = ddp.all_reduce_mean(mean, info, device)
            dt = (time.perf_counter() - t0) / len(window)
            log.info(
                "step %d | rec %.4f | %s %.4g | g %.4f | d %.4f | d_weight %.3g | %.2fs/step",
                step,
                mean["rec_loss"],
                "kl" if is_kl else "vq",
                mean["kl_loss" if is_kl else "quant_loss"],
                mean["g_loss"],
                mean["disc_loss"],
                mean["d_weight"],
                dt,
            )
            window, t0 = [], time.perf_counter()
        if cfg.sample_every and step % cfg.sample_every == 0 and info.is_main:
            ae.eval()
            with torch.no_grad(), autocast:
                imgs = grid_images.to(device)
                rec = ae.decode(ae.encode(imgs).mode()) if isinstance(ae, AutoencoderKL) else ae(imgs)[0]
            ae.train()
            save_grid(
                torch.cat([imgs, rec.float()]), out_dir / "samples" / f"recon-{step:08d}.png", nrow=len(imgs)
            )
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            result.checkpoint = save_checkpoint()

    # -- save -----------------------------------------------------------------------------------------------
    result.checkpoint = save_checkpoint()
    result.step = step
    ae.eval()
    if info.is_main:
        result.export = save(bundle, out_dir / "first_stage.safetensors", metadata={"global_step": step})
        log.info("exported %s (inference weights: ldm_sdk.load / train_ldm --first-stage)", result.export)
    result.bundle = bundle
    ddp.cleanup(info)
    return result


if __name__ == "__main__":
    main()
