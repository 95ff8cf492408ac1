"""Executor side of stratified SGD: rating cells, array packing and the Spark task functions.

A *cell* holds the ratings whose user lies in user block ``bu`` and whose item lies in item block
``bi``, as three aligned arrays of block-local row numbers and ratings, in a fixed, seeded order.
Cells are built once per fit by :func:`build_cells` and cached as a DataFrame, the cells of user
block ``p`` in partition ``p``. An epoch is one chain of cogroups (see ``stratified.py``): in each
sub-epoch, :func:`run_sub_epoch` meets a user block's cell with *messages* (``MESSAGE_SCHEMA``
rows: the packed state of the user block, of the item block it meets, and the statistics so far)
and sends the item block on to the task that needs it next.

Everything here is a plain module-level function over NumPy and Arrow values, so it pickles
small and is testable without Spark. Per-row state travels as :func:`pack_arrays` bytes: a JSON
header and raw buffers, never pickle.
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
import pyarrow as pa

__all__ = [
    "BUILT_CELL_SCHEMA",
    "ITEM",
    "MESSAGE_SCHEMA",
    "STATS",
    "TRAIN",
    "USER",
    "VALIDATION",
    "Cell",
    "CellFunction",
    "RowState",
    "build_cells",
    "cell_order",
    "cell_record",
    "cells_of",
    "cells_of_table",
    "evaluate_batches",
    "item_destination",
    "message_table",
    "pack_arrays",
    "run_sub_epoch",
    "state_message",
    "sum_statistics",
    "unpack_arrays",
    "update_cells",
    "visiting_order",
]

TRAIN, VALIDATION = 0, 1

# One row per non-empty (kind, user block, item block) cell, as ``build_cells`` returns it.
BUILT_CELL_SCHEMA = (
    "kind int, user_block int, item_block int, size long, users binary, items binary, "
    "ratings binary"
)

# What a message carries: a user block's state, an item block's state, or a cell's statistics.
USER, ITEM, STATS = 0, 1, 2

# ``pkey``: partition key of the task the message goes to (``spark.partitioning``);
# ``payload``: ``pack_arrays`` bytes of the state or of the statistics; ``seconds``: time the
# estimator's function took on the cell (statistics only).
MESSAGE_ARROW_SCHEMA = pa.schema(
    [
        ("pkey", pa.int32()),
        ("side", pa.int32()),
        ("sub_epoch", pa.int32()),
        ("user_block", pa.int32()),
        ("item_block", pa.int32()),
        ("payload", pa.binary()),
        ("seconds", pa.float64()),
    ]
)
MESSAGE_SCHEMA = (
    "pkey int, side int, sub_epoch int, user_block int, item_block int, payload binary, "
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


def visiting_order(
    kind: int, user_block: int, item_block: int, users, items, ratings, seed: int
) -> np.ndarray:
    """A cell's order: training cells get the seeded shuffle of :func:`cell_order`, validation
    cells the canonical sorted order (they are only read)."""
    if kind == TRAIN:
        return cell_order(users, items, ratings, seed, (kind, user_block, item_block))
    return np.lexsort((ratings, items, users))


def build_cells(frame: pd.DataFrame, *, seed: int) -> pd.DataFrame:
    """``applyInPandas`` over one cell (group by kind and blocks): the cell as one row.

    Input columns: ``kind, ub, ul, ib, il, rating`` (block and block-local row of the user and
    the item). Training cells get the seeded shuffle of :func:`cell_order`; validation cells
    keep the canonical sorted order (they are only read). Output: ``BUILT_CELL_SCHEMA``.
    """
    kind = int(frame["kind"].iat[0])
    user_block, item_block = int(frame["ub"].iat[0]), int(frame["ib"].iat[0])
    users = frame["ul"].to_numpy(np.int32)
    items = frame["il"].to_numpy(np.int32)
    ratings = frame["rating"].to_numpy(np.float32)
    order = visiting_order(kind, user_block, item_block, users, items, ratings, seed)
    return pd.DataFrame(
        {
            "kind": [kind],
            "user_block": [user_block],
            "item_block": [item_block],
            "size": [len(order)],
            "users": [_to_bytes(users[order])],
            "items": [_to_bytes(items[order])],
            "ratings": [_to_bytes(ratings[order])],
        }
    )


def cells_of_table(table: pa.Table) -> Iterator[Cell]:
    """The :class:`Cell` of every row of an Arrow table of cells (no copy of the arrays)."""
    columns = {
        name: table.column(name)
        for name in ("kind", "user_block", "item_block", "users", "items", "ratings")
    }
    for row in range(table.num_rows):
        yield Cell(
            user_block=columns["user_block"][row].as_py(),
            item_block=columns["item_block"][row].as_py(),
            users=np.frombuffer(columns["users"][row].as_buffer(), np.int32),
            items=np.frombuffer(columns["items"][row].as_buffer(), np.int32),
            ratings=np.frombuffer(columns["ratings"][row].as_buffer(), np.float32),
            kind=columns["kind"][row].as_py(),
        )


# --------------------------------------------------------------------------- messages


def message_table(messages: Sequence[Mapping[str, Any]]) -> pa.Table:
    """``MESSAGE_SCHEMA`` rows (dicts with every field) as an Arrow table with exact types."""
    return pa.Table.from_pylist(list(messages), schema=MESSAGE_ARROW_SCHEMA)


def state_message(side: int, block: int, state: bytes, destination_key: int) -> dict[str, Any]:
    """A block's packed row state on its way to the task whose partition key is given."""
    return {
        "pkey": destination_key,
        "side": side,
        "sub_epoch": -1,
        "user_block": block if side == USER else -1,
        "item_block": block if side == ITEM else -1,
        "payload": state,
        "seconds": 0.0,
    }


