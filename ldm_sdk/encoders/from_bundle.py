"""Build a loaded model's condition encoder from its original config: :func:`build_cond_stage`.

A :class:`~ldm_sdk.checkpoints.bundle.ModelBundle` carries ``config.cond_stage`` (the original
``cond_stage_config``: a CompVis ``target`` string and its ``params``) and the checkpoint's
``cond_stage_model.*`` tensors (``bundle.cond_stage_weights``). The encoder plugins declare which targets
they reproduce (``EncoderSpec.compvis_targets``); this module picks the registered encoder that claims the
target, constructs it with the original params (CompVis parameter names) and loads the weights strictly.

- ``__is_unconditional__`` (or no cond stage): no encoder, ``None``.
- ``__is_first_stage__`` (LDM inpainting): the encoder claiming that marker is built on the bundle's own
  first stage (its ``from_bundle(bundle, **params)`` when it has one, else
  ``factory(first_stage, **params)``); the checkpoint's ``cond_stage_model.*`` entries, if any, must be
  the first stage's weights (CompVis saved the shared module under both names).
- A target no registered encoder claims is an error listing the targets that are known.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import COND_STAGE_PREFIX, FIRST_STAGE_PREFIX
from ldm_sdk.checkpoints.keys import check_state_dict
from ldm_sdk.checkpoints.original_config import FIRST_STAGE_COND, UNCONDITIONAL
from ldm_sdk.encoders.base import ConditionEncoder, EncoderSpec

if TYPE_CHECKING:
    from ldm_sdk.checkpoints.bundle import ModelBundle
    from ldm_sdk.registry import Registry

__all__ = ["UnknownCondStageError", "build_cond_stage", "encoder_specs", "known_targets"]

#: CompVis ``cond_stage_key`` (the dataset key the cond stage reads) -> the modality it carries; used only to
#: choose between several registered encoders that claim the same target (``BERTEmbedder`` is both LDM's
#: text encoder and, with ``use_tokenizer: false``, its layout encoder).
COND_STAGE_KEY_MODALITY: dict[str, str] = {
    "caption": "text",
    "txt": "text",
    "text": "text",
    "class_label": "class",
    "coordinates_bbox": "layout",
    "objects_bbox": "layout",
    "segmentation": "semantic",
    "LR_image": "lowres",
    "masked_image": "mask",
}


class UnknownCondStageError(ValueError):
    """No registered condition encoder reproduces the config's ``cond_stage_config.target``."""


def encoder_specs(registry: Registry[Any]) -> dict[str, EncoderSpec]:
    """The registry's entries that are :class:`EncoderSpec` s (plugins may register other factories)."""
    return {name: spec for name in registry.names() if isinstance(spec := registry.get(name), EncoderSpec)}


def known_targets(registry: Registry[Any]) -> dict[str, list[str]]:
    """CompVis target -> the names of the registered encoders that claim it, sorted."""
    out: dict[str, list[str]] = {}
    for name, spec in encoder_specs(registry).items():
        for target in dict.fromkeys((*spec.compvis_targets, spec.config_target)):
            out.setdefault(target, []).append(name)
    return dict(sorted(out.items()))


