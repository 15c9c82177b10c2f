"""Blind human review at a site: two models' outputs on the site's own held-out rows, rated by its expert.

In an evaluation-only run (model.compare-with) each site keeps, in its state folder, what the candidate
and the current model output for its first held-out rows (`reviews/PAIR/candidate.json`, `current.json`,
mode 600: they hold the rows' text and never leave the site). `fedlora site review` serves them on the
site's own machine as blind pairs (which side is which model is drawn at random per row and kept here),
and records each verdict here. Only the counts (`counts`: the candidate's wins, ties and losses, and how
many rows were not rated or had the same output from both) may go upstream, when the coordinator asks
for them in a later evaluation-only run of the same two models (wire.REVIEW_PAIR).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedlora.client.private_files import write_private
from fedlora.locks import exclusive

FOLDER = "reviews"
ROLES = ("candidate", "current")
VERDICTS = ("A", "B", "tie")
ASSIGNMENT = "assignment.json"  # which side shows which model, per row: drawn once, kept at the site
RATINGS = "verdicts.json"
_PAIR = re.compile(r"^[0-9a-f]{16}-vs-[0-9a-f]{16}$")


class ReviewError(ValueError):
    pass


def _write_private(path: Path, content: Any) -> None:
    """As JSON, in a folder only the site's account may list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    write_private(path, json.dumps(content))


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One writer of a review at a time: the page's requests, a second page, the ClientApp."""
    folder.mkdir(parents=True, exist_ok=True)
    with exclusive(folder / ".lock"):
        yield


def _read(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _folder(state: Path, pair: str) -> Path:
    if not _PAIR.fullmatch(pair):
        raise ReviewError(f"not a review: {pair!r}")
    return Path(state) / FOLDER / pair


def keep_outputs(state: Path, pair: str, role: str, prompts: list[str], outputs: list[str]) -> None:
    """What one model output for the site's review rows, kept at the site (an evaluation message)."""
    if role not in ROLES:
        raise ReviewError(f"review role {role!r} is not one of {ROLES}")
    folder = _folder(state, pair)
    with _locked(folder):
        _write_private(folder / f"{role}.json", [{"prompt": p, "output": o} for p, o in zip(prompts, outputs)])


def has_outputs(state: Path, pair: str, role: str) -> bool:
    return (_folder(state, pair) / f"{role}.json").is_file()


def pending(state: Path) -> list[str]:
    """The reviews whose two models' outputs are both here, newest first."""
    root = Path(state) / FOLDER
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _PAIR.fullmatch(p.name) and all((p / f"{r}.json").is_file() for r in ROLES)]
    return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]


def items(state: Path, pair: str) -> list[dict[str, Any]]:
    """The rows to rate, blind: each row's prompt and outputs A and B (which is which is drawn once per
    row and kept here); rows where both models output the same are left out (nothing to choose)."""
    with _locked(_folder(state, pair)):
        return _items(state, pair)


def _items(state: Path, pair: str) -> list[dict[str, Any]]:
    folder = _folder(state, pair)
    candidate, current = (_read(folder / f"{role}.json", []) for role in ROLES)
    if len(candidate) != len(current) or [r["prompt"] for r in candidate] != [r["prompt"] for r in current]:
        raise ReviewError(f"review {pair}: the two models' outputs are not on the same rows")
    assignment = _read(folder / ASSIGNMENT, None)
    if assignment is None or len(assignment) != len(candidate):
        assignment = ["candidate" if secrets.randbits(1) else "current" for _ in candidate]  # which one is A
        _write_private(folder / ASSIGNMENT, assignment)
    ratings = _read(folder / RATINGS, {})
    shown = []
    for i, (new, old) in enumerate(zip(candidate, current)):
        if new["output"] == old["output"]:
            continue
        a, b = (new, old) if assignment[i] == "candidate" else (old, new)
        shown.append({"index": i, "prompt": new["prompt"], "A": a["output"], "B": b["output"],
                      "verdict": ratings.get(str(i))})
    return shown


def rate(state: Path, pair: str, index: int, verdict: str) -> None:
    """The expert's verdict on row `index`: output A better, B better, or a tie."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict {verdict!r} is not one of {VERDICTS}")
    folder = _folder(state, pair)
    with _locked(folder):
        if index not in {item["index"] for item in _items(state, pair)}:
            raise ReviewError(f"review {pair} has no row {index} to rate")
        ratings = _read(folder / RATINGS, {})
        ratings[str(index)] = verdict
        _write_private(folder / RATINGS, ratings)


def counts(state: Path, pair: str) -> dict[str, int] | None:
    """What may leave the site: the candidate's wins, ties and losses over the rated rows, and how many
    rows had the same output (not shown) or are not rated yet; None when the site has no such review."""
    folder = _folder(state, pair)
    if not all((folder / f"{role}.json").is_file() for role in ROLES):
        return None
    candidate = _read(folder / "candidate.json", [])
    shown = items(state, pair)
    assignment = _read(folder / ASSIGNMENT, [])
    out = {"wins": 0, "ties": 0, "losses": 0, "same": len(candidate) - len(shown), "unrated": 0}
    for item in shown:
        verdict = item["verdict"]
        if verdict is None:
            out["unrated"] += 1
        elif verdict == "tie":
            out["ties"] += 1
        else:
            chosen = assignment[item["index"]] if verdict == "A" else \
                ("current" if assignment[item["index"]] == "candidate" else "candidate")
            out["wins" if chosen == "candidate" else "losses"] += 1
    return out


def win_rate(c: dict[str, int]) -> float | None:
    """Wins plus half the ties, over the rated rows (None before any is rated)."""
    rated = c.get("wins", 0) + c.get("ties", 0) + c.get("losses", 0)
    return (c.get("wins", 0) + 0.5 * c.get("ties", 0)) / rated if rated else None
