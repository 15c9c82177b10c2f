import json
import re

from fedlora.server import report_summary as rs
from fedlora.server.report import line_chart, write_report


def _run_dir(tmp_path):
    rows = [{"round": r, "train_loss": 1.0 / r, "eval_loss": 1.2 / r, "eval_accuracy": 0.5 + 0.1 * r,
             "eval_macro_f1": 0.4 + 0.1 * r, "bytes_up": 1000, "bytes_down": 2000, "round_seconds": 1.5,
             "epsilon_per_site": {"site-a": 0.5 * r, "site-b": 0.4 * r}} for r in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "summary.json").write_text(json.dumps({"strategy": "fedit", "rounds": 3,
                                                        "sites": {"site-a": {"last_round": 3}},
                                                        "parameters": {"adapter": 10, "base": 1000}}))
    return tmp_path


def test_report_has_a_plot_per_recorded_quantity_and_the_tables(tmp_path):
    page = write_report(_run_dir(tmp_path)).read_text()
    titles = re.findall(r'<svg class="plot" role="img" aria-label="([^"]+)"', page)
    assert titles == ["Loss", "Accuracy and macro-F1", "Privacy spent (ε)", "Bytes per round"]
    names = re.findall(r'class="series" data-name="([^"]+)"', page)
    assert {"train_loss", "eval_loss", "eval_accuracy", "ε site-a", "ε site-b", "bytes_up"} <= set(names)
    assert "<td>site-a</td>" in page and "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_points_follow_the_data():
    svg = line_chart("t", {"s": [(1, 0.0), (2, 1.0), (3, 0.5)]})
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[1] < ys[2] < ys[0]  # SVG y grows downwards: the highest value is drawn highest
    assert line_chart("empty", {"s": []}) == ""


# -- the summary in words (fedlora/server/report_summary.py), over hand-made run directories ------

def _classification_rows(pooled: float, per_site: dict[str, float], count: int = 40) -> list[dict]:
    """Two rounds of a classification run; the last one carries each site's own accuracy."""
    sites = {s: {"eval_loss": 1.0, "eval_accuracy": a, "eval_macro_f1": a / 2, "eval_count": count}
             for s, a in per_site.items()}
    first = {"round": 1, "eval_loss": 1.4, "eval_accuracy": pooled / 2, "eval_macro_f1": pooled / 4,
             "bytes_up": 1000, "bytes_down": 2000, "sites": len(per_site)}
    last = {**first, "round": 2, "eval_loss": 1.1, "eval_accuracy": pooled, "eval_macro_f1": pooled / 2,
            "test_accuracy": pooled - 0.01, "test_macro_f1": pooled / 3, "test_loss": 1.2, "eval_sites": sites}
    return [first, last]


