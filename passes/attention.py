"""Attention unpacking: ``MHA(q, k, v) -> out_proj(SDPA(q_proj(q), k_proj(k), v_proj(v)))``.

Every ``nn.MultiheadAttention`` called in the graph (torchvision's ViT encoder layers,
hand-written Transformer blocks; not one inside a leaf module such as
``nn.TransformerEncoderLayer``, which the graph does not see into) becomes fxcomp's
``Attention`` (``fxcomp.nn.attention``) with copies of its weights, put at the same qualified
name, and its forward is inlined into the graph: the four projections are ordinary
``nn.Linear`` ``call_module`` nodes (``<name>.q_proj``, ...) that ``quantize``,
``quantize_dynamic`` and ``smooth_quant`` see, and the attention itself is one
``scaled_dot_product_attention`` node, which stays float under static quantization. The
function is unchanged up to float rounding (separate projections instead of one packed
matmul): masks (``key_padding_mask``, ``attn_mask``, boolean or float), ``is_causal``,
both layouts, cross-attention and ``kdim``/``vdim`` are kept. The graph is traced in eval
mode, so attention dropout is not part of it.

The rule does not apply, and ``fxcomp dump --explain`` says why, for ``add_bias_kv``,
``add_zero_attn``, unbatched (2-D) inputs, flags computed in the graph, and layers named in
``skip``. A graph that reads the attention weights (``need_weights=True`` and the second
output used) is an ``UnsupportedGraphError``: ``scaled_dot_product_attention`` returns no
weights. ``report.tables["unpack_attention"]`` lists the layers unpacked. Run it before
``smooth_quant``, ``quantize``, ``quantize_dynamic`` and ``prune``.

Example::

    passes=[unpack_attention(), smooth_quant(batches), quantize(batches)]
"""

from __future__ import annotations

import functools
import inspect
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from fxcomp.ir.errors import UnsupportedGraphError
from fxcomp.ir.graph import inline_graph, module_of, replace_module
from fxcomp.ir.rewrite import NoMatch, Rule, apply_rules, pending_rewrites
from fxcomp.nn.attention import Attention, conversion_refusal
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult

