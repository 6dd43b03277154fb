"""What a denoising network is conditioned on, and how it is handed to the UNet.

:class:`Conditioning` carries the three ways a LDM UNet can be conditioned (Rombach et al. 2022, Sec. 3.3):
``crossattn`` (a token sequence ``(B, M, context_dim)`` for cross-attention), ``concat`` (maps
``(B, C', H, W)`` stacked onto the latent's channels) and ``y`` (class labels or a vector for the UNet's
label embedding, CompVis "adm"). :func:`apply_model` routes them exactly like CompVis ``DiffusionWrapper``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

# conditioning_key -> the parts of Conditioning it needs (CompVis DiffusionWrapper.forward)
NEEDED_PARTS: dict[str | None, tuple[str, ...]] = {
    None: (),
    "concat": ("concat",),
    "crossattn": ("crossattn",),
    "hybrid": ("concat", "crossattn"),
    "adm": ("y",),
    "hybrid-adm": ("concat", "crossattn", "y"),
    "crossattn-adm": ("crossattn", "y"),
}


@dataclass(frozen=True, eq=False)  # tensor fields: == would be elementwise
class Conditioning:
    """The conditioning of one batch; every present part has the batch on dimension 0."""

    crossattn: Tensor | None = None
    concat: Tensor | None = None
    y: Tensor | None = None

    def parts(self) -> dict[str, Tensor]:
        """The present parts by name, in the order crossattn, concat, y."""
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @property
    def batch_size(self) -> int | None:
        """The common batch size of the present parts (None when empty)."""
        sizes = {name: int(v.shape[0]) for name, v in self.parts().items()}
        if not sizes:
            return None
        if len(set(sizes.values())) != 1:
            raise ValueError(f"conditioning parts disagree on the batch size: {sizes}")
        return next(iter(sizes.values()))

    def with_concat(self, concat: Tensor | None) -> Conditioning:
        """The same conditioning with its ``concat`` part replaced (a hybrid model's mask / masked image)."""
        return replace(self, concat=concat)

    def expand(self, batch_size: int) -> Conditioning:
        """Repeat a batch-1 conditioning to ``batch_size`` (a matching batch is returned unchanged)."""
        current = self.batch_size
        if current is None or current == batch_size:
            return self
        if current != 1:
            raise ValueError(f"cannot expand a conditioning of batch {current} to {batch_size}; only batch 1")
        return Conditioning(**{k: v.expand(batch_size, *v.shape[1:]) for k, v in self.parts().items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move floating parts to ``dtype`` and every part to ``device`` (integer labels keep their dtype)."""
        moved = {
            k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
            for k, v in self.parts().items()
        }
        return Conditioning(**moved)

    @staticmethod
    def cat(a: Conditioning, b: Conditioning) -> Conditioning:
        """Concatenate two conditionings along the batch (``[a; b]``); both must carry the same parts."""
        if a.parts().keys() != b.parts().keys():
            raise ValueError(
                "cannot concatenate conditionings with different parts: "
                f"{sorted(a.parts())} vs {sorted(b.parts())} (give the unconditional one the same parts)"
            )
        out = {}
        for name, va in a.parts().items():
            vb = getattr(b, name)
            if va.shape[1:] != vb.shape[1:]:
                raise ValueError(
                    f"conditioning part {name!r} shapes differ beyond the batch: "
                    f"{tuple(va.shape)} vs {tuple(vb.shape)}"
                )
            out[name] = torch.cat([va, vb], dim=0)
        return Conditioning(**out)


def apply_model(
    unet: Callable[..., Tensor], x: Tensor, t: Tensor, cond: Conditioning, conditioning_key: str | None
) -> Tensor:
    """Call ``unet`` the way CompVis ``DiffusionWrapper.forward`` does for ``conditioning_key``.

    ``None``: ``unet(x, t)``; ``"concat"``: ``unet(cat([x, concat], 1), t)``; ``"crossattn"``:
    ``unet(x, t, context=crossattn)``; ``"hybrid"``: both; ``"adm"``: ``unet(x, t, y=y)`` (CompVis passes
    the label through its ``c_crossattn`` list; here it is the explicit ``y`` part); ``"hybrid-adm"`` and
    ``"crossattn-adm"`` (Stable Diffusion 2 unCLIP) add ``y`` to hybrid / crossattn.
    A part the key needs but ``cond`` lacks, or a part it carries that the key would silently drop, is an
    error.
    """
    if conditioning_key not in NEEDED_PARTS:
        raise ValueError(
            f"unknown conditioning_key {conditioning_key!r}; valid: {', '.join(map(repr, NEEDED_PARTS))}"
        )
    needed = NEEDED_PARTS[conditioning_key]
    present = tuple(cond.parts())
    missing = [p for p in needed if p not in present]
    extra = [p for p in present if p not in needed]
    if missing or extra:
        raise ValueError(
            f"conditioning_key {conditioning_key!r} needs exactly the parts {list(needed)}; "
            f"got {list(present)} (missing {missing}, unused {extra})"
        )
    if cond.concat is not None:
        if cond.concat.shape[0] != x.shape[0] or cond.concat.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"concat conditioning {tuple(cond.concat.shape)} must match x {tuple(x.shape)} "
                "in batch and spatial size"
            )
        x = torch.cat([x, cond.concat.to(x.dtype)], dim=1)
    kwargs: dict[str, Tensor] = {}
    if cond.crossattn is not None:
        kwargs["context"] = cond.crossattn
    if cond.y is not None:
        kwargs["y"] = cond.y
    return unet(x, t, **kwargs)


def bind_unet(
    unet: Callable[..., Tensor], conditioning_key: str | None
) -> Callable[[Tensor, Tensor, Conditioning], Tensor]:
    """A ``ModelFn`` (raw network output for ``x, t, cond``) that calls ``unet`` via :func:`apply_model`."""
    if conditioning_key not in NEEDED_PARTS:
        raise ValueError(
            f"unknown conditioning_key {conditioning_key!r}; valid: {', '.join(map(repr, NEEDED_PARTS))}"
        )

    def model_fn(x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return apply_model(unet, x, t, cond, conditioning_key)

    return model_fn


__all__ = ["NEEDED_PARTS", "Conditioning", "apply_model", "bind_unet"]
