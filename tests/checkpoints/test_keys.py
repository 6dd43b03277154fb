"""Strict key checking: grouped missing/unexpected keys, every shape mismatch, hints."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.checkpoints.keys import (
    CheckpointMismatchError,
    ShapeMismatch,
    check_state_dict,
    group_keys,
    group_of,
)
from ldm_sdk.checkpoints.loader import empty_bundle
from tests.tiny_configs import KL_F8_FIRST_STAGE, SD1, SD2_V, SD_INPAINT


def _shapes(config) -> dict[str, torch.Size]:  # type: ignore[no-untyped-def]
    return empty_bundle(config).expected_shapes()


def _as_tensors(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_group_of_and_collapsing() -> None:
    assert (
        group_of("model.diffusion_model.input_blocks.1.1.proj_in.weight")
        == "model.diffusion_model.input_blocks.1"
    )
    assert group_of("first_stage_model.encoder.conv_in.weight") == "first_stage_model.encoder.conv_in"
    assert group_of("model_ema.diffusion_modelout2bias") == "model_ema"
    assert group_of("betas") == "betas"
    keys = [f"model.diffusion_model.input_blocks.{i}.0.weight" for i in (0, 1, 2, 3, 5, 7, 8)]
    keys += ["model.diffusion_model.middle_block.0.weight", "model.diffusion_model.out.2.weight"]
    groups = dict(group_keys(keys))
    assert groups["model.diffusion_model.input_blocks.{0-3,5,7-8}"] == keys[:7]
    assert "model.diffusion_model.middle_block.0" in groups and "model.diffusion_model.out.2" in groups


def test_identical_layouts_pass() -> None:
    shapes = _shapes(SD1)
    check_state_dict(shapes, _as_tensors(shapes))


def test_grouped_error_lists_groups_counts_and_every_mismatch() -> None:
    expected = _shapes(SD1)
    given = _as_tensors(expected)
    removed = sorted(k for k in given if k.startswith("model.diffusion_model.input_blocks.1."))
    for key in removed:
        del given[key]
    extra = {
        f"model.diffusion_model.extra_block.0.{n}": torch.empty(3, device="meta") for n in ("weight", "bias")
    }
    given.update(extra)
    bad = ["model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.bias"]
    for key in bad:
        given[key] = torch.empty(7, device="meta")

    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(expected, given, what="x.ckpt", against="tiny-sd1")
    err = info.value
    assert err.missing == tuple(removed) and len(removed) > 3
    assert err.unexpected == tuple(sorted(extra))
    assert {m.key for m in err.mismatched} == set(bad)
    mismatch = next(m for m in err.mismatched if m.key == bad[0])
    assert mismatch == ShapeMismatch(bad[0], torch.Size([7]), expected[bad[0]])

    text = str(err)
    assert text.startswith("x.ckpt does not match tiny-sd1")
    assert f"model.diffusion_model.input_blocks.1 ({len(removed)} missing)" in text
    assert "model.diffusion_model.extra_block.0 (2 unexpected)" in text
    for key in bad:
        assert f"{key}: checkpoint [7] vs expected {list(expected[key])}" in text
    # examples are shown relative to their group, a few per group
    assert f"({len(removed)} missing), e.g. 0.emb_layers.1.bias, 0.emb_layers.1.weight, " in text


def test_ignored_prefixes_are_neither_missing_nor_unexpected() -> None:
    expected = {"a.weight": torch.Size([2])}
    given = {"a.weight": torch.zeros(2), "loss.discriminator.weight": torch.zeros(1)}
    check_state_dict(expected, given, ignore_prefixes=("loss.",))
    with pytest.raises(CheckpointMismatchError):
        check_state_dict(expected, given)


def _hints(config_file, config_model) -> tuple[str, ...]:  # type: ignore[no-untyped-def]
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(_shapes(config_model), _as_tensors(_shapes(config_file)))
    return info.value.hints


def test_hint_sd2_file_with_sd1_config() -> None:
    hints = " | ".join(_hints(SD2_V, SD1))
    assert "context width is 48" in hints and "config's is 32" in hints
    assert "linear" in hints and "use_linear_in_transformer=True" in hints


def test_hint_inpainting_file() -> None:
    hints = " | ".join(_hints(SD_INPAINT, SD1))
    assert "9 input channels" in hints and "inpainting" in hints


def test_hint_first_stage_only_file() -> None:
    assert any("first-stage-only" in h for h in _hints(KL_F8_FIRST_STAGE, SD1))
    assert any("config is first-stage-only" in h for h in _hints(SD1, KL_F8_FIRST_STAGE))


def test_hint_extra_prefix() -> None:
    expected = {f"net.{i}.weight": torch.Size([2]) for i in range(4)}
    given = {f"module.net.{i}.weight": torch.zeros(2) for i in range(4)}
    with pytest.raises(CheckpointMismatchError) as info:
        check_state_dict(expected, given)
    assert info.value.hints == (
        "the file's keys carry an extra 'module.' prefix (e.g. saved from a wrapped model)",
    )
