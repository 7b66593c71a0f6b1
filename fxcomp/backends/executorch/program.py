"""ExecuTorch programs: a graph exported, lowered to the XNNPACK delegate, and run by
ExecuTorch's runtime.

``lower`` exports the module (``torch.export``, with the batch axis dynamic up to
``max_batch`` where the model allows it, and the sequence axis of token inputs up to
``max_length`` when one is given), lowers it with ``to_edge_transform_and_lower``
and the XNNPACK partitioner, and serialises the ``.pte`` program; it says which ops XNNPACK
took and which were left on ExecuTorch's portable kernels (a convolution or linear left
there is a performance bug, named in the notes). ``open_program`` loads a ``.pte`` with
ExecuTorch's runtime as a callable. ExecuTorch is an optional extra: without it both raise
``BackendError`` saying how to install it.

Example::

    lowered = lower(decomposed_gm, (x,), max_batch=16)
    program = open_program({"model.pte": lowered.program}, {}, Path("model.pte"))
    logits = program(x)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxcomp.ir.capture import is_token_input
from fxcomp.ir.errors import BackendError, InputError

__all__ = [
    "FIXED_LENGTH",
    "ExecuTorchProgram",
    "Lowered",
    "lower",
    "open_program",
    "require_executorch",
]

log = logging.getLogger(__name__)

# Ops that should never be left to the portable kernels: they are the model's work.
_COMPUTE = ("convolution", "addmm", "linear", ".mm.", "bmm")
_DELEGATE = "executorch_call_delegate"
# the way out when a sequence axis cannot be dynamic
FIXED_LENGTH = "compile without max_length: the sequence then stays at the example's length"


def require_executorch() -> None:
    """Import ExecuTorch (which registers the ``quantized_decomposed`` ops and their portable
    kernels), or raise ``BackendError`` saying how to get it."""
    try:
        import executorch.exir
        import executorch.kernels.quantized
        import executorch.runtime  # noqa: F401
    except ImportError as err:
        raise BackendError(
            f"the executorch backend needs ExecuTorch, which is not installed ({err})",
            hint="pip install 'fxcomp[executorch]'",
        ) from err


@dataclass
class Lowered:
    """A serialised ``.pte`` program and what the lowering did."""

    program: bytes
    delegated: dict[str, int]  # op -> count run by XNNPACK
    portable: list[dict[str, str]]  # ops left on the portable kernels: op, node, module
    dynamic_batch: bool
    notes: list[str] = field(default_factory=list)


def _op_name(target: Any) -> str:
    return str(getattr(target, "__name__", target)).removeprefix("aten::")


def _source(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    return "" if path.startswith("_") else path  # export's own placeholder names


def _delegation(edge_gm: torch.fx.GraphModule) -> tuple[dict[str, int], list[dict[str, str]]]:
    """Ops inside XNNPACK's subgraphs (by count) and ops left outside them."""
    delegated: Counter[str] = Counter()
    for name, module in edge_gm.named_modules():
        graph = getattr(module, "original_module", None)
        if name and graph is not None:
            for node in graph.graph.nodes:
                if node.op == "call_function" and node.target.__name__ != "getitem":
                    delegated[_op_name(node.target)] += 1
    portable = [
        {"op": _op_name(node.target), "node": node.name, "module": _source(node)}
        for node in edge_gm.graph.nodes
        if node.op == "call_function"
        and _DELEGATE not in str(node.target)
        and getattr(node.target, "__name__", "") != "getitem"
    ]
    return dict(sorted(delegated.items())), portable


def _dynamic_export(
    module: nn.Module, inputs: tuple, max_batch: int | None, max_length: int | None
) -> Any:
    """The exported program with the batch axis dynamic up to ``max_batch`` rows and the
    sequence axis of token inputs up to ``max_length`` (None: that axis stays fixed)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else None
    sequence = torch.export.Dim("sequence", min=1, max=max_length) if max_length else None
    examples, shapes = [], []
    for x in inputs:
        axes = {}
        for axis, dim in ((0, batch), (1, sequence if is_token_input(x) else None)):
            if dim is not None:
                axes[axis] = dim
                # an axis of size one would be specialised: export on two
                x = torch.cat([x, x], axis) if x.shape[axis] == 1 else x
        examples.append(x)
        shapes.append(axes or None)
    dynamic = tuple(shapes) if any(shapes) else None  # None: a module of *inputs takes it too
    return torch.export.export(module, tuple(examples), dynamic_shapes=dynamic, strict=False)


def _lowered(exported: Any) -> tuple[tuple[dict[str, int], list[dict[str, str]]], bytes]:
    """What XNNPACK took and what it left (``_delegation``), and the serialised ``.pte``."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    delegation = _delegation(edge.exported_program().graph_module)
    return delegation, bytes(edge.to_executorch().buffer)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _program(
    module: nn.Module, inputs: tuple, max_batch: int, max_length: int | None
) -> tuple[Any, bytes, bool, list]:
    """The program lowered for XNNPACK with a dynamic batch axis where the model, export and
    ExecuTorch's passes allow it, else at the example's batch size (a note says why); with
    the sequence axis dynamic up to ``max_length`` when one is given, or ``BackendError``."""
    notes = []
    if max_batch > 1 and all(isinstance(x, torch.Tensor) and x.dim() > 0 for x in inputs):
        try:
            exported = _dynamic_export(module, inputs, max_batch, max_length)
            return (*_lowered(exported), True, notes)
        except Exception as err:  # any capture, partition or serialisation failure
            notes.append(
                f"batch axis fixed at {inputs[0].shape[0]}: the graph could not be lowered "
                f"with a dynamic batch ({_first_line(err)})"
            )
            log.info("executorch backend: %s", notes[-1])
    try:
        return (*_lowered(_dynamic_export(module, inputs, None, max_length)), False, notes)
    except Exception as err:
        if max_length is None:
            raise
        raise BackendError(
            f"the graph could not be lowered with its sequence axis dynamic up to "
            f"{max_length} tokens ({_first_line(err)})",
            hint=FIXED_LENGTH,
        ) from err


