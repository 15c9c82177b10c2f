"""A data quality report for one site file. Pure analysis: it reads rows, it sends nothing.

Findings: rows that do not parse or do not fit the task (with line numbers),
empty and over-long texts, exact and near duplicates, identical texts with
conflicting labels, the label balance, and likely personal identifiers.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fedlora.data.pii import find_identifiers, mask
from fedlora.data.readers import DataError, numbered_rows

NEAR_DUPLICATE_JACCARD = 0.8   # word-trigram overlap above which two texts count as near duplicates
MINHASH_BANDS, MINHASH_ROWS = 10, 4  # LSH: a pair at Jaccard 0.8 shares a band with probability 0.995
MAX_EXAMPLES = 5


@dataclass
class Report:
    path: Path
    rows: int = 0
    schema_errors: list[tuple[int, str]] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    too_long: list[tuple[int, int]] = field(default_factory=list)          # (line, length in tokens)
    exact_duplicates: list[list[int]] = field(default_factory=list)        # groups of lines
    near_duplicates: list[list[int]] = field(default_factory=list)
    conflicting_labels: list[tuple[list[int], list[str]]] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    unknown_labels: Counter = field(default_factory=Counter)
    missing_labels: list[str] = field(default_factory=list)
    identifiers: dict[str, list[tuple[int, str]]] = field(default_factory=dict)  # kind -> (line, masked)
    length_unit: str = "words"

    @property
    def problems(self) -> int:
        return (len(self.schema_errors) + len(self.empty) + len(self.too_long) + len(self.exact_duplicates)
                + len(self.near_duplicates) + len(self.conflicting_labels)
                + sum(len(v) for v in self.identifiers.values()) + sum(self.unknown_labels.values()))


@dataclass(frozen=True)
class Columns:
    """Where the text and the label are: classification (text/label) or causal LM (prompt + completion...)."""
    task: str = "classification"
    text: str = "text"
    label: str = "label"

    def text_of(self, row: dict) -> str | None:
        if self.task == "classification":
            value = row.get(self.text)
            return value if isinstance(value, str) else None
        if isinstance(row.get("messages"), list):
            return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
        parts = [row.get(k) for k in ("instruction", "input", "prompt", "output", "completion", "response")]
        texts = [p for p in parts if isinstance(p, str)]
        return "\n".join(texts) if texts else None

    def label_of(self, row: dict) -> str | None:
        if self.task != "classification":
            return None
        value = row.get(self.label)
        return None if value is None or str(value) == "" else str(value)


def normalize(text: str) -> str:
    """Case, accents, digits, punctuation and spacing do not make a text new."""
    text = unicodedata.normalize("NFKD", text.lower())
    text = re.sub(r"\d+", "0", text)
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _shingles(text: str) -> set[str]:
    words = normalize(text).split()
    return {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}


def _minhash(shingles: set[str]) -> list[int]:
    hashed = [zlib.crc32(s.encode()) for s in shingles]
    # Permutations h_i(x) = (a_i * x + b_i) mod p, fixed so the report is reproducible.
    p = (1 << 61) - 1
    return [min(((2 * i + 1) * 0x9E3779B97F4A7C15 * h + i * 0x632BE59BD9B4E019) % p for h in hashed)
            for i in range(MINHASH_BANDS * MINHASH_ROWS)]


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _groups(pairs: list[tuple[int, int]]) -> list[list[int]]:
    """Connected components of index pairs (union-find)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    groups: dict[int, list[int]] = defaultdict(list)
    for x in parent:
        groups[find(x)].append(x)
    return sorted(sorted(g) for g in groups.values())


def near_duplicate_pairs(texts: list[str]) -> list[tuple[int, int]]:
    """Index pairs whose word-trigram Jaccard similarity is at least NEAR_DUPLICATE_JACCARD."""
    shingles = [_shingles(t) for t in texts]
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, sh in enumerate(shingles):
        signature = _minhash(sh)
        for band in range(MINHASH_BANDS):
            buckets[(band, *signature[band * MINHASH_ROWS:(band + 1) * MINHASH_ROWS])].append(i)
    candidates = {(a, b) for members in buckets.values() for k, a in enumerate(members) for b in members[k + 1:]}
    return sorted((a, b) for a, b in candidates if _jaccard(shingles[a], shingles[b]) >= NEAR_DUPLICATE_JACCARD)


def analyse(path: str | Path, columns: Columns, check: Callable[[dict], str | None],
            expected_labels: list[str] | None = None, max_length: int = 256,
            count_tokens: Callable[[str], int] | None = None) -> Report:
    """Read every row of `path` and report what is wrong or risky in it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    report = Report(path, length_unit="tokens" if count_tokens else "words")
    count = count_tokens or (lambda t: len(t.split()))
    lines, texts, labels = [], [], []
    for lineno, row in numbered_rows(path):
        report.rows += 1
        if isinstance(row, str):
            report.schema_errors.append((lineno, row))
            continue
        text = columns.text_of(row)
        if text is not None and not text.strip():
            report.empty.append(lineno)
            continue
        problem = check(row)
        if problem:
            report.schema_errors.append((lineno, problem))
            continue
        if count(text) > max_length:
            report.too_long.append((lineno, count(text)))
        for finding in find_identifiers(text):
            report.identifiers.setdefault(finding.kind, []).append((lineno, mask(finding.value)))
        lines.append(lineno)
        texts.append(text)
        labels.append(columns.label_of(row))

    by_text: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        by_text[text.strip()].append(i)
    report.exact_duplicates = [[lines[i] for i in g] for g in by_text.values() if len(g) > 1]
    distinct = list(by_text.values())  # near duplicates among distinct texts; copies go with their text
    pairs = near_duplicate_pairs([texts[g[0]] for g in distinct])
    report.near_duplicates = [sorted(lines[i] for k in group for i in distinct[k]) for group in _groups(pairs)]

    by_normal: dict[str, list[int]] = defaultdict(list)
    for i, text in enumerate(texts):
        by_normal[normalize(text)].append(i)
    for group in by_normal.values():
        distinct = sorted({labels[i] for i in group if labels[i] is not None})
        if len(distinct) > 1:
            report.conflicting_labels.append(([lines[i] for i in group], distinct))

    report.labels = Counter(label for label in labels if label is not None)
    if expected_labels:
        report.unknown_labels = Counter({k: v for k, v in report.labels.items() if k not in expected_labels})
        report.missing_labels = [label for label in expected_labels if label not in report.labels]
    return report
