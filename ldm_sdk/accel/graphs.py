"""CUDA-graph capture of the denoising network call: a :data:`~ldm_sdk.diffusion.denoiser.ModelFn`
``fn(x, t, cond) -> Tensor`` replayed from a graph instead of launched kernel by kernel.

Why: on a fast GPU the eager SD-1.5 UNet step is bound by host-side kernel launches (H100, fp16, batch 2:
21.2 ms eager, 11.3 ms as a graph replay; ``docs/benchmarks.md``). Capturing the call once per input
signature and replaying it removes that cost. The sampler's own arithmetic (schedule look-ups, the DDIM
update, the guidance combination) stays eager: it is a few small kernels per step.

How :class:`CapturedModel` works:

1. The *signature* of a call -- shape, stride, dtype and device of ``x``, ``t`` and of every present
   :class:`~ldm_sdk.diffusion.conditioning.Conditioning` part -- keys a small LRU cache of captures.
2. On a miss, static input buffers with exactly that layout are allocated and filled with the call's
   values; ``fn`` runs ``warmup`` times on a side stream (lazy cuDNN / cuBLAS set-up, autotuning), the
   last warm-up under torch's sync debug mode "error", so a host synchronisation inside ``fn`` is reported
   with its traceback instead of as an opaque capture failure; then one call is captured into a
   ``torch.cuda.CUDAGraph`` with its own memory pool, and its memset nodes (cuDNN's and cuBLAS's
   workspace zeroing) are rewritten as fill kernels before it is instantiated
   (:mod:`ldm_sdk.accel.graph_memsets`: the same work with less waiting between nodes). Work the watched
   modules can do from the conditioning alone (their ``conditioning_prologue``,
   :mod:`ldm_sdk.accel.cond_prologue`: SD's cross-attention K / V projection) is captured into a graph of
   its own first, replayed only when the conditioning is copied in anew; the call's graph reads its result.
3. Every call (the first included) copies its inputs into the static buffers and replays the graph. A
   caller that passes the very conditioning tensors of its previous call, unmodified, says so
   (``cond_unchanged=True``, as the guided step's denoiser does): their copy is then skipped.
4. The result is a clone of the static output (``clone_output=True``, the default). With
   ``clone_output=False`` it is the static output itself, which the next call of the same signature
   overwrites: safe under :class:`~ldm_sdk.diffusion.guidance.ClassifierFreeGuidance` (its arithmetic makes
   new tensors), not safe for a bare model under a multistep sampler (PLMS, DPM++ 2M keep past outputs),
   nor when another thread may call the same ``CapturedModel``.

Memory: each capture keeps its activation memory (its graph's pool) while it is cached, so a model used at
several sizes holds several pools. When a capture runs out of GPU memory, the model releases the other
captures of itself and its companions (the guided step's graphs of the same network), returns the
allocator's free blocks to the driver and tries once more; if that fails too it raises
:class:`CaptureMemoryError` (the tasks then say to run eagerly, which needs no graph memory).

What ``fn`` must satisfy to be captured (the UNet / attention / first-stage code of this SDK does):

* fixed shapes and the same allocations on every call with the same signature;
* no host synchronisation: no ``.item()``, ``.tolist()``, ``.cpu()``, printing of device tensors, Python
  ``if`` on a device tensor's value (``if torch.any(t < 0):``) or tensors built on the CPU and moved in;
  ``t`` must already be on ``x``'s device (the samplers' ``time_batch`` puts it there);
* tensors that ``fn`` closes over (weights, a guidance wrapper's unconditional embedding) are read at
  replay from the memory they occupied at capture time: keep them alive and change them only in place.
  Anything that differs between calls must come in through ``x``, ``t`` or ``cond``. For the ``modules``
  it is given, the wrapper notices a move of their weights (``.to()``, a cast, an offload to the CPU and
  back: new memory) and captures again instead of replaying graphs that read the old memory;
* no training-mode modules (dropout must be off): pass them as ``modules`` to have that checked;
* inference only: the replay runs under ``torch.inference_mode``; inputs that require grad are refused.

On other devices the default mode ``"auto"`` is a transparent pass-through (``fn(x, t, cond)``), so the
same code runs everywhere. ``"emulate"`` runs the static-buffer and cache logic on any device, replaying by
calling ``fn`` eagerly on the static buffers -- CI uses it to test the wrapper without a GPU.

Calls from several threads are serialised (a lock around copy-in, replay and copy-out), so one
``CapturedModel`` can serve every thread that uses its model, as the tasks' per-model one does; the threads
must issue their work on the same CUDA stream (the default stream unless they change it).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

import torch
from torch import Tensor, nn

from ldm_sdk.accel.cond_prologue import ConditioningPrologue, PrologueResults, find_prologues
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.diffusion.denoiser import Denoiser, ModelDenoiser, ModelFn

if TYPE_CHECKING:
    from ldm_sdk.accel.compile_ahead import PendingCompile
    from ldm_sdk.checkpoints.bundle import ModelBundle

CaptureMode = Literal["auto", "graph", "emulate", "off"]
"""``auto``: capture on CUDA, pass-through elsewhere. ``graph``: capture, and refuse non-CUDA inputs.
``emulate``: static buffers and cache on any device, replayed by an eager call (tests, debugging).
``off``: always a plain call."""

CAPTURE_MODES: tuple[str, ...] = get_args(CaptureMode)


class CaptureError(RuntimeError):
    """``fn`` or its inputs cannot be captured / replayed as a CUDA graph; the message says why."""


class CaptureMemoryError(CaptureError):
    """The GPU ran out of memory capturing a signature, with this model's and its companions' other graphs
    released first (see :meth:`CapturedModel.__call__`): the eager call needs less (no graph memory)."""


@dataclass(frozen=True)
class TensorSpec:
    """What a static buffer must match: shape, stride, dtype and device."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype, tensor.device)

    def __str__(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).removeprefix('torch.')} on {self.device}"


