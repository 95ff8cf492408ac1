"""Executor functions that turn ratings into compact per-block CSR rows.

A *block* of one side (users or items) holds the rows whose id maps to it (``id mod numBlocks``,
as Spark's ``ALSPartitioner``). It is stored once, as one Arrow row of binary columns:

* ``ids``: the block's sorted unique ids (int32); factor row ``j`` of the block belongs to
  ``ids[j]``.
* ``indptr``, ``indices``, ``ratings``: CSR of the block's ratings (Spark's *InBlock*);
  ``indices`` point into ``needed_ids``.
* ``needed_ids``, ``needed_counts``: the other side's ids this block needs, grouped by the other
  side's block and sorted by id within each; ``needed_counts[o]`` of them come from block ``o``.
* ``out_offsets``, ``out_rows``: for each block ``o`` of the other side, the local rows of this
  block that ``o`` needs (Spark's *OutBlock*); ``o`` receives them in the order of its
  ``needed_ids``, because both are sorted ids.

Both sides derive ``needed_*`` and ``out_*`` from the same ratings, so the two agree without a
join.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from spark_gpu_mf.executor.alternation import known_rows, sorted_initial
from spark_gpu_mf.executor.sorting import (
    csr_by_row,
    group_by_block,
    stable_argsort,
    unique_inverse,
)

BLOCK_SCHEMA = (
    "pkey int, block int, num_rows int, nnz long, positives long, ids binary, indptr binary, "
    "indices binary, ratings binary, needed_ids binary, needed_counts binary, out_offsets binary, "
    "out_rows binary"
)


# The columns a block's starting factors are sent from: the ratings stay in the cache.
SENDING_COLUMNS = ("pkey", "block", "ids", "out_offsets", "out_rows")

BLOCK_ARROW = pa.schema(
    [("pkey", pa.int32()), ("block", pa.int32()), ("num_rows", pa.int32()), ("nnz", pa.int64()),
     ("positives", pa.int64())]
    + [(name, pa.binary()) for name in ("ids", "indptr", "indices", "ratings", "needed_ids",
                                        "needed_counts", "out_offsets", "out_rows")]
)  # fmt: skip


def to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def from_bytes(data: bytes, dtype) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype)


def factor_table(ids: np.ndarray, factors: np.ndarray) -> pa.Table:
    """Arrow ``(id int, features list<float>)`` of ``ids`` (n,) and ``factors`` (n, rank):
    one flat float32 buffer, never a Python object per row."""
    factors = np.ascontiguousarray(factors, dtype=np.float32)
    n, rank = factors.shape
    offsets = pa.array(np.arange(0, (n + 1) * rank, rank, dtype=np.int32))
    features = pa.ListArray.from_arrays(offsets, pa.array(factors.reshape(-1)))
    return pa.table({"id": pa.array(np.asarray(ids, np.int32)), "features": features})


@dataclass
class Block:
    """One block decoded from its Arrow row (arrays are read-only views)."""

    block: int
    ids: np.ndarray
    indptr: np.ndarray
    indices: np.ndarray
    ratings: np.ndarray
    needed_ids: np.ndarray
    needed_counts: np.ndarray
    out_offsets: np.ndarray
    out_rows: np.ndarray

    @classmethod
    def from_row(cls, row) -> Block:
        return cls(
            block=int(row["block"]),
            ids=from_bytes(row["ids"], np.int32),
            indptr=from_bytes(row["indptr"], np.int64),
            indices=from_bytes(row["indices"], np.int32),
            ratings=from_bytes(row["ratings"], np.float32),
            needed_ids=from_bytes(row["needed_ids"], np.int32),
            needed_counts=from_bytes(row["needed_counts"], np.int32),
            out_offsets=from_bytes(row["out_offsets"], np.int64),
            out_rows=from_bytes(row["out_rows"], np.int32),
        )

    @classmethod
    def for_sending(cls, row) -> Block:
        """A block from a row of ``SENDING_COLUMNS`` only: what sending its factors to the
        other side reads (its ids and out rows), without its ratings (left empty)."""
        empty = np.zeros(0, np.int32)
        return cls(
            block=int(row["block"]),
            ids=from_bytes(row["ids"], np.int32),
            indptr=np.zeros(1, np.int64),
            indices=empty,
            ratings=np.zeros(0, np.float32),
            needed_ids=empty,
            needed_counts=empty,
            out_offsets=from_bytes(row["out_offsets"], np.int64),
            out_rows=from_bytes(row["out_rows"], np.int32),
        )

    def rows_needed_by(self, other_block: int) -> np.ndarray:
        return self.out_rows[self.out_offsets[other_block] : self.out_offsets[other_block + 1]]


def build_block(
    block: int, keys: np.ndarray, others: np.ndarray, ratings: np.ndarray, num_other_blocks: int
) -> dict:
    """The CSR row of one block from its ratings ``(keys[i], others[i], ratings[i])``.

    Duplicate ``(key, other)`` pairs are kept as separate observations, as in Spark.
    """
    unique_keys, rows = unique_inverse(keys)
    ids = unique_keys.astype(np.int32)
    unique_others, other_rank = unique_inverse(others)
    # Needed ids ordered by (other block, id): the order the other side sends them in. The
    # unique ids are sorted already, so a stable sort by block keeps them sorted within a block.
    unique_blocks = np.mod(unique_others, num_other_blocks)
    by_block, needed_blocks = stable_argsort(unique_blocks, num_other_blocks)
    needed_ids = unique_others[by_block].astype(np.int32)
    needed_counts = np.bincount(needed_blocks, minlength=num_other_blocks).astype(np.int32)
    position = np.empty(len(by_block), np.int64)
    position[by_block] = np.arange(len(by_block))
    columns = position[other_rank]

    num_rows, num_needed = len(ids), len(needed_ids)
    indptr, indices, values = csr_by_row(rows, columns, ratings, num_rows, num_needed)

    # Rows of this block each block of the other side needs, sorted by (other block, row).
    out_keys, _ = unique_inverse(unique_blocks[other_rank] * num_rows + rows)
    out_blocks = out_keys // max(num_rows, 1)
    out_rows = (out_keys % max(num_rows, 1)).astype(np.int32)
    out_offsets = np.zeros(num_other_blocks + 1, np.int64)
    np.cumsum(np.bincount(out_blocks, minlength=num_other_blocks), out=out_offsets[1:])
    return {
        "block": block,
        "num_rows": num_rows,
        "nnz": len(keys),
        "positives": int(np.count_nonzero(ratings > 0)),
        "ids": to_bytes(ids),
        "indptr": to_bytes(indptr),
        "indices": to_bytes(indices),
        "ratings": to_bytes(values),
        "needed_ids": to_bytes(needed_ids),
        "needed_counts": to_bytes(needed_counts),
        "out_offsets": to_bytes(out_offsets),
        "out_rows": to_bytes(out_rows),
    }


def build_blocks(keys, others, ratings, num_blocks, num_other_blocks) -> list:
    """``build_block`` rows of every non-empty block of ``keys``' side, in block order."""
    bounds, keys, others, ratings = group_by_block(keys, others, ratings, num_blocks)
    return [
        build_block(b, keys[lo:hi], others[lo:hi], ratings[lo:hi], num_other_blocks)
        for b, lo, hi in zip(range(num_blocks), bounds[:-1], bounds[1:])
        if hi > lo
    ]


