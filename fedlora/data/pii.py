"""Likely personal identifiers in free text: patterns a hospital should remove before training.

Heuristics, tuned to flag rather than miss: every hit is a line for a person
to look at, not a verdict. Numbers that carry a checksum (NHS number, Dutch
BSN, Swedish personnummer) are only reported when the checksum holds, which
keeps ordinary numbers out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

DATE = r"(?:\d{1,2}[./-]\d{1,2}[./-](?:19|20)?\d{2}|(?:19|20)\d{2}[./-]\d{1,2}[./-]\d{1,2}" \
       r"|\d{1,2}\s+(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+(?:19|20)\d{2})"


@dataclass(frozen=True)
class Finding:
    kind: str
    value: str   # the matched text (reports show it masked)
    start: int


def _digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _nhs_valid(text: str) -> bool:
    d = _digits(text)
    total = sum(int(c) * w for c, w in zip(d[:9], range(10, 1, -1)))
    check = 11 - total % 11
    return len(d) == 10 and (0 if check == 11 else check) == int(d[9]) and check != 10


def _bsn_valid(text: str) -> bool:
    d = _digits(text)
    return len(d) == 9 and (sum(int(c) * w for c, w in zip(d[:8], range(9, 1, -1))) - int(d[8])) % 11 == 0 \
        and d != "0" * 9


def _luhn_valid(text: str) -> bool:
    d = _digits(text)[-10:]
    total = 0
    for i, c in enumerate(reversed(d)):
        n = int(c) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return len(d) == 10 and total % 10 == 0


def _phone_like(text: str) -> bool:
    return 9 <= len(_digits(text)) <= 15


def _nanp_valid(text: str) -> bool:
    """A North-American number: area code and exchange start with 2-9, so this pattern leaves
    ranges and doses such as 120-135-1000 or (100) 200-3000 alone (the general phone pattern
    still flags any group of 9-15 digits written like a number: better one false alarm)."""
    d = _digits(text)
    d = d[1:] if len(d) == 11 else d
    return len(d) == 10 and d[0] in "23456789" and d[3] in "23456789"


PATTERNS: list[tuple[str, re.Pattern, Callable[[str], bool] | None]] = [
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), None),
    ("date of birth", re.compile(r"\b(?:d\.?o\.?b\.?|date of birth|born(?: on)?)\s*[:#-]?\s*" + DATE, re.I), None),
    ("medical record number", re.compile(
        r"\b(?:mrn|medical record(?: number| no\.?)?|patient (?:id|number)|hospital number)\s*[:#]?\s*[A-Z]{0,3}\d{5,}\b",
        re.I), None),
    ("US social security number", re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b"), None),
    ("NHS number", re.compile(r"\b\d{3}[ -]?\d{3}[ -]?\d{4}\b"), _nhs_valid),
    ("Dutch BSN", re.compile(r"\b\d{9}\b"), _bsn_valid),
    ("Swedish personnummer", re.compile(r"\b(?:19|20)?\d{6}[-+]?\d{4}\b"), _luhn_valid),
    ("national id", re.compile(r"\b(?:ssn|national (?:id|insurance)(?: number| no\.?)?|passport(?: number| no\.?)?|"
                               r"nino|nir|insee)\s*[:#]?\s*[A-Z0-9][A-Z0-9 -]{5,}\d\b", re.I), None),
    # North America: (617) 555-0142, 617-555-0142, 617.555.0142, +1 617 555 0142, 1-617-555-0142.
    ("phone number", re.compile(r"(?<![\w.+/-])(?:\+?1[\s.-]?)?(?:\(\d{3}\)[\s.-]?|\d{3}[\s.-])\d{3}[\s.-]\d{4}"
                                r"(?![\w/-]|\.\d)"), _nanp_valid),
    ("phone number", re.compile(r"(?<![\w.-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){2,4}"
                                r"(?![\w-])"), _phone_like),
]


def find_identifiers(text: str) -> Iterator[Finding]:
    """Every likely identifier in `text`; a span claimed by an earlier kind is not reported again."""
    claimed: list[tuple[int, int]] = []
    for kind, pattern, valid in PATTERNS:
        for match in pattern.finditer(text):
            span = match.span()
            if any(span[0] < end and start < span[1] for start, end in claimed):
                continue
            if valid is None or valid(match.group()):
                claimed.append(span)
                yield Finding(kind, match.group(), span[0])


def mask(value: str) -> str:
    """What a report may show of an identifier: its length, no character of it (the report is
    shared; the line number finds it in the file, and the report names its kind)."""
    return f"{len(value)} characters"
