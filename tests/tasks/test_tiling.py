"""Tiling: grids and weights that partition unity, tiled first-stage decode / encode against untiled, the
tiled denoiser against untiled on a translation-equivariant toy network, and memory planning.

Tolerances (measured on these tiny random-weight models, CPU fp32; bounds leave ~1.4x headroom):

- tiled decode, 24x24 latent (iid normal) in 12x12 windows, overlap 4, context 4: relative L2 error to
  untiled 0.087 (VQ-f4) and 0.029 (KL-f8); without context 0.215 / 0.061. The difference is GroupNorm
  statistics of the window vs the whole map plus zero padding at inner window edges (the context removes
  most of the latter).
- tiled encode, 96x96 / 192x192 image in 48-pixel windows, overlap 16, context 32: 0.037 (VQ-f4) / 0.13
  (KL-f8).
- tiled denoiser on a 3-layer 3x3 conv toy (receptive radius 3), 40x56 latent, 16x16 windows, overlap 8:
  relative L2 error of eps 0.035 without context, < 1e-6 with context 4 (>= the radius: every kept pixel
  sees exactly what it sees untiled); a 10-step DDIM run through it stays within 0.01 of untiled.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.diffusion.conditioning import Conditioning, bind_unet
from ldm_sdk.diffusion.denoiser import ModelDenoiser, Prediction
from ldm_sdk.diffusion.schedule import DiffusionSchedule
from ldm_sdk.models.configs import DiffusionConfig, FirstStageConfig, ModelConfig, UNetConfig
from ldm_sdk.samplers import ddim
from ldm_sdk.samplers.base import ddim_timesteps
from ldm_sdk.tiling import (
    ActivationModel,
    TiledDenoiser,
    TileGrid,
    Window,
    axis_starts,
    axis_weights,
    crop_conditioning,
    plan_tiles,
    tiled_decode,
    tiled_encode,
)
from ldm_sdk.tiling.plan import SCORE_BYTES
from tests.tiny_configs import TINY_KL_F8, TINY_VQ_F4, random_bundle


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- grids and weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("length", "tile", "overlap", "align"),
    [(64, 16, 4, 1), (100, 32, 8, 1), (33, 16, 8, 1), (17, 16, 15, 1), (96, 32, 8, 8), (72, 24, 8, 4)],
)
def test_axis_windows_cover_with_overlap_and_weights_partition_unity(
    length: int, tile: int, overlap: int, align: int
) -> None:
    starts = axis_starts(length, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] + tile == length
    for a, b in itertools.pairwise(starts):
        assert tile - (b - a) >= overlap  # every neighbour overlap is at least the requested one
    if length % align == 0:
        assert all(s % align == 0 for s in starts)
    for ramp in ("cosine", "linear"):
        weights = axis_weights(starts, tile, length, ramp)  # type: ignore[arg-type]
        total = torch.zeros(length, dtype=torch.float64)
        for s, w in zip(starts, weights, strict=True):
            assert (w > 0).all()
            total[s : s + tile] += w
        torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=1e-12)


def test_grid_weights_partition_unity_in_2d_and_a_constant_field_stays_constant() -> None:
    grid = TileGrid.cover(45, 70, (16, 24), 6)
    torch.testing.assert_close(grid.coverage(), torch.ones(45, 70, dtype=torch.float64), rtol=0, atol=1e-12)
    acc = torch.zeros(2, 3, 45, 70)
    for window in grid:
        acc[..., window.slices()[0], window.slices()[1]] += grid.weight(window, dtype=acc.dtype) * 0.37
    torch.testing.assert_close(acc, torch.full_like(acc, 0.37), rtol=0, atol=1e-6)


def test_a_map_that_fits_is_one_window_of_its_own_size() -> None:
    grid = TileGrid.cover(10, 12, 16, 4)
    assert grid.windows == [Window(0, 0, 10, 12)]
    assert torch.equal(grid.weight(grid.windows[0], dtype=torch.float32), torch.ones(10, 12))


@pytest.mark.parametrize(
    ("tile", "overlap", "align", "message"),
    [(16, 16, 1, "overlap 16 must lie in"), (12, 2, 8, "multiple of 8"), (0, 0, 1, "positive multiple")],
)
def test_bad_tile_settings_are_explained(tile: int, overlap: int, align: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TileGrid.cover(64, 64, tile, overlap, align=align)


def test_unknown_ramp_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="valid: cosine, linear"):
        TileGrid.cover(64, 64, 16, 4, ramp="gaussian")  # type: ignore[arg-type]


# -- tiled first stage ---------------------------------------------------------------------------------------
def _first_stage(cfg: FirstStageConfig) -> ModelBundle:
    return random_bundle(ModelConfig(family="tiny-first-stage", first_stage=cfg), seed=0).eval()


def _latent(channels: int, size: int) -> Tensor:
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))


def _border_columns(grid: TileGrid, factor: int) -> list[int]:
    """Pixel-gradient indices (between column x and x + 1) at every inner window edge."""
    edges = {e for s in grid.col_starts for e in (s, s + grid.tile_w) if 0 < e < grid.width}
    return sorted(e * factor - 1 for e in edges)


def _column_steps(img: Tensor) -> Tensor:
    return (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))


@pytest.mark.parametrize(
    ("cfg", "bound", "bound_no_context"), [(TINY_VQ_F4, 0.12, 0.3), (TINY_KL_F8, 0.05, 0.09)]
)
def test_tiled_decode_is_close_to_untiled(
    cfg: FirstStageConfig, bound: float, bound_no_context: float
) -> None:
    bundle = _first_stage(cfg)
    f = bundle.downsampling_factor
    z = _latent(cfg.embed_dim, 24)
    with torch.no_grad():
        full = bundle.decode_first_stage(z)
        tiled = tiled_decode(bundle.decode_first_stage, z, factor=f, tile=12, overlap=4, context=4)
        bare = tiled_decode(bundle.decode_first_stage, z, factor=f, tile=12, overlap=4, context=0)
    assert tiled.shape == full.shape
    assert _rel(tiled, full) < bound
    assert _rel(bare, full) < bound_no_context
    assert _rel(tiled, full) < _rel(bare, full)  # the context is what brings it close


@pytest.mark.parametrize("cfg", [TINY_VQ_F4, TINY_KL_F8])
def test_tiled_decode_has_no_seams_where_naive_tiling_has(cfg: FirstStageConfig) -> None:
    bundle = _first_stage(cfg)
    f = bundle.downsampling_factor
    z = F.interpolate(_latent(cfg.embed_dim, 6), size=(24, 24), mode="bilinear")  # smooth: seams would show
    with torch.no_grad():
        full = bundle.decode_first_stage(z)
        blended = tiled_decode(bundle.decode_first_stage, z, factor=f, tile=12, overlap=4, context=4)
        naive = tiled_decode(bundle.decode_first_stage, z, factor=f, tile=12, overlap=0, context=0)

    def border_and_inside(img: Tensor, grid: TileGrid) -> tuple[float, float]:
        steps = _column_steps(img)
        border = torch.zeros_like(steps, dtype=torch.bool)
        border[_border_columns(grid, f)] = True
        return float(steps[border].max()), float(steps[~border].max())

    border, inside = border_and_inside(blended, TileGrid.cover(24, 24, 12, 4))
    assert border <= inside
    untiled_border = float(_column_steps(full)[_border_columns(TileGrid.cover(24, 24, 12, 4), f)].max())
    assert border <= 1.5 * untiled_border
    # the check can fail: hard-edged tiles (no overlap, no context) make a step larger than any inside
    naive_border, naive_inside = border_and_inside(naive, TileGrid.cover(24, 24, 12, 0))
    assert naive_border > naive_inside


@pytest.mark.parametrize("cfg", [TINY_VQ_F4, TINY_KL_F8])
def test_one_window_decode_and_encode_are_exact(cfg: FirstStageConfig) -> None:
    bundle = _first_stage(cfg)
    f = bundle.downsampling_factor
    z = _latent(cfg.embed_dim, 8)
    with torch.no_grad():
        full = bundle.decode_first_stage(z)
        assert torch.equal(tiled_decode(bundle.decode_first_stage, z, factor=f, tile=16), full)
        image = full.clamp(-1, 1)
        enc = bundle.encode_first_stage(image)
        assert torch.equal(tiled_encode(bundle.encode_first_stage, image, factor=f, tile=64, overlap=16), enc)


@pytest.mark.parametrize(("cfg", "size", "bound"), [(TINY_VQ_F4, 96, 0.06), (TINY_KL_F8, 192, 0.2)])
def test_tiled_encode_is_close_to_untiled(cfg: FirstStageConfig, size: int, bound: float) -> None:
    bundle = _first_stage(cfg)
    f = bundle.downsampling_factor
    low = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    image = F.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1) * 2 - 1
    with torch.no_grad():
        full = bundle.encode_first_stage(image)
        tiled = tiled_encode(bundle.encode_first_stage, image, factor=f, tile=48, overlap=16, context=32)
    assert tiled.shape == full.shape
    assert _rel(tiled, full) < bound


def test_tiled_encode_refuses_sizes_off_the_factor() -> None:
    bundle = _first_stage(TINY_VQ_F4)
    with pytest.raises(ValueError, match="not divisible by the first stage's factor 4"):
        tiled_encode(bundle.encode_first_stage, torch.zeros(1, 3, 30, 32), factor=4)
    with pytest.raises(ValueError, match="context 6 must be a non-negative multiple"):
        tiled_encode(bundle.encode_first_stage, torch.zeros(1, 3, 32, 32), factor=4, tile=16, context=6)


def test_tiled_decode_checks_the_factor_against_the_output() -> None:
    bundle = _first_stage(TINY_KL_F8)
    with pytest.raises(ValueError, match="is factor right"):
        tiled_decode(bundle.decode_first_stage, _latent(4, 16), factor=4, tile=8, overlap=2)


# -- tiled denoiser ------------------------------------------------------------------------------------------
SCHEDULE = DiffusionSchedule.from_config(
    DiffusionConfig(linear_start=0.0015, linear_end=0.0195, image_size=8, channels=3)
)


class ToyConcatNet(nn.Module):
    """Translation-equivariant: three 3x3 convolutions (receptive radius 3) over ``cat([x, concat])``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(
            nn.Conv2d(6, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, 3, 3, padding=1),
        )  # fmt: skip

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x) * (1 + t[:, None, None, None] / 1000)