# ``known`` rows carry a warm start's factors (``pack_known_factors``), the others ratings.
PACKED_SCHEMA = "side int, part int, known boolean, keys binary, others binary, values binary"

# A built block of either side (``side`` indexes the ``PackedSide`` list of the build), with
# the rows of it a warm start's model knows and their factors there (empty on a cold fit).
KNOWN_COLUMNS = ("known_rows", "known_factors")
BUILT_SCHEMA = "side int, " + BLOCK_SCHEMA + ", known_rows binary, known_factors binary"
_BUILT_ARROW = pa.schema(
    [("side", pa.int32())] + list(BLOCK_ARROW) + [(name, pa.binary()) for name in KNOWN_COLUMNS]
)

# What a block's starting factors are made from: what sending reads, and the known rows.
STARTING_COLUMNS = SENDING_COLUMNS + KNOWN_COLUMNS


# Rows of ratings per Arrow batch that ``pack_ratings`` asks for where the session lets it
# choose: its cost per batch (two counting sorts and one packed row per side and partition)
# favours batches larger than Spark's default 10,000 (docs/benchmarks.md); 1.5 MB each.
PACK_BATCH_ROWS = 1 << 17


@dataclass(frozen=True)
class PackedSide:
    """How one side's ratings are packed and built: its id column, the other side's, both
    sides' block counts, and the keys of its partitions (block ``b`` goes to partition
    ``b mod len(partition_keys)``)."""

    key_col: str
    other_col: str
    num_blocks: int
    num_other_blocks: int
    partition_keys: Sequence[int]

    @property
    def num_partitions(self) -> int:
        return len(self.partition_keys)


