"""Lifting an exported ATen graph to the module-level form the passes work on.

``torch.export`` captures a model as ATen ops over its parameters. ``lift`` rewrites that
graph, node by node, into what symbolic tracing gives, so that no pass needs to know which
capture ran:

* a layer call: ``aten.linear``, ``aten.conv1d/2d/3d``, ``aten.batch_norm``,
  ``aten.layer_norm``, ``aten.group_norm`` or ``aten.embedding`` on the parameters of a
  ``torch.nn`` layer of exactly that kind (a subclass may do more in its forward) with the
  same settings becomes a ``call_module`` of that layer, under the model's own qualified
  name (``encoder.layer.3.attention.self.query``);
* the same ops on other tensors (a tied weight, a subclass's parameters) become their
  ``torch.nn.functional`` form;
* every other ATen op with a torch-level equivalent becomes it: the functions, methods and
  operators the passes know by a table (``aten.view`` -> ``.view()``, ``aten.add.Tensor``
  -> ``+``, ``aten.scaled_dot_product_attention`` -> ``F.scaled_dot_product_attention``,
  ``aten.slice`` -> ``x[..., a:b]``), the rest by name (``aten.arange`` -> ``torch.arange``,
  ``aten.new_ones`` -> ``.new_ones()``), which scripting and ONNX export take with sizes
  computed in the graph; an in-place op becomes its out-of-place form where nothing reads
  the mutated tensor afterwards;
* dropout (the model is in eval mode), tensor-metadata asserts, the export's shape guards
  and conversions to the dtype and device a tensor already has are dropped.

Anything else stays as the ATen op: it runs, and a pass that does not know it leaves it
alone or says why (``fxcomp dump`` shows its target).

Example::

    exported = torch.export.export(model, (x,), strict=False)
    gm = lift(model, exported.module())
"""

from __future__ import annotations

import copy
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_structure, tree_unflatten

__all__ = ["lift", "lift_layers"]

aten = torch.ops.aten

# ATen op -> the torch-level function with the same arguments
_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    aten.relu.default: torch.relu,
    aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh,
    aten.hardswish.default: F.hardswish,
    aten.hardsigmoid.default: F.hardsigmoid,
    aten.hardtanh.default: F.hardtanh,
    aten.silu.default: F.silu,
    aten.gelu.default: F.gelu,
    aten.add.Tensor: operator.add,
    aten.sub.Tensor: operator.sub,
    aten.mul.Tensor: operator.mul,
    aten.div.Tensor: operator.truediv,
    aten.matmul.default: torch.matmul,
    aten.cat.default: torch.cat,
    aten.flatten.using_ints: torch.flatten,
    aten.mean.dim: torch.mean,
    aten.sum.dim_IntList: torch.sum,
    aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split,
    aten.chunk.default: torch.chunk,
    aten.softmax.int: torch.softmax,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.layer_norm.default: F.layer_norm,
    aten.linear.default: F.linear,
    aten.conv1d.default: F.conv1d,
    aten.conv2d.default: F.conv2d,
    aten.conv3d.default: F.conv3d,
}
# ATen op -> the tensor method with the same arguments
_METHODS = {
    aten.view.default: "view",
    aten.reshape.default: "reshape",
    aten.permute.default: "permute",
    aten.transpose.int: "transpose",
    aten.unsqueeze.default: "unsqueeze",
    aten.squeeze.dim: "squeeze",
    aten.expand.default: "expand",
    aten.clone.default: "clone",
    aten.sym_size.int: "size",
}
# in-place ATen op -> its out-of-place one
_IN_PLACE = {
    aten.relu_.default: aten.relu.default,
    aten.sigmoid_.default: aten.sigmoid.default,
    aten.tanh_.default: aten.tanh.default,
    aten.hardswish_.default: aten.hardswish.default,
    aten.hardsigmoid_.default: aten.hardsigmoid.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.silu_.default: aten.silu.default,
    aten.add_.Tensor: aten.add.Tensor,
    aten.sub_.Tensor: aten.sub.Tensor,
    aten.mul_.Tensor: aten.mul.Tensor,
    aten.div_.Tensor: aten.div.Tensor,
}
_DROPOUTS = {aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default}
_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default}
_CONVERSIONS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}
_CONVS = {
    aten.conv1d.default: nn.Conv1d,
    aten.conv2d.default: nn.Conv2d,
    aten.conv3d.default: nn.Conv3d,
}
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# the torch.nn layers a call can be lifted to (a subclass becomes one: ``_Layers.exact``)
_LAYER_KINDS = (nn.Linear, *_CONVS.values(), *_BATCHNORMS, nn.LayerNorm, nn.GroupNorm, nn.Embedding)

