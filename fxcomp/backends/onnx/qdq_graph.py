"""An index over one ONNX graph for the QDQ rules and the INT8 prediction: producers,
consumers, constants, element types, and where a DequantizeLinear reaches an op through
the ops the target moves it past (``fxcomp.backends.onnx.check``).

Example::

    g = QdqGraph(onnx.load("model.onnx"), "tensorrt")
    dq = g.dq_into(conv_node, 0)        # the DequantizeLinear feeding its activation
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "ALLOWED",
    "COMPUTE",
    "MIN_OPSET",
    "MODEL",
    "PASSTHROUGH",
    "QDQ",
    "TARGETS",
    "QdqGraph",
    "Violation",
    "attribute",
    "blocked",
    "is_bias_dq",
    "node_name",
    "output_axis",
    "type_name",
    "weighted",
]

TARGETS = ("tensorrt", "ort")
MIN_OPSET = 13
QDQ = ("QuantizeLinear", "DequantizeLinear")
COMPUTE = ("Conv", "Gemm", "MatMul")
ALLOWED = {
    "tensorrt": {TensorProto.INT8},
    "ort": {TensorProto.INT8, TensorProto.UINT8},
}
MODEL = "(model)"  # the node name of a violation that belongs to no node
# Ops a DequantizeLinear is moved past (they commute with quantization), so that
# DQ -> MaxPool -> Conv is a quantized Conv: TensorRT's Q/DQ propagation, and ONNX Runtime's
# QDQPropagationTransformer (which does not take Flatten, and needs a DQ with one consumer).
PASSTHROUGH = {
    "tensorrt": frozenset(
        {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity"}
    ),
    "ort": frozenset({"MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice"}),
}


@dataclass(frozen=True)
class Violation:
    """One broken rule: its id, the node (or tensor) it is about, and what to do."""

    rule: str
    node: str
    message: str


class QdqGraph:
    """Indexes over one ONNX graph: producers, consumers, constants, element types."""

    def __init__(self, model: onnx.ModelProto, target: str) -> None:
        graph = model.graph
        self.target = target
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None
        )
        self.nodes = list(graph.node)
        self.producer = {out: node for node in self.nodes for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self._tensors = {t.name: t for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._tensors[node.output[0]] = node.attribute[0].t
        self.types = {name: t.data_type for name, t in self._tensors.items()}
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type"):
                self.types.setdefault(info.name, info.type.tensor_type.elem_type)
        self.quantized = any(n.op_type in QDQ for n in self.nodes)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output; None for anything else."""
        tensor = self._tensors.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_constant(self, name: str) -> bool:
        return name in self._tensors

    def dq_into(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
        """The DequantizeLinear that produces ``node``'s input ``index``, directly or through
        ops the target moves it past (``PASSTHROUGH``); None if there is none."""
        if index >= len(node.input):
            return None
        source = self.producer.get(node.input[index])
        moved = False
        while source is not None and source.op_type in PASSTHROUGH[self.target]:
            source, moved = self.producer.get(source.input[0]), True
        if source is None or source.op_type != "DequantizeLinear":
            return None
        single = len(self.consumers.get(source.output[0], [])) == 1
        return source if not moved or self.target != "ort" or single else None

    def quantizes_output(self, node: onnx.NodeProto) -> bool:
        """Whether ``node``'s output goes into a QuantizeLinear, directly or through a Relu:
        whether the graph means it to be a quantized op."""
        users = self.consumers.get(node.output[0], [])
        for relu in [user for user in users if user.op_type == "Relu"]:
            users = users + self.consumers.get(relu.output[0], [])
        return any(user.op_type == "QuantizeLinear" for user in users)

    def residual_conv(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """For ``tensorrt``, the Conv that an Add reads directly (no Q/DQ between) as its only
        consumer while its other input comes through DequantizeLinear: TensorRT fuses the
        two into one INT8 kernel, the Add as the Conv's residual input."""
        if self.target != "tensorrt" or node.op_type != "Add" or len(node.input) != 2:
            return None
        for index in (0, 1):
            conv = self.producer.get(node.input[index])
            single = len(self.consumers.get(node.input[index], [])) == 1
            if conv is not None and conv.op_type == "Conv" and single:
                return conv if self.dq_into(node, 1 - index) is not None else None
        return None

    def blocked_by(self, name: str) -> str | None:
        """The op type of the producer of ``name`` when it is fed by a DequantizeLinear but is
        not an op the target moves DequantizeLinear past (Flatten for ONNX Runtime)."""
        source = self.producer.get(name)
        if source is None or not source.input or source.op_type in PASSTHROUGH[self.target]:
            return None
        before = self.producer.get(source.input[0])
        shape_op = source.op_type in PASSTHROUGH["tensorrt"]
        dequantized = before is not None and before.op_type == "DequantizeLinear"
        return source.op_type if shape_op and dequantized else None

    def weight_dq(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """The DequantizeLinear of a constant at ``node``'s weight input (input 1)."""
        dq = self.producer.get(node.input[1]) if len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        return dq if self.is_constant(dq.input[0]) else None

    def qdq_type(self, node: onnx.NodeProto) -> int | None:
        """The integer type a QuantizeLinear makes or a DequantizeLinear reads (None if
        unknown)."""
        if len(node.input) > 2 and node.input[2] and node.input[2] in self.types:
            return self.types[node.input[2]]
        if node.op_type == "QuantizeLinear":
            return attribute(node, "output_dtype", 0) or TensorProto.UINT8
        if node.input[0] in self.types:
            return self.types[node.input[0]]
        source = self.producer.get(node.input[0])
        return self.qdq_type(source) if source is not None and source.op_type in QDQ else None


def attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default``."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def node_name(node: onnx.NodeProto) -> str:
    """A node's name; an unnamed node is named by its op and first output."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def type_name(data_type: int) -> str:
    return helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()


def is_bias_dq(g: QdqGraph, node: onnx.NodeProto) -> bool:
    """True when ``node`` dequantizes a constant that only feeds Conv/Gemm bias inputs."""
    users = g.consumers.get(node.output[0], [])
    return bool(users) and all(
        u.op_type in ("Conv", "Gemm") and list(u.input).index(node.output[0]) == 2 for u in users
    )


def output_axis(node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of ``node``'s weight (input 1), of rank ``rank``."""
    if node.op_type == "Gemm":
        return 0 if attribute(node, "transB", 0) else 1
    return 0 if node.op_type == "Conv" else rank - 1


def blocked(g: QdqGraph, name: str) -> str:
    """Why a dequantized tensor does not reach ``name``, when an op stops it; else ""."""
    op_type = g.blocked_by(name)
    if op_type is None:
        return ""
    runtime = "TensorRT" if g.target == "tensorrt" else "ONNX Runtime"
    return f" ({runtime} does not move DequantizeLinear past {op_type})"


def weighted(g: QdqGraph) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Every Conv/Gemm/MatMul with a dequantized constant weight, with that DequantizeLinear."""
    for node in g.nodes:
        dq = g.weight_dq(node) if node.op_type in COMPUTE else None
        if dq is not None:
            yield node, dq
