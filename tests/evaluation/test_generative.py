"""FID / KID / precision-recall through torch-fidelity, and ``ldm-sdk eval``.

All generative values here come from a RANDOMLY INITIALISED stand-in InceptionV3 (Kaiming init; no FID
weights exist offline): they show that identical sets score ~0 and different sets do not, and are NOT
comparable with published FID/KID values. torch-fidelity costs ~0.2 s per image on CPU, so the sets are tiny;
and FID's matrix square root of the 2048-d pool features costs ~15 s on CI's cores, so the tests use the
64-d "64" feature layer except once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_sdk.cli import main
from ldm_sdk.evaluation.generative import (
    MissingWeightsError,
    UInt8Images,
    generative_metrics,
    write_standin_inception_weights,
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_standin_inception_weights(tmp_path_factory.mktemp("fid") / "standin-inception.pth")


def _set(seed: int, n: int = 6, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear")
    return (images * (1 - shift) + shift).clamp(0, 1) * 2 - 1


def test_missing_weights_are_explained(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="No pretrained weights exist offline"):
        generative_metrics(_set(0), _set(1), weights=None)
    with pytest.raises(MissingWeightsError, match="does not exist"):
        generative_metrics(_set(0), _set(1), weights=tmp_path / "inception.pth")


def test_same_set_scores_zero_and_different_sets_do_not(weights: Path) -> None:
    real = _set(0, n=4)  # precision/recall need more than 3 images
    same = generative_metrics(
        real, real, weights=weights, kid=True, prc=True, workers=False, feature_layer="64"
    )
    assert abs(same["frechet_inception_distance"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    other = generative_metrics(
        real[:3], _set(1, n=3, shift=0.6), weights=weights, kid=True, workers=False, feature_layer="64"
    )
    assert other["frechet_inception_distance"] > 1.0
    # KID's unbiased estimate is not exactly 0 for one set against itself, but far below two different sets
    assert abs(same["kernel_inception_distance_mean"]) < 0.1 * other["kernel_inception_distance_mean"]
    assert "precision" not in other


def test_torch_fidelity_arguments(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The standard setup reaches torch-fidelity: inception-v3-compat, the local weights, 2048-d features."""
    import torch_fidelity

    seen: dict[str, object] = {}

    def fake(**kwargs: object) -> dict[str, float]:
        seen.update(kwargs)
        return {"frechet_inception_distance": 1.0}

    monkeypatch.setattr(torch_fidelity, "calculate_metrics", fake)
    generative_metrics(_set(0, n=5), _set(1, n=7), weights=weights, kid=True, prc=True, isc=True)
    assert seen["feature_extractor"] == "inception-v3-compat"
    assert seen["feature_extractor_weights_path"] == str(weights)
    assert seen["feature_layer_fid"] == seen["feature_layer_kid"] == seen["feature_layer_prc"] == "2048"
    assert seen["kid_subset_size"] == 5 and seen["isc_splits"] == 7
    assert seen["cuda"] is False and seen["cache"] is False


def test_uint8_inputs() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)
    assert UInt8Images(x)[0].flatten().tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        UInt8Images(torch.zeros(2, 1, 4, 4))


def _write(folder: Path, images: torch.Tensor) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        array = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:02d}.png")


def test_cli(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real, fake, recon = tmp_path / "real", tmp_path / "fake", tmp_path / "recon"
    images = _set(2, n=2)
    _write(real, images)
    _write(fake, _set(3, n=2, shift=0.5))
    _write(recon, (images + 0.1).clamp(-1, 1))
    fid_args = ["--fid", str(real), str(fake), "--weights", str(weights), "--feature-layer", "64"]
    code = main(["eval", *fid_args, "--standin", "--no-workers"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["generative"]["frechet_inception_distance"] > 0
    assert "not comparable" in out["generative"]["note"]

    report = tmp_path / "recon.json"
    assert main(["eval", "--recon", str(real), str(recon), "--per-image", "--output", str(report)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(report.read_text())
    rec = out["reconstruction"]
    assert rec["count"] == 2 and rec["lpips"] is None and "no pretrained trunk" in rec["lpips_note"]
    a = np.asarray(Image.open(real / "00.png"), dtype=np.float64) / 255
    b = np.asarray(Image.open(recon / "00.png"), dtype=np.float64) / 255
    assert rec["per_image"][0]["psnr"] == pytest.approx(10 * np.log10(1 / ((a - b) ** 2).mean()), abs=1e-3)

    assert main(["eval", "--fid", str(real), str(fake)]) == 1
    assert "No pretrained weights exist offline" in capsys.readouterr().err
    (recon / "01.png").unlink()
    assert main(["eval", "--recon", str(real), str(recon)]) == 1
    assert "missing 1" in capsys.readouterr().err
    assert main(["eval"]) == 1
