"""The CLIP text transformer (Radford et al. 2021): token + position embeddings, pre-LayerNorm blocks of
causal self-attention and an MLP, a final LayerNorm; ``forward`` returns the last hidden state ``[B, T, D]``.

Its parameters have the names of transformers' ``CLIPTextModel`` tower (``embeddings.token_embedding``,
``encoder.layers.{i}.self_attn.q_proj`` ... ``final_layer_norm``), so SD 1.x checkpoints and transformers
folders load into it strictly, and the computation is the one transformers runs with its default (SDPA)
attention: the same operations in the same order (``tests/encoders/test_clip_text_model.py`` checks it
against ``transformers.CLIPTextModel`` on the same weights).

Why not transformers' module itself: importing ``transformers.models.clip.modeling_clip`` pulls in most of
transformers' modelling stack (and ``torch.distributed.tensor``): 2-4 s before a text model's first prompt
can be encoded, on the 2-vCPU VM 3.6 s of a first txt2img's 4.2 s conditioning phase
(``bench/profile_tasks.py``). This module needs only torch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the activations CLIP text towers use: OpenAI's ``quick_gelu`` (``x * sigmoid(1.702 x)``) and ``gelu``
Activation = Literal["quick_gelu", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("quick_gelu", "gelu")


class CLIPTextEmbeddings(nn.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int) -> None:
        super().__init__()
        # given weights skip nn.Embedding's own N(0, 1) init: on the meta device its normal_ imports torch's
        # compiler stack (1.5 s on the 2-vCPU VM); CLIPTextTransformer.init_weights draws CLIP's init instead
        self.token_embedding = nn.Embedding(
            vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size)
        )
        self.position_embedding = nn.Embedding(
            max_positions, hidden_size, _weight=torch.empty(max_positions, hidden_size)
        )
        # not in state dicts (newer transformers files lack it; older ones' copies are ignored on load); made
        # on the CPU even in a meta build: arange on meta imports sympy via torch's decompositions
        positions = torch.arange(max_positions, device="cpu")[None]
        self.register_buffer("position_ids", positions, persistent=False)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(
                f"{length} tokens, but this CLIP text model has {self.position_embedding.num_embeddings} "
                "positions; truncate the prompt"
            )
        if position_ids is None:
            position_ids = self.position_ids[:, :length]
        return self.token_embedding(input_ids) + self.position_embedding(position_ids)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention (each token attends to itself and the tokens before it)."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        heads = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(heads).transpose(1, 2)
        k = self.k_proj(x).view(heads).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale, is_causal=length > 1)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


class CLIPMLP(nn.Module):
    """``fc2(activation(fc1(x)))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: Activation) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.activation == "quick_gelu" else F.gelu(h)
        return self.fc2(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self, hidden_size: int, num_heads: int, intermediate_size: int, activation: Activation, eps: float
    ) -> None:
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, activation)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of :class:`CLIPEncoderLayer` (``layers``)."""

    def __init__(self, layers: list[CLIPEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nn.Module):
    """Token ids ``[B, T]`` -> last hidden state ``[B, T, hidden_size]`` (after the final LayerNorm).

    The defaults are OpenAI CLIP ViT-L/14's text tower (Stable Diffusion 1.x), 123,060,480 parameters. Built
    off the meta device, the weights get CLIP's initialisation (:meth:`init_weights`); built on meta (for a
    checkpoint's weights, loaded with ``assign=True``) nothing is drawn."""

    def __init__(
        self,
        *,
        vocab_size: int = 49408,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        max_position_embeddings: int = 77,
        hidden_act: Activation = "quick_gelu",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.embeddings = CLIPTextEmbeddings(vocab_size, hidden_size, max_position_embeddings)
        self.encoder = CLIPEncoder(
            [
                CLIPEncoderLayer(
                    hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps
                )
                for _ in range(num_hidden_layers)
            ]
        )
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        if not self.final_layer_norm.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """CLIP's initialisation (as transformers' ``CLIPPreTrainedModel`` draws it): embeddings N(0, 0.02);
        attention projections N(0, D^-1/2 (2 L)^-1/2), the output projection N(0, D^-1/2); the MLP's first
        layer N(0, (2 D)^-1/2), its second like the attention's inputs; biases 0, LayerNorms 1 and 0."""
        d, depth = self.hidden_size, len(self.encoder.layers)
        in_std, out_std, fc_std = d**-0.5 * (2 * depth) ** -0.5, d**-0.5, (2 * d) ** -0.5
        self.embeddings.token_embedding.weight.normal_(0.0, 0.02, generator=generator)
        self.embeddings.position_embedding.weight.normal_(0.0, 0.02, generator=generator)
        for layer in self.encoder.layers:
            attn, mlp = layer.self_attn, layer.mlp
            stds = [
                (attn.q_proj, in_std),
                (attn.k_proj, in_std),
                (attn.v_proj, in_std),
                (attn.out_proj, out_std),
            ]
            for linear, std in [*stds, (mlp.fc1, fc_std), (mlp.fc2, in_std)]:
                linear.weight.normal_(0.0, std, generator=generator)
                linear.bias.zero_()
        for norm in self.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.weight.fill_(1.0)
                norm.bias.zero_()

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None) -> Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        x = self.embeddings(input_ids, position_ids)
        return self.final_layer_norm(self.encoder(x))


__all__ = [
    "ACTIVATIONS",
    "CLIPMLP",
    "CLIPAttention",
    "CLIPEncoder",
    "CLIPEncoderLayer",
    "CLIPTextEmbeddings",
    "CLIPTextTransformer",
]
