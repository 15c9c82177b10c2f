"""What every benchmark suite of `fedlora bench` returns, and the helpers they share.

A suite is a module in fedlora/bench/ with

    NAME = "quality"            # key in the JSON file and marker in BENCHMARKS.md
    TITLE = "Quality"           # the BENCHMARKS.md section heading
    def run(ctx: BenchContext) -> SuiteResult

The runner (fedlora/bench/runner.py) calls the suites in order, stores every
figure in one JSON file with the exact command and versions, and replaces each
suite's section of BENCHMARKS.md. Figures that compare are ratios measured in
the same run: a suite times its variants itself, interleaved where it can, so
load from other processes on a shared machine hits every variant alike.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


@dataclass
class BenchContext:
    quick: bool                  # a few minutes on 2 cores (tiny models, few rounds); else the full suite
    workdir: Path                # scratch space for run directories; a suite uses workdir / NAME
    progress: Callable[[Iterable, str], Iterable] = lambda items, label: items  # wraps long loops (tqdm)

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class SuiteResult:
    figures: dict[str, Any]      # every number the section quotes (JSON-serializable)
    markdown: str                # the section body (tables and a short reading), without its heading
    notes: list[str] = field(default_factory=list)  # caveats worth printing at the end


def cell(value: Any) -> str:
    """A table cell: – for missing, floats to 3 decimals (3 significant digits when tiny or huge)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.3f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table of `cell`s."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def torch_threads() -> int:
    """Threads a benchmark should give torch: all cores unless the user capped them."""
    return int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
