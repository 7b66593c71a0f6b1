"""``fxcomp analyze``: a model's layers ranked by what quantizing each one costs.

Example::

    fxcomp analyze torchvision:resnet18 --calib photos -o out
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from fxcomp.api.analyze import analyze
from fxcomp.cli.calibration_data import calibration_batches
from fxcomp.cli.model_spec import load_model, parse_shape
from fxcomp.cli.options import capture_options, engine_option, observer_option
from fxcomp.ir.atomic import write_atomic
from fxcomp.reporting.figures import png_bytes

__all__ = ["analyze_command"]


@click.command(name="analyze")
@click.argument("model")
@click.option("--input-shape", default="1,3,224,224", show_default=True)
@click.option(
    "--calib",
    default="random",
    show_default=True,
    help="Calibration data: random, digits, photos or folder:PATH (images).",
)
@click.option("--calib-batches", default=8, show_default=True, help="Batches of 8 inputs.")
@engine_option()
@observer_option
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write analysis.json and analysis.png (per-layer SQNR bars) here.",
)
@capture_options
def analyze_command(
    model: str,
    input_shape: str,
    calib: str,
    calib_batches: int,
    engine: str,
    observer: str,
    as_json: bool,
    output_dir: Path | None,
    capture: str,
    leaves: tuple[str, ...],
) -> None:
    """Rank MODEL's layers by what quantizing each one costs, with the statistics behind it."""
    shape = parse_shape(input_shape)
    data = calibration_batches(calib, shape, batches=calib_batches)
    network = load_model(model)
    example = data[0][: shape[0]]
    result = analyze(
        network,
        example,
        data,
        engine=engine,
        observer=observer,
        capture=capture,
        leaf_modules=leaves,
    )
    text = json.dumps(result.to_dict(), indent=2)
    click.echo(text if as_json else result.table())
    if output_dir is not None:
        write_atomic(output_dir / "analysis.json", text)
        write_atomic(output_dir / "analysis.png", png_bytes(result.figure))
        if not as_json:
            click.echo(f"\n{output_dir / 'analysis.json'}\n{output_dir / 'analysis.png'}")
