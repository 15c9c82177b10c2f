"""The privacy audit's findings, each replayed against an independent computation
(Google's dp-accounting, a closed form, or the attack itself), so each fails on
the behaviour the audit measured and passes now."""

from __future__ import annotations

import hashlib
import hmac
import json
import math

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from scipy.optimize import brentq
from scipy.stats import norm

from fedlora import flower
from fedlora.client.app import app as site_app
from fedlora.config import load_config
from fedlora.config import load_config as cfg_load_config
from fedlora.data.labels import infer_labels
from fedlora.privacy.accounting import Mechanism
from fedlora.privacy.budget import SITE_DELTA, Budget, resolve_budget
from fedlora.privacy.client_dp import ClientLevelDP
from fedlora.privacy.ledger import Ledger, LedgerTampered
from fedlora.privacy.server import ServerPrivacy
from fedlora.privacy.site import SiteAccountant
from fedlora.server.app import main
from fedlora.server.collect import Messenger
from fedlora.server.pipeline import Coordinator
from fedlora.simulations.inprocess import RUN_ID, InProcessGrid, run_inprocess
from fedlora.strategies.compose import server_strategy

dp_accounting = pytest.importorskip("dp_accounting")


def cfg_load(settings):
    return infer_labels(cfg_load_config(None, settings))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018)."""
    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta
    return brentq(excess, 0.0, 200.0)


def _pld_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps, by dp-accounting's PLD accountant."""
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    oracle = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    oracle.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return oracle.get_epsilon(delta)


# -- a site bounds delta itself ---------------------------------------------------------------
def test_a_coordinators_large_delta_cannot_weaken_a_sites_epsilon(tmp_path):
    """The audit: node epsilon 1, coordinator delta 0.5: sigma fell from 6.19 to 0.90."""
    units, q, steps, rounds = 256, 0.25, 8, 5  # the default scenario's site: 256 records, batch 64, 2 epochs
    budget = resolve_budget(8.0, 0.5, {"privacy-epsilon": 1.0}, units)
    assert budget.delta == SITE_DELTA and "site default" in budget.source
    plan = SiteAccountant(tmp_path, budget, "prv").plan_round(1, q, steps, rounds_left=rounds)
    # dp-accounting, at the delta the site guarantees, for the whole run at this sigma: within the budget
    assert _pld_epsilon(plan.noise_multiplier, q, steps * rounds, SITE_DELTA) <= 1.0 * 1.01
    assert plan.noise_multiplier > 5  # not the 0.90 the coordinator's delta would have bought


def test_a_site_caps_delta_below_one_over_its_units_and_its_own_setting_wins():
    for units in (20_000, 25_001, 99_999):  # <= 1/(10 n), and a power of ten: the same for a whole decade of n
        delta = resolve_budget(8.0, 1e-3, {}, units=units).delta
        assert delta <= 1 / (10 * units) and delta == 1e-6
    assert resolve_budget(8.0, 1e-3, {"privacy-delta": 1e-6}, units=100).delta == 1e-6
    assert resolve_budget(8.0, 1e-8, {"privacy-delta": 1e-6}, units=100).delta == 1e-8  # the stricter wins
    assert resolve_budget(8.0, 1e-3, {"privacy-delta": 5e-6}, units=100).delta == 1e-6


# -- client-level DP: the adaptive clipping count, the sample, the budget, the loss ----------------
class ZeroNoise:
    """A generator whose normals are zero, keeping the scales asked for: the released statistics
    themselves, and the noise each was meant to carry."""

    def __init__(self):
        self.scales = []

    def normal(self, loc=0.0, scale=1.0, size=None):
        self.scales.append(float(scale))
        return np.zeros(size) if size is not None else 0.0


def _site(norm: float, rng) -> dict:
    v = rng.normal(size=(6, 5))
    return {"w": (norm * v / np.linalg.norm(v)).astype(np.float32)}


def _release(updates, z=1.3, clip=1.0):
    """The default count noise (max(sites/20, z) = z here), as in the audit's run."""
    noise = ZeroNoise()
    mechanism = ClientLevelDP(z, clip, 1e-5, adaptive=True, rng=noise)
    result = mechanism.round(updates, {"w": np.zeros((6, 5), np.float32)}, 1.0, 12)
    return mechanism, result, noise.scales


