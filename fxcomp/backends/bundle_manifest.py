"""What the bundling backends (``mobile``, ``executorch``, ``openvino``) record about one
program: the app's options (normalisation, labels), the inputs and outputs with their dynamic axes,
the tolerance its samples are held to, and the bundle written atomically once it loads
back and reproduces them.

Example::

    check_app_options(mean, std, labels)
    artifact = bundle_artifact("mobile", gm, ctx, out_dir, program={"model.ptl": ptl}, run=module,
                               fields={"runtime": LITE, ...}, quantized=True, what="lite",
                               dynamic_axes=lambda outputs, atol: DynamicAxes.batch(1, 1, True))
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node

from fxcomp.backends.base import Artifact, Backend, artifact_path, expected_outputs
from fxcomp.backends.bundle import Bundle, bundle_bytes, load_bundle, output_leaves
from fxcomp.ir.atomic import write_atomic
from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import module_of
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.reference import QuantDequant
from fxcomp.runtime.parity import FLOAT_SQNR_DB, checked_parity

__all__ = [
    "FILENAME",
    "BundleBackend",
    "DynamicAxes",
    "bundle_artifact",
    "check_app_options",
    "runs_another_batch",
]

log = logging.getLogger(__name__)

FILENAME = "model.fxbundle"
FLOAT_RTOL = 1e-4  # float kernels on another CPU add in another order


def check_app_options(
    mean: Sequence[float] | None, std: Sequence[float] | None, labels: Sequence[str] | None
) -> None:
    """Raise ``InputError`` for normalisation or labels an app could not use."""
    if (mean is None) != (std is None):
        raise InputError("give mean and std together: the app normalises with both")
    if mean is not None and std is not None:
        if len(mean) != len(std):
            raise InputError(f"mean has {len(mean)} values and std {len(std)}")
        if not all(isinstance(s, int | float) and s > 0 for s in std):
            raise InputError(f"std must be positive numbers, got {list(std)}")
    if labels is not None and not all(isinstance(label, str) for label in labels):
        raise InputError("labels must be strings, one per output class")


def _check_app_extras(
    inputs: tuple, outputs: list[torch.Tensor], mean: Any, labels: Sequence[str] | None
) -> None:
    """Raise ``InputError`` when ``mean`` does not match the input's channels or ``labels``
    the output's classes."""
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


def _output_step(gm: GraphModule) -> float | None:
    """The grid step of the (single) output when it is quantized: a dequantized kernel's
    result, or a reference graph's last Q/DQ step."""
    out = gm.graph.output_node().args[0]
    if not isinstance(out, Node):
        return None
    last = module_of(gm, out)
    if isinstance(last, QuantDequant):
        return float(last.scale)
    if not (out.op == "call_method" and out.target == "dequantize"):
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


def _sample_tolerance(
    gm: GraphModule, outputs: list[torch.Tensor], quantized: bool
) -> tuple[float, str]:
    """How far a runtime may be from the bundled sample outputs, and why: one step of the
    output's INT8 grid, or a relative share of the largest output."""
    step = _output_step(gm) if quantized else None
    if step is not None:
        return step, "one step of the output's INT8 grid"
    biggest = max((t.abs().max().item() for t in outputs if t.numel()), default=1.0)
    rtol = FLOAT_RTOL if not quantized else 1e-2
    return rtol * biggest + 1e-6, f"{rtol:g} of the largest output"


@dataclass(frozen=True)
class DynamicAxes:
    """The axes of each input and each output that the program takes at other sizes.

    Example::

        DynamicAxes.batch(1, 1, True)  # DynamicAxes(inputs=[[0]], outputs=[[0]])
    """

    inputs: list[list[int]]
    outputs: list[list[int]]

    @classmethod
    def batch(cls, inputs: int, outputs: int, dynamic: bool) -> DynamicAxes:
        """Axis 0 of every one of ``inputs`` inputs and ``outputs`` outputs, or none."""
        axes = [0] if dynamic else []
        return cls([list(axes) for _ in range(inputs)], [list(axes) for _ in range(outputs)])


def runs_another_batch(
    module: Callable[..., Any],
    inputs: tuple,
    outputs: list[torch.Tensor],
    atol: float,
    *,
    fewer: bool = False,
) -> bool:
    """Whether the program runs, row for row the same, on one more row than it was made for
    (with ``fewer``, one row fewer: for a program whose example was its largest batch)."""
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        return False
    rows = inputs[0].shape[0] + (-1 if fewer else 1)
    if rows < 1:
        return False
    try:
        with torch.no_grad():
            other = output_leaves(module(*(torch.cat([x, x[:1]])[:rows] for x in inputs)))
    except Exception as err:
        log.info("batch axis kept fixed: %d rows fail (%s)", rows, err)
        return False
    shared = min(rows, inputs[0].shape[0])
    return len(other) == len(outputs) and all(
        b.shape[0] == rows and (b[:shared] - o[:shared]).abs().max().item() <= atol
        for b, o in zip(other, outputs, strict=True)
    )


