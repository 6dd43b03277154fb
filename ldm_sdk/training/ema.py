"""Exponential moving average of the UNet weights, with CompVis ``LitEma`` semantics and names.

For each trainable parameter ``name`` of the module it follows (CompVis: ``LatentDiffusion.model``, the
``DiffusionWrapper``; names ``diffusion_model.input_blocks.0.0.weight``), a buffer named without dots
(``diffusion_modelinput_blocks00weight``) holds the average; ``decay`` (float32) and ``num_updates``
(int32) are buffers too. So ``{"model_ema." + k: v for k, v in ema.state_dict().items()}`` is exactly the
``model_ema.*`` part of a CompVis checkpoint, and :meth:`LitEma.bundle_weights` is what
``ModelBundle.ema_weights`` holds.

Update (``LitEma.forward``), after every optimizer step::

    num_updates += 1                                    (when counting updates, the default)
    d = min(decay, (1 + num_updates) / (10 + num_updates))
    shadow -= (1 - d) * (shadow - param)

Parameters may be FSDP DTensors: the shadows are then sharded the same way, and :meth:`bundle_weights`
gathers full tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

EMA_PREFIX = "model_ema."


def shadow_name(parameter_name: str) -> str:
    """The buffer name of a parameter's average: the parameter name without dots (``LitEma``)."""
    return parameter_name.replace(".", "")


def decay_at(decay: float, num_updates: int) -> float:
    """The decay ``LitEma`` applies at its ``num_updates``-th update (counted from 1)."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


def _full(t: Tensor) -> Tensor:
    full_tensor = getattr(t, "full_tensor", None)  # an FSDP2 DTensor shard -> the whole tensor
    return full_tensor() if callable(full_tensor) else t


class LitEma(nn.Module):
    """EMA of ``model``'s trainable parameters (CompVis ``LitEma``).

    Args:
        model: the module to follow (its ``named_parameters`` names become the shadow names).
        decay: the final decay (``0.9999`` in CompVis), in [0, 1].
        use_num_updates: warm the decay up with ``(1 + n) / (10 + n)``; when False ``num_updates`` is -1
            and ``decay`` is used from the first update.
    """

    decay: Tensor
    num_updates: Tensor

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        self.m_name2s_name: dict[str, str] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = shadow_name(name)
            if s_name in self.m_name2s_name.values():
                raise ValueError(f"two parameters map to the EMA buffer name {s_name!r}; rename one")
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, p.detach().clone())
        self._stored: list[Tensor] = []
        self._host: tuple[float, int] | None = None

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update towards ``model``'s current parameters.

        No host synchronisation: ``decay`` and ``num_updates`` are mirrored on the host (read once after
        construction or a load), and the update is three ``torch._foreach`` ops over all parameters
        (``diff = shadow - param; diff *= 1 - d; shadow -= diff``: the loop's arithmetic, bit for bit) where
        every tensor is a plain tensor; FSDP's DTensors take the per-parameter loop.
        """
        final_decay, updates = self._host_state()
        decay = final_decay
        if updates >= 0:
            updates += 1
            self.num_updates += 1  # on the buffer's device, no sync
            decay = decay_at(final_decay, updates)
        self._host = (final_decay, updates)
        one_minus_decay = 1.0 - decay
        buffers = dict(self.named_buffers())
        shadows: list[Tensor] = []
        params: list[Tensor] = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                if name in self.m_name2s_name:
                    raise ValueError(f"parameter {name!r} is frozen now but was trained when the EMA began")
                continue
            s_name = self.m_name2s_name.get(name)
            if s_name is None:
                raise ValueError(f"parameter {name!r} has no EMA shadow; the EMA follows another model")
            shadow = buffers[s_name]
            if shadow.dtype != p.dtype:
                raise ValueError(f"EMA shadow {s_name} is {shadow.dtype} but the parameter is {p.dtype}")
            shadows.append(shadow)
            params.append(p.detach())
        if all(type(t) is Tensor or type(t) is nn.Parameter for t in (*shadows, *params)):
            diffs = torch._foreach_sub(shadows, params)
            torch._foreach_mul_(diffs, one_minus_decay)
            torch._foreach_sub_(shadows, diffs)
        else:
            for shadow, p in zip(shadows, params, strict=True):
                shadow.sub_(one_minus_decay * (shadow - p))

    def _host_state(self) -> tuple[float, int]:
        """``(decay, num_updates)`` as Python numbers: read from the buffers once, then kept in step."""
        if self._host is None:
            self._host = (float(self.decay), int(self.num_updates))
        return self._host

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self._host = None  # the buffers change: read them again at the next update
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Put the averages into ``model``'s parameters."""
        shadows = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.copy_(shadows[self.m_name2s_name[name]])

    def store(self, parameters: Iterator[nn.Parameter]) -> None:
        """Keep copies of ``parameters`` for :meth:`restore`."""
        self._stored = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterator[nn.Parameter]) -> None:
        for stored, p in zip(self._stored, parameters, strict=True):
            p.copy_(stored)
        self._stored = []

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[None]:
        """Within the block ``model`` holds the EMA weights; its own come back afterwards."""
        self.store(model.parameters())
        self.copy_to(model)
        try:
            yield
        finally:
            self.restore(model.parameters())

    def bundle_weights(self) -> dict[str, Tensor]:
        """``model_ema.*`` entries as a CompVis checkpoint (and ``ModelBundle.ema_weights``) hold them."""
        return {EMA_PREFIX + k: _full(v).detach() for k, v in self.state_dict().items()}

    def load_bundle_weights(self, weights: dict[str, Tensor]) -> None:
        """Inverse of :meth:`bundle_weights` (strict: every shadow, ``decay`` and ``num_updates``)."""
        state = self.state_dict()
        given = {k.removeprefix(EMA_PREFIX): v for k, v in weights.items() if k.startswith(EMA_PREFIX)}
        missing, unexpected = sorted(set(state) - set(given)), sorted(set(given) - set(state))
        if missing or unexpected:
            raise ValueError(
                f"EMA weights do not fit this model: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)})"
            )
        self._host = None  # decay / num_updates change: read them again at the next update
        with torch.no_grad():
            for k, target in state.items():
                value = given[k]
                if hasattr(target, "device_mesh"):  # DTensor shard: take this rank's piece of the full value
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
                    target.to_local().copy_(value.to_local())
                else:
                    target.copy_(value)


__all__ = ["EMA_PREFIX", "LitEma", "decay_at", "shadow_name"]
