"""The steps every task takes, so that each task module stays a thin ``__call__``.

:class:`Run` is one task invocation: it loads the model (through the runtime's cache), checks that the model
can do the task, resolves the sampler plan, reads the inputs (recording their hashes), computes the
conditioning (:meth:`Run.conditioning`), samples the batch item by item (item ``i`` with its own generator
seeded ``seed + i``, so it equals the single run with that seed) or, with ``batch_mode="together"``, in
groups of items that each keep their own generator (:meth:`Run.sample_latents`); on CUDA through the model's
captured network call unless the request sets ``accelerate=False``. Then it decodes and builds the result
with its manifest (:meth:`Run.finish`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from ldm_sdk.tasks.base import (
    DEFAULT_TEXT_GUIDANCE,
    TOGETHER_MAX_ITEMS,
    BaseTask,
    ImageLike,
    ImageRequest,
    SizedRequest,
    TaskError,
    TaskInputs,
    TaskRequest,
    TaskResult,
)
from ldm_sdk.tasks.context import (
    bundle_device_dtype,
    captured_decoder,
    captured_encoder,
    captured_model,
    check_size,
    cond_modality,
    cond_stage,
    default_size,
    load_bundle,
    make_generator,
    require_task,
    size_multiple,
)
from ldm_sdk.tasks.sampling import SamplingPlan, batch_callback, plan_sampling

if TYPE_CHECKING:
    from ldm_sdk.accel.graphs import CapturedModel
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.diffusion.conditioning import Conditioning
    from ldm_sdk.diffusion.noise import RandomSource
    from ldm_sdk.encoders.base import ConditionEncoder
    from ldm_sdk.runtime import Runtime
    from ldm_sdk.samplers.base import StepCallback
    from ldm_sdk.tasks.images import FitMode
    from ldm_sdk.tasks.manifest import InputRecord

__all__ = ["GenerationTask", "Guided", "InputReader", "Run"]

#: ``item(generator, callback, items)``: sample ``items`` batch items (one generator, or ItemGenerators)
ItemFn = Callable[["RandomSource", "StepCallback | None", int], Tensor]
SizedT = TypeVar("SizedT", bound=SizedRequest)
T = TypeVar("T")

logger = logging.getLogger("ldm_sdk.tasks")


@dataclass(frozen=True, eq=False)
class Guided:
    """A conditioning, its unconditional counterpart and the guidance scale to combine them with."""

    cond: Conditioning
    uncond: Conditioning | None
    guidance: float


class InputReader:
    """Reads a task's input images and masks (before the model is loaded, so bad files fail fast) and
    records their hashes for the manifest; pass ``records`` on to :meth:`Run.start`."""

    def __init__(self, task: str, records: list[InputRecord] | None = None) -> None:
        self.task = task
        self.records: list[InputRecord] = [] if records is None else records

    def image(self, role: str, path: str | None, given: ImageLike | None) -> np.ndarray:
        """An RGB input (``given`` in memory, else the file at ``path``) as uint8 ``H x W x 3``."""
        from ldm_sdk.tasks.images import as_rgb
        from ldm_sdk.tasks.manifest import input_record

        if given is None and path is None:
            raise TaskError(f"the {self.task} task needs an input {role} (a file, or inputs.{role})")
        source = given if given is not None else path
        pixels = as_rgb(source, what=role)
        self.records.append(input_record(role, pixels, source if isinstance(source, str) else None))
        return pixels

    def mask(self, path: str | None, given: ImageLike | None) -> np.ndarray:
        """The mask (white / 1 = repaint) as float32 ``H x W`` in [0, 1]."""
        from ldm_sdk.tasks.images import as_mask
        from ldm_sdk.tasks.manifest import input_record

        if given is None and path is None:
            raise TaskError(f"the {self.task} task needs a mask (white = repaint): a file, or inputs.mask")
        source = given if given is not None else path
        mask = as_mask(source)
        self.records.append(input_record("mask", mask, source if isinstance(source, str) else None))
        return mask


@dataclass(eq=False)
class Run:
    """One task invocation (see the module docstring). Build it with :meth:`start`."""

    name: str
    request: TaskRequest
    runtime: Runtime
    bundle: ModelBundle
    inputs: TaskInputs
    callback: StepCallback | None
    plan: SamplingPlan
    device: torch.device
    dtype: torch.dtype
    records: list[InputRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    guidance: float = 1.0

    @classmethod
    def start(
        cls,
        name: str,
        request: TaskRequest,
        runtime: Runtime,
        inputs: TaskInputs | None,
        callback: StepCallback | None,
        *,
        task_check: str | None = None,
        records: list[InputRecord] | None = None,
    ) -> Run:
        """Load the model, check it can do ``task_check`` (default: ``name``), plan the sampling.
        ``records``: the inputs an :class:`InputReader` read already."""
        inputs = inputs or TaskInputs()
        bundle = load_bundle(request, runtime, inputs)
        require_task(bundle, task_check or name, runtime.registries.condition_encoders)
        assert bundle.schedule is not None
        plan = plan_sampling(request, bundle.schedule)
        device, dtype = bundle_device_dtype(bundle)
        run = cls(name, request, runtime, bundle, inputs, callback, plan, device, dtype)
        run.records = [] if records is None else records
        return run

    # -- inputs --------------------------------------------------------------------------------------------
    def image_input(self, role: str, path: str | None, given: ImageLike | None) -> np.ndarray:
        """An RGB input (``given`` in memory, else the file at ``path``) as uint8 ``H x W x 3``; recorded."""
        return InputReader(self.name, self.records).image(role, path, given)

    def mask_input(self, path: str | None, given: ImageLike | None) -> np.ndarray:
        """The mask (white / 1 = repaint) as float32 ``H x W`` in [0, 1]; recorded."""
        return InputReader(self.name, self.records).mask(path, given)

    # -- conditioning --------------------------------------------------------------------------------------
    def encoder(self) -> ConditionEncoder | None:
        """The condition encoder: ``inputs.encoder``, else the model's cond stage."""
        if self.inputs.encoder is not None:
            return self.inputs.encoder
        return cond_stage(self.bundle, self.runtime)

    def conditioning(
        self,
        *,
        prompt: str | None = None,
        negative_prompt: str = "",
        class_label: int | None = None,
        uncond_class: int | None = None,
        concat: Tensor | None = None,
    ) -> Guided:
        """The conditioning the model takes (text, class label or none), with guidance resolved from the
        request (None: 7.5 for text, else 1). ``concat`` is added to both halves (inpainting models). Prompts
        are encoded through the runtime's :attr:`~ldm_sdk.runtime.Runtime.prompt_cache`."""
        from ldm_sdk.diffusion.conditioning import Conditioning

        requested = self.request.guidance
        encoder = None if concat is not None and self.bundle.conditioning_key == "concat" else self.encoder()
        modality = encoder.modality if encoder is not None else cond_modality(self.bundle, self._registry())
        if concat is not None and self.bundle.conditioning_key == "concat":
            modality = None  # LDM inpainting: the concat map is the whole condition
        what = f"model {self.bundle.family!r}"
        if modality != "text" and prompt is not None and prompt.strip():
            raise TaskError(
                f"{what} is not text-conditioned ({modality or 'unconditional'}): it takes no prompt"
            )
        if modality != "class" and class_label is not None:
            raise TaskError(f"{what} is not class-conditional: it takes no class label")
        cond, uncond = Conditioning(), None
        guidance = 1.0 if requested is None else requested
        with torch.inference_mode():
            if modality == "text":
                assert encoder is not None
                if prompt is None:
                    raise TaskError(f"{what} is text-conditioned: give a prompt (--prompt; '' for none)")
                _check_length(encoder, prompt, "")
                _check_length(encoder, negative_prompt, "negative ")
                guidance = DEFAULT_TEXT_GUIDANCE if requested is None else requested
                # through the runtime's prompt cache: a repeated prompt and the negative prompt encode once
                encode = self.runtime.prompt_cache.encode
                cond = encoder.conditioning(encode(encoder, prompt))
                if guidance != 1.0:
                    uncond = encoder.conditioning(encode(encoder, negative_prompt))
            elif modality == "class":
                cond, uncond = self._class_conditioning(encoder, class_label, uncond_class, guidance)
            elif modality is None:
                if guidance != 1.0:
                    raise TaskError(
                        f"{what} has no condition to guide (unconditional): leave guidance unset or 1"
                    )
            else:
                raise TaskError(
                    f"{what} is conditioned on {modality!r}, which the {self.name} task cannot give"
                )
        if concat is not None:
            cond = cond.with_concat(concat)
            if uncond is not None:
                uncond = uncond.with_concat(concat)
        self.guidance = float(guidance)
        return Guided(cond=cond, uncond=uncond, guidance=float(guidance))

    def image_conditioning(self, request: ImageRequest) -> Guided:
        """:meth:`conditioning` from an image request: its prompt, negative prompt, class label and null
        class, whichever the model takes."""
        return self.conditioning(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            class_label=request.class_label,
            uncond_class=request.uncond_class,
        )

    def _class_conditioning(
        self, encoder: ConditionEncoder | None, label: int | None, uncond_class: int | None, guidance: float
    ) -> tuple[Conditioning, Conditioning | None]:
        from ldm_sdk.diffusion.conditioning import Conditioning

        what = f"model {self.bundle.family!r}"
        n = getattr(encoder, "n_classes", None)
        valid = f"0..{n - 1}" if n else "its class indices"
        if label is None:
            raise TaskError(f"{what} is class-conditional: give a class label (--class N; valid: {valid})")
        null = uncond_class if uncond_class is not None else getattr(encoder, "uncond_class", None)
        if guidance != 1.0 and null is None:
            raise TaskError(
                f"guidance {guidance} needs the model's unconditional (null) class label: pass uncond_class "
                "(--uncond-class; cin256-v2: 1000), or leave guidance unset / 1"
            )
        if self.bundle.conditioning_key == "adm" or encoder is None:
            y = torch.tensor([label], device=self.device)
            u = torch.tensor([null], device=self.device) if guidance != 1.0 else None
            return Conditioning(y=y), (Conditioning(y=u) if u is not None else None)
        for value in (label, null):
            if value is not None and n is not None and not 0 <= value < n:
                raise TaskError(f"class label {value} out of range; valid: {valid}")
        cond = encoder.conditioning(encoder(torch.tensor([label])))
        uncond = encoder.conditioning(encoder(torch.tensor([null]))) if guidance != 1.0 else None
        return cond, uncond

    def _registry(self) -> Any:
        return self.runtime.registries.condition_encoders

    def _samplers(self) -> Any:
        return self.runtime.registries.samplers

    # -- sampling --------------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.bundle.downsampling_factor
        return (1, self.bundle.latent_channels, height // f, width // f)

    def sample(self, item: ItemFn, group: int = 1) -> Tensor:
        """Call ``item(generator, callback, n)`` for each group of ``n <= group`` batch items in order: one
        generator seeded ``seed + i`` for a single item, :class:`~ldm_sdk.diffusion.noise.ItemGenerators`
        for several. Returns the latents ``[B, C, h, w]``."""
        from ldm_sdk.diffusion.noise import ItemGenerators

        seeds = self.request.seeds()
        groups = [seeds[i : i + group] for i in range(0, len(seeds), group)]
        latents = []
        for i, group_seeds in enumerate(groups):
            generators = [make_generator(self.device, seed) for seed in group_seeds]
            generator = generators[0] if len(generators) == 1 else ItemGenerators(generators)
            latent = item(generator, batch_callback(self.callback, i, len(groups)), len(generators))
            self.check_finite(latent, "sampling")
            latents.append(latent)
        return torch.cat(latents)

    def check_finite(self, x: Tensor, stage: str) -> Tensor:
        """Refuse NaN / inf (a model overflowing in fp16 would otherwise give black or frozen images)."""
        if not bool(torch.isfinite(x).all()):
            from ldm_sdk.devices import dtype_name

            raise TaskError(
                f"{stage} produced non-finite values (NaN/inf) with dtype {dtype_name(self.dtype)} on "
                f"{self.device}: model {self.bundle.family!r} overflows in this precision; use dtype fp32 or "
                "bf16 (--dtype)"
            )
        return x

    @cached_property
    def captured(self) -> CapturedModel | None:
        """The model's captured network call (:func:`~ldm_sdk.tasks.context.captured_model`) when the
        request asks for the fast path (``accelerate``), else None; resolved once per run, so the batch
        items share it."""
        return captured_model(self.bundle, self.runtime) if self.request.accelerate else None

    @cached_property
    def captured_decoder(self) -> CapturedModel | None:
        """The model's captured first-stage decode (:func:`~ldm_sdk.tasks.context.captured_decoder`) when
        the request asks for the fast path (``accelerate``), else None."""
        return captured_decoder(self.bundle, self.runtime) if self.request.accelerate else None

    @cached_property
    def captured_encoder(self) -> CapturedModel | None:
        """The model's captured first-stage encode (:func:`~ldm_sdk.tasks.context.captured_encoder`) when
        the request asks for the fast path (``accelerate``), else None."""
        return captured_encoder(self.bundle, self.runtime) if self.request.accelerate else None

    def sample_kwargs(self, guided: Guided) -> dict[str, Any]:
        """The keyword arguments of :func:`~ldm_sdk.tasks.sampling.run_sampling` every task passes."""
        return {
            "guidance": guided.guidance,
            "samplers": self._samplers(),
            "plan": self.plan,
            "captured": self.captured,
            "make_room": self.make_room,
        }

    def make_room(self) -> bool:
        """A CUDA-graph capture of this run found its device full after releasing every graph it could:
        evict the least recently used other model on that device from the runtime's cache
        (:meth:`~ldm_sdk.runtime_cache.ModelCache.make_room`; it is reloaded when next used) and say
        whether one left. Nothing leaves for a model alone on its device."""
        key = self.runtime.cache.make_room(self.bundle)
        if key is None:
            return False
        logger.warning(
            "%s: the GPU had no room for this model's CUDA graphs; evicted model %s to make room",
            self.name,
            key,
        )
        return True

    def with_room(self, call: Callable[[], T]) -> T:
        """``call()`` (a captured first-stage pass), called again while :meth:`make_room` frees memory when
        its capture finds the device full; a :class:`TaskError` naming the opt-out when nothing more can be
        freed."""
        from ldm_sdk.accel.graphs import CaptureMemoryError

        while True:
            try:
                return call()
            except CaptureMemoryError as exc:
                if self.make_room():
                    continue
                raise TaskError(
                    f"the CUDA-graph fast path cannot run model {self.bundle.family!r}'s first stage: {exc}. "
                    "Run it eagerly with accelerate=False (--no-accelerate): the same result"
                ) from exc

    def output_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """The requested output size (default: the model's training size), checked against the model."""
        default_h, default_w = default_size(self.bundle)
        h, w = height or default_h, width or default_w
        check_size(h, w, size_multiple(self.bundle), what="output", can_fit=False)
        return h, w

    def generate(self, guided: Guided, height: int, width: int) -> TaskResult:
        """Sample from pure noise at ``height x width`` pixels, decode, finish."""
        latents = self.sample_latents(guided, self.latent_shape(height, width))
        return self.finish(self.decode(latents), latents)

    def sample_latents(
        self, guided: Guided, shape: tuple[int, ...], *, whole_decode: bool = True, **options: Any
    ) -> Tensor:
        """Sample every batch item with :func:`~ldm_sdk.tasks.sampling.run_sampling` for ``guided`` at the
        latent ``shape`` (batch 1); ``options``: its task-specific arguments (``mask`` / ``x0``, ``init`` /
        ``strength``, ``denoiser``). Returns the latents ``[B, C, h, w]``. ``whole_decode``: the latents
        will be decoded whole (:meth:`decode`), so the decoder's kernels for ``shape`` start compiling now
        (:meth:`compile_decoder_ahead`); False for a decode through windows.

        The request's ``batch_mode`` decides whether items run one by one or in groups of up to
        :data:`~ldm_sdk.tasks.base.TOGETHER_MAX_ITEMS`; a batch records how it ran in ``extra["batch"]``."""
        from ldm_sdk.tasks.sampling import run_sampling

        if whole_decode:
            self.compile_decoder_ahead(shape)
        group = self._batch_group(options.get("denoiser") is not None)

        def item(generator: RandomSource, callback: StepCallback | None, items: int) -> Tensor:
            return run_sampling(
                self.bundle,
                guided.cond,
                guided.uncond,
                (items, *shape[1:]),
                self.request,
                generator,
                callback,
                **options,
                **self.sample_kwargs(guided),
            )

        return self.sample(item, group)

    def _batch_group(self, own_denoiser: bool) -> int:
        """Items per sampler loop for this request (1: item by item), recorded in ``extra["batch"]`` for a
        batch; ``own_denoiser``: a prebuilt (tiled) denoiser, which samples item by item."""
        from ldm_sdk.tasks.sampling import sampler_function, supports_item_generators

        request = self.request
        if request.batch == 1:
            return 1
        why_items = None
        if request.batch_mode == "together":
            if own_denoiser:
                why_items = "tiled sampling runs item by item"
            elif not supports_item_generators(sampler_function(self.plan.sampler, self._samplers())):
                why_items = f"the {self.plan.sampler} sampler does not draw its noise per item"
        group = TOGETHER_MAX_ITEMS if request.batch_mode == "together" and why_items is None else 1
        sizes = [min(group, request.batch - i) for i in range(0, request.batch, group)]
        record: dict[str, Any] = {"mode": "together" if group > 1 else "items", "groups": sizes}
        if why_items is not None:
            record["why_items"] = why_items
        self.extra["batch"] = record
        return group

    def compile_decoder_ahead(self, shape: tuple[int, ...]) -> bool:
        """Start compiling the captured decoder's fused kernels for latents of ``shape`` in background worker
        processes, so they are ready when sampling ends (:meth:`CapturedModel.compile_ahead
        <ldm_sdk.accel.graphs.CapturedModel.compile_ahead>`); whether anything was started (not off CUDA,
        without the fast path, or once that size is captured)."""
        decoder = self.captured_decoder
        if decoder is None or self.device.type != "cuda":
            return False
        from ldm_sdk.diffusion.conditioning import Conditioning

        z = torch.zeros((1, *shape[1:]), device=self.device, dtype=self.dtype)  # as decode() feeds it
        try:
            with torch.inference_mode():
                return decoder.compile_ahead(z, z.new_zeros(1), Conditioning())
        except Exception as exc:  # an optimisation only: the first decode compiles what it needs itself
            warnings.warn(
                f"compiling the decoder's kernels ahead failed ({type(exc).__name__}: {exc}); they compile "
                "at the first decode instead",
                RuntimeWarning,
                stacklevel=2,
            )
            return False

    # -- fitting sizes ---------------------------------------------------------------------------------
    def fit_input(
        self, array: np.ndarray, mode: FitMode, *, what: str = "image", multiple: int | None = None
    ) -> np.ndarray:
        """``array`` (``H x W [x C]``) fitted to ``multiple`` (default: the model's size multiple) by
        ``mode`` (:func:`~ldm_sdk.tasks.images.fit_array`; ``"error"``: checked, unchanged), recorded in the
        manifest's ``extra["fit"]``."""
        from ldm_sdk.tasks.images import fit_array

        multiple = multiple or size_multiple(self.bundle)
        if mode == "error":
            check_size(*array.shape[:2], multiple, what=what)
        fitted = fit_array(array, multiple, mode)
        self.extra["fit"] = {
            "mode": mode,
            "input_size": list(array.shape[:2]),
            "fitted_size": list(fitted.shape[:2]),
        }
        return fitted

    def unfit(self, images: list[np.ndarray], *, scale: int = 1) -> list[np.ndarray]:
        """``images`` made from the input :meth:`fit_input` fitted, cropped back to the input size times
        ``scale`` when it was padded."""
        fit = self.extra["fit"]
        if fit["mode"] != "pad":
            return images
        h, w = (side * scale for side in fit["input_size"])
        return [img[:h, :w].copy() for img in images]

    # -- first stage -----------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> Tensor:
        """uint8 ``H x W x 3`` -> the scaled latent ``[1, C, h, w]`` (posterior mode), float32."""
        from ldm_sdk.tasks.images import to_tensor

        x = to_tensor(image, device=self.device, dtype=self.dtype)
        encode = self.first_stage_encoding
        with torch.inference_mode():
            z = self.bundle.encode_first_stage(x) if encode is None else encode(x) * self.bundle.scale_factor
            return self.check_finite(z.float(), "encoding the input image")

    @cached_property
    def first_stage_encoding(self) -> Callable[[Tensor], Tensor] | None:
        """``image -> latent before scale_factor`` through the captured encoder (a CUDA graph replayed once
        the size has been captured) when the fast path has one, else None (then the eager
        ``bundle.encode_first_stage`` / ``first_stage_encoding``): the same numbers either way."""
        encoder = self.captured_encoder
        if encoder is None:
            return None
        from ldm_sdk.diffusion.conditioning import Conditioning

        return lambda x: self.with_room(lambda: encoder(x, x.new_zeros(1), Conditioning()))

    def decode(self, latents: Tensor) -> list[np.ndarray]:
        """Latents ``[B, C, h, w]`` -> uint8 ``H x W x 3`` images, decoded one item at a time."""
        from ldm_sdk.tasks.images import tensor_to_images

        out: list[np.ndarray] = []
        decoder = self.captured_decoder
        with torch.inference_mode():
            for z in latents.split(1):
                # contiguous, as compile_decoder_ahead's latents: the same captured call signature
                z = z.to(self.device, self.dtype).contiguous()
                if decoder is not None:  # replayed from a CUDA graph (kernels pre-compiled at capture)
                    from ldm_sdk.diffusion.conditioning import Conditioning

                    x = self.with_room(lambda z=z: decoder(z, z.new_zeros(1), Conditioning()))
                else:
                    if self.device.type == "cuda":
                        from ldm_sdk.accel.precompile import precompile_once

                        # the decoder's fused kernels for this latent size, compiled in parallel, once
                        fs, shape = self.bundle.first_stage_model, (tuple(z.shape), z.dtype)
                        precompile_once(fs, shape, lambda z=z: self.bundle.decode_first_stage(z))
                    x = self.bundle.decode_first_stage(z)
                out += tensor_to_images(self.check_finite(x, "decoding"))
        return out

    # -- result ----------------------------------------------------------------------------------------
    def finish(self, images: list[np.ndarray], latents: Tensor | None) -> TaskResult:
        """The result with its manifest."""
        from ldm_sdk.devices import dtype_name
        from ldm_sdk.tasks.manifest import Manifest, model_record, now, plugin_records, versions

        manifest = Manifest(
            task=self.name,
            request=self.request.model_dump(mode="json"),
            seeds=self.request.seeds(),
            sampler=self.plan.sampler,
            steps=self.plan.steps,
            spacing=self.plan.spacing,
            timesteps=[float(t) for t in self.plan.timesteps.tolist()],
            guidance=self.guidance,
            eta=self.plan.eta,
            model=model_record(self.bundle, self.request, self.runtime),
            inputs=self.records,
            plugins=plugin_records(self.runtime),
            versions=versions(),
            device=str(self.device),
            dtype=dtype_name(self.dtype),
            created=now(),
            extra=self.extra,
        )
        return TaskResult(images=images, manifest=manifest, latents=latents)


class GenerationTask(BaseTask[SizedT]):
    """A task that samples from noise at the requested size (default: the model's training size) for the
    :meth:`conditioning` it reads from the request, and decodes (txt2img, class, uncond)."""

    def run(
        self, request: SizedT, runtime: Runtime, inputs: TaskInputs, callback: StepCallback | None
    ) -> TaskResult:
        run = Run.start(self.name, request, runtime, inputs, callback)
        height, width = run.output_size(request.height, request.width)
        return run.generate(self.conditioning(run, request), height, width)

    def conditioning(self, run: Run, request: SizedT) -> Guided:
        """The conditioning of ``request`` (default: none, an unconditional model's)."""
        return run.conditioning()


def _check_length(encoder: ConditionEncoder, text: str, what: str) -> None:
    """The encoder's ``check_length`` (when it has one) as a :class:`TaskError`: never truncate silently."""
    check = getattr(encoder, "check_length", None)
    if check is None or not text:
        return
    try:
        check([text])
    except ValueError as exc:
        raise TaskError(f"{what}{exc}") from None
