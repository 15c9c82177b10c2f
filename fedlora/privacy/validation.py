"""Checks of the `[privacy]` section, called from `config._semantic_problems`."""

from __future__ import annotations


def privacy_problems(c) -> list[str]:
    """Every problem with `c.privacy`, one message per problem, naming the key."""
    p: list[str] = []
    d = c.privacy

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(d.epsilon > 0, f"privacy.epsilon: {d.epsilon} must be > 0")
    need(0 < d.delta < 1, f"privacy.delta: {d.delta} not in (0, 1)")
    need(d.noise_multiplier >= 0, f"privacy.noise-multiplier: {d.noise_multiplier} must be >= 0 (0: calibrate)")
    need(d.max_grad_norm > 0, f"privacy.max-grad-norm: {d.max_grad_norm} must be > 0")
    need(d.max_records_per_unit >= 1, f"privacy.max-records-per-unit: {d.max_records_per_unit} must be >= 1")
    need(d.batch_size >= 0, f"privacy.batch-size: {d.batch_size} must be >= 0 (0: train.batch-size)")
    need(d.learning_rate >= 0, f"privacy.learning-rate: {d.learning_rate} must be >= 0 (0: train.learning-rate)")
    need(d.local_epochs >= 0, f"privacy.local-epochs: {d.local_epochs} must be >= 0 (0: train.local-epochs)")
    if d.enabled and not c.data.path:
        records = c.data.records_per_site
        need(d.delta < 1 / records, f"privacy.delta: {d.delta} is not below 1 / records per site "
                                    f"({records}); such a delta allows releasing a record outright")
    need(d.client_noise_multiplier > 0, f"privacy.client-noise-multiplier: {d.client_noise_multiplier} must be > 0")
    need(d.client_clip_norm > 0, f"privacy.client-clip-norm: {d.client_clip_norm} must be > 0")
    need(0 < d.client_target_quantile < 1,
         f"privacy.client-target-quantile: {d.client_target_quantile} not in (0, 1)")
    need(d.client_clip_learning_rate > 0, f"privacy.client-clip-learning-rate: {d.client_clip_learning_rate} must be > 0")
    need(d.client_clipped_count_stddev >= 0,
         f"privacy.client-clipped-count-stddev: {d.client_clipped_count_stddev} must be >= 0 (0: automatic)")
    if d.client_dp and d.client_clipping == "adaptive" and d.client_clipped_count_stddev > 0:
        need(2 * d.client_clipped_count_stddev > d.client_noise_multiplier,
             f"privacy.client-clipped-count-stddev: {d.client_clipped_count_stddev} must exceed "
             f"client-noise-multiplier / 2 = {d.client_noise_multiplier / 2:g} (the count's noise is "
             "part of the accounted noise)")
    if d.client_dp:
        # Which strategies can take client-level DP is checked in strategies/compat.py.
        from fedlora.strategies.ranks import heterogeneous

        need(not heterogeneous(c), "privacy.client-dp: every site must send an update of the same shape; "
                                   "heterogeneous ranks (simulation.site-ranks) are not supported")
    return p
