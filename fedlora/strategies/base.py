"""The seam every aggregation strategy plugs into, and the seam that wraps one.

The round pipeline (fedlora.server.pipeline) only ever calls the methods of
`Strategy`, so a new algorithm is a new file that subclasses `Strategy` and
implements `combine`, plus one line in the registry (strategies/__init__.py);
its parameters, if any, are a `params` dataclass in the same file, which
becomes the `[strategy.<name>]` table of the configuration. The arithmetic
stays in pure functions that tests call without Flower.

`aggregate` is the same for every strategy: turn each site's update into an
update at the global rank (zero beyond a smaller-rank site's rank: it never
held those components, so it neither changes nor erases them), let `combine`
compute the new global adapter, fold any residual into the base correction,
and measure how far the result is from the weighted mean of what the sites
hold (global + their update).

A strategy declares what it needs instead of being refused by name:
`linear` (the new adapter depends only on the weighted sum of the updates,
which is all secure aggregation reveals and all client-level DP noises),
`heterogeneous_ranks`, `min_updates()`. Server-side features (update-norm
bounds, client-level DP, decoding compressed uploads) are `StrategyWrapper`s
around it, composed in fedlora.strategies.compose, the way Flower wraps a
strategy in `DifferentialPrivacyServerSideFixedClipping`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedlora import wire
from fedlora.arrays import check_update
from fedlora.options import Section
from fedlora.strategies.correction import BaseCorrection
from fedlora.strategies.factors import aggregation_error, is_factor, pad, state_rank, truncate, uploaded

State = dict[str, np.ndarray]  # adapter tensor name -> values


@dataclass
class SiteUpdate:
    """What one site sent back for a round: its update relative to the global adapter."""

    site: str
    weight: float
    delta: State
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        """The LoRA rank the site trained at (from its metrics); None: the global rank."""
        value = self.metrics.get(wire.LORA_RANK)
        return int(value) if value else None


@dataclass(frozen=True)
class RoundInfo:
    """What the pipeline tells the strategy at the start of a round."""

    server_round: int
    sampled: int              # sites asked to train
    available: int            # sites that could have been asked (connected, within budget)
    sample_rate: float = 1.0  # the probability each available site had of being asked


class StopRun(RuntimeError):
    """A server-side feature ends the run cleanly before a round (its privacy budget is spent)."""


@dataclass
class Aggregate:
    """What `combine` computes for one round."""

    state: State                                   # the next global adapter
    folded: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # layer -> (U, V) for the base
    metrics: dict[str, Any] = field(default_factory=dict)  # extra columns for metrics.jsonl


class Strategy(ABC):
    """Turns the global adapter and the sites' updates into the next global adapter."""

    name: str = "base"
    summary: str = ""
    #: The strategy's own parameters: a Section dataclass (the `[strategy.<name>]` table), or None.
    params: type[Section] | None = None
    #: True when the new global adapter depends only on the weighted sum of the
    #: updates, which is all secure aggregation reveals and what client-level DP noises.
    linear: bool = True
    #: What a non-linear strategy needs of each individual update (for errors and docs).
    needs: str = ""
    #: ΔW of the aggregate equals Σ wᵢ ΔWᵢ (aggregation_error at float precision).
    exact: bool = False
    #: Sites keep part of the adapter: there is no single global ΔW to measure.
    personalized: bool = False
    #: Sites must be sampled secretly (Poisson, from the OS's random source), not reproducibly from the
    #: run config: a guarantee amplified by sampling holds only for a sample nobody else knows.
    needs_secret_sampling: bool = False
    #: Sites may train at a smaller rank than lora.rank.
    heterogeneous_ranks: bool = True
    rank_note: str = "a smaller-rank site's update is zero beyond its rank"
    #: Sites train and send B (and the head) only; A stays at its shared initialization.
    freeze_a: bool = False
    #: B is each site's own: never sent down or up.
    local_b: bool = False
    #: Keeps a correction of the frozen base weights, sent down with every message.
    folds_into_base: bool = False

    def __init__(self, params: Section | None = None, lora_scale: float = 1.0):
        self.p = params if params is not None else (self.params() if self.params else None)
        self.lora_scale = lora_scale  # alpha / rank: ΔW = scale·B·A
        self.correction: BaseCorrection | None = None  # only strategies that fold into the base
        self._round_metrics: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config) -> "Strategy":
        """Build from a RunConfig, with this strategy's `[strategy.<name>]` table as its params."""
        return cls(config.strategy.params.get(cls.name), lora_scale=config.lora.alpha / config.lora.rank)

    def min_updates(self) -> tuple[int, str]:
        """The fewest updates a round needs, and the setting that says so."""
        return 1, ""

    def begin_round(self, info: RoundInfo) -> None:
        """Called by the pipeline before a round's messages go out (wrappers note the sampling)."""

    # -- what travels ---------------------------------------------------------
    def client_config(self, server_round: int) -> dict[str, Any]:
        """Extra instructions the sites receive this round, with training and evaluation messages."""
        out: dict[str, Any] = {}
        if self.freeze_a:
            out[wire.FREEZE_LORA_A] = True
        if self.local_b:
            out[wire.LOCAL_LORA_B] = True
        return out

    def uploaded(self, key: str) -> bool:
        """Whether sites send their update of this tensor."""
        return uploaded(key, self.freeze_a, self.local_b)

    def downlink(self, global_state: State) -> dict[str, State]:
        """Arrays for the sites, by record name: the global adapter (less what sites keep
        themselves) and any correction of the frozen base weights."""
        sent = {k: v for k, v in global_state.items() if not (self.local_b and is_factor(k, "B"))}
        out = {wire.ARRAYS: sent}
        if self.correction:
            out[wire.BASE_CORRECTION] = self.correction.to_arrays()
        return out

    def base_correction(self) -> BaseCorrection | None:
        """The cumulative correction of the frozen base weights, if this strategy folds one."""
        return self.correction if self.correction else None

    def accept(self, update: SiteUpdate, global_state: State) -> tuple[SiteUpdate, str | None]:
        """The update as the strategy will aggregate it (a wrapper may decode it), and why it
        cannot be aggregated, or None."""
        return update, self.check_upload(update, global_state)

    def check_upload(self, update: SiteUpdate, global_state: State) -> str | None:
        """Why an update cannot be aggregated (wrong tensors, shapes, rank), or None."""
        full, rank = state_rank(global_state), update.rank
        if rank is not None and full is not None and rank != full:
            if not 1 <= rank <= full:
                return f"site rank {rank} is not in 1..{full} (lora.rank)"
            if not self.heterogeneous_ranks:
                return (f"site rank {rank} < lora.rank {full}, and strategy {self.name!r} cannot take "
                        f"heterogeneous ranks: {self.rank_note}")
        view = truncate(global_state, rank) if rank else global_state
        return check_update(update.delta, {k: v for k, v in view.items() if self.uploaded(k)})

    # -- aggregation ----------------------------------------------------------
    def aggregate(self, global_state: State, updates: list[SiteUpdate]) -> State:
        """The next global adapter (and, for some strategies, a new base correction)."""
        if not updates:
            raise ValueError("no updates to aggregate")
        full = [replace(u, delta=full_delta(global_state, u.delta)) for u in updates]
        locals_ = [local_adapter(global_state, u.delta) for u in full]
        result = self.combine_kept(global_state, full)
        # Measure the correction as it is kept and sent: float32 factors.
        factors = {layer: (u.astype(np.float32), v.astype(np.float32)) for layer, (u, v) in result.folded.items()}
        folded = {layer: u.astype(np.float64) @ v.astype(np.float64) for layer, (u, v) in factors.items()}
        for layer, (u, v) in factors.items():
            self.correction.add(layer, u, v)
        error = None if self.personalized else aggregation_error(
            result.state, locals_, [u.weight for u in updates], self.lora_scale, folded)
        self._round_metrics = {"aggregation_error": error, **result.metrics}
        return result.state

    def combine_kept(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        """`combine`, then what sites do not send (FFA's frozen A, FedSA's B) stays exactly as it
        was, whatever a server optimizer's state would make of a zero update."""
        result = self.combine(global_state, updates)
        result.state.update({k: v for k, v in global_state.items() if not self.uploaded(k)})
        return result

    @abstractmethod
    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:
        """The algorithm: `updates` hold deltas at the global rank, zero where a site sent
        nothing or never held a component (global + delta = the site's full local adapter);
        `SiteUpdate.rank` still says the site's own rank."""

    def round_metrics(self) -> dict[str, Any]:
        """Columns for this round's metrics row (at least `aggregation_error`)."""
        return dict(self._round_metrics)

    def guarantees(self) -> dict[str, Any]:
        """Privacy guarantees given at the coordinator, for summary.json (client-level DP's)."""
        return {}

    # -- state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted server needs to continue exactly (optimizer moments...)."""
        return {"correction": self.correction.state_dict()} if self.correction is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if self.correction is not None:
            self.correction.load_state_dict(state.pop("correction", {}))
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state {sorted(state)}")


class StrategyWrapper(Strategy):
    """A server-side feature around a strategy: it delegates every call and changes the ones it
    needs (the updates before they are aggregated, its own metrics and state). The wrapped
    strategy does not know it is wrapped."""

    #: Why the wrapper needs each site's own update ("" when the weighted sum would do).
    needs_individual: str = ""
    #: Why the wrapped strategy must be linear in the updates ("" when any strategy will do).
    needs_linear: str = ""
    #: Every site must send tensors of the same shapes (no heterogeneous ranks).
    needs_same_shapes: bool = False
    #: What to use instead under secure aggregation, for the refusal ("; use ...").
    under_secure_aggregation: str = ""

    def __init__(self, inner: Strategy):
        self.inner = inner

    # Everything the pipeline reads is the wrapped strategy's, unless a wrapper says otherwise.
    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def lora_scale(self) -> float:  # type: ignore[override]
        return self.inner.lora_scale

    @property
    def personalized(self) -> bool:  # type: ignore[override]
        return self.inner.personalized

    @property
    def needs_secret_sampling(self) -> bool:  # type: ignore[override]
        return self.inner.needs_secret_sampling

    def min_updates(self) -> tuple[int, str]:
        return self.inner.min_updates()

    def begin_round(self, info: RoundInfo) -> None:
        self.inner.begin_round(info)

    def client_config(self, server_round: int) -> dict[str, Any]:
        return self.inner.client_config(server_round)

    def uploaded(self, key: str) -> bool:
        return self.inner.uploaded(key)

    def downlink(self, global_state: State) -> dict[str, State]:
        return self.inner.downlink(global_state)

    def base_correction(self) -> BaseCorrection | None:
        return self.inner.base_correction()

    def check_upload(self, update: SiteUpdate, global_state: State) -> str | None:
        return self.inner.check_upload(update, global_state)

    def accept(self, update: SiteUpdate, global_state: State) -> tuple[SiteUpdate, str | None]:
        return self.inner.accept(update, global_state)

    def aggregate(self, global_state: State, updates: list[SiteUpdate]) -> State:
        return self.inner.aggregate(global_state, updates)

    def combine(self, global_state: State, updates: list[SiteUpdate]) -> Aggregate:  # never called
        raise NotImplementedError("a wrapper aggregates through the strategy it wraps")

    def round_metrics(self) -> dict[str, Any]:
        return self.inner.round_metrics()

    def guarantees(self) -> dict[str, Any]:
        return self.inner.guarantees()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def full_delta(global_state: State, delta: State) -> State:
    """A site's update at the global rank: zero-padded beyond its rank, zero for tensors it
    did not send. A component the site never held is then left as the global has it; padding
    its local adapter instead would make it vote to erase that component (delta = −global)."""
    sent = pad({k: v for k, v in delta.items() if k in global_state}, global_state)
    return {k: sent[k] if k in sent else np.zeros_like(v) for k, v in global_state.items()}


def local_adapter(global_state: State, delta: State) -> State:
    """A site's full local adapter at the global rank: the global adapter plus its update,
    the components beyond its rank (and tensors it did not send) the global's own."""
    full = full_delta(global_state, delta)
    return {k: g + full[k] for k, g in global_state.items()}


def weighted_mean(updates: list[SiteUpdate]) -> State:
    """Σ wᵢ Δᵢ / Σ wᵢ, tensor by tensor (float64 accumulation, float32 result)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(u.weight for u in updates))
    if total <= 0:
        raise ValueError("aggregation weights sum to zero")
    keys = updates[0].delta.keys()
    for u in updates[1:]:
        if u.delta.keys() != keys:
            raise ValueError(f"site {u.site} sent tensors {sorted(u.delta)} != {sorted(keys)}")
    return {
        k: (sum(u.weight * u.delta[k].astype(np.float64) for u in updates) / total).astype(np.float32)
        for k in keys
    }


def add_delta(global_state: State, delta: State) -> State:
    """global + delta, tensor by tensor, kept float32."""
    return {k: (global_state[k] + delta[k]).astype(np.float32) for k in global_state}
