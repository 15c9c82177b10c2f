"""Which rows a site trains and evaluates on.

Deployment: the site's node configuration names its own file (`data-path`).
Simulation: site k of N reads its share of `data.path` (a folder with one file
per site, or one file partitioned), or generates its share of the synthetic
corpus. Each site reads and splits its own data in its own process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedlora.data import synthetic
from fedlora.data.partition import partition_indices, train_eval_split
from fedlora.data.readers import DataError, read_rows, site_files


@dataclass
class SiteData:
    name: str
    train: list[dict]
    eval: list[dict]
    skipped: list[tuple[int, str]] = field(default_factory=list)
    source: str = ""


def _split(name: str, rows: list[dict], config, skipped=(), source: str = "") -> SiteData:
    train_idx, eval_idx = train_eval_split(len(rows), config.data.eval_fraction, config.data.seed)
    return SiteData(name, [rows[i] for i in train_idx], [rows[i] for i in eval_idx], list(skipped), source)


def deployed_site_data(path: str, site_name: str, config, task) -> SiteData:
    site = read_rows(path, task.check_row, config.data.skip_bad_rows)
    return _split(site_name, site.rows, config, site.skipped, str(site.path))


def simulated_site_data(partition_id: int, num_partitions: int, config, task) -> SiteData:
    d = config.data
    if not d.path:
        alpha = None if d.partition == "iid" else d.dirichlet_alpha  # the corpus honours the partition keys
        rows = synthetic.site_records(partition_id, num_partitions, d.records_per_site, d.seed, alpha)
        return _split(f"site-{partition_id}", rows, config, source="synthetic triage corpus")
    path = Path(d.path)
    if path.is_dir():
        files = site_files(path)
        if len(files) != num_partitions:
            raise DataError(f"{path} holds {len(files)} site files but the simulation has {num_partitions} sites")
        name, file = list(files.items())[partition_id]
        return deployed_site_data(str(file), name, config, task)
    whole = read_rows(path, task.check_row, d.skip_bad_rows)
    label_column = getattr(task, "label_column", "label")
    parts = partition_indices(whole.rows, num_partitions, d.partition, d.seed, label_column,
                              d.dirichlet_alpha, d.partition_column)
    rows = [whole.rows[i] for i in parts[partition_id]]
    return _split(f"site-{partition_id}", rows, config, whole.skipped if partition_id == 0 else [], str(path))


def central_test_rows(config, task) -> list[dict] | None:
    """The coordinator's test rows: data.test-path, or the synthetic corpus' test set."""
    if config.data.test_path:
        return read_rows(config.data.test_path, task.check_row, config.data.skip_bad_rows).rows
    if not config.data.path:
        return synthetic.central_test_records(seed=config.data.seed)
    return None


def check_site_data(config, task) -> int:
    """Read every row of the simulated sites' data and of the central test set, as the sites and
    the coordinator will, so a bad row is reported before a federation starts (DataError);
    returns the rows read."""
    d = config.data
    files = [] if not d.path else list(site_files(d.path).values()) if Path(d.path).is_dir() else [Path(d.path)]
    files += [Path(d.test_path)] if d.test_path else []
    return sum(len(read_rows(f, task.check_row, d.skip_bad_rows).rows) for f in files)
