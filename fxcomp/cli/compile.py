"""``fxcomp compile``: a model through built-in passes to a backend's artifact and a report.

Example::

    fxcomp compile torchvision:resnet18 --passes fuse,quantize --calib photos -o out
    fxcomp compile torchvision:resnet18 --engine tensorrt --backend onnx -o out
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from tabulate import tabulate

from fxcomp.api.compile import compile
from fxcomp.backends import BACKENDS, check_request
from fxcomp.cli.calibration_data import calibration_batches
from fxcomp.cli.model_spec import load_model, parse_shape
from fxcomp.cli.options import (
    capture_options,
    engine_option,
    given_flags,
    observer_option,
    passes_from_flags,
)
from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import state_size
from fxcomp.passes.quantization import ROUNDINGS

__all__ = ["compile_command"]

# flags that go to the passes that take them (``fxcomp.cli.options.passes_from_flags``)
_BUNDLING = ("mobile", "executorch", "openvino")  # the backends that take --mean, --std, --labels

_PASS_FLAGS = (
    "ratio",
    "importance",
    "scope",
    "ignore",
    "round_to",
    "amount",
    "engine",
    "observer",
    "bias_correction",
    "rounding",
    "bits",
    "group_size",
    "method",
    "skip",
    "lm_head",
    "embeddings",
    "symmetric",
)


@click.command(name="compile")
@click.argument("model")
@click.option("--input-shape", default="1,3,224,224", show_default=True)
@click.option("--passes", "pass_names", default="fuse,quantize", show_default=True)
@click.option(
    "--calib",
    default="random",
    show_default=True,
    help="Calibration data: random, digits, photos (scikit-learn's sample photographs), "
    "folder:PATH (images) or stdlib (token ids of Python's standard library, for a language "
    "model; --input-shape 1,LENGTH).",
)
@click.option("--calib-batches", default=8, show_default=True, help="Batches of 8 inputs.")
@engine_option()
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
@click.option(
    "--bits",
    type=int,
    default=8,
    show_default=True,
    help="quantize_weights: int8 per channel or int4 per group.",
)
@click.option(
    "--group-size",
    type=int,
    default=128,
    show_default=True,
    help="quantize_weights: input channels per int4 group (32, 64, 128 or 256).",
)
@click.option(
    "--method",
    type=click.Choice(["rtn", "gptq", "awq"]),
    default="rtn",
    show_default=True,
    help="quantize_weights: round to nearest, or GPTQ / AWQ on the calibration data.",
)
@click.option("--skip", multiple=True, help="quantize_weights: a Linear layer to leave float.")
@click.option("--lm-head", is_flag=True, help="quantize_weights: the LM head too.")
@click.option("--embeddings", is_flag=True, help="quantize_weights: the embedding tables too.")
@click.option(
    "--symmetric",
    is_flag=True,
    help="quantize_weights: int4 codes around zero (what --backend executorch needs).",
)
@observer_option
@click.option(
    "--bias-correction",
    is_flag=True,
    help="quantize: take each layer's mean output shift from weight rounding off its bias.",
)
@click.option(
    "--rounding",
    type=click.Choice(ROUNDINGS),
    help="quantize: round weights to nearest (default), or learn each weight's rounding on "
    "the calibration data against the float output (AdaRound: slower, same kernels).",
)
@click.option(
    "--backend",
    type=click.Choice(list(BACKENDS)),
    default="torchscript",
    show_default=True,
    help="torchscript: fbgemm/qnnpack kernels (engines x86, fbgemm, qnnpack); onnx: float or "
    "QDQ for TensorRT (--engine tensorrt) or ONNX Runtime (--engine ort); mobile: a lite "
    "interpreter bundle (--engine qnnpack); executorch: an ExecuTorch .pte bundle for XNNPACK "
    "(--engine xnnpack); openvino: an OpenVINO IR bundle (--engine openvino, ort or tensorrt).",
)
@click.option("--mean", help="bundles: per-channel input mean, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="bundles: per-channel input std the app divides by.")
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="bundles (mobile, executorch, openvino): a text file with one class label per line.",
)
@click.option(
    "--precision",
    type=click.Choice(["f32", "bf16"]),
    help="openvino: the inference precision of the float parts [default: f32].",
)
@click.option(
    "--hint",
    type=click.Choice(["latency", "throughput"]),
    help="openvino: the performance hint [default: latency].",
)
@click.option("--streams", type=click.IntRange(min=1), help="openvino: inference streams.")
@click.option("--threads", type=click.IntRange(min=1), help="openvino: inference threads.")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    help="executorch: the most rows the program takes [default: 8].",
)
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    help="executorch: token inputs take any length up to this many tokens [default: the "
    "example's length, fixed].",
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
@capture_options
@click.pass_context
def compile_command(
    ctx: click.Context,
    model: str,
    input_shape: str,
    pass_names: str,
    calib: str,
    calib_batches: int,
    backend: str,
    mean: str | None,
    std: str | None,
    labels: Path | None,
    precision: str | None,
    hint: str | None,
    streams: int | None,
    threads: int | None,
    max_batch: int | None,
    max_length: int | None,
    with_analysis: bool,
    latency_rounds: int,
    output_dir: Path,
    capture: str,
    leaves: tuple[str, ...],
    **_: Any,
) -> None:
    """Compile MODEL with --passes and write a --backend artifact, report.json and
    report.html to -o DIR. Pass flags (--ratio, --engine, ...) go to the passes that take
    them."""
    runtime = {"precision": precision, "hint": hint, "streams": streams, "threads": threads}
    shapes = {"max_batch": max_batch, "max_length": max_length}
    options = _backend_options(backend, mean, std, labels, runtime, shapes)
    shape = parse_shape(input_shape)
    data = calibration_batches(calib, shape, batches=calib_batches)
    flags = given_flags(ctx, _PASS_FLAGS)
    passes = passes_from_flags(pass_names, flags, {"calibration_data": data})
    check_request(backend, passes, options)  # the library's check, before the model loads
    network = load_model(model)
    result = compile(
        network,
        data[0][: shape[0]],
        passes,
        backend,
        output_dir,
        capture=capture,
        leaf_modules=leaves,
        calibration_data=data,
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
    summary = result.report.artifacts[0]
    for name, value in (summary.get("latency_ms") or {}).items():
        rows.append([f"latency {name}", f"{value:.3f} ms (median of {latency_rounds})"])
    if summary.get("latency_ms"):
        rows.append(["timing", summary["latency_timing"]])
    rows.append(["report", str(output_dir / "report.html")])
    if backend == "onnx":
        rows.append(["trtexec", _trtexec(artifact.path, shape, artifact.manifest["engine"])])
    click.echo("\n" + tabulate(rows, tablefmt="plain"))


def _backend_options(
    backend: str,
    mean: str | None,
    std: str | None,
    labels: Path | None,
    runtime: dict[str, Any],
    shapes: dict[str, Any],
) -> dict[str, Any]:
    """The bundling backends' options from --mean, --std and --labels, OpenVINO's from
    --precision, --hint, --streams and --threads, and ExecuTorch's from --max-batch and
    --max-length."""
    given = {"mean": mean, "std": std, "labels": labels}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if options and backend not in _BUNDLING:
        raise InputError(
            f"--{', --'.join(options)} apply to --backend {', '.join(_BUNDLING[:-1])} or "
            f"{_BUNDLING[-1]} only"
        )
    for target, flags in (("openvino", runtime), ("executorch", shapes)):
        chosen = {k: v for k, v in flags.items() if v is not None}
        if chosen and backend != target:
            named = ", --".join(k.replace("_", "-") for k in chosen)
            raise InputError(f"--{named} apply to --backend {target} only")
        options.update(chosen)
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


def _trtexec(path: Path, shape: tuple[int, ...], engine: str | None) -> str:
    """The TensorRT command line that builds and times ``path`` (dynamic batch 1 to 32), or
    why there is none: TensorRT takes int8 Q/DQ, not the ``ort`` scheme's uint8."""
    if engine is not None and engine != "tensorrt":
        return f"none: {engine}'s uint8 Q/DQ is for ONNX Runtime; use --engine tensorrt"
    dims = "x".join(str(d) for d in shape[1:])
    shapes = " ".join(
        f"--{kind}Shapes=input:{batch}x{dims}"
        for kind, batch in (("min", 1), ("opt", shape[0]), ("max", 32))
    )
    precision = "--int8 --fp16" if engine is not None else "--fp16"
    return f"trtexec --onnx={path} {precision} {shapes}"
