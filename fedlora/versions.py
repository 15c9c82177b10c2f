"""The versions of what a result depends on, written next to it (summary.json, the privacy ledger, BENCHMARKS)."""

from __future__ import annotations

import importlib.metadata
import platform

DISTRIBUTIONS = ("fedlora", "flwr", "torch", "transformers", "peft", "opacus")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in DISTRIBUTIONS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out