def _toy(h: int = 40, w: int = 56) -> tuple[Conditioning, ModelDenoiser, Tensor]:
    g = torch.Generator().manual_seed(4)
    cond = Conditioning(concat=torch.randn(1, 3, h, w, generator=g))
    denoiser = ModelDenoiser(bind_unet(ToyConcatNet().eval(), "concat"), SCHEDULE, "eps", cond)
    return cond, denoiser, torch.randn(1, 3, h, w, generator=g)


def _tiled(cond: Conditioning, full: ModelDenoiser, hw: tuple[int, int], **kw: int) -> TiledDenoiser:
    def build(c: Conditioning, u: Conditioning | None) -> ModelDenoiser:
        return ModelDenoiser(full.model_fn, SCHEDULE, "eps", c)

    return TiledDenoiser.from_conditioning(build, cond, schedule=SCHEDULE, latent_hw=hw, **kw)


def test_one_window_tiled_denoiser_is_exactly_untiled() -> None:
    cond, full, x = _toy(16, 24)
    tiled = _tiled(cond, full, (16, 24), tile=32, overlap=8)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a, b = full(x, t), tiled(x, t)
    assert torch.equal(a.eps, b.eps) and torch.equal(a.x0, b.x0)


def test_tiled_denoiser_is_close_to_untiled_and_exact_with_enough_context() -> None:
    cond, full, x = _toy()
    t = torch.tensor([500.0])
    with torch.no_grad():
        ref = full(x, t)
        plain = _tiled(cond, full, (40, 56), tile=16, overlap=8)(x, t)
        with_context = _tiled(cond, full, (40, 56), tile=16, overlap=8, context=4)(x, t)
    assert _rel(plain.eps, ref.eps) < 0.05
    assert _rel(with_context.eps, ref.eps) < 1e-5
    assert _rel(with_context.x0, ref.x0) < 1e-5
    # eps and x0 stay consistent: x0 = (x - sqrt(1 - ab) eps) / sqrt(ab) holds for the blend
    ab = float(SCHEDULE.alpha_bar(torch.tensor([500.0], dtype=torch.float64)))
    torch.testing.assert_close(plain.x0, (x - (1 - ab) ** 0.5 * plain.eps) / ab**0.5, rtol=1e-4, atol=1e-5)


