"""Original CompVis / SD YAML <-> ModelConfig, and the family tables built from it."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from ldm_sdk.checkpoints.families import FAMILIES, get_family, match_family
from ldm_sdk.checkpoints.original_config import (
    FIRST_STAGE_COND,
    TRAINING_ONLY_KEYS,
    config_from_yaml,
    config_to_yaml,
)
from ldm_sdk.models.configs import ModelConfig
from ldm_sdk.models.unet import UNetModel
from ldm_sdk.models.zoo import FIRST_STAGE_ZOO
from tests.tiny_configs import ALL

# configs/stable-diffusion/v1-inference.yaml as released by CompVis (training sections included), kept as
# text here so the parser is checked against the file, not against our own family table.
V1_INFERENCE = """
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false   # Note: different from the one we trained before
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    scheduler_config: # 10000 warmup steps
      target: ldm.lr_scheduler.LambdaLinearScheduler
      params:
        warm_up_steps: [ 10000 ]
        cycle_lengths: [ 10000000000000 ] # incredibly large number to prevent corner cases
        f_start: [ 1.e-6 ]
        f_max: [ 1. ]
        f_min: [ 1. ]

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_heads: 8
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: 768
        use_checkpoint: True
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""

# models/first_stage_models/vq-f4/config.yaml of CompVis/latent-diffusion (a first-stage-only model)
VQ_F4 = """
model:
  base_learning_rate: 4.5e-06
  target: ldm.models.autoencoder.VQModel
  params:
    embed_dim: 3
    n_embed: 8192
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 3
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult:
      - 1
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions: []
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 0
        disc_weight: 0.75
        codebook_weight: 1.0
data:
  target: main.DataModuleFromConfig
  params:
    batch_size: 8
"""


def _v1() -> dict:
    return yaml.safe_load(V1_INFERENCE)


def test_v1_inference_yaml_reads_as_the_sd1_family() -> None:
    config = config_from_yaml(V1_INFERENCE)
    assert config.family == "sd1"
    assert config == FAMILIES["sd1"].config
    assert config.unet is not None and config.diffusion is not None and config.cond_stage is not None
    assert (config.diffusion.linear_start, config.diffusion.linear_end) == (0.00085, 0.012)
    assert config.diffusion.scale_factor == 0.18215
    assert config.diffusion.conditioning_key == "crossattn"
    assert config.unet.channel_mult == (1, 2, 4, 4) and config.unet.attention_resolutions == (4, 2, 1)
    assert (config.unet.num_heads, config.unet.context_dim, config.unet.legacy) == (8, 768, False)
    assert config.cond_stage.target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert config.first_stage == FIRST_STAGE_ZOO["kl-f8"]


def test_yaml_file_path(tmp_path) -> None:
    path = tmp_path / "v1-inference.yaml"
    path.write_text(V1_INFERENCE)
    assert config_from_yaml(path) == config_from_yaml(str(path)) == FAMILIES["sd1"].config
    with pytest.raises(FileNotFoundError):
        config_from_yaml(tmp_path / "missing.yaml")


def test_first_stage_only_yaml() -> None:
    config = config_from_yaml(VQ_F4)
    assert config.unet is None and config.diffusion is None and config.cond_stage is None
    assert config.first_stage == FIRST_STAGE_ZOO["vq-f4"]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_yaml_round_trip(name: str) -> None:
    family = FAMILIES[name]
    # the original-style data of the family parses, and our writer's YAML text reads back to the same config
    assert config_from_yaml(family.original_yaml, family=name) == family.config
    text = yaml.safe_dump(config_to_yaml(family.config))
    assert config_from_yaml(text) == family.config


def test_family_is_recognised_without_the_extra_key() -> None:
    identical = {
        "ldm-celebahq256",
        "ldm-ffhq256",
        "ldm-lsun-bedrooms",
    }  # same model section, per the originals
    for name, family in FAMILIES.items():
        data = config_to_yaml(family.config)
        del data["ldm_sdk"]
        parsed = config_from_yaml(data)
        assert parsed.model_copy(update={"family": name}) == family.config
        assert parsed.family == ("custom" if name in identical else name)
        assert match_family(family.config) == (None if name in identical else name)


