"""Executor side of the single-task ALS dataflow: the whole fit inside one Spark task.

For data that one executor holds easily, a Spark job per half-iteration (about 0.1-0.2 s each, more
than the math at a million ratings) dominates a fit. Here all validated ratings arrive in one task
through Arrow; the task builds the same user and item blocks as the distributed dataflows, starts
from the same factors and runs every iteration with the same per-block solves (blocks solved in
parallel threads), so it returns the same factors, one job instead of twenty.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Dict, Iterator, List

import numpy as np
import pyarrow as pa

from spark_gpu_mf.backends.numpy_backend import take_phase_seconds
from spark_gpu_mf.backends.spark_random import initial_factors
from spark_gpu_mf.executor.als_tasks import SourceFactors, TaskSettings, _solve, gram_in_block_order
from spark_gpu_mf.executor.blocks import Block, build_blocks
from spark_gpu_mf.executor.runtime import limit_blas_threads

# One output row per factor block, plus one row per iteration (side = ITERATION) and one status
# row (side = STATUS) so the driver can raise Spark's errors itself.
USERS, ITEMS, ITERATION, STATUS = 0, 1, 2, 3
# Status rows: block = what the value is. TOO_WIDE: the rows of the larger side, when its
# factors exceed what one task may hold (nothing else follows).
EMPTY, POSITIVES, HERMITIAN, SOLVE, TOO_WIDE = 0, 1, 2, 3, 4
SINGLE_TASK_SCHEMA = "side int, block int, ids binary, factors binary, value double"


def _blocks_of_both_sides(users, items, ratings, num_user_blocks, num_item_blocks, pool):
    """Both sides' blocks, exactly as ``build_block`` makes them for the distributed dataflows.

    One side per thread: the two sides cost about the same (0.4 s each for 8M ratings), and the
    compiled sorts that take most of it release the GIL.
    """

    def side(keys, others, num_blocks, num_other_blocks):
        rows = build_blocks(keys, others, ratings, num_blocks, num_other_blocks)
        return {row["block"]: Block.from_row(row) for row in rows}

    user_side = pool.submit(side, users, items, num_user_blocks, num_item_blocks)
    item_side = pool.submit(side, items, users, num_item_blocks, num_user_blocks)
    return user_side.result(), item_side.result()


def _layout(blocks: Dict[int, Block], num_blocks: int, factors: Dict[int, np.ndarray], yty):
    offsets = np.zeros(num_blocks + 1, np.int64)
    for b in range(num_blocks):
        offsets[b + 1] = offsets[b] + (len(blocks[b].ids) if b in blocks else 0)
    ids = np.concatenate([blocks[b].ids for b in sorted(blocks)])
    matrix = np.concatenate([factors[b] for b in sorted(blocks)])
    return SourceFactors(ids=ids, offsets=offsets, factors=matrix, yty=yty)


def _reading_all_sources(blocks: Dict[int, Block], source: SourceFactors) -> Dict[int, Block]:
    """The blocks with ``indices`` pointing straight into ``source.factors``.

    In one task every source factor is in one matrix whose row order never changes, so the
    blocks can read it in place: no per-block, per-half-iteration copy of the rows they need
    (18 MB per item block at 10M ratings) and no id lookup after the first.
    """
    everything = np.diff(source.offsets).astype(np.int32)
    remapped = {}
    for b, block in blocks.items():
        positions = source.positions(block.needed_ids, block.needed_counts)
        remapped[b] = replace(
            block,
            indices=positions[block.indices].astype(np.int32),
            needed_ids=source.ids,
            needed_counts=everything,
        )
    return remapped


def _solve_side(pool, blocks, source: SourceFactors, previous, settings: TaskSettings):
    """New factors of every block; ``blocks`` read ``source.factors`` in place."""

    def solve(b):
        warm = previous[b] if previous is not None else None
        return b, _solve(blocks[b], source.factors, warm, settings, source.yty)

    return dict(pool.map(solve, sorted(blocks)))


def _batch(side: int, block: int, ids: bytes | None, factors: bytes | None, value: float):
    return pa.RecordBatch.from_pylist(
        [{"side": side, "block": block, "ids": ids, "factors": factors, "value": value}],
        schema=pa.schema(
            [
                ("side", pa.int32()),
                ("block", pa.int32()),
                ("ids", pa.binary()),
                ("factors", pa.binary()),
                ("value", pa.float64()),
            ]
        ),
    )


def train_in_one_task(
    batches: Iterator[pa.RecordBatch],
    settings: TaskSettings,
    num_user_blocks: int,
    num_item_blocks: int,
    user_seed: int,
    item_seed: int,
    max_iter: int,
    threads: int,
    max_factor_rows: int,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: every rating of the fit in, every factor block and timing out.

    ``threads`` threads solve the blocks, each with ``settings.blas_threads`` BLAS threads, set
    once for the task: threadpoolctl's limits are process-wide (per-block limits from parallel
    threads would race), and setting them for each block's solve made a 1M-rating fit 1.29 s
    instead of 0.98 s (iterations 0.77 s instead of 0.55 s, the solves themselves unchanged).
    """
    with limit_blas_threads(settings.blas_threads):
        yield from _train(
            batches, replace(settings, blas_threads=0), num_user_blocks, num_item_blocks,
            user_seed, item_seed, max_iter, threads, max_factor_rows,
        )  # fmt: skip


