"""``fxcomp dump`` (a model's graph after some passes) and ``fxcomp passes`` (the list).

Example::

    fxcomp dump torchvision:resnet18 --passes fuse --format table --explain
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

from fxcomp.api.compile import compile
from fxcomp.cli.model_spec import load_model, parse_shape, zoo_inputs
from fxcomp.cli.options import capture_options, passes_from_flags
from fxcomp.ir.errors import InputError
from fxcomp.reporting.dump import FORMATS, DumpAfterEach, render_graph, render_groups

__all__ = ["dump", "list_passes"]


@click.command()
@click.argument("model")
@click.option(
    "--input-shape",
    "input_shapes",
    multiple=True,
    default=("1,3,224,224",),
    show_default=True,
    help="Shape of a random example input; repeat for several inputs.",
)
@click.option("--passes", "pass_names", default="", help="Comma-separated built-in passes.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "--after-each",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the graph after every pass to numbered files in this folder.",
)
@click.option("--explain", is_flag=True, help="Show why rewrite rules did not apply.")
@click.option("--groups", is_flag=True, help="List the channel groups pruning works on.")
@capture_options
@click.pass_context
def dump(
    ctx: click.Context,
    model: str,
    input_shapes: tuple[str, ...],
    pass_names: str,
    fmt: str,
    after_each: Path | None,
    explain: bool,
    groups: bool,
    capture: str,
    leaves: tuple[str, ...],
) -> None:
    """Trace MODEL, run --passes, and print its graph.

    MODEL is torchvision:NAME or timm:NAME (random weights), transformers:NAME (a small
    Hugging Face model with its own example inputs), package.module:attr or
    path/to/file.py:attr.
    """
    passes = passes_from_flags(pass_names, {})
    torch.manual_seed(0)
    inputs: Any = zoo_inputs(model)
    if inputs is None:
        inputs = tuple(torch.randn(parse_shape(s)) for s in input_shapes)
    elif ctx.get_parameter_source("input_shapes") is not click.core.ParameterSource.DEFAULT:
        raise InputError(
            f"{model} comes with its own example inputs (token ids, pixels or features)",
            hint="drop --input-shape",
        )
    hooks = [DumpAfterEach(after_each, fmt)] if after_each else []
    network = load_model(model)
    result = compile(
        network, inputs, passes, capture=capture, leaf_modules=leaves, after_pass=hooks
    )
    notes = result.report.notes if explain else ()
    click.echo(
        render_groups(result.module) if groups else render_graph(result.module, fmt, notes=notes)
    )
    if passes:
        click.echo(f"\n{result.report}", err=True)


@click.command(name="passes")
def list_passes() -> None:
    """List the built-in passes."""
    from fxcomp.passes import BUILTIN

    width = max(map(len, BUILTIN))
    for name, constructor in BUILTIN.items():
        summary = (constructor.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:<{width}}  {summary}")
