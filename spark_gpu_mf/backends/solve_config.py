"""``SolveConfig``: how a block's rows are solved, shared by every backend and dataflow."""

from __future__ import annotations

from dataclasses import dataclass

_MIB = 1 << 20

# solver="auto" solves exactly up to this rank: there the float64 normal equations and their
# Cholesky cost about what matrix-free CG does (jobs/solver_crossover.py, docs/benchmarks.md).
AUTO_EXACT_MAX_RANK = 12


def resolve_solver(solver: str, rank: int, precision: str = "fp32") -> str:
    """The solver a fit runs: ``"auto"`` settled by ``rank``, the others as given.

    FP16 storage is a CG feature, so ``precision="fp16"`` keeps ``"auto"`` on CG at any rank.
    """
    if solver != "auto":
        return solver
    return "cholesky" if rank <= AUTO_EXACT_MAX_RANK and precision == "fp32" else "cg"


@dataclass(frozen=True)
class SolveConfig:
    """How one block's rows are solved; built on the driver from the estimator's params.

    Attributes
    ----------
    rank : int
    reg_param : float
        lambda; scaled per row by its number of (positive, if implicit) ratings.
    implicit : bool
    alpha : float
    nonnegative : bool
        Solve each row with Spark's NNLS instead of an unconstrained solve.
    solver : {"cholesky", "cg"}
        Never ``"auto"``: :func:`resolve_solver` settles it on the driver.
    cg_iterations : int
        Conjugate-gradient steps per half-iteration, warm-started from the previous factors.
    precision : {"fp32", "fp16"}
        Storage of the matrices the CG solver reads; arithmetic is always float32.
    memory_budget_bytes : int
        Upper bound on the normal equations (and gathered factors) held at once.
    """

    rank: int
    reg_param: float
    implicit: bool = False
    alpha: float = 1.0
    nonnegative: bool = False
    solver: str = "cholesky"
    cg_iterations: int = 5
    precision: str = "fp32"
    cg_tolerance: float = 1e-6
    memory_budget_bytes: int = 256 * _MIB

    @property
    def warm_start(self) -> bool:
        """Whether a half-iteration starts each row from its previous factors: only the CG
        solver iterates (Cholesky and NNLS solve from scratch), so only it reads them."""
        return self.solver == "cg" and not self.nonnegative
