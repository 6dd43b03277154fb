"""Layout tokens as taming's ObjectsBoundingBoxConditionalBuilder makes them, and the layout encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_sdk.encoders.layout import LayoutEncoder, LayoutObject, LayoutTokenizer

PAD = 8191  # vocab_size - 1
GRID = 90  # isqrt(8192)
STEP = 1 / 89  # one grid cell in relative coordinates


def _tok() -> LayoutTokenizer:
    return LayoutTokenizer(n_object_classes=600)  # layout2img: 8192 tokens, 30 objects, crop, group flag


def test_tokens_by_hand() -> None:
    tokens = _tok().encode(
        [
            LayoutObject(5, (0.1, 0.2, 0.5, 0.9)),
            LayoutObject(7, (0.0, 0.0, 1.0, 1.0), group_of=True),
        ]
    )
    # x0 = round(0.1 * 89) = 9, y0 = round(17.8) = 18 -> 18 * 90 + 9; x1 = round(44.5) = 44 (half to even),
    # y1 = round(80.1) = 80 -> 80 * 90 + 44; a group_of object's class token is class + n_classes
    assert tokens.dtype == torch.long and tokens.shape == (92,)
    assert tokens[:6].tolist() == [5, 18 * GRID + 9, 80 * GRID + 44, 7 + 600, 0, 89 * GRID + 89]
    assert tokens[6:90].tolist() == [PAD] * 84  # 28 empty object slots
    assert tokens[90:].tolist() == [0, 89 * GRID + 89]  # the full-image crop


def test_round_trip_within_quantization_error() -> None:
    tok = _tok()
    g = torch.Generator().manual_seed(0)
    objects = []
    for i in range(30):
        lo = torch.rand(2, generator=g) * 0.5
        hi = lo + 0.05 + torch.rand(2, generator=g) * 0.45
        objects.append(
            LayoutObject(int(i * 19 % 600), (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])))
        )
    decoded, crop = tok.decode(tok.encode(objects))
    assert crop == (0.0, 0.0, 1.0, 1.0)
    assert [o.class_id for o in decoded] == [o.class_id for o in objects]  # order kept
    for got, want in zip(decoded, objects, strict=True):
        err = max(abs(a - b) for a, b in zip(got.box, want.box, strict=True))
        assert err <= STEP / 2 + 1e-12
    groups, _ = tok.decode(tok.encode([LayoutObject(3, (0.2, 0.2, 0.4, 0.4), group_of=True)]))
    assert groups == [LayoutObject(3, (18 / 89, 18 / 89, 36 / 89, 36 / 89), group_of=True)]


def test_empty_layout_and_batch() -> None:
    tok = _tok()
    empty = tok.empty(3)
    assert empty.shape == (3, 92)
    assert empty[0].tolist() == [PAD] * 90 + [0, 8099]
    batch = tok.encode_batch([[LayoutObject(1, (0.0, 0.0, 0.5, 0.5))], []])
    assert batch.shape == (2, 92) and torch.equal(batch[1], empty[0])
    no_crop = LayoutTokenizer(10, max_objects=2, vocab_size=20, encode_crop=False, use_group_parameter=False)
    # vocab 20 -> a 4x4 grid, pad 19
    assert no_crop.encode([LayoutObject(9, (0.0, 1 / 3, 1.0, 1.0))]).tolist() == [9, 4, 15, 19, 19, 19]


def test_errors() -> None:
    tok = _tok()
    box = (0.1, 0.1, 0.2, 0.2)
    with pytest.raises(ValueError, match="31 objects given; this layout model takes at most 30"):
        tok.encode([LayoutObject(0, box)] * 31)
    with pytest.raises(ValueError, match=r"object 1: class_id 600 out of range; valid: 0\.\.599"):
        tok.encode([LayoutObject(0, box), LayoutObject(600, box)])
    with pytest.raises(ValueError, match=r"class_id -1 out of range"):
        tok.encode([LayoutObject(-1, box)])
    with pytest.raises(ValueError, match=r"object 0: box coordinates must lie in \[0, 1\]"):
        tok.encode([LayoutObject(0, (0.1, 0.1, 1.2, 0.5))])
    with pytest.raises(ValueError, match="x1 > x0 and y1 > y0"):
        tok.encode([LayoutObject(0, (0.5, 0.1, 0.2, 0.5))])
    with pytest.raises(ValueError, match="use_group_parameter=False"):
        LayoutTokenizer(10, use_group_parameter=False).encode([LayoutObject(0, box, group_of=True)])
    with pytest.raises(ValueError, match="do not fit below the padding token"):
        LayoutTokenizer(5000)  # 2 x 5000 class tokens > 8191
    with pytest.raises(ValueError, match="perfect square"):
        LayoutTokenizer(3, vocab_size=16)
    with pytest.raises(ValueError, match=r"layout tokens must be \[B, 92\]"):
        tok.check_tokens(torch.zeros(1, 77, dtype=torch.long))


def _compvis_bert_state(dim: int, depth: int, vocab: int, seq: int) -> dict[str, torch.Tensor]:
    """The cond_stage_model.* keys of layout2img's BERTEmbedder (x-transformers), written out."""
    g = torch.Generator().manual_seed(2)
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.token_emb.weight": (vocab, dim),
        "transformer.pos_emb.emb.weight": (seq, dim),
        "transformer.norm.weight": (dim,),
        "transformer.norm.bias": (dim,),
        "transformer.to_logits.weight": (vocab, dim),
        "transformer.to_logits.bias": (vocab,),
    }
    for i in range(depth):
        a, f = f"transformer.attn_layers.layers.{2 * i}", f"transformer.attn_layers.layers.{2 * i + 1}"
        shapes |= {
            f"{a}.0.weight": (dim,),
            f"{a}.0.bias": (dim,),
            f"{f}.0.weight": (dim,),
            f"{f}.0.bias": (dim,),
        }
        shapes |= {f"{a}.1.to_{n}.weight": (512, dim) for n in "qkv"}  # 8 heads x 64
        shapes |= {f"{a}.1.to_out.weight": (dim, 512), f"{a}.1.to_out.bias": (dim,)}
        shapes |= {f"{f}.1.net.0.0.weight": (4 * dim, dim), f"{f}.1.net.0.0.bias": (4 * dim,)}
        shapes |= {f"{f}.1.net.2.weight": (dim, 4 * dim), f"{f}.1.net.2.bias": (dim,)}
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in shapes.items()}


