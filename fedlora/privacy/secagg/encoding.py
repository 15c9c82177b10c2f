"""Fixed-point encoding of float vectors into Z_{2^m}, and byte packing.

A coordinate x is clipped to [-R, R] and rounded to the nearest multiple of
``step = R / (2^(bits-1) - 1)``; the signed integer is stored mod 2^m. Summing n
such values never wraps when ``m >= bits + ceil(log2 n)``, so the sum of the
masked uploads, read as a signed m-bit integer, is the exact sum of the
quantized inputs.

Error: each coordinate of the decoded sum of n clients is within
``n * step / 2`` of the sum of the clipped inputs (deterministic rounding);
values outside [-R, R] additionally lose what clipping removed.

Choosing R: it must bound what a client sends. LoRA adapter deltas per round
are typically far below 1, hence the default R = 1; scale the vector (or raise
R) if a site's values can be larger. Precision is R / 2^(bits-1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import SecAggConfigError

DEFAULT_CLIP_RANGE = 1.0
MAX_MODULUS_BITS = 32  # uploads are at most 4 bytes per parameter
_CHUNK = 1 << 16


def ceil_log2(n: int) -> int:
    """Smallest e with 2^e >= n (n >= 1)."""
    if n < 1:
        raise SecAggConfigError(f"n must be >= 1, got {n}")
    return (n - 1).bit_length()


def choose_modulus_bits(bits: int, n: int) -> int:
    """Smallest m such that the sum of ``n`` ``bits``-bit signed values never wraps mod 2^m."""
    return bits + ceil_log2(n)


def bytes_per_param(modulus_bits: int) -> int:
    """Bytes per packed parameter for modulus 2^m (1, 2, 3 or 4)."""
    return (modulus_bits + 7) // 8


def word_dtype(modulus_bits: int) -> np.dtype:
    """Unsigned little-endian dtype that holds values mod 2^m; arithmetic wraps in it."""
    nbytes = bytes_per_param(modulus_bits)
    return np.dtype({1: "<u1", 2: "<u2", 3: "<u4", 4: "<u4"}[nbytes])


@dataclass(frozen=True)
class Quantizer:
    """Fixed-point parameters shared by all clients of a session.

    clip_range: R, coordinates are clipped to [-R, R].
    bits: signed fixed-point width of one client's value.
    modulus_bits: m, arithmetic is mod 2^m; must be >= bits + ceil(log2 n).
    """

    clip_range: float
    bits: int
    modulus_bits: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise SecAggConfigError(f"clip_range must be finite and > 0, got {self.clip_range}")
        if not 2 <= self.bits <= MAX_MODULUS_BITS:
            raise SecAggConfigError(f"bits must be in [2, {MAX_MODULUS_BITS}], got {self.bits}")
        if not self.bits <= self.modulus_bits <= MAX_MODULUS_BITS:
            raise SecAggConfigError(
                f"modulus_bits must be in [bits={self.bits}, {MAX_MODULUS_BITS}], "
                f"got {self.modulus_bits}"
            )

    @classmethod
    def for_clients(
        cls,
        n: int,
        clip_range: float = DEFAULT_CLIP_RANGE,
        bits: int | None = None,
        bytes_per_param: int = 4,
    ) -> "Quantizer":
        """Parameters for ``n`` clients.

        With ``bits`` given, m is the smallest safe modulus. Without, the most
        precise ``bits`` whose modulus fits ``bytes_per_param`` bytes is chosen.
        """
        if bits is None:
            if bytes_per_param not in (1, 2, 3, 4):
                raise SecAggConfigError(
                    f"bytes_per_param must be 1, 2, 3 or 4, got {bytes_per_param}"
                )
            modulus_bits = 8 * bytes_per_param
            bits = modulus_bits - ceil_log2(n)
            if bits < 2:
                raise SecAggConfigError(
                    f"{n} clients do not fit in {bytes_per_param} byte(s) per parameter"
                )
            return cls(clip_range, bits, modulus_bits)
        modulus_bits = choose_modulus_bits(bits, n)
        if modulus_bits > MAX_MODULUS_BITS:
            raise SecAggConfigError(
                f"bits={bits} with n={n} needs a {modulus_bits}-bit modulus; "
                f"at most {MAX_MODULUS_BITS} is supported"
            )
        return cls(clip_range, bits, modulus_bits)

    @property
    def qmax(self) -> int:
        """Largest quantized magnitude."""
        return 2 ** (self.bits - 1) - 1

    @property
    def step(self) -> float:
        """Value of one quantization unit."""
        return self.clip_range / self.qmax

    @property
    def dtype(self) -> np.dtype:
        return word_dtype(self.modulus_bits)

    @property
    def bytes_per_param(self) -> int:
        return bytes_per_param(self.modulus_bits)

    @property
    def modulus_mask(self) -> int:
        return 2**self.modulus_bits - 1

    def max_clients(self) -> int:
        """Most summands that cannot wrap: n * qmax <= 2^(m-1) - 1."""
        return (2 ** (self.modulus_bits - 1) - 1) // self.qmax

    def max_sum_error(self, n: int) -> float:
        """Bound on |decoded sum - sum of clipped inputs| per coordinate, for n clients."""
        return n * self.step / 2

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Clip, round to the grid and reduce mod 2^m (two's complement)."""
        x = np.asarray(x)
        if x.ndim != 1:
            raise ValueError(f"expected a 1-D vector, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("vector contains NaN or infinite values")
        out = np.empty(x.size, dtype=self.dtype)
        # Chunks keep the float64/int64 temporaries in cache (13.6M params: 0.37 s -> 0.04 s).
        scaled = np.empty(min(x.size, _CHUNK), dtype=np.float64)
        ints = np.empty(scaled.size, dtype=np.int64)
        for start in range(0, x.size, _CHUNK):
            stop = min(start + _CHUNK, x.size)
            s, q = scaled[: stop - start], ints[: stop - start]
            # float64 so that rounding at up to 31 bits is exact for float32 inputs.
            np.clip(x[start:stop], -self.clip_range, self.clip_range, out=s)
            s /= self.step
            np.rint(s, out=s)
            np.copyto(q, s, casting="unsafe")
            np.clip(q, -self.qmax, self.qmax, out=q)
            q &= self.modulus_mask
            np.copyto(out[start:stop], q, casting="unsafe")
        return out

    def decode_sum(self, total: np.ndarray) -> np.ndarray:
        """Read a sum mod 2^m as signed and scale back to floats (float64)."""
        s = np.asarray(total).astype(np.int64) & self.modulus_mask
        half = 2 ** (self.modulus_bits - 1)
        s[s >= half] -= 2**self.modulus_bits
        return s * self.step


def pack(values: np.ndarray, modulus_bits: int) -> np.ndarray:
    """Values mod 2^m -> uint8 array of exactly ``bytes_per_param(m)`` bytes each."""
    dtype = word_dtype(modulus_bits)
    values = np.ascontiguousarray(values, dtype=dtype)
    width = bytes_per_param(modulus_bits)
    raw = values.view(np.uint8)
    if width == dtype.itemsize:
        return raw.copy()
    # 3-byte packing: drop the (always zero) top byte of each little-endian word.
    return np.ascontiguousarray(raw.reshape(-1, dtype.itemsize)[:, :width]).reshape(-1)


def unpack(data: np.ndarray | bytes, modulus_bits: int) -> np.ndarray:
    """Inverse of ``pack``; returns a new writeable array of ``word_dtype(m)``."""
    raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise ValueError("packed data must be a 1-D uint8 array or bytes")
    dtype = word_dtype(modulus_bits)
    width = bytes_per_param(modulus_bits)
    if raw.size % width:
        raise ValueError(f"packed length {raw.size} is not a multiple of {width}")
    n = raw.size // width
    if width == dtype.itemsize:
        out = raw.copy().view(dtype)
    else:
        words = np.zeros((n, dtype.itemsize), dtype=np.uint8)
        words[:, :width] = raw.reshape(n, width)
        out = words.view(dtype).reshape(n)
    return out & dtype.type(2**modulus_bits - 1)
