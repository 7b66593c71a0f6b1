"""OpenVINO backend: the graph as an OpenVINO IR, compiled and checked by OpenVINO's runtime.

A float graph is exported to ONNX (``fxcomp.backends.onnx.backend.export``, batch axis
dynamic) and converted to IR; its float parts run in the inference precision the options
name (``f32`` by default, ``bf16`` where asked), recorded in the manifest, never the CPU's
default (a bf16 IR is first checked in f32, then its figures are recorded as they are).
A quantized graph must be a reference graph for ``openvino`` (uint8 affine
activations, int8 symmetric per-channel weights, no Q/DQ step between a convolution and the
activation OpenVINO fuses into it), ``ort`` or ``tensorrt``: its Q/DQ pairs become
OpenVINO's FakeQuantize steps, which its low-precision transformations turn into INT8
kernels. The manifest says which convolutions and fully-connected layers OpenVINO's
execution graph runs in INT8 and names each quantized one it runs in float. The IR
(``model.xml``, ``model.bin``) is run by OpenVINO on the example inputs, compared with the
reference graph and the float model, and bundled (``fxcomp.backends.bundle``) with its
manifest and samples; the bundle is loaded back, its samples re-run, and only then renamed
into place. ``unzip model.fxbundle model.xml model.bin`` gives the IR to other OpenVINO
tools.

Example::

    result = fxcomp.compile(model, (x,), [fuse(), quantize(data, engine="openvino")],
                            backend="openvino", output_dir="out",
                            backend_options={"threads": 2})
    bundle = fxcomp.load_bundle("out/model.fxbundle")
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.fx import GraphModule

from fxcomp.backends.base import Artifact, expected_outputs
from fxcomp.backends.bundle import OPENVINO, PROGRAMS
from fxcomp.backends.bundle_manifest import (
    BundleBackend,
    DynamicAxes,
    bundle_artifact,
    check_app_options,
    runs_another_batch,
)
from fxcomp.backends.onnx.backend import export
from fxcomp.backends.openvino.runtime import (
    OpenVinoModel,
    Settings,
    is_int8,
    layer_precisions,
    require_openvino,
)
from fxcomp.ir.errors import BackendError
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.dynamic import DynamicLinear
from fxcomp.quant.layers import layer_schemes
from fxcomp.quant.observers import Observer
from fxcomp.quant.reference import QuantDequant
from fxcomp.quant.scheme import ENGINES
from fxcomp.runtime.parity import FLOAT_SQNR_DB, checked_parity

__all__ = ["OpenVinoBackend"]

ENGINE = "openvino"
_HINT = f"end the pipeline with quantize(..., engine='{ENGINE}')"


def _quantized_engine(gm: GraphModule) -> str | None:
    """The engine of a reference graph OpenVINO takes, None for a float graph; raise for a
    graph still observing, lowered to fbgemm/qnnpack kernels, dynamically quantized, or
    quantized for an engine whose grids OpenVINO does not run."""
    for name, module in gm.named_modules():
        if isinstance(module, Observer):
            raise BackendError(
                f"'{name}' is an observer: the graph was calibrated but not frozen", hint=_HINT
            )
        if type(module).__module__.startswith("torch.ao.nn"):
            raise BackendError(
                f"'{name}' is a {type(module).__name__}: the graph was lowered to "
                "fbgemm/qnnpack kernels, which OpenVINO does not run",
                hint=_HINT,
            )
        if isinstance(module, DynamicLinear):
            raise BackendError(
                f"'{name}' is dynamically quantized, which OpenVINO's IR does not take from "
                "ONNX (MatMulInteger)",
                hint="quantize statically with engine='openvino', or compile the float graph",
            )
    if not any(isinstance(m, QuantDequant) for m in gm.modules()):
        return None
    config = QUANT_CONFIG.get(gm)
    engine = config.engine if config is not None else None
    if engine is None or OPENVINO not in ENGINES[engine].backends:
        raise BackendError(
            f"the graph is quantized for '{engine}', whose grids OpenVINO's CPU kernels do not run",
            hint=f"{_HINT} (ort and tensorrt graphs run too)",
        )
    return engine


def _hard_sigmoid_as_clamp(graph: onnx.GraphProto) -> None:
    """Write PyTorch's hard sigmoid, ``HardSigmoid(alpha=1/6, beta=0.5)``, as
    ``Clip(x + 3, 0, 6) * (1/6)``: the same values, and the pattern OpenVINO fuses into the
    convolution before it (ONNX's HardSigmoid stays a float layer with layout conversions
    around it)."""
    constants = {"three": 3.0, "zero": 0.0, "six": 6.0, "sixth": 1 / 6}
    names = {key: f"fxcomp_hard_sigmoid_{key}" for key in constants}
    nodes = []
    for node in graph.node:
        attributes = {a.name: a.f for a in node.attribute}
        torch_form = math.isclose(attributes.get("alpha", 0.2), 1 / 6, rel_tol=1e-6)
        if node.op_type != "HardSigmoid" or not torch_form or attributes.get("beta") != 0.5:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        nodes += [
            onnx.helper.make_node("Add", [x, names["three"]], [f"{y}_plus_3"]),
            onnx.helper.make_node(
                "Clip", [f"{y}_plus_3", names["zero"], names["six"]], [f"{y}_clipped"]
            ),
            onnx.helper.make_node("Mul", [f"{y}_clipped", names["sixth"]], [y]),
        ]
    if len(nodes) == len(graph.node):
        return
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(
        numpy_helper.from_array(np.array(value, np.float32), names[key])
        for key, value in constants.items()
    )


def _intermediate_representation(model: onnx.ModelProto) -> dict[str, bytes]:
    """The ONNX model converted to OpenVINO IR: ``model.xml`` and ``model.bin``, weights kept
    in float32 (never compressed to float16 behind the user's back)."""
    ov = require_openvino()
    with tempfile.TemporaryDirectory(prefix="fxcomp-openvino-") as work:
        source, target = Path(work) / "model.onnx", Path(work) / "model.xml"
        _hard_sigmoid_as_clamp(model.graph)
        onnx.save(model, source)
        try:
            ov.save_model(ov.convert_model(source), target, compress_to_fp16=False)
        except Exception as err:
            raise BackendError(f"OpenVINO cannot convert the exported model: {err}") from err
        return {name: (Path(work) / name).read_bytes() for name in PROGRAMS[OPENVINO]}


def _check_meaning(
    exact: OpenVinoModel, gm: GraphModule, ctx: CompileContext, *, quantized: bool
) -> None:
    """Raise ``VerificationError`` unless the IR compiled in f32 reproduces the graph (a
    bf16 run is then only as far from it as bf16 rounding takes it)."""
    inputs = tuple(ctx.config.example_inputs)
    with torch.no_grad():
        outputs = exact(*inputs)
    checked_parity(
        outputs,
        expected=expected_outputs(gm, ctx.state.reference_outputs, inputs),
        float_outputs=ctx.state.float_outputs,
        quantized=quantized,
        what="OpenVINO (f32)",
    )


def _execution(compiled: Any, quantized: bool) -> tuple[dict[str, Any], list[str]]:
    """The precision of each weighted layer in OpenVINO's execution graph, as counts and the
    layers left in float, and a note for each quantized one run in float."""
    precisions = layer_precisions(compiled)
    in_float = sorted(name for name, p in precisions.items() if not is_int8(p))
    counts = dict(Counter(precisions.values()))
    notes = [
        f"OpenVINO runs the quantized layer '{name}' in {precisions[name]}, not INT8"
        for name in in_float
        if quantized
    ]
    return {"layers": counts, "float_layers": in_float}, notes


class OpenVinoBackend(BundleBackend):
    """An OpenVINO IR in a self-describing bundle (module docstring)."""

    name = "openvino"

    def check_options(
        self,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
        precision: str = "f32",
        hint: str = "latency",
        streams: int | None = None,
        threads: int | None = None,
        dynamic_batch: bool = True,
    ) -> None:
        """Raise ``InputError`` for options OpenVINO cannot honour here, ``BackendError`` when
        OpenVINO is not installed (unknown names raise ``TypeError`` naming them)."""
        check_app_options(mean, std, labels)
        require_openvino()
        Settings(precision, hint, streams, threads).check()

    def emit(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        out_dir: Path,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
        precision: str = "f32",
        hint: str = "latency",
        streams: int | None = None,
        threads: int | None = None,
        dynamic_batch: bool = True,
    ) -> Artifact:
        """Convert ``gm`` to OpenVINO IR, verify it in OpenVINO's runtime, and bundle it with
        its manifest and samples as ``out_dir/model.fxbundle``."""
        options = {"precision": precision, "hint": hint, "streams": streams, "threads": threads}
        self.check_options(mean=mean, std=std, labels=labels, **options)
        settings = Settings(**options)
        engine = _quantized_engine(gm)
        inputs = tuple(ctx.config.example_inputs)
        program = _intermediate_representation(export(gm, inputs, dynamic_batch=dynamic_batch))
        model = OpenVinoModel(program["model.xml"], program["model.bin"], settings)
        if settings.precision != "f32":  # the IR's meaning is checked in f32
            exact = OpenVinoModel(program["model.xml"], program["model.bin"], Settings())
            _check_meaning(exact, gm, ctx, quantized=engine is not None)
        execution, notes = _execution(model.compiled, engine is not None)
        fields: dict[str, Any] = {
            "runtime": OPENVINO,
            "engine": engine,
            "layers": layer_schemes(gm),
            "openvino": {"settings": settings.to_dict(), **execution},
            "versions": {
                "fxcomp": version("fxcomp"),
                "torch": torch.__version__,
                "openvino": version("openvino"),
            },
            "notes": notes,
        }
        return bundle_artifact(
            self.name,
            gm,
            ctx,
            out_dir,
            program=program,
            run=model,
            fields=fields,
            quantized=engine is not None,
            what="OpenVINO",
            dynamic_axes=lambda outputs, atol: DynamicAxes.batch(
                len(inputs),
                len(outputs),
                dynamic_batch and runs_another_batch(model, inputs, outputs, atol),
            ),
            mean=mean,
            std=std,
            labels=labels,
            min_db=FLOAT_SQNR_DB if settings.precision == "f32" else 0.0,
        )
