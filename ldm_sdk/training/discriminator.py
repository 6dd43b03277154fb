"""PatchGAN discriminator of the autoencoder's adversarial loss (taming-transformers ``NLayerDiscriminator``).

Isola et al. 2017 (pix2pix) PatchGAN: 4x4 convolutions, stride 2 for the first ``n_layers`` (channel
width doubling up to 8 * ``ndf``), one stride-1 layer, then a stride-1 convolution to one logit per patch.
BatchNorm (or ``ActNorm`` with ``use_actnorm``) after every convolution except the first and the last.
Parameter names are taming's (``main.0.weight`` ... ), so ``loss.discriminator.*`` of a CompVis autoencoder
checkpoint loads strictly. :func:`weights_init` is taming's init: conv ``N(0, 0.02)``, norm scale
``N(1, 0.02)`` and bias 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ActNorm(nn.Module):
    """Per-channel affine normalisation initialised from the first batch (taming ``ActNorm``, Glow):
    ``scale * (x + loc)`` with ``loc = -mean`` and ``scale = 1 / (std + 1e-6)`` of that batch."""

    initialized: Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        flat = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
        mean = flat.mean(1).reshape(1, -1, 1, 1)
        std = flat.std(1).reshape(1, -1, 1, 1)
        self.loc.copy_(-mean)
        self.scale.copy_(1.0 / (std + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and int(self.initialized) == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: image ``[B, input_nc, H, W]`` -> patch logits ``[B, 1, h, w]``."""

    def __init__(
        self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, use_actnorm: bool = False
    ) -> None:
        super().__init__()
        if n_layers < 1 or ndf < 1 or input_nc < 1:
            raise ValueError(f"input_nc, ndf and n_layers must be >= 1; got {input_nc}, {ndf}, {n_layers}")
        norm: type[nn.Module] = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm has its own bias
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=2, padding=1, bias=use_bias),
                norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, stride=1, padding=1, bias=use_bias),
            norm(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1),
        ]
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def weights_init(module: nn.Module) -> None:
    """taming's ``weights_init`` (apply with ``discriminator.apply(weights_init)``)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


__all__ = ["ActNorm", "NLayerDiscriminator", "weights_init"]
