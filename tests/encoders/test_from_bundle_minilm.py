"""A model conditioned by an encoder with no CompVis original (MiniLM) records the encoder's class path as
its cond_stage target; building the cond stage from such a bundle must find that encoder again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.encoders.from_bundle import build_cond_stage, known_targets
from ldm_sdk.encoders.text_minilm import FrozenMiniLMEmbedder
from ldm_sdk.models.configs import CondStageConfig, DiffusionConfig, ModelConfig, UNetConfig
from ldm_sdk.runtime import Runtime
from ldm_sdk.testing.tiny import TINY_VQ_F4

TARGET = "ldm_sdk.encoders.text_minilm.FrozenMiniLMEmbedder"


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with Runtime.create(load_entrypoints=False, device="cpu") as rt:
        yield rt


def _config() -> ModelConfig:
    unet = UNetConfig(
        in_channels=3,
        out_channels=3,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(1,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_spatial_transformer=True,
        context_dim=384,
    )
    diffusion = DiffusionConfig(conditioning_key="crossattn", cond_stage_key="caption", channels=3)
    return ModelConfig(
        first_stage=TINY_VQ_F4, unet=unet, diffusion=diffusion, cond_stage=CondStageConfig(target=TARGET)
    )


def test_minilm_target_is_the_class_path(runtime: Runtime) -> None:
    spec = runtime.registries.condition_encoders.get("minilm")
    assert spec.config_target == TARGET
    assert known_targets(runtime.registries.condition_encoders)[TARGET] == ["minilm"]


def test_bundle_with_minilm_target_builds_minilm(runtime: Runtime) -> None:
    reference = FrozenMiniLMEmbedder()
    bundle = ModelBundle(_config())
    bundle.cond_stage_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    encoder: Any = build_cond_stage(bundle, runtime.registries.condition_encoders)
    assert isinstance(encoder, FrozenMiniLMEmbedder)
    with torch.no_grad():
        torch.testing.assert_close(encoder(["a red apple"]), reference(["a red apple"]), rtol=0, atol=0)
