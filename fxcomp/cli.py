"""The ``fxcomp`` command line: a thin layer over the library.

Example::

    fxcomp dump torchvision:resnet18 --passes fuse --format table
    fxcomp check out/model.onnx --target tensorrt
    fxcomp inspect out/model.fxbundle
    fxcomp passes
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import torch
from tabulate import tabulate

from fxcomp.compiler import compile
from fxcomp.dump import FORMATS, DumpAfterEach, render_graph, render_groups
from fxcomp.errors import FxcompError, InputError
from fxcomp.model_spec import load_model, parse_shape
from fxcomp.onnx_check import TARGETS, check
from fxcomp.quant import OBSERVERS
from fxcomp.quant.scheme import ENGINES, KERNEL_ENGINES

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


def _passes(names: str, **options: Any) -> list[Any]:
    """Built-in passes by name; ``quantize`` and ``prune`` get the options meant for them."""
    from fxcomp.passes import BUILTIN

    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BUILTIN]
    if unknown:
        raise InputError(
            f"unknown pass '{unknown[0]}'", hint=f"built-in passes: {', '.join(BUILTIN)}"
        )
    if "quantize" in chosen and "calibration_data" not in options:
        raise InputError("quantize needs calibration data", hint="use fxcomp compile --calib ...")
    wanted = {
        "quantize": ("calibration_data", "engine", "observer", "bias_correction"),
        "prune": ("ratio", "importance", "scope", "ignore", "round_to"),
        "sparsify": ("amount",),
        "quantize_dynamic": ("engine",),
    }
    return [
        BUILTIN[n](**{k: v for k, v in options.items() if k in wanted.get(n, ())}) for n in chosen
    ]


@main.command()
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
@click.option("--leaf", "leaves", multiple=True, help="Submodule to keep opaque when tracing.")
def dump(
    model: str,
    input_shapes: tuple[str, ...],
    pass_names: str,
    fmt: str,
    after_each: Path | None,
    explain: bool,
    groups: bool,
    leaves: tuple[str, ...],
) -> None:
    """Trace MODEL, run --passes, and print its graph.

    MODEL is torchvision:NAME (random weights), package.module:attr or path/to/file.py:attr.
    """
    passes = _passes(pass_names)
    torch.manual_seed(0)
    inputs = tuple(torch.randn(parse_shape(s)) for s in input_shapes)
    hooks = [DumpAfterEach(after_each, fmt)] if after_each else []
    result = compile(load_model(model), inputs, passes, leaf_modules=leaves, after_pass=hooks)
    notes = result.report.notes if explain else ()
    click.echo(
        render_groups(result.module) if groups else render_graph(result.module, fmt, notes=notes)
    )
    if passes:
        click.echo(f"\n{result.report}", err=True)


_engine_option = click.option(
    "--engine", type=click.Choice(KERNEL_ENGINES), default="x86", show_default=True
)
_observer_option = click.option(
    "--observer", type=click.Choice(list(OBSERVERS)), default="mse", show_default=True
)


@main.command(name="compile")
@click.argument("model")
@click.option("--input-shape", default="1,3,224,224", show_default=True)
@click.option("--passes", "pass_names", default="fuse,quantize", show_default=True)
@click.option(
    "--calib",
    default="random",
    show_default=True,
    help="Calibration data: random, digits, photos (scikit-learn's sample photographs) or "
    "folder:PATH (images).",
)
@click.option("--calib-batches", default=8, show_default=True, help="Batches of 8 inputs.")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="x86", show_default=True)
@click.option("--ratio", default=0.5, show_default=True, help="Share of channels prune removes.")
@click.option(
    "--importance",
    type=click.Choice(["l2", "l1", "bn_scale", "random"]),
    default="l2",
    show_default=True,
    help="How prune ranks channels.",
)
@click.option("--scope", type=click.Choice(["local", "global"]), default="local", show_default=True)
@click.option("--ignore", multiple=True, help="Layer whose channels prune keeps (pattern).")
@click.option("--round-to", type=int, default=None, help="Keep channel counts multiples of N.")
@click.option("--amount", default=0.5, show_default=True, help="Share of weights sparsify zeroes.")
@_observer_option
@click.option(
    "--bias-correction",
    is_flag=True,
    help="quantize: take each layer's mean output shift from weight rounding off its bias.",
)
@click.option(
    "--backend",
    type=click.Choice(["torchscript", "onnx", "mobile"]),
    default="torchscript",
    show_default=True,
    help="torchscript: fbgemm/qnnpack kernels (engines x86, fbgemm, qnnpack); onnx: float or "
    "QDQ for TensorRT (--engine tensorrt) or ONNX Runtime (--engine ort); mobile: a lite "
    "interpreter bundle (--engine qnnpack).",
)
@click.option("--mean", help="mobile: per-channel input mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="mobile: per-channel input std the app divides by.")
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="mobile: a text file with one class label per line.",
)
@click.option(
    "--analyze",
    "with_analysis",
    is_flag=True,
    help="Add the per-layer quantization analysis (on the calibration data) to the report.",
)
@click.option(
    "--latency-rounds",
    default=20,
    show_default=True,
    help="Time the artifact against the float model this many rounds (0: do not).",
)
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--leaf", "leaves", multiple=True, help="Submodule to keep opaque when tracing.")
def compile_command(
    model: str,
    input_shape: str,
    pass_names: str,
    calib: str,
    calib_batches: int,
    ratio: float,
    importance: str,
    scope: str,
    ignore: tuple[str, ...],
    round_to: int | None,
    amount: float,
    engine: str,
    observer: str,
    bias_correction: bool,
    backend: str,
    mean: str | None,
    std: str | None,
    labels: Path | None,
    with_analysis: bool,
    latency_rounds: int,
    output_dir: Path,
    leaves: tuple[str, ...],
) -> None:
    """Compile MODEL with --passes and write a --backend artifact, report.json and
    report.html to -o DIR."""
    from fxcomp.calibration_data import calibration_batches
    from fxcomp.graph import state_size

    options = _mobile_options(backend, mean, std, labels)
    if backend == "mobile" and "quantize" in pass_names and engine != "qnnpack":
        raise InputError(
            f"the mobile backend runs qnnpack kernels, not {engine}'s",
            hint="use --engine qnnpack with --backend mobile",
        )
    if backend == "onnx" and "quantize" in pass_names and engine in KERNEL_ENGINES:
        raise InputError(
            f"engine {engine} quantizes for fbgemm/qnnpack kernels, which ONNX cannot hold",
            hint="use --engine tensorrt or --engine ort with --backend onnx",
        )
    if backend == "torchscript" and "quantize" in pass_names and engine not in KERNEL_ENGINES:
        raise InputError(
            f"engine {engine} has no TorchScript kernels",
            hint=f"use --backend onnx, or --engine {' / '.join(KERNEL_ENGINES)}",
        )
    shape = parse_shape(input_shape)
    data = calibration_batches(calib, shape, batches=calib_batches)
    passes = _passes(
        pass_names,
        calibration_data=data,
        engine=engine,
        observer=observer,
        bias_correction=bias_correction,
        ratio=ratio,
        importance=importance,
        scope=scope,
        ignore=ignore,
        round_to=round_to,
        amount=amount,
    )
    network = load_model(model)
    result = compile(
        network,
        data[0][: shape[0]],
        passes,
        backend,
        output_dir,
        leaf_modules=leaves,
        calibration_data=data,
        engine=engine,
        backend_options=options,
        analyze=with_analysis,
        latency_rounds=latency_rounds,
    )
    click.echo(str(result.report))
    for name in result.report.tables:
        click.echo(f"\n{name}, per layer:\n{result.report.table(name)}")
    for name, path in result.report.figures.items():
        click.echo(f"{name}: {path}")
    artifact = result.artifact
    float_mib = state_size(network)[1] / 2**20
    size_mib = artifact.path.stat().st_size / 2**20
    rows = [
        ["artifact", str(artifact.path)],
        [
            "size",
            f"{float_mib:.2f} MiB float state -> {size_mib:.2f} MiB ({float_mib / size_mib:.2f}x)",
        ],
        *[[key, f"{value:.4g}"] for key, value in artifact.parity.items()],
    ]
    for name, value in (result.report.artifacts[0].get("latency_ms") or {}).items():
        rows.append([f"latency {name}", f"{value:.3f} ms (median of {latency_rounds})"])
    rows.append(["report", str(output_dir / "report.html")])
    if backend == "onnx":
        rows.append(["trtexec", _trtexec(artifact.path, shape, engine, "quantize" in pass_names)])
    click.echo("\n" + tabulate(rows, tablefmt="plain"))


def _mobile_options(
    backend: str, mean: str | None, std: str | None, labels: Path | None
) -> dict[str, Any]:
    """The mobile backend's options from --mean, --std and --labels."""
    given = {"mean": mean, "std": std, "labels": labels}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if options and backend != "mobile":
        raise InputError(f"--{', --'.join(options)} apply to --backend mobile only")
    for key in ("mean", "std"):
        if key in options:
            try:
                options[key] = [float(v) for v in options[key].split(",")]
            except ValueError:
                raise InputError(
                    f"--{key} '{options[key]}' is not a list of numbers",
                    hint=f"write it like --{key} 0.485,0.456,0.406",
                ) from None
    if labels is not None:
        lines = labels.read_text().splitlines()
        options["labels"] = [line.strip() for line in lines if line.strip()]
    return options


