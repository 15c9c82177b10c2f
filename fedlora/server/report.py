"""report.html: a run directory a person can read offline.

It opens with a summary in words (report_summary.py): what was trained, how good it
is, at which sites it is weaker, the privacy each site spent and the traffic. Plots are
inline SVG drawn here (no JavaScript, no network, no plotting library), so the file opens
the same on an air-gapped hospital workstation.

    python -m fedlora.server.report RUN_DIR
"""

from __future__ import annotations

import html
import json
import math
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from fedlora.server import drift_check
from fedlora.server.model_registry import site_metric
from fedlora.server.report_summary import human_bytes, summary_sections

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
WIDTH, HEIGHT, PAD, LEGEND = 540, 260, 56, 16
MAX_X_TICKS = 10  # round labels on the x axis, at most


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], y_label: str = "",
               x_label: str = "round", tick: Callable[[float], str] | None = None) -> str:
    """An SVG line chart of named (x, y) series; empty series are left out. `tick` labels the
    y axis (default: 2.46M rather than 2.46e+06)."""
    tick = tick or _tick
    series = {name: pts for name, pts in series.items() if pts}
    if not series:
        return ""
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    pad_y = (y1 - y0) * 0.05
    y0, y1 = y0 - pad_y, y1 + pad_y

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD + (y0 - y) / (y1 - y0) * (HEIGHT - 2 * PAD)

    total_height = HEIGHT + LEGEND * len(series)
    parts = [(f'<svg class="plot" role="img" aria-label="{html.escape(title)}" width="{WIDTH}" '
              f'height="{total_height}" viewBox="0 0 {WIDTH} {total_height}" xmlns="http://www.w3.org/2000/svg">'),
             f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#444"/>',
             f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#444"/>']
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{PAD - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="10">{html.escape(tick(y))}</text>')
    ticks = sorted(set(xs))
    for x in ticks[::math.ceil(len(ticks) / MAX_X_TICKS)]:
        parts.append(f'<text x="{sx(x):.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle" font-size="10">{x:g}</text>')
    parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT - PAD + 30}" text-anchor="middle" '
                 f'font-size="11">{html.escape(x_label)}</text>')
    if y_label:
        parts.append(f'<text x="12" y="{HEIGHT / 2}" font-size="11" transform="rotate(-90 12 {HEIGHT / 2})" '
                     f'text-anchor="middle">{html.escape(y_label)}</text>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        parts.append(f'<polyline class="series" data-name="{html.escape(name)}" fill="none" stroke="{colour}" '
                     f'stroke-width="2" points="{path}"/>')
        if len(pts) == 1:  # one round: a line of one point has no length, so draw the point
            x, y = pts[0]
            parts.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        legend_y = HEIGHT + LEGEND * i + 4
        parts.append(f'<line x1="{PAD}" y1="{legend_y - 4}" x2="{PAD + 20}" y2="{legend_y - 4}" stroke="{colour}" '
                     f'stroke-width="2"/><text x="{PAD + 26}" y="{legend_y}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _tick(y: float) -> str:
    """Short axis labels: 2.46M rather than 2.46e+06."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(y) >= scale:
            return f"{y / scale:.3g}{suffix}"
    return f"{y:.3g}"


def _number(v) -> bool:
    """A value a chart can draw: a finite int or float (not a bool, NaN or infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(rows: list[dict], *keys: str) -> dict[str, list[tuple[float, float]]]:
    return {k: [(r["round"], float(r[k])) for r in rows if _number(r.get(k))] for k in keys}


def _site_epsilon(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """ε per site per round, where the rows carry a per-site map (`epsilon_per_site`)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for site, eps in (r.get("epsilon_per_site") or {}).items():
            if _number(eps):
                out.setdefault(f"ε {site}", []).append((r["round"], float(eps)))
    return {**(out or _series(rows, "epsilon")), **_series(rows, "client_epsilon")}  # + client-level DP


def _site_accuracy(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Each site's own accuracy on its held-out rows, per round (`eval_sites`)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        for site, figures in (r.get("eval_sites") or {}).items():
            if _number(figures.get("eval_accuracy")):
                out.setdefault(site, []).append((r["round"], float(figures["eval_accuracy"])))
    return out


def _per_class(row: dict) -> str:
    """The last round's per-class figures and confusion matrix, pooled over the sites' held-out rows."""
    per_class = row.get("eval_per_class")
    if not per_class:
        return ""
    labels = list(per_class)
    parts = ["<h2>Per class (the sites' held-out rows, pooled; last round)</h2>",
             _table([[name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in per_class.items()],
                    ["class", "precision", "recall", "F1", "support"])]
    confusion = row.get("eval_confusion")
    if confusion:
        matrix = _table([[t, *counts] for t, counts in zip(labels, confusion)], ["true / predicted", *labels])
        parts += ["<p>Confusion matrix: rows are the true class, columns the predicted one.</p>",
                  f'<div id="confusion">{matrix}</div>']
    return "".join(parts)


class Bytes(int):
    """A byte count a table shows in KB/MB/GB (the exact count in the cell's tooltip)."""


def _bytes_columns(row: dict) -> dict:
    return {k: Bytes(v) if k.startswith("bytes_") and _number(v) else v for k, v in row.items()}


def _cell(v) -> str:
    if isinstance(v, Bytes):
        return f'<td title="{int(v)} bytes">{html.escape(human_bytes(v))}</td>'
    return f"<td>{html.escape(_fmt(v))}</td>"


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items())
    return "–" if v is None else str(v)


def _sites(summary: dict, rows: list[dict]) -> dict[str, dict]:
    """Per site: what the coordinator saw (last round), its own figures on its held-out rows in the last
    round it was evaluated, and, under DP-SGD, the privacy it reported."""
    sites = {name: dict(v) for name, v in summary.get("sites", {}).items()}
    for r in rows:
        for name, figures in (r.get("eval_sites") or {}).items():
            sites.setdefault(name, {}).update({k: v for k, v in figures.items() if _number(v)})
    for name, spend in ((summary.get("privacy") or {}).get("site_level", {}).get("sites") or {}).items():
        row = sites.setdefault(name, {})
        for key, value in spend.items():
            if key == "ledger_head":  # a MAC: its start is enough to compare with the site's ledger
                value = str(value)[:16]
            row.setdefault(key, value)
    return sites


def _central_test(summary: dict) -> str:
    """In words, which set the test_* figures are scored on, or that there was none (summary.json's
    `central_test`; a run directory from before it was recorded says nothing)."""
    about = (summary.get("central_test") or {}).get("about")
    if not about:
        return ""
    return f'<p id="central-test"><b>Central test set:</b> {html.escape(about)}.</p>'


def summary_html(summary: dict, rows: list[dict], config: dict | None = None, adapter: dict | None = None) -> str:
    """The summary in words, first on the page: one paragraph per question a reader asks."""
    paragraphs = "".join(f'<p id="{key}"><b>{html.escape(heading)}.</b> {html.escape(text)}</p>'
                         for key, heading, text in summary_sections(summary, rows, config, adapter))
    return f'<section id="summary"><h2>Summary</h2>{paragraphs}</section>'


UNCHECKED_CELLS = {"failed": "did not answer", "not shared": "does not share drift figures",
                   "not trained": "has not trained yet"}


def _drift(summary: dict) -> str:
    """A drift-check run's answers (fedlora.server.drift_check): each site's figures and whether
    retraining is due there, and why."""
    report = summary.get("drift")
    if not report:
        return ""
    cols = ["label_psi", "label_chi2_p", "text_js", "unseen_word_share", "days_since_training"]
    table = []
    for site, s in report.get("sites", {}).items():
        if (state := drift_check.site_state(s)) != "checked":
            table.append([site, UNCHECKED_CELLS[state], "", "", "", "", ""])
        else:
            table.append([site, *[s.get(k) for k in cols], "yes: " + "; ".join(s["why"]) if s["due"] else "no"])
    verdict = (f"Retraining is due at {', '.join(report['due_at'])}." if report.get("retraining_due")
               else "Retraining is not due at any site.")
    return (f'<h2>Drift at the sites</h2><p id="drift-verdict">{html.escape(verdict)}</p>'
            f'<div id="drift" class="wide">{_table(table, ["site", *cols, "retraining due"])}</div>')


def _comparison(summary: dict) -> str:
    """An evaluation-only run's two models, site by site, and the sites' expert review counts."""
    models = (summary.get("comparison") or {}).get("models")
    if not models:
        return ""
    review = summary["comparison"].get("review", {})
    candidate, current = models["candidate"].get("sites", {}), models["current"].get("sites", {})
    metric = site_metric(*candidate.values(), *current.values())
    table = [[site, candidate.get(site, {}).get(metric), current.get(site, {}).get(metric),
              *[review.get(site, {}).get(k) for k in ("wins", "ties", "losses", "unrated")]]
             for site in sorted(set(candidate) | set(current))]
    head = ["site", f"candidate {metric}", f"current {metric}", "review wins", "ties", "losses", "not rated"]
    return (f"<h2>Candidate against current, at every site</h2><p>Candidate {html.escape(str(models['candidate']['adapter']))}; "
            f"current {html.escape(str(models['current']['adapter']))}. Review counts are the candidate's, from "
            f'each site\'s expert (fedlora site review).</p><div id="comparison" class="wide">{_table(table, head)}</div>')


def _read(path: Path, parse) -> dict:
    """A file the summary in words draws on, as a dict; {} when it is absent or unreadable (an older
    run directory, an adapter folder not written yet): the summary then says less."""
    try:
        return parse(path.read_text()) if path.exists() else {}
    except (ValueError, OSError):
        return {}


def render(run_dir: str | Path) -> str:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"  # absent when the run ended before its first round (all sites refused)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    config = _read(run_dir / "config.toml", tomllib.loads)
    adapter = _read(run_dir / "adapter" / "adapter_config.json", json.loads)
    charts = [
        line_chart("Loss", _series(rows, "train_loss", "eval_loss", "test_loss"), "loss"),
        line_chart("Accuracy and macro-F1", _series(rows, "eval_accuracy", "eval_macro_f1", "test_accuracy",
                                                    "test_macro_f1"), "score"),
        line_chart("Accuracy at each site (its own held-out rows)", _site_accuracy(rows), "accuracy"),
        line_chart("Perplexity", _series(rows, "eval_perplexity", "test_perplexity"), "perplexity"),
        line_chart("Privacy spent (ε)", _site_epsilon(rows), "ε"),
        line_chart("Bytes per round", _series(rows, "bytes_up", "bytes_down"), "bytes", tick=human_bytes),
        line_chart("Aggregation error", _series(rows, "aggregation_error"), "relative error"),
    ]
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()  # scalar columns of any round
                              if k != "epsilon_per_site" and not isinstance(v, (dict, list))))
    round_table = _table([[r.get(k, "") for k in keys] for r in map(_bytes_columns, rows)], keys)
    sites = _sites(summary, rows)
    site_cols = list(dict.fromkeys(k for v in sites.values() for k in v))
    site_table = _table([[name, *[v.get(k, "") for k in site_cols]] for name, v in sorted(sites.items())],
                        ["site", *site_cols]) if sites else "<p>No per-site information.</p>"
    params = summary.get("parameters", {})
    facts = [["strategy", summary.get("strategy", "")], ["rounds", summary.get("rounds", len(rows))],
             ["adapter parameters", params.get("adapter", "")], ["base parameters", params.get("base", "")],
             ["adapter size (float32)", Bytes(summary["adapter_bytes_float32"])
              if _number(summary.get("adapter_bytes_float32")) else ""],
             *[[f"total {k}", v] for k, v in _bytes_columns(summary.get("totals", {})).items()],
             *[[f"privacy {k}", v] for k, v in summary.get("privacy", {}).get("site_level", {}).items()
               if k in ("unit", "epsilon", "delta", "accountant")],
             *[[k, v] for k, v in summary.get("versions", {}).items()]]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fedlora run {html.escape(run_dir.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #f3f3f3; }}
.wide {{ overflow-x: auto; }}
#summary {{ max-width: 60em; line-height: 1.45; background: #f7f9fc; border: 1px solid #d8e0ea; padding: 0 1em; }}
</style></head><body>
<h1>fedlora run: {html.escape(str(run_dir))}</h1>
{summary_html(summary, rows, config, adapter)}
{_central_test(summary)}
{_drift(summary)}
{_comparison(summary)}
<h2>Per round</h2>
<div class="plots">{''.join(c for c in charts if c)}</div>
<div class="wide">{round_table}</div>
<h2>Per site</h2>
<div id="sites" class="wide">{site_table}</div>
{_per_class(rows[-1]) if rows else ""}
<h2>Run</h2>
{_table(facts, ["", "value"])}
</body></html>
"""


def write_report(run_dir: str | Path) -> Path:
    path = Path(run_dir) / "report.html"
    path.write_text(render(run_dir))
    return path


if __name__ == "__main__":
    print(write_report(sys.argv[1]))
