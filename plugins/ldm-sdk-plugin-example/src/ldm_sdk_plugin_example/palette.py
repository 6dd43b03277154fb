"""A color-palette condition encoder: the dominant colors of a reference image -> cross-attention tokens.

"Make it in these colors": an artist picks a reference layer, its palette steers generation. The palette is
found by a fixed color histogram (no k-means, so it is deterministic and batch-independent): each pixel
falls into one of ``levels**3`` RGB bins; the ``n_colors`` fullest bins (ties: lower bin index first) give
one color each, the mean color of their pixels, with the share of the image they cover. A small trainable
MLP turns ``(r, g, b, share)`` into a token of ``context_dim`` channels, plus a learned embedding of the
color's rank (fullest first). Slots left empty (an image with fewer distinct colors) and the
unconditional palette use a learned "no color" token, so classifier-free guidance and condition dropout
have a "no palette" to drop to.

Bins are decided in float32 whatever the module's dtype, so the palette does not depend on precision.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract

__all__ = ["PaletteEncoder"]

#: slack on the [-1, 1] range check
RANGE_TOLERANCE = 1e-3


class PaletteEncoder(ConditionEncoder):
    """Reference image ``[B, 3, H, W]`` in [-1, 1] -> ``[B, n_colors, context_dim]`` palette tokens.

    Args:
        context_dim: token width, the UNet's ``context_dim`` (768 for SD 1.x).
        n_colors: tokens (palette entries), fullest color first.
        levels: histogram bins per channel (``levels**3`` bins; 4 -> 64 colors to choose from).
        hidden: width of the MLP.
    Parameters: ``mlp.0`` / ``mlp.2`` (the MLP), ``rank`` ``[n_colors, context_dim]``, ``empty``
    ``[context_dim]``.
    """

    modality: ClassVar[str] = "color"
    kind: ClassVar[ConditioningKind] = "crossattn"
    trainable: ClassVar[bool] = True

    def __init__(self, context_dim: int = 768, n_colors: int = 5, levels: int = 4, hidden: int = 128) -> None:
        super().__init__()
        for name, value, low in (
            ("context_dim", context_dim, 1),
            ("n_colors", n_colors, 1),
            ("hidden", hidden, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(levels, int) or not 2 <= levels <= 32:
            raise ValueError(f"levels must be an int in [2, 32] (bins per channel), got {levels!r}")
        if n_colors > levels**3:
            raise ValueError(f"n_colors {n_colors} exceeds the {levels**3} histogram bins of levels={levels}")
        self.context_dim = context_dim
        self.n_colors = n_colors
        self.levels = levels
        self.mlp = nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Linear(hidden, context_dim))
        self.rank = nn.Parameter(torch.randn(n_colors, context_dim) * 0.02)
        self.empty = nn.Parameter(torch.randn(context_dim) * 0.02)

    def contract(self) -> OutputContract:
        return OutputContract(kind="crossattn", channels=self.context_dim, tokens=self.n_colors)

    # -- the palette ---------------------------------------------------------------------------------------
    def palette(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """``(colors [B, n_colors, 3] in [0, 1], shares [B, n_colors])`` of ``image`` ``[B, 3, H, W]`` in
        [-1, 1], fullest bin first; an empty slot has share 0 and color 0."""
        if not isinstance(image, Tensor) or not image.is_floating_point():
            raise TypeError(
                "the reference image must be a float tensor [B, 3, H, W] in [-1, 1] "
                "(from uint8 pixels: x / 127.5 - 1)"
            )
        if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] * image.shape[3] == 0:
            raise ValueError(
                f"the reference image must be [B, 3, H, W] with H, W > 0; got {list(image.shape)}"
            )
        lo, hi = float(image.min()), float(image.max())
        if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"the reference image must be in [-1, 1]; its values span [{lo:.4g}, {hi:.4g}] "
                "(from [0, 1]: 2 x - 1)"
            )
        dtype, device = self.rank.dtype, self.rank.device
        levels, bins = self.levels, self.levels**3
        b = image.shape[0]
        rgb = ((image.to(device=device, dtype=dtype).clamp(-1, 1) + 1) / 2).flatten(2).transpose(1, 2)
        q = ((image.to(device=device, dtype=torch.float32).clamp(-1, 1) + 1) * (levels / 2)).floor()
        q = q.long().clamp_(0, levels - 1).flatten(2)  # [B, 3, N]
        index = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]  # [B, N]
        counts = torch.zeros(b, bins, dtype=torch.long, device=device).scatter_add_(
            1, index, torch.ones_like(index)
        )
        sums = torch.zeros(b, bins, 3, dtype=dtype, device=device).scatter_add_(
            1, index[..., None].expand(-1, -1, 3), rgb
        )
        # unique keys: more pixels first, then the lower bin index (topk's order of ties is unspecified)
        key = counts * bins + (bins - 1 - torch.arange(bins, device=device))
        top = key.topk(self.n_colors, dim=1).indices  # [B, n_colors]
        count = counts.gather(1, top)
        colors = sums.gather(1, top[..., None].expand(-1, -1, 3)) / count.clamp(min=1)[..., None].to(dtype)
        shares = count.to(dtype) / index.shape[1]
        return colors, shares

    # -- encoding ------------------------------------------------------------------------------------------
    def encode_palette(self, colors: Tensor, shares: Tensor) -> Tensor:
        """Tokens ``[B, n_colors, context_dim]`` of a palette (e.g. one a user picked by hand): ``colors``
        ``[B, n_colors, 3]`` in [0, 1], ``shares`` ``[B, n_colors]`` (0 = an empty slot)."""
        if colors.shape[1:] != (self.n_colors, 3) or shares.shape != colors.shape[:2]:
            raise ValueError(
                f"a palette is colors [B, {self.n_colors}, 3] and shares [B, {self.n_colors}]; got "
                f"{list(colors.shape)} and {list(shares.shape)}"
            )
        dtype = self.rank.dtype
        colors, shares = colors.to(self.rank.device, dtype), shares.to(self.rank.device, dtype)
        features = torch.cat([colors * 2 - 1, shares[..., None]], dim=-1)
        tokens = self.mlp(features)
        filled = (shares > 0)[..., None]
        return torch.where(filled, tokens, self.empty.expand_as(tokens)) + self.rank

    def forward(self, image: Tensor) -> Tensor:
        """Reference images ``[B, 3, H, W]`` in [-1, 1] -> palette tokens ``[B, n_colors, context_dim]``."""
        return self.encode_palette(*self.palette(image))

    def unconditional(self, batch_size: int) -> Tensor:
        """No palette: every slot the learned empty token (plus its rank), ``[batch_size, n_colors, dim]``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return (self.empty + self.rank).expand(batch_size, -1, -1)
