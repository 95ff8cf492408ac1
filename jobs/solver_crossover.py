"""Where the exact solve costs about what CG costs: the rank rule behind ``solver="auto"``.

    python jobs/solver_crossover.py                   # 1M generated ratings, ranks 4..128
    python jobs/solver_crossover.py --ratings 200000 --ranks 8,16,32 --repeats 3

Times one half-iteration of the NumPy backend (``numpy_backend.update_block``, what an executor
runs per block) over every user row of generated ratings, with ``solver="cholesky"`` (normal
equations built in float64, exact solve: Spark's factors) and with ``solver="cg"`` (the default
``cgIterations``, FP32, matrix-free), interleaved, after a warm-up that compiles the kernels.
No Spark: the per-row arithmetic is what differs between the solvers; a fit adds the same
Spark costs to both. Prints a markdown table (median and range of ``--repeats``) and the
arithmetic of each solver per half-iteration.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from spark_gpu_mf import datasets
from spark_gpu_mf.backends import numpy_backend
from spark_gpu_mf.backends.solve_config import SolveConfig


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratings", type=int, default=1_000_000, help="generated ratings")
    parser.add_argument("--ranks", default="4,8,10,12,16,20,24,32,48,64,128")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per solver and rank")
    parser.add_argument("--cg-iterations", type=int, default=5, help="cgIterations")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def user_rows(data: datasets.Ratings):
    """CSR of the users' ratings: ``(indptr, item indices, ratings, number of items)``."""
    user_index = np.unique(data.user, return_inverse=True)[1]
    order = np.lexsort((data.item, user_index))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(user_index))]).astype(np.int64)
    item_index = np.unique(data.item[order], return_inverse=True)[1].astype(np.int32)
    return indptr, item_index, data.rating[order].astype(np.float32), int(item_index.max()) + 1


def flops(counts: np.ndarray, rank: int, cg_iterations: int) -> dict:
    """Multiply-adds x 2 per half-iteration: Gram + Cholesky vs matrix-free CG."""
    n = float(counts.sum())
    rows = len(counts)
    return {
        "cholesky": 2 * (n * rank * (rank + 1) / 2 + rows * rank**3 / 6),
        "cg": 2 * cg_iterations * 2 * n * rank,
    }


def main(argv=None) -> list:
    args = parse_args(argv)
    data = datasets.generate_ratings(args.ratings, seed=args.seed)
    indptr, indices, ratings, num_items = user_rows(data)
    counts = np.diff(indptr)
    rng = np.random.default_rng(args.seed)
    rows = []
    print(f"{len(counts):,} users, {num_items:,} items, {len(ratings):,} ratings; "
          f"cgIterations {args.cg_iterations}")
    print("| rank | cholesky s | cg s | cholesky / cg | GFLOP cholesky / cg |")
    print("|---:|---:|---:|---:|---:|")
    for rank in [int(r) for r in args.ranks.split(",")]:
        factors = (rng.standard_normal((num_items, rank)) / np.sqrt(rank)).astype(np.float32)
        previous = np.zeros((len(counts), rank), np.float32)
        configs = {
            solver: SolveConfig(rank=rank, reg_param=0.1, solver=solver,
                                cg_iterations=args.cg_iterations)
            for solver in ("cholesky", "cg")
        }
        times = {solver: [] for solver in configs}
        for repeat in range(args.repeats + 1):
            for solver, config in configs.items():
                started = time.perf_counter()
                numpy_backend.update_block(indptr, indices, ratings, factors, previous, config)
                if repeat:  # the first pass compiles and warms the caches
                    times[solver].append(time.perf_counter() - started)
        cholesky, cg = (statistics.median(times[s]) for s in ("cholesky", "cg"))
        work = flops(counts, rank, args.cg_iterations)
        rows.append({"rank": rank, "cholesky": times["cholesky"], "cg": times["cg"],
                     "gflop": {k: v / 1e9 for k, v in work.items()}})
        print(f"| {rank} | {cholesky:.3f} [{min(times['cholesky']):.3f}-"
              f"{max(times['cholesky']):.3f}] | {cg:.3f} [{min(times['cg']):.3f}-"
              f"{max(times['cg']):.3f}] | {cholesky / cg:.2f} | "
              f"{work['cholesky'] / 1e9:.2f} / {work['cg'] / 1e9:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