def test_adaptive_clipping_is_accounted_at_the_sensitivity_of_what_it_releases():
    """Measured from the releases themselves: one site removed moves the update sum by C and the
    released count by its sensitivity; the Gaussian those make must be the one accounted. The
    audit: a run accounted at z = 1.3 was really z = 0.98 (epsilon 4.45 -> 7.29 at q = 0.1, 100 rounds)."""
    rng = np.random.default_rng(0)
    sites = [_site(0.999, rng) for _ in range(6)] + [_site(5.0, rng) for _ in range(6)]  # within C, and over
    mechanism, full, (update_std, count_std) = _release(sites)
    moves = []
    for gone in range(len(sites)):  # every neighbouring federation: one site removed
        _, without, _ = _release(sites[:gone] + sites[gone + 1:])
        update_move = np.linalg.norm(full.delta_mean["w"].astype(np.float64) - without.delta_mean["w"]) * 12
        count_move = abs(full.count_release - without.count_release)
        moves.append(np.hypot(update_move / update_std, count_move / count_std))  # in noise units
    mu = max(moves)  # the worst neighbour
    assert mechanism.history[-1].noise_multiplier == pytest.approx(1 / mu, rel=1e-4)
    reported = ClientLevelDP(1.3, 1.0, 1e-5)
    reported.history = [Mechanism(1.3, 0.1, 1)] * 100
    assert _pld_epsilon(1 / mu, 0.1, 100, 1e-5) <= reported.spent()["epsilon"] * 1.01 + 0.01


def _coordinator(config) -> Coordinator:
    return Coordinator(None, config, server_strategy(config), None, Messenger(None, ServerPrivacy(config)), None,
                       None, "")


def test_the_sample_is_secret_and_epsilon_is_also_given_without_amplification():
    """The audit: sites were drawn from a generator seeded by the run config, so amplification by
    sampling was claimed for a sample anyone with the config could recompute."""
    config = load_config(None, ["privacy.client-dp=true", "federation.num-sites=100", "federation.min-sites=3",
                                "federation.fraction-train=0.1"])
    nodes = list(range(1000, 1100))
    draws = [_coordinator(config).sample(nodes, 1) for _ in range(2)]
    assert draws[0] != draws[1]  # nothing in the configuration reproduces it (a 1 in ~10^13 chance otherwise)
    plain = load_config(None, ["federation.num-sites=100", "federation.fraction-train=0.1"])
    replay = _coordinator(plain)
    assert replay.sample(nodes, 1) == replay.sample(nodes, 1)  # without DP a run stays reproducible
    mechanism = ClientLevelDP(1.0, 0.1, 1e-5)
    mechanism.history = [Mechanism(1.0, 0.1, 1)] * 50
    pld = _pld_epsilon(1.0, 0.1, 50, 1e-5)  # Poisson-subsampled, as the secret sample now is
    assert pld - 0.01 <= mechanism.spent()["epsilon"] <= pld * 1.01 + 0.01
    k = 9  # the most-sampled site took part 9 times: without the secret, 9 Gaussian steps at z = 1
    assert mechanism.unamplified(k) == pytest.approx(gaussian_epsilon(math.sqrt(k) / 1.0, 1e-5), abs=0.02)


def test_client_level_dp_ends_the_run_before_its_budget_and_keeps_losses_and_participants_private(tmp_path):
    out = run_inprocess(load_config(None, [
        "model.name=tiny-bert", "model.max-length=32", "data.records-per-site=24", "train.local-steps=1",
        "federation.rounds=6", "federation.num-sites=3", "privacy.client-dp=true",
        "privacy.client-noise-multiplier=1.5", "privacy.client-epsilon=5"]), tmp_path)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    spent = rows[-1]["client_epsilon"]
    assert len(rows) < 6 and spent <= 5.0  # stopped before the round that would pass the budget
    assert 0 < len(rows) and gaussian_epsilon(math.sqrt(len(rows) + 1) / 1.5, 1e-5) > 5.0  # one more would
    assert "client-epsilon" in summary["privacy"]["stopped"]
    assert all("train_loss" not in r for r in rows)  # not noised: it stays at the sites
    assert summary["sites"] == {} and "secret" in summary["privacy"]["client_level"]["assumes"]
    assert summary["privacy"]["client_level"]["epsilon_unamplified"] >= spent


