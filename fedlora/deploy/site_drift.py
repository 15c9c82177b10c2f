"""`fedlora site drift`: has this site's data moved away from what it last trained on?

It compares the rows the site has now (its data file) with its last training
snapshot (fedlora.client.drift, in the site's state folder): the label mix
(PSI and a chi-square test), the wording (Jensen-Shannon divergence of the word
distributions, share of words never seen in training) and, given the adapter
the site uses, its accuracy on newly labelled records against the accuracy
recorded at training. It prints the figures and a verdict, and may write them
as JSON: aggregate numbers only (no word, label name, record or path), which
the site may pass on. Nothing is sent. docs/drift.md.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedlora import config as cfg
from fedlora.client.drift import age_days, digest, load_snapshot, site_key
from fedlora.data import drift
from fedlora.data.readers import DataError, read_rows
from fedlora.model_sources import DEMO_MODEL
from fedlora.models import DEMO_HUB_ID, load_model, read_labels
from fedlora.server import warm_start
from fedlora.tasks import build_task
from fedlora.training import evaluate_counts


class DriftCheckError(RuntimeError):
    """The check cannot run: no snapshot, unreadable data, an adapter that does not load."""


@dataclass
class Accuracy:
    now: float
    records: int           # labelled records scored
    then: float | None     # the site's accuracy at training (its held-out rows), when recorded
    skipped: int = 0       # labelled records whose label the adapter does not know


@dataclass
class DriftReport:
    figures: drift.Figures
    verdict: drift.Verdict
    limits: drift.Thresholds
    age_days: float
    digest: str
    accuracy: Accuracy | None = None
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        f = self.figures
        lines = [f"records: {f.records_now} now, {f.records_then} at the last training ({self.age_days:.0f} days ago)"]
        if f.label_psi is None:
            lines.append("label mix: not compared (no labelled records on one side)")
        else:
            lines.append(f"label mix: PSI {f.label_psi:.3f}, chi-square {f.label_chi2:.1f} (dof {f.label_chi2_dof}, "
                         f"p {f.label_chi2_p:.3g})")
        lines.append(f"wording: Jensen-Shannon {f.text_js:.3f}, words never seen in training "
                     f"{f.unseen_word_share:.1%}")
        if self.accuracy is not None:
            a = self.accuracy
            then = f"{a.then:.3f} at training" if a.then is not None else "none recorded at training"
            lines.append(f"accuracy: {a.now:.3f} on {a.records} labelled records now, {then}")
        lines += self.notes
        return "\n".join([*lines, self.verdict.line()])

    def upstream(self) -> dict:
        """What may leave the site: aggregate figures, record counts rounded to tens, the thresholds,
        and the snapshot's keyed digest. No word, label name, record or path."""
        f = self.figures
        a = self.accuracy
        return {
            "retraining_due": self.verdict.due,
            "triggers": [name for name, crossed in _triggers(self).items() if crossed],
            "label_psi": f.label_psi, "label_chi2": f.label_chi2, "label_chi2_dof": f.label_chi2_dof,
            "label_chi2_p": f.label_chi2_p, "text_js": f.text_js, "unseen_word_share": f.unseen_word_share,
            "records_now": _tens(f.records_now), "records_then": _tens(f.records_then),
            "accuracy_now": a.now if a else None, "accuracy_then": a.then if a else None,
            "accuracy_records": _tens(a.records) if a else None,
            "days_since_training": round(self.age_days, 1), "snapshot_digest": self.digest,
            "thresholds": {"psi": self.limits.psi, "chi2_p": self.limits.chi2_p, "js": self.limits.js,
                           "unseen": self.limits.unseen, "accuracy_drop": self.limits.accuracy_drop,
                           "max_age_days": self.limits.max_age_days},
        }


def _tens(count: int) -> int:
    return round(count, -1)


def _triggers(report: DriftReport) -> dict[str, bool]:
    f, lim, a = report.figures, report.limits, report.accuracy
    return {
        "label_mix": f.label_psi is not None and f.label_psi >= lim.psi and f.label_chi2_p < lim.chi2_p,
        "wording": f.text_js >= lim.js,
        "unseen_words": f.unseen_word_share >= lim.unseen,
        "accuracy": a is not None and a.then is not None and a.then - a.now >= lim.accuracy_drop,
        "age": lim.max_age_days > 0 and report.age_days >= lim.max_age_days,
    }


def _readable(path: Path, text_column: str) -> list[dict]:
    def check(row: dict) -> str | None:
        return None if isinstance(row.get(text_column), str) else f"column {text_column!r} missing or not text"

    try:
        return read_rows(path, check, skip_bad_rows=True).rows
    except DataError as err:
        raise DriftCheckError(str(err)) from None


