"""Putting a compiled graph's compressed layers back into the model it came from.

A graph captures one calling pattern; a model may have others the graph does not hold
(a Hugging Face causal LM's ``generate``, decoding one token at a time with its key/value
cache). ``transplant(model, compiled, example_inputs)`` returns a copy of ``model`` in which
every submodule a pass replaced in ``compiled`` (same qualified name, another class, such
as a ``WeightOnlyLinear`` for an ``nn.Linear``) is the compiled one, and every parameter or
buffer the graph reads and a pass changed (a LayerNorm an AWQ scale folded into) has the
compiled value; then it checks that the copy computes what ``compiled`` computes on
``example_inputs``. The caller's model is not changed.

Example::

    result = fxcomp.compile(lm, {"input_ids": ids}, passes=[quantize_weights(bits=4)])
    small = fxcomp.transplant(lm, result.module, {"input_ids": ids})
    small.generate(ids, max_new_tokens=32)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from fxcomp.ir.errors import InputError, VerificationError
from fxcomp.ir.module_copy import copy_module
from fxcomp.runtime.parity import sqnr

__all__ = ["transplant"]

# the copy must match the compiled graph to this SQNR: the same layers, computed in another
# order of ops; in 16-bit floats that order alone costs about as much as 8-bit mantissas hold
_FLOOR_DB = {torch.float32: 60.0, torch.float64: 60.0, torch.bfloat16: 30.0, torch.float16: 30.0}


def transplant(
    model: nn.Module,
    compiled: GraphModule,
    example_inputs: Any,
    *,
    floor_db: float | None = None,
) -> nn.Module:
    """A copy of ``model`` with the layers and tensors passes changed in ``compiled``
    (module docstring), verified on ``example_inputs`` (a tensor, a tuple or a dict of
    keyword inputs) to match ``compiled`` within ``floor_db`` dB (by default 60 for a
    float32 model, 30 for a bfloat16 or float16 one).

    Example::

        small = fxcomp.transplant(lm, result.module, {"input_ids": ids})
    """
    copy = copy_module(model).eval()
    own = dict(copy.named_modules())
    moved = []
    for node in compiled.graph.find_nodes(op="call_module"):
        name = str(node.target)
        new = compiled.get_submodule(name)
        if name in own and type(own[name]) is not type(new) and not isinstance(new, GraphModule):
            copy.set_submodule(name, copy_module(new))
            moved.append(name)
    tensors = {**dict(copy.named_parameters()), **dict(copy.named_buffers())}
    for node in compiled.graph.find_nodes(op="get_attr"):
        value = _attr(compiled, str(node.target))
        mine = tensors.get(str(node.target))
        same_shape = mine is not None and mine.shape == getattr(value, "shape", None)
        if same_shape and not torch.equal(mine, value):
            with torch.no_grad():
                mine.copy_(value)
            moved.append(str(node.target))
    if not moved:
        raise InputError(
            "transplant: no layer or tensor of the compiled graph differs from the model's",
            hint="compile the model with a pass that replaces layers (quantize_weights, "
            "cast_weights, share_weights) under their own names",
        )
    if floor_db is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        floor_db = _FLOOR_DB.get(dtype, 60.0)
    _verify(copy, compiled, example_inputs, floor_db)
    return copy


def _attr(module: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)


def _verify(copy: nn.Module, compiled: GraphModule, inputs: Any, floor_db: float) -> None:
    with torch.no_grad():
        if isinstance(inputs, dict):
            mine = copy(**inputs)
            theirs = compiled(*[v for v in inputs.values() if isinstance(v, torch.Tensor)])
        else:
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            mine, theirs = copy(*inputs), compiled(*inputs)
    expected, actual = tree_leaves(theirs)[0], tree_leaves(mine)[0]
    if expected.shape != actual.shape or sqnr(expected, actual) < floor_db:
        raise VerificationError(
            f"transplant: the model with the compiled layers differs from the compiled graph "
            f"({sqnr(expected, actual):.1f} dB < {floor_db} dB)",
            hint="a pass changed more than layers and tensors (a fusion, a rewrite of the "
            "graph); transplant takes weight compression only",
        )
