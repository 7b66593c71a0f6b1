"""Conv-BN-ReLU fusion: ``BN(Conv(x)) -> Conv'(x)`` and ``ReLU(Conv'(x)) -> ConvReLU(x)``.

The rules, applied in graph order:

* ``batchnorm_module`` (first, in a sweep of its own): a functional ``F.batch_norm`` in
  eval mode whose statistics, weight and bias are tensors of the model (timm's norm
  layers traced through, a hand-written ``F.batch_norm(x, self.mean, ...)``, the same call
  in an exported graph) becomes a call of a BatchNorm module holding those same tensors,
  at ``<owner of the statistics>.batch_norm``, so that the rules below see it. It does
  not apply in training mode or when the statistics are computed in the graph.
* ``fold_batchnorm``: an eval-mode BatchNorm1d/2d/3d whose input is a Conv1d/2d/3d (or a
  Linear with a 2-D output, for BatchNorm1d) is folded into that layer's weight and bias
  in place (the per-channel scale in float64, one rounding per weight). It does not apply
  when the layer's output is used elsewhere too, when the layer is called from more than
  one place or shares its weight, or when the BatchNorm has no running statistics;
  ``fxcomp dump --explain`` says which.
* ``train_batchnorm`` (instead of folding, for quantization-aware training): the same
  Conv and BatchNorm become one ``ConvBN`` unit at the conv's name, whose BatchNorm keeps
  training until ``qat`` folds it.
* ``group_relu``: a ReLU (module, function or method) after a Conv or Linear becomes one
  ``ConvReLU``/``LinearReLU`` module at the layer's name, and ``relu(a + b)`` becomes one
  ``add_relu(a, b)`` node, so that quantization treats each as one unit.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.operator_schemas import normalize_function

from fxcomp.ir.graph import CONVS, drop_unused, module_of, replace_module, target_name
from fxcomp.ir.rewrite import NoMatch, Rule, apply_rules, pending_rewrites
from fxcomp.nn.batchnorm import fold_batchnorm_
from fxcomp.nn.fused import ConvBN, ConvReLU, LinearReLU, add_relu
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult

__all__ = ["FuseOptions", "fuse", "fuse_conv_bn_relu"]

_CONV_FOR_BN = {
    nn.BatchNorm1d: (nn.Conv1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}
_BATCHNORM_FOR = {
    nn.Conv1d: nn.BatchNorm1d,
    nn.Linear: nn.BatchNorm1d,
    nn.Conv2d: nn.BatchNorm2d,
    nn.Conv3d: nn.BatchNorm3d,
}
_BATCHNORM_FOR_RANK = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu}
_RELU_METHODS = {"relu", "relu_"}
_ADD_FUNCTIONS = {operator.add, torch.add}


@dataclass(frozen=True)
class FuseOptions:
    """Which rewrites ``fuse`` makes; ``train_batchnorm`` groups BatchNorm instead of
    folding it."""

    fold_batchnorm: bool = True
    group_relu: bool = True
    train_batchnorm: bool = False


@dataclass(frozen=True)
class _Sharing:
    """Modules registered under several names and parameters owned by several modules.

    Computed once per run of the pass: folding works in place and grouping moves a layer
    under its new ``ConvReLU``/``LinearReLU``, so neither creates new sharing.
    """

    modules: frozenset[int]
    weights: frozenset[int]

    @classmethod
    def of(cls, gm: GraphModule) -> _Sharing:
        modules = Counter(id(m) for _, m in gm.named_modules(remove_duplicate=False))
        weights = Counter(id(p) for _, p in gm.named_parameters(remove_duplicate=False))
        return cls(
            frozenset(k for k, n in modules.items() if n > 1),
            frozenset(k for k, n in weights.items() if n > 1),
        )


def _single_caller(gm: GraphModule, producer: Node, sharing: _Sharing) -> NoMatch | None:
    others = [user.name for user in producer.users]
    if len(others) > 1:
        return NoMatch(
            f"the output of '{producer.name}' is also used by "
            f"{', '.join(repr(u) for u in others)}; fusing would change what they see"
        )
    if producer.op != "call_module":
        return None
    layer = gm.get_submodule(str(producer.target))
    calls = len(gm.graph.find_nodes(op="call_module", target=producer.target))
    if calls > 1:
        return NoMatch(
            f"module '{producer.target}' is called from {calls} places; "
            "fusing would change the other calls"
        )
    if id(layer) in sharing.modules:
        return NoMatch(f"module '{producer.target}' is also registered under another name")
    inner = layer.conv if isinstance(layer, ConvBN) else layer
    if id(inner.weight) in sharing.weights:
        return NoMatch(f"the weight of '{producer.target}' is shared with another layer")
    return None


_TORCH_BATCH_NORM = ("input", "weight", "bias", "running_mean", "running_var", "training")
_TORCH_BATCH_NORM += ("momentum", "eps", "cudnn_enabled")  # torch.batch_norm's order


def _is_functional_batchnorm(gm: GraphModule, node: Node) -> bool:
    return node.op == "call_function" and node.target in (F.batch_norm, torch.batch_norm)


def _arguments(node: Node) -> dict:
    """A functional batch norm's arguments by name (``F.batch_norm`` or ``torch.batch_norm``,
    whose orders differ)."""
    if node.target is torch.batch_norm:
        return {**dict(zip(_TORCH_BATCH_NORM, node.args, strict=False)), **node.kwargs}
    call = normalize_function(
        F.batch_norm, tuple(node.args), dict(node.kwargs), normalize_to_only_use_kwargs=True
    )
    return call.kwargs if call is not None else {}


def _match_functional_batchnorm(gm: GraphModule, node: Node) -> tuple[Node, type, dict] | NoMatch:
    """The call, the BatchNorm class it computes, and its settings and tensors."""
    values = _arguments(node)
    if values.get("training") is not False:
        return NoMatch(
            f"batch_norm normalizes with its input's own statistics (training="
            f"{values.get('training')!r}: a model in train mode, or a weight standardized "
            "as in timm's StdConv2d); only running statistics fold"
        )
    tensors = {}
    for name in ("running_mean", "running_var", "weight", "bias"):
        value = values.get(name)
        if value is not None and not (isinstance(value, Node) and value.op == "get_attr"):
            return NoMatch(
                f"batch_norm's {name} is computed in the graph "
                f"('{getattr(value, 'name', value)}'), not a tensor of the model; "
                "only constant statistics fold"
            )
        tensors[name] = operator.attrgetter(str(value.target))(gm) if value is not None else None
    if tensors["running_mean"] is None or tensors["running_var"] is None:
        return NoMatch("batch_norm has no running statistics")
    x = values["input"]
    kind: type | None = _BATCHNORM_FOR.get(type(module_of(gm, x))) if isinstance(x, Node) else None
    meta = x.meta.get("tensor_meta") if isinstance(x, Node) else None
    kind = kind or (_BATCHNORM_FOR_RANK.get(len(meta.shape)) if meta is not None else None)
    if kind is None:
        return NoMatch("batch_norm's input rank is unknown; run shape propagation first")
    owner = str(values["running_mean"].target).rpartition(".")[0]
    return node, kind, {"eps": values["eps"], "owner": owner, **tensors}


def _rewrite_functional_batchnorm(gm: GraphModule, found: tuple[Node, type, dict]) -> list[Node]:
    node, kind, values = found
    mean, owner = values["running_mean"], values["owner"]
    affine = values["weight"] is not None or values["bias"] is not None
    bn = kind(mean.numel(), eps=values["eps"], affine=affine, device=mean.device, dtype=mean.dtype)
    fill = {"running_mean": None, "running_var": None, "weight": 1, "bias": 0}
    for name, missing in fill.items():
        tensor = values[name]
        if tensor is None and (missing is None or not affine):
            continue
        tensor = torch.full_like(mean, missing) if tensor is None else tensor
        delattr(bn, name)
        if isinstance(tensor, nn.Parameter):
            bn.register_parameter(name, tensor)
        else:
            bn.register_buffer(name, tensor)
    parent = gm.get_submodule(owner)
    attr = next(
        a
        for a in (f"batch_norm_{i}" if i else "batch_norm" for i in itertools.count())
        if not hasattr(parent, a)
    )
    name = f"{owner}.{attr}" if owner else attr
    gm.add_submodule(name, bn.eval())
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(name, (node.kwargs.get("input", node.args[0]),))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return [call]


def _is_batchnorm(gm: GraphModule, node: Node) -> bool:
    return type(module_of(gm, node)) in _CONV_FOR_BN


def _match_batchnorm(sharing: _Sharing, gm: GraphModule, node: Node) -> tuple[Node, Node] | NoMatch:
    bn = gm.get_submodule(str(node.target))
    producer = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    if not isinstance(producer, Node):
        return NoMatch("BatchNorm input is not a single graph value")
    layer = module_of(gm, producer)
    if type(layer) not in _CONV_FOR_BN[type(bn)]:
        return NoMatch(
            f"input comes from '{producer.name}' ({target_name(gm, producer)}), "
            f"not a {' or '.join(t.__name__ for t in _CONV_FOR_BN[type(bn)])}"
        )
    if isinstance(layer, nn.Linear):
        meta = producer.meta.get("tensor_meta")
        if meta is None or len(meta.shape) != 2:
            return NoMatch(
                "BatchNorm1d after a Linear folds only for a 2-D (batch, features) output"
            )
    if not bn.track_running_stats or bn.running_var is None:
        return NoMatch("BatchNorm has no running statistics (track_running_stats=False)")
    if not layer.weight.dtype.is_floating_point:
        return NoMatch(f"layer weight is {layer.weight.dtype}, not floating point")
    return _single_caller(gm, producer, sharing) or (producer, node)


def _rewrite_batchnorm(gm: GraphModule, found: tuple[Node, Node]) -> list[Node]:
    producer, node = found
    fold_batchnorm_(gm.get_submodule(str(producer.target)), gm.get_submodule(str(node.target)))
    node.replace_all_uses_with(producer)
    gm.graph.erase_node(node)
    return [producer]


def _group_batchnorm(gm: GraphModule, found: tuple[Node, Node]) -> list[Node]:
    producer, node = found
    conv, bn = gm.get_submodule(str(producer.target)), gm.get_submodule(str(node.target))
    replace_module(gm, str(producer.target), ConvBN(conv, bn))
    node.replace_all_uses_with(producer)
    gm.graph.erase_node(node)
    return [producer]


def _is_relu(gm: GraphModule, node: Node) -> bool:
    if node.op == "call_module":
        return type(module_of(gm, node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _is_add(node: Node) -> bool:
    tensors = len(node.args) == 2 and all(isinstance(a, Node) for a in node.args)
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS and tensors and not node.kwargs
    return node.op == "call_method" and node.target == "add" and tensors and not node.kwargs


def _match_relu(sharing: _Sharing, gm: GraphModule, node: Node) -> Node | NoMatch:
    producer = node.args[0] if node.args else None
    if not isinstance(producer, Node):
        return NoMatch("ReLU input is not a graph value")
    layer = module_of(gm, producer)
    if type(layer) in _CONV_FOR_BN:
        return NoMatch(f"input is BatchNorm '{producer.name}', which was not folded")
    if isinstance(layer, ConvBN) and layer.relu:
        return NoMatch(f"'{producer.name}' already ends in a ReLU")
    if type(layer) not in (*CONVS, nn.Linear, ConvBN) and not _is_add(producer):
        return NoMatch(
            f"input comes from '{producer.name}' ({target_name(gm, producer)}), "
            "not a Conv, Linear or tensor add"
        )
    return _single_caller(gm, producer, sharing) or producer


def _rewrite_relu(gm: GraphModule, producer: Node) -> list[Node]:
    relu = next(iter(producer.users))
    layer = module_of(gm, producer)
    if isinstance(layer, ConvBN):
        layer.relu = True
    elif layer is not None:
        fused = LinearReLU(layer) if isinstance(layer, nn.Linear) else ConvReLU(layer)
        replace_module(gm, str(producer.target), fused)
    if layer is not None:
        relu.replace_all_uses_with(producer)
        gm.graph.erase_node(relu)
        return [producer]
    with gm.graph.inserting_before(relu):
        node = gm.graph.call_function(add_relu, tuple(producer.args))
    node.meta = {**relu.meta, "stack_trace": producer.meta.get("stack_trace")}
    relu.replace_all_uses_with(node)
    gm.graph.erase_node(relu)
    gm.graph.erase_node(producer)
    return [node]


_MODULE_RULE = Rule(
    "batchnorm_module",
    _is_functional_batchnorm,
    _match_functional_batchnorm,
    _rewrite_functional_batchnorm,
)


def _rules(gm: GraphModule, options: FuseOptions) -> list[Rule]:
    sharing = _Sharing.of(gm)
    rules = []
    match = functools.partial(_match_batchnorm, sharing)
    if options.train_batchnorm:
        rules.append(Rule("train_batchnorm", _is_batchnorm, match, _group_batchnorm))
    elif options.fold_batchnorm:
        rules.append(Rule("fold_batchnorm", _is_batchnorm, match, _rewrite_batchnorm))
    if options.group_relu:
        rules.append(
            Rule("group_relu", _is_relu, functools.partial(_match_relu, sharing), _rewrite_relu)
        )
    return rules


def fuse_conv_bn_relu(
    gm: GraphModule, ctx: CompileContext, *, options: FuseOptions = FuseOptions()
) -> PassResult:
    """Fold BatchNorm into Conv/Linear and group ReLU with its producer (module docstring)."""
    sweep = functools.partial(apply_rules, explain=ctx.explain, pass_name=ctx.state.current_pass)
    count = sweep(gm, [_MODULE_RULE]) if options.fold_batchnorm or options.train_batchnorm else 0
    count += sweep(gm, _rules(gm, options))
    if count:
        drop_unused(gm)
    return PassResult(gm, modified=count > 0)


def fuse(
    *, fold_batchnorm: bool = True, group_relu: bool = True, train_batchnorm: bool = False
) -> Pass:
    """Fold BatchNorm into the preceding Conv/Linear and group conv/linear/add with ReLU;
    with ``train_batchnorm``, group Conv and BatchNorm as one ``ConvBN`` unit instead.

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.fuse()])
    """
    options = FuseOptions(fold_batchnorm, group_relu, train_batchnorm)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return fuse_conv_bn_relu(gm, ctx, options=options)

    def converged(gm: GraphModule, ctx: CompileContext) -> str | None:
        left = pending_rewrites(gm, [_MODULE_RULE, *_rules(gm, options)])
        return f"rules still apply: {left}" if left else None

    return Pass(
        "fuse", run, run_before=("quantize", "qat"), postcondition=converged, options=options
    )
