"""Vector quantiser of the VQ first stages (CompVis/taming ``VectorQuantizer2``), same names and semantics.

``embedding`` is the ``n_e x e_dim`` codebook. With ``remap`` (a ``.npy`` of the codebook indices actually
used), indices are reported in the compact "used" numbering; the array is kept as the ``used`` buffer, so a
checkpoint trained with it has a ``quantize.used`` key. Unlike the original, the "random" replacement of
unknown indices draws from an explicit ``torch.Generator``, never from the global RNG.
"""

from __future__ import annotations

from os import PathLike
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

UnknownIndex = Literal["random", "extra"] | int
QuantizerInfo = tuple[None, None, Tensor]


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient.

    Args:
        n_e: codebook size.
        e_dim: width of a codebook vector (the latent channels).
        beta: commitment weight. With ``legacy=True`` (the original default, and what every released
            checkpoint was trained with) it weights the *codebook* term instead:
            ``legacy``: ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``;
            otherwise: ``beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)``.
        remap: path of a ``.npy`` holding the used codebook indices (1-D ints in ``[0, n_e)``), or None.
        unknown_index: with ``remap``, what an index outside ``used`` becomes: ``"random"`` (a random used
            index, drawn from the ``generator`` given to ``forward``), ``"extra"`` (one extra index,
            ``len(used)``) or a fixed int in ``[0, len(used))``.
        sane_index_shape: return indices shaped ``(b, h, w)`` instead of flat.
        legacy: loss form, see ``beta``.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        remap: str | PathLike[str] | None = None,
        unknown_index: UnknownIndex = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        if n_e <= 0 or e_dim <= 0:
            raise ValueError(f"n_e={n_e} and e_dim={e_dim} must both be positive")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape

        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

        self.remap = None if remap is None else str(remap)
        self.unknown_index: Literal["random"] | int = "random"
        self.used: Tensor
        if self.remap is None:
            self.re_embed = n_e
            return
        used = self._load_used(self.remap, n_e)
        self.register_buffer("used", used)
        self.re_embed = int(used.shape[0])
        if unknown_index == "extra":
            self.unknown_index = self.re_embed
            self.re_embed += 1
        elif unknown_index == "random":
            self.unknown_index = "random"
        elif isinstance(unknown_index, int) and not isinstance(unknown_index, bool):
            if not 0 <= unknown_index < self.re_embed:
                raise ValueError(
                    f"unknown_index={unknown_index} is outside the {self.re_embed} used indices; "
                    f"valid: an int in [0, {self.re_embed}), 'random' or 'extra'"
                )
            self.unknown_index = unknown_index
        else:
            raise ValueError(f"unknown_index={unknown_index!r}; valid: 'random', 'extra' or an int")

    @staticmethod
    def _load_used(path: str, n_e: int) -> Tensor:
        try:
            arr = np.load(path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"remap={path!r}: cannot read it as a .npy of used codebook indices ({err})"
            ) from err
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"remap={path!r} holds a {arr.dtype} array of shape {arr.shape}; "
                "valid: a non-empty 1-D integer array of used codebook indices"
            )
        if arr.min() < 0 or arr.max() >= n_e:
            raise ValueError(f"remap={path!r} has indices outside the codebook; valid: [0, {n_e})")
        return torch.from_numpy(arr.astype(np.int64))

    # -- index remapping -------------------------------------------------------------------------------------

    def remap_to_used(self, inds: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Codebook indices -> positions in ``used`` (``inds`` is ``(b, ...)``). Unknown ones follow
        ``unknown_index``; ``"random"`` needs ``generator`` when any index is unknown."""
        if self.remap is None:
            raise ValueError("remap_to_used needs a quantizer built with remap=<path to .npy>")
        ishape = inds.shape
        if len(ishape) < 2:
            raise ValueError(f"indices must be batched, shape (b, ...); got {tuple(ishape)}")
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = inds[:, :, None] == used[None, None, :]
        new = match.long().argmax(-1)
        unknown = ~match.any(-1)
        if self.unknown_index == "random":
            n_unknown = int(unknown.sum())
            if n_unknown:
                if generator is None:
                    raise ValueError(
                        f"{n_unknown} indices are not in `used` and unknown_index='random': pass a "
                        "torch.Generator (generator=...) to draw their replacements"
                    )
                draws = torch.randint(
                    0, self.re_embed, (n_unknown,), generator=generator, device=generator.device
                )
                new[unknown] = draws.to(new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: Tensor) -> Tensor:
        """Positions in ``used`` -> codebook indices; the ``"extra"`` index maps to ``used[0]``."""
        if self.remap is None:
            raise ValueError("unmap_to_all needs a quantizer built with remap=<path to .npy>")
        ishape = inds.shape
        if len(ishape) < 2:
            raise ValueError(f"indices must be batched, shape (b, ...); got {tuple(ishape)}")
        inds = inds.reshape(ishape[0], -1).clone()
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:  # the extra token
            inds[inds >= used.shape[0]] = 0
        return used[inds].reshape(ishape)

    # -- quantisation ----------------------------------------------------------------------------------------

    def _nearest(self, z_flat: Tensor) -> Tensor:
        """Index of the nearest codebook vector (squared L2) for each row of ``z_flat``."""
        w = self.embedding.weight
        d = z_flat.pow(2).sum(1, keepdim=True) + w.pow(2).sum(1)[None, :] - 2.0 * (z_flat @ w.t())
        return d.argmin(dim=1)

    def _to_channels_last(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"expected z of shape (b, {self.e_dim}, h, w); got {tuple(z.shape)}")
        return z.permute(0, 2, 3, 1).contiguous()

    def quantize(self, z: Tensor) -> Tensor:
        """Just ``z_q`` (straight-through), no loss or indices: what the decoder of a VQ model needs."""
        zl = self._to_channels_last(z)
        z_q = self.embedding(self._nearest(zl.view(-1, self.e_dim))).view(zl.shape)
        z_q = zl + (z_q - zl).detach()
        return z_q.permute(0, 3, 1, 2).contiguous()

    def forward(
        self, z: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, QuantizerInfo]:
        """Quantise ``z`` ``(b, e_dim, h, w)``.

        Returns ``(z_q, loss, (perplexity, min_encodings, min_encoding_indices))`` like the original:
        ``z_q`` with a straight-through gradient, the scalar VQ loss, ``None, None`` and the indices (flat
        ``(b*h*w,)``; ``(b*h*w, 1)`` with ``remap``; ``(b, h, w)`` with ``sane_index_shape``).
        ``generator`` is used only for ``remap`` with ``unknown_index="random"``.
        """
        zl = self._to_channels_last(z)
        idx = self._nearest(zl.view(-1, self.e_dim))
        z_q = self.embedding(idx).view(zl.shape)

        if self.legacy:
            loss = torch.mean((z_q.detach() - zl) ** 2) + self.beta * torch.mean((z_q - zl.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - zl) ** 2) + torch.mean((z_q - zl.detach()) ** 2)

        z_q = zl + (z_q - zl).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()

        if self.remap is not None:
            idx = self.remap_to_used(idx.reshape(zl.shape[0], -1), generator=generator).reshape(-1, 1)
        if self.sane_index_shape:
            idx = idx.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, idx)

    def get_codebook_entry(self, indices: Tensor, shape: tuple[int, int, int, int] | None) -> Tensor:
        """Codebook vectors for ``indices`` (in the ``used`` numbering with ``remap``).

        ``shape`` is ``(batch, height, width, channel)``; with it the result is ``(b, c, h, w)``, without it
        ``(..., e_dim)`` (``shape`` is required with ``remap``, which needs the batch size).
        """
        if self.remap is not None:
            if shape is None:
                raise ValueError("get_codebook_entry with remap needs shape=(batch, height, width, channel)")
            indices = self.unmap_to_all(indices.reshape(shape[0], -1)).reshape(-1)
        z_q = self.embedding(indices)
        if shape is not None:
            if len(shape) != 4 or shape[3] != self.e_dim:
                raise ValueError(f"shape must be (batch, height, width, {self.e_dim}); got {tuple(shape)}")
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
