"""Which library kernels serve the SD-1.5 fast path best on this GPU: the SDPA backends at each attention
shape of the UNet and the kl-f8 decoder, cuDNN autotuning (``torch.backends.cudnn.benchmark``) against its
heuristics for the CUDA-graph-replayed UNet step and the VAE decode (with the cost of the autotuning on the
first call), and the decode's GPU time by kernel category.

    python bench/probe_backends.py --out probe.json        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from op_roofline import captured
from profile_unet import categories, profile_calls

from ldm_sdk.benchmarks import common as C

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}

#: (name, batch, heads, query length, key length, head dim): SD-1.5 at 512 px with guidance (batch 2),
#: and the kl-f8 decoder's single-head mid-block attention at 64 x 64
SHAPES = (
    ("self_64x64", 2, 8, 4096, 4096, 40),
    ("cross_64x64", 2, 8, 4096, 77, 40),
    ("self_32x32", 2, 8, 1024, 1024, 80),
    ("cross_32x32", 2, 8, 1024, 77, 80),
    ("self_16x16", 2, 8, 256, 256, 160),
    ("cross_16x16", 2, 8, 256, 77, 160),
    ("self_8x8", 2, 8, 64, 64, 160),
    ("vae_mid", 1, 1, 4096, 4096, 512),
)


def gpu_ms(fn: Callable[[], object], iters: int = 50) -> float:
    return C.median(C.time_calls(fn, torch.device("cuda"), warmup=5, iters=iters)) * 1e3


def probe_sdpa(dtype: torch.dtype) -> dict[str, dict[str, float | str]]:
    out: dict[str, dict[str, float | str]] = {}
    g = torch.Generator("cuda").manual_seed(0)
    for name, b, h, lq, lk, d in SHAPES:
        q = torch.randn(b, h, lq, d, generator=g, device="cuda", dtype=dtype)
        k = torch.randn(b, h, lk, d, generator=g, device="cuda", dtype=dtype)
        v = torch.randn(b, h, lk, d, generator=g, device="cuda", dtype=dtype)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

        def call(q: torch.Tensor = q, k: torch.Tensor = k, v: torch.Tensor = v) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v)

        row: dict[str, float | str] = {"default": gpu_ms(call)}
        for label, backend in BACKENDS.items():
            try:
                with sdpa_kernel([backend]):
                    got = call()
                    row[label] = gpu_ms(call)
                row[f"{label}_err"] = C.rel_err(got.float(), ref)
            except RuntimeError as exc:
                row[label] = f"unsupported: {str(exc).splitlines()[0][:80]}"
        out[name] = row
        print(name, json.dumps(row))
    return out


def capture(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    return captured(fn).replay


def probe_cudnn(dtype: torch.dtype, norms_only: bool = False, no_subpixel: bool = False) -> dict[str, Any]:
    from ldm_sdk.accel.prepare import prepare_cuda_inference
    from ldm_sdk.models.configs import UNetConfig
    from ldm_sdk.models.first_stage import AutoencoderKL
    from ldm_sdk.models.unet import UNetModel
    from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

    res: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    unet = UNetModel.from_config(UNetConfig(**C.SD15_UNET))
    C.randomize_(unet, gen)
    unet = unet.to("cuda", dtype).eval().requires_grad_(False)
    vae = AutoencoderKL.from_config(FIRST_STAGE_ZOO["kl-f8"])  # type: ignore[arg-type]
    C.randomize_(vae, gen)
    vae = vae.to("cuda", dtype).eval().requires_grad_(False)
    for model in (unet, vae):
        if norms_only:  # the fast path before block fusion: fused norms / GEGLU, channels_last
            from ldm_sdk.accel.fusion import fuse_model

            fuse_model(model)
            model.to(memory_format=torch.channels_last)
        else:
            prepare_cuda_inference(model)
        if no_subpixel:  # the upsamplings back to interpolate + 3x3 conv
            from ldm_sdk.accel.subpixel import FusedFirstStageUpsample

            for m in model.modules():
                if isinstance(m, FusedFirstStageUpsample):
                    m.__class__ = m.unfused_class
    cl = torch.channels_last
    x = torch.randn(2, 4, 64, 64, generator=gen).to("cuda", dtype).contiguous(memory_format=cl)
    t = torch.full((2,), 501.0, device="cuda")
    ctx = torch.randn(2, 77, 768, generator=gen).to("cuda", dtype)
    z = torch.randn(1, 4, 64, 64, generator=gen).to("cuda", dtype).contiguous(memory_format=cl)
    with torch.inference_mode():
        for bench_mode in (False, True):
            torch.backends.cudnn.benchmark = bench_mode
            key = "benchmark" if bench_mode else "heuristics"
            for name, fn in (("unet", lambda: unet(x, t, ctx)), ("vae_decode", lambda: vae.decode(z))):
                torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                res[f"{name}_{key}_first_call_s"] = time.perf_counter() - start
                res[f"{name}_{key}_graph_ms"] = gpu_ms(capture(fn), iters=50)
            print(key, json.dumps({k: v for k, v in res.items() if key in k}))
        prof = profile_calls(lambda: vae.decode(z))
        res["vae_decode_gpu_ms_by_category"] = categories(prof, calls=5)
        res["vae_decode_profile"] = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=30, max_name_column_width=90
        )
        print(res["vae_decode_profile"])
        print(json.dumps(res["vae_decode_gpu_ms_by_category"]))
    torch.backends.cudnn.benchmark = False
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-sdpa", action="store_true", help="only the cuDNN and decode-profile probes")
    p.add_argument("--norms-only", action="store_true", help="fuse norms / GEGLU only (no block fusion)")
    p.add_argument("--no-subpixel", action="store_true", help="keep interpolate + 3x3 conv upsamplings")
    args = p.parse_args(argv)
    dtype = torch.float16
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_sdpa:
        res["sdpa_ms"] = probe_sdpa(dtype)
    res["norms_only"] = args.norms_only
    res["no_subpixel"] = args.no_subpixel
    res["cudnn"] = probe_cudnn(dtype, args.norms_only, args.no_subpixel)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
