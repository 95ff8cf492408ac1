"""Executor side of stratified SGD: rating cells, array packing and the Spark task functions.

A *cell* holds the ratings whose user lies in user block ``bu`` and whose item lies in item block
``bi``, as three aligned arrays of block-local row numbers and ratings, in a fixed, seeded order.
Cells are built once per fit by :func:`build_cells` and cached as rows of ``CELL_SCHEMA``; each
sub-epoch then runs :func:`update_cells` on the cells of one stratum (see ``stratified.py``).

Everything here is a plain module-level function over NumPy/Arrow values, so it pickles small
and is testable without Spark. Per-row state travels between driver and executors as
:func:`pack_arrays` bytes: a JSON header and raw buffers, never pickle.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

__all__ = [
    "CELL_SCHEMA",
    "RESULT_SCHEMA",
    "TRAIN",
    "VALIDATION",
    "Cell",
    "CellFunction",
    "RowState",
    "build_cells",
    "cell_order",
    "evaluate_cells",
    "pack_arrays",
    "unpack_arrays",
    "update_cells",
]

TRAIN, VALIDATION = 0, 1

# One row per non-empty (kind, user block, item block). ``pkey`` places user block ``bu`` on
# partition ``bu mod partitions``; ``stratum = (bi - bu) mod b`` names the sub-epoch of the cell.
CELL_SCHEMA = (
    "pkey int, kind int, cell int, user_block int, item_block int, stratum int, size long, "
    "users binary, items binary, ratings binary"
)
# What a task returns per cell: the updated row state of both blocks and its statistics.
RESULT_SCHEMA = (
    "user_block int, item_block int, user_state binary, item_state binary, stats binary, "
    "seconds double"
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
        array = np.ascontiguousarray(arrays[name])
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


def build_cells(frame: pd.DataFrame, *, num_blocks: int, seed: int) -> pd.DataFrame:
    """``applyInPandas`` over one (pkey, kind, cell) group: the cell as one ``CELL_SCHEMA`` row.

    Input columns: ``pkey, kind, cell, ub, ul, ib, il, rating`` (block and block-local row of the
    user and the item). Training cells get the seeded shuffle of :func:`cell_order`; validation
    cells keep the canonical sorted order (they are only read).
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
            "pkey": [int(frame["pkey"].iat[0])],
            "kind": [kind],
            "cell": [int(frame["cell"].iat[0])],
            "user_block": [user_block],
            "item_block": [item_block],
            "stratum": [(item_block - user_block) % num_blocks],
            "size": [len(order)],
            "users": [_to_bytes(users[order])],
            "items": [_to_bytes(items[order])],
            "ratings": [_to_bytes(ratings[order])],
        }
    )


def _cells_of(batch: pa.RecordBatch) -> Iterator[Cell]:
    columns = {name: batch.column(name) for name in batch.schema.names}

    def array(name: str, row: int, dtype) -> np.ndarray:
        return np.frombuffer(columns[name][row].as_buffer(), dtype=dtype)

    for row in range(batch.num_rows):
        yield Cell(
            user_block=columns["user_block"][row].as_py(),
            item_block=columns["item_block"][row].as_py(),
            users=array("users", row, np.int32),
            items=array("items", row, np.int32),
            ratings=array("ratings", row, np.float32),
            kind=columns["kind"][row].as_py(),
        )


# --------------------------------------------------------------------------- tasks


def _block_state(blocks: Sequence[Any], block: int) -> RowState:
    handle = blocks[block]
    if handle is None:
        raise RuntimeError(f"no state was sent for block {block}")
    return unpack_arrays(handle.value if hasattr(handle, "value") else handle, copy=True)


def update_cells(
    batches: Iterator[pa.RecordBatch],
    *,
    update: CellFunction,
    user_blocks: Sequence[Any],
    item_blocks: Sequence[Any],
    settings: Mapping[str, Any],
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` task of one sub-epoch: run ``update`` on each cell, return both blocks.

    ``user_blocks[b]`` / ``item_blocks[b]`` are broadcasts (or plain bytes) of
    :func:`pack_arrays` row state; a task unpacks private copies of the two blocks its cell needs
    (a broadcast value is shared by the tasks of a Python worker, and a retried task must start
    from the same state), so no block is read or written by two tasks of a sub-epoch.
    """
    for batch in batches:
        for cell in _cells_of(batch):
            users = _block_state(user_blocks, cell.user_block)
            items = _block_state(item_blocks, cell.item_block)
            started = time.perf_counter()
            stats = update(cell, users, items, settings)
            seconds = time.perf_counter() - started
            yield _result_batch(cell, pack_arrays(users), pack_arrays(items), stats, seconds)


def evaluate_cells(
    batches: Iterator[pa.RecordBatch],
    *,
    evaluate: CellFunction,
    user_blocks: Sequence[Any],
    item_blocks: Sequence[Any],
    settings: Mapping[str, Any],
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` task of a read-only pass (e.g. validation RMSE): statistics per cell."""
    for batch in batches:
        for cell in _cells_of(batch):
            users = _block_state(user_blocks, cell.user_block)
            items = _block_state(item_blocks, cell.item_block)
            started = time.perf_counter()
            stats = evaluate(cell, users, items, settings)
            seconds = time.perf_counter() - started
            yield _result_batch(cell, b"", b"", stats, seconds)


def _result_batch(cell: Cell, users: bytes, items: bytes, stats, seconds: float) -> pa.RecordBatch:
    packed_stats = pack_arrays({k: np.asarray(v) for k, v in (stats or {}).items()})
    return pa.RecordBatch.from_pydict(
        {
            "user_block": pa.array([cell.user_block], pa.int32()),
            "item_block": pa.array([cell.item_block], pa.int32()),
            "user_state": pa.array([users], pa.binary()),
            "item_state": pa.array([items], pa.binary()),
            "stats": pa.array([packed_stats], pa.binary()),
            "seconds": pa.array([seconds], pa.float64()),
        }
    )


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
