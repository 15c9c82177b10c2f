"""Progress bars for long command-line work, and only where a person watches.

A bar (tqdm) goes to stderr, and only when stderr is a terminal and
FEDLORA_NO_PROGRESS is not 1; otherwise `progress` hands the items through
untouched, so logs, pipes, CI and tests see no bar at all. Lines a command
prints while a bar is shown go through `echo`, which lifts the bar out of the
way instead of writing into it.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

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
    from tqdm import tqdm

    with tqdm(iterable, desc=label, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True) as bar:
        yield from bar


def echo(line: str) -> None:
    """Print one line to stdout without breaking a bar that is on the same terminal."""
    if enabled():  # a bar may be shown: tqdm clears it, writes the line, redraws it
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    else:
        print(line, flush=True)