def lower(
    module: nn.Module, inputs: tuple, *, max_batch: int, max_length: int | None = None
) -> Lowered:
    """Export ``module`` on ``inputs``, delegate what XNNPACK takes, serialise the program;
    token inputs' sequence axis is dynamic up to ``max_length`` tokens (None: fixed)."""
    require_executorch()
    (delegated, portable), program, dynamic, notes = _program(module, inputs, max_batch, max_length)
    for op in portable:
        if any(kind in f".{op['op']}." for kind in _COMPUTE):
            where = f" ({op['module']})" if op["module"] else ""
            notes.append(
                f"{op['op']} {op['node']}{where} runs on ExecuTorch's portable kernels, not "
                "XNNPACK: a performance bug; its inputs are not in a form XNNPACK takes"
            )
            log.warning("executorch backend: %s", notes[-1])
    return Lowered(program, delegated, portable, dynamic, notes)


class ExecuTorchProgram:
    """A ``.pte`` program loaded by ExecuTorch's runtime, called with torch tensors; one
    output comes back as a tensor, several as a tuple. Its memory is planned for batches of
    up to ``max_batch`` rows and token inputs of up to ``max_length`` tokens (None: not
    known). Its work runs on XNNPACK's thread pool, which timing keeps apart from PyTorch's
    (``fxcomp.runtime.latency``)."""

    thread_pool = "executorch"

    def __init__(
        self, program: bytes, max_batch: int | None = None, max_length: int | None = None
    ) -> None:
        from executorch.runtime import Runtime

        self.max_batch = max_batch
        self.max_length = max_length
        self._data = program  # the runtime reads from it: it must outlive the method
        self._program = Runtime.get().load_program(program)
        self.method = self._program.load_method("forward")
        meta = self._program.metadata("forward")
        planned = [meta.input_tensor_meta(i).sizes() for i in range(meta.num_inputs())]
        # the most rows its memory was planned for (XNNPACK's lowering may lower the bound
        # export was given)
        self.planned_rows = min((sizes[0] for sizes in planned if sizes), default=None)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        rows = inputs[0].shape[0] if inputs and inputs[0].dim() else None
        if self.max_batch is not None and rows is not None and rows > self.max_batch:
            raise InputError(
                f"the program was made for batches of up to {self.max_batch} rows, got {rows}",
                hint="run it on smaller batches, or compile with backend_options={'max_batch': N}",
            )
        longest = max((x.shape[1] for x in inputs if is_token_input(x)), default=None)
        if self.max_length is not None and longest is not None and longest > self.max_length:
            raise InputError(
                f"the program was made for sequences of up to {self.max_length} tokens, got "
                f"{longest}",
                hint="shorten the input, or compile with backend_options={'max_length': N}",
            )
        outputs = self.method.execute([x.contiguous() for x in inputs])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def open_program(
    members: Mapping[str, bytes], manifest: dict[str, Any], path: Path
) -> ExecuTorchProgram:
    """A bundle's ``.pte`` program (its one member) loaded by ExecuTorch's runtime;
    ``BackendError`` when the runtime refuses it."""
    require_executorch()
    (program,) = members.values()
    try:
        return ExecuTorchProgram(program, manifest.get("max_batch"), manifest.get("max_length"))
    except Exception as err:
        made_with = manifest.get("versions", {}).get("executorch")
        raise BackendError(
            f"ExecuTorch's runtime cannot load {path}'s program (made with ExecuTorch "
            f"{made_with}): {err}",
            hint="write the bundle again with fxcomp compile --backend executorch",
        ) from err
