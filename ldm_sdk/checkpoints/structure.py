"""The structure of CompVis networks as their weights show it, and the shapes a config implies.

:class:`UNetStructure` / :class:`FirstStageStructure` are read from a state dict's keys and shapes
(:func:`unet_structure`, :func:`first_stage_structure`) or from a config (``from_config``); equal structures
mean equal shapes, up to what shapes cannot show (the number of attention heads). :func:`compvis_shapes`
builds a config's modules on the meta device and lists every key of its CompVis checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import FIRST_STAGE_PREFIX, TRAINING_ONLY_PREFIXES, UNET_PREFIX
from ldm_sdk.checkpoints.families import first_stage_attention_levels, unet_attention_levels
from ldm_sdk.diffusion.schedule import SCHEDULE_BUFFERS
from ldm_sdk.models.configs import AutoencoderKLConfig, DDConfig, ModelConfig, UNetConfig, VQModelConfig
from ldm_sdk.models.first_stage import AutoencoderKL, VQModel
from ldm_sdk.models.unet import UNetModel

ASK_FOR_YAML = "pass the original YAML config (config=...) or a family (family=...)"


class UnknownCheckpointError(ValueError):
    """The checkpoint's structure is not (uniquely) a known family; ``detected`` holds what was seen."""

    def __init__(
        self, message: str, *, detected: Mapping[str, Any] | None = None, candidates: list[str] | None = None
    ):
        super().__init__(message)
        self.detected = dict(detected or {})
        self.candidates = list(candidates or [])


