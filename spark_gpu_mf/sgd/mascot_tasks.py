"""MascotMF's executor side: the per-cell functions the stratified runner calls, and row storage.

Row state of a block (``cells.RowState``), the layout both kernels read:

* ``half``: uint16 ``(rows in FP16 groups, rank)``, float16 bits;
* ``single``: float32 ``(rows in FP32 groups, rank)``;
* ``slot``: int32 per row, its position in ``half`` or ``single``;
* ``group``: int32 per row, its g-switching group.

Which of the two arrays holds a row follows from its group's precision, a uint8 flag per group
that reaches the tasks in the settings (``user_group_fp32`` / ``item_group_fp32``). Each row is
stored once, at its precision, so an FP16 row costs 2 bytes per value wherever it goes (task
memory, broadcasts, results). The driver moves rows between the arrays when groups switch
(:func:`relayout`); values are widened exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from spark_gpu_mf.backends.numba_intrinsics import from_half_bits, non_finite_half, to_half_bits
from spark_gpu_mf.executor.runtime import BackendChoice
from spark_gpu_mf.sgd.cells import Cell, RowState
from spark_gpu_mf.sgd.common import task_uses_gpu
from spark_gpu_mf.sgd.mascot_numba import cell_sgd, cell_squared_error

__all__ = [
    "GROUP",
    "HALF",
    "SINGLE",
    "SLOT",
    "dense",
    "evaluate_cell",
    "initial_values",
    "layout",
    "relayout",
    "update_cell",
]

HALF, SINGLE, SLOT, GROUP = "half", "single", "slot", "group"


def initial_values(
    block_ids: Sequence[np.ndarray], rank: int, init_std: float, seed: int, side: int
) -> list[np.ndarray]:
    """float32 ``N(0, init_std^2)`` starting factors of every block.

    Drawn for all ids of the side in ascending id order from a generator seeded by
    ``(seed, side)``, then dealt to the blocks: a row starts from the same vector whatever
    ``numBlocks`` is.
    """
    ids = np.concatenate(list(block_ids)) if len(block_ids) else np.zeros(0, np.int32)
    order = np.argsort(ids, kind="stable")
    draws = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x3A5C07, int(side)]).standard_normal(
        (len(ids), rank), dtype=np.float32
    )
    values = np.empty((len(ids), rank), np.float32)
    values[order] = draws * np.float32(init_std)
    blocks, start = [], 0
    for block in block_ids:
        blocks.append(values[start : start + len(block)])
        start += len(block)
    return blocks


def layout(values: np.ndarray, group: np.ndarray, group_fp32: np.ndarray) -> RowState:
    """Row state holding float32 ``values`` at the precision of each row's group.

    Rows of FP16 groups are rounded to float16 (to nearest, ties to even).
    """
    values = np.asarray(values, dtype=np.float32)
    group = np.asarray(group, dtype=np.int32)
    fp32 = np.asarray(group_fp32, dtype=bool)[group]
    slot = np.empty(len(group), np.int32)
    slot[fp32] = np.arange(int(fp32.sum()), dtype=np.int32)
    slot[~fp32] = np.arange(int((~fp32).sum()), dtype=np.int32)
    rank = values.shape[1]
    return {
        HALF: np.ascontiguousarray(to_half_bits(values[~fp32]).reshape(-1, rank)),
        SINGLE: np.ascontiguousarray(values[fp32].reshape(-1, rank)),
        SLOT: slot,
        GROUP: group,
    }


def dense(state: Mapping[str, np.ndarray], group_fp32: np.ndarray) -> np.ndarray:
    """float32 ``(rows, rank)`` values of a block stored with the group flags ``group_fp32``."""
    fp32 = np.asarray(group_fp32, dtype=bool)[state[GROUP]]
    slot = state[SLOT]
    values = np.empty((len(slot), state[HALF].shape[1]), np.float32)
    values[fp32] = state[SINGLE][slot[fp32]]
    values[~fp32] = from_half_bits(state[HALF][slot[~fp32]])
    return values


def relayout(state: Mapping[str, np.ndarray], old_fp32: np.ndarray, new_fp32: np.ndarray):
    """The block re-stored after groups switched from ``old_fp32`` to ``new_fp32``.

    Groups only ever switch FP16 -> FP32, so every value is kept exactly (float16 widens to
    float32 without rounding).
    """
    return layout(dense(state, old_fp32), state[GROUP], new_fp32)


def _storage(state: RowState, group_fp32: np.ndarray) -> dict[str, np.ndarray]:
    return {**state, "group_fp32": np.ascontiguousarray(group_fp32, dtype=np.uint8)}


def _check_finite(cell: Cell, users: RowState, items: RowState, epoch: Any) -> None:
    """FP16 overflow (or divergence in FP32) must never leave silent inf/NaN factors."""
    for name, state in (("user", users), ("item", items)):
        if non_finite_half(state[HALF]) or not np.isfinite(state[SINGLE]).all():
            raise FloatingPointError(
                f"MascotMF diverged in epoch {epoch}: {name} block "
                f"{cell.user_block if name == 'user' else cell.item_block} has infinite or NaN "
                "factors (float16 holds at most 65504); lower stepSize or raise regParam"
            )


def update_cell(
    cell: Cell, users: RowState, items: RowState, settings: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """SGD over one cell (the stratified runner's update function).

    Settings: ``lr``, ``reg``, ``collect`` (a check epoch), ``sample_ratio``,
    ``user_group_fp32``/``item_group_fp32`` (uint8 per group), ``backend`` (the driver's
    ``BackendChoice``). Returns ``sse`` and ``count`` (training error of the cell, each rating's
    error taken before its update) and, when ``collect``, the g-switching sums ``user_sums``,
    ``user_squares``, ``user_rounding`` and the item ones over the sampled updates of FP16
    groups.
    """
    user = _storage(users, settings["user_group_fp32"])
    item = _storage(items, settings["item_group_fp32"])
    collect = bool(settings["collect"])
    rank = users[HALF].shape[1]
    if task_uses_gpu(settings.get("backend", BackendChoice("numpy"))):
        from spark_gpu_mf.sgd import mascot_cuda

        sse, statistics = mascot_cuda.cell_sgd_cupy(
            cell.users, cell.items, cell.ratings, user, item, lr=settings["lr"],
            reg=settings["reg"], collect=collect, sample_ratio=settings["sample_ratio"],
        )  # fmt: skip
    else:
        num_user_groups, num_item_groups = len(user["group_fp32"]), len(item["group_fp32"])
        statistics = {
            "user_sums": np.zeros((num_user_groups if collect else 0, rank)),
            "user_squares": np.zeros(num_user_groups if collect else 0),
            "item_sums": np.zeros((num_item_groups if collect else 0, rank)),
            "item_squares": np.zeros(num_item_groups if collect else 0),
            "user_rounding": np.zeros((num_user_groups if collect else 0, 2)),
            "item_rounding": np.zeros((num_item_groups if collect else 0, 2)),
        }
        sse = cell_sgd(
            cell.users, cell.items, cell.ratings,
            user[HALF], user[SINGLE], user[SLOT], user[GROUP], user["group_fp32"],
            item[HALF], item[SINGLE], item[SLOT], item[GROUP], item["group_fp32"],
            settings["lr"], settings["reg"], collect, 1, settings["sample_ratio"],
            statistics["user_sums"], statistics["user_squares"],
            statistics["item_sums"], statistics["item_squares"],
            statistics["user_rounding"], statistics["item_rounding"],
        )  # fmt: skip
    _check_finite(cell, users, items, settings.get("epoch"))
    result = {"sse": np.float64(sse), "count": np.float64(len(cell))}
    if collect:
        result.update(statistics)
    return result


def evaluate_cell(
    cell: Cell, users: RowState, items: RowState, settings: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """Squared error of float32 predictions on one (validation) cell: ``sse`` and ``count``."""
    user = _storage(users, settings["user_group_fp32"])
    item = _storage(items, settings["item_group_fp32"])
    sse = cell_squared_error(
        cell.users, cell.items, cell.ratings,
        user[HALF], user[SINGLE], user[SLOT], user[GROUP], user["group_fp32"],
        item[HALF], item[SINGLE], item[SLOT], item[GROUP], item["group_fp32"],
    )  # fmt: skip
    return {"sse": np.float64(sse), "count": np.float64(len(cell))}
