"""Pure arithmetic on LoRA factors: pairing A with B, rank truncation and
zero-padding, the weight update ΔW = scale·B·A, its SVD order, and the
aggregation error.

Adapter states are `{tensor name: array}` as `fedlora.models.trainable_state`
produces them. For a LoRA layer PEFT names its factors
`<layer>.lora_A.<adapter>.weight` (r × k) and `<layer>.lora_B.<adapter>.weight`
(d × r); every other tensor (a task head) is dense and averaged as it is.
"""

from __future__ import annotations

import re

import numpy as np

State = dict[str, np.ndarray]

# `<layer>.lora_A.<adapter>.weight` in a model; `<layer>.lora_A.weight` in PEFT's saved file.
_FACTOR = re.compile(r"^(?P<layer>.+)\.lora_(?P<which>[AB])(\.[^.]+)?\.weight$")


def factor_of(key: str) -> tuple[str, str] | None:
    """(layer, "A" or "B") for a LoRA factor's tensor name, None for any other tensor."""
    match = _FACTOR.match(key)
    return (match["layer"], match["which"]) if match else None


def is_lora(key: str) -> bool:
    """Any tensor of a LoRA module (factors of linear or embedding layers, DoRA magnitudes), as opposed to
    a dense tensor that trains whole (a task head)."""
    return ".lora_" in key


def is_factor(key: str, which: str) -> bool:
    found = factor_of(key)
    return found is not None and found[1] == which


def uploaded(key: str, freeze_a: bool, local_b: bool) -> bool:
    """Whether a site sends its update of this tensor (not when frozen or kept at the site)."""
    return not ((freeze_a and is_factor(key, "A")) or (local_b and is_factor(key, "B")))


def lora_layers(keys) -> dict[str, tuple[str, str]]:
    """{layer: (A key, B key)} for every adapted layer among `keys`."""
    halves: dict[str, dict[str, str]] = {}
    for key in keys:
        found = factor_of(key)
        if found:
            halves.setdefault(found[0], {})[found[1]] = key
    return {layer: (h["A"], h["B"]) for layer, h in sorted(halves.items()) if len(h) == 2}


def state_rank(state: State) -> int | None:
    """The LoRA rank of an adapter state (rows of its A factors), None without factors."""
    ranks = {state[a].shape[0] for a, _ in lora_layers(state).values()}
    if len(ranks) > 1:
        raise ValueError(f"adapter mixes ranks {sorted(ranks)}")
    return ranks.pop() if ranks else None


def truncate(state: State, rank: int) -> State:
    """The first `rank` components of every factor (A's rows, B's columns); other tensors as they are.

    A site of smaller rank starts from this view of the global adapter."""
    out = {}
    for key, value in state.items():
        found = factor_of(key)
        if found is None:
            out[key] = value
        elif found[1] == "A":
            out[key] = np.ascontiguousarray(value[:rank])
        else:
            out[key] = np.ascontiguousarray(value[:, :rank])
    return out


def pad(state: State, like: State) -> State:
    """Zero-pad each factor of a smaller-rank state to the shape it has in `like`.

    Meant for updates: a zero-padded update leaves the components a site never
    held as they are. A zero-padded adapter would erase them."""
    out = {}
    for key, value in state.items():
        target = like[key].shape
        if value.shape == target:
            out[key] = value
            continue
        padded = np.zeros(target, dtype=value.dtype)
        padded[tuple(slice(0, n) for n in value.shape)] = value
        out[key] = padded
    return out


def delta_w(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """ΔW = scale·B·A (d × k), in float64."""
    return scale * (b.astype(np.float64) @ a.astype(np.float64))


def normalized(weights) -> np.ndarray:
    w = np.asarray(list(weights), dtype=np.float64)
    if len(w) == 0 or w.sum() <= 0:
        raise ValueError("aggregation weights must be positive")
    return w / w.sum()


def svd_ordered(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A', B') with B'·A' = B·A, whose first j components are the best rank-j approximation
    of B·A for every j (Eckart–Young): B'·A' = U·diag(σ)·Vᵀ with A' = c·Vᵀ (orthogonal rows,
    c = A's root-mean-square row norm, so A keeps its scale) and B' = U·diag(σ)/c.

    With A = Rᵀ·Qᵀ (QR), B·A = (B·Rᵀ)·Qᵀ and the SVD of the small d × r matrix B·Rᵀ gives
    U, σ and the rotation of Qᵀ. A' spans A's row space even where σ = 0 (B = 0 keeps its
    directions, so training can still start there). Signs are fixed (each column of U has
    its largest entry positive) so that ordering an ordered adapter changes nothing."""
    rank, k = a.shape
    if rank > k:
        return a, b  # A cannot have orthogonal rows; LoRA's rank is below the layer's width
    q, r = np.linalg.qr(a.astype(np.float64).T)
    flip = np.where(np.diag(r) < 0, -1.0, 1.0)
    q, r = q * flip, r * flip[:, None]
    u, sigma, vt = np.linalg.svd(b.astype(np.float64) @ r.T, full_matrices=False)
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(rank)])
    signs[signs == 0] = 1.0
    c = float(np.linalg.norm(a)) / np.sqrt(rank) or 1.0
    new_a = c * (vt * signs[:, None]) @ q.T
    new_b = u * signs * sigma / c
    return new_a.astype(a.dtype), new_b.astype(b.dtype)


def aggregation_error(new_state: State, locals_: list[State], weights, scale: float,
                      folded: dict[str, np.ndarray] | None = None) -> float:
    """‖ΔW_global − Σ wᵢ ΔWᵢ‖_F / ‖Σ wᵢ ΔWᵢ‖_F over all adapted layers.

    `locals_` are the sites' full local adapters at the global rank: the global
    adapter plus each site's update, the components a site never held taken
    from the global adapter (base.local_adapter). Against that target an
    aggregate that erased those components reads a large error. `folded` is
    what this round folded into the frozen base weights ({layer: d × k}),
    counted in ΔW_global. The denominator is the whole adapter's ΔW the sites
    hold (earlier rounds included, earlier base corrections not).
    """
    w = normalized(weights)
    num = den = 0.0
    for layer, (a, b) in lora_layers(new_state).items():
        target = sum(wi * delta_w(loc[a], loc[b], scale) for wi, loc in zip(w, locals_))
        got = delta_w(new_state[a], new_state[b], scale)
        if folded and layer in folded:
            got = got + folded[layer]
        num += float(np.sum((got - target) ** 2))
        den += float(np.sum(target ** 2))
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5
