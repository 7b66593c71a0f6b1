"""Mobile backend: the graph for the PyTorch lite interpreter, as one self-describing bundle.

A quantized graph must be lowered for ``qnnpack`` (what phones run); a float graph is
bundled as it is. The graph is traced and frozen, passed through ``optimize_for_mobile``
where the torch build has XNNPACK (the manifest and the report say when it was skipped),
and saved as a ``.ptl`` program. That program is loaded with the lite interpreter, run on
the example inputs, compared with the reference graph and the float model, and probed
with one more row to learn whether the batch axis is dynamic. The bundle
(``fxcomp.backends.mobile.bundle``) holds the program, the manifest and the example inputs with the
outputs they gave; it is loaded back, its samples re-run, and only then renamed into place.

Example::

    backend = MobileBackend()
    artifact = backend.emit(lowered_gm, ctx, Path("out"), mean=[0.485, 0.456, 0.406],
                            std=[0.229, 0.224, 0.225], labels=["cat", "dog"])
    bundle = backend.load(artifact)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxcomp.backends.base import Artifact, Backend, artifact_path, expected_outputs
from fxcomp.backends.mobile.bundle import (
    Bundle,
    bundle_bytes,
    load_bundle,
    load_program,
    output_leaves,
)
from fxcomp.ir.atomic import write_atomic
from fxcomp.ir.errors import BackendError, InputError
from fxcomp.ir.graph import module_of
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.layers import layer_schemes
from fxcomp.quant.lowering import script
from fxcomp.quant.observers import Observer
from fxcomp.quant.reference import QuantDequant
from fxcomp.quant.scheme import deprecated_apis
from fxcomp.runtime.parity import checked_parity

__all__ = ["FILENAME", "MobileBackend"]

log = logging.getLogger(__name__)

FILENAME = "model.fxbundle"
ENGINE = "qnnpack"
FLOAT_RTOL = 1e-4  # float kernels on another CPU add in another order


def _check_options(
    mean: Sequence[float] | None, std: Sequence[float] | None, labels: Sequence[str] | None
) -> None:
    if (mean is None) != (std is None):
        raise InputError("give mean and std together: the app normalises with both")
    if mean is not None and std is not None:
        if len(mean) != len(std):
            raise InputError(f"mean has {len(mean)} values and std {len(std)}")
        if not all(isinstance(s, int | float) and s > 0 for s in std):
            raise InputError(f"std must be positive numbers, got {list(std)}")
    if labels is not None and not all(isinstance(label, str) for label in labels):
        raise InputError("labels must be strings, one per output class")


def _quantized_engine(gm: GraphModule) -> str | None:
    """The engine a lowered graph was packed for (None for a float graph); raise if the
    graph cannot go to a phone."""
    for name, module in gm.named_modules():
        if isinstance(module, Observer | QuantDequant):
            raise BackendError(
                f"'{name}' is a {type(module).__name__}: the graph was not lowered to kernels",
                hint=f"end the pipeline with quantize(..., engine='{ENGINE}')",
            )
    quantized = any(type(m).__module__.startswith("torch.ao.nn") for m in gm.modules()) or any(
        node.target is torch.quantize_per_tensor for node in gm.graph.nodes
    )
    if not quantized:
        return None
    config = QUANT_CONFIG.get(gm)
    engine = config.engine if config is not None else None
    if engine != ENGINE:
        raise BackendError(
            f"the graph's weights are packed for '{engine}'; phones run {ENGINE} kernels",
            hint=f"quantize with engine='{ENGINE}' for the mobile backend",
        )
    return engine


def _optimized(scripted: Any, optimize: bool) -> tuple[Any, dict[str, Any]]:
    if not optimize:
        return scripted, {"applied": False, "reason": "optimize=False was asked for"}
    if not torch._C._is_xnnpack_enabled():
        return scripted, {"applied": False, "reason": "this torch build has no XNNPACK"}
    from torch.utils.mobile_optimizer import optimize_for_mobile

    with deprecated_apis():
        return optimize_for_mobile(scripted), {"applied": True}


def _output_step(gm: GraphModule) -> float | None:
    """The grid step of the (single) output when it is a dequantized kernel's result."""
    out = gm.graph.output_node().args[0]
    if not (isinstance(out, Node) and out.op == "call_method" and out.target == "dequantize"):
        return None
    source = out.args[0]
    module = module_of(gm, source) if isinstance(source, Node) else None
    if module is not None and hasattr(module, "scale"):
        return float(module.scale)
    if isinstance(source, Node) and source.op == "call_function" and len(source.args) >= 2:
        scale = (
            source.args[-2] if source.target is not torch.quantize_per_tensor else source.args[1]
        )
        return float(scale) if isinstance(scale, float) else None
    return None


def _tolerance(gm: GraphModule, outputs: list[torch.Tensor], quantized: bool) -> tuple[float, str]:
    step = _output_step(gm) if quantized else None
    if step is not None:
        return step, "one step of the output's INT8 grid"
    biggest = max((t.abs().max().item() for t in outputs if t.numel()), default=1.0)
    rtol = FLOAT_RTOL if not quantized else 1e-2
    return rtol * biggest + 1e-6, f"{rtol:g} of the largest output"


