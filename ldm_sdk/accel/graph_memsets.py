"""Memset nodes of a captured CUDA graph rewritten as fill kernels.

Why: cuDNN's attention and some cuBLAS kernels zero a bit of workspace before they run; captured, each
such ``cudaMemsetAsync`` becomes a memset node, and on an H100 a replayed graph waits about 6 us from a
memset node's start to the next kernel's start (a kernel-to-kernel step costs about 1). The SD-1.5 UNet step
at batch 2 held 37 of them (32 before cuDNN's attention kernels, 5 before cuBLAS GEMMs; 102 at batch 16),
the kl-f8 decode 19 (``bench/probe_sdpa_memsets.py``, ``bench/probe_graph_memsets.py``). As fill kernels:
the UNet graph alone at batch 2 5.85 -> 5.79 ms (``bench/probe_graph_memsets.py``; 5.70 -> 5.67 once the
short-key attention kernel had taken 16 of the cuDNN attentions); in the same-process ablation of the
whole fast path (``bench/ablate_graph_kernels.py``) 5.70 -> 5.66 ms at batch 2, within noise at batch 16,
decode 5.15 -> 5.12 ms (``docs/performance-log.md``).

What: :func:`replace_memset_nodes` takes a graph captured with ``torch.cuda.CUDAGraph(keep_graph=True)``
and not yet instantiated, and replaces every one-dimensional memset node (``height == 1``) by a child
graph holding one kernel node -- torch's ``fill_`` of the same bytes with the same value, captured once per
node -- with the same dependencies and dependents. The graph computes the same thing (the same bytes are
written between the same neighbours); only the node type changes. Anything unexpected -- a driver without
the entry points, a pitched memset, an edge carrying data the plain queries cannot report -- leaves the
node as it is: the rewrite is an optimisation, never a requirement.

How: the CUDA driver API through ``ctypes`` (``libcuda``, which every CUDA machine has): the graph's
nodes, their types, the memset parameters, dependencies and dependents; a tiny torch capture of ``fill_``
over a zero-copy view of the memset's destination (``__cuda_array_interface__``) supplies the kernel node.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

CU_GRAPH_NODE_TYPE_KERNEL = 0
CU_GRAPH_NODE_TYPE_MEMSET = 2
_FILL_DTYPES = {1: (torch.int8, "|i1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4")}


class _MemsetParams(ctypes.Structure):
    """``CUDA_MEMSET_NODE_PARAMS``."""

    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("pitch", ctypes.c_size_t),
        ("value", ctypes.c_uint),
        ("element_size", ctypes.c_uint),
        ("width", ctypes.c_size_t),
        ("height", ctypes.c_size_t),
    ]


@dataclass
class MemsetRewrite:
    """What :func:`replace_memset_nodes` did: memset nodes ``found`` and ``replaced``, and why the others
    were kept (``kept``: reason -> count)."""

    found: int = 0
    replaced: int = 0
    kept: dict[str, int] | None = None

    def keep(self, why: str) -> None:
        self.kept = self.kept or {}
        self.kept[why] = self.kept.get(why, 0) + 1


class _Driver:
    """The few driver entry points the rewrite uses; raises OSError / AttributeError where missing."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        p, sz = ctypes.c_void_p, ctypes.c_size_t
        self.get_nodes = self._fn(lib, "cuGraphGetNodes", p, ctypes.POINTER(p), ctypes.POINTER(sz))
        self.node_type = self._fn(lib, "cuGraphNodeGetType", p, ctypes.POINTER(ctypes.c_int))
        self.memset_params = self._fn(lib, "cuGraphMemsetNodeGetParams", p, ctypes.POINTER(_MemsetParams))
        self.dependencies = self._fn(
            lib, "cuGraphNodeGetDependencies", p, ctypes.POINTER(p), ctypes.POINTER(sz)
        )
        self.dependents = self._fn(
            lib, "cuGraphNodeGetDependentNodes", p, ctypes.POINTER(p), ctypes.POINTER(sz)
        )
        self.add_child = self._fn(
            lib, "cuGraphAddChildGraphNode", ctypes.POINTER(p), p, ctypes.POINTER(p), sz, p
        )
        self.add_edges = self._fn(lib, "cuGraphAddDependencies", p, ctypes.POINTER(p), ctypes.POINTER(p), sz)
        self.destroy_node = self._fn(lib, "cuGraphDestroyNode", p)

    @staticmethod
    def _fn(lib: ctypes.CDLL, name: str, *argtypes: object) -> ctypes._CFuncPtr:
        fn = getattr(lib, name)
        fn.argtypes = list(argtypes)
        fn.restype = ctypes.c_int
        return fn

    def nodes(self, query: ctypes._CFuncPtr, handle: int) -> list[int]:
        """The node list a ``(handle, array, count)`` query returns (two calls: count, then fill)."""
        count = ctypes.c_size_t(0)
        _check(query(ctypes.c_void_p(handle), None, ctypes.byref(count)), "count the nodes")
        if count.value == 0:
            return []
        arr = (ctypes.c_void_p * count.value)()
        _check(query(ctypes.c_void_p(handle), arr, ctypes.byref(count)), "list the nodes")
        return [int(arr[i] or 0) for i in range(count.value)]


