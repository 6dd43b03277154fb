"""SD 1.x CLIP text encoder (CompVis ``FrozenCLIPEmbedder``): OpenAI CLIP token ids, the tokenizer folder,
strict loading of SD-1-keyed weights (both ``position_ids`` variants), and the forward pass against an
independent re-derivation of the CLIP text transformer from the state dict."""

from __future__ import annotations

import importlib.util
import math
import socket
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ldm_sdk.encoders import tokenizers
from ldm_sdk.encoders.base import EncoderSpec
from ldm_sdk.encoders.text_clip import VIT_L14_TEXT, FrozenCLIPEmbedder
from tests.encoders.text_helpers import check_deterministic_and_batch_independent, randomize

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
BOS, EOS = 49406, 49407
P = "transformer.text_model."
LONG = "a very long prompt about many things " * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenizers.clip_tokenizer_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def enc(tok_dir: Path) -> FrozenCLIPEmbedder:
    e = FrozenCLIPEmbedder(tokenizer_path=tok_dir, **TINY)
    randomize(e, scale=0.2)
    return e


def reference_forward(sd: dict[str, Tensor], tokens: Tensor, heads: int) -> Tensor:
    """CLIP text transformer (pre-LN, causal, quick-GELU, final LN) in float64 from SD-1 keyed weights."""
    w = {k.removeprefix(P): v.double() for k, v in sd.items() if not k.endswith("position_ids")}
    n = tokens.shape[1]
    d = w["embeddings.token_embedding.weight"].shape[1]
    x = w["embeddings.token_embedding.weight"][tokens] + w["embeddings.position_embedding.weight"][:n]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    depth = sum(1 for k in w if k.endswith("self_attn.q_proj.weight"))

    def lin(h: Tensor, name: str) -> Tensor:
        return h @ w[name + ".weight"].T + w[name + ".bias"]

    def ln(h: Tensor, name: str) -> Tensor:
        return F.layer_norm(h, (d,), w[name + ".weight"], w[name + ".bias"], 1e-5)

    for i in range(depth):
        L = f"encoder.layers.{i}."
        h = ln(x, L + "layer_norm1")
        q, k, v = (
            lin(h, L + f"self_attn.{m}_proj").unflatten(-1, (heads, -1)).transpose(1, 2) for m in "qkv"
        )
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads) + causal, dim=-1) @ v
        x = x + lin(att.transpose(1, 2).flatten(2), L + "self_attn.out_proj")
        h = lin(ln(x, L + "layer_norm2"), L + "mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), L + "mlp.fc2")
    return ln(x, "final_layer_norm")


def _open_clip_tokenizer() -> ModuleType:
    """open_clip's own tokenizer, loaded from its file (``import open_clip`` pulls timm, torchvision)."""
    path = tokenizers.clip_bpe_path().parent / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        pytest.skip(f"open_clip's tokenizer.py cannot be imported here: {exc}")
    return module


# -- tokenizer -----------------------------------------------------------------------------------------


def test_vocab_folder_is_deterministic_lazy_and_complete(tmp_path: Path, tok_dir: Path) -> None:
    assert tokenizers.clip_tokenizer_dir(tok_dir.parent) == tok_dir  # found, not rebuilt
    other = tokenizers.clip_tokenizer_dir(tmp_path)
    for name in tokenizers.CLIP_TOKENIZER_FILES:
        assert (other / name).read_bytes() == (tok_dir / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == [other.name]  # no temporary folder left behind
    vocab, merges = tokenizers.clip_vocab_from_bpe(tokenizers.clip_bpe_path().read_bytes())
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS and vocab["!"] == 0


def test_no_files_written_before_first_tokenization(tmp_path: Path) -> None:
    e = FrozenCLIPEmbedder(cache_dir=tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []
    e.tokenize(["x"])
    assert len(list(tmp_path.iterdir())) == 1


def test_known_ids_and_sd1_padding(enc: FrozenCLIPEmbedder) -> None:
    ids = enc.tokenize(["a photo of a cat", ""])
    assert ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert ids[0, 7:].eq(EOS).all()  # SD 1.x pads with <|endoftext|>
    assert ids[1].tolist() == [BOS] + [EOS] * 76
    assert enc.tokenize(["A Photo  OF a CAT "]).tolist() == ids[:1].tolist()  # lower case, whitespace


def test_ids_equal_open_clip_simple_tokenizer(enc: FrozenCLIPEmbedder) -> None:
    reference = _open_clip_tokenizer().SimpleTokenizer()
    texts = [
        "a photo of a cat",
        "Hello, World!  <3 naïve café 🙂 it's",
        'A CAT\'S dog\tholding 3.14 kg, 2024-01-01; "quoted" [x] {y} #tag @user',
        "日本語のテキスト",
        "rock &amp; roll",  # HTML entity: OpenAI unescapes it
        "Ǆemo ﬁ x²",  # ftfy fixes
        LONG,
    ]
    ours = enc.tokenize(texts)
    theirs = reference(texts, context_length=77)  # zero-padded
    for row, ref in zip(ours.tolist(), theirs.tolist(), strict=True):
        n = ref.index(EOS) + 1
        assert row[:n] == ref[:n]
        assert all(t == EOS for t in row[n:])


def test_backend_tokenizer_equals_transformers_fast_tokenizer(tok_dir: Path, tmp_path: Path) -> None:
    """The folder's ``tokenizer.json`` run by the ``tokenizers`` library (what the encoder loads) gives
    transformers' ``CLIPTokenizerFast`` ids, masks and counts, truncation and padding included; a folder
    without ``tokenizer.json`` loads through transformers' converter, to the same ids."""
    from transformers import CLIPTokenizerFast

    backend = tokenizers.load_clip_tokenizer(tok_dir)
    assert isinstance(backend, tokenizers.BackendTokenizer) and len(backend) == 49408
    reference = CLIPTokenizerFast.from_pretrained(str(tok_dir), local_files_only=True)
    texts = [
        tokenizers.clean_clip_text(t)
        for t in [
            "a photo of a cat",
            "",
            "Hello, World! naïve café 🙂 it's",
            "日本語のテキスト",
            LONG,
            LONG[:150],
        ]
    ]
    for n in (77, 8):
        ids, mask = tokenizers.tokenize_padded(backend, texts, n)
        want = reference(texts, truncation=True, max_length=n, padding="max_length", return_tensors="pt")
        assert ids.dtype == mask.dtype == torch.long and ids.shape == (len(texts), n)
        assert torch.equal(ids, want["input_ids"]) and torch.equal(mask, want["attention_mask"]), n
    assert tokenizers.token_counts(backend, texts) == tokenizers.token_counts(reference, texts)
    assert tokenizers.token_counts(backend, [LONG])[0] > 77  # counted untruncated
    # a folder of vocab.json + merges.txt only (as some saved tokenizers are): transformers converts it
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (bare / name).write_bytes((tok_dir / name).read_bytes())
    converted = tokenizers.load_clip_tokenizer(bare)
    assert not isinstance(converted, tokenizers.BackendTokenizer)
    converted_ids = tokenizers.tokenize_padded(converted, texts, 77)[0]
    assert torch.equal(converted_ids, tokenizers.tokenize_padded(backend, texts, 77)[0])


def test_backend_tokenizer_calls_from_threads(tok_dir: Path) -> None:
    """Its one tokenizer's truncation and padding are set only around a padded encode, under a lock:
    calls of both kinds and two lengths from several threads give the serial results."""
    from concurrent.futures import ThreadPoolExecutor

    backend = tokenizers.load_clip_tokenizer(tok_dir)
    texts = [LONG, "a photo of a cat"]
    calls = [
        lambda: backend.padded(texts, 77),
        lambda: backend.padded(texts, 8),
        lambda: backend.counts(texts),
    ]
    serial = [call() for call in calls]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(calls[i % 3]) for i in range(60)]
        results = [f.result() for f in futures]
    for i, got in enumerate(results):
        want = serial[i % 3]
        if isinstance(want, list):
            assert got == want
        else:
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# -- weights and forward -------------------------------------------------------------------------------


def test_vit_l14_architecture_on_meta() -> None:
    d, ff, layers, vocab, pos = 768, 3072, 12, 49408, 77
    block = 4 * (d * d + d) + 2 * (2 * d) + (d * ff + ff) + (ff * d + d)  # q/k/v/out, 2 LN, fc1, fc2
    want = vocab * d + pos * d + layers * block + 2 * d
    with torch.device("meta"):
        e = FrozenCLIPEmbedder()
    assert sum(p.numel() for p in e.parameters()) == want == 123_060_480
    assert e.transformer.text_model.hidden_act == "quick_gelu"
    assert e.contract().channels == 768 and e.contract().tokens == 77
    assert VIT_L14_TEXT["num_attention_heads"] == 12


def test_forward_matches_independent_reference(enc: FrozenCLIPEmbedder) -> None:
    texts = ["a photo of a cat", "an astronaut riding a horse"]
    out = enc(texts)
    enc.contract().check(out, batch=2)
    ref = reference_forward(enc.state_dict(), enc.tokenize(texts), heads=TINY["num_attention_heads"])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position_ids", ["int64", "corrupted float", "absent"])
def test_sd1_keyed_weights_load_strictly_and_equal_bare_clip(
    enc: FrozenCLIPEmbedder, position_ids: str
) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    names = list(sd)
    assert names[0] == P + "embeddings.token_embedding.weight" and P + "final_layer_norm.bias" in names
    if position_ids == "int64":
        sd[P + "embeddings.position_ids"] = torch.arange(77)[None]
    elif position_ids == "corrupted float":
        sd[P + "embeddings.position_ids"] = torch.arange(77.0)[None] + 0.4  # seen in merged checkpoints
    fresh = FrozenCLIPEmbedder(tokenizer_path=enc.tokenizer_path, **TINY)
    fresh.load_state_dict(sd, strict=True)
    assert not any(p.requires_grad for p in fresh.parameters())

    bare = CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT, **TINY})).eval()
    own = {k.removeprefix(P): v for k, v in sd.items() if not k.endswith("position_ids")}
    if hasattr(bare, "text_model"):  # transformers 4.x nests the tower
        own = {"text_model." + k: v for k, v in own.items()}
    bare.load_state_dict(own, strict=True)
    ids = enc.tokenize(["a photo of a cat", "two dogs"])
    with torch.no_grad():
        want = bare(input_ids=ids).last_hidden_state
    torch.testing.assert_close(fresh.encode_tokens(ids), want, atol=1e-6, rtol=1e-6)
    assert fresh.compvis_state_dict()[P + "embeddings.position_ids"].tolist() == [list(range(77))]


