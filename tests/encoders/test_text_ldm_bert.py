"""LDM BERT text encoder (CompVis ``BERTEmbedder``): tokenizer ids, CompVis key names and parameter count,
and the forward pass against an independent re-derivation of x-transformers' math from the state dict."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.encoders.base import EncoderSpec
from ldm_sdk.encoders.text_ldm_bert import BERTEmbedder
from tests.encoders.text_helpers import check_deterministic_and_batch_independent, randomize

D, DEPTH = 32, 2
HEADS, DIM_HEAD = 8, 64  # x-transformers defaults: fixed whatever n_embed is
LONG = "a very long prompt about many things " * 20  # ~140 WordPiece tokens


@pytest.fixture(scope="module")
def enc() -> BERTEmbedder:
    torch.manual_seed(0)
    e = BERTEmbedder(n_embed=D, n_layer=DEPTH)
    randomize(e, scale=0.3)
    return e.eval()


def expected_shapes(d: int, depth: int, vocab: int = 30522, seq: int = 77) -> dict[str, tuple[int, ...]]:
    """CompVis ``TransformerWrapper(attn_layers=Encoder(dim=d, depth=depth))`` state dict, written out."""
    inner = HEADS * DIM_HEAD
    t = "transformer."
    out: dict[str, tuple[int, ...]] = {t + "token_emb.weight": (vocab, d), t + "pos_emb.emb.weight": (seq, d)}
    for i in range(depth):
        a, f = f"{t}attn_layers.layers.{2 * i}.", f"{t}attn_layers.layers.{2 * i + 1}."
        out |= {a + "0.weight": (d,), a + "0.bias": (d,)}
        out |= {a + f"1.{n}.weight": (inner, d) for n in ("to_q", "to_k", "to_v")}
        out |= {a + "1.to_out.weight": (d, inner), a + "1.to_out.bias": (d,)}
        out |= {f + "0.weight": (d,), f + "0.bias": (d,)}
        out |= {f + "1.net.0.0.weight": (4 * d, d), f + "1.net.0.0.bias": (4 * d,)}
        out |= {f + "1.net.2.weight": (d, 4 * d), f + "1.net.2.bias": (d,)}
    out |= {t + "norm.weight": (d,), t + "norm.bias": (d,)}
    out |= {t + "to_logits.weight": (vocab, d), t + "to_logits.bias": (vocab,)}
    return out


def reference_forward(sd: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """x-transformers pre-norm encoder, recomputed from the weights in float64 with explicit softmax."""
    sd = {k: v.double() for k, v in sd.items()}
    t = "transformer."
    d = sd[t + "token_emb.weight"].shape[1]
    n = tokens.shape[1]
    x = sd[t + "token_emb.weight"][tokens] + sd[t + "pos_emb.emb.weight"][:n]
    depth = sum(1 for k in sd if k.endswith("1.to_q.weight"))
    for i in range(depth):
        a, f = f"{t}attn_layers.layers.{2 * i}.", f"{t}attn_layers.layers.{2 * i + 1}."
        h = F.layer_norm(x, (d,), sd[a + "0.weight"], sd[a + "0.bias"], 1e-5)
        q, k, v = (
            (h @ sd[a + f"1.{name}.weight"].T).unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2)
            for name in ("to_q", "to_k", "to_v")
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM_HEAD), dim=-1) @ v
        x = x + att.transpose(1, 2).flatten(2) @ sd[a + "1.to_out.weight"].T + sd[a + "1.to_out.bias"]
        h = F.layer_norm(x, (d,), sd[f + "0.weight"], sd[f + "0.bias"], 1e-5)
        h = h @ sd[f + "1.net.0.0.weight"].T + sd[f + "1.net.0.0.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        x = x + h @ sd[f + "1.net.2.weight"].T + sd[f + "1.net.2.bias"]
    return F.layer_norm(x, (d,), sd[t + "norm.weight"], sd[t + "norm.bias"], 1e-5)


def test_wordpiece_ids_are_bert_base_uncased(enc: BERTEmbedder) -> None:
    assert len(enc.tokenizer) == 30522
    ids = enc.tokenize(["a photo of a cat", "Hello World"])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [101, 1037, 6302, 1997, 1037, 4937, 102]  # [CLS] a photo of a cat [SEP]
    assert ids[1, :4].tolist() == [101, 7592, 2088, 102]  # uncased: "Hello World" == "hello world"
    assert ids[0, 7:].eq(0).all() and ids[1, 4:].eq(0).all()  # [PAD] = 0
    assert enc.tokenize([""])[0, :3].tolist() == [101, 102, 0]


def test_state_dict_has_compvis_names_and_shapes(enc: BERTEmbedder) -> None:
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == expected_shapes(D, DEPTH)


def test_strict_load_of_a_compvis_state_dict() -> None:
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.randn(s, generator=g) for k, s in expected_shapes(D, DEPTH).items()}
    e = BERTEmbedder(n_embed=D, n_layer=DEPTH)
    e.load_state_dict(sd, strict=True)
    assert torch.equal(
        e.transformer.attn_layers.layers[3][1].net[2].weight,
        sd["transformer.attn_layers.layers.3.1.net.2.weight"],
    )
    del sd["transformer.to_logits.bias"]
    with pytest.raises(RuntimeError, match=r"to_logits\.bias"):
        e.load_state_dict(sd, strict=True)


def test_ldm_kl_8_g_parameter_count_on_meta() -> None:
    d, depth, vocab, seq = 1280, 32, 30522, 77
    inner = HEADS * DIM_HEAD
    attn = 2 * d + 3 * d * inner + inner * d + d  # norm, q/k/v (no bias), out (bias)
    ff = 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)  # norm, Linear(d, 4d), Linear(4d, d)
    want = vocab * d + seq * d + depth * (attn + ff) + 2 * d + (d * vocab + vocab)  # ..., norm, to_logits
    with torch.device("meta"):
        e = BERTEmbedder(n_embed=d, n_layer=depth)
    assert sum(p.numel() for p in e.parameters()) == want == 581_994_042
    assert e.transformer.attn_layers.layers[0][1].to_q.weight.shape == (inner, d)
    assert e.contract().channels == 1280 and e.contract().tokens == 77


def test_forward_matches_independent_reference(enc: BERTEmbedder) -> None:
    texts = ["a photo of a cat", "an oil painting of a lighthouse at dusk"]
    out = enc(texts)
    enc.contract().check(out, batch=2)
    ref = reference_forward(enc.state_dict(), enc.tokenize(texts))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_token_id_input_without_tokenizer() -> None:
    e = BERTEmbedder(n_embed=D, n_layer=1, vocab_size=100, max_seq_len=10, use_tokenizer=False)
    ids = torch.randint(0, 100, (3, 10))
    torch.testing.assert_close(e(ids).double(), reference_forward(e.state_dict(), ids), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="integer tensor"):
        e(["text"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs the tokenizer"):
        e.unconditional(1)


def test_deterministic_and_batch_independent(enc: BERTEmbedder) -> None:
    check_deterministic_and_batch_independent(enc, atol=1e-6)


def test_unconditional_is_the_empty_prompt_and_trains(enc: BERTEmbedder) -> None:
    assert BERTEmbedder.trainable and all(p.requires_grad for p in enc.parameters())
    uc = enc.unconditional(3)
    assert uc.shape == (3, 77, D) and uc.requires_grad
    torch.testing.assert_close(uc, enc(["", "", ""]), atol=1e-6, rtol=0)
    uc.sum().backward()
    assert enc.transformer.token_emb.weight.grad is not None
    enc.zero_grad(set_to_none=True)


def test_dtype_moves() -> None:
    e = BERTEmbedder(n_embed=D, n_layer=DEPTH)
    randomize(e, seed=3, scale=0.3)
    ref = e(["a red car"])
    torch.testing.assert_close(e.to(torch.float64)(["a red car"]), ref.double(), atol=1e-5, rtol=1e-5)
    out = e.to(torch.bfloat16)(["a red car"])
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert (out.float() - ref).abs().mean() < 0.1


def test_check_length_refuses_long_prompts_forward_truncates(enc: BERTEmbedder) -> None:
    enc.check_length(["a photo of a cat", ""])
    with pytest.raises(
        ValueError, match=r"prompt is \d+ tokens; this encoder takes at most 77 \(75 \+ start/end\)"
    ):
        enc.check_length(["ok", LONG])
    assert enc.max_length == 77
    ids = enc.tokenize([LONG])
    assert ids.shape == (1, 77) and ids[0, -1].item() == 102  # truncated, [SEP] kept
    assert enc([LONG]).shape == (1, 77, D)


def test_bad_inputs_say_what_is_valid(enc: BERTEmbedder) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        enc("a cat")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one prompt"):
        enc([])
    with pytest.raises(ValueError, match="n_embed must be a positive int"):
        BERTEmbedder(n_embed=0, n_layer=1)
    with pytest.raises(FileNotFoundError, match=r"vocab\.txt"):
        BERTEmbedder(n_embed=D, n_layer=1, tokenizer_path="/nonexistent/folder").tokenize(["a"])


def test_spec_declares_a_trainable_text_crossattn_encoder() -> None:
    spec = EncoderSpec.of(BERTEmbedder)
    assert (spec.modality, spec.kind, spec.trainable) == ("text", "crossattn", True)
    assert spec.compvis_targets == ("ldm.modules.encoders.modules.BERTEmbedder",)