# -- structures ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetStructure:
    """What the weights of a CompVis ``UNetModel`` show (heads are not visible)."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    attention: str  # "spatial" | "spatial-linear" (SpatialTransformer) | "block" (AttentionBlock)
    context_dim: int | None
    transformer_depth: int
    num_classes: int | None
    n_embed: int | None
    use_scale_shift_norm: bool
    resample: str  # "conv" | "resblock" | "none" (no parameters, or a single level)

    @classmethod
    def from_config(cls, u: UNetConfig) -> UNetStructure:
        levels = len(u.channel_mult)
        spatial = u.use_spatial_transformer
        return cls(
            in_channels=u.in_channels,
            out_channels=u.out_channels,
            model_channels=u.model_channels,
            channel_mult=tuple(u.channel_mult),
            num_res_blocks=u.num_res_blocks,
            attention_levels=unet_attention_levels(u.attention_resolutions, levels),
            attention=("spatial-linear" if u.use_linear_in_transformer else "spatial")
            if spatial
            else "block",
            context_dim=u.context_dim if spatial else None,
            transformer_depth=u.transformer_depth if spatial else 0,
            num_classes=u.num_classes,
            n_embed=u.n_embed,
            use_scale_shift_norm=u.use_scale_shift_norm,
            resample="none"
            if levels == 1
            else "resblock"
            if u.resblock_updown
            else "conv"
            if u.conv_resample
            else "none",
        )


@dataclass(frozen=True)
class FirstStageStructure:
    """What the weights of a CompVis ``AutoencoderKL`` / ``VQModel`` show."""

    kind: str  # "kl" | "vq"
    embed_dim: int
    n_embed: int | None
    z_channels: int
    double_z: bool
    in_channels: int
    out_ch: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[int, ...]
    mid_attention: bool
    resample: str  # "conv" | "pool" | "none"

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_config(cls, fs: AutoencoderKLConfig | VQModelConfig) -> FirstStageStructure:
        dd = fs.ddconfig
        levels = len(dd.ch_mult)
        attn = dd.attn_type != "none"
        return cls(
            kind=fs.kind,
            embed_dim=fs.embed_dim,
            n_embed=fs.n_embed if isinstance(fs, VQModelConfig) else None,
            z_channels=dd.z_channels,
            double_z=dd.double_z,
            in_channels=dd.in_channels,
            out_ch=dd.out_ch,
            ch=dd.ch,
            ch_mult=tuple(dd.ch_mult),
            num_res_blocks=dd.num_res_blocks,
            attention_levels=first_stage_attention_levels(dd.attn_resolutions, levels, dd.resolution)
            if attn
            else (),
            mid_attention=attn,
            resample="none" if levels == 1 else "conv" if dd.resamp_with_conv else "pool",
        )

    def to_config(self) -> AutoencoderKLConfig | VQModelConfig:
        """A config with exactly this structure (``resolution=256``; attention placed to match)."""
        if self.attention_levels and not self.mid_attention:
            raise UnknownCheckpointError(
                "this autoencoder has level attention but none in its middle block, which no ddconfig "
                "expresses (attn_type='none' removes both)",
                detected={"first_stage": asdict(self)},
            )
        dd = DDConfig(
            double_z=self.double_z,
            z_channels=self.z_channels,
            resolution=256,
            in_channels=self.in_channels,
            out_ch=self.out_ch,
            ch=self.ch,
            ch_mult=self.ch_mult,
            num_res_blocks=self.num_res_blocks,
            attn_resolutions=tuple(256 // 2**i for i in self.attention_levels),
            resamp_with_conv=self.resample != "pool",
            attn_type="vanilla" if self.mid_attention else "none",
        )
        if self.kind == "vq":
            assert self.n_embed is not None
            return VQModelConfig(ddconfig=dd, n_embed=self.n_embed, embed_dim=self.embed_dim)
        return AutoencoderKLConfig(ddconfig=dd, embed_dim=self.embed_dim)


# -- reading structures from shapes --------------------------------------------------------------------
def shapes_under(state: Mapping[str, Tensor], prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}


def _indexed(
    shapes: Mapping[str, tuple[int, ...]], head: str
) -> dict[int, dict[int, dict[str, tuple[int, ...]]]]:
    """``head.<i>.<j>.<rest>`` keys as ``{i: {j: {rest: shape}}}``."""
    out: dict[int, dict[int, dict[str, tuple[int, ...]]]] = {}
    for key, shape in shapes.items():
        parts = key.split(".", 3)
        if parts[0] != head or len(parts) < 4 or not parts[1].isdigit() or not parts[2].isdigit():
            continue
        out.setdefault(int(parts[1]), {}).setdefault(int(parts[2]), {})[parts[3]] = shape
    return out


def _kind(sub: Mapping[str, tuple[int, ...]]) -> str:
    if "in_layers.0.weight" in sub:
        return "resblock"
    if "proj_in.weight" in sub:
        return "spatial"
    if "qkv.weight" in sub:
        return "block"
    if "conv.weight" in sub:
        return "upsample"
    if "op.weight" in sub:
        return "downsample"
    return "unknown"


def _need(shapes: Mapping[str, tuple[int, ...]], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise UnknownCheckpointError(f"{what}: expected key {key!r} is missing; {ASK_FOR_YAML}")
    return shapes[key]


def unet_structure(state: Mapping[str, Tensor], prefix: str = UNET_PREFIX) -> UNetStructure:
    """Read a CompVis UNet's structure from its keys and shapes (keys under ``prefix``)."""
    s = shapes_under(state, prefix)
    what = f"UNet under {prefix!r}"
    mc, in_ch = _need(s, "input_blocks.0.0.weight", what)[:2]
    out_ch = _need(s, "out.2.weight", what)[0]
    outs = _indexed(s, "output_blocks")
    groups: list[list[tuple[int, bool]]] = [[]]
    resample, scale_shift = "none", False
    for k in sorted(outs):
        subs = outs[k]
        if _kind(subs.get(0, {})) != "resblock":
            raise UnknownCheckpointError(f"{what}: output_blocks.{k}.0 is not a ResBlock; {ASK_FOR_YAML}")
        res = subs[0]
        width = _need(res, "out_layers.3.weight", f"{what}, output_blocks.{k}.0")[0]
        scale_shift = _need(res, "emb_layers.1.weight", f"{what}, output_blocks.{k}.0")[0] == 2 * width
        kinds = [_kind(subs[j]) for j in sorted(subs) if j > 0]
        groups[-1].append((width, any(x in ("spatial", "block") for x in kinds)))
        up = [x for x in kinds if x in ("upsample", "resblock")]  # a second ResBlock is an up-sampling one
        if up:
            resample = "conv" if up[0] == "upsample" else "resblock"
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups or not groups[0]:
        raise UnknownCheckpointError(f"{what}: no output_blocks found; {ASK_FOR_YAML}")
    sizes = {len(g) for g in groups}
    if len(sizes) != 1:
        raise UnknownCheckpointError(f"{what}: levels have different numbers of blocks {sorted(sizes)}")
    levels = len(groups)
    widths = [g[0][0] for g in reversed(groups)]  # level 0 first
    if any(w % mc for w in widths):
        raise UnknownCheckpointError(
            f"{what}: level widths {widths} are not multiples of model_channels={mc}"
        )
    attn_flags = [{a for _, a in g} for g in reversed(groups)]
    if any(len(f) != 1 for f in attn_flags):
        raise UnknownCheckpointError(f"{what}: attention on only some blocks of a level; {ASK_FOR_YAML}")
    attention, context_dim, depth = "none", None, 0
    proj_in = next((k for k in sorted(s) if k.endswith(".proj_in.weight")), None)
    if proj_in is not None:  # a SpatialTransformer (AttentionBlock has no proj_in)
        base = proj_in[: -len("proj_in.weight")]
        attention = "spatial-linear" if len(s[proj_in]) == 2 else "spatial"
        context_dim = _need(s, base + "transformer_blocks.0.attn2.to_k.weight", what)[1]
        depth = len({k[len(base) :].split(".")[1] for k in s if k.startswith(base + "transformer_blocks.")})
    elif any(k.endswith(".qkv.weight") for k in s):
        attention = "block"
    label = s.get("label_emb.weight")
    ids = s.get("id_predictor.1.weight")
    return UNetStructure(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=sizes.pop() - 1,
        attention_levels=tuple(i for i, f in enumerate(attn_flags) if True in f),
        attention=attention,
        context_dim=context_dim,
        transformer_depth=depth,
        num_classes=label[0] if label else None,
        n_embed=ids[0] if ids else None,
        use_scale_shift_norm=scale_shift,
        resample=resample if levels > 1 else "none",
    )