def test_tiled_denoiser_needs_the_concat_cropped_per_window() -> None:
    cond, full, x = _toy()
    t = torch.tensor([500.0])

    # the same windows, every one fed the top-left corner of the concat map: far from untiled
    def corner(w: Window) -> ModelDenoiser:
        return ModelDenoiser(
            full.model_fn, SCHEDULE, "eps", crop_conditioning(cond, Window(0, 0, w.height, w.width), (40, 56))
        )

    tiled = TiledDenoiser(corner, SCHEDULE, tile=16, overlap=8, context=4)
    with torch.no_grad():
        assert _rel(tiled(x, t).eps, full(x, t).eps) > 0.3


def test_a_sampler_runs_unchanged_on_the_tiled_denoiser() -> None:
    cond, full, x = _toy()
    ts = ddim_timesteps(10)
    with torch.no_grad():
        ref = ddim.sample(full, x, ts)
        out = ddim.sample(_tiled(cond, full, (40, 56), tile=16, overlap=8), x, ts)
    assert _rel(out, ref) < 0.02


class _Constant:
    schedule = SCHEDULE

    def __call__(self, x: Tensor, t: Tensor) -> Prediction:
        return Prediction(eps=torch.full_like(x, 0.25), x0=torch.full_like(x, -0.5))


