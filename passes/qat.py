"""Quantization-aware training: ``qat = group_batchnorm, insert_observers, train_qat, freeze,
lower``, ending in the same reference graph (and kernels) that ``quantize`` produces.

``train_qat`` rewrites ``observe(x) -> FakeQuantize(x)`` and, where a layer's input is
quantized, ``Conv(x) -> QATWeight(Conv)(x)``, then trains the graph on ``data``: hard-label
loss, or distillation from a float ``teacher`` (KL at ``temperature``, mixed by ``alpha``).
Conv and BatchNorm that ``fuse`` did not fold train as one ``ConvBN`` unit whose weight is
rounded as it will be once folded; after ``freeze_bn_after`` epochs every BatchNorm uses
its running statistics, and after ``freeze_observers_after`` epochs the activation ranges
stop moving. ``ranges="learned"`` trains each activation scale by gradient (LSQ) instead.
At the end, BatchNorm is folded and the layers are unwrapped; ``freeze`` then fixes the
trained ranges as Q/DQ steps exactly as after calibration. Runs unchanged under torchrun
(``fxcomp.training``).

Example::

    passes=[fuse(), prune(0.5), qat(train_batches, epochs=2, teacher=model)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.fused import ConvBN
from fxcomp.graph import module_of, replace_module
from fxcomp.pass_manager import Pass, PassResult, Pipeline
from fxcomp.passes.distillation import DistillObjective, DistillOptions, report_rows
from fxcomp.passes.freezing import freeze
from fxcomp.passes.fusion import FuseOptions, fuse_conv_bn_relu
from fxcomp.passes.lowering import lower as lower_pass
from fxcomp.passes.observers import observe
from fxcomp.quant.fake_quant import FakeQuantize, QATWeight, SharedGrid
from fxcomp.quant.observers import Observer
from fxcomp.quant.ops import SkipSpec, tensor_inputs
from fxcomp.quant.reference import grid_of
from fxcomp.quant.scheme import KERNEL_ENGINES, scheme_for
from fxcomp.trace import trace
from fxcomp.training import Callback, Metric, OptimizerFactory, Supervised, fit, top1_accuracy

__all__ = ["QATOptions", "qat", "train_quantization_aware"]

_OBSERVERS = ("moving_average", "minmax")
_TEMPORARY = "fxcomp_qat_shared_grid"  # node meta of the steps that training alone needs


@dataclass(frozen=True)
class QATOptions:
    """How long and how the graph trains with fake quantization."""

    epochs: int = 2
    lr: float = 1e-4
    ranges: str = "observed"
    freeze_bn_after: int | None = None
    freeze_observers_after: int | None = None
    engine: str = "x86"
    per_channel: bool = True
    seed: int = 0
    progress: bool = True
    reduce_range: bool | None = None

    def check(self) -> None:
        """Raise ``InputError`` naming the first option that is not usable."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise InputError(f"qat epochs must be a positive integer, got {self.epochs!r}")
        if not self.lr > 0:
            raise InputError(f"qat lr must be positive, got {self.lr}")
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
        scheme_for(self.engine)


def _prepare(gm: GraphModule, options: QATOptions) -> tuple[list[FakeQuantize], list[str]]:
    """Observers -> FakeQuantize, weighted layers on quantized inputs -> QATWeight, and a
    ``SharedGrid`` step after each op that rounds again on its input's grid (``freeze``
    puts its Q/DQ step there)."""
    _, weight_scheme = scheme_for(
        options.engine, per_channel=options.per_channel, reduce_range=options.reduce_range
    )
    fakes, layers = [], []
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        if isinstance(module, Observer) and not isinstance(module, FakeQuantize):
            fake = FakeQuantize(module, learned=options.ranges == "learned")
            replace_module(gm, str(node.target), fake)
            fakes.append(fake)
    if not fakes:
        raise InputError("the graph has no observers", hint="run insert_observers before train_qat")
    for node in list(gm.graph.nodes):
        inputs = tensor_inputs(node)
        kind = node.meta.get("fxcomp_quant")
        source = grid_of(gm, inputs[0], Observer) if inputs else None
        if kind == "weighted" and source is not None:
            name = str(node.target)
            replace_module(gm, name, QATWeight(gm.get_submodule(name), weight_scheme))
            layers.append(name)
        elif kind == "requant" and source is not None:
            name = f"{node.name}_shared_grid"
            gm.add_submodule(name, SharedGrid(source))
            with gm.graph.inserting_after(node):
                step = gm.graph.call_module(name, (node,))
            step.meta = {**node.meta, _TEMPORARY: True}
            node.replace_all_uses_with(step, delete_user_cb=lambda user, s=step: user is not s)
    gm.recompile()
    return fakes, layers


