"""Bundles loaded in a fresh process: each must reproduce its samples exactly and give the
same rows when run on twice as many."""

import json
import subprocess
import sys

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