def _dynamic_batch(module: Any, inputs: tuple, outputs: list[torch.Tensor], atol: float) -> bool:
    """Whether the program runs, row for row the same, on one more row than it was made for."""
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        return False
    try:
        with torch.no_grad():
            bigger = output_leaves(module(*(torch.cat([x, x[:1]]) for x in inputs)))
    except Exception as err:
        log.info("batch axis kept fixed: one more row fails (%s)", err)
        return False
    rows = inputs[0].shape[0]
    return len(bigger) == len(outputs) and all(
        b.shape[0] == rows + 1 and (b[:rows] - o).abs().max().item() <= atol
        for b, o in zip(bigger, outputs, strict=True)
    )


def _names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _describe(tensors: Sequence[torch.Tensor], names: list[str], dynamic: bool) -> list[dict]:
    return [
        {
            "name": name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "dynamic_axes": [0] if dynamic else [],
        }
        for name, t in zip(names, tensors, strict=True)
    ]


def _checked_extras(inputs: tuple, outputs: list[torch.Tensor], mean: Any, labels: Any) -> None:
    if mean is not None and (inputs[0].dim() < 2 or inputs[0].shape[1] != len(mean)):
        raise InputError(
            f"mean/std give {len(mean)} channels; the input's shape is {list(inputs[0].shape)}",
            hint="give one mean and one std per input channel (axis 1)",
        )
    if labels is not None and (not outputs or outputs[0].shape[-1] != len(labels)):
        shape = list(outputs[0].shape) if outputs else None
        raise InputError(
            f"{len(labels)} labels for an output of shape {shape}",
            hint="give one label per output class (the output's last axis)",
        )


class MobileBackend(Backend):
    """A lite-interpreter program in a self-describing bundle (module docstring)."""

    name = "mobile"

    def check_options(
        self,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
        optimize: bool = True,
    ) -> None:
        """Raise ``InputError`` for options the mobile backend cannot record (unknown names
        raise ``TypeError`` naming them)."""
        _check_options(mean, std, labels)

    def emit(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        out_dir: Path,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
        optimize: bool = True,
    ) -> Artifact:
        """Save ``gm`` for the lite interpreter, verify it, and bundle it with its manifest and
        samples as ``out_dir/model.fxbundle``."""
        _check_options(mean, std, labels)
        engine = _quantized_engine(gm)
        inputs = tuple(ctx.config.example_inputs)
        scripted, optimization = _optimized(script(gm, inputs, engine or ENGINE), optimize)
        with deprecated_apis():
            program = scripted._save_to_buffer_for_lite_interpreter()
        module, bytecode = load_program(program, engine)
        with torch.no_grad():
            outputs = output_leaves(module(*inputs))
        _checked_extras(inputs, outputs, mean, labels)
        figures = checked_parity(
            outputs,
            expected=expected_outputs(gm, ctx.state.reference_outputs, inputs),
            float_outputs=ctx.state.float_outputs,
            quantized=engine is not None,
            what="lite interpreter",
        )
        atol, atol_is = _tolerance(gm, outputs, engine is not None)
        dynamic = _dynamic_batch(module, inputs, outputs, atol)
        input_names, output_names = _names("input", len(inputs)), _names("output", len(outputs))
        notes = []
        if not optimization["applied"]:
            notes.append(f"optimize_for_mobile skipped: {optimization['reason']}")
            log.info("mobile backend: %s", notes[-1])
        manifest = {
            "engine": engine,
            "inputs": _describe(inputs, input_names, dynamic),
            "outputs": _describe(outputs, output_names, dynamic),
            "preprocessing": None if mean is None else {"mean": list(mean), "std": list(std or ())},
            "labels": None if labels is None else list(labels),
            "layers": layer_schemes(gm),
            "bytecode_version": bytecode,
            "versions": {"fxcomp": version("fxcomp"), "torch": torch.__version__},
            "optimize_for_mobile": optimization,
            "parity": {k: v for k, v in figures.items() if math.isfinite(v)},
            "samples": {
                "inputs": input_names,
                "outputs": output_names,
                "atol": atol,
                "atol_is": atol_is,
            },
            "notes": notes,
        }
        samples = dict(zip(input_names, inputs, strict=True))
        samples.update(zip(output_names, outputs, strict=True))
        data = bundle_bytes(program, manifest, samples)

        def verify(tmp: Path) -> dict[str, Any]:
            bundle = load_bundle(tmp)
            bundle.verify()
            return bundle.manifest

        path = out_dir / FILENAME
        written = write_atomic(path, data, check=verify)
        return Artifact(self.name, path, written, figures)

    def load(self, artifact: Artifact | Path | str) -> Bundle:
        """Open a bundle written by ``emit`` (an ``Artifact`` or its path).

        Example::

            bundle = MobileBackend().load("out/model.fxbundle")
            bundle.verify()
        """
        return load_bundle(artifact_path(artifact))
