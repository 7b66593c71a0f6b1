"""The ``fxcomp`` command line: a thin layer over the library, one module per command.

Example::

    fxcomp dump torchvision:resnet18 --passes fuse --format table
    fxcomp compile torchvision:resnet18 --passes fuse,quantize --calib photos -o out
    fxcomp check out/model.onnx --target tensorrt
    fxcomp inspect out/model.fxbundle
    fxcomp passes
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any

import click

from fxcomp.cli.analyze import analyze_command
from fxcomp.cli.compile import compile_command
from fxcomp.cli.demo import demo
from fxcomp.cli.dump import dump, list_passes
from fxcomp.cli.inspect import check_command, inspect_command
from fxcomp.ir.errors import FxcompError

__all__ = ["main"]


class _Group(click.Group):
    """Turns fxcomp errors into one line and a hint (exit 2); --debug shows the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv[1:]
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except FxcompError as err:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {err.message}", err=True)
            if err.hint:
                click.echo(f"hint: {err.hint}", err=True)
            ctx.exit(2)
        except Exception as err:
            if debug:
                raise
            click.echo(f"internal error: {type(err).__name__}: {err}", err=True)
            click.echo("hint: rerun with --debug for the traceback", err=True)
            ctx.exit(1)


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each pass does.")
@click.version_option(package_name="fxcomp")
def main(debug: bool, verbose: bool) -> None:
    """fxcomp: a graph-rewriting model-compression compiler for PyTorch."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


for _command in (
    dump,
    compile_command,
    demo,
    analyze_command,
    list_passes,
    check_command,
    inspect_command,
):
    main.add_command(_command)
