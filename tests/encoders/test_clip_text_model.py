"""The CLIP text transformer (``ldm_sdk.encoders.clip_text_model``) against transformers' ``CLIPTextModel``
on the same random weights: the same numbers bit for bit on the CPU, in float32 and bfloat16, for both
activations CLIP towers use; and a text model's first prompt without importing transformers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ldm_sdk.encoders.clip_text_model import CLIPTextTransformer
from ldm_sdk.encoders.text_clip import VIT_L14_TEXT
from ldm_sdk.encoders.tokenizers import clip_tokenizer_dir

SMALL = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 128}


def pair(activation: str, seed: int = 0) -> tuple[torch.nn.Module, CLIPTextTransformer]:
    """transformers' model with random weights and ours loaded from its state dict."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = {**VIT_L14_TEXT, **SMALL, "hidden_act": activation}
    torch.manual_seed(seed)
    reference = CLIPTextModel(CLIPTextConfig(**config)).eval()
    for p in reference.parameters():  # larger than the init's 0.02 scale, so every layer matters
        p.data.normal_(0.0, 0.3)
    ours = CLIPTextTransformer(
        **{k: config[k] for k in (*SMALL, "vocab_size", "max_position_embeddings", "layer_norm_eps")},
        hidden_act=activation,  # type: ignore[arg-type]
    ).eval()
    weights = reference.state_dict()
    weights = {k.removeprefix("text_model."): v for k, v in weights.items() if not k.endswith("position_ids")}
    ours.load_state_dict(weights, strict=True)
    return reference, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["quick_gelu", "gelu"])
def test_equals_transformers_bit_for_bit(activation: str, dtype: torch.dtype) -> None:
    reference, ours = pair(activation)
    reference.to(dtype)
    ours.to(dtype)
    ids = torch.randint(0, VIT_L14_TEXT["vocab_size"], (3, 77), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(77)[None].expand_as(ids)
    with torch.no_grad():
        want = reference(input_ids=ids, position_ids=positions).last_hidden_state
        got = ours(ids, positions)
        short = ours(ids[:, :9])  # default positions 0..8
        want_short = reference(input_ids=ids[:, :9]).last_hidden_state
    assert got.dtype == dtype and got.shape == (3, 77, SMALL["hidden_size"])
    assert torch.equal(got, want), float((got.float() - want.float()).abs().max())
    assert torch.equal(short, want_short)


def test_attention_is_causal() -> None:
    """A token's state depends on the tokens before it, never on those after it."""
    _, ours = pair("quick_gelu")
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 7] += 1
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        CLIPTextTransformer(hidden_size=30, num_attention_heads=4, num_hidden_layers=1)
    with pytest.raises(ValueError, match="valid: quick_gelu, gelu"):
        CLIPTextTransformer(hidden_size=8, num_attention_heads=2, num_hidden_layers=1, hidden_act="relu")  # type: ignore[arg-type]
    small = CLIPTextTransformer(
        hidden_size=8, num_attention_heads=2, num_hidden_layers=1, max_position_embeddings=5
    )
    with pytest.raises(ValueError, match="6 tokens, but this CLIP text model has 5 positions"):
        small(torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        small(torch.zeros(5, dtype=torch.long))


def test_init_weights_is_clips() -> None:
    """Random weights as CLIP draws them (closed-form standard deviations), not torch's layer defaults."""
    d, depth = 256, 4
    model = CLIPTextTransformer(
        hidden_size=d, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=4 * d
    )
    layer = model.encoder.layers[1]
    want = {
        "token": (model.embeddings.token_embedding.weight, 0.02),
        "q": (layer.self_attn.q_proj.weight, d**-0.5 * (2 * depth) ** -0.5),
        "out": (layer.self_attn.out_proj.weight, d**-0.5),
        "fc1": (layer.mlp.fc1.weight, (2 * d) ** -0.5),
        "fc2": (layer.mlp.fc2.weight, d**-0.5 * (2 * depth) ** -0.5),
    }
    for name, (weight, std) in want.items():
        assert abs(float(weight.std()) / std - 1) < 0.03, (name, float(weight.std()), std)
        assert abs(float(weight.mean())) < 0.05 * std, name
    assert not layer.mlp.fc1.bias.any() and torch.equal(layer.layer_norm1.weight, torch.ones(d))
    again = CLIPTextTransformer(
        hidden_size=d, num_hidden_layers=depth, num_attention_heads=4, intermediate_size=4 * d
    )
    model.init_weights(torch.Generator().manual_seed(3))
    again.init_weights(torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_vit_l14_parameter_count() -> None:
    with torch.device("meta"):
        model = CLIPTextTransformer()
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_encoding_a_prompt_imports_no_transformers(tmp_path: Path) -> None:
    """The reason the tower (and the tokenizer's loading) is ours: a fresh process builds the SD 1.x text
    encoder and encodes a prompt without importing transformers (seconds of imports before the first
    image), nor, building it on meta, torch's compiler stack."""
    script = textwrap.dedent(
        """
        import sys
        from ldm_sdk.encoders.text_clip import FrozenCLIPEmbedder
        small = {"num_hidden_layers": 1, "num_attention_heads": 4, "intermediate_size": 64}
        e = FrozenCLIPEmbedder(hidden_size=32, **small)
        out = e(["a red boat"])
        assert out.shape == (1, 77, 32), out.shape
        import torch
        with torch.device("meta"):  # as build_cond_stage makes it for a checkpoint's weights
            FrozenCLIPEmbedder(hidden_size=32, **small)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "transformers")
        # what normal_ and arange on the meta device import (through torch's decompositions)
        loaded += [m for m in ("torch._dynamo", "sympy") if m in sys.modules]
        print("heavy modules imported:", loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    clip_tokenizer_dir(tmp_path)  # built once per machine (with transformers' converter), found here
    env = {**os.environ, "LDM_SDK_CACHE": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_equals_transformers(dtype: torch.dtype) -> None:
    """On CUDA too the same numbers as transformers' model (the same kernels: SDPA picks its backend from
    the same inputs)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    reference, ours = pair("quick_gelu")
    reference.to("cuda", dtype)
    ours.to("cuda", dtype)
    ids = torch.randint(0, VIT_L14_TEXT["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(4))
    ids = ids.cuda()
    with torch.no_grad():
        want = reference(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert torch.equal(got, want), float((got.float() - want.float()).abs().max())
    print(f"{torch.cuda.get_device_name()}: {dtype} CLIP text transformer equals transformers")
