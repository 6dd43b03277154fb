"""ClassEmbedder: CompVis key names, one token per label, the null class, label validation."""

from __future__ import annotations

import pytest
import torch

from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.encoders.class_embedder import ClassEmbedder


def _compvis_state(n_classes: int, dim: int) -> dict[str, torch.Tensor]:
    # what cond_stage_model.* of a cin256-v2 checkpoint holds, prefix removed
    return {"embedding.weight": torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(3))}


def test_strict_load_and_rows_are_the_table() -> None:
    state = _compvis_state(11, 8)
    enc = ClassEmbedder(embed_dim=8, n_classes=11, uncond_class=10)
    enc.load_state_dict(state, strict=True)
    out = enc(torch.tensor([3, 0, 7]))
    assert out.shape == (3, 1, 8)
    # reference: plain row lookup in the checkpoint's table, one token each
    expected = torch.stack([state["embedding.weight"][i] for i in (3, 0, 7)])[:, None, :]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    enc.contract().check(out, batch=3)
    assert isinstance(enc.conditioning(out), Conditioning) and enc.conditioning(out).crossattn is out


def test_list_labels_and_from_state_dict() -> None:
    state = _compvis_state(1001, 4)
    enc = ClassEmbedder.from_state_dict(state, uncond_class=1000)
    assert (enc.n_classes, enc.embed_dim, enc.ucg_class) == (1001, 4, 1000)
    torch.testing.assert_close(enc([5]), state["embedding.weight"][5].reshape(1, 1, 4))


def test_unconditional_is_the_null_class_row() -> None:
    state = _compvis_state(1001, 4)
    enc = ClassEmbedder(4, 1001, key="class_label", uncond_class=1000)
    enc.load_state_dict(state)
    uc = enc.unconditional(2)
    assert uc.shape == (2, 1, 4)
    torch.testing.assert_close(uc, state["embedding.weight"][1000].expand(2, 1, 4), rtol=0, atol=0)


def test_unconditional_without_null_class_raises() -> None:
    enc = ClassEmbedder(4, 1000)
    with pytest.raises(ValueError, match=r"no unconditional class.*n_classes=1001, uncond_class=1000"):
        enc.unconditional(1)


@pytest.mark.parametrize("labels", [[0, 10], [-1], [11]])
def test_out_of_range_labels_name_the_valid_range(labels: list[int]) -> None:
    enc = ClassEmbedder(4, 10)
    bad = [v for v in labels if not 0 <= v < 10]
    with pytest.raises(ValueError, match=rf"class labels \{bad}.*valid labels are 0\.\.9"):
        enc(torch.tensor(labels))


def test_bad_inputs() -> None:
    enc = ClassEmbedder(4, 10)
    with pytest.raises(TypeError, match="integer tensor"):
        enc(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"1-d batch \[B\]"):
        enc(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="uncond_class 10 is not a class"):
        ClassEmbedder(4, 10, uncond_class=10)


def test_metadata_and_trainable() -> None:
    enc = ClassEmbedder(4, 10)
    assert (enc.modality, enc.kind, enc.trainable) == ("class", "crossattn", True)
    assert "ldm.modules.encoders.modules.ClassEmbedder" in enc.compvis_targets
    assert list(enc.state_dict()) == ["embedding.weight"]
    assert all(p.requires_grad for p in enc.parameters())
