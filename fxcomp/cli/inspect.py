"""``fxcomp check`` (an ONNX file against a runtime's QDQ rules) and ``fxcomp inspect`` (a
bundle's manifest, its samples re-run by its runtime).

Example::

    fxcomp check out/model.onnx --target tensorrt
    fxcomp inspect out/model.fxbundle
"""

from __future__ import annotations

import json
from typing import Any

import click
from tabulate import tabulate

from fxcomp.backends.bundle import LITE, PROGRAMS, load_bundle
from fxcomp.backends.onnx.check import TARGETS, check
from fxcomp.ir.errors import VerificationError

__all__ = ["check_command", "inspect_command"]


@click.command(name="check")
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


@click.command(name="inspect")
@click.argument("bundle_path", metavar="MODEL.fxbundle")
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def inspect_command(bundle_path: str, as_json: bool) -> None:
    """Print a bundle's manifest (mobile or executorch) and re-run its bundled samples.

    Exits 0 when the samples reproduce, 1 when they do not, 2 when the bundle is refused.
    """
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

    runtime = manifest.get("runtime", LITE)
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
        ["runtime", runtime],
        *([["bytecode", manifest["bytecode_version"]]] if runtime == LITE else []),
        *_delegation_rows(manifest.get("delegation")),
        *[
            [name, f"{manifest['members'][name]['bytes'] / 2**20:.2f} MiB"]
            for name in PROGRAMS[runtime]
        ],
        *[[key, f"{value:.4g}"] for key, value in manifest.get("parity", {}).items()],
        *[["note", note] for note in manifest.get("notes", ())],
    ]
    return tabulate(rows, tablefmt="plain", disable_numparse=True)


def _delegation_rows(delegation: dict[str, Any] | None) -> list[list[str]]:
    """What XNNPACK runs and what was left on ExecuTorch's portable kernels."""
    if delegation is None:
        return []
    delegated = delegation["xnnpack"]
    portable = sorted({entry["op"] for entry in delegation["portable"]})
    return [
        ["xnnpack", f"{sum(delegated.values())} ops ({', '.join(sorted(delegated))})"],
        ["portable kernels", ", ".join(portable) or "none"],
    ]
