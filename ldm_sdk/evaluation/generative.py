"""Generative metrics through torch-fidelity: FID, Inception Score, KID, precision / recall.

Always with torch-fidelity's ``feature_extractor="inception-v3-compat"`` (the TF-ported InceptionV3 the
published FID numbers use; precision/recall would otherwise switch to a VGG16 it downloads) and a **local**
weights file, ``feature_extractor_weights_path``: torch-fidelity downloads
``weights-inception-2015-12-05-6726825d.pth`` when given none, and no such download works offline, so
:func:`generative_metrics` requires the path and raises a clear error when it is absent.

Get the real weights where you have network access (the file torch-fidelity's
``feature_extractor_inceptionv3.URL_INCEPTION_V3`` names, 95 MB) and pass its path.

:func:`write_standin_inception_weights` writes a **randomly initialised** stand-in with the same layout, for
tests: variance-preserving (Kaiming) initialisation, so features of different images stay different (a
default init collapses them and every FID is 0). FID / IS / KID computed with it are **not comparable with
published values**: they only show whether two sets differ. Say so wherever they are shown.

Inputs: a folder of images (PNG / JPEG, searched recursively; all the same size unless ``resize``), a float
tensor ``[N, 3, H, W]`` in [-1, 1], a uint8 tensor ``[N, 3, H, W]``, or a dataset of such uint8 tensors.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

FEATURE_EXTRACTOR = "inception-v3-compat"
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
FEATURE_LAYERS = ("2048", "768", "192", "64")
STANDIN_NOTE = (
    "computed with a randomly initialised stand-in Inception (no pretrained weights offline): "
    "not comparable with published values"
)


class MissingWeightsError(FileNotFoundError):
    """Pretrained weights a metric needs are not on this machine (none can be downloaded here)."""


def check_inception_weights(path: str | os.PathLike[str] | None) -> Path:
    """``path`` as a Path when the file exists; else :class:`MissingWeightsError` saying how to get one."""
    if path is None or not Path(path).is_file():
        what = "no weights path was given" if path is None else f"{path} does not exist"
        raise MissingWeightsError(
            f"FID/IS/KID/precision-recall need the FID InceptionV3 weights ({WEIGHTS_FILE}, torch-fidelity's "
            f"'{FEATURE_EXTRACTOR}') and {what}. No pretrained weights exist offline and nothing is "
            "downloaded: fetch the file where you have network access (torch_fidelity."
            "feature_extractor_inceptionv3.URL_INCEPTION_V3) and pass its path (--weights PATH). For tests "
            "only, ldm_sdk.evaluation.generative.write_standin_inception_weights(path) writes a random "
            "stand-in whose values are not comparable with published ones."
        )
    return Path(path)


def write_standin_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write a random, Kaiming-initialised ``inception-v3-compat`` state dict to ``path`` (module
    docstring: for tests; its metric values are not comparable with published ones)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Shell(FeatureExtractorInceptionV3):  # the layers, without loading (or downloading) weights
        def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        model = _Shell(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(empty))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
                module.reset_running_stats()
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) / module.in_features**0.5)
                module.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nn.Module.state_dict(model), path)
    return path


class UInt8Images(Dataset[Tensor]):
    """A ``[N, 3, H, W]`` tensor as the uint8 dataset torch-fidelity reads (floats are taken in [-1, 1])."""

    def __init__(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W]; got {list(images.shape)}")
        if images.is_floating_point():
            images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        elif images.dtype != torch.uint8:
            raise ValueError(f"images must be float in [-1, 1] or uint8; got {images.dtype}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]


def _input(x: str | os.PathLike[str] | Tensor | Dataset[Tensor], what: str) -> tuple[Any, int]:
    if isinstance(x, Tensor):
        x = UInt8Images(x)
    if isinstance(x, (str, os.PathLike)):
        from ldm_sdk.evaluation.images import list_images

        files = list_images(x)  # raises for a missing or empty folder
        return str(x), len(files)
    if not hasattr(x, "__len__"):
        raise TypeError(f"{what} must be a folder, a [N, 3, H, W] tensor or a sized dataset; got {type(x)}")
    return x, len(x)  # type: ignore[arg-type]


def generative_metrics(
    real: str | os.PathLike[str] | Tensor | Dataset[Tensor],
    fake: str | os.PathLike[str] | Tensor | Dataset[Tensor],
    *,
    weights: str | os.PathLike[str] | None,
    fid: bool = True,
    isc: bool = False,
    kid: bool = False,
    prc: bool = False,
    device: str | torch.device | None = None,
    batch_size: int = 32,
    resize: int = 0,
    kid_subset_size: int = 1000,
    isc_splits: int = 10,
    workers: bool = True,
    feature_layer: str = "2048",
) -> dict[str, float]:
    """torch-fidelity's metrics of ``fake`` against ``real`` (IS is of ``fake`` alone). Returns its keys:
    ``frechet_inception_distance``, ``inception_score_mean`` / ``_std``, ``kernel_inception_distance_mean`` /
    ``_std``, ``precision``, ``recall``, ``f_score``. ``kid_subset_size`` and ``isc_splits`` shrink to the
    set sizes; ``resize`` (pixels) resizes and centre-crops folder images; ``workers=False`` loads in the
    main process (small sets, tests). ``feature_layer`` picks the Inception features of FID / KID /
    precision-recall: ``"2048"`` (the pool features, the standard) or ``"64"``, ``"192"``, ``"768"``; FID's
    matrix square root costs O(d^3) on the CPU (~15 s for 2048 on two busy cores), so tests use ``"64"``:
    such values are not FID as published."""
    import torch_fidelity

    path = check_inception_weights(weights)
    if feature_layer not in FEATURE_LAYERS:
        raise ValueError(f"unknown feature layer {feature_layer!r}; valid layers are {list(FEATURE_LAYERS)}")
    if not (fid or isc or kid or prc):
        raise ValueError("choose at least one metric: fid, isc, kid or prc")
    real_in, n_real = _input(real, "real")
    fake_in, n_fake = _input(fake, "fake")
    if min(n_real, n_fake) < 2:
        raise ValueError(f"metrics need at least 2 images per set; got {n_real} real, {n_fake} fake")
    if prc and min(n_real, n_fake) <= 3:
        raise ValueError("precision/recall need more than 3 images per set (3 nearest neighbours)")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = torch_fidelity.calculate_metrics(
        input1=fake_in,
        input2=real_in,
        fid=fid,
        isc=isc,
        kid=kid,
        prc=prc,
        feature_extractor=FEATURE_EXTRACTOR,
        feature_extractor_weights_path=str(path),
        feature_layer_fid=feature_layer,
        feature_layer_kid=feature_layer,
        feature_layer_prc=feature_layer,
        cuda=dev.type == "cuda",
        batch_size=batch_size,
        kid_subset_size=min(kid_subset_size, n_real, n_fake),
        isc_splits=max(1, min(isc_splits, n_fake)),
        samples_find_deep=True,
        samples_resize_and_crop=resize,
        save_cpu_ram=not workers,
        cache=False,
        verbose=False,
    )
    return {k: float(v) for k, v in out.items()}
