"""GPU memory the tasks' captured first-stage graphs keep: the reserved CUDA memory, with the allocator's
free cached blocks returned first (``empty_cache``; a graph's private pool stays while the graph lives),
after loading, after a txt2img (the UNet's and the decoder's graphs), after an eager img2img and after an
img2img through the captured encoder (its graph at the same size), in one process.

    python bench/first_stage_graph_memory.py --random-model sd15 --out first_stage_memory.json   # CUDA
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch


def main(argv: list[str] | None = None) -> None:
    from ldm_sdk.benchmarks.random_models import RANDOM_MODELS, random_model_file
    from ldm_sdk.benchmarks.tasks import smooth_image
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.tasks import get_task
    from ldm_sdk.tasks.base import Img2ImgRequest, TaskInputs, Txt2ImgRequest
    from ldm_sdk.tasks.context import CAPTURED_DECODER, CAPTURED_ENCODER, default_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS), default="sd15")
    parser.add_argument("--random-dir")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")

    def mib(n: int) -> float:
        return round(n / 2**20, 1)

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with contextlib.ExitStack() as stack:
        folder = args.random_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="ldm-sdk-"))
        model = str(random_model_file(args.random_model, folder, seed=0))
        runtime = stack.enter_context(Runtime.create(device="cuda", dtype=args.dtype))
        bundle = runtime.load_model(model)
        height, width = default_size(bundle)
        fields = {"model": model, "prompt": "a boat", "steps": args.steps, "seed": 0}
        image = TaskInputs(image=smooth_image(height, width))

        def reserved() -> float:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            return mib(torch.cuda.memory_reserved())

        report["loaded_reserved_mib"] = reserved()
        get_task("txt2img")(Txt2ImgRequest(**fields, width=width, height=height), runtime)
        report["after_txt2img_reserved_mib"] = reserved()
        eager = Img2ImgRequest(**fields, accelerate=False)
        get_task("img2img")(eager, runtime, inputs=image)
        report["after_eager_img2img_reserved_mib"] = reserved()
        get_task("img2img")(Img2ImgRequest(**fields), runtime, inputs=image)
        report["after_img2img_reserved_mib"] = reserved()
        attachments = runtime.cache.attachments(bundle)
        report["encoder_captures"] = attachments[CAPTURED_ENCODER].stats.captures
        report["decoder_captures"] = attachments[CAPTURED_DECODER].stats.captures
        report["size"] = [height, width]
    report["encoder_graph_mib"] = round(
        report["after_img2img_reserved_mib"] - report["after_eager_img2img_reserved_mib"], 1
    )
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
