"""One sampling run, the way every task does it: :func:`run_sampling`.

The request picks the sampler (a name in the runtime's sampler registry) and its timesteps:

- ``ddim`` / ``plms`` (and samplers from plugins): CompVis ``make_ddim_timesteps`` ("uniform"; "quad" on
  request) -- note that uniform spacing may give one step more than asked (CompVis behaviour);
- ``dpmpp_2m``: Karras sigmas by default; ``euler_ancestral``: diffusers' linspace by default;
  ``spacing`` overrides (uniform, quad, linspace, karras);
- ``ddpm``: every one of the model's timesteps (``steps`` unset or equal to that number).

The denoiser is built outward: the bundle's :class:`~ldm_sdk.diffusion.denoiser.ModelDenoiser` (raw UNet
output as eps / x0), classifier-free guidance around the network when ``guidance != 1``, then a
:class:`~ldm_sdk.diffusion.masking.MaskedDenoiser` when known latents are kept (``mask == 1`` keeps ``x0``).
With a ``captured`` model (CUDA, ``request.accelerate``) the network call inside it -- the guidance-batched
``[uncond; cond]`` pass -- is replayed from a CUDA graph (:mod:`ldm_sdk.accel.graphs`): the same result,
faster.
All randomness comes from the one ``generator``: the starting noise first, then the sampler's and the
mask's noise in the order they ask for it. A batch sampled together (``batch_mode="together"``) passes
:class:`~ldm_sdk.diffusion.noise.ItemGenerators`, one generator per item: each item then draws the numbers
its own single run draws.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ldm_sdk.tasks.base import TaskError, TaskRequest

if TYPE_CHECKING:
    from ldm_sdk.accel.graphs import CapturedModel
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.diffusion.conditioning import Conditioning
    from ldm_sdk.diffusion.denoiser import Denoiser
    from ldm_sdk.diffusion.noise import RandomSource
    from ldm_sdk.diffusion.schedule import DiffusionSchedule
    from ldm_sdk.samplers.base import StepCallback, StepInfo

__all__ = [
    "DEFAULT_SPACING",
    "DEFAULT_STEPS",
    "SamplingPlan",
    "batch_callback",
    "plan_sampling",
    "run_sampling",
    "sampler_function",
    "supports_item_generators",
]

DEFAULT_STEPS = 50
#: sampler -> timestep spacing when the request leaves ``spacing`` unset (others: "uniform")
DEFAULT_SPACING: dict[str, str] = {"dpmpp_2m": "karras", "euler_ancestral": "linspace"}


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """The resolved sampler settings of a request: ``timesteps`` (descending), ``spacing``, ``eta``."""

    sampler: str
    timesteps: Tensor
    spacing: str
    eta: float | None

    @property
    def steps(self) -> int:
        return int(self.timesteps.numel())


def sampler_function(name: str, samplers: Mapping[str, Any] | Any | None = None) -> Callable[..., Tensor]:
    """The sampler called ``name``: from ``samplers`` (a runtime's sampler registry or a dict), else the
    built-ins. An unknown name is a :class:`TaskError` listing the known ones."""
    if samplers is None:
        from ldm_sdk.samplers import SAMPLERS

        samplers = SAMPLERS
    if hasattr(samplers, "get") and hasattr(samplers, "names"):  # a Registry
        from ldm_sdk.registry import UnknownNameError

        try:
            return samplers.get(name)  # type: ignore[no-any-return]
        except UnknownNameError as exc:
            raise TaskError(str(exc)) from None
    if name not in samplers:
        raise TaskError(f"unknown sampler {name!r}; known: {', '.join(sorted(samplers))}")
    return samplers[name]  # type: ignore[no-any-return]


def supports_item_generators(sample: Callable[..., Any]) -> bool:
    """Whether sampler function ``sample`` draws its noise per batch item from
    :class:`~ldm_sdk.diffusion.noise.ItemGenerators`: the built-in samplers do (they draw through
    :func:`~ldm_sdk.samplers.base.randn_like_state`); a plugin's sampler that does too says so with the
    attribute ``sample.item_generators = True``."""
    from ldm_sdk.samplers import SAMPLERS

    builtin = any(sample is function for function in SAMPLERS.values())
    return builtin or bool(getattr(sample, "item_generators", False))


def plan_sampling(request: TaskRequest, schedule: DiffusionSchedule) -> SamplingPlan:
    """Timesteps, spacing and eta for ``request`` on a model with ``schedule``."""
    from ldm_sdk.samplers.base import ddim_timesteps, karras_timesteps, linspace_timesteps

    name = request.sampler
    T = schedule.num_timesteps
    if name == "ddpm":
        if request.steps not in (None, T):
            raise TaskError(
                f"the ddpm sampler runs every one of this model's {T} timesteps: leave steps unset or pass "
                f"{T}; for fewer steps use ddim with eta=1 (the same posterior variance)"
            )
        if request.spacing is not None:
            raise TaskError("the ddpm sampler takes no spacing (it runs every timestep); leave it unset")
        return SamplingPlan(name, torch.arange(T - 1, -1, -1, dtype=torch.float64), "all", request.eta)
    steps = request.steps or DEFAULT_STEPS
    if steps > T:
        raise TaskError(f"steps must be at most the model's {T} timesteps, got {steps}")
    spacing = request.spacing or DEFAULT_SPACING.get(name, "uniform")
    if spacing in ("uniform", "quad"):
        ts = ddim_timesteps(steps, T, method=spacing)  # type: ignore[arg-type]
    elif spacing == "linspace":
        ts = linspace_timesteps(steps, T, include_zero=name != "dpmpp_2m")
    else:
        ts = karras_timesteps(schedule, steps)
    return SamplingPlan(name, ts, spacing, request.eta)


def batch_callback(callback: StepCallback | None, item: int, items: int) -> StepCallback | None:
    """``callback`` with steps counted over a batch run item by item, or group by group
    (``total = items * steps``, ``items`` the runs one after another)."""
    if callback is None:
        return None
    from ldm_sdk.samplers.base import StepInfo

    def cb(info: StepInfo) -> None:
        callback(
            StepInfo(
                step=item * info.total + info.step, total=items * info.total, t=info.t, x=info.x, x0=info.x0
            )
        )

    return cb


def run_sampling(
    bundle: ModelBundle,
    cond: Conditioning,
    uncond: Conditioning | None,
    shape: tuple[int, ...],
    request: TaskRequest,
    generator: RandomSource,
    callback: StepCallback | None = None,
    *,
    guidance: float = 1.0,
    mask: Tensor | None = None,
    x0: Tensor | None = None,
    init: Tensor | None = None,
    strength: float = 1.0,
    samplers: Mapping[str, Any] | Any | None = None,
    plan: SamplingPlan | None = None,
    denoiser: Denoiser | None = None,
    captured: CapturedModel | None = None,
    make_room: Callable[[], bool] | None = None,
) -> Tensor:
    """Sample latents of ``shape`` for ``cond`` and return the final state (float32, on the model's device).

    - ``uncond`` + ``guidance``: classifier-free guidance (``guidance == 1``: off, ``uncond`` unused).
    - ``denoiser``: a prebuilt denoiser (e.g. a :class:`~ldm_sdk.tiling.TiledDenoiser`) to sample with
      instead of the bundle's own for ``cond`` / ``uncond`` / ``guidance`` (which it then ignores); the
      mask, img2img and noise conventions below apply to it alike.
    - ``mask`` / ``x0``: keep the known latent ``x0`` where ``mask == 1`` (re-noised to every timestep);
      the result has ``x0`` pasted back there.
    - ``init`` + ``strength`` (img2img): noise ``init`` to the timestep ``strength`` selects
      (:func:`~ldm_sdk.diffusion.img2img.img2img_start`) and denoise the remaining steps.
    - ``captured``: the bundle's :class:`~ldm_sdk.accel.graphs.CapturedModel`
      (:func:`~ldm_sdk.tasks.context.captured_model`); when given and ``request.accelerate``, the bundle's
      denoiser calls the network through it (:func:`~ldm_sdk.accel.graphs.bundle_denoiser`). A prebuilt
      ``denoiser`` makes its own calls (the tiled one of :mod:`ldm_sdk.tasks.tiled` uses ``captured`` per
      window). A model that cannot be captured is a :class:`TaskError` naming the opt-out.
    - ``make_room``: called when a capture finds the GPU full even after releasing the graphs it could
      (:class:`~ldm_sdk.accel.graphs.CaptureMemoryError`) before the first step ended; it frees memory
      (the tasks evict another model from the runtime's cache) and says whether it did. The run then
      starts again from the same noise and generator state, so the result is the one it would have been;
      when nothing more can be freed, the :class:`TaskError` names the opt-out.
    Noise: the starting ``randn(shape)`` is the generator's first draw (also for img2img).

    Batch: ``shape[0]`` items sampled together. Batch-1 conditionings, ``init``, ``x0`` and ``mask`` serve
    every item. With :class:`~ldm_sdk.diffusion.noise.ItemGenerators` (one per item) each item draws its
    single run's noise, so it equals that run up to the rounding of the network's kernels at the larger
    batch; the sampler must support them (:func:`supports_item_generators`).
    """
    from ldm_sdk.diffusion.img2img import img2img_start, stochastic_encode
    from ldm_sdk.diffusion.masking import MaskedDenoiser, blend_known
    from ldm_sdk.diffusion.noise import ItemGenerators, randn

    if bundle.schedule is None:
        raise TaskError(f"{bundle.family!r} is a first-stage-only model: it cannot sample")
    plan = plan or plan_sampling(request, bundle.schedule)
    sample = sampler_function(plan.sampler, samplers)
    if isinstance(generator, ItemGenerators) and not supports_item_generators(sample):
        raise TaskError(
            f"the {plan.sampler} sampler does not draw its noise per batch item (item_generators): sample "
            "the batch item by item (batch_mode 'items')"
        )
    options: dict[str, Any] = {}
    if plan.eta is not None:
        if "eta" not in inspect.signature(sample).parameters:
            raise TaskError(f"the {plan.sampler} sampler takes no eta; leave eta unset")
        options["eta"] = plan.eta
    device = next(bundle.parameters()).device
    noise = randn(shape, generator, device=device, dtype=torch.float32)
    items = shape[0]
    if items > 1:
        cond = _for_batch(cond, items)
        uncond = _for_batch(uncond, items) if uncond is not None else None
    timesteps = plan.timesteps
    if init is not None:
        t_enc, timesteps = img2img_start(plan.timesteps, strength)
        init = init.to(device, torch.float32).expand(*noise.shape)
        x = stochastic_encode(bundle.schedule, init, t_enc, noise)
    else:
        x = noise
    fast = captured is not None and request.accelerate and denoiser is None
    if denoiser is None:
        unc = uncond if guidance != 1.0 else None
        if fast:
            from ldm_sdk.accel.graphs import bundle_denoiser

            denoiser = bundle_denoiser(bundle, cond, guidance_scale=guidance, uncond=unc, captured=captured)
        else:
            denoiser = bundle.denoiser(cond, guidance_scale=guidance, uncond=unc)
    if mask is not None:
        if x0 is None:
            raise ValueError("a mask needs the known latent x0")
        denoiser = MaskedDenoiser(denoiser, x0.to(device, torch.float32), mask.to(device), generator)
    if timesteps.numel() == 0:
        return x
    from ldm_sdk.accel.graphs import CaptureError, CaptureMemoryError
    from ldm_sdk.diffusion.noise import random_state, restore_random_state

    steps_done = 0

    def counted(info: StepInfo) -> None:
        nonlocal steps_done
        steps_done += 1
        if callback is not None:
            callback(info)

    # where a run that finds the GPU full starts again from: the generator's state and (a sampler from a
    # plugin might work on its input in place) the starting state; kept only where a run can start again
    can_retry = make_room is not None and captured is not None and request.accelerate
    start = random_state(generator) if can_retry else []
    start_x = x.clone() if can_retry else x
    freed = 0
    with torch.inference_mode():
        while True:
            try:
                out = sample(denoiser, x, timesteps, callback=counted, generator=generator, **options)
                break
            except RuntimeError as exc:
                if not (captured is not None and request.accelerate and isinstance(exc, CaptureError)):
                    raise
                first = isinstance(exc, CaptureMemoryError) and steps_done == 0
                if can_retry and first and make_room is not None and make_room():
                    freed += 1
                    restore_random_state(generator, start)
                    x = start_x.clone()
                    continue
                after = f" (after evicting {freed} other model(s) from the device)" if freed else ""
                raise TaskError(
                    f"the CUDA-graph fast path cannot run model {bundle.family!r}: {exc}{after}. Run it "
                    "eagerly with accelerate=False (--no-accelerate): the same result, up to floating-point "
                    "rounding"
                ) from exc
    if mask is not None and x0 is not None:
        out = blend_known(out, x0.to(device, out.dtype), mask.to(device))
    return out.float()


def _for_batch(cond: Conditioning, items: int) -> Conditioning:
    """A batch-1 conditioning repeated for ``items`` items (dense: captured graphs key on strides); one of
    that batch already as it is."""
    from ldm_sdk.diffusion.conditioning import Conditioning

    parts = cond.expand(items).parts()
    return Conditioning(**{name: value.contiguous() for name, value in parts.items()})


def progress_total(plan: SamplingPlan, strength: float | None = None) -> int:
    """Steps a run makes (for progress bars before the first callback)."""
    if strength is None:
        return plan.steps
    from ldm_sdk.diffusion.img2img import img2img_start

    return int(img2img_start(plan.timesteps, strength)[1].numel())
