"""Writing files so that a reader never sees half of one, or one that failed its check.

Example::

    write_atomic(Path("out/report.json"), json.dumps(data))
    figures = write_atomic(Path("out/model.pt"), data, check=lambda tmp: verify(load(tmp)))
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fxcomp.ir.errors import BackendError

__all__ = ["write_atomic"]

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(
    path: Path, data: str | bytes, check: Callable[[Path], T] | None = None
) -> T | None:
    """Write ``data`` to a temporary file beside ``path``, run ``check`` on that file (an
    artifact is loaded back and verified there), and only then rename it into place.

    Returns what ``check`` returned. A directory that cannot be written is a
    ``BackendError``; whatever ``check`` raises propagates, and no file is left.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise BackendError(
            f"cannot write to {path.parent}: {err.strerror or err}",
            hint="choose an output directory you can write to",
        ) from err
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        result = check(tmp) if check is not None else None
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result
