"""LDM-{1,2,4,8,16}: the perceptual-compression trade-off of the LDM paper (section 4.1) at small scale.

For each downsampling factor ``f`` this trains, on the synthetic emoji / clip-art scenes
(:class:`~ldm_sdk.training.data.scenes.SceneDataset`):

1. a first stage: ``f >= 2`` a KL autoencoder of factor ``f`` trained from scratch with
   :mod:`ldm_sdk.training.train_autoencoder`; ``f = 1`` is pixel space: no autoencoder at all. The data set
   hands the image itself to :mod:`ldm_sdk.training.train_ldm` as the item's ``latent`` (the trainer's
   precomputed-latents path), so the same trainer runs the same UNet in pixel space; the first stage that
   the trainer's config needs is a tiny placeholder that no step ever runs (the scale factor stays 1 and
   samples are not decoded);
2. a class-conditional LDM (the ``cin256`` recipe: a trained ``ClassEmbedder`` token through
   cross-attention, eps-prediction, the LDM zoo's linear schedule 0.0015..0.0195, EMA) whose UNet has the
   same parameter count for every factor within ``param_tolerance`` (:func:`design_unet`), trained for the
   same number of steps at the same batch size, with ``train_ldm.main`` called once per evaluation segment
   (``--resume auto`` continues it exactly);
3. measures: training throughput (optimizer steps per second and samples per second, timed between batch
   fetches inside the real trainer: data, first-stage encoding, UNet forward/backward, AdamW and EMA), the
   wall clock, and FID of DDIM samples (with the EMA weights) against held-out scenes every
   ``eval_every`` steps. FID uses torch-fidelity's ``inception-v3-compat`` feature extractor with the weights
   file ``--fid-weights``; without one, a random stand-in
   (:func:`~ldm_sdk.evaluation.generative.write_standin_inception_weights`) whose values are **not
   comparable with published FIDs**: the results say which was used.

Everything goes to ``--out-dir``: ``results.json`` (after every unit of work), ``results.md``, the figures,
sample grids, checkpoints. A second ``run`` with the same out dir skips what is done and continues the rest
(``--time-budget`` stops starting new work in time for a command limit). ``--results-from`` seeds a fresh
out dir (a new machine) with an earlier ``results.json``: finished factors are kept, unfinished ones
start over (their checkpoints were not carried). Subcommands::

    python training/experiments/ldm_factors.py run --preset smoke --out-dir out/ldm_factors_smoke
    python training/experiments/ldm_factors.py run --preset h100 --out-dir out/ldm_factors --time-budget 480
    python training/experiments/ldm_factors.py params --preset h100
    python training/experiments/ldm_factors.py pack-assets --out out/ldm_factors_assets
    python training/experiments/ldm_factors.py report --results out/ldm_factors/results.json \\
        --docs docs/experiments.md --figures docs/figures

docs/experiments.md describes the method and the commands of the GPU run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from a checkout where ldm_sdk is not installed
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from ldm_sdk.models.configs import (  # noqa: E402
    AutoencoderKLConfig,
    CondStageConfig,
    DDConfig,
    DiffusionConfig,
    ModelConfig,
    UNetConfig,
)

FACTORS: tuple[int, ...] = (1, 2, 4, 8, 16)
#: latent channels per factor: the LDM zoo's KL first stages (kl-f4: 3, kl-f8: 4, kl-f16: 16); f=2 takes 3
LATENT_CHANNELS: dict[int, int] = {1: 3, 2: 3, 4: 3, 8: 4, 16: 16}
#: the autoencoder's ch_mult per factor (one downsampling per extra level; widths x ae_ch)
AE_CH_MULT: dict[int, tuple[int, ...]] = {2: (1, 2), 4: (1, 2, 2), 8: (1, 2, 2, 4), 16: (1, 2, 2, 4, 4)}
#: UNet channel_mult patterns by number of levels; the first is the reference, the others help matching
MULT_PATTERNS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((1,),),
    2: ((1, 2), (1, 3), (2, 3), (1, 1)),
    3: ((1, 2, 3), (1, 2, 2), (1, 2, 4), (1, 1, 2)),
    4: ((1, 2, 3, 4), (1, 2, 2, 4), (1, 2, 2, 2), (1, 1, 2, 2)),
}
CLASS_TARGET = "ldm.modules.encoders.modules.ClassEmbedder"
RESULTS_VERSION = 1
STANDIN_WEIGHTS = "fid-standin-inception.pth"
#: preset fields a later call may change: more or fewer LDM steps (FID curves stay comparable at common
#: steps; a finished factor continues from its checkpoint), the time budget, the renderer's processes
MAY_CHANGE = frozenset({"ldm_steps", "time_budget_s", "render_workers"})
DOC_BEGIN = "<!-- ldm-factors:results:begin -->"
DOC_END = "<!-- ldm-factors:results:end -->"


# -- presets ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Every setting of one run; ``run`` flags override single fields (``--ldm-steps`` ...)."""

    name: str
    image_size: int
    train_images: int
    ref_images: int  # held-out scenes: the FID reference
    # first stage (f >= 2)
    ae_ch: int
    ae_res_blocks: int
    ae_steps: int
    ae_batch: int
    ae_lr: float
    # LDM
    unet_channels: int  # model_channels of the f=1 reference UNet: its parameter count is the target
    unet_res_blocks: int
    attn_max_size: int  # attention at UNet levels whose feature map is at most this many pixels wide
    context_dim: int  # class embedding width (one cross-attention token)
    ldm_steps: int
    ldm_batch: int
    ldm_lr: float
    ldm_warmup: int
    eval_every: int
    # evaluation
    fid_samples: int
    fid_layer: str  # "2048": FID as published; "64": cheap (smoke on CPU), not FID as published
    ddim_steps: int
    sample_batch: int
    # machinery
    precision: str  # fp32 or bf16 (autocast)
    time_budget_s: float
    render_workers: int
    fid_reference: str = "heldout"  # "heldout": unseen scenes of the training assets; "val": unseen assets
    sources: tuple[str, ...] = ("emoji", "clipart")
    ae_kl_weight: float = 1e-6
    ae_disc_start: int = -1  # -1: no GAN term within the run (disc_start past the last step)
    min_feature: int = 4  # the UNet downsamples while its smallest feature map stays >= this
    max_levels: int = 4
    param_tolerance: float = 0.10
    seed: int = 0
    factors: tuple[int, ...] = (16, 8, 4, 2, 1)  # order of a sequential run: cheap factors first


