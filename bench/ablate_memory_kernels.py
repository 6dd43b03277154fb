"""Same-process A/B of the memory-bound kernel choices of the fast path: the kl-f8 decode at 512 px and the
SD-1.5 UNet step, graph-replayed, with each choice switched back to what it replaced.

Switches (each variant is the current code with some of them off):

* ``flat_residual``: the bias + residual add as the flat kernel with a per-element channel index, not as
  pixel-row x channel tiles (``residual_kernels.bias_residual_add_triton(block=2048)``);
* ``gn_64x32``: the GroupNorm tiling below batch 8 as 64 x 32 tiles on 4 warps, not 128 x 32 on 4
  (``triton_kernels.NHWC_PLAIN``);
* ``no_handoff``: the decoder's norms compute their statistics themselves instead of taking them from the
  residual add before them (``feeds_norm`` off on the residual and attention blocks);
* ``no_upsample_handoff``: likewise after the sub-pixel upsamplings (``feeds_norm`` off on them; the
  interleave runs as its plain kernel);
* ``torch_softmax``: the decoder attention's softmax by torch instead of the Triton row kernel.

    python bench/ablate_memory_kernels.py --out bench/results/ablate_memory_kernels_h100.json

Each variant is timed from a CUDA graph of one call, replayed 30 times (median), in ``--rounds`` rounds
over all variants, so drift shows as round-to-round spread.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from op_roofline import graph_us

from ldm_sdk.accel import residual_kernels as R
from ldm_sdk.accel import triton_kernels as K
from ldm_sdk.accel import vae_attention as V
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.accel.subpixel import FusedFirstStageUpsample
from ldm_sdk.benchmarks import common as C
from ldm_sdk.models.autoencoder import Decoder

SWITCHES = ("flat_residual", "gn_64x32", "no_handoff", "torch_softmax", "no_upsample_handoff")
SESSION6 = ("no_upsample_handoff",)
DECODE_VARIANTS = {
    "current": (),
    "session6": SESSION6,
    "torch_softmax": (*SESSION6, "torch_softmax"),
    "no_handoff": (*SESSION6, "no_handoff"),
    "no_handoff_torch_softmax": (*SESSION6, "no_handoff", "torch_softmax"),
    "gn_64x32": (*SESSION6, "gn_64x32", "no_handoff", "torch_softmax"),
    "session5": SWITCHES,
}
UNET_VARIANTS = {"current": (), "gn_64x32": ("gn_64x32",), "session5": ("flat_residual", "gn_64x32")}


@contextmanager
def switched(off: tuple[str, ...], decoder: Decoder | None) -> Iterator[None]:
    """The current code with the switches in ``off`` turned back (module constants / functions patched and
    restored; the handoff switches need the decoder)."""
    saved = (R.bias_residual_add_triton, K.NHWC_PLAIN, V.softmax_)
    feeders = [m for m in decoder.modules() if getattr(m, "feeds_norm", False)] if decoder is not None else []
    upsamplings = [m for m in feeders if isinstance(m, FusedFirstStageUpsample)]
    try:
        if "flat_residual" in off:
            R.bias_residual_add_triton = functools.partial(saved[0], block=2048)  # type: ignore[assignment]
        if "gn_64x32" in off:
            K.NHWC_PLAIN = K.NhwcTiles(max_block=2048, cols=32, stages=1)
        if "torch_softmax" in off:
            V.softmax_ = lambda s, **_: torch.softmax(s, dim=-1)  # type: ignore[assignment]
        if "no_handoff" in off:
            for m in feeders:
                if m not in upsamplings:
                    m.feeds_norm = False
        if "no_upsample_handoff" in off:
            for m in upsamplings:
                m.feeds_norm = False
        yield
    finally:
        R.bias_residual_add_triton, K.NHWC_PLAIN, V.softmax_ = saved  # type: ignore[assignment]
        for m in feeders:
            m.feeds_norm = True


def run(
    fn: Callable[[], Any], variants: dict[str, tuple[str, ...]], decoder: Decoder | None, rounds: int
) -> dict[str, list[float]]:
    """ms per call of ``fn`` under each variant, one entry per round."""
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, off in variants.items():
                with switched(off, decoder):
                    fn()  # compiles what the variant launches
                    torch.cuda.synchronize()
                    times.setdefault(name, []).append(round(graph_us(fn, 1, 30) / 1e3, 4))
                print(name, times[name], flush=True)
    return times


def decode_ablation(device: torch.device, gen: torch.Generator, rounds: int) -> dict[str, list[float]]:
    eng, _ = C.build_ours(C.ARCHS["sd15"], device, torch.float16, 0)
    vae = eng.vae.to(memory_format=torch.channels_last)
    prepare_cuda_inference(vae)
    decoder = next(m for m in vae.modules() if isinstance(m, Decoder))
    z = torch.randn(1, 4, 64, 64, generator=gen, device=device).half()
    print("--- decode 512 px", flush=True)
    return run(lambda: vae.decode(z), DECODE_VARIANTS, decoder, rounds)


def unet_ablation(
    device: torch.device, gen: torch.Generator, batches: list[int], rounds: int
) -> dict[str, dict[str, list[float]]]:
    unet = C.random_sd15_unet(device).half()
    prepare_cuda_inference(unet)
    out = {}
    for b in batches:
        x = torch.randn(b, 4, 64, 64, generator=gen, device=device).half()
        x = x.contiguous(memory_format=torch.channels_last)
        t = torch.full((b,), 501.0, device=device)
        ctx = torch.randn(b, 77, 768, generator=gen, device=device).half()
        print(f"--- unet batch {b}", flush=True)
        out[f"unet_b{b}_ms"] = run(lambda x=x, t=t, ctx=ctx: unet(x, t, ctx), UNET_VARIANTS, None, rounds)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet-batches", default="2,16", help="UNet batch sizes (comma list; empty: none)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark needs a CUDA device")
    device, gen = torch.device("cuda"), torch.Generator("cuda").manual_seed(1)
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["decode_ms"] = decode_ablation(device, gen, args.rounds)
    batches = [int(b) for b in args.unet_batches.split(",") if b]
    if batches:
        res.update(unet_ablation(device, gen, batches, args.rounds))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
