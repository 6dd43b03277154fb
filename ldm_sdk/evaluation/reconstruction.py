"""Reconstruction metrics: PSNR and SSIM (kornia), LPIPS (the ``lpips`` package).

Images are float ``[B, 3, H, W]`` in ``value_range`` (default (-1, 1), the SDK's convention); they are
mapped to [0, 1] and compared there, so PSNR is ``10 log10(1 / MSE)`` and SSIM uses ``max_val = 1``.

- :func:`psnr`: ``kornia.metrics.psnr`` per image -> ``[B]`` (dB; ``inf`` for identical images).
- :func:`ssim`: ``kornia.metrics.ssim`` with an 11x11 Gaussian window (sigma 1.5), ``C1 = (0.01)^2``,
  ``C2 = (0.03)^2`` (Wang et al. 2004), over ``"valid"`` windows only (no padding), averaged over channels
  and pixels -> ``[B]``.
- :class:`LPIPSMetric`: the ``lpips`` package's LPIPS v0.1 with its own linear heads (shipped in the wheel)
  on a VGG16 or AlexNet trunk. **The trunk needs ImageNet weights, which do not exist offline** (torchvision
  would download them): pass ``trunk_weights``, torchvision's ``vgg16-397923af.pth`` /
  ``alexnet-owt-7be5be79.pth`` (keys ``features.N.*``) or an LPIPS state dict holding ``net.sliceK.N.*``.
  Without a path it raises :class:`~ldm_sdk.evaluation.generative.MissingWeightsError`; it never silently
  runs on a random trunk. :func:`write_standin_trunk` writes a random (Kaiming) trunk for tests: distances
  with it are *not perceptual* and not comparable with published LPIPS values.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ldm_sdk.evaluation.generative import MissingWeightsError

LPIPS_NETS = ("vgg", "alex")
TORCHVISION_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
STANDIN_TRUNK_NOTE = "LPIPS with a randomly initialised stand-in trunk: not perceptual, not comparable"


def to_unit(
    x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0), dtype: torch.dtype = torch.float32
) -> Tensor:
    """``x`` mapped from ``value_range`` to [0, 1], as ``dtype``."""
    lo, hi = value_range
    if hi <= lo:
        raise ValueError(f"value_range must be (low, high) with low < high; got {value_range}")
    return (x.to(dtype) - lo) / (hi - lo)


def _pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two images [B, C, H, W] of one shape; got {list(x.shape)}, {list(y.shape)}"
        )


def psnr(x: Tensor, y: Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Per-image PSNR in dB, ``[B]`` (module docstring)."""
    import kornia

    _pair(x, y)
    a, b = to_unit(x, value_range, torch.float64), to_unit(y, value_range, torch.float64)
    return torch.stack([kornia.metrics.psnr(a[i], b[i], 1.0) for i in range(len(a))]).float()


def ssim(
    x: Tensor, y: Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0), window_size: int = 11
) -> Tensor:
    """Per-image SSIM, ``[B]`` (module docstring)."""
    import kornia

    _pair(x, y)
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"images of {list(x.shape[-2:])} are smaller than the SSIM window {window_size}")
    a, b = to_unit(x, value_range, torch.float64), to_unit(y, value_range, torch.float64)
    ssim_map = kornia.metrics.ssim(a, b, window_size, max_val=1.0, padding="valid")
    return ssim_map.mean(dim=(1, 2, 3)).float()


def _trunk_state(path: Path, net: str, model: nn.Module) -> dict[str, Tensor]:
    """The file's trunk weights renamed to the ``lpips`` model's ``net.sliceK.N.*`` names."""
    raw: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds no state dict (a {type(raw).__name__})")
    wanted = [k for k in model.state_dict() if k.startswith("net.")]
    by_index = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": k for k in wanted}  # net.sliceK.N.weight
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        name = key.removeprefix("perceptual_loss.").removeprefix("loss.")
        if name in wanted:
            out[name] = value
        elif name in by_index:
            out[by_index[name]] = value
    missing = sorted(set(wanted) - set(out))
    if missing:
        raise ValueError(
            f"{path} is not a {net} trunk for LPIPS: {len(missing)} of {len(wanted)} weights are missing "
            f"(e.g. {missing[0]}); valid files: torchvision's {TORCHVISION_FILES[net]} (features.N.*) or an "
            "LPIPS state dict (net.sliceK.N.*)"
        )
    return out