@pytest.mark.parametrize("name", sorted(ALL))
def test_tiny_configs_round_trip(name: str) -> None:
    config = ALL[name]
    data = config_to_yaml(config)
    assert config_from_yaml(yaml.safe_load(yaml.safe_dump(data))) == config


def test_family_first_stages_are_the_zoo_models() -> None:
    assert FAMILIES["sd1"].config.first_stage == FIRST_STAGE_ZOO["kl-f8"]
    assert FAMILIES["sd2-v"].config.first_stage == FIRST_STAGE_ZOO["kl-f8"]
    assert FAMILIES["ldm-lsun-churches"].config.first_stage == FIRST_STAGE_ZOO["kl-f8"]
    assert FAMILIES["ldm-cin256"].config.first_stage == FIRST_STAGE_ZOO["vq-f4"]
    assert FAMILIES["ldm-celebahq256"].config.first_stage == FIRST_STAGE_ZOO["vq-f4"]
    assert FAMILIES["ldm-inpaint"].config.first_stage == FIRST_STAGE_ZOO["vq-f4-noattn"]


def _unet_parameters(config: ModelConfig) -> int:
    assert config.unet is not None
    with torch.device("meta"):
        unet = UNetModel.from_config(config.unet)
    return sum(p.numel() for p in unet.parameters())


def test_real_size_unet_parameter_counts() -> None:
    # published sizes of the SD 1.x and SD 2.x UNets (e.g. diffusers' model cards / conversion logs)
    assert _unet_parameters(FAMILIES["sd1"].config) == 859_520_964
    assert _unet_parameters(FAMILIES["sd2"].config) == 865_910_724
    assert _unet_parameters(FAMILIES["sd2-v"].config) == 865_910_724


def test_unknown_keys_raise_with_their_yaml_path() -> None:
    data = _v1()
    data["model"]["params"]["unet_config"]["params"]["num_head"] = 8
    with pytest.raises(ValueError, match=r"model\.params\.unet_config\.params\.num_head\b") as err:
        config_from_yaml(data)
    assert "num_heads" in str(err.value)  # the valid keys are listed

    data = _v1()
    data["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["z_chanels"] = 4
    with pytest.raises(ValueError, match=r"model\.params\.first_stage_config\.params\.ddconfig\.z_chanels"):
        config_from_yaml(data)

    data = _v1()
    data["model"]["params"]["lineer_start"] = 0.1
    with pytest.raises(ValueError, match=r"model\.params\.lineer_start") as err:
        config_from_yaml(data)
    assert "linear_start" in str(err.value)

    data = _v1()
    data["trainer"] = {}
    with pytest.raises(ValueError, match=r"'trainer'"):
        config_from_yaml(data)


def test_training_only_keys_are_accepted_and_listed() -> None:
    data = _v1()
    params = data["model"]["params"]
    params.update(ckpt_path="x.ckpt", ignore_keys=["a"], load_only_unet=True, personalization_config={})
    data["lightning"] = {"trainer": {"benchmark": True}}
    data["data"] = {"target": "main.DataModuleFromConfig"}
    assert config_from_yaml(data) == FAMILIES["sd1"].config
    assert {"ckpt_path", "ignore_keys", "monitor", "scheduler_config"} <= TRAINING_ONLY_KEYS["model.params"]
    assert "lossconfig" in TRAINING_ONLY_KEYS["first_stage"]


def test_invalid_values_name_their_path() -> None:
    data = _v1()
    data["model"]["params"]["unet_config"]["params"]["model_channels"] = "wide"
    with pytest.raises(ValueError, match=r"model\.params\.unet_config\.params\.model_channels"):
        config_from_yaml(data)


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ("ldm.models.diffusion.ddpm.LatentUpscaleDiffusion", "upscaler"),
        ("ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion", "unCLIP"),
        ("ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion", "depth2img"),
        ("sgm.models.diffusion.DiffusionEngine", "SDXL"),
    ],
)
def test_unsupported_targets_say_so(target: str, words: str) -> None:
    data = _v1()
    data["model"]["target"] = target
    with pytest.raises(ValueError, match="not supported") as err:
        config_from_yaml(data)
    assert words in str(err.value)


