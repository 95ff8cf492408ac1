"""CuPy backend: the GPU path, with the same functions and semantics as ``numpy_backend``.

Every public function takes NumPy host arrays and returns NumPy host arrays, like
``numpy_backend``; inside, the inputs go to the current CUDA device once per call, the kernels of
``kernels/*.cu`` run there (loaded by ``cuda_kernels``), and the results come back once.

* ``update_block``: the hermitian kernel builds a batch of normal equations straight into the
  solver's storage (float16 with a per-row scale, float32, or float64 for Cholesky), then the CG
  kernel or cuSOLVER's batched Cholesky solves them. Rows are visited in order of rating count so
  that rows sharing a thread block have similar lengths. Batches are sized by
  ``config.memory_budget_bytes``; on GPU out-of-memory the budget is halved and the block retried,
  and below 16 MiB the block falls back to ``numpy_backend`` with a warning.
* ``nonnegative`` and ``solve_nnls``: Spark's NNLS is a sequential active-set iteration per row;
  it runs on the CPU (``numpy_backend.solve_nnls``) on normal equations built on the GPU.
* ``gram`` and ``top_k`` use cuBLAS through CuPy's matmul.

Precision: A and b are accumulated in compensated float32 on the GPU (Kahan sums per staging
window; see hermitian.cu) and finished in float64; NumPy accumulates in float64. b is returned in
float32 precision. The CG solver computes in float32 like NumPy's, but its matrix-vector product
keeps the vector in float32 where NumPy's rounds it to float16 (so on the GPU only A is FP16).

The functions prefixed with ``_`` take a ``Device`` first; ``Device`` itself is a host emulation
(NumPy arrays plus a ``RawModule``-like module), which is how the tests run this file's launch code
against the kernels compiled for the CPU (``tests/cuda_shim``). CuPy is imported lazily, so this
module imports without it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace

import numpy as np

from spark_gpu_mf.backends import cuda_kernels, numpy_backend
from spark_gpu_mf.backends.precision import fp16_unsafe_rows, warn_fp32_fallback
from spark_gpu_mf.backends.solve_config import SolveConfig

__all__ = [
    "SolveConfig",
    "gram",
    "normal_equations",
    "solve_cg",
    "solve_cholesky",
    "solve_nnls",
    "top_k",
    "update_block",
]

_log = logging.getLogger(__name__)
_MIB = 1 << 20
_MIN_BUDGET = 16 * _MIB  # below this an out-of-memory block goes to NumPy
_STORAGE = {"fp16": np.float16, "fp32": np.float32}


class Device:
    """Where the kernels run. This base class is the host emulation used by the tests: NumPy
    arrays and a ``RawModule``-like ``module``; ``_CupyDevice`` is the real GPU."""

    out_of_memory: tuple[type[BaseException], ...] = (MemoryError,)

    def __init__(self, module, smem_limit: int = cuda_kernels.DEFAULT_SMEM_LIMIT):
        self.xp = np
        self.module = module
        self.smem_limit = smem_limit

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    def free_memory(self) -> None:
        pass

    def cholesky_solve(self, A, b):
        """float32 solutions of SPD systems ``A x = b`` (A float64); Spark's error if singular."""
        return numpy_backend.solve_cholesky(np.asarray(A), np.asarray(b))


class _CupyDevice(Device):
    def __init__(self):
        import cupy

        self.xp = cupy
        self.module = cuda_kernels.get_module()
        self.smem_limit = int(cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])
        self.out_of_memory = (cupy.cuda.memory.OutOfMemoryError,)

    def to_host(self, array) -> np.ndarray:
        return self.xp.asnumpy(array)

    def free_memory(self) -> None:
        self.xp.get_default_memory_pool().free_all_blocks()

    def cholesky_solve(self, A, b):
        cupy = self.xp
        import cupyx
        from cupyx.scipy.linalg import solve_triangular

        A64 = A.astype(cupy.float64, copy=False)
        try:
            with cupyx.errstate(linalg="raise"):
                L = cupy.linalg.cholesky(A64)  # batched potrf
        except np.linalg.LinAlgError:
            # Only possible with regParam = 0: the host solve raises Spark's exact message.
            return cupy.asarray(numpy_backend.solve_cholesky(self.to_host(A), self.to_host(b)))
        rhs = b.astype(cupy.float64)[..., None]
        y = solve_triangular(L, rhs, lower=True)
        x = solve_triangular(L, y, lower=True, trans="T")
        return x[..., 0].astype(cupy.float32)


