"""The launch geometry both SGD CUDA kernels share (``kernels/sgd_mascot.cu``,
``kernels/sgd_pruned.cu``): one warp per rating with the rank spread over the lanes.

Each kernel is instantiated for 1, 2, 4 and 8 dimensions per lane (``<prefix>1`` ...
``<prefix>8``), so a launch picks the fewest that cover the rank and ranks up to 256 fit in
registers. On a GPU a cell gets one warp per ``RATINGS_PER_WARP`` consecutive ratings (Hogwild
between warps inside a cell, as cuMF_SGD and MASCOT); ``warps=1`` is the in-order configuration
the tests compare rating by rating. Plain Python: the host shim tests use it unchanged.
"""

from __future__ import annotations

__all__ = [
    "DIMS_PER_LANE",
    "MAX_RANK",
    "RATINGS_PER_WARP",
    "WARPS_PER_BLOCK",
    "kernel_name",
    "launch_shape",
    "production_warps",
]

DIMS_PER_LANE = (1, 2, 4, 8)
MAX_RANK = 32 * DIMS_PER_LANE[-1]
WARPS_PER_BLOCK = 4  # 128 threads per block
RATINGS_PER_WARP = 128


def kernel_name(prefix: str, rank: int, estimator: str) -> str:
    """``prefix`` + the fewest dimensions per lane that cover ``rank``."""
    for dims in DIMS_PER_LANE:
        if rank <= 32 * dims:
            return f"{prefix}{dims}"
    raise ValueError(f"the CUDA {estimator} kernel supports rank <= {MAX_RANK}, got {rank}")


def production_warps(num_ratings: int) -> int:
    """Warps for a cell on a real GPU: one per ``RATINGS_PER_WARP`` ratings."""
    return max(1, -(-num_ratings // RATINGS_PER_WARP))


def launch_shape(num_ratings: int, warps: int) -> tuple[int, int]:
    """``(blocks, warps per block)`` for ``warps`` warps over ``num_ratings`` ratings (never more
    warps than ratings, at most ``WARPS_PER_BLOCK`` per block)."""
    warps = max(1, min(int(warps), max(num_ratings, 1)))
    per_block = min(warps, WARPS_PER_BLOCK)
    return -(-warps // per_block), per_block
