"""The one error hierarchy of fxcomp.

Every error carries a message and, where there is one, a ``hint`` that says what to do.

Example::

    try:
        fxcomp.compile(model, x)
    except fxcomp.FxcompError as err:
        message = str(err)  # the message, then "hint: ..." on its own line
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.fx import Node

__all__ = [
    "BackendError",
    "FxcompError",
    "InputError",
    "PassError",
    "PassOrderError",
    "TraceError",
    "UnsupportedGraphError",
    "VerificationError",
    "did_you_mean",
]


def did_you_mean(name: str, known: Iterable[str], otherwise: str) -> str:
    """The hint for an unknown ``name``: the closest of ``known``, else ``otherwise``."""
    close = difflib.get_close_matches(name, sorted(known), n=3)
    return f"did you mean {', '.join(close)}?" if close else otherwise


class FxcompError(Exception):
    """Base of every error fxcomp raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message}\nhint: {self.hint}"


class InputError(FxcompError):
    """A user-supplied value (model spec, shape, option) is not usable."""


class TraceError(FxcompError):
    """The model could not be traced or run on its example inputs."""


class PassError(FxcompError):
    """A pass failed, or left a graph that does not hold together."""

    def __init__(
        self,
        message: str,
        *,
        pass_name: str,
        previous: tuple[str, ...] = (),
        node: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.pass_name = pass_name
        self.previous = previous
        self.node = node


class PassOrderError(PassError):
    """A pipeline's passes violate a declared ordering constraint."""


class UnsupportedGraphError(FxcompError):
    """A pass met a node it cannot handle."""

    def __init__(self, node: Node, reason: str, *, hint: str | None = None) -> None:
        from fxcomp.ir.graph import source_of

        where = source_of(node)
        location = f" ({where})" if where else ""
        super().__init__(f"node '{node.name}'{location}: {reason}", hint=hint)
        self.node = node
        self.reason = reason


class BackendError(FxcompError):
    """A backend could not emit or load an artifact."""


class VerificationError(FxcompError):
    """An emitted artifact does not match its reference within tolerance."""
