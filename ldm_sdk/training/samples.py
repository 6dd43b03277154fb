"""Image grids written during training: reconstructions of the autoencoder, DDIM samples of the LDM."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.diffusion.conditioning import Conditioning


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """``[N, C, H, W]`` images in [-1, 1] -> one uint8 ``[H', W', 3]`` grid (``nrow`` images per row)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got {tuple(images.shape)}")
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n, _, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (h + padding) + padding, nrow * (w + padding) + padding)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i, :3]
    return ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def save_grid(images: Tensor, path: str | os.PathLike[str], nrow: int | None = None) -> Path:
    """Write ``images`` (in [-1, 1]) as a PNG grid."""
    try:
        from PIL import Image
    except ImportError as exc:  # pillow comes with torchvision; say what to install if it is missing
        raise ImportError("writing sample grids needs Pillow: pip install pillow") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid(images, nrow).numpy()).save(path)
    return path


@torch.no_grad()
def ddim_samples(
    bundle: ModelBundle,
    cond: Conditioning,
    *,
    n: int,
    shape: tuple[int, int, int],
    steps: int = 50,
    guidance_scale: float = 1.0,
    uncond: Conditioning | None = None,
    seed: int = 0,
) -> Tensor:
    """``n`` decoded DDIM samples (eta 0) for ``cond`` (batch ``n`` or empty; ``shape``: one latent),
    with classifier-free guidance when ``guidance_scale != 1`` and ``uncond`` is given. The start noise
    comes from its own generator (``seed``): training's random state is untouched."""
    from ldm_sdk.samplers import ddim
    from ldm_sdk.samplers.base import ddim_timesteps

    if bundle.schedule is None:
        raise ValueError("sampling needs a diffusion model, not a first-stage-only bundle")
    device = next(bundle.first_stage_model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g).to(device)
    timesteps = ddim_timesteps(min(steps, bundle.schedule.num_timesteps), bundle.schedule.num_timesteps)
    use_cfg = guidance_scale != 1.0 and uncond is not None
    denoiser = bundle.denoiser(
        cond, guidance_scale=guidance_scale if use_cfg else 1.0, uncond=uncond if use_cfg else None
    )
    z = ddim.sample(denoiser, x, timesteps)
    return bundle.decode_first_stage(z.to(next(bundle.first_stage_model.parameters()).dtype))


__all__ = ["ddim_samples", "image_grid", "save_grid"]
