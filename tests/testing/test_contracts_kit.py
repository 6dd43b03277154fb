"""The plugin authors' kit: the contract mixin passes a correct encoder and FAILS each kind of broken one;
the pytest plugin's fixtures work and its import costs nothing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

from ldm_sdk.checkpoints.bundle import ModelBundle
from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract
from ldm_sdk.runtime import Runtime
from ldm_sdk.testing import tiny
from ldm_sdk.testing.contracts import ConditionEncoderContract, ContractCase, cast_inputs, select_inputs


class Tokens(ConditionEncoder):
    """A correct little encoder: a vector ``[B, 4]`` -> two tokens of 8 channels."""

    modality: ClassVar[str] = "vector"
    kind: ClassVar[ConditioningKind] = "crossattn"
    trainable: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 16)
        self.null = nn.Parameter(torch.zeros(2, 8))

    def contract(self) -> OutputContract:
        return OutputContract("crossattn", channels=8, tokens=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x.to(self.proj.weight.dtype)).reshape(-1, 2, 8)

    def unconditional(self, batch_size: int) -> Tensor:
        return self.null.expand(batch_size, 2, 8)


def vectors(b: int) -> Tensor:
    return torch.randn(b, 4, generator=torch.Generator().manual_seed(b))


class TestTokensEncoder(ConditionEncoderContract):
    """The mixin used as a plugin author uses it: two methods, every contract test collected."""

    def make_encoder(self) -> ConditionEncoder:
        return Tokens()

    def make_inputs(self, batch_size: int) -> Any:
        return vectors(batch_size)


# -- broken encoders: each must fail the named contract test ------------------------------------------


class WrongKind(Tokens):
    kind = "film"  # type: ignore[assignment]


class ContractLies(Tokens):
    def contract(self) -> OutputContract:
        return OutputContract("crossattn", channels=9, tokens=2)


class FrozenButTrainable(Tokens):
    trainable = False


class TrainableButFrozen(Tokens):
    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)


class Noisy(Tokens):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + torch.rand(1).item() * 1e-3


class MixesBatch(Tokens):
    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + out.mean(0, keepdim=True)


class StuckInFloat32(Tokens):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).float()


class IgnoresItsInput(Tokens):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.zeros_like(x))


class RandomUnconditional(Tokens):
    def unconditional(self, batch_size: int) -> Tensor:
        return torch.randn(batch_size, 2, 8)


class ConcatWithUnconditional(Tokens):
    kind: ClassVar[ConditioningKind] = "concat"

    def contract(self) -> OutputContract:
        return OutputContract("concat", channels=2)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).reshape(-1, 2, 4, 2)

    def unconditional(self, batch_size: int) -> Tensor:
        return torch.zeros(batch_size, 2, 4, 2)  # a concat map must refuse: ValueError


class ForgetsAScale(Tokens):
    """Output depends on state that ``state_dict`` does not carry."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.rand(1) + 0.5, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.scale


@dataclass(frozen=True)
class Broken:
    cls: Callable[[], ConditionEncoder]
    test: str


BROKEN = [
    Broken(WrongKind, "test_declares_modality_kind_and_trainable"),
    Broken(ContractLies, "test_output_matches_contract"),
    Broken(FrozenButTrainable, "test_parameters_follow_trainable"),
    Broken(TrainableButFrozen, "test_parameters_follow_trainable"),
    Broken(Noisy, "test_deterministic_in_eval_mode"),
    Broken(MixesBatch, "test_batch_items_are_independent"),
    Broken(IgnoresItsInput, "test_batch_items_are_independent"),
    Broken(StuckInFloat32, "test_float64_and_back"),
    Broken(RandomUnconditional, "test_unconditional"),
    Broken(ConcatWithUnconditional, "test_unconditional"),
    Broken(ForgetsAScale, "test_state_dict_round_trip"),
]


@pytest.mark.parametrize("broken", BROKEN, ids=lambda b: f"{b.cls.__name__}-{b.test}")
def test_each_broken_encoder_fails_its_contract_test(broken: Broken) -> None:
    case = ContractCase(make_encoder=broken.cls, make_inputs=vectors)
    test = getattr(ConditionEncoderContract(), broken.test)
    with pytest.raises((AssertionError, ValueError, pytest.fail.Exception)):
        test(case)
    # and the same test passes on the correct encoder, so it is the defect that failed it
    test(ContractCase(make_encoder=Tokens, make_inputs=vectors))


def test_a_non_encoder_fails_with_a_clear_message() -> None:
    case = ContractCase(make_encoder=lambda: nn.Linear(2, 2), make_inputs=vectors)  # type: ignore[arg-type,return-value]
    with pytest.raises(pytest.fail.Exception, match=r"not a ldm_sdk\.encoders\.base\.ConditionEncoder"):
        ConditionEncoderContract().test_output_matches_contract(case)


def test_a_mixin_without_its_methods_says_what_to_implement() -> None:
    class TestNothing(ConditionEncoderContract):
        pass

    with pytest.raises(NotImplementedError, match="must implement make_encoder"):
        TestNothing().make_encoder()


def test_select_and_cast_walk_records_of_batches() -> None:
    @dataclass(frozen=True)
    class Pair:
        image: Tensor
        labels: Tensor
        mode: str

    batch = Pair(torch.zeros(3, 2), torch.arange(3), "fill")
    one = select_inputs({"pair": batch, "texts": ["a", "b", "c"], "scale": 2.0}, 1)
    assert one["texts"] == ["b"] and one["scale"] == 2.0
    assert one["pair"].mode == "fill" and one["pair"].labels.tolist() == [1]
    cast = cast_inputs((batch, ["t"]), torch.float64)
    assert cast[0].image.dtype == torch.float64 and cast[0].labels.dtype == torch.long
    with pytest.raises(TypeError, match="override select_inputs"):
        select_inputs(object(), 0)


# -- the pytest plugin ------------------------------------------------------------------------------------


def test_runtime_fixture_is_a_closed_after_cpu_runtime(ldm_runtime: Runtime) -> None:
    assert ldm_runtime.device == torch.device("cpu") and not ldm_runtime.closed
    assert [p.name for p in ldm_runtime.plugins() if p.enabled] == ["builtin"]
    assert "class" in ldm_runtime.registries.condition_encoders


def test_bundle_fixtures(tiny_bundle: ModelBundle, tiny_sd_bundle: ModelBundle) -> None:
    assert tiny_bundle.config is tiny.LDM_VQ_F4_CLASS and tiny_sd_bundle.config is tiny.SD1
    assert set(tiny_bundle.cond_stage_weights) == {"embedding.weight"}
    assert not tiny_bundle.training


def test_tests_tiny_configs_reexports_the_one_source() -> None:
    import tests.tiny_configs as legacy

    for name in tiny.__all__:
        assert getattr(legacy, name) is getattr(tiny, name), name


def test_the_pytest_plugin_is_loaded_by_entry_point_and_imports_no_torch(
    request: pytest.FixtureRequest,
) -> None:
    import ldm_sdk.testing.pytest_plugin

    # pytest registers pytest11 entry points under their name: no conftest of ours loads it
    assert request.config.pluginmanager.get_plugin("ldm_sdk") is ldm_sdk.testing.pytest_plugin
    code = (
        "import sys, ldm_sdk.testing.pytest_plugin as p\n"
        "assert 'torch' not in sys.modules, 'importing the pytest plugin imported torch'\n"
        "assert {'ldm_runtime', 'tiny_bundle'} <= set(dir(p))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