@dataclass(frozen=True)
class CallSignature:
    """The cache key of one capture: the specs of ``x``, ``t`` and each present conditioning part."""

    x: TensorSpec
    t: TensorSpec
    cond: tuple[tuple[str, TensorSpec], ...]

    def __str__(self) -> str:
        parts = ", ".join(f"{name}={spec}" for name, spec in self.cond)
        return f"x={self.x}, t={self.t}" + (f", {parts}" if parts else "")


@dataclass(eq=False)
class _Capture:
    """Static buffers of one signature, the static output and how to refresh it."""

    signature: CallSignature
    x: Tensor
    t: Tensor
    cond: Conditioning
    out: Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)
    #: mode "emulate": ``emulated(capture, cond_changed)`` refreshes ``out`` by an eager call instead of a
    #: graph (it takes the capture as an argument: nothing here refers back to it, so a dropped capture's
    #: graphs and buffers are freed at once, without waiting for Python's cycle collector)
    emulated: Callable[[_Capture, bool], None] | None = field(default=None, repr=False)
    #: the conditioning prologues' graph (:mod:`ldm_sdk.accel.cond_prologue`), if any applied
    prologue_graph: torch.cuda.CUDAGraph | None = field(default=None, repr=False)
    prologue: PrologueResults | None = field(default=None, repr=False)
    replays: int = 0
    prologue_replays: int = 0
    #: the caller's conditioning tensors last copied into ``cond`` (weak: not kept alive by this)
    loaded: dict[str, weakref.ref[Tensor]] = field(default_factory=dict, repr=False)

    def load(self, x: Tensor, t: Tensor, cond: Conditioning, *, cond_unchanged: bool = False) -> bool:
        """Copy the inputs into the static buffers; the conditioning only when it is not the very tensors
        copied last time with ``cond_unchanged`` (the caller's word that they were not modified since).
        Returns whether the conditioning was copied."""
        self.x.copy_(x)
        self.t.copy_(t)
        parts = cond.parts()
        same = cond_unchanged and self.loaded.keys() == parts.keys()
        if same and all(self.loaded[k]() is v for k, v in parts.items()):  # the very tensors copied last
            return False
        for name, value in parts.items():
            getattr(self.cond, name).copy_(value)
        self.loaded = {name: weakref.ref(value) for name, value in parts.items()}
        return True

    def replay(self, cond_changed: bool) -> None:
        """Refresh ``out`` from the static buffers: the prologue's graph first when the conditioning was
        copied in anew, then the call's."""
        if self.emulated is not None:
            self.emulated(self, cond_changed)
            return
        if self.graph is None:
            raise CaptureError("internal error: a released capture was replayed")
        if self.prologue_graph is not None and cond_changed:
            self.prologue_graph.replay()
            self.prologue_replays += 1
        self.graph.replay()

    def release(self) -> None:
        for graph in (self.graph, self.prologue_graph):
            if graph is not None:
                graph.reset()
        self.graph, self.prologue_graph, self.prologue = None, None, None
        self.out, self.emulated, self.loaded = None, None, {}


