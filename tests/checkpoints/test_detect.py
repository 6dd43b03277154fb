"""Detecting a checkpoint's family from keys and shapes (real-size state dicts on the meta device)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.detect import (
    FirstStageStructure,
    UnknownCheckpointError,
    compvis_shapes,
    describe,
    detect_config,
)
from ldm_sdk.checkpoints.families import FAMILIES, Family
from ldm_sdk.checkpoints.original_config import config_to_yaml
from ldm_sdk.diffusion.schedule import DiffusionSchedule, make_beta_schedule
from ldm_sdk.models.configs import ModelConfig
from ldm_sdk.models.first_stage import AutoencoderKL, VQModel
from ldm_sdk.models.zoo import FIRST_STAGE_ZOO
from tests.tiny_configs import ALL, SD1, random_bundle

SAME_NETWORK = {
    "sd2": "sd2-v",
    "sd2-v": "sd2",
    "ldm-celebahq256": "",
    "ldm-ffhq256": "",
    "ldm-lsun-bedrooms": "",
}
HINTS = {
    "sd2": "stable-diffusion-2-1-base/v2-1_512-ema-pruned.safetensors",
    "sd2-v": "768-v-ema.ckpt",
    "ldm-celebahq256": "models/ldm/celeba256/model.ckpt",
    "ldm-ffhq256": "models/ldm/ffhq256/model.ckpt",
    "ldm-lsun-bedrooms": "models/ldm/lsun_beds256/model.ckpt",
}


def meta_state_dict(config: ModelConfig) -> dict[str, Tensor]:
    """The real-size CompVis state dict of ``config``, its networks on the meta device (no memory)."""
    with torch.device("meta"):
        bundle = ModelBundle(config)
    return bundle.compvis_state_dict()


@pytest.fixture(scope="module")
def sd1_state() -> dict[str, Tensor]:
    return meta_state_dict(FAMILIES["sd1"].config)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_is_detected(name: str) -> None:
    state = meta_state_dict(FAMILIES[name].config)
    state["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.empty(3, device="meta")
    state["model_ema.decay"] = torch.tensor(0.9999)
    if name in SAME_NETWORK:
        with pytest.raises(UnknownCheckpointError) as err:
            detect_config(state)
        assert name in err.value.candidates
        assert detect_config(state, name_hint=HINTS[name]).family == name
        assert detect_config(state, family=name) == FAMILIES[name].config
    else:
        assert detect_config(state) == FAMILIES[name].config


def test_sd2_eps_and_v_need_the_yaml() -> None:
    state = meta_state_dict(FAMILIES["sd2-v"].config)
    with pytest.raises(UnknownCheckpointError, match=r"v2-inference-v\.yaml") as err:
        detect_config(state)
    message = str(err.value)
    assert "v2-inference.yaml" in message and "eps" in message and "(v)" in message
    assert sorted(err.value.candidates) == ["sd2", "sd2-v"]
    assert detect_config(state, name_hint="v2-1_768-ema-pruned.ckpt").family == "sd2-v"
    assert detect_config(state, name_hint="512-base-ema.ckpt").family == "sd2"
    with pytest.raises(UnknownCheckpointError):
        detect_config(state, name_hint="my-model.ckpt")  # no tell-tale in the name


@pytest.mark.parametrize("name", sorted(FIRST_STAGE_ZOO))
def test_first_stage_zoo_files(name: str) -> None:
    config = FIRST_STAGE_ZOO[name]
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config) if config.kind == "kl" else VQModel.from_config(config)  # type: ignore[arg-type]
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.empty(64, 3, 4, 4, device="meta")  # training-only
    detected = detect_config(state)
    assert detected.family == name and detected.unet is None
    assert detected.first_stage == config


def test_custom_first_stage_is_derived_from_shapes() -> None:
    config = ALL["kl_f8_first_stage"]
    state = random_bundle(config).compvis_state_dict()
    detected = detect_config(state)
    assert detected.family == "custom" and detected.unet is None
    assert FirstStageStructure.from_config(detected.first_stage) == FirstStageStructure.from_config(
        config.first_stage
    )
    assert compvis_shapes(detected) == compvis_shapes(config)


@pytest.mark.parametrize("name", sorted(ALL))
def test_compvis_shapes_match_the_bundle(name: str) -> None:
    config = ALL[name]
    assert compvis_shapes(config) == ModelBundle(config).expected_shapes()


def test_unknown_structure_asks_for_the_yaml() -> None:
    state = random_bundle(SD1).compvis_state_dict()  # a tiny SD-like model is no known family
    with pytest.raises(UnknownCheckpointError, match="original YAML") as err:
        detect_config(state)
    assert err.value.detected["unet"]["context_dim"] == 32
    assert err.value.detected["unet"]["model_channels"] == 32
    assert err.value.detected["first_stage"]["kind"] == "kl"


def test_missing_key_is_an_error(sd1_state: dict[str, Tensor]) -> None:
    state = dict(sd1_state)
    del state["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"]
    with pytest.raises(UnknownCheckpointError, match="missing"):
        detect_config(state)


def test_wrong_shape_is_an_error(sd1_state: dict[str, Tensor]) -> None:
    state = dict(sd1_state)
    state["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = torch.empty(
        640, 1024, device="meta"
    )
    with pytest.raises(UnknownCheckpointError, match="other shapes"):
        detect_config(state)


def test_extra_unet_key_is_an_error(sd1_state: dict[str, Tensor]) -> None:
    state = dict(sd1_state)
    state["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(UnknownCheckpointError, match="unexpected"):
        detect_config(state)


def test_not_a_compvis_state_dict() -> None:
    with pytest.raises(UnknownCheckpointError, match="state_dict"):
        detect_config({"state_dict": torch.zeros(1), "epoch": torch.zeros(1)})
    with pytest.raises(UnknownCheckpointError, match="no CompVis model keys"):
        detect_config({"conv.weight": torch.zeros(1)})


def test_real_betas_must_match_the_family_schedule(sd1_state: dict[str, Tensor]) -> None:
    state = dict(sd1_state)
    state["betas"] = torch.tensor(make_beta_schedule("linear", 1000, 0.00085, 0.012), dtype=torch.float32)
    assert detect_config(state).family == "sd1"
    state["betas"] = torch.tensor(make_beta_schedule("linear", 1000, 0.0015, 0.0195), dtype=torch.float32)
    with pytest.raises(UnknownCheckpointError, match="another noise schedule"):
        detect_config(state)


def test_family_argument_is_checked(sd1_state: dict[str, Tensor]) -> None:
    assert detect_config(sd1_state, family="sd1").family == "sd1"
    with pytest.raises(UnknownCheckpointError, match="structure differs"):
        detect_config(sd1_state, family="sd2")
    with pytest.raises(KeyError, match="known"):
        detect_config(sd1_state, family="sd9")


def test_describe_sd2(sd1_state: dict[str, Tensor]) -> None:
    state = meta_state_dict(FAMILIES["sd2"].config)
    state.update(DiffusionSchedule.from_config(FAMILIES["sd2"].config.diffusion).state_dict())  # type: ignore[arg-type]
    state["cond_stage_model.model.token_embedding.weight"] = torch.empty(49408, 1024, device="meta")
    info = describe(state)
    json.dumps(info)  # serialisable for `ldm-sdk inspect`
    assert info["format"] == "ldm" and info["family"] is None
    assert sorted(info["candidates"]) == ["sd2", "sd2-v"] and "v2-inference-v.yaml" in info["detection"]
    assert info["unet"]["attention"] == "spatial-linear" and info["unet"]["context_dim"] == 1024
    assert info["first_stage"]["factor"] == 8 and info["first_stage"]["kind"] == "kl"
    assert info["cond_stage"]["guess"].startswith("FrozenOpenCLIPEmbedder")
    assert info["schedule"]["beta_schedule"] == "linear"
    assert info["schedule"]["linear_start"] == pytest.approx(0.00085)
    assert info["schedule"]["linear_end"] == pytest.approx(0.012)
    assert describe(sd1_state)["family"] == "sd1"


def test_describe_first_stage_and_garbage() -> None:
    with torch.device("meta"):
        model = VQModel.from_config(FIRST_STAGE_ZOO["vq-f8"])  # type: ignore[arg-type]
    info = describe(dict(model.state_dict()))
    assert info["format"] == "first_stage" and info["family"] == "vq-f8"
    assert info["first_stage"]["factor"] == 8 and info["first_stage"]["n_embed"] == 16384
    garbage = describe({"a.weight": torch.zeros(2)})
    assert (
        garbage["format"] == "unknown" and garbage["family"] is None and "no CompVis" in garbage["detection"]
    )


def test_extra_families_can_be_given() -> None:
    tiny = Family(
        name="tiny-sd1",
        description="a plugin's family",
        yaml_name="tiny.yaml",
        source="tests",
        original_yaml=config_to_yaml(SD1),
        config=SD1,
    )
    state = random_bundle(SD1).compvis_state_dict()
    assert detect_config(state, families={**FAMILIES, "tiny-sd1": tiny}) == SD1
    with pytest.raises(UnknownCheckpointError):
        detect_config(state)  # not a built-in family
