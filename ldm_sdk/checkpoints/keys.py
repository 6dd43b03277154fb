"""Strict state-dict checking with errors a person can act on.

A missing block of a CompVis checkpoint is hundreds of keys; :func:`check_state_dict` groups missing and
unexpected keys by module (``model.diffusion_model.input_blocks.1 (12 missing)``; runs of numbered siblings
collapse to ``input_blocks.{0-11}``), lists every shape mismatch, and adds a hint when the cause is cheap to
tell (SD 1.x vs 2.x context width, an inpainting UNet, a first-stage-only file, an extra ``module.`` prefix,
diffusers key names).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

_MAX_GROUPS = 24
_EXAMPLES = 3
# Cross-attention context widths of the well-known families.
CONTEXT_WIDTHS = {
    768: "SD 1.x (CLIP ViT-L/14 text)",
    1024: "SD 2.x (OpenCLIP ViT-H/14 text)",
    1280: "LDM text-to-image (BERT, 1280)",
    512: "LDM class-conditional (512-d class embedding)",
}
UNET_IN_CHANNELS = {
    4: "a standard SD UNet (4 latent channels)",
    9: "an inpainting UNet (latent + mask + masked-image latent)",
    7: "an SD x4 upscaler UNet (latent + low-res image)",
    8: "a depth/pix2pix-style UNet (latent + conditioning latent)",
}


@dataclass(frozen=True)
class ShapeMismatch:
    key: str
    checkpoint: torch.Size
    expected: torch.Size

    def __str__(self) -> str:
        return f"{self.key}: checkpoint {list(self.checkpoint)} vs expected {list(self.expected)}"


class CheckpointMismatchError(ValueError):
    """The checkpoint's keys or shapes do not match the model; fields hold the details."""

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[ShapeMismatch] = (),
        hints: Sequence[str] = (),
    ) -> None:
        super().__init__(message)
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)
        self.hints = tuple(hints)


def compare_state_dict(
    expected: Mapping[str, torch.Size],
    given: Mapping[str, Tensor | torch.Size],
    *,
    ignore_prefixes: Sequence[str] = (),
) -> tuple[list[str], list[str], list[ShapeMismatch]]:
    """Missing keys, unexpected keys and shape mismatches (each sorted), ``ignore_prefixes`` left out."""
    prefixes = tuple(ignore_prefixes)

    def keep(k: str) -> bool:
        return not (prefixes and k.startswith(prefixes))

    missing = sorted(k for k in expected if k not in given and keep(k))
    unexpected = sorted(k for k in given if k not in expected and keep(k))
    mismatched = []
    for key in sorted(expected.keys() & given.keys()):
        shape = _shape(given[key])
        if shape != torch.Size(expected[key]) and keep(key):
            mismatched.append(ShapeMismatch(key, shape, torch.Size(expected[key])))
    return missing, unexpected, mismatched


