"""Turning a model spec from the command line into a model.

``torchvision:NAME`` and ``timm:NAME`` build a torchvision or timm model with random
weights (nothing is downloaded); ``transformers:NAME`` one of the small Hugging Face models
of ``fxcomp.cli.zoo`` (``bert``, ``vit``, ``llama``, ...), which come with their own example
inputs (``zoo_inputs``); ``package.module:attr`` and ``path/to/file.py:attr`` import the
named code and call ``attr`` if it is a function or class. Code is run only because the
user named it.

Example::

    model = load_model("torchvision:resnet18")
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from torch import nn

from fxcomp.ir.errors import InputError, did_you_mean

__all__ = ["load_model", "parse_shape", "zoo_inputs"]


def _torchvision(name: str) -> nn.Module:
    import torchvision

    known = torchvision.models.list_models()
    if name not in known:
        raise InputError(
            f"torchvision has no model named '{name}'",
            hint=did_you_mean(name, known, "see torchvision.models.list_models()"),
        )
    return torchvision.models.get_model(name, weights=None)


def _from_file(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"fxcomp_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {path} as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def zoo_inputs(spec: str) -> dict[str, Any] | None:
    """The example inputs of a ``transformers:NAME`` spec (keyword inputs); None for others.

    Example::

        zoo_inputs("transformers:bert")   # {"input_ids": ..., "attention_mask": ...}
    """
    source, _, name = spec.rpartition(":")
    if source != "transformers":
        return None
    from fxcomp.cli.zoo import transformer

    return transformer(name)[1]


def load_model(spec: str) -> nn.Module:
    """The model a spec names: ``torchvision:NAME``, ``timm:NAME``, ``transformers:NAME``,
    ``pkg.mod:attr`` or ``file.py:attr``.

    Example::

        load_model("examples/custom_pass.py:TinyNet")
    """
    source, sep, attr = spec.rpartition(":")
    if not sep or not source or not attr:
        raise InputError(
            f"model spec '{spec}' is not SOURCE:NAME",
            hint="use torchvision:resnet18, timm:mobilevit_xxs, transformers:bert, "
            "my_package.models:build or path/to/model.py:Net",
        )
    if source == "torchvision":
        return _torchvision(attr)
    if source in ("timm", "transformers"):
        from fxcomp.cli.zoo import timm_model, transformer

        return timm_model(attr) if source == "timm" else transformer(attr)[0]
    if source.endswith(".py"):
        container = _from_file(Path(source))
    else:
        try:
            container = importlib.import_module(source)
        except ImportError as err:
            raise InputError(f"cannot import '{source}': {err}") from err
    obj: Any = container
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"'{source}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module) and callable(obj):
        obj = obj()
    if not isinstance(obj, nn.Module):
        raise InputError(
            f"'{spec}' gives a {type(obj).__name__}, not a torch.nn.Module",
            hint="name an nn.Module instance, class, or a function that returns one",
        )
    return obj


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``.

    Example::

        torch.randn(parse_shape("1,3,224,224"))
    """
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise InputError(
            f"input shape '{text}' is not a list of positive integers",
            hint="write it like 1,3,224,224",
        )
    return shape
