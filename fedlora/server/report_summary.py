"""The summary in words at the top of report.html: what was trained, how good it is, where it is
weaker, what privacy it cost each site, and what it sent over the wire.

Pure functions of what a run directory holds: summary.json (`summary`), the rows of
metrics.jsonl (`rows`), config.toml as a dict (`config`, hyphenated keys as written) and
adapter/adapter_config.json (`adapter`); any of them may be missing or from an older run, and
the sentences then say less, never something false. They return plain text (report.py
escapes it).
"""

from __future__ import annotations

import math
from typing import Any

from fedlora.server.drift_check import site_state
from fedlora.server.model_registry import lower_is_better, site_metric

# A site is "clearly weaker" when its own accuracy on its held-out rows is more than this many
# points below the pooled figure, or (causal LM) its perplexity more than this factor above it.
WEAKER_BY_POINTS = 0.05
WEAKER_PERPLEXITY_RATIO = 1.10
NOT_PER_SITE = "figures per site are not recorded under secure aggregation or client-level DP"

BYTE_UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(n: float | None) -> str:
    """A byte count in decimal units (1 KB = 1000 B): 812 B, 184.7 KB, 3.4 MB, 1.21 GB."""
    if not _number(n):
        return "–"
    value, unit = float(n), 0
    while abs(value) >= 1000 and unit < len(BYTE_UNITS) - 1:
        value, unit = value / 1000, unit + 1
    if unit == 0:
        return f"{int(value)} B"
    return f"{value:.3g} {BYTE_UNITS[unit]}" if abs(value) < 10 else f"{value:.1f} {BYTE_UNITS[unit]}"


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def _num(v: float) -> str:
    """A figure for a sentence: 0.122, 1.611, 21,924."""
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"


def _eps(v: Any) -> str:
    return f"{v:.2f}" if _number(v) else "unbounded"


def _budget(v: Any) -> str:
    return _num(v) if _number(v) else "unbounded"


def _delta(v: Any) -> str:
    return f"{v:g}" if _number(v) else "not recorded"


def _section(config: dict | None, name: str) -> dict:
    return (config or {}).get(name) or {}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# -- what the run is -----------------------------------------------------------------------------

def task_kind(summary: dict, rows: list[dict], config: dict | None = None) -> str:
    """'classification' or 'causal-lm': from the configuration, else from the figures recorded."""
    kind = _section(config, "task").get("type")
    if kind:
        return kind
    final = {**(rows[-1] if rows else {}), **(summary.get("final") or {})}
    return "causal-lm" if any(k.endswith("_perplexity") for k in final) else "classification"


def secure_aggregation(summary: dict, rows: list[dict], config: dict | None = None) -> bool:
    if "enabled" in _section(config, "secagg"):
        return bool(_section(config, "secagg")["enabled"])
    return any(k.startswith("secagg_") for r in rows for k in r)


def client_level_dp(summary: dict, config: dict | None = None) -> bool:
    return bool((summary.get("privacy") or {}).get("client_level") or _section(config, "privacy").get("client-dp"))


def unit_words(unit: str) -> str:
    """The unit of privacy in words: a record, or all records sharing one value of a column."""
    return "a single record" if unit in ("", "record") else f"all records sharing one {unit} value"


def privacy_guarantee(summary: dict) -> str:
    """The guarantee the run gives and its unit, in one sentence (without the per-site spend)."""
    privacy = summary.get("privacy") or {}
    site, client, parts = privacy.get("site_level") or {}, privacy.get("client_level") or {}, []
    if site.get("enabled"):
        units = " or ".join(unit_words(u) for u in (site.get("unit") or ["record"]))
        spent = (f", ε at most {_eps(site.get('epsilon'))} at δ {site['delta']:g} ({site.get('accountant')} accountant)"
                 if _number(site.get("delta")) else "")
        parts.append(f"DP-SGD at each site (the unit of privacy: {units}){spent}")
    if client:
        parts.append(f"client-level DP at the coordinator (the unit of privacy: a whole {client.get('unit', 'site')}), "
                     f"ε {_eps(client.get('epsilon'))} at δ {_delta(client.get('delta'))}, "
                     f"{client.get('clipping', 'fixed')} clipping")
    if not parts:
        return "Differential privacy was off: the run gives no formal privacy guarantee."
    return "Privacy: " + "; and ".join(parts) + "."


