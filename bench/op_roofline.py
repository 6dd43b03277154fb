"""Every library op of the fast path's SD-1.5 UNet step and kl-f8 decode, timed alone: which shapes the
convolutions, GEMMs and attentions run at what TFLOP/s, and how alternative formulations of the same op
compare (a 1x1 convolution as a GEMM over NHWC rows, zero-padded channels for the 4-channel convolutions,
cuDNN's heuristics against its autotuner with and without the 10-algorithm limit).

The models are prepared as the runtime prepares them (fp16, channels_last, fused blocks). One forward runs
under a dispatch mode that records each aten convolution / matmul / attention call with its shapes and
strides; each distinct call is then rebuilt on fresh tensors of the same layout and timed by replaying a
CUDA graph of ``--repeat`` back-to-back calls (launch cost amortised as in the captured step).
The fast path's own product kernels (the GEGLU dual GEMM, the short-key attention) are counted too, with
the library's formulation of the same product beside them. ``ms_by_kind`` sums the ops as the fast path
runs them; ``best_ms_by_kind`` takes each op at the fastest formulation timed, including ones that leave
part of the work out (the GEMM of an im2col convolution without the im2col, attention on heads padded
without the padding's cost, the GEGLU's GEMM without its gating): an optimistic floor.

    python bench/op_roofline.py --out ops.json              # on a CUDA machine
    python bench/op_roofline.py --cudnn benchmark_all       # cuDNN autotuning over every algorithm
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks import common as C

aten = torch.ops.aten
RECORDED = {
    aten.convolution.default: "conv",
    aten.mm.default: "gemm",
    aten.addmm.default: "gemm",
    aten.addmm_.default: "gemm",
    aten.bmm.default: "gemm",
    aten.baddbmm.default: "gemm",
    aten._scaled_dot_product_cudnn_attention.default: "attention",
    aten._scaled_dot_product_flash_attention.default: "attention",
    aten._scaled_dot_product_efficient_attention.default: "attention",
}
CUDNN_MODES = ("heuristics", "benchmark", "benchmark_all")


def _meta(a: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), tuple(a.stride()), str(a.dtype))
    if isinstance(a, list | tuple):
        return tuple(_meta(x) for x in a)
    return a


@contextmanager
def own_products(calls: Counter[tuple[str, Any]]) -> Iterator[None]:
    """Counts the calls of the fast path's own product kernels, which the dispatcher does not see: the
    GEGLU dual GEMM (``fusion.geglu_linear``) and the short-key attention (``block_fusion``'s
    ``short_attention_triton``), each by its argument metadata."""
    import ldm_sdk.accel.block_fusion as BF
    import ldm_sdk.accel.fusion as FU

    geglu, short = FU.geglu_linear, BF.short_attention_triton

    def geglu_rec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **kw: Any) -> Any:
        calls[("geglu", (_meta(x), _meta(weight), _meta(bias)))] += 1
        return geglu(x, weight, bias, **kw)

    def short_rec(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float, **kw: Any
    ) -> Any:
        calls[("short_attention", (_meta(q), _meta(k), _meta(v), heads, scale))] += 1
        return short(q, k, v, heads, scale, **kw)

    FU.geglu_linear, BF.short_attention_triton = geglu_rec, short_rec
    try:
        yield
    finally:
        FU.geglu_linear, BF.short_attention_triton = geglu, short


def own_product_variants(name: str, margs: Any, gen: torch.Generator) -> tuple[str, str, dict[str, Any]]:
    """(kind, description, {formulation: call}) of one recorded own-kernel call: the kernel as the fast path
    runs it first, then the library's formulation of the same product (for the GEGLU, the projection's
    GEMM alone, without its bias and gating)."""
    from ldm_sdk.accel.geglu_gemm import geglu_linear
    from ldm_sdk.accel.short_attention import short_attention_triton

    if name == "geglu":
        x, w, b = _build(margs, gen)
        x2 = x.reshape(-1, x.shape[-1])
        desc = f"geglu dual GEMM [{x2.shape[0]}, {x2.shape[1]}] x [{w.shape[1]}, {w.shape[0]}]"
        return "gemm", desc, {"": lambda: geglu_linear(x, w, b), "product_only": lambda: torch.mm(x2, w.t())}
    (q, k, v), heads, scale = _build(margs[:3], gen), margs[3], margs[4]
    b, n, m = q.shape[0], q.shape[1], k.shape[1]
    d = q.shape[-1] // heads

    def sdpa() -> Any:
        split = [t.unflatten(-1, (heads, d)).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*split, scale=scale)

    desc = f"short attention q[{b}, {heads}, {n}, {d}] k[{b}, {heads}, {m}, {d}]"
    return "attention", desc, {"": lambda: short_attention_triton(q, k, v, heads, scale), "sdpa": sdpa}


class Recorder(TorchDispatchMode):
    """Counts each recorded op by (op, argument metadata), and every other aten op by name (the torch ops
    the fast path still launches besides its Triton kernels, which the dispatcher does not see)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[Any, Any, Any]] = Counter()
        self.others: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        self.others[str(func)] += func not in RECORDED
        if func in RECORDED:
            self.calls[(func, _meta(args), _meta(tuple(sorted(kwargs.items()))))] += 1
        return func(*args, **kwargs)


