"""Client-level DP at the coordinator: the unit of privacy is a whole site.

DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping (Andrew et al.
2021). Each round the coordinator samples every available site independently
with probability q (`federation.fraction-train`), from the operating system's
secret random source; clips each sampled site's update to L2 norm C; sums; adds
N(0, (z_update·C)²) per coordinate; and divides by the expected number of
sites q·N (a fixed, data-independent denominator: every site weighs the same).
The strategy then sees only this noised mean, as one update, so any strategy
that is linear in the updates keeps the guarantee (post-processing). fedlora
accounts it itself: one Poisson-subsampled Gaussian step per round at rate q.

Adaptive clipping also releases a noised count of the sites within the clip
norm, centred — Σ(bᵢ − ½) + N(0, σ_b²) — so one site moves it by ½ and both
releases together are one Gaussian mechanism of multiplier z, where
z⁻² = z_update⁻² + (2·σ_b)⁻² (Andrew et al., Thm 1).

What the epsilon assumes, said wherever it is reported: the coordinator is
trusted (it sees each update in clear before it clips and noises), and it keeps
the sample secret — the run directory records how many sites took part in a
round, never which. Without that assumption (`client_epsilon_unamplified`),
the most-sampled site's k rounds compose as k unsubsampled Gaussian steps.
`privacy.client-epsilon` is enforced: the run ends before a round that would
take the amplified epsilon past it.

Only useful with many sites: the noise on the mean is z·C/(q·N) per coordinate.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedlora import wire
from fedlora.privacy.accounting import Mechanism, epsilon, epsilon_prv, epsilon_rdp
from fedlora.strategies.base import RoundInfo, SiteUpdate, StopRun, Strategy, StrategyWrapper

log = logging.getLogger(__name__)
CLIENT_DP_SITE = "client-dp-mean"  # the one update the wrapped strategy sees

State = dict[str, np.ndarray]


# -- pure arithmetic ------------------------------------------------------------
def l2_norm(update: State) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in update.values()))


def clip_update(update: State, clip_norm: float) -> tuple[State, float]:
    """The update scaled to L2 norm at most `clip_norm`, and its norm before."""
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: (v.astype(np.float64) * scale) for k, v in update.items()}, norm


def noised_mean(clipped: list[State], like: State, clip_norm: float, noise_multiplier: float,
                denominator: float, rng: np.random.Generator) -> State:
    """(Σ clipped + N(0, (z·C)²)) / denominator, float32, with the keys and shapes of `like`."""
    std = noise_multiplier * clip_norm
    out = {}
    for k, ref in like.items():
        total = sum((c[k] for c in clipped), np.zeros(ref.shape, dtype=np.float64))
        out[k] = ((total + rng.normal(0.0, std, size=ref.shape)) / denominator).astype(np.float32)
    return out


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The multiplier left for the updates once the clipped count takes its share."""
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"clipped-count stddev {count_stddev} must exceed noise multiplier / 2 "
                         f"= {noise_multiplier / 2:g}")
    return rest ** -0.5


def next_clip_norm(clip_norm: float, unclipped_fraction: float, target_quantile: float, learning_rate: float) -> float:
    """Geometric update towards the target quantile of update norms."""
    return clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))


def utility_warning(noise_multiplier: float, clip_norm: float, sites_per_round: int, dimension: int,
                    eps: float, delta: float, rounds: int) -> str:
    """What the noise costs, in numbers, for the log."""
    per_coord = noise_multiplier * clip_norm / sites_per_round
    snr = sites_per_round / (noise_multiplier * math.sqrt(dimension))
    needed = math.ceil(noise_multiplier * math.sqrt(dimension))
    return (f"client-level DP: {sites_per_round} sites per round, noise multiplier {noise_multiplier:g}, clip "
            f"{clip_norm:g}: the noise on the mean update has std {per_coord:.3g} per coordinate, norm "
            f"≈ {per_coord * math.sqrt(dimension):.3g} over {dimension} adapter coordinates, against a mean "
            f"update of norm ≤ {clip_norm:g} (signal/noise ≤ {snr:.2g}); epsilon after {rounds} rounds "
            f"≈ {eps:.3g} (delta {delta:g}). It needs ~{needed} sites per round for signal/noise 1: "
            f"useful only with many sites.")


