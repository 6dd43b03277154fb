"""Same-process A/B of the step-level changes of 2026-11-26 (sessions 7 and 8): the short-key attention kernel
(``ldm_sdk.accel.short_attention``), the one K / V GEMM of all cross-attentions
(``ldm_sdk.accel.context_projections``), the memset nodes of a captured graph rewritten as kernels
(``ldm_sdk.accel.graph_memsets``), the skip concatenations' copy kernel (``ldm_sdk.accel.skip_concat``), the
GroupNorm statistics handoff in the UNet (``block_fusion.link_unet``)
and from the decoder's upsamplings, the TMA form of the GEGLU dual GEMM (``ldm_sdk.accel.geglu_tma``; off:
the pointer kernel at ``C = 320``, cuBLAS + the gating kernel wider), and the guidance form of the
UNet call with the input shared by the two halves (``unet_b*_shared_input_ms``: ``x`` and ``t`` of half the
batch with the whole batch's context, :meth:`~ldm_sdk.models.unet.UNetModel.forward`).

The SD-1.5 UNet (batch 2 and 16) and the kl-f8 decode (512 px) run as the runtime runs them: prepared
(:func:`~ldm_sdk.accel.prepare.prepare_cuda_inference`) and replayed from a
:class:`~ldm_sdk.accel.graphs.CapturedModel`'s graph; each variant switches some of the changes off,
captures afresh and is timed by graph replay (CUDA events, median of ``--iters``), in ``--rounds`` rounds
over all variants so drift shows as spread.

    python bench/ablate_graph_kernels.py --out bench/results/ablate_graph_kernels_h100.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel import block_fusion as BF
from ldm_sdk.accel import geglu_gemm as G
from ldm_sdk.accel.fused_unet import FusedUNetModel
from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.accel.subpixel import FusedFirstStageUpsample
from ldm_sdk.benchmarks import common as C
from ldm_sdk.diffusion.conditioning import Conditioning
from ldm_sdk.models.unet import UNetModel

UNET_VARIANTS = {
    "current": (),
    "no_short_attention": ("short_attention",),
    "no_shared_kv": ("shared_kv",),
    "no_memset_rewrite": ("memsets",),
    "no_unet_handoff": ("handoff",),
    "no_skip_concat": ("skip_concat",),
    "no_geglu_tma": ("geglu_tma",),
    "none": ("short_attention", "shared_kv", "memsets", "handoff", "skip_concat", "geglu_tma"),
}
DECODE_VARIANTS = {
    "current": (),
    "no_upsample_handoff": ("upsample_handoff",),
    "no_memset_rewrite": ("memsets",),
    "none": ("upsample_handoff", "memsets"),
}


@contextmanager
def switched(off: tuple[str, ...], model: nn.Module) -> Iterator[None]:
    """The current code with the changes in ``off`` turned off (restored on exit)."""
    pays, concat = BF.kernel_pays, FusedUNetModel.concat_skip
    tma_fits, tma_device = G.tma_fits, G.tma_device
    shared = {m: m.context_projections for m in model.modules() if isinstance(m, BF.FusedCrossAttention)}
    ups = [m for m in model.modules() if isinstance(m, FusedFirstStageUpsample) and m.feeds_norm]
    unet_layers = (BF.FusedResBlock, BF.FusedSpatialTransformer)
    unet_feeders = [m for m in model.modules() if isinstance(m, unet_layers) and m.feeds_norm]
    try:
        if "short_attention" in off:
            BF.kernel_pays = lambda *a: False  # type: ignore[assignment]
        if "shared_kv" in off:
            for m in shared:
                m.context_projections = None
        if "upsample_handoff" in off:
            for m in ups:
                m.feeds_norm = False
        if "skip_concat" in off:
            FusedUNetModel.concat_skip = UNetModel.concat_skip  # type: ignore[method-assign]
        if "handoff" in off:
            for m in unet_feeders:
                m.feeds_norm = False
        if "geglu_tma" in off:
            G.tma_fits = lambda *a: False  # type: ignore[assignment]
            G.tma_device = lambda *a: False  # type: ignore[assignment]
        yield
    finally:
        G.tma_fits, G.tma_device = tma_fits, tma_device  # type: ignore[assignment]
        BF.kernel_pays = pays  # type: ignore[assignment]
        FusedUNetModel.concat_skip = concat  # type: ignore[method-assign]
        for m, value in shared.items():
            m.context_projections = value
        for m in [*ups, *unet_feeders]:
            m.feeds_norm = True


def replay_ms(call: Callable[[], Tensor], captured: CapturedModel, iters: int) -> float:
    """Capture (through ``call``, which runs ``captured``), then time the graph's replay alone."""
    captured.clear()
    call()
    graph = next(iter(captured._captures.values())).graph
    assert graph is not None
    return C.median(C.time_calls(graph.replay, torch.device("cuda"), warmup=3, iters=iters)) * 1e3