def _build(m: Any, gen: torch.Generator) -> Any:
    if isinstance(m, tuple) and m and m[0] == "T":
        _, shape, stride, dtype = m
        dt = getattr(torch, dtype.removeprefix("torch."))
        t = torch.empty_strided(shape, stride, dtype=dt, device="cuda")
        if dt.is_floating_point:
            t.normal_(0.0, 0.5, generator=gen)
        return t
    if isinstance(m, tuple):
        return tuple(_build(x, gen) for x in m)
    return m


def _kwargs(m: Any, gen: torch.Generator) -> dict[str, Any]:
    return {k: _build(v, gen) for k, v in m}


def flops(kind: str, func: Any, args: tuple, out: Any) -> float:
    if kind == "conv":
        w = args[1]
        return 2.0 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3]
    if kind == "gemm":
        with_input = func in (aten.addmm.default, aten.addmm_.default, aten.baddbmm.default)
        a, b = (args[1], args[2]) if with_input else args[:2]
        return 2.0 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
    q, k = args[0], args[1]
    return 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]


def captured(fn: Callable[[], Any], repeat: int = 1, *, keep_graph: bool = False) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``repeat`` back-to-back calls of ``fn``, after three warm-up calls on a side stream
    (``keep_graph``: left un-instantiated, ``torch.cuda.CUDAGraph(keep_graph=True)``)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph(keep_graph=keep_graph)
    with torch.cuda.graph(g):
        for _ in range(repeat):
            fn()
    return g


def graph_us(fn: Callable[[], Any], repeat: int, iters: int) -> float:
    """Microseconds per call: a CUDA graph of ``repeat`` calls, replayed ``iters`` times (median)."""
    g = captured(fn, repeat)
    t = C.median(C.time_calls(g.replay, torch.device("cuda"), warmup=3, iters=iters))
    del g
    return t / repeat * 1e6


def _im2col_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``(N H W, 9 C)`` rows of a 3x3, padding-1 window per pixel (tap-major), from a channels_last map."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    taps = [xp[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)]
    return torch.stack(taps, dim=3).reshape(n * h * w, 9 * c)


def attention_alternatives(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Other backends / paddings / a cuBLAS formulation of one SDPA call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    alts: dict[str, Callable[[], Any]] = {}
    d = q.shape[-1]

    def with_backend(backend: SDPBackend) -> Callable[[], Any]:
        def call() -> Any:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v)

        return call

    for name, backend in (
        ("flash", SDPBackend.FLASH_ATTENTION),
        ("efficient", SDPBackend.EFFICIENT_ATTENTION),
    ):
        try:
            with_backend(backend)()
            alts[name] = with_backend(backend)
        except RuntimeError:
            pass
    if d % 16:
        for to in (48, 64):
            qp, kp, vp = (F.pad(t, (0, to - d)) for t in (q, k, v))
            alts[f"pad{to}"] = lambda qp=qp, kp=kp, vp=vp: F.scaled_dot_product_attention(
                qp, kp, vp, scale=d**-0.5
            )
    if q.shape[1] == 1:  # single head (the VAE): plain GEMMs + softmax
        q3, k3, v3 = q[:, 0], k[:, 0], v[:, 0]
        scale = d**-0.5

        def math_half() -> Any:
            s = torch.baddbmm(
                torch.empty(1, 1, 1, device=q.device, dtype=q.dtype),
                q3,
                k3.transpose(1, 2),
                beta=0,
                alpha=scale,
            )
            return torch.bmm(torch.softmax(s, dim=-1), v3)

        alts["math_half_scores"] = math_half
        try:
            torch.bmm(q3, k3.transpose(1, 2), out_dtype=torch.float32)

            def math_f32() -> Any:
                s = torch.bmm(q3, k3.transpose(1, 2), out_dtype=torch.float32)
                return torch.bmm(torch.softmax(s.mul_(scale), dim=-1).to(q.dtype), v3)

            alts["math_f32_scores"] = math_f32
        except (RuntimeError, TypeError):
            pass
    return alts


