"""Baselines a federated run is judged against, trained in-process with the same code:

- centralized: all sites' training rows pooled in one place, the same total
  number of optimizer steps as the whole federation took (Σ over sites and rounds);
- local-only: each site alone, the same steps it took in the federation.

All are scored on the same central test set as the federated run. The quality
suite (quality.py) puts them beside its federated runs.
"""

from __future__ import annotations

import time

from fedlora import config as cfg
from fedlora.data.labels import infer_labels
from fedlora.data.sites import central_test_rows, simulated_site_data
from fedlora.models import load_model, set_trainable_state, trainable_state
from fedlora.tasks import build_task
from fedlora.training import evaluate_counts, local_train, planned_steps


def run_baselines(config: cfg.RunConfig) -> dict:
    config = infer_labels(config)
    task = build_task(config)
    loaded = load_model(config, task)
    model, tok = loaded.model, loaded.tokenizer
    pad, max_len = tok.pad_token_id, config.model.max_length
    initial = trainable_state(model)
    test = task.encode(central_test_rows(config, task) or [], tok, max_len)
    if not test:
        raise ValueError("baselines need a central test set: set data.test-path")
    n = config.federation.num_sites
    sites = [simulated_site_data(k, n, config, task) for k in range(n)]
    encoded = [task.encode(s.train, tok, max_len) for s in sites]
    tc = config.train
    site_steps = [config.federation.rounds * planned_steps(len(e), tc.batch_size, tc.local_epochs, tc.local_steps)
                  for e in encoded]

    def train_and_score(examples, steps, seed):
        set_trainable_state(model, initial)
        started = time.perf_counter()
        local_train(model, task, examples, pad, steps=steps, seed=seed, learning_rate=tc.learning_rate,
                    weight_decay=tc.weight_decay, batch_size=tc.batch_size, max_grad_norm=tc.max_grad_norm)
        seconds = time.perf_counter() - started
        scores = task.metrics(evaluate_counts(model, task, test, pad))
        return {**{k.replace("eval_", "test_"): v for k, v in scores.items()}, "steps": steps, "seconds": seconds}

    pooled = [e for site in encoded for e in site]
    result = {"centralized": train_and_score(pooled, sum(site_steps), tc.seed)}
    result["local_only"] = [{"site": site.name, "train_rows": len(encoded[k]),
                             **train_and_score(encoded[k], steps, tc.seed + k)}
                            for k, (site, steps) in enumerate(zip(sites, site_steps))]
    return result