def _finish(gm: GraphModule, layers: list[str]) -> None:
    """Unwrap the trained layers, drop the shared-grid steps, and fold every BatchNorm that
    trained inside a ConvBN."""
    for name in layers:
        replace_module(gm, name, gm.get_submodule(name).trained_layer())
    for node in list(gm.graph.nodes):
        module = module_of(gm, node)
        if node.meta.get(_TEMPORARY):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif isinstance(module, ConvBN):
            replace_module(gm, str(node.target), module.folded())
    gm.delete_all_unused_submodules()
    gm.recompile()


def train_quantization_aware(
    gm: GraphModule,
    ctx: CompileContext,
    *,
    data: Iterable[Any],
    options: QATOptions = QATOptions(),
    teacher: nn.Module | None = None,
    distillation: DistillOptions | None = None,
    optimizer: OptimizerFactory | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    validation: Iterable[Any] | None = None,
    metric: Metric = top1_accuracy,
    callback: Callback | None = None,
) -> PassResult:
    """Train the observed graph with fake quantization on ``data`` (module docstring)."""
    options.check()
    fakes, layers = _prepare(gm, options)
    if teacher is not None:
        teacher_gm = trace(teacher, ctx.example_inputs)
        objective = DistillObjective(gm, teacher_gm, distillation or DistillOptions(), loss)
    else:
        objective = Supervised(gm, loss, "qat")
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

    history = fit(
        objective,
        gm,
        data,
        epochs=options.epochs,
        lr=options.lr,
        desc="qat",
        optimizer=optimizer,
        validation=validation,
        metric=metric,
        callback=callback,
        before_epoch=before_epoch,
        seed=options.seed,
        progress=options.progress,
    )
    _finish(gm, layers)
    rows = report_rows(history)
    ctx.report.tables["qat"] = [{**row, **state} for row, state in zip(rows, states, strict=True)]
    return PassResult(gm, modified=True)


def qat(
    data: Iterable[Any],
    *,
    epochs: int = 2,
    lr: float = 1e-4,
    engine: str = "x86",
    observer: str = "moving_average",
    ranges: str = "observed",
    freeze_bn_after: int | None = None,
    freeze_observers_after: int | None = None,
    skip: Sequence[SkipSpec] = (),
    per_channel: bool = True,
    reduce_range: bool | None = None,
    lower: bool | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.7,
    optimizer: OptimizerFactory | None = None,
    loss: Callable[[Any, Any], torch.Tensor] | None = None,
    validation: Iterable[Any] | None = None,
    metric: Metric = top1_accuracy,
    callback: Callback | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Pipeline:
    """INT8 quantization-aware training for ``engine`` on ``data``, in place of ``quantize``.

    ``observer`` (``moving_average`` or ``minmax``) tracks each activation's range while it
    trains; ``ranges="learned"`` trains the scales instead. With a ``teacher`` the loss is
    distillation from it (``temperature``, ``alpha`` as in ``distill``). The other options
    are ``quantize``'s and ``distill``'s.

    Example::

        fxcomp.compile(model, x, passes=[fuse(), qat(batches, epochs=2, freeze_bn_after=1)])
    """
    options = QATOptions(
        epochs,
        lr,
        ranges,
        freeze_bn_after,
        freeze_observers_after,
        engine,
        per_channel,
        seed,
        progress,
        reduce_range,
    )
    options.check()
    if observer not in _OBSERVERS:
        raise InputError(
            f"qat observer must be one of {', '.join(_OBSERVERS)}, got {observer!r}",
            hint="histogram and mse ranges are for calibration (quantize), not per batch",
        )
    distillation = DistillOptions(epochs, lr, temperature, alpha, seed=seed, progress=progress)
    distillation.check()
    if lower is None:
        lower = engine in KERNEL_ENGINES

    def group(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return fuse_conv_bn_relu(gm, ctx, options=FuseOptions(train_batchnorm=True))

    def train(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return train_quantization_aware(
            gm,
            ctx,
            data=data,
            options=options,
            teacher=teacher,
            distillation=distillation,
            optimizer=optimizer,
            loss=loss,
            validation=validation,
            metric=metric,
            callback=callback,
        )

    steps = [
        Pass("group_batchnorm", group),
        observe(
            engine=engine,
            observer=observer,
            skip=skip,
            per_channel=per_channel,
            reduce_range=reduce_range,
        ),
        Pass("train_qat", train),
        freeze(engine=engine, per_channel=per_channel, reduce_range=reduce_range),
    ]
    if lower:
        steps.append(lower_pass(engine=engine))
    return Pipeline("qat", steps, run_after=("fuse", "prune", "distill"))
