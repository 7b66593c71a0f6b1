"""OpenVINO's runtime: an IR (``model.xml`` + ``model.bin``) compiled for the CPU with explicit
settings, run on torch tensors, and what its execution graph says about precision.

``Settings`` are what a deployment must not leave to chance: the inference precision of the
float parts (``f32``, or ``bf16`` where the CPU has it; OpenVINO's own default on AMX CPUs is
bf16), the performance hint (latency or throughput), and the number of streams and threads.
``OpenVinoModel`` compiles an IR with them; ``layer_precisions`` reads the compiled model's
execution graph: the precision each convolution and fully-connected layer runs in. OpenVINO
is an optional extra: without it ``require_openvino`` raises ``BackendError`` saying how to
install it.

Example::

    model = OpenVinoModel(xml, weights, Settings(precision="f32", threads=2))
    logits = model(torch.randn(1, 3, 224, 224))
    layer_precisions(model.compiled)   # {'/conv1/Conv/WithoutBiases': 'u8', ...}
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fxcomp.ir.errors import BackendError, InputError

__all__ = [
    "PRECISIONS",
    "OpenVinoModel",
    "Settings",
    "is_int8",
    "layer_precisions",
    "open_program",
    "require_openvino",
]

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")
HINTS = ("latency", "throughput")
# the execution-graph layer types that carry a model's weights (its work)
_WEIGHTED = ("Convolution", "Deconvolution", "FullyConnected", "MatMul")
_INT8 = ("u8", "i8")


def require_openvino() -> Any:
    """The ``openvino`` module, or ``BackendError`` saying how to get it."""
    try:
        import openvino
    except ImportError as err:
        raise BackendError(
            f"the openvino backend needs OpenVINO, which is not installed ({err})",
            hint="pip install 'fxcomp[openvino]'",
        ) from err
    return openvino


@dataclass(frozen=True)
class Settings:
    """How OpenVINO's CPU plugin compiles a model: the float parts' precision, the
    performance hint, and streams and threads (None: the plugin's choice for the hint)."""

    precision: str = "f32"
    hint: str = "latency"
    streams: int | None = None
    threads: int | None = None

    def check(self) -> None:
        """Raise ``InputError`` for settings the CPU plugin cannot honour here."""
        if self.precision not in PRECISIONS:
            raise InputError(
                f"inference precision must be one of {', '.join(PRECISIONS)}, "
                f"got {self.precision!r}",
                hint="f32 computes the float parts as PyTorch does; bf16 is faster on AMX CPUs",
            )
        if self.hint not in HINTS:
            raise InputError(f"the performance hint must be one of {', '.join(HINTS)}")
        for name in ("streams", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer or None, got {value!r}")
        if self.precision == "bf16" and "BF16" not in _capabilities():
            raise InputError(
                "this CPU has no bf16 support OpenVINO can use (no AVX-512 BF16 or AMX)",
                hint="use precision='f32'",
            )

    def config(self) -> dict[str, Any]:
        """The CPU plugin's properties for these settings."""
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.precision,
            "PERFORMANCE_HINT": self.hint.upper(),
        }
        if self.streams is not None:
            config["NUM_STREAMS"] = self.streams
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _capabilities() -> list[str]:
    return list(require_openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


class OpenVinoModel:
    """An OpenVINO IR compiled for the CPU, called with torch tensors; one output comes back
    as a tensor, several as a tuple. ``thread_pool`` names the pool its work runs on: timing
    keeps it apart from PyTorch's (``fxcomp.runtime.latency``)."""

    thread_pool = "openvino"

    def __init__(self, xml: bytes, weights: bytes, settings: Settings) -> None:
        ov = require_openvino()
        core = ov.Core()
        tensor = ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy())
        self.settings = settings
        self.compiled = core.compile_model(core.read_model(xml, tensor), "CPU", settings.config())
        self._request = self.compiled.create_infer_request()

    def __call__(self, *inputs: torch.Tensor) -> Any:
        arrays = [x.detach().contiguous().numpy() for x in inputs]
        results = self._request.infer(arrays, share_inputs=False)
        outputs = tuple(torch.from_numpy(np.array(results[o])) for o in self.compiled.outputs)
        return outputs[0] if len(outputs) == 1 else outputs


def layer_precisions(compiled: Any) -> dict[str, str]:
    """Each convolution and fully-connected layer of a compiled model's execution graph, by
    the names of the original layers it runs, and the precision it runs in (``u8``/``i8``:
    INT8; ``f32``, ``bf16``: float)."""
    found = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) in _WEIGHTED:
            found[info["originalLayersNames"].astype(str)] = info["runtimePrecision"].astype(str)
    return found


def is_int8(precision: str) -> bool:
    """Whether an execution-graph precision is an INT8 kernel's."""
    return precision in _INT8


def open_program(members: Mapping[str, bytes], manifest: dict[str, Any], path: Path) -> Any:
    """A bundle's IR compiled by OpenVINO with the settings its manifest records;
    ``BackendError`` when OpenVINO refuses it."""
    require_openvino()
    settings = Settings(**manifest.get("openvino", {}).get("settings", {}))
    try:
        return OpenVinoModel(members["model.xml"], members["model.bin"], settings)
    except Exception as err:
        made_with = manifest.get("versions", {}).get("openvino")
        raise BackendError(
            f"OpenVINO cannot load {path}'s model (made with OpenVINO {made_with}): {err}",
            hint="write the bundle again with fxcomp compile --backend openvino",
        ) from err
