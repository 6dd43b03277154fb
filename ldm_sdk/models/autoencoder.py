"""Building blocks of the first-stage autoencoders (CompVis ``ldm.modules.diffusionmodules.model``).

Submodule and parameter names are identical to the original, so ``first_stage_model.encoder...`` /
``first_stage_model.decoder...`` keys of an original checkpoint load with strict matching. The decoder's
``up`` list is indexed by resolution level (``up.0`` is the full-resolution level) although it runs from the
lowest resolution upwards, exactly as the original stores it.

Attention uses :func:`torch.nn.functional.scaled_dot_product_attention`; it is the same computation as the
original ``softmax(q k^T / sqrt(c)) v`` over the ``h*w`` positions, with one head of width ``c``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.models.configs import DDConfig

AttnType = Literal["vanilla", "none"]
ATTN_TYPES: tuple[str, ...] = ("vanilla", "none")
NORM_GROUPS = 32


def Normalize(in_channels: int, num_groups: int = NORM_GROUPS) -> nn.GroupNorm:  # CompVis name
    """GroupNorm with 32 groups, eps 1e-6 and an affine transform, as every first-stage norm is."""
    if in_channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm over {in_channels} channels needs a multiple of {num_groups} channels "
            f"(the first stage normalises with {num_groups} groups); choose ch and ch_mult so every "
            f"ch * mult is divisible by {num_groups}"
        )
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x: Tensor) -> Tensor:
    """Swish / SiLU, ``x * sigmoid(x)``."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, followed by a 3x3 conv when ``with_conv``."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """2x downsampling: zero-pad right/bottom by one then a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            # no padding in the conv itself: the original pads asymmetrically in forward
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm-SiLU-conv, (+ time embedding), norm-SiLU-dropout-conv, + skip.

    The SiLUs after the norms are parameter-free submodules ``act1`` / ``act2`` (no state-dict keys) so that
    :func:`ldm_sdk.accel.fusion.fuse_model` can see them and fold them into the norms. The skip is a 1x1
    ``nin_shortcut`` (or a 3x3 ``conv_shortcut`` when ``conv_shortcut=True``) only when the channel count
    changes. ``temb_proj`` exists only when ``temb_channels > 0``; the first stages use 0.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.act1 = nn.SiLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.act2 = nn.SiLU()
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(self.act1(self.norm1(x)))
        if temb is not None:
            if not hasattr(self, "temb_proj"):
                raise ValueError(
                    "this ResnetBlock was built with temb_channels=0 and takes no time embedding"
                )
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.act2(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections ``q``, ``k``, ``v``, ``proj_out``."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h_ = self.norm(x)
        b, c, h, w = h_.shape
        # (b, c, h, w) -> (b, 1 head, h*w tokens, c); SDPA's default scale is 1/sqrt(c), as in the original
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(2, 3) for t in (self.q(h_), self.k(h_), self.v(h_)))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """An :class:`AttnBlock` for ``"vanilla"``, an ``nn.Identity`` (no parameters) for ``"none"``."""
    if attn_type == "vanilla":
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type={attn_type!r} is not supported; valid: {list(ATTN_TYPES)}")


def _check_common(ch: int, ch_mult: Sequence[int], attn_type: str, use_linear_attn: bool) -> None:
    if use_linear_attn:
        raise ValueError(
            "use_linear_attn=True (the original LinAttnBlock) is not supported; valid: use_linear_attn=False "
            f"with attn_type in {list(ATTN_TYPES)}"
        )
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type={attn_type!r} is not supported; valid: {list(ATTN_TYPES)}")
    if len(ch_mult) == 0 or any(m <= 0 for m in ch_mult):
        raise ValueError(f"ch_mult={tuple(ch_mult)} must be a non-empty sequence of positive ints")
    bad = [ch * m for m in ch_mult if (ch * m) % NORM_GROUPS]
    if bad:
        raise ValueError(
            f"ch={ch}, ch_mult={tuple(ch_mult)} give widths {bad} that are not multiples of {NORM_GROUPS} "
            f"(GroupNorm uses {NORM_GROUPS} groups)"
        )


class _Mid(nn.Module):
    """``mid``: ResnetBlock, attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, attn_type: str) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(
            in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout
        )
        self.attn_1 = make_attn(channels, attn_type)
        self.block_2 = ResnetBlock(
            in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (empty or one per block), then an optional
    ``downsample`` (encoder) or ``upsample`` (decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h: Tensor) -> Tensor:
        for i_block, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[i_block](h)
        return h


class Encoder(nn.Module):
    """Image -> latent moments. Output has ``2 * z_channels`` channels when ``double_z`` (mean, logvar)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        attn_type: AttnType = "vanilla",
        use_linear_attn: bool = False,
    ) -> None:
        super().__init__()
        _check_common(ch, ch_mult, attn_type, use_linear_attn)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res = resolution
        in_ch_mult = (1, *ch_mult)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            level = _Level()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                level.block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        temb_channels=self.temb_ch,
                        dropout=dropout,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type))
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(level)

        self.mid = _Mid(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.act_out = nn.SiLU()  # parameter-free: visible to ldm_sdk.accel.fusion, no state-dict key
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    @classmethod
    def from_ddconfig(cls, dd: DDConfig) -> Encoder:
        """Build from a ``ddconfig`` (the decoder-only fields ``out_ch``, ``give_pre_end``, ``tanh_out`` are
        not used by the encoder)."""
        return cls(
            **dd.model_dump(exclude={"out_ch", "give_pre_end", "tanh_out"}),
        )

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i_level, level in enumerate(self.down):
            h = level(h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(self.act_out(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (``z_channels``) -> image (``out_ch``).

    ``up[i]`` is resolution level ``i`` (``up.0`` full resolution); the forward pass runs i = L-1 .. 0.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attn_type: AttnType = "vanilla",
        use_linear_attn: bool = False,
    ) -> None:
        super().__init__()
        _check_common(ch, ch_mult, attn_type, use_linear_attn)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, attn_type)

        levels: list[_Level] = []
        for i_level in reversed(range(self.num_resolutions)):
            level = _Level()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                level.block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        temb_channels=self.temb_ch,
                        dropout=dropout,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    level.attn.append(make_attn(block_in, attn_type))
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            levels.insert(0, level)  # keep up[i] == level i, as the original does
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.act_out = nn.SiLU()  # parameter-free: visible to ldm_sdk.accel.fusion, no state-dict key
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    @classmethod
    def from_ddconfig(cls, dd: DDConfig) -> Decoder:
        """Build from a ``ddconfig`` (``double_z`` is encoder-only and not used here)."""
        return cls(**dd.model_dump(exclude={"double_z"}))

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            h = level(h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(self.act_out(self.norm_out(h)))
        if self.tanh_out:
            h = torch.tanh(h)
        return h