# -- distributed DP: the site's own floor, budget and ledger ----------------------------------------
def test_a_site_enforces_its_own_floor_and_budget_for_distributed_dp(tmp_path):
    """The audit: sigma, the clip norm and the threshold came from the coordinator, and only the
    coordinator counted epsilon. Each site now checks the noise against its own floor and its own
    site-level budget before it trains, and keeps the count in its ledger."""
    sigma, delta = 1.0, 1e-5
    two = gaussian_epsilon(math.sqrt(2) / sigma, delta)  # the closed form: 2 releases fit this budget...
    budget = (two + gaussian_epsilon(math.sqrt(3) / sigma, delta)) / 2  # ...3 do not
    config = cfg_load(["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=24",
                       "train.local-steps=1", "federation.rounds=4", "federation.num-sites=4",
                       "federation.min-sites=3", "secagg.enabled=true", f"secagg.dp-noise-multiplier={sigma}",
                       "secagg.dp-clip=0.05", f'output.dir="{tmp_path}"'])
    grid = InProcessGrid(site_app, config.to_flat(), 4)
    contexts = list(grid.contexts.values())
    contexts[2].node_config["secagg-dp-epsilon"] = budget
    contexts[3].node_config["secagg-dp-min-noise"] = 2 * sigma  # this site wants more noise than the run gives
    main(grid, Context(run_id=RUN_ID, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(),
                       run_config=config.to_flat()))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Site 3 never joined; site 2 refused round 3, leaving too few for a secure sum, and then the run ended.
    assert [r["sites"] for r in rows] == [3, 3, 0] and "secagg_failed" in rows[2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "out of privacy budget" in summary["privacy"]["stopped"]  # then fewer than min-sites could train

    def releases(context):
        folder = tmp_path / "sites" / f"node-{context.node_id}"
        return [e for e in Ledger(folder).entries() if e["event"] == "distributed-dp"] if folder.exists() else []

    assert releases(contexts[3]) == []  # refused before training: nothing recorded, nothing sent
    recorded = releases(contexts[2])
    assert [e["round"] for e in recorded] == [1, 2] and recorded[-1]["epsilon"] == pytest.approx(two, rel=1e-4)
    assert all(e["epsilon"] <= budget for e in recorded)


# -- the ledger is keyed, and the coordinator's record of its head is checked --------------------
def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def _hmac(key: bytes):
    return lambda body: hmac.new(key, body, hashlib.sha256).hexdigest()


def _rewrite(ledger: Ledger, field: str, mac, factor: float = 6, key: bytes | None = None,
             extra: dict | None = None) -> None:
    """The audit's attack: raise sigma in every training entry, recompute every link with `mac` into
    `field`, and write a head (MACed when the attacker has `key`)."""
    entries = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    prev, renamed = "0" * 64, {}
    for entry in entries:
        old = entry.pop("hash", None) or entry.pop("mac")
        if entry["event"] in ("train", "reserved"):
            entry["noise_multiplier"] *= factor
        if "reservation" in entry:
            entry["reservation"] = renamed.get(entry["reservation"], entry["reservation"])
        entry.update(extra or {})
        entry["prev"] = prev
        body = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()
        entry[field] = prev = renamed[old] = mac(body)
    ledger.path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    if field == "hash":
        head = {"count": len(entries), "hash": prev}
    else:
        tag = f"ledger-head:{len(entries)}:{prev}".encode()
        head = {"count": len(entries), "last": prev,
                "mac": hmac.new(key, tag, hashlib.sha256).hexdigest() if key else _sha256(tag)}
    ledger.head_path.write_text(json.dumps(head))


def _site_with_rounds(folder, rounds: int = 5) -> tuple[SiteAccountant, str]:
    site = SiteAccountant(folder, Budget(10.0, 1e-5, "test"), "prv")
    for r in range(1, rounds + 1):
        site.commit(site.plan_round(r, 0.25, 8, 1.1))
    return site, site.ledger.head()


def test_a_rewritten_ledger_is_refused_with_or_without_its_key(tmp_path):
    """The audit raised sigma in every entry and recomputed the SHA-256 chain: accepted, epsilon 4.62 ->
    0.29. Now the chain and its head are MACed under the site's key. Whoever can read (or replace) the
    key can still rewrite it, and so can whoever deletes the key and passes the ledger off as one from
    before keys: both are caught by the head the coordinator kept, which a rewrite cannot contain."""
    honest = _pld_epsilon(1.1, 0.25, 40, 1e-5)
    forged = _pld_epsilon(6.6, 0.25, 40, 1e-5)
    assert forged < honest / 10  # what the rewrite would buy

    site, _ = _site_with_rounds(tmp_path / "no-key")
    assert site.spent()["epsilon"] == pytest.approx(honest, rel=0.02)
    _rewrite(site.ledger, "mac", _sha256)  # the audit's attack, as it was
    with pytest.raises(LedgerTampered, match="mac mismatch"):
        site.spent()

    site, _ = _site_with_rounds(tmp_path / "truncated")
    entries = site.ledger.path.read_text().splitlines()
    site.ledger.path.write_text("\n".join(entries[:4]) + "\n")  # the last rounds cut, the head left: detected
    with pytest.raises(LedgerTampered, match="removed"):
        site.spent()
    last = json.loads(entries[3])["mac"]  # and a head rewritten to match, without the key
    site.ledger.head_path.write_text(json.dumps({"count": 4, "last": last, "mac": _sha256(f"{4}:{last}".encode())}))
    with pytest.raises(LedgerTampered, match="head rewritten"):
        site.spent()

    for case in ("key-holder", "new-key", "passed-off-as-unkeyed"):
        site, reported = _site_with_rounds(tmp_path / case)
        if case == "key-holder":
            key = bytes.fromhex(site.ledger.key_path.read_text())
            _rewrite(site.ledger, "mac", _hmac(key), key=key)
        elif case == "new-key":
            key = bytes(range(32))
            site.ledger.key_path.write_text(key.hex())
            _rewrite(site.ledger, "mac", _hmac(key), key=key)
        else:  # no key file, SHA-256 links, and the reported head planted as a field of every entry
            site.ledger.key_path.unlink()
            _rewrite(site.ledger, "hash", _sha256, extra={"legacy_head": reported, "mac_of": reported})
        assert site.spent()["epsilon"] == pytest.approx(forged, rel=0.05), case  # the chain verifies...
        assert not site.ledger.contains(reported), case
        with pytest.raises(LedgerTampered, match="coordinator's record"):  # ...but not the coordinator's anchor
            site.plan_round(6, 0.25, 8, 1.1, anchor=reported)


def test_a_ledger_from_before_keys_is_read_as_it_is_and_continued_keyed(tmp_path):
    site, _ = _site_with_rounds(tmp_path, rounds=3)
    spent = site.spent()["epsilon"]
    _rewrite(site.ledger, "hash", _sha256, factor=1)  # the same ledger as written before keys
    site.ledger.key_path.unlink()
    legacy_head = json.loads(site.ledger.head_path.read_text())["hash"]
    reader = Ledger(tmp_path, read_only=True)  # an auditor reads it: nothing is created
    assert len(reader.entries()) == 6 and not site.ledger.key_path.exists()
    assert site.spent()["epsilon"] == spent
    site.commit(site.plan_round(4, 0.25, 8, 1.1, anchor=legacy_head))  # what a coordinator recorded still matches
    entries = site.ledger.entries()
    assert "hash" in entries[5] and "mac" in entries[6] and entries[6]["prev"] == legacy_head
    assert site.ledger.contains(legacy_head) and oct(site.ledger.key_path.stat().st_mode & 0o777) == "0o600"
    lines = site.ledger.path.read_text().splitlines()
    site.ledger.head_path.write_text(json.dumps({"count": len(lines), "hash": json.loads(lines[-1])["mac"]}))
    with pytest.raises(LedgerTampered, match="not keyed"):  # once keyed, an unkeyed head is a rewrite
        site.spent()
    site.ledger.key_path.write_text("")
    with pytest.raises(LedgerTampered, match="32-byte key"):
        site.spent()
    site.ledger.key_path.write_text("ab" * 32)
    site.ledger.key_path.chmod(0o644)
    with pytest.raises(LedgerTampered, match="chmod 600"):
        site.spent()


def test_the_coordinator_sends_each_site_its_last_head_across_runs(tmp_path, caplog):
    """Runs over the same sites' state folders: after the first, one site's ledger is rewritten with its
    key. In the next run the forecast already flags it, that site refuses to train (its ledger lacks the
    head the coordinator kept), the coordinator learns only the error's kind, and the other site trains;
    the same when the sites come back as new nodes (the head is then found by the site's name)."""
    heads = tmp_path / "ledger-heads.json"

    def run(out, seed=0):
        config = cfg_load(["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=24",
                           "train.local-steps=1", "federation.rounds=1", "federation.num-sites=2",
                           "federation.min-sites=1", "privacy.enabled=true", "privacy.noise-multiplier=2.0",
                           "privacy.local-epochs=0", f'privacy.ledger-heads="{heads}"', f'output.dir="{out}"'])
        grid = InProcessGrid(site_app, config.to_flat(), 2, seed=seed)
        for i, context in enumerate(grid.contexts.values()):
            context.node_config["state-dir"] = str(tmp_path / f"site-{i}")
        main(grid, Context(run_id=RUN_ID, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(),
                           run_config=config.to_flat()))
        summary = json.loads((out / "summary.json").read_text())
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], summary

    assert run(tmp_path / "run1")[0][0]["sites"] == 2
    recorded = json.loads(heads.read_text())
    ledger = Ledger(tmp_path / "site-0")
    assert sorted(h["head"] for h in recorded.values()) == sorted([ledger.head(), Ledger(tmp_path / "site-1").head()])
    key = bytes.fromhex(ledger.key_path.read_text())
    _rewrite(ledger, "mac", _hmac(key), key=key)
    trained_before = len([e for e in ledger.entries() if e["event"] == "train"])
    rows, summary = run(tmp_path / "run2")
    assert summary["privacy"]["forecast"]["site-0"]["ledger-mismatch"] == 1
    assert summary["privacy"]["forecast"]["site-1"]["ledger-mismatch"] == 0
    assert rows[0]["sites"] == 1
    assert len([e for e in ledger.entries() if e["event"] == "train"]) == trained_before
    assert len([e for e in Ledger(tmp_path / "site-1").entries() if e["event"] == "train"]) == 2
    upstream = [r.getMessage() for r in caplog.records if r.name == "fedlora.server.collect"]
    assert any("LedgerTampered at the site" in line for line in upstream)
    assert not any(str(tmp_path) in line for line in upstream)  # the site's path stays at the site

    caplog.clear()
    rows, _ = run(tmp_path / "run3", seed=7)  # other node ids: a site re-registered with a new key
    assert rows[0]["sites"] == 1 and len([e for e in ledger.entries() if e["event"] == "train"]) == trained_before
    assert any("connects as node" in r.getMessage() for r in caplog.records)


