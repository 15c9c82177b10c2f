"""A site's adapter update as the one vector it masks, and the revealed sum as a mean update.

Layout, fixed by the coordinator for a round (the uploaded tensors, in the
order of `LAYOUT`, with the global adapter's shapes), flattened, then three
extra coordinates:

    [ s*delta (every tensor) | s*R | s*R*[loss reported] | s*R*loss/LOSS_MAX ]

with s = min(w, M)/M in (0, 1]: the site's weight w (its training examples)
scaled by the public bound M (`secagg.max-weight`); R is the clip range. The
revealed sum holds sum(s_i*delta_i), sum(s_i) and sum(s_i*loss_i), which is
exactly what the weighted mean sum(w_i*delta_i)/sum(w_i) and the weighted
training loss need, and nothing about one site. The result equals plain
aggregation up to the fixed-point error (`mean_error_bound`), provided no
coordinate of s*delta exceeds R and no weight exceeds M.

Under distributed DP every site weighs 1 (s = 1) and reports no loss: the
sum's sensitivity must not depend on data sizes or losses (distributed_dp.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

State = dict[str, np.ndarray]

LAYOUT = "secagg-layout"  # ConfigRecord key (masked-input request): uploaded tensor names, in order
EXTRAS = 3                # weight, loss weight, weighted loss
LOSS_MAX = 100.0          # a loss above LOSS_MAX is clipped in the reported train_loss only


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: State, names: Sequence[str]) -> "Layout":
        return cls(tuple(names), tuple(tuple(state[k].shape) for k in names))

    @property
    def size(self) -> int:
        """Coordinates in the masked vector, extras included."""
        return sum(int(np.prod(s)) for s in self.shapes) + EXTRAS


@dataclass(frozen=True)
class Encoded:
    vector: np.ndarray    # float64, Layout.size coordinates
    clipped: int          # coordinates outside [-R, R] (they will be clipped)


def encode(delta: State, names: Sequence[str], scale: float, loss: float | None, clip_range: float) -> Encoded:
    """The vector a site masks: its update scaled by s = `scale`, then the extras."""
    if not 0 < scale <= 1:
        raise ValueError(f"weight scale {scale} not in (0, 1]")
    if set(names) != set(delta):
        raise ValueError(f"the site's update has tensors {sorted(delta)}, the coordinator expects {sorted(names)}")
    parts = [scale * np.asarray(delta[k], dtype=np.float64).ravel() for k in names]
    has_loss = loss is not None and np.isfinite(loss)
    extras = [scale * clip_range, scale * clip_range * has_loss,
              scale * clip_range * min(float(loss), LOSS_MAX) / LOSS_MAX if has_loss else 0.0]
    vector = np.concatenate([*parts, np.asarray(extras)])
    return Encoded(vector, int(np.count_nonzero(np.abs(vector) > clip_range)))


@dataclass(frozen=True)
class MeanUpdate:
    delta: State          # sum(s_i*delta_i) / sum(s_i), float32, the layout's tensors
    weight: float         # sum(s_i) * M: the total weight of the included sites
    loss: float | None    # weighted mean training loss, if sites reported one
    error_bound: float    # bound on |delta - exact weighted mean| per coordinate (no clipping)


def decode(total: np.ndarray, layout: Layout, clip_range: float, max_weight: float, sum_error: float) -> MeanUpdate:
    """The mean update from the revealed sum; `sum_error` bounds each summed coordinate's error."""
    if total.shape != (layout.size,):
        raise ValueError(f"sum has {total.size} coordinates, the layout {layout.size}")
    weight, loss_weight, weighted_loss = total[-EXTRAS:] / clip_range
    if weight <= sum_error / clip_range:
        raise ValueError(f"the revealed total weight {weight:.3g} is not positive")
    mean = total[:-EXTRAS] / weight
    delta, start = {}, 0
    for name, shape in zip(layout.names, layout.shapes):
        size = int(np.prod(shape))
        delta[name] = mean[start:start + size].reshape(shape).astype(np.float32)
        start += size
    # Sites that report no loss (DP) add an exact 0 here; the sum of zeros unmasks to exactly 0.
    loss = float(weighted_loss * LOSS_MAX / loss_weight) if loss_weight > sum_error / clip_range else None
    return MeanUpdate(delta, float(weight * max_weight), loss,
                      mean_error_bound(sum_error, float(weight), float(np.abs(mean).max(initial=0.0)), clip_range))


def mean_error_bound(sum_error: float, weight: float, max_abs_mean: float, clip_range: float) -> float:
    """Bound on a mean coordinate's error when sum and weight each carry up to `sum_error`.

    mean = S/W with |S' - S| <= e and |W' - W| <= e/R (the weight is stored times R):
    |S'/W' - S/W| <= (e + |S/W| * e/R) / (W - e/R).
    """
    w_err = sum_error / clip_range
    return (sum_error + max_abs_mean * w_err) / max(weight - w_err, 1e-300)


def weight_scale(weight: float, max_weight: float) -> float:
    """s = min(w, M)/M: the site's weight as a fraction of the public bound."""
    if weight <= 0:
        raise ValueError(f"non-positive aggregation weight {weight}")
    return min(weight, max_weight) / max_weight
