"""Quantization-aware training's machinery: the observed graph trained with fake quantization.

``train_quantization_aware`` rewrites ``observe(x) -> FakeQuantize(x)`` and, where a layer's
input is quantized, ``Conv(x) -> QATWeight(Conv)(x)``, then trains the graph on ``data``:
hard-label loss, or distillation from a float ``teacher`` (KL at ``temperature``, mixed by
``alpha``). Conv and BatchNorm that ``fuse`` did not fold train as one ``ConvBN`` unit whose
weight is rounded as it will be once folded; after ``freeze_bn_after`` epochs every
BatchNorm uses its running statistics, and after ``freeze_observers_after`` epochs the
activation ranges stop moving. ``ranges="learned"`` trains each activation scale by
gradient (LSQ) instead. At the end, BatchNorm is folded and the layers are unwrapped;
``freeze`` then fixes the trained ranges as Q/DQ steps exactly as after calibration. Runs
unchanged under torchrun (``fxcomp.runtime.training``). ``fxcomp.passes.qat`` is the pass.

Example::

    train_quantization_aware(observed_gm, ctx, data=batches, options=QATOptions(...))
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.fx import GraphModule

from fxcomp.ir.capture import named_inputs, trace
from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import drop_unused, module_of, replace_module
from fxcomp.nn.fused import ConvBN
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassResult
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.fake_quant import FakeQuantize, QATWeight, SharedGrid
from fxcomp.quant.observers import Observer
from fxcomp.quant.ops import QUANT_KIND, tensor_inputs
from fxcomp.quant.reference import grid_of
from fxcomp.runtime.distillation import DistillObjective, DistillOptions, report_rows
from fxcomp.runtime.training import Supervised, fit

__all__ = [
    "QAT_OBSERVERS",
    "QATOptions",
    "finish_fake_quantization",
    "prepare_fake_quantization",
    "quantized_weight_layers",
    "train_quantization_aware",
]

QAT_OBSERVERS = ("moving_average", "minmax")  # ranges that can follow the weights per batch
_TEMPORARY = "fxcomp_qat_shared_grid"  # node meta of the steps that training alone needs


@dataclass(frozen=True)
class QATOptions:
    """How the graph trains with fake quantization: ``distillation`` (with a ``teacher``)
    holds the training options and the loss's weights; ranges observed per batch or learned;
    when BatchNorm and the observed ranges stop moving."""

    distillation: DistillOptions
    teacher: nn.Module | None = None
    ranges: str = "observed"
    freeze_bn_after: int | None = None
    freeze_observers_after: int | None = None

    def check(self) -> None:
        """Raise ``InputError`` naming the first option that is not usable."""
        self.distillation.check()
        if self.ranges not in ("observed", "learned"):
            raise InputError(f"qat ranges must be 'observed' or 'learned', got {self.ranges!r}")
        if self.ranges == "learned" and self.freeze_observers_after is not None:
            raise InputError(
                "qat freeze_observers_after applies to observed ranges; learned ranges are "
                "set from the first batch and then trained",
                hint="drop freeze_observers_after, or use ranges='observed'",
            )
        for name in ("freeze_bn_after", "freeze_observers_after"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise InputError(f"qat {name} must be a non-negative integer, got {value!r}")


def quantized_weight_layers(gm: GraphModule) -> list[str]:
    """The names of the weighted layers whose input is quantized: those ``freeze`` will
    give quantized weights.

    Example::

        quantized_weight_layers(observed_gm)   # ['conv1', 'layer1.0.conv1', ...]
    """
    names = []
    for node in gm.graph.nodes:
        inputs = tensor_inputs(node)
        weighted = node.meta.get(QUANT_KIND) == "weighted" and inputs
        if weighted and grid_of(gm, inputs[0], Observer) is not None:
            names.append(str(node.target))
    return list(dict.fromkeys(names))  # a layer called twice is one layer


def prepare_fake_quantization(
    gm: GraphModule, learned: bool, wrapper: type[QATWeight] = QATWeight
) -> tuple[list[FakeQuantize], list[str]]:
    """Observers -> FakeQuantize, weighted layers on quantized inputs -> ``wrapper``
    (``QATWeight``, or a subclass that rounds otherwise), and a ``SharedGrid`` step after
    each op that rounds again on its input's grid (``freeze`` puts its Q/DQ step there);
    the fake-quantize steps and the wrapped layers' names.

    Example::

        fakes, layers = prepare_fake_quantization(observed_gm, learned=False)
    """
    config = QUANT_CONFIG.get(gm)
    if config is None:
        raise InputError("the graph has no observers", hint="run insert_observers before train_qat")
    _, weight_scheme = config.schemes()
    fakes = []
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if isinstance(module, Observer) and not isinstance(module, FakeQuantize):
            fake = FakeQuantize(module, learned=learned)
            replace_module(gm, str(node.target), fake)
            fakes.append(fake)
    if not fakes:
        raise InputError("the graph has no observers", hint="run insert_observers before train_qat")
    layers = quantized_weight_layers(gm)
    for name in layers:
        replace_module(gm, name, wrapper(gm.get_submodule(name), weight_scheme))
    for node in list(gm.graph.nodes):
        inputs = tensor_inputs(node)
        source = grid_of(gm, inputs[0], Observer) if inputs else None
        if node.meta.get(QUANT_KIND) == "requant" and source is not None:
            name = f"{node.name}_shared_grid"
            gm.add_submodule(name, SharedGrid(source))
            with gm.graph.inserting_after(node):
                step = gm.graph.call_module(name, (node,))
            step.meta = {**node.meta, _TEMPORARY: True}
            node.replace_all_uses_with(step, delete_user_cb=lambda user, s=step: user is not s)
    gm.recompile()
    return fakes, layers


def finish_fake_quantization(gm: GraphModule, layers: list[str]) -> None:
    """Unwrap the trained layers, drop the shared-grid steps, and fold every BatchNorm that
    trained inside a ConvBN: the observed graph again, ready for ``freeze``.

    Example::

        finish_fake_quantization(gm, layers)
    """
    for name in layers:
        replace_module(gm, name, gm.get_submodule(name).trained_layer())
    for node in list(gm.graph.nodes):
        module = module_of(gm, node)
        if node.meta.get(_TEMPORARY):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif isinstance(module, ConvBN):
            replace_module(gm, str(node.target), module.folded())
    drop_unused(gm)
    gm.recompile()


def train_quantization_aware(
    gm: GraphModule, ctx: CompileContext, *, data: Iterable[Any], options: QATOptions
) -> PassResult:
    """Train the observed graph with fake quantization on ``data`` (module docstring)."""
    options.check()
    fakes, layers = prepare_fake_quantization(gm, learned=options.ranges == "learned")
    if options.teacher is not None:
        teacher_gm = trace(options.teacher, named_inputs(gm, ctx.config.example_inputs))
        objective = DistillObjective(gm, teacher_gm, options.distillation)
    else:
        objective = Supervised(gm, options.distillation.loss, "qat")
    states: list[dict[str, str]] = []

    def before_epoch(epoch: int) -> None:
        bn_frozen = options.freeze_bn_after is not None and epoch > options.freeze_bn_after
        if bn_frozen:
            for m in gm.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        fixed = (
            options.freeze_observers_after is not None and epoch > options.freeze_observers_after
        )
        for fake in fakes:
            fake.observing = not fixed
        states.append(
            {
                "batchnorm": "frozen" if bn_frozen else "training",
                "ranges": options.ranges if not fixed else "fixed",
            }
        )

    training = options.distillation.training
    history = fit(objective, gm, data, training, desc="qat", before_epoch=before_epoch)
    finish_fake_quantization(gm, layers)
    rows = report_rows(history)
    ctx.state.report.tables["qat"] = [
        {**row, **state} for row, state in zip(rows, states, strict=True)
    ]
    return PassResult(gm, modified=True)
