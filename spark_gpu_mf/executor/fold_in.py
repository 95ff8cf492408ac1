"""Executor side of fold-in: new factors for some rows of one side against the other side, fixed.

Fold-in is one exact ALS half-iteration for chosen rows (users who signed up after training,
or users whose ratings changed): per row the normal equations of the model's fit
(``lambda * n`` regularization, implicit confidences, nonnegativity) against the fixed factors of
the other side, solved exactly (Cholesky, or Spark's NNLS when nonnegative). The ratings of one
group of rows arrive with the fixed factors they reference, each factor once per group (never
one copy per rating), and are laid out as the training blocks are (``blocks.build_block``), so a
row solves to exactly what a training half-iteration would give it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Tuple

import numpy as np
import pyarrow as pa

from spark_gpu_mf.backends.solve_config import SolveConfig
from spark_gpu_mf.executor.als_tasks import TaskSettings, solve_block
from spark_gpu_mf.executor.blocks import Block, build_block, factor_table

# The model's factor schema as Arrow (``spark.factors.FACTORS_SCHEMA``): a grouped Arrow UDF's
# result must match it exactly, nullability included.
_FACTORS_ARROW = pa.schema(
    [
        pa.field("id", pa.int32(), nullable=False),
        pa.field("features", pa.list_(pa.field("element", pa.float32(), nullable=False))),
    ]
)


def _factor_rows(ids: np.ndarray, factors: np.ndarray) -> pa.Table:
    return factor_table(ids, factors).cast(_FACTORS_ARROW)


def exact(config: SolveConfig) -> SolveConfig:
    """``config`` with the exact solver: fold-in has no previous factors to iterate from."""
    return replace(config, solver="cholesky")


def fold_in_inputs(
    keys: np.ndarray,
    others: np.ndarray,
    ratings: np.ndarray,
    factor_ids: np.ndarray,
    factors: np.ndarray,
) -> Tuple[Block, np.ndarray]:
    """The rows' ratings as a training block, and the fixed factors its ``indices`` point into.

    Ratings of ``others`` absent from ``factor_ids`` are left out (they have no factor to solve
    against); a row left with no rating is not in the block.

    Returns
    -------
    block : Block
        ``block.ids`` the rows (sorted), CSR of their ratings.
    src : float32 (len(block.needed_ids), rank)
        The fixed factors in ``block.needed_ids`` order.
    """
    order = np.argsort(factor_ids, kind="stable")
    sorted_ids = np.asarray(factor_ids)[order]
    position = np.minimum(np.searchsorted(sorted_ids, others), max(len(sorted_ids) - 1, 0))
    known = (sorted_ids[position] == others) if len(sorted_ids) else np.zeros(len(others), bool)
    block = Block.from_row(build_block(0, keys[known], others[known], ratings[known], 1))
    rows = order[np.searchsorted(sorted_ids, block.needed_ids)]
    return block, np.ascontiguousarray(np.asarray(factors, np.float32)[rows])


def _factor_arrays(table: pa.Table, rank: int):
    ids = table.column("id").to_numpy().astype(np.int32)
    flat = table.column("features").combine_chunks().flatten()
    return ids, flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(ids), rank)


def fold_in_part(
    ratings: pa.Table,
    factors: pa.Table,
    settings: TaskSettings,
    yty: Optional[np.ndarray],
    update: Optional[Callable] = None,
) -> pa.Table:
    """Arrow cogroup body: the new ``(id, features)`` rows of one part of the folded-in rows.

    ``ratings``: ``(key, other, rating)`` of the part's rows; ``factors``: the fixed side's
    ``(id, features)`` rows they reference. ``settings.config`` must be exact (``exact``).
    ``update``: a backend's ``update_block`` to use instead of the task's (tests run the CuPy
    backend's code through the host shim this way).
    """
    rank = settings.config.rank
    if ratings.num_rows == 0:
        return _factor_rows(np.zeros(0, np.int32), np.zeros((0, rank), np.float32))
    block, src = fold_in_inputs(
        ratings.column("key").to_numpy().astype(np.int32),
        ratings.column("other").to_numpy().astype(np.int32),
        ratings.column("rating").to_numpy().astype(np.float32),
        *_factor_arrays(factors, rank),
    )
    if len(block.ids) == 0:
        return _factor_rows(block.ids, np.zeros((0, rank), np.float32))
    if update is None:
        x = solve_block(block, block.indices, src, None, settings, yty)
    else:
        x = update(block.indptr, block.indices, block.ratings, src, None, settings.config, yty)
    return _factor_rows(block.ids, x)


def partial_gram(batches, rank: int):
    """mapInArrow body: ``Y^T Y`` (float64) of each batch of ``(id, features)`` rows."""
    for batch in batches:
        flat = batch.column("features").flatten().to_numpy(zero_copy_only=False)
        y = np.asarray(flat, np.float64).reshape(-1, rank)
        yield pa.RecordBatch.from_pydict(
            {"gram": [(y.T @ y).tobytes()]}, schema=pa.schema([("gram", pa.binary())])
        )
