"""Executor functions of one ALS half-iteration, in both of its dataflows.

*Broadcast* dataflow (the fixed side's factors fit under ``spark.gpumf.broadcastThreshold``): each
task reads the whole fixed-side factor matrix from a broadcast variable, gathers the rows each of
its blocks needs, solves, and returns the new factor blocks to the driver.

*Message* dataflow (large factor matrices): each solved block emits, for every block of the other
side, only the factor rows that block needs (Spark's OutBlock); one shuffle delivers them to the
other side's blocks for the next half-iteration. A block's "outbox" rows are:

* ``kind = FACTORS``: ``payload`` = float32 rows of block ``src`` needed by block ``dst``;
* ``kind = GRAM``: ``payload`` = float64 ``Y^T Y`` of block ``src`` (implicit feedback only),
  sent to every block ``dst`` of the other side, which sums them;
* ``kind = OWN``: ``payload`` = all factors of block ``src``, ``ids`` its ids (``dst == src``);
  used to warm-start the CG solver and to write the model.

Everything here is a module-level function of plain values, so it pickles small and can be tested
without Spark.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from spark_gpu_mf.backends.numpy_backend import SolveConfig, take_phase_seconds
from spark_gpu_mf.backends.spark_random import initial_factors
from spark_gpu_mf.errors import InconsistentBlocksError
from spark_gpu_mf.executor.blocks import Block, from_bytes, to_bytes
from spark_gpu_mf.executor.runtime import BackendChoice, executor_backend, limit_blas_threads

if TYPE_CHECKING:
    # Imported by the functions that build DataFrames (the distributed dataflows'): a fresh
    # Python worker of the single-task dataflow, which builds none, starts 0.3 s sooner.
    import pandas as pd

FACTORS, GRAM, OWN = 0, 1, 2

OUTBOX_SCHEMA = "pkey int, dst int, src int, kind int, ids binary, payload binary"
OUTBOX_COLUMNS = ["pkey", "dst", "src", "kind", "ids", "payload"]
SOLVED_SCHEMA = (
    "block int, factors binary, gram binary, seconds double, hermitian double, solve double"
)
SOLVED_COLUMNS = ["block", "factors", "gram", "seconds", "hermitian", "solve"]


@dataclass(frozen=True)
class TaskSettings:
    """Plain values every half-iteration task needs."""

    config: SolveConfig
    backend: BackendChoice
    blas_threads: int
    fail_first_attempt: bool = False


@dataclass(frozen=True)
class SourceFactors:
    """The fixed side of a broadcast half-iteration: all its factors, block after block.

    ``factors[offsets[b]:offsets[b+1]]`` are the rows of block ``b`` in the order of
    ``ids[offsets[b]:offsets[b+1]]`` (sorted ids).
    """

    ids: np.ndarray
    offsets: np.ndarray
    factors: np.ndarray
    yty: np.ndarray | None

    def gather(self, needed_ids: np.ndarray, needed_counts: np.ndarray) -> np.ndarray:
        """Rows of ``needed_ids`` (grouped by source block as ``needed_counts`` says)."""
        return self.factors[self.positions(needed_ids, needed_counts)]

    def positions(self, needed_ids: np.ndarray, needed_counts: np.ndarray) -> np.ndarray:
        """Row numbers in ``factors`` of ``needed_ids``; raises if any is missing."""
        positions = np.empty(len(needed_ids), np.int64)
        start = 0
        for block in np.flatnonzero(needed_counts):
            stop = start + int(needed_counts[block])
            lo, hi = self.offsets[block], self.offsets[block + 1]
            found = np.searchsorted(self.ids[lo:hi], needed_ids[start:stop]) + lo
            if found.size and (
                found[-1] >= hi or np.any(self.ids[found] != needed_ids[start:stop])
            ):
                raise InconsistentBlocksError()
            positions[start:stop] = found
            start = stop
        return positions


def _fail_first_attempt() -> None:
    """Fail partition 0's first attempt (``spark.gpumf.test.failFirstAttempt``)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    if context is not None and context.attemptNumber() == 0 and context.partitionId() == 0:
        raise RuntimeError("spark_gpu_mf: failure injected by spark.gpumf.test.failFirstAttempt")