# -- a run's cost is known before it starts, and a site caps what one run spends ------------------
def _ledger_epsilon(folder, run=None) -> float:
    """The epsilon of a site's ledger, recomputed by dp-accounting's PLD from its entries' (sigma, q, steps)."""
    trained = [e for e in Ledger(folder).entries() if e["event"] == "train" and run in (None, e["run"])]
    oracle = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for e in trained:
        event = dp_accounting.PoissonSampledDpEvent(e["sample_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"]))
        oracle.compose(dp_accounting.SelfComposedDpEvent(event, e["steps"]))
    return oracle.get_epsilon(trained[-1]["delta"]) if trained else 0.0


def test_a_short_run_cannot_spend_a_sites_whole_budget_unseen(tmp_path, caplog):
    """The audit: with the defaults a 3-round test run spent epsilon 7.96 of 8 and the next run trained
    on pure noise, without a word. Now the coordinator gets each site's forecast before round 1, and a
    site with a per-run share (fedlora site init writes a quarter of the budget) spends at most that."""
    def run(name, run_id, settings, shares):
        config = cfg_load(["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=48",
                           "train.local-steps=1", "federation.rounds=3", "federation.num-sites=2",
                           "federation.min-sites=1", "privacy.enabled=true", "privacy.local-epochs=0",
                           f'output.dir="{tmp_path / name}"', *settings])
        grid = InProcessGrid(site_app, config.to_flat(), 2)
        for i, context in enumerate(grid.contexts.values()):
            context.run_id = run_id
            context.node_config.update({"state-dir": str(tmp_path / f"site-{i}"), **shares[i]})
        main(grid, Context(run_id=run_id, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(),
                           run_config=config.to_flat()))
        return json.loads((tmp_path / name / "summary.json").read_text())["privacy"]

    capped = {"privacy-epsilon-per-run": 2.0}
    privacy = run("test-run", 11, [], [capped, {}])
    forecast = privacy["forecast"]
    capped_spent, uncapped_spent = _ledger_epsilon(tmp_path / "site-0"), _ledger_epsilon(tmp_path / "site-1")
    assert 1.8 < capped_spent <= 2.0 * 1.01  # sigma calibrated to the share (PLD, within its discretization)
    assert uncapped_spent > 7.5               # without a share: the whole budget, as the audit saw...
    assert forecast["site-1"]["run-epsilon"] == pytest.approx(uncapped_spent, rel=0.02)  # ...but foretold
    assert forecast["site-0"]["run-epsilon"] == pytest.approx(capped_spent, rel=0.02)
    assert forecast["site-0"]["share-epsilon"] == 2.0 and forecast["site-1"]["refuses-at"] == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "fedlora.privacy.forecast"
              and r.levelname == "WARNING"]
    assert any("site-1 (" in line and "less than 10%" in line for line in warned)

    # The next run's coordinator fixes a small sigma: the forecast says site-0 refuses at round 1, and it does.
    caplog.clear()
    privacy = run("next-run", 12, ["privacy.noise-multiplier=0.9"], [capped, {}])
    assert privacy["forecast"]["site-0"]["refuses-at"] == 1 and privacy["forecast"]["site-1"]["refuses-at"] == 1
    assert _ledger_epsilon(tmp_path / "site-0", run="12") == 0.0  # nothing trained, nothing spent
    refusals = [e for e in Ledger(tmp_path / "site-0").entries() if e["event"] == "refused"]
    assert "per-run share 2" in refusals[-1]["reason"]
    assert any("site site-0 would refuse round 1" in r.getMessage() for r in caplog.records)


