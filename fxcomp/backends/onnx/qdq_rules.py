"""The QDQ rules as data (``RULES``: id, targets, the function that finds violations), each a
small function over a ``QdqGraph``; ``fxcomp.backends.onnx.check`` documents what each flags.

Example::

    found = [v for rule in RULES if "ort" in rule.targets for v in rule.find(g)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from fxcomp.backends.onnx.qdq_graph import (
    ALLOWED,
    COMPUTE,
    MIN_OPSET,
    MODEL,
    QDQ,
    TARGETS,
    QdqGraph,
    Violation,
    attribute,
    blocked,
    is_bias_dq,
    node_name,
    output_axis,
    type_name,
    weighted,
)

__all__ = ["RULES", "Rule"]


def _opset(g: QdqGraph) -> Iterator[Violation]:
    if g.opset is not None and g.opset < MIN_OPSET:
        yield Violation(
            "opset",
            MODEL,
            f"the default-domain opset is {g.opset}, below {MIN_OPSET}, the first with "
            "per-channel QuantizeLinear/DequantizeLinear: export with opset 13 or later",
        )


def _zero_point(g: QdqGraph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type not in QDQ or len(node.input) < 3 or not node.input[2]:
            continue
        zero = g.constant(node.input[2])
        if zero is not None and np.any(zero.astype(np.float64) != 0):
            shown = np.unique(zero)[:4].tolist()
            yield Violation(
                "zero-point",
                node_name(node),
                f"zero point {node.input[2]} is {shown}, not 0: TensorRT quantizes "
                "symmetrically and needs zero point 0; quantize with a symmetric scheme",
            )


def _dtype(g: QdqGraph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type not in QDQ:
            continue
        data_type = g.qdq_type(node)
        if data_type is None or data_type in ALLOWED[g.target]:
            continue
        is_bias = node.op_type == "DequantizeLinear" and is_bias_dq(g, node)
        if g.target == "ort" and is_bias and data_type == TensorProto.INT32:
            continue
        yield Violation("dtype", node_name(node), _dtype_message(g.target, data_type, is_bias))


def _dtype_message(target: str, data_type: int, is_bias: bool) -> str:
    kind = type_name(data_type)
    if target == "tensorrt" and is_bias:
        return (
            f"the bias is {kind} behind DequantizeLinear, which TensorRT cannot parse: keep "
            "biases float (onnxruntime quantize_static: extra_options={'QuantizeBias': False})"
        )
    if target == "tensorrt":
        return (
            f"{kind} Q/DQ: TensorRT's INT8 Q/DQ layers take signed int8 only; quantize "
            "activations and weights to int8 with zero point 0"
        )
    return (
        f"{kind} Q/DQ: ONNX Runtime fuses only 8-bit Q/DQ into integer kernels (int32 only "
        "for a Conv/Gemm bias); quantize to uint8 or int8"
    )


def _weight_range(g: QdqGraph) -> Iterator[Violation]:
    for node, dq in weighted(g):
        weight = g.constant(dq.input[0])
        if weight is not None and weight.dtype == np.int8 and (weight == -128).any():
            yield Violation(
                "weight-range",
                node_name(dq),
                f"int8 weight {dq.input[0]} of {node.op_type} {node_name(node)} holds -128 "
                f"({int((weight == -128).sum())} values): TensorRT's weights are symmetric "
                "in [-127, 127]; quantize them with quant_min=-127",
            )


def _per_channel(g: QdqGraph) -> Iterator[Violation]:
    for node, dq in weighted(g):
        scale = g.constant(dq.input[1])
        if node.op_type == "Conv" and scale is not None and scale.size == 1:
            yield Violation(
                "per-channel",
                node_name(dq),
                f"the weight of Conv {node_name(node)} has one scale for all its output channels: "
                "TensorRT expects per-output-channel weight scales (axis 0); quantize "
                "weights per channel",
            )


def _axis(g: QdqGraph) -> Iterator[Violation]:
    for node, dq in weighted(g):
        scale = g.constant(dq.input[1])
        weight = g.constant(dq.input[0])
        if scale is None or weight is None or scale.size == 1:
            continue
        axis = attribute(dq, "axis", 1)
        axis = axis + weight.ndim if axis < 0 else axis
        expected = output_axis(node, weight.ndim)
        if axis != expected:
            yield Violation(
                "axis",
                node_name(dq),
                f"per-channel weight of {node.op_type} {node_name(node)} is quantized along axis "
                f"{axis}, not its output-channel axis {expected}: set axis={expected} and "
                "one scale per output channel",
            )


def _unquantized_input(g: QdqGraph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type not in COMPUTE or len(node.input) < 2:
            continue
        if g.weight_dq(node) is None and not g.is_constant(node.input[1]):
            continue  # two activations (attention's MatMuls): no weight to keep quantized
        activation, weight = g.dq_into(node, 0), g.dq_into(node, 1)
        if (activation is None) == (weight is None):
            continue
        quantized, plain = (
            ("weight", "activation") if activation is None else ("activation", "weight")
        )
        missing = node.input[0] if activation is None else node.input[1]
        said = f"the {quantized} input comes through DequantizeLinear but the {plain} input"
        yield _one_side(g, "unquantized-input", node, said, missing, "the layer runs in float")


def _add_one_side(g: QdqGraph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        kinds = [_operand_kind(g, node, i) for i in (0, 1)]
        if (
            sorted(kinds) == ["dq", "float"]
            and g.residual_conv(node) is None
            and g.quantizes_output(node)  # an Add whose output stays float is float by design
        ):
            said = "only one input of this Add comes through DequantizeLinear;"
            missing = node.input[kinds.index("float")]
            runs = "the add runs in float and a residual cannot fuse"
            yield _one_side(g, "add-one-side", node, said, missing, runs)


def _one_side(
    g: QdqGraph, rule: str, node: onnx.NodeProto, said: str, missing: str, runs: str
) -> Violation:
    """A layer quantized on one input only: ``missing`` needs a Q/DQ pair (or, for a
    Conv/Gemm/MatMul, neither input is quantized)."""
    neither = ", or quantize neither input" if rule == "unquantized-input" else ""
    return Violation(
        rule,
        node_name(node),
        f"{said} {missing} does not{blocked(g, missing)}, so {runs}: put a "
        f"QuantizeLinear -> DequantizeLinear pair on {missing}{neither}",
    )


def _operand_kind(g: QdqGraph, node: onnx.NodeProto, index: int) -> str:
    """'const' (a constant, or a dequantized one), 'dq' (a dequantized activation) or
    'float'."""
    dq = g.dq_into(node, index)
    if g.is_constant(node.input[index]) or (dq is not None and g.is_constant(dq.input[0])):
        return "const"
    return "float" if dq is None else "dq"


def _qdq_inside_fusion(g: QdqGraph) -> Iterator[Violation]:
    for q in g.nodes:
        conv = g.producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if conv is None or conv.op_type != "Conv":
            continue
        for dq in g.consumers.get(q.output[0], []):
            users = g.consumers.get(dq.output[0], []) if dq.op_type == "DequantizeLinear" else []
            for user in users:
                if user.op_type in ("Relu", "BatchNormalization"):
                    yield Violation(
                        "qdq-inside-fusion",
                        node_name(q),
                        f"a Q/DQ pair between Conv {node_name(conv)} and {user.op_type} "
                        f"{node_name(user)} keeps TensorRT from fusing them: quantize after the "
                        f"{user.op_type} instead",
                    )


def _residual_split(g: QdqGraph) -> Iterator[Violation]:
    for add in g.nodes:
        if add.op_type != "Add" or len(add.input) != 2 or g.residual_conv(add) is not None:
            continue
        for index in (0, 1):
            dq = g.producer.get(add.input[index])
            q = g.producer.get(dq.input[0]) if dq is not None and dq.op_type in QDQ else None
            conv = g.producer.get(q.input[0]) if q is not None and q.op_type in QDQ else None
            single = all(
                len(g.consumers.get(t, [])) == 1
                for t in (add.input[index], *(n.output[0] for n in (q, conv) if n is not None))
            )
            if conv is None or conv.op_type != "Conv" or not single:
                continue
            if g.dq_into(add, 1 - index) is None:
                continue
            yield Violation(
                "residual-split",
                node_name(q),
                f"a Q/DQ pair between Conv {node_name(conv)} and the residual Add "
                f"{node_name(add)} keeps TensorRT from fusing the Add into the Conv: leave "
                "the Conv's output unquantized and quantize only the Add's other input "
                "(fxcomp's tensorrt engine does)",
            )
            break


def _unfolded_bn(g: QdqGraph) -> Iterator[Violation]:
    for node in g.nodes:
        if g.quantized and node.op_type == "BatchNormalization":
            yield Violation(
                "unfolded-bn",
                node_name(node),
                "a BatchNormalization left in a quantized graph runs in float and splits the "
                "INT8 layers around it: fold it into the preceding Conv before quantizing "
                "(fxcomp.passes.fuse())",
            )


@dataclass(frozen=True)
class Rule:
    """One QDQ rule: its id, the targets it applies to, and the function that checks it."""

    id: str
    targets: tuple[str, ...]
    find: Callable[[QdqGraph], Iterator[Violation]]


RULES = (
    Rule("opset", TARGETS, _opset),
    Rule("zero-point", ("tensorrt",), _zero_point),
    Rule("dtype", TARGETS, _dtype),
    Rule("weight-range", ("tensorrt",), _weight_range),
    Rule("per-channel", ("tensorrt",), _per_channel),
    Rule("axis", TARGETS, _axis),
    Rule("unquantized-input", TARGETS, _unquantized_input),
    Rule("add-one-side", TARGETS, _add_one_side),
    Rule("qdq-inside-fusion", ("tensorrt",), _qdq_inside_fusion),
    Rule("residual-split", ("tensorrt",), _residual_split),
    Rule("unfolded-bn", ("tensorrt",), _unfolded_bn),
)
