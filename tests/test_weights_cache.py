"""The cache of weights trained on shipped data: trained once, loaded after, keyed."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

from fxcomp.cli.digits import upsampled_digits
from fxcomp.cli.weights_cache import cache_path, cached_training


def test_weights_are_trained_once_then_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    calls = []

    def fit(model: nn.Module) -> None:
        calls.append(model)
        with torch.no_grad():
            model.weight.fill_(0.5)
        model.train()

    first = cached_training(nn.Linear(3, 2), "toy", "key-1", fit)
    path = cache_path("toy", "key-1")
    assert path.parent == tmp_path / ".cache" / "fxcomp" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name, f"{path.name}.lock"]
    torch.testing.assert_close(load_file(path)["weight"], torch.full((2, 3), 0.5))

    second = cached_training(nn.Linear(3, 2), "toy", "key-1", fit)
    assert len(calls) == 1 and not first.training and not second.training
    torch.testing.assert_close(second.weight, first.weight, rtol=0, atol=0)
    torch.testing.assert_close(second.bias, first.bias, rtol=0, atol=0)

    cached_training(nn.Linear(3, 2), "toy", "key-2", fit)  # other settings: trained again
    assert len(calls) == 2 and cache_path("toy", "key-2") != path


def test_upsampled_digits_are_three_equal_normalised_channels():
    data = upsampled_digits(32)
    assert data.train_x.shape == (1347, 3, 32, 32) and data.test_x.shape == (450, 3, 32, 32)
    assert torch.equal(data.train_x[:, 0], data.train_x[:, 2])
    assert abs(float(data.train_x.mean())) < 0.1 and 0.7 < float(data.train_x.std()) < 1.3
    assert data.test_y.shape == (450,)
