"""Fused forwards of the residual and transformer blocks: conv biases, the timestep embedding and the
residual adds folded into the norms and into one epilogue kernel.

Why: a profile of the CUDA-graph-replayed SD-1.5 step (H100, fp16, channels_last, norms already fused)
showed ~120 generic broadcast-add kernels per step (cuDNN convolutions add their bias in a separate pass,
then the timestep embedding is added in another) and ~86 residual adds; each is a full read and write of an
activation. The VAE decoder pays the same at 512 x 512. This pass removes them by *data flow*, not by new
weights: the forwards below call the same Parameters in a different order.

What :func:`fuse_blocks` does, in place, by switching an instance's class to a subclass with its own
``forward`` (state-dict keys, values, Parameter objects and submodules are kept -- only the attention
projections' weights move to a shared storage; :func:`unfuse_blocks` switches the classes back):

* UNet ``ResBlock`` (not ``use_scale_shift_norm``) -> :class:`FusedResBlock`::

      h = conv1(silu(norm1(x)))                       # conv without its bias
      s = addmm(conv1.bias + emb.bias, silu(emb), emb.weight^T)   # the embedding GEMM takes the bias
          # (one GEMM for all of a UNet's blocks: ldm_sdk.accel.time_embedding)
      h = silu(norm2(h + s))                          # one fused GroupNorm with a per-(n, c) shift
      out = (conv2(h) + conv2.bias) + (skip(x) + skip.bias)   # one bias + residual kernel

* first-stage ``ResnetBlock`` -> :class:`FusedResnetBlock` (the same, with ``temb_proj`` as the embedding;
  on Hopper, on maps at least :data:`~ldm_sdk.accel.implicit_conv.EPILOGUE_MIN_WIDTH` wide, ``conv2``, its
  bias, the skip and the next norm's statistics are one convolution kernel of our own,
  :mod:`ldm_sdk.accel.implicit_conv`);
* ``BasicTransformerBlock`` -> :class:`FusedTransformerBlock`: ``norm1`` is the LayerNorm row kernel; the
  residual add after ``attn1`` / ``attn2`` and the following LayerNorm are one
  :func:`~ldm_sdk.accel.residual_kernels.add_layer_norm`; the feed-forward's output GEMM accumulates into
  the residual stream in place (``x.addmm_(g, W.t())``, beta 1 in the GEMM), its bias having been added to
  that stream by the fused add before it; the attention output projections run without their bias, which
  the fused add after them adds (cuBLAS's bias epilogue was the slower kernel at these shapes);
* ``CrossAttention`` -> :class:`FusedCrossAttention`: the q / k / v projections of self-attention (k / v of
  cross-attention) run as one GEMM over weights moved back to back into one storage;
* the first stage's ``Upsample`` with its 3x3 conv -> the sub-pixel form of :mod:`ldm_sdk.accel.subpixel`:
  four 2x2 convolutions on the small map instead of the upsampling copy and a 3x3 convolution on the big one;
* the UNet's ``Upsample`` -> :class:`~ldm_sdk.accel.nearest_upsample.FusedUNetUpsample`: the nearest 2x
  upsampling of a channels_last map as one Triton copy kernel, then the same conv;
* ``SpatialTransformer`` with 1 x 1-conv projections -> :class:`FusedSpatialTransformer`: on a channels_last
  map the pixels already lie as ``(B * H * W, C)`` rows, so ``proj_in`` / ``proj_out`` run as bias-free
  GEMMs with no layout copy; ``proj_in``'s bias goes into the first block's fused kernels, ``proj_out``'s
  into the residual add's kernel;
* the first stage's ``AttnBlock`` -> :class:`~ldm_sdk.accel.vae_attention.FusedAttnBlock`: one q / k / v
  GEMM, the 512-wide single-head attention as cuBLAS GEMMs + softmax (no fused kernel takes that head dim),
  ``proj_out``'s bias and the residual in one kernel;
* plain 3x3 ``nn.Conv2d`` with at most 8 output channels (the UNet's and the decoder's ``conv_out``) ->
  :class:`~ldm_sdk.accel.thin_conv.FusedThinConv2d`: one GEMM to every tap's partial output and a Triton
  9-tap sum (cuDNN is slow for thin outputs);
* the convolutions that run through their own ``forward`` (the UNet's ``conv_in``, ``Downsample`` and
  ``Upsample`` convolutions, the decoder's ``conv_in``) ->
  :class:`~ldm_sdk.accel.conv_bias.FusedBiasedConv2d`: the bias added by the Triton bias pass instead of
  torch's unvectorised broadcast ``add_``.

A block is fused only where its norms are already :class:`~ldm_sdk.accel.fusion.FusedGroupNorm` with the
SiLU absorbed (run :func:`~ldm_sdk.accel.fusion.fuse_model` first; :func:`~ldm_sdk.accel.fusion.
prepare_cuda_inference` does both) and its convolutions are plain zero-padded ``nn.Conv2d``. In training
mode (dropout active) and whenever a norm has been unfused since, the original forward runs.

Numerics: the sums are formed in float32 and rounded once (the eager fp16 path rounds after the conv, after
the bias, after the embedding add and after the residual add), so the fused blocks are at least as accurate;
the outputs differ from the unfused model by about one half-precision rounding per block. In float32 they
differ by float32 evaluation order only (the tests bound it). The ops dispatch like the norm kernels:
Triton on CUDA, the float32 torch references elsewhere (those are differentiable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm_sdk.accel.context_projections import (
    ContextProjections,
    share_context_projections,
    unshare_context_projections,
)
from ldm_sdk.accel.conv_bias import fuse_biased_convs
from ldm_sdk.accel.conv_checks import plain_conv
from ldm_sdk.accel.fused_unet import FusedUNetModel
from ldm_sdk.accel.fusion import FusedGroupNorm, restore_class
from ldm_sdk.accel.implicit_conv import EPILOGUE_MIN_WIDTH, conv3x3_fused, fused_conv_fits, handoff_groups
from ldm_sdk.accel.nearest_upsample import FusedUNetUpsample, unet_upsample_fusable
from ldm_sdk.accel.norm_handoff import NormHandoff, residual_add_for_norm
from ldm_sdk.accel.residual_kernels import add_layer_norm, layer_norm
from ldm_sdk.accel.short_attention import fits_kernel, kernel_pays, short_attention_triton
from ldm_sdk.accel.small_conv import gemm_conv3x3, gemm_conv_pays
from ldm_sdk.accel.stacking import stack_storage, stacked_view
from ldm_sdk.accel.subpixel import FusedFirstStageUpsample, first_stage_upsample_fusable
from ldm_sdk.accel.thin_conv import FusedThinConv2d, thin_conv_fusable
from ldm_sdk.accel.time_embedding import EmbeddingShifts, share_embedding_projection
from ldm_sdk.accel.triton_kernels import (
    BACKENDS,
    Backend,
    KernelRecorder,
    _use_triton,
    group_norm_act,
)
from ldm_sdk.accel.vae_attention import FusedAttnBlock, attn_block_fusable, prepare_attn_block
from ldm_sdk.models import autoencoder, unet
from ldm_sdk.models.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer, repeat_batch
from ldm_sdk.models.autoencoder import ResnetBlock
from ldm_sdk.models.unet import ResBlock, UNetModel


# -- shared pieces -------------------------------------------------------------------------------------------
def _silu_norm(module: nn.Module | None) -> FusedGroupNorm | None:
    """``module`` when it is a fused norm that applies the SiLU after it, else None."""
    if isinstance(module, FusedGroupNorm) and module.act == "silu":
        return module
    return None


def _biased_conv(module: nn.Module | None) -> bool:
    """A zero-padded ``nn.Conv2d`` with a bias (any window or stride): what the fused forwards can call
    without its bias."""
    return (
        type(module) is nn.Conv2d
        and cast(nn.Conv2d, module).padding_mode == "zeros"
        and cast(nn.Conv2d, module).bias is not None
    )


def _conv_no_bias(conv: nn.Conv2d, x: Tensor, recorder: KernelRecorder | None = None) -> Tensor:
    """``conv`` without its bias; a 3x3 convolution on a tiny map as im2col + one GEMM where that measured
    faster than cuDNN (:func:`~ldm_sdk.accel.small_conv.gemm_conv_pays`: the UNet's 8 x 8 level at image
    batch 1)."""
    if plain_conv(conv, 3) and gemm_conv_pays(x, conv.weight):
        return gemm_conv3x3(x, conv.weight, None, recorder=recorder)
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _norm_shift(
    norm: FusedGroupNorm, h: Tensor, shift: Tensor, backend: Backend, recorder: KernelRecorder | None
) -> Tensor:
    return group_norm_act(
        h,
        norm.weight,
        norm.bias,
        norm.num_groups,
        norm.eps,
        norm.act,
        shift=shift,
        backend=backend,
        recorder=recorder,
    )


def _skip(skip: nn.Module | None, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(residual without its bias, that bias): a skip conv runs bias-free, its bias is added by the
    bias + residual kernel (no separate add of the two bias vectors)."""
    if skip is None or isinstance(skip, nn.Identity):
        return x, None
    conv = cast(nn.Conv2d, skip)
    return _conv_no_bias(conv, x), conv.bias


