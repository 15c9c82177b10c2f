"""Everything a simulated run can know before its federation starts, checked before it starts.

A user's mistake (a bad configuration, a malformed row, a model that is not
there, a tracker that is not installed) is reported in one clear line by the
command, not minutes later inside the Simulation Engine.
"""

from __future__ import annotations

from pathlib import Path

from fedlora import config as cfg
from fedlora.data.labels import infer_labels
from fedlora.data.sites import check_site_data
from fedlora.model_sources import check_available
from fedlora.server.tracking import require as require_tracking
from fedlora.tasks import build_task


def prepare(config: cfg.RunConfig, out: Path) -> cfg.RunConfig:
    """The run's configuration with its output directory and label names filled in, after
    checking the data (every row), the model and the tracker. Raises ConfigError, DataError
    or ModelLoadError."""
    # Paths as the user typed them, relative to this shell: the ServerApp's process may start elsewhere.
    paths = {"model.warm-start": config.model.warm_start, "model.compare-with": config.model.compare_with,
             "output.registry": config.output.registry}
    absolute = {key: str(Path(path).expanduser().absolute()) for key, path in paths.items() if path}
    config = infer_labels(cfg.from_nested(config.to_nested(), {"output.dir": str(out), **absolute}))
    check_site_data(config, build_task(config))
    check_available(config.model.name, config.model.allow_download)
    require_tracking(config.output.tracking)
    return config
