"""Spark's factor initialization, bit for bit: ``XORShiftRandom`` and ``java.util.Random``.

Spark's ALS starts each factor block from ``XORShiftRandom(byteswap64(seed ^ blockId))`` and draws
``rank`` Gaussians per row in the order of the block's sorted ids, then normalizes each row to unit
length. Reproducing it means the same ``seed`` gives the same starting point as
``pyspark.ml.recommendation.ALS``, so fitted models can be compared factor by factor.
"""

from __future__ import annotations

import math

import numpy as np
from numba import int64, njit, uint64

from spark_gpu_mf.backends.numba_cache import ensure_cache_dir

ensure_cache_dir()

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3775CD9E3775CD
_ARRAY_SEED = 0x3C074A61


def _to_int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _to_int64(v: int) -> int:
    v &= _MASK64
    return v - (1 << 64) if v >= 1 << 63 else v


def _rotl32(x: int, r: int) -> int:
    x &= 0xFFFFFFFF
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def _mix_last(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & 0xFFFFFFFF
    k = _rotl32(k, 15)
    k = (k * 0x1B873593) & 0xFFFFFFFF
    return (h ^ k) & 0xFFFFFFFF


def _mix(h: int, k: int) -> int:
    h = _mix_last(h, k)
    h = _rotl32(h, 13)
    return (h * 5 + 0xE6546B64) & 0xFFFFFFFF


def _finalize(h: int, length: int) -> int:
    h = (h ^ length) & 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    h ^= h >> 16
    return h


def _bytes_hash(data: bytes, seed: int) -> int:
    """Scala's ``MurmurHash3.bytesHash`` (data length is a multiple of 4 here)."""
    h = seed & 0xFFFFFFFF
    for i in range(0, len(data) - len(data) % 4, 4):
        h = _mix(h, int.from_bytes(data[i : i + 4], "little"))
    assert len(data) % 4 == 0
    return _to_int32(_finalize(h, len(data)))


def hash_seed(seed: int) -> int:
    """``XORShiftRandom.hashSeed``: the generator's 64-bit state for a user seed."""
    data = (seed & _MASK64).to_bytes(8, "big")
    low = _bytes_hash(data, _ARRAY_SEED)
    high = _bytes_hash(data, low)
    return _to_int64((high << 32) | (low & 0xFFFFFFFF))


def byteswap64(v: int) -> int:
    """``scala.util.hashing.byteswap64``."""
    hc = (v * _GOLDEN) & _MASK64
    hc = int.from_bytes(hc.to_bytes(8, "little"), "big")
    return _to_int64(hc * _GOLDEN)


class XORShiftRandom:
    """Spark's ``XORShiftRandom`` for the few driver-side draws (``nextLong``)."""

    def __init__(self, seed: int):
        self._state = hash_seed(seed) & _MASK64

    def _next(self, bits: int) -> int:
        s = self._state
        s ^= (s << 21) & _MASK64
        s ^= s >> 35
        s ^= (s << 4) & _MASK64
        self._state = s
        return _to_int32(s & ((1 << bits) - 1))

    def next_long(self) -> int:
        return _to_int64((self._next(32) << 32) + self._next(32))


def factor_seeds(seed: int) -> tuple[int, int]:
    """The (user, item) initialization seeds Spark's ``ALS.train`` draws from ``seed``."""
    gen = XORShiftRandom(seed)
    user_seed = gen.next_long()
    return user_seed, gen.next_long()


def block_seed(side_seed: int, block_id: int) -> int:
    """Seed of one factor block: ``byteswap64(seed ^ blockId)``."""
    return byteswap64(side_seed ^ block_id)


@njit(cache=True)
def _next_bits(state, bits):
    s = state[0]
    s ^= s << uint64(21)
    s ^= s >> uint64(35)
    s ^= s << uint64(4)
    state[0] = s
    v = int64(s & ((uint64(1) << uint64(bits)) - uint64(1)))
    if bits == 32 and v >= 2147483648:
        v -= 4294967296
    return v


@njit(cache=True)
def _next_double(state):
    hi = _next_bits(state, 26)
    lo = _next_bits(state, 27)
    return ((hi << 27) + lo) * (1.0 / 9007199254740992.0)


@njit(cache=True)
def _gaussian_rows(state, n_rows, rank):
    out = np.empty((n_rows, rank), np.float32)
    have_next = False
    next_value = 0.0
    for row in range(n_rows):
        for d in range(rank):
            if have_next:
                have_next = False
                g = next_value
            else:
                while True:
                    v1 = 2.0 * _next_double(state) - 1.0
                    v2 = 2.0 * _next_double(state) - 1.0
                    s = v1 * v1 + v2 * v2
                    if s < 1.0 and s != 0.0:
                        break
                multiplier = math.sqrt(-2.0 * math.log(s) / s)
                next_value = v2 * multiplier
                have_next = True
                g = v1 * multiplier
            out[row, d] = np.float32(g)
        scale = np.float32(1.0) / _snrm2(out[row])
        for d in range(rank):
            out[row, d] = out[row, d] * scale
    return out


@njit(cache=True)
def _snrm2(x):
    """Euclidean norm accumulated in float32, as Spark's Java BLAS computes ``snrm2``.

    Checked bit for bit against Spark 4.3 without a native BLAS; a native BLAS may round the
    norm differently, which moves a starting factor by at most one ulp.
    """
    total = np.float32(0.0)
    for v in x:
        total = np.float32(total + np.float32(v * v))
    return np.float32(math.sqrt(total))


def initial_factors(n_rows: int, rank: int, side_seed: int, block_id: int) -> np.ndarray:
    """Spark's starting factors of one block: unit-norm Gaussian rows, float32 ``(n_rows, rank)``.

    Rows follow the block's ids in ascending order, as in Spark.
    """
    state = np.array([hash_seed(block_seed(side_seed, block_id)) & _MASK64], dtype=np.uint64)
    return _gaussian_rows(state, n_rows, rank)
