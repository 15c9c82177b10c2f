"""Quality: federated LoRA against centralized and local-only training, IID and non-IID, and under DP.

Every federated run is the real ServerApp and ClientApp over the in-process
Grid (fedlora/simulations/inprocess.py: messages serialized, sites one after
the other), so a sweep of dozens of runs fits on two cores. Baselines use the
same training code and the same number of optimizer steps
(fedlora/bench/baselines.py): centralized = every site's training rows
pooled, local-only = each site alone. All are scored on one central test set.

Scenarios:
- classification: the default synthetic triage corpus on all-MiniLM-L6-v2,
  label mix per site IID, Dirichlet(1.0) or Dirichlet(0.1);
- causal-LM: the same notes as instruction data ("Triage note: ... Department:"
  -> the department), loss on the completion only. No pretrained causal LM can
  be loaded offline here, so this uses the built-in random 2-layer Llama:
  perplexities compare the rows of one table, nothing more;
- DP: FedIT on the default classification scenario (Dirichlet(0.5)) with DP-SGD
  at each site, target epsilon per site for the whole run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from fedlora import config as cfg
from fedlora.bench.baselines import run_baselines
from fedlora.bench.engines import finished_run
from fedlora.bench.suite import BenchContext, SuiteResult, cell, markdown_table
from fedlora.data import synthetic

NAME = "quality"
TITLE = "Quality: federated vs centralized vs local-only"
STRATEGIES = ("fedit", "ffa", "flora", "fedex")
PARTITIONS = {"IID": None, "Dirichlet 1.0": 1.0, "Dirichlet 0.1": 0.1}
DP_PARTITION = 0.5  # the default scenario's label skew


@dataclass(frozen=True)
class Scale:
    """How big each run is: quick mode shrinks everything, full mode is the default scenario."""
    classification: tuple[str, ...]
    causal: tuple[str, ...]
    causal_records: int  # per site
    partitions: tuple[str, ...]
    epsilons: tuple[float, ...]
    test_notes: int | None  # central test notes; None: the default scenario's 500
    causal_test_notes: int
    dp: tuple[str, ...]  # settings added to the DP-SGD runs


# Quick mode: a smoke test of every kind of run the full suite makes, in a few minutes. One partition (the
# code paths do not depend on it); scoring the central test set is most of a tiny run's time (twice per run,
# plus the final predictions), so 100 notes; DP-SGD steps of 16 records instead of 64.
QUICK = Scale(
    classification=("federation.rounds=2", "data.records-per-site=96", "train.local-steps=4"),
    causal=("federation.rounds=2", "train.local-steps=3"),
    causal_records=96,
    partitions=("Dirichlet 0.1",),
    epsilons=(8.0,),
    test_notes=100,
    causal_test_notes=100,
    dp=("privacy.batch-size=16",),
)
# Full mode: the default scenario's corpus, model and 4 sites, with 3 rounds of 160 notes per site (8 local
# steps) so the 23 classification runs fit in about 20 minutes on 2 cores.
FULL = Scale(
    classification=("federation.rounds=3", "data.records-per-site=160"),
    causal=("federation.rounds=3", "train.local-steps=12"),
    causal_records=160,
    partitions=tuple(PARTITIONS),
    epsilons=(1.0, 3.0, 8.0),
    test_notes=None,
    causal_test_notes=200,
    dp=(),
)
CAUSAL = ("model.name=tiny-llama", "task.type=causal-lm", "model.max-length=96", "train.learning-rate=0.01")


def partition_sets(alpha: float | None) -> tuple[str, ...]:
    return ("data.partition=iid",) if alpha is None else ("data.partition=dirichlet", f"data.dirichlet-alpha={alpha:g}")


def write_causal_sites(folder: Path, num_sites: int, records: int, alpha: float | None,
                       test_notes: int) -> tuple[Path, Path]:
    """The triage notes as instruction data: one prompt/completion file per site, and a central test file."""
    def rows(records_: list[dict]) -> str:
        return "".join(json.dumps({"prompt": f"Triage note: {r['text']}\nDepartment:",
                                   "completion": f" {r['label']}"}) + "\n" for r in records_)

    sites = folder / "sites"
    sites.mkdir(parents=True, exist_ok=True)
    for k in range(num_sites):
        (sites / f"site-{k}.jsonl").write_text(rows(synthetic.site_records(k, num_sites, records, 0, alpha)))
    test = folder / "test.jsonl"
    test.write_text(rows(synthetic.central_test_records(test_notes)))
    return sites, test


def classification_test_sets(folder: Path, test_notes: int | None) -> list[str]:
    """The central test set: the default scenario's, or its first `test_notes` notes written to a file."""
    if test_notes is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    test = folder / f"test-{test_notes}.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in synthetic.central_test_records(test_notes)))
    return [f'data.test-path="{test}"']


def federated(folder: Path, sets: list[str]) -> dict:
    """A federated run's final central test metrics; a finished run directory is reused."""
    finished_run("in-process", sets, folder)
    summary = json.loads((folder / "summary.json").read_text())
    final = summary["final"]
    site_level = summary.get("privacy", {}).get("site_level", {})
    return {"test_accuracy": final.get("test_accuracy"), "test_macro_f1": final.get("test_macro_f1"),
            "test_perplexity": final.get("test_perplexity"), "bytes_up_last_round": final.get("bytes_up"),
            "epsilon": site_level.get("epsilon"), "seconds": summary["totals"]["seconds"]}


