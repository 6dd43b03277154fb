"""training/experiments/ldm_factors.py (the LDM paper's section 4.1 at small scale): the smoke preset end to
end on the CPU for LDM-1 (pixel space) and LDM-4, the parameter-count matching of all five factors (on the
meta device), the Frechet distance against torch-fidelity's, and the report that fills the docs."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "training" / "experiments" / "ldm_factors.py"


@pytest.fixture(scope="module")
def lf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ldm_factors", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ldm_factors"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("preset", ["smoke", "h100"])
def test_unet_parameter_counts_match_across_factors(lf: ModuleType, preset: str) -> None:
    p = lf.PRESETS[preset]
    target = lf.count_parameters(lf.reference_unet(p))
    seen = set()
    for f in lf.FACTORS:
        design = lf.design_unet(p, f)
        assert design.target == target
        assert abs(design.params / target - 1) <= p.param_tolerance, (f, design.params, target)
        cfg = design.config
        # the UNet fits the factor's latent: channels, size, and every level's map at least 1 pixel
        assert cfg.in_channels == cfg.out_channels == lf.LATENT_CHANNELS[f]
        assert cfg.image_size == p.image_size // f
        assert cfg.image_size >> (len(cfg.channel_mult) - 1) >= 1
        assert cfg.model_channels % 32 == 0
        # the count is the real module's (built on the meta device: no memory, no init)
        from ldm_sdk.models.unet import UNetModel

        with torch.device("meta"):
            unet = UNetModel.from_config(cfg)
        assert sum(q.numel() for q in unet.parameters()) == design.params
        seen.add(len(cfg.channel_mult))
        # the whole LDM config is one train_ldm accepts, and its networks run at these shapes (meta device)
        model = lf.ldm_config(p, f, cfg)
        from ldm_sdk.encoders.class_embedder import ClassEmbedder
        from ldm_sdk.training.models import check_conditioning

        check_conditioning(ClassEmbedder(**model.cond_stage.params), model)
        assert model.first_stage.ddconfig.downsampling_factor == f
        flops = lf.training_flops(p, f, cfg)
        assert flops["unet_fwd_gflop"] > 0 and (flops["encoder_gflop"] > 0) == (f > 1)
    assert len(seen) > 1  # the levels really follow the latent size


def test_frechet_distance_matches_torch_fidelity(lf: ModuleType) -> None:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 32, generator=g, dtype=torch.float64)
    b = torch.randn(200, 32, generator=g, dtype=torch.float64) * 1.3 + 0.2
    sa, sb = fid_features_to_statistics(a), fid_features_to_statistics(b)
    want = fid_statistics_to_metric(sa, sb, verbose=False)["frechet_inception_distance"]
    mu1, s1 = torch.from_numpy(sa["mu"]), torch.from_numpy(sa["sigma"])
    w, v = torch.linalg.eigh(s1)
    sqrt1 = (v * w.clamp(min=0).sqrt()) @ v.T
    got = lf.frechet_distance(
        mu1, sqrt1, float(torch.trace(s1)), torch.from_numpy(sb["mu"]), torch.from_numpy(sb["sigma"])
    )
    assert got == pytest.approx(want, rel=1e-6)
    assert np.isfinite(got) and got > 0


def test_step_rates_skip_warmup(lf: ModuleType) -> None:
    times = [0.0, 5.0] + [5.0 + 0.5 * i for i in range(1, 21)]  # a slow first step, then 0.5 s a step
    rates = lf.step_rates(times, batch=8)
    assert rates["it_per_s"] == pytest.approx(2.0)
    assert rates["samples_per_s"] == pytest.approx(16.0)
    assert lf.step_rates([1.0], batch=8) is None


def test_smoke_run_pixel_space_and_f4(lf: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "run"
    t0 = time.perf_counter()
    lf.main(["run", "--preset", "smoke", "--factors", "1,4", "--out-dir", str(out), "--device", "cpu",
             "--export", str(tmp_path / "export")])  # fmt: skip
    assert time.perf_counter() - t0 < 60

    results = json.loads((out / "results.json").read_text())
    assert results["fid"]["standin"] is True and "NOT comparable" in results["fid"]["note"]
    p = lf.PRESETS["smoke"]
    for f in ("1", "4"):
        rec = results["factors"][f]
        assert rec["ldm"]["done"]
        segments = rec["ldm"]["segments"]
        assert [s["step"] for s in segments] == list(range(p.eval_every, p.ldm_steps + 1, p.eval_every))
        for s in segments:
            assert s["it_per_s"] > 0 and s["samples_per_s"] == pytest.approx(s["it_per_s"] * p.ldm_batch)
            assert np.isfinite(s["fid"]) and s["fid"] >= 0
            assert s["train_wall_s"] > 0
    # pixel space: no autoencoder, scale factor 1; LDM-4: a trained first stage, scale by std
    assert results["factors"]["1"]["first_stage"]["placeholder"] is True
    assert results["factors"]["1"]["ldm"]["segments"][-1]["scale_factor"] == 1.0
    ae = results["factors"]["4"]["first_stage"]
    assert ae["done"] and ae["steps"] == p.ae_steps and np.isfinite(ae["psnr_db"]) and ae["rfid"] >= 0
    assert (out / ae["export"]).is_file()
    assert results["factors"]["4"]["ldm"]["segments"][-1]["scale_factor"] != 1.0
    # the untouched factors are listed, not run
    assert results["factors"]["8"]["ldm"]["segments"] == []
    table = (out / "results.md").read_text()
    assert "NOT comparable" in table and "| 1 | 3x32x32 | none (pixel space)" in table
    for name in ("results.json", "results.md", "fid_curves.csv", "ldm_factors.png", "run.log"):
        assert (tmp_path / "export" / name).is_file()

    # a second call with the same out dir has nothing left to do
    again = lf.main(
        ["run", "--preset", "smoke", "--factors", "1,4", "--out-dir", str(out), "--device", "cpu"]
    )
    assert again["runs"][-1]["factors"] == []

    # the report fills the docs' results block and writes the figures
    doc = tmp_path / "experiments.md"
    doc.write_text(f"# x\n\n{lf.DOC_BEGIN}\nnot run yet\n{lf.DOC_END}\n\ntail\n")
    report = ["report", "--results", str(out / "results.json"), "--docs", str(doc)]
    report += ["--figures", str(tmp_path / "fig")]
    with pytest.raises(ValueError, match="smoke run"):
        lf.main(report)  # a smoke run's numbers never reach the docs by accident
    lf.main([*report, "--allow-smoke"])
    text = doc.read_text()
    assert "not run yet" not in text and "| 4 | 3x8x8 |" in text and text.endswith("tail\n")
    assert (tmp_path / "fig" / "ldm_factors.png").is_file()
    assert (tmp_path / "fig" / "ldm_factors_fid.csv").read_text().count("\n") == 1 + 2 * len(segments)
