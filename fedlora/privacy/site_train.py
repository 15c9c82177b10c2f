"""A site's private training round, as the ClientApp's train handler runs it.

resolve the site's budget and unit of privacy -> plan the round (refuse if the
budget would be exceeded) -> the one training loop with DP-SGD as its step
method -> append the spend to the ledger -> only then hand back what may leave
the site: the epsilon summary, never the loss.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Mapping

from fedlora import wire
from fedlora.models import frozen, without_dropout
from fedlora.privacy.budget import dp_required, resolve_budget, run_share, state_dir, unit_column
from fedlora.privacy.dpsgd import DPSGD, DPSettings
from fedlora.privacy.site import BudgetExhausted, Forecast, SiteAccountant
from fedlora.privacy.units import build_units
from fedlora.strategies.factors import is_lora
from fedlora.training import TrainResult, local_train, planned_steps

log = logging.getLogger(__name__)

__all__ = ["BudgetExhausted", "PrivateRound", "dp_enabled", "forecast_privately", "train_privately"]


@dataclass
class PrivateRound:
    result: TrainResult
    metrics: dict[str, float]      # goes into the reply's MetricRecord
    record: dict[str, str]         # goes into the reply's PRIVACY ConfigRecord


def dp_enabled(config, node: Mapping[str, Any]) -> bool:
    return dp_required(config.privacy.enabled, node)


def private_learning_rate(config) -> float:
    """The site's learning rate under DP-SGD: the head's when it trains alone, else the adapter's."""
    d = config.privacy
    return (d.head_learning_rate if config.private_head_only else 0.0) or d.learning_rate or config.train.learning_rate


def dp_settings(config) -> DPSettings:
    return DPSettings(max_grad_norm=config.privacy.max_grad_norm, grad_sample_mode=config.privacy.grad_sample_mode)


@dataclass
class SitePrivacy:
    """A site's DP-SGD setting for a run: its units, its accountant (budget, share, ledger), q and steps."""
    units: Any
    accountant: SiteAccountant
    sample_rate: float
    steps: int


def site_privacy(rt, node: Mapping[str, Any], read_only: bool = False) -> SitePrivacy:
    config, d = rt.config, rt.config.privacy
    simulated = "data-path" not in node
    units = build_units(rt.data.train, unit_column(d.unit_column, node), d.max_records_per_unit)
    budget = resolve_budget(d.epsilon, d.delta, node, units.count)
    accountant = SiteAccountant(state_dir(node, config.output.dir, rt.data.name, simulated), budget,
                                d.accountant, rt.data.name, units.describe(), run_share(node), read_only)
    if units.count == 0:
        raise ValueError(f"site {rt.data.name}: no training rows to train on under DP-SGD")
    batch = d.batch_size or config.train.batch_size
    steps = planned_steps(units.count, batch, d.local_epochs or config.train.local_epochs, config.train.local_steps)
    return SitePrivacy(units, accountant, min(1.0, batch / units.count), steps)


def forecast_privately(rt, node: Mapping[str, Any], first_round: int, run: str = "", anchor: str = "") -> Forecast:
    """What the run's rounds from `first_round` on would cost this site under DP-SGD; writes nothing."""
    p = site_privacy(rt, node, read_only=True)
    rounds = max(0, rt.config.federation.rounds - first_round + 1)
    return p.accountant.forecast(p.sample_rate, p.steps, rt.config.privacy.noise_multiplier, rounds, run, anchor)


def train_privately(rt, node: Mapping[str, Any], server_round: int, seed: int, run: str = "",
                    extra_loss=None, anchor: str = "") -> PrivateRound:
    """DP-SGD for one round at the site `rt` (a client.runtime.SiteRuntime).
    Raises BudgetExhausted when the site refuses the round, LedgerTampered when its
    ledger does not verify or no longer holds `anchor`, the head the coordinator
    last saw. `extra_loss(model)`: a data-independent term such as FedProx's
    proximal term."""
    examples = rt.train_examples
    config, d = rt.config, rt.config.privacy
    head_only = config.private_head_only
    problems = config.dp_compute_problems()  # a site may require DP of a run that did not ask for it
    if problems:
        raise ValueError("DP-SGD cannot run here: " + "; ".join(problems))
    p = site_privacy(rt, node)
    units, accountant, sample_rate, steps = p.units, p.accountant, p.sample_rate, p.steps
    budget = accountant.budget
    plan = accountant.plan_round(server_round, sample_rate, steps, d.noise_multiplier,
                                 rounds_left=config.federation.rounds - server_round + 1, run=run, anchor=anchor)
    if accountant.share is not None and plan.run_projected > accountant.share.epsilon:
        log.warning("site %s: THIS RUN WILL SPEND MORE THAN THIS SITE'S PER-RUN SHARE: epsilon %.3f of this run "
                    "so far, %.3f if it trains every round left, share %g (node config privacy-per-run = warn)",
                    rt.data.name, plan.run_epsilon, plan.run_projected, accountant.share.epsilon)
    settings = dp_settings(config)
    learning_rate = private_learning_rate(config)
    try:
        with frozen(rt.loaded.model, lambda name: head_only and is_lora(name)), \
                (without_dropout(rt.loaded.model) if head_only else nullcontext()):
            dp = local_train(rt.loaded.model, rt.task, examples, rt.pad_id, steps=steps, seed=seed,
                             learning_rate=learning_rate, weight_decay=config.train.weight_decay,
                             extra_loss=extra_loss, precision=config.train.precision,
                             steps_method=DPSGD(units, sample_rate, plan.noise_multiplier, settings))
    except Exception as err:  # nothing left the site: the reserved spend is given back, and the error goes on
        accountant.release(plan, f"training failed: {type(err).__name__}")
        raise
    entry = accountant.commit(plan, run=run, clip=settings.max_grad_norm, grad_sample_mode=settings.grad_sample_mode,
                              max_records_per_unit=units.sensitivity_factor, units=units.count,
                              records=len(examples), empty_steps=dp.empty_steps, learning_rate=learning_rate)
    log.info("site %s round %d: DP-SGD on %s, %d steps (%d empty), sigma %.3g, q %.4g, unit %s; epsilon %.3f "
             "of %g (delta %g); local loss %.4f (not released)", rt.data.name, server_round,
             "the head alone" if head_only else "the adapter and head", dp.steps, dp.empty_steps,
             plan.noise_multiplier, sample_rate, units.describe(), plan.epsilon, budget.epsilon, budget.delta,
             dp.mean_loss)
    metrics = {
        wire.DP_EPSILON: plan.epsilon,
        wire.DP_EPSILON_RDP: plan.epsilon_rdp,
        wire.DP_DELTA: budget.delta,
        wire.DP_BUDGET_EPSILON: budget.epsilon,
        wire.DP_NOISE_MULTIPLIER: plan.noise_multiplier,
        wire.DP_SAMPLE_RATE: sample_rate,
        wire.DP_RUN_EPSILON: plan.run_epsilon,
    }
    record = {wire.DP_UNIT: units.describe(), wire.DP_LEDGER_HEAD: entry["mac"]}
    return PrivateRound(TrainResult(dp.steps, float("nan"), dp.seconds, dp.records, dp.empty_steps), metrics, record)