def test_warn_mode_is_forecast_and_a_calibrated_sigma_fits_the_share_anyway(tmp_path):
    from fedlora.privacy import forecast
    from fedlora.privacy.budget import RunShare

    site = SiteAccountant(tmp_path, Budget(8.0, 1e-5, "test"), "prv", share=RunShare(1.0, refuse=False))
    ahead = site.forecast(0.25, 8, 1.2, 3, run="r")
    plan = site.plan_round(1, 0.25, 8, 1.2, rounds_left=3, run="r")  # no refusal
    assert plan.run_projected == pytest.approx(ahead.run_epsilon) and ahead.over_share and not ahead.refuses_at
    assert ahead.run_epsilon == pytest.approx(_pld_epsilon(1.2, 0.25, 24, 1e-5), rel=0.02)
    lines = forecast.warnings({"s": forecast.pack(ahead, None, secure=False)})
    assert len(lines) == 1 and "privacy-per-run = warn" in lines[0]
    with pytest.raises(ValueError, match="refuse or warn"):
        from fedlora.privacy.budget import run_share
        run_share({"privacy-epsilon-per-run": 1.0, "privacy-per-run": "ignore"})
    # A sigma the site calibrates fits its share, warn or refuse: the warning is for a sigma the run fixes.
    calibrated = SiteAccountant(tmp_path / "calibrated", Budget(8.0, 1e-5, "test"), "prv",
                                share=RunShare(1.0, refuse=False)).forecast(0.25, 8, 0.0, 3, run="r")
    assert calibrated.run_epsilon <= 1.0 and not calibrated.refuses_at


