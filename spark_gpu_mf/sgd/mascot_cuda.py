"""MascotMF's per-cell update on a GPU: loading and launching ``kernels/sgd_mascot.cu``.

The kernels are the CUDA twins of ``mascot_numba.cell_sgd`` (same update, same storage, same
sampling of worker streams; see the comment at the top of the ``.cu`` file). Everything here
except ``get_module`` and ``cell_sgd_cupy`` is plain Python over an array namespace ``xp`` and a
``RawModule``-like ``module``, so the tests run this launch code unchanged against the kernels
compiled for the CPU by the host shim (``tests/cuda_shim``). CuPy is imported only inside those two
functions, which run on GPU executors; the driver never calls them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from spark_gpu_mf.backends import cuda_kernels
from spark_gpu_mf.sgd import warp_launch
from spark_gpu_mf.sgd.warp_launch import DIMS_PER_LANE, MAX_RANK, production_warps

__all__ = [
    "DIMS_PER_LANE",
    "KERNEL_FILE",
    "MAX_RANK",
    "cell_sgd_cupy",
    "get_module",
    "kernel_name",
    "launch_cell",
    "production_warps",
    "sampled_positions",
]

KERNEL_FILE = "sgd_mascot.cu"  # entry points mascot_sgd_d{1,2,4,8}; geometry: warp_launch
SUM_THREADS = 128  # threads per block of mascot_group_sums
STORAGE_ARRAYS = ("half", "single", "slot", "group")


def kernel_name(rank: int) -> str:
    """The entry point for ``rank``: the fewest dimensions per lane that cover it."""
    return warp_launch.kernel_name("mascot_sgd_d", rank, "MascotMF")


def sampled_positions(n: int, total_warps: int, sample_ratio: float) -> tuple[np.ndarray, ...]:
    """The sampled ratings of a launch and where each warp writes its records.

    Returns ``(positions, record_offset)``: int64 positions of the sampled ratings in record
    order (warp by warp, in order), and int64 per-warp index of its first record. Warp ``w`` runs
    ``[n w // W, n (w + 1) // W)`` and samples its last ``ceil(sample_ratio * len)`` ratings,
    exactly as the kernel computes it.
    """
    positions, offsets = [], np.zeros(total_warps, np.int64)
    count = 0
    for warp in range(total_warps):
        begin, end = n * warp // total_warps, n * (warp + 1) // total_warps
        tail = math.ceil(sample_ratio * (end - begin))
        offsets[warp] = count
        positions.append(np.arange(end - tail, end, dtype=np.int64))
        count += tail
    return np.concatenate(positions) if positions else np.zeros(0, np.int64), offsets


def _group_plan(groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Records sorted by group (stable) and each group's range: the reduction's fixed order."""
    order = np.argsort(groups, kind="stable").astype(np.int64)
    pointer = np.zeros(num_groups + 1, np.int64)
    pointer[1:] = np.cumsum(np.bincount(groups, minlength=num_groups))
    return order, pointer


def launch_cell(
    module,
    xp,
    users,
    items,
    ratings,
    user: Mapping[str, Any],
    item: Mapping[str, Any],
    *,
    lr: float,
    reg: float,
    warps: int,
    collect: bool = False,
    sample_ratio: float = 0.0,
    host_users: np.ndarray | None = None,
    host_items: np.ndarray | None = None,
    host_user_group: np.ndarray | None = None,
    host_item_group: np.ndarray | None = None,
) -> tuple[float, dict[str, np.ndarray] | None]:
    """Run one cell's ratings through the kernel; the blocks' storage changes in place.

    ``user``/``item`` map ``half`` (uint16 float16 bits, rows x rank), ``single`` (float32,
    rows x rank), ``slot``/``group`` (int32 per row) and ``group_fp32`` (uint8 per group) to
    arrays where ``module`` runs (CuPy on a GPU, NumPy for the shim), C-contiguous; ``users``,
    ``items`` int32 and ``ratings`` float32 likewise. With ``collect``, the host copies of the
    rating rows and row groups (``host_*``) give the order of the per-group reduction.

    Returns the sum of squared errors and, with ``collect``, the statistics of
    ``mascot_numba.cell_sgd``: ``user_sums`` (groups x rank), ``user_squares`` (groups),
    ``user_rounding`` (groups x 2), and the item ones, as float64 host arrays (FP32 groups are
    zero).
    """
    n = int(ratings.shape[0])
    rank = int(user["half"].shape[1])
    if n == 0:
        return 0.0, None
    blocks, per_block = warp_launch.launch_shape(n, warps)
    total_warps = blocks * per_block
    sse = xp.zeros(total_warps, dtype=xp.float64)
    if collect:
        positions, offsets = sampled_positions(n, total_warps, sample_ratio)
        records = max(1, len(positions))
        user_records = xp.zeros((records, rank), dtype=xp.float32)
        item_records = xp.zeros((records, rank), dtype=xp.float32)
        user_rounding = xp.zeros((records, 2), dtype=xp.float32)
        item_rounding = xp.zeros((records, 2), dtype=xp.float32)
        record_offset = xp.asarray(offsets)
    else:
        positions = None
        user_records = item_records = xp.zeros((1, rank), dtype=xp.float32)
        user_rounding = item_rounding = xp.zeros((1, 2), dtype=xp.float32)
        record_offset = xp.zeros(1, dtype=xp.int64)
    kernel = module.get_function(kernel_name(rank))
    kernel(
        (blocks,),
        (32 * per_block,),
        (
            users, items, ratings, np.int64(n),
            user["half"], user["single"], user["slot"], user["group"], user["group_fp32"],
            item["half"], item["single"], item["slot"], item["group"], item["group_fp32"],
            np.int32(rank), np.float32(lr), np.float32(reg), np.int32(1 if collect else 0),
            np.float64(sample_ratio), record_offset, user_records, item_records,
            user_rounding, item_rounding, sse,
        ),
    )  # fmt: skip
    total = float(sse.sum())
    if not collect:
        return total, None
    statistics = {}
    for side, records, rounding, rows, row_group, flags in (
        ("user", user_records, user_rounding, host_users, host_user_group, user["group_fp32"]),
        ("item", item_records, item_rounding, host_items, host_item_group, item["group_fp32"]),
    ):
        num_groups = int(flags.shape[0])
        record_groups = row_group[rows[positions]]
        order, pointer = _group_plan(record_groups, num_groups)
        sums = xp.zeros((num_groups, rank), dtype=xp.float64)
        squares = xp.zeros((num_groups, rank), dtype=xp.float64)
        module.get_function("mascot_group_sums")(
            (num_groups, -(-rank // SUM_THREADS)),
            (SUM_THREADS,),
            (records, xp.asarray(order), xp.asarray(pointer), flags, np.int32(rank), sums,
             squares),
        )  # fmt: skip
        statistics[f"{side}_sums"] = _host(xp, sums)
        statistics[f"{side}_squares"] = _host(xp, squares).sum(axis=1)
        statistics[f"{side}_rounding"] = _rounding_sums(
            _host(xp, rounding)[: len(positions)], record_groups, _host(xp, flags)
        )
    return total, statistics


def _rounding_sums(records: np.ndarray, groups: np.ndarray, group_fp32: np.ndarray) -> np.ndarray:
    """float64 ``(groups, 2)`` sums of the per-update rounding records of FP16 groups, in record
    order (two scalars per sampled update: small enough to add on the host)."""
    num_groups = len(group_fp32)
    sums = np.zeros((num_groups, 2))
    for column in range(2):
        sums[:, column] = np.bincount(
            groups, weights=records[:, column].astype(np.float64), minlength=num_groups
        )
    sums[np.asarray(group_fp32, dtype=bool)] = 0.0
    return sums


def _host(xp, array) -> np.ndarray:
    return np.asarray(array) if xp is np else xp.asnumpy(array)


def get_module():
    """The compiled ``sgd_mascot.cu`` for the current CUDA device (GPU executors only)."""
    return cuda_kernels.get_module((KERNEL_FILE,))


def cell_sgd_cupy(
    cell_users: np.ndarray,
    cell_items: np.ndarray,
    cell_ratings: np.ndarray,
    user: dict[str, np.ndarray],
    item: dict[str, np.ndarray],
    *,
    lr: float,
    reg: float,
    collect: bool,
    sample_ratio: float,
) -> tuple[float, dict[str, np.ndarray] | None]:
    """``launch_cell`` on the task's GPU: host arrays in, the storage arrays updated in place."""
    import cupy

    def upload(side: dict[str, np.ndarray]) -> dict[str, Any]:
        return {name: cupy.asarray(side[name]) for name in (*STORAGE_ARRAYS, "group_fp32")}

    device_user, device_item = upload(user), upload(item)
    result = launch_cell(
        get_module(),
        cupy,
        cupy.asarray(cell_users),
        cupy.asarray(cell_items),
        cupy.asarray(cell_ratings),
        device_user,
        device_item,
        lr=lr,
        reg=reg,
        warps=production_warps(len(cell_ratings)),
        collect=collect,
        sample_ratio=sample_ratio,
        host_users=cell_users,
        host_items=cell_items,
        host_user_group=user["group"],
        host_item_group=item["group"],
    )
    for host, device in ((user, device_user), (item, device_item)):
        for name in ("half", "single"):
            host[name][...] = cupy.asnumpy(device[name])
    return result