def _backend(module: nn.Module) -> Backend:
    return cast(Backend, getattr(module, "fusion_backend", "auto"))


# -- UNet ResBlock -------------------------------------------------------------------------------------------
class FusedResBlock(ResBlock):
    """``ResBlock`` whose eval forward folds conv1's bias and the timestep embedding into the output norm
    and adds conv2's bias and the skip in one kernel (see the module doc)."""

    unfused_class: ClassVar[type[nn.Module]] = ResBlock
    fusion_backend: Backend
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    emb_shifts: EmbeddingShifts | None = None  # the UNet's shared embedding projection (fuse_blocks)
    emb_shift_index: int = 0
    norm_handoff: NormHandoff | None = None  # shared with the UNet's norms (link_unet)
    feeds_norm: bool = False  # the output goes straight into a norm: offer its statistics (link_unet)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm1 = _silu_norm(self.in_layers[0])
        norm2 = _silu_norm(self.out_layers[0])
        if self.training or norm1 is None or norm2 is None:
            return ResBlock._forward(self, x, emb)
        backend = _backend(self)
        conv1 = cast(nn.Conv2d, self.in_layers[-1])
        conv2 = cast(nn.Conv2d, self.out_layers[-1])
        h = norm1(x)
        if self.updown:
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = _conv_no_bias(conv1, h, self.kernel_recorder)
        shift = self.emb_shifts.shift(self.emb_shift_index, emb) if self.emb_shifts is not None else None
        if (
            shift is None
        ):  # the embedding projection with conv1's bias in its GEMM: emb_layers = (SiLU, Linear)
            proj = cast(nn.Linear, self.emb_layers[1])
            bias = cast(Tensor, conv1.bias) + cast(Tensor, proj.bias)
            shift = torch.addmm(bias, F.silu(emb), proj.weight.t())
        h = _norm_shift(norm2, h, shift, backend, self.kernel_recorder)
        h = _conv_no_bias(conv2, h, self.kernel_recorder)  # out_layers[2] is a dropout: identity in eval
        residual, skip_bias = _skip(self.skip_connection, x)
        return residual_add_for_norm(
            h,
            conv2.bias,
            residual,
            residual_bias=skip_bias,
            handoff=self.norm_handoff if self.feeds_norm else None,
            backend=backend,
            recorder=self.kernel_recorder,
        )


