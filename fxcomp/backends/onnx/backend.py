"""ONNX backend: the float graph, or the reference quantized graph in QDQ form, as ``.onnx``.

Activation Q/DQ steps export as exactly ``QuantizeLinear -> DequantizeLinear`` with typed zero
points, and quantized weights as ``DequantizeLinear`` on int8 initializers (per output
channel, axis 0), so the file follows the target's QDQ rules by construction: ``tensorrt``
(int8 symmetric activations, zero point 0) or ``ort`` (uint8 activations, int8 weights).
Constant subgraphs are folded, Identity nodes removed and ``Flatten`` written as ``Reshape``
(ONNX Runtime moves a DequantizeLinear past the latter only) after export. The file is
checked with ``onnx.checker`` and, when quantized, with the target's QDQ rules
(``fxcomp.backends.onnx.check``; the manifest lists the layers predicted to run in INT8), run in
ONNX Runtime on the example inputs (a ``tensorrt`` file with its Q/DQ pairs evaluated as
written, an ``ort`` file on ONNX Runtime's int8 kernels), compared with the reference graph and
the float model, and only then renamed into place.

Example::

    backend = OnnxBackend()
    artifact = backend.emit(gm, ctx, Path("out"))      # out/model.onnx
    session = backend.load(artifact.path)
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from torch.fx import GraphModule

from fxcomp.backends.base import Artifact, Backend, artifact_path, expected_outputs
from fxcomp.backends.onnx.check import check
from fxcomp.ir.atomic import write_atomic
from fxcomp.ir.capture import is_token_input
from fxcomp.ir.errors import BackendError, InputError
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.dynamic import DynamicLinear
from fxcomp.quant.observers import Observer
from fxcomp.quant.reference import QuantDequant
from fxcomp.runtime.parity import FLOAT_SQNR_DB, checked_parity

__all__ = ["FILENAME", "OPSET", "OnnxBackend", "SessionRunner", "export", "run", "session"]

FILENAME = "model.onnx"
OPSET = 17
MAX_OPSET = 20
FP16_SQNR_DB = 50.0  # float16 weights: about 11 significant bits
_KEEP = {"DequantizeLinear"}  # int8 weights stay int8 behind their DequantizeLinear


def _check_exportable(gm: GraphModule) -> str | None:
    """The engine of a quantized graph (None for a float one); raise if it cannot export."""
    for name, module in gm.named_modules():
        if isinstance(module, Observer):
            raise BackendError(
                f"'{name}' is still an observer: the graph was not frozen",
                hint="run the whole quantize(...) pipeline (observe, calibrate, freeze) first",
            )
        if type(module).__module__.startswith("torch.ao.nn.quantized"):
            raise BackendError(
                f"'{name}' is a lowered fbgemm/qnnpack kernel, which ONNX cannot hold",
                hint="quantize with engine='tensorrt' or engine='ort' for the ONNX backend",
            )
    quantized = any(isinstance(m, QuantDequant | DynamicLinear) for m in gm.modules())
    config = QUANT_CONFIG.get(gm)
    if quantized and config is not None and config.target.kernels:
        raise BackendError(
            f"the graph was quantized for engine '{config.engine}', whose 7-bit activations "
            "ONNX runtimes do not run",
            hint="quantize with engine='tensorrt' or engine='ort' for the ONNX backend",
        )
    return config.engine if quantized and config is not None else None


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or not 13 <= opset <= MAX_OPSET:
        raise InputError(
            f"ONNX opset must be an integer from 13 to {MAX_OPSET}, got {opset!r}",
            hint="13 is the first opset with per-channel QuantizeLinear/DequantizeLinear",
        )


def export(
    gm: GraphModule,
    example_inputs: tuple,
    *,
    opset: int = OPSET,
    dynamic_batch: bool = True,
    fp16_weights: bool = False,
) -> onnx.ModelProto:
    """``gm`` as an ONNX model: named inputs and outputs, batch axis dynamic, constants
    folded, Identity nodes removed; with ``fp16_weights`` the float weights are stored as
    float16 and cast to float32 when the model loads.

    Example::

        model = export(gm, (torch.randn(1, 3, 224, 224),))
    """
    _check_opset(opset)
    inputs = [
        f"input_{i}" if len(example_inputs) > 1 else "input" for i in range(len(example_inputs))
    ]
    buffer = io.BytesIO()
    axes = None
    if dynamic_batch:  # and the sequence of token ids and masks
        axes = {
            name: {0: "batch", 1: "sequence"} if is_token_input(x) else {0: "batch"}
            for name, x in zip(inputs, example_inputs, strict=True)
        }
        axes["output"] = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                gm.eval(),
                tuple(example_inputs),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=inputs,
                output_names=["output"],
                dynamic_axes=axes,
            )
    except Exception as err:
        raise BackendError(f"ONNX export failed: {type(err).__name__}: {err}") from err
    model = onnx.load_from_string(buffer.getvalue())
    _fold_constants(model.graph)
    _remove_identities(model.graph)
    _flatten_as_reshape(model.graph)
    if fp16_weights:
        _store_half(model.graph)
    return model


def _flatten_as_reshape(graph: onnx.GraphProto) -> None:
    """``Flatten(axis=1)`` as ``Reshape(x, [0, -1])``: the same values, and ONNX Runtime
    moves a DequantizeLinear past a Reshape (not past a Flatten), so the classifier after
    ``flatten`` runs in INT8 too."""
    shape = "fxcomp_flatten_shape"
    for node in graph.node:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if node.op_type == "Flatten" and axis == 1:
            node.op_type = "Reshape"
            del node.attribute[:]
            node.input.append(shape)
    if any(shape in node.input for node in graph.node):
        graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), shape))


def _store_half(graph: onnx.GraphProto) -> None:
    """Store float32 initializers as float16, each cast back to float32 by a Cast node."""
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        half = numpy_helper.to_array(tensor).astype(np.float16)
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(half, f"{name}_fp16"))
        casts.append(
            onnx.helper.make_node("Cast", [f"{name}_fp16"], [name], to=onnx.TensorProto.FLOAT)
        )
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)


def _fold_constants(graph: onnx.GraphProto) -> None:
    """Replace every node whose inputs are all constants (and that is not a weight's
    DequantizeLinear) by an initializer holding its output."""
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
            continue
        if node.op_type in _KEEP or not all(i in constants for i in node.input if i):
            kept.append(node)
            continue
        feeds = {i: constants[i] for i in node.input if i}
        outputs = ReferenceEvaluator(node).run(None, feeds)
        constants.update(zip(node.output, outputs, strict=True))
    used = {i for node in kept for i in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(
        numpy_helper.from_array(np.asarray(value), name)
        for name, value in constants.items()
        if name in used
    )


def _remove_identities(graph: onnx.GraphProto) -> None:
    """Bypass Identity nodes (the exporter's copies of shared constants, among others)."""
    outputs = {o.name for o in graph.output}
    rename = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            rename[node.output[0]] = rename.get(node.input[0], node.input[0])
        else:
            kept.append(node)
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)


