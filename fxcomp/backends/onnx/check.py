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
unquantized-input    both        a Conv/Gemm/MatMul with a weight (a constant input 1) and Q/DQ
                                 on only one of its two inputs
add-one-side         both        an Add of two activations with Q/DQ on only one of them,
                                 its output quantized (for tensorrt, unless the other is a
                                 Conv's output that only the Add reads: the residual fusion
                                 below); an Add whose output stays float is float by design
                                 (``skip``, mixed precision)
qdq-inside-fusion    tensorrt    Conv -> Q -> DQ -> Relu/BatchNormalization: blocks fusion
residual-split       tensorrt    Conv -> Q -> DQ -> Add with the Add's other input
                                 dequantized: the pair keeps TensorRT from fusing the Add
                                 into the Conv (its developer guide's Q/DQ placement for
                                 residual adds quantizes only the other input)
unfolded-bn          tensorrt    a BatchNormalization left in a quantized graph
===================  ==========  ==========================================================

The INT8 prediction is structural, a heuristic rather than a build of the engine: integer
ops (``MatMulInteger``, ``ConvInteger``: dynamic quantization) are INT8 as written; a
Conv/Gemm/MatMul runs in INT8 when its activation (input 0) and weight (input 1) both come
from DequantizeLinear, and an Add when both its inputs do (for ``tensorrt``, also when one
is a Conv's output it alone reads and the other is dequantized: fused into the Conv).
"Come from" allows ops that the
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

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tabulate import tabulate

from fxcomp.backends.onnx.qdq_graph import (
    COMPUTE,
    TARGETS,
    QdqGraph,
    Violation,
    blocked,
    node_name,
)
from fxcomp.backends.onnx.qdq_rules import RULES
from fxcomp.ir.errors import InputError

__all__ = ["TARGETS", "CheckResult", "Prediction", "Violation", "check"]


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


_INTEGER = ("MatMulInteger", "ConvInteger")  # integer ops: INT8 as written


def _predict(g: QdqGraph, node: onnx.NodeProto) -> Prediction:
    if node.op_type in _INTEGER:
        return Prediction(node_name(node), node.op_type, True, "an integer op")
    conv = g.residual_conv(node)
    if conv is not None:
        reason = f"fused into Conv {node_name(conv)} as its residual (other input dequantized)"
        return Prediction(node_name(node), node.op_type, True, reason)
    inputs = "activation and weight" if node.op_type in COMPUTE else "both inputs"
    missing = [i for i in (0, 1) if g.dq_into(node, i) is None]
    if missing:
        name = node.input[missing[0]]
        reason = f"input {missing[0]} ({name}) is not dequantized{blocked(g, name)}"
        return Prediction(node_name(node), node.op_type, False, reason)
    if g.target == "ort" and node.op_type in ("Conv", "Add") and not _feeds_quantize(g, node):
        reason = "its output does not go into a QuantizeLinear"
        return Prediction(node_name(node), node.op_type, False, reason)
    return Prediction(
        node_name(node), node.op_type, True, f"{inputs} come through DequantizeLinear"
    )


def _feeds_quantize(g: QdqGraph, node: onnx.NodeProto) -> bool:
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
    g = QdqGraph(_load(model), target)
    found = (v for rule in RULES if target in rule.targets for v in rule.find(g))
    violations = list(dict.fromkeys(found))  # a shared weight is reported once
    kinds = (*COMPUTE, *_INTEGER, "Add")
    predictions = [_predict(g, node) for node in g.nodes if node.op_type in kinds]
    return CheckResult(target, violations, predictions)
