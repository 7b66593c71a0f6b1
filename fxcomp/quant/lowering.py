"""Lowering: the reference graph's Q/DQ patterns become fbgemm/qnnpack quantized kernels.

``QDQ_out(Conv(QDQ_in(x)))`` -> ``quantized Conv(x_q)`` with the output grid of ``QDQ_out``
(and likewise ConvReLU, Linear, LinearReLU, add, add_relu, mul, cat, hardswish); ops that
keep their input's grid (pooling, ReLU, reshapes, mean, sigmoid) run on the quantized
tensor itself; a Q/DQ step whose input is already on its grid disappears. Values are
quantized once, where they first need to be, and dequantized once, where a float op or
the output needs them, so there are no redundant quantize/dequantize pairs. An op with no
quantized kernel stays float between a dequantize and a quantize. Weights are packed for
the graph's engine (its ``QuantConfig``); ``script`` freezes the result as TorchScript.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from fxcomp.ir.errors import BackendError, InputError
from fxcomp.ir.graph import drop_unused, module_of, rebuilt
from fxcomp.ir.meta import MADE_BY
from fxcomp.nn.fused import add_relu
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassResult
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.ops import QUANT_KIND, tensor_inputs
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer
from fxcomp.quant.scheme import deprecated_apis, packing_engine

__all__ = ["lower_to_kernels", "script"]

Grid = tuple[float, int, torch.dtype]

_QUANTIZED_MODULES = {
    (nn.Conv1d, False): nnq.Conv1d,
    (nn.Conv2d, False): nnq.Conv2d,
    (nn.Conv3d, False): nnq.Conv3d,
    (nn.Conv1d, True): nniq.ConvReLU1d,
    (nn.Conv2d, True): nniq.ConvReLU2d,
    (nn.Conv3d, True): nniq.ConvReLU3d,
}
_BINARY = {
    operator.add: torch.ops.quantized.add,
    torch.add: torch.ops.quantized.add,
    "add": torch.ops.quantized.add,
    add_relu: torch.ops.quantized.add_relu,
    operator.mul: torch.ops.quantized.mul,
    torch.mul: torch.ops.quantized.mul,
    "mul": torch.ops.quantized.mul,
}


def _grid(qdq: QuantDequant) -> Grid:
    return float(qdq.scale), int(qdq.zero_point), qdq.scheme.dtype


def quantized_layer(ref: QuantizedWeightLayer, grid: Grid) -> nn.Module:
    """The fbgemm/qnnpack module computing ``ref`` with output on ``grid``."""
    inner = ref.weighted
    if isinstance(inner, nn.Linear):
        cls = nniq.LinearReLU if ref.relu else nnq.Linear
        layer = cls(inner.in_features, inner.out_features, inner.bias is not None)
    else:
        cls = _QUANTIZED_MODULES[(type(inner), ref.relu)]
        layer = cls(
            inner.in_channels,
            inner.out_channels,
            inner.kernel_size,
            stride=inner.stride,
            padding=inner.padding,
            dilation=inner.dilation,
            groups=inner.groups,
            bias=inner.bias is not None,
            padding_mode=inner.padding_mode,
        )
    bias = inner.bias.detach().float() if inner.bias is not None else None
    layer.set_weight_bias(ref.quantized_weight(), bias)
    layer.scale, layer.zero_point = grid[0], grid[1]
    return layer


class _Lowering:
    """Rebuilds the graph node by node, tracking which values are quantized and on what grid."""

    def __init__(self, gm: GraphModule, ctx: CompileContext) -> None:
        self.gm = gm
        self.pass_name = ctx.state.current_pass
        self.graph = Graph()
        self.env: dict[Node, Node] = {}
        self.grids: dict[Node, Grid] = {}
        self.floats: dict[Node, Node] = {}
        self.modules: dict[str, nn.Module] = {}
        self.renamed: dict[Node, str] = {}

    def emit(self, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> Node:
        node = self.graph.create_node(op, target, args, kwargs or {})
        node.meta[MADE_BY] = self.pass_name
        return node

    def as_float(self, old: Node) -> Node:
        value = self.env[old]
        if value not in self.grids:
            return value
        if value not in self.floats:
            self.floats[value] = self.emit("call_method", "dequantize", (value,))
        return self.floats[value]

    def quantized_output(self, node: Node) -> Grid | None:
        """The grid of the single Q/DQ step that consumes ``node``, if that is its only use."""
        users = list(node.users)
        if len(users) == 1 and isinstance(qdq := module_of(self.gm, users[0]), QuantDequant):
            return _grid(qdq)
        return None

    def all_quantized(self, nodes: list[Node]) -> bool:
        return bool(nodes) and all(self.env[n] in self.grids for n in nodes)

    def run(self) -> GraphModule:
        for node in self.gm.graph.nodes:
            self.env[node] = self.lower(node)
        gm = rebuilt(self.gm, self.graph)
        for name, module in self.modules.items():
            gm.add_submodule(name, module)
        for node, name in self.renamed.items():  # now that the module is there
            node.target = name
        drop_unused(gm)
        gm.recompile()
        return gm

    def lower(self, node: Node) -> Node:
        module = module_of(self.gm, node)
        kind = node.meta.get(QUANT_KIND)
        inputs = tensor_inputs(node)
        out = self.quantized_output(node)
        if node.op == "output":
            return self.emit("output", "output", (map_arg(node.args[0], self.as_float),))
        if isinstance(module, QuantDequant):
            return self.quantize(node, _grid(module))
        if out and self.all_quantized(inputs):
            kernel = self.kernel(node, module, kind, out)
            if kernel is not None:
                self.grids[kernel] = out
                return kernel
        if kind in ("shared", "requant", "fixed") and inputs and self.env[inputs[0]] in self.grids:
            new = self.graph.node_copy(node, lambda n: self.env[n])
            new.meta = {MADE_BY: self.pass_name, "stack_trace": node.meta.get("stack_trace")}
            fixed = (1.0 / 256, 0, torch.quint8)
            self.grids[new] = fixed if kind == "fixed" else self.grids[self.env[inputs[0]]]
            return new
        if kind == "query":  # reads the shape of whatever tensor is there
            return self.graph.node_copy(node, lambda n: self.env[n])
        new = self.graph.node_copy(node, self.as_float)
        new.meta = {key: node.meta[key] for key in (MADE_BY, "stack_trace") if key in node.meta}
        return new

    def quantize(self, node: Node, grid: Grid) -> Node:
        source = node.args[0]
        value = self.env[source]
        if self.grids.get(value) == grid:
            return value
        new = self.emit("call_function", torch.quantize_per_tensor, (self.as_float(source), *grid))
        self.grids[new] = grid
        return new

    def kernel(
        self, node: Node, module: nn.Module | None, kind: str | None, out: Grid
    ) -> Node | None:
        """The quantized kernel call computing ``node`` onto ``out``, or None if there is none."""
        args = map_arg(node.args, lambda n: self.env[n])
        scale, zero_point = out[0], out[1]
        if isinstance(module, QuantizedWeightLayer):
            name = str(node.target)
            if name not in self.modules:
                self.modules[name] = quantized_layer(module, out)
                return self.emit("call_module", name, (args[0],))
            # a layer called again: this call has its own output grid, so its own kernel
            again = f"{name}_{sum(n.startswith(name) for n in self.modules)}"
            self.modules[again] = quantized_layer(module, out)
            self.renamed[call := self.emit("call_module", name, (args[0],))] = again
            return call
        if kind == "binary" and (op := _BINARY.get(node.target)) is not None:
            return self.emit("call_function", op, (args[0], args[1], scale, zero_point))
        if kind == "cat":
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            cat = torch.ops.quantized.cat
            return self.emit("call_function", cat, (list(args[0]), dim, scale, zero_point))
        if kind == "hardswish":
            hardswish = torch.ops.quantized.hardswish
            return self.emit("call_function", hardswish, (args[0], scale, zero_point))
        return None


def lower_to_kernels(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Replace the reference graph's Q/DQ patterns by quantized kernels (module docstring);
    a graph with no quantization config has nothing to lower."""
    config = QUANT_CONFIG.get(gm)
    if config is None:
        return PassResult(gm, modified=False)
    if not config.target.kernels:
        raise InputError(
            f"engine '{config.engine}' has no fbgemm/qnnpack kernels to lower to",
            hint=f"its Q/DQ graph goes to the {' or '.join(config.target.backends)} backend "
            "as it is: quantize(..., lower=False)",
        )
    with packing_engine(config.engine), deprecated_apis():
        lowered = _Lowering(gm, ctx).run()
    return PassResult(lowered, modified=True)


def script(gm: GraphModule, example_inputs: tuple, engine: str) -> torch.jit.ScriptModule:
    """``gm`` traced on ``example_inputs`` and frozen as TorchScript, its weights packed for
    ``engine``.

    Example::

        scripted = script(lowered_gm, (torch.randn(1, 3, 224, 224),), "qnnpack")
    """
    try:
        with packing_engine(engine), deprecated_apis(), torch.no_grad():
            # strict=False: a captured model may return a dict (a ModelOutput) of fixed keys
            traced = torch.jit.trace(gm.eval(), example_inputs, strict=False)
            return torch.jit.freeze(traced.eval())
    except Exception as err:
        raise BackendError(f"TorchScript export failed: {type(err).__name__}: {err}") from err
