"""What the CLI's commands share: common options, and built-in passes made from flags.

A pass flag (``--ratio``, ``--engine``, ...) goes to every chosen pass whose constructor
takes a keyword of that name, and only when it was given: a pass left alone keeps its own
defaults. A flag no chosen pass takes is an error, so nothing given is silently dropped.
The command's own values (the calibration data) go to the passes that take them.

Example::

    passes = passes_from_flags("fuse,prune", {"ratio": 0.3})
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import click

from fxcomp.ir.capture import CAPTURES
from fxcomp.ir.errors import InputError
from fxcomp.quant.observers import OBSERVERS
from fxcomp.quant.scheme import ENGINES

__all__ = [
    "capture_options",
    "engine_option",
    "given_flags",
    "observer_option",
    "passes_from_flags",
]

observer_option = click.option(
    "--observer", type=click.Choice(list(OBSERVERS)), default="mse", show_default=True
)


def capture_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--capture`` (``auto``: symbolic tracing, or ``torch.export`` where it fails) and
    ``--leaf`` (a submodule symbolic tracing keeps opaque), as ``capture`` and ``leaves``."""
    command = click.option(
        "--leaf", "leaves", multiple=True, help="Submodule to keep opaque when tracing."
    )(command)
    return click.option(
        "--capture",
        type=click.Choice(CAPTURES),
        default="auto",
        show_default=True,
        help="How the model becomes a graph: symbolic tracing, torch.export, or the first "
        "that works.",
    )(command)


def engine_option(*, kernels_only: bool = False) -> Callable[[Any], Any]:
    """``--engine``: every engine, or those fxcomp lowers to kernels itself."""
    names = [n for n, e in ENGINES.items() if e.kernels or not kernels_only]
    return click.option("--engine", type=click.Choice(names), default="x86", show_default=True)


def given_flags(ctx: click.Context, names: tuple[str, ...]) -> dict[str, Any]:
    """The flags among ``names`` that the command line set (not left at their default)."""
    return {
        name: ctx.params[name]
        for name in names
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }


def passes_from_flags(
    names: str, flags: Mapping[str, Any], values: Mapping[str, Any] | None = None
) -> list[Any]:
    """The built-in passes named in ``names`` (comma-separated), each given the ``flags``
    and ``values`` its constructor takes (module docstring).

    Example::

        passes_from_flags("fuse,quantize", {"engine": "qnnpack"}, {"calibration_data": data})
    """
    values = dict(values or {})
    from fxcomp.passes import BUILTIN

    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BUILTIN]
    if unknown:
        raise InputError(
            f"unknown pass '{unknown[0]}'", hint=f"built-in passes: {', '.join(BUILTIN)}"
        )
    if "quantize" in chosen and "calibration_data" not in values:
        raise InputError("quantize needs calibration data", hint="use fxcomp compile --calib ...")
    takes = {n: inspect.signature(BUILTIN[n]).parameters for n in chosen}
    unused = [f for f in flags if not any(f in keywords for keywords in takes.values())]
    if unused:
        flag = "--" + unused[0].replace("_", "-")
        users = [n for n in BUILTIN if unused[0] in inspect.signature(BUILTIN[n]).parameters]
        raise InputError(
            f"{flag} applies to {' / '.join(users) or 'no pass'}, which --passes does not run",
            hint=f"add one of them to --passes, or drop {flag}",
        )
    given = {**values, **flags}
    return [BUILTIN[n](**{k: v for k, v in given.items() if k in takes[n]}) for n in chosen]
