"""What every editing task shares: request schemas, inputs, results, errors and the ``Task`` protocol.

A task is one thin callable: ``task(request, runtime, *, inputs=None, callback=None) -> TaskResult``.

- ``request`` is a pydantic model (``extra="forbid"``; the server uses the same schemas): the model file, the
  sampler and its settings, the seed and the batch size, plus the task's own fields (prompt, strength, ...).
- ``inputs`` (:class:`TaskInputs`) carries what a script or host has in memory: a loaded ``ModelBundle``, a
  condition encoder, images and masks as arrays / PIL images. They take precedence over the request's file
  paths.
- ``callback`` receives the sampler's :class:`~ldm_sdk.samplers.base.StepInfo` after every step, counted over
  the whole batch (``total = batch * steps``, or ``groups * steps`` for a batch sampled together); raise
  ``SamplingCancelled`` from it to stop.

Seeds: item ``i`` of a batch uses ``seed + i`` with its own ``torch.Generator`` on the task's device. By
default (``batch_mode="items"``) the items run one after another, so item ``i`` of a batch is exactly the
single run with ``seed + i`` (on the same device and dtype). ``batch_mode="together"`` samples up to
:data:`TOGETHER_MAX_ITEMS` items in one sampler loop, the network seeing them as one batch: faster (the
network's kernels are more efficient at the larger batch), each item still drawing its single run's noise,
but equal to that run only up to the rounding of those kernels at the other batch size.

Errors a user can fix raise :class:`TaskError` (a ``ValueError``) saying what was wrong and what is valid.
Run a task as a runtime job (progress events, cancel) with :func:`submit_task`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar, cast, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

if TYPE_CHECKING:
    from PIL import Image
    from torch import Tensor

    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.encoders.base import ConditionEncoder
    from ldm_sdk.jobs import Job
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback
    from ldm_sdk.tasks.manifest import Manifest

__all__ = [
    "DEFAULT_TEXT_GUIDANCE",
    "MAX_BATCH",
    "SPACINGS",
    "TASK_NAMES",
    "TOGETHER_MAX_ITEMS",
    "BaseTask",
    "ClassRequest",
    "ImageLike",
    "ImageRequest",
    "Img2ImgRequest",
    "InpaintRequest",
    "NoDefaultModelError",
    "OutpaintRequest",
    "SizedRequest",
    "Task",
    "TaskError",
    "TaskInputs",
    "TaskRequest",
    "TaskResult",
    "Txt2ImgRequest",
    "UncondRequest",
    "UnsupportedTaskError",
    "format_validation_error",
    "submit_task",
]

#: the task names the SDK knows (``class``: class-conditional, ``uncond``: unconditional sampling)
TASK_NAMES: tuple[str, ...] = (
    "txt2img",
    "class",
    "uncond",
    "img2img",
    "inpaint",
    "outpaint",
    "upscale",
    "semantic",
    "layout",
)
#: timestep spacings a request may ask for (None: the sampler's default, see ``ldm_sdk.tasks.sampling``)
SPACINGS: tuple[str, ...] = ("uniform", "quad", "linspace", "karras")
MAX_BATCH = 64
MAX_SEED = 2**63 - 1
#: items one sampler loop takes with ``batch_mode="together"`` (a guided network call of batch 16): larger
#: batches run as several groups, so the activation memory stays that of 8 items
TOGETHER_MAX_ITEMS = 8
#: classifier-free guidance scale used when a text-conditioned request leaves ``guidance`` unset
DEFAULT_TEXT_GUIDANCE = 7.5

#: what a task accepts as an image: a file path, a PIL image, a uint8 ``HxW`` / ``HxWxC`` array (or float in
#: [0, 1]), or a torch tensor ``[C, H, W]`` / ``[1, C, H, W]`` in [-1, 1]
ImageLike = Any


# -- errors ------------------------------------------------------------------------------------------------
class TaskError(ValueError):
    """Bad input a user can fix (file, size, mask, prompt, model): the message says what is valid."""


class UnsupportedTaskError(TaskError):
    """The model cannot do the task asked for; the message lists the tasks it supports."""


class NoDefaultModelError(TaskError):
    """No model was given and there is no built-in default model yet."""

    def __init__(self) -> None:
        super().__init__("no built-in default model yet: pass --model (a checkpoint file or folder)")


# -- requests ----------------------------------------------------------------------------------------------
class TaskRequest(BaseModel):
    """Settings every task takes. ``None`` means "the default for this model / sampler".

    - ``model``: checkpoint file or diffusers folder (None: the built-in default model, not available yet);
      ``config``: original YAML config for it (None: embedded or detected); ``use_ema``: the EMA weights.
    - ``sampler``: a name in the runtime's sampler registry (built-in: ddim, plms, ddpm, dpmpp_2m,
      euler_ancestral); ``steps`` (None: 50, or every timestep for ddpm); ``spacing`` of the timesteps
      (None: uniform for ddim/plms, karras for dpmpp_2m, linspace for euler_ancestral); ``eta`` (None: the
      sampler's default; ddim 0, euler_ancestral 1).
    - ``guidance``: classifier-free guidance scale (None: 7.5 for text-conditioned models, else 1 = off).
    - ``seed``: item ``i`` of the batch uses ``seed + i``; ``batch``: images to make (1..64);
      ``batch_mode``: ``"items"`` samples them one after another (item ``i`` exactly the single run with
      ``seed + i``), ``"together"`` in groups of up to :data:`TOGETHER_MAX_ITEMS` (faster; equal to the
      single runs up to the kernels' rounding at the larger batch). Tiled sampling (an image larger than
      the model's window) and samplers that do not draw noise per item always run item by item; the
      manifest's ``extra["batch"]`` says how the batch ran.
    - ``device`` / ``dtype``: where the model runs (None: the runtime's device and dtype).
    - ``accelerate``: the fast path -- on CUDA the denoising network is replayed from CUDA graphs captured
      once per loaded model (:mod:`ldm_sdk.accel.graphs`). The replay computes what the eager call does,
      bit for bit, except that a half-precision cross-attention model (SD-1.5, say) with guidance runs its
      layers before the first cross-attention once for both halves: the same up to the kernels' rounding
      at that batch size. It keeps the graphs' activation memory on the GPU while the model is loaded;
      ``False`` runs eagerly. Elsewhere it changes nothing. Recorded in the manifest like every field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: ClassVar[str] = ""

    model: str | None = None
    config: str | None = None
    use_ema: bool = False
    sampler: str = Field("ddim", min_length=1)
    steps: int | None = Field(None, ge=1, le=10000)
    spacing: Literal["uniform", "quad", "linspace", "karras"] | None = None
    eta: float | None = Field(None, ge=0.0, le=10.0)
    guidance: float | None = Field(None, ge=0.0, le=100.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    batch: int = Field(1, ge=1, le=MAX_BATCH)
    batch_mode: Literal["items", "together"] = "items"
    device: str | None = None
    dtype: Literal["fp32", "fp16", "bf16"] | None = None
    accelerate: bool = True

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_name(cls, value: object) -> object:
        if value is None or value in ("fp32", "fp16", "bf16"):
            return value
        from ldm_sdk.devices import dtype_name, parse_dtype

        try:
            return dtype_name(parse_dtype(value))  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"unknown dtype {value!r}; valid: fp32, fp16, bf16") from None

    @field_validator("eta", "guidance")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("model", "config", "device")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (leave it out for the default)")
        return value

    def seeds(self) -> list[int]:
        """The seed of each batch item: ``seed, seed + 1, ...``."""
        return [self.seed + i for i in range(self.batch)]


class SizedRequest(TaskRequest):
    """A request that makes images from nothing: ``width`` / ``height`` in pixels (None: the model's
    training size). Both must be multiples of the model's size multiple (latent factor x UNet downsampling,
    e.g. 64 for Stable Diffusion); the error names the nearest valid sizes."""

    width: int | None = Field(None, ge=1, le=16384)
    height: int | None = Field(None, ge=1, le=16384)


class Txt2ImgRequest(SizedRequest):
    """Text to image: ``prompt`` (required, not blank) and an optional ``negative_prompt`` (the
    unconditional half of guidance; empty = the empty prompt, as the originals)."""

    task: ClassVar[str] = "txt2img"
    prompt: str
    negative_prompt: str = ""

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty: describe the image to make")
        return value


class ClassRequest(SizedRequest):
    """Class-conditional sampling (LDM cin models): ``class_label`` in ``0..n_classes-1``. Guidance needs
    the model's null label: ``uncond_class`` (cin256-v2: 1000); never guessed."""

    task: ClassVar[str] = "class"
    class_label: int = Field(ge=0)
    uncond_class: int | None = Field(None, ge=0)


class UncondRequest(SizedRequest):
    """Unconditional sampling (LDM CelebA / FFHQ / LSUN models); ``guidance`` must stay unset or 1."""

    task: ClassVar[str] = "uncond"


class ImageRequest(TaskRequest):
    """A request that edits an image: ``image`` path (or ``TaskInputs.image``), and how to treat a size
    that is not a multiple of the model's size multiple: ``fit="error"`` (default), ``"pad"`` (replicate the
    right / bottom edges up to the next multiple; the result is cropped back to the input size) or
    ``"crop"`` (drop the right / bottom remainder; the result is smaller). Never resized silently.

    Conditioning, whatever the model takes: ``prompt`` / ``negative_prompt`` (text models),
    ``class_label`` / ``uncond_class`` (class-conditional models); unconditional models take neither.
    """

    image: str | None = None
    fit: Literal["error", "pad", "crop"] = "error"
    prompt: str | None = None
    negative_prompt: str = ""
    class_label: int | None = Field(None, ge=0)
    uncond_class: int | None = Field(None, ge=0)


class Img2ImgRequest(ImageRequest):
    """SDEdit image-to-image: ``strength`` in (0, 1] (the fraction of the steps re-run; 1 = from noise)."""

    task: ClassVar[str] = "img2img"
    strength: float = Field(0.75, gt=0.0, le=1.0)


class InpaintRequest(ImageRequest):
    """Repaint part of an image.

    ``mask`` (path, or ``TaskInputs.mask``): **white / 1 = the region to repaint**, black / 0 = keep;
    grey is binarised at 0.5. ``grow``: dilate the repaint region by this many pixels. ``feather``: softness
    (Gaussian sigma, pixels) of the final composite's edge, which lies inside the grown region (about
    ``2 * feather`` px wide) so that every pixel outside it equals the input exactly. ``method``:
    ``"auto"`` (a dedicated inpainting model's mask conditioning when the model has it, else mask-blended
    sampling), ``"model"`` or ``"blend"``.
    """

    task: ClassVar[str] = "inpaint"
    mask: str | None = None
    grow: int = Field(0, ge=0, le=4096)
    feather: float = Field(0.0, ge=0.0, le=512.0)
    method: Literal["auto", "model", "blend"] = "auto"


class OutpaintRequest(ImageRequest):
    """Extend the canvas by ``left`` / ``right`` / ``top`` / ``bottom`` pixels and paint the new area.

    ``fill`` is what the new area holds before sampling: ``edge`` (replicate), ``reflect`` or ``noise``
    (uniform noise from the seed). The original pixels come back exactly; ``feather`` softens the seam on
    the new side only. ``method`` as for inpainting.
    """

    task: ClassVar[str] = "outpaint"
    left: int = Field(0, ge=0, le=8192)
    right: int = Field(0, ge=0, le=8192)
    top: int = Field(0, ge=0, le=8192)
    bottom: int = Field(0, ge=0, le=8192)
    fill: Literal["edge", "reflect", "noise"] = "edge"
    feather: float = Field(0.0, ge=0.0, le=512.0)
    method: Literal["auto", "model", "blend"] = "auto"


# -- inputs and results ------------------------------------------------------------------------------------
@dataclass
class TaskInputs:
    """In-memory inputs; each given one replaces the request's counterpart.

    ``bundle``: an already loaded model (then ``request.model`` is only recorded). ``encoder``: the
    condition encoder to use instead of the one built from the model's cond stage. ``image`` / ``mask``:
    :data:`ImageLike`. ``extra``: further named inputs of other tasks (low-res image, semantic map ...),
    ImageLike or arrays.
    """

    bundle: ModelBundle | None = None
    encoder: ConditionEncoder | None = None
    image: ImageLike | None = None
    mask: ImageLike | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """What a task returns: ``images`` (uint8 ``H x W x 3`` RGB arrays, one per batch item), the final
    ``latents`` ``[B, C, h, w]`` (before decoding; None when a task has none) and the ``manifest`` that
    replays the run (``manifest.item(i)`` is item ``i``'s own)."""

    images: list[np.ndarray]
    manifest: Manifest
    latents: Tensor | None = None

    @property
    def seeds(self) -> list[int]:
        return list(self.manifest.seeds)

    def pil(self) -> list[Image.Image]:
        """The images as PIL RGB images."""
        from PIL import Image

        return [Image.fromarray(img) for img in self.images]

    def save(self, output: str | Path, *, sidecar: bool = True) -> list[Path]:
        """Write the images as PNGs with their manifests (see :func:`ldm_sdk.tasks.images.save_outputs`):
        all or nothing."""
        from ldm_sdk.tasks.images import save_outputs

        return save_outputs(self, output, sidecar=sidecar)


@runtime_checkable
class Task(Protocol):
    """A task: its ``name``, its ``request_type``, one call."""

    name: str
    request_type: type[TaskRequest]

    def __call__(
        self,
        request: TaskRequest,
        runtime: Runtime,
        *,
        inputs: TaskInputs | None = None,
        callback: StepCallback | None = None,
    ) -> TaskResult: ...


RequestT = TypeVar("RequestT", bound=TaskRequest)


class BaseTask(Generic[RequestT]):
    """A :class:`Task` whose call checks that the request is its ``request_type`` (else ``TypeError``, naming
    the task by ``title``, default ``name``) and hands it, with the inputs (default: none), to :meth:`run`,
    which subclasses implement."""

    name: ClassVar[str]
    request_type: ClassVar[type[TaskRequest]]
    title: ClassVar[str] = ""

    def __call__(
        self,
        request: TaskRequest,
        runtime: Runtime,
        *,
        inputs: TaskInputs | None = None,
        callback: StepCallback | None = None,
    ) -> TaskResult:
        if not isinstance(request, self.request_type):
            wanted = self.request_type.__name__
            article = "an" if wanted[0] in "AEIOU" else "a"
            raise TypeError(
                f"{self.title or self.name} takes {article} {wanted}, got {type(request).__name__}"
            )
        return self.run(cast(RequestT, request), runtime, inputs or TaskInputs(), callback)

    def run(
        self, request: RequestT, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        """The task proper, on a request of its type."""
        raise NotImplementedError


def submit_task(
    task: Task,
    request: TaskRequest,
    runtime: Runtime,
    *,
    inputs: TaskInputs | None = None,
    callback: StepCallback | None = None,
    preview_every: int = 0,
    priority: int = 0,
) -> Job[TaskResult]:
    """Run ``task`` as a job on ``runtime``'s queue: progress events (with latent previews every
    ``preview_every`` steps), cancel within one step; ``callback`` is also called after every step."""
    from ldm_sdk.jobs import JobContext

    def run(ctx: JobContext) -> TaskResult:
        ctx.check_cancelled()
        step = ctx.step_callback(preview_every=preview_every, then=callback)
        return task(request, runtime, inputs=inputs, callback=step)

    return runtime.submit(run, priority=priority, name=task.name)


def format_validation_error(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field: what is wrong (got value); field2: ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "request"
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
            continue
        if err.get("type") == "missing":
            parts.append(f"{loc}: required")
            continue
        value = err.get("input")
        shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
        parts.append(f"{loc}: {msg}{shown}")
    return "; ".join(parts)


def parse_request(request_type: type[TaskRequest], data: Mapping[str, Any]) -> TaskRequest:
    """``request_type.model_validate(data)`` with the errors as one :class:`TaskError` line."""
    try:
        return request_type.model_validate(dict(data))
    except ValidationError as exc:
        what = request_type.task or "task"
        raise TaskError(f"invalid {what} request: {format_validation_error(exc)}") from None
