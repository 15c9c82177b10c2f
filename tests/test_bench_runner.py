"""`fedlora bench`: sections and figures are merged into the files, one suite at a time."""

import dataclasses
import importlib
import json
import sys
import types
from pathlib import Path

import pytest

from fedlora import config as cfg
from fedlora.bench import runner
from fedlora.bench.quality import QUICK, classification_test_sets, markdown, partition_sets, write_causal_sites
from fedlora.bench.suite import SuiteResult, cell, markdown_table
from fedlora.cli import main as fedlora_main
from fedlora.data import synthetic
from fedlora.data.sites import central_test_rows
from fedlora.data.labels import infer_labels
from fedlora.tasks import build_task


def test_a_section_is_replaced_in_place_and_the_rest_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Issue 2\nhand-written text\n")
    runner.update_markdown(path, "quality", "### Quality\nfirst")
    runner.update_markdown(path, "overheads", "### Overheads\nonly")
    runner.update_markdown(path, "quality", "### Quality\nsecond")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\n## Issue 2\nhand-written text\n")
    assert text.count(runner.PARENT_HEADING) == 1
    assert "first" not in text and text.index("second") < text.index("### Overheads")
    assert text.count("(begin) -->") == text.count("(end) -->") == 2


def test_json_entries_are_merged_per_suite(tmp_path):
    path = tmp_path / "b.json"
    runner.update_json(path, "a", {"figures": {"x": 1}})
    runner.update_json(path, "b", {"figures": {"y": 2}})
    runner.update_json(path, "a", {"figures": {"x": 3}})
    assert json.loads(path.read_text())["suites"] == {"a": {"figures": {"x": 3}}, "b": {"figures": {"y": 2}}}


@pytest.fixture()
def fake_suites(monkeypatch):
    def good(ctx):
        assert ctx.quick and ctx.folder("good").is_dir()
        return SuiteResult({"ratio": 2.5, "items": list(ctx.progress([1, 2], "items"))}, "| a |\n|---|\n| 1 |",
                           ["measured on a test"])

    def broken(ctx):
        raise RuntimeError("out of cheese")

    for name, fn in (("good", good), ("broken", broken)):
        module = types.ModuleType(f"fake_{name}")
        module.NAME, module.TITLE, module.run = name, f"The {name} suite", fn
        monkeypatch.setitem(sys.modules, f"fake_{name}", module)
    monkeypatch.setattr(runner, "SUITES", {"broken": "fake_broken", "good": "fake_good"})


