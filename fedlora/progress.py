"""Progress bars for long command-line work, and only where a person watches; following a run.

A bar (tqdm) goes to stderr, and only when stderr is a terminal and
FEDLORA_NO_PROGRESS is not 1; otherwise `progress` hands the items through
untouched, so logs, pipes, CI and tests see no bar at all. Lines a command
prints while a bar is shown go through `echo`, which lifts the bar out of the
way instead of writing into it. `watch_rounds` follows a run directory's
metrics.jsonl as the coordinator writes it, and `round_line` is the line
`fedlora simulate` and `fedlora run` print for each round.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def enabled() -> bool:
    """Whether a bar would be shown now."""
    if os.environ.get("FEDLORA_NO_PROGRESS") == "1":
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable[T], label: str, total: int | None = None, *, unit: str = "it") -> Iterator[T]:
    """Every item of `iterable`, in order, with a bar labelled `label` on stderr when enabled
    (`total`: the items expected, when `iterable` cannot tell; `unit`: what one item is)."""
    if not enabled():
        yield from iterable
        return
    with tqdm(iterable, desc=label, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield from bar


def echo(line: str) -> None:
    """Print one line to stdout without breaking a bar that is on the same terminal."""
    if enabled():  # a bar may be shown: tqdm clears it, writes the line, redraws it
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)


# -- following a run -------------------------------------------------------------------------
def round_line(row: dict, rounds: int) -> str:
    """The one line of progress printed for a round's metrics row."""
    parts = [f"round {row['round']}/{rounds}"]
    for key in ("train_loss", "eval_loss", "eval_accuracy", "eval_macro_f1", "test_accuracy",
                "test_macro_f1", "eval_perplexity", "epsilon"):
        if key in row:
            parts.append(f"{key} {row[key]:.4f}")
    parts.append(f"{row['round_seconds']:.1f}s")
    return "  " + " · ".join(parts)


def _written_rows(rundir: Path) -> list[dict]:
    """The complete rows of rundir/metrics.jsonl (a line still being appended is left for later)."""
    metrics = rundir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().split("\n")[:-1] if line.strip()]


def watch_rounds(rundir: Path, running: Callable[[], bool], poll: float = 1.0) -> Iterator[dict]:
    """Each row of rundir/metrics.jsonl as the coordinator writes it, while `running()` holds,
    then the rows written before it stopped."""
    shown = 0
    while True:
        still = running()
        rows = _written_rows(rundir)
        shown = min(shown, len(rows))  # a resumed run drops the rows after its checkpoint
        yield from rows[shown:]
        shown = len(rows)
        if not still:
            return
        time.sleep(poll)
