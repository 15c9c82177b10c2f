"""`fedlora privacy plan` and the `[privacy]` configuration section."""

import pytest

from fedlora import config as cfg
from fedlora.cli import main
from fedlora.privacy.accounting import Mechanism, epsilon
from fedlora.privacy.plan import site_plan


def test_plan_prints_sigma_and_epsilon_per_round(capsys):
    assert main(["privacy", "plan", "--records", "1000", "--batch-size", "50", "--local-epochs", "1",
                 "--rounds", "4", "--epsilon", "3", "--delta", "1e-5", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    plan = site_plan(1000, 50, 4, 3.0, 1e-5, local_epochs=1.0, accountant="rdp")
    assert f"sigma = {plan.noise_multiplier:g}" in out and "q = 0.05, 20 step(s) per round" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 4
    assert plan.enforced[-1] <= 3.0 and plan.enforced == sorted(plan.enforced)
    assert plan.refuses_at is None


def test_plan_with_a_given_sigma_shows_where_the_site_refuses(capsys):
    plan = site_plan(256, 64, 5, 3.0, 1e-5, local_epochs=2.0, accountant="rdp", noise_multiplier=1.5)
    assert plan.refuses_at == next(r for r, e in enumerate(plan.enforced, start=1) if e > 3.0)
    main(["privacy", "plan", "--records", "256", "--rounds", "5", "--epsilon", "3", "--accountant", "rdp",
          "--noise-multiplier", "1.5"])
    assert "the site refuses this round" in capsys.readouterr().out


def test_plan_clients_warns_with_numbers(capsys):
    assert main(["privacy", "plan-clients", "--sites", "10", "--rounds", "3", "--epsilon", "5",
                 "--delta", "1e-3", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "10 of 10 sites per round" in out and "per coordinate" in out and "useful only with many sites" in out


def test_privacy_defaults_are_valid_and_plan_matches_the_sites_own_maths():
    c = cfg.RunConfig()
    assert not c.privacy.enabled and c.privacy.unit_column == ""  # record-level unless a column is named
    plan = site_plan(256, c.privacy.batch_size, 5, 8.0, 1e-5, c.privacy.local_epochs, accountant="rdp")
    assert epsilon([Mechanism(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round * 5)], 1e-5,
                   "rdp") == pytest.approx(plan.enforced[-1])


def test_bad_privacy_settings_are_reported_together():
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_config(None, ["privacy.enabled=true", "privacy.epsilon=0", "privacy.delta=0.5",
                               "privacy.max-grad-norm=-1", "privacy.accountant=gdp",
                               "privacy.client-target-quantile=1.5"])
    text = str(err.value)
    for key in ("privacy.epsilon", "privacy.delta", "privacy.max-grad-norm", "privacy.accountant",
                "privacy.client-target-quantile"):
        assert key in text
    with pytest.raises(cfg.ConfigError, match="client-clipped-count-stddev"):
        cfg.load_config(None, ["privacy.client-dp=true", "privacy.client-clipping=adaptive",
                               "privacy.client-noise-multiplier=2", "privacy.client-clipped-count-stddev=0.5"])
    options = cfg.describe_options()
    assert "[privacy]" in options and "\n  unit-column = ''" in options.split("[privacy]")[1]


def test_plan_shows_what_a_deployed_site_has_spent_and_what_remains(tmp_path, capsys):
    from fedlora.deploy.coordinator_home import init_coordinator
    from fedlora.deploy.site_home import SiteHome, init_site
    from fedlora.privacy.budget import Budget, RunShare
    from fedlora.privacy.site import SiteAccountant

    coord = init_coordinator(tmp_path / "c", ["fl.example.org"])
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "chest pain", "label": "cardiology"}\n')
    home = init_site(tmp_path / "s", "hospital-a", data, "fl.example.org:9092", coord.tls.ca_cert, epsilon=3.0)
    site = SiteAccountant(home.state, Budget(3.0, 1e-5, "node"), "prv", share=RunShare(0.75, True))
    for r in (1, 2):  # what the site's own rounds wrote
        site.commit(site.plan_round(r, 0.25, 8, 0.0, rounds_left=3 - r, run="41"), run="41")
    dp_accounting = pytest.importorskip("dp_accounting")
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    for m in site.history():  # an independent computation of what the ledger holds
        pld.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)),
            m.steps))
    assert main(["privacy", "plan", "--site", str(home.path), "--accountant", "prv"]) == 0
    out = capsys.readouterr().out
    spent = float(out.split("DP-SGD spent: epsilon ")[1].split()[0])
    assert spent == pytest.approx(pld.get_epsilon(1e-5), rel=0.02) and "2 round(s) in 1 run(s)" in out
    assert f"remaining: epsilon {3.0 - spent:.4f}" in out and "per-run share 0.75 (refuse)" in out
    assert main(["privacy", "plan", "--site", str(home.path), "--records", "256",
                 "--rounds", "4"]) == 0
    next_run = capsys.readouterr().out.split("the next run")[1]
    run_epsilon = float(next_run.split("epsilon ")[1].split(" for the run")[0])
    assert 0.7 < run_epsilon <= 0.75  # calibrated to the share, not to what remains
    (home.state / "ledger.key").write_text("00" * 32)  # a ledger that no longer verifies: one line, exit 1
    assert main(["privacy", "plan", "--site", str(home.path)]) == 1
    assert "mac mismatch" in capsys.readouterr().err
    assert SiteHome.load(home.path).state == home.state
