"""Read one site's rows from .jsonl, .csv or .parquet, checking every row.

A bad row is an error naming the file, the line and the problem. Rows are only
skipped when the caller asks, and then every skip is counted and returned.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

SUFFIXES = (".jsonl", ".csv", ".parquet")

Row = dict
RowCheck = Callable[[Row], "str | None"]  # returns the problem, or None when the row is fine


class DataError(ValueError):
    """A data file or row is unusable; the message names the file and line (and may quote the row:
    it stays at the site). `bad_rows` counts the unusable rows, the only part a site may report."""

    def __init__(self, message: str, bad_rows: int = 0):
        super().__init__(message)
        self.bad_rows = bad_rows


@dataclass
class SiteRows:
    path: Path
    rows: list[Row]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, problem)


def _raw_rows(path: Path):
    """Yield (line number, row or problem string)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield lineno, f"not valid JSON ({err.msg})"
                    continue
                yield lineno, row if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames:
                raise DataError(f"{path}: empty CSV file (no header line)")
            for row in reader:
                lineno = reader.line_num
                if None in row:
                    yield lineno, f"more fields than the header's {len(reader.fieldnames)}"
                elif any(v is None for v in row.values()):
                    yield lineno, f"fewer fields than the header's {len(reader.fieldnames)}"
                else:
                    yield lineno, row
    elif suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: cannot read Parquet file: {err}") from None
        for index, row in enumerate(table.to_pylist(), start=1):
            yield index, row  # "line" = 1-based row number for Parquet
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def numbered_rows(path: str | Path):
    """Yield (line number, row) for every row of a site file, or (line number, problem)
    for a row that cannot be parsed (used by `fedlora site check-data`)."""
    return _raw_rows(Path(path))


def read_rows(path: str | Path, check: RowCheck, skip_bad_rows: bool = False) -> SiteRows:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    where = "row" if path.suffix.lower() == ".parquet" else "line"
    rows: list[Row] = []
    skipped: list[tuple[int, str]] = []
    for lineno, row in _raw_rows(path):
        problem = row if isinstance(row, str) else check(row)
        if problem is None:
            rows.append(row)
        else:
            skipped.append((lineno, problem))
    if skipped and not skip_bad_rows:
        (lineno, problem), more = skipped[0], len(skipped) - 1
        raise DataError(f"{path}, {where} {lineno}: {problem}" + (f" (and {more} more bad rows)" if more else "")
                        + " (set data.skip-bad-rows = true to skip and count such rows)", bad_rows=len(skipped))
    if not rows:
        raise DataError(f"{path}: no usable rows" + (f" ({len(skipped)} skipped)" if skipped else ""))
    return SiteRows(path, rows, skipped)


def site_files(folder: str | Path) -> dict[str, Path]:
    """A folder's site files, site name = file stem, in a stable order."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no site files ({', '.join('*' + s for s in SUFFIXES)})")
    names: dict[str, Path] = {}
    for p in files:
        if p.stem in names:
            raise DataError(f"{folder}: two files for site {p.stem!r}: {names[p.stem].name}, {p.name}")
        names[p.stem] = p
    return names