def _solve(block: Block, src: np.ndarray, previous, settings: TaskSettings, yty) -> np.ndarray:
    if settings.fail_first_attempt:
        _fail_first_attempt()
    if len(src) != len(block.needed_ids):
        raise InconsistentBlocksError()
    backend = executor_backend(settings.backend)
    with limit_blas_threads(settings.blas_threads):
        return backend.update_block(
            block.indptr, block.indices, block.ratings, src, previous, settings.config, yty
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


def _gram_bytes(factors: np.ndarray) -> bytes:
    return to_bytes(block_gram(factors))


def solve_with_broadcast(
    batches: Iterator[pd.DataFrame], source, previous, settings: TaskSettings
) -> Iterator[pd.DataFrame]:
    """mapInPandas body of a broadcast half-iteration: solve every block of the partition.

    ``source`` and ``previous`` are broadcast variables of ``SourceFactors`` (``previous`` holds
    this side's factors for the CG warm start, or is None).
    """
    import pandas as pd

    src: SourceFactors = source.value
    prev: SourceFactors | None = previous.value if previous is not None else None
    for pdf in batches:
        rows = []
        for record in pdf.to_dict("records"):
            started = time.perf_counter()
            block = Block.from_row(record)
            warm = None
            if prev is not None:
                lo, hi = prev.offsets[block.block], prev.offsets[block.block + 1]
                warm = prev.factors[lo:hi]
            take_phase_seconds()
            x = _solve(
                block, src.gather(block.needed_ids, block.needed_counts), warm, settings, src.yty
            )
            # Executor seconds by phase, for the benchmark's breakdown (zero on the GPU backend).
            phases = take_phase_seconds()
            rows.append(
                {
                    "block": block.block,
                    "factors": to_bytes(x),
                    "gram": _gram_bytes(x) if settings.config.implicit else None,
                    "seconds": time.perf_counter() - started,
                    "hermitian": phases["hermitian"],
                    "solve": phases["solve"],
                }
            )
        yield pd.DataFrame(rows, columns=SOLVED_COLUMNS)


def initial_block_factors(
    batches: Iterator[pd.DataFrame], rank: int, side_seed: int
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: Spark's starting factors of every block (broadcast dataflow)."""
    import pandas as pd

    for pdf in batches:
        rows = [
            {
                "block": int(record["block"]),
                "factors": to_bytes(
                    initial_factors(int(record["num_rows"]), rank, side_seed, int(record["block"]))
                ),
                "gram": None,
                "seconds": 0.0,
                "hermitian": 0.0,
                "solve": 0.0,
            }
            for record in pdf.to_dict("records")
        ]
        yield pd.DataFrame(rows, columns=SOLVED_COLUMNS)


def _outbox_rows(
    block: Block,
    factors: np.ndarray,
    own_key: int,
    other_keys: Sequence[int],
    other_blocks: Sequence[int],
    implicit: bool,
) -> list[dict]:
    """Messages of one solved block to the other side, plus its own factors."""
    rows = []
    num_other_partitions = len(other_keys)
    for other in range(len(block.out_offsets) - 1):
        needed = block.rows_needed_by(other)
        if len(needed):
            rows.append(
                {
                    "pkey": other_keys[other % num_other_partitions],
                    "dst": other,
                    "src": block.block,
                    "kind": FACTORS,
                    "ids": None,
                    "payload": to_bytes(factors[needed]),
                }
            )
    if implicit:
        gram = _gram_bytes(factors)
        for other in other_blocks:
            rows.append(
                {
                    "pkey": other_keys[other % num_other_partitions],
                    "dst": other,
                    "src": block.block,
                    "kind": GRAM,
                    "ids": None,
                    "payload": gram,
                }
            )
    rows.append(
        {
            "pkey": own_key,
            "dst": block.block,
            "src": block.block,
            "kind": OWN,
            "ids": to_bytes(block.ids),
            "payload": to_bytes(factors),
        }
    )
    return rows


def initial_outbox(
    batches: Iterator[pd.DataFrame],
    rank: int,
    side_seed: int,
    other_keys: Sequence[int],
    other_blocks: Sequence[int],
    implicit: bool,
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: starting factors of every block, sent as messages (message dataflow)."""
    import pandas as pd

    for pdf in batches:
        rows = []
        for record in pdf.to_dict("records"):
            block = Block.from_row(record)
            factors = initial_factors(len(block.ids), rank, side_seed, block.block)
            rows += _outbox_rows(
                block, factors, int(record["pkey"]), other_keys, other_blocks, implicit
            )
        yield pd.DataFrame(rows, columns=OUTBOX_COLUMNS)


def _assemble(block: Block, messages: pd.DataFrame, num_gram_parts: int, rank: int):
    """Source rows (in ``needed_ids`` order) and the summed Gram matrix for one block."""
    chunks = messages[messages["kind"] == FACTORS].sort_values("src")
    expected = np.flatnonzero(block.needed_counts)
    if not np.array_equal(chunks["src"].to_numpy(), expected):
        raise InconsistentBlocksError()
    parts = [from_bytes(p, np.float32).reshape(-1, rank) for p in chunks["payload"]]
    if any(len(p) != block.needed_counts[s] for p, s in zip(parts, expected)):
        raise InconsistentBlocksError()
    src = np.concatenate(parts) if parts else np.zeros((0, rank), np.float32)
    grams = messages[messages["kind"] == GRAM]
    yty = None
    if num_gram_parts:
        if len(grams) != num_gram_parts:
            raise InconsistentBlocksError()
        yty = sum_in_block_order(
            {
                int(src): from_bytes(g, np.float64).reshape(rank, rank)
                for src, g in zip(grams["src"], grams["payload"])
            }
        )
    return src, yty


def solve_from_messages(
    messages: pd.DataFrame,
    blocks: pd.DataFrame,
    settings: TaskSettings,
    other_keys: Sequence[int],
    other_blocks: Sequence[int],
    num_gram_parts: int,
) -> pd.DataFrame:
    """cogroup body of a message half-iteration for one partition key.

    ``messages`` holds the rows sent to this partition's blocks (and their own previous factors
    when CG warm-starts); ``blocks`` the partition's cached block rows.
    """
    import pandas as pd

    rank = settings.config.rank
    rows = []
    for record in blocks.to_dict("records"):
        block = Block.from_row(record)
        mine = messages[messages["dst"] == block.block]
        src, yty = _assemble(block, mine, num_gram_parts, rank)
        own = mine[mine["kind"] == OWN]["payload"]
        previous = from_bytes(own.iloc[0], np.float32).reshape(-1, rank) if len(own) else None
        factors = _solve(block, src, previous, settings, yty)
        rows += _outbox_rows(
            block, factors, int(record["pkey"]), other_keys, other_blocks, settings.config.implicit
        )
    return pd.DataFrame(rows, columns=OUTBOX_COLUMNS)


def explode_outbox(batches: Iterator[pd.DataFrame], rank: int) -> Iterator[pd.DataFrame]:
    """mapInPandas body: ``OWN`` outbox rows to ``(id, features)`` rows of the model."""
    for pdf in batches:
        own = pdf[pdf["kind"] == OWN]
        for ids, payload in zip(own["ids"], own["payload"]):
            yield _factor_rows(from_bytes(ids, np.int32), from_bytes(payload, np.float32), rank)


def _factor_rows(ids: np.ndarray, flat: np.ndarray, rank: int) -> pd.DataFrame:
    import pandas as pd

    matrix = np.asarray(flat, np.float32).reshape(-1, rank)
    return pd.DataFrame({"id": ids, "features": list(matrix)})


def squared_error(
    batches: Iterator[pd.DataFrame], source, own, rank: int
) -> Iterator[pd.DataFrame]:
    """mapInPandas body: sum of squared training errors of each block (broadcast dataflow)."""
    import pandas as pd

    src: SourceFactors = source.value
    mine: SourceFactors = own.value
    for pdf in batches:
        total, count = 0.0, 0
        for record in pdf.to_dict("records"):
            block = Block.from_row(record)
            y = src.gather(block.needed_ids, block.needed_counts)
            lo = mine.offsets[block.block]
            x = mine.factors[lo : mine.offsets[block.block + 1]]
            rows = np.repeat(np.arange(len(block.ids)), np.diff(block.indptr))
            predicted = np.einsum("ij,ij->i", x[rows], y[block.indices], dtype=np.float64)
            total += float(np.sum((block.ratings - predicted) ** 2))
            count += len(block.ratings)
        yield pd.DataFrame({"sse": [total], "count": [count]})
