"""The QDQ rules linter: does an ``.onnx`` file follow the Q/DQ rules of TensorRT or ONNX
Runtime, and which of its layers will run in INT8?

Rules are plain data (``RULES``: id, targets, what it checks); each is a small function over
an index of the graph, and every violation names the rule, the node and what to do:

===================  ==========  ==========================================================
rule                 targets     what it flags
===================  ==========  ==========================================================
opset                both        a default-domain opset below 13 (no per-channel Q/DQ)
zero-point           tensorrt    a Q/DQ zero point that is not 0 (TensorRT is symmetric)
dtype                both        a Q/DQ type the target does not run: tensorrt takes int8
                                 only (FP8 and INT4 are out of scope for this linter); ort
                                 takes int8 and uint8, and int32 for the
                                 DequantizeLinear of a Conv/Gemm bias (its own quantizer
                                 writes those). 16-bit, 4-bit and float8 Q/DQ are refused for
                                 ort: its CPU kernels fuse only 8-bit groups into integer ops
weight-range         tensorrt    an int8 weight holding -128 (TensorRT weights are [-127, 127])
per-channel          tensorrt    a Conv weight with one (per-tensor) scale
axis                 both        a per-channel weight quantized along another axis than the
                                 output channels (Conv: 0; Gemm: 0 if transB else 1;
                                 MatMul: the last)
unquantized-input    both        a Conv/Gemm/MatMul with Q/DQ on only one of its two inputs
add-one-side         both        an Add of two activations with Q/DQ on only one of them
qdq-inside-fusion    tensorrt    Conv -> Q -> DQ -> Relu/BatchNormalization: blocks fusion
unfolded-bn          tensorrt    a BatchNormalization left in a quantized graph
===================  ==========  ==========================================================

The INT8 prediction is structural, a heuristic rather than a build of the engine: a
Conv/Gemm/MatMul runs in INT8 when its activation (input 0) and weight (input 1) both come
from DequantizeLinear, and an Add when both its inputs do. "Come from" allows ops that the
target moves a DequantizeLinear past, as they commute with quantization: MaxPool, Reshape,
Transpose, Squeeze, Unsqueeze, Slice, and for ``tensorrt`` also Flatten and Identity (ONNX
Runtime's propagation skips Flatten, and needs the DequantizeLinear to have a single
consumer); the rules that look at inputs read them the same way. For ``ort``, a Conv or an
Add must also hand its output to a QuantizeLinear (directly, or through a Relu that the Q's
zero point makes redundant), as ONNX Runtime's QLinearConv/QLinearAdd fusions require. A
runtime may still pick float kernels the graph does not show: ONNX Runtime fuses groups with
int8 (signed) activations into integer kernels on ARM, but on x86 only with the session
option ``session.qdqisint8allowed``; uint8 activations fuse on both.

Only the ``onnx`` Python API is used: nothing is run.

Example::

    result = check("out/model.onnx", "tensorrt")
    if not result.ok:
        text = result.table()          # rule, node, message; then the INT8 prediction
    layers = result.int8_nodes         # ['/stem/Conv', '/conv/Conv', '/Add', ...]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tabulate import tabulate

from fxcomp.ir.errors import InputError

__all__ = ["RULES", "TARGETS", "CheckResult", "Prediction", "Rule", "Violation", "check"]

TARGETS = ("tensorrt", "ort")
MIN_OPSET = 13
_QDQ = ("QuantizeLinear", "DequantizeLinear")
_COMPUTE = ("Conv", "Gemm", "MatMul")
_ALLOWED = {
    "tensorrt": {TensorProto.INT8},
    "ort": {TensorProto.INT8, TensorProto.UINT8},
}
_MODEL = "(model)"  # the node name of a violation that belongs to no node
# Ops a DequantizeLinear is moved past (they commute with quantization), so that
# DQ -> MaxPool -> Conv is a quantized Conv: TensorRT's Q/DQ propagation, and ONNX Runtime's
# QDQPropagationTransformer (which does not take Flatten, and needs a DQ with one consumer).
_PASSTHROUGH = {
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


@dataclass(frozen=True)
class Prediction:
    """Whether ``node`` (a Conv/Gemm/MatMul/Add) is predicted to run in INT8, and why."""

    node: str
    op_type: str
    int8: bool
    reason: str


@dataclass(frozen=True)
class CheckResult:
    """The violations of one file against one target, and its INT8 prediction.

    Example::

        result = check(path, "ort")
        assert result.ok, result.table()
    """

    target: str
    violations: list[Violation]
    predictions: list[Prediction]

    @property
    def ok(self) -> bool:
        """True when no rule is broken."""
        return not self.violations

    @property
    def int8_nodes(self) -> list[str]:
        """The Conv/Gemm/MatMul/Add nodes predicted to run in INT8, in graph order."""
        return [p.node for p in self.predictions if p.int8]

    def table(self) -> str:
        """The violations, then the INT8 prediction, as text tables."""
        if self.violations:
            rows = [[v.rule, v.node, v.message] for v in self.violations]
            head = f"{len(self.violations)} violation(s) of the {self.target} QDQ rules:\n"
            body = tabulate(rows, headers=["rule", "node", "message"], maxcolwidths=[None, 40, 70])
        else:
            head, body = f"no violations of the {self.target} QDQ rules", ""
        rows = [
            [p.node, p.op_type, "int8" if p.int8 else "float", p.reason] for p in self.predictions
        ]
        count = f"{len(self.int8_nodes)} of {len(self.predictions)}"
        prediction = tabulate(
            rows, headers=["node", "op", "precision", "why"], maxcolwidths=[40, None, None, 60]
        )
        return f"{head}{body}\n\nINT8 prediction ({count} layers):\n{prediction}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: target, ok, violations, predictions, int8_nodes."""
        return {
            "target": self.target,
            "ok": self.ok,
            "violations": [asdict(v) for v in self.violations],
            "predictions": [asdict(p) for p in self.predictions],
            "int8_nodes": self.int8_nodes,
        }