class LPIPSMetric(nn.Module):
    """LPIPS distance per image pair, ``[B]`` (module docstring). Eval mode, no gradients kept."""

    def __init__(self, trunk_weights: str | os.PathLike[str] | None, net: str = "vgg") -> None:
        super().__init__()
        import lpips

        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS trunk {net!r}; valid trunks are {list(LPIPS_NETS)}")
        if trunk_weights is None or not Path(trunk_weights).is_file():
            what = (
                "no trunk_weights path was given" if trunk_weights is None else f"{trunk_weights} is missing"
            )
            raise MissingWeightsError(
                f"LPIPS needs ImageNet weights for its {net} trunk and {what}. No pretrained weights exist "
                f"offline and nothing is downloaded: pass torchvision's {TORCHVISION_FILES[net]} "
                "(--lpips-weights PATH). For tests only, ldm_sdk.evaluation.reconstruction."
                "write_standin_trunk(path) writes a random trunk: its distances are not perceptual."
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecated `pretrained=` inside lpips
            self.model = lpips.LPIPS(net=net, pnet_rand=True, pretrained=True, verbose=False)
        state = _trunk_state(Path(trunk_weights), net, self.model)
        self.model.load_state_dict(state, strict=False)
        self.net = net
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: Tensor, y: Tensor, *, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
        _pair(x, y)
        a, b = to_unit(x, value_range) * 2 - 1, to_unit(y, value_range) * 2 - 1
        return self.model(a, b).flatten()


def write_standin_trunk(path: str | os.PathLike[str], net: str = "vgg", seed: int = 0) -> Path:
    """Write a random torchvision-format trunk (``features.N.*``, Kaiming-normal convolutions, zero biases)
    to ``path``, for tests: LPIPS with it is not perceptual (module docstring)."""
    from torchvision import models

    if net not in LPIPS_NETS:
        raise ValueError(f"unknown LPIPS trunk {net!r}; valid trunks are {list(LPIPS_NETS)}")
    features = (models.vgg16 if net == "vgg" else models.alexnet)(weights=None).features
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in features.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def reconstruction_metrics(
    real_dir: str | os.PathLike[str],
    recon_dir: str | os.PathLike[str],
    *,
    lpips_weights: str | os.PathLike[str] | None = None,
    lpips_net: str = "vgg",
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Mean PSNR / SSIM (and LPIPS when ``lpips_weights`` is given) of each image of ``recon_dir`` against
    the image of ``real_dir`` with the same relative name; per-file values under ``"per_image"``."""
    from ldm_sdk.evaluation.images import load_image, paired_images

    pairs = paired_images(real_dir, recon_dir)
    metric = LPIPSMetric(lpips_weights, lpips_net).to(device) if lpips_weights is not None else None
    rows: list[dict[str, Any]] = []
    for rel, real_path, recon_path in pairs:
        a, b = load_image(real_path)[None], load_image(recon_path)[None]
        if a.shape != b.shape:
            raise ValueError(
                f"{recon_path} is {list(b.shape[-2:])}, its original {real_path} {list(a.shape[-2:])}"
            )
        row: dict[str, Any] = {
            "file": rel.as_posix(),
            "psnr": float(psnr(a, b)[0]),
            "ssim": float(ssim(a, b)[0]),
        }
        if metric is not None:
            row["lpips"] = float(metric(a.to(device), b.to(device))[0])
        rows.append(row)
    keys = ["psnr", "ssim"] + (["lpips"] if metric is not None else [])
    out: dict[str, Any] = {"count": len(rows)}
    for key in keys:  # identical pairs (PSNR inf) are counted, not averaged
        finite = [r[key] for r in rows if r[key] != float("inf")]
        out[key] = sum(finite) / len(finite) if finite else float("inf")
    out["identical"] = sum(r["psnr"] == float("inf") for r in rows)
    out["per_image"] = rows
    return out
