"""Executor functions of a distributed ALS half-iteration: solve blocks, send their factors on.

A half-iteration is one Arrow cogroup per partition of the destination side: the partition's
cached blocks with its *inbox*, the messages the other side's last solve sent it. Each solved
block writes its *outbox* rows, which Spark's shuffle delivers to the other side's partitions for
the next half-iteration. A message row is ``(pkey, dst, src, kind, ids, payload)``:

* ``FACTORS``: float32 factor rows of block ``src`` with their ids, once per destination
  partition (``dst = -1``): the rows that any block of that partition needs (Spark's OutBlock,
  merged over the partition's blocks, so a row several of them need travels once), or, with
  ``Route.whole_blocks``, all of them: the broadcast dataflow, which every partition reads whole.
* ``GRAM``: float64 ``Y^T Y`` of block ``src`` (implicit feedback), once per partition.
* ``OWN``: all factors of block ``src`` (``ids`` its ids), kept by its own partition: the CG warm
  start and, at the end, the model.
* ``STATS``: float64 ``[seconds, hermitian, solve, squared error, ratings]`` of block ``src``, read
  by the driver (one small collect per iteration) for progress lines and the training RMSE.

Blocks decoded once stay in the Python worker (``_BLOCKS``), keyed by the fit and block, with
their rows in the partition's source matrix: Spark reuses Python workers, so later
half-iterations skip the work; a task on another worker, or a retry, rebuilds them from the
cached rows it was given.
Everything here is a module-level function of plain values: it pickles small and is tested
without Spark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa

from spark_gpu_mf.backends.numpy_backend import take_phase_seconds
from spark_gpu_mf.backends.residuals import squared_error
from spark_gpu_mf.backends.solve_config import SolveConfig
from spark_gpu_mf.errors import InconsistentBlocksError
from spark_gpu_mf.executor.alternation import starting_factors, with_known_rows
from spark_gpu_mf.executor.blocks import Block, factor_table, from_bytes, known_of_row, to_bytes
from spark_gpu_mf.executor.runtime import BackendChoice, executor_backend, limit_blas_threads

FACTORS, GRAM, OWN, STATS = 0, 1, 2, 3
EVERY_BLOCK = -1  # ``dst`` of a message that every block of the partition reads

OUTBOX_SCHEMA = "pkey int, dst int, src int, kind int, ids binary, payload binary"
_OUTBOX_ARROW = pa.schema(
    [
        ("pkey", pa.int32()),
        ("dst", pa.int32()),
        ("src", pa.int32()),
        ("kind", pa.int32()),
        ("ids", pa.binary()),
        ("payload", pa.binary()),
    ]
)
STATS_FIELDS = ("seconds", "hermitian", "solve", "sse", "ratings")


@dataclass(frozen=True)
class TaskSettings:
    """Plain values every half-iteration task needs."""

    config: SolveConfig
    backend: BackendChoice
    blas_threads: int
    fail_first_attempt: bool = False


@dataclass(frozen=True)
class Route:
    """Where a side's solved blocks send their factors: the other side's partitions.

    ``other_keys[p]`` is the partition key of the other side's partition ``p``; its block ``o``
    lives in partition ``o mod len(other_keys)``. ``whole_blocks``: every partition gets every
    row, else only the rows its blocks need.
    """

    other_keys: Tuple[int, ...]
    whole_blocks: bool

    def key_of(self, other_block: int) -> int:
        return self.other_keys[other_block % len(self.other_keys)]

    def rows_by_key(self, block: Block) -> Dict[int, Optional[np.ndarray]]:
        """``{partition key: the sorted local rows of block sent there}``, None for all rows.

        A partition holds ``numBlocks / partitions`` blocks of the other side, and a row that
        several of them need is sent to it once: with Spark's 10 blocks on 2 cores, the users'
        factors cross the shuffle once per item partition instead of about five times.
        """
        if self.whole_blocks:
            return {key: None for key in self.other_keys}
        needed: Dict[int, np.ndarray] = {}
        for other in range(len(block.out_offsets) - 1):
            rows = block.rows_needed_by(other)
            if len(rows):
                mask = needed.setdefault(self.key_of(other), np.zeros(len(block.ids), bool))
                mask[rows] = True
        return {key: None if mask.all() else np.flatnonzero(mask) for key, mask in needed.items()}


@dataclass(frozen=True)
class SourceFactors:
    """All factors of one side, block after block.

    ``factors[offsets[b]:offsets[b+1]]`` are the rows of block ``b`` in the order of
    ``ids[offsets[b]:offsets[b+1]]`` (sorted ids).
    """

    ids: np.ndarray
    offsets: np.ndarray
    factors: np.ndarray
    yty: np.ndarray | None

    def positions(self, needed_ids: np.ndarray, needed_counts: np.ndarray) -> np.ndarray:
        """Row numbers in ``factors`` of ``needed_ids``; raises if any is missing."""
        positions = np.empty(len(needed_ids), np.int64)
        start = 0
        for block in np.flatnonzero(needed_counts):
            stop = start + int(needed_counts[block])
            if block + 1 >= len(self.offsets):
                raise InconsistentBlocksError()
            lo, hi = self.offsets[block], self.offsets[block + 1]
            found = np.searchsorted(self.ids[lo:hi], needed_ids[start:stop]) + lo
            if found.size and (
                found[-1] >= hi or np.any(self.ids[found] != needed_ids[start:stop])
            ):
                raise InconsistentBlocksError()
            positions[start:stop] = found
            start = stop
        return positions


def layout(ids_by_block, factors_by_block, num_blocks: int, yty=None) -> SourceFactors:
    """A side's blocks laid out in block order (absent blocks take no rows)."""
    offsets = np.zeros(num_blocks + 1, np.int64)
    for b in range(num_blocks):
        offsets[b + 1] = offsets[b] + (len(ids_by_block[b]) if b in ids_by_block else 0)
    order = sorted(ids_by_block)
    rank = next(iter(factors_by_block.values())).shape[1] if factors_by_block else 0
    ids = np.concatenate([ids_by_block[b] for b in order]) if order else np.zeros(0, np.int32)
    matrix = (
        np.concatenate([factors_by_block[b] for b in order])
        if order
        else np.zeros((0, rank), np.float32)
    )
    return SourceFactors(ids=ids, offsets=offsets, factors=matrix, yty=yty)