def _last_site_figures(rows: list[dict]) -> tuple[dict, dict[str, dict]]:
    """The last row with each site's own figures, and those figures ({} when no row has them)."""
    for row in reversed(rows):
        if row.get("eval_sites"):
            return row, row["eval_sites"]
    return (rows[-1] if rows else {}), {}


def site_names(summary: dict, rows: list[dict]) -> list[str]:
    names = set(summary.get("sites") or {}) | set(_last_site_figures(rows)[1])
    names |= set(((summary.get("privacy") or {}).get("site_level") or {}).get("sites") or {})
    return sorted(names)


def what_was_trained(summary: dict, rows: list[dict], config: dict | None = None,
                     adapter: dict | None = None) -> str:
    """Task, base model, sites and their sizes where known, rounds, strategy, privacy, warm start."""
    kind = task_kind(summary, rows, config)
    base = (adapter or {}).get("base_model_name_or_path") or _section(config, "model").get("name")
    if kind == "causal-lm":
        task = "A causal language model (next-token prediction on the sites' texts)"
    else:
        per_class = (summary.get("final") or {}).get("eval_per_class") or {}
        labels = _section(config, "task").get("labels") or list(per_class)
        task = "A sequence classifier" + (f" into {len(labels)} labels ({', '.join(labels)})" if labels else "")
    params = summary.get("parameters") or {}
    adapted = (f", a LoRA adapter of {params['adapter']:,} trainable parameters" if _number(params.get("adapter"))
               else "")
    out = [f"{task}, fine-tuned from the base model {base or 'not recorded'}{adapted}."]

    secure = secure_aggregation(summary, rows, config)
    names = site_names(summary, rows)
    _, per_site = _last_site_figures(rows)
    if names:
        described = [f"{n} ({_plural(int(per_site[n]['eval_count']), 'held-out row')})"
                     if _number((per_site.get(n) or {}).get("eval_count")) else n for n in names]
        sizes = " (their sizes stay hidden under secure aggregation)" if secure else ""
        out.append(f"{_plural(len(names), 'site')} took part: {', '.join(described)}{sizes}.")
    elif client_level_dp(summary, config):
        most = max((r["sites"] for r in rows if _number(r.get("sites"))), default=None)
        out.append("Which sites took part is secret under client-level DP"
                   + (f" (at most {_plural(int(most), 'site')} contributed to a round)." if most else "."))

    recorded = summary.get("rounds", len(rows))
    planned = _section(config, "federation").get("rounds")
    rounds = (f"{recorded} of {planned} planned rounds" if _number(planned) and planned != recorded
              else _plural(int(recorded or 0), "round"))
    stopped = (summary.get("privacy") or {}).get("stopped")
    how = f"It ran {rounds} with the {summary.get('strategy') or 'recorded'} strategy"
    how += ", under secure aggregation (the coordinator saw only the sum of the updates)" if secure else ""
    out.append(how + (f"; it ended early: {stopped}." if stopped else "."))
    out.append(privacy_guarantee(summary))

    warm = summary.get("warm_start")
    if warm:
        scores = _figures(warm, "test_", skip=("loss",))
        out.append(f"It started from an earlier run's adapter, {warm.get('adapter')} (sha256 "
                   f"{str(warm.get('sha256', ''))[:12]}…)"
                   + (f", which scored {scores} on the central test set before round 1." if scores else "."))
    return " ".join(out)


# -- how good it is ------------------------------------------------------------------------------

NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "perplexity": "perplexity", "rougeL": "ROUGE-L",
         "bleu": "BLEU", "chrf": "chrF", "loss": "loss"}  # ROUGE-L, BLEU, chrF: a causal LM's generated text


def _figure(key: str, value: float) -> str:
    """A metric's value as a reader expects it: accuracy in percent, the others as numbers."""
    return _pct(value) if key.endswith("accuracy") else _num(value)