def test_meta_built_encoder_loads_with_assign_and_moves(enc: FrozenCLIPEmbedder) -> None:
    with torch.device("meta"):
        e = FrozenCLIPEmbedder(tokenizer_path=enc.tokenizer_path, **TINY)
    e.load_state_dict(enc.compvis_state_dict(), strict=True, assign=True)
    e.to(torch.float32)  # fails if a buffer stayed on meta
    assert not any(t.is_meta for t in [*e.parameters(), *e.buffers()])
    assert not any(p.requires_grad for p in e.parameters())
    torch.testing.assert_close(e(["a cat"]), enc(["a cat"]), atol=0, rtol=0)


def test_missing_weight_is_an_error(enc: FrozenCLIPEmbedder) -> None:
    sd = dict(enc.state_dict())
    del sd[P + "final_layer_norm.weight"]
    with pytest.raises(RuntimeError, match=r"final_layer_norm\.weight"):
        FrozenCLIPEmbedder(**TINY).load_state_dict(sd, strict=True)


def test_transformers_folder_loads_offline(
    tmp_path: Path, enc: FrozenCLIPEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**{**VIT_L14_TEXT, **TINY}))
    randomize(model, seed=5, scale=0.2)
    model.save_pretrained(tmp_path / "clip")

    def no_network(*_: object, **__: object) -> None:
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    e = FrozenCLIPEmbedder.from_pretrained(tmp_path / "clip", tokenizer_path=enc.tokenizer_path)
    ids = enc.tokenize(["a photo of a cat"])
    ref = reference_forward(e.state_dict(), ids, heads=TINY["num_attention_heads"])
    torch.testing.assert_close(e.encode_tokens(ids).double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(
        e.state_dict()[P + "encoder.layers.1.mlp.fc2.weight"],
        model.state_dict()[
            next(k for k in model.state_dict() if k.endswith("encoder.layers.1.mlp.fc2.weight"))
        ],
    )
    with pytest.raises(ValueError, match="nothing is downloaded"):
        FrozenCLIPEmbedder(version="someone/not-cached-anywhere")
    with pytest.raises(ValueError, match="apply only to version"):
        FrozenCLIPEmbedder(version=tmp_path / "clip", hidden_size=8)


# -- behaviour -----------------------------------------------------------------------------------------


def test_frozen_stays_eval(enc: FrozenCLIPEmbedder) -> None:
    assert not FrozenCLIPEmbedder.trainable
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.transformer.text_model.training


def test_deterministic_and_batch_independent(enc: FrozenCLIPEmbedder) -> None:
    check_deterministic_and_batch_independent(enc, atol=1e-6)


def test_unconditional_is_the_empty_prompt(enc: FrozenCLIPEmbedder) -> None:
    uc = enc.unconditional(2)
    assert uc.shape == (2, 77, TINY["hidden_size"])
    torch.testing.assert_close(uc, enc(["", ""]), atol=1e-6, rtol=0)
    assert enc.conditioning(uc).crossattn is uc


def test_dtype_moves(tok_dir: Path) -> None:
    e = FrozenCLIPEmbedder(tokenizer_path=tok_dir, **TINY)
    randomize(e, seed=2, scale=0.2)
    ref = e(["a red car"])
    torch.testing.assert_close(e.to(torch.float64)(["a red car"]), ref.double(), atol=1e-5, rtol=1e-5)
    out = e.to(torch.bfloat16)(["a red car"])
    assert out.dtype == torch.bfloat16 and out.isfinite().all()
    assert (out.float() - ref).abs().mean() < 0.1


def test_check_length_refuses_long_prompts_forward_truncates(enc: FrozenCLIPEmbedder) -> None:
    enc.check_length(["a photo of a cat"])
    enc.check_length([" ".join(["cat"] * 75)])  # exactly 77 with start/end
    with pytest.raises(
        ValueError, match=r"prompt is 78 tokens; this encoder takes at most 77 \(75 \+ start/end\)"
    ):
        enc.check_length([" ".join(["cat"] * 76)])
    ids = enc.tokenize([LONG])
    assert ids.shape == (1, 77) and ids[0, -1].item() == EOS
    assert enc([LONG]).shape == (1, 77, TINY["hidden_size"])
    with pytest.raises(TypeError, match="wrap it"):
        enc.tokenize("a cat")  # type: ignore[arg-type]


def test_spec_declares_a_frozen_text_crossattn_encoder() -> None:
    spec = EncoderSpec.of(FrozenCLIPEmbedder)
    assert (spec.modality, spec.kind, spec.trainable) == ("text", "crossattn", False)
    assert spec.compvis_targets == ("ldm.modules.encoders.modules.FrozenCLIPEmbedder",)
