"""TorchScript backend: the lowered graph as a frozen ``.pt`` for fbgemm/x86 or qnnpack.

The file carries a manifest (``fxcomp.json`` extra file): the engine its weights were
packed for (torch packs them again when the file is loaded, for the engine set then, so
``load`` sets this one: x86 kernels on full-range qnnpack activations saturate on CPUs
without VNNI) and the input shapes it was specialised for. ``load`` makes the first call with
those shapes, because the x86/oneDNN quantized convolution tunes itself
to the first input shape it sees (another batch size runs slower afterwards). The file is
written beside its final name, loaded back and verified, and only then renamed into place.

Example::

    artifact = emit(lowered_gm, ctx, Path("out"))
    model = load(artifact.path)
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from fxcomp.atomic import write_atomic
from fxcomp.backends.artifact import Artifact, expected_outputs
from fxcomp.context import CompileContext
from fxcomp.errors import BackendError, InputError
from fxcomp.quant.reference import QuantDequant
from fxcomp.quant.scheme import available_engines, deprecated_apis, packing_engine
from fxcomp.verify import checked_parity

__all__ = ["FILENAME", "check_options", "emit", "load", "script"]

FILENAME = "model.pt"


def _engine(gm: GraphModule, ctx: CompileContext) -> str:
    return gm.meta.get("fxcomp_engine") or ctx.engine or "x86"


def check_options(**options: Any) -> None:
    """The TorchScript backend takes no options."""
    if options:
        raise InputError(f"the torchscript backend takes no options, got {sorted(options)}")


def script(gm: GraphModule, example_inputs: tuple, engine: str) -> torch.jit.ScriptModule:
    """``gm`` traced on ``example_inputs`` and frozen, its weights packed for ``engine``.

    Example::

        scripted = script(lowered_gm, (torch.randn(1, 3, 224, 224),), "qnnpack")
    """
    try:
        with packing_engine(engine), deprecated_apis(), torch.no_grad():
            return torch.jit.freeze(torch.jit.trace(gm.eval(), example_inputs).eval())
    except Exception as err:
        raise BackendError(f"TorchScript export failed: {type(err).__name__}: {err}") from err


def emit(gm: GraphModule, ctx: CompileContext, out_dir: Path) -> Artifact:
    """Script, freeze, save, reload and verify ``gm``; return the artifact in ``out_dir``."""
    if any(isinstance(m, QuantDequant) for m in gm.modules()):
        raise BackendError(
            "the graph still holds Q/DQ steps: it was not lowered to quantized kernels",
            hint="end the pipeline with quantize(...) for engine x86, fbgemm or qnnpack",
        )
    engine = _engine(gm, ctx)
    shapes = [list(t.shape) for t in ctx.example_inputs if isinstance(t, torch.Tensor)]
    manifest = {
        "format": 1,
        "engine": engine,
        "specialised_for": shapes,
        "torch": torch.__version__,
    }
    expected = expected_outputs(gm, ctx.reference_outputs, ctx.example_inputs)
    scripted = script(gm, ctx.example_inputs, engine)
    buffer = io.BytesIO()
    with deprecated_apis():
        torch.jit.save(scripted, buffer, _extra_files={"fxcomp.json": json.dumps(manifest)})

    def verify(tmp: Path) -> dict[str, float]:
        with torch.no_grad():
            outputs = load(tmp)(*ctx.example_inputs)
        return checked_parity(
            outputs,
            expected=expected,
            float_outputs=ctx.float_outputs,
            quantized=ctx.reference_outputs is not None,
            what="TorchScript",
        )

    path = out_dir / FILENAME
    figures = write_atomic(path, buffer.getvalue(), check=verify)
    return Artifact("torchscript", path, manifest, figures)


def load(
    artifact: Artifact | Path | str, input_shapes: Sequence[Sequence[int]] | None = None
) -> Any:
    """Load an artifact (or the ``.pt`` path) written by ``emit``; make its first call on its
    input shapes.

    ``input_shapes`` re-specialises it for other shapes (another batch size).

    Example::

        model = load(Path("out/model.pt"), input_shapes=[[8, 3, 224, 224]])
    """
    path = artifact.path if isinstance(artifact, Artifact) else Path(artifact)
    try:
        manifest = _manifest(path)
        engine = manifest.get("engine")
        if engine not in available_engines():
            engine = torch.backends.quantized.engine
        with deprecated_apis(), packing_engine(engine):
            module = torch.jit.load(str(path))
    except Exception as err:
        raise BackendError(f"cannot load {path}: {err}") from err
    shapes = input_shapes or manifest.get("specialised_for") or []
    with torch.no_grad():
        if shapes:
            module(*(torch.zeros(shape) for shape in shapes))
    return module


def _manifest(path: Path) -> dict[str, Any]:
    """The ``fxcomp.json`` extra file of a saved TorchScript archive ({} if it has none)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/extra/fxcomp.json")]
        return json.loads(archive.read(names[0]) or "{}") if names else {}
