"""Task-timing benchmark: every editing task a model supports, timed end to end through the task API.

The code is :mod:`ldm_sdk.benchmarks.tasks` (also ``ldm-sdk bench-tasks``); this script runs it from a source
checkout without installing the package:

    python bench/bench_tasks.py --model CKPT                                  # CPU: 10 steps, 3 warm runs
    python bench/bench_tasks.py --model CKPT --tasks txt2img,inpaint --size 512 --out bt.json
    python bench/bench_tasks.py --model CKPT --device cuda                    # 50 steps, 5 warm runs
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sdk.benchmarks.tasks import main

if __name__ == "__main__":
    main()
