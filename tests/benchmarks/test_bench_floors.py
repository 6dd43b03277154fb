"""The scripts behind docs/benchmarks.md's bounds: ``bench/memory_floor.py`` counts the bytes of the norms
and upsamplings of an SD-1.5 UNet call (checked against the architecture's layout written out by hand), and
``bench/profile_unet.py`` files each kernel of a profile under the right category."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def sd15_pass_bytes(batch: int) -> dict[str, Counter[str]]:
    """The same count from SD-1.5's layout: 4 levels of 320 x (1, 2, 4, 4) channels, 2 ResBlocks a level
    on the way down and 3 on the way up (their inputs the skips concatenated), a transformer (a GroupNorm
    and three LayerNorms) after each ResBlock of the first three levels and in the middle, 2x nearest
    upsampling at the end of each level but the first on the way up, the output GroupNorm."""
    latent, base, mults, blocks, attention_levels = 64, 320, (1, 2, 4, 4), 2, {0, 1, 2}
    moved: dict[str, Counter[str]] = {"norm": Counter(), "upsample": Counter()}

    def norm(channels: int, level: int, count: int = 1) -> None:
        side = latent >> level
        moved["norm"][f"{side}x{side}"] += count * 2 * batch * channels * side * side * 2

    widths = [base * m for m in mults]
    last = len(widths) - 1
    skips, ch = [base], base
    for level, width in enumerate(widths):
        for _ in range(blocks):
            norm(ch, level)
            norm(width, level)
            ch = width
            if level in attention_levels:
                norm(width, level, 4)
            skips.append(width)
        if level != last:
            skips.append(width)
    norm(ch, last, 2 + 4 + 2)  # middle: ResBlock, transformer, ResBlock
    for level in reversed(range(len(widths))):
        width = widths[level]
        for _ in range(blocks + 1):
            norm(ch + skips.pop(), level)
            norm(width, level)
            ch = width
            if level in attention_levels:
                norm(width, level, 4)
        if level:
            side = latent >> level
            moved["upsample"][f"{side}x{side}"] += batch * ch * side * side * 2 * (1 + 4)
    norm(base, 0)
    assert not skips
    return moved


@pytest.mark.parametrize("batch", [2, 16])
def test_memory_floor_counts_every_norm_and_upsampling_of_sd15(batch: int) -> None:
    floor = _load("memory_floor")
    got = floor.pass_bytes(floor.SD15_UNET, batch)
    want = sd15_pass_bytes(batch)
    assert got == {kind: dict(sorted(by_side.items())) for kind, by_side in want.items()}
    # the 64 x 64 level's norms at batch 16: 2.94 GB, the figure docs/benchmarks.md's batch-8 bound uses
    if batch == 16:
        assert got["norm"]["64x64"] == 2_936_012_800


def test_memory_floor_main_without_a_gpu_reports_bytes_only(tmp_path: Path) -> None:
    floor = _load("memory_floor")
    res = floor.main(["--batches", "2", "--out", str(tmp_path / "floor.json")])
    assert "copy_gbps" not in res and "all_ms" not in res["unet_b2"]
    assert res["unet_b2"]["all_bytes"] == sum(sum(v.values()) for v in sd15_pass_bytes(2).values())
    assert (tmp_path / "floor.json").exists()


@pytest.mark.parametrize(
    ("kernel", "category"),
    [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7", "attention"),
        ("_short_attention_kernel", "attention"),
        ("_gn_apply_nhwc_kernel", "norm"),
        ("_add_layer_norm_kernel", "norm"),
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize", "conv"),
        ("nvjet_sm90_hsh_320x128_64x3_1x2_h_bz_coopB_TNT", "gemm"),
        ("_geglu_tma_kernel", "gemm"),
        ("_geglu_gemm_kernel", "gemm"),
        ("_geglu_kernel", "elementwise"),
        ("_concat_kernel", "elementwise"),
        ("Memset (Device)", "other"),
    ],
)
def test_profile_categories_file_each_kernel(kernel: str, category: str) -> None:
    profile = _load("profile_unet")
    prof = SimpleNamespace(key_averages=lambda: [SimpleNamespace(key=kernel, device_time_total=500.0)])
    assert profile.categories(prof, calls=5) == {category: 0.1, "total": 0.1}
