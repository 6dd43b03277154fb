"""ldm_sdk.load / save: round trips, Lightning files, EMA, strict errors, dtype, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import ldm_sdk
from ldm_sdk.checkpoints import loader
from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.checkpoints.detect import UnknownCheckpointError
from ldm_sdk.checkpoints.keys import CheckpointMismatchError
from ldm_sdk.checkpoints.loader import save
from ldm_sdk.models.configs import ModelConfig
from tests.checkpoints.fakes import lightning_checkpoint, lightning_classes, save_torch
from tests.tiny_configs import ALL, LDM_KL_F4_UNCOND, SD1, SD2_V, random_bundle


def _outputs(bundle: ModelBundle) -> list[torch.Tensor]:
    """A fixed UNet forward and a decode: what the weights compute, not just what they are."""
    g = torch.Generator().manual_seed(123)
    cfg = bundle.config
    z = torch.randn(1, bundle.latent_channels, 4, 4, generator=g)
    with torch.no_grad():
        outs = [bundle.decode_first_stage(z)]
        if cfg.unet is not None:
            x = torch.randn(1, cfg.unet.in_channels, 8, 8, generator=g)
            ctx = torch.randn(1, 5, cfg.unet.context_dim, generator=g) if cfg.unet.context_dim else None
            outs.append(bundle.unet(x, torch.tensor([17]), context=ctx))
    return outs


def _assert_same_state(a: ModelBundle, b: ModelBundle) -> None:
    sa, sb = a.compvis_state_dict(), b.compvis_state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not (sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]))]
    assert not different, different[:5]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("name", list(ALL))
def test_round_trip(tmp_path: Path, name: str, suffix: str) -> None:
    config = ALL[name]
    original = random_bundle(config, seed=3, ema=config.unet is not None).eval()
    path = save(original, tmp_path / f"model{suffix}", metadata={"global_step": 77})

    loaded = ldm_sdk.load(path)  # no config: the one save() embedded
    assert isinstance(loaded, ModelBundle) and loaded.config == config
    _assert_same_state(original, loaded)
    assert loaded.scale_factor == original.scale_factor
    assert loaded.source.global_step == 77  # type: ignore[union-attr]
    for got, want in zip(_outputs(loaded), _outputs(original), strict=True):
        assert torch.equal(got, want)
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_explicit_config_and_mapping(tmp_path: Path) -> None:
    original = random_bundle(LDM_KL_F4_UNCOND, seed=1)
    path = save(original, tmp_path / "m.safetensors")
    _assert_same_state(original, ldm_sdk.load(path, LDM_KL_F4_UNCOND))
    _assert_same_state(original, ldm_sdk.load(path, LDM_KL_F4_UNCOND.model_dump()))


def test_original_yaml_config(tmp_path: Path) -> None:
    from ldm_sdk.checkpoints.original_config import config_to_yaml

    yaml_path = tmp_path / "v1-tiny.yaml"
    yaml_path.write_text(yaml.safe_dump(config_to_yaml(SD1)))
    original = random_bundle(SD1, seed=6)
    path = save(original, tmp_path / "m.ckpt")
    loaded = ldm_sdk.load(path, yaml_path)
    assert loaded.config.unet == SD1.unet and loaded.config.first_stage == SD1.first_stage
    _assert_same_state(original, loaded)


def test_without_config_or_embedded_config_detection_decides(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(random_bundle(SD1).compvis_state_dict(), str(path))  # not written by save(): no config inside
    with pytest.raises(UnknownCheckpointError):  # tiny-sd1 is no known family
        ldm_sdk.load(path)


def test_lightning_checkpoint_with_uninstalled_classes(tmp_path: Path) -> None:
    original = random_bundle(SD1, seed=2)
    state = original.compvis_state_dict()
    state["loss.discriminator.main.0.weight"] = torch.ones(2)  # training-only: skipped
    state["logvar"] = torch.zeros(1000)
    path = tmp_path / "last.ckpt"
    with lightning_classes(tmp_path / "ran") as classes:
        save_torch(lightning_checkpoint(state, classes), path)
    loaded = ldm_sdk.load(path, SD1)
    assert torch.equal(loaded.extra_entries["logvar"], torch.zeros(1000))
    _assert_same_state(original, _without(loaded, "logvar"))
    assert loaded.skipped_entries == ("loss.discriminator.main.0.weight",)
    assert loaded.source.reader == "restricted" and loaded.source.global_step == 1234  # type: ignore[union-attr]
    assert loaded.cond_stage_weights.keys() == original.cond_stage_weights.keys()
    assert not (tmp_path / "ran").exists()


def _without(bundle: ModelBundle, key: str) -> ModelBundle:
    bundle.extra_entries = {k: v for k, v in bundle.extra_entries.items() if k != key}
    return bundle


def test_scale_factor_entry_overrides_config(tmp_path: Path) -> None:
    state = random_bundle(SD1).compvis_state_dict()
    state["scale_factor"] = torch.tensor(0.5)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    assert ldm_sdk.load(path, SD1).scale_factor == 0.5


def test_use_ema_gives_the_ema_outputs(tmp_path: Path) -> None:
    original = random_bundle(SD1, seed=4, ema=True)
    path = save(original, tmp_path / "m.safetensors")

    reference = random_bundle(SD1, seed=4, ema=True)  # the same weights, EMA copied in by hand
    with torch.no_grad():
        for name, p in reference.model.named_parameters():  # type: ignore[union-attr]
            p.copy_(reference.ema_weights["model_ema." + name.replace(".", "")])

    live = _outputs(ldm_sdk.load(path))
    ema = _outputs(ldm_sdk.load(path, use_ema=True))
    want = _outputs(reference)
    assert torch.equal(ema[1], want[1])
    assert not torch.allclose(ema[1], live[1])
    assert torch.equal(ema[0], live[0])  # the first stage has no EMA


def test_use_ema_without_ema_weights(tmp_path: Path) -> None:
    path = save(random_bundle(SD1), tmp_path / "m.ckpt")
    with pytest.raises(
        ValueError, match=r"use_ema=True, but .* has no EMA weights \(no model_ema\.\* entries\)"
    ):
        ldm_sdk.load(path, use_ema=True)


def test_incomplete_ema_is_a_grouped_error(tmp_path: Path) -> None:
    bundle = random_bundle(SD1, ema=True)
    dropped = sorted(k for k in bundle.ema_weights if k.startswith("model_ema.diffusion_modelout"))
    bundle.ema_weights = {k: v for k, v in bundle.ema_weights.items() if k not in dropped}
    path = save(bundle, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"EMA weights \(model_ema\.\*\)") as info:
        ldm_sdk.load(path)
    assert info.value.missing == tuple(dropped) and f"model_ema ({len(dropped)} missing)" in str(info.value)


def test_wrong_config_is_a_grouped_error_with_hint(tmp_path: Path) -> None:
    path = save(random_bundle(SD2_V), tmp_path / "sd2.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        ldm_sdk.load(path, SD1)
    err = info.value
    assert str(path) in str(err) and "'tiny-sd1'" in str(err)
    assert err.mismatched and not err.missing and not err.unexpected
    assert any("context width is 48" in h for h in err.hints)


def test_removed_block_extra_block_and_bad_shape(tmp_path: Path) -> None:
    state = random_bundle(SD1).compvis_state_dict()
    removed = [k for k in state if k.startswith("model.diffusion_model.output_blocks.1.")]
    for key in removed:
        del state[key]
    state["model.diffusion_model.extra.0.weight"] = torch.zeros(2)
    state["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError) as info:
        ldm_sdk.load(path, SD1)
    err = info.value
    assert err.missing == tuple(sorted(removed))
    assert err.unexpected == ("model.diffusion_model.extra.0.weight",)
    assert [m.key for m in err.mismatched] == ["first_stage_model.quant_conv.weight"]
    assert f"model.diffusion_model.output_blocks.1 ({len(removed)} missing)" in str(err)
    assert "first_stage_model.quant_conv.weight: checkpoint [8, 8, 3, 3] vs expected [8, 8, 1, 1]" in str(err)


def test_dtype_converts_networks_not_schedule(tmp_path: Path) -> None:
    path = save(random_bundle(SD1, ema=True), tmp_path / "m.safetensors")
    loaded = ldm_sdk.load(path, dtype=torch.float16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert loaded.schedule is not None and loaded.schedule.alphas_cumprod.dtype == torch.float32
    assert loaded.ema_weights["model_ema.num_updates"].dtype == torch.int32
    with pytest.raises(ValueError, match=r"floating torch\.dtype"):
        ldm_sdk.load(path, dtype=torch.int8)


def test_config_types_are_checked(tmp_path: Path) -> None:
    path = save(random_bundle(SD1), tmp_path / "m.ckpt")
    with pytest.raises(TypeError, match="config must be None, a YAML path, a mapping or a ModelConfig"):
        ldm_sdk.load(path, 3)  # type: ignore[arg-type]


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(random_bundle(SD1, seed=1), tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken(*args: object, **kwargs: object) -> None:
        Path(str(args[1])).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save(random_bundle(SD1, seed=2), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_saved_files_hold_flat_compvis_keys_and_config(tmp_path: Path) -> None:
    bundle = random_bundle(SD1, ema=True)
    path = save(bundle, tmp_path / "m.safetensors", metadata={"note": "x"})
    assert load_file(str(path)).keys() == bundle.compvis_state_dict().keys()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # type: ignore[no-untyped-call]
        meta = f.metadata()
    assert ModelConfig.model_validate_json(meta["ldm_sdk.config"]) == SD1 and meta["note"] == "x"
    ckpt = torch.load(save(bundle, tmp_path / "m.ckpt"), weights_only=True)
    assert ckpt.keys() == {"state_dict", "global_step", "ldm_sdk_config", "ldm_sdk_metadata"}
    with pytest.raises(ValueError, match="valid suffixes"):
        save(bundle, tmp_path / "m.onnx")


def test_loaded_views_are_compacted_on_save(tmp_path: Path) -> None:
    """Tensors mmap'ed from one .ckpt share a storage; re-saving must write each tensor alone."""
    path = save(random_bundle(LDM_KL_F4_UNCOND), tmp_path / "a.ckpt")
    loaded = ldm_sdk.load(path)
    out = save(loaded, tmp_path / "b.safetensors")
    _assert_same_state(loaded, ldm_sdk.load(out))
    assert loader._compact({"a": torch.arange(10)[2:4]})["a"].untyped_storage().nbytes() == 16
