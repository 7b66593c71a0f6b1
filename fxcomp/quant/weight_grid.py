"""The grids weight-only quantization puts weights on, and the searches that choose the codes.

``WeightGrid(bits, group_size)``: 8 bits is symmetric int8, one scale per output channel; 4
bits is codes 0..15 with a scale and a minimum per group of ``group_size`` input channels.
``rtn`` rounds each weight to its nearest code. ``gptq`` (Frantar et al., 2022) rounds one
input column at a time and spreads each column's rounding error over the columns not yet
rounded, weighted by the inverse Hessian ``H = 2 X^T X / n`` of the layer's inputs; with
``act_order`` it takes the columns by decreasing ``diag(H)`` (the group grids then come from
the float weight). ``awq_scale`` (Lin et al., 2023) searches a per-input-channel scale
``s = mean|x| ** alpha`` that protects the channels carrying large activations: the layer
computes ``Q(W * s) @ (x / s)``; ``clipped``, AWQ's second step, then shrinks each group's
range where that lowers the output error.

Example::

    grid = WeightGrid(4, 128)
    codes, scale, minimum = gptq(weight, hessian, grid)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxcomp.nn.weight_only import dequantize

__all__ = ["WeightGrid", "awq_scale", "clipped", "gptq", "rtn"]

Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass(frozen=True)
class WeightGrid:
    """8 bits: int8 codes, symmetric, per output channel (``group_size`` is the input width);
    4 bits: codes 0..15 with a scale and a minimum per group of ``group_size`` inputs. With
    ``symmetric`` the 4-bit minimum is ``-8 * scale``: codes -8..7 around zero, the int4 form
    XNNPACK's groupwise linear takes (its weights have no zero point).

    Example::

        scale, minimum = WeightGrid(4, 128).params(weight)
    """

    bits: int
    group_size: int
    symmetric: bool = False

    def params(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, minimum) per (output channel, group) of ``weight``'s columns."""
        rows, columns = weight.shape
        groups = weight.reshape(rows, columns // self.group_size, self.group_size)
        if self.bits == 8:
            return groups.abs().amax(-1).clamp(min=1e-8) / 127, None
        minimum, maximum = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        if self.symmetric:  # the finest grid -8..7 around zero that covers both ends
            scale = torch.maximum(-minimum / 8, maximum / 7).clamp(min=1e-8)
            return scale, -8 * scale
        return ((maximum - minimum) / 15).clamp(min=1e-8), minimum

    def codes(
        self, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> torch.Tensor:
        """The nearest codes of ``weight`` (any number of whole groups of columns, or one
        column with its group's scale and minimum as vectors)."""
        if weight.shape[-1] != scale.shape[-1] and scale.dim() == 2:
            scale = scale.repeat_interleave(self.group_size, dim=1)
            minimum = None if minimum is None else minimum.repeat_interleave(self.group_size, 1)
        if self.bits == 8:
            return torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
        return torch.round((weight - minimum) / scale).clamp(0, 15).to(torch.uint8)

    def value(
        self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None
    ) -> torch.Tensor:
        """The float value of ``codes`` (shaped as in ``codes``)."""
        if codes.dim() == 1:
            value = codes.float() * scale
            return value if minimum is None else value + minimum
        return dequantize(codes, scale, minimum, self.group_size)

    def round(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` rounded to the grid it defines (what round-to-nearest computes with)."""
        scale, minimum = self.params(weight)
        return self.value(self.codes(weight, scale, minimum), scale, minimum)


def rtn(weight: torch.Tensor, grid: WeightGrid) -> Codes:
    """(codes, scale, minimum): each weight rounded to its nearest code.

    Example::

        codes, scale, minimum = rtn(layer.weight, WeightGrid(8, layer.in_features))
    """
    scale, minimum = grid.params(weight)
    return grid.codes(weight, scale, minimum), scale, minimum


def clipped(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    grid: WeightGrid,
    *,
    steps: int = 20,
    rows: int = 512,
) -> Codes:
    """(codes, scale, minimum) on ranges shrunk, per output channel and group, by the factor
    in (0.5, 1] that minimises the error of that group's share of the output on ``inputs``
    (rows of the layer's input, the first ``rows`` of them): AWQ's clipping search, which
    trades a few large weights' error for a finer grid.

    Example::

        codes, scale, minimum = clipped(layer.weight, rows, WeightGrid(4, 128))
    """
    groups = weight.shape[1] // grid.group_size
    x = inputs[:rows].float().reshape(-1, groups, grid.group_size)

    def loss(trial: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """Per output channel and group, chunked to bound memory."""
        error = (weight - grid.value(grid.codes(weight, *trial), *trial)).split(1024)
        return torch.cat(
            [
                torch.einsum("ngk,ogk->nog", x, e.reshape(-1, groups, grid.group_size))
                .pow(2)
                .sum(0)
                for e in error
            ]
        )

    # the range times 1, then smaller factors; the first (unclipped) wins ties
    trials = [grid.params(weight * (1 - 0.5 * step / steps)) for step in range(steps)]
    best = torch.stack([loss(trial) for trial in trials]).argmin(0)[None]
    scale = torch.stack([trial[0] for trial in trials]).gather(0, best)[0]
    minimum = None
    if grid.bits == 4:
        minimum = torch.stack([trial[1] for trial in trials]).gather(0, best)[0]
    return grid.codes(weight, scale, minimum), scale, minimum


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: WeightGrid,
    *,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
) -> Codes:
    """(codes, scale, minimum) chosen column by column with error feedback through the
    inverse Hessian of the layer's inputs (``hessian``: in x in, ``2 X^T X / n``);
    ``damp`` (a share of the mean diagonal) keeps it invertible.

    Example::

        codes, scale, minimum = gptq(layer.weight, hessian, WeightGrid(4, 128), act_order=True)
    """
    weight = weight.detach().double().clone()
    hessian = hessian.double().clone()
    rows, columns = weight.shape
    dead = hessian.diagonal() == 0  # inputs that were always zero: their weights do nothing
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else None
    groups = columns // grid.group_size
    scale = torch.zeros(rows, groups, dtype=torch.float64)
    minimum = None if grid.bits == 8 else torch.zeros(rows, groups, dtype=torch.float64)
    if order is not None:  # static groups: the grids of the float weight
        scale, minimum = grid.params(weight)
        weight, hessian = weight[:, order], hessian[order][:, order]
    hessian += damp * hessian.diagonal().mean() * torch.eye(columns, dtype=torch.float64)
    inverse = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True
    )
    codes = torch.zeros(rows, columns, dtype=torch.int8 if grid.bits == 8 else torch.uint8)
    # every group starts a block, where ``weight`` holds all the error fed back so far: its
    # grid is then read from the weight as it stands
    block = min(block, grid.group_size)
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        chunk = weight[:, start:stop].clone()
        errors = torch.zeros_like(chunk)
        for i in range(stop - start):
            column = start + i
            original = column if order is None else int(order[column])
            group = original // grid.group_size
            if order is None and column % grid.group_size == 0:
                params = grid.params(weight[:, column : column + grid.group_size])
                scale[:, group] = params[0][:, 0]
                if minimum is not None:
                    minimum[:, group] = params[1][:, 0]
            group_min = None if minimum is None else minimum[:, group]
            code = grid.codes(chunk[:, i], scale[:, group], group_min)
            codes[:, original] = code
            error = (chunk[:, i] - grid.value(code, scale[:, group], group_min)) / inverse[
                column, column
            ]
            chunk[:, i:] -= error[:, None] * inverse[column, start + i : stop][None, :]
            errors[:, i] = error
        weight[:, start:stop] = chunk
        weight[:, stop:] -= errors @ inverse[start:stop, stop:]
    return codes, scale.float(), None if minimum is None else minimum.float()


def awq_scale(
    weights: list[torch.Tensor], inputs: torch.Tensor, grid: WeightGrid, *, steps: int = 20
) -> torch.Tensor:
    """The per-input-channel scale ``s`` (``mean|x| ** alpha``, alpha searched on a grid of
    ``steps`` in [0, 1)) that minimises the error of the layers in ``weights`` (which all read
    ``inputs``, rows of tokens) when each computes ``round(W * s) @ (x / s)``.

    Example::

        s = awq_scale([q.weight, k.weight, v.weight], x, WeightGrid(4, 128))
    """
    inputs = inputs.float()
    magnitude = inputs.abs().mean(0).clamp(min=1e-5)
    expected = [inputs @ w.T for w in weights]
    best, best_error = torch.ones_like(magnitude), float("inf")
    for step in range(steps):
        s = magnitude ** (step / steps)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(
            float(((inputs / s) @ grid.round(w * s).T - y).pow(2).mean())
            for w, y in zip(weights, expected, strict=True)
        )
        if error < best_error:
            best, best_error = s, error
    return best
