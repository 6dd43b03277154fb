"""A first image must not pay for imports it does not need. Some torch entry points (``normal_`` or
``arange`` on the meta device, ``torch.broadcast_shapes``) run torch's reference implementations, whose
first use imports sympy or torch's compiler stack: 3-12 s of a first image on the H100 machine
(``bench/profile_tasks.py --pyprofile``, docs/performance-log.md). A fresh process runs the tasks' first runs
here and checks that none of those modules was imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.tasks.tiny_models import save_tiny

HEAVY = ("sympy", "torch._dynamo", "transformers")


def test_first_runs_import_no_compiler_stack(tmp_path: Path) -> None:
    model = save_tiny("uncond", tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from ldm_sdk.runtime import Runtime
        from ldm_sdk.tasks import get_task
        from ldm_sdk.tasks.base import Img2ImgRequest, InpaintRequest, TaskInputs, UncondRequest

        image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.float32)
        mask[10:40, 20:50] = 1
        inputs = TaskInputs(image=image, mask=mask)
        model, fields = {str(model)!r}, {{"steps": 2, "seed": 1}}
        with Runtime.create(load_entrypoints=False, device="cpu", capture_mode="emulate") as runtime:
            get_task("uncond")(UncondRequest(model=model, **fields), runtime)
            get_task("inpaint")(InpaintRequest(model=model, feather=2.0, **fields), runtime, inputs=inputs)
            get_task("img2img")(Img2ImgRequest(model=model, **fields), runtime, inputs=inputs)
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        print("imported:", loaded)
        sys.exit(1 if loaded else 0)
        """
    )
    env = {**os.environ, "LDM_SDK_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