def build_cond_stage(
    bundle: ModelBundle,
    registry: Registry[Any],
    *,
    params: Mapping[str, Any] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ConditionEncoder | None:
    """The condition encoder of ``bundle``, built from ``bundle.config.cond_stage`` by the encoder in
    ``registry`` (a runtime's ``registries.condition_encoders``) that claims its CompVis target, with the
    checkpoint's ``cond_stage_model.*`` weights loaded strictly; ``None`` for an unconditional model.

    ``params`` add to (and override) the config's ``cond_stage_config.params``, for what the original config
    does not say (the layout encoder's dataset-specific ``n_object_classes``). When several encoders claim
    the target, those whose modality matches the config's ``cond_stage_key`` are tried (all, if none
    matches), in name order; the first that constructs and loads the weights wins.

    The encoder is returned in eval mode on ``device`` / ``dtype`` (default: those of the bundle's weights).
    Raises :class:`UnknownCondStageError` when no registered encoder claims the target,
    :class:`~ldm_sdk.checkpoints.keys.CheckpointMismatchError` (grouped missing / unexpected / misshapen keys)
    when the weights do not fit, ``ValueError`` when the params do not fit the encoder.
    """
    cond = bundle.config.cond_stage
    weights: Mapping[str, Tensor] = bundle.cond_stage_weights
    if cond is None or cond.target == UNCONDITIONAL:
        if weights:
            raise ValueError(
                f"the model is unconditional (no cond_stage_config) but the checkpoint holds {len(weights)} "
                f"{COND_STAGE_PREFIX}* tensors (e.g. {COND_STAGE_PREFIX}{next(iter(weights))}); give the "
                "config of the conditional model it came from"
            )
        return None
    candidates = _candidates(registry, cond.target)
    if not candidates:
        targets = known_targets(registry)
        listing = "; ".join(f"{t} ({', '.join(names)})" for t, names in targets.items()) or "none"
        raise UnknownCondStageError(
            f"no registered condition encoder reproduces cond_stage_config.target {cond.target!r}; known "
            f"targets (encoder names): {listing}. Install or enable the plugin that provides it"
        )
    merged = {**cond.params, **(params or {})}
    preferred = _preferred(bundle, candidates)
    errors: list[str] = []
    for name in preferred:
        spec = candidates[name]
        try:
            if cond.target == FIRST_STAGE_COND:
                encoder = _on_first_stage(bundle, name, spec, merged)
            else:
                # no random initialisation for weights the checkpoint overwrites (encoders that allow it)
                meta = spec.meta_init and bool(weights)
                with torch.device("meta") if meta else contextlib.nullcontext():
                    encoder = _construct(name, spec, merged)
                _load_weights(encoder, name, cond.target, weights, assign=meta)
        except (ValueError, TypeError) as exc:
            if len(preferred) == 1:
                raise
            errors.append(f"{name}: {exc}")
            continue
        return _place(encoder, bundle, device, dtype)
    raise ValueError(
        f"cond_stage_config.target {cond.target!r} is claimed by the encoders {', '.join(preferred)}, and "
        "none of them fits this checkpoint:\n" + "\n".join(errors)
    )


# -- helpers ---------------------------------------------------------------------------------------------
def _candidates(registry: Registry[Any], target: str) -> dict[str, EncoderSpec]:
    return {name: spec for name, spec in encoder_specs(registry).items() if spec.claims(target)}


def _preferred(bundle: ModelBundle, candidates: dict[str, EncoderSpec]) -> list[str]:
    """The candidates whose modality matches the config's ``cond_stage_key`` (all if none does), sorted."""
    key = bundle.config.diffusion.cond_stage_key if bundle.config.diffusion is not None else ""
    modality = COND_STAGE_KEY_MODALITY.get(key)
    matching = sorted(n for n, spec in candidates.items() if spec.modality == modality)
    return matching or sorted(candidates)


def _construct(name: str, spec: EncoderSpec, params: dict[str, Any], *args: Any) -> ConditionEncoder:
    try:
        encoder = spec.factory(*args, **params)
    except TypeError as exc:
        raise ValueError(
            f"cond_stage_config.params {params} do not fit the {name!r} condition encoder "
            f"({_qualname(spec.factory)}): {exc}"
        ) from exc
    if not isinstance(encoder, ConditionEncoder):
        raise TypeError(
            f"the {name!r} condition encoder's factory returned {type(encoder).__name__}, "
            "not a ConditionEncoder"
        )
    return encoder


def _load_weights(
    encoder: ConditionEncoder, name: str, target: str, weights: Mapping[str, Tensor], *, assign: bool = False
) -> None:
    """Strict load; on a mismatch the error groups the keys (``cond_stage_model.`` prefixed, as in the file).
    ``assign``: the encoder was built on the meta device and takes the tensors themselves.

    The module's own ``load_state_dict`` decides what fits (its load hooks may accept legacy entries, such
    as CLIP's ``position_ids``); :func:`check_state_dict` only words the refusal.
    """
    try:
        encoder.load_state_dict(dict(weights), strict=True, assign=assign)
    except RuntimeError as exc:
        expected = {COND_STAGE_PREFIX + k: v.shape for k, v in encoder.state_dict().items()}
        given = {COND_STAGE_PREFIX + k: v for k, v in weights.items()}
        check_state_dict(
            expected,
            given,
            what=f"the checkpoint's {COND_STAGE_PREFIX}* weights",
            against=f"the {name!r} encoder built from cond_stage_config ({target})",
        )
        raise ValueError(f"the {name!r} condition encoder refused the checkpoint's weights: {exc}") from exc


def _on_first_stage(
    bundle: ModelBundle, name: str, spec: EncoderSpec, params: dict[str, Any]
) -> ConditionEncoder:
    """``__is_first_stage__``: an encoder over the bundle's first stage (shared, not copied)."""
    weights = bundle.cond_stage_weights
    if weights:  # CompVis saved the shared first stage under cond_stage_model.* too: it must be the same
        first = bundle.first_stage_model.state_dict()
        check_state_dict(
            {FIRST_STAGE_PREFIX + k: v.shape for k, v in first.items()},
            {FIRST_STAGE_PREFIX + k: v for k, v in weights.items()},
            what=f"the checkpoint's {COND_STAGE_PREFIX}* weights (the first stage, saved twice)",
            against="the first stage (cond_stage_config: __is_first_stage__)",
        )
        differ = [k for k, v in weights.items() if not torch.equal(v.to(first[k]), first[k])]
        if differ:
            raise ValueError(
                f"cond_stage_config is {FIRST_STAGE_COND!r} (the cond stage IS the first stage), but "
                f"{len(differ)} {COND_STAGE_PREFIX}* tensors differ from first_stage_model.* (e.g. "
                f"{differ[0]}); the checkpoint is inconsistent"
            )
    from_bundle = getattr(spec.factory, "from_bundle", None)
    if callable(from_bundle):
        try:
            encoder = from_bundle(bundle, **params)
        except TypeError as exc:
            raise ValueError(
                f"cond_stage_config.params {params} do not fit {_qualname(spec.factory)}.from_bundle "
                f"(the {name!r} encoder): {exc}"
            ) from exc
        if not isinstance(encoder, ConditionEncoder):
            raise TypeError(f"{_qualname(spec.factory)}.from_bundle returned {type(encoder).__name__}")
        return encoder
    return _construct(name, spec, params, bundle.first_stage_model)


def _place(
    encoder: ConditionEncoder,
    bundle: ModelBundle,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> ConditionEncoder:
    reference = next((p for p in bundle.parameters() if p.is_floating_point()), None)
    if device is None and reference is not None:
        device = reference.device
    if dtype is None and reference is not None:
        dtype = reference.dtype
    return encoder.to(device=device, dtype=dtype).eval()


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
