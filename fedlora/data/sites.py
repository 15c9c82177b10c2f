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
        rows = synthetic.records(d.synthetic_variant, partition_id, num_partitions, d.records_per_site, d.seed, alpha)
        return _split(f"site-{partition_id}", rows, config, source=_corpus(d.synthetic_variant))
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


def _corpus(variant: str) -> str:
    return "synthetic triage corpus" if variant == "original" else f"synthetic triage corpus ({variant})"


@dataclass
class CentralTestSet:
    """What the coordinator scores the global adapter on, and what that is, in words."""

    set: str                # "file" (data.test-path), "synthetic" (the corpus' test set) or "none"
    rows: list[dict]
    about: str              # for summary.json and report.html
    file: str = ""          # data.test-path's file name (never a path: a report travels)

    def summary(self) -> dict:
        out = {"set": self.set, **({"file": self.file} if self.file else {})}
        return {**out, **({"rows": len(self.rows)} if self.set != "none" else {}), "about": self.about}


NO_CENTRAL_TEST = ("no central test set ({why}, and data.test-path is not set): the coordinator evaluated "
                   "nothing itself, so there are no test_* figures and no predictions.jsonl; the figures "
                   "are the sites' own evaluation on their held-out rows (eval_*, pooled over the sites)")


def central_test_set(config, task, simulated_sites: bool) -> CentralTestSet:
    """The coordinator's test set, only when it belongs to the run: data.test-path, or the
    synthetic corpus' test set when the sites train on that corpus (`simulated_sites`: the sites
    read the run's data, as in a simulation, not files of their own, as deployed sites do)."""
    d = config.data
    if d.test_path:
        rows = read_rows(d.test_path, task.check_row, d.skip_bad_rows).rows
        name = Path(d.test_path).name
        return CentralTestSet("file", rows, f"the central test file {name} (data.test-path, {len(rows)} rows): "
                                            f"test_* are the coordinator's scores on it", name)
    if simulated_sites and not d.path:
        rows = synthetic.variant_test_records(d.synthetic_variant, seed=d.seed)
        which = "" if d.synthetic_variant == "original" else f"{d.synthetic_variant} "
        return CentralTestSet("synthetic", rows, f"the {which}synthetic corpus' held-out test set ({len(rows)} "
                                                 f"notes), the corpus the simulated sites train on: test_* are "
                                                 f"the coordinator's scores on it")
    why = "the simulated sites train on data.path" if simulated_sites else "the sites train on their own data"
    return CentralTestSet("none", [], NO_CENTRAL_TEST.format(why=why))


def central_test_rows(config, task) -> list[dict] | None:
    """A simulation's central test rows (data.test-path, or the synthetic corpus' test set when
    the sites train on it), for harnesses and benchmarks; None when it has none."""
    return central_test_set(config, task, simulated_sites=True).rows or None


def check_site_data(config, task) -> int:
    """Read every row of the simulated sites' data and of the central test set, as the sites and
    the coordinator will, so a bad row is reported before a federation starts (DataError);
    returns the rows read."""
    d = config.data
    files = [] if not d.path else list(site_files(d.path).values()) if Path(d.path).is_dir() else [Path(d.path)]
    files += [Path(d.test_path)] if d.test_path else []
    return sum(len(read_rows(f, task.check_row, d.skip_bad_rows).rows) for f in files)
