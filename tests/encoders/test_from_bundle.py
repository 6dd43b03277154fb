"""build_cond_stage: a bundle's original cond_stage_config -> the registered encoder, weights loaded
strictly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.keys import CheckpointMismatchError
from ldm_sdk.checkpoints.loader import load, save
from ldm_sdk.checkpoints.original_config import FIRST_STAGE_COND, UNCONDITIONAL
from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, EncoderSpec, OutputContract
from ldm_sdk.encoders.class_embedder import ClassEmbedder
from ldm_sdk.encoders.from_bundle import UnknownCondStageError, build_cond_stage, known_targets
from ldm_sdk.encoders.layout import LayoutEncoder
from ldm_sdk.encoders.mask import MaskConditioner, MaskedImage
from ldm_sdk.encoders.text_ldm_bert import BERTEmbedder
from ldm_sdk.hookspecs import hookimpl
from ldm_sdk.models.configs import CondStageConfig, ModelConfig
from ldm_sdk.registry import Registry
from ldm_sdk.runtime import Runtime
from ldm_sdk.testing.tiny import (
    LDM_KL_F4_UNCOND,
    LDM_VQ_F4_CLASS,
    SD1,
    TINY_VQ_F4,
    random_bundle,
    tiny_ldm_diffusion,
    tiny_unet,
)

BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"


@pytest.fixture(scope="module")
def runtime() -> Iterator[Runtime]:
    with Runtime.create(load_entrypoints=False, device="cpu") as rt:
        yield rt


@pytest.fixture
def registry(runtime: Runtime) -> Registry[Any]:
    return runtime.registries.condition_encoders


def _ldm_config(in_channels: int, cond_stage_key: str, key: str | None, cond: CondStageConfig) -> ModelConfig:
    """An LDM-zoo-shaped tiny config (VQ-f4, 3 latent channels) with the given conditioning."""
    unet: dict[str, Any] = {"attention_resolutions": (), "num_head_channels": 16}
    if key == "crossattn":
        unet.update(attention_resolutions=(1,), use_spatial_transformer=True, context_dim=16)
    return ModelConfig(
        family="tiny-custom",
        first_stage=TINY_VQ_F4,
        unet=tiny_unet(in_channels, 3, **unet),
        diffusion=tiny_ldm_diffusion(linear_end=0.0205, conditioning_key=key, cond_stage_key=cond_stage_key),
        cond_stage=cond,
    )


def _bundle(config: ModelConfig, weights: dict[str, Tensor]) -> ModelBundle:
    torch.manual_seed(1)
    bundle = ModelBundle(config)
    bundle.cond_stage_weights = weights
    return bundle


# -- the class-conditional model ------------------------------------------------------------------------


def test_class_conditional_bundle_gives_a_class_embedder_with_its_weights(registry: Registry[Any]) -> None:
    bundle = random_bundle(LDM_VQ_F4_CLASS, seed=3)
    table = bundle.cond_stage_weights["embedding.weight"]
    encoder = build_cond_stage(bundle, registry)
    assert isinstance(encoder, ClassEmbedder) and not encoder.training
    assert (encoder.n_classes, encoder.embed_dim, encoder.key) == (10, 32, "class_label")
    assert torch.equal(encoder.embedding.weight, table)
    assert encoder.embedding.weight.data_ptr() != table.data_ptr()  # copied in, not aliased
    torch.testing.assert_close(encoder(torch.tensor([7, 2])), table[[7, 2]][:, None], rtol=0, atol=0)
    # and the UNet accepts what it makes
    cond = encoder.conditioning(encoder(torch.tensor([1, 4])))
    x = torch.randn(2, 3, 8, 8)
    assert bundle.apply_model(x, torch.tensor([10.0, 500.0]), cond).shape == x.shape


def test_through_a_saved_checkpoint(registry: Registry[Any], tmp_path: Path) -> None:
    original = random_bundle(LDM_VQ_F4_CLASS, seed=4)
    loaded = load(save(original, tmp_path / "cin.safetensors"), dtype=torch.float64)
    encoder = build_cond_stage(loaded, registry)
    assert isinstance(encoder, ClassEmbedder)
    assert encoder.embedding.weight.dtype == torch.float64  # follows the bundle
    torch.testing.assert_close(
        encoder.embedding.weight, original.cond_stage_weights["embedding.weight"].double(), rtol=0, atol=0
    )


def test_device_and_dtype_can_be_chosen(registry: Registry[Any]) -> None:
    encoder = build_cond_stage(random_bundle(LDM_VQ_F4_CLASS), registry, dtype=torch.float64, device="cpu")
    assert encoder is not None and encoder.embedding.weight.dtype == torch.float64


def test_weights_of_the_wrong_shape_or_missing_are_a_grouped_error(registry: Registry[Any]) -> None:
    bundle = _bundle(LDM_VQ_F4_CLASS, {"embedding.weight": torch.zeros(10, 16)})
    with pytest.raises(CheckpointMismatchError, match=r"cond_stage_model\.embedding\.weight") as info:
        build_cond_stage(bundle, registry)
    assert "wrong shape" in str(info.value) and "'class' encoder" in str(info.value)
    bundle.cond_stage_weights = {}
    with pytest.raises(CheckpointMismatchError, match="1 missing"):
        build_cond_stage(bundle, registry)


def test_many_missing_keys_are_grouped_by_module(registry: Registry[Any]) -> None:
    # SD1's stand-in weights are 2 tensors of a (tiny) CLIP: most of the text transformer is missing
    tiny_clip = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    with pytest.raises(CheckpointMismatchError) as info:
        build_cond_stage(random_bundle(SD1), registry, params=tiny_clip)
    message = str(info.value)
    assert "'clip-text' encoder" in message and "34 missing, 1 with the wrong shape" in message
    assert "cond_stage_model.transformer.text_model.encoder (32 missing), e.g. layers.0." in message
    assert "token_embedding.weight: checkpoint [20, 32] vs expected [49408, 32]" in message


# -- no encoder, unknown encoders -------------------------------------------------------------------------


def test_unconditional_models_have_no_cond_stage(registry: Registry[Any]) -> None:
    assert build_cond_stage(random_bundle(LDM_KL_F4_UNCOND), registry) is None
    marked = LDM_VQ_F4_CLASS.model_copy(update={"cond_stage": CondStageConfig(target=UNCONDITIONAL)})
    assert build_cond_stage(_bundle(marked, {}), registry) is None
    with pytest.raises(ValueError, match=r"unconditional .* holds 1 cond_stage_model\.\* tensors"):
        build_cond_stage(_bundle(LDM_KL_F4_UNCOND, {"x.weight": torch.zeros(1)}), registry)


def test_an_unclaimed_target_lists_the_known_ones(registry: Registry[Any]) -> None:
    config = LDM_VQ_F4_CLASS.model_copy(
        update={"cond_stage": CondStageConfig(target="ldm.modules.encoders.modules.FrozenT5Embedder")}
    )
    with pytest.raises(UnknownCondStageError) as info:
        build_cond_stage(_bundle(config, {}), registry)
    message = str(info.value)
    assert "FrozenT5Embedder" in message
    assert "ldm.modules.encoders.modules.ClassEmbedder (class)" in message
    assert f"{BERT_TARGET} (layout, ldm-bert)" in message
    assert known_targets(registry)["torch.nn.Identity"] == ["lowres"]


def test_params_that_do_not_fit_say_which_encoder(registry: Registry[Any]) -> None:
    config = LDM_VQ_F4_CLASS.model_copy(
        update={"cond_stage": CondStageConfig(target=LDM_VQ_F4_CLASS.cond_stage.target, params={"dim": 3})}  # type: ignore[union-attr]
    )
    with pytest.raises(ValueError, match=r"params \{'dim': 3\} do not fit the 'class' condition encoder"):
        build_cond_stage(_bundle(config, {}), registry)


class Doubler(ConditionEncoder):
    """A third-party encoder reproducing a made-up CompVis target."""

    modality = "vector"
    kind: ConditioningKind = "crossattn"
    trainable = True
    compvis_targets = ("my_fork.encoders.Doubler",)

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(width))

    def contract(self) -> OutputContract:
        return OutputContract("crossattn", channels=self.scale.shape[0], tokens=1)

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.scale)[:, None]

    def unconditional(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, 1, self.scale.shape[0])


class DoublerPlugin:
    @hookimpl
    def ldm_register_condition_encoders(self, registry: Registry[Any]) -> None:
        registry.add("doubler", EncoderSpec.of(Doubler))


def test_a_plugin_encoder_claims_its_target() -> None:
    config = LDM_VQ_F4_CLASS.model_copy(
        update={"cond_stage": CondStageConfig(target="my_fork.encoders.Doubler", params={"width": 32})}
    )
    bundle = _bundle(config, {"scale": torch.full((32,), 2.0)})
    with Runtime.create(load_entrypoints=False, device="cpu", plugins=[DoublerPlugin()]) as rt:
        encoder = build_cond_stage(bundle, rt.registries.condition_encoders)
    assert isinstance(encoder, Doubler) and torch.equal(encoder.scale, torch.full((32,), 2.0))


# -- one target, two encoders: LDM's BERTEmbedder is the text and the layout encoder ----------------------


def test_bert_target_is_text_for_captions(registry: Registry[Any]) -> None:
    params = {"n_embed": 16, "n_layer": 1, "max_seq_len": 12}
    weights = BERTEmbedder(**params).state_dict()
    config = _ldm_config(3, "caption", "crossattn", CondStageConfig(target=BERT_TARGET, params=params))
    encoder = build_cond_stage(_bundle(config, weights), registry)
    assert type(encoder) is BERTEmbedder
    assert all(torch.equal(v, weights[k]) for k, v in encoder.state_dict().items())


def test_bert_target_is_layout_for_boxes(registry: Registry[Any]) -> None:
    params: dict[str, Any] = {
        "n_embed": 16,
        "n_layer": 1,
        "vocab_size": 8192,
        "max_seq_len": 11,
        "use_tokenizer": False,
    }
    weights = LayoutEncoder(**params, n_object_classes=5).state_dict()
    config = _ldm_config(
        3, "coordinates_bbox", "crossattn", CondStageConfig(target=BERT_TARGET, params=params)
    )
    bundle = _bundle(config, weights)
    # the dataset's class count is not in the original config: asked for, never guessed
    with pytest.raises(ValueError, match="n_object_classes"):
        build_cond_stage(bundle, registry)
    encoder = build_cond_stage(bundle, registry, params={"n_object_classes": 5})
    assert type(encoder) is LayoutEncoder
    assert all(torch.equal(v, weights[k]) for k, v in encoder.state_dict().items())


# -- __is_first_stage__: LDM inpainting ---------------------------------------------------------------------


def _inpaint_bundle(weights: str) -> ModelBundle:
    config = _ldm_config(7, "masked_image", "concat", CondStageConfig(target=FIRST_STAGE_COND))
    bundle = random_bundle(config, seed=2)
    if weights == "copy":  # CompVis saved the shared first stage under cond_stage_model.* as well
        bundle.cond_stage_weights = {k: v.clone() for k, v in bundle.first_stage_model.state_dict().items()}
    elif weights == "different":
        bundle.cond_stage_weights = {k: v + 1 for k, v in bundle.first_stage_model.state_dict().items()}
    else:
        bundle.cond_stage_weights = {}
    return bundle


@pytest.mark.parametrize("weights", ["none", "copy"])
def test_first_stage_cond_is_the_mask_encoder_on_the_bundles_first_stage(
    registry: Registry[Any], weights: str
) -> None:
    bundle = _inpaint_bundle(weights)
    encoder = build_cond_stage(bundle, registry)
    assert isinstance(encoder, MaskConditioner) and encoder.variant == "ldm"
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:24, 8:24], mask[1, :, :16] = 1.0, 1.0
    out = encoder(MaskedImage(image, mask))
    # the map the LDM inpainting model concatenates, from the bundle's own first stage
    binary = (mask >= 0.5).float()
    c = bundle.first_stage_model.encode(torch.where(binary.bool(), -1.0, image))
    expected = torch.cat([c, torch.nn.functional.interpolate(2 * binary - 1, size=c.shape[-2:])], dim=1)
    torch.testing.assert_close(out, expected)
    assert out.shape[1] + bundle.latent_channels == bundle.unet.in_channels == 7


def test_first_stage_cond_with_other_weights_is_refused(registry: Registry[Any]) -> None:
    with pytest.raises(ValueError, match="differ from first_stage_model"):
        build_cond_stage(_inpaint_bundle("different"), registry)


def test_clip_is_built_on_meta_and_takes_the_checkpoint_tensors(
    registry: Registry[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CLIP cond stage skips the random initialisation its checkpoint overwrites (``meta_init``): no
    tensor is left on meta, the position ids are rebuilt, and it encodes exactly as an encoder initialised
    at random and then loaded with the same weights."""
    from ldm_sdk.encoders.text_clip import FrozenCLIPEmbedder

    tiny_clip = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    reference = FrozenCLIPEmbedder(**tiny_clip)  # type: ignore[arg-type]
    torch.manual_seed(3)
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0.0, 0.05)  # weights unlike any initialisation
    bundle = random_bundle(SD1)
    bundle.cond_stage_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    from ldm_sdk.encoders import from_bundle

    built_on: list[str] = []
    construct = from_bundle._construct

    def spy(*args: Any, **kwargs: Any) -> ConditionEncoder:
        made = construct(*args, **kwargs)
        built_on.append(next(made.parameters()).device.type)
        return made

    monkeypatch.setattr(from_bundle, "_construct", spy)
    encoder = build_cond_stage(bundle, registry, params=tiny_clip)
    assert isinstance(encoder, FrozenCLIPEmbedder) and built_on == ["meta"]
    assert registry.get("clip-text").meta_init
    tensors = [*encoder.parameters(), *encoder.buffers()]
    assert not any(t.is_meta for t in tensors) and all(not p.requires_grad for p in encoder.parameters())
    position_ids = encoder.transformer.text_model.embeddings.position_ids
    assert torch.equal(position_ids.cpu(), torch.arange(77)[None])
    prompts = ["a red boat at dawn", ""]
    with torch.inference_mode():
        assert torch.equal(encoder(prompts), reference(prompts))
