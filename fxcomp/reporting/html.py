"""The compile report as one static HTML page: tables and pictures, images embedded.

``render_html(report, figures)`` lays out what ``report.json`` holds: every pass (time, node
counts, parameters, size, nested pipelines indented), every per-layer table a pass or the
analysis recorded, every artifact (parity figures, size, latency) and the notes, with the
figures (PNG bytes) embedded as data URIs. The page needs no server and no network: it
opens from disk.

Example::

    html = render_html(result.report, {"layer_sqnr": png})
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import jinja2
from matplotlib.figure import Figure

from fxcomp.pipeline.report import PassRecord, Report

__all__ = ["artifact_figure", "render_html"]

_TEMPLATE = jinja2.Template(
    """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>fxcomp report</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
td.name, th.name { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
section { margin-bottom: 2em; }
</style>
</head>
<body>
<h1>fxcomp report</h1>
<section id="summary">
<h2>Summary</h2>
<table>
<tr><th class="name">passes</th><td>{{ passes | length }}</td></tr>
<tr><th class="name">parameters</th><td>{{ "{:,}".format(first.parameters_before) }} &rarr;
{{ "{:,}".format(last.parameters_after) }}</td></tr>
<tr><th class="name">size (MiB)</th><td>{{ "%.2f" | format(first.bytes_before / 1048576) }} &rarr;
{{ "%.2f" | format(last.bytes_after / 1048576) }}</td></tr>
{% for a in artifacts %}<tr><th class="name">{{ a.backend }}</th><td>{{ a.path }}</td></tr>
{% endfor %}
</table>
</section>
<section id="passes">
<h2>Passes</h2>
<table>
<tr><th class="name">pass</th><th>modified</th><th>ms</th><th>nodes</th><th>parameters</th>
<th>MiB</th></tr>
{% for depth, r in passes %}<tr><td class="name" style="padding-left: {{ 0.6 + 1.2 * depth }}em">
{{ r.name }}</td><td>{{ "yes" if r.modified else "no" }}</td>
<td>{{ "%.1f" | format(r.seconds * 1000) }}</td>
<td>{{ r.nodes_before.values() | sum }} &rarr; {{ r.nodes_after.values() | sum }}</td>
<td>{{ "{:,}".format(r.parameters_before) }} &rarr; {{ "{:,}".format(r.parameters_after) }}</td>
<td>{{ "%.2f" | format(r.bytes_before / 1048576) }} &rarr;
{{ "%.2f" | format(r.bytes_after / 1048576) }}</td></tr>
{% endfor %}
</table>
</section>
<section id="layers">
<h2>Layers</h2>
{% if not tables %}<p>No pass recorded per-layer figures.</p>{% endif %}
{% for name, rows in tables.items() %}<h3>{{ name }}</h3>
<table>
<tr>{% for key in rows[0].keys() %}<th class="{{ 'name' if loop.first }}">{{ key }}</th>
{% endfor %}</tr>
{% for row in rows %}<tr>{% for value in row.values() %}
<td class="{{ 'name' if loop.first }}">{{ value }}</td>{% endfor %}</tr>
{% endfor %}
</table>
{% endfor %}
</section>
<section id="artifacts">
<h2>Artifacts</h2>
{% if not artifacts %}<p>No backend was asked for.</p>{% endif %}
{% for a in artifacts %}<h3>{{ a.backend }}: {{ a.path }}</h3>
<table>
<tr><th class="name">size (bytes)</th><td>{{ "{:,}".format(a.bytes or 0) }}</td></tr>
{% for key, value in a.parity.items() %}<tr><th class="name">{{ key }}</th>
<td>{{ "%.4g" | format(value) }}</td></tr>{% endfor %}
{% for key, value in (a.latency_ms or {}).items() %}<tr><th class="name">latency ms, {{ key }}</th>
<td>{{ "%.3f" | format(value) }}</td></tr>{% endfor %}
</table>
{% endfor %}
</section>
<section id="figures">
<h2>Figures</h2>
{% for name, uri in images.items() %}<figure><img id="figure-{{ name }}" alt="{{ name }}"
src="{{ uri }}"><figcaption>{{ name }}</figcaption></figure>
{% endfor %}
</section>
<section id="notes">
<h2>Notes</h2>
{% if not notes %}<p>None.</p>{% endif %}
<ul>{% for n in notes %}<li>{{ n }}</li>{% endfor %}</ul>
</section>
</body>
</html>
""",
    autoescape=True,
)


def artifact_figure(report: Report) -> Figure:
    """Bars of size (MiB) and, where measured, latency (ms): the traced float model against
    each artifact."""
    traced = report.records[0]
    names = ["float", *(a["backend"] for a in report.artifacts)]
    sizes = [traced.bytes_before / 2**20, *((a["bytes"] or 0) / 2**20 for a in report.artifacts)]
    timed = [a for a in report.artifacts if a.get("latency_ms")]
    figure = Figure(figsize=(8.0 if timed else 4.0, 3.2))
    panels = figure.subplots(1, 2 if timed else 1, squeeze=False)[0]
    panels[0].bar(names, sizes, color=["#888", *["#2a7"] * len(report.artifacts)])
    panels[0].set_ylabel("size (MiB)")
    panels[0].set_title("Size")
    if timed:
        latency = timed[0]["latency_ms"]
        panels[1].bar(list(latency), list(latency.values()), color=["#888", "#2a7"])
        panels[1].set_ylabel("median latency (ms)")
        panels[1].set_title("Latency at the example inputs")
    return figure


def _flatten(records: list[PassRecord], depth: int = 0) -> list[tuple[int, PassRecord]]:
    rows = []
    for record in records:
        rows.append((depth, record))
        rows.extend(_flatten(record.children, depth + 1))
    return rows


def render_html(report: Report, figures: Mapping[str, bytes]) -> str:
    """The report as a self-contained HTML page, ``figures`` (name to PNG bytes) embedded.

    Example::

        Path("report.html").write_text(render_html(report, {}))
    """
    if not report.records:
        raise ValueError("the report has no pass records to show")
    images = {
        name: "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        for name, png in figures.items()
    }
    context: dict[str, Any] = {
        "passes": _flatten(report.records),
        "first": report.records[0],
        "last": report.records[-1],
        "tables": {name: rows for name, rows in report.tables.items() if rows},
        "artifacts": report.artifacts,
        "images": images,
        "notes": [str(note) for note in report.notes],
    }
    return _TEMPLATE.render(**context)
