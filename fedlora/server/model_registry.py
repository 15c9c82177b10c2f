"""The coordinator's model registry: every finished run's adapter as a version, with its lineage, and a
`current` pointer that only a passed promotion gate moves.

    REGISTRY/
      v1/adapter/       the run's exported adapter (PEFT format, labels.json, model card), copied
      v1/version.json   lineage: parent version, config, strategy, rounds, per-site evaluation, privacy
                        spent per site, the sites' data-snapshot digests, library versions, gate results
      current -> v1     the version a deployment starts from (`model.warm-start = REGISTRY/current`)
      history.jsonl     one line per promotion decision, passed or refused

A version's parent is the version whose adapter the run warm-started from (matched by the adapter's
sha256, so a copy elsewhere still counts). The gate compares a candidate with the current version from
an evaluation-only run (`model.compare-with`): both scored at every site on its held-out rows in the
same round. It refuses the candidate if it is worse at any site than the current version by more than
the tolerance, or if any site did not score both.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedlora.locks import exclusive

WEIGHTS = "adapter_model.safetensors"
VERSION_FILE = "version.json"
CURRENT = "current"
HISTORY = "history.jsonl"
COMPARISON = "comparison.json"  # what an evaluation-only run writes in its run directory
_VERSION = re.compile(r"^v(\d+)$")


class RegistryError(ValueError):
    """A version that does not exist, a run that cannot be registered, a gate that cannot decide."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pair_id(candidate_sha256: str, current_sha256: str) -> str:
    """Which two adapters an evaluation-only run compares, by their weights' digests: the name under
    which each site keeps the two models' outputs for its expert's review (fedlora.client.review)."""
    return f"{candidate_sha256[:16]}-vs-{current_sha256[:16]}"


def lower_is_better(metric: str) -> bool:
    return metric.endswith(("loss", "perplexity"))


def site_metric(*figures: dict) -> str:
    """The figure models are compared on, site by site: accuracy for a classifier, perplexity for a
    causal LM (whose figures have no accuracy). `figures`: per-site or pooled figure dicts."""
    keys = {key for f in figures if isinstance(f, dict) for key in f}
    return "eval_perplexity" if "eval_perplexity" in keys and "eval_accuracy" not in keys else "eval_accuracy"


@dataclass
class GateResult:
    """Whether a candidate may replace the current version, site by site."""

    candidate: str
    current: str | None
    metric: str
    tolerance: float
    passed: bool
    reason: str
    sites: dict[str, dict[str, float | None]] = field(default_factory=dict)  # site -> candidate, current, change
    worse_at: list[str] = field(default_factory=list)
    decided_at: str = ""
    evaluation: str = ""  # the evaluation-only run the figures come from
    review: dict[str, dict[str, int]] = field(default_factory=dict)  # site -> its expert's verdict counts
    excused: list[str] = field(default_factory=list)  # sites the coordinator said have left: not required

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(candidate_sites: dict[str, dict], current_sites: dict[str, dict], metric: str, tolerance: float,
           expected: Iterable[str] = ()) -> tuple[bool, str, dict[str, dict[str, float | None]], list[str]]:
    """The gate's rule over two models' per-site figures from the same evaluation round: passed only if
    every site (those with figures, and every `expected` one: asked, or known from the current version)
    scored both, with finite figures, and none is worse for the candidate by more than `tolerance` (in
    the metric's own units; for a loss or perplexity, higher is worse)."""
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise RegistryError(f"tolerance {tolerance}: must be a finite number >= 0")
    sites = sorted(set(candidate_sites) | set(current_sites) | set(expected))
    if not sites:
        return False, "no site reported per-site figures for either model", {}, []
    table: dict[str, dict[str, float | None]] = {}
    missing, worse = [], []
    sign = -1.0 if lower_is_better(metric) else 1.0
    for site in sites:
        new, old = candidate_sites.get(site, {}).get(metric), current_sites.get(site, {}).get(metric)
        if new is None or old is None or not (math.isfinite(new) and math.isfinite(old)):  # NaN: a diverged model
            missing.append(site)
            table[site] = {"candidate": new, "current": old, "change": None}
            continue
        change = new - old
        table[site] = {"candidate": new, "current": old, "change": change}
        if sign * change < -tolerance:
            worse.append(site)
    if missing:
        return False, (f"not every site scored both models on {metric} with a finite figure: "
                       f"{', '.join(missing)}"), table, worse
    if worse:
        detail = "; ".join(f"{s}: {table[s]['candidate']:.4g} against {table[s]['current']:.4g}" for s in worse)
        return False, (f"worse than the current version by more than {tolerance:g} {metric} at "
                       f"{len(worse)} of {len(sites)} sites ({detail})"), table, worse
    return True, f"not worse by more than {tolerance:g} {metric} at any of {len(sites)} sites", table, []


