"""A site's process-wide runtime: parsed config, task, model and data, built once.

Flower may call the ClientApp many times in one process (Ray actors in
simulation keep their process across rounds), so the base model is loaded once
per process and the adapter is overwritten from the server's message every
time. Nothing here is shared with another process.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache

from fedlora import config as cfg
from fedlora.data.labels import infer_labels
from fedlora.data.sites import SiteData, deployed_site_data, simulated_site_data
from fedlora.models import LoadedModel, load_model
from fedlora.strategies.ranks import site_rank, with_site_rank
from fedlora.tasks import build_task
from fedlora.tasks.base import Example, Task

log = logging.getLogger(__name__)


class BaseModelMismatch(RuntimeError):
    """The site's base model weights are not the coordinator's (their fingerprints differ)."""


@dataclass
class SiteRuntime:
    config: cfg.RunConfig
    task: Task
    loaded: LoadedModel
    data: SiteData
    train_examples: list[Example]
    eval_examples: list[Example]
    site_index: int
    rank: int  # LoRA rank this site trains at (fedlora.strategies.ranks)

    @property
    def pad_id(self) -> int:
        return self.loaded.tokenizer.pad_token_id


@lru_cache(maxsize=4)
def _config(run_config_json: str) -> cfg.RunConfig:
    return cfg.from_flat(json.loads(run_config_json))


@lru_cache(maxsize=4)
def _training_config(run_config_json: str, simulated: bool) -> cfg.RunConfig:
    """The configuration a site trains with. A run started with `flwr run` may leave task.labels
    empty: a simulated site, on the coordinator's machine, infers them from the same data and in
    the same order as the ServerApp does; a deployed site cannot, and says so."""
    config = _config(run_config_json)
    if config.task.type != "classification" or config.task.labels:
        return config
    if not simulated:
        raise cfg.ConfigError(["task.labels: a deployed site needs the run to list every label, in order "
                               "(`fedlora run` asks for them)"])
    return infer_labels(config)


@lru_cache(maxsize=4)  # one model per LoRA rank: a Ray actor may serve sites of different ranks
def _model(run_config_json: str, simulated: bool, rank: int) -> tuple[Task, LoadedModel]:
    config = with_site_rank(_training_config(run_config_json, simulated), rank)
    task = build_task(config)
    # A simulated site computes on a GPU only when it was given a share of one.
    return task, load_model(config, task, gpu_allowed=not simulated or config.simulation.gpus_per_site > 0)


@lru_cache(maxsize=64)
def _site(run_config_json: str, node_config_json: str) -> SiteRuntime:
    node = json.loads(node_config_json)
    simulated = "data-path" not in node  # a deployed site names its own file
    config = _training_config(run_config_json, simulated)
    rank = site_rank(config, node)
    task, loaded = _model(run_config_json, simulated, rank)
    if not simulated:
        index = int(node.get("site-index", 0))
        data = deployed_site_data(node["data-path"], str(node.get("site", "site")), config, task)
    else:
        index = int(node["partition-id"])
        data = simulated_site_data(index, int(node["num-partitions"]), config, task)
    if data.skipped:
        log.warning("site %s skipped %d bad rows (first: line %d: %s)", data.name, len(data.skipped),
                    *data.skipped[0])
    tok, max_len = loaded.tokenizer, config.model.max_length
    return SiteRuntime(config, task, loaded, data, task.encode(data.train, tok, max_len),
                       task.encode(data.eval, tok, max_len) if data.eval else [], index, rank)


def site_config(context) -> cfg.RunConfig:
    """The run's parsed configuration (no model or data), cached for the life of the process."""
    return _config(json.dumps(dict(context.run_config), sort_keys=True))


def site_runtime(context) -> SiteRuntime:
    """The runtime for this run and this node, cached for the life of the process."""
    run_json = json.dumps(dict(context.run_config), sort_keys=True)
    node_json = json.dumps(dict(context.node_config), sort_keys=True)
    return _site(run_json, node_json)
