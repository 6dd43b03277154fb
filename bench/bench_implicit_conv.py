"""The decoder's residual blocks with our own convolutions (``ldm_sdk/accel/implicit_conv.py``: bias, skip and
the next norm's statistics in the convolution's epilogue) against cuDNN + the separate passes, on an H100.

    python bench/bench_implicit_conv.py --out bench/results/bench_implicit_conv_h100.json

1. Per site, graph-replayed (median of ``--iters`` replays of a graph of ``--reps`` calls), at the kl-f8
   decoder's shapes (512 px image): ``conv1`` -- cuDNN without bias + the statistics pass of ``norm2``
   (with the bias as its shift), against ``conv3x3_fused`` with the bias and the statistics (merge
   included); ``conv2`` -- cuDNN without bias + the bias + skip + statistics pass, against
   ``conv3x3_fused`` with both biases, the skip and the statistics.
   The upsamplings (``upsample_conv_fused``, the sub-pixel form with the interleave, bias and statistics
   in its epilogue) against the phase kernels + cuDNN + the interleave with statistics.
2. The whole decode (SD-1.5's kl-f8 decoder, random weights, prepared and captured as the runtime runs
   it) with ``FusedResnetBlock.implicit_conv`` / ``FusedFirstStageUpsample.implicit_conv`` off / on
   (``VARIANTS``), alternately over ``--rounds`` rounds; each output against the float32 eager decoder
   (max abs error over max abs value) and against the cuDNN variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.op_roofline import graph_us
from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.accel.block_fusion import FusedResnetBlock
from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.implicit_conv import ConvPlan, conv3x3_fused, plan_conv, upsample_conv_fused
from ldm_sdk.accel.norm_handoff import NormHandoff, bias_residual_add_with_stats
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.accel.subpixel import FusedFirstStageUpsample, _interleave_with_stats, _phase_kernels_triton
from ldm_sdk.benchmarks import common as C
from ldm_sdk.diffusion.conditioning import Conditioning

PLANS = [
    ConvPlan(block_w=256, block_n=128, num_warps=8, stages=2, persistent=True),
    ConvPlan(block_w=256, block_n=128, num_warps=8, stages=3),
    ConvPlan(block_w=128, block_n=128, num_warps=4, stages=4),
    ConvPlan(block_w=128, block_n=128, num_warps=8, stages=3, persistent=True),
    ConvPlan(block_w=64, block_n=128, num_warps=4, stages=4),
    ConvPlan(block_w=128, block_n=256, num_warps=8, stages=3, persistent=True),
]
# decode variants: (FusedResnetBlock.implicit_conv, FusedFirstStageUpsample.implicit_conv)
VARIANTS = {
    "cudnn": (False, False),
    "implicit_conv": (True, False),
    "upsample": (False, True),
    "both": (True, True),
}
# the decoder's upsamplings: C, H = W of the small map (the output is 2H x 2W)
UPSAMPLINGS = [("up_64to128_512", 512, 64), ("up_128to256_512", 512, 128), ("up_256to512_256", 256, 256)]
UPSAMPLE_PLANS = [
    ConvPlan(block_w=256, block_n=128, num_warps=8, stages=3),
    ConvPlan(block_w=128, block_n=128, num_warps=4, stages=4),
    ConvPlan(block_w=128, block_n=128, num_warps=8, stages=3),
    ConvPlan(block_w=64, block_n=128, num_warps=4, stages=4),
    ConvPlan(block_w=128, block_n=256, num_warps=8, stages=3),
]
# label, C in, C out, H = W (the decoder's residual blocks at a 512 px image)
SITES = [
    ("512px_128", 128, 128, 512),
    ("512px_256to128", 256, 128, 512),
    ("256px_256", 256, 256, 256),
    ("256px_512to256", 512, 256, 256),
    ("128px_512", 512, 512, 128),
    ("64px_512", 512, 512, 64),
]


def upsampling_timings(reps: int, iters: int) -> list[dict[str, Any]]:
    """The sub-pixel upsampling: phase kernels + cuDNN + the interleave with statistics, against the phase
    kernels + ``upsample_conv_fused`` with statistics, per plan."""
    dev = torch.device("cuda")
    gen = torch.Generator(dev).manual_seed(1)
    rows = []
    for label, c, size in UPSAMPLINGS:
        cl = torch.channels_last
        x = torch.randn(1, c, size, size, generator=gen, device=dev).half().to(memory_format=cl)
        weight = (torch.randn(c, c, 3, 3, generator=gen, device=dev) * 0.02).half().to(memory_format=cl)
        bias = torch.randn(c, generator=gen, device=dev).half()
        handoff = NormHandoff(32)

        def old(x=x, weight=weight, bias=bias, c=c, size=size, handoff=handoff) -> None:
            kernels = _phase_kernels_triton(weight, None)
            full = F.conv2d(x, kernels, None, padding=1).contiguous(memory_format=torch.channels_last)
            _interleave_with_stats(full, bias, c, size, size, handoff, None)

        row: dict[str, Any] = {"site": label, "old": graph_us(old, reps, iters)}
        for plan in (None, *UPSAMPLE_PLANS):

            def new(x=x, weight=weight, bias=bias, plan=plan) -> None:
                kernels = _phase_kernels_triton(weight, None)
                upsample_conv_fused(x, kernels, bias, stats_groups=32, plan=plan)

            key = (
                "new_default"
                if plan is None
                else f"new_{plan.block_w}x{plan.block_n}_w{plan.num_warps}_s{plan.stages}"
            )
            try:
                new()
                row[key] = graph_us(new, reps, iters)
            except Exception as exc:  # a plan that does not fit (shared memory) is reported
                row[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    return rows


def site_timings(reps: int, iters: int) -> list[dict[str, Any]]:
    gen = torch.Generator(torch.device("cuda")).manual_seed(0)
    rows = []
    for site in SITES:
        row = one_site(*site, gen, reps, iters)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        rows.append(row)
    return rows


def one_site(label: str, cin: int, cout: int, size: int, gen: torch.Generator, reps: int, iters: int) -> dict:
    dev = torch.device("cuda")

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * scale).half()

    x = rand(1, cin, size, size).to(memory_format=torch.channels_last)
    h = rand(1, cout, size, size).to(memory_format=torch.channels_last)
    w1 = rand(cout, cin, 3, 3, scale=0.02).to(memory_format=torch.channels_last)
    w2 = rand(cout, cout, 3, 3, scale=0.02).to(memory_format=torch.channels_last)
    b1, b2 = rand(cout), rand(cout)
    skip = rand(1, cout, size, size).to(memory_format=torch.channels_last)
    plan = K.default_plan(h, 32)
    shift = b1.expand(1, -1)

    def old1() -> None:
        y = F.conv2d(x, w1, None, padding=1)
        K._nhwc_statistics(y, shift, 0, True, plan, None)

    def new1(plan: ConvPlan | None = None) -> None:
        conv3x3_fused(x, w1, b1, stats_groups=32, plan=plan)

    def old2() -> None:
        y = F.conv2d(h, w2, None, padding=1)
        bias_residual_add_with_stats(y, b2, skip, num_groups=32)

    def new2(plan: ConvPlan | None = None) -> None:
        conv3x3_fused(h, w2, b2, residual=skip, stats_groups=32, plan=plan)

    def cudnn1() -> None:
        F.conv2d(x, w1, None, padding=1)

    def cudnn2() -> None:
        F.conv2d(h, w2, None, padding=1)

    row: dict[str, Any] = {"site": label}
    for name, fn in (
        ("conv1_old", old1),
        ("conv1_new", new1),
        ("conv1_cudnn_alone", cudnn1),
        ("conv2_old", old2),
        ("conv2_new", new2),
        ("conv2_cudnn_alone", cudnn2),
    ):
        fn()
        row[name] = graph_us(fn, reps, iters)
    row["default_plan"] = str(plan_conv(size))
    for p in PLANS:
        for name, fn in (("conv1", new1), ("conv2", new2)):
            loop = "pf" if p.flatten else "p" if p.persistent else "g"
            key = f"{name}_{p.block_w}x{p.block_n}_w{p.num_warps}_s{p.stages}_{loop}"

            def call(fn=fn, p=p) -> None:
                fn(p)

            try:
                call()
                row[key] = graph_us(call, reps, iters)
            except Exception as exc:  # a plan that does not fit (shared memory) is reported
                row[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return row


def decode_ab(rounds: int, iters: int) -> dict[str, Any]:
    dev = torch.device("cuda")
    eng, _ = C.build_ours(C.ARCHS["sd15"], dev, torch.float16, 0)
    ref_vae = copy.deepcopy(eng.vae).float()
    vae = eng.vae.to(memory_format=torch.channels_last)
    prepare_cuda_inference(vae)
    g = torch.Generator(dev).manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=g, device=dev).half()
    graphs: dict[str, Any] = {}
    outs: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        with C.true_float32():
            ref = ref_vae.decode(z.float())
        for name, (blocks, upsamplings) in VARIANTS.items():
            FusedResnetBlock.implicit_conv = blocks
            FusedFirstStageUpsample.implicit_conv = upsamplings
            decode = CapturedModel(lambda z, t, c: vae.decode(z), modules=[vae])
            outs[name] = decode(z, z.new_zeros(1), Conditioning()).float().clone()
            graphs[name] = next(iter(decode._captures.values())).graph
        FusedResnetBlock.implicit_conv = FusedFirstStageUpsample.implicit_conv = True
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(rounds):
            for name, graph in graphs.items():
                times[name].append(C.median(C.time_calls(graph.replay, dev, warmup=5, iters=iters)) * 1e3)
    scale = ref.abs().max().item()
    res = {
        "decode_ms": times,
        "decode_ms_median": {k: C.median(v) for k, v in times.items()},
        "err_vs_fp32": {k: (o - ref).abs().max().item() / scale for k, o in outs.items()},
        "implicit_vs_cudnn": (outs["implicit_conv"] - outs["cudnn"]).abs().max().item() / scale,
        "both_vs_cudnn": (outs["both"] - outs["cudnn"]).abs().max().item() / scale,
    }
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-sites", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.no_sites:
        out["upsamplings"] = upsampling_timings(args.reps, args.iters)
        out["sites"] = site_timings(args.reps, args.iters)
    out["decode"] = decode_ab(args.rounds, 50)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
