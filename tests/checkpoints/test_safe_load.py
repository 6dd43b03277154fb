"""Reading checkpoint files without running their code: Lightning files, malicious pickles, formats."""

from __future__ import annotations

import builtins
import functools
import hashlib
import io
import os
import pickle
import subprocess
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_sdk.checkpoints.safe_load import CheckpointReadError, read_checkpoint
from ldm_sdk.checkpoints.unpickler import InertObject, UnsafeCheckpointError, restricted_loads
from tests.checkpoints.fakes import Payload, lightning_checkpoint, lightning_classes, save_torch


def _weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
        "first_stage_model.decoder.conv_out.bias": torch.randn(3, generator=g),
        "betas": torch.linspace(1e-4, 2e-2, 10),
    }


# -- Lightning checkpoints ---------------------------------------------------------------------------------
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("importable", [False, True], ids=["modules-gone", "modules-importable"])
def test_lightning_checkpoint_loads_with_inert_placeholders(
    tmp_path: Path, legacy: bool, importable: bool
) -> None:
    marker = tmp_path / "class-code-ran"
    weights = _weights()
    path = tmp_path / "last.ckpt"
    with lightning_classes(marker) as classes:
        save_torch(lightning_checkpoint(weights, classes), path, legacy=legacy)
        if importable:  # even when the real classes could be imported, none is used
            ckpt = read_checkpoint(path)
    if not importable:
        ckpt = read_checkpoint(path)

    assert ckpt.reader == "restricted"
    assert ckpt.format == ("torch-legacy" if legacy else "torch-zip")
    assert ckpt.tensors.keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(ckpt.tensors[key], value)
        assert type(ckpt.tensors[key]) is torch.Tensor
    assert ckpt.global_step == 1234 and ckpt.metadata["epoch"] == 3
    assert ckpt.metadata["pytorch-lightning_version"] == "1.4.2"
    assert set(ckpt.metadata["other_entries"]) == {"callbacks", "optimizer_states", "lr_schedulers"}  # type: ignore[arg-type]
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in ckpt.placeholders
    assert "argparse.Namespace" in ckpt.placeholders
    assert "omegaconf.dictconfig.DictConfig" in ckpt.placeholders

    hp = ckpt.metadata["hyper_parameters"]
    assert isinstance(hp, dict)
    assert hp["__inert__"] == "pytorch_lightning.utilities.parsing.AttributeDict"
    items = hp["dict_items"]
    assert items["args"] == {
        "__inert__": "argparse.Namespace",
        "state": {"base": ["configs/x.yaml"], "seed": 23, "scale_lr": True},
    }
    assert items["stage"] == {"__inert__": "pytorch_lightning.trainer.states.TrainerFn", "args": ["fit"]}
    assert items["model_cfg"]["state"]["_content"]["target"] == "ldm.models.X"
    assert items["dtype"] == "float32"
    assert not marker.exists(), marker.read_text()


def test_placeholders_record_and_do_nothing() -> None:
    with lightning_classes(Path(os.devnull)) as classes:
        cb = classes["ModelCheckpoint"](dirpath="d", save_top_k=3)
        data = pickle.dumps({"cb": cb, "cls": classes["ModelCheckpoint"]}, protocol=2)
    obj = restricted_loads(data)
    placeholder = obj["cb"]
    assert isinstance(placeholder, InertObject)
    assert type(placeholder).inert_class == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert placeholder.state == {"dirpath": "d", "save_top_k": 3}
    assert issubclass(obj["cls"], InertObject)
    assert not hasattr(placeholder, "dirpath")  # the state was recorded, not applied
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(placeholder)


# -- malicious pickles -------------------------------------------------------------------------------------
def _payloads(marker: Path) -> dict[str, tuple[object, str]]:
    touch = f"touch {marker}"
    return {
        "os.system": (Payload(os.system, (touch,)), "posix.system"),
        "builtins.eval": (Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)), "builtins.eval"),
        "subprocess.Popen": (Payload(subprocess.Popen, (["touch", str(marker)],)), "subprocess.Popen"),
        "functools.partial": (Payload(functools.partial(os.system, touch), ()), "functools.partial"),
        "nested-in-hparams": (
            {"hyper_parameters": {"cfg": {"deep": [1, Payload(os.system, (touch,))]}}},
            "posix.system",
        ),
        "torch-rebuild-with-eval": (
            Payload(torch._tensor._rebuild_from_type_v2, (builtins.eval, torch.Tensor, ("1",), None)),
            "builtins.eval",
        ),
        # only allowed globals, but an allowed torch function handed a callable that is not a rebuild function
        "torch-rebuild-with-str": (
            Payload(torch._tensor._rebuild_from_type_v2, (str, torch.Tensor, ("1",), None)),
            "torch._tensor._rebuild_from_type_v2",
        ),
    }


