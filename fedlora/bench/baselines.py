"""Baselines a federated run is judged against, trained in-process with the same code:

- centralized: all sites' training rows pooled in one place, the same total
  number of optimizer steps as the whole federation took (Σ over sites and rounds);
- local-only: each site alone, the same steps it took in the federation;
- centralized by round (`centralized_curve`): the pooled training scored after
  each round's worth of the federation's steps, until its validation accuracy
  stops improving, so a federated run can be compared at equal compute and
  each at convergence.

All are scored on the same central test set as the federated run. The quality
and curves suites put them beside their federated runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fedlora import config as cfg
from fedlora.data.labels import infer_labels
from fedlora.data.sites import central_test_rows, simulated_site_data
from fedlora.models import load_model, set_trainable_state, trainable_state
from fedlora.tasks import build_task
from fedlora.tasks.base import Example
from fedlora.training import LocalTraining, evaluate_counts, local_train, planned_steps


@dataclass
class Pooled:
    """A simulated federation's data encoded once, and one model to train baselines on."""
    config: cfg.RunConfig
    task: object
    model: object
    pad: int
    initial: dict
    test: list[Example]
    names: list[str]
    train: list[list[Example]]   # per site
    validation: list[Example]    # every site's held-out rows, pooled
    site_steps: list[int]        # steps each site takes in one round

    def score(self, examples: list[Example]) -> dict:
        scores = self.task.metrics(evaluate_counts(self.model, self.task, examples, self.pad))
        return {k.replace("eval_", "test_"): v for k, v in scores.items()}


def pooled(config: cfg.RunConfig) -> Pooled:
    config = infer_labels(config)
    task = build_task(config)
    loaded = load_model(config, task)
    tok, max_len = loaded.tokenizer, config.model.max_length
    test = task.encode(central_test_rows(config, task) or [], tok, max_len)
    if not test:
        raise ValueError("baselines need a central test set: set data.test-path")
    n = config.federation.num_sites
    sites = [simulated_site_data(k, n, config, task) for k in range(n)]
    train = [task.encode(s.train, tok, max_len) for s in sites]
    tc = config.train
    return Pooled(config, task, loaded.model, tok.pad_token_id, trainable_state(loaded.model), test,
                  [s.name for s in sites], train, [e for s in sites for e in task.encode(s.eval, tok, max_len)],
                  [planned_steps(len(e), tc.batch_size, tc.local_epochs, tc.local_steps) for e in train])


def run_baselines(config: cfg.RunConfig) -> dict:
    p = pooled(config)
    tc, rounds = p.config.train, p.config.federation.rounds

    def train_and_score(examples, steps, seed):
        set_trainable_state(p.model, p.initial)
        started = time.perf_counter()
        local_train(p.model, p.task, examples, p.pad, steps=steps, seed=seed, learning_rate=tc.learning_rate,
                    weight_decay=tc.weight_decay, batch_size=tc.batch_size, max_grad_norm=tc.max_grad_norm)
        seconds = time.perf_counter() - started
        return {**p.score(p.test), "steps": steps, "seconds": seconds}

    everything = [e for site in p.train for e in site]
    result = {"centralized": train_and_score(everything, rounds * sum(p.site_steps), tc.seed)}
    result["local_only"] = [{"site": name, "train_rows": len(p.train[k]),
                             **train_and_score(p.train[k], rounds * p.site_steps[k], tc.seed + k)}
                            for k, name in enumerate(p.names)]
    return result


def converged(validation: list[float], patience: int) -> tuple[int, int]:
    """(best, stop): indices into a validation curve. Training stops at `stop`, the first point after
    `patience` points in a row without a new best (or the last point); `best` is the best point up to it."""
    best = 0
    for i, value in enumerate(validation):
        if value > validation[best]:
            best = i
        if i - best >= patience:
            return best, i
    return best, len(validation) - 1


def centralized_curve(config: cfg.RunConfig, max_rounds: int, patience: int) -> dict:
    """The pooled rows trained in one run (one optimizer), scored after every round's worth of the
    federation's steps (Σ over sites of one round's local steps): validation accuracy on every site's
    held-out rows pooled and central test metrics, until validation has not improved for `patience`
    rounds' worth or after `max_rounds`."""
    p = pooled(config)
    tc = p.config.train
    per_round = sum(p.site_steps)
    everything = [e for site in p.train for e in site]
    points: list[dict] = []
    started = time.perf_counter()
    loop = LocalTraining(p.model, p.task, everything, p.pad, steps=per_round * max_rounds, seed=tc.seed,
                         learning_rate=tc.learning_rate, weight_decay=tc.weight_decay, batch_size=tc.batch_size,
                         max_grad_norm=tc.max_grad_norm).start()
    try:
        for r in range(1, max_rounds + 1):
            p.model.train()  # scoring left it in eval mode
            for _ in range(per_round):
                loop.step()
            validation = p.score(p.validation)["test_accuracy"]
            points.append({"round": r, "steps": r * per_round, "validation_accuracy": validation,
                           **p.score(p.test)})
            best, stop = converged([q["validation_accuracy"] for q in points], patience)
            if stop - best >= patience:
                break
    finally:
        loop.finish()
    best, stop = converged([q["validation_accuracy"] for q in points], patience)
    return {"steps_per_round": per_round, "rounds": points[:stop + 1], "best_round": best + 1,
            "seconds": time.perf_counter() - started}