def _train(
    batches, settings, num_user_blocks, num_item_blocks, user_seed, item_seed, max_iter, threads,
    max_factor_rows,
):  # fmt: skip
    parts = list(batches)
    if not parts or sum(len(p) for p in parts) == 0:
        yield _batch(STATUS, EMPTY, None, None, 0.0)
        return
    table = pa.Table.from_batches(parts)
    users = table.column("user").to_numpy().astype(np.int32)
    items = table.column("item").to_numpy().astype(np.int32)
    ratings = table.column("rating").to_numpy().astype(np.float32)
    positives = int(np.count_nonzero(ratings > 0))
    yield _batch(STATUS, POSITIVES, None, None, float(positives))
    if settings.config.implicit and positives == 0:
        return
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        user_blocks, item_blocks = _blocks_of_both_sides(
            users, items, ratings, num_user_blocks, num_item_blocks, pool
        )
        del users, items, ratings, table, parts
        widest = max(sum(len(k.ids) for k in side.values()) for side in (user_blocks, item_blocks))
        if widest > max_factor_rows:
            yield _batch(STATUS, TOO_WIDE, None, None, float(widest))
            return
        rank = settings.config.rank
        user_factors = {
            b: initial_factors(len(k.ids), rank, user_seed, b) for b, k in user_blocks.items()
        }
        item_factors = {
            b: initial_factors(len(k.ids), rank, item_seed, b) for b, k in item_blocks.items()
        }
        warm = settings.config.solver == "cg" and not settings.config.nonnegative
        implicit = settings.config.implicit
        # The layouts' row order is fixed by the blocks' ids, so each block's reads are mapped once.
        item_readers = _reading_all_sources(
            item_blocks, _layout(user_blocks, num_user_blocks, user_factors, None)
        )
        user_readers = _reading_all_sources(
            user_blocks, _layout(item_blocks, num_item_blocks, item_factors, None)
        )
        take_phase_seconds()
        for iteration in range(1, max_iter + 1):
            started = time.perf_counter()
            user_yty = gram_in_block_order(user_factors) if implicit else None
            source = _layout(user_blocks, num_user_blocks, user_factors, user_yty)
            item_factors = _solve_side(
                pool, item_readers, source, item_factors if warm else None, settings
            )
            item_yty = gram_in_block_order(item_factors) if implicit else None
            source = _layout(item_blocks, num_item_blocks, item_factors, item_yty)
            user_factors = _solve_side(
                pool, user_readers, source, user_factors if warm else None, settings
            )
            yield _batch(ITERATION, iteration, None, None, time.perf_counter() - started)
    phases = take_phase_seconds()  # summed over the threads, like the distributed tasks' seconds
    yield _batch(STATUS, HERMITIAN, None, None, phases["hermitian"])
    yield _batch(STATUS, SOLVE, None, None, phases["solve"])
    for side, blocks, factors in (
        (USERS, user_blocks, user_factors),
        (ITEMS, item_blocks, item_factors),
    ):
        for b in sorted(blocks):
            yield _batch(side, b, blocks[b].ids.tobytes(), factors[b].tobytes(), 0.0)


def run_on_ipc_messages(messages: Iterator[bytes], body, schema: pa.Schema) -> Iterator[dict]:
    """RDD ``mapPartitions`` body: ``body`` (a mapInArrow body) over record batches that
    arrive as Arrow IPC messages (``Dataset.toArrowBatchRdd``), its output as dict rows."""
    batches = (pa.ipc.read_record_batch(pa.py_buffer(m), schema) for m in messages)
    for batch in body(batches):
        yield from batch.to_pylist()


def decode_result(rows: List[dict], rank: int):
    """Driver side: ``(status, iteration seconds, {side: (ids, factors)})`` from the task's rows."""
    status = {r["block"]: r["value"] for r in rows if r["side"] == STATUS}
    seconds = [
        r["value"]
        for r in sorted((r for r in rows if r["side"] == ITERATION), key=lambda r: r["block"])
    ]
    sides = {}
    for side in (USERS, ITEMS):
        parts = sorted((r for r in rows if r["side"] == side), key=lambda r: r["block"])
        if parts:
            sides[side] = (
                np.concatenate([np.frombuffer(r["ids"], np.int32) for r in parts]),
                np.concatenate(
                    [np.frombuffer(r["factors"], np.float32).reshape(-1, rank) for r in parts]
                ),
            )
    return status, seconds, sides