def _malicious_checkpoint(payload: object) -> dict[str, object]:
    return {"state_dict": _weights(), "global_step": 1, "hyper_parameters": {"evil": payload}}


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain-pickle"])
@pytest.mark.parametrize(
    "name",
    [
        "os.system",
        "builtins.eval",
        "subprocess.Popen",
        "functools.partial",
        "nested-in-hparams",
        "torch-rebuild-with-eval",
        "torch-rebuild-with-str",
    ],
)
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, name: str, kind: str) -> None:
    marker = tmp_path / "pwned"
    payload, refused = _payloads(marker)[name]
    path = tmp_path / "model.ckpt"
    obj = _malicious_checkpoint(payload)
    if (
        kind == "plain-pickle"
    ):  # (a plain pickle of tensors names torch.storage._load_from_bytes: refused too)
        path.write_bytes(pickle.dumps({"hyper_parameters": {"evil": payload}}, protocol=2))
    else:
        save_torch(obj, path, legacy=kind == "legacy")

    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert refused in info.value.refused
    message = str(info.value)
    assert refused in message and str(path) in message
    assert "not loaded" in message and "nothing in it was executed" in message
    assert not marker.exists()


def test_the_payload_is_live_when_loaded_unsafely(tmp_path: Path) -> None:
    """Control: the os.system payload really runs under an unrestricted load, so the test above can fail."""
    marker = tmp_path / "pwned"
    path = save_torch(_malicious_checkpoint(_payloads(marker)["os.system"][0]), tmp_path / "m.ckpt")
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_every_refused_global_is_named_before_anything_is_built(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = _payloads(marker)
    obj = {"a": payloads["os.system"][0], "b": payloads["subprocess.Popen"][0]}
    path = save_torch({"state_dict": _weights(), "x": obj}, tmp_path / "m.pt")
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    assert {"posix.system", "subprocess.Popen"} <= set(info.value.refused)


def test_copyreg_extension_codes_are_refused() -> None:
    data = pickle.PROTO + bytes([2]) + pickle.EXT1 + bytes([1]) + pickle.STOP
    with pytest.raises(UnsafeCheckpointError, match="extension"):
        restricted_loads(data)


def test_codecs_encode_only_for_latin1() -> None:
    assert restricted_loads(pickle.dumps(b"\x00\xffab", protocol=2)) == b"\x00\xffab"
    evil = Payload(__import__("_codecs").encode, ("x", "rot13"))
    with pytest.raises(UnsafeCheckpointError, match="latin-1"):
        restricted_loads(pickle.dumps(evil, protocol=2))


# -- formats and nesting -----------------------------------------------------------------------------------
def test_safetensors_keeps_metadata_and_sha256(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file(_weights(), str(path), metadata={"global_step": "42", "note": "hi"})
    ckpt = read_checkpoint(path)
    assert ckpt.format == "safetensors" and ckpt.global_step == 42 and ckpt.metadata["note"] == "hi"
    assert all(torch.equal(ckpt.tensors[k], v) for k, v in _weights().items())
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("wrap", "nested"),
    [
        (lambda w: w, None),
        (lambda w: {"model": w, "step": 5}, "model"),
        (lambda w: {"module": OrderedDict(w)}, "module"),
        (lambda w: {"model": {"state_dict": w}, "epoch": 2}, "model"),
    ],
    ids=["plain", "model", "module", "model.state_dict"],
)
def test_weights_found_where_checkpoints_nest_them(tmp_path: Path, wrap, nested) -> None:  # type: ignore[no-untyped-def]
    path = save_torch(wrap(_weights()), tmp_path / "w.pth")
    ckpt = read_checkpoint(path)
    assert ckpt.reader == "weights_only"
    assert ckpt.tensors.keys() == _weights().keys()
    assert ckpt.metadata.get("nested_under") == nested


def test_parameters_become_plain_tensors(tmp_path: Path) -> None:
    path = save_torch({"w": torch.nn.Parameter(torch.ones(2)), "n": np.int64(3)}, tmp_path / "w.pt")
    ckpt = read_checkpoint(path)
    assert type(ckpt.tensors["w"]) is torch.Tensor and not ckpt.tensors["w"].requires_grad
    assert ckpt.metadata["n"] == 3


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "not a checkpoint"),
        (b"model:\n  target: ldm.x\n", "not a checkpoint"),
        (b"PK\x03\x04garbage", "damaged zip"),
    ],
)
def test_unreadable_files_say_what_they_are(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointReadError, match=match):
        read_checkpoint(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointReadError, match="folder"):
        read_checkpoint(tmp_path)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(CheckpointReadError, match="TorchScript"):
        read_checkpoint(path)


def test_a_pickle_without_tensors_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointReadError, match="no tensors"):
        read_checkpoint(path)
    buf = io.BytesIO()
    torch.save([torch.zeros(1)], buf)
    (tmp_path / "l.pt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointReadError, match="not a dict"):
        read_checkpoint(tmp_path / "l.pt")