def test_blended_constant_predictions_stay_constant() -> None:
    tiled = TiledDenoiser(lambda w: _Constant(), SCHEDULE, tile=(12, 20), overlap=5)
    pred = tiled(torch.zeros(2, 3, 37, 61), torch.tensor([10.0, 10.0]))
    torch.testing.assert_close(pred.eps, torch.full_like(pred.eps, 0.25), rtol=0, atol=1e-6)
    torch.testing.assert_close(pred.x0, torch.full_like(pred.x0, -0.5), rtol=0, atol=1e-6)


def test_crop_conditioning_checks_the_concat_size_and_keeps_global_parts() -> None:
    cond = Conditioning(crossattn=torch.randn(1, 4, 8), concat=torch.randn(1, 2, 10, 12))
    cropped = crop_conditioning(cond, Window(2, 3, 4, 5), (10, 12))
    assert cropped.crossattn is cond.crossattn
    assert cropped.concat is not None and torch.equal(cropped.concat, cond.concat[..., 2:6, 3:8])  # type: ignore[index]
    with pytest.raises(ValueError, match="must have the latent's size"):
        crop_conditioning(cond, Window(0, 0, 4, 4), (20, 24))


def test_tiled_denoiser_refuses_bad_settings_up_front() -> None:
    with pytest.raises(ValueError, match="context 3 must be a non-negative multiple of align 2"):
        TiledDenoiser(lambda w: _Constant(), SCHEDULE, tile=16, overlap=4, context=3, align=2)
    with pytest.raises(ValueError, match="multiple of 4"):
        TiledDenoiser(lambda w: _Constant(), SCHEDULE, tile=18, overlap=4, align=4)


