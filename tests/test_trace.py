"""Tracing: shapes on every node, clear errors for untraceable models, the ways out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcomp
from fxcomp import InputError, TraceError
from fxcomp.ir.capture import CAPTURE


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.blocks = nn.Sequential(nn.ReLU(), Gate())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.conv(x))


class FlagNet(nn.Module):
    def forward(self, x: torch.Tensor, scale: bool = True) -> torch.Tensor:
        if scale:
            return x * 3
        return x


class TopLevelLoop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(len(x)):  # len() of a traced value
            x = x + 1
        return x


def test_every_node_has_shape_and_dtype(residual_net, image):
    gm = fxcomp.trace(residual_net, image)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        meta = node.meta["tensor_meta"]
        assert meta.dtype == torch.float32, node.name
        assert meta.shape[0] == 2, node.name
        assert node.meta["fxcomp_pass"] == "trace"
    conv = gm.graph.find_nodes(op="call_module", target="conv")[0]
    assert tuple(conv.meta["tensor_meta"].shape) == (2, 8, 16, 16)
    torch.testing.assert_close(gm(image), residual_net(image), rtol=0, atol=0)


def test_trace_works_on_a_copy_in_eval_mode(residual_net, image):
    residual_net.train()
    gm = fxcomp.trace(residual_net, image)
    assert residual_net.training and not gm.training
    assert gm.get_submodule("conv").weight is not residual_net.conv.weight


def test_control_flow_error_names_submodule_and_source_line():
    with pytest.raises(TraceError) as info:
        fxcomp.trace(GatedNet(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert "submodule 'blocks.1' (Gate)" in message
    assert f"{__file__}:" in message and "if x.sum() > 0:" in message
    assert "leaf_modules=['blocks.1']" in message and "concrete_args" in message


def test_leaf_module_makes_the_same_model_compile():
    model = GatedNet().eval()
    x = torch.randn(1, 3, 8, 8)
    for leaf in ("blocks.1", Gate):
        result = fxcomp.compile(model, x, passes=[fxcomp.passes.fuse()], leaf_modules=[leaf])
        torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-6)
        assert result.module.graph.find_nodes(op="call_module", target="blocks.1")


def test_concrete_args_fix_the_control_flow():
    x = torch.randn(2, 3)
    gm = fxcomp.trace(FlagNet(), x, concrete_args={"scale": False})
    torch.testing.assert_close(gm(x), x)


def test_error_in_the_models_own_forward_points_to_concrete_args():
    with pytest.raises(TraceError) as info:
        fxcomp.trace(TopLevelLoop(), torch.randn(2, 3), capture="symbolic")
    message = str(info.value)
    assert "the model's own forward (TopLevelLoop)" in message
    assert "for _ in range(len(x)):" in message and "concrete_args" in message


def test_auto_exports_what_symbolic_tracing_cannot_and_names_the_axes_it_fixed():
    x = torch.randn(2, 3)
    gm = fxcomp.trace(TopLevelLoop(), x)  # the loop count depends on the batch: fixed at 2
    torch.testing.assert_close(gm(x), x + 2)
    info = CAPTURE.get(gm)
    assert info["capture"] == "export" and info["static_axes"] == ["x axis 0 (size 2)"]
    assert info["reason"].startswith("symbolic tracing failed: cannot trace the model's own")
    assert CAPTURE.get(fxcomp.trace(nn.Linear(3, 3), x))["capture"] == "symbolic"


def test_when_both_captures_fail_the_error_gives_both_causes():
    with pytest.raises(TraceError) as info:
        fxcomp.trace(GatedNet(), torch.randn(1, 3, 8, 8))
    message = str(info.value)
    assert message.startswith("symbolic tracing failed: cannot trace submodule 'blocks.1'")
    assert "torch.export failed too: torch.export cannot capture the model at " in message
    assert message.count("if x.sum() > 0:") == 2  # each cause with the user's source line
    assert "leaf_modules=['blocks.1']" in message and "torch._check" in message


def test_wrong_input_shape_names_the_node():
    with pytest.raises(TraceError, match=r"at node 'conv'.*RuntimeError"):
        fxcomp.trace(GatedNet(), torch.randn(1, 5, 8, 8), leaf_modules=[Gate])


def test_unknown_leaf_name_suggests_close_ones():
    with pytest.raises(InputError, match=r"'blocks.2'.*\n.*did you mean blocks"):
        fxcomp.trace(GatedNet(), torch.randn(1, 3, 8, 8), leaf_modules=["blocks.2"])


def test_bad_example_inputs_and_model():
    with pytest.raises(InputError, match="example_inputs must be a tensor"):
        fxcomp.trace(GatedNet(), "x")
    with pytest.raises(InputError, match="'y' is not a parameter of GatedNet.forward"):
        fxcomp.trace(GatedNet(), {"y": torch.randn(1)})
    with pytest.raises(InputError, match="unknown capture 'dynamo'"):
        fxcomp.trace(GatedNet(), torch.randn(1, 3, 8, 8), capture="dynamo")
    with pytest.raises(InputError, match="must be a torch.nn.Module"):
        fxcomp.trace(lambda x: x, torch.randn(1))


class CheckedNet(nn.Module):
    """A rank check (timm's ``_assert(x.ndim == 4, ...)``) and a check on values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected NCHW")
        torch._assert(x.shape[1] % 3 == 0, "expected RGB")
        y = self.conv(x)
        torch._assert(y.abs().max() < 1e6, "activations blew up")
        return y


def test_shape_checks_go_and_checks_on_values_stay():
    x = torch.randn(1, 3, 8, 8)
    model = CheckedNet()
    gm = fxcomp.trace(model, x)
    checks = gm.graph.find_nodes(op="call_function", target=torch._assert)
    assert [c.args[1] for c in checks] == ["activations blew up"]
    # nothing else reads the input's rank or sizes: those reads are gone too
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and n.target is getattr]
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
