"""Contract test mixins for plugin authors (diffusers-style): subclass, fill in a tiny case, get the tests.

:class:`ConditionEncoderContract` checks what every :class:`~ldm_sdk.encoders.base.ConditionEncoder` must
do for the runtime to use it: declare modality / kind / trainable, keep its output contract, move between
dtypes, be deterministic in eval mode, treat batch items independently, give an unconditional output (or
refuse to, for concat maps) and round-trip its ``state_dict``. In a plugin's tests::

    from ldm_sdk.testing.contracts import ConditionEncoderContract


    class TestMyEncoder(ConditionEncoderContract):
        def make_encoder(self):
            return MyEncoder(width=8)  # small: the tests run it a dozen times on the CPU

        def make_inputs(self, batch_size):
            return torch.rand(batch_size, 3, 16, 16)  # a valid batch for forward()

The test class must be named ``Test*`` for pytest to collect it. Inputs of other shapes are handled by
overriding :meth:`~ConditionEncoderContract.select_inputs` (take one item of a batch) and
:meth:`~ConditionEncoderContract.cast_inputs` (move floating inputs to a dtype); ``image_hw`` (class
attribute) lets the concat check verify the map size against ``latent_factor``. To run the same tests over
several encoders, override the ``contract_case`` fixture (parametrize it) instead of the two methods.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

import pytest
import torch
from torch import Tensor

from ldm_sdk.encoders.base import ConditionEncoder, ConditioningKind, OutputContract

__all__ = ["ConditionEncoderContract", "ContractCase", "cast_inputs", "move_encoder", "select_inputs"]

KINDS: tuple[str, ...] = get_args(ConditioningKind)


_SCALARS = (str, bytes, int, float, bool, type(None))


def _is_dataclass_instance(value: object) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def select_inputs(inputs: Any, index: int) -> Any:
    """Item ``index`` of a batch, itself as a batch of one: ``tensor[i:i+1]``, ``[list[i]]``, and the same
    field by field through tuples, dicts and dataclass instances (a record of batches), where scalars
    (options such as a ``str`` or ``float``) are kept. Anything else raises ``TypeError``."""
    if isinstance(inputs, Tensor):
        return inputs[index : index + 1]
    if isinstance(inputs, list):
        return [inputs[index]]
    if isinstance(inputs, tuple):
        return tuple(_select_part(part, index) for part in inputs)
    if isinstance(inputs, Mapping):
        return {k: _select_part(v, index) for k, v in inputs.items()}
    if _is_dataclass_instance(inputs):
        fields = {f.name: _select_part(getattr(inputs, f.name), index) for f in dataclasses.fields(inputs)}
        return dataclasses.replace(inputs, **fields)
    raise TypeError(
        f"cannot take one item of inputs of type {type(inputs).__name__}: the default select_inputs handles "
        "tensors (dim 0), lists, and tuples / dicts / dataclasses of those; override "
        "select_inputs(inputs, index)"
    )


def _select_part(part: Any, index: int) -> Any:
    return part if isinstance(part, _SCALARS) else select_inputs(part, index)


def cast_inputs(inputs: Any, dtype: torch.dtype) -> Any:
    """``inputs`` with every floating tensor (through lists, tuples, dicts and dataclass instances) cast to
    ``dtype``; integer tensors (labels, token ids), strings and other objects are returned unchanged."""
    if isinstance(inputs, Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, list):
        return [cast_inputs(v, dtype) for v in inputs]
    if isinstance(inputs, tuple):
        return tuple(cast_inputs(v, dtype) for v in inputs)
    if isinstance(inputs, Mapping):
        return {k: cast_inputs(v, dtype) for k, v in inputs.items()}
    if _is_dataclass_instance(inputs):
        fields = {f.name: cast_inputs(getattr(inputs, f.name), dtype) for f in dataclasses.fields(inputs)}
        return dataclasses.replace(inputs, **fields)
    return inputs


def move_encoder(encoder: ConditionEncoder, dtype: torch.dtype) -> None:
    """``encoder.to(dtype)``: how the dtype test moves an encoder (override for encoders that reference
    modules they do not own, such as a shared first stage)."""
    encoder.to(dtype)


@dataclass(frozen=True)
class ContractCase:
    """One encoder under test: how to build a fresh (small) instance and a valid batch of inputs.

    ``make_encoder()`` must build an instance with the same parameter names and shapes on every call (the
    state-dict test loads one instance's weights into another). ``image_hw`` is the size of the IMAGE the
    conditioning is for, so the concat check can verify ``latent_factor`` (None: not checked). ``move``
    changes the encoder's dtype (default :func:`move_encoder`).
    """

    make_encoder: Callable[[], ConditionEncoder]
    make_inputs: Callable[[int], Any]
    image_hw: tuple[int, int] | None = None
    select_inputs: Callable[[Any, int], Any] = select_inputs
    cast_inputs: Callable[[Any, torch.dtype], Any] = cast_inputs
    move: Callable[[ConditionEncoder, torch.dtype], None] = move_encoder
    name: str = ""

    def encoder(self) -> ConditionEncoder:
        """A fresh instance in eval mode; the test fails if it is not a ``ConditionEncoder``."""
        encoder = self.make_encoder()
        if not isinstance(encoder, ConditionEncoder):
            pytest.fail(
                f"{self.label()}: make_encoder() returned a {type(encoder).__name__}, not a "
                "ldm_sdk.encoders.base.ConditionEncoder subclass"
            )
        return encoder.eval()

    def label(self) -> str:
        return self.name or "the encoder"


def _run(encoder: ConditionEncoder, inputs: Any) -> Tensor:
    with torch.no_grad():
        out = encoder(inputs)
    if not isinstance(out, Tensor):
        pytest.fail(f"{type(encoder).__name__}.forward returned a {type(out).__name__}, not a Tensor")
    return out


def _float_state(encoder: ConditionEncoder) -> list[Tensor]:
    return [t for t in encoder.state_dict().values() if t.is_floating_point() and t.numel()]


class ConditionEncoderContract:
    """Pytest mixin: every test a :class:`~ldm_sdk.encoders.base.ConditionEncoder` must pass.

    Subclass it in a ``Test*`` class and implement :meth:`make_encoder` and :meth:`make_inputs` (or override
    the ``contract_case`` fixture). Tolerances are class attributes, for encoders whose float64 and float32
    results legitimately differ more (deep transformers).
    """

    #: size of the image the conditioning is for (checks a concat encoder's ``latent_factor``); None: skip
    image_hw: ClassVar[tuple[int, int] | None] = None
    #: max |batch row - item alone| (batch independence)
    batch_atol: ClassVar[float] = 1e-5
    #: max |float64 output - float32 output| relative to max |float32 output|
    dtype_rtol: ClassVar[float] = 1e-4
    #: batch size of the inputs most tests use
    batch_size: ClassVar[int] = 2

    # -- what a subclass provides ---------------------------------------------------------------------
    def make_encoder(self) -> ConditionEncoder:
        """A small instance of the encoder under test (random weights are fine)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_encoder() (or override the contract_case fixture)"
        )

    def make_inputs(self, batch_size: int) -> Any:
        """A valid batch of ``batch_size`` inputs for ``forward`` whose items differ from each other."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement make_inputs(batch_size) (or override contract_case)"
        )

    def select_inputs(self, inputs: Any, index: int) -> Any:
        """Item ``index`` of a batch as a batch of one (default: :func:`select_inputs`)."""
        return select_inputs(inputs, index)

    def cast_inputs(self, inputs: Any, dtype: torch.dtype) -> Any:
        """``inputs`` with floating tensors cast to ``dtype`` (default: :func:`cast_inputs`)."""
        return cast_inputs(inputs, dtype)

    def move_encoder(self, encoder: ConditionEncoder, dtype: torch.dtype) -> None:
        """Change the encoder's dtype (default: ``encoder.to(dtype)``)."""
        move_encoder(encoder, dtype)

    @pytest.fixture
    def contract_case(self) -> ContractCase:
        """The case every contract test runs on; override (and parametrize) to test several encoders."""
        return ContractCase(
            make_encoder=self.make_encoder,
            make_inputs=self.make_inputs,
            image_hw=self.image_hw,
            select_inputs=self.select_inputs,
            cast_inputs=self.cast_inputs,
            move=self.move_encoder,
            name=type(self).__name__,
        )

    # -- declarations ---------------------------------------------------------------------------------
    def test_declares_modality_kind_and_trainable(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        cls = type(encoder)
        modality = getattr(cls, "modality", None)
        assert isinstance(modality, str) and modality, f"{cls.__name__}.modality must be a non-empty str"
        kind = getattr(cls, "kind", None)
        assert kind in KINDS, f"{cls.__name__}.kind is {kind!r}; valid: {', '.join(KINDS)}"
        trainable = getattr(cls, "trainable", None)
        assert isinstance(trainable, bool), f"{cls.__name__}.trainable must be a bool, got {trainable!r}"
        targets = cls.compvis_targets
        assert isinstance(targets, tuple) and all(isinstance(t, str) and t for t in targets), (
            f"{cls.__name__}.compvis_targets must be a tuple of CompVis target strings, got {targets!r}"
        )
        contract = encoder.contract()
        assert isinstance(contract, OutputContract), f"{cls.__name__}.contract() must return OutputContract"
        assert contract.kind == kind, f"contract().kind {contract.kind!r} != {cls.__name__}.kind {kind!r}"
        assert contract.channels > 0, f"contract().channels must be positive, got {contract.channels}"

    def test_parameters_follow_trainable(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        name = type(encoder).__name__
        for mode in ("eval", "train"):
            getattr(encoder, mode)()
            grads = [n for n, p in encoder.named_parameters() if p.requires_grad]
            if encoder.trainable:
                assert grads, f"{name} declares trainable=True but no parameter requires grad ({mode} mode)"
            else:
                assert not grads, (
                    f"{name} declares trainable=False (frozen) but these parameters require grad in "
                    f"{mode} mode: {grads[:5]}"
                )

    # -- outputs --------------------------------------------------------------------------------------
    def test_output_matches_contract(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        b = self.batch_size
        out = _run(encoder, contract_case.make_inputs(b))
        contract = encoder.contract()
        contract.check(out, batch=b, image_hw=contract_case.image_hw)
        assert out.is_floating_point(), f"the output must be floating point, got {out.dtype}"
        assert torch.isfinite(out).all(), "the output holds NaN or inf"
        slot = encoder.conditioning(out)
        field = {"crossattn": "crossattn", "concat": "concat", "adm": "y"}[contract.kind]
        assert getattr(slot, field) is out, f"conditioning() must put a {contract.kind} output in .{field}"

    def test_deterministic_in_eval_mode(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        inputs = contract_case.make_inputs(self.batch_size)
        first, second = _run(encoder, inputs), _run(encoder, inputs)
        assert torch.equal(first, second), "two eval-mode calls on the same inputs gave different outputs"

    def test_batch_items_are_independent(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        b = self.batch_size
        inputs = contract_case.make_inputs(b)
        together = _run(encoder, inputs)
        for i in range(b):
            alone = _run(encoder, contract_case.select_inputs(inputs, i))
            row = together[i : i + 1]
            assert alone.shape == row.shape, (
                f"item {i} alone has shape {list(alone.shape)}, in the batch {list(row.shape)}"
            )
            diff = float((alone - row).abs().max())
            assert diff <= self.batch_atol, (
                f"item {i} encoded alone differs from its row in a batch of {b} by {diff:.3g} "
                f"(> {self.batch_atol}): batch items must not influence each other"
            )
        if b > 1:
            assert not torch.equal(together[0], together[1]), (
                "make_inputs must give items that differ, and the encoder must tell them apart "
                "(rows 0 and 1 are identical)"
            )

    def test_float64_and_back(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        inputs = contract_case.make_inputs(self.batch_size)
        out32 = _run(encoder, inputs)
        contract_case.move(encoder, torch.float64)
        out64 = _run(encoder, contract_case.cast_inputs(inputs, torch.float64))
        assert out64.dtype == torch.float64, (
            f"after .to(torch.float64) the output must be float64, got {out64.dtype} (follow the parameters' "
            "dtype; cast floating inputs to it)"
        )
        scale = max(float(out32.abs().max()), 1e-12)
        rel = float((out64 - out32.double()).abs().max()) / scale
        assert rel <= self.dtype_rtol, (
            f"float64 output differs from float32 by {rel:.3g} (> {self.dtype_rtol})"
        )
        contract_case.move(encoder, torch.float32)
        back = _run(encoder, inputs)
        assert back.dtype == out32.dtype, f"after moving back the output is {back.dtype}, was {out32.dtype}"
        torch.testing.assert_close(back, out32, rtol=0, atol=1e-6, msg="float32 -> float64 -> float32 drifts")

    # -- unconditional --------------------------------------------------------------------------------
    def test_unconditional(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        contract = encoder.contract()
        b = self.batch_size
        if contract.kind == "concat":
            with pytest.raises(ValueError):
                encoder.unconditional(b)
            return
        with torch.no_grad():
            uncond = encoder.unconditional(b)
            again = encoder.unconditional(b)
        contract.check(uncond, batch=b, image_hw=contract_case.image_hw)
        assert torch.equal(uncond, again), "unconditional() must be deterministic"
        assert torch.equal(uncond[0], uncond[-1]), "unconditional() must give the same row for every item"
        out = _run(encoder, contract_case.make_inputs(b))
        assert uncond.dtype == out.dtype and uncond.device == out.device, (
            f"unconditional() is {uncond.dtype} on {uncond.device}, forward() {out.dtype} on {out.device}: "
            "classifier-free guidance concatenates them"
        )
        assert uncond.shape[1:] == out.shape[1:], (
            f"unconditional() rows {list(uncond.shape[1:])} != forward() rows {list(out.shape[1:])}"
        )

    # -- state dict -----------------------------------------------------------------------------------
    def test_state_dict_round_trip(self, contract_case: ContractCase) -> None:
        encoder = contract_case.encoder()
        with torch.no_grad():  # make the weights differ from anything a fresh instance could start with
            g = torch.Generator().manual_seed(1234)
            for tensor in _float_state(encoder):
                tensor.add_(torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * 0.05)
        inputs = contract_case.make_inputs(self.batch_size)
        expected = _run(encoder, inputs)
        buffer = io.BytesIO()
        torch.save(encoder.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)  # plain tensors only: what a checkpoint can hold
        fresh = contract_case.encoder()
        if _float_state(fresh):
            assert not torch.equal(_run(fresh, inputs), expected), (
                "a fresh instance already gives the saved encoder's output: the round trip proves nothing"
            )
        fresh.load_state_dict(state, strict=True)
        fresh.eval()
        torch.testing.assert_close(
            _run(fresh, inputs), expected, rtol=0, atol=0, msg="output changed after a state_dict round trip"
        )
