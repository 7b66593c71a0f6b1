"""copy_module gives what copy.deepcopy gives: fresh tensors with equal values, shared things
still shared within the copy, and deepcopy itself for modules with their own protocol."""

from __future__ import annotations

import copy

import torch
import torchvision
from torch import nn

from fxcomp.ir.module_copy import copy_module


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.again = self.a
        self.sizes = [1, 2, {"k": torch.ones(2)}]
        self.register_buffer("scale", torch.full((4,), 2.0))


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.copies = 0

    def __deepcopy__(self, memo):
        self.copies += 1
        new = Custom()
        new.fc.load_state_dict(self.fc.state_dict())
        return new


def test_values_equal_storage_fresh_and_types_kept():
    model = torchvision.models.mobilenet_v3_small().eval()
    twin, reference = copy_module(model), copy.deepcopy(model)
    ours, theirs, original = twin.state_dict(), reference.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]) and value.dtype == theirs[key].dtype
        assert value.data_ptr() != original[key].data_ptr() or not value.numel()
    assert [type(m) for m in twin.modules()] == [type(m) for m in reference.modules()]
    assert all(a is not b for a, b in zip(twin.modules(), model.modules(), strict=True))
    assert [(n, type(p), p.requires_grad) for n, p in twin.named_parameters()] == [
        (n, type(p), p.requires_grad) for n, p in reference.named_parameters()
    ]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    twin.features[0][0].weight.data.zero_()
    assert model.features[0][0].weight.abs().sum() > 0


def test_shared_things_stay_shared_within_the_copy():
    model = Tied()
    twin = copy_module(model)
    assert twin.b.weight is twin.a.weight and twin.again is twin.a
    assert twin.a.weight is not model.a.weight
    assert twin.sizes[:2] == [1, 2] and torch.equal(twin.sizes[2]["k"], torch.ones(2))
    assert twin.sizes is not model.sizes and twin.sizes[2]["k"] is not model.sizes[2]["k"]
    assert torch.equal(twin.scale, model.scale) and twin.scale is not model.scale


def test_lstm_flat_weights_point_at_the_copied_parameters():
    lstm = nn.LSTM(4, 8)
    twin = copy_module(lstm)
    assert twin._flat_weights[0] is twin.weight_ih_l0
    assert twin.weight_ih_l0 is not lstm.weight_ih_l0
    torch.testing.assert_close(twin(torch.ones(3, 1, 4))[0], lstm(torch.ones(3, 1, 4))[0])


def test_a_module_with_its_own_deepcopy_is_copied_by_it():
    outer = nn.Sequential(Custom(), nn.ReLU())
    twin = copy_module(outer)
    assert outer[0].copies == 1
    assert torch.equal(twin[0].fc.weight, outer[0].fc.weight)


def test_a_buffer_with_a_gradient_keeps_it():
    model = nn.Linear(2, 2)
    model.register_buffer("tracked", torch.ones(2, requires_grad=True))
    (model.tracked * 2).sum().backward()
    twin = copy_module(model)
    assert twin.tracked.grad is not None and torch.equal(twin.tracked.grad, model.tracked.grad)
