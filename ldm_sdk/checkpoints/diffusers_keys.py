"""Parameter names CompVis <-> diffusers, for the UNet and the first-stage autoencoders (written here, from
the two layouts; no diffusers import).

UNet (``UNetModel`` <-> ``UNet2DConditionModel``), with ``L`` levels of ``n`` res blocks:

- ``time_embed.{0,2}`` <-> ``time_embedding.linear_{1,2}``; ``label_emb`` <-> ``class_embedding``;
  ``input_blocks.0.0`` <-> ``conv_in``; ``out.{0,2}`` <-> ``conv_norm_out`` / ``conv_out``;
- ``input_blocks.{1 + l(n+1) + j}.{0,1}`` <-> ``down_blocks.l.{resnets,attentions}.j``;
  ``input_blocks.{1 + l(n+1) + n}.0.op`` <-> ``down_blocks.l.downsamplers.0.conv``;
- ``middle_block.{0,1,2}`` <-> ``mid_block.resnets.0`` / ``mid_block.attentions.0`` / ``mid_block.resnets.1``;
- ``output_blocks.{i(n+1) + j}.{0,1}`` <-> ``up_blocks.i.{resnets,attentions}.j`` (up block ``i`` is level
  ``L-1-i``); the last block of a level holds the ``conv`` of ``up_blocks.i.upsamplers.0``;
- inside a ResBlock: ``in_layers.{0,2}`` / ``emb_layers.1`` / ``out_layers.{0,3}`` / ``skip_connection`` <->
  ``norm1``/``conv1`` / ``time_emb_proj`` / ``norm2``/``conv2`` / ``conv_shortcut``. SpatialTransformer names
  are the same on both sides.

Autoencoder (CompVis ``Encoder``/``Decoder`` <-> diffusers ``Encoder``/``Decoder``):

- ``{encoder,decoder}.{norm_out}`` <-> ``conv_norm_out``; ``mid.block_{1,2}`` / ``mid.attn_1`` <->
  ``mid_block.resnets.{0,1}`` / ``mid_block.attentions.0``;
- ``encoder.down.l.{block,attn}.j`` <-> ``encoder.down_blocks.l.{resnets,attentions}.j``,
  ``encoder.down.l.downsample.conv`` <-> ``encoder.down_blocks.l.downsamplers.0.conv``;
- ``decoder.up.l.*`` <-> ``decoder.up_blocks.{L-1-l}.*`` (diffusers stores the decoder deepest first);
- ``nin_shortcut`` <-> ``conv_shortcut``; attention ``norm``/``q``/``k``/``v``/``proj_out`` (1x1 convs) <->
  ``group_norm``/``to_q``/``to_k``/``to_v``/``to_out.0`` (Linear: the weight loses its trailing ``1, 1``).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ldm_sdk.models.configs import DDConfig, UNetConfig

_RESBLOCK = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)
_VAE_RESNET = (("nin_shortcut.", "conv_shortcut."),)
_VAE_ATTENTION = (
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
)

Pairs = list[tuple[str, str, tuple[tuple[str, str], ...]]]


class KeyMappingError(ValueError):
    """A state dict does not have the layout the configuration implies."""


def unet_pairs(u: UNetConfig, attention_levels: tuple[int, ...]) -> Pairs:
    """``(compvis prefix, diffusers prefix, inner renames)`` for every module of the UNet."""
    levels, n = len(u.channel_mult), u.num_res_blocks
    pairs: Pairs = [
        ("time_embed.0.", "time_embedding.linear_1.", ()),
        ("time_embed.2.", "time_embedding.linear_2.", ()),
        ("label_emb.", "class_embedding.", ()),
        ("input_blocks.0.0.", "conv_in.", ()),
        ("out.0.", "conv_norm_out.", ()),
        ("out.2.", "conv_out.", ()),
        ("middle_block.0.", "mid_block.resnets.0.", _RESBLOCK),
        ("middle_block.1.", "mid_block.attentions.0.", ()),
        ("middle_block.2.", "mid_block.resnets.1.", _RESBLOCK),
    ]
    for level in range(levels):
        for j in range(n):
            k = 1 + level * (n + 1) + j
            pairs.append((f"input_blocks.{k}.0.", f"down_blocks.{level}.resnets.{j}.", _RESBLOCK))
            if level in attention_levels:
                pairs.append((f"input_blocks.{k}.1.", f"down_blocks.{level}.attentions.{j}.", ()))
        if level < levels - 1:
            k = 1 + level * (n + 1) + n
            pairs.append((f"input_blocks.{k}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", ()))
    for i in range(levels):
        level = levels - 1 - i
        for j in range(n + 1):
            k = i * (n + 1) + j
            pairs.append((f"output_blocks.{k}.0.", f"up_blocks.{i}.resnets.{j}.", _RESBLOCK))
            sub = 1
            if level in attention_levels:
                pairs.append((f"output_blocks.{k}.1.", f"up_blocks.{i}.attentions.{j}.", ()))
                sub = 2
            if j == n and level > 0:
                pairs.append((f"output_blocks.{k}.{sub}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", ()))
    return pairs


def vae_pairs(dd: DDConfig, attention_levels: tuple[int, ...]) -> Pairs:
    """``(compvis prefix, diffusers prefix, inner renames)`` for every module of an autoencoder."""
    levels, n = len(dd.ch_mult), dd.num_res_blocks
    pairs: Pairs = [
        ("quant_conv.", "quant_conv.", ()),
        ("post_quant_conv.", "post_quant_conv.", ()),
        ("quantize.embedding.", "quantize.embedding.", ()),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in.", f"{part}.conv_in.", ()),
            (f"{part}.norm_out.", f"{part}.conv_norm_out.", ()),
            (f"{part}.conv_out.", f"{part}.conv_out.", ()),
            (f"{part}.mid.block_1.", f"{part}.mid_block.resnets.0.", _VAE_RESNET),
            (f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0.", _VAE_ATTENTION),
            (f"{part}.mid.block_2.", f"{part}.mid_block.resnets.1.", _VAE_RESNET),
        ]
    for level in range(levels):
        for j in range(n):
            pairs.append(
                (f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}.", _VAE_RESNET)
            )
            if level in attention_levels:
                pairs.append(
                    (
                        f"encoder.down.{level}.attn.{j}.",
                        f"encoder.down_blocks.{level}.attentions.{j}.",
                        _VAE_ATTENTION,
                    )
                )
        if level < levels - 1:
            pairs.append(
                (
                    f"encoder.down.{level}.downsample.conv.",
                    f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                    (),
                )
            )
        up = levels - 1 - level
        for j in range(n + 1):
            pairs.append(
                (f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", _VAE_RESNET)
            )
            if level in attention_levels:
                pairs.append(
                    (
                        f"decoder.up.{level}.attn.{j}.",
                        f"decoder.up_blocks.{up}.attentions.{j}.",
                        _VAE_ATTENTION,
                    )
                )
        if level > 0:
            pairs.append(
                (f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv.", ())
            )
    return pairs


def _rename(key: str, pairs: Pairs, *, to_diffusers: bool) -> tuple[str, bool] | None:
    """The key on the other side, and whether it is a VAE-attention projection (conv <-> linear)."""
    for compvis, diffusers, inner in pairs:
        src, dst = (compvis, diffusers) if to_diffusers else (diffusers, compvis)
        if not key.startswith(src):
            continue
        rest = key[len(src) :]
        for a, b in inner:
            i_src, i_dst = (a, b) if to_diffusers else (b, a)
            if rest.startswith(i_src):
                rest = i_dst + rest[len(i_src) :]
                break
        projection = (
            inner is _VAE_ATTENTION
            and rest.endswith("weight")
            and not rest.startswith(("norm.", "group_norm."))
        )
        return dst + rest, projection
    return None


def convert(state: Mapping[str, Tensor], pairs: Pairs, *, to_diffusers: bool, what: str) -> dict[str, Tensor]:
    """Rename every key of ``state`` to the other layout (VAE attention weights reshaped conv <-> linear).

    A key no module of the configuration accounts for raises :class:`KeyMappingError`."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        renamed = _rename(key, pairs, to_diffusers=to_diffusers)
        if renamed is None:
            unknown.append(key)
            continue
        new_key, projection = renamed
        if projection:
            value = (
                value.reshape(value.shape[0], value.shape[1])
                if to_diffusers
                else value.reshape(*value.shape, 1, 1)
            )
        out[new_key] = value
    if unknown:
        side = "CompVis" if to_diffusers else "diffusers"
        raise KeyMappingError(
            f"{what}: {len(unknown)} {side} keys do not belong to the configured network "
            f"(e.g. {sorted(unknown)[:4]}); the weights and the config disagree"
        )
    return out
