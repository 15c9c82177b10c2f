"""Timing of a full in-memory round: ``python -m fedlora.privacy.secagg.bench``.

Reports, per client count: client masking time (quantize + all masks + pack),
server time to sum the uploads, and server unmasking time (rebuild secrets,
strip masks, decode), with and without dropouts after key sharing.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np

from . import messages as m
from .config import SecAggConfig
from .simulate import run_in_memory


def bench(n: int, params: int, dropped: int, bytes_per_param: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    vectors = {1000 + i: rng.uniform(-0.5, 0.5, params).astype(np.float32) for i in range(n)}
    timings: dict[str, list[float]] = {}
    result = run_in_memory(
        vectors,
        config=SecAggConfig(bytes_per_param=bytes_per_param),
        dropouts_after_keys=list(vectors)[:dropped],
        timings=timings,
    )
    exact = sum(vectors[i].astype(np.float64) for i in result.included)
    error = float(np.abs(result.sum - exact).max())
    assert error <= result.max_error, (error, result.max_error)
    mask = statistics.mean(timings[f"client-{m.MASKED_INPUT}"])
    return {
        "mask_s": mask,
        "mask_per_neighbour_per_M": mask / n / (params / 1e6),  # n - 1 pairwise + 1 self mask
        "server_sum_s": timings[f"server-{m.MASKED_INPUT}"][0],
        "server_unmask_s": timings[f"server-{m.UNMASK}"][0],
        "max_error": error,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--dropped", type=int, default=0, help="dropouts after key sharing")
    parser.add_argument("--bytes-per-param", type=int, default=4)
    args = parser.parse_args()
    for n in args.clients:
        r = bench(n, args.params, min(args.dropped, n - 3), args.bytes_per_param)
        print(
            f"n={n:3d} params={args.params} dropped={min(args.dropped, n - 3)}: "
            f"client masking {r['mask_s']:.3f} s ({r['mask_per_neighbour_per_M'] * 1e3:.1f} ms per mask per 1M), "
            f"server sum {r['server_sum_s']:.3f} s, server unmask {r['server_unmask_s']:.3f} s, "
            f"max |error| {r['max_error']:.2e}"
        )


if __name__ == "__main__":
    main()
