"""TorchScript backend: the lowered graph as a frozen ``.pt`` for fbgemm/x86 or qnnpack.

The file carries a manifest (``fxcomp.json`` extra file): the engine its weights were
packed for (torch packs them again when the file is loaded, for the engine set then, so
``load`` sets this one: x86 kernels on full-range qnnpack activations saturate on CPUs
without VNNI) and the input shapes it was specialised for. ``load`` makes the first call with
those shapes, because the x86/oneDNN quantized convolution tunes itself
to the first input shape it sees (another batch size runs slower afterwards). The file is
written beside its final name, loaded back and verified, and only then renamed into place.

Example::

    backend = TorchScriptBackend()
    artifact = backend.emit(lowered_gm, ctx, Path("out"))
    model = backend.load(artifact.path)
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

from fxcomp.backends.base import Artifact, Backend, artifact_path, expected_outputs
from fxcomp.ir.atomic import write_atomic
from fxcomp.ir.errors import BackendError
from fxcomp.pipeline.context import CompileContext
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.lowering import script
from fxcomp.quant.reference import QuantDequant
from fxcomp.quant.scheme import available_engines, deprecated_apis, packing_engine
from fxcomp.runtime.parity import checked_parity

__all__ = ["FILENAME", "TorchScriptBackend"]

FILENAME = "model.pt"


class TorchScriptBackend(Backend):
    """Frozen TorchScript on fbgemm/qnnpack kernels (module docstring)."""

    name = "torchscript"

    def emit(self, gm: GraphModule, ctx: CompileContext, out_dir: Path) -> Artifact:
        """Script, freeze, save, reload and verify ``gm``; the artifact in ``out_dir``."""
        if any(isinstance(m, QuantDequant) for m in gm.modules()):
            raise BackendError(
                "the graph still holds Q/DQ steps: it was not lowered to quantized kernels",
                hint="end the pipeline with quantize(...) for engine x86, fbgemm or qnnpack",
            )
        config = QUANT_CONFIG.get(gm)
        engine = config.engine if config is not None else "x86"
        inputs = ctx.config.example_inputs
        manifest = {
            "format": 1,
            "engine": engine,
            "specialised_for": [list(t.shape) for t in inputs if isinstance(t, torch.Tensor)],
            "input_dtypes": [
                str(t.dtype).removeprefix("torch.") for t in inputs if isinstance(t, torch.Tensor)
            ],
            "torch": torch.__version__,
        }
        expected = expected_outputs(gm, ctx.state.reference_outputs, inputs)
        scripted = script(gm, inputs, engine)
        buffer = io.BytesIO()
        with deprecated_apis():
            torch.jit.save(scripted, buffer, _extra_files={"fxcomp.json": json.dumps(manifest)})

        def verify(tmp: Path) -> dict[str, float]:
            with torch.no_grad():
                outputs = self.load(tmp)(*inputs)
            return checked_parity(
                outputs,
                expected=expected,
                float_outputs=ctx.state.float_outputs,
                quantized=ctx.state.reference_outputs is not None,
                what="TorchScript",
            )

        path = out_dir / FILENAME
        figures = write_atomic(path, buffer.getvalue(), check=verify)
        return Artifact(self.name, path, manifest, figures)

    def load(
        self, artifact: Artifact | Path | str, input_shapes: Sequence[Sequence[int]] | None = None
    ) -> Any:
        """Load an artifact (or the ``.pt`` path) written by ``emit`` under the engine its
        weights were packed for, and make its first call on its input shapes (or on
        ``input_shapes``: another batch size).

        Example::

            model = TorchScriptBackend().load("out/model.pt", input_shapes=[[8, 3, 224, 224]])
        """
        path = artifact_path(artifact)
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
        dtypes = [*manifest.get("input_dtypes", ()), *["float32"] * len(shapes)][: len(shapes)]
        with torch.no_grad():
            if shapes:  # zeros: valid token ids and masks too
                pairs = zip(shapes, dtypes, strict=True)
                module(*(torch.zeros(s, dtype=getattr(torch, d)) for s, d in pairs))
        return module


def _manifest(path: Path) -> dict[str, Any]:
    """The ``fxcomp.json`` extra file of a saved TorchScript archive ({} if it has none)."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/extra/fxcomp.json")]
        return json.loads(archive.read(names[0]) or "{}") if names else {}