def pack_ratings(
    batches: Iterator[pa.RecordBatch], sides: Sequence[PackedSide]
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: each Arrow batch of ratings as one row per side and partition.

    The row holds the batch's ratings of the blocks that partition ``part`` of side ``side``
    (an index into ``sides``) holds, as three packed arrays in the batch's order, so the
    shuffle that brings a partition's ratings together moves a few large binary values instead
    of one row per rating (which Spark hashes, serializes and, for the grouping, sorts). Both
    sides are packed from one read of the ratings: moving ratings from the JVM into Python costs
    more than packing them.
    """
    names = {name for side in sides for name in (side.key_col, side.other_col)}
    for batch in batches:
        ids = {
            name: batch.column(name).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            for name in names
        }
        ratings = (
            batch.column("rating").to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        )
        for index, side in enumerate(sides):
            bounds, keys, others, grouped = group_by_block(
                ids[side.key_col], ids[side.other_col], ratings, side.num_blocks,
                side.num_partitions,
            )  # fmt: skip
            yield _packed_batch(index, bounds, keys, others, grouped, known=False)


def _packed_batch(side, bounds, keys, others, values, known) -> pa.RecordBatch:
    """One packed row per non-empty range ``bounds[p]:bounds[p + 1]`` (partition ``p``) of
    ``keys``, ``others`` (None: empty values) and ``values`` (rows of it when a matrix),
    whose binary values are views of the arrays rather than copies."""
    parts = np.flatnonzero(bounds[1:] > bounds[:-1])
    starts = np.append(bounds[:-1][parts], bounds[-1])  # empty ranges between add nothing
    columns = [
        pa.array(np.full(len(parts), side, np.int32)),
        pa.array(parts.astype(np.int32)),
        pa.array(np.full(len(parts), known)),
    ]
    for array in (keys, others, values):
        if array is None:
            array, offsets = np.zeros(0, np.uint8), np.zeros(len(parts) + 1, np.int64)
        else:
            offsets = starts * (array.nbytes // max(len(array), 1))
            array = np.ascontiguousarray(array)
        columns.append(_binary_array(offsets, array))
    return pa.RecordBatch.from_arrays(columns, schema=_PACKED_ARROW)


def _binary_array(offsets: np.ndarray, data) -> pa.Array:
    """An Arrow binary array of the byte ranges ``offsets[i]:offsets[i + 1]`` of ``data`` (an
    array or bytes), viewed in place."""
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(
            f"{int(offsets[-1])} bytes in one Arrow binary column (at most 2 GiB): lower "
            "spark.sql.execution.arrow.maxRecordsPerBatch, or use more blocks."
        )
    buffers = [None, pa.py_buffer(np.asarray(offsets, np.int32)), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1, buffers)


_PACKED_ARROW = pa.schema(
    [("side", pa.int32()), ("part", pa.int32()), ("known", pa.bool_()), ("keys", pa.binary()),
     ("others", pa.binary()), ("values", pa.binary())]
)  # fmt: skip


def pack_known_factors(
    batches: Iterator[pa.RecordBatch], sides: Sequence[PackedSide], rank: int
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: a warm start's factors, ``(side int, id int, features array<float>)``
    with ``side`` an index into ``sides``, packed like ``pack_ratings``: one ``known`` row per
    side and partition, its ``keys`` the ids and its ``values`` their factors, so that the
    build's shuffle brings them to the task building the blocks that hold those ids.
    """
    for batch in batches:
        side_of_row = batch.column("side").to_numpy(zero_copy_only=False)
        ids = batch.column("id").to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        factors = _factor_matrix(batch.column("features"), rank)
        for index, side in enumerate(sides):
            mine = np.flatnonzero(side_of_row == index)
            part = np.mod(np.mod(ids[mine], side.num_blocks), side.num_partitions)
            order = np.argsort(part, kind="stable")
            mine = mine[order]
            bounds = np.searchsorted(part[order], np.arange(side.num_partitions + 1))
            yield _packed_batch(index, bounds, ids[mine], None, factors[mine], known=True)


def _factor_matrix(features: pa.Array, rank: int) -> np.ndarray:
    """A factor column (list<float>) as a float32 ``(rows, rank)`` matrix; a row that is null
    or holds another number of features than ``rank`` is a damaged model."""
    lengths = features.value_lengths().fill_null(-1).to_numpy(zero_copy_only=False)
    if np.any(lengths != rank):
        raise ValueError(
            f"initialModel has a factor row of {int(lengths[lengths != rank][0])} features "
            f"(-1: null), but its rank is {rank}: the model is damaged."
        )
    flat = features.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(len(features), rank)


def build_packed_blocks(
    batches: Iterator[pa.RecordBatch], sides: Sequence[PackedSide], rank: int
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: a partition's packed ratings (``pack_ratings``) to the blocks of each
    side and partition they hold, each block keyed by its side's partition key.

    The shuffle puts partition ``p`` of both sides in one task; grouping by ``(side, part)``
    here instead of Spark's ``groupBy`` spares the JVM a sort of every packed rating. A warm
    start's factors of the partition (``pack_known_factors``) come with them: each block gets
    the rows of it they know, so that its starting factors need no join and no driver.
    """
    table = pa.Table.from_batches(list(batches), schema=_PACKED_ARROW)
    for row in _built_rows(table, sides, rank):
        # One batch per block: a binary column holds at most 2 GiB.
        yield _one_row_batch(row, _BUILT_ARROW)


def keyed_by_part(batches: Iterator[pa.RecordBatch], pack) -> Iterator[tuple]:
    """RDD ``mapPartitions`` body: the packed rows ``pack`` (``pack_ratings`` or
    ``pack_known_factors``, bound) makes of ``batches``, as ``(part, row)`` pairs for an RDD
    shuffle by ``part``, which moves them as pickled bytes the JVM never converts."""
    part = _PACKED_ARROW.get_field_index("part")
    for batch in pack(batches):
        columns = [batch.column(name).to_pylist() for name in _PACKED_ARROW.names]
        for row in zip(*columns):
            yield row[part], row


def build_partition(part: int) -> int:
    """RDD ``partitionBy`` function: a packed row keyed by its ``part`` is built in the task of
    partition ``part``, where the same partition of the other side is built too."""
    return part


def build_keyed_blocks(
    pairs: Iterator[tuple], sides: Sequence[PackedSide], rank: int
) -> Iterator[dict]:
    """RDD ``mapPartitions`` body: :func:`build_packed_blocks` of the ``(part, row)`` pairs
    of :func:`keyed_by_part` that a shuffle brought together, its blocks as dict rows."""
    rows = [row for _, row in pairs]
    columns = list(zip(*rows)) if rows else [()] * len(_PACKED_ARROW)
    table = pa.table(
        [pa.array(column, field.type) for column, field in zip(columns, _PACKED_ARROW)],
        schema=_PACKED_ARROW,
    )
    yield from _built_rows(table, sides, rank)


def _built_rows(table: pa.Table, sides: Sequence[PackedSide], rank: int) -> Iterator[dict]:
    """The blocks (``BUILT_SCHEMA`` dict rows) of the packed rows in ``table``."""
    side_of_row = table.column("side").to_numpy()
    part_of_row = table.column("part").to_numpy()
    known_of_row = table.column("known").to_numpy(zero_copy_only=False)
    keys, others, values = (table.column(name) for name in ("keys", "others", "values"))
    for index, side in enumerate(sides):
        ours = side_of_row == index
        for part in np.unique(part_of_row[ours & ~known_of_row]):
            here = ours & (part_of_row == part)
            rated, known = here & ~known_of_row, here & known_of_row
            initial = None
            if known.any():
                initial = sorted_initial(
                    _joined(keys, known, np.int32),
                    _joined(values, known, np.float32).reshape(-1, rank),
                )
            for row in build_blocks(
                _joined(keys, rated, np.int32),
                _joined(others, rated, np.int32),
                _joined(values, rated, np.float32),
                side.num_blocks,
                side.num_other_blocks,
            ):
                rows, factors = known_rows(from_bytes(row["ids"], np.int32), initial)
                row["side"] = index
                row["pkey"] = side.partition_keys[row["block"] % side.num_partitions]
                row["known_rows"] = to_bytes(rows)
                row["known_factors"] = to_bytes(factors)
                yield row


def known_of_row(row, rank: int) -> tuple:
    """``(rows, factors (k, rank))`` of a built block's ``KNOWN_COLUMNS``: the rows a warm
    start's model knows and their factors there (none on a cold fit)."""
    return (
        from_bytes(row["known_rows"], np.int32),
        from_bytes(row["known_factors"], np.float32).reshape(-1, rank),
    )


def _one_row_batch(row: dict, schema: pa.Schema) -> pa.RecordBatch:
    """``pa.RecordBatch.from_pylist([row], schema)`` whose binary values are views of the
    row's bytes instead of copies (a block's arrays are most of a task's memory)."""
    columns = []
    for field in schema:
        value = row[field.name]
        if field.type == pa.binary():
            columns.append(_binary_array(np.array([0, len(value)]), value))
        else:
            columns.append(pa.array([value], field.type))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def _joined(column: pa.ChunkedArray, selected: np.ndarray, dtype) -> np.ndarray:
    """The packed arrays in the ``selected`` rows (a mask) of a binary column, end to end:
    one copy, read from the Arrow buffers in place."""
    pieces, start = [], 0
    for chunk in column.chunks:
        mine = np.flatnonzero(selected[start : start + len(chunk)])
        start += len(chunk)
        if len(mine) == 0:
            continue
        _, offsets, data = chunk.buffers()
        offsets = np.frombuffer(offsets, np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data, np.uint8)
        pieces.extend(data[offsets[j] : offsets[j + 1]] for j in mine)
    return np.concatenate(pieces).view(dtype) if pieces else np.zeros(0, dtype)