def _summary(rows: list[dict], **extra) -> dict:
    return {"rounds": len(rows), "final": rows[-1], "strategy": "fedavg",
            "sites": {s: {"last_round": 2} for s in rows[-1].get("eval_sites", {})},
            "totals": {"bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] for r in rows)},
            "parameters": {"adapter": 4421, "base": 10_000}, "adapter_bytes_float32": 4 * 4421,
            "central_test": {"set": "file", "file": "test.jsonl", "rows": 300}, **extra}


def test_human_bytes_picks_the_unit():
    assert rs.human_bytes(812) == "812 B"
    assert rs.human_bytes(1500) == "1.5 KB"
    assert rs.human_bytes(184_725) == "184.7 KB"
    assert rs.human_bytes(2_460_000) == "2.46 MB"
    assert rs.human_bytes(3.2e9) == "3.2 GB"
    assert rs.human_bytes(None) == "–"


def test_the_sites_clearly_below_the_pooled_accuracy_are_named_with_their_figures():
    pooled = 0.80
    per_site = {"north": pooled + 0.02, "south": pooled - 3 * rs.WEAKER_BY_POINTS,
                "east": pooled - rs.WEAKER_BY_POINTS / 2, "west": pooled - 2 * rs.WEAKER_BY_POINTS}
    rows = _classification_rows(pooled, per_site)
    metric, figure, figures, weak = rs.weaker_sites(rows)
    assert (metric, figure, figures, weak) == ("eval_accuracy", pooled, per_site, ["south", "west"])  # worst first
    text = rs.where_weaker(_summary(rows), rows)
    assert f"{100 * per_site['south']:.1f}%" in text and f"{100 * per_site['west']:.1f}%" in text
    assert f"pooled {100 * pooled:.1f}%" in text and "on 40 held-out rows" in text
    assert "north" not in text and "east" not in text  # within the margin: not called weaker
    assert text.index("south") < text.index("west")


def test_when_no_site_is_clearly_weaker_the_weakest_is_still_given():
    pooled = 0.7
    per_site = {"a": pooled, "b": pooled - rs.WEAKER_BY_POINTS / 2}
    rows = _classification_rows(pooled, per_site)
    assert rs.weaker_sites(rows)[3] == []
    text = rs.where_weaker(_summary(rows), rows)
    assert text.startswith("No site is clearly weaker")
    assert f"b {100 * per_site['b']:.1f}%" in text


def test_without_figures_per_site_the_summary_says_why():
    rows = [{k: v for k, v in r.items() if k != "eval_sites"} for r in _classification_rows(0.6, {"a": 0.6})]
    assert rs.weaker_sites(rows) is None
    assert rs.where_weaker(_summary(rows), rows) == "No figures per site were recorded, so weaker sites cannot be named."
    secure = rs.where_weaker(_summary(rows), rows, {"secagg": {"enabled": True}})
    assert rs.NOT_PER_SITE in secure and "(this run used secure aggregation)" in secure


def test_under_secure_aggregation_site_sizes_are_hidden_and_the_run_says_so():
    rows = [{**{k: v for k, v in r.items() if k != "eval_sites"}, "secagg_dropped": []}
            for r in _classification_rows(0.6, {"a": 0.6})]
    summary = _summary(rows, sites={"a": {"last_round": 2}, "b": {"last_round": 2}, "c": {"last_round": 2}})
    trained = rs.what_was_trained(summary, rows)  # no config.toml: the secagg_* columns tell
    assert "3 sites took part: a, b, c (their sizes stay hidden under secure aggregation)" in trained
    assert "under secure aggregation" in trained and "held-out row" not in trained
    assert rs.NOT_PER_SITE in rs.where_weaker(summary, rows)


def test_client_level_dp_gives_one_epsilon_and_keeps_the_sites_secret():
    rows = [{k: v for k, v in r.items() if k != "eval_sites"} for r in _classification_rows(0.6, {"a": 0.6, "b": 0.5})]
    client = {"unit": "site", "clipping": "adaptive", "epsilon": 3.25, "delta": 1e-6, "budget_epsilon": 4.0}
    summary = _summary(rows, sites={}, privacy={"site_level": {"enabled": False, "sites": {}}, "client_level": client})
    trained = rs.what_was_trained(summary, rows)
    assert "Which sites took part is secret under client-level DP (at most 2 sites contributed to a round)" in trained
    assert "the unit of privacy: a whole site" in trained and f"ε {client['epsilon']:.2f} at δ 1e-06" in trained
    spent = rs.privacy_spent(summary, rows)
    assert f"ε {client['epsilon']:.2f} of a budget of 4 at δ 1e-06" in spent
    weaker = rs.where_weaker(summary, rows)
    assert rs.NOT_PER_SITE in weaker and "(this run used client-level DP)" in weaker


def test_dp_sgd_gives_the_unit_and_each_sites_spend():
    rows = _classification_rows(0.6, {"a": 0.6, "b": 0.6})
    spend = {"a": {"epsilon": 2.5, "delta": 1e-5, "budget_epsilon": 8.0, "unit": "patient_id"},
             "b": {"epsilon": 7.9, "delta": 1e-5, "budget_epsilon": 8.0, "unit": "patient_id"}}
    privacy = {"site_level": {"enabled": True, "unit": ["patient_id"], "accountant": "prv", "epsilon": 7.9,
                              "delta": 1e-5, "sites": spend, "out_of_budget": ["b: budget 8 spent"]}}
    summary = _summary(rows, privacy=privacy)
    guarantee = rs.privacy_guarantee(summary)
    assert "all records sharing one patient_id value" in guarantee and "ε at most 7.90 at δ 1e-05" in guarantee
    spent = rs.privacy_spent(summary, rows)
    assert "of a budget of 8 at δ 1e-05 each: a 2.50, b 7.90" in spent
    assert "1 site refused further rounds, out of budget: b: budget 8 spent" in spent
    spend["b"]["budget_epsilon"] = 4.0  # budgets differ: each site's own is given
    assert "b 7.90 of 4 at δ 1e-05" in rs.privacy_spent(summary, rows)
    off = _summary(rows)
    assert "no formal privacy guarantee" in rs.privacy_guarantee(off) and "off" in rs.privacy_spent(off, rows)


def test_a_causal_lm_is_judged_by_perplexity():
    pooled = 20.0
    per_site = {"a": pooled * 0.95, "b": pooled * (rs.WEAKER_PERPLEXITY_RATIO + 0.2), "c": pooled}
    rows = [{"round": 1, "eval_loss": 3.2, "eval_perplexity": 2 * pooled, "bytes_up": 5, "bytes_down": 5},
            {"round": 2, "eval_loss": 3.0, "eval_perplexity": pooled, "eval_rougeL": 0.25, "bytes_up": 5, "bytes_down": 5,
             "eval_sites": {s: {"eval_perplexity": p, "eval_count": 9} for s, p in per_site.items()}}]
    summary = _summary(rows, central_test={"set": "none"})
    assert rs.task_kind(summary, rows) == "causal-lm"  # no config.toml: the perplexity tells
    assert rs.what_was_trained(summary, rows).startswith("A causal language model")
    good = rs.how_good(summary, rows)
    assert "There is no central test set" in good and f"perplexity {pooled:.4g}, ROUGE-L 0.25" in good
    assert "accuracy" not in good
    assert f"After round 1 the pooled perplexity was {2 * pooled:.4g}" in good
    assert rs.weaker_sites(rows)[3] == ["b"]
    weaker = rs.where_weaker(summary, rows)
    assert f"b {per_site['b']:.4g} on 9 held-out rows" in weaker
    assert f"a {per_site['a']:.4g}" not in weaker and f"c {per_site['c']:.4g}" not in weaker


def test_what_was_trained_names_task_base_sites_rounds_strategy_and_warm_start():
    rows = _classification_rows(0.6, {"a": 0.6, "b": 0.5}, count=12)
    warm = {"adapter": "/runs/earlier/adapter", "sha256": "ab" * 32, "test_accuracy": 0.42, "test_loss": 1.3}
    summary = _summary(rows, warm_start=warm)
    config = {"task": {"type": "classification", "labels": ["x", "y", "z"]}, "model": {"name": "/models/bert"},
              "federation": {"rounds": 5}}
    text = rs.what_was_trained(summary, rows, config, {"base_model_name_or_path": "org/bert"})
    assert "A sequence classifier into 3 labels (x, y, z), fine-tuned from the base model org/bert" in text
    assert "4,421 trainable parameters" in text
    assert "2 sites took part: a (12 held-out rows), b (12 held-out rows)" in text
    assert f"It ran {len(rows)} of 5 planned rounds with the fedavg strategy" in text
    assert f"{warm['adapter']} (sha256 {warm['sha256'][:12]}…)" in text and "accuracy 42.0%" in text


def test_how_good_gives_the_central_and_pooled_figures_and_the_traffic_in_units():
    rows = _classification_rows(0.6, {"a": 0.6})
    summary, final = _summary(rows), rows[-1]
    good = rs.how_good(summary, rows)
    central = f"{100 * final['test_accuracy']:.1f}%, macro-F1 {final['test_macro_f1']:.3g}, loss {final['test_loss']:.4g}"
    assert f"On the central test file test.jsonl (300 rows), after round 2: accuracy {central}." in good
    assert f"pooled, after round 2: accuracy {100 * final['eval_accuracy']:.1f}%" in good
    assert "After round 1" not in good  # round 1 has no central figure to set beside the final one
    rows[0]["test_accuracy"] = final["test_accuracy"] / 2
    assert f"After round 1 the central test accuracy was {100 * rows[0]['test_accuracy']:.1f}%." in rs.how_good(
        summary, rows)
    traffic = rs.traffic(summary, rows)
    assert rs.human_bytes(summary["totals"]["bytes_up"]) in traffic
    assert rs.human_bytes(summary["adapter_bytes_float32"]) in traffic
    assert rs.how_good({}, []) == "The run recorded no round, so there are no figures."


def test_the_summary_comes_first_and_bytes_read_in_units(tmp_path):
    page = write_report(_run_dir(tmp_path)).read_text()
    body = page.split("<body>", 1)[1]
    assert body.index('<section id="summary">') < body.index("<svg") < body.index("<table")
    assert body.index("</h1>") < body.index('<section id="summary">')
    for key in ("trained", "quality", "weaker", "privacy", "traffic"):
        assert f'<p id="summary-{key}">' in page
    assert '<td title="1000 bytes">1 KB</td>' in page  # bytes_up of a round, exact figure in the tooltip
    chart = re.search(r'aria-label="Bytes per round".*?</svg>', page, re.DOTALL).group(0)
    assert re.search(r'font-size="10">[0-9.]+ KB</text>', chart)  # the axis in units too


def test_a_run_directory_without_rounds_still_renders(tmp_path):
    page = write_report(tmp_path).read_text()
    assert "The run recorded no round" in page


def _comparison(metric, candidate, current, asked):
    return {"models": {"candidate": {"adapter": "/reg/v2/adapter", "sites": {s: {metric: v} for s, v in candidate.items()},
                                     "pooled": {metric: 0.5}},
                       "current": {"adapter": "/reg/v1/adapter", "sites": {s: {metric: v} for s, v in current.items()},
                                   "pooled": {metric: 0.4}}},
            "review": {"a": {"wins": 3, "ties": 1, "losses": 2, "unrated": 4}}, "asked": asked}


def test_an_evaluation_only_run_is_summarised_as_a_comparison_not_as_training(tmp_path):
    comparison = _comparison("eval_accuracy", {"a": 0.9, "b": 0.5}, {"a": 0.8, "b": 0.6}, ["a", "b", "c"])
    sections = dict((key, text) for key, _, text in rs.summary_sections({"rounds": 0, "comparison": comparison}, []))
    assert "no site trained" in sections["summary-trained"] and "fine-tuned" not in sections["summary-trained"]
    assert "/reg/v2/adapter" in sections["summary-trained"] and "3 sites (a, b, c)" in sections["summary-trained"]
    quality = sections["summary-quality"]
    assert "better at 1 site on eval_accuracy: a (90.0% against 80.0%)" in quality
    assert "worse at 1 site on eval_accuracy: b (50.0% against 60.0%)" in quality
    assert "not scored with both at 1 site on eval_accuracy: c" in quality  # asked, never answered
    assert "won 3, tied 1 and lost 2; 4 are not rated yet" in sections["summary-review"]
    assert "summary-traffic" not in sections  # an evaluation round's bytes are not a training run's


def test_a_causal_lm_comparison_is_judged_by_perplexity_where_lower_is_better(tmp_path):
    comparison = _comparison("eval_perplexity", {"a": 12.0}, {"a": 15.0}, ["a"])
    quality = dict((k, t) for k, _, t in rs.comparison_sections(comparison))["summary-quality"]
    assert "better at 1 site on eval_perplexity: a (12 against 15)" in quality
    (tmp_path / "summary.json").write_text(json.dumps({"rounds": 0, "comparison": comparison}))
    page = write_report(tmp_path).read_text()
    assert "candidate eval_perplexity" in page and "candidate eval_accuracy" not in page


def test_a_drift_check_run_gives_the_verdict_and_the_sites_not_checked():
    report = {"retraining_due": True, "due_at": ["a"], "not_checked": ["c"], "sites": {
        "a": {"shared": True, "trained": True, "due": True, "why": ["label PSI 0.4 > 0.2"]},
        "b": {"shared": None, "trained": None, "due": False, "why": []},
        "c": {"shared": None, "failed": True, "due": False, "why": []}}}
    sections = dict((key, text) for key, _, text in rs.summary_sections({"rounds": 0, "drift": report}, []))
    assert "A drift check: no site trained" in sections["summary-trained"]
    verdict = sections["summary-drift"]
    assert "Retraining is due at a (label PSI 0.4 > 0.2)." in verdict
    assert "no answer (offline, or its check failed): c." in verdict and "Not shared (node config share-drift): b." in verdict
