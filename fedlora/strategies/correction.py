"""A correction folded into the frozen base weights: W = W0 + C, one C per adapted layer.

FLoRA and FedEx-LoRA make aggregation exact by moving part of the averaged
update out of the adapter and into the base weights. The coordinator keeps the
cumulative C and sends it with every message, so a site needs no memory of
earlier rounds (a restarted or newly joined site gets the right base).

C is kept in the cheaper of two exact forms: low-rank factors U (d × R) · V
(R × k) while R·(d + k) < d·k, else dense (d × k). For a layer of
all-MiniLM-L6-v2 (d = k = 384) the factors are cheaper while R < 192, i.e.
while fewer than 192 rank-1 terms were stacked in; past that C costs
d·k·4 bytes = 590 KB per layer and message.
"""

from __future__ import annotations

import numpy as np

State = dict[str, np.ndarray]
_SEP = "#"  # layer#u, layer#v, layer#dense in the wire form


class BaseCorrection:
    """{layer: C} in factored or dense form; exact, float32 on the wire."""

    def __init__(self) -> None:
        self.layers: dict[str, dict[str, np.ndarray]] = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def add(self, layer: str, u: np.ndarray, v: np.ndarray) -> None:
        """C[layer] += U·V, staying factored while that is the smaller form."""
        u, v = u.astype(np.float32), v.astype(np.float32)
        entry = self.layers.get(layer)
        if entry is None:
            entry = {"u": u, "v": v}
        elif "dense" in entry:
            entry = {"dense": entry["dense"] + u @ v}
        else:
            entry = {"u": np.concatenate([entry["u"], u], axis=1), "v": np.concatenate([entry["v"], v], axis=0)}
        if "u" in entry:
            (d, rank), k = entry["u"].shape, entry["v"].shape[1]
            if rank * (d + k) >= d * k:
                entry = {"dense": entry["u"] @ entry["v"]}
        self.layers[layer] = entry

    def dense(self, layer: str) -> np.ndarray:
        entry = self.layers[layer]
        return entry["dense"] if "dense" in entry else entry["u"] @ entry["v"]

    def factors(self, layer: str) -> tuple[np.ndarray, np.ndarray]:
        """U, V with U·V = C (an SVD when C is held dense; zero singular values dropped)."""
        entry = self.layers[layer]
        if "u" in entry:
            return entry["u"], entry["v"]
        left, sing, right = np.linalg.svd(entry["dense"].astype(np.float64), full_matrices=False)
        keep = sing > sing.max(initial=0.0) * 1e-7
        root = np.sqrt(sing[keep])
        return (left[:, keep] * root).astype(np.float32), (root[:, None] * right[keep]).astype(np.float32)

    def nbytes(self) -> int:
        return sum(a.nbytes for entry in self.layers.values() for a in entry.values())

    # -- wire and checkpoint forms -------------------------------------------
    def to_arrays(self) -> State:
        return {f"{layer}{_SEP}{part}": a for layer, entry in self.layers.items() for part, a in entry.items()}

    @classmethod
    def from_arrays(cls, arrays: State) -> "BaseCorrection":
        out = cls()
        for key, value in arrays.items():
            layer, _, part = key.rpartition(_SEP)
            if part not in ("u", "v", "dense") or not layer:
                raise ValueError(f"base correction: unexpected tensor {key!r}")
            out.layers.setdefault(layer, {})[part] = np.asarray(value, dtype=np.float32)
        for layer, entry in out.layers.items():
            if set(entry) not in ({"u", "v"}, {"dense"}):
                raise ValueError(f"base correction for {layer}: incomplete parts {sorted(entry)}")
        return out

    def state_dict(self) -> dict:
        return {layer: dict(entry) for layer, entry in self.layers.items()}

    def load_state_dict(self, state: dict) -> None:
        self.layers = {layer: {part: np.asarray(a, dtype=np.float32) for part, a in entry.items()}
                       for layer, entry in state.items()}


def residual_factors(locals_: list[tuple[np.ndarray, np.ndarray]], weights: np.ndarray,
                     new_a: np.ndarray, new_b: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """U, V with U·V = scale·(Σ wᵢ Bᵢ·Aᵢ − B'·A'): what the new global adapter (A', B')
    misses of the sites' weighted mean update. Stacked, hence exact and of rank ≤ Σ rᵢ + r.

    `locals_` holds each site's local (A, B), at that site's own rank."""
    us = [scale * w * b.astype(np.float64) for w, (_, b) in zip(weights, locals_)]
    vs = [a.astype(np.float64) for a, _ in locals_]
    if np.any(new_b):
        us.append(-scale * new_b.astype(np.float64))
        vs.append(new_a.astype(np.float64))
    return np.concatenate(us, axis=1), np.concatenate(vs, axis=0)
