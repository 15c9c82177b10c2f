"""The `secure-aggregation` suite of `fedlora bench`: each kind of round on a small update, the
in-memory protocol, the choice of the fastest repeat, a whole tiny run, and the rendered section."""

import dataclasses
import json

import pytest

from fedlora.bench import secure_aggregation as sa
from fedlora.bench.suite import BenchContext


def test_synthetic_state_splits_the_update_into_tensors_of_at_most_one_tensor_size():
    state = sa.synthetic_state(2 * sa.TENSOR + 5)
    assert [v.size for v in state.values()] == [sa.TENSOR, sa.TENSOR, 5]
    assert list(state) == ["adapter.0000", "adapter.0001", "adapter.0002"]


@pytest.mark.parametrize("secure, width", [(False, 4.0), (True, 4.0)])
def test_a_fedlora_round_aggregates_every_site_and_uploads_four_bytes_per_parameter(secure, width):
    m = sa.fedlora_round(secure, sites=3, params=20_000)
    assert 0 < m.parallel <= m.sequential
    assert width <= m.upload_per_param < width * 1.1  # + names, headers, and the secure round's keys


@pytest.mark.parametrize("secure, width", [(False, 4.0), (True, 8.0)])
def test_a_flower_round_is_timed_and_secagg_plus_uploads_int64(secure, width):
    m = sa.flower_round(secure, sites=3, params=20_000)
    assert 0 < m.parallel <= m.sequential
    assert width <= m.upload_per_param < width * 1.1


def test_best_keeps_the_fastest_repeat_of_each_variant_taking_turns():
    order = []
    values = {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 6.0, 4.0])}

    def measure(name):
        order.append(name)
        value = next(values[name])
        return sa.Measurement(sequential=value * 2, parallel=value, upload_per_param=4.0)

    fastest = sa.best([lambda: measure("a"), lambda: measure("b")], repeats=3)
    assert [m.parallel for m in fastest] == [1.0, 4.0]
    assert order == ["a", "b"] * 3  # interleaved, not all of a then all of b


def test_the_in_memory_protocol_sums_exactly_with_and_without_a_dropout():
    assert sa.dropouts(3) == [0] and sa.dropouts(5) == [0, 1]
    for dropped in (0, 1):
        r = sa.in_memory_round(5, 10_000, dropped, 4)
        assert r["max_error"] < 1e-6 and r["mask_s"] > 0 and r["server_unmask_s"] > 0
        assert r["mask_per_neighbour_per_M"] == pytest.approx(r["mask_s"] / 5 / 0.01)


def test_plans_keep_the_benchmarks_md_grid_in_full_mode_and_skip_ray_in_quick_mode():
    assert sa.FULL.params == (100_000, 1_000_000, 13_600_000) and sa.FULL.sites == (3, 10, 20)
    assert (sa.FULL.repeats, sa.FULL.large_repeats, sa.FULL.bytes_per_param, sa.FULL.simulation) == (3, 1, 4, True)
    assert sa.FULL.protocol_params == 1_000_000 and sa.FULL.protocol_clients == (3, 10, 20)
    assert not sa.QUICK.simulation and max(sa.QUICK.params) < sa.LARGE
    assert sa.SIMULATION_SITES == (3, 20, 100) and not any(s.startswith("model.name") for s in sa.SIMULATION_SETS)


def test_a_tiny_quick_run_fills_every_table(tmp_path, monkeypatch):
    tiny = dataclasses.replace(sa.QUICK, params=(1_000,), sites=(3, 4), repeats=1, protocol_params=1_000,
                               protocol_clients=(4,))
    monkeypatch.setattr(sa, "QUICK", tiny)
    result = sa.run(BenchContext(quick=True, workdir=tmp_path))
    rounds = result.figures["rounds"]
    assert [(r["params"], r["sites"]) for r in rounds] == [(1_000, 3), (1_000, 4)]
    assert set(rounds[0]["variants"]) == {"fedlora plain", "fedlora secure", "flower plain", "flower secagg+"}
    assert rounds[0]["fedlora_ratio"] == pytest.approx(
        rounds[0]["variants"]["fedlora secure"]["parallel"] / rounds[0]["variants"]["fedlora plain"]["parallel"])
    assert [(p["clients"], p["dropped"]) for p in result.figures["protocol"]] == [(4, 0), (4, 1)]
    assert result.figures["simulation"] is None and "| 1,000 | 4 |" in result.markdown