_CONV_PARAMETERS = {"input": None, "weight": None, "bias": None, "stride": 1, "padding": 0}
_CONV_PARAMETERS |= {"dilation": 1, "groups": 1}
_NORM = {"weight": None, "bias": None}
# torch.nn.functional layer call -> (its ATen op, the function's parameters in order with
# their defaults, the ATen op's argument order)
_FUNCTIONAL_LAYERS: dict[Any, tuple[Any, dict[str, Any], tuple[str, ...]]] = {
    F.linear: (aten.linear.default, {"input": None, **_NORM}, ("input", "weight", "bias")),
    **{
        function: (op, _CONV_PARAMETERS, tuple(_CONV_PARAMETERS))
        for function, op in zip((F.conv1d, F.conv2d, F.conv3d), _CONVS, strict=True)
    },
    F.batch_norm: (
        aten.batch_norm.default,
        {"input": None, "running_mean": None, "running_var": None, **_NORM, "training": False}
        | {"momentum": 0.1, "eps": 1e-5},
        ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
    ),
    F.layer_norm: (
        aten.layer_norm.default,
        {"input": None, "normalized_shape": None, **_NORM, "eps": 1e-5},
        ("input", "normalized_shape", "weight", "bias", "eps"),
    ),
    F.group_norm: (
        aten.group_norm.default,
        {"input": None, "num_groups": None, **_NORM, "eps": 1e-5},
        ("input", "num_groups", "weight", "bias", "eps"),
    ),
}


def _attr(node: Any) -> str | None:
    """The qualified name a ``get_attr`` node reads, or None."""
    return str(node.target) if isinstance(node, Node) and node.op == "get_attr" else None


