"""fxcomp.save / fxcomp.load: graph data plus safetensors, no pickle, integrity checked."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

import fxcomp
from fxcomp import FxcompError, InputError
from fxcomp.cli.zoo import transformer
from fxcomp.passes import fuse, prune, quantize

RUN_SAVED = """
import sys, torch, fxcomp
module = fxcomp.load(sys.argv[1])
x = torch.arange(float(torch.Size(eval(sys.argv[2])).numel())).reshape(eval(sys.argv[2]))
torch.save(module(x / x.numel()), sys.argv[3])
"""


def run_in_fresh_process(path, shape, out):
    run = subprocess.run(
        [sys.executable, "-c", RUN_SAVED, str(path), repr(shape), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return torch.load(out, weights_only=True)


def test_round_trip_in_a_fresh_process_without_the_model_class(residual_net, image, tmp_path):
    gm = fxcomp.compile(residual_net, image, passes=[fuse()]).module
    path = tmp_path / "net.fxgraph"
    fxcomp.save(gm, path)
    shape = (2, 3, 16, 16)
    x = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    expected = gm(x / x.numel())
    actual = run_in_fresh_process(path, shape, tmp_path / "out.pt")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    loaded = fxcomp.load(path)
    assert type(loaded.get_submodule("stem")).__name__ == "ConvReLU"

    def structure(module):
        return [(n.op, n.name, str(n.target), str(n.args)) for n in module.graph.nodes]

    assert structure(loaded) == structure(gm)


@pytest.mark.slow
@pytest.mark.parametrize("passes", [[fuse()], [prune(0.5), fuse()]], ids=["fused", "pruned"])
def test_resnet50_round_trip_in_a_fresh_process(tmp_path, passes):
    model = torchvision.models.resnet50().eval()
    shape = (1, 3, 224, 224)
    gm = fxcomp.compile(model, torch.randn(shape), passes=passes).module
    fxcomp.save(gm, tmp_path / "r50.fxgraph")
    x = torch.arange(float(torch.Size(shape).numel())).reshape(shape)
    with torch.no_grad():
        expected = gm(x / x.numel())
    actual = run_in_fresh_process(tmp_path / "r50.fxgraph", shape, tmp_path / "out.pt")
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_changed_or_truncated_files_are_refused(residual_net, image, tmp_path):
    path = tmp_path / "net.fxgraph"
    fxcomp.save(fxcomp.compile(residual_net, image, passes=[fuse()]).module, path)
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # inside the last tensor
    (tmp_path / "flipped.fxgraph").write_bytes(bytes(flipped))
    with pytest.raises(FxcompError, match="changed after it was saved"):
        fxcomp.load(tmp_path / "flipped.fxgraph")
    (tmp_path / "short.fxgraph").write_bytes(data[: len(data) // 2])
    with pytest.raises(FxcompError, match="cannot read .*short.fxgraph"):
        fxcomp.load(tmp_path / "short.fxgraph")
    with pytest.raises(FxcompError, match="cannot read"):
        fxcomp.load(tmp_path / "missing.fxgraph")


def test_load_refuses_functions_outside_its_allowlist(tmp_path):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(torch.save, (x, "/tmp/fxcomp-should-not-exist"))
    graph.output(x)
    fxcomp.save(torch.fx.GraphModule(nn.Module(), graph), tmp_path / "evil.fxgraph")
    with pytest.raises(
        FxcompError, match="calls torch.serialization.save, which fxcomp.load does not allow"
    ):
        fxcomp.load(tmp_path / "evil.fxgraph")


def test_quantized_and_user_modules_are_refused_with_a_hint(residual_net, image, tmp_path):
    lowered = fxcomp.compile(residual_net, image, passes=[quantize([image], progress=False)])
    with pytest.raises(InputError, match="cannot save quantized module") as info:
        fxcomp.save(lowered.module, tmp_path / "q.fxgraph")
    assert "backend='torchscript'" in str(info.value)

    class Custom(nn.Module):
        def forward(self, x):
            return x * 2

    gm = fxcomp.trace(nn.Sequential(Custom()), image, leaf_modules=[Custom])
    with pytest.raises(InputError, match="cannot save module '0' of class .*Custom"):
        fxcomp.save(gm, tmp_path / "c.fxgraph")
    assert not (tmp_path / "c.fxgraph").exists()


def test_tied_weights_stay_tied(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)).eval()
    model[2].weight = model[0].weight
    gm = fxcomp.trace(model, torch.randn(2, 4))
    fxcomp.save(gm, tmp_path / "tied.fxgraph")
    loaded = fxcomp.load(tmp_path / "tied.fxgraph")
    assert loaded.get_submodule("2").weight is loaded.get_submodule("0").weight
    x = torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_hugging_face_graph_keeps_its_keywords_and_output_type_in_a_fresh_process(tmp_path):
    """An export-captured BERT is called with keyword inputs and returns a ModelOutput;
    the loaded module does the same, in a process that has not imported transformers."""
    model, inputs = transformer("bert")
    gm = fxcomp.compile(model, inputs, passes=[fuse()]).module
    path = tmp_path / "bert.fxgraph"
    fxcomp.save(gm, path)
    torch.save(inputs, tmp_path / "inputs.pt")
    code = (
        "import sys, torch, fxcomp;"
        "assert 'transformers' not in sys.modules;"
        f"m = fxcomp.load({str(path)!r});"
        f"out = m(**torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True));"
        "print(type(out).__name__);"
        f"torch.save(out.last_hidden_state, {str(tmp_path / 'out.pt')!r})"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    expected = gm(**inputs)
    assert run.stdout.split()[-1] == type(expected).__name__
    actual = torch.load(tmp_path / "out.pt", weights_only=True)
    torch.testing.assert_close(actual, expected.last_hidden_state, rtol=0, atol=0)
    loaded = fxcomp.load(path)
    torch.testing.assert_close(
        loaded(**inputs).pooler_output, expected.pooler_output, rtol=0, atol=0
    )


def test_an_output_type_from_an_unknown_library_is_refused_not_imported(tmp_path):
    from fxcomp.ir.serialize import _treespec

    spec = '[1, {"type": "evil.Output", "context": "[]", "children_spec": []}]'
    with pytest.raises(FxcompError, match="names an unknown type"):
        _treespec(spec, tmp_path / "m.fxgraph")
    assert "evil" not in sys.modules
