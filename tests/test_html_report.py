"""The compile report as HTML: a resnet18 compile with the per-layer analysis and latency,
opened in headless Chromium (the system's, /usr/bin/chromium, driven by Playwright): every
section and picture present, no console errors, a screenshot saved. Without Chromium that
test is skipped, saying so, except under CI (``CI`` set, as ``.ci/run`` does), where it
fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torchvision

import fxcomp
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.passes import fuse, quantize

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    calibration = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    model = reestimate_batchnorm(torchvision.models.resnet18(), calibration)
    out = tmp_path_factory.mktemp("report")
    result = fxcomp.compile(
        model,
        calibration[0][:1],
        passes=[fuse(), quantize(calibration, progress=False)],
        backend="torchscript",
        output_dir=out,
        calibration_data=calibration,
        analyze=True,
        latency_rounds=5,
    )
    return result, out


def test_report_json_holds_what_the_page_shows(compiled):
    result, out = compiled
    saved = json.loads((out / "report.json").read_text())
    assert [row["layer"] for row in saved["tables"]["analysis"]][:1] == [
        result.report.tables["analysis"][0]["layer"]
    ]
    assert len(saved["tables"]["analysis"]) == 21
    assert set(saved["artifacts"][0]["latency_ms"]) == {"float", "torchscript"}
    assert set(saved["figures"]) == {"layer_sqnr", "weight_histograms", "size_latency"}
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "http" not in html.replace(
        "http-equiv", ""
    )


def test_report_opens_in_headless_chromium(compiled, tmp_path):
    from playwright.sync_api import sync_playwright

    _, out = compiled
    if not CHROMIUM.exists():
        missing = f"no browser at {CHROMIUM}: install the system's chromium to render the report"
        if os.environ.get("CI"):
            pytest.fail(f"{missing} (.ci/run does)")
        pytest.skip(missing)
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto((out / "report.html").as_uri())
            sections = page.eval_on_selector_all("section", "nodes => nodes.map(n => n.id)")
            images = page.eval_on_selector_all(
                "img", "nodes => nodes.map(n => [n.alt, n.complete, n.naturalWidth])"
            )
            layer_rows = page.eval_on_selector_all("#layers tr", "rows => rows.length")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            browser.close()
    assert sections == ["summary", "passes", "layers", "artifacts", "figures", "notes"]
    assert sorted(name for name, _, _ in images) == [
        "layer_sqnr",
        "size_latency",
        "weight_histograms",
    ]
    assert all(done and width > 300 for _, done, width in images), images
    assert layer_rows == 22  # the header and 21 layers
    assert errors == []
    assert (tmp_path / "report.png").stat().st_size > 50_000
