"""ExecuTorch backend: a ``.pte`` program delegated to XNNPACK, in a self-describing bundle.

A float graph is exported as it is. A quantized graph must be the reference graph of
``quantize(engine="xnnpack")`` (int8 activations, int8 symmetric per-channel weights: what
XNNPACK's kernels run); it is rewritten into ATen ops between ``quantized_decomposed``
quantize/dequantize steps (``fxcomp.backends.executorch.decomposed``), the form the XNNPACK
partitioner turns into quantized convolutions, linears, adds and pooling; the
``DynamicLinear`` layers of ``quantize_dynamic(engine="xnnpack")`` become XNNPACK's
dynamically quantized linears (inputs quantized per call), and so do the int8 and symmetric
int4 layers of ``quantize_weights(..., symmetric=True)`` (int4 in groups: XNNPACK's
groupwise kernel). The program is
lowered and serialised (``fxcomp.backends.executorch.program``), loaded by ExecuTorch's
runtime, run on the example inputs and compared with the reference graph and the float
model; its manifest says which ops XNNPACK runs and which were left on the portable
kernels. The bundle (``fxcomp.backends.bundle``: program, manifest, samples) is loaded back,
its samples re-run, and only then renamed into place.

Example::

    result = fxcomp.compile(model, (x,), [fuse(), quantize(data, engine="xnnpack")],
                            backend="executorch", output_dir="out")
    bundle = fxcomp.load_bundle("out/model.fxbundle")
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from fxcomp.backends.base import Artifact, expected_outputs
from fxcomp.backends.bundle import EXECUTORCH, PROGRAMS, output_leaves
from fxcomp.backends.bundle_manifest import (
    BundleBackend,
    DynamicAxes,
    bundle_artifact,
    check_app_options,
    runs_another_batch,
)
from fxcomp.backends.executorch.decomposed import decomposed_graph
from fxcomp.backends.executorch.program import (
    FIXED_LENGTH,
    ExecuTorchProgram,
    lower,
    require_executorch,
)
from fxcomp.ir.capture import is_token_input
from fxcomp.ir.errors import BackendError, InputError, VerificationError
from fxcomp.nn.weight_only import WeightOnlyLinear
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.dynamic import DynamicLinear
from fxcomp.quant.layers import layer_schemes
from fxcomp.quant.observers import Observer
from fxcomp.quant.reference import QuantDequant
from fxcomp.runtime.parity import FLOAT_SQNR_DB, reference_margin_db, sqnr

__all__ = ["ExecuTorchBackend"]

ENGINE = "xnnpack"
MAX_BATCH = 8  # XNNPACK-lowered convolutions take at most 15 rows in ExecuTorch 1.5


def _quantized_engine(gm: GraphModule, weight_only: bool) -> str | None:
    """``xnnpack`` for a reference graph quantized for it (or holding ``weight_only``
    layers), None for a float graph; raise for a graph that is still observing or was
    quantized for another engine."""
    hint = f"end the pipeline with quantize(..., engine='{ENGINE}')"
    for name, module in gm.named_modules():
        if isinstance(module, Observer):
            raise BackendError(
                f"'{name}' is an observer: the graph was calibrated but not frozen", hint=hint
            )
        if type(module).__module__.startswith("torch.ao.nn"):
            config = QUANT_CONFIG.get(gm)
            engine = config.engine if config is not None else "fbgemm/qnnpack"
            raise BackendError(
                f"'{name}' is a {type(module).__name__}: the graph was lowered to {engine} "
                "kernels, which ExecuTorch does not run",
                hint=hint,
            )
    if not any(isinstance(m, QuantDequant | DynamicLinear) for m in gm.modules()):
        return ENGINE if weight_only else None
    config = QUANT_CONFIG.get(gm)
    engine = config.engine if config is not None else None
    if engine != ENGINE:
        raise BackendError(
            f"the graph is quantized for '{engine}'; XNNPACK runs int8 activations with "
            "int8 symmetric per-channel weights",
            hint=f"quantize with engine='{ENGINE}' for the executorch backend",
        )
    return engine


def _asymmetric_int4(what: str) -> BackendError:
    return BackendError(
        f"{what} asymmetric int4 weights (a minimum per group); XNNPACK's groupwise linear "
        "takes codes around zero, with no zero point",
        hint="quantize_weights(bits=4, ..., symmetric=True) for the executorch backend",
    )


def _check_weight_only(gm: GraphModule) -> bool:
    """Whether ``gm`` holds ``quantize_weights`` layers; raise for int4 ones XNNPACK cannot
    take (a minimum per group: its groupwise weights have no zero point)."""
    layers = [(n, m) for n, m in gm.named_modules() if isinstance(m, WeightOnlyLinear)]
    for name, layer in layers:
        if layer.bits == 4 and not torch.equal(layer.minimum, -8 * layer.scale):
            raise _asymmetric_int4(f"'{name}' holds")
    return bool(layers)


def _check_bounds(max_batch: int, max_length: int | None) -> None:
    if not isinstance(max_batch, int) or max_batch < 1:
        raise InputError(
            f"max_batch must be a positive integer, got {max_batch!r}",
            hint="1 keeps the example's batch size; more makes the batch axis dynamic",
        )
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise InputError(
            f"max_length must be a positive integer, got {max_length!r}",
            hint="the most tokens the program takes; leave it out to keep the example's length",
        )


def _check_max_length(inputs: tuple, max_length: int | None) -> None:
    """Raise ``InputError`` when ``max_length`` has no token input to apply to, or is
    shorter than the example."""
    if max_length is None:
        return
    tokens = [x for x in inputs if is_token_input(x)]
    if not tokens:
        shapes = ", ".join(f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}" for x in inputs)
        raise InputError(
            f"max_length sets the sequence axis of token inputs (integer, rank 2 or more); "
            f"the model's inputs are {shapes}",
            hint="leave max_length out for this model",
        )
    example = max(x.shape[1] for x in tokens)
    if max_length < example:
        raise InputError(
            f"max_length {max_length} is shorter than the example inputs' {example} tokens",
            hint=f"give max_length of at least {example}",
        )


def _tiled(inputs: tuple, length: int) -> tuple:
    """The inputs with every token input's sequence repeated, or cut, to ``length``."""

    def tile(x: torch.Tensor) -> torch.Tensor:
        if not is_token_input(x):
            return x
        times = -(-length // x.shape[1])
        return x.repeat(1, times, *([1] * (x.dim() - 2)))[:, :length]

    return tuple(tile(x) for x in inputs)


def _sequence_axes(
    graph: GraphModule,
    program: ExecuTorchProgram,
    inputs: tuple,
    outputs: list[torch.Tensor],
    max_length: int,
    quantization_db: float | None,
) -> list[list[int]]:
    """Run the program on the shortest and the longest sequence it takes, where it must be
    as close to the graph it was lowered from as on the example: ``FLOAT_SQNR_DB`` for a
    float program; for a quantized one, the graph's SQNR against float (``quantization_db``)
    less ``reference_margin_db`` of that length's output values. The output axes whose size
    follows the sequence's."""
    changed: set[tuple[int, int]] = set()
    for length in sorted({1, max_length}):
        tiled = _tiled(inputs, length)
        with torch.no_grad():
            try:
                expected = output_leaves(graph(*tiled))
            except Exception as err:
                raise InputError(
                    f"the compiled graph does not run on {length} tokens: "
                    f"{type(err).__name__}: {err}",
                    hint="give a max_length the model takes (at most its position embeddings)",
                ) from err
            try:
                got = output_leaves(program(*tiled))
            except Exception as err:
                raise VerificationError(
                    f"the ExecuTorch program fails on {length} tokens: {type(err).__name__}: {err}",
                    hint=FIXED_LENGTH,
                ) from err
        figure = sqnr(expected, got)
        floor_db = FLOAT_SQNR_DB
        if quantization_db is not None:
            floor_db = quantization_db - reference_margin_db(got[0].numel())
        if figure < floor_db:
            raise VerificationError(
                f"on {length} tokens the ExecuTorch program is {figure:.1f} dB from the "
                f"graph it was lowered from (at least {floor_db:.1f} dB expected)",
                hint=FIXED_LENGTH,
            )
        for index, (e, o) in enumerate(zip(got, outputs, strict=True)):
            changed.update((index, a) for a in range(1, o.dim()) if e.shape[a] != o.shape[a])
    return [sorted(a for i, a in changed if i == index) for index in range(len(outputs))]


def _max_rows(program: ExecuTorchProgram, asked: int, notes: list[str]) -> int:
    """The most rows the program takes: ``asked``, or fewer where its memory was planned
    for fewer (a note says so)."""
    planned = program.planned_rows
    if planned is not None and planned < asked:
        notes.append(
            f"ExecuTorch planned memory for batches of up to {planned} rows, not the "
            f"{asked} asked for (XNNPACK's lowering narrowed the batch axis's range)"
        )
        return planned
    return asked


class ExecuTorchBackend(BundleBackend):
    """An ExecuTorch ``.pte`` program for XNNPACK in a self-describing bundle (module
    docstring)."""

    name = "executorch"

    def check_options(
        self,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
        max_batch: int = MAX_BATCH,
        max_length: int | None = None,
    ) -> None:
        """Raise ``InputError`` for options the backend cannot record, ``BackendError`` when
        ExecuTorch is not installed (unknown names raise ``TypeError`` naming them)."""
        check_app_options(mean, std, labels)
        _check_bounds(max_batch, max_length)
        require_executorch()

    def check_passes(self, passes: Sequence[Any]) -> None:
        """Refuse ``quantize_weights`` with asymmetric int4 before any work."""
        for step in passes:
            if getattr(step, "name", None) != "quantize_weights":
                continue
            if step.options.bits == 4 and not step.options.symmetric:
                raise _asymmetric_int4("quantize_weights(bits=4) without symmetric=True makes")

    def emit(
        self,
        gm: GraphModule,
        ctx: CompileContext,
        out_dir: Path,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        labels: Sequence[str] | None = None,
        max_batch: int = MAX_BATCH,
        max_length: int | None = None,
    ) -> Artifact:
        """Lower ``gm`` to an XNNPACK-delegated ``.pte``, verify it in ExecuTorch's runtime,
        and bundle it with its manifest and samples as ``out_dir/model.fxbundle``; with
        ``max_length`` token inputs take any length up to it (verified at 1 and at it)."""
        self.check_options(
            mean=mean, std=std, labels=labels, max_batch=max_batch, max_length=max_length
        )
        weight_only = _check_weight_only(gm)
        engine = _quantized_engine(gm, weight_only)
        inputs = tuple(ctx.config.example_inputs)
        _check_max_length(inputs, max_length)
        decomposed = decomposed_graph(gm)
        lowered = lower(decomposed, inputs, max_batch=max_batch, max_length=max_length)
        program = ExecuTorchProgram(lowered.program)
        # weight-only Linears run as dynamically quantized linears, which quantize their
        # inputs per row: the program is held to the graph that does so, not to the
        # reference graph, whose activations stay float
        checked, expected = gm, None
        if weight_only:
            checked = decomposed
            with torch.no_grad():
                expected = output_leaves(decomposed(*inputs))
        fields: dict[str, Any] = {
            "runtime": EXECUTORCH,
            "engine": engine,
            "layers": layer_schemes(gm),
            "delegation": {"xnnpack": lowered.delegated, "portable": lowered.portable},
            "versions": {
                "fxcomp": version("fxcomp"),
                "torch": torch.__version__,
                "executorch": version("executorch"),
            },
            "notes": lowered.notes,
        }

        def dynamic_axes(outputs: list[torch.Tensor], atol: float) -> DynamicAxes:
            fewer = inputs[0].shape[0] >= max_batch  # one more row would exceed the bound
            dynamic = lowered.dynamic_batch and runs_another_batch(
                program, inputs, outputs, atol, fewer=fewer
            )
            if lowered.dynamic_batch and not dynamic:
                lowered.notes.append(
                    f"batch axis fixed at {inputs[0].shape[0]}: the lowered program does not "
                    "run another number of rows as it runs the example's"
                )
            rows = _max_rows(program, max_batch, lowered.notes) if dynamic else inputs[0].shape[0]
            fields["max_batch"] = rows  # what the loaded bundle's program will refuse beyond
            axes = DynamicAxes.batch(len(inputs), len(outputs), dynamic)
            if max_length is None:
                return axes
            fields["max_length"] = max_length
            quantization_db = None  # a float program reproduces its graph at every length
            if engine is not None:  # a quantized one adds at most as much noise again
                graph_outputs = (
                    expected
                    if expected is not None
                    else expected_outputs(gm, ctx.state.reference_outputs, inputs)
                )
                quantization_db = sqnr(ctx.state.float_outputs, graph_outputs)
            sequence = _sequence_axes(
                checked, program, inputs, outputs, max_length, quantization_db
            )
            return DynamicAxes(
                [
                    [*a, 1] if is_token_input(x) else a
                    for a, x in zip(axes.inputs, inputs, strict=True)
                ],
                [a + s for a, s in zip(axes.outputs, sequence, strict=True)],
            )

        return bundle_artifact(
            self.name,
            gm,
            ctx,
            out_dir,
            program={PROGRAMS[EXECUTORCH][0]: lowered.program},
            run=program,
            fields=fields,
            quantized=engine is not None,
            what="ExecuTorch",
            dynamic_axes=dynamic_axes,
            mean=mean,
            std=std,
            labels=labels,
            expected=expected,
        )
