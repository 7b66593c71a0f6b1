"""A deep copy of a module tree, several times faster than ``copy.deepcopy``.

``copy.deepcopy`` reconstructs every attribute of every module through the pickle protocol,
the eight empty hook dictionaries of each module included. ``copy_module`` gives the same
result for modules that copy like a plain ``nn.Module`` (no ``__deepcopy__``,
``__reduce_ex__`` or ``__getstate__`` of their own): it makes each instance directly,
copies tensors with their own ``__deepcopy__``, shares immutable values, makes empty
containers anew, and leaves everything else (and every other kind of module) to
``copy.deepcopy`` with the same memo, so tied weights and shared submodules stay shared.

Example::

    twin = copy_module(model)
    twin.fc.weight is not model.fc.weight     # True; tied weights stay tied within twin
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

__all__ = ["copy_module"]

_IMMUTABLE = (int, float, bool, str, bytes, type(None), complex, type)


def _plain(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies instances of ``cls`` through the default protocol:
    a new instance, its ``__getstate__`` deep-copied, handed to its ``__setstate__``."""
    return (
        getattr(cls, "__deepcopy__", None) is None
        and cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
    )


def _tensor(value: torch.Tensor, memo: dict[int, Any]) -> torch.Tensor | None:
    """A plain strided parameter or leaf tensor with no gradient and no attributes of its
    own, copied as its ``__deepcopy__`` would; None for anything else."""
    if (
        value.__dict__
        or value.grad is not None
        or value.layout != torch.strided
        or value.is_quantized
        or not value.is_leaf
    ):
        return None
    data = value.detach().clone(memory_format=torch.preserve_format)
    if type(value) is nn.Parameter:
        new = nn.Parameter(data, value.requires_grad)
    elif type(value) is torch.Tensor:
        new = data.requires_grad_(value.requires_grad)
    else:
        return None
    memo[id(value)] = new
    return new


def _value(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, _IMMUTABLE):
        return value
    if id(value) in memo:
        return memo[id(value)]
    if type(value) is tuple and all(isinstance(item, _IMMUTABLE) for item in value):
        return value
    if isinstance(value, torch.Tensor) and (new := _tensor(value, memo)) is not None:
        return new
    if type(value) in (dict, OrderedDict) and not value:
        return type(value)()
    if isinstance(value, nn.Module):
        return _copy(value, memo)
    if type(value) in (dict, OrderedDict) and id(value) not in memo:
        new = type(value)()
        memo[id(value)] = new
        for key, item in value.items():
            new[key] = _value(item, memo)
        return new
    return copy.deepcopy(value, memo)


def _copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    state = module.__getstate__() if _plain(cls) else None
    if type(state) is not dict:
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    new.__setstate__({key: _value(value, memo) for key, value in state.items()})
    return new


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` (see the module docstring).

    Example::

        twin = copy_module(torchvision.models.resnet18())
    """
    return _copy(module, {})