def _resblock_fusable(block: ResBlock) -> str | None:
    """Why ``block`` cannot be fused, or None."""
    if block.use_scale_shift_norm:
        return "use_scale_shift_norm (a FiLM scale / shift comes between the norm and the SiLU)"
    if _silu_norm(block.in_layers[0]) is None or _silu_norm(block.out_layers[0]) is None:
        return "its norms are not fused with their SiLU (run fuse_model first)"
    if not isinstance(block.in_layers[1], nn.Identity) or not isinstance(block.out_layers[1], nn.Identity):
        return "a SiLU module is still in place after a fused norm"
    if not (_biased_conv(block.in_layers[-1]) and _biased_conv(block.out_layers[-1])):
        return "its convolutions are not plain zero-padded nn.Conv2d with a bias"
    if not isinstance(block.out_layers[2], nn.Dropout):
        return "out_layers[2] is not a dropout"
    if not (isinstance(block.skip_connection, nn.Identity) or _biased_conv(block.skip_connection)):
        return "the skip connection is neither an identity nor a plain conv"
    if not (isinstance(block.emb_layers[0], nn.SiLU) and type(block.emb_layers[1]) is nn.Linear):
        return "emb_layers is not SiLU + Linear"
    if block.emb_layers[1].bias is None:
        return "emb_layers' Linear has no bias"
    return None


