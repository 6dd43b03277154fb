"""``ldm_sdk.accel.stacking``: Parameters moved back to back into one storage, read as one view."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm_sdk.accel.stacking import stack_storage, stacked_view


def test_stacked_parameters_keep_identity_values_and_state_dict() -> None:
    layers = [nn.Linear(6, n) for n in (3, 5, 2)]
    params = [lin.weight for lin in layers]
    values = [p.detach().clone() for p in params]
    assert stacked_view(params) is None  # separate storages
    stack_storage(params)
    assert [lin.weight for lin in layers] == params  # the same Parameter objects
    for p, v in zip(params, values, strict=True):
        assert torch.equal(p, v) and p.is_contiguous()
    view = stacked_view(params)
    assert view is not None and view.shape == (10, 6)
    assert torch.equal(view, torch.cat(values))
    assert view.untyped_storage().data_ptr() == params[0].untyped_storage().data_ptr()
    # in-place loading writes through to the view
    with torch.no_grad():
        layers[1].load_state_dict({"weight": torch.ones(5, 6), "bias": torch.zeros(5)})
    assert torch.equal(view[3:8], torch.ones(5, 6))
    # a Parameter given new memory: no view any more
    layers[2].weight.data = layers[2].weight.detach().clone()
    assert stacked_view(params) is None
    assert stacked_view(params[:2]) is not None


def test_one_dimensional_and_order() -> None:
    biases = [torch.arange(3.0), torch.arange(4.0) + 10]
    stack_storage(biases)
    view = stacked_view(biases)
    assert view is not None and torch.equal(view, torch.tensor([0.0, 1, 2, 10, 11, 12, 13]))
    assert stacked_view(biases[::-1]) is None  # not back to back in this order


def test_stack_storage_refuses_mixed_tensors() -> None:
    with pytest.raises(ValueError, match="one trailing shape, dtype and device"):
        stack_storage([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="one trailing shape, dtype and device"):
        stack_storage([torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="at least one"):
        stack_storage([])