def _trtexec(path: Path, shape: tuple[int, ...], engine: str, quantized: bool) -> str:
    """The TensorRT command line that builds and times ``path`` (dynamic batch 1 to 32), or
    why there is none: TensorRT takes int8 Q/DQ, not the ``ort`` scheme's uint8."""
    if quantized and engine != "tensorrt":
        return f"none: {engine}'s uint8 Q/DQ is for ONNX Runtime; use --engine tensorrt"
    dims = "x".join(str(d) for d in shape[1:])
    shapes = " ".join(
        f"--{kind}Shapes=input:{batch}x{dims}"
        for kind, batch in (("min", 1), ("opt", shape[0]), ("max", 32))
    )
    precision = "--int8 --fp16" if quantized else "--fp16"
    return f"trtexec --onnx={path} {precision} {shapes}"


@main.command()
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("fxcomp-demo"),
    show_default=True,
)
@_engine_option
@_observer_option
@click.option(
    "--qat",
    "qat_epochs",
    type=click.IntRange(min=1),
    default=None,
    help="quantization-aware training for this many epochs instead of calibration",
)
def demo(output_dir: Path, engine: str, observer: str, qat_epochs: int | None) -> None:
    """Train a CNN on real handwritten digits; fuse, prune, distil and quantize it to INT8,
    and compare every step."""
    from fxcomp.demo import run_demo

    rows = run_demo(output_dir, engine=engine, observer=observer, qat_epochs=qat_epochs)
    headers = ["step", "test accuracy %", "parameters", "size KiB", "batch 1 ms", "test set ms"]
    body = [
        [
            r.step,
            f"{r.accuracy:.2f}",
            r.parameters,
            f"{r.kib:.1f}",
            f"{r.batch1_ms:.3f}",
            f"{r.test_set_ms:.2f}",
        ]
        for r in rows
    ]
    click.echo(tabulate(body, headers=headers))
    click.echo(f"\nINT8 TorchScript: {output_dir / 'model.pt'}")


