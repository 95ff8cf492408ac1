"""Executor side of the single-task ALS dataflow: the whole fit inside one Spark task.

For data that one executor holds easily, a Spark job per half-iteration (about 0.1-0.2 s each, more
than the math at a million ratings) dominates a fit. Here all validated ratings arrive in one task
through Arrow; the task builds the same user and item blocks as the distributed dataflows, starts
from the same factors and runs every iteration with the same per-block solves (blocks solved in
parallel threads), so it returns the same factors, one job instead of twenty.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Dict, Iterator, List

import numpy as np
import pyarrow as pa

from spark_gpu_mf.backends.numpy_backend import take_phase_seconds
from spark_gpu_mf.backends.residuals import squared_error
from spark_gpu_mf.executor.als_tasks import (
    SourceFactors,
    TaskSettings,
    gram_in_block_order,
    layout,
    solve_block,
)
from spark_gpu_mf.executor.alternation import (
    ITEMS,
    USERS,
    alternate,
    rmse,
    starting_factors,
    warm_started,
)
from spark_gpu_mf.executor.blocks import Block, build_blocks
from spark_gpu_mf.executor.runtime import limit_blas_threads

# One output row per factor block, plus one row per iteration (side = ITERATION, value = its
# seconds; side = TRAIN_RMSE, value = the training RMSE when asked) and status rows (side =
# STATUS) so the driver can raise Spark's errors itself.
SIDE_CODES = {USERS: 0, ITEMS: 1}
ITERATION, STATUS, TRAIN_RMSE = 2, 3, 4
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


class _InTask:
    """The single task's dataflow: both sides in this process, each block reading the other
    side's factor matrix in place, blocks solved by the pool's threads."""

    def __init__(
        self, pool, settings: TaskSettings, blocks, num_blocks, seeds, training_rmse, initial=None
    ):
        self.pool = pool
        self.settings = settings
        self.blocks = blocks
        self.num_blocks = num_blocks
        self.training_rmse = training_rmse
        rank = settings.config.rank
        initial = initial or {}
        self.factors = {
            side: {
                b: warm_started(blocks[side][b].ids, f, initial.get(side))
                for b, f in starting_factors(
                    {b: len(k.ids) for b, k in blocks[side].items()}, rank, seed
                ).items()
            }
            for side, seed in seeds.items()
        }
        # The layouts' row order is fixed by the blocks' ids, so each block's reads are mapped
        # once.
        self.readers = {
            side: _reading_all_sources(blocks[side], self._source(_other(side), gram=False))
            for side in blocks
        }

    def _source(self, side: str, gram: bool = True) -> SourceFactors:
        factors = self.factors[side]
        yty = gram_in_block_order(factors) if gram and self.settings.config.implicit else None
        ids = {b: k.ids for b, k in self.blocks[side].items()}
        return layout(ids, factors, self.num_blocks[side], yty)

    def solve(self, side: str, iteration: int) -> None:
        source = self._source(_other(side))
        readers = self.readers[side]
        previous = self.factors[side] if self.settings.config.warm_start else None

        def solve(b):
            warm = previous[b] if previous is not None else None
            reader = readers[b]
            return b, solve_block(
                reader, reader.indices, source.factors, warm, self.settings, source.yty
            )

        self.factors[side] = dict(self.pool.map(solve, sorted(readers)))

    def finish_iteration(self, iteration: int) -> Dict[str, float]:
        if not self.training_rmse:
            return {}
        source = self._source(ITEMS, gram=False).factors
        readers = self.readers[USERS]

        def block_error(b):  # the compiled pass releases the GIL: blocks run in the threads
            reader = readers[b]
            own = self.factors[USERS][b]
            return squared_error(reader.indptr, reader.indices, reader.ratings, own, source)

        # Summed in block order, so the RMSE does not depend on which thread finished first.
        sse = sum(self.pool.map(block_error, sorted(readers)))
        count = sum(len(reader.ratings) for reader in readers.values())
        return {"trainRmse": rmse(sse, count)}


def _other(side: str) -> str:
    return ITEMS if side == USERS else USERS


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
    training_rmse: bool = False,
    initial=None,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: every rating of the fit in, every factor block and timing out.

    ``threads`` threads solve the blocks, each with ``settings.blas_threads`` BLAS threads, set
    once for the task: threadpoolctl's limits are process-wide (per-block limits from parallel
    threads would race, and cost ~1 ms a call). ``initial``: ``{side: (ids, factors)}`` of a
    warm start (``alternation.warm_started``), or None.
    """
    with limit_blas_threads(settings.blas_threads):
        yield from _train(
            batches, replace(settings, blas_threads=0), num_user_blocks, num_item_blocks,
            user_seed, item_seed, max_iter, threads, max_factor_rows, training_rmse, initial,
        )  # fmt: skip


