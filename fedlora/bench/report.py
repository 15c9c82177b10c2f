"""The bench report: BENCHMARKS.html, the plots of every suite in a BENCHMARKS.json file.

A suite that has curves to show puts them in its figures as `plots`: a list of
{title, x_label, y_label, series: {name: [[x, y], ...]}}. The runner rewrites
the report from the whole JSON file after each suite, so a suite rerun alone
keeps the others' plots. Inline SVG (the run report's charts), no script: the
file opens offline.

    python -m fedlora.bench.report BENCHMARKS.json   # writes BENCHMARKS.html beside it
"""

from __future__ import annotations

import html
import json
import sys
from pathlib import Path

from fedlora.server.report import line_chart


def render(entries: dict) -> str:
    """The page for a JSON file's suite entries ({name: entry}); suites without plots are left out."""
    sections = []
    for name, entry in entries.items():
        charts = [line_chart(p["title"], {k: [tuple(pt) for pt in v] for k, v in p["series"].items()},
                             p.get("y_label", ""), p.get("x_label", "round"))
                  for p in entry.get("figures", {}).get("plots", [])]
        if charts:
            sections.append(f'<section id="{html.escape(name)}"><h2>{html.escape(name)}</h2>'
                            f'<p>{html.escape(entry.get("command", ""))} ({html.escape(entry.get("mode", ""))} mode, '
                            f'finished {html.escape(entry.get("finished", ""))})</p>'
                            f'<div class="plots">{"".join(c for c in charts if c)}</div></section>')
    body = "".join(sections) or "<p>No suite in this file has plots.</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedlora benchmarks</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
</style></head><body>
<h1>fedlora benchmarks: plots</h1>
<p>Tables and how each figure was measured: BENCHMARKS.md.</p>
{body}
</body></html>
"""


def write_report(json_path: str | Path) -> Path:
    """BENCHMARKS.html (or <stem>.html) beside the JSON file of figures."""
    json_path = Path(json_path)
    path = json_path.with_suffix(".html")
    path.write_text(render(json.loads(json_path.read_text()).get("suites", {})))
    return path


if __name__ == "__main__":
    print(write_report(sys.argv[1]))