def test_a_site_that_only_warns_says_so_loudly_while_it_trains(tmp_path, caplog):
    config = cfg_load(["model.name=tiny-bert", "model.max-length=32", "data.records-per-site=24",
                       "train.local-steps=1", "federation.rounds=2", "federation.num-sites=1",
                       "federation.min-sites=1", "privacy.enabled=true", "privacy.noise-multiplier=1.5",
                       "privacy.local-epochs=0", f'output.dir="{tmp_path}"'])
    grid = InProcessGrid(site_app, config.to_flat(), 1)
    next(iter(grid.contexts.values())).node_config.update({"privacy-epsilon-per-run": 1.0, "privacy-per-run": "warn"})
    main(grid, Context(run_id=RUN_ID, node_id=flower.SERVER_NODE_ID, node_config={}, state=RecordDict(),
                       run_config=config.to_flat()))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["sites"] for r in rows] == [1, 1] and rows[-1]["epsilon"] > 1.0  # it trained past its share...
    loud = [r for r in caplog.records if "MORE THAN THIS SITE'S PER-RUN SHARE" in r.getMessage()]
    assert len(loud) == 2 and all(r.levelname == "WARNING" for r in loud)  # ...saying so every round
    assert any("privacy-per-run = warn" in r.getMessage() for r in caplog.records
               if r.name == "fedlora.privacy.forecast")  # and the coordinator knew before round one
