"""The kl-f8 decoder's sub-pixel phase convolutions (2x2, padding 1, 4 C_out outputs, channels_last phase
kernels as ``ldm_sdk.accel.subpixel`` forms them; also with the same kernels in NCHW strides, as the torch
form left them) on cuDNN against the same product as one cuBLAS GEMM over a 2x2 im2col matrix (the GEMM
alone, and the im2col built with torch ops). Microseconds per call from CUDA
graphs of 10 calls; ``rel_err_vs_cudnn``: max |GEMM - cuDNN| / max |cuDNN|.

    python bench/probe_subpixel_gemm.py --out probe.json        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from op_roofline import graph_us

from ldm_sdk.accel.subpixel import _phase_kernels_triton


def im2col2(x: torch.Tensor) -> torch.Tensor:
    """``((h + 1) (w + 1) n, 4 C)`` tap-major rows of the 2x2 windows of ``x`` padded by 1."""
    n, c, h, w = x.shape
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (n, h+2, w+2, c)
    taps = [xp[:, dy : dy + h + 1, dx : dx + w + 1, :] for dy in range(2) for dx in range(2)]
    return torch.stack(taps, dim=3).reshape(n * (h + 1) * (w + 1), 4 * c)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__} | probe()
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


def probe() -> dict[str, dict[str, float]]:
    res = {}
    g = torch.Generator("cuda").manual_seed(0)
    with torch.inference_mode():
        for c, cout, hw in ((512, 512, 64), (512, 512, 128), (256, 256, 256)):
            x = (
                torch.randn(1, c, hw, hw, generator=g, device="cuda")
                .half()
                .contiguous(memory_format=torch.channels_last)
            )
            w = (
                (torch.randn(cout, c, 3, 3, generator=g, device="cuda") / (3 * c**0.5))
                .half()
                .contiguous(memory_format=torch.channels_last)
            )
            k = _phase_kernels_triton(w, None)  # (4 cout, c, 2, 2) channels_last
            wm = k.permute(0, 2, 3, 1).reshape(4 * cout, 4 * c).t()  # (4c tap-major, 4 cout), a view
            ref = F.conv2d(x, k, None, padding=1)
            cols = im2col2(x)
            out = (cols @ wm).view(1, hw + 1, hw + 1, 4 * cout).permute(0, 3, 1, 2)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            k_nchw = k.contiguous()  # the layout the torch-formed phase kernels had
            row = {
                "cudnn_us": graph_us(lambda x=x, k=k: F.conv2d(x, k, None, padding=1), 10, 20),
                "cudnn_nchw_kernels_us": graph_us(
                    lambda x=x, k=k_nchw: F.conv2d(x, k, None, padding=1), 10, 20
                ),
                "gemm_only_us": graph_us(lambda a=cols, b=wm: torch.mm(a, b), 10, 20),
                "im2col_torch_us": graph_us(lambda x=x: im2col2(x), 10, 20),
                "rel_err_vs_cudnn": err,
            }
            res[f"{c}->{cout} @{hw}"] = row
            print(f"{c}->{cout} @{hw}", json.dumps(row), flush=True)
    return res


if __name__ == "__main__":
    main()