class ModelRegistry:
    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().absolute()  # runs started from it may run elsewhere

    # -- reading ------------------------------------------------------------------------------
    def versions(self) -> list[str]:
        if not self.path.is_dir():
            return []
        found = [p.name for p in self.path.iterdir() if _VERSION.match(p.name) and (p / VERSION_FILE).is_file()]
        return sorted(found, key=lambda name: int(name[1:]))

    def folder(self, version: str) -> Path:
        version = self.resolve(version)
        return self.path / version

    def resolve(self, version: str) -> str:
        """A version name, `current`, or `latest`, as the version it names."""
        if version == CURRENT:
            current = self.current()
            if current is None:
                raise RegistryError(f"{self.path}: no version is current yet (promote one first)")
            return current
        if version == "latest":
            versions = self.versions()
            if not versions:
                raise RegistryError(f"{self.path}: the registry holds no version")
            return versions[-1]
        if version not in self.versions():
            known = ", ".join(self.versions()) or "none"
            raise RegistryError(f"{self.path}: no version {version!r} (versions: {known})")
        return version

    def read(self, version: str) -> dict[str, Any]:
        return json.loads((self.folder(version) / VERSION_FILE).read_text())

    def current(self) -> str | None:
        link = self.path / CURRENT
        if not link.is_symlink():
            return None
        return os.readlink(link)

    def by_sha256(self, sha256: str) -> str | None:
        for version in self.versions():
            if self.read(version).get("adapter_sha256") == sha256:
                return version
        return None

    def history(self) -> list[dict[str, Any]]:
        path = self.path / HISTORY
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- writing ------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time (two runs ending together, a promotion during a registration)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path / ".lock"):
            yield

    def register(self, run: str | Path) -> str:
        """A finished run's adapter as the next version; its lineage from the run's summary and config.
        The same run registered again is the version it already is."""
        with self._locked():
            return self._register(Path(run).expanduser().resolve())

    def _register(self, run: Path) -> str:
        summary_path, weights = run / "summary.json", run / "adapter" / WEIGHTS
        if not summary_path.is_file() or not weights.is_file():
            raise RegistryError(f"{run}: not a finished run directory (needs summary.json and adapter/{WEIGHTS})")
        summary = json.loads(summary_path.read_text())
        if summary.get("comparison"):
            raise RegistryError(f"{run}: an evaluation-only run trains no adapter of its own")
        sha = sha256_of(weights)
        if (known := self.by_sha256(sha)) is not None:
            if self.read(known)["run"] == str(run):
                return known
            raise RegistryError(f"{run}: its adapter is already registered as {known}")
        versions = self.versions()
        version = f"v{int(versions[-1][1:]) + 1 if versions else 1}"
        final = summary.get("final") or {}
        warm = summary.get("warm_start") or {}
        record = {
            "version": version,
            "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run": str(run),
            "adapter_sha256": sha,
            "parent": self.by_sha256(warm["sha256"]) if warm.get("sha256") else None,
            "parent_adapter_sha256": warm.get("sha256"),
            "strategy": summary.get("strategy"),
            "rounds": summary.get("rounds"),
            "metrics": {k: v for k, v in final.items() if k.startswith(("test_", "eval_")) and k != "eval_sites"
                        and isinstance(v, (int, float))},
            "sites_evaluation": final.get("eval_sites", {}),
            "privacy": summary.get("privacy", {}),
            "data_snapshots": {site: seen["data_digest"] for site, seen in (summary.get("sites") or {}).items()
                               if isinstance(seen, dict) and seen.get("data_digest")},
            "base_fingerprint": summary.get("base_fingerprint"),
            "versions": summary.get("versions", {}),
            "config": (run / "config.toml").read_text() if (run / "config.toml").is_file() else "",
            "gates": [],
        }
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=self.path))
        try:
            shutil.copytree(run / "adapter", staging / "adapter")
            (staging / VERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
            os.rename(staging, self.path / version)  # a version appears whole or not at all
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return version

    def _write_record(self, version: str, record: dict[str, Any]) -> None:
        path = self.folder(version) / VERSION_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)

    def set_current(self, version: str) -> None:
        link, tmp = self.path / CURRENT, self.path / f".{CURRENT}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(version, tmp)  # relative: the registry folder can move
        os.replace(tmp, link)

    def record_gate(self, result: GateResult) -> None:
        """The gate's decision in the candidate's lineage and in the history; `current` moves if it passed,
        and only if it is still the version the candidate was compared with."""
        with self._locked():
            if result.passed and self.current() != result.current:
                raise RegistryError(f"{self.current()} became current while {result.candidate} was compared with "
                                    f"{result.current}; compare it with {self.current()}")
            self._record_gate(result)

    def _record_gate(self, result: GateResult) -> None:
        record = self.read(result.candidate)
        record.setdefault("gates", []).append(result.to_dict())
        self._write_record(result.candidate, record)
        with open(self.path / HISTORY, "a") as f:
            f.write(json.dumps(result.to_dict()) + "\n")
        if result.passed:
            self.set_current(result.candidate)

    # -- the gate -----------------------------------------------------------------------------
    def gate(self, candidate: str, comparison: dict[str, Any] | None, metric: str, tolerance: float,
             evaluation: str = "", excused: Iterable[str] = ()) -> GateResult:
        """The promotion decision for `candidate` against the current version, from an evaluation-only
        run's comparison.json (None when there is no current version to compare with). `excused`: sites
        that have left the consortium, no longer required to score both (a figure they did give still counts)."""
        candidate = self.resolve(candidate)
        current = self.current()
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if current is None:
            return GateResult(candidate, None, metric, tolerance, True, "no current version: the first one is "
                              "promoted without comparison", decided_at=now)
        if current == candidate:
            raise RegistryError(f"{candidate} is already the current version")
        if comparison is None:
            raise RegistryError("the gate needs an evaluation-only run comparing the candidate with the current "
                                "version (model.compare-with)")
        models = comparison.get("models", {})
        shas = {name: models.get(name, {}).get("sha256") for name in ("candidate", "current")}
        expected = {"candidate": self.read(candidate)["adapter_sha256"], "current": self.read(current)["adapter_sha256"]}
        if shas != expected:
            raise RegistryError(f"the evaluation {evaluation or ''} compared other adapters than {candidate} "
                                f"(candidate) and {current} (current)")
        # every site asked in the evaluation, and every site that scored the current version in its own run,
        # must have scored both: a site that crashed, timed out or has no held-out rows is not a pass
        excused = sorted(set(excused))
        expected = set(comparison.get("asked", [])) | set(self.read(current).get("sites_evaluation") or {})
        new, old = models["candidate"].get("sites", {}), models["current"].get("sites", {})
        passed, reason, sites, worse = decide(new, old, metric, tolerance,
                                              expected - {s for s in excused if s not in new and s not in old})
        return GateResult(candidate, current, metric, tolerance, passed, reason, sites, worse, now, evaluation,
                          comparison.get("review", {}), excused)