def test_section_renders_the_round_protocol_and_simulation_tables():
    variant = {"sequential": 0.06, "parallel": 0.05, "upload_per_param": 4.0}
    fig = {"steady_allocator": True, "bytes_per_param": 4,
           "rounds": [{"params": 100_000, "sites": 20, "repeats": 3, "fedlora_ratio": 2.8, "flower_ratio": 30.7,
                       "variants": {"fedlora plain": variant, "fedlora secure": {**variant, "parallel": 0.14},
                                    "flower plain": {**variant, "parallel": 0.026},
                                    "flower secagg+": {**variant, "parallel": 0.811, "upload_per_param": 8.0}}}],
           "protocol": [{"clients": 20, "params": 1_000_000, "dropped": 1, "mask_s": 0.35,
                         "mask_per_neighbour_per_M": 0.0175, "server_sum_s": 0.02, "server_unmask_s": 0.3,
                         "max_error": 2e-8}],
           "simulation": [{"sites": 3, "secure": False, "round_seconds": [4.4, 3.3, 3.5], "median_round_seconds": 3.4,
                           "bytes_up": 60276, "bytes_down": 118620, "adapter_params": 75653},
                          {"sites": 3, "secure": True, "round_seconds": [5.5, 4.0, 3.6], "median_round_seconds": 3.8,
                           "bytes_up": 57903, "bytes_down": 124578, "adapter_params": 75653}]}
    assert sa.secure_over_plain(fig["simulation"]) == pytest.approx({3: 3.8 / 3.4})
    text = sa.render(fig)
    for expected in ("| 100,000 | 20 | 0.050 | 0.140 | 2.8 | 4.00 | 0.026 | 0.811 | 30.7 | 8.00 |",
                     "| 100,000 | 20 | 3 | 0.060 |", "| 20 | 1 | 0.350 | 17.5 | 0.020 | 0.300 | 2.00e-08 |",
                     "| round 1 s | round 2 s | round 3 s | median s | secure / plain |",
                     "| 3 | plain | 4.400 | 3.300 | 3.500 | 3.400 |  | 60,276 | 118,620 |",
                     "| 3 | secure | 5.500 | 4.000 | 3.600 | 3.800 | 1.12 | 57,903 | 124,578 |",
                     "75,653 adapter parameters"):
        assert expected in text, expected
    assert "skips the Simulation Engine" in sa.render({**fig, "simulation": None})


def test_the_simulation_runs_plain_then_secure_at_each_number_of_sites(tmp_path, monkeypatch):
    """Each pair differs only in secagg.enabled; the ratio compares the rounds after the first."""
    asked = []

    def finished_run(command, sets, rundir):
        asked.append((command, sets, rundir.name))
        rundir.mkdir(parents=True)
        secure = "secagg.enabled=true" in sets
        seconds = [9.0, 2.0, 4.0, 3.0] if secure else [9.0, 2.0, 2.0, 2.0]
        (rundir / "metrics.jsonl").write_text("".join(
            json.dumps({"round": i + 1, "round_seconds": s, "sites": 3, "bytes_up": 10, "bytes_down": 20}) + "\n"
            for i, s in enumerate(seconds)))
        (rundir / "summary.json").write_text(json.dumps({"parameters": {"adapter": 75_653}}))
        return rundir

    monkeypatch.setattr(sa, "finished_run", finished_run)
    sim = sa.simulation_comparison(tmp_path, lambda items, what: items, sites=(3, 20))
    assert [name for _, _, name in asked] == ["plain-3", "secure-3", "plain-20", "secure-20"]
    for _, sets, name in asked:
        n = name.split("-")[1]
        assert f"federation.num-sites={n}" in sets and f"federation.min-sites={n}" in sets
        assert f"secagg.enabled={str(name.startswith('secure')).lower()}" in sets
    assert [r["median_round_seconds"] for r in sim] == [2.0, 3.0, 2.0, 3.0]
    assert sa.secure_over_plain(sim) == {3: 1.5, 20: 1.5}
