"""Bundles loaded in a fresh process: each must reproduce its samples exactly and give the
same rows when run on twice as many; bundles rewritten to test what a damaged one does; and
the CLI run as a user runs it."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from fxcomp.backends.bundle import MANIFEST

FRESH = """
import json, sys, torch, fxcomp
report = {}
for path in sys.argv[1:]:
    bundle = fxcomp.load_bundle(path)
    errors = bundle.verify()
    x = bundle.sample_inputs[0]
    rows = bundle(torch.cat([x, x]))
    report[path] = {
        "errors": errors,
        "rows_match": bool((rows[: len(x)] - bundle.sample_outputs[0]).abs().max()
                           <= bundle.manifest["samples"]["atol"]),
    }
print(json.dumps(report))
"""


def assert_reproduce_in_a_fresh_process(paths: list[str]) -> None:
    """Load every bundle in ``paths`` in a new interpreter and check what it gives."""
    run = subprocess.run(
        [sys.executable, "-c", FRESH, *paths], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(report) == set(paths)
    for path, figures in report.items():
        assert figures["errors"] == [0.0], path
        assert figures["rows_match"], path


def rewrite_bundle(source: Path, target: Path, change) -> Path:
    """``source`` copied to ``target`` with ``change(manifest, members)`` applied."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        manifest = json.loads(old.read(MANIFEST))
        members = {name: old.read(name) for name in old.namelist() if name != MANIFEST}
        change(manifest, members)
        for name, data in members.items():
            new.writestr(name, data)
        new.writestr(MANIFEST, json.dumps(manifest))
    return target


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m fxcomp ARGS`` in a new process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "fxcomp", *args], capture_output=True, text=True, timeout=600
    )