def session(
    path: Path | str, *, threads: int | None = None, int8_kernels: bool = True
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``path``, with intra-op thread spinning off (several
    sessions in one process otherwise steal each other's cores). Without ``int8_kernels``
    only basic graph optimizations run: Q/DQ pairs are evaluated as written, around float
    ops, instead of being fused into ONNX Runtime's int8 kernels.

    Example::

        (output,) = session("out/model.onnx").run(None, {"input": x.numpy()})
    """
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not int8_kernels:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise BackendError(f"ONNX Runtime cannot load {path}: {err}") from err


def run(loaded: ort.InferenceSession, inputs: tuple) -> torch.Tensor:
    """Run an ONNX Runtime session on torch ``inputs``; the first output as a tensor."""
    names = [i.name for i in loaded.get_inputs()]
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(names, inputs, strict=True)}
    return torch.from_numpy(loaded.run(None, feeds)[0])


class OnnxBackend(Backend):
    """ONNX, float or QDQ for TensorRT and ONNX Runtime (module docstring)."""

    name = "onnx"

    def check_options(
        self, *, opset: int = OPSET, dynamic_batch: bool = True, fp16_weights: bool = False
    ) -> None:
        """Raise ``InputError`` for options the ONNX backend cannot honour (unknown names
        raise ``TypeError`` naming them)."""
        _check_opset(opset)

    def emit(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        out_dir: Path,
        *,
        opset: int = OPSET,
        dynamic_batch: bool = True,
        fp16_weights: bool = False,
    ) -> Artifact:
        """Export ``gm``, check it, run it in ONNX Runtime, verify it; the artifact."""
        engine = _check_exportable(gm)
        if fp16_weights and engine is not None:
            raise InputError(
                "fp16_weights applies to float models: a QDQ model's weights are already int8"
            )
        inputs = ctx.config.example_inputs
        model = export(
            gm, inputs, opset=opset, dynamic_batch=dynamic_batch, fp16_weights=fp16_weights
        )
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as err:
            raise BackendError(f"the exported model fails onnx.checker: {err}") from err
        layers = None
        if engine is not None:
            lint = check(model, engine)
            if not lint.ok:
                raise BackendError(
                    f"the exported QDQ graph breaks {engine}'s rules:\n{lint.table()}",
                    hint="report this model: the exporter placed a Q/DQ step the target rejects",
                )
            layers = {"int8": lint.int8_nodes, "total": len(lint.predictions)}
        manifest = {
            "format": 1,
            "engine": engine,
            "int8_layers": layers,
            "opset": opset,
            "fp16_weights": fp16_weights,
            "quantized": engine is not None,
            "inputs": [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
        }

        def verify(tmp: Path) -> dict[str, float]:
            # A tensorrt file is checked for what it means, Q/DQ evaluated as written
            # (TensorRT's int8 kernels accumulate exactly); ONNX Runtime's own int8 kernels
            # are not TensorRT's, and on CPUs without VNNI they saturate on its full-range
            # weights.
            loaded = session(tmp, int8_kernels=engine != "tensorrt")
            return checked_parity(
                run(loaded, inputs),
                expected=expected_outputs(gm, ctx.state.reference_outputs, inputs),
                float_outputs=ctx.state.float_outputs,
                quantized=engine is not None,
                what="ONNX Runtime",
                min_db=FP16_SQNR_DB if fp16_weights else FLOAT_SQNR_DB,
            )

        path = out_dir / FILENAME
        figures = write_atomic(path, model.SerializeToString(), check=verify)
        return Artifact(self.name, path, manifest, figures)

    def load(
        self,
        artifact: Artifact | Path | str,
        *,
        threads: int | None = None,
        int8_kernels: bool = True,
    ) -> ort.InferenceSession:
        """An ONNX Runtime CPU session for the artifact (``session``).

        Example::

            loaded = OnnxBackend().load("out/model.onnx", threads=2)
        """
        return session(artifact_path(artifact), threads=threads, int8_kernels=int8_kernels)

    def runner(self, artifact: Artifact | Path | str) -> Callable[..., Any]:
        """The session wrapped to take torch tensors and return the first output."""
        return SessionRunner(self.load(artifact))


class SessionRunner:
    """An ONNX Runtime session called with torch tensors (``run``); its work runs on ONNX
    Runtime's thread pool, which timing keeps apart from PyTorch's
    (``fxcomp.runtime.latency``)."""

    thread_pool = "onnxruntime"

    def __init__(self, loaded: ort.InferenceSession) -> None:
        self.session = loaded

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return run(self.session, inputs)
