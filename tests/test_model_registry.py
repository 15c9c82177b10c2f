"""The model registry (`fedlora models`): versions with lineage, and a promotion gate that compares a
candidate with the current version at every site, in one evaluation-only round, before `current` moves.

The gate's test pits two adapters whose heads always answer one department each: a site's accuracy for
such a model is that department's share of the site's held-out rows, which the test reads from the
sites' own data, so what the gate must decide is known independently of the product's evaluation."""

import argparse
import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fedlora import config as cfg
from fedlora.cli import main as fedlora_main
from fedlora.client import review
from fedlora.client.drift import snapshot_digest
from fedlora.data.labels import infer_labels
from fedlora.data.sites import simulated_site_data
from fedlora.deploy.models_command import add_commands
from fedlora.server.model_registry import ModelRegistry, RegistryError, decide, pair_id, sha256_of
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks import build_task

SITES = 3
TOLERANCE = 0.02


def _settings(tiny_bert_dir, *more) -> list[str]:
    return [f'model.name="{tiny_bert_dir}"', "model.max-length=32", f"federation.num-sites={SITES}",
            "federation.rounds=1", "data.records-per-site=60", "data.dirichlet-alpha=0.3", "train.local-steps=2",
            *more]


# -- the rule ----------------------------------------------------------------------------------------

def test_the_gate_refuses_a_candidate_worse_at_one_site_beyond_the_tolerance():
    current = {"a": {"eval_accuracy": 0.80}, "b": {"eval_accuracy": 0.70}, "c": {"eval_accuracy": 0.90}}
    candidate = {"a": {"eval_accuracy": 0.95}, "b": {"eval_accuracy": 0.66}, "c": {"eval_accuracy": 0.89}}
    passed, reason, table, worse = decide(candidate, current, "eval_accuracy", 0.02)
    assert not passed and worse == ["b"] and "1 of 3 sites" in reason
    assert table["a"]["change"] == pytest.approx(0.15)
    # the same figures pass with a looser tolerance; a better pooled mean never hides a worse site
    assert decide(candidate, current, "eval_accuracy", 0.05)[0]


def test_the_gate_refuses_when_a_site_did_not_score_both_models():
    passed, reason, _, _ = decide({"a": {"eval_accuracy": 0.9}}, {"a": {"eval_accuracy": 0.8}, "b": {"eval_accuracy": 0.8}},
                                  "eval_accuracy", 0.02)
    assert not passed and "b" in reason
    assert not decide({}, {}, "eval_accuracy", 0.02)[0]


def test_for_a_perplexity_higher_is_worse():
    current = {"a": {"eval_perplexity": 10.0}}
    assert not decide({"a": {"eval_perplexity": 12.0}}, current, "eval_perplexity", 1.0)[0]
    assert decide({"a": {"eval_perplexity": 8.0}}, current, "eval_perplexity", 1.0)[0]


# -- the registry and the gate, end to end -----------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tmp_path_factory):
    """One finished run, registered as it ends (output.registry)."""
    root = tmp_path_factory.mktemp("registry")
    registry = root / "models"
    run = run_inprocess(cfg.load_config(None, _settings(tiny_bert_dir, f'output.registry="{registry}"')),
                        root / "first")
    return root, ModelRegistry(registry), run


def _always(run, label: int, out):
    """A copy of a run whose adapter's head answers `label` whatever the text."""
    shutil.copytree(run, out)
    weights = out / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    head = [k for k in tensors if "classifier" in k or "out_proj" in k]
    bias = [k for k in head if k.endswith("bias") and tensors[k].shape == (5,)]
    assert len(bias) == 1, head
    for k in head:
        if tensors[k].ndim == 2 and tensors[k].shape[0] == 5:
            tensors[k] = np.zeros_like(tensors[k])
    tensors[bias[0]] = np.where(np.arange(5) == label, 50.0, -50.0).astype(tensors[bias[0]].dtype)
    save_file(tensors, str(weights))
    return out


def _label_shares(tiny_bert_dir) -> tuple[list[str], dict[str, list[float]]]:
    """Each site's held-out label shares, read from the sites' own data as each site reads it."""
    config = infer_labels(cfg.load_config(None, _settings(tiny_bert_dir)))
    task = build_task(config)
    shares = {}
    for k in range(SITES):
        site = simulated_site_data(k, SITES, config, task)
        labels = [row["label"] for row in site.eval]
        shares[site.name] = [labels.count(name) / len(labels) for name in config.task.labels]
    return list(config.task.labels), shares


def _one_site_worse(shares: dict[str, list[float]]) -> tuple[int, int, str]:
    """Two departments such that always answering `candidate` instead of `current` is worse at exactly one site."""
    for current in range(5):
        for candidate in range(5):
            worse = [s for s, share in shares.items() if share[candidate] - share[current] < -TOLERANCE]
            if candidate != current and len(worse) == 1:
                return candidate, current, worse[0]
    pytest.skip("no pair of departments is worse at exactly one site in this partition")