# -- first-stage ResnetBlock ---------------------------------------------------------------------------------
class FusedResnetBlock(ResnetBlock):
    """First-stage ``ResnetBlock`` with the fused eval forward of :class:`FusedResBlock`."""

    unfused_class: ClassVar[type[nn.Module]] = ResnetBlock
    fusion_backend: Backend
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    norm_handoff: NormHandoff | None = None  # shared with the decoder's norms (link_decoder)
    feeds_norm: bool = False  # the output goes straight into a norm: offer its statistics (link_decoder)

    implicit_conv: bool = True  # conv2 + its epilogue as ldm_sdk.accel.implicit_conv where that pays

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        norm1, norm2 = _silu_norm(self.norm1), _silu_norm(self.norm2)
        if self.training or norm1 is None or norm2 is None:
            return ResnetBlock.forward(self, x, temb)
        backend = _backend(self)
        rec = self.kernel_recorder
        h = _conv_no_bias(self.conv1, norm1(x), rec)  # norm1 takes x's offered statistics
        conv1_bias = cast(Tensor, self.conv1.bias)
        if temb is not None:
            if not hasattr(self, "temb_proj"):
                raise ValueError(
                    "this ResnetBlock was built with temb_channels=0 and takes no time embedding"
                )
            proj = self.temb_proj
            shift = torch.addmm(conv1_bias + proj.bias, F.silu(temb), proj.weight.t())
        else:
            shift = conv1_bias.expand(h.shape[0], -1)
        h = _norm_shift(norm2, h, shift, backend, rec)
        skip: nn.Module | None = None
        if self.in_channels != self.out_channels:
            skip = self.conv_shortcut if self.use_conv_shortcut else self.nin_shortcut
        handoff = self.norm_handoff if self.feeds_norm else None
        if self._implicit_conv2_pays(h, backend):
            return self._conv2_epilogue(h, x, skip, handoff)
        h = _conv_no_bias(self.conv2, h, rec)
        residual, skip_bias = _skip(skip, x)
        return residual_add_for_norm(
            h,
            self.conv2.bias,
            residual,
            residual_bias=skip_bias,
            handoff=handoff,
            backend=backend,
            recorder=rec,
        )

    def _implicit_conv2_pays(self, h: Tensor, backend: Backend) -> bool:
        """Whether ``conv2`` runs as :func:`~ldm_sdk.accel.implicit_conv.conv3x3_fused` on ``h``: it fits
        (Hopper or the interpreter, half precision, channels_last, the Triton backend; ``implicit_conv``
        on) and the map is at least :data:`~ldm_sdk.accel.implicit_conv.EPILOGUE_MIN_WIDTH` wide."""
        if not self.implicit_conv or h.shape[-1] < EPILOGUE_MIN_WIDTH:
            return False
        return _use_triton(backend, "conv3x3_fused", h) and fused_conv_fits(h, self.conv2) is None

    def _conv2_epilogue(
        self, h: Tensor, x: Tensor, skip: nn.Module | None, handoff: NormHandoff | None
    ) -> Tensor:
        """``conv2(h) + bias + skip(x)`` as one kernel that also takes the next norm's statistics (offered
        to ``handoff``) -- the convolution, the bias + residual pass and the statistics pass of the
        cuDNN path in one."""
        residual, skip_bias = _skip(skip, x)
        if residual.stride() != h.stride():
            residual = residual.contiguous(memory_format=torch.channels_last)
        out, stats = conv3x3_fused(
            h,
            self.conv2.weight,
            self.conv2.bias,
            residual=residual,
            residual_bias=skip_bias,
            stats_groups=handoff_groups(handoff, tuple(h.shape)),
            recorder=self.kernel_recorder,
        )
        if handoff is not None and stats is not None:
            handoff.offer(out, stats)
        return out


def _resnet_fusable(block: ResnetBlock) -> str | None:
    if _silu_norm(block.norm1) is None or _silu_norm(block.norm2) is None:
        return "its norms are not fused with their SiLU (run fuse_model first)"
    if not isinstance(block.act1, nn.Identity) or not isinstance(block.act2, nn.Identity):
        return "a SiLU module is still in place after a fused norm"
    convs = [block.conv1, block.conv2]
    if block.in_channels != block.out_channels:
        convs.append(block.conv_shortcut if block.use_conv_shortcut else block.nin_shortcut)
    if not all(_biased_conv(c) for c in convs):
        return "its convolutions are not plain zero-padded nn.Conv2d with a bias"
    if not isinstance(block.dropout, nn.Dropout):
        return "dropout is not an nn.Dropout"
    proj = getattr(block, "temb_proj", None)
    if proj is not None and (type(proj) is not nn.Linear or proj.bias is None):
        return "temb_proj is not an nn.Linear with a bias"
    return None