def _figures(final: dict, prefix: str, skip: tuple[str, ...] = ()) -> str:
    """'accuracy 43.8%, macro-F1 0.122, loss 1.54': the figures `final` holds under `prefix`."""
    return ", ".join(f"{label} {_figure(name, final[prefix + name])}" for name, label in NAMES.items()
                     if name not in skip and _number(final.get(prefix + name)))


def _central_set(summary: dict) -> str:
    """The central test set in a few words: 'the central test file test.jsonl (300 rows)'."""
    central = summary.get("central_test") or {}
    size = f" ({central['rows']} rows)" if _number(central.get("rows")) else ""
    if central.get("set") == "file":
        return f"the central test file {central.get('file', '')}".rstrip() + size
    if central.get("set") == "synthetic":
        return "the synthetic corpus' test set" + size
    return "the central test set" + size


def how_good(summary: dict, rows: list[dict]) -> str:
    """The final central test figures and the sites' pooled evaluation, with the first round's for contrast."""
    final = summary.get("final") or (rows[-1] if rows else {})
    if not final:
        return "The run recorded no round, so there are no figures."
    last = final.get("round", len(rows))
    out = []
    central = _figures(final, "test_")
    if central:
        out.append(f"On {_central_set(summary)}, after round {last}: {central}.")
    elif (summary.get("central_test") or {}).get("set") == "none":
        out.append("There is no central test set: the figures below are the sites' own.")
    pooled = _figures(final, "eval_")
    if pooled:
        out.append(f"On the sites' own held-out rows, pooled, after round {last}: {pooled}.")
    first = rows[0] if rows else {}
    key = next((k for k in ("test_accuracy", "eval_accuracy", "test_perplexity", "eval_perplexity")
                if _number(final.get(k))), None)
    if key and _number(first.get(key)) and first.get("round") != last:
        where = "central test" if key.startswith("test_") else "pooled"
        out.append(f"After round {first.get('round', 1)} the {where} {NAMES[key.split('_', 1)[1]]} was "
                   f"{_figure(key, first[key])}.")
    return " ".join(out) or "The final round recorded no evaluation figures."


# -- where it is weaker --------------------------------------------------------------------------

def weaker_sites(rows: list[dict]) -> tuple[str, float, dict[str, float], list[str]] | None:
    """(metric, pooled figure, each site's figure, the sites clearly weaker, worst first) in the last
    round with figures per site; None when no round has them."""
    row, per_site = _last_site_figures(rows)
    for metric in ("eval_accuracy", "eval_perplexity"):
        figures = {s: float(f[metric]) for s, f in per_site.items() if _number(f.get(metric))}
        if not figures or not _number(row.get(metric)):
            continue
        pooled = float(row[metric])
        if metric == "eval_accuracy":
            weak = [s for s, v in figures.items() if pooled - v > WEAKER_BY_POINTS]
            weak.sort(key=lambda s: figures[s])
        else:
            weak = [s for s, v in figures.items() if v > pooled * WEAKER_PERPLEXITY_RATIO]
            weak.sort(key=lambda s: -figures[s])
        return metric, pooled, figures, weak
    return None


def where_weaker(summary: dict, rows: list[dict], config: dict | None = None) -> str:
    """The sites where the model is clearly weaker than pooled, with their figures."""
    found = weaker_sites(rows)
    if found is None:
        hidden = [why for why, on in (("secure aggregation", secure_aggregation(summary, rows, config)),
                                      ("client-level DP", client_level_dp(summary, config))) if on]
        if hidden:
            return (f"Weaker sites cannot be named: {NOT_PER_SITE} (this run used {' and '.join(hidden)}); "
                    "each site can score the final adapter on its own rows.")
        return "No figures per site were recorded, so weaker sites cannot be named."
    metric, pooled, figures, weak = found
    row, per_site = _last_site_figures(rows)
    name = metric.split("_", 1)[1]

    def one(site: str) -> str:
        count = (per_site.get(site) or {}).get("eval_count")
        rows_ = f" on {_plural(int(count), 'held-out row')}" if _number(count) else ""
        return f"{site} {_figure(metric, figures[site])}{rows_}"

    when = f"after round {row.get('round')}" if row.get("round") is not None else "in the last round evaluated"
    if metric == "eval_accuracy":
        margin, side = f"{100 * WEAKER_BY_POINTS:g} points", "below"
    else:
        margin, side = f"{100 * (WEAKER_PERPLEXITY_RATIO - 1):g}%", "above"
    if weak:
        return (f"The model is clearly weaker at {_plural(len(weak), 'site')} ({name} more than {margin} {side} "
                f"the pooled {_figure(metric, pooled)}, {when}): {'; '.join(one(s) for s in weak)}. The per-site "
                "plot and table below show every site.")
    worst = min(figures, key=figures.get) if metric == "eval_accuracy" else max(figures, key=figures.get)
    return (f"No site is clearly weaker: every site's {name} {when} is within {margin} of the pooled "
            f"{_figure(metric, pooled)} (the weakest: {one(worst)}).")