def _fail_first_attempt() -> None:
    """Fail partition 0's first attempt (``spark.gpumf.test.failFirstAttempt``)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is not None and context.attemptNumber() == 0 and context.partitionId() == 0:
        raise RuntimeError("spark_gpu_mf: failure injected by spark.gpumf.test.failFirstAttempt")


def solve_block(
    block: Block, indices, src: np.ndarray, previous, settings: TaskSettings, yty
) -> np.ndarray:
    """New factors of one block; ``indices`` (the block's, or remapped) point into ``src``."""
    if settings.fail_first_attempt:
        _fail_first_attempt()
    backend = executor_backend(settings.backend)
    with limit_blas_threads(settings.blas_threads):
        return backend.update_block(
            block.indptr, indices, block.ratings, src, previous, settings.config, yty
        )


def block_gram(factors: np.ndarray) -> np.ndarray:
    """``X^T X`` of one block's float32 factors, in float64."""
    y = factors.astype(np.float64)
    return y.T @ y


def sum_in_block_order(grams_by_block) -> np.ndarray:
    """``Y^T Y`` as the sum of the blocks' Gram matrices in block-id order.

    Every dataflow sums in this one order, so implicit-feedback fits are bit-identical whichever
    dataflow ran and in whatever order Spark delivered the blocks.
    """
    blocks = sorted(grams_by_block)
    total = grams_by_block[blocks[0]].copy()
    for block in blocks[1:]:
        total += grams_by_block[block]
    return total


def gram_in_block_order(factors_by_block) -> np.ndarray:
    """``Y^T Y`` of a side's factor blocks, summed in block-id order."""
    return sum_in_block_order({b: block_gram(f) for b, f in factors_by_block.items()})


# ---------------------------------------------------------------- worker-side block cache
# {(fit, side, block): [Block, (source offsets, indices into that source) or None]}; one fit at
# a time.
_BLOCKS: Dict[tuple, list] = {}


def _decoded(fit: str, side: str, blocks, index: int) -> list:
    """Row ``index`` of ``blocks`` decoded, from this worker's cache when it has it (the row's
    bytes are then never copied out of Arrow)."""
    block_id = blocks.column("block")[index].as_py()
    nnz = blocks.column("nnz")[index].as_py()
    key = (fit, side, block_id)
    entry = _BLOCKS.get(key)
    if entry is None or len(entry[0].ratings) != nnz:
        if any(k[0] != fit for k in _BLOCKS):
            _BLOCKS.clear()  # a new fit: the last one's blocks are never read again
        entry = _BLOCKS[key] = [Block.from_row(blocks.slice(index, 1).to_pylist()[0]), None]
    return entry


def _remapped_indices(entry: list, source: SourceFactors) -> np.ndarray:
    """The block's ``indices`` as rows of its partition's source matrix, found once per worker.

    The partition's source rows are the same every half-iteration (a function of the blocks),
    so the lookup is reused while the source's layout is the one it was made for.
    """
    block = entry[0]
    if entry[1] is None or not np.array_equal(entry[1][0], source.offsets):
        positions = source.positions(block.needed_ids, block.needed_counts)
        entry[1] = (source.offsets, positions[block.indices].astype(np.int32))
    return entry[1][1]


# ---------------------------------------------------------------- outbox rows
class _Outbox:
    def __init__(self):
        self.columns: Dict[str, List] = {name: [] for name in _OUTBOX_ARROW.names}

    def add(self, pkey, dst, src, kind, ids, payload) -> None:
        for name, value in zip(_OUTBOX_ARROW.names, (pkey, dst, src, kind, ids, payload)):
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=_OUTBOX_ARROW)


