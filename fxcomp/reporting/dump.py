"""Rendering a graph as a table, Python code, Graphviz DOT or JSON.

Example::

    text = render_graph(gm, "table")
    compile(model, x, passes=[fuse()], after_pass=[DumpAfterEach(Path("dumps"), "code")])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pydot
from tabulate import tabulate
from torch.fx import GraphModule, Node

from fxcomp.ir.atomic import write_atomic
from fxcomp.ir.graph import source_of, target_name
from fxcomp.ir.meta import MADE_BY
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.report import Note, PassRecord
from fxcomp.pruning.graph import ChannelGraph

__all__ = ["FORMATS", "DumpAfterEach", "render_graph", "render_groups"]

FORMATS = ("table", "code", "dot", "json")
_SUFFIX = {"table": "txt", "code": "py", "dot": "dot", "json": "json"}
_COLOURS = {
    "placeholder": "lightblue",
    "output": "lightblue",
    "call_module": "lightyellow",
    "call_function": "white",
    "call_method": "white",
    "get_attr": "lightgrey",
}


def _shape_dtype(node: Node) -> tuple[str, str]:
    meta: Any = node.meta.get("tensor_meta")
    if meta is None:
        return "", ""
    if hasattr(meta, "shape"):
        return "x".join(str(d) for d in meta.shape) or "scalar", str(meta.dtype).replace(
            "torch.", ""
        )
    items = [m for m in meta if hasattr(m, "shape")] if isinstance(meta, (tuple, list)) else []
    shapes = ", ".join("x".join(str(d) for d in m.shape) for m in items)
    dtypes = ", ".join(sorted({str(m.dtype).replace("torch.", "") for m in items}))
    return f"({shapes})", dtypes


def _rows(gm: GraphModule) -> list[dict[str, Any]]:
    rows = []
    for node in gm.graph.nodes:
        shape, dtype = _shape_dtype(node)
        rows.append(
            {
                "name": node.name,
                "op": node.op,
                "target": target_name(gm, node),
                "inputs": [n.name for n in node.all_input_nodes],
                "shape": shape,
                "dtype": dtype,
                "pass": node.meta.get(MADE_BY, ""),
                "source": source_of(node),
            }
        )
    return rows


def _dot(gm: GraphModule) -> str:
    graph = pydot.Dot(graph_type="digraph", rankdir="TB")
    for row in _rows(gm):
        label = "\n".join(x for x in (row["name"], row["target"], row["shape"]) if x)
        graph.add_node(
            pydot.Node(
                row["name"],
                label=label,
                shape="box",
                style="filled",
                fillcolor=_COLOURS.get(row["op"], "white"),
            )
        )
        for source in row["inputs"]:
            graph.add_edge(pydot.Edge(source, row["name"]))
    return graph.to_string()


def render_graph(gm: GraphModule, fmt: str = "table", *, notes: Sequence[Note] = ()) -> str:
    """The graph of ``gm`` in ``fmt`` (one of ``FORMATS``), with ``notes`` where they fit.

    Example::

        text = render_graph(result.module, "table", notes=result.report.notes)
    """
    if fmt == "code":
        return gm.code
    if fmt == "dot":
        return _dot(gm)
    if fmt == "json":
        return json.dumps(
            {
                "graph": type(gm).__name__,
                "nodes": _rows(gm),
                "notes": [asdict(note) for note in notes],
            },
            indent=2,
        )
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    columns = ["name", "op", "target", "inputs", "shape", "dtype", "pass"]
    body = [[", ".join(r[c]) if c == "inputs" else r[c] for c in columns] for r in _rows(gm)]
    text = tabulate(body, headers=columns, disable_numparse=True)
    if notes:
        text += "\n\nWhy rules did not apply:\n" + "\n".join(f"  {note}" for note in notes)
    return text


class DumpAfterEach:
    """An ``after_pass`` hook writing the graph after every pass to ``NN_<pass>.<ext>`` files.

    Example::

        fxcomp.compile(model, x, passes=[fuse()], after_pass=[DumpAfterEach(Path("d"), "table")])
    """

    def __init__(self, directory: Path, fmt: str = "table") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.directory = directory
        self.fmt = fmt
        self.count = 0

    def __call__(self, record: PassRecord, gm: GraphModule, ctx: CompileContext) -> None:
        name = f"{self.count:02d}_{record.path.replace('/', '.')}.{_SUFFIX[self.fmt]}"
        notes = [n for n in ctx.state.report.notes if n.pass_name == record.path]
        write_atomic(self.directory / name, render_graph(gm, self.fmt, notes=notes))
        self.count += 1


def render_groups(gm: GraphModule) -> str:
    """The channel groups of ``gm`` as a table: members, channel sets, what blocks pruning.

    Example::

        text = render_groups(fxcomp.trace(model, x))
    """
    rows = []
    for index, group in enumerate(ChannelGraph.build(gm).groups()):
        members = ", ".join(group.values[:4]) + (
            f" (+{len(group.values) - 4})" if len(group.values) > 4 else ""
        )
        status = "prunable" if group.prunable else (group.blocked_by or ["one channel"])[0]
        rows.append([index, members, group.sets, status])
    return tabulate(rows, headers=["group", "values", "channels", "pruning"], disable_numparse=True)