class _Graph:
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
        self.quantized = any(n.op_type in _QDQ for n in self.nodes)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output; None for anything else."""
        tensor = self._tensors.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def is_constant(self, name: str) -> bool:
        return name in self._tensors

    def dq_into(self, node: onnx.NodeProto, index: int) -> onnx.NodeProto | None:
        """The DequantizeLinear that produces ``node``'s input ``index``, directly or through
        ops the target moves it past (``_PASSTHROUGH``); None if there is none."""
        if index >= len(node.input):
            return None
        source = self.producer.get(node.input[index])
        moved = False
        while source is not None and source.op_type in _PASSTHROUGH[self.target]:
            source, moved = self.producer.get(source.input[0]), True
        if source is None or source.op_type != "DequantizeLinear":
            return None
        single = len(self.consumers.get(source.output[0], [])) == 1
        return source if not moved or self.target != "ort" or single else None

    def blocked_by(self, name: str) -> str | None:
        """The op type of the producer of ``name`` when it is fed by a DequantizeLinear but is
        not an op the target moves DequantizeLinear past (Flatten for ONNX Runtime)."""
        source = self.producer.get(name)
        if source is None or not source.input or source.op_type in _PASSTHROUGH[self.target]:
            return None
        before = self.producer.get(source.input[0])
        shape_op = source.op_type in _PASSTHROUGH["tensorrt"]
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
            return _attribute(node, "output_dtype", 0) or TensorProto.UINT8
        if node.input[0] in self.types:
            return self.types[node.input[0]]
        source = self.producer.get(node.input[0])
        return self.qdq_type(source) if source is not None and source.op_type in _QDQ else None


def _attribute(node: onnx.NodeProto, name: str, default: Any) -> Any:
    """The value of attribute ``name`` of ``node``, or ``default``."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _name(node: onnx.NodeProto) -> str:
    """A node's name; an unnamed node is named by its op and first output."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _type_name(data_type: int) -> str:
    return helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.").lower()


def _is_bias_dq(g: _Graph, node: onnx.NodeProto) -> bool:
    """True when ``node`` dequantizes a constant that only feeds Conv/Gemm bias inputs."""
    users = g.consumers.get(node.output[0], [])
    return bool(users) and all(
        u.op_type in ("Conv", "Gemm") and list(u.input).index(node.output[0]) == 2 for u in users
    )


def _output_axis(node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of ``node``'s weight (input 1), of rank ``rank``."""
    if node.op_type == "Gemm":
        return 0 if _attribute(node, "transB", 0) else 1
    return 0 if node.op_type == "Conv" else rank - 1


# --- the rules: each g -> violations ------------------------------------------------------


def _opset(g: _Graph) -> Iterator[Violation]:
    if g.opset is not None and g.opset < MIN_OPSET:
        yield Violation(
            "opset",
            _MODEL,
            f"the default-domain opset is {g.opset}, below {MIN_OPSET}, the first with "
            "per-channel QuantizeLinear/DequantizeLinear: export with opset 13 or later",
        )