def _emulated_replay(
    fn: ModelFn, prologues: Sequence[ConditioningPrologue], capture: _Capture, cond_changed: bool
) -> None:
    """Mode "emulate": what a replay of ``capture``'s graphs computes, by calling ``fn`` on its buffers."""
    if prologues and (cond_changed or capture.prologue is None):
        capture.prologue = PrologueResults(prologues, capture.cond)
        capture.prologue_replays += 1
    with capture.prologue.held() if capture.prologue is not None else contextlib.nullcontext():
        out = fn(capture.x, capture.t, capture.cond)
    static = capture.out
    if static is None or out.shape != static.shape or out.dtype != static.dtype:
        want = "nothing" if static is None else f"{list(static.shape)} {static.dtype}"
        raise CaptureError(
            f"fn returned {list(out.shape)} {out.dtype} for signature ({capture.signature}) after {want} at "
            "capture: it is not shape-static"
        )
    static.copy_(out)


@dataclass
class CaptureStats:
    """Counters of a :class:`CapturedModel`: captures, (graph or emulated) replays, plain calls, evictions,
    and the fused-kernel variants compiled in parallel before captures (:mod:`ldm_sdk.accel.precompile`)
    with the seconds that took, and the memset nodes rewritten as kernels
    (:mod:`ldm_sdk.accel.graph_memsets`)."""

    captures: int = 0
    replays: int = 0
    passthrough: int = 0
    evictions: int = 0
    precompiled: int = 0
    precompile_s: float = 0.0  # wall time of those compilations
    compiled_ahead: int = 0  # variants compiled in the background before a capture (compile_ahead)
    memsets_rewritten: int = 0  # memset nodes replaced by fill kernels (ldm_sdk.accel.graph_memsets)
    memory_releases: int = 0  # captures released because a capture ran out of GPU memory


