"""diffusers folders in and out, checked against diffusers itself (same random weights through both)."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import pytest
import torch
from diffusers import AutoencoderKL as DAutoencoderKL
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers import VQModel as DVQModel
from torch import Tensor, nn

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.diffusers_format import (
    DiffusersFormatError,
    config_from_diffusers,
    from_diffusers,
    to_diffusers,
)
from ldm_sdk.checkpoints.families import FAMILIES
from ldm_sdk.models.configs import AutoencoderKLConfig, DDConfig, ModelConfig
from tests.tiny_configs import (
    KL_F8_FIRST_STAGE,
    LDM_KL_F4_UNCOND,
    LDM_VQ_F4_CLASS,
    SD1,
    SD2_V,
    SD_INPAINT,
    TINY_VQ_F4,
    random_bundle,
)

# SD1-like, class-conditional, scale-shift norm, two transformer blocks, and a VAE with level attention
_ATTN_VAE = AutoencoderKLConfig(
    ddconfig=DDConfig(
        double_z=True,
        z_channels=4,
        resolution=32,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
    ),
    embed_dim=4,
)
CLASS_COND = SD1.model_copy(
    update={
        "family": "tiny-class-cond",
        "first_stage": _ATTN_VAE,
        "unet": SD1.unet.model_copy(  # type: ignore[union-attr]
            update={"num_classes": 10, "use_scale_shift_norm": True, "transformer_depth": 2}
        ),
    }
)
EXPORTABLE = {
    "sd1": SD1,
    "sd2_v": SD2_V,
    "sd_inpaint": SD_INPAINT,
    "vq_class": LDM_VQ_F4_CLASS,
    "class": CLASS_COND,
}


def rel_err(ours: Tensor, theirs: Tensor) -> float:
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 0  # a comparison of zeros would prove nothing
    return float((ours - theirs).abs().max() / ours.abs().max())


def randomize(*modules: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def unet_inputs(config: ModelConfig) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    assert config.unet is not None and config.unet.context_dim is not None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config.unet.in_channels, 8, 8, generator=g)
    t = torch.tensor([7, 613])
    context = torch.randn(2, 5, config.unet.context_dim, generator=g)
    labels = torch.tensor([1, config.unet.num_classes - 1]) if config.unet.num_classes else None
    return x, t, context, labels


def compare_unet(bundle: ModelBundle, theirs: UNet2DConditionModel) -> float:
    x, t, context, labels = unet_inputs(bundle.config)
    with torch.no_grad():
        ours = bundle.unet(x, t, context=context, y=labels)
        ref = theirs.eval()(x, t, encoder_hidden_states=context, class_labels=labels).sample
    return rel_err(ours, ref)


def compare_first_stage(bundle: ModelBundle, theirs: nn.Module) -> tuple[float, float]:
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, 32, 32, generator=g)
    z = torch.randn(1, bundle.latent_channels, 8, 8, generator=g)
    fsm = bundle.first_stage_model
    with torch.no_grad():
        if isinstance(theirs, DAutoencoderKL):
            enc = rel_err(fsm.encode(image).mode(), theirs.encode(image).latent_dist.mode())  # type: ignore[union-attr]
        else:
            enc = rel_err(fsm.encode(image), theirs.encode(image).latents)  # type: ignore[arg-type]
        dec = rel_err(fsm.decode(z), theirs.decode(z).sample)
    return enc, dec


@pytest.mark.parametrize("name", sorted(EXPORTABLE))
def test_to_diffusers_matches_diffusers(name: str, tmp_path: Path) -> None:
    config = EXPORTABLE[name]
    bundle = random_bundle(config).eval()
    to_diffusers(bundle, tmp_path)

    assert compare_unet(bundle, UNet2DConditionModel.from_pretrained(tmp_path / "unet")) <= 1e-5
    vae_class = DAutoencoderKL if config.first_stage.kind == "kl" else DVQModel
    vae = vae_class.from_pretrained(tmp_path / "vae").eval()
    enc, dec = compare_first_stage(bundle, vae)
    assert enc <= 1e-5 and dec <= 1e-5
    assert vae.config.scaling_factor == pytest.approx(bundle.scale_factor)

    scheduler = DDIMScheduler.from_pretrained(tmp_path / "scheduler")
    assert bundle.schedule is not None
    assert torch.allclose(
        scheduler.alphas_cumprod.double(), bundle.schedule.alphas_cumprod.double(), atol=1e-6
    )
    expected = {"eps": "epsilon", "v": "v_prediction"}[bundle.parameterization or "eps"]
    assert scheduler.config.prediction_type == expected

    # ... and back: the same CompVis weights, config and scale factor
    back = from_diffusers(tmp_path)
    assert back.config == config and back.scale_factor == bundle.scale_factor
    ours = {k: v for k, v in bundle.compvis_state_dict().items() if not k.startswith("cond_stage_model.")}
    theirs = back.compvis_state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_exported_folder_loads_as_a_pipeline(tmp_path: Path) -> None:
    to_diffusers(random_bundle(SD1), tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    pipe = diffusers.DiffusionPipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.scheduler, DDIMScheduler)


def _diffusers_sd_folder(folder: Path, *, v: bool, safe: bool) -> tuple[UNet2DConditionModel, DAutoencoderKL]:
    """A tiny SD-2-like pipeline made and saved by diffusers itself (random weights)."""
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=24,
        attention_head_dim=(2, 4, 4),  # diffusers' name for the head count: 16 channels per head
        use_linear_projection=True,
        num_class_embeds=5,
    )
    vae = DAutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=32,
        scaling_factor=0.5,
    )
    randomize(unet, vae)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=safe)
    return unet, vae


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_diffusers_matches_diffusers(safe: bool, tmp_path: Path) -> None:
    unet, vae = _diffusers_sd_folder(tmp_path, v=True, safe=safe)
    bundle = from_diffusers(tmp_path)
    config = bundle.config
    assert config.unet is not None and config.diffusion is not None
    assert config.unet.num_head_channels == 16 and config.unet.use_linear_in_transformer
    assert config.unet.num_classes == 5 and config.unet.attention_resolutions == (1, 2)
    assert config.diffusion.parameterization == "v" and config.diffusion.conditioning_key == "crossattn"
    assert bundle.scale_factor == 0.5
    assert compare_unet(bundle, unet) <= 1e-5
    enc, dec = compare_first_stage(bundle, vae.eval())
    assert enc <= 1e-5 and dec <= 1e-5
    ref = DDIMScheduler.from_pretrained(tmp_path / "scheduler").alphas_cumprod
    assert bundle.schedule is not None
    assert torch.allclose(ref.double(), bundle.schedule.alphas_cumprod.double(), atol=1e-6)


def test_from_diffusers_vq_components_without_model_index(tmp_path: Path) -> None:
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=7,  # 3 latent + 4 extra concat channels: hybrid conditioning
        out_channels=3,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=16,
        attention_head_dim=1,
        resnet_time_scale_shift="scale_shift",
    )
    vq = DVQModel(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=32,
        mid_block_add_attention=False,
        scaling_factor=1.0,
    )
    randomize(unet, vq)
    unet.save_pretrained(tmp_path / "unet")
    vq.save_pretrained(tmp_path / "vae")
    PNDMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear").save_pretrained(
        tmp_path / "scheduler"
    )
    bundle = from_diffusers(tmp_path)
    assert bundle.config.first_stage.kind == "vq" and bundle.config.first_stage.ddconfig.attn_type == "none"
    assert bundle.conditioning_key == "hybrid"
    assert compare_unet(bundle, unet) <= 1e-5
    enc, dec = compare_first_stage(bundle, vq.eval())
    assert enc <= 1e-5 and dec <= 1e-5


def _save_configs(folder: Path, unet: dict, vae: dict, scheduler: dict) -> None:
    for sub, name, data in (
        ("unet", "config.json", unet),
        ("vae", "config.json", vae),
        ("scheduler", "scheduler_config.json", scheduler),
    ):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_text(json.dumps(data))


# The component configs of the released diffusers SD 1.5 / 2.1 folders (only the fields that differ from
# the diffusers defaults, which are SD 1.x's), written from the hub repositories.
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "sample_size": 512,
}
SD15_UNET = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768, "sample_size": 64}
SD21_UNET = {
    "_class_name": "UNet2DConditionModel",
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
}
SD_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def _full_config(cls: type, overrides: dict) -> dict:
    """A diffusers class's whole config (its defaults plus ``overrides``), as save_pretrained writes it."""
    init = {k: v for k, v in overrides.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls(**init)
    return {"_class_name": cls.__name__, **dict(model.config)}


@pytest.mark.parametrize(
    ("unet", "prediction", "family"),
    [(SD15_UNET, "epsilon", "sd1"), (SD21_UNET, "v_prediction", "sd2-v"), (SD21_UNET, "epsilon", "sd2")],
)
def test_released_diffusers_configs_are_the_families(
    unet: dict, prediction: str, family: str, tmp_path: Path
) -> None:
    _save_configs(
        tmp_path,
        _full_config(UNet2DConditionModel, unet),
        _full_config(DAutoencoderKL, SD_VAE),
        {**SD_SCHEDULER, "prediction_type": prediction},
    )
    config, scale = config_from_diffusers(tmp_path)
    assert config.family == family and config == FAMILIES[family].config
    assert scale == 0.18215


def test_unsupported_models_are_refused(tmp_path: Path) -> None:
    bundle = random_bundle(LDM_KL_F4_UNCOND)
    with pytest.raises(DiffusersFormatError, match="AttentionBlock"):
        to_diffusers(bundle, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written

    _save_configs(
        tmp_path,
        _full_config(UNet2DConditionModel, {**SD15_UNET, "class_embed_type": "timestep"}),
        _full_config(DAutoencoderKL, SD_VAE),
        SD_SCHEDULER,
    )
    with pytest.raises(DiffusersFormatError, match="class_embed_type='timestep'"):
        config_from_diffusers(tmp_path)

    _save_configs(
        tmp_path,
        _full_config(UNet2DConditionModel, SD15_UNET),
        _full_config(DAutoencoderKL, SD_VAE),
        {**SD_SCHEDULER, "beta_schedule": "exponential"},
    )
    with pytest.raises(DiffusersFormatError, match="beta_schedule='exponential'"):
        config_from_diffusers(tmp_path)


def test_edited_folder_is_detected(tmp_path: Path) -> None:
    to_diffusers(random_bundle(SD1), tmp_path)
    sched = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    sched["prediction_type"] = "v_prediction"
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    with pytest.raises(DiffusersFormatError, match="does not match"):
        from_diffusers(tmp_path)


def test_clip_text_encoder_is_carried_over(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    _diffusers_sd_folder(tmp_path, v=False, safe=True)
    config = transformers.CLIPTextConfig(
        hidden_size=768,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=50,
        max_position_embeddings=8,
    )
    encoder = transformers.CLIPTextModel(config)
    encoder.save_pretrained(tmp_path / "text_encoder")
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    bundle = from_diffusers(tmp_path)
    assert bundle.config.cond_stage is not None
    assert bundle.config.cond_stage.target.endswith("FrozenCLIPEmbedder")
    expected = {"transformer." + k: v for k, v in encoder.state_dict().items()}
    got = bundle.cond_stage_weights
    assert expected.keys() <= got.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("config", [KL_F8_FIRST_STAGE, ModelConfig(family="tiny-vq", first_stage=TINY_VQ_F4)])
def test_first_stage_only_folders(config: ModelConfig, tmp_path: Path) -> None:
    bundle = random_bundle(config).eval()
    to_diffusers(bundle, tmp_path)
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "unet").exists()
    vae_class = DAutoencoderKL if config.first_stage.kind == "kl" else DVQModel
    enc, dec = compare_first_stage(bundle, vae_class.from_pretrained(tmp_path).eval())
    assert enc <= 1e-5 and dec <= 1e-5
    back = from_diffusers(tmp_path)
    assert back.config == config and back.model is None
    ours, theirs = bundle.compvis_state_dict(), back.compvis_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_diffusers_made_vae_folder(tmp_path: Path) -> None:
    vae = DAutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=32,
    )
    randomize(vae)
    vae.save_pretrained(tmp_path)
    bundle = from_diffusers(tmp_path)
    assert bundle.config.family == "custom" and bundle.config.first_stage.ddconfig.ch_mult == (1, 1, 2)
    enc, dec = compare_first_stage(bundle, vae.eval())
    assert enc <= 1e-5 and dec <= 1e-5
