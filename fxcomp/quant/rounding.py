"""Learned weight rounding (AdaRound, Nagel et al. 2020) against the float graph's output.

Between calibration and freeze, each weighted layer on a quantized input rounds its weight
``w`` onto the symmetric grid of its range (scale ``s``, as ``freeze`` will) as::

    q = floor(w / s) + h(V),  h(V) = clamp(1.2 sigmoid(V) - 0.1, 0, 1)

with ``V`` started where ``h(V)`` is the fractional part of ``w / s`` (the weight itself).
The largest weights (of each output channel, or of the tensor) set the grid: they keep
their nearest rounding, so the grid does not move. Activations are fake-quantized on their
calibrated grids, and only the ``V`` train (``fit``'s Adam, cosine decay), minimising::

    sum over the float outputs of MSE(quantized, float) / Var(float)
    + regularization * mean(1 - |2 h(V) - 1| ** beta)

against the float graph on the calibration data: the error at the output rather than each
layer's own, since lowering every layer's error does not lower the output's (GPTQ's
rounding halves MobileNetV3's per-layer weight error and leaves its output's SQNR where it
was). ``beta`` falls from 20 to 2 after the first fifth of the steps, driving every ``h``
towards 0 or 1. At the end each weight is set to ``s * (floor(w / s) + [V >= 0])``, a point
of the grid, and the largest keep their value: ``freeze`` finds the same grid and its
nearest rounding reproduces every learned choice. ``fxcomp.passes.learn_rounding`` is the
pass; ``quantize(rounding="learned")`` runs it.

Example::

    learn_weight_rounding(observed_gm, ctx, data=batches, options=RoundingOptions())
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.utils._pytree import tree_leaves

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import drop_unused, module_of
from fxcomp.nn.fused import ConvBN
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassResult
from fxcomp.quant.fake_quant import QATWeight
from fxcomp.quant.observers import Observer
from fxcomp.quant.qat import (
    finish_fake_quantization,
    prepare_fake_quantization,
    quantized_weight_layers,
)
from fxcomp.quant.reference import weight_qparams
from fxcomp.quant.scheme import QScheme
from fxcomp.runtime.distillation import report_rows
from fxcomp.runtime.training import TrainOptions, fit

__all__ = ["LearnedRounding", "RoundingObjective", "RoundingOptions", "learn_weight_rounding"]

_ZETA, _GAMMA = 1.1, -0.1  # h(V)'s stretch beyond [0, 1], so that it reaches both ends
_BETA = (20.0, 2.0)  # the regulariser's exponent, annealed from the first to the second
_WARM_UP = 0.2  # the share of the steps before the regulariser starts


@dataclass(frozen=True)
class RoundingOptions:
    """How the rounding trains: ``steps`` optimizer steps (whole passes over the data,
    rounded up), Adam's ``lr`` on ``V``, the regulariser's weight, the seed, a progress
    bar."""

    steps: int = 200
    lr: float = 0.1
    regularization: float = 0.01
    seed: int = 0
    progress: bool = True

    def check(self) -> None:
        """Raise ``InputError`` naming the first option that is not usable."""
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"learn_rounding steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise InputError(f"learn_rounding lr must be positive, got {self.lr}")
        if not self.regularization >= 0:
            raise InputError(
                f"learn_rounding regularization must be non-negative, got {self.regularization}"
            )


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


class LearnedRounding(QATWeight):
    """A weighted layer whose weight rounds up or down as ``V`` says (module docstring).

    Example::

        layer = LearnedRounding(conv, weight_scheme)
        conv = layer.trained_layer()   # its weight is now a point of its grid
    """

    def __init__(self, layer: nn.Module, scheme: QScheme) -> None:
        super().__init__(layer, scheme)
        if isinstance(layer, ConvBN):
            raise InputError(
                "learn_rounding needs BatchNorm folded first",
                hint="run fuse() (without train_batchnorm) before quantize",
            )
        if not scheme.symmetric:
            raise InputError("learn_rounding takes symmetric weight grids (every engine's)")
        weight = self.inner.weight.detach()
        scale, _ = weight_qparams(weight, scheme)
        per_channel = scale.dim() > 0
        self.register_buffer("scale", scale.reshape((-1,) + (1,) * (weight.dim() - 1)))
        position = weight / self.scale
        self.register_buffer("floor", torch.floor(position))
        nearest = torch.clamp(torch.round(position), scheme.qmin, scheme.qmax)
        self.register_buffer("nearest", nearest * self.scale)  # the largest weights' values
        # the largest weights set the grid: they keep their value, and so their rounding
        size = weight.abs()
        bound = (
            size.amax(dim=tuple(range(1, weight.dim())), keepdim=True)
            if per_channel
            else size.max()
        )
        self.register_buffer("fixed", size >= bound)
        fraction = (position - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (fraction - _GAMMA) - 1))
        self.soft: torch.Tensor | None = None  # h(V) of the last forward, for the regulariser

    def _grid_point(self, up: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
        return torch.where(self.fixed, largest, (self.floor + up) * self.scale)

    def _rounded(self, weight: torch.Tensor) -> torch.Tensor:
        self.soft = _h(self.v)
        return self._grid_point(self.soft, self.nearest)

    def rounding_loss(self, beta: float) -> torch.Tensor:
        """The sum of ``1 - |2 h(V) - 1| ** beta`` after a forward, zero once every weight
        is rounded."""
        soft = self.soft if self.soft is not None else _h(self.v)
        return (1 - (2 * soft - 1).abs().pow(beta)).sum()

    def trained_layer(self) -> nn.Module:
        """The layer, each weight set to its hard rounding (a point of its grid), but for
        the largest, which keep their value (the layer's weight did not train) so that
        ``freeze`` finds the same grid."""
        weight = self.inner.weight
        with torch.no_grad():
            weight.copy_(self._grid_point((self.v >= 0).float(), weight))
        self.soft = None
        return self.layer


def _float_copy(gm: GraphModule) -> GraphModule:
    """A copy of the observed graph without its observers: the float graph."""
    teacher = copy.deepcopy(gm)
    for node in list(teacher.graph.nodes):
        if isinstance(module_of(teacher, node), Observer):
            node.replace_all_uses_with(node.args[0])
            teacher.graph.erase_node(node)
    drop_unused(teacher)
    teacher.recompile()
    return teacher.eval().requires_grad_(False)


def _output_error(student: Any, teacher: Any) -> torch.Tensor:
    """The sum over the floating outputs of their mean squared error over their variance."""
    pairs = zip(tree_leaves(student), tree_leaves(teacher), strict=True)
    terms = [
        F.mse_loss(s, t) / t.var().clamp(min=torch.finfo(torch.float32).tiny)
        for s, t in pairs
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1
    ]
    if not terms:
        raise InputError("learn_rounding: the graph has no floating-point output to match")
    return torch.stack(terms).sum()


class RoundingObjective(nn.Module):
    """One batch's loss for ``fit`` (module docstring): the output error against the float
    graph (held, not registered) and the rounding regulariser, annealed over ``steps``.

    Example::

        terms = RoundingObjective(gm, teacher, layers, options, steps=200)((x,), None)
    """

    def __init__(
        self,
        gm: GraphModule,
        teacher: GraphModule,
        layers: list[LearnedRounding],
        options: RoundingOptions,
        steps: int,
    ) -> None:
        super().__init__()
        self.student = gm
        self._teacher = (teacher,)
        self._layers = layers
        self.weights = sum(layer.v.numel() for layer in layers)
        self.options = options
        self.steps = steps
        self.step = 0

    def forward(self, inputs: tuple[Any, ...], label: Any) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            target = self._teacher[0](*inputs)
        error = _output_error(self.student(*inputs), target)
        start = int(_WARM_UP * self.steps)
        progress = (self.step - start) / max(1, self.steps - start)
        self.step += 1
        rounding = error.new_zeros(())
        if progress >= 0:
            beta = _BETA[0] + (_BETA[1] - _BETA[0]) * min(progress, 1.0)
            total = sum(layer.rounding_loss(beta) for layer in self._layers)
            rounding = total / self.weights
        loss = error + self.options.regularization * rounding
        return {"loss": loss, "output_error": error.detach(), "rounding": rounding.detach()}


def learn_weight_rounding(
    gm: GraphModule, ctx: CompileContext, *, data: Iterable[Any], options: RoundingOptions
) -> PassResult:
    """Learn the rounding of every quantized weight on ``data`` (module docstring)."""
    options.check()
    if not hasattr(data, "__len__") or not len(data):
        raise InputError(
            "learn_rounding needs calibration batches in a list or a DataLoader, not empty",
            hint="pass the calibration data quantize() took",
        )
    if not quantized_weight_layers(gm):
        return PassResult(gm, modified=False)
    teacher = _float_copy(gm)
    fakes, names = prepare_fake_quantization(gm, learned=False, wrapper=LearnedRounding)
    for fake in fakes:
        fake.observing = False  # the calibrated grids stay as they are
    layers = [gm.get_submodule(name) for name in names]
    frozen = [p for p in gm.parameters() if not p.requires_grad]
    gm.requires_grad_(False)  # only the rounding trains; no gradients for the weights
    for layer in layers:
        layer.v.requires_grad_(True)
    epochs = math.ceil(options.steps / len(data))
    objective = RoundingObjective(gm, teacher, layers, options, epochs * len(data))
    training = TrainOptions(epochs, options.lr, seed=options.seed, progress=options.progress)
    history = fit(
        objective, gm, data, training, desc="learn_rounding", before_epoch=lambda _: gm.eval()
    )
    finish_fake_quantization(gm, names)
    gm.requires_grad_(True)
    for parameter in frozen:
        parameter.requires_grad_(False)
    ctx.state.report.tables["learn_rounding"] = report_rows(history)
    return PassResult(gm, modified=True)
