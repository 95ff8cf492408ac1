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

from dataclasses import dataclass

import numpy as np
import pandas as pd

_ID_SHIFT = 1 << 31

BLOCK_SCHEMA = (
    "pkey int, block int, num_rows int, nnz long, positives long, ids binary, indptr binary, indices binary, "
    "ratings binary, needed_ids binary, needed_counts binary, out_offsets binary, out_rows binary"
)


def to_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def from_bytes(data: bytes, dtype) -> np.ndarray:
    return np.frombuffer(data, dtype=dtype)


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
    def from_row(cls, row) -> "Block":
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

    def rows_needed_by(self, other_block: int) -> np.ndarray:
        return self.out_rows[self.out_offsets[other_block] : self.out_offsets[other_block + 1]]


def build_block(
    block: int, keys: np.ndarray, others: np.ndarray, ratings: np.ndarray, num_other_blocks: int
) -> dict:
    """The CSR row of one block from its ratings ``(keys[i], others[i], ratings[i])``.

    Duplicate ``(key, other)`` pairs are kept as separate observations, as in Spark.
    """
    ids, rows = np.unique(keys, return_inverse=True)
    other_blocks = np.mod(others, num_other_blocks).astype(np.int64)
    # Needed ids ordered by (other block, id): the order the other side sends them in.
    # Ids are shifted to non-negative so that the packed key sorts like the signed id.
    pair = (other_blocks << 32) | (others.astype(np.int64) + _ID_SHIFT)
    needed_pairs, columns = np.unique(pair, return_inverse=True)
    needed_blocks = needed_pairs >> 32
    needed_ids = ((needed_pairs & 0xFFFFFFFF) - _ID_SHIFT).astype(np.int32)
    needed_counts = np.bincount(needed_blocks, minlength=num_other_blocks).astype(np.int32)

    order = np.lexsort((columns, rows))
    indptr = np.zeros(len(ids) + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=len(ids)), out=indptr[1:])

    out_pairs = np.unique((other_blocks << 32) | rows.astype(np.int64))
    out_blocks = out_pairs >> 32
    out_rows = (out_pairs & 0xFFFFFFFF).astype(np.int32)
    out_offsets = np.zeros(num_other_blocks + 1, np.int64)
    np.cumsum(np.bincount(out_blocks, minlength=num_other_blocks), out=out_offsets[1:])
    return {
        "block": block,
        "num_rows": len(ids),
        "nnz": len(keys),
        "positives": int(np.count_nonzero(ratings > 0)),
        "ids": to_bytes(ids.astype(np.int32)),
        "indptr": to_bytes(indptr),
        "indices": to_bytes(columns[order].astype(np.int32)),
        "ratings": to_bytes(ratings[order].astype(np.float32)),
        "needed_ids": to_bytes(needed_ids),
        "needed_counts": to_bytes(needed_counts),
        "out_offsets": to_bytes(out_offsets),
        "out_rows": to_bytes(out_rows),
    }


def build_partition_blocks(
    pdf: pd.DataFrame, key_col: str, other_col: str, num_blocks: int, num_other_blocks: int
) -> pd.DataFrame:
    """applyInPandas body: all ratings of one partition key in, one row per block out."""
    if pdf.empty:
        return pd.DataFrame(columns=BLOCK_SCHEMA_COLUMNS)
    keys = pdf[key_col].to_numpy(np.int32)
    others = pdf[other_col].to_numpy(np.int32)
    ratings = pdf["rating"].to_numpy(np.float32)
    blocks = np.mod(keys, num_blocks)
    order = np.argsort(blocks, kind="stable")
    bounds = np.flatnonzero(np.diff(blocks[order])) + 1
    rows = []
    for part in np.split(order, bounds):
        block = int(blocks[part[0]])
        row = build_block(block, keys[part], others[part], ratings[part], num_other_blocks)
        row["pkey"] = int(pdf["pkey"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows, columns=BLOCK_SCHEMA_COLUMNS)


BLOCK_SCHEMA_COLUMNS = [field.split()[0] for field in BLOCK_SCHEMA.split(", ")]