def test_a_candidate_worse_at_one_site_is_refused_and_current_stays(trained, tiny_bert_dir, capsys):
    root, registry, run = trained
    assert registry.versions() == ["v1"] and registry.current() is None  # registered, not promoted
    labels, shares = _label_shares(tiny_bert_dir)
    candidate_label, current_label, weaker_site = _one_site_worse(shares)
    current = registry.register(_always(run, current_label, root / "always-current"))
    candidate = registry.register(_always(run, candidate_label, root / "always-candidate"))
    assert fedlora_main(["models", "promote", current, "--registry", str(registry.path)]) == 0  # nothing to beat
    assert registry.current() == current

    evaluation = run_inprocess(cfg.load_config(None, _settings(
        tiny_bert_dir, f'model.warm-start="{registry.path / candidate}"',
        f'model.compare-with="{registry.path / "current"}"')), root / "evaluation")
    comparison = json.loads((evaluation / "comparison.json").read_text())["models"]
    for site, share in shares.items():  # what each site measured is what its own rows say
        assert comparison["candidate"]["sites"][site]["eval_accuracy"] == pytest.approx(share[candidate_label])
        assert comparison["current"]["sites"][site]["eval_accuracy"] == pytest.approx(share[current_label])

    code = fedlora_main(["models", "promote", candidate, "--registry", str(registry.path),
                         "--evaluation", str(evaluation), "--tolerance", str(TOLERANCE)])
    err = capsys.readouterr().err
    assert code == 1 and f"refused {candidate}" in err and weaker_site in err
    assert registry.current() == current  # the pointer did not move
    gate = registry.read(candidate)["gates"][-1]
    assert gate["passed"] is False and gate["worse_at"] == [weaker_site] and gate["current"] == current
    assert [h["passed"] for h in registry.history()] == [True, False]

    # evidence about other adapters than the candidate and the current version is refused, not misread
    with pytest.raises(RegistryError, match="compared other adapters"):
        registry.gate("v1", json.loads((evaluation / "comparison.json").read_text()), "eval_accuracy", TOLERANCE)

    # each site kept both models' outputs on its rows for its expert; what one expert rates comes back as
    # counts only when the same two models are evaluated again (the site's state folder persists)
    pair = pair_id(registry.read(candidate)["adapter_sha256"], registry.read(current)["adapter_sha256"])
    state = evaluation / "sites" / weaker_site
    kept = json.loads((state / review.FOLDER / pair / "candidate.json").read_text())
    assert [row["output"] for row in kept] == [labels[candidate_label]] * len(kept)  # what the model said
    for item in review.items(state, pair):
        review.rate(state, pair, item["index"], "A" if item["A"] == labels[current_label] else "B")  # prefer current
    assert json.loads((evaluation / "comparison.json").read_text())["review"] == {}
    again = run_inprocess(cfg.load_config(None, _settings(  # in the same run directory, as `simulate --resume` does
        tiny_bert_dir, f'model.warm-start="{registry.path / candidate}"',
        f'model.compare-with="{registry.path / "current"}"', "output.resume=true")), evaluation)
    answered = json.loads((again / "comparison.json").read_text())["review"]
    assert answered.pop(weaker_site) == {"wins": 0, "ties": 0, "losses": len(kept), "same": 0, "unrated": 0}
    assert sorted(answered) == sorted(set(shares) - {weaker_site})  # the other sites: nothing rated yet
    assert all(c["unrated"] > 0 and c["wins"] + c["ties"] + c["losses"] == 0 for c in answered.values())
    row = re.search(rf"<tr><td[^>]*>{weaker_site}</td>(.*?)</tr>", (again / "report.html").read_text()).group(1)
    assert [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>.*?</td>", row)][-4:] == \
        ["0", "0", str(len(kept)), "0"]  # the report shows the site's review: wins, ties, losses, not rated


def test_promote_simulate_makes_the_evaluation_from_the_candidates_configuration(trained, tiny_bert_dir, tmp_path):
    root, registry, run = trained
    if registry.current() is None:
        registry.record_gate(registry.gate("v1", None, "eval_accuracy", TOLERANCE))
    current = registry.current()
    sharing = [{"partition-id": k, "num-partitions": SITES, "share-drift": True} for k in range(SITES)]
    warmed = run_inprocess(cfg.load_config(None, _settings(
        tiny_bert_dir, f'model.warm-start="{registry.path / "current"}"', f'output.registry="{registry.path}"')),
        tmp_path / "warm", node_configs=sharing)
    version = registry.versions()[-1]
    record = registry.read(version)
    assert record["run"] == str(warmed) and record["parent"] == current  # lineage through the adapter's sha256
    # each site that shares drift figures names its data snapshot, as the keyed digest only it can recompute
    # (its state folder's key); a site that does not share them sends none (v1's sites)
    assert registry.read("v1")["data_snapshots"] == {}
    assert record["data_snapshots"] == {f"site-{k}": snapshot_digest(warmed / "sites" / f"site-{k}")
                                        for k in range(SITES)}

    made = []

    def simulate(config, out):
        assert config.model.compare_with.endswith(current) and config.model.warm_start.endswith(version)
        made.append(out)
        return run_inprocess(config, out)

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"), simulate)
    args = parser.parse_args(["models", "promote", version, "--registry", str(registry.path), "--simulate",
                              "--tolerance", "1"])
    assert args.func(args) == 0  # any change passes a tolerance of 1: the decision follows the evidence
    assert registry.current() == version and made and (made[0] / "comparison.json").is_file()


def test_registering_refuses_what_is_not_a_finished_run_or_is_registered_already(trained, tmp_path):
    _, registry, run = trained
    assert registry.register(run) == "v1"  # the same run again (a resumed run that ended): the same version
    shutil.copytree(run, tmp_path / "copy")
    with pytest.raises(RegistryError, match="already registered as v1"):
        registry.register(tmp_path / "copy")  # the same adapter from another run directory
    with pytest.raises(RegistryError, match="not a finished run"):
        registry.register(tmp_path)
    with pytest.raises(RegistryError, match="no version 'v99'"):
        registry.read("v99")


def test_an_evaluation_only_run_needs_a_candidate_and_no_secure_aggregation(tiny_bert_dir):
    with pytest.raises(cfg.ConfigError, match="set model.warm-start"):
        cfg.load_config(None, _settings(tiny_bert_dir, 'model.compare-with="x"'))
    with pytest.raises(cfg.ConfigError, match="per-site figures are not recorded"):
        cfg.load_config(None, _settings(tiny_bert_dir, 'model.compare-with="x"', 'model.warm-start="y"',
                                        "secagg.enabled=true", "federation.num-sites=3"))


def test_a_diverged_candidate_or_a_site_missing_from_both_models_does_not_pass():
    current = {"a": {"eval_perplexity": 10.0}, "b": {"eval_perplexity": 10.0}}
    nan = {"a": {"eval_perplexity": float("nan")}, "b": {"eval_perplexity": 9.0}}
    assert not decide(nan, current, "eval_perplexity", 1.0)[0]  # NaN is not "not worse"
    better = {"a": {"eval_perplexity": 9.0}, "b": {"eval_perplexity": 9.0}}
    passed, reason, _, _ = decide(better, current, "eval_perplexity", 1.0, expected=["a", "b", "c"])
    assert not passed and "c" in reason  # asked, but no figure for either model (crashed, no held-out rows)
    with pytest.raises(RegistryError, match="tolerance"):
        decide(better, current, "eval_perplexity", float("nan"))


def test_registering_at_once_gives_each_run_its_own_version(trained, tmp_path):
    """Two runs ending together: each adapter lands whole, under its own version."""
    _, registry, run = trained
    copies = []
    for k in range(4):  # four adapters of their own: the run's, each nudged differently
        copy = tmp_path / f"run-{k}"
        shutil.copytree(run, copy)
        weights = copy / "adapter" / "adapter_model.safetensors"
        tensors = load_file(str(weights))
        tensors = {name: t + np.asarray(1e-3 * (k + 1), dtype=t.dtype) for name, t in tensors.items()}
        save_file(tensors, str(weights))
        copies.append(copy)
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(registry.register, copies))
    assert len(set(versions)) == 4
    for version, copy in zip(versions, copies):
        record = registry.read(version)
        assert record["run"] == str(copy)
        assert record["adapter_sha256"] == sha256_of(registry.folder(version) / "adapter" / "adapter_model.safetensors")