def _train(
    batches, settings, num_user_blocks, num_item_blocks, user_seed, item_seed, max_iter, threads,
    max_factor_rows, training_rmse, initial=None,
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
        dataflow = _InTask(
            pool,
            settings,
            blocks={USERS: user_blocks, ITEMS: item_blocks},
            num_blocks={USERS: num_user_blocks, ITEMS: num_item_blocks},
            seeds={USERS: user_seed, ITEMS: item_seed},
            training_rmse=training_rmse,
            initial=initial,
        )
        iterations = []
        take_phase_seconds()
        alternate(
            dataflow, max_iter, lambda i, seconds, metrics: iterations.append((i, seconds, metrics))
        )
    for iteration, seconds, metrics in iterations:
        yield _batch(ITERATION, iteration, None, None, seconds)
        if "trainRmse" in metrics:
            yield _batch(TRAIN_RMSE, iteration, None, None, metrics["trainRmse"])
    phases = take_phase_seconds()  # summed over the threads, like the distributed tasks' seconds
    yield _batch(STATUS, HERMITIAN, None, None, phases["hermitian"])
    yield _batch(STATUS, SOLVE, None, None, phases["solve"])
    for side, blocks in ((USERS, user_blocks), (ITEMS, item_blocks)):
        for b in sorted(blocks):
            factors = dataflow.factors[side][b]
            yield _batch(SIDE_CODES[side], b, blocks[b].ids.tobytes(), factors.tobytes(), 0.0)


def warm_up(settings: TaskSettings, training_rmse: bool = False) -> None:
    """Run the fit's compiled code once on three ratings, for its one-time costs only.

    The first call of each Numba function in a process loads it from the on-disk cache (or
    compiles it) and, before the first of them, imports and registers Numba's implementations:
    most of a fresh process's first small fit. A driver that is about to fit in its own process
    runs this on a thread while its Spark jobs (validation, count, collect) keep the JVM busy.
    The same settings take the same compiled paths (solver, precision, nonnegative, implicit).
    BLAS limits are left alone: they are process-wide, and the fit sets its own.
    """
    batch = pa.record_batch(
        {
            "user": pa.array([0, 1, 1], pa.int32()),
            "item": pa.array([0, 0, 1], pa.int32()),
            "rating": pa.array([1.0, 2.0, 3.0], pa.float32()),
        }
    )
    for _ in _train(
        iter([batch]), replace(settings, blas_threads=0), 1, 1, 1, 2, 1, 1, 1 << 30, training_rmse
    ):
        pass


def compile_kernels() -> None:
    """Load, or compile and cache on disk, every compiled loop an ALS fit can call.

    Numba compiles a loop the first time any process calls it after an install or a change
    of its source, and caches it for every later process (``backends.numba_cache``);
    ``scripts/setup.sh`` calls this so that no fit, the demo's included, pays for that.
    """
    from spark_gpu_mf.backends.solve_config import SolveConfig
    from spark_gpu_mf.executor.runtime import BackendChoice

    cg = SolveConfig(rank=2, reg_param=0.1, solver="cg", cg_iterations=2)
    for config in (
        cg,
        replace(cg, precision="fp16"),
        replace(cg, implicit=True),
        replace(cg, solver="cholesky"),
        replace(cg, solver="cholesky", implicit=True),
        replace(cg, nonnegative=True),
    ):
        settings = TaskSettings(config=config, backend=BackendChoice("numpy"), blas_threads=0)
        warm_up(settings, training_rmse=True)


def on_ipc_messages(messages: Iterator[bytes], body, schema: pa.Schema) -> Iterator:
    """RDD ``mapPartitions`` body: what ``body`` yields for the record batches that arrive as
    Arrow IPC messages (``Dataset.toArrowBatchRdd``)."""
    return body(pa.ipc.read_record_batch(pa.py_buffer(m), schema) for m in messages)


def run_on_ipc_messages(messages: Iterator[bytes], body, schema: pa.Schema) -> Iterator[dict]:
    """:func:`on_ipc_messages` of a mapInArrow ``body``, its output batches as dict rows."""
    for batch in on_ipc_messages(messages, body, schema):
        yield from batch.to_pylist()


def decode_result(rows: List[dict], rank: int):
    """Driver side: ``(status, [(iteration, seconds, metrics)], {side: (ids, factors)})`` from
    the task's rows."""
    status = {r["block"]: r["value"] for r in rows if r["side"] == STATUS}
    rmse_by_iteration = {r["block"]: r["value"] for r in rows if r["side"] == TRAIN_RMSE}
    iterations = [
        (r["block"], r["value"],
         {"trainRmse": rmse_by_iteration[r["block"]]} if r["block"] in rmse_by_iteration else {})
        for r in sorted((r for r in rows if r["side"] == ITERATION), key=lambda r: r["block"])
    ]  # fmt: skip
    sides = {}
    for side, code in SIDE_CODES.items():
        parts = sorted((r for r in rows if r["side"] == code), key=lambda r: r["block"])
        if parts:
            sides[side] = (
                np.concatenate([np.frombuffer(r["ids"], np.int32) for r in parts]),
                np.concatenate(
                    [np.frombuffer(r["factors"], np.float32).reshape(-1, rank) for r in parts]
                ),
            )
    return status, iterations, sides
