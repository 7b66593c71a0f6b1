"""Property tests over random small graphs of conv, bn, relu, add, cat, split and linear.

For any graph and ratio: the pruned model runs at another batch size with consistent
shapes, matches the zeroed model within 1e-5 relative (the oracle), and never grows;
ratio 0 is exactly the identity and says it changed nothing (the pass manager checks that
every ``modified`` claim is honest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxcomp
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.passes import prune
from fxcomp.pruning.plan import PruneOptions, pruning_plan
from tests.conftest import oracle


class RandomNet(nn.Module):
    """Ops applied to a growing list of values; each op reads earlier values by index
    (taken modulo how many there are), resolved once here so forward has no branches on
    shapes."""

    def __init__(self, ops: list[tuple]) -> None:
        super().__init__()
        self.layers = nn.ModuleDict()
        self.steps: list[tuple] = []
        widths = [3]
        for i, (kind, a, b) in enumerate(ops):
            src = a % len(widths)
            width = widths[src]
            if kind in ("conv", "bn"):
                name = f"{kind}{i}"
                self.layers[name] = (
                    nn.Conv2d(width, b, 3, padding=1) if kind == "conv" else nn.BatchNorm2d(width)
                )
                self.steps.append(("layer", src, name))
                widths.append(b if kind == "conv" else width)
            elif kind == "add":
                same = [j for j, w in enumerate(widths) if w == width and j != src]
                self.steps.append(("add", src, same[-1] if same else src))
                widths.append(width)
            elif kind == "cat":
                other = b % len(widths)
                self.steps.append(("cat", src, other))
                widths.append(width + widths[other])
            elif kind == "split" and width >= 2:
                sizes = [width // 2, width - width // 2]
                self.steps.append(("split", src, sizes))
                widths += sizes
            else:
                self.steps.append(("relu", src, None))
                widths.append(width)
        self.head = nn.Linear(widths[-1], 4)

    def forward(self, x):
        values = [x]
        for kind, src, arg in self.steps:
            v = values[src]
            if kind == "layer":
                values.append(self.layers[arg](v))
            elif kind == "add":
                values.append(v + values[arg])
            elif kind == "cat":
                values.append(torch.cat([v, values[arg]], 1))
            elif kind == "split":
                pieces = torch.split(v, arg, 1)
                values += [pieces[0], pieces[1]]
            else:
                values.append(F.relu(v))
        return self.head(values[-1].mean((2, 3)))


ops = st.lists(
    st.tuples(
        st.sampled_from(["conv", "conv", "bn", "relu", "add", "cat", "split"]),
        st.integers(0, 20),
        st.integers(1, 12),
    ),
    min_size=1,
    max_size=10,
)


def _net(spec: list[tuple]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(RandomNet(spec)).eval()


@settings(max_examples=40, deadline=None)
@given(spec=ops, ratio=st.sampled_from([0.2, 0.5, 0.7]))
def test_any_graph_prunes_to_a_consistent_smaller_model(spec, ratio):
    model = _net(spec)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    base = fxcomp.trace(model, x)
    if not pruning_plan(base, PruneOptions(ratio)).removed():
        return  # nothing prunable in this graph (only the input and output groups)
    result = oracle(model, x, ratio)
    with torch.no_grad():
        assert result.module(torch.randn(5, 3, 6, 6)).shape == (5, 4)
    before = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in result.module.parameters()) < before


@settings(max_examples=25, deadline=None)
@given(spec=ops)
def test_ratio_zero_is_exactly_the_identity(spec):
    model = _net(spec)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    result = fxcomp.compile(model, x, passes=[prune(0.0)])
    assert not result.report.find("prune").modified
    with torch.no_grad():
        torch.testing.assert_close(result.module(x), model(x), rtol=0, atol=0)