class _DriverError(RuntimeError):
    pass


def _check(status: int, what: str) -> None:
    if status != 0:
        raise _DriverError(f"CUDA driver error {status} while trying to {what}")


@functools.cache
def _driver() -> _Driver | None:
    try:
        return _Driver()
    except (OSError, AttributeError):
        return None


class _DeviceBytes:
    """A zero-copy tensor view of raw device memory (``torch.as_tensor`` reads the interface)."""

    def __init__(self, ptr: int, count: int, typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": (count,),
            "typestr": typestr,
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def _fill_graph(params: _MemsetParams, device: torch.device) -> torch.cuda.CUDAGraph:
    """A graph of one ``fill_`` kernel writing ``params.value`` over the memset's ``width`` elements."""
    dtype, typestr = _FILL_DTYPES[params.element_size]
    bits = 8 * params.element_size
    value = params.value & ((1 << bits) - 1)
    if value >= 1 << (bits - 1):
        value -= 1 << bits  # the same bit pattern as a signed integer
    view = torch.as_tensor(_DeviceBytes(params.dst, params.width, typestr), device=device)
    if view.dtype != dtype or view.data_ptr() != params.dst:
        raise _DriverError("the device memory view did not map the memset's destination")
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph):
        view.fill_(value)
    return graph


def replace_memset_nodes(graph: torch.cuda.CUDAGraph, device: torch.device) -> MemsetRewrite:
    """Rewrite the memset nodes of ``graph`` (captured with ``keep_graph=True``, not yet instantiated) as
    fill kernels (see the module doc); the caller instantiates it afterwards."""
    report = MemsetRewrite()
    drv = _driver()
    if drv is None:
        report.keep("no CUDA driver API")
        return report
    raw = graph.raw_cuda_graph()
    fills: list[torch.cuda.CUDAGraph] = []
    for node in drv.nodes(drv.get_nodes, raw):
        kind = ctypes.c_int(-1)
        _check(drv.node_type(ctypes.c_void_p(node), ctypes.byref(kind)), "read a node's type")
        if kind.value != CU_GRAPH_NODE_TYPE_MEMSET:
            continue
        report.found += 1
        try:
            _replace(drv, raw, node, device, fills)
        except _DriverError as exc:
            report.keep(str(exc))
            continue
        report.replaced += 1
    return report


def _replace(drv: _Driver, raw: int, node: int, device: torch.device, fills: list) -> None:
    params = _MemsetParams()
    _check(drv.memset_params(ctypes.c_void_p(node), ctypes.byref(params)), "read a memset node")
    if params.height != 1 or params.element_size not in _FILL_DTYPES:
        raise _DriverError("a pitched memset or an unexpected element size")
    before = drv.nodes(drv.dependencies, node)
    after = drv.nodes(drv.dependents, node)
    fill = _fill_graph(params, device)
    fills.append(fill)  # alive until the child node has cloned it
    fill_nodes = drv.nodes(drv.get_nodes, fill.raw_cuda_graph())
    kinds = []
    for n in fill_nodes:
        kind = ctypes.c_int(-1)
        _check(drv.node_type(ctypes.c_void_p(n), ctypes.byref(kind)), "read a node's type")
        kinds.append(kind.value)
    if kinds != [CU_GRAPH_NODE_TYPE_KERNEL]:
        raise _DriverError(f"fill_ was captured as node types {kinds}, not as one kernel")
    new = ctypes.c_void_p()
    deps = (ctypes.c_void_p * max(1, len(before)))(*before)
    child = ctypes.c_void_p(fill.raw_cuda_graph())
    _check(
        drv.add_child(ctypes.byref(new), ctypes.c_void_p(raw), deps, len(before), child), "add a fill node"
    )
    try:
        if after:
            src = (ctypes.c_void_p * len(after))(*([new.value] * len(after)))
            dst = (ctypes.c_void_p * len(after))(*after)
            _check(drv.add_edges(ctypes.c_void_p(raw), src, dst, len(after)), "link the fill node")
        _check(drv.destroy_node(ctypes.c_void_p(node)), "remove a memset node")
    except _DriverError:
        # a fill node without all of the memset's dependents could race them: take it out again
        drv.destroy_node(new)
        raise


__all__ = ["MemsetRewrite", "replace_memset_nodes"]
