"""`fedlora site check-data PATH`: a data quality report that stays at the site.

It reads the file, prints the report (identifiers masked) and, with --json,
writes it to a local file. It opens no network connection and sends nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.data.quality import MAX_EXAMPLES, Columns, Report, analyse
from fedlora.models import load_tokenizer
from fedlora.tasks import CausalLMTask, ClassificationTask


def check_data(path: Path, task: str = "classification", text_column: str = "text", label_column: str = "label",
               labels: list[str] | None = None, max_length: int = 256, tokenizer_model: str | None = None) -> Report:
    columns = Columns(task, text_column, label_column)
    # Structure only: unknown labels are counted by the report, not rejected as schema errors.
    checker = ClassificationTask(text_column, label_column, []) if task == "classification" else CausalLMTask()
    count_tokens = None
    if tokenizer_model:
        tokenizer = load_tokenizer(tokenizer_model)
        count_tokens = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    return analyse(path, columns, checker.check_row, labels, max_length, count_tokens)


def _lines(items: list, render=str) -> str:
    shown = ", ".join(render(i) for i in items[:MAX_EXAMPLES])
    return shown + (f", … ({len(items)} in all)" if len(items) > MAX_EXAMPLES else "")


def format_report(r: Report, max_length: int) -> str:
    out = [f"Data check of {r.path} ({r.rows} rows). Nothing was sent anywhere.", ""]

    def section(title: str, count: int, body: list[str]) -> None:
        out.append(f"{'OK  ' if count == 0 else 'FIX '} {title}: {count}")
        out.extend("       " + line for line in body)

    section("rows that do not parse or do not fit the task", len(r.schema_errors),
            [f"line {n}: {why}" for n, why in r.schema_errors[:MAX_EXAMPLES]]
            + ([f"… and {len(r.schema_errors) - MAX_EXAMPLES} more"] if len(r.schema_errors) > MAX_EXAMPLES else []))
    section("empty texts", len(r.empty), [f"lines {_lines(r.empty)}"] if r.empty else [])
    section(f"texts over {max_length} {r.length_unit} (truncated in training)", len(r.too_long),
            [f"lines {_lines(r.too_long, lambda t: f'{t[0]} ({t[1]})')}"] if r.too_long else [])
    section("exact duplicate groups", len(r.exact_duplicates),
            [f"lines {_lines(g)}" for g in r.exact_duplicates[:MAX_EXAMPLES]])
    section("near-duplicate groups", len(r.near_duplicates),
            [f"lines {_lines(g)}" for g in r.near_duplicates[:MAX_EXAMPLES]])
    section("identical texts with conflicting labels", len(r.conflicting_labels),
            [f"lines {_lines(lines)}: {' / '.join(labels)}" for lines, labels in r.conflicting_labels[:MAX_EXAMPLES]])
    found = sum(len(v) for v in r.identifiers.values())
    section("likely personal identifiers (masked here; remove them before training)", found,
            [f"{kind}: {len(hits)} — lines {_lines(hits, lambda h: f'{h[0]} ({h[1]})')}"
             for kind, hits in sorted(r.identifiers.items())])
    if r.labels:
        total = sum(r.labels.values())
        out.append("")
        out.append("Label balance:")
        for label, n in r.labels.most_common():
            flag = "   (rare: under 5%)" if n / total < 0.05 else ""
            out.append(f"  {label:<24} {n:>7}  {100 * n / total:5.1f}%{flag}")
        if len(r.labels) > 1:
            out.append(f"  most / least frequent: {max(r.labels.values()) / min(r.labels.values()):.1f}×")
        if r.unknown_labels:
            out.append(f"FIX  labels not in the run's label list: {dict(r.unknown_labels)}")
        if r.missing_labels:
            out.append(f"NOTE labels with no row at this site: {', '.join(r.missing_labels)}")
    out.append("")
    out.append("No problems found." if r.problems == 0 else f"{r.problems} finding(s) to review.")
    return "\n".join(out)


def report_json(r: Report) -> str:
    return json.dumps({
        "path": str(r.path), "rows": r.rows,
        "schema_errors": [{"line": n, "problem": p} for n, p in r.schema_errors],
        "empty_lines": r.empty, "too_long": [{"line": n, "length": k} for n, k in r.too_long],
        "length_unit": r.length_unit,
        "exact_duplicates": r.exact_duplicates, "near_duplicates": r.near_duplicates,
        "conflicting_labels": [{"lines": lines, "labels": labels} for lines, labels in r.conflicting_labels],
        "labels": dict(r.labels), "unknown_labels": dict(r.unknown_labels), "missing_labels": r.missing_labels,
        "identifiers": {k: [{"line": n, "masked": m} for n, m in v] for k, v in r.identifiers.items()},
    }, indent=2)