def item_destination(item_block: int, stratum: int, num_blocks: int) -> int:
    """The user block whose task meets ``item_block`` in ``stratum``: cells are
    ``(p, (p + stratum) mod b)``."""
    return (item_block - stratum) % num_blocks


def run_sub_epoch(
    cells: pa.Table,
    messages: pa.Table,
    *,
    update: CellFunction,
    settings: Mapping[str, Any],
    keys: Sequence[int],
    next_stratum: int,
) -> pa.Table:
    """Cogroup task of one sub-epoch, one user block: run ``update`` on the block's cell.

    ``cells`` holds the block's training cell of this stratum (none when that cell is empty);
    ``messages`` the user block's state, the state of the item block it meets, and the
    statistics of earlier sub-epochs, which ride along to the end of the epoch. Returns the same
    messages with both blocks updated, this cell's statistics added, and every message keyed
    (``keys[user block]``) for the task that needs it in ``next_stratum``.

    The blocks are unpacked into private copies, so a retried task starts from the same bytes.
    """
    num_blocks = len(keys)
    user = item = None
    out = []
    for message in messages.to_pylist():
        if message["side"] == USER:
            user = message
        elif message["side"] == ITEM:
            item = message
        else:
            out.append(message)
    if user is None or item is None:
        raise RuntimeError(f"a sub-epoch task got no {'user' if user is None else 'item'} block")
    for cell in cells_of_table(cells):
        if (cell.user_block, cell.item_block) != (user["user_block"], item["item_block"]):
            raise RuntimeError(
                f"cell ({cell.user_block}, {cell.item_block}) met blocks "
                f"({user['user_block']}, {item['item_block']})"
            )
        users = unpack_arrays(user["payload"])
        items = unpack_arrays(item["payload"])
        started = time.perf_counter()
        stats = update(cell, users, items, settings)
        seconds = time.perf_counter() - started
        user = {**user, "payload": pack_arrays(users)}
        item = {**item, "payload": pack_arrays(items)}
        out.append(
            {
                "pkey": 0,
                "side": STATS,
                "sub_epoch": int(settings["sub_epoch"]),
                "user_block": cell.user_block,
                "item_block": cell.item_block,
                "payload": _pack_stats(stats),
                "seconds": seconds,
            }
        )
    home = keys[user["user_block"]]
    for message in out:
        message["pkey"] = home
    user["pkey"] = home
    item["pkey"] = keys[item_destination(item["item_block"], next_stratum, num_blocks)]
    return message_table([*out, user, item])


def evaluate_batches(
    batches: Iterable[pa.RecordBatch], *, evaluate: CellFunction, settings: Mapping[str, Any]
) -> Iterator[pa.RecordBatch]:
    """``mapInArrow`` task of a read-only pass (e.g. validation RMSE): statistics per cell.

    Rows: a cell with the packed state of its two blocks (``user_state``, ``item_state``).
    """
    for batch in batches:
        table = pa.Table.from_batches([batch])
        messages = []
        for row, cell in enumerate(cells_of_table(table)):
            users = unpack_arrays(table.column("user_state")[row].as_py())
            items = unpack_arrays(table.column("item_state")[row].as_py())
            started = time.perf_counter()
            stats = evaluate(cell, users, items, settings)
            messages.append(
                {
                    "pkey": 0,
                    "side": STATS,
                    "sub_epoch": -1,
                    "user_block": cell.user_block,
                    "item_block": cell.item_block,
                    "payload": _pack_stats(stats),
                    "seconds": time.perf_counter() - started,
                }
            )
        yield from message_table(messages).to_batches()


# --------------------------------------------------------------------------- classic shortcut
# ``jvm_epochs``: on a classic session a sub-epoch is one RDD job over cached cell records with
# the blocks broadcast. These functions are its tasks.


def cell_record(row) -> tuple[int, tuple]:
    """A cell row (with its partition ``index``) as the ``(index, payload)`` RDD record."""
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
    """The :class:`Cell` of every ``(index, payload)`` record of a cached cell RDD."""
    for _, (kind, user_block, item_block, users, items, ratings) in records:
        yield Cell(
            user_block=user_block,
            item_block=item_block,
            users=np.frombuffer(users, np.int32),
            items=np.frombuffer(items, np.int32),
            ratings=np.frombuffer(ratings, np.float32),
            kind=kind,
        )


#: What a shortcut task returns per cell: ``(user block, item block, packed user block, packed
#: item block, packed statistics, seconds spent in the estimator's function)``.
CellResult = tuple[int, int, bytes, bytes, bytes, float]


def update_cells(
    records: Iterable[tuple[int, tuple]],
    *,
    update: CellFunction,
    user_blocks: Sequence[Any],
    item_blocks: Sequence[Any],
    settings: Mapping[str, Any],
) -> list[CellResult]:
    """Shortcut task of one sub-epoch (one partition = one cell): run ``update``, return both
    blocks.

    ``user_blocks[b]`` / ``item_blocks[b]`` are broadcasts of :func:`pack_arrays` row state; a
    task unpacks private copies of its two blocks (a broadcast value is shared by the tasks of a
    Python worker, and a retried task must start from the same state).
    """
    results = []
    for cell in cells_of(records):
        users = unpack_arrays(user_blocks[cell.user_block].value)
        items = unpack_arrays(item_blocks[cell.item_block].value)
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
