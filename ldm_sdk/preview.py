"""Cheap latent -> RGB previews for progress events: one linear projection per pixel, no decoder.

For the 4-channel KL-f8 latents of Stable Diffusion 1.x/2.x (and the CompVis ``kl-f8`` first stage they share)
the widely used approximate 4x3 matrix maps a *scaled* latent (what the sampler sees, ``z * scale_factor``)
to RGB in about [-1, 1] (keturn, "Decoding latents to RGB without upscaling", Hugging Face forum 2022;
the same numbers as AUTOMATIC1111's "cheap approximation" and ComfyUI's SD15 ``latent_rgb_factors``). Other
channel counts get a generic projection (channel groups averaged into R, G, B, each stretched to [0, 1] per
image): it shows structure, not colour.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Rows: latent channels L1..L4; columns: R, G, B. Applies to scaled SD / kl-f8 latents.
SD_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)

#: Per-family factors (channels x 3), by ``ldm_sdk.checkpoints.families`` name. The Stable Diffusion families
#: share the SD VAE; the LDM kl-f8 families use the CompVis kl-f8 autoencoder the SD VAE started from. A
#: 4-channel latent of an unlisted family also gets the SD factors; the VQ-f4 families (3 channels) get the
#: generic projection.
LATENT_RGB_FACTORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    name: SD_LATENT_RGB_FACTORS
    for name in ("sd1", "sd1-inpaint", "sd2", "sd2-v", "sd2-inpaint", "ldm-txt2img-kl8", "ldm-lsun-churches")
}


def latent_to_rgb(
    latent: Tensor,
    *,
    family: str | None = None,
    factors: Tensor | tuple[tuple[float, ...], ...] | None = None,
) -> Tensor:
    """Approximate RGB in [0, 1], float32 on the latent's device: ``[B, C, h, w] -> [B, 3, h, w]``.

    ``factors`` (``C x 3``) overrides the choice; else ``family``'s entry in :data:`LATENT_RGB_FACTORS`, else
    the SD factors for ``C == 4``, else the generic projection.
    """
    if latent.ndim != 4:
        raise ValueError(f"latent must be [B, C, h, w], got shape {tuple(latent.shape)}")
    x = latent.detach().float()
    channels = x.shape[1]
    table = factors if factors is not None else LATENT_RGB_FACTORS.get(family or "")
    if table is None and channels == 4:
        table = SD_LATENT_RGB_FACTORS
    if table is None:
        return _generic_rgb(x)
    matrix = torch.as_tensor(table, dtype=torch.float32, device=x.device)
    if matrix.shape != (channels, 3):
        raise ValueError(
            f"latent-to-RGB factors have shape {tuple(matrix.shape)}; a {channels}-channel latent needs "
            f"({channels}, 3)"
        )
    rgb = torch.einsum("bchw,cr->brhw", x, matrix)
    return (rgb * 0.5 + 0.5).clamp(0.0, 1.0)


def preview_image(latent: Tensor, *, family: str | None = None, max_size: int = 128) -> Tensor:
    """The first batch item as a uint8 ``[H, W, 3]`` CPU tensor, nearest-downscaled to <= ``max_size``."""
    rgb = latent_to_rgb(latent[:1], family=family)
    height, width = rgb.shape[-2:]
    step = max(1, -(-max(height, width) // max_size))
    rgb = rgb[0, :, ::step, ::step]
    return (rgb * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()


def _generic_rgb(x: Tensor) -> Tensor:
    """Average channel groups into three planes and stretch each plane to [0, 1] per image."""
    b, c, h, w = x.shape
    if c == 1:
        planes = x.expand(b, 3, h, w)
    else:
        groups = torch.arange(c, device=x.device) * 3 // c  # channel i -> plane i*3//c
        planes = torch.stack([x[:, groups == g].mean(dim=1) if c >= 3 else x[:, g % c] for g in range(3)], 1)
    low = planes.amin(dim=(2, 3), keepdim=True)
    high = planes.amax(dim=(2, 3), keepdim=True)
    return (planes - low) / (high - low).clamp_min(1e-8)
