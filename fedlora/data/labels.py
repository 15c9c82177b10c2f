"""The label names of a classification run, from the configuration or the data."""

from __future__ import annotations

from pathlib import Path

from fedlora import config as cfg
from fedlora.data import synthetic
from fedlora.data.readers import read_rows, site_files


def infer_labels(config: cfg.RunConfig) -> cfg.RunConfig:
    """Fill task.labels from the data when a classification run leaves it empty: the synthetic
    corpus' departments, or every label value in data.path, sorted."""
    if config.task.type != "classification" or config.task.labels:
        return config
    if not config.data.path:
        labels = synthetic.LABELS
    else:
        path = Path(config.data.path)
        files = list(site_files(path).values()) if path.is_dir() else [path]
        column = config.task.label_column

        def check(row: dict) -> str | None:
            return None if row.get(column) not in (None, "") else f"column {column!r} missing"

        seen: set[str] = set()
        for f in files:
            seen.update(str(r[column]) for r in read_rows(f, check, config.data.skip_bad_rows).rows)
        labels = sorted(seen)
    return cfg.from_nested(config.to_nested(), {"task.labels": list(labels)})
