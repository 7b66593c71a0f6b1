"""The one quantization config of a graph: the target engine and how ranges are chosen.

``QuantConfig`` is built once, by the pass that quantizes (``quantize``, ``qat``,
``quantize_dynamic``), validated there, and stored once on the graph (``QUANT_CONFIG``)
by the first step that changes it; every later step (calibrate, freeze, lower) and every
backend reads it from the graph. ``declared_config`` finds it among a pipeline's passes
before any of them runs, so that ``compile`` and the CLI can ask the backend whether it
takes the graph.

Example::

    config = QuantConfig(engine="tensorrt", observer="histogram", skip=("fc",))
    activation, weight = config.schemes()
    config.target.backends        # ("onnx",)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fxcomp.ir.errors import InputError
from fxcomp.ir.meta import GraphSlot
from fxcomp.quant.observers import OBSERVERS
from fxcomp.quant.ops import SkipSpec
from fxcomp.quant.scheme import ENGINES, Engine, QScheme, scheme_for

__all__ = [
    "FLOAT_LAYERS",
    "QUANT_CONFIG",
    "QuantConfig",
    "declared_calibration_data",
    "declared_config",
    "nested_passes",
]


@dataclass(frozen=True)
class QuantConfig:
    """The quantization target of one graph.

    ``engine`` names the kernels (``ENGINES``: x86, fbgemm, qnnpack, tensorrt, ort);
    ``observer`` how activation ranges are chosen (``OBSERVERS``); ``per_channel`` whether
    weights get a grid per output channel; ``reduce_range`` overrides the engine's 7-bit
    scale (``scheme_for``); ``skip`` keeps layers in float by qualified module name, module
    type, op name ("add", "cat": every such op) or graph node name ("add_3": that one).

    Example::

        QuantConfig("qnnpack", per_channel=False)
    """

    engine: str = "x86"
    observer: str = "mse"
    per_channel: bool = True
    reduce_range: bool | None = None
    skip: tuple[SkipSpec, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(
                f"unknown quantization engine '{self.engine}'",
                hint=f"choose one of {', '.join(ENGINES)}",
            )
        if self.observer not in OBSERVERS:
            raise InputError(
                f"unknown observer '{self.observer}'", hint=f"choose one of {', '.join(OBSERVERS)}"
            )
        if isinstance(self.skip, str) or not isinstance(self.skip, Iterable):
            raise InputError(
                f"skip takes a list of names or module types, got {self.skip!r}",
                hint="write skip=['fc'], not skip='fc'",
            )
        object.__setattr__(self, "skip", tuple(self.skip))

    @property
    def target(self) -> Engine:
        """The engine: its schemes, whether fxcomp lowers to its kernels, which backends."""
        return ENGINES[self.engine]

    def schemes(self) -> tuple[QScheme, QScheme]:
        """(activation scheme, weight scheme) for this config."""
        return scheme_for(self.engine, per_channel=self.per_channel, reduce_range=self.reduce_range)


QUANT_CONFIG: GraphSlot[QuantConfig] = GraphSlot(
    "fxcomp:quant_config",
    QuantConfig,
    "the quantization config the graph's observers, Q/DQ steps and kernels follow",
)
FLOAT_LAYERS: GraphSlot[tuple] = GraphSlot(
    "fxcomp:float_layers",
    tuple,
    "layers mixed precision keeps in float; insert_observers skips them as skip names",
)


def declared_config(passes: Iterable[Any]) -> QuantConfig | None:
    """The one ``QuantConfig`` that ``passes`` (``Pass``/``Pipeline`` objects, nested) declare
    in their options, or None; two different configs are an error.

    Example::

        declared_config([fuse(), quantize(data, engine="qnnpack")]).engine   # "qnnpack"
    """
    found: dict[QuantConfig, str] = {}
    for p in nested_passes(passes):
        config = getattr(getattr(p, "options", None), "config", None)
        if isinstance(config, QuantConfig):
            found.setdefault(config, getattr(p, "name", "?"))
    if len(found) > 1:
        (a, first), (b, second) = list(found.items())[:2]
        raise InputError(
            f"one graph, one quantization config: '{first}' quantizes for {a.engine} "
            f"({a}) and '{second}' for {b.engine} ({b})",
            hint="give every quantizing pass the same engine and options",
        )
    return next(iter(found), None)


def declared_calibration_data(passes: Iterable[Any]) -> Iterable[Any] | None:
    """The calibration batches the first quantizing pass among ``passes`` (nested) carries,
    or None.

    Example::

        declared_calibration_data([fuse(), quantize(batches)]) is batches   # True
    """
    for p in nested_passes(passes):
        options = getattr(p, "options", None)
        data = getattr(options, "calibration_data", None)
        if isinstance(getattr(options, "config", None), QuantConfig) and data is not None:
            return data
    return None


def nested_passes(passes: Iterable[Any]) -> list[Any]:
    """``passes`` and the passes inside each ``Pipeline``, in order.

    Example::

        [p.name for p in nested_passes([Pipeline("cleanup", [cse(), dce()])])]
    """
    found = []
    for p in passes:
        found.append(p)
        found.extend(nested_passes(getattr(p, "children", ())))
    return found
