"""Low-resolution image -> concat conditioning, as LDM's super-resolution model (``bsr_sr``) uses it.

``bsr_sr`` (``cond_stage_key: LR_image``, ``cond_stage_config: torch.nn.Identity``, ``concat_mode: true``)
concatenates the low-res RGB image itself, in ``[-1, 1]`` and at latent resolution, to the latent: with the
VQ-f4 first stage a 256x256 output is denoised as a 3-channel 64x64 latent next to the 64x64 low-res image
(UNet ``in_channels: 6``). There are no weights. Training pairs come from
:mod:`ldm_sdk.encoders.degradations` (``bsrgan_light``-style degradations of the high-res image).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract

#: slack on the [-1, 1] range check (resampling overshoot, float rounding)
RANGE_TOLERANCE = 1e-3


class LowResImage(ConditionEncoder):
    """Low-res image ``[B, channels, h, w]`` in ``[-1, 1]`` -> the same tensor, checked (CompVis Identity).

    ``latent_factor`` is the first stage's downsampling factor (4 for ``bsr_sr``): the low-res image is
    ``1 / latent_factor`` of the output image, i.e. exactly the latent size. The image is not resized here;
    a task that has a low-res image of another size resizes it first (and says so).
    """

    modality: ClassVar[str] = "lowres"
    kind: ClassVar[ConditioningKind] = "concat"
    trainable: ClassVar[bool] = False
    compvis_targets: ClassVar[tuple[str, ...]] = ("torch.nn.Identity",)

    def __init__(self, latent_factor: int = 4, channels: int = 3) -> None:
        super().__init__()
        if latent_factor < 1:
            raise ValueError(f"latent_factor must be >= 1; got {latent_factor}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1; got {channels}")
        self.latent_factor = latent_factor
        self.channels = channels

    def contract(self) -> OutputContract:
        return OutputContract(kind="concat", channels=self.channels, latent_factor=self.latent_factor)

    def forward(self, image: Tensor) -> Tensor:
        """``image``: float ``[B, channels, h, w]`` in ``[-1, 1]`` at latent resolution -> itself."""
        if not image.is_floating_point():
            raise TypeError(
                f"the low-res image must be a float tensor in [-1, 1]; got dtype {image.dtype} "
                "(convert uint8 pixels with x / 127.5 - 1)"
            )
        if image.ndim != 4 or image.shape[1] != self.channels:
            raise ValueError(f"the low-res image must be [B, {self.channels}, h, w]; got {list(image.shape)}")
        if image.numel():
            lo, hi = float(image.min()), float(image.max())
            if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
                raise ValueError(
                    f"the low-res image must be in [-1, 1]; its values span [{lo:.4g}, {hi:.4g}] "
                    "(from [0, 1] use 2 * x - 1; from uint8 use x / 127.5 - 1)"
                )
        return image

    def unconditional(self, batch_size: int) -> Tensor:
        raise ValueError(
            "the low-res image is concatenated to the latent and the LDM super-resolution model was never "
            "trained without it, so there is no unconditional input (no classifier-free guidance)"
        )


__all__ = ["RANGE_TOLERANCE", "LowResImage"]
