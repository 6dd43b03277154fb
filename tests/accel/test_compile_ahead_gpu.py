"""Background compilation on the GPU (``ldm_sdk.accel.compile_ahead``, mark ``gpu``).

In a fresh process with an empty Triton cache: the SD-1.5 kl-f8 decoder (random weights, fp16, the fast
path) behind a ``CapturedModel``; ``compile_ahead`` starts worker processes for its variants and returns;
after waiting, this process's own compiler is made to fail (``ASTSource.make_ir`` raises), so the capture's
pre-compilation and the warm-up can only *load* kernels: the workers must have compiled every variant the
decode needs, for this GPU. The replayed decode then equals the eager decode of the unprepared decoder to
half-precision rounding, and the report says the variants were compiled in workers, none failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

CHECK = r"""
import copy, json, sys
import torch
import triton.compiler.compiler as cc
from ldm_sdk.accel import CapturedModel
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks.common import ARCHS
from ldm_sdk.diffusion.conditioning import Conditioning
sys.path.insert(0, sys.argv[1])
from validate_fast_path import build_sd15

torch.manual_seed(0)
_, vae = build_sd15(ARCHS["sd15"], torch.device("cuda"), torch.float16, 0)
reference = copy.deepcopy(vae)
prepare_cuda_inference(vae)
g = torch.Generator(device="cuda").manual_seed(3)
z = torch.randn(1, 4, 40, 48, generator=g, device="cuda").half()
decoder = CapturedModel(lambda z, t, c: vae.decode(z), mode="graph", modules=[vae])
with torch.inference_mode():
    started = decoder.compile_ahead(z, z.new_zeros(1), Conditioning())
pending = next(iter(decoder.pending_compiles.values()))
report = pending.wait(timeout=300)

def no_compile(*args, **kwargs):
    raise AssertionError("this process compiled a kernel the workers should have compiled")

cc.ASTSource.make_ir = no_compile
with torch.inference_mode():
    out = decoder(z, z.new_zeros(1), Conditioning())
    ref = reference.float().decode(z.float())
err = float((out.float() - ref).abs().max() / ref.abs().max())
print(json.dumps({
    "started": started, "sent": report.sent, "compiled": report.compiled, "failed": report.failed,
    "errors": pending.errors[:1], "compiled_ahead": decoder.stats.compiled_ahead, "rel_err": err,
    "precompiled": decoder.stats.precompiled, "processes": report.processes, "wall_s": report.wall_s,
}))
"""


@pytest.mark.gpu
def test_decoder_compiled_ahead_in_workers_loads_without_compiling(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    env = {
        **os.environ,
        "TRITON_CACHE_DIR": str(tmp_path / "triton"),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHECK, str(ROOT / "bench")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["started"] is True
    assert result["sent"] > 0 and result["failed"] == 0, result["errors"]
    assert result["compiled"] == result["sent"] == result["compiled_ahead"]
    assert result["precompiled"] >= result["sent"]  # the capture's own pass found them (and loaded them)
    assert result["rel_err"] < 1e-2