def _zero_point(g: _Graph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type not in _QDQ or len(node.input) < 3 or not node.input[2]:
            continue
        zero = g.constant(node.input[2])
        if zero is not None and np.any(zero.astype(np.float64) != 0):
            shown = np.unique(zero)[:4].tolist()
            yield Violation(
                "zero-point",
                _name(node),
                f"zero point {node.input[2]} is {shown}, not 0: TensorRT quantizes "
                "symmetrically and needs zero point 0; quantize with a symmetric scheme",
            )


def _dtype(g: _Graph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type not in _QDQ:
            continue
        data_type = g.qdq_type(node)
        if data_type is None or data_type in _ALLOWED[g.target]:
            continue
        is_bias = node.op_type == "DequantizeLinear" and _is_bias_dq(g, node)
        if g.target == "ort" and is_bias and data_type == TensorProto.INT32:
            continue
        yield Violation("dtype", _name(node), _dtype_message(g.target, data_type, is_bias))


def _dtype_message(target: str, data_type: int, is_bias: bool) -> str:
    kind = _type_name(data_type)
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


def _weight_range(g: _Graph) -> Iterator[Violation]:
    for node, dq in _weighted(g):
        weight = g.constant(dq.input[0])
        if weight is not None and weight.dtype == np.int8 and (weight == -128).any():
            yield Violation(
                "weight-range",
                _name(dq),
                f"int8 weight {dq.input[0]} of {node.op_type} {_name(node)} holds -128 "
                f"({int((weight == -128).sum())} values): TensorRT's weights are symmetric "
                "in [-127, 127]; quantize them with quant_min=-127",
            )


def _per_channel(g: _Graph) -> Iterator[Violation]:
    for node, dq in _weighted(g):
        scale = g.constant(dq.input[1])
        if node.op_type == "Conv" and scale is not None and scale.size == 1:
            yield Violation(
                "per-channel",
                _name(dq),
                f"the weight of Conv {_name(node)} has one scale for all its output channels: "
                "TensorRT expects per-output-channel weight scales (axis 0); quantize "
                "weights per channel",
            )


def _axis(g: _Graph) -> Iterator[Violation]:
    for node, dq in _weighted(g):
        scale = g.constant(dq.input[1])
        weight = g.constant(dq.input[0])
        if scale is None or weight is None or scale.size == 1:
            continue
        axis = _attribute(dq, "axis", 1)
        axis = axis + weight.ndim if axis < 0 else axis
        expected = _output_axis(node, weight.ndim)
        if axis != expected:
            yield Violation(
                "axis",
                _name(dq),
                f"per-channel weight of {node.op_type} {_name(node)} is quantized along axis "
                f"{axis}, not its output-channel axis {expected}: set axis={expected} and "
                "one scale per output channel",
            )


def _unquantized_input(g: _Graph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type not in _COMPUTE or len(node.input) < 2:
            continue
        activation, weight = g.dq_into(node, 0), g.dq_into(node, 1)
        if (activation is None) == (weight is None):
            continue
        quantized, plain = (
            ("weight", "activation") if activation is None else ("activation", "weight")
        )
        missing = node.input[0] if activation is None else node.input[1]
        yield Violation(
            "unquantized-input",
            _name(node),
            f"the {quantized} input comes through DequantizeLinear but the {plain} input "
            f"{missing} does not{_blocked(g, missing)}, so the layer runs in float: put a "
            f"QuantizeLinear -> DequantizeLinear pair on {missing}, or quantize neither input",
        )


def _add_one_side(g: _Graph) -> Iterator[Violation]:
    for node in g.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        kinds = [_operand_kind(g, node, i) for i in (0, 1)]
        if sorted(kinds) == ["dq", "float"]:
            missing = node.input[kinds.index("float")]
            yield Violation(
                "add-one-side",
                _name(node),
                f"only one input of this Add comes through DequantizeLinear; {missing} does "
                f"not{_blocked(g, missing)}, so the add runs in float and a residual cannot "
                f"fuse: put a QuantizeLinear -> DequantizeLinear pair on {missing}",
            )


def _blocked(g: _Graph, name: str) -> str:
    """Why a dequantized tensor does not reach ``name``, when an op stops it; else ""."""
    op_type = g.blocked_by(name)
    if op_type is None:
        return ""
    runtime = "TensorRT" if g.target == "tensorrt" else "ONNX Runtime"
    return f" ({runtime} does not move DequantizeLinear past {op_type})"


def _operand_kind(g: _Graph, node: onnx.NodeProto, index: int) -> str:
    """'const' (a constant, or a dequantized one), 'dq' (a dequantized activation) or
    'float'."""
    dq = g.dq_into(node, index)
    if g.is_constant(node.input[index]) or (dq is not None and g.is_constant(dq.input[0])):
        return "const"
    return "float" if dq is None else "dq"


def _qdq_inside_fusion(g: _Graph) -> Iterator[Violation]:
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
                        _name(q),
                        f"a Q/DQ pair between Conv {_name(conv)} and {user.op_type} "
                        f"{_name(user)} keeps TensorRT from fusing them: quantize after the "
                        f"{user.op_type} instead",
                    )


def _unfolded_bn(g: _Graph) -> Iterator[Violation]:
    for node in g.nodes:
        if g.quantized and node.op_type == "BatchNormalization":
            yield Violation(
                "unfolded-bn",
                _name(node),
                "a BatchNormalization left in a quantized graph runs in float and splits the "
                "INT8 layers around it: fold it into the preceding Conv before quantizing "
                "(fxcomp.passes.fuse())",
            )


def _weighted(g: _Graph) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Every Conv/Gemm/MatMul with a dequantized constant weight, with that DequantizeLinear."""
    for node in g.nodes:
        dq = g.weight_dq(node) if node.op_type in _COMPUTE else None
        if dq is not None:
            yield node, dq


@dataclass(frozen=True)
class Rule:
    """One QDQ rule: its id, the targets it applies to, and the function that checks it."""

    id: str
    targets: tuple[str, ...]
    find: Callable[[_Graph], Iterator[Violation]]


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
    Rule("unfolded-bn", ("tensorrt",), _unfolded_bn),
)


# --- the INT8 prediction --------------------------------------------------------------------


def _predict(g: _Graph, node: onnx.NodeProto) -> Prediction:
    inputs = "activation and weight" if node.op_type in _COMPUTE else "both inputs"
    missing = [i for i in (0, 1) if g.dq_into(node, i) is None]
    if missing:
        name = node.input[missing[0]]
        reason = f"input {missing[0]} ({name}) is not dequantized{_blocked(g, name)}"
        return Prediction(_name(node), node.op_type, False, reason)
    if g.target == "ort" and node.op_type in ("Conv", "Add") and not _feeds_quantize(g, node):
        reason = "its output does not go into a QuantizeLinear"
        return Prediction(_name(node), node.op_type, False, reason)
    return Prediction(_name(node), node.op_type, True, f"{inputs} come through DequantizeLinear")


def _feeds_quantize(g: _Graph, node: onnx.NodeProto) -> bool:
    """True when ``node``'s only user is a QuantizeLinear, or a Relu whose only user is a
    QuantizeLinear with the type's lowest value as zero point (the Relu is then a no-op)."""
    users = g.consumers.get(node.output[0], [])
    if len(users) != 1:
        return False
    if users[0].op_type == "QuantizeLinear":
        return True
    if users[0].op_type != "Relu":
        return False
    after = g.consumers.get(users[0].output[0], [])
    if len(after) != 1 or after[0].op_type != "QuantizeLinear":
        return False
    zero = g.constant(after[0].input[2]) if len(after[0].input) > 2 else np.zeros((), np.uint8)
    if zero is None or zero.dtype not in (np.int8, np.uint8):
        return False
    return bool(np.all(zero == np.iinfo(zero.dtype).min))


# --- the entry point ------------------------------------------------------------------------


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise InputError(f"no such file: {path}", hint="pass the path of an .onnx file")
    try:
        return onnx.load(path, load_external_data=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(
            f"cannot read {path} as an ONNX model: {first}",
            hint="pass an .onnx file written by an ONNX exporter",
        ) from err


def check(model: onnx.ModelProto | str | Path, target: str) -> CheckResult:
    """Check ``model`` (a ModelProto or the path of an ``.onnx`` file) against the QDQ rules
    of ``target`` ("tensorrt" or "ort"); raise ``InputError`` for an unreadable file.

    Example::

        result = check("out/model.onnx", "tensorrt")
        rules = {v.rule for v in result.violations}     # e.g. {'zero-point', 'dtype'}
    """
    if target not in TARGETS:
        raise InputError(f"unknown target '{target}'", hint=f"targets: {', '.join(TARGETS)}")
    g = _Graph(_load(model), target)
    found = (v for rule in RULES if target in rule.targets for v in rule.find(g))
    violations = list(dict.fromkeys(found))  # a shared weight is reported once
    predictions = [_predict(g, node) for node in g.nodes if node.op_type in (*_COMPUTE, "Add")]
    return CheckResult(target, violations, predictions)
