"""Inpainting conditioning: image + mask -> the concat map of the LDM and Stable Diffusion inpainting models.

Both originals binarise the mask at 0.5 (``mask >= 0.5`` -> 1) and use **1 = the region to fill**. They
differ in everything else:

``variant="ldm"`` (LDM ``inpainting_big``: ``cond_stage_config: __is_first_stage__``, UNet in_channels
7 = 3 latent + 3 + 1; ``scripts/inpaint.py``)
    The script maps image, mask and masked image from [0, 1] to [-1, 1] *all three*, so the masked image
    is -1 (black) inside the hole and the mask channel is -1 / +1, not 0 / 1::

        c = first_stage.encode(masked_image)            # unscaled: cond_stage_model.encode
        cat([c, interpolate(2 * mask - 1, c.shape[-2:])], dim=1)   # nearest; [B, 3 + 1, h, w]

``variant="sd"`` (Stable Diffusion inpainting, ``LatentInpaintDiffusion``, concat_keys
``("mask", "masked_image")``, UNet in_channels 9 = 4 latent + 1 + 4)
    The image is in [-1, 1] and ``masked_image = image * (mask < 0.5)``: 0 (grey) inside the hole; the
    mask channel stays 0 / 1 and comes first::

        cat([interpolate(mask, z.shape[-2:]), scale_factor * first_stage_encoding(masked_image)], dim=1)

    ``get_first_stage_encoding`` samples the KL posterior; here the posterior mode is the default
    (deterministic), ``sample_posterior=True`` samples it with the generator passed to :meth:`forward`.

Classifier-free guidance: the concat map is never dropped. The SD inpainting scripts guide with
``uc_full = {"c_concat": [c_cat], "c_crossattn": [uc_cross]}``: the *same* ``c_cat`` on both halves, only
the text is unconditional. So :meth:`MaskConditioner.unconditional` raises (there is no "no mask"), and
:meth:`MaskConditioner.unconditional_concat` returns the concat map for the unconditional half; a task
pairs it with the text encoder's unconditional tokens, e.g.
``Conditioning(concat=cc, crossattn=uc_text)``, and can reuse the tensor it already computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract
from ldm_sdk.models.first_stage import DiagonalGaussianDistribution

InpaintVariant = Literal["ldm", "sd"]
VARIANTS: tuple[str, ...] = ("ldm", "sd")
#: slack on the [-1, 1] / [0, 1] range checks (float rounding, resampling overshoot)
RANGE_TOLERANCE = 1e-3
EncodeFn = Callable[[Tensor], "Tensor | DiagonalGaussianDistribution"]


@dataclass(frozen=True, eq=False)  # tensor fields: == would be elementwise
class MaskedImage:
    """One inpainting batch: ``image`` ``[B, 3, H, W]`` in [-1, 1]; ``mask`` ``[B, 1, H, W]`` in [0, 1],
    1 = repaint (binarised at 0.5, as both originals do)."""

    image: Tensor
    mask: Tensor


class MaskConditioner(ConditionEncoder):
    """:class:`MaskedImage` -> ``[B, latent_channels + 1, H / f, W / f]``, in the layout of ``variant``.

    ``first_stage``: the model's first stage (``AutoencoderKL`` / ``VQModel``: its ``encode`` is used, and
    its ``latent_channels`` / ``downsampling_factor``) or an encode callable (then pass ``latent_channels``
    and ``latent_factor``). It is referenced, not registered: this encoder has no parameters of its own
    (``state_dict()`` is empty, as the original's ``cond_stage_model`` *is* the first stage).
    """

    modality: ClassVar[str] = "mask"
    kind: ClassVar[ConditioningKind] = "concat"
    trainable: ClassVar[bool] = False
    compvis_targets: ClassVar[tuple[str, ...]] = ("__is_first_stage__",)

    def __init__(
        self,
        first_stage: nn.Module | EncodeFn,
        *,
        variant: InpaintVariant = "sd",
        scale_factor: float = 1.0,
        latent_channels: int | None = None,
        latent_factor: int | None = None,
        sample_posterior: bool = False,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown inpainting variant {variant!r}; valid: {', '.join(VARIANTS)}")
        if variant == "ldm" and scale_factor != 1.0:
            raise ValueError(
                f"the LDM inpainting model concatenates the unscaled first-stage encoding "
                f"(cond_stage_model.encode); scale_factor must be 1.0, got {scale_factor}"
            )
        encode = getattr(first_stage, "encode", None) if isinstance(first_stage, nn.Module) else first_stage
        if not callable(encode):
            raise TypeError("first_stage must be a module with an encode() method, or an encode callable")
        self._encode_fn: EncodeFn = encode  # a bound method / function: not registered as a submodule
        self.variant: InpaintVariant = variant
        self.scale_factor = float(scale_factor)
        self.sample_posterior = sample_posterior
        self.latent_channels = _resolve(first_stage, "latent_channels", latent_channels, "latent_channels")
        self.latent_factor = _resolve(first_stage, "downsampling_factor", latent_factor, "latent_factor")

    @classmethod
    def from_bundle(
        cls, bundle: Any, variant: InpaintVariant | None = None, *, encode: EncodeFn | None = None, **kw: Any
    ) -> MaskConditioner:
        """From a loaded :class:`~ldm_sdk.checkpoints.bundle.ModelBundle`. ``variant`` defaults from the
        conditioning key: ``hybrid`` (mask concat + text) is SD inpainting, ``concat`` is LDM. ``encode``
        stands in for the first stage's ``encode`` (the tasks pass its captured CUDA graph, which returns
        the posterior mode: not with ``sample_posterior``)."""
        if variant is None:
            key = bundle.conditioning_key
            if key not in ("hybrid", "concat"):
                raise ValueError(
                    f"conditioning_key {key!r} is not an inpainting model's (hybrid: SD, concat: LDM); "
                    "pass variant='sd' or 'ldm' explicitly"
                )
            variant = "sd" if key == "hybrid" else "ldm"
        scale = bundle.scale_factor if variant == "sd" else 1.0
        if encode is None:
            return cls(bundle.first_stage_model, variant=variant, scale_factor=scale, **kw)
        if kw.get("sample_posterior"):
            raise ValueError(
                "an encode callable gives the posterior mode; sample_posterior needs the first stage"
            )
        fs = {"latent_channels": bundle.latent_channels, "latent_factor": bundle.downsampling_factor}
        return cls(encode, variant=variant, scale_factor=scale, **fs, **kw)

    def contract(self) -> OutputContract:
        return OutputContract(
            kind="concat", channels=self.latent_channels + 1, latent_factor=self.latent_factor
        )

    # -- inputs ------------------------------------------------------------------------------------
    def binary_mask(self, inputs: MaskedImage) -> Tensor:
        """Validate ``inputs`` and return the mask binarised at 0.5 (1 = repaint), in the image dtype."""
        image, mask = inputs.image, inputs.mask
        if not image.is_floating_point() or image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(
                f"image must be a float tensor [B, 3, H, W]; got {image.dtype} {list(image.shape)}"
            )
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"mask must be [B, 1, H, W] (one channel); got {list(mask.shape)}")
        if mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"mask {list(mask.shape)} does not match image {list(image.shape)}: they need the same "
                "batch size, height and width"
            )
        h, w = image.shape[2:]
        if h % self.latent_factor or w % self.latent_factor:
            raise ValueError(
                f"image size {h}x{w} must be a multiple of the latent factor {self.latent_factor}"
            )
        lo, hi = float(image.min()), float(image.max())
        if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(f"image must be in [-1, 1]; its values span [{lo:.4g}, {hi:.4g}]")
        mlo, mhi = float(mask.min()), float(mask.max())
        if mlo < -RANGE_TOLERANCE or mhi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"mask must be in [0, 1] (1 = repaint); its values span [{mlo:.4g}, {mhi:.4g}]"
                + (" - a [-1, 1] mask? use (mask + 1) / 2" if mlo < 0 else "")
                + (" - a uint8 mask? use mask / 255" if mhi > 1 else "")
            )
        binary = (mask >= 0.5).to(image.dtype)
        covered = binary.flatten(1).mean(1)
        empty = [i for i, v in enumerate(covered.tolist()) if v == 0.0]
        full = [i for i, v in enumerate(covered.tolist()) if v == 1.0]
        if empty:
            raise ValueError(
                f"mask of batch item(s) {empty} selects no pixel (none >= 0.5): nothing to inpaint; "
                "1 marks the region to repaint"
            )
        if full:
            raise ValueError(
                f"mask of batch item(s) {full} covers the whole image: nothing is left to condition on; "
                "generate from scratch (txt2img) instead, or keep part of the image unmasked"
            )
        return binary

    def masked_image(self, inputs: MaskedImage) -> Tensor:
        """The image the first stage encodes: hole = -1 (``ldm``) or 0 (``sd``)."""
        return self._masked(inputs.image, self.binary_mask(inputs))

    def _masked(self, image: Tensor, binary: Tensor) -> Tensor:
        if self.variant == "ldm":  # ((1 - m) * (x + 1) / 2) * 2 - 1: -1 in the hole
            return torch.where(binary.bool(), torch.full_like(image, -1.0), image)
        return image * (1.0 - binary)  # image * (mask < 0.5): 0 in the hole

    # -- encoding ----------------------------------------------------------------------------------
    def _encode(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        with torch.no_grad():
            out = self._encode_fn(x)
        if isinstance(out, DiagonalGaussianDistribution):
            out = out.sample(generator=generator) if self.sample_posterior else out.mode()
        if not isinstance(out, Tensor):
            raise TypeError(f"the first-stage encode returned {type(out).__name__}, not a tensor/posterior")
        want = (
            x.shape[0],
            self.latent_channels,
            x.shape[2] // self.latent_factor,
            x.shape[3] // self.latent_factor,
        )
        if tuple(out.shape) != want:
            raise ValueError(f"the first-stage encode returned {list(out.shape)}, expected {list(want)}")
        return out

    def forward(self, inputs: MaskedImage, generator: torch.Generator | None = None) -> Tensor:
        """The concat map, in the channel order of ``variant`` (see the module docstring)."""
        binary = self.binary_mask(inputs)
        c = self._encode(self._masked(inputs.image, binary), generator)
        if self.variant == "ldm":
            return torch.cat([c, F.interpolate(2.0 * binary - 1.0, size=c.shape[-2:])], dim=1)
        z = c * self.scale_factor
        return torch.cat([F.interpolate(binary, size=z.shape[-2:]), z], dim=1)

    def unconditional(self, batch_size: int) -> Tensor:
        raise ValueError(
            "the inpainting mask and masked image are concatenated to the latent and are never dropped: "
            "there is no unconditional concat map. For classifier-free guidance use the same map on both "
            "halves (unconditional_concat(inputs), as the SD inpainting scripts do) and make only the text "
            "unconditional"
        )

    def unconditional_concat(self, inputs: MaskedImage, generator: torch.Generator | None = None) -> Tensor:
        """The concat map for the unconditional half of guidance: identical to ``forward(inputs)``."""
        return self.forward(inputs, generator)


def _resolve(first_stage: object, attr: str, given: int | None, arg: str) -> int:
    found = getattr(first_stage, attr, None) if isinstance(first_stage, nn.Module) else None
    if given is not None and found is not None and int(found) != given:
        raise ValueError(f"{arg}={given} contradicts the first stage's {attr}={found}")
    value = given if given is not None else found
    if value is None:
        raise ValueError(f"pass {arg}= (the first stage given has no {attr} attribute)")
    return int(value)


__all__ = ["VARIANTS", "InpaintVariant", "MaskConditioner", "MaskedImage"]
