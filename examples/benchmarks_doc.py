"""What every benchmark script does with its tables: print them, and on request write the
numbers as JSON (``--json PATH``) and the tables into ``docs/benchmarks.md``
(``--write-docs``).

A bench script run with ``--write-docs`` replaces the text between ``<!-- NAME -->`` and
``<!-- /NAME -->`` (NAME is the script's name) with the command it ran, the CPU it ran on
(model and the int8 instructions that decide which quantized kernels run), the date and the
torch version, then its tables. The prose around the sections is left as it is. The file is
written atomically.

Example::

    add_output_options(parser)
    ...
    output("bench_fuse", args, [(rows, headers)], results)
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from fxcomp.ir.atomic import write_atomic
from fxcomp.runtime.latency import describe_cpu

__all__ = ["add_output_options", "output", "publish", "table"]

Table = tuple[list[list[object]], list[str]]

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def table(records: Sequence[dict[str, object]]) -> Table:
    """Rows given as dicts (column -> value, the same columns each) as (rows, headers)."""
    return [list(r.values()) for r in records], list(records[0]) if records else []


def add_output_options(parser: argparse.ArgumentParser) -> None:
    """``--json PATH`` and ``--write-docs``."""
    parser.add_argument("--json", help="also write the numbers to this path")
    parser.add_argument(
        "--write-docs", action="store_true", help="also put the tables in docs/benchmarks.md"
    )


def output(name: str, args: argparse.Namespace, tables: Sequence[Table], results: Any) -> None:
    """Print ``tables`` (text left, numbers right), then write ``results`` as JSON and the
    tables into the docs if ``args`` asks for it."""
    for rows, headers in tables:
        first = rows[0] if rows else []
        lead = next((i for i, cell in enumerate(first) if _numeric(cell)), len(first))
        align = ("left",) * max(1, lead) + ("right",) * (len(headers) - max(1, lead))
        print()
        print(tabulate(rows, headers=headers, disable_numparse=True, colalign=align))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.write_docs:
        publish(name, tables)


def _numeric(cell: object) -> bool:
    text = str(cell).rstrip("x%")
    try:
        float(text.split(" ")[0].replace(",", ""))
    except ValueError:
        return False
    return True


def publish(name: str, tables: Sequence[Table]) -> None:
    """Replace section ``name`` of ``docs/benchmarks.md`` with ``tables`` (rows, headers),
    headed by the command, the CPU, the date and the torch version."""
    text = DOC.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} has no section {start} ... {end}")
    script = Path(sys.argv[0]).resolve().relative_to(DOC.parents[1])  # from the repository
    command = " ".join(["python", str(script), *(a for a in sys.argv[1:] if a != "--write-docs")])
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