def test_unknown_target_lists_supported_ones() -> None:
    data = _v1()
    data["model"]["target"] = "my.pkg.FancyDiffusion"
    with pytest.raises(ValueError, match="LatentDiffusion"):
        config_from_yaml(data)


def test_unsupported_options_only_at_their_default() -> None:
    data = _v1()
    data["model"]["params"]["unet_config"]["params"]["disable_self_attentions"] = None
    assert config_from_yaml(data) == FAMILIES["sd1"].config
    data["model"]["params"]["unet_config"]["params"]["disable_self_attentions"] = [True, True, True, False]
    with pytest.raises(ValueError, match=r"disable_self_attentions.*not supported"):
        config_from_yaml(data)
    data = _v1()
    data["model"]["params"]["unet_config"]["params"]["num_classes"] = "sequential"
    with pytest.raises(ValueError, match="sequential"):
        config_from_yaml(data)


def test_conditioning_key_follows_the_original_rules() -> None:
    churches = copy.deepcopy(FAMILIES["ldm-lsun-churches"].original_yaml)
    assert config_from_yaml(churches).diffusion.conditioning_key is None  # type: ignore[union-attr]
    sr = copy.deepcopy(FAMILIES["ldm-sr-bsr"].original_yaml)
    assert "conditioning_key" not in sr["model"]["params"]
    assert config_from_yaml(sr).diffusion.conditioning_key == "concat"  # type: ignore[union-attr]
    sr["model"]["params"]["concat_mode"] = False
    assert config_from_yaml(sr).diffusion.conditioning_key == "crossattn"  # type: ignore[union-attr]
    # unconditional but forced to keep a conditioning key: written and read back with force_null_conditioning
    base = FAMILIES["ldm-lsun-churches"].config
    forced = base.model_copy(
        update={"diffusion": base.diffusion.model_copy(update={"conditioning_key": "crossattn"})}
    )  # type: ignore[union-attr]
    assert config_from_yaml(config_to_yaml(forced)) == forced


def test_first_stage_condition_marker() -> None:
    config = FAMILIES["ldm-inpaint"].config
    assert config.cond_stage is not None and config.cond_stage.target == FIRST_STAGE_COND
    assert config_to_yaml(config)["model"]["params"]["cond_stage_config"] == "__is_first_stage__"
    assert FAMILIES["ldm-celebahq256"].config.cond_stage is None


def test_attention_kernels_of_the_original_map_to_vanilla() -> None:
    data = _v1()
    data["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "vanilla-xformers"
    assert config_from_yaml(data) == FAMILIES["sd1"].config
    data["model"]["params"]["first_stage_config"]["params"]["ddconfig"]["attn_type"] = "linear"
    with pytest.raises(ValueError, match="LinAttnBlock"):
        config_from_yaml(data)


def test_inpainting_targets() -> None:
    assert config_to_yaml(FAMILIES["sd2-inpaint"].config)["model"]["target"].endswith(
        "LatentInpaintDiffusion"
    )
    assert config_to_yaml(FAMILIES["sd2"].config)["model"]["target"].endswith(".LatentDiffusion")
    data = copy.deepcopy(FAMILIES["sd1-inpaint"].original_yaml)
    data["model"]["params"]["concat_keys"] = ["mask", "masked_image"]
    assert config_from_yaml(data) == FAMILIES["sd1-inpaint"].config
    data["model"]["params"]["concat_keys"] = ["depth"]
    with pytest.raises(ValueError, match="concat_keys"):
        config_from_yaml(data)


def test_get_family_lists_known_names() -> None:
    with pytest.raises(KeyError, match="sd1"):
        get_family("sd3")
