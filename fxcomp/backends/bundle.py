"""The bundle: one zip file an app ships, with everything needed to feed and check it.

``model.fxbundle`` holds the program (``model.ptl`` for the PyTorch lite interpreter, from
the ``mobile`` backend; ``model.pte`` for ExecuTorch, from the ``executorch`` backend;
``model.xml`` and ``model.bin``, an OpenVINO IR, from the ``openvino`` backend),
``manifest.json`` (the runtime, inputs with their dynamic axes, outputs, preprocessing,
labels, engine, per-layer quantization, versions, the sha256 of every other member) and
``samples.safetensors`` (sample inputs and the outputs they must give, no pickle).
``load_bundle`` refuses a file that is not a zip, lacks a member, fails a checksum or comes
from a newer format, loads the program with the runtime the manifest names, and returns a
runnable ``Bundle`` whose ``verify`` re-runs the samples.

Example::

    bundle = load_bundle("out/model.fxbundle")
    logits = bundle(torch.randn(1, 3, 224, 224))
    errors = bundle.verify()        # raises VerificationError beyond the stated tolerance
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch.utils._pytree import tree_leaves

from fxcomp.ir.errors import BackendError, VerificationError

__all__ = [
    "EXECUTORCH",
    "FORMAT",
    "LITE",
    "MANIFEST",
    "OPENVINO",
    "PROGRAMS",
    "SAMPLES",
    "Bundle",
    "bundle_bytes",
    "load_bundle",
    "output_leaves",
]

log = logging.getLogger(__name__)

FORMAT = 1
LITE, EXECUTORCH, OPENVINO = "lite-interpreter", "executorch", "openvino"
# the program's members, by runtime
PROGRAMS = {LITE: ("model.ptl",), EXECUTORCH: ("model.pte",), OPENVINO: ("model.xml", "model.bin")}
# where each runtime's ``open_program(members, manifest, path)`` lives (imported when used)
_OPENERS = {
    LITE: "fxcomp.backends.mobile.lite",
    EXECUTORCH: "fxcomp.backends.executorch.program",
    OPENVINO: "fxcomp.backends.openvino.runtime",
}
MANIFEST = "manifest.json"
SAMPLES = "samples.safetensors"


def output_leaves(outputs: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or any nesting of tuples, lists, dicts),
    in order: what a bundle stores as its sample outputs."""
    return [t.detach() for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_bytes(
    program: Mapping[str, bytes],
    manifest: Mapping[str, Any],
    samples: Mapping[str, torch.Tensor],
) -> bytes:
    """The bundle file's bytes: the ``program``'s members (those ``PROGRAMS`` lists for the
    runtime ``manifest["runtime"]`` names), ``manifest`` (the format and the checksums and
    sizes of the other members are filled in here) and the ``samples`` tensors.

    Example::

        data = bundle_bytes({"model.ptl": ptl}, {"runtime": LITE, "inputs": [...]},
                            {"input": x, "output": y})
    """
    if sorted(program) != sorted(PROGRAMS[manifest["runtime"]]):
        raise ValueError(f"a {manifest['runtime']} program is {PROGRAMS[manifest['runtime']]}")
    members = {**program, SAMPLES: save_tensors({n: t.contiguous() for n, t in samples.items()})}
    manifest = dict(manifest)
    manifest["format"] = FORMAT
    manifest["members"] = {
        name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in members.items()
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(MANIFEST, json.dumps(manifest, indent=2))
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


@dataclass
class Bundle:
    """A loaded bundle: its program, loaded by its runtime, its manifest and its samples."""

    module: Any  # the loaded program, called with tensors
    manifest: dict[str, Any]
    sample_inputs: tuple[torch.Tensor, ...]
    sample_outputs: tuple[torch.Tensor, ...]

    @property
    def thread_pool(self) -> str:
        """The thread pool its runtime's work runs on (``fxcomp.runtime.latency``)."""
        return getattr(self.module, "thread_pool", "torch")

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Run the model on ``inputs``, without autograd."""
        with torch.no_grad():
            return self.module(*inputs)

    def verify(self) -> list[float]:
        """Re-run the bundled samples; the largest absolute error of each output.

        Raises ``VerificationError`` when one exceeds the manifest's tolerance.

        Example::

            load_bundle("out/model.fxbundle").verify()   # [0.0]
        """
        leaves = output_leaves(self(*self.sample_inputs))
        if len(leaves) != len(self.sample_outputs):
            raise VerificationError(
                f"the model gives {len(leaves)} outputs, the bundle's samples "
                f"{len(self.sample_outputs)}"
            )
        tolerance = self.manifest["samples"]["atol"]
        errors = [
            (a.float() - b).abs().max().item()
            for a, b in zip(leaves, self.sample_outputs, strict=True)
        ]
        for name, error in zip(self.manifest["samples"]["outputs"], errors, strict=True):
            if not error <= tolerance:
                raise VerificationError(
                    f"bundled sample output '{name}' is off by {error:.3g} "
                    f"(tolerance {tolerance:.3g}: {self.manifest['samples']['atol_is']})",
                    hint="the runtime computes differently from the one the bundle was made on",
                )
        return errors


def _member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        raise BackendError(
            f"{path} has no '{name}' member: it is not a complete fxcomp bundle",
            hint="write the bundle again with fxcomp compile --backend mobile",
        ) from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:
        raise BackendError(f"{path}: member '{name}' is damaged ({err})") from err


def _manifest(archive: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(_member(archive, MANIFEST, path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BackendError(f"{path}: {MANIFEST} is not valid JSON ({err})") from err
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise BackendError(f"{path}: {MANIFEST} names no format version")
    if version > FORMAT:
        raise BackendError(
            f"{path} is bundle format {version}; this fxcomp reads formats up to {FORMAT}",
            hint="upgrade fxcomp to open it",
        )
    return manifest


def _checked(archive: zipfile.ZipFile, manifest: dict[str, Any], name: str, path: Path) -> bytes:
    data = _member(archive, name, path)
    expected = manifest.get("members", {}).get(name, {}).get("sha256")
    if expected != _sha256(data):
        raise BackendError(
            f"{path}: the sha256 of '{name}' does not match the manifest's: the file was "
            "changed after it was written",
            hint="use the bundle as fxcomp wrote it, or write it again",
        )
    return data


def _runtime(manifest: dict[str, Any], path: Path) -> str:
    runtime = manifest.get("runtime", LITE)  # bundles from before ExecuTorch name none
    if runtime not in PROGRAMS:
        raise BackendError(
            f"{path} is for the runtime {runtime!r}; this fxcomp runs {', '.join(PROGRAMS)}",
            hint="upgrade fxcomp to open it",
        )
    return runtime


def _open(runtime: str, program: dict[str, bytes], manifest: dict[str, Any], path: Path) -> Any:
    made_with = manifest.get("versions", {}).get("torch")
    if made_with != torch.__version__:
        log.warning("%s was made with torch %s, this is %s", path, made_with, torch.__version__)
    return importlib.import_module(_OPENERS[runtime]).open_program(program, manifest, path)


def load_bundle(path: str | Path) -> Bundle:
    """Open a bundle written by the ``mobile``, ``executorch`` or ``openvino`` backend: check
    its format version and checksums, load its program with its runtime, read its samples.

    Example::

        bundle = load_bundle("out/model.fxbundle")
        bundle.manifest["inputs"][0]["shape"]
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise BackendError(f"no bundle at {path}") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise BackendError(f"{path} is not a readable bundle (a zip file): {err}") from err
    with archive:
        manifest = _manifest(archive, path)
        runtime = _runtime(manifest, path)
        program = {name: _checked(archive, manifest, name, path) for name in PROGRAMS[runtime]}
        samples = _checked(archive, manifest, SAMPLES, path)
    try:
        tensors = load_tensors(samples)
    except SafetensorError as err:
        raise BackendError(f"{path}: {SAMPLES} is not a safetensors file ({err})") from err
    described = manifest.get("samples", {})
    try:
        inputs = tuple(tensors[name] for name in described["inputs"])
        outputs = tuple(tensors[name] for name in described["outputs"])
    except KeyError as err:
        raise BackendError(f"{path}: the manifest names a sample {err} the file lacks") from None
    return Bundle(_open(runtime, program, manifest, path), manifest, inputs, outputs)