_devices: dict[int, Device] = {}


def _device() -> Device:
    """The ``Device`` of CuPy's current CUDA device (chosen by ``select_backend``), cached."""
    import cupy

    device_id = cupy.cuda.Device().id
    device = _devices.get(device_id)
    if device is None:
        device = _devices[device_id] = _CupyDevice()
    return device


# --------------------------------------------------------------------------- building blocks


@dataclass(frozen=True)
class _Block:
    """One CSR block and its source factors on the device."""

    indptr: object
    indices: object
    ratings: object
    src: object
    yty: object
    rank: int


def _upload(dev: Device, indptr, indices, ratings, src_factors, yty) -> _Block:
    xp = dev.xp
    src = np.ascontiguousarray(src_factors, dtype=np.float32)
    rank = src.shape[1]
    yty_host = np.zeros(1) if yty is None else np.ascontiguousarray(yty, dtype=np.float64)
    return _Block(
        indptr=xp.asarray(np.ascontiguousarray(indptr, dtype=np.int64)),
        indices=xp.asarray(np.ascontiguousarray(indices, dtype=np.int32)),
        ratings=xp.asarray(np.ascontiguousarray(ratings, dtype=np.float32)),
        src=xp.asarray(src),
        yty=xp.asarray(yty_host),
        rank=rank,
    )


def _build(dev: Device, block: _Block, rows, out_dtype, *, reg_param, implicit, alpha):
    """Normal equations of ``rows`` (device int64) into ``out_dtype`` storage.

    Returns device arrays ``(A, scale, diag, b)``: ``A ~= A_stored * scale`` per row, ``diag`` the
    float32 diagonal of A, ``b`` float32.
    """
    xp = dev.xp
    n, rank = int(rows.shape[0]), block.rank
    plan = cuda_kernels.hermitian_plan(rank, dev.smem_limit)
    A = xp.empty((n, rank, rank), dtype=out_dtype)
    scale = xp.empty(n, dtype=np.float32)
    diag = xp.empty((n, rank), dtype=np.float32)
    b = xp.empty((n, rank), dtype=np.float32)
    cuda_kernels.launch_hermitian(
        dev.module, plan,
        indptr=block.indptr, indices=block.indices, ratings=block.ratings, src_factors=block.src,
        rows=rows, implicit=implicit, alpha=alpha, reg_param=reg_param, yty=block.yty,
        A=A, scale=scale, diag=diag, b=b,
    )  # fmt: skip
    return A, scale, diag, b


def _cg(dev: Device, A, scale, diag, b, x0, *, precision, iterations, tolerance):
    """Run the CG kernel on device arrays; returns the float32 solutions (device)."""
    xp = dev.xp
    rank = int(b.shape[1])
    x = xp.empty(b.shape, dtype=np.float32)
    plan = cuda_kernels.cg_plan(rank, precision, dev.smem_limit)
    cuda_kernels.launch_cg(
        dev.module, plan, A=A, scale=scale, diag=diag, b=b,
        x0=xp.ascontiguousarray(x0, dtype=np.float32), x_out=x,
        iterations=iterations, tolerance=tolerance,
    )  # fmt: skip
    return x