# -- privacy spent per site, and traffic ---------------------------------------------------------

def privacy_spent(summary: dict, rows: list[dict] | None = None, config: dict | None = None) -> str:
    """Each site's ε (of its budget, at its δ), the client-level ε, and the sites out of budget."""
    privacy = summary.get("privacy") or {}
    site = privacy.get("site_level") or {}
    spends = {s: v for s, v in (site.get("sites") or {}).items() if isinstance(v, dict)}
    out = []
    if spends:
        budgets = {v.get("budget_epsilon") for v in spends.values()}
        deltas = {v.get("delta") for v in spends.values()}
        common = len(budgets) == 1 and len(deltas) == 1 and all(_number(x) for x in (*budgets, *deltas))
        if common:
            head = f"ε spent per site, of a budget of {_num(next(iter(budgets)))} at δ {next(iter(deltas)):g} each"
            items = [f"{s} {_eps(v.get('epsilon'))}" for s, v in sorted(spends.items())]
        else:
            head = "ε spent per site"
            items = [f"{s} {_eps(v.get('epsilon'))} of {_budget(v.get('budget_epsilon'))} at δ {_delta(v.get('delta'))}"
                     for s, v in sorted(spends.items())]
        coarse = " (rounded up to a tenth under secure aggregation)" if secure_aggregation(
            summary, rows or [], config) else ""
        out.append(f"{head}{coarse}: {', '.join(items)}.")
    elif site.get("enabled"):
        out.append("No site reported its privacy spend.")
    client = privacy.get("client_level") or {}
    if client:
        budget = f" of a budget of {_num(client['budget_epsilon'])}" if _number(client.get("budget_epsilon")) else ""
        out.append(f"Client-level DP: ε {_eps(client.get('epsilon'))}{budget} at δ {_delta(client.get('delta'))}"
                   f" for any one site's participation as a whole (one figure for all sites: which sites took part is"
                   f" secret).")
    refused = site.get("out_of_budget") or []
    if refused:
        out.append(f"{_plural(len(refused), 'site')} refused further rounds, out of budget: {'; '.join(refused)}.")
    if not out:
        return "No privacy budget was spent: differential privacy was off."
    return " ".join(out)


def traffic(summary: dict, rows: list[dict]) -> str:
    """Bytes sent over the run, in KB/MB/GB, and the adapter's size."""
    totals = summary.get("totals") or {}
    up = totals.get("bytes_up", sum(r.get("bytes_up", 0) for r in rows if _number(r.get("bytes_up"))))
    down = totals.get("bytes_down", sum(r.get("bytes_down", 0) for r in rows if _number(r.get("bytes_down"))))
    n = summary.get("rounds", len(rows))
    out = f"The sites sent {human_bytes(up)} and received {human_bytes(down)} in all"
    out += f" over {_plural(int(n), 'round')}" if _number(n) and n else ""
    if _number(summary.get("adapter_bytes_float32")):
        out += f"; the adapter itself is {human_bytes(summary['adapter_bytes_float32'])} as float32"
    return out + "."


# -- runs that train nothing ---------------------------------------------------------------------