# -- the stateful mechanism ------------------------------------------------------
@dataclass
class ClientDPRound:
    delta_mean: State
    clip_norm: float          # the norm this round clipped to
    unclipped: int            # sites whose update was within the clip norm
    norms: list[float] = field(default_factory=list)
    count_release: float | None = None  # adaptive clipping: the noised centred count, Σ(bᵢ − ½) + noise


class ClientLevelDP:
    """Clip, noise and account, round after round; `state_dict` goes into checkpoints."""

    def __init__(self, noise_multiplier: float, clip_norm: float, delta: float, adaptive: bool = False,
                 target_quantile: float = 0.5, clip_learning_rate: float = 0.2, count_stddev: float = 0.0,
                 accountant: str = "prv", rng: np.random.Generator | None = None):
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.delta = delta
        self.adaptive = adaptive
        self.target_quantile = target_quantile
        self.clip_learning_rate = clip_learning_rate
        self.count_stddev = count_stddev
        self.accountant = accountant
        # Secret noise: a seed from the run config would let anyone subtract it.
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.history: list[Mechanism] = []

    @classmethod
    def from_config(cls, privacy) -> "ClientLevelDP":
        return cls(privacy.client_noise_multiplier, privacy.client_clip_norm, privacy.delta,
                   privacy.client_clipping == "adaptive", privacy.client_target_quantile,
                   privacy.client_clip_learning_rate, privacy.client_clipped_count_stddev, privacy.accountant)

    def count_noise(self, sites_per_round: float) -> float:
        return self.count_stddev or max(sites_per_round / 20, self.noise_multiplier)

    def round(self, updates: list[State], like: State, sample_rate: float, available: int) -> ClientDPRound:
        """Noised mean of `updates` from the sites sampled at `sample_rate` out of `available`;
        records the step. The denominator is the expected number of sites, q·N."""
        if not 0 < sample_rate <= 1 or available < 1:
            raise ValueError(f"sample rate {sample_rate} of {available} sites")
        expected = sample_rate * available
        clip = self.clip_norm
        z_update = self.noise_multiplier
        if self.adaptive:
            z_update = update_noise_multiplier(self.noise_multiplier, self.count_noise(expected))
        clipped, norms = [], []
        for u in updates:
            c, n = clip_update(u, clip)
            clipped.append(c)
            norms.append(n)
        unclipped = sum(n <= clip for n in norms)
        mean = noised_mean(clipped, like, clip, z_update, expected, self.rng)
        count_release = None
        if self.adaptive:  # centred: one site moves the released count by 1/2, as the accounting assumes
            count_release = (unclipped - len(updates) / 2) + float(self.rng.normal(0.0, self.count_noise(expected)))
            self.clip_norm = next_clip_norm(clip, count_release / expected + 0.5, self.target_quantile,
                                            self.clip_learning_rate)
        self.history.append(Mechanism(self.noise_multiplier, sample_rate, 1))
        return ClientDPRound(mean, clip, unclipped, norms, count_release)

    def spent(self, extra_rounds: int = 0, sample_rate: float | None = None) -> dict[str, float]:
        """Epsilon so far (with `extra_rounds` more at `sample_rate`: a projection)."""
        history = self.history + [Mechanism(self.noise_multiplier, sample_rate or 1.0, extra_rounds)] * bool(extra_rounds)
        return {"epsilon": epsilon(history, self.delta, self.accountant),
                "epsilon_prv": epsilon_prv(history, self.delta),
                "epsilon_rdp": epsilon_rdp(history, self.delta), "delta": self.delta,
                "rounds": len(self.history) + extra_rounds}

    def unamplified(self, participations: int) -> float:
        """Epsilon of a site that took part in `participations` rounds, if the sample were public:
        that many Gaussian steps of multiplier z, no subsampling."""
        if not participations:
            return 0.0
        return epsilon([Mechanism(self.noise_multiplier, 1.0, participations)], self.delta, self.accountant)

    def state_dict(self) -> dict[str, Any]:
        return {"clip_norm": self.clip_norm, "history": [list(m) for m in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip_norm = float(state["clip_norm"])
        self.history = [Mechanism(float(s), float(q), int(n)) for s, q, n in state["history"]]


class ClientLevelDPStrategy(StrategyWrapper):
    """Client-level DP around a linear strategy: each round, the sites' updates are replaced by
    the noised mean of the clipped updates, every site weighing 1; the run ends before its
    client-level budget would be exceeded."""

    needs_individual = "the coordinator clips each site's update before noising the sum"
    needs_linear = "its aggregate must be a function of the noised sum of bounded updates"
    needs_same_shapes = True
    needs_secret_sampling = True  # amplification by sampling holds only for a sample nobody else knows
    under_secure_aggregation = ("; use secagg.dp-noise-multiplier (distributed DP: each site clips and noises its "
                                "update before masking)")
    ASSUMES = ("a trusted coordinator (it sees each site's update before clipping and noising it) that keeps "
               "the per-round sample secret")

    def __init__(self, inner: Strategy, mechanism: ClientLevelDP, rounds: int, budget: float):
        super().__init__(inner)
        self.mechanism = mechanism
        self.rounds = rounds
        self.budget = budget
        self.info: RoundInfo | None = None
        self.participation: dict[str, int] = {}  # rounds each site took part in (kept secret, in the checkpoint)
        self._warned = False

    def begin_round(self, info: RoundInfo) -> None:
        projected = self.mechanism.spent(1, info.sample_rate)["epsilon"]
        if projected > self.budget:
            raise StopRun(f"client-level DP: round {info.server_round} would bring epsilon to {projected:.3f}, past "
                          f"privacy.client-epsilon = {self.budget:g} (spent {self.mechanism.spent()['epsilon']:.3f})")
        self.info = info
        self.inner.begin_round(info)

    def aggregate(self, global_state, updates: list[SiteUpdate]):
        like = updates[0].delta
        for u in updates[1:]:
            if u.delta.keys() != like.keys() or any(u.delta[k].shape != v.shape for k, v in like.items()):
                raise ValueError(f"client-level DP: site {u.site} sent tensors of other shapes than "
                                 f"{updates[0].site}; all sites must send the same tensors")
        info = self.info or RoundInfo(0, len(updates), len(updates))
        expected = info.sample_rate * info.available
        if not self._warned:
            self._warned = True
            eps = epsilon([Mechanism(self.mechanism.noise_multiplier, info.sample_rate, self.rounds)],
                          self.mechanism.delta, self.mechanism.accountant)
            dimension = sum(int(v.size) for v in like.values())
            log.warning("%s", utility_warning(self.mechanism.noise_multiplier, self.mechanism.clip_norm,
                                              max(1, round(expected)), dimension, eps, self.mechanism.delta,
                                              self.rounds))
        result = self.mechanism.round([u.delta for u in updates], like, info.sample_rate, info.available)
        for u in updates:
            self.participation[u.site] = self.participation.get(u.site, 0) + 1
        log.info("client-level DP: clip %.4g (%d of %d updates within it), epsilon %.3f", result.clip_norm,
                 result.unclipped, len(updates), self.mechanism.spent()["epsilon"])
        mean = SiteUpdate(CLIENT_DP_SITE, expected, result.delta_mean, {wire.NUM_EXAMPLES: expected})
        return self.inner.aggregate(global_state, [mean])

    def _unamplified(self) -> float:
        return self.mechanism.unamplified(max(self.participation.values(), default=0))

    def round_metrics(self) -> dict[str, Any]:
        spent = self.mechanism.spent()
        return {**self.inner.round_metrics(), "client_epsilon": spent["epsilon"], "client_delta": spent["delta"],
                "client_epsilon_unamplified": self._unamplified(), "client_clip_norm": self.mechanism.clip_norm}

    def guarantees(self) -> dict[str, Any]:
        m = self.mechanism
        return {**self.inner.guarantees(), "client_level": {
            "unit": "site", "clipping": "adaptive" if m.adaptive else "fixed",
            "noise_multiplier": m.noise_multiplier, "clip_norm": m.clip_norm, **m.spent(),
            "budget_epsilon": self.budget, "sampling": "Poisson, from the operating system's secret random source",
            "assumes": self.ASSUMES, "epsilon_unamplified": self._unamplified(),
            "epsilon_unamplified_means": "the most-sampled site's rounds as unsubsampled Gaussian steps: holds "
                                         "even if the sample were known"}}

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.inner.state_dict(), "client_level_dp": self.mechanism.state_dict(),
                "participation": dict(self.participation)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["strategy"])
        self.mechanism.load_state_dict(state["client_level_dp"])
        self.participation = {site: int(n) for site, n in state["participation"].items()}