def _arg(node: Any, index: int, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else default


def _aliases(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every name of each parameter and buffer (a tied weight has several), by name."""
    names: dict[int, list[str]] = {}
    tensors = root.named_parameters(remove_duplicate=False)
    for name, tensor in [*tensors, *root.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    return {name: tuple(group) for group in names.values() for name in group}


class _Layers:
    """Finds the ``torch.nn`` layer an ATen op computes exactly, on its own parameters.

    The layer may be a subclass (timm's ``BatchNormAct2d``, ``Conv2dSame``, ``LayerNorm2d``):
    what its forward does besides the op is already in the graph as other nodes, so the
    layer becomes an instance of the ``torch.nn`` class itself, holding the same tensors
    and submodules under the same name (``exact``)."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.aliases = _aliases(root)

    def owner(self, names: list[str | None], suffixes: tuple[str, ...], kind: Any) -> str | None:
        """The layer of exactly ``kind`` whose ``suffixes`` (``weight``, ``bias``, ...) the
        tensors ``names`` are, under any of their names; a missing tensor (None) must be
        one the layer lacks too."""
        first = next((n for n in names if n is not None), None)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        for alias in self.aliases.get(first, (first,)) if first else ():
            prefix = alias.rpartition(".")[0]
            try:
                layer = self.root.get_submodule(prefix)
            except AttributeError:
                continue
            if isinstance(layer, kinds) and all(
                getattr(layer, suffix, None) is None
                if name is None
                else f"{prefix}.{suffix}" in self.aliases.get(name, (name,))
                for name, suffix in zip(names, suffixes, strict=True)
            ):
                return prefix
        return None

    def __call__(self, node: _Op) -> tuple[str, Any] | None:
        """(qualified name, input) when ``node`` computes exactly a layer of the model, which
        is then of its ``torch.nn`` class exactly."""
        found = self.match(node)
        if found is not None:
            self.exact(found[0])
        return found

    def exact(self, prefix: str) -> nn.Module:
        """The layer at ``prefix``, made an instance of the ``torch.nn`` class it derives
        from if it is a subclass: a shallow copy (same tensors, submodules and settings)
        whose class is that one, put in its place."""
        layer = self.root.get_submodule(prefix)
        kind = next((k for k in _LAYER_KINDS if isinstance(layer, k)), type(layer))
        if type(layer) is not kind:
            layer = copy.copy(layer)
            layer.__class__ = kind
            self.root.set_submodule(prefix, layer)
        return layer

    def match(self, node: _Op) -> tuple[str, Any] | None:
        """``__call__`` without making the layer exact."""
        target = node.target
        weight_bias = [_attr(_arg(node, 1)), _attr(_arg(node, 2))]
        if target is aten.linear.default:
            prefix = self.owner(weight_bias, ("weight", "bias"), nn.Linear)
            return (prefix, node.args[0]) if prefix else None
        if target in _CONVS:
            prefix = self.owner(weight_bias, ("weight", "bias"), _CONVS[target])
            conv = self.root.get_submodule(prefix) if prefix else None
            settings = [_arg(node, i, d) for i, d in ((3, 1), (4, 0), (5, 1), (6, 1))]
            if conv is None or conv.padding_mode != "zeros":
                return None
            rank = len(conv.kernel_size)
            given = [tuple(s) if isinstance(s, list | tuple) else (s,) * rank for s in settings[:3]]
            wanted = [conv.stride, conv.padding, conv.dilation, conv.groups]
            return (prefix, node.args[0]) if [*given, settings[3]] == wanted else None
        if target is aten.batch_norm.default:
            names = [_attr(_arg(node, i)) for i in (1, 2, 3, 4)]
            suffixes = ("weight", "bias", "running_mean", "running_var")
            prefix = self.owner(names, suffixes, _BATCHNORMS)
            exact = prefix and _arg(node, 5) is False
            return (prefix, node.args[0]) if exact and _arg(node, 7) == self._eps(prefix) else None
        if target in (aten.layer_norm.default, aten.group_norm.default):
            names = [_attr(_arg(node, 2)), _attr(_arg(node, 3))]
            kind = nn.LayerNorm if target is aten.layer_norm.default else nn.GroupNorm
            prefix = self.owner(names, ("weight", "bias"), kind)
            if prefix is None or _arg(node, 4, 1e-5) != self._eps(prefix):
                return None
            layer = self.root.get_submodule(prefix)
            shape = layer.normalized_shape if kind is nn.LayerNorm else layer.num_groups
            given = _arg(node, 1)
            return (
                (prefix, node.args[0])
                if (tuple(given) if kind is nn.LayerNorm else given) == shape
                else None
            )
        if target is aten.embedding.default:
            prefix = self.owner([_attr(_arg(node, 0))], ("weight",), nn.Embedding)
            plain = prefix and self.root.get_submodule(prefix).max_norm is None
            return (prefix, node.args[1]) if plain else None
        if target is aten.addmm.default and not node.kwargs:
            return self._conv1d(node)
        return None

    def _eps(self, prefix: str) -> float:
        return self.root.get_submodule(prefix).eps

    def _conv1d(self, node: _Op) -> tuple[str, Any] | None:
        """``addmm(bias, x, weight)`` on a Hugging Face ``Conv1D`` (a Linear that stores its
        weight transposed): the layer becomes the ``nn.Linear`` it is, under its name."""
        names = [_attr(_arg(node, 2)), _attr(_arg(node, 0))]
        first = names[0]
        prefix = first.rpartition(".")[0] if first else None
        layer = _lookup(self.root, prefix) if prefix else None
        if type(layer).__name__ != "Conv1D" or names != [f"{prefix}.weight", f"{prefix}.bias"]:
            return None
        inputs, outputs = layer.weight.shape
        linear = nn.Linear(inputs, outputs)
        linear.weight = nn.Parameter(layer.weight.detach().t().contiguous())
        linear.bias = layer.bias
        self.root.set_submodule(prefix, linear)
        for name in (f"{prefix}.weight", f"{prefix}.bias"):
            self.aliases[name] = (name,)
        return prefix, node.args[1]


@dataclass(frozen=True)
class _Op:
    """A call to lift: its target (out of place where that is safe) and arguments."""

    target: Any
    args: tuple
    kwargs: dict


def _functional(node: _Op) -> tuple[Any, tuple, dict] | None:
    """The torch-level ``(target, args, kwargs)`` for ``node``, or None to keep it."""
    target, args, kwargs = node.target, tuple(node.args), dict(node.kwargs)
    if target is aten.batch_norm.default and not args[5]:  # F.batch_norm's order
        x, weight, bias, mean, var, training, momentum, eps = args[:8]
        return F.batch_norm, (x, mean, var, weight, bias, training, momentum, eps), {}
    if target is aten.embedding.default:
        return F.embedding, (args[1], args[0], *([args[2]] if len(args) > 2 else [])), {}
    if target is aten.layer_norm.default:
        return F.layer_norm, args[:5], {}
    if target in (aten.add.Tensor, aten.sub.Tensor) and (kwargs or len(args) > 2):
        return None  # alpha= has no operator form
    if target in _FUNCTIONS:
        return _FUNCTIONS[target], args, kwargs
    if target is aten.slice.Tensor:
        dim, start, end, step = (*args[1:], *(None,) * 4)[:4]
        window = slice(start, end if end != sys.maxsize else None, step if step != 1 else None)
        return operator.getitem, (args[0], (*(slice(None),) * (dim or 0), window)), {}
    if target is aten.index.Tensor:
        where = tuple(slice(None) if i is None else i for i in args[1])
        return operator.getitem, (args[0], where), {}
    return _by_name(target, args, kwargs)


def _by_name(target: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict] | None:
    """``torch.NAME`` (or the tensor method ``NAME``) for ``aten.NAME.overload``: the public
    function ATen generates it from, with the same arguments."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    name = target.overloadpacket.__name__
    if name.startswith("_") or name.endswith("_"):
        return None
    if callable(getattr(torch, name, None)):
        return getattr(torch, name), args, kwargs
    if callable(getattr(torch.Tensor, name, None)) and args and isinstance(args[0], Node):
        return name, args, kwargs  # a method: call_method
    return None


def _mutation_is_local(node: Node, order: dict[Node, int]) -> bool:
    """Whether nothing reads the tensor an in-place op writes after the op."""
    written = node.args[0] if node.args else None
    if not isinstance(written, Node):
        return False
    return all(order[user] <= order[node] for user in written.users)


def _same_tensor(node: Node) -> bool:
    """A conversion to the dtype and device its input already has."""
    out, source = node.meta.get("val"), node.args[0] if node.args else None
    before = source.meta.get("val") if isinstance(source, Node) else None
    return all(isinstance(t, torch.Tensor) for t in (out, before)) and (out.dtype, out.device) == (
        before.dtype,
        before.device,
    )


def lift(
    root: nn.Module, exported: GraphModule, settings: dict[str, Any] | None = None
) -> GraphModule:
    """The graph of ``exported`` (``ExportedProgram.module()``) over ``root`` (the model it
    was exported from) in module-level form (module docstring). ``settings`` are keyword
    inputs that are not tensors (``use_cache=False``): they become constants, and the lifted
    module no longer takes them.

    Example::

        gm = lift(model, torch.export.export(model, (x,), strict=False).module())
    """
    settings = settings or {}
    graph = Graph()
    env: dict[Node, Any] = {}
    order = {node: i for i, node in enumerate(exported.graph.nodes)}

    def copy_meta(old: Node, new: Node) -> Node:
        for key in ("stack_trace", "nn_module_stack"):
            if key in old.meta:
                new.meta[key] = old.meta[key]
        return new

    def load(value: Any) -> Any:
        return torch.fx.node.map_arg(value, env.__getitem__)

    layers = _Layers(root)
    for node in exported.graph.nodes:
        target = node.target
        if node.op == "call_module" and str(target) == "_guards_fn":
            continue
        if node.op == "placeholder" and node.target in settings:
            env[node] = settings[str(node.target)]
            continue
        if node.op != "call_function":
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        if target in _ASSERTS:
            continue
        if target in _DROPOUTS or (target in _CONVERSIONS and _same_tensor(node)):
            env[node] = env[node.args[0]]
            continue
        if target in _IN_PLACE and _mutation_is_local(node, order):
            target = _IN_PLACE[target]
        op = _Op(target, tuple(node.args), dict(node.kwargs))
        layer = layers(op) if isinstance(target, torch._ops.OpOverload) else None
        if layer is not None:
            name, x = layer
            new = graph.call_module(name, (load(x),))
        elif target in _METHODS:
            new = graph.call_method(_METHODS[target], load(node.args), load(node.kwargs))
        elif (call := _functional(op)) is not None:
            kind = graph.call_method if isinstance(call[0], str) else graph.call_function
            new = kind(call[0], load(call[1]), load(call[2]))
        else:
            new = graph.node_copy(node, env.__getitem__)
        env[node] = copy_meta(node, new)
    graph._codegen = _without(exported.graph._codegen, settings)
    for node in reversed(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    lifted = GraphModule(_with_constants(root, exported, graph), graph, type(root).__name__)
    info = getattr(graph._codegen, "pytree_info", None)
    if info is not None:
        lifted._in_spec, lifted._out_spec = info.in_spec, info.out_spec
    return lifted


def lift_layers(root: nn.Module, gm: GraphModule) -> int:
    """Rewrite the calls in ``gm`` (traced symbolically from ``root``) of
    ``torch.nn.functional``'s linear, conv, batch_norm, layer_norm and group_norm on the
    parameters of a layer of ``root`` that computes exactly that as ``call_module`` nodes of
    the layer. A subclass whose forward was traced through (timm's ``BatchNormAct2d`` calls
    ``F.batch_norm``, then its activation) leaves such calls; lifted, the layer is one that
    fusion, quantization and pruning know. A layer the graph also calls whole keeps its
    class. Returns how many calls were lifted.

    Example::

        gm = GraphModule(root, graph)
        lift_layers(root, gm)   # F.batch_norm(x, norm.running_mean, ...) -> norm(x)
    """
    layers = _Layers(root)
    called = {str(n.target) for n in gm.graph.find_nodes(op="call_module")}
    lifted = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _FUNCTIONAL_LAYERS:
            continue
        op, parameters, order = _FUNCTIONAL_LAYERS[node.target]
        values = dict(parameters)
        values.update(zip(parameters, node.args, strict=False))
        values.update(node.kwargs)
        found = None
        if len(values) == len(parameters):  # no argument the table does not know
            found = layers.match(_Op(op, tuple(values[name] for name in order), {}))
        if found is None or found[0] in called or not found[0]:
            continue
        gm.set_submodule(found[0], layers.exact(found[0]))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(found[0], (found[1],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        lifted += 1
    if lifted:
        for node in reversed(gm.graph.find_nodes(op="get_attr")):
            if not node.users:
                gm.graph.erase_node(node)
        gm.recompile()
    return lifted


def _without(codegen: Any, settings: dict[str, Any]) -> Any:
    """The export's calling convention without the keyword inputs in ``settings``."""
    codegen = copy.deepcopy(codegen)
    info = getattr(codegen, "pytree_info", None)
    if info is None or not settings:
        return codegen
    args, kwargs = tree_unflatten(list(range(info.in_spec.num_leaves)), info.in_spec)
    kept = {k: v for k, v in kwargs.items() if k not in settings}
    orig_args = [a for a in info.orig_args if a not in settings]
    codegen.pytree_info = info._replace(orig_args=orig_args, in_spec=tree_structure((args, kept)))
    return codegen


def _lookup(module: Any, name: str) -> Any:
    """The attribute at dotted ``name`` below ``module``, or None."""
    for part in name.split(".") if name else ():
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _with_constants(root: nn.Module, exported: GraphModule, graph: Graph) -> nn.Module:
    """``root`` with the tensors the graph reads that only the export made (constants
    created inside forward) registered as buffers."""
    for node in graph.find_nodes(op="get_attr"):
        name = str(node.target)
        if _lookup(root, name) is None:
            owner, _, attribute = name.rpartition(".")
            value, holder = _lookup(exported, name), _lookup(root, owner)
            if isinstance(value, nn.Module):  # the body of a higher-order op
                holder.add_module(attribute, value)
            else:
                holder.register_buffer(attribute, value, persistent=False)
    return root