# -- planning ------------------------------------------------------------------------------------------------
def _unet_config(**kw: object) -> UNetConfig:
    base: dict[str, object] = {
        "in_channels": 6, "out_channels": 3, "model_channels": 160, "num_res_blocks": 2,
        "attention_resolutions": (16, 8), "channel_mult": (1, 2, 2, 4), "num_head_channels": 32,
    }  # fmt: skip
    base.update(kw)
    return UNetConfig.model_validate(base)


def test_activation_model_from_configs() -> None:
    sr = ActivationModel.for_unet(_unet_config())  # AttentionBlock at 8x: 640 / 32 = 20 heads, 4096x fewer
    assert sr.channels == 160 and sr.scores == pytest.approx(20 / 16**3)
    sd = ActivationModel.for_unet(_unet_config(use_spatial_transformer=True, context_dim=32))
    assert sd.scores == 0  # memory-efficient attention: no materialised scores
    dec = ActivationModel.for_decoder(TINY_VQ_F4.ddconfig)
    assert (dec.channels, dec.pixels_per_latent, dec.scores) == (32, 16, 1.0)
    # bytes = fixed + B (bpe * constant * channels * area + SCORE_BYTES * scores * area^2)
    expected = sr.fixed_bytes + 2 * (
        2 * sr.constant * 160 * 64 * 64 + SCORE_BYTES * sr.scores * (64 * 64) ** 2
    )
    assert sr.bytes(2, 64, 64, 2) == math.ceil(expected)


def test_plan_tiles_keeps_a_latent_that_fits_whole() -> None:
    model = ActivationModel.for_unet(_unet_config())
    need = model.bytes(1, 64, 64, 4)
    plan = plan_tiles((1, 4, 64, 64), 4, need, model=model, align=8)
    assert not plan.tiled and plan.windows == 1 and plan.estimated_bytes == need
    assert not plan_tiles((1, 4, 64, 64), 4, None, model=model).tiled


def test_plan_tiles_fits_the_budget_with_aligned_windows() -> None:
    model = ActivationModel.for_unet(_unet_config())
    budget = model.bytes(2, 64, 64, 2)  # room for a 64x64 latent window at batch 2, fp16
    plan = plan_tiles((2, 3, 256, 192), 2, budget, model=model, align=8, overlap=16)
    assert plan.tile is not None
    th, tw = plan.tile
    assert th % 8 == 0 and tw % 8 == 0 and th * tw <= 64 * 64
    assert plan.estimated_bytes <= budget
    assert th * tw >= 56 * 56  # not needlessly small
    assert plan.overlap == 16
    assert plan.windows == len(TileGrid.cover(256, 192, (th, tw), plan.overlap, align=8)) > 1


def test_plan_tiles_with_attention_scores_and_an_impossible_budget() -> None:
    model = ActivationModel(10.0, 32, 1, scores=2.0)
    budget = model.bytes(1, 32, 32, 4)
    plan = plan_tiles((1, 4, 128, 128), 4, budget, model=model, align=4)
    assert plan.tile is not None and plan.estimated_bytes <= budget and plan.tile[0] * plan.tile[1] >= 28 * 28
    with pytest.raises(ValueError, match=r"does not fit even a 8x8 latent window .* MiB estimated"):
        plan_tiles((1, 4, 128, 128), 4, 1000, model=model, align=4)
    fixed = ActivationModel(10.0, 32, fixed_bytes=2**20)
    with pytest.raises(ValueError, match="does not fit even"):
        plan_tiles((1, 4, 128, 128), 4, 2**20, model=fixed)  # the size-independent part alone fills it
