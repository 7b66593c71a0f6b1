"""Weights trained once per machine and kept as safetensors under ``~/.cache/fxcomp``.

The models trained on data that ships with a package (the standard-library LM, torchvision
classifiers on the digits) take seconds to minutes to train; ``cached_training`` trains a
model once and afterwards loads its weights, without unpickling anything. The file name
carries a digest of ``key`` (the architecture, the training settings, the library versions),
so a change to any of them trains again. Two processes asking at once (test workers) take
turns: one trains, the other waits and loads.

Example::

    model = cached_training(build(), "stdlib_lm", repr(settings), lambda m: fit(m, data))
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from safetensors.torch import load_file, save
from torch import nn

from fxcomp.ir.atomic import write_atomic

__all__ = ["cache_path", "cached_training"]


def cache_path(name: str, key: str) -> Path:
    """Where the weights of ``name`` trained as ``key`` describes are kept."""
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "fxcomp" / f"{name}-{digest}.safetensors"


def cached_training(
    model: nn.Module, name: str, key: str, train: Callable[[nn.Module], object]
) -> nn.Module:
    """``model`` (freshly built) with the weights ``train(model)`` gives it, loaded from the
    cache when they are there, else trained and cached; returned in eval mode."""
    path = cache_path(name, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if path.is_file():
            model.load_state_dict(load_file(path))
            return model.eval()
        train(model)
        write_atomic(path, save({k: v.contiguous() for k, v in model.state_dict().items()}))
    return model.eval()