class SharedGraphPool:
    """One CUDA-graph memory pool (per device) and one lock for several :class:`CapturedModel` whose calls
    never run at the same time, such as a model's first-stage encode and decode.

    Each capture otherwise keeps a pool of its own, sized by the activations it needs at its peak (the
    encoder of kl-f8 at 512 px in fp16: 550 MiB, ``bench/first_stage_graph_memory.py``). Sharing one lets
    the captures reuse each other's temporaries: a graph's memory is live only while it replays. Static
    outputs are live tensors, which the allocator never hands to another capture. The shared lock
    serialises the calls of all the models on the host. Like the static buffers, it assumes the calls are
    issued on one CUDA stream.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._handles: dict[torch.device, object] = {}

    def handle(self, device: torch.device) -> object:
        """The pool of ``device`` (``torch.cuda.graph_pool_handle``), made on first use."""
        with self.lock:
            if device not in self._handles:
                with torch.cuda.device(device):
                    self._handles[device] = torch.cuda.graph_pool_handle()
            return self._handles[device]


class CapturedModel:
    """A ``ModelFn`` that replays ``fn`` from CUDA graphs, one per input signature (see the module doc).

    ``mode``: see :data:`CaptureMode`. ``warmup``: eager calls of ``fn`` on a side stream before capture
    (>= 1; with >= 2 the last one runs under sync debug mode "error"). ``max_graphs``: captures kept (least
    recently used evicted; each holds its own activation memory unless ``pool`` is shared).
    ``clone_output``: return a clone of the static output (default) or the static output itself.
    ``modules``: modules ``fn`` runs, checked to be in eval mode on every captured call. ``pool``: a
    :class:`SharedGraphPool` the captures take their memory from, whose lock serialises this model's calls
    with the other models'; default: a pool per capture and a lock of its own.
    """

    def __init__(
        self,
        fn: ModelFn,
        *,
        mode: CaptureMode = "auto",
        warmup: int = 2,
        max_graphs: int = 4,
        clone_output: bool = True,
        modules: Sequence[nn.Module] = (),
        pool: SharedGraphPool | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(x, t, cond) -> Tensor, got {type(fn).__name__}")
        if mode not in CAPTURE_MODES:
            raise ValueError(f"unknown capture mode {mode!r}; valid: {', '.join(CAPTURE_MODES)}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager calls before capture), got {warmup!r}")
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        bad = [type(m).__name__ for m in modules if not isinstance(m, nn.Module)]
        if bad:
            raise TypeError(f"modules must be torch.nn.Module instances, got {', '.join(bad)}")
        self.fn = fn
        self.mode: CaptureMode = mode
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.clone_output = clone_output
        self.modules = tuple(modules)
        self.rewrite_memsets = True  # graph_memsets: memset nodes as fill kernels (an A/B switch)
        self.stats = CaptureStats()
        self._captures: OrderedDict[CallSignature, _Capture] = OrderedDict()
        self._companions: dict[Hashable, CapturedModel] = {}
        self.pool = pool
        # one call at a time through the static buffers (and through the shared pool's memory)
        self._lock = pool.lock if pool is not None else threading.RLock()
        self._pending: dict[CallSignature, PendingCompile] = {}  # compile_ahead's, by call signature
        # this model, its companions and the models joined by release_together(): weak references, so that
        # no member keeps another (and its graphs' memory) alive
        self._family: list[weakref.ref[CapturedModel]] = [weakref.ref(self)]
        self._weights: tuple[int, ...] = ()  # where the modules' weights were when the captures were made

    # -- public ------------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning, *, cond_unchanged: bool = False) -> Tensor:
        """``fn(x, t, cond)`` replayed from the graph of this signature (captured on its first call).
        ``cond_unchanged``: ``cond`` holds the tensors of the caller's previous call, not modified since
        (the guided step's denoiser passes its request's conditioning so); their copy into the static
        buffers is skipped when they are the very tensors copied last."""
        if not self._active(x):
            self.stats.passthrough += 1
            return self.fn(x, t, cond)
        signature = self._check(x, t, cond)
        with self._lock:
            weights = self._weights_key()
            if weights != self._weights:  # the weights moved: every graph reads memory they left
                self._drop_all()
                self._weights = weights
            capture = self._captures.get(signature)
            with torch.inference_mode():
                if capture is None:
                    capture = self._capture_with_room(signature, x, t, cond)
                    changed = True
                else:
                    self._captures.move_to_end(signature)
                    changed = capture.load(x, t, cond, cond_unchanged=cond_unchanged)
                capture.replay(changed)
            capture.replays += 1
            self.stats.replays += 1
            out = capture.out
            if out is None:  # pragma: no cover - _capture always sets it
                raise CaptureError("internal error: a capture has no static output")
            return out.clone() if self.clone_output else out

    def compile_ahead(self, x: Tensor, t: Tensor, cond: Conditioning) -> bool:
        """Start compiling, in worker processes in the background, the fused kernels a first call with these
        inputs' signature will need (:mod:`ldm_sdk.accel.compile_ahead`); the inputs are only run through
        ``fn`` once with its kernels skipped. Returns whether anything was started: not when this signature
        is captured or pending already, not off CUDA or in emulate / off mode, not without worker
        processes to start. The capture of that signature waits for the compilation, then only loads."""
        if self.mode in ("off", "emulate") or not self._active(x):
            return False
        signature = self._check(x, t, cond)
        with self._lock:
            if signature in self._captures or signature in self._pending:
                return False
            from ldm_sdk.accel.compile_ahead import compile_ahead

            pending = compile_ahead([*self.modules, self.fn], lambda: self.fn(x, t, cond))
            if pending is None:
                return False
            self._pending[signature] = pending
            return True

    @property
    def pending_compiles(self) -> dict[CallSignature, PendingCompile]:
        """Background compilations started by :meth:`compile_ahead` whose signature is not captured yet."""
        with self._lock:
            return dict(self._pending)

    @property
    def signatures(self) -> list[CallSignature]:
        """Signatures with a live capture, least recently used first."""
        with self._lock:
            return list(self._captures)

    def clear(self) -> None:
        """Drop every capture and free its memory (the next call captures again), companions' too."""
        with self._lock:
            self._drop_all()
            for companion in self._companions.values():
                companion.clear()

    @property
    def companions(self) -> dict[Hashable, CapturedModel]:
        """The companions made so far (:meth:`companion`), by key."""
        with self._lock:
            return dict(self._companions)

    def companion(self, key: Hashable, wrap: Callable[[ModelFn], ModelFn]) -> CapturedModel:
        """A second ``CapturedModel`` over ``wrap(self.fn)`` (a larger function around this one's call,
        such as the whole guided denoiser step of :mod:`ldm_sdk.accel.guided_step`), with this one's mode,
        warm-up, graph budget and watched modules; made on the first request for ``key`` and kept with
        this one (:meth:`clear` clears it too), so it lives exactly as long as this one's cache entry."""
        with self._lock:
            kept = self._companions.get(key)
            if kept is None:
                kept = CapturedModel(
                    wrap(self.fn),
                    mode=self.mode,
                    warmup=self.warmup,
                    max_graphs=self.max_graphs,
                    clone_output=True,
                    modules=self.modules,
                )
                kept.rewrite_memsets = self.rewrite_memsets
                kept._family = self._family
                self._family.append(weakref.ref(kept))
                self._companions[key] = kept
            return kept

    def release_together(self, other: CapturedModel) -> None:
        """Let a capture of either model (or of their companions) that runs out of GPU memory release the
        other's graphs too, as it releases its own family's (see :meth:`__call__`): the tasks join the UNet
        and first-stage captures of every model cached on one GPU, whose graphs all hold its memory. A no-op
        when they are joined already."""
        if other._family is self._family:
            return
        mine = self._members()
        merged = [*mine, *(m for m in other._members() if all(m is not n for n in mine))]
        refs = [weakref.ref(m) for m in merged]
        for member in merged:
            member._family = refs

    def _members(self) -> list[CapturedModel]:
        """This model's family (see :meth:`release_together`) as far as it is alive."""
        return [m for ref in self._family if (m := ref()) is not None]

    def __repr__(self) -> str:
        return (
            f"CapturedModel(mode={self.mode!r}, captures={len(self._captures)}/{self.max_graphs}, "
            f"clone_output={self.clone_output}, stats={self.stats})"
        )

    # -- internals ---------------------------------------------------------------------------------------
    def _drop_all(self) -> None:
        for capture in self._captures.values():
            capture.release()
        self._captures.clear()

    def _capture_with_room(
        self, signature: CallSignature, x: Tensor, t: Tensor, cond: Conditioning
    ) -> _Capture:
        """:meth:`_capture`; when the GPU runs out of memory, release the other captures of this model's
        family -- itself, its companions and the models joined by :meth:`release_together` (their graphs'
        activation memory) -- return the allocator's free blocks to the driver and try once more. A member
        busy in another thread keeps its graphs. Raises :class:`CaptureMemoryError` when nothing could be
        released or the second try runs out of memory too."""
        try:
            return self._capture(signature, x, t, cond)
        except torch.cuda.OutOfMemoryError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "out of memory"
        released = self._release_family_captures()  # outside the except: its traceback holds the memory
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        if not released:
            raise CaptureMemoryError(
                f"the GPU ran out of memory capturing signature ({signature}), and this model's family "
                f"holds no other graph to release ({first}); an eager call (mode='off') needs no graph memory"
            )
        try:
            return self._capture(signature, x, t, cond)
        except torch.cuda.OutOfMemoryError as exc:
            raise CaptureMemoryError(
                f"the GPU ran out of memory capturing signature ({signature}), even after releasing "
                f"{released} other graph(s) of this model's family; an eager call (mode='off') needs no "
                "graph memory"
            ) from exc

    def _release_family_captures(self) -> int:
        """Release every capture of this model's family (:meth:`release_together`) that no other thread is
        using now; how many were released."""
        released = 0
        for member in self._members():
            if not member._lock.acquire(blocking=False):  # replaying in another thread: keep its graphs
                continue
            try:
                count = len(member._captures)
                member._drop_all()
                member.stats.memory_releases += count
                member.stats.evictions += count
                released += count
            finally:
                member._lock.release()
        return released

    def _weights_key(self) -> tuple[int, ...]:
        """Where the first parameter of each watched module lives (a move gives every parameter new
        memory, so one per module tells)."""
        return tuple(p.data_ptr() for m in self.modules for p in itertools.islice(m.parameters(), 1))

    def _active(self, x: Tensor) -> bool:
        """Whether this call goes through static buffers (capture / replay) rather than a plain call."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if self.mode == "off":
            return False
        if self.mode == "emulate":
            return True
        if x.device.type != "cuda":
            if self.mode == "graph":
                raise CaptureError(
                    f"mode='graph' captures CUDA graphs, but x is on {x.device}; use mode='auto' "
                    "(a plain call off CUDA) or mode='emulate'"
                )
            return False
        # inside someone else's capture (a caller capturing the whole sampler step): just record the call
        return not torch.cuda.is_current_stream_capturing()

    def _check(self, x: Tensor, t: Tensor, cond: Conditioning) -> CallSignature:
        if not isinstance(t, Tensor):
            raise CaptureError(
                f"t must be a tensor on x's device ({x.device}) for a captured call, got "
                f"{type(t).__name__}; samplers pass time_batch(t, x)"
            )
        if not isinstance(cond, Conditioning):
            raise CaptureError(f"cond must be a Conditioning, got {type(cond).__name__}")
        parts = cond.parts()
        named = [("x", x), ("t", t), *parts.items()]
        for name, value in named[1:]:
            if value.device != x.device:
                raise CaptureError(
                    f"every input of a captured call must be on x's device ({x.device}): {name} is on "
                    f"{value.device}; move it there before sampling (a host-to-device copy cannot be "
                    "captured)"
                )
        if torch.is_grad_enabled():
            grads = [name for name, value in named if value.requires_grad]
            if grads:
                raise CaptureError(
                    f"CapturedModel is for inference, but {', '.join(grads)} requires grad; call it under "
                    "torch.no_grad() / torch.inference_mode() with detached inputs, or use mode='off'"
                )
        self._check_eval(deep=False)
        return CallSignature(
            TensorSpec.of(x), TensorSpec.of(t), tuple((k, TensorSpec.of(v)) for k, v in parts.items())
        )

    def _check_eval(self, *, deep: bool) -> None:
        """Refuse modules in training mode: every submodule at capture time, the roots on later calls."""
        found = (m for root in self.modules for m in (root.modules() if deep else (root,)))
        training = sorted({type(m).__name__ for m in found if m.training})
        if training:
            raise CaptureError(
                f"modules in training mode ({', '.join(training)}): dropout and other training behaviour "
                "would be frozen into the graph; call .eval() on the model first"
            )

    def _capture(self, signature: CallSignature, x: Tensor, t: Tensor, cond: Conditioning) -> _Capture:
        self._check_eval(deep=True)
        while len(self._captures) >= self.max_graphs:
            _, old = self._captures.popitem(last=False)
            old.release()
            self.stats.evictions += 1
        capture = _Capture(
            signature,
            x=_static_like(x),
            t=_static_like(t),
            cond=Conditioning(**{k: _static_like(v) for k, v in cond.parts().items()}),
        )
        capture.load(x, t, cond)

        def call() -> Tensor:
            out = self.fn(capture.x, capture.t, capture.cond)
            if not isinstance(out, Tensor):
                raise CaptureError(f"fn must return a Tensor, got {type(out).__name__}")
            if out.device != x.device:
                raise CaptureError(f"fn returned a tensor on {out.device} for inputs on {x.device}")
            return out

        prologues = find_prologues(self.modules)
        if self.mode == "emulate":
            capture.out = torch.empty_like(call())
            capture.emulated = functools.partial(_emulated_replay, self.fn, tuple(prologues))
        else:
            from ldm_sdk.accel.precompile import precompile_kernels

            pending = self._pending.pop(signature, None)
            if pending is not None:  # compiled ahead in the background: what it compiled only loads now
                from ldm_sdk.accel.compile_ahead import AHEAD_WAIT_S

                with contextlib.suppress(TimeoutError):  # a stuck worker: compile what is missing here
                    self.stats.compiled_ahead += pending.wait(AHEAD_WAIT_S).compiled
            # the fused kernels this call shape needs, compiled in parallel before the warm-up reaches them
            # (those of the watched modules and of fn itself, when it launches kernels of its own)
            report = precompile_kernels([*self.modules, self.fn], call)
            self.stats.precompiled += report.variants
            self.stats.precompile_s += report.compile_s
            capture.graph, capture.out = self._capture_graph(call, x.device, signature, capture, prologues)
        self._captures[signature] = capture
        self.stats.captures += 1
        return capture

    def _capture_graph(
        self,
        call: Callable[[], Tensor],
        device: torch.device,
        signature: CallSignature,
        capture: _Capture,
        prologues: Sequence[ConditioningPrologue],
    ) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Warm ``call`` up, capture the conditioning prologues (into ``capture.prologue_graph`` /
        ``capture.prologue``, when any applies), then ``call`` itself holding their results."""
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for i in range(self.warmup):
                    strict = self.warmup > 1 and i == self.warmup - 1
                    try:
                        with _sync_errors() if strict else contextlib.nullcontext():
                            call()
                    except CaptureError:
                        raise
                    except RuntimeError as exc:
                        if strict and "synchroniz" in str(exc):
                            raise CaptureError(
                                f"fn synchronizes the host with the GPU ({exc}), so it cannot be captured "
                                f"for signature ({signature}). Remove .item() / .tolist() / .cpu() / Python "
                                "`if` on device tensors from the model call, or use mode='off'"
                            ) from exc
                        raise
                # the prologues warmed up too, and only those that apply to these buffers kept
                applying = [p for p, _ in PrologueResults(prologues, capture.cond).results]
            current.wait_stream(side)
            pool = self.pool.handle(device) if self.pool is not None else None
            # kept un-instantiated, so that its memset nodes can be rewritten as kernels first
            graph = torch.cuda.CUDAGraph(keep_graph=self.rewrite_memsets)
            try:
                if applying:  # a graph of its own; the call's shares its pool; the results live with capture
                    prologue_graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(prologue_graph, pool=pool):
                        capture.prologue = PrologueResults(applying, capture.cond)
                    capture.prologue_graph = prologue_graph
                    pool = pool if pool is not None else prologue_graph.pool()
                held = capture.prologue.held() if capture.prologue is not None else contextlib.nullcontext()
                with held, torch.cuda.graph(graph, pool=pool):
                    out = call()
            except (CaptureError, torch.cuda.OutOfMemoryError):
                raise
            except RuntimeError as exc:
                raise CaptureError(
                    f"CUDA graph capture of fn failed for signature ({signature}): {exc}. Capture needs a "
                    "shape-static call without host synchronisation, CPU tensors or host-to-device copies "
                    "inside it (see ldm_sdk.accel.graphs); use mode='off' to run it eagerly"
                ) from exc
            if self.rewrite_memsets:
                from ldm_sdk.accel.graph_memsets import replace_memset_nodes

                self.stats.memsets_rewritten += replace_memset_nodes(graph, device).replaced
                graph.instantiate()
        return graph, out