def first_stage_structure(
    state: Mapping[str, Tensor], prefix: str = FIRST_STAGE_PREFIX
) -> FirstStageStructure:
    """Read a CompVis autoencoder's structure from its keys and shapes (keys under ``prefix``)."""
    s = shapes_under(state, prefix)
    what = f"autoencoder under {prefix!r}" if prefix else "autoencoder"
    ch, in_ch = _need(s, "encoder.conv_in.weight", what)[:2]
    levels = sorted({int(k.split(".")[2]) for k in s if k.startswith("encoder.down.")})
    if levels != list(range(len(levels))) or not levels:
        raise UnknownCheckpointError(f"{what}: encoder.down levels {levels} are not 0..n-1; {ASK_FOR_YAML}")
    widths = [_need(s, f"encoder.down.{i}.block.0.conv2.weight", what)[0] for i in levels]
    if any(w % ch for w in widths):
        raise UnknownCheckpointError(f"{what}: level widths {widths} are not multiples of ch={ch}")
    nrb = len({k.split(".")[4] for k in s if k.startswith("encoder.down.0.block.")})
    z = _need(s, "decoder.conv_in.weight", what)[1]
    enc_out = _need(s, "encoder.conv_out.weight", what)[0]
    embedding = s.get("quantize.embedding.weight")
    embed_dim = embedding[1] if embedding else _need(s, "post_quant_conv.weight", what)[1]
    if len(levels) == 1:
        resample = "none"
    else:
        resample = "conv" if "encoder.down.0.downsample.conv.weight" in s else "pool"
    return FirstStageStructure(
        kind="vq" if embedding else "kl",
        embed_dim=embed_dim,
        n_embed=embedding[0] if embedding else None,
        z_channels=z,
        double_z=enc_out == 2 * z,
        in_channels=in_ch,
        out_ch=_need(s, "decoder.conv_out.weight", what)[0],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=nrb,
        attention_levels=tuple(i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in s),
        mid_attention="encoder.mid.attn_1.q.weight" in s,
        resample=resample,
    )


# -- the shapes a config implies -----------------------------------------------------------------------
def compvis_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every key -> shape of a strict CompVis checkpoint of ``config`` (modules built on the meta device;
    the layout of :meth:`ModelBundle.compvis_state_dict` without conditioning or EMA weights)."""
    with torch.device("meta"):
        fs = config.first_stage
        first = (
            AutoencoderKL.from_config(fs) if isinstance(fs, AutoencoderKLConfig) else VQModel.from_config(fs)
        )
        if config.unet is None or config.diffusion is None:
            return {k: v.shape for k, v in first.state_dict().items()}
        unet = UNetModel.from_config(config.unet)
    out: dict[str, torch.Size] = {name: torch.Size([config.diffusion.timesteps]) for name in SCHEDULE_BUFFERS}
    if config.diffusion.scale_by_std:
        out["scale_factor"] = torch.Size([])
    out.update({UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()})
    out.update({FIRST_STAGE_PREFIX + k: v.shape for k, v in first.state_dict().items()})
    return out


def compare_shapes(
    state: Mapping[str, Tensor], expected: Mapping[str, torch.Size], prefixes: tuple[str, ...], label: str
) -> None:
    def relevant(key: str) -> bool:
        return key.startswith(prefixes) and not key.startswith(TRAINING_ONLY_PREFIXES)

    have = {k: v.shape for k, v in state.items() if relevant(k)}
    want = {k: v for k, v in expected.items() if relevant(k)}
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
            f"{len(wrong)} with other shapes (e.g. "
            + ", ".join(f"{k}: {tuple(have[k])} vs {tuple(want[k])}" for k in wrong[:3])
            + ")"
            if wrong
            else "",
        ]
        raise UnknownCheckpointError(
            f"the weights look like {label} but do not match it key for key: "
            + "; ".join(p for p in parts if p)
            + f"; {ASK_FOR_YAML}"
        )
