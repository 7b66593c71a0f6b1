"""Writing your own passes: an analysis pass and a rewrite, run through fxcomp.compile.

    python examples/custom_pass.py

``count_macs`` reads the shapes fxcomp propagated into ``node.meta`` and reports the
multiply-accumulates of every conv and linear layer without changing the graph
(``modified=False``). ``relu6_to_hardtanh`` rewrites every ReLU6 module into the equivalent
``Hardtanh(0, 6)``; it returns ``None`` (an in-place pass), so fxcomp works out for itself
that the graph changed. Both run after ``fuse``, which the ``Pass`` declares.
"""

from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torch.fx import GraphModule

import fxcomp
from fxcomp import CompileContext, Pass, PassResult


def count_macs(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Store the multiply-accumulates of each conv/linear node in ``node.meta["macs"]``."""
    for node in gm.graph.find_nodes(op="call_module"):
        module = gm.get_submodule(str(node.target))
        layer = getattr(module, "conv", getattr(module, "linear", module))  # fused units
        out = node.meta["tensor_meta"].shape
        if isinstance(layer, nn.Conv2d):
            per_output = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
            node.meta["macs"] = math.prod(out) * per_output
        elif isinstance(layer, nn.Linear):
            node.meta["macs"] = math.prod(out) * layer.in_features
    return PassResult(gm, modified=False)


def relu6_to_hardtanh(gm: GraphModule, ctx: CompileContext) -> None:
    """Replace every ReLU6 module with the equivalent Hardtanh(0, 6), in place."""
    for node in gm.graph.find_nodes(op="call_module"):
        if type(gm.get_submodule(str(node.target))) is nn.ReLU6:
            fxcomp.ir.graph.replace_module(gm, str(node.target), nn.Hardtanh(0.0, 6.0))


def main() -> None:
    model = torchvision.models.mobilenet_v2().eval()
    x = torch.randn(1, 3, 224, 224)
    result = fxcomp.compile(
        model,
        x,
        passes=[
            fxcomp.passes.fuse(),
            Pass("count_macs", count_macs, run_after=("fuse",)),
            Pass("relu6_to_hardtanh", relu6_to_hardtanh, run_after=("fuse",)),
        ],
    )
    print(result.report)
    gm = result.module
    macs = {n.name: n.meta["macs"] for n in gm.graph.nodes if "macs" in n.meta}
    print(f"\n{len(macs)} layers, {sum(macs.values()) / 1e6:.1f} M multiply-accumulates")
    for name, count in sorted(macs.items(), key=lambda kv: -kv[1])[:3]:
        print(f"  {name}: {count / 1e6:.1f} M")
    hardtanh = sum(isinstance(m, nn.Hardtanh) and not isinstance(m, nn.ReLU6) for m in gm.modules())
    print(f"ReLU6 replaced by Hardtanh: {hardtanh}")
    with torch.no_grad():
        error = (gm(x) - model(x)).abs().max().item()
    print(f"max |compiled - original| = {error:.2e}")


if __name__ == "__main__":
    main()
