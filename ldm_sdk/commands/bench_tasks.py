"""``ldm-sdk bench-tasks --model CKPT``: how long each editing task the model supports takes on this machine
(:mod:`ldm_sdk.benchmarks.tasks`).

The options are parsed here without importing torch (``ldm-sdk --help`` builds every command's parser);
``bench/bench_tasks.py`` runs the same command from a source checkout.
"""

from __future__ import annotations

import argparse

HELP = "time every editing task a model supports, end to end through the task API (CPU, or CUDA)"


def parse_size(text: str) -> tuple[int, int]:
    """``--size`` as ``(height, width)``: ``N`` (square) or ``WxH`` pixels, both positive."""
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give N (square) or WxH in pixels, e.g. 512 or 768x512")
    width, height = values[0], values[-1]
    return height, width


def parse_tasks(text: str) -> tuple[str, ...]:
    """``--tasks`` as task names: comma-separated, blanks dropped, order kept, repeats removed."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give task names separated by commas, e.g. txt2img,inpaint")
    return tuple(dict.fromkeys(names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ldm-sdk bench-tasks`` and ``bench/bench_tasks.py``."""
    parser.add_argument(
        "--model",
        metavar="CKPT",
        help="checkpoint file (.safetensors/.ckpt) or diffusers folder (default: the built-in default model)",
    )
    parser.add_argument(
        "--config", metavar="YAML", help="the checkpoint's original YAML config (default: detect)"
    )
    parser.add_argument(
        "--random-model",
        choices=("sd15", "sd15-ci"),
        help="instead of --model: a known architecture with random weights (timings depend on the "
        "architecture, not the weights): sd15 = Stable Diffusion 1.x at 512 px; sd15-ci = SD 1.x shrunk to "
        "the CI size, 256 px",
    )
    parser.add_argument(
        "--random-dir",
        metavar="DIR",
        help="keep the --random-model file here and reuse it next time (default: a temporary folder)",
    )
    parser.add_argument(
        "--tasks",
        type=parse_tasks,
        metavar="A,B",
        help="the tasks to time, comma-separated (default: every task the model supports)",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        metavar="N|WxH",
        help="image size in pixels, a multiple of the model's size multiple (default: the model's own "
        "size); outpaint adds one size multiple on the right, upscale makes this size from a low-res image",
    )
    parser.add_argument("--steps", type=int, help="sampling steps per run (default 10 on cpu, 50 on cuda)")
    parser.add_argument(
        "--repeats", type=int, help="timed runs per task after the first (default 3 on cpu, 5 on cuda)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the seed of every run (default 0)")
    parser.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    parser.add_argument(
        "--together",
        action="store_true",
        help="sample each run's batch together (batch_mode 'together'; default: item by item)",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), help="compute dtype (default: per device)"
    )
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument(
        "--no-accelerate",
        dest="accelerate",
        action="store_false",
        help="on CUDA, run the network eagerly instead of replaying CUDA graphs (to compare the two)",
    )
    parser.add_argument(
        "--no-prompt-cache",
        dest="prompt_cache",
        action="store_false",
        help="encode the prompt in every run (default: warm runs reuse its encoding, as repeated prompts do)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", metavar="FILE", help="write everything measured as JSON here")


def run(args: argparse.Namespace) -> int:
    from ldm_sdk.benchmarks import tasks

    tasks.run(tasks.BenchOptions.from_args(args))
    return 0
