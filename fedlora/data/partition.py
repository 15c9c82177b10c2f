"""Split one file's rows across simulated sites: iid, Dirichlet label skew, or by a column."""

from __future__ import annotations

import numpy as np

from fedlora.data.readers import DataError


def partition_indices(rows: list[dict], num_sites: int, scheme: str, seed: int = 0,
                      label_column: str = "label", alpha: float = 0.5, column: str = "") -> list[list[int]]:
    """Row indices per site. Deterministic for a seed; every row goes to exactly one site."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    if n < num_sites:
        raise DataError(f"{n} rows cannot be split across {num_sites} sites")
    if scheme == "iid":
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, num_sites)]
    if scheme == "dirichlet":
        labels = [str(r.get(label_column, "")) for r in rows]
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for label in sorted(set(labels)):
            idx = np.array([i for i, v in enumerate(labels) if v == label])
            rng.shuffle(idx)
            shares = rng.dirichlet([alpha] * num_sites)
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site] += chunk.tolist()
        # A Dirichlet draw can leave a site empty; give it rows from the largest site.
        for site in range(num_sites):
            while not parts[site]:
                donor = max(range(num_sites), key=lambda s: len(parts[s]))
                parts[site].append(parts[donor].pop())
        return [sorted(p) for p in parts]
    if scheme == "column":
        values = sorted({str(r.get(column)) for r in rows if r.get(column) is not None})
        if any(r.get(column) is None for r in rows):
            raise DataError(f"partition column {column!r} is missing in some rows")
        if len(values) != num_sites:
            raise DataError(f"partition column {column!r} has {len(values)} distinct values "
                            f"({', '.join(values[:8])}) but federation.num-sites = {num_sites}")
        return [[i for i, r in enumerate(rows) if str(r[column]) == v] for v in values]
    raise DataError(f"unknown partition scheme {scheme!r}; use iid, dirichlet or column")


def train_eval_split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic held-out split of a site's n rows (at least one training row)."""
    order = np.random.default_rng(seed).permutation(n)
    n_eval = min(int(round(n * eval_fraction)), n - 1)
    return sorted(order[n_eval:].tolist()), sorted(order[:n_eval].tolist())