# -- transformer blocks --------------------------------------------------------------------------------------
class FusedTransformerBlock(BasicTransformerBlock):
    """``BasicTransformerBlock`` whose first LayerNorm is the row kernel, whose residual adds after the two
    attentions are fused with the next LayerNorm (:func:`~ldm_sdk.accel.residual_kernels.add_layer_norm`),
    and whose feed-forward output projection accumulates into the residual stream in place (its bias
    carried into that stream by the preceding fused add), so the feed-forward's residual add is no kernel.

    The attentions' output projections run without their bias, which the fused add after each adds (as
    ``input_bias``): cuBLAS's bias epilogue picked kernels up to 1.7x slower than the plain GEMM at the
    SD-1.5 shapes (H100, ``bench/results/op_roofline_h100.json``: ``(B 4096, 320) x (320, 320)`` 57 vs 34 us
    at B = 16). :meth:`forward_biased` takes an input whose producer left its bias off the same way (the
    spatial transformer's ``proj_in``)."""

    unfused_class: ClassVar[type[nn.Module]] = BasicTransformerBlock
    fusion_backend: Backend
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records

    def _forward(self, x: Tensor, context: Tensor | None, repeats: int = 1) -> Tensor:
        if self.training:
            return BasicTransformerBlock._forward(self, x, context, repeats)
        return self.forward_biased(x, None, context, repeats)

    def forward_biased(
        self, x: Tensor, x_bias: Tensor | None, context: Tensor | None = None, repeats: int = 1
    ) -> Tensor:
        """The block's output for the input ``x + x_bias`` (``x_bias``: C values or None), inference only:
        the bias is added inside the first two fused kernels, never as a pass of its own. ``repeats``: as
        :meth:`BasicTransformerBlock.forward` (the copies part after the self-attention)."""
        if self.training:
            raise RuntimeError("forward_biased is the inference path; in training call the block itself")
        backend, rec = _backend(self), self.kernel_recorder
        n1, n2, n3 = self.norm1, self.norm2, self.norm3
        if self.disable_self_attn:  # attn1 reads the context too: the copies part before it
            x, repeats = repeat_batch(x, repeats), 1
        h = layer_norm(x, n1.weight, n1.bias, n1.eps, input_bias=x_bias, backend=backend, recorder=rec)
        a, a_bias = _attend_unbiased(self.attn1, h, context if self.disable_self_attn else None)
        x, h = add_layer_norm(
            a,
            x,
            n2.weight,
            n2.bias,
            n2.eps,
            input_bias=a_bias,
            residual_bias=x_bias,
            backend=backend,
            recorder=rec,
        )
        x, h = repeat_batch(x, repeats), repeat_batch(h, repeats)
        a, a_bias = _attend_unbiased(self.attn2, h, context)
        ff_in, ff_out = _feed_forward_parts(self.ff)
        if ff_out is None:
            x, h = add_layer_norm(
                a, x, n3.weight, n3.bias, n3.eps, input_bias=a_bias, backend=backend, recorder=rec
            )
            return self.ff(h) + x
        # x: a new tensor from add_layer_norm holding x + ff_out.bias; the output GEMM adds into it
        x, h = add_layer_norm(
            a,
            x,
            n3.weight,
            n3.bias,
            n3.eps,
            carry_bias=ff_out.bias,
            input_bias=a_bias,
            backend=backend,
            recorder=rec,
        )
        g = ff_in(h)
        rows, weight = x.view(-1, x.shape[-1]), ff_out.weight.t()
        if torch.is_grad_enabled() and (x.requires_grad or g.requires_grad or weight.requires_grad):
            return torch.addmm(rows, g.reshape(-1, g.shape[-1]), weight).view(
                x.shape
            )  # autograd: no in-place
        rows.addmm_(g.reshape(-1, g.shape[-1]), weight)
        return x


