"""The UNet class :func:`~ldm_sdk.accel.block_fusion.fuse_blocks` switches a UNet to: :class:`FusedUNetModel`
(same Parameters, same everything else).

It runs two of :class:`~ldm_sdk.models.unet.UNetModel`'s steps in kernels of its own:

* :meth:`~ldm_sdk.models.unet.UNetModel.concat_skip`, the skip concatenations of the output blocks, as one
  Triton copy that also repeats a skip the guidance copies share
  (:func:`~ldm_sdk.accel.skip_concat.concat_channels`);
* :meth:`~ldm_sdk.models.unet.UNetModel.timestep_features`, the sinusoidal features before the embedding
  MLP, as one Triton kernel with the same bits (:func:`~ldm_sdk.accel.time_embedding.timestep_features`).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from ldm_sdk.accel.skip_concat import concat_channels
from ldm_sdk.accel.time_embedding import timestep_features
from ldm_sdk.accel.triton_kernels import Backend, KernelRecorder
from ldm_sdk.models.unet import UNetModel


class FusedUNetModel(UNetModel):
    """``UNetModel`` whose skip concatenations and timestep features run our kernels (see the module doc)."""

    unfused_class: ClassVar[type[nn.Module]] = UNetModel
    fusion_backend: Backend = "auto"
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records

    def concat_skip(self, h: Tensor, skip: Tensor) -> Tensor:
        return concat_channels(h, skip, backend=self.fusion_backend, recorder=self.kernel_recorder)

    def timestep_features(self, timesteps: Tensor, repeats: int = 1) -> Tensor:
        dtype = self.time_embed[0].weight.dtype
        return timestep_features(
            timesteps,
            self.model_channels,
            dtype,
            repeats,
            backend=self.fusion_backend,
            recorder=self.kernel_recorder,
        )


__all__ = ["FusedUNetModel"]
