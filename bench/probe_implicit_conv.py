"""Our own 3x3 convolution (a Triton implicit GEMM, ``ldm_sdk/kernels/implicit_conv.py``) against cuDNN,
with and without the GroupNorm + SiLU that precedes it folded into its input loads.

    python bench/probe_implicit_conv.py --out bench/results/probe_implicit_conv_h100.json   # a CUDA machine

Why: every 3x3 convolution of a UNet ResBlock and of the first stage's ResnetBlock reads the output of a
GroupNorm + SiLU apply pass (a full read and write of the map); cuDNN cannot take that pass as its prologue.
A convolution of our own can -- if it runs near cuDNN's speed. For each shape (the decoder's at 512 px, the
SD-1.5 UNet's at batch 2 and 16) this times, graph-replayed (``--reps`` calls per graph, median of
``--iters`` replays):

* ``cudnn``: ``F.conv2d`` with bias, channels_last (cuDNN adds the bias in a pass of its own);
  ``cudnn_nobias``: without (how the fast path calls it: the biases go into the kernels after it);
* ``apply+cudnn``: the norm's apply kernel (statistics given, as the fast path's handoff gives them) then
  ``cudnn``: what the fast path runs now;
* ``rows_*`` / ``tma_*``: the Triton kernels (``_conv3x3_nhwc_rows_kernel``: masked pointer loads of the
  input; ``_conv3x3_nhwc_kernel``: 4-D TMA loads) over a sweep of tiles, plain and with the prologue.

Each Triton variant is checked against float32 references (the convolution of the fp16-rounded normalised
map): ``max_err`` relative to the output's largest magnitude.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.op_roofline import graph_us
from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.kernels.triton_kernels import _activate_fast


# -- the kernels probed (the one that paid, with its epilogue, is ldm_sdk/kernels/implicit_conv.py) --
@triton.jit(do_not_specialize=["N", "H", "W"])
def _conv3x3_nhwc_kernel(
    x_desc,
    w_desc,
    y_desc,
    bias_ptr,
    mu_ptr,
    scale_ptr,
    beta_ptr,
    N,
    H,
    W,
    C,
    CO,
    HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr,
    ACT: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Program ``p`` computes the output tile of ``BLOCK_H x BLOCK_W`` pixels of one sample times
    ``BLOCK_N`` output channels (column tiles fastest, so programs running together share their input
    tile in L2): the sum over the 9 taps and the ``C / BLOCK_K`` channel steps of
    ``x[n, y + dy, x + dx, c0 : c0 + BLOCK_K] @ w[co0 : co0 + BLOCK_N, tap, c0 : ...]^T``, one loop of
    ``9 C / BLOCK_K`` steps. Each input tile is one 4-D TMA copy of the map shifted by the tap; pixels
    outside the map arrive as zeros (the convolution's zero padding). With ``PROLOGUE`` the tile is
    first normalised, ``act((v - mu[n, c]) * scale[n, c] + beta[c])`` in float32 and rounded once, and
    the padding pixels set to zero after that (the padding pads the normalised map). Epilogue: float32
    accumulators + ``bias``, rounded once, one TMA store (clipped at the map's edges)."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(CO, BLOCK_N)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_h = tl.cdiv(H, BLOCK_H)
    col = pid % tiles_n
    rest = pid // tiles_n
    tx = rest % tiles_w
    rest = rest // tiles_w
    ty = rest % tiles_h
    n = rest // tiles_h
    y0 = ty * BLOCK_H
    x0 = tx * BLOCK_W
    co0 = col * BLOCK_N
    c_steps = C // BLOCK_K
    rows = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(0, 9 * c_steps, num_stages=STAGES):
        tap = kk // c_steps
        c0 = (kk - tap * c_steps) * BLOCK_K
        dy = tap // 3 - 1
        dx = tap % 3 - 1
        a = x_desc.load([n, y0 + dy, x0 + dx, c0]).reshape(BLOCK_M, BLOCK_K)
        if PROLOGUE:
            cols = c0 + tl.arange(0, BLOCK_K)
            mu = tl.load(mu_ptr + n * C + cols)
            scale = tl.load(scale_ptr + n * C + cols)
            beta = tl.load(beta_ptr + cols)
            v = _activate_fast((a.to(tl.float32) - mu[None, :]) * scale[None, :] + beta[None, :], ACT)
            yy = y0 + dy + rows // BLOCK_W
            xx = x0 + dx + rows % BLOCK_W
            inside = (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            a = tl.where(inside[:, None], v, 0.0).to(tl.bfloat16 if BF16 else tl.float16)
        b = w_desc.load([co0, tap * C + c0])
        acc = tl.dot(a, b.T, acc)
    if HAS_BIAS:
        cols_out = co0 + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + cols_out, mask=cols_out < CO, other=0.0).to(tl.float32)[None, :]
    out = acc.to(tl.bfloat16 if BF16 else tl.float16).reshape(1, BLOCK_H, BLOCK_W, BLOCK_N)
    y_desc.store([n, y0, x0, co0], out)


@triton.jit(do_not_specialize=["P", "H", "W"])
def _conv3x3_nhwc_rows_kernel(
    x_ptr,
    w_desc,
    y_desc,
    bias_ptr,
    mu_ptr,
    scale_ptr,
    beta_ptr,
    P,
    H,
    W,
    C,
    CO,
    HAS_BIAS: tl.constexpr,
    PROLOGUE: tl.constexpr,
    ACT: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STAGES: tl.constexpr,
):
    """As :func:`_conv3x3_nhwc_kernel`, the output tile being ``BLOCK_M`` consecutive pixels of the
    ``P = N H W`` pixel rows (any map width; a tile may span rows and samples): each input tile is
    gathered by masked loads (the mask is the zero padding), the weights and the output by TMA."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(CO, BLOCK_N)
    col = pid % tiles_n
    p0 = (pid // tiles_n) * BLOCK_M
    co0 = col * BLOCK_N
    p = p0 + tl.arange(0, BLOCK_M)
    row_ok = p < P
    xx = p % W
    yy = (p // W) % H
    n = p // (W * H)
    cols = tl.arange(0, BLOCK_K)
    c_steps = C // BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in tl.range(0, 9 * c_steps, num_stages=STAGES):
        tap = kk // c_steps
        c0 = (kk - tap * c_steps) * BLOCK_K
        dy = tap // 3 - 1
        dx = tap % 3 - 1
        sy = yy + dy
        sx = xx + dx
        inside = row_ok & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
        src = (p + dy * W + dx).to(tl.int64) * C + c0
        a = tl.load(x_ptr + src[:, None] + cols[None, :], mask=inside[:, None], other=0.0)
        if PROLOGUE:
            per_row = n[:, None] * C + c0 + cols[None, :]
            mu = tl.load(mu_ptr + per_row, mask=row_ok[:, None], other=0.0)
            scale = tl.load(scale_ptr + per_row, mask=row_ok[:, None], other=0.0)
            beta = tl.load(beta_ptr + c0 + cols)
            v = _activate_fast((a.to(tl.float32) - mu) * scale + beta[None, :], ACT)
            a = tl.where(inside[:, None], v, 0.0).to(tl.bfloat16 if BF16 else tl.float16)
        b = w_desc.load([co0, tap * C + c0])
        acc = tl.dot(a, b.T, acc)
    if HAS_BIAS:
        cols_out = co0 + tl.arange(0, BLOCK_N)
        acc += tl.load(bias_ptr + cols_out, mask=cols_out < CO, other=0.0).to(tl.float32)[None, :]
    y_desc.store([p0, co0], acc.to(tl.bfloat16 if BF16 else tl.float16))


@triton.jit(do_not_specialize=["N", "H", "W"])
def _conv3x3_nhwc_persistent_kernel(
    x_desc,
    w_desc,
    y_desc,
    bias_ptr,
    N,
    H,
    W,
    C,
    CO,
    PROGRAMS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BF16: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FLATTEN: tl.constexpr,
    STAGES: tl.constexpr,
):
    """:func:`_conv3x3_nhwc_kernel` (no prologue) with one program per SM walking the output tiles
    ``p, p + PROGRAMS, ...``; with ``FLATTEN`` the tile loop is flattened into the K loop, so the next
    tile's first loads are issued during this tile's epilogue."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_W
    tiles_n = tl.cdiv(CO, BLOCK_N)
    tiles_w = tl.cdiv(W, BLOCK_W)
    tiles_h = tl.cdiv(H, BLOCK_H)
    tiles = N * tiles_h * tiles_w * tiles_n
    c_steps = C // BLOCK_K
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN, num_stages=STAGES):
        col = tile % tiles_n
        rest = tile // tiles_n
        tx = rest % tiles_w
        rest = rest // tiles_w
        ty = rest % tiles_h
        n = rest // tiles_h
        y0 = ty * BLOCK_H
        x0 = tx * BLOCK_W
        co0 = col * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(9 * c_steps):
            tap = kk // c_steps
            c0 = (kk - tap * c_steps) * BLOCK_K
            a = x_desc.load([n, y0 + tap // 3 - 1, x0 + tap % 3 - 1, c0]).reshape(BLOCK_M, BLOCK_K)
            acc = tl.dot(a, w_desc.load([co0, tap * C + c0]).T, acc)
        if HAS_BIAS:
            cols_out = co0 + tl.arange(0, BLOCK_N)
            acc += tl.load(bias_ptr + cols_out, mask=cols_out < CO, other=0.0).to(tl.float32)[None, :]
        out = acc.to(tl.bfloat16 if BF16 else tl.float16).reshape(1, BLOCK_H, BLOCK_W, BLOCK_N)
        y_desc.store([n, y0, x0, co0], out)


# label, N, C, H, W, CO
SHAPES = [
    ("dec512_128", 1, 128, 512, 512, 128),
    ("dec512_256to128", 1, 256, 512, 512, 128),
    ("dec256_256", 1, 256, 256, 256, 256),
    ("dec128_512", 1, 512, 128, 128, 512),
    ("dec64_512", 1, 512, 64, 64, 512),
    ("unet_b16_64_320", 16, 320, 64, 64, 320),
    ("unet_b16_32_640", 16, 640, 32, 32, 640),
    ("unet_b16_16_1280", 16, 1280, 16, 16, 1280),
    ("unet_b16_64_640to320", 16, 640, 64, 64, 320),
    ("unet_b2_64_320", 2, 320, 64, 64, 320),
    ("unet_b2_32_640", 2, 640, 32, 32, 640),
    ("unet_b2_16_1280", 2, 1280, 16, 16, 1280),
]
# (kind, BM or BW, BN, BK, warps, stages)
CONFIGS = [
    ("rows", 128, 128, 64, 8, 3),
    ("rows", 128, 128, 64, 4, 4),
    ("rows", 128, 256, 64, 8, 3),
    ("rows", 128, 64, 64, 4, 4),
    ("rows", 64, 128, 64, 4, 4),
    ("rows", 256, 128, 64, 8, 3),
    ("tma", 128, 128, 64, 8, 3),
    ("tma", 128, 128, 64, 4, 4),
    ("tma", 128, 256, 64, 8, 3),
    ("tma", 64, 128, 64, 4, 4),
    ("tma", 256, 128, 64, 8, 3),
    ("tma", 64, 64, 64, 4, 4),
    ("tma", 128, 64, 64, 4, 4),
    ("tma", 128, 128, 128, 8, 3),
    ("tma", 64, 128, 128, 4, 3),
    ("ptma", 128, 128, 64, 8, 3),
    ("ptma", 128, 128, 64, 8, 4),
    ("ptma", 128, 128, 64, 4, 4),
    ("ptma", 64, 128, 64, 4, 4),
    ("ptma", 128, 256, 64, 8, 3),
    ("ptma", 256, 128, 64, 8, 3),
    ("ptmaf", 128, 128, 64, 8, 3),
    ("ptmaf", 128, 128, 64, 8, 4),
    ("ptmaf", 128, 128, 64, 4, 4),
    ("ptmaf", 64, 128, 64, 4, 4),
    ("ptmaf", 256, 128, 64, 8, 3),
]


def build(shape: tuple[str, int, int, int, int, int], gen: torch.Generator) -> dict[str, Any]:
    _, n, c, h, w, co = shape
    dev = torch.device("cuda")
    x = torch.randn(n, c, h, w, generator=gen, device=dev).half().to(memory_format=torch.channels_last)
    wt = (torch.randn(co, c, 3, 3, generator=gen, device=dev) / (3 * c**0.5)).half()
    wt = wt.to(memory_format=torch.channels_last)
    bias = torch.randn(co, generator=gen, device=dev).half()
    gamma = (1 + 0.1 * torch.randn(c, generator=gen, device=dev)).half()
    beta = (0.1 * torch.randn(c, generator=gen, device=dev)).half()
    groups = 32
    xf = x.float().reshape(n, groups, -1)
    mean = xf.mean(-1)
    rstd = torch.rsqrt(xf.var(-1, unbiased=False) + 1e-6)
    mu = mean.repeat_interleave(c // groups, dim=1).contiguous()
    scale = (rstd.repeat_interleave(c // groups, dim=1) * gamma.float()[None]).contiguous()
    beta32 = beta.float().contiguous()
    normed = F.silu(
        (x.float() - mu[:, :, None, None]) * scale[:, :, None, None] + beta32[None, :, None, None]
    )
    normed = normed.half().to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref_plain = F.conv2d(x.float(), wt.float(), bias.float(), padding=1)
        ref_pro = F.conv2d(normed.float(), wt.float(), bias.float(), padding=1)
    y = torch.empty(n, co, h, w, device=dev, dtype=torch.half).to(memory_format=torch.channels_last)
    plan = K.default_plan(x, groups)
    stats = K._nhwc_statistics(x, x, 0, False, plan, None)
    return {
        "x": x, "w": wt, "bias": bias, "gamma": gamma, "beta": beta, "mu": mu, "scale": scale,
        "beta32": beta32, "normed": normed, "ref_plain": ref_plain, "ref_pro": ref_pro, "y": y,
        "stats": stats, "groups": groups,
    }  # fmt: skip


def launcher(t: dict[str, Any], cfg: tuple, prologue: bool) -> Any:
    """A zero-argument call of one Triton variant, or None where the config does not fit the shape."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    kind, bm, bn, bk, warps, stages = cfg
    x, w, y = t["x"], t["w"], t["y"]
    n, c, h, wd = x.shape
    co = w.shape[0]
    if c % bk:
        return None
    w2 = w.permute(0, 2, 3, 1).reshape(co, 9 * c)
    w_desc = TensorDescriptor.from_tensor(w2, [bn, bk])
    common = dict(
        HAS_BIAS=True, PROLOGUE=prologue, ACT="silu", BF16=False, BLOCK_N=bn, BLOCK_K=bk, STAGES=stages,
        num_warps=warps,
    )  # fmt: skip
    args_tail = (t["bias"], t["mu"], t["scale"], t["beta32"])
    if kind == "rows":
        p = n * h * wd
        y_desc = TensorDescriptor.from_tensor(y.permute(0, 2, 3, 1).reshape(p, co), [bm, bn])
        grid = (triton_cdiv(p, bm) * triton_cdiv(co, bn),)

        def call() -> None:
            _conv3x3_nhwc_rows_kernel[grid](
                x, w_desc, y_desc, *args_tail, p, h, wd, c, co, BLOCK_M=bm, **common
            )

        return call
    bw = min(bm, wd)
    bh = bm // bw
    if bw * bh != bm or bh > h:
        return None
    x_desc = TensorDescriptor.from_tensor(x.permute(0, 2, 3, 1), [1, bh, bw, bk])
    y_desc = TensorDescriptor.from_tensor(y.permute(0, 2, 3, 1), [1, bh, bw, bn])
    tiles = n * triton_cdiv(h, bh) * triton_cdiv(wd, bw) * triton_cdiv(co, bn)
    grid = (tiles,)
    if kind.startswith("ptma"):
        if prologue:
            return None
        programs = min(tiles, torch.cuda.get_device_properties(0).multi_processor_count)

        def call_persistent() -> None:
            _conv3x3_nhwc_persistent_kernel[(programs,)](
                x_desc, w_desc, y_desc, t["bias"], n, h, wd, c, co, PROGRAMS=programs, HAS_BIAS=True,
                BF16=False, BLOCK_H=bh, BLOCK_W=bw, BLOCK_N=bn, BLOCK_K=bk, FLATTEN=kind == "ptmaf",
                STAGES=stages, num_warps=warps,
            )  # fmt: skip

        return call_persistent

    def call_tma() -> None:
        _conv3x3_nhwc_kernel[grid](
            x_desc, w_desc, y_desc, *args_tail, n, h, wd, c, co, BLOCK_H=bh, BLOCK_W=bw, **common
        )

    return call_tma


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--only", nargs="*", help="shape labels to run (default: all)")
    ap.add_argument("--prologue", action="store_true", help="also time the GroupNorm + SiLU prologue")
    ap.add_argument("--threads", type=int, default=16, help="compile threads for the warm-up")
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    shapes = [s for s in SHAPES if not args.only or s[0] in args.only]
    results: list[dict[str, Any]] = []
    for shape in shapes:
        t = build(shape, gen)
        label, n, c, h, w, co = shape
        flop = 2 * 9 * c * co * n * h * w
        row: dict[str, Any] = {"shape": label, "gflop": flop / 1e9, "variants": {}}
        x, wt, bias = t["x"], t["w"], t["bias"]

        def cudnn(x=x, wt=wt, bias=bias) -> None:
            F.conv2d(x, wt, bias, padding=1)

        def cudnn_nobias(x=x, wt=wt) -> None:
            F.conv2d(x, wt, None, padding=1)

        def apply_cudnn(t=t, x=x, wt=wt, bias=bias) -> None:
            hn = K.group_norm_act_triton(
                x, t["gamma"], t["beta"], t["groups"], 1e-6, "silu", stats=t["stats"]
            )
            F.conv2d(hn, wt, bias, padding=1)

        def apply_only(t=t, x=x) -> None:
            K.group_norm_act_triton(x, t["gamma"], t["beta"], t["groups"], 1e-6, "silu", stats=t["stats"])

        for name, fn in (
            ("cudnn", cudnn),
            ("cudnn_nobias", cudnn_nobias),
            ("apply+cudnn", apply_cudnn),
            ("apply", apply_only),
        ):
            row["variants"][name] = {"us": graph_us(fn, args.reps, args.iters)}
        calls = {}
        for cfg in CONFIGS:
            for prologue in (False, True) if args.prologue else (False,):
                fn = launcher(t, cfg, prologue)
                if fn is not None:
                    kind, bm, bn, bk, warps, stages = cfg
                    tail = "pro" if prologue else "plain"
                    calls[f"{kind}_{bm}x{bn}x{bk}_w{warps}_s{stages}_{tail}"] = (fn, prologue)
        t0 = time.perf_counter()
        errors: dict[str, str] = {}

        def warm(item: tuple[str, tuple[Any, bool]], errors: dict[str, str] = errors) -> None:
            torch.cuda.set_device(0)  # a thread's own CUDA context: Triton encodes the TMA maps in it
            try:
                item[1][0]()
            except Exception as exc:
                errors[item[0]] = f"{type(exc).__name__}: {str(exc)[:200]}"

        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(warm, calls.items()))
        torch.cuda.synchronize()
        row["compile_s"] = time.perf_counter() - t0
        for name, (fn, prologue) in calls.items():
            if name in errors:
                row["variants"][name] = {"error": errors[name]}
                continue
            t["y"].zero_()
            fn()
            torch.cuda.synchronize()
            ref = t["ref_pro"] if prologue else t["ref_plain"]
            err = ((t["y"].float() - ref).abs().max() / ref.abs().max()).item()
            us = graph_us(fn, args.reps, args.iters)
            row["variants"][name] = {"us": us, "tflops": flop / us / 1e6, "max_err": err, "ok": err < 5e-3}
        base = row["variants"]["cudnn_nobias"]["us"]
        fused_base = row["variants"]["apply+cudnn"]["us"]

        def best(suffix: str, row: dict[str, Any] = row) -> tuple[float, str] | None:
            ok = [(v["us"], k) for k, v in row["variants"].items() if k.endswith(suffix) and v.get("ok")]
            return min(ok) if ok else None

        best_plain, best_pro = best("_plain"), best("_pro")
        row["summary"] = {
            "cudnn_us": base,
            "apply_plus_cudnn_us": fused_base,
            "best_plain": best_plain,
            "best_prologue": best_pro,
            "plain_vs_cudnn": base / best_plain[0] if best_plain else None,
            "prologue_vs_apply_cudnn": fused_base / best_pro[0] if best_pro else None,
        }
        print(
            json.dumps({"shape": label, **row["summary"], "compile_s": round(row["compile_s"], 1)}),
            flush=True,
        )
        for k, v in row["variants"].items():
            print(f"   {k:32s} {v.get('us', 0):9.1f} us  err {v.get('max_err', 0):.2e} {v.get('error', '')}")
        results.append(row)
        del t
        torch.cuda.empty_cache()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}
    import triton

    out["triton"] = triton.__version__
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