def test_bench_writes_what_finished_and_reports_what_failed(fake_suites, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDLORA_NO_PROGRESS", "1")
    md = tmp_path / "BENCHMARKS.md"
    code = fedlora_main(["bench", "--quick", "--workdir", str(tmp_path / "w"), "--markdown", str(md)])
    assert code == 1
    assert "suite broken failed: RuntimeError: out of cheese" in capsys.readouterr().err
    data = json.loads((tmp_path / "BENCHMARKS.quick.json").read_text())
    entry = data["suites"]["good"]
    assert list(data["suites"]) == ["good"]
    assert entry["figures"] == {"ratio": 2.5, "items": [1, 2]} and entry["mode"] == "quick"
    assert entry["command"].startswith("fedlora bench --quick --workdir") and entry["versions"]["torch"]
    text = md.read_text()
    assert "### The good suite (quick mode)" in text and "- measured on a test" in text
    assert "<!-- fedlora bench: good (quick) (begin) -->" in text and "broken" not in text


def test_unknown_suite_is_refused_with_the_list(capsys):
    assert fedlora_main(["bench", "--only", "speed"]) == 2
    assert ("known: lora-vs-full, communication, overheads, secure-aggregation, privacy, deployment, quality, "
            "curves, strategies") in capsys.readouterr().err


@pytest.mark.parametrize("name, module", list(runner.SUITES.items()))
def test_every_suite_module_has_the_suite_interface(name, module):
    suite = importlib.import_module(module)
    assert suite.NAME == name and suite.TITLE and "issue" not in suite.TITLE.lower() and callable(suite.run)


def test_the_long_suites_are_opt_in_and_the_rest_run_in_order():
    assert runner.default_suites(quick=True) == ["lora-vs-full", "communication", "overheads", "secure-aggregation",
                                                 "privacy", "quality"]
    assert runner.default_suites(quick=False) == ["lora-vs-full", "communication", "overheads",
                                                  "secure-aggregation", "deployment", "quality", "gpu"]
    assert all(name in runner.SUITES for names in runner.OPT_IN.values() for name in names)


def test_bench_without_only_skips_the_modes_opt_in_suites_and_runs_them_when_named(fake_suites, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setenv("FEDLORA_NO_PROGRESS", "1")
    monkeypatch.setattr(runner, "OPT_IN", {"quick": ("broken",), "full": ()})
    args = ["bench", "--quick", "--workdir", str(tmp_path / "w"), "--no-markdown", "--json", str(tmp_path / "b.json")]
    assert fedlora_main(args) == 0  # the broken suite is opt-in in quick mode: not run
    assert fedlora_main([*args, "--only", "broken"]) == 1


def test_help_lists_every_suite_and_what_each_mode_leaves_out(capsys):
    with pytest.raises(SystemExit):
        fedlora_main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("Suites, in the order they run: lora-vs-full, communication, overheads, secure-aggregation, privacy, "
            "deployment, quality, curves, strategies, drift, scale, gpu.") in text
    assert ("quick mode runs all but deployment, curves, strategies, drift, scale, gpu, and full mode all but privacy, "
            "curves, strategies, drift, scale") in text


def test_the_parent_heading_is_found_in_the_real_benchmarks_file(tmp_path):
    """Sections are found by their markers; the parent heading, with or without words after it, is not repeated."""
    path = tmp_path / "BENCHMARKS.md"
    original = (Path(__file__).resolve().parents[1] / "BENCHMARKS.md").read_text()
    path.write_text(original)
    assert "issue" not in runner.PARENT_HEADING
    runner.update_markdown(path, "overheads (quick)", "### Overheads (quick mode)\nreplaced")
    runner.update_markdown(path, "privacy", "### Differential privacy\nnew")
    text = path.read_text()
    assert text.count("## `fedlora bench`") == original.count("## `fedlora bench`") == 1
    begin, end = "<!-- fedlora bench: overheads (quick) (begin) -->", "<!-- fedlora bench: overheads (quick) (end) -->"
    assert text[text.index(begin):text.index(end)] == begin + "\n### Overheads (quick mode)\nreplaced\n"
    assert text.index(end) < text.index("<!-- fedlora bench: quality (quick) (begin) -->")  # in place
    assert text.rstrip().endswith("### Differential privacy\nnew\n<!-- fedlora bench: privacy (end) -->")
    before, after = original.split(begin)[0], text.split(begin)[0]
    assert before == after  # everything above the section is left as it was


def test_parent_heading_is_a_line_of_its_own():
    assert runner.has_parent_heading("# B\n\n## `fedlora bench`\n")
    assert runner.has_parent_heading("# B\n\n## `fedlora bench` (measured on a laptop)\n")
    assert not runner.has_parent_heading("# B\n\n### `fedlora bench` quick\nsee ## `fedlora bench` below\n")


def test_causal_scenario_files_are_instruction_rows(tmp_path):
    sites, test = write_causal_sites(tmp_path, 3, 20, 0.1, 30)
    files = sorted(sites.iterdir())
    assert [f.name for f in files] == ["site-0.jsonl", "site-1.jsonl", "site-2.jsonl"]
    row = json.loads(files[0].read_text().splitlines()[0])
    assert row["prompt"].startswith("Triage note: ") and row["prompt"].endswith("Department:")
    assert row["completion"][0] == " " and row["completion"][1:] in synthetic.LABELS
    assert len(test.read_text().splitlines()) == 30
    assert partition_sets(None) == ("data.partition=iid",)
    assert partition_sets(0.1) == ("data.partition=dirichlet", "data.dirichlet-alpha=0.1")


def test_quick_classification_scores_a_smaller_balanced_test_file_and_full_mode_the_scenario_set(tmp_path):
    assert classification_test_sets(tmp_path, None) == []
    (setting,) = classification_test_sets(tmp_path, 100)
    path = Path(setting.split("=", 1)[1].strip('"'))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 100 and {r["label"] for r in rows} == set(synthetic.LABELS)
    assert all(sum(r["label"] == label for r in rows) == 20 for label in synthetic.LABELS)  # balanced
    config = infer_labels(cfg.load_config(None, [setting]))
    assert len(central_test_rows(config, build_task(config))) == 100  # the coordinator scores this file


def test_table_cells():
    assert [cell(None), cell(0.8512), cell(30512.4), cell(1.5e-7), cell(0.0), cell("x")] == \
        ["–", "0.851", "3.05e+04", "1.5e-07", "0.000", "x"]
    assert markdown_table(["a", "b"], [[1, None]]) == "| a | b |\n|---|---|\n| 1 | – |"


def test_quality_tables_put_each_method_in_a_row_and_name_the_worst_site():
    scale = dataclasses.replace(QUICK, partitions=("IID", "Dirichlet 0.1"))

    def rows(key, values):
        methods = ["federated fedit", "centralized (pooled)", "local-only, worst site"]
        return [{"method": m, "partition": p, key: v, **({"site": "site-2"} if "worst" in m else {})}
                for p, vs in zip(scale.partitions, values) for m, v in zip(methods, vs)]

    classification = [{**r, "test_macro_f1": 0.5} for r in rows("test_accuracy", [(0.8, 0.9, 0.6), (0.7, 0.9, 0.3)])]
    causal = rows("test_perplexity", [(12.0, 10.0, 40000.0), (13.0, 10.0, 50000.0)])
    private = [{"method": "fedit, non-private", "test_accuracy": 0.8, "test_macro_f1": 0.7},
               {"method": "fedit, DP-SGD at epsilon 8 per site", "epsilon": 7.9, "test_accuracy": 0.2,
                "test_macro_f1": 0.07}]
    text = markdown(classification, causal, private, scale)
    assert "| federated fedit | 0.800 | 0.700 |" in text
    assert "| local-only, worst site | 0.600 (site-2) | 0.300 (site-2) |" in text
    assert "| local-only, worst site | 4e+04 (site-2) | 5e+04 (site-2) |" in text
    assert "| fedit, DP-SGD at epsilon 8 per site | 7.900 | 0.200 | 0.070 |" in text


def test_quick_quality_runs_every_kind_of_run_once_against_the_small_test_file(tmp_path, monkeypatch):
    from fedlora.bench import quality
    from fedlora.bench.suite import BenchContext

    runs = []

    def federated(folder, sets):
        runs.append(list(sets))
        return {"test_accuracy": 0.5, "test_macro_f1": 0.4, "test_perplexity": 10.0, "epsilon": 7.9}

    def baselines(folder, sets):
        scores = {"test_accuracy": 0.6, "test_macro_f1": 0.5, "test_perplexity": 9.0}
        return {"centralized": scores, "local_only": [{"site": "site-0", **scores}]}

    monkeypatch.setattr(quality, "federated", federated)
    monkeypatch.setattr(quality, "baselines", baselines)
    result = quality.run(BenchContext(quick=True, workdir=tmp_path))

    causal = [r for r in runs if "task.type=causal-lm" in r]
    classification = [r for r in runs if r not in causal]
    assert len(causal) == len(quality.STRATEGIES)  # one partition
    assert len(classification) == len(quality.STRATEGIES) + 1 + len(quality.QUICK.epsilons)  # + DP rows
    test_file = [s for s in classification[0] if s.startswith("data.test-path=")]
    assert test_file and all(test_file[0] in r for r in classification)  # every run scores the same file
    dp = [r for r in classification if "privacy.enabled=true" in r]
    assert dp and all("privacy.batch-size=16" in r for r in dp)
    assert "balanced central test set of 100 notes" in result.markdown
