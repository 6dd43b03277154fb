"""A model pass that switches GroupNorm (+ the SiLU after it) and GEGLU to the fused ops of
:mod:`ldm_sdk.accel.triton_kernels`.

What :func:`fuse_model` does, in place:

* every ``GroupNorm32`` (UNet) and plain ``nn.GroupNorm`` (first stage, SpatialTransformer) becomes a
  :class:`FusedGroupNorm` -- a ``nn.GroupNorm`` subclass holding the *same* ``weight`` / ``bias``
  Parameter objects, so ``state_dict()`` keys and values, ``parameters()`` and the CUDA-graph wrapper's
  weight tracking are unchanged. Subclasses of ``nn.GroupNorm`` with their own ``forward`` are left alone;
* a SiLU that *directly* follows a norm in the data flow is absorbed into it (``act="silu"``) and replaced
  by :class:`AbsorbedSiLU`, a parameter-free ``nn.Identity``, so module indices and keys stay the same.
  Only these known places count, because module order alone does not prove data flow:

  - UNet ``ResBlock``: ``in_layers`` = (norm, SiLU, conv) -- also with up / down sampling, where
    ``in_layers[:-1]`` runs both; ``out_layers`` = (norm, SiLU, dropout, conv) *unless*
    ``use_scale_shift_norm`` (there a FiLM scale / shift comes between the norm and the SiLU, so only the
    norm is fused and the pass reports it as skipped);
  - ``UNetModel.out`` = (norm, SiLU, conv);
  - first stage ``ResnetBlock``: ``norm1`` -> ``act1``, ``norm2`` -> ``act2``; ``Encoder`` / ``Decoder``:
    ``norm_out`` -> ``act_out``;

* every ``GEGLU`` becomes a :class:`FusedGEGLU` (same ``proj`` Linear) whose forward is ``proj`` then one
  fused ``a * gelu(gate)``, or, where it measured faster (narrow inputs), both as one dual GEMM
  (:mod:`ldm_sdk.accel.geglu_gemm`).

``backend``: ``"auto"`` decides per call -- Triton for CUDA tensors when Triton imports and no gradient is
needed, the float32 torch reference otherwise (CPU, offloaded weights, training); ``"triton"`` /
``"reference"`` force one. The fused modules work on any device and in training (through the reference).

Numerics: the fused ops compute in float32 and round once to the input dtype. For float32 models with the
reference backend the fused model is bit-identical to the unfused one (the reference makes the same torch
calls in the same order). In fp16 / bf16 GroupNorm32 + SiLU rounded twice (after the norm, after the SiLU)
and now rounds once; the first stage's native half-precision GroupNorm is replaced by a float32 one. Both
are at least as accurate as before; outputs differ from the unfused model by about one half-precision
rounding per fused op.

Idempotent: fusing a fused model changes nothing except the backend, which is set to the one given
(reported as ``already_fused``). :func:`unfuse_model` restores the original module classes (same
Parameters) and SiLUs.

Limits: the pass swaps modules one by one, so fuse (or unfuse) a model before other threads call it -- a
forward running meanwhile may see a norm that already applies the SiLU next to the SiLU module it replaces.
A bare norm passed as ``module`` itself cannot be replaced in place (wrap it, or use the fused module).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

from torch import Tensor, nn

from ldm_sdk.accel.context_projections import unshare_context_projections
from ldm_sdk.accel.geglu_gemm import geglu_linear, geglu_linear_pays
from ldm_sdk.accel.norm_handoff import NormHandoff, taken_stats
from ldm_sdk.accel.triton_kernels import BACKENDS, Act, Backend, KernelRecorder, geglu, group_norm_act
from ldm_sdk.models.attention import GEGLU
from ldm_sdk.models.autoencoder import Decoder, Encoder, ResnetBlock
from ldm_sdk.models.embeddings import GroupNorm32
from ldm_sdk.models.unet import ResBlock, UNetModel

#: the norm classes the pass replaces (exact types: a subclass may have its own forward)
FUSABLE_NORMS: tuple[type[nn.GroupNorm], ...] = (nn.GroupNorm, GroupNorm32)


class FusedGroupNorm(nn.GroupNorm):
    """GroupNorm (+ SiLU when ``act == "silu"``) through :func:`~ldm_sdk.accel.triton_kernels.group_norm_act`.

    Built from an existing norm by :meth:`from_norm`, sharing its ``weight`` / ``bias`` Parameters;
    ``source`` is the class it replaced (``GroupNorm32`` or ``nn.GroupNorm``), restored by
    :func:`unfuse_model`. Computes in float32 and returns ``x.dtype`` (``GroupNorm32``'s contract).
    """

    act: Act
    backend: Backend
    source: type[nn.GroupNorm]
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    norm_handoff: NormHandoff | None = None  # statistics of x from its producer (ldm_sdk.accel.norm_handoff)

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        *,
        act: Act = "none",
        backend: Backend = "auto",
        source: type[nn.GroupNorm] = nn.GroupNorm,
    ) -> None:
        super().__init__(num_groups, num_channels, eps, affine)
        self.act = _check_act(act)
        self.backend = _check_backend(backend)
        self.source = source

    @classmethod
    def from_norm(cls, norm: nn.GroupNorm, *, act: Act = "none", backend: Backend = "auto") -> FusedGroupNorm:
        """A fused norm holding ``norm``'s own Parameters (no copy, no new device memory)."""
        fused = cls(
            norm.num_groups,
            norm.num_channels,
            norm.eps,
            affine=False,  # no new parameters: norm's are attached below
            act=act,
            backend=backend,
            source=type(norm),
        )
        fused.affine = norm.affine
        fused.weight = norm.weight
        fused.bias = norm.bias
        fused.train(norm.training)
        return fused

    def unfused(self) -> nn.GroupNorm:
        """The ``source`` class again, holding this module's Parameters (the SiLU is not part of it)."""
        norm = self.source(self.num_groups, self.num_channels, self.eps, affine=False)
        norm.affine = self.affine
        norm.weight = self.weight
        norm.bias = self.bias
        norm.train(self.training)
        return norm

    def forward(self, x: Tensor) -> Tensor:
        return group_norm_act(
            x,
            self.weight,
            self.bias,
            self.num_groups,
            self.eps,
            self.act,
            stats=taken_stats(self, x, self.num_groups),
            backend=self.backend,
            recorder=self.kernel_recorder,
        )

    def extra_repr(self) -> str:
        extra = f"act={self.act!r}, backend={self.backend!r}, source={self.source.__name__}"
        return f"{super().extra_repr()}, {extra}"


class AbsorbedSiLU(nn.Identity):
    """Placeholder of a SiLU whose work the preceding :class:`FusedGroupNorm` (``act="silu"``) now does."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace  # the SiLU's flag, restored by unfuse_model


class FusedGEGLU(GEGLU):
    """``GEGLU`` whose gating is one fused ``a * gelu(gate)`` (:func:`~ldm_sdk.accel.triton_kernels.geglu`);
    holds the original ``proj`` Linear."""

    backend: Backend
    kernel_recorder: KernelRecorder | None = None  # set by ldm_sdk.accel.precompile while it records
    #: where it measured faster (:func:`~ldm_sdk.accel.geglu_gemm.geglu_linear_pays`): the projection and
    #: the gating as one Triton dual GEMM (:func:`~ldm_sdk.accel.geglu_gemm.geglu_linear`) instead of
    #: cuBLAS + the gating kernel
    one_gemm: bool = True

    def __init__(self, proj: nn.Linear, *, backend: Backend = "auto") -> None:
        nn.Module.__init__(self)  # not GEGLU.__init__: the existing projection is attached, none is built
        self.proj = proj
        self.backend = _check_backend(backend)

    @classmethod
    def from_geglu(cls, module: GEGLU, *, backend: Backend = "auto") -> FusedGEGLU:
        fused = cls(module.proj, backend=backend)
        fused.train(module.training)
        return fused

    def unfused(self) -> GEGLU:
        plain = GEGLU.__new__(GEGLU)
        nn.Module.__init__(plain)
        plain.proj = self.proj
        plain.train(self.training)
        return plain

    def forward(self, x: Tensor) -> Tensor:
        proj = self.proj
        if self.one_gemm and geglu_linear_pays(x, proj.weight, proj.bias, self.backend):
            return geglu_linear(
                x, proj.weight, proj.bias, backend=self.backend, recorder=self.kernel_recorder
            )
        return geglu(proj(x), backend=self.backend, recorder=self.kernel_recorder)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


@dataclass(frozen=True)
class FusionReport:
    """What :func:`fuse_model` changed: norms fused alone (``group_norm``), norms that absorbed the SiLU
    after them (``group_norm_silu``), ``geglu`` modules switched, modules that were fused already (their
    backend set), and places left unfused with the reason (``skipped``)."""

    backend: str
    group_norm: int = 0
    group_norm_silu: int = 0
    geglu: int = 0
    already_fused: int = 0
    skipped: tuple[str, ...] = ()

    @property
    def fused(self) -> int:
        """Modules switched by this call."""
        return self.group_norm + self.group_norm_silu + self.geglu

    def __str__(self) -> str:
        text = (
            f"fused (backend {self.backend}): {self.group_norm_silu} GroupNorm+SiLU, {self.group_norm} "
            f"GroupNorm, {self.geglu} GEGLU; {self.already_fused} already fused"
        )
        return text + (f"; skipped: {'; '.join(self.skipped)}" if self.skipped else "")


def _check_backend(backend: str) -> Backend:
    if backend not in BACKENDS:
        raise ValueError(f"unknown fusion backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return cast(Backend, backend)


def _check_act(act: str) -> Act:
    if act not in ("none", "silu"):
        raise ValueError(f"unknown activation {act!r}; valid: 'none', 'silu'")
    return cast(Act, act)


# -- where a SiLU directly follows a norm -------------------------------------------------------------------
Slot = tuple[nn.Module, str]  # (parent, child name)


def _pairs(root: nn.Module) -> Iterator[tuple[str, Slot | None, Slot]]:
    """(qualified name, norm slot or None when the SiLU must stay, SiLU slot) for each known place."""
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ResBlock):
            yield f"{prefix}in_layers", (module.in_layers, "0"), (module.in_layers, "1")
            if module.use_scale_shift_norm:
                yield f"{prefix}out_layers", None, (module.out_layers, "1")
            else:
                yield f"{prefix}out_layers", (module.out_layers, "0"), (module.out_layers, "1")
        elif isinstance(module, UNetModel):
            yield f"{prefix}out", (module.out, "0"), (module.out, "1")
        elif isinstance(module, ResnetBlock):
            yield f"{prefix}norm1", (module, "norm1"), (module, "act1")
            yield f"{prefix}norm2", (module, "norm2"), (module, "act2")
        elif isinstance(module, Encoder | Decoder):
            yield f"{prefix}norm_out", (module, "norm_out"), (module, "act_out")


def _get(slot: Slot) -> nn.Module | None:
    parent, child = slot
    return parent._modules.get(child)


def _set(slot: Slot, module: nn.Module) -> None:
    parent, child = slot
    parent._modules[child] = module  # same key, same position: indices and state_dict keys unchanged


def _is_norm(module: nn.Module | None) -> bool:
    return type(module) in FUSABLE_NORMS or isinstance(module, FusedGroupNorm)


def fuse_model(module: nn.Module, *, backend: Backend = "auto") -> FusionReport:
    """Switch ``module``'s GroupNorms (absorbing the SiLU after them where that is known to be the data
    flow) and GEGLUs to the fused ops, in place; see the module doc. Returns what changed."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fuse_model takes an nn.Module, got {type(module).__name__}")
    backend = _check_backend(backend)
    counts = {"group_norm": 0, "group_norm_silu": 0, "geglu": 0, "already_fused": 0}
    skipped: list[str] = []
    with_silu: set[int] = set()  # ids of norms that absorb a SiLU
    silu_slots: list[Slot] = []
    for where, norm_slot, silu_slot in _pairs(module):
        silu = _get(silu_slot)
        if norm_slot is None:
            if isinstance(silu, nn.SiLU):
                skipped.append(f"{where}: a scale / shift comes between the norm and the SiLU")
            continue
        norm = _get(norm_slot)
        if not _is_norm(norm) or not isinstance(silu, nn.SiLU | AbsorbedSiLU):
            continue  # a customised model: leave it
        with_silu.add(id(norm))
        if isinstance(silu, nn.SiLU):
            silu_slots.append(silu_slot)

    for parent in list(module.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is None:
                continue
            slot = (parent, child_name)
            act: Act = "silu" if id(child) in with_silu else "none"
            if isinstance(child, FusedGroupNorm):
                counts["already_fused"] += 1
                child.backend = backend
                if act == "silu":  # a SiLU found after it (already absorbed, or put back by hand)
                    child.act = "silu"
            elif isinstance(child, FusedGEGLU):
                counts["already_fused"] += 1
                child.backend = backend
            elif type(child) in FUSABLE_NORMS:
                _set(slot, FusedGroupNorm.from_norm(cast(nn.GroupNorm, child), act=act, backend=backend))
                counts["group_norm_silu" if act == "silu" else "group_norm"] += 1
            elif type(child) is GEGLU:
                _set(slot, FusedGEGLU.from_geglu(child, backend=backend))
                counts["geglu"] += 1
            elif isinstance(child, nn.GroupNorm):
                skipped.append(f"{_name(module, child)}: {type(child).__name__} has its own forward")
    for slot in silu_slots:
        silu = _get(slot)
        absorbed = AbsorbedSiLU(inplace=bool(getattr(silu, "inplace", False)))
        absorbed.train(silu.training if silu is not None else module.training)
        _set(slot, absorbed)
    return FusionReport(backend=backend, skipped=tuple(skipped), **counts)


def restore_class(module: nn.Module) -> bool:
    """Switch a class-swapped fused block (``ldm_sdk.accel.block_fusion``) back to its ``unfused_class``;
    False when ``module`` is not one."""
    original = getattr(type(module), "unfused_class", None)
    if original is None or type(module) is original:
        return False
    module.__class__ = original
    module.__dict__.pop("fusion_backend", None)
    return True


def unfuse_model(module: nn.Module) -> int:
    """Undo :func:`fuse_model` in place: fused norms / GEGLUs back to their original classes (same
    Parameters), absorbed SiLUs back to ``nn.SiLU``, and the blocks of
    :func:`~ldm_sdk.accel.block_fusion.fuse_blocks` back to their classes (each names its ``unfused_class``).
    Returns how many modules were restored."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"unfuse_model takes an nn.Module, got {type(module).__name__}")
    restored = int(restore_class(module))  # a fused root (a FusedUNetModel passed itself)
    for net in list(module.modules()):
        if "_context_projections_hook" in net.__dict__:
            unshare_context_projections(net)  # the UNet's shared K / V projection (block_fusion.py)
    for parent in list(module.modules()):
        for child_name, child in list(parent._modules.items()):
            if restore_class(child):  # a fused block (block_fusion.py)
                restored += 1
            replacement: nn.Module | None = None
            if isinstance(child, FusedGroupNorm | FusedGEGLU):
                replacement = child.unfused()
            elif isinstance(child, AbsorbedSiLU):
                replacement = nn.SiLU(inplace=child.inplace)
                replacement.train(child.training)
            if replacement is not None:
                _set((parent, child_name), replacement)
                restored += 1
    return restored


def _name(root: nn.Module, target: nn.Module) -> str:
    return next((name for name, m in root.named_modules() if m is target), type(target).__name__)


__all__ = [
    "FUSABLE_NORMS",
    "AbsorbedSiLU",
    "FusedGEGLU",
    "FusedGroupNorm",
    "FusionReport",
    "fuse_model",
    "restore_class",
    "unfuse_model",
]