def _names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _describe(
    tensors: Sequence[torch.Tensor], names: list[str], axes: list[list[int]]
) -> list[dict]:
    return [
        {
            "name": name,
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "dynamic_axes": dynamic,
        }
        for name, t, dynamic in zip(names, tensors, axes, strict=True)
    ]


def _bundle_contents(
    fields: Mapping[str, Any],
    inputs: tuple,
    outputs: list[torch.Tensor],
    *,
    dynamic: DynamicAxes,
    atol: float,
    atol_is: str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The manifest (``fields`` with the inputs, outputs, app options and samples entries)
    and the sample tensors by name."""
    input_names, output_names = _names("input", len(inputs)), _names("output", len(outputs))
    manifest = {
        **fields,
        "inputs": _describe(inputs, input_names, dynamic.inputs),
        "outputs": _describe(outputs, output_names, dynamic.outputs),
        "preprocessing": None if mean is None else {"mean": list(mean), "std": list(std or ())},
        "labels": None if labels is None else list(labels),
        "samples": {
            "inputs": input_names,
            "outputs": output_names,
            "atol": atol,
            "atol_is": atol_is,
        },
    }
    samples = dict(zip(input_names, inputs, strict=True))
    samples.update(zip(output_names, outputs, strict=True))
    return manifest, samples


def _write_bundle(
    path: Path,
    program: Mapping[str, bytes],
    manifest: Mapping[str, Any],
    samples: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """Write the bundle beside ``path``, load it back, re-run its samples, and only then
    rename it into place; the manifest as written."""

    def verify(tmp: Path) -> dict[str, Any]:
        bundle = load_bundle(tmp)
        bundle.verify()
        return bundle.manifest

    return write_atomic(path, bundle_bytes(program, manifest, samples), check=verify)


def bundle_artifact(
    backend: str,
    gm: GraphModule,
    ctx: CompileContext,
    out_dir: Path,
    *,
    program: Mapping[str, bytes],
    run: Callable[..., Any],
    fields: dict[str, Any],
    quantized: bool,
    what: str,
    dynamic_axes: Callable[[list[torch.Tensor], float], DynamicAxes],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
    min_db: float = FLOAT_SQNR_DB,
    expected: Any = None,
) -> Artifact:
    """Run ``program`` (loaded as ``run``) on the example inputs, check it against the
    reference graph and the float model (a float program to ``min_db``), ask
    ``dynamic_axes(outputs, atol)`` which axes take other sizes, and write the
    bundle, with ``fields`` and the parity figures in its manifest, as
    ``out_dir/model.fxbundle`` once it loads back and reproduces its samples. ``expected``
    (default: the reference graph's outputs) is what the program is held to, for a backend
    that lowers a graph of its own making."""
    inputs = tuple(ctx.config.example_inputs)
    with torch.no_grad():
        outputs = output_leaves(run(*inputs))
    _check_app_extras(inputs, outputs, mean, labels)
    figures = checked_parity(
        outputs,
        expected=(
            expected_outputs(gm, ctx.state.reference_outputs, inputs)
            if expected is None
            else expected
        ),
        float_outputs=ctx.state.float_outputs,
        quantized=quantized,
        what=what,
        min_db=min_db,
    )
    atol, atol_is = _sample_tolerance(gm, outputs, quantized)
    dynamic = dynamic_axes(outputs, atol)
    fields = {**fields, "parity": {k: v for k, v in figures.items() if math.isfinite(v)}}
    manifest, samples = _bundle_contents(
        fields,
        inputs,
        outputs,
        dynamic=dynamic,
        atol=atol,
        atol_is=atol_is,
        mean=mean,
        std=std,
        labels=labels,
    )
    path = out_dir / FILENAME
    written = _write_bundle(path, program, manifest, samples)
    return Artifact(backend, path, written, figures)


class BundleBackend(Backend):
    """A backend whose artifact is a bundle (``mobile``, ``executorch``, ``openvino``)."""

    def load(self, artifact: Artifact | Path | str) -> Bundle:
        """Open a bundle written by ``emit`` (an ``Artifact`` or its path).

        Example::

            bundle = BACKENDS["executorch"].load("out/model.fxbundle")
            bundle.verify()
        """
        return load_bundle(artifact_path(artifact))