def comparison_sections(comparison: dict) -> list[tuple[str, str, str]]:
    """An evaluation-only run (model.compare-with): which two adapters, where each is better, the review."""
    models = comparison.get("models") or {}
    candidate, current = models.get("candidate") or {}, models.get("current") or {}
    new, old = candidate.get("sites") or {}, current.get("sites") or {}
    asked = comparison.get("asked") or sorted(set(new) | set(old))
    what = (f"An evaluation-only run: no site trained. {_plural(len(asked), 'site')} ({', '.join(asked) or 'none'}) "
            f"each scored two adapters on its own held-out rows in the same round: the candidate "
            f"{candidate.get('adapter', 'not recorded')} and the current version {current.get('adapter', 'not recorded')}.")
    metric = site_metric(*new.values(), *old.values())
    sign = -1.0 if lower_is_better(metric) else 1.0
    better, worse, same, missing = [], [], [], []
    for site in asked:
        a, b = (new.get(site) or {}).get(metric), (old.get(site) or {}).get(metric)
        if not (_number(a) and _number(b)):
            missing.append(site)
            continue
        change = sign * (a - b)
        (better if change > 0 else worse if change < 0 else same).append(
            f"{site} ({_figure(metric, a)} against {_figure(metric, b)})")
    pooled = [f"the {name} {figures}" for name, model in (("candidate", candidate), ("current version", current))
              if (figures := _figures(model.get("pooled") or {}, "eval_"))]
    quality = [f"Pooled over the sites' held-out rows: {'; '.join(pooled)}." if pooled else
               "No site reported figures for either adapter."]
    for words, sites in (("better at", better), ("worse at", worse), ("the same at", same),
                         ("not scored with both at", missing)):
        if sites:
            quality.append(f"The candidate is {words} {_plural(len(sites), 'site')} on {metric}: {', '.join(sites)}.")
    quality.append("Whether it may become current is the promotion gate's decision (fedlora models promote), "
                   "with its tolerance.")
    review = comparison.get("review") or {}
    totals = {k: sum(int(r.get(k) or 0) for r in review.values()) for k in ("wins", "ties", "losses", "unrated")}
    rated = totals["wins"] + totals["ties"] + totals["losses"]
    verdicts = (f"The sites' experts, blind to which model wrote which output, have rated {_plural(rated, 'pair')} "
                f"so far: the candidate won {totals['wins']}, tied {totals['ties']} and lost {totals['losses']}; "
                f"{totals['unrated']} are not rated yet." if rated or totals["unrated"] else
                "No site's expert has rated the two models' outputs yet (fedlora site review).")
    return [("summary-trained", "What this run was", what), ("summary-quality", "How the two compare", " ".join(quality)),
            ("summary-review", "Expert review", verdicts)]


def drift_sections(report: dict) -> list[tuple[str, str, str]]:
    """A drift-check run (federation.drift-check): whether retraining is due, where and why."""
    sites = report.get("sites") or {}
    what = (f"A drift check: no site trained. Each of {_plural(len(sites), 'site')} compared the data it holds now "
            f"with what it last trained on; only the figures left the site, never a row or a word.")
    due = [f"{site} ({'; '.join(s.get('why') or [])})" for site, s in sites.items() if s.get("due")]
    out = [f"Retraining is due at {', '.join(due)}." if due else "Retraining is not due at any site that was checked."]
    for state, words in (("failed", "Not checked, no answer (offline, or its check failed)"),
                         ("not shared", "Not shared (node config share-drift)"),
                         ("not trained", "Not trained yet, nothing to compare with")):
        named = [site for site, s in sites.items() if site_state(s) == state]
        if named:
            out.append(f"{words}: {', '.join(named)}.")
    return [("summary-trained", "What this run was", what), ("summary-drift", "Verdict", " ".join(out))]


def summary_sections(summary: dict, rows: list[dict], config: dict | None = None,
                     adapter: dict | None = None) -> list[tuple[str, str, str]]:
    """(id, heading, text) of each paragraph of the summary, in reading order."""
    if summary.get("comparison"):
        return comparison_sections(summary["comparison"])
    if summary.get("drift"):
        return drift_sections(summary["drift"])
    return [("summary-trained", "What was trained", what_was_trained(summary, rows, config, adapter)),
            ("summary-quality", "How good it is", how_good(summary, rows)),
            ("summary-weaker", "Where it is weaker", where_weaker(summary, rows, config)),
            ("summary-privacy", "Privacy spent", privacy_spent(summary, rows, config)),
            ("summary-traffic", "Traffic", traffic(summary, rows))]
