"""Tell what a checkpoint is from its keys and shapes, when it comes without its original YAML.

The structure visible in the weights (first-stage kind, factor, widths, levels, attention placement,
cross-attention width, linear/conv transformer projections, class embedding ...) is read into
:class:`UNetStructure` / :class:`FirstStageStructure` and compared with the known families
(:mod:`ldm_sdk.checkpoints.families`); a family is returned only when the structure matches it exactly, and
then every UNet / first-stage key and shape is checked against the family's network built on the meta device.
The number of attention heads is not visible in shapes, which is why a full diffusion model needs a family.

When the checkpoint holds real ``betas`` they must equal the family's schedule too. Networks that coincide
cannot be told apart by weights: SD 2.x eps (``v2-inference.yaml``) vs v (``v2-inference-v.yaml``), and the
three VQ-f4 unconditional LDMs (CelebA-HQ, FFHQ, LSUN-Bedrooms). For those the only tell-tale we use is the
file name (``name_hint``: e.g. ``768-v-ema.ckpt``, ``v2-1_512-ema-pruned.ckpt``, ``models/ldm/ffhq256``);
without one, :class:`UnknownCheckpointError` says which YAML (or ``family=``) to pass.

First-stage-only files (``encoder.*`` / ``decoder.*`` at top level, optionally ``loss.*``) are matched to
``FIRST_STAGE_ZOO``, or described by a config derived from their shapes (they have no heads to guess).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from functools import cache
from typing import Any

import torch
from torch import Tensor

from ldm_sdk.checkpoints.bundle import COND_STAGE_PREFIX, EMA_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX
from ldm_sdk.checkpoints.families import FAMILIES, Family
from ldm_sdk.checkpoints.structure import (
    ASK_FOR_YAML,
    FirstStageStructure,
    UNetStructure,
    UnknownCheckpointError,
    compare_shapes,
    compvis_shapes,
    first_stage_structure,
    shapes_under,
    unet_structure,
)
from ldm_sdk.diffusion.schedule import SCHEDULE_BUFFERS, make_beta_schedule
from ldm_sdk.models.configs import ModelConfig
from ldm_sdk.models.zoo import FIRST_STAGE_ZOO

__all__ = [
    "FirstStageStructure",
    "UNetStructure",
    "UnknownCheckpointError",
    "compvis_shapes",
    "describe",
    "detect_config",
    "first_stage_structure",
    "unet_structure",
]

_SD2_PAIR = {"sd2", "sd2-v"}


@cache
def _builtin_family_shapes(name: str) -> dict[str, torch.Size]:
    return compvis_shapes(FAMILIES[name].config)


def _family_shapes(families: Mapping[str, Family], name: str) -> dict[str, torch.Size]:
    if families is FAMILIES:
        return _builtin_family_shapes(name)
    return compvis_shapes(families[name].config)


# -- schedule ------------------------------------------------------------------------------------------
def _real(t: object) -> Tensor | None:
    return t if isinstance(t, Tensor) and not t.is_meta else None


def _schedule_matches(betas: Tensor, family: Family) -> bool:
    d = family.config.diffusion
    assert d is not None
    if betas.numel() != d.timesteps:
        return False
    ref = torch.from_numpy(
        make_beta_schedule(d.beta_schedule, d.timesteps, d.linear_start, d.linear_end, d.cosine_s)
    )
    return torch.allclose(betas.detach().double().cpu().flatten(), ref, rtol=1e-5, atol=1e-9)


def describe_schedule(betas: Tensor) -> dict[str, Any]:
    """Timesteps, first/last beta and which CompVis schedule reproduces ``betas`` (if one does)."""
    b = betas.detach().double().cpu().flatten()
    out: dict[str, Any] = {"timesteps": b.numel(), "beta_first": float(b[0]), "beta_last": float(b[-1])}
    n = b.numel()
    for kind in ("linear", "sqrt_linear"):
        start, end = (float(b[0]), float(b[-1]))
        ref = torch.from_numpy(make_beta_schedule(kind, n, start, end))  # type: ignore[arg-type]
        if torch.allclose(b, ref, rtol=1e-5, atol=1e-9):
            out.update(beta_schedule=kind, linear_start=round(start, 8), linear_end=round(end, 8))
            break
    else:
        if torch.allclose(b, torch.from_numpy(make_beta_schedule("cosine", n)), rtol=1e-5, atol=1e-9):
            out["beta_schedule"] = "cosine"
    return out


# -- detection -----------------------------------------------------------------------------------------
def _is_first_stage_only(state: Mapping[str, Tensor]) -> bool:
    keys = [k for k in state if not k.startswith("loss.")]
    return bool(keys) and all(
        k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")) for k in keys
    )


def _by_hint(
    names: list[str], hint: str | os.PathLike[str] | None, families: Mapping[str, Family]
) -> list[str]:
    if hint is None:
        return names
    text = os.fspath(hint).lower()
    chosen = [n for n in names if any(h in text for h in families[n].hints)]
    return chosen if len(chosen) == 1 else names


def _ambiguous(
    names: list[str], detected: dict[str, Any], families: Mapping[str, Family]
) -> UnknownCheckpointError:
    if set(names) == _SD2_PAIR:
        return UnknownCheckpointError(
            "this is a Stable Diffusion 2.x checkpoint, and SD 2.x weights do not say whether the model "
            "predicts the noise (eps) or the velocity (v). The 512-base / v2-1_512 models are eps: pass "
            "config='v2-inference.yaml' (or family='sd2'); the 768-v / v2-1_768 models are v: pass "
            "config='v2-inference-v.yaml' (or family='sd2-v'). A file name containing '768' or '512' "
            "(name_hint=...) also decides it.",
            detected=detected,
            candidates=names,
        )
    return UnknownCheckpointError(
        f"the weights fit several families with the same network: {names} "
        f"({'; '.join(families[n].description for n in names)}); they differ only in what they were trained "
        f"on or predict, which weights do not show. Pass family=<one of {names}> or the original YAML "
        "(config=...), or a file name that names the dataset (name_hint=...)",
        detected=detected,
        candidates=names,
    )


def _detect_first_stage(state: Mapping[str, Tensor], family: str | None) -> ModelConfig:
    struct = first_stage_structure(state, prefix="")
    names = [n for n, cfg in FIRST_STAGE_ZOO.items() if FirstStageStructure.from_config(cfg) == struct]
    if family is not None:
        if family not in FIRST_STAGE_ZOO:
            raise UnknownCheckpointError(
                f"family={family!r} is not a first-stage model; valid for an autoencoder file: "
                f"{sorted(FIRST_STAGE_ZOO)}"
            )
        if family not in names:
            raise UnknownCheckpointError(
                f"the autoencoder's structure {asdict(struct)} is not that of {family!r}",
                detected={"first_stage": asdict(struct)},
            )
        names = [family]
    if names:
        config = ModelConfig(family=names[0], first_stage=FIRST_STAGE_ZOO[names[0]])
    else:
        try:
            config = ModelConfig(family="custom", first_stage=struct.to_config())
            compvis_shapes(config)  # builds (on meta): the structure must make a valid network
        except UnknownCheckpointError:
            raise
        except ValueError as err:  # e.g. widths GroupNorm(32) cannot normalise
            raise UnknownCheckpointError(
                f"the autoencoder's structure {asdict(struct)} is not a buildable first stage: {err}",
                detected={"first_stage": asdict(struct)},
            ) from None
    compare_shapes(
        state, compvis_shapes(config), ("encoder.", "decoder.", "quant", "post_quant"), config.family
    )
    return config


def detect_config(
    state_dict: Mapping[str, Tensor],
    *,
    family: str | None = None,
    name_hint: str | os.PathLike[str] | None = None,
    families: Mapping[str, Family] | None = None,
) -> ModelConfig:
    """The :class:`ModelConfig` of a CompVis-layout state dict, from its keys and shapes.

    ``family`` asserts a family (checked against the weights); ``name_hint`` (the file name or path) picks
    between families whose networks coincide; ``families`` replaces the built-in table (e.g. with the
    runtime's registry, plugin families included). Raises :class:`UnknownCheckpointError` when the
    structure is not exactly one known family's (the message lists what was detected and what to pass).
    """
    fams: Mapping[str, Family] = FAMILIES if families is None else families
    if not any(k.startswith(UNET_PREFIX) for k in state_dict):
        if _is_first_stage_only(state_dict):
            return _detect_first_stage(state_dict, family)
        hint = (
            " It has a 'state_dict' entry: pass checkpoint['state_dict']."
            if "state_dict" in state_dict
            else ""
        )
        raise UnknownCheckpointError(
            f"no CompVis model keys found (neither {UNET_PREFIX}* nor an autoencoder's encoder.*/decoder.*); "
            f"first keys: {sorted(state_dict)[:5]}.{hint} {ASK_FOR_YAML}"
        )
    unet = unet_structure(state_dict)
    has_fs = any(k.startswith(FIRST_STAGE_PREFIX + "encoder.") for k in state_dict)
    first = first_stage_structure(state_dict) if has_fs else None
    detected: dict[str, Any] = {"unet": asdict(unet), "first_stage": asdict(first) if first else None}
    names = [
        n
        for n, fam in fams.items()
        if fam.config.unet is not None
        and UNetStructure.from_config(fam.config.unet) == unet
        and (first is None or FirstStageStructure.from_config(fam.config.first_stage) == first)
    ]
    betas = _real(state_dict.get("betas"))
    if betas is not None:
        detected["schedule"] = describe_schedule(betas)
        other_schedule = [n for n in names if not _schedule_matches(betas, fams[n])]
        names = [n for n in names if n not in other_schedule]
    else:
        other_schedule = []
    if family is not None:
        if family not in fams:
            raise KeyError(f"unknown model family {family!r}; known: {sorted(fams)}")
        if family not in names:
            why = (
                "its noise schedule (betas) differs" if family in other_schedule else "the structure differs"
            )
            raise UnknownCheckpointError(
                f"the weights are not those of family {family!r}: {why}. Detected: {detected}",
                detected=detected,
                candidates=names,
            )
        names = [family]
    if not names:
        extra = f" (same network as {other_schedule} but another noise schedule)" if other_schedule else ""
        raise UnknownCheckpointError(
            f"unknown model structure{extra}: detected {detected}. Known families: {sorted(fams)}; "
            f"{ASK_FOR_YAML}",
            detected=detected,
        )
    names = _by_hint(names, name_hint, fams)
    if len(names) > 1:
        raise _ambiguous(names, detected, fams)
    prefixes = (UNET_PREFIX, FIRST_STAGE_PREFIX) if has_fs else (UNET_PREFIX,)
    compare_shapes(state_dict, _family_shapes(fams, names[0]), prefixes, f"family {names[0]!r}")
    return fams[names[0]].config


# -- inspection ----------------------------------------------------------------------------------------
_COND_STAGE_TELLS = (
    ("transformer.text_model.embeddings.token_embedding.weight", "FrozenCLIPEmbedder (CLIP ViT-L/14 text)"),
    ("model.token_embedding.weight", "FrozenOpenCLIPEmbedder (OpenCLIP text)"),
    ("transformer.token_emb.weight", "BERTEmbedder (x-transformers encoder, trained with the model)"),
    ("embedding.weight", "ClassEmbedder (class labels)"),
    ("channel_mapper.weight", "SpatialRescaler (semantic maps)"),
)


def _cond_stage_guess(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    s = shapes_under(state, COND_STAGE_PREFIX)
    if not s:
        return None
    guess = next((name for key, name in _COND_STAGE_TELLS if key in s), "unknown")
    return {"guess": guess, "tensors": len(s)}


def describe(state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """A JSON-serialisable summary of a state dict (what ``ldm-sdk inspect`` prints).

    Keys: ``format`` ("ldm" | "first_stage" | "unknown"), ``tensors`` and ``parameters`` (element count of
    every tensor), ``dtypes`` (dtype -> count), ``sections`` (key prefix -> count), ``has_ema``, ``unet`` and
    ``first_stage`` (the structures read from shapes, or None), ``cond_stage`` (a guess at the encoder from
    its keys), ``schedule`` (from real ``betas``), ``scale_factor`` (the stored one), ``family`` (None when
    not uniquely known), ``candidates`` (families the weights fit equally) and ``detection`` ("ok" or why
    no family was chosen)."""
    sections: Counter[str] = Counter()
    for key in state_dict:
        if key.startswith((UNET_PREFIX, FIRST_STAGE_PREFIX, COND_STAGE_PREFIX, EMA_PREFIX)):
            sections[
                key.split(".")[0] + ("." + key.split(".")[1] if key.startswith(UNET_PREFIX) else "")
            ] += 1
        elif key in SCHEDULE_BUFFERS or key == "scale_factor":
            sections["schedule"] += 1
        elif key.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")):
            sections["autoencoder"] += 1
        else:
            sections["other"] += 1
    tensors = [v for v in state_dict.values() if isinstance(v, Tensor)]
    out: dict[str, Any] = {
        "format": "unknown",
        "tensors": len(tensors),
        "parameters": sum(v.numel() for v in tensors),
        "dtypes": dict(Counter(str(v.dtype).removeprefix("torch.") for v in tensors)),
        "sections": dict(sections),
        "has_ema": any(k.startswith(EMA_PREFIX) for k in state_dict),
        "unet": None,
        "first_stage": None,
        "cond_stage": _cond_stage_guess(state_dict),
        "schedule": None,
        "scale_factor": None,
        "family": None,
        "candidates": [],
        "detection": "ok",
    }
    scale = _real(state_dict.get("scale_factor"))
    if scale is not None and scale.numel() == 1:
        out["scale_factor"] = float(scale)
    betas = _real(state_dict.get("betas"))
    if betas is not None:
        out["schedule"] = describe_schedule(betas)
    try:
        if any(k.startswith(UNET_PREFIX) for k in state_dict):
            out["format"] = "ldm"
            out["unet"] = asdict(unet_structure(state_dict))
            if any(k.startswith(FIRST_STAGE_PREFIX + "encoder.") for k in state_dict):
                fs = first_stage_structure(state_dict)
                out["first_stage"] = {**asdict(fs), "factor": fs.factor}
        elif _is_first_stage_only(state_dict):
            out["format"] = "first_stage"
            fs = first_stage_structure(state_dict, prefix="")
            out["first_stage"] = {**asdict(fs), "factor": fs.factor}
        out["family"] = detect_config(state_dict).family
    except UnknownCheckpointError as err:
        out["detection"] = str(err)
        out["candidates"] = err.candidates
    except (ValueError, KeyError) as err:  # shapes no CompVis network has: report, do not fail inspect
        out["detection"] = f"{type(err).__name__}: {err}"
    return out
