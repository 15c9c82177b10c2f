"""Drift: what a model trained on the original corpus loses on drifted data, what each site's check
says, and what a warm-started retraining gives back.

Every run is the real ServerApp and ClientApp over the in-process Grid:
1. train on the original synthetic corpus (the default scenario in full mode);
2. the same sites later hold the drifted corpus (`data.synthetic-variant = "drifted"`: new jargon,
   a telehealth service's notes, a shifted label mix); each site's `fedlora site drift` check
   compares its drifted records with the snapshot it kept when it trained, and scores the first
   run's adapter on them; a control compares new records of the original corpus instead;
3. retrain on the drifted corpus, warm-started from the first run's adapter (`model.warm-start`),
   for fewer rounds; the coordinator scores the old adapter on the drifted test set before round 1;
4. a cold start on the drifted corpus with the first run's rounds, for comparison; and the
   retrained adapter on the original test set (what retraining forgot).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedlora.bench.engines import finished_run
from fedlora.bench.suite import BenchContext, SuiteResult, cell, markdown_table
from fedlora.data import synthetic
from fedlora.deploy import site_drift

NAME = "drift"
TITLE = "Drift: accuracy lost on drifted data, each site's check, and warm-started retraining"


@dataclass(frozen=True)
class Scale:
    base: tuple[str, ...]   # settings of every run (on top of the defaults)
    sites: int
    records: int
    alpha: float | None     # the corpus' label skew across sites (None: IID), as data.partition says
    rounds: int             # the first run's, and the cold start's
    retrain_rounds: int     # the warm-started retraining's


# Quick: the random tiny BERT learns this task only with LoRA on its word embeddings too (a bag of
# words, in effect), at a higher learning rate; a minute or two on 2 cores.
QUICK = Scale(base=("model.name=tiny-bert", "model.max-length=48", "data.partition=iid", "train.local-steps=40",
                    "train.learning-rate=0.008", "lora.target-modules=query,value,word_embeddings"),
              sites=2, records=150, alpha=None, rounds=2, retrain_rounds=2)
# Full: the default scenario (MiniLM, 4 sites, 320 records each, Dirichlet 0.5, 5 rounds of 2 local epochs)
# and a 3-round retraining; about 20 minutes on 2 cores.
FULL = Scale(base=(), sites=4, records=320, alpha=0.5, rounds=5, retrain_rounds=3)


def _sets(scale: Scale, *more: str) -> list[str]:
    return [*scale.base, f"federation.num-sites={scale.sites}", f"data.records-per-site={scale.records}", *more]


def _rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def site_checks(root: Path, scale: Scale, first: Path) -> list[dict]:
    """Each site's drift check against the snapshot it kept in the first run: on its drifted records
    (scoring the first run's adapter), and, as a control, on new records of the original corpus."""
    rows = []
    for k in range(scale.sites):
        drifted = _write(root / f"site-{k}-drifted.jsonl",
                         synthetic.drifted_site_records(k, scale.sites, scale.records, 0, scale.alpha))
        # the same site's next records from the original corpus (the generator's stream goes on)
        fresh = synthetic.site_records(k, scale.sites, 2 * scale.records, 0, scale.alpha)[scale.records:]
        control = _write(root / f"site-{k}-original-new.jsonl", fresh)
        state = first / "sites" / f"site-{k}"
        for kind, data in (("drifted", drifted), ("control", control)):
            report = site_drift.check(data, state, adapter=first)
            figures = report.upstream()
            rows.append({"site": k, "data": kind, **{key: figures[key] for key in (
                "retraining_due", "triggers", "label_psi", "label_chi2_p", "text_js", "unseen_word_share",
                "accuracy_now", "accuracy_then")}})
    return rows


def run(ctx: BenchContext) -> SuiteResult:
    scale = QUICK if ctx.quick else FULL
    root = ctx.folder(NAME)
    first = finished_run("in-process", _sets(scale, f"federation.rounds={scale.rounds}"), root / "original")
    checks = site_checks(root, scale, first)
    retrained = finished_run("in-process", _sets(scale, f"federation.rounds={scale.retrain_rounds}",
                                                 "data.synthetic-variant=drifted", f'model.warm-start="{first}"'),
                             root / "retrained-warm")
    cold = finished_run("in-process", _sets(scale, f"federation.rounds={scale.rounds}",
                                            "data.synthetic-variant=drifted"), root / "drifted-cold")
    forgot, _, _ = site_drift.score(retrained, synthetic.central_test_records())
    summary = json.loads((retrained / "summary.json").read_text())
    figures = {
        "original_on_original": _rounds(first)[-1]["test_accuracy"],
        "original_on_drifted": summary["warm_start"]["test_accuracy"],
        "retrained_on_drifted": [r["test_accuracy"] for r in _rounds(retrained)],
        "retrained_on_original": forgot,
        "cold_on_drifted": [r["test_accuracy"] for r in _rounds(cold)],
        "sites": checks,
        "seconds": {name: json.loads((run_dir / "summary.json").read_text())["totals"]["seconds"]
                    for name, run_dir in (("original", first), ("retrained", retrained), ("cold", cold))},
        "settings": {"base": list(scale.base), "sites": scale.sites, "records": scale.records,
                     "rounds": scale.rounds, "retrain_rounds": scale.retrain_rounds},
    }
    figures["plots"] = plots(figures)
    return SuiteResult(figures=figures, markdown=markdown(figures, scale))


def plots(f: dict) -> list[dict]:
    """The drifted test set's accuracy by round: warm-started retraining against a cold start."""
    warm = [[0, f["original_on_drifted"]]] + [[i + 1, a] for i, a in enumerate(f["retrained_on_drifted"])]
    return [{"title": "Drifted test set: retraining warm-started from the old adapter, and from scratch",
             "x_label": "round (0: the old adapter, before retraining)", "y_label": "test accuracy (drifted)",
             "series": {"warm start": warm, "cold start": [[i + 1, a] for i, a in enumerate(f["cold_on_drifted"])]}}]


def markdown(f: dict, scale: Scale) -> str:
    settings = ", ".join(scale.base) or "the default scenario"
    warm, cold = f["retrained_on_drifted"], f["cold_on_drifted"]
    cold_to_warm = next((i + 1 for i, a in enumerate(cold) if a >= warm[-1]), None)
    parts = [
        (f"{settings}; {scale.sites} sites, {scale.records} records each. Trained {scale.rounds} rounds on the "
         f"original corpus, then {scale.retrain_rounds} rounds on the drifted one (`data.synthetic-variant = "
         "\"drifted\"`), warm-started from that adapter. Central test accuracy (500 notes of each corpus):"), "",
        markdown_table(["model", "original test set", "drifted test set"], [
            [f"trained on the original ({scale.rounds} rounds)", f["original_on_original"], f["original_on_drifted"]],
            [f"retrained on the drifted, warm start ({scale.retrain_rounds} rounds)", f["retrained_on_original"],
             warm[-1]],
            [f"trained on the drifted from scratch ({scale.rounds} rounds)", None, cold[-1]]]), "",
        "Drifted test accuracy by round of retraining (round 0: the old adapter):", "",
        markdown_table(["round", "warm start", "cold start"],
                       [[i, ([f["original_on_drifted"]] + warm)[i] if i <= len(warm) else None,
                         cold[i - 1] if 0 < i <= len(cold) else None]
                        for i in range(max(len(warm), len(cold)) + 1)]), "",
        "A cold start reaches the warm start's final accuracy "
        + (f"in round {cold_to_warm}." if cold_to_warm else f"in none of its {len(cold)} rounds."), "",
        ("Each site's `fedlora site drift` check against the snapshot it kept when it trained the first model: "
         "on its drifted records (the first model scored on them), and as a control on new records of the "
         "original corpus (default thresholds: PSI 0.2 with chi-square p < 0.01, Jensen-Shannon 0.1, unseen "
         "words 10%, accuracy drop 0.05):"), "",
        markdown_table(["site", "records", "label PSI", "chi-square p", "Jensen-Shannon", "unseen words",
                        "accuracy then / now", "retraining due", "because"],
                       [[r["site"], r["data"], r["label_psi"], r["label_chi2_p"], r["text_js"],
                         r["unseen_word_share"], f"{cell(r['accuracy_then'])} / {cell(r['accuracy_now'])}",
                         "yes" if r["retraining_due"] else "no", ", ".join(r["triggers"]) or "–"]
                        for r in f["sites"]])]
    return "\n".join(parts)