def test_encoder_loads_compvis_keys_strictly() -> None:
    enc = LayoutEncoder(n_embed=16, n_layer=2, n_object_classes=600, use_tokenizer=False)
    enc.load_state_dict(_compvis_bert_state(16, 2, 8192, 92), strict=True)
    out = enc([[LayoutObject(1, (0.1, 0.1, 0.6, 0.7))], []])
    assert out.shape == (2, 92, 16)
    enc.contract().check(out, batch=2)
    assert (enc.modality, enc.kind, enc.trainable) == ("layout", "crossattn", True)


def test_encoder_without_layers_is_closed_form() -> None:
    # depth 0: LayerNorm(token embedding + position embedding), nothing else
    enc = LayoutEncoder(n_embed=8, n_layer=0, n_object_classes=600)
    state = _compvis_bert_state(8, 0, 8192, 92)
    enc.load_state_dict(state, strict=True)
    objects = [LayoutObject(42, (0.25, 0.5, 0.75, 1.0))]
    # x: round(22.25) = 22, round(66.75) = 67; y: round(44.5) = 44 (half to even), 89
    tokens = [42, 44 * GRID + 22, 89 * GRID + 67] + [PAD] * 87 + [0, 8099]
    x = state["transformer.token_emb.weight"][tokens] + state["transformer.pos_emb.emb.weight"]
    ref = F.layer_norm(x, (8,), state["transformer.norm.weight"], state["transformer.norm.bias"])
    torch.testing.assert_close(enc([objects])[0], ref)
    torch.testing.assert_close(enc(torch.tensor([tokens]))[0], ref)
    # unconditional: the empty layout's tokens
    empty = [PAD] * 90 + [0, 8099]
    x = state["transformer.token_emb.weight"][empty] + state["transformer.pos_emb.emb.weight"]
    ref_uc = F.layer_norm(x, (8,), state["transformer.norm.weight"], state["transformer.norm.bias"])
    torch.testing.assert_close(enc.unconditional(2), ref_uc.expand(2, 92, 8))


def test_encoder_config_errors() -> None:
    with pytest.raises(ValueError, match="not 3 tokens per object"):
        LayoutEncoder(n_embed=8, n_layer=0, max_seq_len=78, n_object_classes=10)  # 76 = not 3k
    with pytest.raises(ValueError, match="use_tokenizer: true"):
        LayoutEncoder(n_embed=8, n_layer=0, n_object_classes=10, use_tokenizer=True)
