"""Small helpers over torch.fx graphs that passes and tools share.

Example::

    conv = module_of(gm, node)            # the nn.Module a call_module node runs
    where = source_of(node)               # "model.py:42 `y = self.conv(x)`"
    out, created = inline_graph(gm, node, traced, {"x": node.args[0]}, "block")
"""

from __future__ import annotations

import copy
import os
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import _get_qualified_name, map_arg

from fxcomp.ir.meta import carry_slots

__all__ = [
    "BATCHNORMS",
    "CONVS",
    "ELEMENTWISE_MODULES",
    "LIBRARY_DIRS",
    "drop_unused",
    "inline_graph",
    "module_of",
    "node_counts",
    "rebuilt",
    "replace_module",
    "source_of",
    "state_size",
    "target_name",
]

# Frames from these folders are library code, not the user's source.
LIBRARY_DIRS = (
    os.path.join(os.path.dirname(torch.__file__), ""),
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ""),  # the fxcomp package
)  # with the trailing separator: torchvision/ is not inside torch/
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Exact torch.nn types that act on each element alone: output shape, dtype and channels are
# the input's.
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>.*)')


def source_of(node: Node) -> str | None:
    """The user's source line that created ``node`` ("file.py:12 `code`"), if recorded."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    for file, line, _fn, code in reversed(_FRAME.findall(trace)):
        if not file.startswith(LIBRARY_DIRS):
            return f"{file}:{line} `{code.strip()}`"
    return None


def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, or None for other nodes."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def replace_module(gm: GraphModule, qualified_name: str, new: nn.Module) -> None:
    """Put ``new`` at ``qualified_name`` in ``gm``; other aliases of the old module are kept."""
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, new)


def drop_unused(gm: GraphModule) -> None:
    """Delete the submodules and tensors ``gm``'s graph neither calls nor reads, and turn each
    module kept only to hold others (a BatchNorm folded into its convolution whose activation
    child is still called) into a plain ``nn.Module`` with those children: no dead tensor
    stays.

    Example::

        drop_unused(gm)   # after a pass erased the nodes that called some layers
    """
    for node in reversed(gm.graph.find_nodes(op="get_attr")):
        if not node.users:
            gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    used = {str(n.target) for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for attr in [*gm._parameters, *gm._buffers]:
        if attr not in used:
            delattr(gm, attr)  # the graph is the root's forward: a tensor it does not read is dead
    for name, module in list(gm.named_modules()):
        parts = name.split(".")
        if not name or any(".".join(parts[:i]) in used for i in range(1, len(parts) + 1)):
            continue  # the root, or a module the graph calls or reads (or one inside it)
        tensors = {**module._parameters, **module._buffers}
        if all(f"{name}.{attr}" in used for attr in tensors):
            continue
        holder = nn.Module()
        for child, value in module.named_children():
            holder.add_module(child, value)
        for attr, value in tensors.items():
            if f"{name}.{attr}" not in used:
                continue
            if attr in module._parameters:
                holder.register_parameter(attr, value)
            else:
                persistent = attr not in module._non_persistent_buffers_set
                holder.register_buffer(attr, value, persistent=persistent)
        replace_module(gm, name, holder)


def rebuilt(gm: GraphModule, graph: Graph) -> GraphModule:
    """A module running ``graph`` (built anew by a pass) over ``gm``'s submodules, with
    ``gm``'s calling convention (keyword inputs and structured outputs of a graph captured
    by ``torch.export``) and its graph slots.

    Example::

        lowered = rebuilt(gm, new_graph)
    """
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    new = GraphModule(gm, graph, type(gm).__name__)
    for spec in ("_in_spec", "_out_spec"):
        if hasattr(gm, spec):
            setattr(new, spec, getattr(gm, spec))
    carry_slots(gm, new)
    return new


def target_name(gm: GraphModule, node: Node) -> str:
    """A readable name for what a node calls: module type, function path or method."""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(str(node.target))).__name__})"
    if node.op == "call_function":
        try:
            return _get_qualified_name(node.target)  # type: ignore[arg-type]
        except (RuntimeError, AttributeError):
            return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return str(node.target)


def node_counts(gm: GraphModule) -> dict[str, int]:
    """Number of nodes per FX op kind."""
    return dict(Counter(node.op for node in gm.graph.nodes))


def state_size(module: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes of the saved state) of a module.

    Quantized layers keep their weights packed rather than as parameters; their quantized
    weights count as parameters too, at one byte per int8 element (a dynamic Linear's
    packed ``(weight, bias)`` pair and a dynamic LSTM's packed cell parameters included).
    """
    state = [t for value in _state_tensors(module) for t in _tensors_in(value)]
    params = sum(p.numel() for p in module.parameters())
    params += sum(t.numel() for t in state if t.is_quantized)
    return params, sum(t.numel() * t.element_size() for t in state)


def _tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in a state value: itself, the members of a tuple, or what a packed
    kernel parameter (a TorchScript object) saves."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors_in(v)]
    if isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
        return _tensors_in(value.__getstate__())
    return []


def _state_tensors(module: nn.Module) -> list[Any]:
    """The values ``module.state_dict()`` holds, without building its ordered dict of names:
    plain modules' parameters and persistent buffers are read directly; a module that
    saves its state its own way (packed quantized weights) or has state-dict hooks is asked
    for its entries."""
    if module._state_dict_hooks or module._state_dict_pre_hooks:
        return list(module.state_dict(keep_vars=True).values())
    if type(module)._save_to_state_dict is nn.Module._save_to_state_dict:
        found = [p for p in module._parameters.values() if p is not None]
        skip = module._non_persistent_buffers_set
        found += [b for n, b in module._buffers.items() if b is not None and n not in skip]
    else:
        local: dict[str, Any] = {}
        module._save_to_state_dict(local, "", keep_vars=True)
        found = list(local.values())
    for child in module._modules.values():
        if child is not None:
            found += _state_tensors(child)
    return found


def inline_graph(
    gm: GraphModule, at: Node, graph: Graph, inputs: Mapping[str, Node], prefix: str
) -> tuple[Any, list[Node]]:
    """Copy ``graph``, traced from the submodule of ``gm`` at ``prefix``, into ``gm.graph``
    just before ``at``; return its output value and the nodes created.

    Placeholders named in ``inputs`` become those values; the others were fixed by
    ``concrete_args`` when tracing, so they and the checks FX adds on them are left out.
    Module and attribute targets get ``prefix``; new nodes are named after ``at`` and carry
    its source line.

    Example::

        traced = torch.fx.Tracer().trace(gm.get_submodule("block"))
        out, created = inline_graph(gm, node, traced, {"x": node.args[0]}, "block")
    """
    env: dict[Node, Any] = {}
    specialised: set[Node] = set()
    created: list[Node] = []
    output: Any = None
    for old in graph.nodes:
        if old.op == "placeholder":
            if old.target in inputs:
                env[old] = inputs[old.target]
            else:
                specialised.add(old)
            continue
        if any(n in specialised for n in old.all_input_nodes):
            specialised.add(old)  # an assert on a concrete argument
            continue
        if old.op == "output":
            output = map_arg(old.args[0], env.__getitem__)
            continue
        target = f"{prefix}.{old.target}" if old.op in ("call_module", "get_attr") else old.target
        with gm.graph.inserting_before(at):
            new = gm.graph.create_node(
                old.op,
                target,
                map_arg(old.args, env.__getitem__),
                map_arg(old.kwargs, env.__getitem__),
                name=f"{at.name}_{old.name}",
            )
        new.meta["stack_trace"] = at.meta.get("stack_trace")
        env[old] = new
        created.append(new)
    return output, created