def alternatives(func: Any, args: tuple, gen: torch.Generator) -> dict[str, Callable[[], Any]]:
    """Other formulations of one convolution or attention (same result up to rounding)."""
    if RECORDED.get(func) == "attention":
        return attention_alternatives(args[0], args[1], args[2])
    if func is not aten.convolution.default:
        return {}
    x, w, bias, stride, padding, dilation, _transposed, _opad, groups = args
    alts: dict[str, Callable[[], Any]] = {}
    if w.shape[2:] == (1, 1) and tuple(stride) == (1, 1) and groups == 1:
        n, c, h, wd = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n * h * wd, c)  # a view for channels_last x
        wt = w.reshape(w.shape[0], c).t()
        if bias is None:
            alts["as_gemm"] = lambda: torch.mm(rows, wt)
        else:
            alts["as_gemm"] = lambda: torch.addmm(bias, rows, wt)
    small_map = x.shape[2] * x.shape[3] <= 256
    if w.shape[2:] == (3, 3) and tuple(stride) == (1, 1) and tuple(padding) == (1, 1) and groups == 1:
        wt9 = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).t()  # (9 C_in, C_out), tap-major
        if small_map:
            cols = _im2col_nhwc(x)
            alts["im2col_gemm"] = lambda: torch.mm(_im2col_nhwc(x), wt9)
            alts["gemm_only"] = lambda: torch.mm(cols, wt9)
        if w.shape[0] <= 8:  # thin output: one GEMM to every tap's partial output, then a 9-tap sum
            n, c, h, wd = x.shape
            rows = x.permute(0, 2, 3, 1).reshape(n * h * wd, c)
            wtaps = torch.zeros(c, (9 * w.shape[0] + 7) // 8 * 8, device="cuda", dtype=w.dtype)
            wtaps[:, : 9 * w.shape[0]] = w.permute(1, 2, 3, 0).reshape(c, -1)
            alts["tap_gemm_only"] = lambda: torch.mm(rows, wtaps)
    for pad_to in (8, 16):
        cin, cout = w.shape[1], w.shape[0]
        if cin % pad_to:
            xp = torch.zeros(x.shape[0], pad_to, *x.shape[2:], device="cuda", dtype=x.dtype)
            xp = xp.contiguous(memory_format=torch.channels_last)
            wp = torch.zeros(cout, pad_to, *w.shape[2:], device="cuda", dtype=w.dtype)
            wp = wp.contiguous(memory_format=torch.channels_last)
            alts[f"cin_pad{pad_to}"] = lambda xp=xp, wp=wp: F.conv2d(
                xp, wp, bias, stride, padding, dilation, groups
            )
        if cout % pad_to:
            wp = torch.zeros(pad_to, *w.shape[1:], device="cuda", dtype=w.dtype)
            wp = wp.contiguous(memory_format=torch.channels_last)
            bp = None if bias is None else torch.zeros(pad_to, device="cuda", dtype=bias.dtype)
            alts[f"cout_pad{pad_to}"] = lambda wp=wp, bp=bp: F.conv2d(
                x, wp, bp, stride, padding, dilation, groups
            )
    return alts


def describe(kind: str, func: Any, args: tuple) -> str:
    if kind == "conv":
        x, w = args[0], args[1]
        return f"conv {w.shape[1]}->{w.shape[0]} k{w.shape[2]} s{args[3][0]} in {list(x.shape)}"
    if kind == "gemm":
        shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
        return f"{func.__name__} {shapes}"
    return f"sdpa q{list(args[0].shape)} k{list(args[1].shape)}"


def probe(record: Callable[[], Any], repeat: int, iters: int) -> dict[str, Any]:
    rec = Recorder()
    own: Counter[tuple[str, Any]] = Counter()
    with torch.no_grad(), own_products(own), rec:  # not inference_mode: there, composite ops stay whole
        record()
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    totals: Counter[str] = Counter()
    best_totals: Counter[str] = Counter()  # each op at its fastest formulation timed

    def add(row: dict[str, Any], kind: str, us: float, alt_us: dict[str, float], count: int) -> None:
        row.update({f"{name}_us": round(t, 2) for name, t in alt_us.items()})
        totals[kind] += us * count
        best_totals[kind] += min([us, *alt_us.values()]) * count
        rows.append(row)
        print(json.dumps(row), flush=True)

    for (func, margs, mkw), count in rec.calls.items():
        kind = RECORDED[func]
        with torch.inference_mode():
            args, kwargs = _build(margs, gen), _kwargs(mkw, gen)
            out = func(*args, **kwargs)
            out0 = out[0] if isinstance(out, tuple) else out
            fl = flops(kind, func, args, out0)
            us = graph_us(lambda f=func, a=args, kw=kwargs: f(*a, **kw), repeat, iters)
            row: dict[str, Any] = {
                "op": describe(kind, func, args),
                "kind": kind,
                "count": count,
                "us": round(us, 2),
                "tflops": round(fl / us / 1e6, 1),
                "total_us": round(us * count, 1),
            }
            alts = alternatives(func, args, gen)
            alt_us = {name: graph_us(alt, repeat, iters) for name, alt in alts.items()}
        add(row, kind, us, alt_us, count)
    for (name, margs), count in own.items():
        with torch.inference_mode():
            kind, desc, variants = own_product_variants(name, margs, gen)
            alt_us = {alt: graph_us(call, repeat, iters) for alt, call in variants.items()}
        us = alt_us.pop("")
        row = {"op": desc, "kind": kind, "own_kernel": True, "count": count, "us": round(us, 2)}
        row["total_us"] = round(us * count, 1)
        add(row, kind, us, alt_us, count)
    rows.sort(key=lambda r: -r["total_us"])
    others = {k: v for k, v in rec.others.most_common() if v}
    return {
        "ops": rows,
        "ms_by_kind": {k: round(v / 1e3, 3) for k, v in totals.items()},
        "best_ms_by_kind": {k: round(v / 1e3, 3) for k, v in best_totals.items()},
        "other_aten_ops": others,
    }


def kernel_profile(fn: Callable[[], Any]) -> dict[str, Any]:
    """GPU time per call by kernel category and the top kernels of a CUDA-graph replay of ``fn``."""
    from profile_unet import PROFILED_CALLS, categories, profile_calls

    with torch.inference_mode():
        prof = profile_calls(captured(fn).replay)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=110)
    return {"by_category": categories(prof, calls=PROFILED_CALLS), "top_kernels": table}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,16", help="UNet batch sizes (comma list)")
    p.add_argument("--cudnn", choices=CUDNN_MODES, default="heuristics")
    p.add_argument("--repeat", type=int, default=20, help="calls per captured graph")
    p.add_argument("--iters", type=int, default=20, help="graph replays timed")
    p.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default")
    p.add_argument("--no-vae", dest="vae", action="store_false")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    torch.backends.cudnn.benchmark = args.cudnn != "heuristics"
    if args.blas != "default":
        torch.backends.cuda.preferred_blas_library(args.blas)
    if args.cudnn == "benchmark_all":
        torch.backends.cudnn.benchmark_limit = 0
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": args.cudnn,
        "blas": args.blas,
    }
    device, gen = torch.device("cuda"), torch.Generator("cuda").manual_seed(1)
    unet = C.random_sd15_unet(device).half()
    prepare_cuda_inference(unet)
    for b in (int(s) for s in args.batches.split(",")):
        x = torch.randn(b, 4, 64, 64, generator=gen, device=device).half()
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.full((b,), 501.0, device=device)
        ctx = torch.randn(b, 77, 768, generator=gen, device=device).half()
        print(f"--- unet batch {b}", flush=True)
        res[f"unet_b{b}"] = probe(lambda x=x, t=t, ctx=ctx, m=unet: m(x, t, ctx), args.repeat, args.iters)
        with torch.inference_mode():
            step = graph_us(lambda x=x, t=t, ctx=ctx, m=unet: m(x, t, ctx), 1, 50) / 1e3
        res[f"unet_b{b}"]["step_ms"] = round(step, 4)
        print(json.dumps(res[f"unet_b{b}"]["ms_by_kind"]), "step", step, flush=True)
    del unet
    if args.vae:
        arch = C.ARCHS["sd15"]
        eng, _ = C.build_ours(arch, device, torch.float16, 0)
        vae = eng.vae
        del eng
        vae.to(memory_format=torch.channels_last)
        prepare_cuda_inference(vae)
        z = torch.randn(1, 4, 64, 64, generator=gen, device=device).half()
        print("--- vae decode", flush=True)
        res["decode_b1"] = probe(lambda: vae.decode(z), args.repeat, args.iters)
        res["decode_b1"]["profile"] = kernel_profile(lambda: vae.decode(z))
        print(res["decode_b1"]["profile"]["top_kernels"], flush=True)
        with torch.inference_mode():
            res["decode_b1"]["decode_ms"] = round(graph_us(lambda: vae.decode(z), 1, 50) / 1e3, 4)
        print(json.dumps(res["decode_b1"]["ms_by_kind"]), "decode", res["decode_b1"]["decode_ms"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