def _static_like(tensor: Tensor) -> Tensor:
    """An uninitialised buffer with ``tensor``'s shape, dtype, device and (dense) strides."""
    return torch.empty_like(tensor, memory_format=torch.preserve_format)


@contextlib.contextmanager
def _sync_errors() -> Iterator[None]:
    """torch's CUDA sync debug mode set to "error" for the block (restored afterwards)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# -- wiring into the sampler stack ------------------------------------------------------------------------
def accelerate_denoiser(
    source: ModelBundle | nn.Module | ModelFn,
    *,
    mode: CaptureMode = "auto",
    warmup: int = 2,
    max_graphs: int = 4,
    clone_output: bool = True,
    modules: Sequence[nn.Module] = (),
    fuse: bool | None = None,
) -> CapturedModel:
    """The network call of ``source`` as a :class:`CapturedModel`, a drop-in ``ModelFn``.

    ``source`` is a :class:`~ldm_sdk.checkpoints.bundle.ModelBundle` (its ``apply_model``), an ``nn.Module``
    called as ``module(x, t, cond)`` (e.g. ``DiffusionWrapper``) or any ``ModelFn`` such as
    ``bind_unet(unet, key)``; for a plain function pass the modules it runs as ``modules`` so that their
    eval mode is checked. Hand the result to ``ClassifierFreeGuidance`` / ``ModelDenoiser`` exactly where
    the eager function went::

        fast = accelerate_denoiser(bundle)
        den = ModelDenoiser(ClassifierFreeGuidance(fast, 7.5, uncond), bundle.schedule, "eps", cond)

    With guidance the captured call is the batched ``[uncond; cond]`` pass of batch 2B. A bare ``UNetModel``
    is refused: its call takes ``context=`` / ``y=``, not a Conditioning (wrap it with ``bind_unet``).

    ``fuse``: switch the networks to the fused GroupNorm+SiLU / GEGLU kernels first
    (:func:`ldm_sdk.accel.fusion.fuse_model`, in place, backend ``"auto"``): the bundle (UNet and first
    stage, whose decode follows sampling), the module, or the ``modules`` of a plain function. ``None``
    (default): only where capture runs (mode ``"auto"`` / ``"graph"``) and every watched module's weights
    are on CUDA in fp16 / bf16 -- there the fused ops replace ~5 kernels by 2 and round once instead of
    twice, and the weights become channels_last (:func:`ldm_sdk.accel.prepare.prepare_cuda_inference`, what
    the runtime does at load); float32 and CPU models are left exactly as they are. Fused modules stay
    fused (the eager ``bundle.apply_model`` runs them too); :func:`ldm_sdk.accel.fusion.unfuse_model`
    undoes the fusion.
    """
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.models.unet import UNetModel

    watched = list(modules)
    fn: ModelFn
    if isinstance(source, ModelBundle):
        if source.model is None:
            raise ValueError(f"{source.family!r} is a first-stage-only model: it has no UNet to accelerate")
        fn = source.apply_model
        watched.append(source.model)
    elif isinstance(source, UNetModel):
        raise TypeError(
            "a bare UNetModel is called as unet(x, t, context=..., y=...), not fn(x, t, cond): pass "
            "bind_unet(unet, conditioning_key) with modules=(unet,), or the ModelBundle"
        )
    elif isinstance(source, nn.Module):
        fn = source
        watched.append(source)
    elif callable(source):
        fn = source
    else:
        raise TypeError(
            f"source must be a ModelBundle, an nn.Module called as module(x, t, cond) or a function "
            f"fn(x, t, cond); got {type(source).__name__}"
        )
    targets = [source] if isinstance(source, ModelBundle) else watched
    if fuse is None and _fusion_pays(mode, watched):
        from ldm_sdk.accel.prepare import prepare_cuda_inference

        for target in targets:
            prepare_cuda_inference(target)
    elif fuse:
        from ldm_sdk.accel.fusion import fuse_model

        for target in targets:
            fuse_model(target)
    return CapturedModel(
        fn, mode=mode, warmup=warmup, max_graphs=max_graphs, clone_output=clone_output, modules=watched
    )


def _fusion_pays(mode: CaptureMode, modules: Sequence[nn.Module]) -> bool:
    """``fuse=None``: capture runs and every module's weights are on CUDA in half precision."""
    from ldm_sdk.accel.prepare import half_precision_on_cuda

    return mode in ("auto", "graph") and half_precision_on_cuda(modules)


