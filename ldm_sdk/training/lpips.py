"""LPIPS perceptual distance (Zhang et al. 2018) on VGG16 features, as taming / CompVis train with it.

``d(x, y) = sum_l mean_hw( w_l . (n(f_l(x)) - n(f_l(y)))^2 )`` over the ReLU outputs ``relu1_2, relu2_2,
relu3_3, relu4_3, relu5_3`` of VGG16 (inputs shifted and scaled by LPIPS' ``ScalingLayer``), where ``n``
normalises each feature vector to unit length and ``w_l`` are the learned non-negative "linear heads".
Names follow taming's ``LPIPS`` (``scaling_layer.shift``, ``net.slice1.0.weight``, ``lin0.model.1.weight``),
so ``loss.perceptual_loss.*`` of a CompVis autoencoder checkpoint loads into it.

Weights, and what happens without them (none are downloaded; nothing offline ships the VGG16 trunk):

- ``vgg_path``: torchvision's VGG16 ImageNet weights (``vgg16-397923af.pth``, keys ``features.N.*``), or a
  full LPIPS state dict that includes ``net.slice*`` (e.g. extracted from an autoencoder checkpoint).
- ``heads_path``: the linear heads (``lin0..lin4``): LPIPS' ``vgg.pth`` (taming's ``vgg_lpips``). When not
  given, the heads of an installed ``lpips`` package (``lpips/weights/v0.1/vgg.pth``) are used; without
  either, every head weight is 1 (LPIPS' unlearned "baseline" variant) and a warning says so.
- With no trunk weights, :func:`build_perceptual_loss` returns None and logs a warning: the perceptual term
  is **disabled** (the reconstruction loss is L1/L2 + GAN + KL/VQ only). A randomly initialised trunk is
  used only when the caller asks for it explicitly (``allow_random_trunk=True``, ``--random-lpips``): its
  distances are not perceptual, which is fine for pipeline tests and wrong for real training.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger("ldm_sdk.training")

CHANNELS = (64, 128, 256, 512, 512)
# VGG16 ``features`` indices of the five slices (up to relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
# VGG16 configuration "D": channel widths, "M" = 2x2 max-pool
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def _vgg16_features() -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            conv = nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1)
            # variance-preserving init: a random trunk must not collapse its features
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=False)]
            in_ch = int(v)
    return layers


class VGG16Slices(nn.Module):
    """The first 30 layers of VGG16 ``features`` in five ``slice{i}`` Sequentials (taming's ``vgg16``)."""

    def __init__(self) -> None:
        super().__init__()
        features = _vgg16_features()
        for i, (start, end) in enumerate(SLICES, start=1):
            block = nn.Sequential()
            for j in range(start, end):
                block.add_module(str(j), features[j])
            self.add_module(f"slice{i}", block)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, len(SLICES) + 1):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


class ScalingLayer(nn.Module):
    shift: Tensor
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 convolution to one channel, after dropout (``model.0``), as LPIPS' heads are stored."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
        nn.init.ones_(self.model[1].weight)


def _unit(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS-VGG: ``forward(x, y)`` for images in [-1, 1] gives ``[B, 1, 1, 1]`` distances. Frozen, eval."""

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Slices()
        for i, ch in enumerate(CHANNELS):
            self.add_module(f"lin{i}", NetLinLayer(ch))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always eval: the heads' dropout is never active, as in taming

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total: Tensor | None = None
        for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
            diff = (_unit(a) - _unit(b)) ** 2
            value = getattr(self, f"lin{i}").model(diff).mean(dim=(2, 3), keepdim=True)
            total = value if total is None else total + value
        assert total is not None
        return total

    # -- weights --------------------------------------------------------------------------------------------
    def load_trunk(self, state: Mapping[str, Tensor], source: str) -> None:
        """VGG16 weights: torchvision's (``features.N.*``) or LPIPS' own (``net.sliceK.N.*``)."""
        own = {k: v for k, v in state.items() if k.startswith("net.")}
        if not own:
            mapping = {}
            for i, (start, end) in enumerate(SLICES, start=1):
                for j in range(start, end):
                    for kind in ("weight", "bias"):
                        mapping[f"features.{j}.{kind}"] = f"net.slice{i}.{j}.{kind}"
            own = {mapping[k]: v for k, v in state.items() if k in mapping}
        expected = {k for k in self.state_dict() if k.startswith("net.")}
        missing = sorted(expected - set(own))
        if missing:
            raise ValueError(
                f"{source} is not a VGG16 trunk: {len(missing)} of its weights are missing "
                f"(e.g. {missing[0]}); valid: torchvision's vgg16 state dict (features.N.weight) or an "
                "LPIPS one (net.sliceK.N.weight)"
            )
        self.load_state_dict(own, strict=False)

    def load_heads(self, state: Mapping[str, Tensor], source: str) -> None:
        """Linear heads ``lin{0..4}.model.1.weight`` (LPIPS' ``vgg.pth``)."""
        heads = {k: v for k, v in state.items() if k.startswith("lin")}
        expected = {f"lin{i}.model.1.weight" for i in range(len(CHANNELS))}
        if set(heads) != expected:
            raise ValueError(
                f"{source} holds no LPIPS-VGG heads: expected keys {sorted(expected)}, "
                f"found {sorted(heads)[:6]}"
            )
        self.load_state_dict(heads, strict=False)


def _read(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot read weights from {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    prefix = "loss.perceptual_loss."  # an autoencoder checkpoint: take its LPIPS
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def packaged_heads_path() -> Path | None:
    """``lpips/weights/v0.1/vgg.pth`` of an installed ``lpips`` package (without importing it), or None."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "weights" / "v0.1" / "vgg.pth"
        if candidate.is_file():
            return candidate
    return None


def build_perceptual_loss(
    vgg_path: str | os.PathLike[str] | None = None,
    heads_path: str | os.PathLike[str] | None = None,
    *,
    allow_random_trunk: bool = False,
) -> LPIPS | None:
    """The LPIPS module for training, or None (perceptual term disabled, with a warning) when no VGG16
    weights were given and a random trunk was not asked for. See the module docstring."""
    if vgg_path is None and not allow_random_trunk:
        logger.warning(
            "perceptual loss DISABLED: no VGG16 weights (--lpips-vgg PATH: torchvision's vgg16-397923af.pth "
            "or an LPIPS state dict); nothing offline ships them. Pass --random-lpips to use a randomly "
            "initialised trunk (pipeline tests only: its distances are not perceptual)"
        )
        return None
    lpips = LPIPS()
    if vgg_path is not None:
        state = _read(vgg_path)
        lpips.load_trunk(state, str(vgg_path))
        if heads_path is None and any(k.startswith("lin") for k in state):
            lpips.load_heads(state, str(vgg_path))
            return lpips
    else:
        logger.warning(
            "perceptual loss uses a RANDOMLY INITIALISED VGG16 trunk (--random-lpips): not perceptual"
        )
    heads = heads_path if heads_path is not None else packaged_heads_path()
    if heads is not None:
        lpips.load_heads(_read(heads), str(heads))
    else:
        logger.warning("LPIPS heads: none given (--lpips-heads) and no lpips package; using unit weights")
    return lpips


__all__ = ["LPIPS", "build_perceptual_loss", "packaged_heads_path"]
