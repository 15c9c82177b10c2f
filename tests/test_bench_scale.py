"""The scale suite's own arithmetic: the memory it reports and the fit it draws (its runs are benchmarks)."""

import subprocess
import sys

import pytest

from fedlora.bench import scale


def test_peak_memory_counts_a_child_process():
    alloc = "import time; b = bytearray(300 * 10**6); b[::4096] = b'x' * len(b[::4096]); time.sleep(2)"
    with scale.PeakMemory(every=0.1) as memory:
        baseline = memory._total()
        subprocess.run([sys.executable, "-c", alloc], check=True)
    assert memory.peak - baseline >= 250e6  # the child's 300 MB, touched page by page


def test_the_fit_recovers_a_linear_cost_and_needs_two_sample_sizes():
    cells = [{"sampled": n, "sampled_round_seconds": 2.0 + 0.05 * n} for n in (1, 10, 100)]
    assert scale.fit(cells) == pytest.approx({"fixed_seconds": 2.0, "seconds_per_sampled_site": 0.05})
    assert scale.fit(cells[:1]) is None


def test_every_cell_samples_no_more_than_it_connects():
    for plan in (scale.QUICK, scale.FULL):
        assert all(0 < c.sampled <= c.connected for c in plan.cells)
        assert plan.rounds >= 2  # a sampled round before the last, in which every site evaluates