def baselines(folder: Path, sets: list[str]) -> dict:
    path = folder / "baselines.json"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(run_baselines(cfg.load_config(None, sets)), indent=2))
    return json.loads(path.read_text())


def scenario_rows(ctx: BenchContext, scenario: str, partition: str, sets: list[str], key: str) -> list[dict]:
    """One partition of one scenario: each strategy, centralized, and local-only (mean and worst site)."""
    root = ctx.folder(NAME) / scenario / partition.replace(" ", "-")
    rows = []
    for strategy in ctx.progress(STRATEGIES, f"{scenario} {partition}"):
        result = federated(root / strategy, [*sets, f"strategy.name={strategy}"])
        rows.append({"scenario": scenario, "partition": partition, "method": f"federated {strategy}", **result})
    base = baselines(root / "baselines", sets)
    rows.append({"scenario": scenario, "partition": partition, "method": "centralized (pooled)",
                 **{k: v for k, v in base["centralized"].items() if k.startswith("test_")}})
    local = base["local_only"]
    worst = (max if key == "test_perplexity" else min)(local, key=lambda r: r[key])
    rows.append({"scenario": scenario, "partition": partition, "method": "local-only, mean of sites",
                 **{k: mean(r[k] for r in local) for k in local[0] if k.startswith("test_")}})
    rows.append({"scenario": scenario, "partition": partition, "method": "local-only, worst site",
                 "site": worst["site"], **{k: v for k, v in worst.items() if k.startswith("test_")}})
    return rows


def dp_rows(ctx: BenchContext, scale: Scale, test_sets: list[str]) -> list[dict]:
    root = ctx.folder(NAME) / "dp"
    sets = [*scale.classification, *test_sets, *partition_sets(DP_PARTITION), "strategy.name=fedit"]
    rows = [{"scenario": "classification", "partition": f"Dirichlet {DP_PARTITION:g}", "method": "fedit, non-private",
             **federated(root / "non-private", sets)}]
    for eps in ctx.progress(scale.epsilons, "DP epsilons"):
        result = federated(root / f"eps-{eps:g}",
                           [*sets, "privacy.enabled=true", f"privacy.epsilon={eps:g}", *scale.dp])
        rows.append({"scenario": "classification", "partition": f"Dirichlet {DP_PARTITION:g}",
                     "method": f"fedit, DP-SGD at epsilon {eps:g} per site", "target_epsilon": eps, **result})
    return rows


def run(ctx: BenchContext) -> SuiteResult:
    scale = QUICK if ctx.quick else FULL
    classification, causal = [], []
    test_sets = classification_test_sets(ctx.folder(NAME), scale.test_notes)
    for partition in scale.partitions:
        alpha = PARTITIONS[partition]
        classification += scenario_rows(ctx, "classification", partition,
                                        [*scale.classification, *test_sets, *partition_sets(alpha)], "test_accuracy")
        sites, test = write_causal_sites(ctx.folder(NAME) / "causal-data" / partition.replace(" ", "-"), 4,
                                         scale.causal_records, alpha, scale.causal_test_notes)
        causal += scenario_rows(ctx, "causal-lm", partition,
                                [*CAUSAL, *scale.causal, f'data.path="{sites}"', f'data.test-path="{test}"'],
                                "test_perplexity")
    private = dp_rows(ctx, scale, test_sets)
    return SuiteResult(figures={"classification": classification, "causal_lm": causal, "dp": private,
                                "settings": {"classification": list(scale.classification),
                                             "causal_lm": [*CAUSAL, *scale.causal], "strategies": list(STRATEGIES)}},
                       markdown=markdown(classification, causal, private, scale))


def markdown(classification: list[dict], causal: list[dict], private: list[dict], scale: Scale) -> str:
    partitions = list(scale.partitions)

    def grid(rows: list[dict], key: str) -> list[list]:
        by_key = {(r["method"], r["partition"]): r for r in rows}
        out = []
        for method in dict.fromkeys(r["method"] for r in rows):
            values = []
            for p in partitions:
                row = by_key.get((method, p), {})
                value = row.get(key)
                values.append(f"{cell(value)} ({row['site']})" if "site" in row and value is not None else value)
            out.append([method, *values])
        return out

    settings = "4 sites, " + ", ".join(scale.classification)
    parts = [f"Classification (all-MiniLM-L6-v2 + LoRA r=8 unless set otherwise; {settings}), accuracy on "
             f"a balanced central test set of {scale.test_notes or 500} notes (local-only, worst site: the site in "
             "brackets):", "",
             markdown_table(["method", *partitions], grid(classification, "test_accuracy")), "",
             "Central test macro-F1:", "", markdown_table(["method", *partitions], grid(classification, "test_macro_f1")),
             "", "Causal-LM instruction scenario (random 2-layer Llama, loss on the completion), "
             f"perplexity on {scale.causal_test_notes} central test notes (lower is better):", "",
             markdown_table(["method", *partitions], grid(causal, "test_perplexity")), "",
             f"Under DP-SGD at each site (FedIT, Dirichlet {DP_PARTITION:g}, same settings"
             + "".join(f", {x}" for x in scale.dp) + "):", "",
             markdown_table(["run", "epsilon spent (largest site)", "test accuracy", "test macro-F1"],
                            [[r["method"], r.get("epsilon"), r["test_accuracy"], r["test_macro_f1"]]
                             for r in private])]
    return "\n".join(parts)