def check_state_dict(
    expected: Mapping[str, torch.Size],
    given: Mapping[str, Tensor | torch.Size],
    *,
    ignore_prefixes: Sequence[str] = (),
    what: str = "the checkpoint",
    against: str = "the model configuration",
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``given`` has exactly ``expected``'s keys and shapes."""
    missing, unexpected, mismatched = compare_state_dict(expected, given, ignore_prefixes=ignore_prefixes)
    if not (missing or unexpected or mismatched):
        return
    hints = mismatch_hints(expected, given, missing, unexpected, mismatched)
    message = format_mismatch(missing, unexpected, mismatched, hints, what=what, against=against)
    raise CheckpointMismatchError(
        message, missing=missing, unexpected=unexpected, mismatched=mismatched, hints=hints
    )


# -- grouping ---------------------------------------------------------------------------------------------
def group_of(key: str, max_depth: int = 4) -> str:
    """The module a key belongs to: up to its first numeric index, at most ``max_depth`` names deep.

    ``model.diffusion_model.input_blocks.1.1.proj_in.weight`` -> ``model.diffusion_model.input_blocks.1``;
    ``first_stage_model.encoder.conv_in.weight`` -> ``first_stage_model.encoder.conv_in``;
    ``model_ema.diffusion_modelout2bias`` -> ``model_ema``; ``betas`` -> ``betas``.
    """
    parts = key.split(".")
    if len(parts) == 1:
        return key
    end = min(len(parts) - 1, max_depth)
    for i, part in enumerate(parts[:end]):
        if part.isdigit():
            end = i + 1
            break
    return ".".join(parts[:end])


def group_keys(keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    """``[(group label, keys)]`` in key order; numbered siblings (three or more) merge into one label."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(group_of(key), []).append(key)
    siblings: dict[str, list[int]] = {}
    for name in groups:
        m = re.fullmatch(r"(.*)\.(\d+)", name)
        if m:
            siblings.setdefault(m.group(1), []).append(int(m.group(2)))
    out: list[tuple[str, list[str]]] = []
    merged: set[str] = set()
    for name, members in groups.items():
        m = re.fullmatch(r"(.*)\.(\d+)", name)
        if m and len(siblings[m.group(1)]) >= 3:
            parent = m.group(1)
            if parent in merged:
                continue
            merged.add(parent)
            indices = sorted(set(siblings[parent]))
            label = f"{parent}.{{{_ranges(indices)}}}"
            keys_all = [k for i in indices for k in groups[f"{parent}.{i}"]]
            out.append((label, keys_all))
        else:
            out.append((name, members))
    return out


def _ranges(indices: list[int]) -> str:
    spans: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(spans)


def format_key_groups(keys: Sequence[str], verb: str) -> list[str]:
    lines = []
    groups = group_keys(keys)
    for label, members in groups[:_MAX_GROUPS]:
        prefix = label.split("{")[0]
        examples = [
            m[len(prefix) :].lstrip(".") if m.startswith(prefix) and m != prefix else m
            for m in members[:_EXAMPLES]
        ]
        more = ", ..." if len(members) > _EXAMPLES else ""
        lines.append(f"    {label} ({len(members)} {verb}), e.g. {', '.join(examples)}{more}")
    if len(groups) > _MAX_GROUPS:
        lines.append(f"    ... and {len(groups) - _MAX_GROUPS} more groups")
    return lines


def format_mismatch(
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[ShapeMismatch],
    hints: Sequence[str] = (),
    *,
    what: str = "the checkpoint",
    against: str = "the model configuration",
) -> str:
    counts = []
    if missing:
        counts.append(f"{len(missing)} missing")
    if unexpected:
        counts.append(f"{len(unexpected)} unexpected")
    if mismatched:
        counts.append(f"{len(mismatched)} with the wrong shape")
    lines = [f"{what} does not match {against}; keys: {', '.join(counts)}"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}), by module:")
        lines += format_key_groups(missing, "missing")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}), by module:")
        lines += format_key_groups(unexpected, "unexpected")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}), checkpoint vs expected:")
        lines += [f"    {m}" for m in mismatched]
    lines += [f"  hint: {h}" for h in hints]
    return "\n".join(lines)


# -- hints ------------------------------------------------------------------------------------------------
def mismatch_hints(
    expected: Mapping[str, torch.Size],
    given: Mapping[str, Tensor | torch.Size],
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[ShapeMismatch],
) -> list[str]:
    """Likely causes that are cheap to tell from keys and shapes."""
    hints: list[str] = []
    by_key = {m.key: m for m in mismatched}
    for m in mismatched:
        if m.key.endswith("attn2.to_k.weight") and len(m.checkpoint) == 2 and len(m.expected) == 2:
            file_w, cfg_w = m.checkpoint[1], m.expected[1]
            hints.append(
                f"the file's cross-attention context width is {file_w} ({_context_name(file_w)}), the "
                f"config's is {cfg_w} ({_context_name(cfg_w)}): the file is another family than the config"
            )
            break
    in_key = "model.diffusion_model.input_blocks.0.0.weight"
    if in_key in by_key and len(by_key[in_key].checkpoint) == 4:
        file_c, cfg_c = by_key[in_key].checkpoint[1], by_key[in_key].expected[1]
        hints.append(
            f"the file's UNet takes {file_c} input channels ({UNET_IN_CHANNELS.get(file_c, 'unusual')}), the "
            f"config's takes {cfg_c} ({UNET_IN_CHANNELS.get(cfg_c, 'unusual')})"
        )
    for m in mismatched:
        if m.key.endswith("proj_in.weight") and {len(m.checkpoint), len(m.expected)} == {2, 4}:
            linear = len(m.checkpoint) == 2
            hints.append(
                f"the file's transformer proj_in/proj_out are {'linear' if linear else '1x1 convolutions'} "
                f"(use_linear_in_transformer={linear}, {'SD 2.x' if linear else 'SD 1.x / LDM'} style), the "
                "config's are not"
            )
            break
    if "betas" in by_key:
        m = by_key["betas"]
        hints.append(f"the file has {m.checkpoint[0]} diffusion timesteps, the config {m.expected[0]}")
    for key in ("first_stage_model.quant_conv.weight", "quant_conv.weight"):
        if key in by_key and len(by_key[key].checkpoint) == 4:
            m = by_key[key]
            hints.append(
                f"the first stage's latent width differs (quant_conv is {list(m.checkpoint)} in the file, "
                f"{list(m.expected)} in the config): check embed_dim / z_channels"
            )
    hints += _part_hints(expected, given, missing)
    hints += _prefix_hints(missing, unexpected)
    if any(k.startswith(("down_blocks.", "unet.down_blocks.")) or ".down_blocks." in k for k in unexpected):
        hints.append(
            "the keys look like diffusers names (down_blocks...); convert the folder with "
            "ldm_sdk.checkpoints.diffusers_format instead"
        )
    return hints


def _part_hints(
    expected: Mapping[str, torch.Size], given: Mapping[str, Tensor | torch.Size], missing: Sequence[str]
) -> list[str]:
    hints = []

    def has(keys: Iterable[str], prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    full_expected = has(expected, "first_stage_model.")
    bare_first_stage = has(given, "encoder.") or has(given, "decoder.")
    if full_expected and not has(given, "first_stage_model.") and bare_first_stage:
        hints.append(
            "the file looks like a first-stage-only (autoencoder) checkpoint: its keys are encoder./decoder. "
            "without first_stage_model.; load it with a first-stage-only config"
        )
    elif (
        full_expected and not has(given, "model.diffusion_model.") and has(missing, "model.diffusion_model.")
    ):
        hints.append("the file has no UNet weights (model.diffusion_model.*): is it a first-stage-only file?")
    elif full_expected and not has(given, "first_stage_model.") and has(missing, "first_stage_model."):
        hints.append(
            "the file has no first-stage weights (first_stage_model.*): it holds only part of a model"
        )
    if not full_expected and has(given, "model.diffusion_model."):
        hints.append(
            "the file is a whole latent diffusion model (model.diffusion_model.*, first_stage_model.*) but "
            "the config is first-stage-only"
        )
    return hints


def _prefix_hints(missing: Sequence[str], unexpected: Sequence[str]) -> list[str]:
    if not missing or not unexpected:
        return []
    missing_set = set(missing)
    firsts = Counter(k.split(".", 1)[0] + "." for k in unexpected if "." in k)
    for prefix, _ in firsts.most_common(2):
        hits = sum(1 for k in unexpected if k.startswith(prefix) and k[len(prefix) :] in missing_set)
        if hits >= max(1, len(missing) // 2):
            return [f"the file's keys carry an extra {prefix!r} prefix (e.g. saved from a wrapped model)"]
    for prefix in {k.split(".", 1)[0] + "." for k in missing if "." in k}:
        hits = sum(1 for k in missing if k.startswith(prefix) and k[len(prefix) :] in set(unexpected))
        if hits >= max(1, len(missing) // 2):
            return [f"the file's keys lack the {prefix!r} prefix the config expects"]
    return []


def _context_name(width: int) -> str:
    return CONTEXT_WIDTHS.get(width, "no well-known family")


def _shape(value: Tensor | torch.Size) -> torch.Size:
    return value if isinstance(value, torch.Size) else value.shape
