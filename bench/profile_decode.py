"""Where the kl-f8 decode of a 512 px image spends its GPU time: the decoder prepared and replayed from a
``CapturedModel`` graph as the runtime runs it, five replays under ``torch.profiler``; GPU time per decode
by kernel (calls per decode, microseconds), busy time and the gaps between kernels.

    python bench/profile_decode.py bench/results/profile_decode_session8_h100.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ldm_sdk.accel.graphs import CapturedModel
from ldm_sdk.accel.prepare import prepare_cuda_inference
from ldm_sdk.benchmarks import common as C
from ldm_sdk.diffusion.conditioning import Conditioning


def main() -> None:
    dev = torch.device("cuda")
    eng, _ = C.build_ours(C.ARCHS["sd15"], dev, torch.float16, 0)
    vae = eng.vae.to(memory_format=torch.channels_last)
    prepare_cuda_inference(vae)
    decode = CapturedModel(lambda z, t, c: vae.decode(z), modules=[vae])
    g = torch.Generator(dev).manual_seed(0)
    z = torch.randn(1, 4, 64, 64, generator=g, device=dev).half()
    with torch.inference_mode():
        decode(z, z.new_zeros(1), Conditioning())
        graph = next(iter(decode._captures.values())).graph
        ms = C.median(C.time_calls(graph.replay, dev, warmup=5, iters=50)) * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graph.replay()
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    rows = {}
    for s, t, name in spans:
        r = rows.setdefault(name[:90], [0, 0.0])
        r[0] += 1
        r[1] += t - s
    gaps = sum(max(0, spans[i + 1][0] - spans[i][1]) for i in range(len(spans) - 1)) / 5
    res = {
        "decode_ms": ms,
        "busy_ms": sum(r[1] for r in rows.values()) / 5 / 1e3,
        "gaps_ms_per_decode_incl_between_replays": gaps / 1e3,
        "kernels": sorted(([k, v[0] // 5, round(v[1] / 5, 1)] for k, v in rows.items()), key=lambda r: -r[2]),
    }
    print(json.dumps({k: v for k, v in res.items() if k != "kernels"}))
    for r in res["kernels"][:45]:
        print(r)
    Path(sys.argv[1]).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
