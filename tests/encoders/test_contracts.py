"""Every condition encoder a fresh runtime registers passes ``ConditionEncoderContract``.

The encoders under test are read from ``Runtime.create(load_entrypoints=False).registries.condition_encoders``
at collection time, so a newly registered built-in is tested automatically; it needs a tiny case in
:data:`TINY` (constructor kwargs + a batch of inputs), and a registered encoder without one FAILS
(``test_contract...[<name>-missing]``) so nothing escapes the contract.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from ldm_sdk.encoders.base import ConditionEncoder, EncoderSpec
from ldm_sdk.runtime import Runtime
from ldm_sdk.testing.contracts import ConditionEncoderContract, ContractCase

PROMPTS = ["a red cube on a table", "two dogs running on wet grass at dusk", "x", "an oil painting"]


@dataclass(frozen=True)
class Tiny:
    """One tiny case: ``kwargs(cache)`` builds the constructor kwargs (``cache``: a session temp folder),
    ``inputs(b)`` a batch of ``b`` distinct inputs; ``image_hw`` the image size the map is for (concat).
    Modules among the kwargs (a shared first stage) move with the encoder in the dtype test."""

    kwargs: Callable[[Path], dict[str, Any]]
    inputs: Callable[[int], Any]
    image_hw: tuple[int, int] | None = None
    variant: str = ""


def _labels(b: int) -> Tensor:
    return torch.arange(b) % 4


def _images(b: int, size: int) -> Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(b)) * 2 - 1


def _semantic_map(b: int) -> Tensor:
    return torch.randint(0, 5, (b, 16, 16), generator=torch.Generator().manual_seed(b))


def _masked(b: int) -> Any:
    from ldm_sdk.encoders.mask import MaskedImage

    mask = torch.zeros(b, 1, 32, 32)
    for i in range(b):  # a different hole per item, never empty, never everything
        mask[i, :, 4 * (i % 4) : 4 * (i % 4) + 12, 2 + i % 7 : 20 + i % 7] = 1.0
    return MaskedImage(_images(b, 32), mask)


def _layouts(b: int) -> list[list[Any]]:
    from ldm_sdk.encoders.layout import LayoutObject

    return [
        [
            LayoutObject(i % 5, (0.1, 0.1 * (i % 5), 0.6, 0.9)),
            LayoutObject((i + 2) % 5, (0.5, 0.2, 0.95, 0.7)),
        ][: 1 + i % 2]
        for i in range(b)
    ]


def _first_stage(kind: str) -> nn.Module:
    from ldm_sdk.models.first_stage import AutoencoderKL, VQModel
    from ldm_sdk.testing.tiny import TINY_KL_F8, TINY_VQ_F4

    torch.manual_seed(0)
    return (VQModel.from_config(TINY_VQ_F4) if kind == "vq" else AutoencoderKL.from_config(TINY_KL_F8)).eval()


CLIP_TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}

#: registry name -> the tiny cases of that encoder (several when it has variants)
TINY: dict[str, list[Tiny]] = {
    "class": [Tiny(lambda _: {"embed_dim": 8, "n_classes": 5, "uncond_class": 4}, _labels)],
    "ldm-bert": [Tiny(lambda _: {"n_embed": 16, "n_layer": 1, "max_seq_len": 16}, lambda b: PROMPTS[:b])],
    "clip-text": [
        Tiny(lambda cache: {"cache_dir": cache, "max_length": 16, **CLIP_TINY}, lambda b: PROMPTS[:b])
    ],
    "minilm": [Tiny(lambda _: {"max_length": 16}, lambda b: PROMPTS[:b])],
    "semantic": [
        Tiny(lambda _: {"n_stages": 2, "in_channels": 5, "out_channels": 3}, _semantic_map, image_hw=(16, 16))
    ],
    "lowres": [Tiny(lambda _: {"latent_factor": 4}, lambda b: _images(b, 8), image_hw=(32, 32))],
    "mask": [
        Tiny(lambda _: {"first_stage": _first_stage("vq"), "variant": "ldm"}, _masked, (32, 32), "ldm"),
        Tiny(
            lambda _: {"first_stage": _first_stage("kl"), "variant": "sd", "scale_factor": 0.18215},
            _masked,
            (32, 32),
            "sd",
        ),
    ],
    "layout": [
        Tiny(
            lambda _: {"n_embed": 16, "n_layer": 1, "max_seq_len": 3 * 3 + 2, "n_object_classes": 5}, _layouts
        )
    ],
}


@functools.cache
def registered() -> dict[str, EncoderSpec]:
    """The condition encoders of a fresh runtime (built-in plugin only), by name."""
    with Runtime.create(load_entrypoints=False, device="cpu") as runtime:
        registry = runtime.registries.condition_encoders
        return {name: registry.get(name) for name in registry.names()}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "encoder_case" not in metafunc.fixturenames:
        return
    params, ids = [], []
    for name in registered():
        cases = TINY.get(name)
        if cases is None:
            params.append((name, None))
            ids.append(f"{name}-missing")
            continue
        for index, case in enumerate(cases):
            params.append((name, index))
            ids.append(f"{name}-{case.variant}" if case.variant else name)
    metafunc.parametrize("encoder_case", params, ids=ids)


@pytest.fixture(scope="session")
def encoder_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-cache")


class TestRegisteredEncoders(ConditionEncoderContract):
    """The contract, once per registered encoder (and variant)."""

    @pytest.fixture
    def contract_case(self, encoder_case: tuple[str, int | None], encoder_cache: Path) -> ContractCase:
        name, index = encoder_case
        if index is None:
            pytest.fail(
                f"condition encoder {name!r} is registered but has no tiny case in TINY "
                f"(tests/encoders/test_contracts.py): add one so it is held to the contract"
            )
        case = TINY[name][index]
        spec = registered()[name]
        kwargs = case.kwargs(encoder_cache)
        shared = [v for v in kwargs.values() if isinstance(v, nn.Module)]

        def make_encoder() -> ConditionEncoder:
            return spec.factory(**kwargs)

        def move(encoder: ConditionEncoder, dtype: torch.dtype) -> None:
            encoder.to(dtype)
            for module in shared:
                module.to(dtype)

        return ContractCase(
            make_encoder=make_encoder,
            make_inputs=case.inputs,
            image_hw=case.image_hw,
            move=move,
            name=f"encoder {name!r}",
        )

    def test_spec_agrees_with_the_class(self, encoder_case: tuple[str, int | None]) -> None:
        name, _ = encoder_case
        spec = registered()[name]
        assert isinstance(spec, EncoderSpec), f"{name!r}: built-ins register EncoderSpec, got {type(spec)}"
        cls = spec.factory
        assert isinstance(cls, type) and issubclass(cls, ConditionEncoder)
        assert (spec.modality, spec.kind, spec.trainable, spec.compvis_targets) == (
            cls.modality,
            cls.kind,
            cls.trainable,
            cls.compvis_targets,
        )
        assert spec.description, f"{name!r} has no description for listings"


def test_the_table_names_only_registered_encoders() -> None:
    stale = sorted(set(TINY) - set(registered()))
    assert not stale, f"TINY has cases for encoders that are not registered: {stale}"


def test_the_built_in_encoders_and_their_declarations() -> None:
    declared = {n: (s.modality, s.kind, s.trainable) for n, s in registered().items()}
    assert declared == {
        "class": ("class", "crossattn", True),
        "ldm-bert": ("text", "crossattn", True),
        "clip-text": ("text", "crossattn", False),
        "minilm": ("text", "crossattn", False),
        "semantic": ("semantic", "concat", True),
        "lowres": ("lowres", "concat", False),
        "mask": ("mask", "concat", False),
        "layout": ("layout", "crossattn", True),
    }