__all__ = ["UnpackOptions", "unpack_attention", "unpack_multihead_attention"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_TENSORS = ("query", "key", "value")
_MASKS = ("key_padding_mask", "attn_mask")
_FLAGS = ("need_weights", "average_attn_weights", "is_causal")


@dataclass(frozen=True)
class UnpackOptions:
    """Qualified names of attention layers left as they are."""

    skip: tuple[str, ...] = ()


@dataclass
class _State:
    """Per run: the ``Attention`` made for each MultiheadAttention (by identity), the
    MultiheadAttention each replaced name held (a layer called twice is converted once),
    and the report's rows."""

    attention: dict[int, Attention] = field(default_factory=dict)
    original: dict[str, nn.MultiheadAttention] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _Found:
    node: Node
    mha: nn.MultiheadAttention
    arguments: dict[str, Any]


def _item(user: Node, node: Node) -> int | None:
    """The index of ``user = node[i]``, or None for any other use."""
    if user.op == "call_function" and user.target is operator.getitem and user.args[0] is node:
        return user.args[1] if isinstance(user.args[1], int) else None
    return None


def _weight_readers(node: Node) -> list[Node]:
    """The nodes that read the attention weights (the second output) of ``node``."""
    readers = []
    for user in node.users:
        index = _item(user, node)
        if index == 1:
            readers += list(user.users)
        elif index != 0:
            readers.append(user)  # the output tuple used whole
    return readers


def _anchors(state: _State, gm: GraphModule, node: Node) -> bool:
    if node.op != "call_module":
        return False
    return type(module_of(gm, node)) is nn.MultiheadAttention or str(node.target) in state.original


def _match(options: UnpackOptions, state: _State, gm: GraphModule, node: Node) -> _Found | NoMatch:
    name = str(node.target)
    mha = state.original.get(name) or module_of(gm, node)
    if name in options.skip:
        return NoMatch(f"'{name}' is in skip")
    reason = conversion_refusal(mha)
    if reason is not None:
        return NoMatch(reason)
    try:
        bound = _SIGNATURE.bind(None, *node.args, **node.kwargs)
    except TypeError as err:
        return NoMatch(f"cannot read the call's arguments: {err}")
    bound.apply_defaults()
    arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
    for flag in _FLAGS:
        if not isinstance(arguments[flag], bool):
            return NoMatch(f"{flag} is not a constant True/False but {arguments[flag]!r}")
    for key in (*_TENSORS, *_MASKS):
        value = arguments[key]
        if not isinstance(value, Node) and not (key in _MASKS and value is None):
            return NoMatch(f"{key} is not a graph value but {type(value).__name__}")
    meta = arguments["query"].meta.get("tensor_meta")
    if not hasattr(meta, "shape") or len(meta.shape) != 3:
        return NoMatch("the query is not a batched (3-D) tensor; Attention takes batched inputs")
    readers = _weight_readers(node)
    if readers and arguments["need_weights"]:
        raise UnsupportedGraphError(
            node,
            f"the attention weights are read by {', '.join(repr(r.name) for r in readers)}; "
            "unpack_attention computes attention with scaled_dot_product_attention, which "
            "returns no weights",
            hint=f"pass need_weights=False where the weights are not needed, or keep this "
            f"layer: unpack_attention(skip=['{name}'])",
        )
    return _Found(node, mha, arguments)


def _attention_for(
    state: _State, gm: GraphModule, name: str, mha: nn.MultiheadAttention
) -> Attention:
    attention = state.attention.get(id(mha))
    if attention is None:
        attention = state.attention[id(mha)] = Attention.from_multihead(mha)
    if gm.get_submodule(name) is not attention:
        state.original[name] = mha
        replace_module(gm, name, attention)
    return attention


def _row(name: str, attention: Attention, found: _Found) -> dict[str, Any]:
    a = found.arguments
    masks = [k for k in _MASKS if a[k] is not None] + (["causal"] if a["is_causal"] else [])
    return {
        "layer": name,
        "kind": "self" if a["query"] is a["key"] is a["value"] else "cross",
        "heads": attention.num_heads,
        "qk_dim": attention.qk_dim,
        "v_dim": attention.v_dim,
        "masks": ", ".join(masks) or "-",
    }


def _rewrite(state: _State, gm: GraphModule, found: _Found) -> list[Node]:
    node, arguments = found.node, found.arguments
    name = str(node.target)
    attention = _attention_for(state, gm, name, found.mha)
    # traced as the graph calls it: the weights are not read, so need_weights=False
    concrete: dict[str, Any] = {
        "need_weights": False,
        "average_attn_weights": arguments["average_attn_weights"],
        "is_causal": arguments["is_causal"],
    }
    concrete.update({k: None for k in _MASKS if arguments[k] is None})
    inputs = {k: arguments[k] for k in (*_TENSORS, *_MASKS) if arguments[k] is not None}
    traced = torch.fx.Tracer().trace(attention, concrete_args=concrete)
    (output, _), created = inline_graph(gm, node, traced, inputs, name)
    for user in list(node.users):
        index = _item(user, node)
        if index == 0:
            user.replace_all_uses_with(output)
        elif index == 1:  # read only with need_weights=False: the weights are None
            for reader in list(user.users):
                reader.args = map_arg(reader.args, lambda n, u=user: None if n is u else n)
                reader.kwargs = map_arg(reader.kwargs, lambda n, u=user: None if n is u else n)
        else:
            user.args = map_arg(user.args, lambda n: (output, None) if n is node else n)
            user.kwargs = map_arg(user.kwargs, lambda n: (output, None) if n is node else n)
            continue
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    state.rows.append(_row(name, attention, found))
    return created


def _rules(options: UnpackOptions, state: _State | None = None) -> list[Rule]:
    state = state or _State()
    return [
        Rule(
            "unpack_attention",
            functools.partial(_anchors, state),
            functools.partial(_match, options, state),
            functools.partial(_rewrite, state),
        )
    ]


def unpack_multihead_attention(
    gm: GraphModule, ctx: CompileContext, *, options: UnpackOptions = UnpackOptions()
) -> PassResult:
    """Replace every MultiheadAttention call of ``gm`` by an inlined ``Attention``
    (module docstring)."""
    state = _State()
    count = apply_rules(
        gm, _rules(options, state), explain=ctx.explain, pass_name=ctx.state.current_pass
    )
    if state.rows:
        ctx.state.report.tables["unpack_attention"] = state.rows
    return PassResult(gm, modified=count > 0)


def unpack_attention(*, skip: Sequence[str] = ()) -> Pass:
    """Turn every ``nn.MultiheadAttention`` into fxcomp's ``Attention``, projections as
    separate Linear nodes in the graph (module docstring).

    Example::

        fxcomp.compile(vit, x, passes=[unpack_attention(), quantize_dynamic()])
    """
    options = UnpackOptions(tuple(skip))

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return unpack_multihead_attention(gm, ctx, options=options)

    def converged(gm: GraphModule, ctx: CompileContext) -> str | None:
        left = pending_rewrites(gm, _rules(options))
        return f"rules still apply: {left}" if left else None

    return Pass(
        "unpack_attention",
        run,
        run_before=("smooth_quant", "equalize", "quantize", "quantize_dynamic", "qat", "prune"),
        postcondition=converged,
        options=options,
    )