@main.command(name="analyze")
@click.argument("model")
@click.option("--input-shape", default="1,3,224,224", show_default=True)
@click.option(
    "--calib",
    default="random",
    show_default=True,
    help="Calibration data: random, digits, photos or folder:PATH (images).",
)
@click.option("--calib-batches", default=8, show_default=True, help="Batches of 8 inputs.")
@click.option("--engine", type=click.Choice(list(ENGINES)), default="x86", show_default=True)
@_observer_option
@click.option("--json", "as_json", is_flag=True, help="Print the analysis as JSON.")
@click.option(
    "-o",
    "--output-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write analysis.json and analysis.png (per-layer SQNR bars) here.",
)
@click.option("--leaf", "leaves", multiple=True, help="Submodule to keep opaque when tracing.")
def analyze_command(
    model: str,
    input_shape: str,
    calib: str,
    calib_batches: int,
    engine: str,
    observer: str,
    as_json: bool,
    output_dir: Path | None,
    leaves: tuple[str, ...],
) -> None:
    """Rank MODEL's layers by what quantizing each one costs, with the statistics behind it."""
    from fxcomp.analysis import analyze
    from fxcomp.atomic import write_atomic
    from fxcomp.calibration_data import calibration_batches
    from fxcomp.figures import png_bytes

    shape = parse_shape(input_shape)
    data = calibration_batches(calib, shape, batches=calib_batches)
    network = load_model(model)
    example = data[0][: shape[0]]
    result = analyze(network, example, data, engine=engine, observer=observer, leaf_modules=leaves)
    text = json.dumps(result.to_dict(), indent=2)
    click.echo(text if as_json else result.table())
    if output_dir is not None:
        write_atomic(output_dir / "analysis.json", text)
        write_atomic(output_dir / "analysis.png", png_bytes(result.figure))
        if not as_json:
            click.echo(f"\n{output_dir / 'analysis.json'}\n{output_dir / 'analysis.png'}")


