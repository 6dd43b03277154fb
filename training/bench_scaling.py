"""Scaling of the LDM trainer from 1 to N GPUs (DDP and FSDP): throughput, loss trajectories, exact resume.

Every measurement runs the real trainer, ``python -m torch.distributed.run -m ldm_sdk.training.train_ldm``
(the command users run), on precomputed synthetic latents (no first-stage encoding, no data rendering), with
``--log-every 1``: the trainer appends each step's loss and wall time (``s_per_step``, measured between two
log points, every rank synchronised by the log's all-reduce) to its ``metrics.jsonl``, which this script
reads. Default model: the paper's LDM-4 ImageNet model (``--model ldm-cin256``: 401M-parameter UNet, 64 x 64
x 3 latents, class token by cross-attention, ~0.63 TFLOP per sample and training step), bf16 autocast,
per-GPU batch 32, AdamW at lr 1e-4, no EMA (the config's ``use_ema: false``).

1. Weak scaling (same per-GPU batch ``B``): one process at ``B`` (DDP and FSDP do nothing on one process, so
   it is the baseline of both), then N processes with DDP (``find_unused_parameters``, which the trainer
   sets for a jointly trained encoder) and with FSDP (``--fsdp``: FSDP2 per UNet block, bf16 params, fp32
   reduction). Throughput = global batch / mean step time over the steps after ``--warmup``;
   efficiency = throughput(N) / (N * throughput(1)).
2. Same global batch: one process at ``N * B`` against the two N-process runs above (global batch
   ``N * B``): the trainer draws every random number for the global batch and the sampler splits it, so
   the trajectories agree up to rounding. Reported: the max relative loss difference over the steps. The
   bf16 noise scale ``e`` is what bf16 itself changes: the max relative difference of the one-process run
   in bf16 vs the same in fp32; two bf16 runs that are each within ``e`` of that trajectory differ by at
   most ``2 e``, the tolerance (fp32 runs: ``--tolerance``). fp32 runs on CUDA are true fp32
   (``NVIDIA_TF32_OVERRIDE=0``: no TF32 convolutions).
3. Exact resume (``--deterministic``, FSDP on N processes): ``R`` steps uninterrupted vs ``R / 2`` steps, a
   stop, and ``--resume auto`` to ``R``; reported: the max absolute difference of every weight (and of the
   optimizer state and the losses after the resume).
4. (bf16 only) FSDP on N processes in fp32 against the one-process fp32 run: the sharding without FSDP's
   bf16 parameters, whose rounding the bf16 FSDP trajectory also carries.

The runs go one after another in that priority order; ``--budget-s`` stops starting runs that would not
finish in time (they are listed as skipped; results.json is rewritten after every run).

GPU run (2 x H100: 9 launches, about 5-6 minutes; the package runs from the source tree)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \\
    NCCL_NVLS_ENABLE=0 python3 training/bench_scaling.py --out $OUT/scaling

CPU check at tiny size (2 gloo processes, fp32; ``tests/training/test_bench_scaling.py``)::

    python training/bench_scaling.py --device cpu --tiny --out out/scaling-cpu

Writes ``OUT/results.json`` (settings, environment: cards, torch, CUDA, NCCL version and ``NCCL_*``
variables, topology; every run's losses and step times; the analyses), ``OUT/results.md`` (the tables) and
``OUT/runs/NAME/{console.log, train.log, metrics.jsonl}``. Data, checkpoints and the first stage live in a
temporary folder that is removed at the end (``--keep-work`` keeps it). Children inherit the environment
(``PYTHONPATH`` included; the repository root is appended) with ``NCCL_NVLS_ENABLE=0`` forced.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runs from the source tree (the package need not be installed)
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402

# -- options -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """The model and sizes of a benchmark: ``model`` is a ``--model`` spec of the trainer."""

    model: str
    batch: int  # per process
    steps: int
    warmup: int
    resume_steps: int
    precision: Literal["fp32", "bf16"]
    lr: float
    items: int  # latents in the synthetic shard (a multiple of every global batch used)


PRESETS: dict[str, Preset] = {
    # LDM-4 cin256: 401M UNet on 64x64x3 latents, ~20 TFLOP a step at B=32 per GPU; the 1-GPU run at the
    # same global batch (64) needs ~45 (fp32) to ~55 GB (bf16 autocast keeps fp32 and bf16 activations)
    "cin256": Preset("ldm-cin256", 32, 30, 5, 20, "bf16", 1e-4, 384),
    # the tiny class-conditional test model: seconds on a CPU
    "tiny": Preset("tiny:ldm_vq_f4_class", 2, 6, 2, 4, "fp32", 1e-3, 64),
}


class Options(BaseModel):
    """Validated command-line options (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    device: Literal["cuda", "cpu"] = "cuda"
    tiny: bool = False
    nproc: int = Field(2, ge=2, description="processes (GPUs) compared with one")
    batch: int | None = Field(None, ge=1, description="per-process batch (default: the preset's)")
    steps: int | None = Field(None, ge=3)
    warmup: int | None = Field(None, ge=1)
    resume_steps: int | None = Field(None, ge=0, description="0: no resume check; else even, >= 2")
    precision: Literal["fp32", "bf16"] | None = None
    tolerance: float = Field(1e-5, gt=0, description="fp32: max relative loss difference allowed")
    budget_s: float = Field(400.0, gt=0, description="start no run that would end after this")
    run_timeout_s: float = Field(300.0, gt=0)
    keep_work: bool = False

    def preset(self) -> Preset:
        base = PRESETS["tiny" if self.tiny else "cin256"]
        p = Preset(
            model=base.model,
            batch=self.batch or base.batch,
            steps=self.steps or base.steps,
            warmup=self.warmup or base.warmup,
            resume_steps=base.resume_steps if self.resume_steps is None else self.resume_steps,
            precision=self.precision or base.precision,
            lr=base.lr,
            items=base.items,
        )
        if p.warmup >= p.steps - 1:
            raise ValueError(f"--warmup {p.warmup} leaves no timed steps of --steps {p.steps}")
        if p.resume_steps and (p.resume_steps < 2 or p.resume_steps % 2):
            raise ValueError(f"--resume-steps must be 0 or an even number >= 2, got {p.resume_steps}")
        multiple = p.batch * self.nproc
        return replace(p, items=math.ceil(max(p.items, 4 * multiple) / multiple) * multiple)


def parse_options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (results.json, results.md, runs/)")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL, one GPU per process) or cpu (gloo)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (CPU check)")
    parser.add_argument("--nproc", type=int, default=2, help="processes compared with one (default 2)")
    parser.add_argument("--batch", type=int, help="per-process batch (default: 32; tiny 2)")
    parser.add_argument("--steps", type=int, help="steps of each weak / same-batch run (default 30; tiny 6)")
    parser.add_argument("--warmup", type=int, help="first steps left out of the timing (default 5; tiny 2)")
    parser.add_argument("--resume-steps", type=int, help="steps of the resume check (default 20; 0: none)")
    parser.add_argument("--precision", help="bf16 or fp32 (default: bf16; tiny fp32)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="fp32 loss tolerance (relative)")
    parser.add_argument("--budget-s", type=float, default=400.0, help="time budget of all runs (s)")
    parser.add_argument("--run-timeout-s", type=float, default=300.0, help="limit of one run (s)")
    parser.add_argument("--keep-work", action="store_true", help="keep data and checkpoints")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        opts = Options.model_validate(args)
        opts.preset()  # the combined sizes are valid
    except ValidationError as exc:
        parser.error(
            "; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        )
    except ValueError as exc:
        parser.error(str(exc))
    return opts


# -- environment ---------------------------------------------------------------------------------------------
def child_env(device: str) -> dict[str, str]:
    """What every trainer process gets: this environment (PYTHONPATH kept, the repository appended), no
    leftover torchrun variables, NVLink multicast off, a fixed thread count."""
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(Path(p).resolve() == REPO for p in paths):
        paths.append(str(REPO))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["NCCL_NVLS_ENABLE"] = "0"
    env.setdefault("OMP_NUM_THREADS", "4" if device == "cuda" else "1")
    env.setdefault("LDM_SDK_NO_ENTRYPOINTS", "1")
    return env


_PROBE = """
import json, torch
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
     "device_count": torch.cuda.device_count()}
if torch.cuda.is_available():
    d["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    p = torch.cuda.get_device_properties(0)
    d["memory_gb"], d["capability"] = round(p.total_memory / 2**30, 1), f"{p.major}.{p.minor}"
    try:
        d["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:
        d["nccl"] = f"unknown ({exc})"
print(json.dumps(d))
"""


def environment(opts: Options, env: dict[str, str]) -> dict[str, Any]:
    """Cards, versions, NCCL variables, topology (probed in a child process: this one stays off the GPU)."""
    info: dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        probe = subprocess.run(
            [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        info.update(
            json.loads(probe.stdout) if probe.returncode == 0 else {"probe_error": probe.stderr[-2000:]}
        )
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        info["probe_error"] = str(exc)
    info["nccl_env"] = {k: v for k, v in sorted(env.items()) if k.startswith(("NCCL_", "TORCH_NCCL_"))}
    info["omp_num_threads"] = env.get("OMP_NUM_THREADS")
    info["cpu"] = platform.processor() or platform.machine()
    info["cpu_count"] = os.cpu_count()
    if opts.device == "cuda" and shutil.which("nvidia-smi"):
        for key, cmd in (
            ("topology", ["nvidia-smi", "topo", "-m"]),
            ("gpus", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                      "--format=csv"]),
        ):  # fmt: skip
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
                info[key] = out.stdout.strip() or out.stderr.strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                info[key] = f"unavailable: {exc}"
    return info


# -- data: a random first stage and a shard of synthetic latents --------------------------------------------
def prepare_data(preset: Preset, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The first-stage file the trainer needs (never run: the data are latents) and a latent shard in the
    ``ldm_sdk.training.data.latents`` format, checked by reading it back with ``LatentDataset``."""
    from safetensors.torch import save_file

    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.checkpoints.loader import save
    from ldm_sdk.models.configs import ModelConfig
    from ldm_sdk.training.data import latents as fmt
    from ldm_sdk.training.models import model_config

    config = model_config(preset.model)
    assert config.diffusion is not None and config.unet is not None and config.cond_stage is not None
    torch.manual_seed(0)
    first = ModelBundle(ModelConfig(family=f"{config.family}-first-stage", first_stage=config.first_stage))
    first_path = save(first, work / "first_stage.safetensors")
    c, s = config.diffusion.channels, config.diffusion.image_size
    n_classes = int(config.cond_stage.params.get("n_classes", 10))
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(preset.items, c, max(1, s // 8), max(1, s // 8), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    latent = (smooth + 0.1 * torch.randn(preset.items, c, s, s, generator=g)).contiguous()
    labels = torch.arange(preset.items) % n_classes
    scale = float(config.diffusion.scale_factor)
    shard = work / "latents.safetensors"
    metadata = {
        "format": "pt",
        fmt.META + "version": fmt.FORMAT_VERSION,
        fmt.META + "config_hash": fmt.first_stage_config_hash(first),
        fmt.META + "weights_hash": fmt.first_stage_weights_hash(first),
        fmt.META + "scale_factor": repr(scale),
        fmt.META + "family": str(first.family),
        fmt.META + "posterior": "mode",
        fmt.META + "count": str(preset.items),
        fmt.META + "latent_shape": json.dumps([c, s, s]),
        fmt.META + "strings": json.dumps({}),
    }
    save_file({"latent": latent, "class_label": labels}, str(shard), metadata=metadata)
    check = fmt.LatentDataset(shard, config_hash=fmt.first_stage_config_hash(first))
    assert len(check) == preset.items and tuple(check[0]["latent"].shape) == (c, s, s)
    with torch.device("meta"):  # count the UNet's parameters without building it
        unet_params = sum(p.numel() for p in ModelBundle(config).unet.parameters())
    described = {
        "family": config.family,
        "unet_params": unet_params,
        "latent_shape": [c, s, s],
        "items": preset.items,
        "classes": n_classes,
    }
    return first_path, shard, described


# -- runs ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One trainer launch. ``folder``: the trainer's out dir name (the resume run shares its part's)."""

    name: str
    nproc: int
    batch: int
    steps: int
    precision: str
    fsdp: bool = False
    deterministic: bool = False
    save: bool = False
    resume: bool = False
    folder: str = ""
    env: tuple[tuple[str, str], ...] = ()  # extra environment of this run

    @property
    def global_batch(self) -> int:
        return self.nproc * self.batch


def resume_spec(name: str, nproc: int, batch: int, steps: int, precision: str) -> RunSpec:
    """A run of the exact-resume check: FSDP, deterministic kernels, a final checkpoint. ``resume_rest``
    continues ``resume_part`` in its out dir (``--resume auto``)."""
    whole = name == "resume_whole"
    return RunSpec(
        name, nproc, batch, steps, precision, fsdp=True, deterministic=True, save=True,
        resume=name == "resume_rest", folder="resume_whole" if whole else "resume_part",
    )  # fmt: skip


@dataclass
class RunResult:
    spec: RunSpec
    returncode: int | None
    wall_s: float
    metrics: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.metrics)

    def losses(self) -> dict[int, float]:
        return {int(m["step"]): float(m["loss"]) for m in self.metrics}


def trainer_argv(
    spec: RunSpec, preset: Preset, device: str, first: Path, shard: Path, out: Path
) -> list[str]:
    argv = [
        "--model", preset.model, "--first-stage", str(first), "--data", f"latents:{shard}",
        "--batch-size", str(spec.batch), "--max-steps", str(spec.steps), "--precision", spec.precision,
        "--lr", str(preset.lr), "--no-scale-lr", "--seed", "0", "--log-every", "1", "--sample-every", "0",
        "--save-every", "0", "--num-workers", "0", "--device", device, "--out-dir", str(out),
    ]  # fmt: skip
    if spec.fsdp:
        argv.append("--fsdp")
    if spec.deterministic:
        argv.append("--deterministic")
    if not spec.save:
        argv.append("--no-save-final")
    if spec.resume:
        argv += ["--resume", "auto"]
    return argv


def launch(spec: RunSpec, argv: list[str], env: dict[str, str], log_dir: Path, timeout_s: float) -> RunResult:
    """``torchrun --standalone --nproc_per_node=N -m ldm_sdk.training.train_ldm ARGV``; console to a file;
    on timeout the launcher's process group is terminated (then killed)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.nproc}",
        "-m", "ldm_sdk.training.train_ldm", *argv,
    ]  # fmt: skip
    console = log_dir / ("console-resume.log" if spec.resume else "console.log")
    t0 = time.perf_counter()
    with console.open("w", encoding="utf-8") as fh:
        fh.write(" ".join(cmd) + "\n\n")
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            env={**env, **dict(spec.env)},
            cwd=REPO,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
            error = None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, error = None, f"timed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - t0
    out_dir = Path(argv[argv.index("--out-dir") + 1])
    metrics_file = out_dir / "metrics.jsonl"
    metrics = (
        [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
        if metrics_file.is_file()
        else []
    )
    for name in ("train.log", "metrics.jsonl"):
        if (out_dir / name).is_file():
            shutil.copyfile(out_dir / name, log_dir / name)
    if rc not in (0, None):
        error = console.read_text(encoding="utf-8", errors="replace")[-3000:]
    return RunResult(spec, rc, wall, metrics, error)


# -- analysis ------------------------------------------------------------------------------------------------
def timing(run: RunResult, warmup: int) -> dict[str, float] | None:
    """Mean / median step time of the steps after ``warmup`` and the throughput they give."""
    times = [float(m["s_per_step"]) for m in run.metrics if int(m["step"]) > warmup]
    if not times:
        return None
    mean = statistics.fmean(times)
    out = {
        "timed_steps": len(times),
        "step_s_mean": mean,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "samples_per_s": run.spec.global_batch / mean,
    }
    mem = [float(m["max_mem_gb"]) for m in run.metrics if "max_mem_gb" in m]
    if mem:
        out["max_mem_gb"] = max(mem)
    return out


def compare_losses(a: dict[int, float], b: dict[int, float]) -> dict[str, Any] | None:
    """Max relative / absolute difference of two loss trajectories over their common steps."""
    steps = sorted(set(a) & set(b))
    if not steps:
        return None
    rel = [abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in steps]
    return {
        "steps": len(steps),
        "max_rel_diff": max(rel),
        "mean_rel_diff": statistics.fmean(rel),
        "max_abs_diff": max(abs(a[s] - b[s]) for s in steps),
        "rel_diff_by_step": rel,
    }


def _max_diff(a: Any, b: Any, where: str = "") -> tuple[float, int, int]:
    """(max |a - b| over floating tensors, tensors compared, tensors differing) of nested states."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            raise ValueError(f"{where}: shapes differ")
        if not a.is_floating_point():
            return (0.0 if torch.equal(a, b) else math.inf), 1, int(not torch.equal(a, b))
        d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        return d, 1, int(d != 0.0)
    if isinstance(a, dict):
        if a.keys() != b.keys():
            raise ValueError(f"{where}: keys differ: {sorted(set(a) ^ set(b))[:5]}")
        parts = [_max_diff(a[k], b[k], f"{where}/{k}") for k in a]
    elif isinstance(a, list | tuple):
        parts = [_max_diff(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))]
    else:
        return (0.0 if a == b else math.inf), 0, 0
    return max((p[0] for p in parts), default=0.0), sum(p[1] for p in parts), sum(p[2] for p in parts)


def compare_resume(whole: Path, resumed: Path) -> dict[str, Any]:
    from ldm_sdk.training.checkpointing import load_training_checkpoint

    a, b = load_training_checkpoint(whole), load_training_checkpoint(resumed)
    weights, compared, differing = _max_diff(a.state_dict, b.state_dict)
    optim, _, optim_differing = _max_diff(a.optimizers, b.optimizers)
    return {
        "global_step": [a.global_step, b.global_step],
        "max_weight_abs_diff": weights,
        "tensors_compared": compared,
        "tensors_differing": differing,
        "max_optimizer_abs_diff": optim,
        "optimizer_tensors_differing": optim_differing,
        "bit_exact": weights == 0.0 and optim == 0.0 and a.global_step == b.global_step,
    }


def weak_scaling(runs: dict[str, RunResult], n: int, warmup: int) -> dict[str, Any]:
    """Throughput and efficiency of the one-process run and the n-process DDP and FSDP runs."""
    base = timing(runs["single"], warmup) if "single" in runs else None
    rows: dict[str, dict[str, Any]] = {}
    for name in ("single", f"ddp{n}", f"fsdp{n}"):
        if name not in runs:
            continue
        t, spec = timing(runs[name], warmup), runs[name].spec
        rows[name] = {"nproc": spec.nproc, "global_batch": spec.global_batch}
        if t:
            rows[name].update(
                samples_per_s=t["samples_per_s"],
                step_ms_mean=1e3 * t["step_s_mean"],
                step_ms_median=1e3 * t["step_s_median"],
                max_mem_gb=t.get("max_mem_gb"),
                efficiency=t["samples_per_s"] / (spec.nproc * base["samples_per_s"]) if base else None,
            )
    return {
        "definition": "throughput(N) / (N * throughput(1)), same per-process batch; throughput = global "
        "batch / mean step time after the warm-up steps",
        "rows": rows,
        "ddp": rows.get(f"ddp{n}", {}).get("efficiency"),
        "fsdp": rows.get(f"fsdp{n}", {}).get("efficiency"),
    }


def same_global_batch(
    runs: dict[str, RunResult], n: int, batch: int, precision: str, tolerance: float
) -> dict[str, Any]:
    """The n-process loss trajectories against one process at the same global batch. Tolerance: fp32 runs
    ``tolerance``; bf16 runs twice the bf16-vs-fp32 difference of the one-process run (module docstring)."""
    out: dict[str, Any] = {"global_batch": n * batch, "comparisons": {}, "fp32_tolerance": tolerance}
    ref, fp32 = runs.get("single_global"), runs.get("single_global_fp32")
    bf16_tolerance = None
    if precision == "bf16" and ref is not None and ref.ok and fp32 is not None and fp32.ok:
        noise = compare_losses(ref.losses(), fp32.losses())
        out["bf16_noise"] = noise
        bf16_tolerance = 2 * noise["max_rel_diff"] if noise else None
        out["bf16_tolerance"] = bf16_tolerance
    pairs = [
        (f"ddp{n}", "single_global"),
        (f"fsdp{n}", "single_global"),
        (f"fsdp{n}_fp32", "single_global_fp32"),
    ]
    if precision == "bf16":  # how far each bf16 recipe is from fp32 (no verdict: for reading the above)
        pairs += [(f"ddp{n}", "single_global_fp32"), (f"fsdp{n}", "single_global_fp32")]
    for name, reference in pairs:
        a, b = runs.get(name), runs.get(reference)
        if a is None or b is None or not a.ok or not b.ok:
            continue
        c = compare_losses(a.losses(), b.losses())
        if c is None:
            continue
        informational = a.spec.precision != b.spec.precision
        c["tolerance"] = (
            None if informational else tolerance if a.spec.precision == "fp32" else bf16_tolerance
        )
        c["within"] = c["max_rel_diff"] <= c["tolerance"] if c["tolerance"] is not None else None
        out["comparisons"][f"{name} vs {reference}"] = c
        if not informational:
            out[name] = c
    if not out["comparisons"]:
        out["error"] = "no pair of runs to compare (failed or skipped)"
    return out


def resume_check(runs: dict[str, RunResult], folders: Path, steps: int, n: int) -> dict[str, Any]:
    """Weights, optimizer state and losses of the uninterrupted run vs the stopped-and-resumed one."""
    out: dict[str, Any] = {"steps": steps, "split": steps // 2, "nproc": n}
    whole, rest = runs.get("resume_whole"), runs.get("resume_rest")
    if not (whole and whole.ok and rest and rest.ok):
        failed = [r for r in (whole, runs.get("resume_part"), rest) if r is not None and not r.ok]
        out["error"] = (failed[0].error or "failed") if failed else "skipped (time budget)"
        return out
    try:
        out.update(
            compare_resume(folders / "resume_whole" / "last.ckpt", folders / "resume_part" / "last.ckpt")
        )
    except (ValueError, OSError) as exc:
        out["error"] = str(exc)
        return out
    after = {k: v for k, v in rest.losses().items() if k > steps // 2}
    c = compare_losses(after, whole.losses())
    out["loss_max_abs_diff_after_resume"] = c["max_abs_diff"] if c else None
    return out


# -- report --------------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def _last_error(text: str | None) -> str:
    """What went wrong, from a console tail: the last Python exception line other than torchrun's own."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    raised = [
        line
        for line in lines
        if re.match(r"^[\w.]*(Error|Exception)\b.*:", line) and "ChildFailedError" not in line
    ]
    return (raised or lines or ["?"])[-1][:300]


def markdown(results: dict[str, Any]) -> str:
    s, env = results["settings"], results["environment"]
    cards = ", ".join(env.get("devices", [])) or env.get("cpu", "cpu")
    lines = [
        "# LDM trainer scaling: 1 vs {n} processes".format(n=s["nproc"]),
        "",
        f"{s['family']} (`--model {s['model']}`), latents {s['latent_shape']}, {s['precision']}, "
        f"per-process batch {s['batch']}, {s['steps']} steps ({s['warmup']} warm-up steps not timed), "
        f"device {s['device']}: {cards}. torch {env.get('torch')}, CUDA {env.get('cuda')}, NCCL "
        f"{env.get('nccl', '-')}, NCCL env {env.get('nccl_env')}.",
        "",
        "## Weak scaling (same per-GPU batch)",
        "",
        "| run | processes | global batch | step ms (mean / median) | samples/s | efficiency | peak GB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in results["weak_scaling"]["rows"].items():
        lines.append(
            f"| {name} | {row['nproc']} | {row['global_batch']} | {_fmt(row.get('step_ms_mean'), '.1f')} / "
            f"{_fmt(row.get('step_ms_median'), '.1f')} | {_fmt(row.get('samples_per_s'), '.1f')} | "
            f"{_fmt(row.get('efficiency'), '.1%')} | {_fmt(row.get('max_mem_gb'), '.1f')} |"
        )
    g = results["same_global_batch"]
    noise = g.get("bf16_noise")
    lines += [
        "",
        f"## Same global batch ({g['global_batch']}): loss trajectories vs one process",
        "",
        "Tolerance: fp32 runs a fixed one; bf16 runs 2 x the bf16 noise, i.e. the max relative loss "
        "difference of the one-process run in bf16 vs fp32"
        + (f" ({noise['max_rel_diff']:.3g})." if noise else " (not measured)."),
        "",
        "| comparison | steps | max rel. diff | mean rel. diff | max abs. diff | tolerance | within |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, c in g["comparisons"].items():
        lines.append(
            f"| {name} | {c['steps']} | {c['max_rel_diff']:.3g} | {c['mean_rel_diff']:.3g} | "
            f"{c['max_abs_diff']:.3g} | {_fmt(c['tolerance'])} | {_fmt(c['within'], '')} |"
        )
    if s["precision"] == "bf16":
        lines += [
            "",
            "FSDP in bf16 computes with bf16 parameters (`MixedPrecisionPolicy(param_dtype=bf16, "
            "reduce_dtype=fp32)`: norm layers and gradients rounded to bf16 too), the one-process reference "
            "with fp32 weights under autocast: its trajectory carries that recipe's rounding as well. The "
            "fp32 pair (no TF32: `NVIDIA_TF32_OVERRIDE=0`) compares the sharding alone; the rows without a "
            "tolerance say how far each bf16 recipe is from the fp32 trajectory.",
        ]
    r = results.get("resume")
    lines += ["", "## FSDP exact resume (`--deterministic`)", ""]
    if r and "max_weight_abs_diff" in r:
        lines.append(
            f"{r['steps']} steps vs {r['split']} + resume to {r['steps']} on {s['nproc']} processes: "
            f"max weight difference {r['max_weight_abs_diff']:.3g} ({r['tensors_differing']} of "
            f"{r['tensors_compared']} tensors differ), optimizer state {r['max_optimizer_abs_diff']:.3g}, "
            f"losses after the resume {_fmt(r.get('loss_max_abs_diff_after_resume'))}; "
            f"bit exact: {r['bit_exact']}."
        )
    else:
        lines.append(f"not measured: {_last_error(r.get('error')) if r else 'disabled (--resume-steps 0)'}")
    if results["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(results['skipped'])}."]
    failed = {n: run["error"] for n, run in results["runs"].items() if run.get("error")}
    if failed:
        lines += [
            "",
            "Failed runs (console.log has the rest): "
            + "; ".join(f"{n}: {_last_error(e)}" for n, e in failed.items()),
        ]
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    opts = parse_options(argv)
    opts.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    try:
        return bench(opts, work)
    finally:
        if not opts.keep_work:  # latents, first stage, checkpoints (GBs at full size)
            shutil.rmtree(work, ignore_errors=True)


def bench(opts: Options, work: Path) -> int:
    """Every run in order, then the analyses and the report (module docstring); 0 when the baseline ran."""
    preset = opts.preset()
    started = time.perf_counter()
    out = opts.out
    env = child_env(opts.device)
    n, b = opts.nproc, preset.batch
    print(
        f"bench_scaling: {preset.model}, batch {b}/process, {preset.steps} steps, {opts.device}; work {work}",
        flush=True,
    )

    results: dict[str, Any] = {"command": [sys.executable, *sys.argv], "skipped": [], "runs": {}}
    results["environment"] = environment(opts, env)
    first, shard, data = prepare_data(preset, work)
    results["settings"] = {
        "model": preset.model, "device": opts.device, "nproc": n, "batch": b, "steps": preset.steps,
        "warmup": preset.warmup, "precision": preset.precision, "lr": preset.lr,
        "resume_steps": preset.resume_steps, "tolerance": opts.tolerance, "budget_s": opts.budget_s, **data,
    }  # fmt: skip
    runs: dict[str, RunResult] = {}

    def save_results() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")

    def run(spec: RunSpec, budget_runs: int = 1) -> RunResult | None:
        """Launch ``spec`` unless the budget cannot hold ``budget_runs`` more runs like the longest so far."""
        longest = max((r.wall_s for r in runs.values()), default=60.0)
        if time.perf_counter() - started + budget_runs * longest * 1.2 > opts.budget_s:
            results["skipped"].append(spec.name)
            print(f"  skip {spec.name}: not enough of --budget-s {opts.budget_s:.0f} left", flush=True)
            return None
        folder = work / "runs" / (spec.folder or spec.name)
        argv = trainer_argv(spec, preset, opts.device, first, shard, folder)
        result = launch(spec, argv, env, out / "runs" / (spec.folder or spec.name), opts.run_timeout_s)
        runs[spec.name] = result
        t = timing(result, preset.warmup)
        results["runs"][spec.name] = {
            **{k: v for k, v in spec.__dict__.items() if k not in ("folder", "env")},
            "env": dict(spec.env),
            "global_batch": spec.global_batch,
            "trainer_argv": argv,
            "returncode": result.returncode,
            "wall_s": result.wall_s,
            "losses": [float(m["loss"]) for m in result.metrics],
            "step_s": [float(m["s_per_step"]) for m in result.metrics],
            "timing": t,
            "error": result.error,
        }
        speed = f"{t['samples_per_s']:.1f} samples/s" if t else "no timing"
        print(f"  {spec.name}: rc {result.returncode}, {result.wall_s:.0f} s wall, {speed}", flush=True)
        save_results()
        return result

    p = preset.precision
    # fp32 references: true fp32 on CUDA (cuDNN / cuBLAS would use TF32 for convolutions by default)
    fp32_env = (("NVIDIA_TF32_OVERRIDE", "0"),) if opts.device == "cuda" else ()
    # 1. weak scaling: the same per-process batch on 1 and n processes
    run(RunSpec("single", 1, b, preset.steps, p))
    run(RunSpec(f"ddp{n}", n, b, preset.steps, p))
    run(RunSpec(f"fsdp{n}", n, b, preset.steps, p, fsdp=True))
    # 2. the same global batch on one process (+ fp32: the bf16 noise scale)
    run(RunSpec("single_global", 1, n * b, preset.steps, p))
    if p == "bf16":
        run(RunSpec("single_global_fp32", 1, n * b, preset.steps, "fp32", env=fp32_env))
    # 3. FSDP exact resume, deterministic kernels
    r_steps = preset.resume_steps
    if r_steps and run(resume_spec("resume_whole", n, b, r_steps, p), budget_runs=3):
        part = run(resume_spec("resume_part", n, b, r_steps // 2, p), budget_runs=2)
        if part is not None and part.ok:
            run(resume_spec("resume_rest", n, b, r_steps, p))
    # 4. (bf16 only) FSDP in fp32 against the fp32 reference: the sharding without FSDP's bf16 parameters
    if p == "bf16":
        run(RunSpec(f"fsdp{n}_fp32", n, b, preset.steps, "fp32", fsdp=True, env=fp32_env))

    # -- analyses --------------------------------------------------------------------------------------------
    results["weak_scaling"] = weak_scaling(runs, n, preset.warmup)
    results["same_global_batch"] = same_global_batch(runs, n, b, p, opts.tolerance)
    if r_steps:
        results["resume"] = resume_check(runs, work / "runs", r_steps, n)
    save_results()
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    print((out / "results.md").read_text(encoding="utf-8"), flush=True)
    return 0 if runs.get("single") and runs["single"].ok else 1


if __name__ == "__main__":
    sys.exit(main())
