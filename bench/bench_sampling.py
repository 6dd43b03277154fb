"""Sampling benchmark: ldm_sdk against diffusers on identical random weights, in one run.

The code is :mod:`ldm_sdk.benchmarks.sampling` (also ``ldm-sdk bench``); this script runs it from a source
checkout without installing the package:

    python bench/bench_sampling.py --device cuda --dtype fp16 --out results.json   # the real SD-1.5 size
    python bench/bench_sampling.py --fast                                          # ours on its fast path
    python bench/bench_sampling.py --cpu-compare --size ci --out bench/results/cpu_DATE.json   # CPU mode
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm_sdk.benchmarks.sampling import main

if __name__ == "__main__":
    main()