def run(
    variants: dict[str, tuple[str, ...]],
    model: nn.Module,
    captured: CapturedModel,
    call: Callable[[], Tensor],
    rounds: int,
    iters: int,
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, off in variants.items():
            with switched(off, model):
                captured.rewrite_memsets = "memsets" not in off
                times.setdefault(name, []).append(round(replay_ms(call, captured, iters), 4))
            print(name, times[name], flush=True)
    captured.rewrite_memsets = True
    return times


def unet_ablation(
    variants: dict[str, tuple[str, ...]], batches: list[int], gen: torch.Generator, rounds: int, iters: int
) -> dict[str, Any]:
    if not batches:
        return {}
    dev = torch.device("cuda")
    unet = C.random_sd15_unet(dev).half()
    prepare_cuda_inference(unet)
    step = CapturedModel(lambda x, t, c: unet(x, t, c.crossattn), modules=[unet])
    out = {}
    for b in batches:
        x = torch.randn(b, 4, 64, 64, generator=gen, device=dev).half()
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.full((b,), 501.0, device=dev)
        cond = Conditioning(crossattn=torch.randn(b, 77, 768, generator=gen, device=dev).half())
        print(f"--- unet batch {b}", flush=True)
        call = functools.partial(step, x, t, cond)
        if variants:
            out[f"unet_b{b}_ms"] = run(variants, unet, step, call, rounds, iters)
        # the guidance form: x and t once, the two halves' context (UNetModel.forward's shared input)
        shared = functools.partial(step, x[: b // 2], t[: b // 2], cond)
        out[f"unet_b{b}_shared_input_ms"] = run({"current": ()}, unet, step, shared, rounds, iters)["current"]
    return out


def decode_ablation(
    variants: dict[str, tuple[str, ...]], gen: torch.Generator, rounds: int, iters: int
) -> dict[str, list[float]]:
    dev = torch.device("cuda")
    eng, _ = C.build_ours(C.ARCHS["sd15"], dev, torch.float16, 0)
    vae = eng.vae.to(memory_format=torch.channels_last)
    prepare_cuda_inference(vae)
    decode = CapturedModel(lambda z, t, c: vae.decode(z), modules=[vae])
    z = torch.randn(1, 4, 64, 64, generator=gen, device=dev).half()
    print("--- decode 512 px", flush=True)
    call = functools.partial(decode, z, z.new_zeros(1), Conditioning())
    return run(variants, vae, decode, call, rounds, iters)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="2,16", help="UNet batch sizes (comma list; empty: none)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument(
        "--variants",
        default=None,
        help="comma list of the variants to run (default: all; 'current' alone times the code as it is, "
        f"e.g. for bench/ab_checkouts.py): UNet {', '.join(UNET_VARIANTS)}; "
        f"decode {', '.join(DECODE_VARIANTS)}",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    unet_variants, decode_variants = dict(UNET_VARIANTS), dict(DECODE_VARIANTS)
    if args.variants is not None:
        names = [v for v in args.variants.split(",") if v]
        unknown = [n for n in names if n not in UNET_VARIANTS and n not in DECODE_VARIANTS]
        if unknown:
            p.error(f"unknown variants {unknown}; valid: {sorted({*UNET_VARIANTS, *DECODE_VARIANTS})}")
        unet_variants = {n: v for n, v in UNET_VARIANTS.items() if n in names}
        decode_variants = {n: v for n, v in DECODE_VARIANTS.items() if n in names}
    gen = torch.Generator("cuda").manual_seed(1)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    batches = [int(v) for v in args.batches.split(",") if v]
    res.update(unet_ablation(unet_variants, batches, gen, args.rounds, args.iters))
    torch.cuda.empty_cache()
    if decode_variants:
        res["decode_ms"] = decode_ablation(decode_variants, gen, args.rounds, args.iters)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