PRESETS: dict[str, Preset] = {
    # CPU, seconds: the test runs two factors end to end
    "smoke": Preset(
        name="smoke",
        image_size=32,
        train_images=32,
        ref_images=16,
        ae_ch=32,
        ae_res_blocks=1,
        ae_steps=3,
        ae_batch=4,
        ae_lr=1e-4,
        unet_channels=32,
        unet_res_blocks=1,
        attn_max_size=8,
        context_dim=32,
        ldm_steps=6,
        ldm_batch=4,
        ldm_lr=1e-4,
        ldm_warmup=0,
        eval_every=3,
        fid_samples=8,
        fid_layer="64",
        ddim_steps=4,
        sample_batch=8,
        precision="fp32",
        time_budget_s=600.0,
        render_workers=0,
    ),
    # one H100 (or two): 64 px scenes, ~33M-parameter UNets, 2000 steps x 256 per factor; see
    # docs/experiments.md for the call plan within 10-minute commands
    "h100": Preset(
        name="h100",
        image_size=64,
        train_images=20_000,
        ref_images=2_000,
        ae_ch=64,
        ae_res_blocks=1,
        ae_steps=1_500,
        ae_batch=64,
        ae_lr=2e-4,
        unet_channels=64,
        unet_res_blocks=2,
        attn_max_size=16,
        context_dim=256,
        ldm_steps=2_000,
        ldm_batch=256,
        ldm_lr=1e-4,
        ldm_warmup=100,
        eval_every=500,
        fid_samples=1_000,
        fid_layer="2048",
        ddim_steps=50,
        sample_batch=500,
        precision="bf16",
        time_budget_s=480.0,
        render_workers=14,
    ),
}