def _row_batches(n_rows: int, bytes_per_row: int, budget: int):
    step = max(1, budget // max(bytes_per_row, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


# --------------------------------------------------------------------------- the API


def normal_equations(
    indptr,
    indices,
    ratings,
    src_factors,
    *,
    reg_param: float,
    implicit: bool = False,
    alpha: float = 1.0,
    yty=None,
    rows=None,
    memory_budget_bytes: int = 256 * _MIB,
    accumulate: str = "float64",
):
    """``numpy_backend.normal_equations`` on the GPU: ``A`` and float64 ``b`` of ``rows``.

    The kernel always accumulates in compensated float32 and finishes in float64 (see the
    module docstring); ``accumulate`` only chooses the dtype of the returned ``A``, as in NumPy.
    """
    return _normal_equations(
        _device(), indptr, indices, ratings, src_factors, reg_param=reg_param,
        implicit=implicit, alpha=alpha, yty=yty, rows=rows,
        memory_budget_bytes=memory_budget_bytes, accumulate=accumulate,
    )  # fmt: skip


def _normal_equations(
    dev, indptr, indices, ratings, src_factors, *, reg_param, implicit=False, alpha=1.0,
    yty=None, rows=None, memory_budget_bytes=256 * _MIB, accumulate="float64",
):  # fmt: skip
    if implicit and yty is None:
        raise ValueError("implicit normal equations need the Gram matrix yty")
    dtype = {"float64": np.float64, "float32": np.float32}[accumulate]
    rank = np.shape(src_factors)[1]
    rows = np.arange(len(indptr) - 1) if rows is None else np.asarray(rows)
    A_out = np.empty((len(rows), rank, rank), dtype=dtype)
    b_out = np.empty((len(rows), rank))
    if len(rows) == 0:
        return A_out, b_out
    block = _upload(dev, indptr, indices, ratings, src_factors, yty)
    for part in _row_batches(len(rows), 8 * rank * rank + 16 * rank, memory_budget_bytes):
        rows_d = dev.xp.asarray(rows[part].astype(np.int64))
        A, _, _, b = _build(
            dev, block, rows_d, dtype, reg_param=reg_param, implicit=implicit, alpha=alpha
        )
        A_out[part] = dev.to_host(A)
        b_out[part] = dev.to_host(b)
    return A_out, b_out


def gram(factors) -> np.ndarray:
    """``Y^T Y`` of float32 factors in float64 (cuBLAS DGEMM)."""
    return _gram(_device(), factors)


def _gram(dev, factors) -> np.ndarray:
    y = dev.xp.asarray(np.asarray(factors)).astype(np.float64)
    return dev.to_host(y.T @ y)


def solve_cholesky(A, b) -> np.ndarray:
    """Exact batched solve in float64 (cuSOLVER batched Cholesky + triangular solves).

    Raises ``SingularMatrixError`` with Spark's message when a system is not positive definite.
    """
    return _solve_cholesky(_device(), A, b)


def _solve_cholesky(dev, A, b) -> np.ndarray:
    if len(b) == 0:
        return np.zeros(np.shape(b), np.float32)
    xp = dev.xp
    return dev.to_host(dev.cholesky_solve(xp.asarray(np.asarray(A)), xp.asarray(np.asarray(b))))


def _fp16_scaled(xp, A):
    """``numpy_backend._fp16_scaled`` for any array module: float16 A and per-row scale."""
    peak = xp.abs(A).reshape(len(A), -1).max(axis=1)
    peak = xp.where(peak > 0, peak, 1.0)
    scale = xp.exp2(xp.floor(xp.log2(peak)) - 13.0)
    return (A / scale[:, None, None]).astype(np.float16), scale.astype(np.float32)


def solve_cg(A, b, x0, *, iterations: int, precision: str = "fp32", tolerance: float = 1e-6):
    """Batched Jacobi-preconditioned CG on the GPU (the ``cg_solve`` kernel), warm-started from
    ``x0``; ``A`` stored as float32 or float16 with a per-row power-of-two scale."""
    return _solve_cg(
        _device(), A, b, x0, iterations=iterations, precision=precision, tolerance=tolerance
    )


def _solve_cg(dev, A, b, x0, *, iterations, precision="fp32", tolerance=1e-6) -> np.ndarray:
    if precision not in _STORAGE:
        raise ValueError(f"unknown precision {precision!r}")
    if len(b) == 0:
        return np.zeros(np.shape(b), np.float32)
    xp = dev.xp
    A_d = xp.asarray(np.asarray(A, dtype=np.float64))
    if precision == "fp16":
        stored, scale = _fp16_scaled(xp, A_d)
    else:
        stored, scale = A_d.astype(np.float32), xp.ones(len(A_d), dtype=np.float32)
    diag = xp.ascontiguousarray(xp.diagonal(A_d, axis1=1, axis2=2).astype(np.float32))
    b_d = xp.asarray(np.asarray(b, dtype=np.float32))
    x = _cg(
        dev, xp.ascontiguousarray(stored), scale, diag, b_d, xp.asarray(np.asarray(x0)),
        precision=precision, iterations=iterations, tolerance=tolerance,
    )  # fmt: skip
    return dev.to_host(x)


def solve_nnls(A, b) -> np.ndarray:
    """Spark's NNLS per row, on the CPU: ``numpy_backend.solve_nnls``.

    The active-set iteration is sequential and branchy per row; it is not worth a kernel while
    ``nonnegative=True`` is rare. The normal equations themselves are still built on the GPU.
    """
    return numpy_backend.solve_nnls(np.asarray(A), np.asarray(b))


def update_block(indptr, indices, ratings, src_factors, previous, config: SolveConfig, yty=None):
    """New float32 factors of every row of one block (host array), built and solved on the GPU.

    On GPU out-of-memory the memory budget is halved and the block retried; below 16 MiB the block
    is solved by ``numpy_backend`` with a warning.
    """
    return _update_block(_device(), indptr, indices, ratings, src_factors, previous, config, yty)


def _update_block(dev, indptr, indices, ratings, src_factors, previous, config, yty=None):
    if config.solver == "cg" and not config.nonnegative and config.precision == "fp16":
        unsafe = fp16_unsafe_rows(
            np.asarray(indptr), np.asarray(indices), np.asarray(ratings), np.asarray(src_factors),
            reg_param=config.reg_param, implicit=config.implicit, alpha=config.alpha, yty=yty,
        )  # fmt: skip
        if unsafe.any():
            # Same rule as numpy_backend: rows FP16 would round too coarsely are stored in FP32.
            warn_fp32_fallback(int(unsafe.sum()), len(unsafe))
            out = _update_rows(
                dev,
                indptr,
                indices,
                ratings,
                src_factors,
                previous,
                config,
                yty,
                np.flatnonzero(~unsafe),
            )
            fp32 = replace(config, precision="fp32")
            kept = _update_rows(
                dev,
                indptr,
                indices,
                ratings,
                src_factors,
                previous,
                fp32,
                yty,
                np.flatnonzero(unsafe),
            )
            out[unsafe] = kept[unsafe]
            return out
    return _update_rows(dev, indptr, indices, ratings, src_factors, previous, config, yty, None)


def _update_rows(dev, indptr, indices, ratings, src_factors, previous, config, yty, rows):
    budget = config.memory_budget_bytes
    while True:
        try:
            return _update_block_within(
                dev, indptr, indices, ratings, src_factors, previous, config, yty, budget, rows
            )
        except dev.out_of_memory as error:
            dev.free_memory()
            if budget // 2 < _MIN_BUDGET:
                warnings.warn(
                    f"GPU out of memory even with a {budget // _MIB} MiB batch budget ({error}); "
                    "solving this block with the NumPy backend",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return numpy_backend.update_block(
                    indptr, indices, ratings, src_factors, previous, config, yty
                )
            budget //= 2
            _log.info("GPU out of memory; retrying the block with a %d MiB budget", budget // _MIB)


def _update_block_within(
    dev, indptr, indices, ratings, src_factors, previous, config, yty, budget, rows_wanted=None
) -> np.ndarray:
    n_rows, rank = len(indptr) - 1, config.rank
    if n_rows == 0:
        return np.zeros((0, rank), np.float32)
    if config.implicit and yty is None:
        raise ValueError("implicit normal equations need the Gram matrix yty")
    build = {"reg_param": config.reg_param, "implicit": config.implicit, "alpha": config.alpha}
    if config.nonnegative:
        A, b = _normal_equations(
            dev, indptr, indices, ratings, src_factors, yty=yty, memory_budget_bytes=budget,
            **build,
        )  # fmt: skip
        return solve_nnls(A, b)
    cg = config.solver == "cg"
    if cg and config.precision not in _STORAGE:
        raise ValueError(f"unknown precision {config.precision!r}")
    storage = _STORAGE[config.precision] if cg else np.float64
    xp = dev.xp
    block = _upload(dev, indptr, indices, ratings, src_factors, yty)
    if cg and previous is not None:
        previous_d = xp.asarray(np.ascontiguousarray(previous, dtype=np.float32))
    # Rows of similar length side by side: rows that share a thread block then need the same
    # number of staging windows.
    counts = np.diff(np.asarray(indptr))
    if rows_wanted is None:
        order = np.argsort(counts, kind="stable").astype(np.int64)
    else:
        rows_wanted = np.asarray(rows_wanted, np.int64)
        order = rows_wanted[np.argsort(counts[rows_wanted], kind="stable")]
    out = xp.zeros((n_rows, rank), dtype=np.float32)
    bytes_per_row = rank * rank * np.dtype(storage).itemsize + 20 * rank + 16
    for part in _row_batches(len(order), bytes_per_row, budget):
        rows = xp.asarray(order[part])
        A, scale, diag, b = _build(dev, block, rows, storage, **build)
        if cg:
            if previous is None:
                x0 = xp.zeros((int(rows.shape[0]), rank), dtype=np.float32)
            else:
                x0 = previous_d[rows]
            x = _cg(
                dev, A, scale, diag, b, x0, precision=config.precision,
                iterations=config.cg_iterations, tolerance=config.cg_tolerance,
            )  # fmt: skip
        else:
            x = dev.cholesky_solve(A, b)
        out[rows] = x
        del A, scale, diag, b
    return dev.to_host(out)


def top_k(queries, candidates, candidate_ids, k: int):
    """``numpy_backend.top_k`` on the GPU: a cuBLAS GEMM per chunk of queries, then one sort per
    query of a 64-bit key (score, id), which gives Spark's order (score, then id, descending)."""
    return _top_k(_device(), queries, candidates, candidate_ids, k)


def _top_k(dev, queries, candidates, candidate_ids, k: int, budget: int = 256 * _MIB):
    n_q = len(queries)
    kk = min(k, len(candidates))
    if n_q == 0 or kk == 0:
        return np.zeros((n_q, kk), np.int32), np.zeros((n_q, kk), np.float32)
    xp = dev.xp
    Q = xp.asarray(np.asarray(queries, dtype=np.float32))
    C = xp.asarray(np.asarray(candidates, dtype=np.float32))
    ids = xp.asarray(np.asarray(candidate_ids).astype(np.int32))
    # Order-preserving unsigned images of the id (signed int32) and of the score (float32).
    id_key = (ids.view(np.uint32) ^ np.uint32(0x80000000)).astype(np.uint64)
    out_ids = np.empty((n_q, kk), np.int32)
    out_scores = np.empty((n_q, kk), np.float32)
    step = max(1, budget // (len(candidates) * 24))
    for start in range(0, n_q, step):
        stop = min(start + step, n_q)
        scores = Q[start:stop] @ C.T
        scores = scores + np.float32(0.0)  # -0.0 becomes +0.0: equal scores, equal keys
        bits = scores.view(np.uint32)
        negative = bits >= np.uint32(0x80000000)
        ordered = xp.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
        key = (ordered << np.uint64(32)) | id_key[None, :]
        best = xp.argsort(~key, axis=1)[:, :kk]  # ascending ~key = descending (score, id)
        out_ids[start:stop] = dev.to_host(ids[best])
        out_scores[start:stop] = dev.to_host(xp.take_along_axis(scores, best, axis=1))
    return out_ids, out_scores
