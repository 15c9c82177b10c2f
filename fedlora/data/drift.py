"""How far a site's data has moved from what it trained on: the statistics, nothing else.

A training snapshot (`profile`) holds aggregate statistics of the rows a site
trained on: the record count, the label counts and a word-frequency table. The
same profile of the rows the site has now is compared with it:
- label mix: population stability index (PSI) and a chi-square test of
  homogeneity (the two samples, snapshot and now, drawn from one mix?);
- text: Jensen-Shannon divergence of the word distributions (base 2, so 0 for
  identical and 1 for disjoint vocabularies) and the share of word
  occurrences now whose word the snapshot never saw.
`verdict` turns the figures, and an accuracy drop when one was measured, into
"retraining due: yes/no, because ...". Word tables and label counts stay at
the site; only the figures of `Figures` are fit to leave it (docs/drift.md).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# the chi-square survival function from scipy.special: scipy.stats costs half a second to import
from scipy.special import chdtrc

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")  # letters only: numbers (ages, doses, dates) are not vocabulary
PSI_FLOOR = 1e-4  # a label absent on one side counts as this share, so PSI stays finite


def words(text: str) -> list[str]:
    """The words of a text, lower-cased, letters only."""
    return WORD.findall(text.lower())


def profile(rows: Iterable[Mapping], text_column: str = "text", label_column: str | None = "label") -> dict:
    """Aggregate statistics of `rows`: record count, label counts (rows with a label), word counts."""
    records, labels, vocabulary = 0, Counter(), Counter()
    for row in rows:
        records += 1
        vocabulary.update(words(str(row.get(text_column) or "")))
        if label_column is not None and row.get(label_column) not in (None, ""):
            labels[str(row[label_column])] += 1
    return {"records": records, "label_counts": dict(sorted(labels.items())),
            "word_counts": dict(sorted(vocabulary.items()))}


def _shares(counts: Mapping[str, float], keys: list[str]) -> list[float]:
    total = sum(counts.get(k, 0) for k in keys)
    return [counts.get(k, 0) / total if total else 0.0 for k in keys]


def psi(expected: Mapping[str, float], actual: Mapping[str, float], floor: float = PSI_FLOOR) -> float:
    """Population stability index of `actual` against `expected` (counts or shares by category):
    sum over categories of (a - e) * ln(a / e), shares floored at `floor`. 0: the same mix;
    by convention < 0.1 stable, 0.1-0.2 moderate, >= 0.2 a major shift."""
    keys = sorted(set(expected) | set(actual))
    e, a = _shares(expected, keys), _shares(actual, keys)
    return float(sum((max(ai, floor) - max(ei, floor)) * math.log(max(ai, floor) / max(ei, floor))
                     for ei, ai in zip(e, a)))


@dataclass(frozen=True)
class ChiSquare:
    statistic: float
    dof: int
    p_value: float


def chi_square(first: Mapping[str, int], second: Mapping[str, int]) -> ChiSquare:
    """Chi-square test of homogeneity of two samples' category counts (a 2 x k table, no continuity
    correction); categories empty in both are left out. p = 1 when there is nothing to compare."""
    keys = sorted(k for k in set(first) | set(second) if first.get(k, 0) + second.get(k, 0) > 0)
    rows = [[first.get(k, 0) for k in keys], [second.get(k, 0) for k in keys]]
    totals = [sum(r) for r in rows]
    if len(keys) < 2 or 0 in totals:
        return ChiSquare(0.0, 0, 1.0)
    n = sum(totals)
    column = [rows[0][j] + rows[1][j] for j in range(len(keys))]
    statistic = sum((rows[i][j] - totals[i] * column[j] / n) ** 2 / (totals[i] * column[j] / n)
                    for i in range(2) for j in range(len(keys)))
    dof = len(keys) - 1
    return ChiSquare(float(statistic), dof, float(chdtrc(dof, statistic)))


def js_divergence(first: Mapping[str, float], second: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two distributions given as counts or shares."""
    keys = sorted(set(first) | set(second))
    p, q = _shares(first, keys), _shares(second, keys)
    if not any(p) or not any(q):
        return 0.0 if not any(p) and not any(q) else 1.0

    def kl_to_mean(x: list[float], y: list[float]) -> float:
        return sum(xi * math.log2(2 * xi / (xi + yi)) for xi, yi in zip(x, y) if xi > 0)

    return float(min(1.0, max(0.0, 0.5 * kl_to_mean(p, q) + 0.5 * kl_to_mean(q, p))))