@main.command(name="passes")
def list_passes() -> None:
    """List the built-in passes."""
    from fxcomp.passes import BUILTIN

    width = max(map(len, BUILTIN))
    for name, constructor in BUILTIN.items():
        summary = (constructor.__doc__ or "").strip().splitlines()[0]
        click.echo(f"{name:<{width}}  {summary}")


@main.command(name="check")
@click.argument("model_path", metavar="MODEL.onnx")
@click.option(
    "--target",
    type=click.Choice(TARGETS),
    required=True,
    help="tensorrt: int8 symmetric Q/DQ; ort: ONNX Runtime's uint8/int8 QDQ.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def check_command(model_path: str, target: str, as_json: bool) -> None:
    """Check MODEL.onnx against the QDQ rules of --target and predict its INT8 layers.

    Exits 0 when the file follows every rule, 1 when it breaks some, 2 when it cannot be read.
    """
    result = check(model_path, target)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())
    if not result.ok:
        raise click.exceptions.Exit(1)


@main.command(name="inspect")
@click.argument("bundle_path", metavar="MODEL.fxbundle")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect_command(bundle_path: str, as_json: bool) -> None:
    """Print a mobile bundle's manifest and re-run its bundled samples.

    Exits 0 when the samples reproduce, 1 when they do not, 2 when the bundle is refused.
    """
    from fxcomp.bundle import load_bundle
    from fxcomp.errors import VerificationError

    bundle = load_bundle(bundle_path)
    manifest = bundle.manifest
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        click.echo(_manifest_table(manifest))
    try:
        errors = bundle.verify()
    except VerificationError as err:
        click.echo(f"samples: FAILED: {err.message}")
        raise click.exceptions.Exit(1) from None
    worst = max(errors, default=0.0)
    click.echo(
        f"samples: reproduced (max abs error {worst:.3g}, tolerance "
        f"{manifest['samples']['atol']:.3g})"
    )


def _manifest_table(manifest: dict[str, Any]) -> str:
    """The manifest's headline facts as a two-column table."""

    def tensors(entries: list[dict[str, Any]]) -> str:
        return "; ".join(
            f"{e['name']} {e['dtype']}{e['shape']} dynamic axes {e['dynamic_axes']}"
            for e in entries
        )

    layers = manifest.get("layers", [])
    int8 = sum(1 for layer in layers if layer["precision"] == "int8")
    pre = manifest.get("preprocessing")
    labels = manifest.get("labels")
    rows = [
        ["format", manifest["format"]],
        ["engine", manifest.get("engine") or "float"],
        ["inputs", tensors(manifest["inputs"])],
        ["outputs", tensors(manifest["outputs"])],
        ["preprocessing", f"mean {pre['mean']}, std {pre['std']}" if pre else "none recorded"],
        ["labels", f"{len(labels)} ({', '.join(labels[:3])}, ...)" if labels else "none"],
        ["layers", f"{int8} INT8, {len(layers) - int8} float"],
        ["versions", ", ".join(f"{k} {v}" for k, v in manifest["versions"].items())],
        ["bytecode", manifest["bytecode_version"]],
        ["model.ptl", f"{manifest['members']['model.ptl']['bytes'] / 2**20:.2f} MiB"],
        *[[key, f"{value:.4g}"] for key, value in manifest.get("parity", {}).items()],
        *[["note", note] for note in manifest.get("notes", ())],
    ]
    return tabulate(rows, tablefmt="plain", disable_numparse=True)
