"""Executor side of stratified SGD: rating cells, array packing and the Spark task functions.

A *cell* holds the ratings whose user lies in user block ``bu`` and whose item lies in item block
``bi``, as three aligned arrays of block-local row numbers and ratings, in a fixed, seeded order.
Cells are built once per fit by :func:`build_cells` and cached as an RDD with one cell per
partition; each sub-epoch then runs :func:`update_cells` on the partitions of one stratum (see
``stratified.py``).

Everything here is a plain module-level function over NumPy values, so it pickles small
and is testable without Spark. Per-row state travels between driver and executors as
:func:`pack_arrays` bytes: a JSON header and raw buffers, never pickle.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "CELL_SCHEMA",
    "TRAIN",
    "VALIDATION",
    "Cell",
    "CellFunction",
    "CellResult",
    "RowState",
    "build_cells",
    "cell_order",
    "cell_record",
    "cells_of",
    "evaluate_cells",
    "pack_arrays",
    "unpack_arrays",
    "update_cells",
]

TRAIN, VALIDATION = 0, 1

# One row per non-empty (kind, user block, item block) cell. ``index`` is the cell's partition in
# the cached cell RDD: ``bu * b + bi`` for training cells, ``b * b`` more for validation cells.
CELL_SCHEMA = (
    "index int, kind int, user_block int, item_block int, size long, users binary, "
    "items binary, ratings binary"
)

#: Per-row arrays of one block (factors and optimizer state); axis 0 is the block's rows.
RowState = dict[str, np.ndarray]


@dataclass(frozen=True)
class Cell:
    """The ratings of one (user block, item block) pair, in the order SGD visits them.

    Attributes
    ----------
    user_block, item_block : int
    users, items : numpy.ndarray
        int32 row numbers within the user block and the item block.
    ratings : numpy.ndarray
        float32.
    kind : int
        ``TRAIN`` or ``VALIDATION``.
    """

    user_block: int
    item_block: int
    users: np.ndarray
    items: np.ndarray
    ratings: np.ndarray
    kind: int = TRAIN

    def __len__(self) -> int:
        return len(self.ratings)


#: ``function(cell, users, items, settings) -> statistics``: the per-cell work of an estimator.
#: ``users``/``items`` are the two blocks' row state (private copies; an update function changes
#: them in place); ``settings`` holds the estimator's plain values plus ``epoch``, ``sub_epoch``
#: and ``stratum``. The returned arrays are summed over all cells on the driver.
CellFunction = Callable[[Cell, RowState, RowState, Mapping[str, Any]], Mapping[str, np.ndarray]]


# --------------------------------------------------------------------------- packing

_MAGIC = b"SGMF"
_ALIGN = 16


def _padding(size: int) -> int:
    return -size % _ALIGN


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as one bytes value: magic, header length, JSON header, aligned raw buffers.

    The inverse is :func:`unpack_arrays`; only plain numeric/bool dtypes are allowed (no objects,
    no pickle), so a value from anywhere can be read safely.
    """
    entries, buffers = [], []
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        if not array.flags.c_contiguous:  # ascontiguousarray would turn 0-d arrays into 1-d
            array = array.copy(order="C")
        if array.dtype.hasobject:
            raise TypeError(f"array {name!r} has dtype {array.dtype}; only plain dtypes pack")
        entries.append([name, array.dtype.str, list(array.shape)])
        buffers.append(array)
    header = json.dumps(entries, separators=(",", ":")).encode()
    head = _MAGIC + struct.pack("<I", len(header)) + header
    parts = [head, b"\0" * _padding(len(head))]
    for array in buffers:
        data = array.tobytes()
        parts += [data, b"\0" * _padding(len(data))]
    return b"".join(parts)


def unpack_arrays(data, copy: bool = True) -> dict[str, np.ndarray]:
    """The arrays of :func:`pack_arrays` bytes (writable copies unless ``copy=False``)."""
    view = memoryview(data)
    if bytes(view[:4]) != _MAGIC:
        raise ValueError("not a packed array set (bad magic)")
    (length,) = struct.unpack("<I", view[4:8])
    entries = json.loads(bytes(view[8 : 8 + length]))
    offset = 8 + length
    offset += _padding(offset)
    arrays = {}
    for name, dtype, shape in entries:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        array = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
        arrays[name] = array.copy() if copy else array
        offset += count * dtype.itemsize
        offset += _padding(count * dtype.itemsize)
    return arrays


def _to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


# --------------------------------------------------------------------------- building cells


def cell_order(
    users: np.ndarray, items: np.ndarray, ratings: np.ndarray, seed: int, key: Sequence[int]
) -> np.ndarray:
    """The visiting order of a cell's ratings: canonical sort, then a seeded permutation.

    Spark delivers a cell's ratings in an order that depends on shuffle timing; sorting by
    (user, item, rating) first makes the order a function of the cell's contents, the ``seed``
    and the cell's ``key`` only, so a fit (and a retried task) is repeatable.
    """
    canonical = np.lexsort((ratings, items, users))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(k) for k in key]])
    return canonical[rng.permutation(len(canonical))]


