"""The CUDA kernels of ``kernels/*.cu``: sources, launch shapes, loading and launching.

Everything here except ``get_module`` is plain Python, so the launch code that runs on GPU
executors is the code the tests run against the host shim (``tests/cuda_shim``), which mimics
``cupy.RawModule`` on NumPy arrays. CuPy is imported only inside ``get_module``.

Kernels (see the formulas at the top of each ``.cu`` file):

* ``hermitian_t{4,8}_{f32,f16,f64}``: normal equations of a batch of CSR rows, one group of
  threads per row, one T x T register tile of A per thread.
* ``cg_solve_{f32,f16}_p{1,2,4,8,16}_{smem,global}``: batched Jacobi-preconditioned CG, one system
  per block, ``p`` components per thread, A kept in shared memory or streamed from global memory.
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from dataclasses import dataclass

import numpy as np

KERNEL_FILES = ("hermitian.cu", "cg_solver.cu")
# NVRTC options; CuPy adds -arch for the current device and its own -I for cuda_fp16.h.
COMPILE_OPTIONS = ("--std=c++17",)
# Dynamic shared memory a kernel may use without opting in (cudaFuncSetAttribute).
DEFAULT_SMEM_LIMIT = 48 * 1024
MAX_THREADS_PER_BLOCK = 256  # the __launch_bounds__ of every kernel
_CG_PER_THREAD = (1, 2, 4, 8, 16)
_CG_SCRATCH_FLOATS = 64  # kCgScratchFloats in cg_solver.cu
_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)


def _read_kernel_file(name: str) -> str:
    return importlib.resources.files("spark_gpu_mf.kernels").joinpath(name).read_text()


def _expand_includes(names: tuple[str, ...]) -> str:
    """The files ``names`` in one text with local ``#include "..."`` files inlined, once each.

    Inlining makes the whole program part of the code string, so CuPy's compile cache (keyed by
    the code and the options) can never serve a module built from an older header.
    """
    seen: set[str] = set()

    def expand(text: str) -> str:
        def include(match: re.Match) -> str:
            header = match.group(1)
            if header in seen:
                return ""
            seen.add(header)
            text = _read_kernel_file(header).replace("#pragma once\n", "")
            return f"// ---- {header}\n" + expand(text)

        return _INCLUDE.sub(include, text)

    return "\n".join(f"// ==== {name}\n" + expand(_read_kernel_file(name)) for name in names)


@functools.cache
def kernel_source(name: str) -> str:
    """Source of ``kernels/<name>`` with its includes inlined (what the compile tests build)."""
    return _expand_includes((name,))


@functools.cache
def module_source() -> str:
    """Every kernel file in one translation unit (one RawModule, one NVRTC compile)."""
    return _expand_includes(KERNEL_FILES)


@functools.cache
def _memoized_loader(files: tuple[str, ...]):
    import cupy

    @cupy.memoize(for_each_device=True)
    def load():
        # Entry points are extern "C", so no name_expressions are needed to look them up.
        return cupy.RawModule(code=_expand_includes(files), options=COMPILE_OPTIONS)

    return load


def get_module(files: tuple[str, ...] = KERNEL_FILES):
    """The compiled kernels of ``files`` for the current CUDA device: compiled once per device
    and process (CuPy also caches the binary on disk across processes). The default is the ALS
    kernels; the SGD estimators load their own file the same way."""
    return _memoized_loader(tuple(files))()


# --------------------------------------------------------------------------- launch shapes


@dataclass(frozen=True)
class HermitianPlan:
    """Launch shape of the hermitian kernel for one rank.

    ``tile`` x ``tile`` register tiles cover the lower triangle of A; ``threads_per_row`` threads
    build one row's A (looping over ``passes`` tile passes when there are more tiles than
    threads); ``rows_per_block`` rows share a block when the rank is small; ``window`` neighbour
    factors are staged in shared memory at a time.
    """

    rank: int
    tile: int
    threads_per_row: int
    rows_per_block: int
    window: int
    smem_bytes: int

    @property
    def stride(self) -> int:
        return -(-self.rank // self.tile) * self.tile

    @property
    def tiles(self) -> int:
        n = self.stride // self.tile
        return n * (n + 1) // 2

    @property
    def passes(self) -> int:
        return -(-self.tiles // self.threads_per_row)

    @property
    def threads(self) -> int:
        return self.threads_per_row * self.rows_per_block

    def kernel_name(self, out_dtype) -> str:
        suffix = {np.float32: "f32", np.float16: "f16", np.float64: "f64"}[np.dtype(out_dtype).type]
        return f"hermitian_t{self.tile}_{suffix}"


def hermitian_smem_bytes(rank: int, tile: int, rows_per_block: int, window: int) -> int:
    """Dynamic shared memory of the hermitian kernel (hermitian_group_floats in the .cu)."""
    stride = -(-rank // tile) * tile
    return 4 * rows_per_block * (window * stride + 2 * window + 6 * stride + 4)


def hermitian_plan(rank: int, smem_limit: int = DEFAULT_SMEM_LIMIT) -> HermitianPlan:
    """Launch shape for ``rank``.

    8 x 8 tiles (4 x 4 up to rank 24, where 8 x 8 would mostly be padding); one tile per thread
    up to 256 tiles (rank 176), tile passes above; about 128 threads per block, so small ranks put
    several rows in a block; the largest window up to 32 factors that fits ``smem_limit``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    tile = 4 if rank <= 24 else 8
    n = -(-rank // tile)
    tiles = n * (n + 1) // 2
    threads_per_row = min(tiles, MAX_THREADS_PER_BLOCK)
    rows_per_block = max(1, 128 // threads_per_row)
    for window in range(32, 0, -2):
        smem = hermitian_smem_bytes(rank, tile, rows_per_block, window)
        if smem <= smem_limit:
            return HermitianPlan(rank, tile, threads_per_row, rows_per_block, window, smem)
    raise ValueError(
        f"rank {rank} needs more than {smem_limit} bytes of shared memory per block for the "
        "hermitian kernel"
    )


@dataclass(frozen=True)
class CgPlan:
    """Launch shape of the CG kernel: ``threads`` per block, ``per_thread`` components each."""

    rank: int
    threads: int
    per_thread: int
    a_in_smem: bool
    smem_bytes: int
    storage: str  # "fp32" | "fp16"

    @property
    def kernel_name(self) -> str:
        where = "smem" if self.a_in_smem else "global"
        suffix = "f16" if self.storage == "fp16" else "f32"
        return f"cg_solve_{suffix}_p{self.per_thread}_{where}"


def cg_plan(rank: int, storage: str, smem_limit: int = DEFAULT_SMEM_LIMIT) -> CgPlan:
    """Launch shape of the CG solver; A goes to shared memory when it fits in ``smem_limit``."""
    if storage not in ("fp32", "fp16"):
        raise ValueError(f"unknown precision {storage!r}")
    threads = min(MAX_THREADS_PER_BLOCK, -(-rank // 32) * 32)
    needed = -(-rank // threads)
    per_thread = next((p for p in _CG_PER_THREAD if p >= needed), None)
    if per_thread is None:
        raise ValueError(f"the CUDA CG solver supports rank <= 4096, got {rank}")
    vectors = 4 * (-(-rank // 4) * 4 + _CG_SCRATCH_FLOATS)
    matrix = rank * rank * (2 if storage == "fp16" else 4)
    a_in_smem = vectors + matrix <= smem_limit
    smem = vectors + (matrix if a_in_smem else 0)
    return CgPlan(rank, threads, per_thread, a_in_smem, smem, storage)


# --------------------------------------------------------------------------- launches


def _kernel(module, name: str, smem_bytes: int):
    kernel = module.get_function(name)
    if smem_bytes > DEFAULT_SMEM_LIMIT:
        kernel.max_dynamic_shared_size_bytes = smem_bytes  # opt in above 48 KiB
    return kernel


def launch_hermitian(
    module,
    plan: HermitianPlan,
    *,
    indptr,
    indices,
    ratings,
    src_factors,
    rows,
    implicit: bool,
    alpha: float,
    reg_param: float,
    yty,
    A,
    scale,
    diag,
    b,
) -> None:
    """Build the normal equations of ``rows`` (int64 row numbers of the CSR block).

    Array arguments are device arrays (or NumPy arrays for the shim): indptr int64, indices int32,
    ratings float32, src_factors float32 (n_src, rank), yty float64 (rank, rank) (any float64
    array when explicit), and the outputs A (n, rank, rank) of float32/float16/float64, scale
    float32 (n,), diag float32 (n, rank), b float32 (n, rank).
    """
    n = int(rows.shape[0])
    if n == 0:
        return
    kernel = _kernel(module, plan.kernel_name(A.dtype), plan.smem_bytes)
    grid = (-(-n // plan.rows_per_block),)
    args = (
        indptr, indices, ratings, src_factors, rows,
        np.int32(n), np.int32(plan.rank), np.int32(plan.rows_per_block),
        np.int32(plan.threads_per_row), np.int32(plan.window), np.int32(bool(implicit)),
        np.float32(alpha), np.float64(reg_param), yty, A, scale, diag, b,
    )  # fmt: skip
    kernel(grid, (plan.threads,), args, shared_mem=plan.smem_bytes)


def launch_cg(
    module,
    plan: CgPlan,
    *,
    A,
    scale,
    diag,
    b,
    x0,
    x_out,
    iterations: int,
    tolerance: float,
) -> None:
    """Solve every system of the batch with the CG kernel (A float32 or float16 (n, rank, rank),
    scale float32 (n,), diag/b/x0/x_out float32 (n, rank))."""
    n = int(b.shape[0])
    if n == 0:
        return
    kernel = _kernel(module, plan.kernel_name, plan.smem_bytes)
    args = (
        A, scale, diag, b, x0, x_out,
        np.int32(n), np.int32(plan.rank), np.int32(iterations), np.float32(tolerance),
    )  # fmt: skip
    kernel((n,), (plan.threads,), args, shared_mem=plan.smem_bytes)
