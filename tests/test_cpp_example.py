"""examples/cpp builds against the LibTorch in the torch wheel and runs an fxcomp artifact.

The C++ output must equal the Python output of the same .pt on the same input (1e-6
absolute): the same quantized kernels run in both.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.passes import fuse, quantize

EXAMPLE = Path(__file__).parent.parent / "examples" / "cpp"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cpp_example_runs_an_int8_artifact(residual_net, tmp_path):
    shape = (2, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(*shape, generator=gen) for _ in range(4)]
    result = fxcomp.compile(
        residual_net, data[0], [fuse(), quantize(data, progress=False)], "torchscript", tmp_path
    )
    build = tmp_path / "build"
    torch_root = os.path.dirname(torch.__file__)
    abi = str(int(torch.compiled_with_cxx11_abi()))
    configure = [
        "cmake",
        "-S",
        str(EXAMPLE),
        "-B",
        str(build),
        f"-DTORCH_ROOT={torch_root}",
        f"-DTORCH_CXX11_ABI={abi}",
    ]
    for command in (configure, ["cmake", "--build", str(build), "-j2"]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    run = subprocess.run(
        [str(build / "run_model"), str(result.artifact.path), *map(str, shape)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split()
    assert lines[:3] == ["shape", "2", "3"]
    cpp = torch.tensor([float(v) for v in lines[3:]]).reshape(2, 3)
    count = torch.Size(shape).numel()
    x = (torch.arange(count, dtype=torch.float32).fmod(17) / 17.0 - 0.5).reshape(shape)
    with torch.no_grad():
        python = BACKENDS["torchscript"].load(result.artifact.path)(x)
    torch.testing.assert_close(cpp, python, rtol=0, atol=1e-6)
