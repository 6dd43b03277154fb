"""Frozen all-MiniLM-L6-v2 text encoder, checked against sentence-transformers' own encode() of the same
packaged model: that independent reference proves weights, tokenizer and pooling load correctly."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch

from ldm_sdk.encoders.base import EncoderSpec
from ldm_sdk.encoders.text_minilm import FrozenMiniLMEmbedder
from ldm_sdk.encoders.tokenizers import minilm_model_dir
from tests.encoders.text_helpers import check_deterministic_and_batch_independent

LONG = "a very long prompt about many things " * 20
TEXTS = ["a photo of a cat", "An oil painting of a lighthouse at dusk, storm clouds, dramatic light", "", "x"]


@pytest.fixture(scope="module")
def enc() -> FrozenMiniLMEmbedder:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*_: object, **__: object) -> None:
        raise AssertionError("tried to open a network connection")

    mp.setattr(socket.socket, "connect", no_network)
    try:
        e = FrozenMiniLMEmbedder()
        e.tokenize(["warm up the tokenizer"])
    finally:
        mp.undo()
    return e


def test_shapes_contract_and_frozen(enc: FrozenMiniLMEmbedder) -> None:
    out = enc(TEXTS)
    assert out.shape == (4, 77, 384) and out.dtype == torch.float32
    enc.contract().check(out, batch=4)
    assert not FrozenMiniLMEmbedder.trainable
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.transformer.training  # no dropout, ever
    assert sum(p.numel() for p in enc.transformer.parameters()) == pytest.approx(22.7e6, rel=0.01)


def test_wordpiece_ids(enc: FrozenMiniLMEmbedder) -> None:
    ids, mask = enc.tokenize(["a photo of a cat"])
    assert ids[0, :7].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102]
    assert ids[0, 7:].eq(0).all() and mask[0].tolist() == [1] * 7 + [0] * 70


def test_pooled_output_equals_sentence_transformers(enc: FrozenMiniLMEmbedder) -> None:
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is the reference")
    model = st.SentenceTransformer(str(minilm_model_dir()), device="cpu", local_files_only=True)
    texts = [*TEXTS[:2], "Hello, World!", "the quick brown fox jumps over the lazy dog"]
    want = model.encode(texts, convert_to_tensor=True)  # pads to the longest, mean-pools, normalises
    got = enc.sentence_embedding(texts)
    assert got.shape == (4, 384)
    torch.testing.assert_close(got, want.cpu().float(), atol=1e-5, rtol=0)
    unnormalized = enc.sentence_embedding(texts, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(unnormalized, dim=1), got, atol=1e-6, rtol=0)


def test_token_states_do_not_depend_on_padding(enc: FrozenMiniLMEmbedder) -> None:
    # the attention mask keeps real tokens from seeing [PAD]: their states equal an unpadded run
    ids, _ = enc.tokenize(["a photo of a cat"])
    with torch.no_grad():
        unpadded = enc.transformer(input_ids=ids[:, :7]).last_hidden_state
    torch.testing.assert_close(enc(["a photo of a cat"])[:, :7], unpadded, atol=1e-5, rtol=0)


def test_deterministic_and_batch_independent(enc: FrozenMiniLMEmbedder) -> None:
    check_deterministic_and_batch_independent(enc, atol=1e-5)


def test_unconditional_is_the_empty_prompt(enc: FrozenMiniLMEmbedder) -> None:
    uc = enc.unconditional(3)
    assert uc.shape == (3, 77, 384)
    torch.testing.assert_close(uc, enc(["", "", ""]), atol=1e-5, rtol=0)


def test_dtype_moves(enc: FrozenMiniLMEmbedder) -> None:
    ref = enc(["a red car"])
    e = copy.deepcopy(enc)  # the shared fixture keeps its float32 weights
    torch.testing.assert_close(e.to(torch.float64)(["a red car"]), ref.double(), atol=1e-4, rtol=1e-4)
    out = e.to(torch.bfloat16)(["a red car"])
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert (out.float() - ref).abs().mean() < 0.05


def test_check_length_refuses_long_prompts_forward_truncates(enc: FrozenMiniLMEmbedder) -> None:
    enc.check_length(TEXTS)
    with pytest.raises(
        ValueError, match=r"prompt is \d+ tokens; this encoder takes at most 77 \(75 \+ start/end\)"
    ):
        enc.check_length(["fine", LONG])
    ids, _ = enc.tokenize([LONG])
    assert ids.shape == (1, 77) and ids[0, -1].item() == 102
    assert enc([LONG]).shape == (1, 77, 384)


def test_bad_model_path_and_max_length(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        FrozenMiniLMEmbedder(model_path=tmp_path)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 512\]"):
        FrozenMiniLMEmbedder(max_length=600)


def test_spec_declares_a_frozen_text_crossattn_encoder() -> None:
    spec = EncoderSpec.of(FrozenMiniLMEmbedder)
    assert (spec.modality, spec.kind, spec.trainable) == ("text", "crossattn", False)
