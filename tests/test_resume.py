"""A coordinator killed mid-run and resumed ends where an uninterrupted run ends.

For each feature family the same run is made twice over the in-process grid
(the real ServerApp and ClientApp, messages serialized): once straight
through, once killed when round 3's training messages go out (after round 2's
checkpoint) and resumed from the run directory with the same sites still up,
as after a coordinator crash. Where the run is deterministic (no secret noise)
the final adapter and every metric are bit-identical; under DP the noise is
secret, so the privacy accounting must match exactly instead.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedlora import config as cfg
from fedlora import flower, wire
from fedlora.client.app import app as site_app
from fedlora.data.labels import infer_labels
from fedlora.privacy.ledger import Ledger
from fedlora.server.app import main
from fedlora.server.rundir import RunDirectory
from fedlora.simulations.inprocess import RUN_ID, InProcessGrid
from fedlora.strategies.fedopt import AdaptiveServerOptimizer

ROUNDS, CRASH_AT = 4, 3
BASE = ["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=24", "train.local-steps=2",
        "train.batch-size=8", f"federation.rounds={ROUNDS}", "federation.num-sites=3", "federation.min-sites=2"]
TIMES = ("round_seconds", "train_seconds")


class CoordinatorKilled(Exception):
    pass


class KillingGrid(InProcessGrid):
    """The in-process grid, whose coordinator dies when round `kill_at`'s training messages go out."""

    kill_at: int | None = None

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type.startswith("train") and self.kill_at is not None and \
                    int(m.content[wire.CONFIG][wire.SERVER_ROUND]) == self.kill_at:
                self.kill_at = None  # the restarted coordinator lives
                raise CoordinatorKilled(f"killed at round {m.content[wire.CONFIG][wire.SERVER_ROUND]}")
        return super().send_and_receive(messages, timeout=timeout)


def _run(out, settings, kill_at=None, node_configs=None):
    config = infer_labels(cfg.load_config(None, [*BASE, *settings, f'output.dir="{out}"']))
    flat = config.to_flat()
    grid = KillingGrid(site_app, flat, config.federation.num_sites)
    for context, extra in zip(grid.contexts.values(), node_configs or []):
        context.node_config.update(extra)
    grid.kill_at = kill_at

    def start(run_config):
        main(grid, Context(run_id=RUN_ID, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(),
                           run_config=run_config))

    if kill_at is None:
        start(flat)
    else:
        with pytest.raises(CoordinatorKilled):
            start(flat)
        assert [r["round"] for r in RunDirectory(out).read_metrics()] == list(range(1, kill_at))
        start({**flat, "output.resume": True})
    rundir = RunDirectory(out)
    return rundir.read_metrics(), rundir.load_checkpoint(), json.loads((out / "summary.json").read_text())


def _without_times(rows):
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


def _same_run(tmp_path, settings, node_configs=None):
    straight = _run(tmp_path / "straight", settings, node_configs=node_configs)
    resumed = _run(tmp_path / "resumed", settings, CRASH_AT, node_configs=node_configs)
    return straight, resumed


@pytest.mark.parametrize("family, settings", [
    ("plain", []),
    ("server optimizer", ["strategy.name=fedadam", "strategy.fedadam.server-lr=0.05"]),
    ("secure aggregation", ["secagg.enabled=true", "federation.min-sites=3"]),
])
def test_a_deterministic_run_resumes_bit_exactly(tmp_path, family, settings):
    (rows, ckpt, summary), (rows2, ckpt2, summary2) = _same_run(tmp_path, settings)
    assert [r["round"] for r in rows2] == list(range(1, ROUNDS + 1))
    assert _without_times(rows2) == _without_times(rows)
    assert ckpt2.global_state.keys() == ckpt.global_state.keys()
    assert all(np.array_equal(ckpt2.global_state[k], ckpt.global_state[k]) for k in ckpt.global_state)
    assert summary2["sites"] == summary["sites"]


def test_without_its_moments_a_resumed_server_optimizer_ends_elsewhere(tmp_path, monkeypatch):
    """The control: the bit-exact check above fails when the strategy's state is not restored."""
    settings = ["strategy.name=fedadam", "strategy.fedadam.server-lr=0.05"]
    _, ckpt, _ = _run(tmp_path / "straight", settings)
    monkeypatch.setattr(AdaptiveServerOptimizer, "load_state_dict", lambda self, state: None)
    _, forgetful, _ = _run(tmp_path / "forgetful", settings, kill_at=CRASH_AT)
    assert not all(np.array_equal(forgetful.global_state[k], ckpt.global_state[k]) for k in ckpt.global_state)


def test_dp_sgd_resumes_with_the_same_spend_and_the_refused_site_stays_refused(tmp_path):
    # Site 2's own budget fits 1 round (epsilon 3.40 after it, 4.55 after two, at the sites' delta of
    # 1e-5): it refuses round 2 in both runs; after the resume (in round 3) it must not be asked again.
    settings = ["privacy.enabled=true", "privacy.epsilon=50", "privacy.noise-multiplier=1.2",
                "privacy.batch-size=8"]
    nodes = [{}, {}, {"privacy-epsilon": 4.0}]
    (rows, _, summary), (rows2, _, summary2) = _same_run(tmp_path, settings, nodes)
    assert [r["round"] for r in rows2] == list(range(1, ROUNDS + 1))
    for key in ("epsilon", "epsilon_per_site", "sites", "sites_out_of_budget"):
        assert [r.get(key) for r in rows2] == [r.get(key) for r in rows], key
    assert rows[-1]["sites_out_of_budget"] == 1 and rows[-1]["sites"] == 2
    refusals = [r["rejected"] for r in rows2]
    assert refusals == [r["rejected"] for r in rows] == [0, 1, 0, 0]  # asked once, refused once, never again
    assert summary2["privacy"]["site_level"]["out_of_budget"] == summary["privacy"]["site_level"]["out_of_budget"]
    for run in ("straight", "resumed"):  # each site trained each round once: no round twice in a ledger
        for site in ("site-0", "site-1"):
            entries = [e for e in Ledger(tmp_path / run / "sites" / site).entries() if e["event"] == "train"]
            assert [e["round"] for e in entries] == list(range(1, ROUNDS + 1)), (run, site)


@pytest.mark.parametrize("family, settings, column", [
    ("client-level DP", ["privacy.client-dp=true", "privacy.client-noise-multiplier=0.5", "privacy.client-epsilon=100"],
     "client_epsilon"),
    ("distributed DP", ["secagg.enabled=true", "federation.min-sites=3", "secagg.dp-noise-multiplier=2.0",
                        "secagg.dp-clip=0.05"], "secagg_dp_epsilon"),
])
def test_coordinator_side_dp_resumes_its_accounting(tmp_path, family, settings, column):
    (rows, _, summary), (rows2, _, summary2) = _same_run(tmp_path, settings)
    assert [r[column] for r in rows2] == [r[column] for r in rows]
    assert rows2[-1][column] > rows2[CRASH_AT - 2][column] > 0  # it kept counting from the checkpoint
    assert summary2["privacy"].get("client_level") == summary["privacy"].get("client_level")