def build_cells(frame: pd.DataFrame, *, seed: int) -> pd.DataFrame:
    """``applyInPandas`` over one cell (group by ``index``): the cell as one ``CELL_SCHEMA`` row.

    Input columns: ``index, kind, ub, ul, ib, il, rating`` (block and block-local row of the user
    and the item). Training cells get the seeded shuffle of :func:`cell_order`; validation cells
    keep the canonical sorted order (they are only read).
    """
    kind = int(frame["kind"].iat[0])
    user_block, item_block = int(frame["ub"].iat[0]), int(frame["ib"].iat[0])
    users = frame["ul"].to_numpy(np.int32)
    items = frame["il"].to_numpy(np.int32)
    ratings = frame["rating"].to_numpy(np.float32)
    if kind == TRAIN:
        order = cell_order(users, items, ratings, seed, (kind, user_block, item_block))
    else:
        order = np.lexsort((ratings, items, users))
    return pd.DataFrame(
        {
            "index": [int(frame["index"].iat[0])],
            "kind": [kind],
            "user_block": [user_block],
            "item_block": [item_block],
            "size": [len(order)],
            "users": [_to_bytes(users[order])],
            "items": [_to_bytes(items[order])],
            "ratings": [_to_bytes(ratings[order])],
        }
    )


def cell_record(row) -> tuple[int, tuple]:
    """A ``CELL_SCHEMA`` row as the ``(partition index, payload)`` record of the cell RDD."""
    payload = (
        int(row["kind"]),
        int(row["user_block"]),
        int(row["item_block"]),
        bytes(row["users"]),
        bytes(row["items"]),
        bytes(row["ratings"]),
    )
    return int(row["index"]), payload


def cells_of(records: Iterable[tuple[int, tuple]]) -> Iterator[Cell]:
    """The :class:`Cell` of every ``(index, payload)`` record of the cached cell RDD."""
    for _, (kind, user_block, item_block, users, items, ratings) in records:
        yield Cell(
            user_block=user_block,
            item_block=item_block,
            users=np.frombuffer(users, np.int32),
            items=np.frombuffer(items, np.int32),
            ratings=np.frombuffer(ratings, np.float32),
            kind=kind,
        )


# --------------------------------------------------------------------------- tasks


def _block_state(blocks: Sequence[Any], block: int) -> RowState:
    handle = blocks[block]
    if handle is None:
        raise RuntimeError(f"no state was sent for block {block}")
    return unpack_arrays(handle.value if hasattr(handle, "value") else handle, copy=True)


#: What a task returns per cell: ``(user block, item block, packed user block, packed item
#: block, packed statistics, seconds spent in the estimator's function)``.
CellResult = tuple[int, int, bytes, bytes, bytes, float]


def update_cells(
    records: Iterable[tuple[int, tuple]],
    *,
    update: CellFunction,
    user_blocks: Sequence[Any],
    item_blocks: Sequence[Any],
    settings: Mapping[str, Any],
) -> list[CellResult]:
    """Task of one sub-epoch (one partition = one cell): run ``update``, return both blocks.

    ``user_blocks[b]`` / ``item_blocks[b]`` are broadcasts (or plain bytes) of
    :func:`pack_arrays` row state; a task unpacks private copies of the two blocks its cell needs
    (a broadcast value is shared by the tasks of a Python worker, and a retried task must start
    from the same state), so no block is read or written by two tasks of a sub-epoch.
    """
    results = []
    for cell in cells_of(records):
        users = _block_state(user_blocks, cell.user_block)
        items = _block_state(item_blocks, cell.item_block)
        started = time.perf_counter()
        stats = update(cell, users, items, settings)
        seconds = time.perf_counter() - started
        results.append(
            (
                cell.user_block,
                cell.item_block,
                pack_arrays(users),
                pack_arrays(items),
                _pack_stats(stats),
                seconds,
            )
        )
    return results


def evaluate_cells(
    records: Iterable[tuple[int, tuple]],
    *,
    evaluate: CellFunction,
    user_blocks: Sequence[Any],
    item_blocks: Sequence[Any],
    settings: Mapping[str, Any],
) -> list[CellResult]:
    """Task of a read-only pass (e.g. validation RMSE): statistics per cell, no state back."""
    results = []
    for cell in cells_of(records):
        users = _block_state(user_blocks, cell.user_block)
        items = _block_state(item_blocks, cell.item_block)
        started = time.perf_counter()
        stats = evaluate(cell, users, items, settings)
        seconds = time.perf_counter() - started
        results.append((cell.user_block, cell.item_block, b"", b"", _pack_stats(stats), seconds))
    return results


def _pack_stats(stats: Mapping[str, Any] | None) -> bytes:
    return pack_arrays({name: np.asarray(value) for name, value in (stats or {}).items()})


def sum_statistics(results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Element-wise float64 sums of per-cell statistics, added in the order given."""
    total: dict[str, np.ndarray] = {}
    for stats in results:
        for name, value in stats.items():
            value = np.asarray(value, dtype=np.float64)
            if name in total:
                if total[name].shape != value.shape:
                    raise ValueError(
                        f"statistic {name!r} has shape {value.shape} in one cell and "
                        f"{total[name].shape} in another"
                    )
                total[name] = total[name] + value
            else:
                total[name] = value.copy()
    return total


def settings_for(base: Mapping[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """A task's settings: the estimator's values plus the runner's (epoch, sub_epoch, ...)."""
    merged = dict(base or {})
    merged.update(extra)
    return merged
