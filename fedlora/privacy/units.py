"""The unit of privacy and how DP-SGD samples it.

Record-level (the default): each training record is a unit. With a grouping
column (e.g. `patient-id`), all records sharing a value form one unit: batches
are drawn by Poisson sampling of units, and a sampled unit contributes at most
`max_records_per_unit` records, each clipped to C. One unit then changes a
step's gradient sum by at most k·C, so the noise is scaled by k and the
guarantee is per patient, at sampling rate q = expected units per batch / units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RECORD = "record"


class UnitError(ValueError):
    """The grouping column is missing from a training row."""


@dataclass(frozen=True)
class PrivacyUnits:
    name: str                      # "record", or the grouping column
    groups: tuple[tuple[int, ...], ...]   # example indices of each unit
    max_records_per_unit: int      # k: records of one unit used in one step

    @property
    def count(self) -> int:
        return len(self.groups)

    @property
    def sensitivity_factor(self) -> int:
        """How many clipped records one unit can put into one step. It is k, not the
        largest group here: the neighbouring dataset may hold a patient with k records."""
        return self.max_records_per_unit

    def expected_records(self, sample_rate: float) -> float:
        return sample_rate * sum(min(len(g), self.max_records_per_unit) for g in self.groups)

    def describe(self) -> str:
        if self.name == RECORD:
            return "record"
        return f"{self.name} (at most {self.sensitivity_factor} records per step)"


def build_units(rows: list[dict], column: str, max_records_per_unit: int) -> PrivacyUnits:
    """Units over `rows` (the order of the encoded training examples)."""
    if not column:
        return PrivacyUnits(RECORD, tuple((i,) for i in range(len(rows))), 1)
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        value = row.get(column)
        if value is None or str(value) == "":
            # A record without its patient could belong to any patient: refuse rather than guess.
            raise UnitError(f"training row {i} has no value in the unit-of-privacy column {column!r}")
        groups.setdefault(str(value), []).append(i)
    return PrivacyUnits(column, tuple(tuple(g) for g in groups.values()), max_records_per_unit)


def poisson_batches(units: PrivacyUnits, sample_rate: float, steps: int, generator: torch.Generator):
    """Yield `steps` batches of example indices; a batch may be empty, and an empty
    batch is still a step (noise only) that the accountant counts."""
    k = units.max_records_per_unit
    for _ in range(steps):
        chosen = torch.nonzero(torch.rand(units.count, generator=generator) < sample_rate).flatten().tolist()
        batch: list[int] = []
        for u in chosen:
            group = units.groups[u]
            if len(group) <= k:
                batch.extend(group)
            else:
                pick = torch.randperm(len(group), generator=generator)[:k].tolist()
                batch.extend(group[j] for j in sorted(pick))
        yield batch