def _attend_unbiased(attn: nn.Module, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """``(attn(x, context) - b, b)`` with ``b`` the output projection's bias, for a
    :class:`FusedCrossAttention` whose ``to_out`` is (Linear with a bias, Dropout) in eval mode; else
    ``(attn(x, context), None)``."""
    if isinstance(attn, FusedCrossAttention) and not attn.training:
        out = attn.to_out
        proj = out[0] if len(out) == 2 and type(out[1]) is nn.Dropout else None
        if type(proj) is nn.Linear and proj.bias is not None:
            return F.linear(attn.attention(*attn.project(x, context)), proj.weight), proj.bias
    return attn(x, context=context), None


def _feed_forward_parts(ff: nn.Module) -> tuple[nn.Module, nn.Linear | None]:
    """``(input part, output Linear)`` of a ``FeedForward`` whose ``net`` is (projection, dropout, Linear
    with a bias); ``(ff, None)`` when it is anything else (then it runs whole)."""
    net = getattr(ff, "net", None)
    if (
        isinstance(net, nn.Sequential)
        and len(net) == 3
        and isinstance(net[1], nn.Dropout)
        and type(net[2]) is nn.Linear
        and net[2].bias is not None
    ):
        return net[0], net[2]
    return ff, None


def _transformer_fusable(block: BasicTransformerBlock) -> str | None:
    for name in ("norm1", "norm2", "norm3"):
        norm = getattr(block, name)
        if type(norm) is not nn.LayerNorm or len(norm.normalized_shape) != 1:
            return f"{name} is not a plain nn.LayerNorm over the last dim"
    return None


class FusedCrossAttention(CrossAttention):
    """``CrossAttention`` whose projections from one input run as one GEMM: ``to_q`` / ``to_k`` / ``to_v``
    for self-attention, ``to_k`` / ``to_v`` for a context, and whose attention over a short key sequence is
    the one-tile Triton kernel (:meth:`attention`). :func:`fuse_blocks` moves their weights into one
    storage, in that order (each Parameter stays itself, now a view of it: state dicts, in-place loading and
    saving are unchanged), so the stacked weight is a view too and no copy is made per call. If the
    Parameters were given new storage since (``module.to(...)``, assignment), the three separate GEMMs run."""

    unfused_class: ClassVar[type[nn.Module]] = CrossAttention
    fusion_backend: Backend
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    context_projections: ContextProjections | None = None  # the UNet's one K / V GEMM (fuse_blocks)
    context_index: int = 0

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Over at most :data:`~ldm_sdk.accel.short_attention.MAX_KEYS` keys (a prompt's tokens, an 8 x 8
        map), where it measured faster, the one-tile Triton kernel of :mod:`ldm_sdk.accel.short_attention`;
        else the original."""
        backend = _backend(self)
        if (
            not self.training
            and fits_kernel(q, k, v, self.heads)
            and kernel_pays(q, self.heads)
            and _use_triton(backend, "short_attention", q, k, v)
        ):
            return short_attention_triton(q, k, v, self.heads, self.scale, recorder=self.kernel_recorder)
        return CrossAttention.attention(self, q, k, v)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        inner = self.heads * self.dim_head
        if context is None and (qkv := _stacked(self.to_q, self.to_k, self.to_v)) is not None:
            q, k, v = F.linear(x, qkv).split(inner, dim=-1)
            return q, k, v
        if context is not None:
            shared = self.context_projections
            projected = shared.kv(self.context_index, context) if shared is not None else None
            if projected is None and (kv := _stacked(self.to_k, self.to_v)) is not None:
                projected = F.linear(context, kv)
            if projected is not None:
                k, v = projected.split(inner, dim=-1)
                return self.to_q(x), k, v
        return CrossAttention.project(self, x, context)


def _stacked(*linears: nn.Linear) -> Tensor | None:
    """The weights of ``linears`` as one ``(sum out, in)`` view while they lie back to back in one storage
    (as :func:`_prepare_attention` leaves them), else None."""
    return stacked_view([lin.weight for lin in linears])


def _attention_fusable(module: CrossAttention) -> str | None:
    projections = (module.to_q, module.to_k, module.to_v)
    if any(type(p) is not nn.Linear or p.bias is not None for p in projections):
        return "to_q / to_k / to_v are not bias-free nn.Linear"
    weights = [p.weight for p in projections]
    if len({(w.device, w.dtype) for w in weights}) != 1:
        return "to_q / to_k / to_v weights differ in device or dtype"
    return None


def _prepare_attention(module: CrossAttention) -> None:
    if module.to_q.in_features == module.to_k.in_features:
        stack_storage([module.to_q.weight, module.to_k.weight, module.to_v.weight])  # one QKV GEMM
    else:
        stack_storage([module.to_k.weight, module.to_v.weight])  # context width differs: one K/V GEMM


class FusedSpatialTransformer(SpatialTransformer):
    """``SpatialTransformer`` (1 x 1-conv projections) whose projections run as GEMMs over the pixel rows
    of a channels_last map, no layout copy; other inputs take the original path. The projections' biases are
    not in the GEMMs (cuBLAS's bias epilogue was the slower kernel, see :class:`FusedTransformerBlock`):
    ``proj_in``'s is added by the first block's fused kernels when that block is a
    :class:`FusedTransformerBlock` (else by the GEMM), ``proj_out``'s by the residual add's kernel."""

    unfused_class: ClassVar[type[nn.Module]] = SpatialTransformer
    fusion_backend: Backend
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    norm_handoff: NormHandoff | None = None  # shared with the UNet's norms (link_unet)
    feeds_norm: bool = False  # the output goes straight into a norm: offer its statistics (link_unet)

    def forward(self, x: Tensor, context: Tensor | list[Tensor] | None = None, repeats: int = 1) -> Tensor:
        if self.training or not _is_channels_last(x):
            return SpatialTransformer.forward(self, x, context, repeats)
        contexts = context if isinstance(context, list) else [context]
        if len(contexts) not in (1, len(self.transformer_blocks)):
            return SpatialTransformer.forward(self, x, context, repeats)  # it raises the error
        b, c, h, w = x.shape
        proj_in, proj_out = cast(nn.Conv2d, self.proj_in), cast(nn.Conv2d, self.proj_out)
        rows = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: NHWC memory
        first = self.transformer_blocks[0]
        fold_in = isinstance(first, FusedTransformerBlock) and not first.training
        t = F.linear(rows, proj_in.weight.flatten(1), None if fold_in else proj_in.bias)
        for i, block in enumerate(self.transformer_blocks):
            ctx = contexts[i if len(contexts) > 1 else 0]
            r = repeats if i == 0 else 1
            if fold_in and i == 0:
                t = cast(FusedTransformerBlock, block).forward_biased(t, proj_in.bias, ctx, r)
            else:
                t = block(t, context=ctx, repeats=r)
        out = F.linear(t, proj_out.weight.flatten(1)).view(-1, h, w, c).permute(0, 3, 1, 2)  # channels_last
        x = repeat_batch(x, repeats)
        handoff = self.norm_handoff if self.feeds_norm else None
        return residual_add_for_norm(
            out, proj_out.bias, x, handoff=handoff, backend=_backend(self), recorder=self.kernel_recorder
        )


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _spatial_fusable(module: SpatialTransformer) -> str | None:
    if module.use_linear:
        return "use_linear: the projections already are GEMMs"
    for name in ("proj_in", "proj_out"):
        conv = getattr(module, name)
        if not (plain_conv(conv, 1) and conv.bias is not None):
            return f"{name} is not a plain 1x1 nn.Conv2d with a bias"
    return None


# -- the pass ------------------------------------------------------------------------------------------------
#: original class -> (fused class, why-not check)
_FUSED = {
    ResBlock: (FusedResBlock, _resblock_fusable),
    ResnetBlock: (FusedResnetBlock, _resnet_fusable),
    BasicTransformerBlock: (FusedTransformerBlock, _transformer_fusable),
    SpatialTransformer: (FusedSpatialTransformer, _spatial_fusable),
    CrossAttention: (FusedCrossAttention, _attention_fusable),
    autoencoder.Upsample: (FusedFirstStageUpsample, first_stage_upsample_fusable),
    unet.Upsample: (FusedUNetUpsample, unet_upsample_fusable),
    autoencoder.AttnBlock: (FusedAttnBlock, attn_block_fusable),
    UNetModel: (FusedUNetModel, lambda module: None),
    nn.Conv2d: (FusedThinConv2d, thin_conv_fusable),
}
#: fused classes whose why-not reasons are not reported (most convolutions are not thin: that is no news)
_QUIET_SKIPS = (FusedThinConv2d,)


@dataclass(frozen=True)
class BlockFusionReport:
    """What :func:`fuse_blocks` switched (per fused class name without "Fused"), what was fused already,
    and the blocks left alone with the reason."""

    backend: str
    fused: dict[str, int]
    already_fused: int = 0
    skipped: tuple[str, ...] = ()
    shared_embedding: int = 0  # residual blocks newly given their UNet's one embedding GEMM

    @property
    def total(self) -> int:
        return sum(self.fused.values())

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {name}" for name, n in self.fused.items()) or "nothing"
        text = f"fused blocks (backend {self.backend}): {counts}; {self.already_fused} already fused"
        if self.shared_embedding:
            text += f"; {self.shared_embedding} ResBlock embedding projections as one GEMM"
        return text + (f"; skipped: {'; '.join(self.skipped)}" if self.skipped else "")


def fuse_blocks(module: nn.Module, *, backend: Backend = "auto") -> BlockFusionReport:
    """Switch ``module``'s blocks (itself included) to the fused forwards where they qualify (see the
    module doc), in place. Run :func:`~ldm_sdk.accel.fusion.fuse_model` first: residual blocks need their
    norms fused. Idempotent; ``backend`` is set on every fused block."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse_blocks takes an nn.Module, got {type(module).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown fusion backend {backend!r}; valid: {', '.join(BACKENDS)}")
    fused: dict[str, int] = {}
    already = 0
    skipped: list[str] = []
    for name, block in module.named_modules():
        if getattr(type(block), "unfused_class", None) not in (None, type(block)):
            already += 1
            block.fusion_backend = backend
            continue
        entry = _FUSED.get(type(block))
        if entry is None:
            continue
        fused_cls, why_not = entry
        reason = why_not(block)  # type: ignore[operator]
        if reason is not None:
            if fused_cls not in _QUIET_SKIPS:
                skipped.append(f"{name or type(block).__name__}: {reason}")
            continue
        if fused_cls is FusedCrossAttention:
            _prepare_attention(cast(CrossAttention, block))
        elif fused_cls is FusedAttnBlock:
            prepare_attn_block(cast(autoencoder.AttnBlock, block))
        block.__class__ = fused_cls
        block.fusion_backend = backend
        key = fused_cls.__name__.removeprefix("Fused")
        fused[key] = fused.get(key, 0) + 1
    biased = fuse_biased_convs(module, backend)
    if biased:
        fused["BiasedConv2d"] = biased
    for net in module.modules():
        if isinstance(net, autoencoder.Decoder):
            link_decoder(net)
        elif isinstance(net, UNetModel):
            link_unet(net)
    shared = 0
    for net in module.modules():
        if isinstance(net, UNetModel):
            blocks = [m for m in net.modules() if isinstance(m, FusedResBlock) and m.emb_shifts is None]
            if share_embedding_projection(blocks) is not None:
                shared += len(blocks)
            attns = [m for m in net.modules() if _projects_context(m)]
            if attns and all(a.context_projections is None for a in attns):
                share_context_projections(net, attns)
    return BlockFusionReport(
        backend=backend, fused=fused, already_fused=already, skipped=tuple(skipped), shared_embedding=shared
    )


