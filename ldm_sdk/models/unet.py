"""The denoising UNet of latent diffusion (CompVis ``ldm/modules/diffusionmodules/openaimodel.py``).

``UNetModel`` reproduces the original's structure, parameter names and head arithmetic exactly, so
``model.diffusion_model.*`` of an original checkpoint (LDM zoo, Stable Diffusion 1.x / 2.x, inpainting)
loads with strict key matching. It holds no device or dtype of its own: it computes in the dtype of its
parameters and returns the dtype of its input ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SpatialTransformer, repeat_batch
from .embeddings import checkpoint, normalization, timestep_embedding, zero_module

if TYPE_CHECKING:
    from .configs import UNetConfig

__all__ = [
    "AttentionBlock",
    "Downsample",
    "QKVAttention",
    "QKVAttentionLegacy",
    "ResBlock",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "UNetModel",
    "Upsample",
]

Context = torch.Tensor | list[torch.Tensor] | None


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands ``emb`` to timestep blocks and ``context`` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Context = None) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, then a 3x3 ``conv`` when ``use_conv``."""

    def __init__(
        self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(
                f"Upsample without conv cannot change channels ({channels} -> {self.out_channels})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """x2 downsampling: ``op`` is a stride-2 3x3 conv when ``use_conv``, else a 2x2 average pool."""

    def __init__(
        self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.op: nn.Module
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            if self.out_channels != channels:
                raise ValueError(
                    f"Downsample without conv cannot change channels ({channels} -> {self.out_channels})"
                )
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding; optionally resamples (``up`` / ``down``).

    With ``use_scale_shift_norm`` the embedding gives a scale and shift applied after the output norm
    (FiLM, as in ADM); otherwise it is added before it.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("ResBlock cannot both upsample and downsample (up=True, down=True)")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        self.h_upd: nn.Module
        self.x_upd: nn.Module
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        self.skip_connection: nn.Module
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.h_upd(h)
            x = self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _context_repeats(context: Context, batch: int) -> int:
    """How many copies of the batch the context holds (see :meth:`UNetModel.forward`)."""
    if context is None:
        return 1
    rows = {c.shape[0] for c in (context if isinstance(context, list) else [context])}
    if len(rows) != 1 or next(iter(rows)) % batch:
        raise ValueError(
            f"context batch {sorted(rows)} must be x's batch {batch} or a multiple of it (that many copies "
            "of the batch sharing x, timesteps and y: classifier-free guidance); every context alike"
        )
    return next(iter(rows)) // batch


def _batch_repeats(h: torch.Tensor, skip: torch.Tensor) -> int:
    """How many copies of ``skip``'s batch make ``h``'s (1 for equal batches)."""
    if h.shape[0] == skip.shape[0]:
        return 1
    if skip.shape[0] == 0 or h.shape[0] % skip.shape[0]:
        raise ValueError(
            f"a skip of batch {skip.shape[0]} cannot be repeated to the batch {h.shape[0]} of the path's map"
        )
    return h.shape[0] // skip.shape[0]


def _shared_input_block(
    module: nn.Module,
    h: torch.Tensor,
    emb: torch.Tensor,
    emb_all: torch.Tensor,
    context: Context,
    repeats: int,
) -> tuple[torch.Tensor, bool]:
    """Run input block ``module`` (a ``TimestepEmbedSequential``) on the ``B`` distinct samples ``h`` (their
    embedding ``emb``); its first spatial transformer parts the ``repeats`` copies, after which the layers
    take the whole batch's embedding ``emb_all``. Returns the output and whether the copies parted."""
    parted = False
    for layer in module:
        if isinstance(layer, TimestepBlock):
            h = layer(h, emb_all if parted else emb)
        elif isinstance(layer, SpatialTransformer):
            h = layer(h, context, repeats=1 if parted else repeats)
            parted = True
        else:
            h = layer(h)
    return h, parted


def _check_heads(width: int, n_heads: int) -> int:
    if width % (3 * n_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3 * n_heads = {3 * n_heads}")
    return width // (3 * n_heads)


class QKVAttentionLegacy(nn.Module):
    """Attention over a packed ``qkv`` of shape ``(B, H * 3 * D, T)``: per head q, k, v (ADM legacy order)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = _check_heads(width, self.n_heads)
        q, k, v = qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2).reshape(bs, -1, length)


class QKVAttention(nn.Module):
    """Attention over a packed ``qkv`` of shape ``(B, 3 * H * D, T)``: q, k, v, each split into heads."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        ch = _check_heads(width, self.n_heads)
        q, k, v = (t.reshape(bs * self.n_heads, ch, length).transpose(1, 2) for t in qkv.chunk(3, dim=1))
        a = F.scaled_dot_product_attention(q, k, v)
        return a.transpose(1, 2).reshape(bs, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over the pixels of a feature map (ADM / LDM-zoo style, no context).

    ``num_head_channels == -1`` means ``num_heads`` heads; otherwise ``channels // num_head_channels`` heads.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if num_head_channels < 1 or channels % num_head_channels:
                raise ValueError(
                    f"AttentionBlock: channels {channels} is not divisible by "
                    f"num_head_channels {num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if self.num_heads < 1 or channels % self.num_heads:
            raise ValueError(
                f"AttentionBlock: channels {channels} cannot be split into {self.num_heads} heads"
            )
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = (
            QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        )
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, enabled=self.use_checkpoint and self.training)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The full UNet with timestep embedding, optional class labels and attention / cross-attention.

    Arguments are those of the original (and of ``UNetConfig``). ``use_fp16`` and ``image_size`` are
    accepted for config round-trips but change nothing: cast the module (``.half()``) to run in fp16.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | list[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        use_linear_in_transformer: bool = False,
    ) -> None:
        super().__init__()
        if dims != 2:
            raise ValueError(f"dims={dims}: only 2-D UNets are supported")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the conditioning width)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(
                "context_dim is set but use_spatial_transformer=False: cross-attention needs both"
            )
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        if num_classes is not None and not isinstance(num_classes, int):
            raise ValueError(f"num_classes must be an int or None, got {num_classes!r}")
        if isinstance(num_res_blocks, int):
            res_blocks = [num_res_blocks] * len(channel_mult)
        else:
            res_blocks = list(num_res_blocks)
            if len(res_blocks) != len(channel_mult):
                raise ValueError(
                    f"num_res_blocks has {len(res_blocks)} entries but channel_mult has {len(channel_mult)}: "
                    "give one int or one count per level"
                )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = res_blocks
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None
        time_embed_dim = model_channels * 4

        def heads_for(ch: int) -> tuple[int, int]:
            """(num_heads, dim_head) at width ``ch``: the original's arithmetic, legacy quirk included."""
            heads = num_heads
            if num_head_channels == -1:
                dim_head = ch // num_heads
            else:
                heads = ch // num_head_channels
                dim_head = num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            return heads, dim_head

        def attention(ch: int, attn_block_heads: int | None = None) -> nn.Module:
            heads, dim_head = heads_for(ch)
            if use_spatial_transformer:
                return SpatialTransformer(
                    ch,
                    heads,
                    dim_head,
                    depth=transformer_depth,
                    dropout=dropout,
                    context_dim=context_dim,
                    use_linear=use_linear_in_transformer,
                    use_checkpoint=use_checkpoint,
                )
            return AttentionBlock(
                ch,
                num_heads=heads if attn_block_heads is None else attn_block_heads,
                num_head_channels=dim_head,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        def resblock(ch: int, out_ch: int | None = None, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                ch,
                time_embed_dim,
                dropout,
                out_channels=out_ch,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                up=up,
                down=down,
            )

        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(res_blocks[level]):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in self.attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch), attention(ch), resblock(ch))

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(attention(ch, attn_block_heads=num_heads_upsample))
                if level and i == res_blocks[level]:
                    layers.append(
                        resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )
        if n_embed is not None:
            self.id_predictor = nn.Sequential(normalization(ch), nn.Conv2d(model_channels, n_embed, 1))

    @classmethod
    def from_config(cls, cfg: UNetConfig) -> UNetModel:
        """Build from a ``UNetConfig`` (field names are the constructor's keyword arguments)."""
        return cls(**cfg.model_dump())

    def concat_skip(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """An output block's input: the path's map and the skip saved on the way down, concatenated along
        the channels (a fast path may do this in its own kernel). A skip saved before the guidance copies
        parted (:meth:`forward`'s shared input) has ``B`` rows for ``h``'s ``r x B``: it is repeated."""
        return torch.cat([h, repeat_batch(skip, _batch_repeats(h, skip))], dim=1)

    def timestep_features(self, timesteps: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        """The sinusoidal features of ``timesteps`` (``(B,)``) repeated ``repeats`` times, in the weights'
        dtype: the embedding MLP's input (a fast path may compute them in its own kernel)."""
        dtype = self.time_embed[0].weight.dtype
        return timestep_embedding(repeat_batch(timesteps, repeats), self.model_channels).to(dtype)

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None, repeats: int = 1) -> torch.Tensor:
        """The embedding of ``timesteps`` (``(B,)``) plus the class embedding of ``y``, for the batch
        repeated ``repeats`` times (:meth:`forward`'s shared input)."""
        emb = self.time_embed(self.timestep_features(timesteps, repeats))
        if y is not None:
            emb = emb + self.label_emb(repeat_batch(y, repeats))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: Context = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict from noisy latents.

        ``x``: ``(B, in_channels, H, W)`` with ``H`` and ``W`` divisible by ``2 ** (len(channel_mult) - 1)``;
        ``timesteps``: ``(B,)`` (or a 0-d tensor, used for every sample), integer or fractional;
        ``context``: ``(B, M, context_dim)`` for cross-attention models; ``y``: ``(B,)`` class labels,
        given if and only if the model is class-conditional. Returns ``(B, out_channels, H, W)`` (codebook
        logits ``(B, n_embed, H, W)`` when ``n_embed`` was set) in the dtype of ``x``.

        Shared input: ``context`` may hold ``r x B`` rows, ``r`` copies of the batch (classifier-free
        guidance: the negative and the positive prompt for the same latents). The result is then the one
        for ``x``, ``timesteps`` and ``y`` repeated ``r`` times (``[x; x; ...]``), ``(r B, ...)``, but the
        layers before the first cross-attention -- the input convolution, the first residual block, the
        first transformer's self-attention -- run once for the ``B`` distinct samples; their outputs, kept
        as skips, are repeated where an output block takes them (:meth:`concat_skip`).
        """
        if (y is not None) != (self.num_classes is not None):
            if y is None:
                raise ValueError(f"this model is class-conditional (num_classes={self.num_classes}): pass y")
            raise ValueError("y was given but this model is not class-conditional (num_classes=None)")
        if x.ndim != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"spatial size {tuple(x.shape[-2:])} must be divisible by {factor} "
                f"(this UNet resamples {len(self.channel_mult) - 1} times by 2)"
            )
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must have shape ({x.shape[0]},) or (), got {tuple(timesteps.shape)}")

        dtype = self.time_embed[0].weight.dtype
        if y is not None and y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
        if isinstance(context, torch.Tensor):
            context = context.to(dtype)
        elif context is not None:
            context = [c.to(dtype) for c in context]
        repeats = _context_repeats(context, x.shape[0])
        # with copies: the embedding of the whole repeated batch, whose leading rows (a view) serve the
        # shared layers -- a fused model then projects it once (ldm_sdk.accel.time_embedding)
        emb_all = self.embed(timesteps, y, repeats)
        emb = emb_all[: x.shape[0]] if repeats > 1 else emb_all

        h = x.to(dtype)
        hs: list[torch.Tensor] = []
        for module in self.input_blocks:
            if repeats > 1:  # the copies share everything up to the first cross-attention
                h, parted = _shared_input_block(module, h, emb, emb_all, context, repeats)
                if parted:
                    emb, repeats = emb_all, 1  # hs keeps the shared skips: concat_skip repeats them
            else:
                h = module(h, emb, context)
            hs.append(h)
        if repeats > 1:  # no cross-attention among the input blocks: the copies part here
            h, emb = repeat_batch(h, repeats), emb_all
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(self.concat_skip(h, hs.pop()), emb, context)
        out = self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
        return out.to(x.dtype)