def bundle_denoiser(
    bundle: ModelBundle,
    cond: Conditioning,
    *,
    guidance_scale: float = 1.0,
    uncond: Conditioning | None = None,
    captured: CapturedModel | None = None,
    mode: CaptureMode = "auto",
) -> Denoiser:
    """:meth:`ModelBundle.denoiser` with the network call captured: same arguments, same result (bit for
    bit). With guidance the whole denoiser call -- ``[uncond; cond]`` batching, network, guidance, the
    ``(eps, x0)`` conversion -- is replayed as one graph (:mod:`ldm_sdk.accel.guided_step`); without, the
    network call. For a half-precision cross-attention model on CUDA (the fast path) the guided call
    shares its input between the halves (``share_input``: the layers before the first cross-attention run
    once), which changes the result by the library kernels' rounding at the other batch size: not bit for
    bit there.

    Pass ``captured`` (from :func:`accelerate_denoiser`) to reuse its graphs across requests; otherwise a
    new one is made with ``mode``.
    """
    if bundle.schedule is None or bundle.parameterization is None:
        raise ValueError(f"{bundle.family!r} is a first-stage-only model: it cannot denoise")
    fast = captured if captured is not None else accelerate_denoiser(bundle, mode=mode)
    if guidance_scale != 1.0:
        if uncond is None:
            raise ValueError("guidance_scale != 1 needs the unconditional conditioning (uncond=...)")
        from ldm_sdk.accel.guided_step import guided_denoiser
        from ldm_sdk.accel.prepare import half_precision_on_cuda

        # the whole guided step (batching, network, guidance, (eps, x0)) replayed as one graph; a half-
        # precision cross-attention UNet on CUDA runs its layers before the first cross-attention once for
        # both halves
        share = (
            bundle.conditioning_key == "crossattn"
            and tuple(cond.parts()) == tuple(uncond.parts()) == ("crossattn",)
            and half_precision_on_cuda([bundle.unet])
        )
        return guided_denoiser(
            fast, bundle.schedule, bundle.parameterization, cond, uncond, guidance_scale, share_input=share
        )
    return ModelDenoiser(fast, bundle.schedule, bundle.parameterization, cond)


__all__ = [
    "CAPTURE_MODES",
    "CallSignature",
    "CaptureError",
    "CaptureMemoryError",
    "CaptureMode",
    "CaptureStats",
    "CapturedModel",
    "SharedGraphPool",
    "TensorSpec",
    "accelerate_denoiser",
    "bundle_denoiser",
]