def decoder_sequence(decoder: autoencoder.Decoder) -> list[nn.Module]:
    """The modules ``decoder`` runs between ``conv_in`` and ``conv_out``, in the order its forward runs
    them: the mid block's, then per level (top down) its blocks (each followed by its attention, if any) and
    its upsampling, then ``norm_out`` (unless ``give_pre_end``)."""
    mid = decoder.mid
    seq: list[nn.Module] = [mid.block_1, mid.attn_1, mid.block_2]
    for i_level in reversed(range(decoder.num_resolutions)):
        level = decoder.up[i_level]
        for i_block, block in enumerate(level.block):
            seq.append(block)
            if len(level.attn) > 0:
                seq.append(level.attn[i_block])
        if i_level != 0:
            seq.append(level.upsample)
    if not decoder.give_pre_end:
        seq.append(decoder.norm_out)
    return seq


def unet_sequence(unet: UNetModel) -> list[nn.Module | None]:
    """The layers ``unet`` runs, in order: each input block's, the middle block's, each output block's after
    a None (the skip concatenation before it: its input is no layer's output), then the output norm."""
    seq: list[nn.Module | None] = []
    for block in unet.input_blocks:
        seq.extend(block)
    seq.extend(unet.middle_block)
    for block in unet.output_blocks:
        seq.append(None)
        seq.extend(block)
    seq.append(unet.out[0])
    return seq


