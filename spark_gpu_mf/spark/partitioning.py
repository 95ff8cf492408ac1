"""Placing blocks on Spark partitions one to one.

Spark's ``repartition(n, col)`` sends a row to ``pmod(murmur3(col, seed=42), n)``. Hashing block
ids directly would put several blocks on one partition and none on others; instead each block
carries a *partition key*: the smallest non-negative int that Spark's hash sends to the partition
we chose for the block. Blocks then spread evenly, and both sides of a cogroup agree on the
placement, so Spark reuses the cached side's partitioning instead of shuffling it.
"""

from __future__ import annotations

from functools import lru_cache

from pyspark.sql import Column
from pyspark.sql import functions as F

_C1, _C2 = 0xCC9E2D51, 0x1B873593


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF


def spark_hash_int(value: int, seed: int = 42) -> int:
    """Spark's ``Murmur3Hash`` of one IntegerType value (signed 32-bit result)."""
    k = (value & 0xFFFFFFFF) * _C1 & 0xFFFFFFFF
    k = _rotl(k, 15) * _C2 & 0xFFFFFFFF
    h = _rotl((seed & 0xFFFFFFFF) ^ k, 13)
    h = (h * 5 + 0xE6546B64) & 0xFFFFFFFF
    h ^= 4
    h ^= h >> 16
    h = h * 0x85EBCA6B & 0xFFFFFFFF
    h ^= h >> 13
    h = h * 0xC2B2AE35 & 0xFFFFFFFF
    h ^= h >> 16
    return h - (1 << 32) if h >= 1 << 31 else h


@lru_cache(maxsize=None)
def partition_keys(num_partitions: int) -> tuple[int, ...]:
    """``keys[p]`` is an int that ``repartition(num_partitions, col)`` sends to partition ``p``."""
    keys: dict[int, int] = {}
    candidate = 0
    while len(keys) < num_partitions:
        keys.setdefault(spark_hash_int(candidate) % num_partitions, candidate)
        candidate += 1
    return tuple(keys[p] for p in range(num_partitions))


def key_of_block(block: Column, num_partitions: int) -> Column:
    """Partition key column for a block id column: block ``b`` goes to ``b mod num_partitions``."""
    keys = partition_keys(num_partitions)
    return F.element_at(
        F.array(*[F.lit(k) for k in keys]), F.pmod(block, F.lit(num_partitions)) + 1
    )
