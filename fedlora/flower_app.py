"""fedlora as a Flower app: its ServerApp and ClientApp, and a run's app description.

`fedlora simulate` and `fedlora run` submit a run as a small Flower app folder
whose pyproject names the installed fedlora components and carries the run's
resolved configuration as the app's run-config defaults (Flower's flat form).
The repository's own pyproject.toml declares the same app with every default
(`app_config_defaults`), so `flwr run . local --run-config 'federation.rounds=1'`
works from a clone as `fedlora simulate --set federation.rounds=1` does;
`python -m fedlora.flower_app` prints that table.
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from fedlora import config as cfg

SERVER_APP = "fedlora.server.app:app"
CLIENT_APP = "fedlora.client.app:app"
FLWR_REQUIREMENT = "flwr[simulation]>=1.42.0,<1.43"


def flower_app_pyproject(config: cfg.RunConfig, clientapp: str = CLIENT_APP) -> str:
    """A Flower app whose components are the installed fedlora apps and whose run-config
    defaults are this run's resolved configuration (`fedlora run` deploys the relay
    ClientApp, fedlora.deploy.relay:app, which calls the same handlers)."""
    doc = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": "fedlora-run", "version": "0.1.0", "license": {"file": "LICENSE"},
                    "dependencies": [FLWR_REQUIREMENT]},
        "tool": {"flwr": {"app": {
            "publisher": "fedlora", "fab-format-version": 1, "flwr-version-target": "1.42.0",
            "components": {"serverapp": SERVER_APP, "clientapp": clientapp},
            "config": config.to_flat(),
        }}},
    }
    return tomli_w.dumps(doc)


def write_app(folder: Path, config: cfg.RunConfig, clientapp: str = CLIENT_APP) -> Path:
    """The app folder `flwr run` takes: pyproject.toml and the LICENSE a FAB needs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(flower_app_pyproject(config, clientapp))
    (folder / "LICENSE").write_text("Apache-2.0\n")
    return folder


def app_config_defaults() -> dict:
    """Every configuration key's default, as the nested `[tool.flwr.app.config]` table (lists as
    comma-separated strings: Flower's run config holds only bool, int, float and str)."""
    def flat_lists(table: dict) -> dict:
        return {k: flat_lists(v) if isinstance(v, dict) else ",".join(map(str, v)) if isinstance(v, list) else v
                for k, v in table.items()}

    return flat_lists(cfg.RunConfig().to_nested())


if __name__ == "__main__":
    print(tomli_w.dumps({"tool": {"flwr": {"app": {"config": app_config_defaults()}}}}))
