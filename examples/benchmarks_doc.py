"""Writes a benchmark's tables into ``docs/benchmarks.md``, each script in its own section.

A bench script run with ``--write-docs`` replaces the text between ``<!-- NAME -->`` and
``<!-- /NAME -->`` (NAME is the script's name) with the command it ran, the CPU it ran on
(model and the int8 instructions that decide which quantized kernels run), the date and the
torch version, then its tables. The prose around the sections is left as it is. The file is
written atomically.

Example::

    publish("bench_fuse", [(rows, headers)])
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tabulate import tabulate

from fxcomp.ir.atomic import write_atomic
from fxcomp.runtime.latency import describe_cpu

__all__ = ["publish"]

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def publish(name: str, tables: Sequence[tuple[list[list[object]], list[str]]]) -> None:
    """Replace section ``name`` of ``docs/benchmarks.md`` with ``tables`` (rows, headers),
    headed by the command, the CPU, the date and the torch version."""
    text = DOC.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} has no section {start} ... {end}")
    command = " ".join(["python", *(a for a in sys.argv if a != "--write-docs")])
    today = datetime.date.today().isoformat()
    lines = [
        f"`{command}` on {describe_cpu()}, {today}, torch {torch.__version__}:",
        "",
        *(tabulate(rows, headers=headers, tablefmt="github") + "\n" for rows, headers in tables),
    ]
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    write_atomic(DOC, f"{before}{start}\n" + "\n".join(lines).rstrip() + f"\n{end}{after}")
    print(f"\nwrote the tables into {DOC} ({start})")