def preset_json(preset: Preset) -> dict[str, Any]:
    """The preset as results.json stores it (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(preset)))


def resolve_preset(name: str, **overrides: Any) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **changes)


# -- model configs ------------------------------------------------------------------------------------------
def latent_size(preset: Preset, f: int) -> int:
    if f not in FACTORS:
        raise ValueError(f"factor {f} is not one of {list(FACTORS)}")
    if preset.image_size % f:
        raise ValueError(f"image size {preset.image_size} is not a multiple of the factor {f}")
    return preset.image_size // f


def unet_levels(preset: Preset, f: int) -> int:
    """Levels of the UNet at factor ``f``: halve while the smallest map stays >= ``min_feature`` pixels."""
    s = latent_size(preset, f)
    levels = 1
    while levels < preset.max_levels and s >> levels >= preset.min_feature:
        levels += 1
    return levels


def unet_config(
    preset: Preset, f: int, model_channels: int, channel_mult: tuple[int, ...], res_blocks: int, depth: int
) -> UNetConfig:
    s, c = latent_size(preset, f), LATENT_CHANNELS[f]
    attention = tuple(2**i for i in range(len(channel_mult)) if s >> i <= preset.attn_max_size)
    return UNetConfig(
        image_size=s,
        in_channels=c,
        out_channels=c,
        model_channels=model_channels,
        num_res_blocks=res_blocks,
        attention_resolutions=attention,
        channel_mult=channel_mult,
        num_head_channels=32,
        use_spatial_transformer=True,
        transformer_depth=depth,
        context_dim=preset.context_dim,
        legacy=False,
    )


@functools.lru_cache(maxsize=4096)
def _count(config_json: str) -> int:
    from ldm_sdk.models.unet import UNetModel

    config = UNetConfig.model_validate_json(config_json)
    with torch.device("meta"):
        model = UNetModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


def count_parameters(config: UNetConfig) -> int:
    """Parameters of the UNet ``config`` builds (on the meta device: no memory, no init)."""
    return _count(config.model_dump_json())


def reference_unet(preset: Preset) -> UNetConfig:
    """The f=1 (pixel-space) UNet whose parameter count every factor matches."""
    levels = unet_levels(preset, 1)
    return unet_config(preset, 1, preset.unet_channels, MULT_PATTERNS[levels][0], preset.unet_res_blocks, 1)


@dataclass(frozen=True)
class UNetDesign:
    factor: int
    config: UNetConfig
    params: int
    target: int

    @property
    def rel_diff(self) -> float:
        return self.params / self.target - 1.0


def design_unet(preset: Preset, f: int) -> UNetDesign:
    """The UNet of factor ``f``, its parameter count matched to :func:`reference_unet`'s.

    Levels follow the latent size (:func:`unet_levels`); attention sits at the levels whose maps are at
    most ``attn_max_size`` pixels. Structures are tried in a fixed order (res blocks: the reference's, then
    2, 1, 3; transformer depth 1, then 2; the level count's ``channel_mult`` patterns, reference first), and
    for each the ``model_channels`` (a multiple of 32, for GroupNorm(32) and 32-channel heads) closest to
    the target by bisection. The first structure within half the tolerance wins; else the closest of all.
    """
    target = count_parameters(reference_unet(preset))
    levels = unet_levels(preset, f)
    blocks = [preset.unet_res_blocks, *(b for b in (2, 1, 3) if b != preset.unet_res_blocks)]
    best: UNetDesign | None = None
    for depth in (1, 2):
        for res_blocks in blocks:
            for mult in MULT_PATTERNS[levels]:

                def build(
                    k: int, mult: tuple[int, ...] = mult, rb: int = res_blocks, d: int = depth
                ) -> UNetConfig:
                    return unet_config(preset, f, 32 * k, mult, rb, d)

                lo, hi = 1, 64  # model_channels 32 .. 2048
                while hi - lo > 1:  # the largest k whose count is <= target (counts grow with k)
                    mid = (lo + hi) // 2
                    if count_parameters(build(mid)) <= target:
                        lo = mid
                    else:
                        hi = mid
                for k in (lo, hi):
                    cfg = build(k)
                    design = UNetDesign(f, cfg, count_parameters(cfg), target)
                    if best is None or abs(design.rel_diff) < abs(best.rel_diff):
                        best = design
                if best is not None and abs(best.rel_diff) <= preset.param_tolerance / 2:
                    return best
    assert best is not None
    return best


def training_flops(preset: Preset, f: int, unet: UNetConfig) -> dict[str, float]:
    """Counted (not measured) GFLOPs per image: the UNet forward at the latent size, the first-stage encoder
    forward (what a training step runs besides the UNet), and a training sample ~ 3 x UNet + encoder."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm_sdk.models.first_stage import AutoencoderKL
    from ldm_sdk.models.unet import UNetModel

    s, c = latent_size(preset, f), LATENT_CHANNELS[f]
    with torch.device("meta"):
        model = UNetModel.from_config(unet)
        x, t, ctx = torch.zeros(1, c, s, s), torch.zeros(1), torch.zeros(1, 1, preset.context_dim)
        with FlopCounterMode(display=False) as counter:
            model(x, t, ctx)
        unet_fwd = counter.get_total_flops() / 1e9
        encoder = 0.0
        if f > 1:
            fs = first_stage_config(preset, f)
            ae = AutoencoderKL(fs.ddconfig, fs.embed_dim)
            with FlopCounterMode(display=False) as counter:
                ae.encode(torch.zeros(1, 3, preset.image_size, preset.image_size))
            encoder = counter.get_total_flops() / 1e9
    return {"unet_fwd_gflop": unet_fwd, "encoder_gflop": encoder, "train_gflop": 3 * unet_fwd + encoder}


def first_stage_config(preset: Preset, f: int) -> AutoencoderKLConfig:
    """The KL autoencoder of factor ``f >= 2`` (f=1: the unused :func:`placeholder_config`)."""
    if f == 1:
        return placeholder_config(preset)
    c = LATENT_CHANNELS[f]
    dd = DDConfig(
        double_z=True,
        z_channels=c,
        resolution=preset.image_size,
        ch=preset.ae_ch,
        ch_mult=AE_CH_MULT[f],
        num_res_blocks=preset.ae_res_blocks,
        attn_resolutions=(),
    )
    return AutoencoderKLConfig(ddconfig=dd, embed_dim=c)


def placeholder_config(preset: Preset) -> AutoencoderKLConfig:
    """f=1: a factor-1, 3-channel first stage the trainer's config asks for; never run (the data set gives
    pixels as ``latent`` and samples are not decoded)."""
    dd = DDConfig(
        double_z=True, z_channels=3, resolution=preset.image_size, ch=32, ch_mult=(1,), num_res_blocks=0
    )
    return AutoencoderKLConfig(ddconfig=dd, embed_dim=3)


def ldm_config(preset: Preset, f: int, unet: UNetConfig) -> ModelConfig:
    from ldm_sdk.training.data.assets import SCENE_CLASSES

    s, c = latent_size(preset, f), LATENT_CHANNELS[f]
    diffusion = DiffusionConfig(
        timesteps=1000,
        beta_schedule="linear",
        linear_start=0.0015,
        linear_end=0.0195,
        parameterization="eps",
        loss_type="l2",
        conditioning_key="crossattn",
        first_stage_key="image",
        cond_stage_key="class_label",
        image_size=s,
        channels=c,
        cond_stage_trainable=True,
        use_ema=True,
        scale_factor=1.0,
        scale_by_std=f > 1,  # pixels stay in [-1, 1]; KL latents get 1 / std of the first batch
    )
    cond = CondStageConfig(
        target=CLASS_TARGET,
        params={"embed_dim": preset.context_dim, "n_classes": len(SCENE_CLASSES), "key": "class_label"},
    )
    return ModelConfig(
        family=f"scenes-ldm-f{f}",
        first_stage=first_stage_config(preset, f),
        unet=unet,
        diffusion=diffusion,
        cond_stage=cond,
    )


# -- data ---------------------------------------------------------------------------------------------------
def asset_paths(assets: Path | None) -> dict[str, Any]:
    """SceneDataset asset arguments: the system packages, or a folder made by ``pack-assets``."""
    if assets is None:
        return {}
    return {"emoji_font": assets / "NotoColorEmoji.ttf", "clipart_root": assets / "clipart"}


def _render_chunk(job: tuple[dict[str, Any], int, int]) -> tuple[Tensor, Tensor]:
    from ldm_sdk.training.data.scenes import SceneDataset

    kwargs, start, stop = job
    dataset = SceneDataset(**kwargs)
    images = torch.empty(stop - start, 3, dataset.height, dataset.width, dtype=torch.uint8)
    labels = torch.empty(stop - start, dtype=torch.long)
    for i in range(start, stop):
        item = dataset[i]
        images[i - start] = ((item["image"] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        labels[i - start] = item["class_label"]
    return images, labels


def render_scenes(kwargs: dict[str, Any], workers: int) -> tuple[Tensor, Tensor]:
    """All ``kwargs["length"]`` scenes as uint8 images and class labels (``workers`` processes; 0: here)."""
    n = int(kwargs["length"])
    if workers <= 0 or n < 256:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small tensor ops: one thread is fastest
        try:
            return _render_chunk((kwargs, 0, n))
        finally:
            torch.set_num_threads(threads)
    import multiprocessing as mp

    step = math.ceil(n / (workers * 4))
    jobs = [(kwargs, a, min(n, a + step)) for a in range(0, n, step)]
    with mp.get_context("spawn").Pool(workers, initializer=_render_init) as pool:
        parts = pool.map(_render_chunk, jobs)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _render_init() -> None:
    torch.set_num_threads(1)  # many processes: one thread each


def prepare_data(
    preset: Preset, out: Path, assets: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """Render (or reuse) the training scenes and the FID reference scenes; returns tensors and a summary."""
    from ldm_sdk.training.data.assets import SCENE_CLASSES
    from ldm_sdk.training.data.scenes import SceneDataset

    paths = asset_paths(assets)
    sources = list(preset.sources)
    if assets is not None:
        present = {"emoji": paths["emoji_font"].is_file(), "clipart": paths["clipart_root"].is_dir()}
        sources = [s for s in sources if present.get(s, False)]
        if not sources:
            raise FileNotFoundError(f"{assets} holds none of the scene sources {list(preset.sources)}")
    common = {
        "size": preset.image_size,
        "sources": tuple(sources),
        "lowres": None,
        "mask": "box",
        "cache_dir": str(out / "cache"),
        **{k: str(v) for k, v in paths.items()},
    }
    ref_split, ref_seed = (
        ("val", preset.seed) if preset.fid_reference == "val" else ("train", preset.seed + 1)
    )
    specs = {
        "train": {**common, "split": "train", "length": preset.train_images, "seed": preset.seed},
        "ref": {**common, "split": ref_split, "length": preset.ref_images, "seed": ref_seed},
    }
    data: dict[str, Any] = {}
    summary: dict[str, Any] = {"sources": sources, "assets": str(assets) if assets else "system packages"}
    for name, spec in specs.items():
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        path = out / "data" / f"{name}-{key}.pt"
        if path.is_file():
            blob = torch.load(path)
        else:
            t0 = time.perf_counter()
            images, labels = render_scenes(spec, preset.render_workers)
            blob = {"images": images, "labels": labels}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(blob, tmp)
            os.replace(tmp, path)
            log(f"rendered {len(images)} {name} scenes in {time.perf_counter() - t0:.1f}s")
        data[name] = blob
        data[f"{name}_path"] = str(path)
        hist = torch.bincount(blob["labels"], minlength=len(SCENE_CLASSES))
        summary[name] = {
            "split": spec["split"],
            "seed": spec["seed"],
            "count": len(blob["labels"]),
            "classes": {SCENE_CLASSES[i]: int(v) for i, v in enumerate(hist.tolist()) if v},
        }
    probe = SceneDataset(**{**specs["train"], "length": 1})
    summary["assets_per_source"] = {s: len(p) for s, p in probe.pools.items()}
    data["summary"] = summary
    data["paths"] = {name: data.pop(f"{name}_path") for name in specs}
    return data


class SceneTensors(Dataset[dict[str, Any]]):
    """Rendered scenes as training items: ``key`` (``image``, or ``latent`` for pixel space) in [-1, 1]
    and ``class_label``. ``fetch_times`` records when each batch is fetched (``__getitems__``, one call per
    batch of the trainer's DataLoader): the intervals are the trainer's step times; ``fetch_s`` sums the time
    spent inside (uint8 -> float batch; the DataLoader's collate and pinned copy come on top)."""

    def __init__(self, images: Tensor, labels: Tensor, key: str = "image") -> None:
        self.images, self.labels, self.key = images, labels, key
        self.fetch_times: list[float] = []
        self.fetch_s = 0.0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {self.key: self.images[index].float() / 127.5 - 1, "class_label": int(self.labels[index])}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        t = time.perf_counter()
        self.fetch_times.append(t)
        x = self.images[indices].float() / 127.5 - 1
        labels = self.labels[indices].tolist()
        items = [{self.key: x[j], "class_label": labels[j]} for j in range(len(indices))]
        self.fetch_s += time.perf_counter() - t
        return items


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


# -- FID ----------------------------------------------------------------------------------------------------
def to_uint8(images: Tensor) -> Tensor:
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def frechet_distance(
    mu1: Tensor, sigma1_sqrt: Tensor, sigma1_trace: float, mu2: Tensor, sigma2: Tensor
) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``, with the trace of the square root taken as
    ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))`` (the same eigenvalues as ``S1 S2``, from a symmetric matrix:
    ``eigvalsh`` instead of the general ``eigvals`` torch-fidelity uses, same value to rounding)."""
    m = sigma1_sqrt @ sigma2 @ sigma1_sqrt
    eig = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)
    diff = mu1 - mu2
    return float(diff @ diff + sigma1_trace + torch.trace(sigma2) - 2 * eig.sqrt().sum())


class FIDScorer:
    """FID of image sets against fixed reference images: torch-fidelity's ``inception-v3-compat`` features
    (``weights``: a local file), the reference statistics computed once (and cached at ``cache``)."""

    def __init__(
        self, weights: Path, layer: str, device: torch.device, reference: Tensor, cache: Path | None = None
    ) -> None:
        from torch_fidelity.utils import create_feature_extractor

        from ldm_sdk.evaluation.generative import FEATURE_EXTRACTOR, check_inception_weights

        self.device = device
        self.extractor = create_feature_extractor(
            FEATURE_EXTRACTOR,
            [layer],
            cuda=device.type == "cuda",
            feature_extractor_weights_path=str(check_inception_weights(weights)),
            verbose=False,
        )
        if cache is not None and cache.is_file():
            ref = torch.load(cache)
        else:
            mu, sigma = self.statistics(reference)
            ref = {"mu": mu, "sigma": sigma}
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".{os.getpid()}.tmp")
                torch.save(ref, tmp)
                os.replace(tmp, cache)
        self.mu = ref["mu"].to(device)
        sigma = ref["sigma"].to(device)
        w, v = torch.linalg.eigh(sigma)
        self.sigma_sqrt = (v * w.clamp(min=0).sqrt()) @ v.T
        self.sigma_trace = float(torch.trace(sigma))

    @torch.no_grad()
    def features(self, images: Tensor, batch: int = 250) -> Tensor:
        out = []
        for i in range(0, len(images), batch):
            feats = self.extractor(images[i : i + batch].to(self.device))
            out.append((feats[0] if isinstance(feats, tuple) else feats).double())
        return torch.cat(out)

    def statistics(self, images: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(images)
        return f.mean(0).cpu(), torch.cov(f.T).cpu()

    def score(self, images: Tensor) -> float:
        """FID of uint8 ``[N, 3, H, W]`` images against the reference."""
        if len(images) < 2:
            raise ValueError("FID needs at least 2 images")
        mu, sigma = self.statistics(images)
        return frechet_distance(
            self.mu, self.sigma_sqrt, self.sigma_trace, mu.to(self.device), sigma.to(self.device)
        )


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


# -- results ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
    env["git_commit"] = os.environ.get("LDM_FACTORS_COMMIT", "?")  # a checkout copy may have no .git
    with contextlib.suppress(Exception):
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    return env


def new_results(preset: Preset) -> dict[str, Any]:
    designs = {str(f): design_unet(preset, f) for f in FACTORS if preset.image_size % f == 0}
    return {
        "version": RESULTS_VERSION,
        "experiment": "ldm_factors (LDM paper section 4.1 at small scale)",
        "preset": preset_json(preset),
        "factors": {
            k: {
                "factor": int(k),
                "latent_shape": [LATENT_CHANNELS[int(k)], *[latent_size(preset, int(k))] * 2],
                "unet": {
                    "params": d.params,
                    "target": d.target,
                    "rel_diff": d.rel_diff,
                    "config": json.loads(d.config.model_dump_json()),
                },
                "flops": training_flops(preset, int(k), d.config),
                "first_stage": {"done": True, "placeholder": True} if k == "1" else {},
                "ldm": {"segments": [], "done": False},
            }
            for k, d in designs.items()
        },
        "runs": [],
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    os.replace(tmp, path)


def load_results(
    out: Path, preset: Preset, seed_from: Path | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """The results of this out dir (or ``seed_from``, or new), checked against ``preset`` and against the
    checkpoints that are really there: an unfinished factor without its checkpoint starts over."""
    path = out / "results.json"
    source = path if path.is_file() else seed_from
    if source is None or not source.is_file():
        return new_results(preset)
    results = json.loads(source.read_text(encoding="utf-8"))
    fresh = new_results(preset)
    old = results.get("preset", {})
    changed = sorted(k for k in fresh["preset"] if k not in MAY_CHANGE and old.get(k) != fresh["preset"][k])
    if changed:
        raise ValueError(
            f"{source} was written with other settings ({', '.join(changed)}); use another --out-dir or the "
            f"same preset and overrides (only {', '.join(sorted(MAY_CHANGE))} may change between calls)"
        )
    results["preset"] = fresh["preset"]
    for k, rec in results["factors"].items():
        f = int(k)
        ldm = rec["ldm"]
        ldm["done"] = bool(ldm["segments"]) and ldm["segments"][-1]["step"] >= preset.ldm_steps
        has_ckpt = (factor_dir(out, "ldm", f) / "last.ckpt").is_file()
        if ldm["segments"] and not ldm["done"] and not has_ckpt:
            log(
                f"f={f}: {len(ldm['segments'])} evaluated segment(s) but no checkpoint here: starting it over"
            )
            results.setdefault("discarded", []).append({"factor": f, "ldm": ldm})
            rec["ldm"] = {"segments": [], "done": False}
        fs = rec["first_stage"]
        if f > 1 and fs.get("done") and not rec["ldm"]["done"] and not (out / fs["export"]).is_file():
            log(f"f={f}: first stage recorded but its weights are not here: training it again")
            rec["first_stage"] = {}
    return results


def merge(results: dict[str, Any], update: dict[str, Any]) -> None:
    rec = results["factors"][str(update["factor"])]
    if "first_stage" in update:
        rec["first_stage"] = update["first_stage"]
    if "segment" in update:
        rec["ldm"]["segments"].append(update["segment"])
    if update.get("ldm_done"):
        rec["ldm"]["done"] = True


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per factor: throughput (median over segments), wall clock, FID at each evaluated step."""
    rows = []
    base = None
    for k in sorted(results["factors"], key=int):
        rec = results["factors"][k]
        segs = rec["ldm"]["segments"]
        rates = sorted(s["samples_per_s"] for s in segs if s.get("samples_per_s"))
        its = sorted(s["it_per_s"] for s in segs if s.get("it_per_s"))
        row = {
            "factor": int(k),
            "latent_shape": rec["latent_shape"],
            "unet_params": rec["unet"]["params"],
            "unet_rel_diff": rec["unet"]["rel_diff"],
            "first_stage": rec["first_stage"],
            "step": segs[-1]["step"] if segs else 0,
            "done": rec["ldm"]["done"],
            "samples_per_s": rates[len(rates) // 2] if rates else None,
            "it_per_s": its[len(its) // 2] if its else None,
            "train_wall_s": sum(s["train_wall_s"] for s in segs),
            "sample_images_per_s": segs[-1].get("sample_images_per_s") if segs else None,
            "devices": sorted({s.get("device", "?") for s in segs}),
            "fid": {s["step"]: s["fid"] for s in segs},
        }
        if row["factor"] == 1:
            base = row["samples_per_s"]
        rows.append(row)
    for row in rows:
        row["speedup_vs_f1"] = row["samples_per_s"] / base if base and row["samples_per_s"] else None
    return rows


def _fmt(x: Any, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def results_markdown(results: dict[str, Any]) -> str:
    p = results["preset"]
    rows = summarize(results)
    fid = results.get("fid", {})
    env = results.get("environment", {})
    workers = results.get("workers", 1)
    steps = sorted({s for r in rows for s in r["fid"]})
    device = env.get("gpu", env.get("device", "?")) + (f" x{workers} workers" if workers > 1 else "")
    commit = str(env.get("git_commit", "?"))[:10]
    if fid.get("standin", True):
        weights = (
            "**Stand-in Inception (random weights): these values are NOT comparable with published FIDs**; "
            "they only rank the factors against each other."
        )
    else:
        weights = f"Inception weights: `{fid.get('weights')}`."
    lines = [
        f"Preset `{p['name']}`: {p['image_size']} px scenes, {p['ldm_steps']} steps x batch "
        f"{p['ldm_batch']} per factor, {p['precision']}; device {device}, torch {env.get('torch', '?')}, "
        f"commit {commit}, {env.get('date', '?')}.",
        "",
        f"FID: {fid.get('samples', p['fid_samples'])} DDIM-{p['ddim_steps']} samples (EMA weights, no "
        f"guidance) against {p['ref_images']} held-out scenes ({p['fid_reference']}), Inception layer "
        f"{p['fid_layer']}. {weights}",
        "",
        "| f | latent | first stage (params, PSNR, rFID) | UNet params (vs f=1) | it/s | samples/s "
        "| speed-up vs f=1 | train wall (s) | sampling img/s | step | "
        + " | ".join(f"FID@{s}" for s in steps)
        + " |",
        "|" + "---|" * (10 + len(steps)),
    ]
    devices = sorted({d for r in rows for d in r["devices"]})
    if len(devices) > 1:
        lines.insert(
            4,
            f"**Measured on different devices ({', '.join(devices)}): compare throughput only between "
            "factors measured on the same one (results.json says which).**\n",
        )
    for r in rows:
        fs = r["first_stage"]
        if r["factor"] == 1:
            first = "none (pixel space)"
        elif fs.get("done"):
            first = f"{fs['params'] / 1e6:.2f}M, {fs['psnr_db']:.2f} dB, {fs['rfid']:.3g}"
        else:
            first = "not trained yet"
        shape = "x".join(str(v) for v in r["latent_shape"])
        step = f"{r['step']}" + ("" if r["done"] else " (running)" if r["step"] else " (not run)")
        unet = f"{r['unet_params'] / 1e6:.2f}M ({r['unet_rel_diff']:+.1%})"
        cells = [
            str(r["factor"]),
            shape,
            first,
            unet,
            _fmt(r["it_per_s"], ".2f"),
            _fmt(r["samples_per_s"], ".0f"),
            _fmt(r["speedup_vs_f1"], ".2f"),
            _fmt(r["train_wall_s"] or None, ".0f"),
            _fmt(r["sample_images_per_s"], ".0f"),
            step,
            *(_fmt(r["fid"].get(s), ".3g") for s in steps),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(results: dict[str, Any], path: Path) -> Path:
    lines = ["factor,step,fid,samples_per_s,it_per_s,train_wall_s,cumulative_train_s"]
    for k in sorted(results["factors"], key=int):
        total = 0.0
        for s in results["factors"][k]["ldm"]["segments"]:
            total += s["train_wall_s"]
            lines.append(
                f"{k},{s['step']},{s['fid']:.6g},{s.get('samples_per_s', '')},{s.get('it_per_s', '')},"
                f"{s['train_wall_s']:.3f},{total:.3f}"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- figures ------------------------------------------------------------------------------------------------
COLORS = {1: "#1f77b4", 2: "#ff7f0e", 4: "#2ca02c", 8: "#d62728", 16: "#9467bd"}


Curve = list[tuple[float, float]]


def plot_results(results: dict[str, Any], path: Path) -> Path:
    """Three panels as one PNG: FID vs training steps, FID vs cumulative training wall-clock (one line per
    factor), and training throughput per factor. matplotlib when installed, else a plain PIL drawing."""
    by_step: dict[int, Curve] = {}
    by_time: dict[int, Curve] = {}
    for k, rec in results["factors"].items():
        total, steps, times = 0.0, [], []
        for seg in rec["ldm"]["segments"]:
            total += seg["train_wall_s"]
            steps.append((float(seg["step"]), seg["fid"]))
            times.append((total, seg["fid"]))
        if steps:
            by_step[int(k)], by_time[int(k)] = steps, times
    speed = {r["factor"]: r["samples_per_s"] for r in summarize(results) if r["samples_per_s"]}
    label = "FID (stand-in Inception)" if results.get("fid", {}).get("standin", True) else "FID"
    panels = [
        ("sample quality vs steps", "training step", by_step),
        ("sample quality vs training time", "training wall-clock (s)", by_time),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _plot_pil(panels, speed, label, path)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, xlabel, curves) in zip(axes, panels, strict=False):
        for f, pts in sorted(curves.items()):
            ax.plot([x for x, _ in pts], [v for _, v in pts], "o-", color=COLORS[f], label=f"LDM-{f}")
        ax.set(title=title, xlabel=xlabel, ylabel=label)
        if curves:
            ax.legend()
    fs = sorted(speed)
    axes[2].bar([f"LDM-{f}" for f in fs], [speed[f] for f in fs], color=[COLORS[f] for f in fs])
    axes[2].set(title="training throughput", ylabel="training samples / s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_pil(
    panels: list[tuple[str, str, dict[int, Curve]]], speed: dict[int, float], label: str, path: Path
) -> Path:
    from PIL import Image, ImageDraw

    W, H, pad, n_panels = 1500, 420, 60, len(panels) + 1
    img = Image.new("RGB", (W, H), "white")
    dr = ImageDraw.Draw(img)
    width = W // n_panels

    def axes(i: int, title: str, ylabel: str) -> tuple[int, int, int, int]:
        x0 = i * width
        box = (x0 + pad, 40, x0 + width - 20, H - pad)
        dr.rectangle(box, outline="black")
        dr.text((x0 + pad, 12), title, fill="black")
        dr.text((x0 + 5, 25), ylabel, fill="black")
        return box

    for i, (title, xlabel, curves) in enumerate(panels):
        box = axes(i, title, label)
        pts = [pt for c in curves.values() for pt in c]
        if not pts:
            continue
        x_hi = max(x for x, _ in pts) or 1.0
        y_lo, y_hi = min(0.0, min(v for _, v in pts)), max(v for _, v in pts) or 1.0

        def xy(
            x: float,
            v: float,
            box: tuple[int, int, int, int] = box,
            lim: tuple[float, ...] = (x_hi, y_lo, y_hi),
        ) -> tuple[float, float]:
            return (
                box[0] + x / lim[0] * (box[2] - box[0]),
                box[3] - (v - lim[1]) / ((lim[2] - lim[1]) or 1.0) * (box[3] - box[1]),
            )

        for j, (f, c) in enumerate(sorted(curves.items())):
            if len(c) > 1:
                dr.line([xy(x, v) for x, v in c], fill=COLORS[f], width=2)
            for x, v in c:
                cx, cy = xy(x, v)
                dr.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=COLORS[f])
            dr.text((box[2] - 60, box[1] + 8 + 14 * j), f"LDM-{f}", fill=COLORS[f])
        dr.text((box[0], box[3] + 5), f"{xlabel}: 0 .. {x_hi:.4g}", fill="black")
        dr.text((box[0] - 55, box[1]), f"{y_hi:.3g}", fill="black")
        dr.text((box[0] - 55, box[3] - 10), f"{y_lo:.3g}", fill="black")
    box = axes(len(panels), "training throughput (samples/s)", "")
    if speed:
        top = max(speed.values())
        bar = (box[2] - box[0]) / (2 * len(speed) + 1)
        for i, f in enumerate(sorted(speed)):
            x = box[0] + bar * (2 * i + 1)
            y = box[3] - speed[f] / top * (box[3] - box[1] - 20)
            dr.rectangle((x, y, x + bar, box[3]), fill=COLORS[f])
            dr.text((x, box[3] + 5), f"LDM-{f}", fill="black")
            dr.text((x, y - 12), f"{speed[f]:.0f}", fill="black")
    img.save(path)
    return path


def sample_sheet(out: Path, results: dict[str, Any], path: Path) -> Path | None:
    """The last sample grid of every factor, one row each (LDM-1 at the top)."""
    from PIL import Image

    rows = []
    for k in sorted(results["factors"], key=int):
        grids = sorted((factor_dir(out, "ldm", int(k)) / "samples").glob("step-*.png"))
        if grids:
            with Image.open(grids[-1]) as im:
                rows.append(im.convert("RGB").copy())
    if not rows:
        return None
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_outputs(out: Path, results: dict[str, Any]) -> None:
    """results.json first; the table, CSV and figures after it, none of them able to stop a run."""
    write_json(out / "results.json", results)
    for name, write in (
        ("results.md", lambda: (out / "results.md").write_text(results_markdown(results), encoding="utf-8")),
        ("fid_curves.csv", lambda: write_csv(results, out / "fid_curves.csv")),
        ("ldm_factors.png", lambda: plot_results(results, out / "ldm_factors.png")),
        ("ldm_factors_samples.png", lambda: sample_sheet(out, results, out / "ldm_factors_samples.png")),
    ):
        try:
            write()
        except Exception as exc:  # a figure must not cost the experiment
            print(f"ldm_factors: could not write {name}: {exc!r}", file=sys.stderr, flush=True)


def export(out: Path, dest: Path) -> list[Path]:
    """Copy the small outputs (at most 8 files, each well under 16 MiB) to ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("results.json", "results.md", "fid_curves.csv", "ldm_factors.png", "ldm_factors_samples.png",
                 "run.log"):  # fmt: skip
        if (out / name).is_file():
            copied.append(Path(shutil.copy2(out / name, dest / name)))
    return copied


# -- the driver ---------------------------------------------------------------------------------------------
class Logger:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} ldm_factors: {message}"
        print(line, file=sys.stderr, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")


def _context_args(ctx: Context) -> dict[str, Any]:
    return {
        "preset": dataclasses.asdict(ctx.preset),
        "out": str(ctx.out),
        "fid_weights": str(ctx.fid_weights),
        "standin": ctx.standin,
        "lpips_vgg": str(ctx.lpips_vgg) if ctx.lpips_vgg else None,
        "data_paths": ctx.data["paths"],
        "device": ctx.device.type,
    }


def _worker(gpu: int, conn: Any, args: dict[str, Any]) -> None:
    """A worker process (one GPU, or the CPU): runs the factors the parent sends, reporting every update."""
    if args["device"] == "cuda":
        os.environ["CUDA_VISIBLE_DEVICES"] = args["gpu_ids"][
            gpu
        ]  # (the parent set it too) before CUDA starts
    else:
        torch.set_num_threads(1)
    log = Logger(Path(args["out"]) / "run.log")
    preset = Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in args["preset"].items()})
    data = {name: torch.load(p) for name, p in args["data_paths"].items()}
    data["paths"] = args["data_paths"]
    device = torch.device("cuda", 0) if args["device"] == "cuda" else torch.device("cpu")
    lpips_vgg = Path(args["lpips_vgg"]) if args["lpips_vgg"] else None
    ctx = Context(
        preset, Path(args["out"]), device, data, Path(args["fid_weights"]), args["standin"], lpips_vgg
    )
    while True:
        job = conn.recv()
        if job is None:
            return
        f, state, deadline = job
        try:
            status = run_factor(
                ctx,
                f,
                state,
                deadline,
                lambda u: conn.send(("update", u)),
                lambda m: log(f"[worker {gpu}] {m}"),
            )
            conn.send(("finished", {"factor": f, "status": status}))
        except Exception:
            conn.send(("error", {"factor": f, "traceback": traceback.format_exc()}))


def run_parallel(
    ctx: Context, factors: list[int], results: dict[str, Any], deadline: float, workers: int, log: Logger
) -> dict[int, str]:
    """One process per GPU; each takes the next factor (most expensive first) and runs all of it."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    mp_ctx = mp.get_context("spawn")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    args = {
        **_context_args(ctx),
        "gpu_ids": visible.split(",") if visible else [str(i) for i in range(workers)],
    }
    procs, conns = [], []
    for gpu in range(workers):
        parent, child = mp_ctx.Pipe()
        proc = mp_ctx.Process(target=_worker, args=(gpu, child, args), daemon=True)
        if ctx.device.type == "cuda":  # the child sees one GPU from its start (inherited environment)
            os.environ["CUDA_VISIBLE_DEVICES"] = args["gpu_ids"][gpu]
        try:
            proc.start()
        finally:
            if visible is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = visible
        procs.append(proc)
        conns.append(parent)
    queue = sorted(factors)  # LDM-1 (pixel space) is the longest: start it first
    status: dict[int, str] = {}
    busy: dict[int, int] = {}

    def dispatch(i: int) -> None:
        if queue:
            f = queue.pop(0)
            busy[i] = f
            conns[i].send((f, _factor_state(results, f), deadline))

    for i in range(workers):
        dispatch(i)
    while busy:
        for conn in wait([conns[i] for i in busy]):
            i = conns.index(conn)  # type: ignore[arg-type]
            try:
                kind, payload = conn.recv()  # type: ignore[union-attr]
            except EOFError:
                log(f"worker {i} died while running f={busy[i]}")
                status[busy.pop(i)] = "error"
                continue
            if kind == "update":
                merge(results, payload)
                write_outputs(ctx.out, results)
                continue
            f = busy.pop(i)
            if kind == "error":
                log(f"f={f} failed:\n{payload['traceback']}")
                status[f] = "error"
            else:
                status[f] = payload["status"]
            if status[f] != "deadline":
                dispatch(i)
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.send(None)
    for proc in procs:
        proc.join(timeout=30)
    for f in queue:
        status[f] = "deadline"
    return status


def _factor_state(results: dict[str, Any], f: int) -> dict[str, Any]:
    rec = results["factors"][str(f)]
    ae_walls = [
        r["first_stage"]["wall_s"] + r["first_stage"].get("eval_s", 0)
        for r in results["factors"].values()
        if r["first_stage"].get("wall_s")
    ]
    return {**rec, "expected_ae_s": max(ae_walls) if ae_walls else None}


def cmd_run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    preset = resolve_preset(
        args.preset,
        ldm_steps=args.ldm_steps,
        eval_every=args.eval_every,
        ldm_batch=args.batch_size,
        ae_steps=args.ae_steps,
        fid_samples=args.fid_samples,
        precision=args.precision,
        render_workers=args.render_workers,
    )
    budget = args.time_budget if args.time_budget is not None else preset.time_budget_s
    deadline = t_start + budget
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = Logger(out / "run.log")
    factors = [int(x) for x in args.factors.split(",")] if args.factors else list(preset.factors)
    bad = [f for f in factors if f not in FACTORS or preset.image_size % f]
    if bad:
        raise ValueError(f"--factors {bad}: valid factors are {list(FACTORS)}")
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and preset.precision == "bf16" and args.precision is None:
        preset = dataclasses.replace(preset, precision="fp32")
    results = load_results(out, preset, Path(args.results_from) if args.results_from else None, log)
    results["environment"] = environment(device)

    # FID weights: the real file, or the stand-in (written once per out dir)
    if args.fid_weights:
        from ldm_sdk.evaluation.generative import check_inception_weights

        weights, standin = check_inception_weights(args.fid_weights), False
    else:
        from ldm_sdk.evaluation.generative import STANDIN_NOTE, write_standin_inception_weights

        weights, standin = out / STANDIN_WEIGHTS, True
        if not weights.is_file():
            write_standin_inception_weights(weights)
        log(f"no --fid-weights: FID with a random stand-in Inception ({STANDIN_NOTE})")
    results["fid"] = {
        "weights": str(weights) if not standin else "random stand-in (seed 0)",
        "standin": standin,
        "note": (
            "computed with a randomly initialised stand-in Inception: NOT comparable with published FIDs"
            if standin
            else "torch-fidelity inception-v3-compat with the given weights"
        ),
        "feature_layer": preset.fid_layer,
        "samples": preset.fid_samples,
        "reference": preset.fid_reference,
    }

    data = prepare_data(preset, out, Path(args.assets) if args.assets else None, log)
    results["data"] = data.pop("summary")
    ctx = Context(
        preset, out, device, data, weights, standin, Path(args.lpips_vgg) if args.lpips_vgg else None
    )
    pending = [f for f in factors if not results["factors"][str(f)]["ldm"]["done"]]
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    asked = args.gpus if args.gpus is not None else n_gpus
    workers = max(1, min(asked, len(pending), n_gpus if device.type == "cuda" else asked))
    results["workers"] = workers
    run = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "factors": pending,
        "workers": workers,
        "budget_s": budget,
        "environment": results["environment"],
    }
    results["runs"].append(run)
    write_outputs(out, results)
    log(f"preset {preset.name}: factors {pending} on {workers} worker(s), {device}, budget {budget:.0f}s")

    status: dict[int, str] = {}

    def emit(update: dict[str, Any]) -> None:
        merge(results, update)
        write_outputs(out, results)

    try:
        if workers > 1:
            status = run_parallel(ctx, pending, results, deadline, workers, log)
        else:
            for f in pending:
                try:
                    status[f] = run_factor(ctx, f, _factor_state(results, f), deadline, emit, log)
                except Exception:
                    log(f"f={f} failed:\n{traceback.format_exc()}")
                    status[f] = "error"
                if status[f] == "deadline":
                    status.update({g: "deadline" for g in pending if g not in status})
                    break
    finally:
        run["status"] = {str(f): s for f, s in status.items()}
        run["wall_s"] = time.time() - t_start
        write_outputs(out, results)
        left = [f for f in pending if status.get(f) != "done"]
        if left:
            log(f"done in {run['wall_s']:.0f}s; unfinished: {left} (run again with the same --out-dir)")
        else:
            log(f"done in {run['wall_s']:.0f}s; all factors finished")
        if args.export:
            export(out, Path(args.export))
    return results


# -- other commands -----------------------------------------------------------------------------------------
def params_table(preset: Preset) -> tuple[list[UNetDesign], str]:
    """The matched UNets of ``preset`` and a Markdown table of them."""
    designs = [design_unet(preset, f) for f in FACTORS]
    lines = [
        f"Preset `{preset.name}`: {preset.image_size} px, target {designs[0].target:,} UNet parameters "
        f"(the f=1 reference), tolerance {preset.param_tolerance:.0%}.",
        "",
        "| f | latent | model_channels | channel_mult | res blocks | depth | attention (ds) | UNet params "
        "| vs f=1 | GFLOP/sample (UNet fwd, encoder, train) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in designs:
        c, s = d.config, latent_size(preset, d.factor)
        fl = training_flops(preset, d.factor, c)
        cells = [
            str(d.factor),
            f"{LATENT_CHANNELS[d.factor]}x{s}x{s}",
            str(c.model_channels),
            str(tuple(c.channel_mult)),
            str(c.num_res_blocks),
            str(c.transformer_depth),
            str(tuple(c.attention_resolutions)),
            f"{d.params:,}",
            f"{d.rel_diff:+.1%}",
            f"{fl['unet_fwd_gflop']:.2f}, {fl['encoder_gflop']:.2f}, {fl['train_gflop']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return designs, "\n".join(lines)


def cmd_params(args: argparse.Namespace) -> list[UNetDesign]:
    designs, table = params_table(resolve_preset(args.preset))
    print(table)
    return designs


def cmd_pack_assets(args: argparse.Namespace) -> Path:
    """Copy the emoji font and a clip-art subset (sampled by path hash under a size cap, same relative paths,
    so same splits) into one folder to carry to a machine without the Debian packages."""
    from ldm_sdk.training.data.clipart import CLIPART_ROOT
    from ldm_sdk.training.data.emoji import EMOJI_FONT

    out = Path(args.out)
    (out / "clipart").mkdir(parents=True, exist_ok=True)
    shutil.copy2(EMOJI_FONT, out / "NotoColorEmoji.ttf")
    root = Path(os.path.realpath(CLIPART_ROOT))
    files = sorted(
        (p for p in root.rglob("*.png") if p.is_file() and not p.is_symlink()),
        key=lambda p: hashlib.sha256(str(p.relative_to(root)).encode()).hexdigest(),
    )
    budget, total, n = args.clipart_mb * 1e6, 0, 0
    for p in files:
        size = p.stat().st_size
        if size > args.max_file_kb * 1e3 or total + size > budget:
            continue
        dest = out / "clipart" / p.relative_to(root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
        total += size
        n += 1
    print(f"{out}: emoji font + {n} clip-art files ({total / 1e6:.1f} MB)")
    return out


def cmd_report(args: argparse.Namespace) -> str:
    results = json.loads(Path(args.results).read_text(encoding="utf-8"))
    if args.docs and results["preset"]["name"] == "smoke" and not args.allow_smoke:
        raise ValueError(f"{args.results} is a smoke run: its numbers do not belong in {args.docs}")
    table = results_markdown(results)
    figures = Path(args.figures)
    src = Path(args.results).parent
    fig = plot_results(results, figures / "ldm_factors.png")
    written = [fig]
    if (src / "ldm_factors_samples.png").is_file():
        written.append(
            Path(shutil.copy2(src / "ldm_factors_samples.png", figures / "ldm_factors_samples.png"))
        )
    write_csv(results, figures / "ldm_factors_fid.csv")
    if args.docs:
        doc = Path(args.docs)
        text = doc.read_text(encoding="utf-8")
        if DOC_BEGIN not in text or DOC_END not in text:
            raise ValueError(f"{doc} has no {DOC_BEGIN} ... {DOC_END} block to fill")
        rel = os.path.relpath(figures, doc.parent)
        block = (
            f"{DOC_BEGIN}\n{table}\n![FID vs steps and throughput]({rel}/ldm_factors.png)\n"
            + (
                f"\n![Samples, LDM-1 (top) to LDM-16]({rel}/ldm_factors_samples.png)\n"
                if len(written) > 1
                else ""
            )
            + f"\nPer-evaluation numbers: [{rel}/ldm_factors_fid.csv]({rel}/ldm_factors_fid.csv).\n{DOC_END}"
        )
        head, rest = text.split(DOC_BEGIN, 1)
        doc.write_text(head + block + rest.split(DOC_END, 1)[1], encoding="utf-8")
    print(table)
    return table


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm_factors", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate (continues an earlier run in the same --out-dir)")
    run.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    run.add_argument("--out-dir", default="out/ldm_factors")
    run.add_argument("--factors", help="comma-separated subset of 1,2,4,8,16 (default: the preset's)")
    run.add_argument(
        "--fid-weights", help="FID Inception weights (pt_inception-2015-12-05); default: stand-in"
    )
    run.add_argument("--lpips-vgg", help="VGG16 weights: adds the LPIPS term to the autoencoders' loss")
    run.add_argument("--assets", help="folder from pack-assets (default: the Debian packages' files)")
    run.add_argument("--results-from", help="results.json of an earlier call, for a fresh --out-dir")
    run.add_argument("--time-budget", type=float, help="seconds after which no new unit starts")
    run.add_argument("--export", help="copy results, table, figures and log here at the end (e.g. $OUT)")
    run.add_argument("--device", help="cpu, cuda (default: cuda when available)")
    run.add_argument("--gpus", type=int, help="worker processes, one per GPU (default: all GPUs)")
    run.add_argument("--ldm-steps", type=int)
    run.add_argument("--eval-every", type=int)
    run.add_argument("--batch-size", type=int, help="LDM batch size")
    run.add_argument("--ae-steps", type=int)
    run.add_argument("--fid-samples", type=int)
    run.add_argument("--precision", choices=("fp32", "bf16"))
    run.add_argument("--render-workers", type=int, help="processes that render the scenes (0: in-process)")
    params = sub.add_parser("params", help="the matched UNets of a preset and their parameter counts")
    params.add_argument("--preset", default="h100", choices=sorted(PRESETS))
    pack = sub.add_parser("pack-assets", help="copy the scene assets into a folder to carry")
    pack.add_argument("--out", default="out/ldm_factors_assets")
    pack.add_argument("--clipart-mb", type=float, default=20.0)
    pack.add_argument("--max-file-kb", type=float, default=48.0)
    report = sub.add_parser("report", help="table and figures from a results.json (optionally into the docs)")
    report.add_argument("--results", required=True)
    report.add_argument("--figures", default="docs/figures")
    report.add_argument("--docs", help="Markdown file whose results block to replace (docs/experiments.md)")
    report.add_argument("--allow-smoke", action="store_true", help="let a smoke run fill --docs (tests)")
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    args = build_parser().parse_args(argv)
    commands: dict[str, Callable[[argparse.Namespace], Any]] = {
        "run": cmd_run,
        "params": cmd_params,
        "pack-assets": cmd_pack_assets,
        "report": cmd_report,
    }
    return commands[args.command](args)


if __name__ == "__main__":
    main()