def _takes_norm_stats(module: nn.Module | None) -> FusedGroupNorm | None:
    """The fused norm that reads ``module``'s input first, when ``module`` takes offered statistics."""
    if isinstance(module, FusedGroupNorm):
        return module
    if isinstance(module, FusedResnetBlock):
        return _silu_norm(module.norm1)
    if isinstance(module, FusedResBlock):
        return _silu_norm(module.in_layers[0])
    if isinstance(module, FusedAttnBlock | FusedSpatialTransformer) and isinstance(
        module.norm, FusedGroupNorm
    ):
        return module.norm
    return None


_PRODUCERS = (
    FusedResnetBlock,
    FusedAttnBlock,
    FusedFirstStageUpsample,
    FusedResBlock,
    FusedSpatialTransformer,
)


def _link(seq: list[nn.Module | None]) -> int:
    """One :class:`~ldm_sdk.accel.norm_handoff.NormHandoff` for the norms of ``seq`` that take offered
    statistics and for its producers, which are marked when the next entry starts with such a norm;
    returns how many offer (0 where the norms differ in their group count)."""
    norms = [norm for norm in map(_takes_norm_stats, seq) if norm is not None]
    if not norms or len({norm.num_groups for norm in norms}) != 1:
        return 0
    handoff = NormHandoff(norms[0].num_groups)
    producers = 0
    for module, nxt in zip(seq, [*seq[1:], None], strict=True):
        norm = _takes_norm_stats(module)
        if norm is not None:
            norm.norm_handoff = handoff
        if isinstance(module, _PRODUCERS):
            module.norm_handoff = handoff
            module.feeds_norm = _takes_norm_stats(nxt) is not None
            producers += module.feeds_norm
    return producers


def link_decoder(decoder: autoencoder.Decoder) -> int:
    """Give ``decoder``'s fused residual / attention blocks, sub-pixel upsamplings and norms one
    :class:`~ldm_sdk.accel.norm_handoff.NormHandoff` and mark the modules whose output its next module
    normalises first (:mod:`ldm_sdk.accel.norm_handoff`); returns how many offer statistics (0 where the
    norms differ in their group count). Run by :func:`fuse_blocks`; idempotent."""
    return _link(list(decoder_sequence(decoder)))


def link_unet(unet: UNetModel) -> int:
    """:func:`link_decoder` for a UNet (:func:`unet_sequence`): its residual blocks and spatial
    transformers offer their output's statistics to the norm of the layer after them (a transformer's, the
    next residual block's, the output norm), never across a skip concatenation."""
    return _link(unet_sequence(unet))


def _projects_context(module: nn.Module) -> bool:
    """A fused cross-attention whose context width differs from its query width (its K / V weights are
    stacked on their own, :func:`_prepare_attention`)."""
    return (
        isinstance(module, FusedCrossAttention)
        and module.to_q.in_features != module.to_k.in_features
        and _stacked(module.to_k, module.to_v) is not None
    )


def unfuse_blocks(module: nn.Module) -> int:
    """Switch fused blocks back to their original classes (each fused class names its ``unfused_class``);
    returns how many. :func:`~ldm_sdk.accel.fusion.unfuse_model` does this too, with the norms."""
    for net in module.modules():
        if "_context_projections_hook" in net.__dict__:
            unshare_context_projections(net)
    return sum(restore_class(block) for block in module.modules())


__all__ = [
    "BlockFusionReport",
    "FusedCrossAttention",
    "FusedResBlock",
    "FusedResnetBlock",
    "FusedSpatialTransformer",
    "FusedTransformerBlock",
    "fuse_blocks",
    "unfuse_blocks",
]