def _send(
    out: _Outbox, block: Block, factors: np.ndarray, own_key: int, route: Route, implicit: bool
) -> None:
    """A solved block's messages to the other side, and its own factors."""
    whole = None
    for key, rows in route.rows_by_key(block).items():
        if rows is None:
            whole = whole or (to_bytes(block.ids), to_bytes(factors))
            out.add(key, EVERY_BLOCK, block.block, FACTORS, *whole)
        else:
            out.add(key, EVERY_BLOCK, block.block, FACTORS,
                    to_bytes(block.ids[rows]), to_bytes(factors[rows]))  # fmt: skip
    if implicit:
        gram = to_bytes(block_gram(factors))
        for key in route.other_keys:
            out.add(key, EVERY_BLOCK, block.block, GRAM, None, gram)
    out.add(own_key, block.block, block.block, OWN, to_bytes(block.ids), to_bytes(factors))


def initial_outbox(
    batches: Iterator[pa.RecordBatch],
    rank: int,
    side_seed: int,
    route: Route,
    implicit: bool,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: the starting factors of every block (rows of ``STARTING_COLUMNS``),
    sent like a solve's: Spark's, with the rows a warm start's model knows taken from it."""
    for batch in batches:
        out = _Outbox()
        for row in batch.to_pylist():
            block = Block.for_sending(row)
            factors = starting_factors({block.block: len(block.ids)}, rank, side_seed)
            factors = with_known_rows(factors[block.block], *known_of_row(row, rank))
            _send(out, block, factors, int(row["pkey"]), route, implicit)
        yield from out.table().to_batches()


def _views(column) -> list:
    """A binary column's values as zero-copy Arrow buffers (None for nulls)."""
    return [value.as_buffer() if value.is_valid else None for value in column]


def _aligned(array: np.ndarray) -> np.ndarray:
    """``array``, copied only when its Arrow buffer is not aligned for its dtype (Arrow packs
    binary values back to back)."""
    return array if array.flags.aligned else array.copy()


class _Inbox:
    """A partition's messages, indexed for its blocks."""

    def __init__(self, messages: pa.Table, rank: int):
        self.rank = rank
        kinds = messages.column("kind").to_numpy()
        dsts = messages.column("dst").to_numpy()
        srcs = messages.column("src").to_numpy()
        # Views into the Arrow buffers: the inbox's payloads are most of a task's memory.
        ids = _views(messages.column("ids"))
        payloads = _views(messages.column("payload"))
        self.sources: Dict[int, tuple] = {}
        self.grams: Dict[int, bytes] = {}
        self.own: Dict[int, bytes] = {}
        for kind, dst, src, i, payload in zip(kinds, dsts, srcs, ids, payloads):
            if kind == FACTORS:
                self.sources[int(src)] = (i, payload)
            elif kind == GRAM:
                self.grams[int(src)] = payload
            elif kind == OWN:
                self.own[int(dst)] = payload

    def matrix(self, payload) -> np.ndarray:
        return _aligned(from_bytes(payload, np.float32)).reshape(-1, self.rank)

    def yty(self, num_gram_parts: int) -> Optional[np.ndarray]:
        if not num_gram_parts:
            return None
        if len(self.grams) != num_gram_parts:
            raise InconsistentBlocksError()
        return sum_in_block_order(
            {
                src: _aligned(from_bytes(g, np.float64)).reshape(self.rank, self.rank)
                for src, g in self.grams.items()
            }
        )

    def source(self, num_blocks: int, yty) -> SourceFactors:
        """Every source row the partition received, in one matrix in block order."""
        ids = {b: _aligned(from_bytes(i, np.int32)) for b, (i, _) in self.sources.items()}
        factors = {b: self.matrix(p) for b, (_, p) in self.sources.items()}
        return layout(ids, factors, num_blocks, yty)

    def previous(self, block: Block) -> Optional[np.ndarray]:
        payload = self.own.get(block.block)
        return None if payload is None else self.matrix(payload)


def solve_inbox(
    messages: pa.Table,
    blocks: pa.Table,
    settings: TaskSettings,
    route: Route,
    fit: str,
    side: str,
    num_source_blocks: int,
    num_gram_parts: int,
    training_error: bool,
) -> pa.Table:
    """Arrow cogroup body of a half-iteration for one partition key.

    ``messages`` is the partition's inbox (the other side's factors, and this side's previous
    factors when CG warm-starts); ``blocks`` its cached block rows. Returns the outbox of the
    solved blocks, with a ``STATS`` row per block (``training_error``: the squared error of its
    ratings under the new factors, for the training RMSE).
    """
    out = _Outbox()
    if blocks.num_rows == 0:
        return out.table()
    rank = settings.config.rank
    inbox = _Inbox(messages, rank)
    source = inbox.source(num_source_blocks, inbox.yty(num_gram_parts))
    src = source.factors
    pkeys = blocks.column("pkey").to_pylist()
    for index, own_key in enumerate(pkeys):
        started = time.perf_counter()
        entry = _decoded(fit, side, blocks, index)
        block = entry[0]
        indices = _remapped_indices(entry, source)
        take_phase_seconds()
        previous = inbox.previous(block) if settings.config.warm_start else None
        factors = solve_block(block, indices, src, previous, settings, source.yty)
        phases = take_phase_seconds()
        sse = (
            squared_error(block.indptr, indices, block.ratings, factors, src)
            if training_error
            else 0.0
        )
        _send(out, block, factors, own_key, route, settings.config.implicit)
        stats = [time.perf_counter() - started, phases["hermitian"], phases["solve"], sse,
                 float(len(block.ratings))]  # fmt: skip
        out.add(own_key, block.block, block.block, STATS, None, to_bytes(np.array(stats)))
    return out.table()


SOLVED_SCHEMA = "block int, factors binary, gram binary, stats binary"
_SOLVED_ARROW = pa.schema(
    [("block", pa.int32()), ("factors", pa.binary()), ("gram", pa.binary()), ("stats", pa.binary())]
)


def solve_with_broadcast(
    batches: Iterator[pa.RecordBatch],
    source,
    previous,
    settings: TaskSettings,
    fit: str,
    side: str,
    training_error: bool,
) -> Iterator[pa.RecordBatch]:
    """mapInArrow body of a half-iteration whose source factors come in a broadcast variable
    (classic sessions): solve every block of the partition against the whole source matrix.

    ``source``/``previous`` hold ``SourceFactors`` (``previous``: this side's own factors for the
    warm start, or None). Returns the new factors, their Gram matrix (implicit) and STATS.
    """
    src: SourceFactors = source.value
    prev: SourceFactors | None = previous.value if previous is not None else None
    for batch in batches:
        columns: Dict[str, List] = {name: [] for name in _SOLVED_ARROW.names}
        for index in range(batch.num_rows):
            started = time.perf_counter()
            entry = _decoded(fit, side, batch, index)
            block = entry[0]
            indices = _remapped_indices(entry, src)
            warm = None
            if prev is not None:
                warm = prev.factors[prev.offsets[block.block] : prev.offsets[block.block + 1]]
            take_phase_seconds()
            factors = solve_block(block, indices, src.factors, warm, settings, src.yty)
            phases = take_phase_seconds()
            sse = (
                squared_error(block.indptr, indices, block.ratings, factors, src.factors)
                if training_error
                else 0.0
            )
            stats = [time.perf_counter() - started, phases["hermitian"], phases["solve"], sse,
                     float(len(block.ratings))]  # fmt: skip
            columns["block"].append(block.block)
            columns["factors"].append(to_bytes(factors))
            columns["gram"].append(
                to_bytes(block_gram(factors)) if settings.config.implicit else None
            )
            columns["stats"].append(to_bytes(np.array(stats)))
        yield pa.RecordBatch.from_pydict(columns, schema=_SOLVED_ARROW)


def read_stats(rows, block="src", payload="payload") -> Dict[int, Dict[str, float]]:
    """Driver side: ``{block: {seconds, hermitian, solve, sse, ratings}}`` from STATS rows."""
    return {
        int(r[block]): dict(zip(STATS_FIELDS, from_bytes(r[payload], np.float64).tolist()))
        for r in rows
    }


def explode_outbox(batches: Iterator[pa.RecordBatch], rank: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: ``OWN`` outbox rows to the model's ``(id, features)`` rows."""
    for batch in batches:
        kinds = batch.column("kind").to_numpy()
        ids = batch.column("ids").to_pylist()
        payloads = batch.column("payload").to_pylist()
        for kind, i, payload in zip(kinds, ids, payloads):
            if kind == OWN:
                yield from factor_table(
                    from_bytes(i, np.int32), from_bytes(payload, np.float32).reshape(-1, rank)
                ).to_batches()


def block_squared_errors(stats: Dict[int, Dict[str, float]]) -> Tuple[float, int]:
    """Total squared error and rating count over the blocks' STATS."""
    return (
        float(sum(s["sse"] for s in stats.values())),
        int(sum(s["ratings"] for s in stats.values())),
    )
