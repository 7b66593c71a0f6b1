"""Mobile backend: the graph for the PyTorch lite interpreter, as one self-describing bundle.

A quantized graph must be lowered for ``qnnpack`` (what phones run); a float graph is
bundled as it is. The graph is traced and frozen, passed through ``optimize_for_mobile``
where the torch build has XNNPACK (the manifest and the report say when it was skipped),
and saved as a ``.ptl`` program. That program is loaded with the lite interpreter, run on
the example inputs, compared with the reference graph and the float model, and probed
with one more row to learn whether the batch axis is dynamic. The bundle
(``fxcomp.backends.bundle``) holds the program, the manifest and the example inputs with the
outputs they gave; it is loaded back, its samples re-run, and only then renamed into place.

Example::

    backend = MobileBackend()
    artifact = backend.emit(lowered_gm, ctx, Path("out"), mean=[0.485, 0.456, 0.406],
                            std=[0.229, 0.224, 0.225], labels=["cat", "dog"])
    bundle = backend.load(artifact)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from fxcomp.backends.base import Artifact
from fxcomp.backends.bundle import LITE, PROGRAMS
from fxcomp.backends.bundle_manifest import (
    BundleBackend,
    DynamicAxes,
    bundle_artifact,
    check_app_options,
    runs_another_batch,
)
from fxcomp.backends.mobile.lite import load_program
from fxcomp.ir.errors import BackendError
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.layers import layer_schemes
from fxcomp.quant.lowering import script
from fxcomp.quant.observers import Observer
from fxcomp.quant.reference import QuantDequant
from fxcomp.quant.scheme import deprecated_apis

__all__ = ["MobileBackend"]

log = logging.getLogger(__name__)

ENGINE = "qnnpack"


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


class MobileBackend(BundleBackend):
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
        check_app_options(mean, std, labels)

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
        self.check_options(mean=mean, std=std, labels=labels, optimize=optimize)
        engine = _quantized_engine(gm)
        inputs = tuple(ctx.config.example_inputs)
        scripted, optimization = _optimized(script(gm, inputs, engine or ENGINE), optimize)
        with deprecated_apis():
            program = scripted._save_to_buffer_for_lite_interpreter()
        module, bytecode = load_program(program, engine)
        notes = []
        if not optimization["applied"]:
            notes.append(f"optimize_for_mobile skipped: {optimization['reason']}")
            log.info("mobile backend: %s", notes[-1])
        fields = {
            "runtime": LITE,
            "engine": engine,
            "layers": layer_schemes(gm),
            "bytecode_version": bytecode,
            "versions": {"fxcomp": version("fxcomp"), "torch": torch.__version__},
            "optimize_for_mobile": optimization,
            "notes": notes,
        }
        return bundle_artifact(
            self.name,
            gm,
            ctx,
            out_dir,
            program={PROGRAMS[LITE][0]: program},
            run=module,
            fields=fields,
            quantized=engine is not None,
            what="lite interpreter",
            dynamic_axes=lambda outputs, atol: DynamicAxes.batch(
                len(inputs), len(outputs), runs_another_batch(module, inputs, outputs, atol)
            ),
            mean=mean,
            std=std,
            labels=labels,
        )