def model_config(adapter: str | Path, config_file: str | Path | None = None, model: str | None = None) -> cfg.RunConfig:
    """What loading `adapter` needs: model, LoRA and task settings from the run's configuration (`config_file`,
    or the run directory's config.toml), else from the adapter's own adapter_config.json and labels.json.
    `model` names the base model where the site keeps it (a local folder, or 'minilm')."""
    folder = warm_start.adapter_folder(adapter)
    run_config = Path(config_file) if config_file else next(
        (p for p in (Path(adapter) / "config.toml", folder.parent / "config.toml") if p.is_file()), None)
    if run_config is not None:
        try:
            tables = tomllib.loads(run_config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise DriftCheckError(f"{run_config}: {err}") from None
        keep = {"model": {k: v for k, v in tables.get("model", {}).items()
                          if k in ("name", "max-length", "seed", "allow-download")},
                "lora": tables.get("lora", {}), "task": tables.get("task", {})}
    else:
        saved = json.loads((folder / warm_start.CONFIG).read_text())
        labels = read_labels(folder)
        base = saved.get("base_model_name_or_path", "")
        keep = {"model": {"name": DEMO_MODEL if base == DEMO_HUB_ID else base},
                "lora": {"rank": saved.get("r", 8), "alpha": float(saved.get("lora_alpha", 16.0)),
                         "target-modules": sorted(saved.get("target_modules") or [])},
                "task": {"type": "classification", "labels": labels} if labels else {"type": "causal-lm"}}
    if model:
        keep["model"]["name"] = model
    return cfg.from_nested(keep)


def score(adapter: str | Path, rows: list[dict], config_file: str | Path | None = None,
          model: str | None = None) -> tuple[float, int, int]:
    """The adapter's accuracy on the labelled `rows`: (accuracy, records scored, records skipped
    because their label is not one of the adapter's)."""
    try:
        config = model_config(adapter, config_file, model)
    except (warm_start.WarmStartError, cfg.ConfigError, OSError, ValueError) as err:
        raise DriftCheckError(f"cannot read the adapter's settings: {err}") from None
    if config.task.type != "classification":
        raise DriftCheckError("accuracy needs a classification adapter (labels.json); this one is a causal LM")
    task = build_task(config)
    known = [r for r in rows if str(r.get(task.label_column, "")) in task.index]
    labelled = [r for r in rows if r.get(task.label_column) not in (None, "")]
    if not known:
        raise DriftCheckError("no labelled record with one of the adapter's labels to score")
    try:
        loaded = load_model(config, task)
        warm_start.load_warm_start(adapter, config, loaded.model)
    except warm_start.WarmStartError as err:
        raise DriftCheckError(str(err).replace("model.warm-start: ", "")) from None
    examples = task.encode(known, loaded.tokenizer, config.model.max_length)
    counts = evaluate_counts(loaded.model, task, examples, loaded.tokenizer.pad_token_id,
                             precision=config.train.precision)
    return counts["correct"] / counts["count"], len(known), len(labelled) - len(known)


def check(data: str | Path, state: str | Path, limits: drift.Thresholds | None = None, *,
          adapter: str | Path | None = None, config_file: str | Path | None = None, model: str | None = None,
          labelled: str | Path | None = None, text_column: str = "text", label_column: str = "label",
          baseline_accuracy: float | None = None) -> DriftReport:
    """Compare the site's data file `data` with the training snapshot in `state` (its state folder or the
    snapshot file); with `adapter`, also score it on `labelled` (default: `data`)."""
    limits = limits or drift.Thresholds()
    snapshot = load_snapshot(state)
    if snapshot is None:
        raise DriftCheckError(f"no training snapshot in {state}: the site writes one each time it trains")
    rows = _readable(Path(data), text_column)
    figures = drift.compare(snapshot, drift.profile(rows, text_column, label_column))
    age = age_days(snapshot)
    accuracy = None
    notes: list[str] = []
    if adapter is not None:
        scored_rows = rows if labelled is None else _readable(Path(labelled), text_column)
        now, scored, skipped = score(adapter, scored_rows, config_file, model)
        then = baseline_accuracy if baseline_accuracy is not None else snapshot.get("accuracy")
        accuracy = Accuracy(now, scored, then, skipped)
        if skipped:
            notes.append(f"note: {skipped} labelled records carry a label the adapter does not know (not scored)")
    v = drift.verdict(figures, limits, accuracy.then if accuracy else None, accuracy.now if accuracy else None, age)
    folder = Path(state).expanduser()
    folder = folder if folder.is_dir() else folder.parent
    return DriftReport(figures, v, limits, age, digest(snapshot, site_key(folder)), accuracy, notes)