def test_a_site_that_left_blocks_promotion_until_the_coordinator_names_it(trained, tmp_path):
    """Every site that scored the current version must score both, unless the coordinator says it has left."""
    _, _, run = trained
    registry = ModelRegistry(tmp_path / "models")
    for k in range(2):  # two adapters of their own: the run's, nudged differently
        copy = tmp_path / f"run-{k}"
        shutil.copytree(run, copy)
        weights = copy / "adapter" / "adapter_model.safetensors"
        save_file({n: t + np.asarray(k + 1, dtype=t.dtype) for n, t in load_file(str(weights)).items()}, str(weights))
        registry.register(copy)
    registry.record_gate(registry.gate("v1", None, "eval_accuracy", TOLERANCE))
    sites = sorted(registry.read("v1")["sites_evaluation"])
    assert len(sites) == SITES
    stayed = sites[:-1]
    comparison = {"models": {name: {"sha256": registry.read(v)["adapter_sha256"],
                                    "sites": {s: {"eval_accuracy": 0.5} for s in stayed}}
                             for name, v in (("candidate", "v2"), ("current", "v1"))}, "asked": stayed}
    refused = registry.gate("v2", comparison, "eval_accuracy", TOLERANCE)
    assert not refused.passed and sites[-1] in refused.reason  # it scored v1 in v1's own run
    passed = registry.gate("v2", comparison, "eval_accuracy", TOLERANCE, excused=[sites[-1]])
    assert passed.passed and passed.excused == [sites[-1]]
    registry.record_gate(passed)
    assert registry.current() == "v2" and registry.read("v2")["gates"][-1]["excused"] == [sites[-1]]