def unseen_share(seen: Mapping[str, int], now: Mapping[str, int]) -> float:
    """Share of the word occurrences in `now` whose word does not occur in `seen`."""
    total = sum(now.values())
    return float(sum(c for w, c in now.items() if w not in seen) / total) if total else 0.0


@dataclass(frozen=True)
class Figures:
    """Aggregate drift figures: no word, no label name, no single record behind any of them."""

    label_psi: float | None        # None: no labelled rows on one side
    label_chi2: float | None
    label_chi2_dof: int | None
    label_chi2_p: float | None
    text_js: float
    unseen_word_share: float
    records_then: int
    records_now: int


def compare(then: Mapping, now: Mapping) -> Figures:
    """The figures of `now` (a profile) against `then` (the training snapshot's profile)."""
    labelled = then["label_counts"] and now["label_counts"]
    chi = chi_square(then["label_counts"], now["label_counts"]) if labelled else None
    return Figures(
        label_psi=psi(then["label_counts"], now["label_counts"]) if labelled else None,
        label_chi2=chi.statistic if chi else None, label_chi2_dof=chi.dof if chi else None,
        label_chi2_p=chi.p_value if chi else None,
        text_js=js_divergence(then["word_counts"], now["word_counts"]),
        unseen_word_share=unseen_share(then["word_counts"], now["word_counts"]),
        records_then=int(then["records"]), records_now=int(now["records"]))


DUE_EXIT = 3  # a drift check's exit code when retraining is due: not an error, something for an operator to act on


@dataclass(frozen=True)
class Thresholds:
    """When retraining is due (docs/drift.md explains the defaults)."""

    psi: float = 0.2             # label mix: a major shift by the usual PSI convention ...
    chi2_p: float = 0.01         # ... and significant, so a small sample's noise does not trigger it
    js: float = 0.1              # word distributions
    unseen: float = 0.1          # share of words the model never saw at training
    accuracy_drop: float = 0.05  # accuracy on newly labelled records below the accuracy at training
    max_age_days: float = 365.0  # retrain at least this often, whatever the figures; 0: no limit


@dataclass
class Verdict:
    due: bool
    reasons: list[str] = field(default_factory=list)     # why it is due (each threshold crossed)
    within: list[str] = field(default_factory=list)      # what was checked and stayed within its threshold

    def line(self) -> str:
        if self.due:
            return "retraining due: yes, because " + "; ".join(self.reasons)
        return "retraining due: no, because " + ("; ".join(self.within) or "nothing was measured")


def verdict(figures: Figures, limits: Thresholds | None = None, accuracy_then: float | None = None,
            accuracy_now: float | None = None, age_days: float | None = None) -> Verdict:
    """Whether retraining is due by `limits`, with the reasons in words."""
    limits = limits or Thresholds()
    v = Verdict(False)

    def check(crossed: bool, yes: str, no: str) -> None:
        (v.reasons if crossed else v.within).append(yes if crossed else no)

    if figures.label_psi is not None:
        shifted = figures.label_psi >= limits.psi and figures.label_chi2_p < limits.chi2_p
        check(shifted, f"the label mix shifted (PSI {figures.label_psi:.3f} >= {limits.psi}, chi-square "
                       f"p {figures.label_chi2_p:.2g} < {limits.chi2_p})",
              f"the label mix is stable (PSI {figures.label_psi:.3f} < {limits.psi} or chi-square p "
              f"{figures.label_chi2_p:.2g} >= {limits.chi2_p})")
    check(figures.text_js >= limits.js, f"the wording moved (Jensen-Shannon {figures.text_js:.3f} >= {limits.js})",
          f"the wording is close (Jensen-Shannon {figures.text_js:.3f} < {limits.js})")
    check(figures.unseen_word_share >= limits.unseen,
          f"{figures.unseen_word_share:.1%} of words were never seen in training (>= {limits.unseen:.0%})",
          f"{figures.unseen_word_share:.1%} of words are new (< {limits.unseen:.0%})")
    if accuracy_now is not None and accuracy_then is not None:
        drop = accuracy_then - accuracy_now
        check(drop >= limits.accuracy_drop,
              f"accuracy fell from {accuracy_then:.3f} to {accuracy_now:.3f} (drop {drop:.3f} >= "
              f"{limits.accuracy_drop})",
              f"accuracy {accuracy_now:.3f} against {accuracy_then:.3f} at training (drop < {limits.accuracy_drop})")
    if age_days is not None and limits.max_age_days > 0:
        check(age_days >= limits.max_age_days,
              f"the last training was {age_days:.0f} days ago (>= {limits.max_age_days:.0f})",
              f"the last training was {age_days:.0f} days ago")
    v.due = bool(v.reasons)
    return v
