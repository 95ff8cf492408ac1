// Batched Jacobi-preconditioned conjugate gradient: one symmetric positive definite system
// A x = b per thread block, warm-started from x0 (Tan et al., "cuMF_als", ICPP'18, Section IV).
//
// For each row (blockIdx.x), with D = diag and A ~= A_stored * scale (A_stored float32, or
// float16 with a per-row power-of-two scale), all vectors and arithmetic in float32:
//   r = b - A x0;  z = D^-1 r;  p = z;  rz = r.z;  limit = tol^2 * b.b
//   repeat at most `iterations` times, while r.r > limit:
//     Ap = A p;  step = rz / p.Ap (0 if p.Ap <= 0);  x += step p;  r -= step Ap
//     z = D^-1 r;  rz' = r.z;  beta = rz' / rz (0 if rz <= 0);  p = z + beta p;  rz = rz'
// which is numpy_backend.solve_cg step for step, except that components with D = 0 (empty
// explicit rows) get z = 0 instead of NaN.
//
// Threads own components i = threadIdx.x + k * blockDim.x (k < PER_THREAD); x, r, z and Ap stay
// in registers, p is in shared memory for the broadcast in A p. A p uses the symmetry of A: thread
// i reads column i, A[j][i] for j = 0..rank-1, which is contiguous across the threads of a warp
// (conflict-free in shared memory, coalesced in global memory). When A fits (A_IN_SMEM), it is
// copied into shared memory once and read there by every iteration; otherwise every A p streams
// it from global memory (L2). blockDim.x is a multiple of 32.
#include "common.cuh"

namespace gpumf {

constexpr int kCgScratchFloats = 64;  // block_sum<2> over at most 32 warps

// Ap = scale * A p for the components owned by this thread.
template <typename AT, int PER_THREAD>
__device__ __forceinline__ void cg_matvec(const AT* __restrict__ A, const float* p, int rank,
                                          float scale, float (&ap)[PER_THREAD]) {
    float acc[PER_THREAD];
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) acc[k] = 0.0f;
    for (int j = 0; j < rank; ++j) {
        const float pj = p[j];
        const AT* column = A + (long long)j * rank;
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < rank) acc[k] = fmaf(load_as_float(column, i), pj, acc[k]);
        }
    }
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) ap[k] = acc[k] * scale;
}

template <typename AT, int PER_THREAD, bool A_IN_SMEM>
__device__ __forceinline__ void cg_solve_row(const AT* __restrict__ A_all,
                                             const float* __restrict__ scale_all,
                                             const float* __restrict__ diag_all,
                                             const float* __restrict__ b_all,
                                             const float* __restrict__ x0_all,
                                             float* __restrict__ x_out, int n_rows, int rank,
                                             int iterations, float tolerance) {
    GPUMF_DYNAMIC_SMEM(float, smem);
    const long long row = blockIdx.x;
    if (row >= n_rows) return;  // whole block
    const int rank_padded = (rank + 3) / 4 * 4;
    float* p_s = smem;
    float* scratch = smem + rank_padded;
    const AT* A = A_all + row * rank * rank;
    if constexpr (A_IN_SMEM) {
        AT* A_s = reinterpret_cast<AT*>(scratch + kCgScratchFloats);
        for (long long e = threadIdx.x; e < (long long)rank * rank; e += blockDim.x) A_s[e] = A[e];
        A = A_s;  // published by the barrier in the first cg_matvec's caller
    }
    const float scale = scale_all[row];
    const long long offset = row * rank;

    float x[PER_THREAD], r[PER_THREAD], z[PER_THREAD], p[PER_THREAD], ap[PER_THREAD];
    float inv_d[PER_THREAD];
    float bb[1] = {0.0f};
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        const bool valid = i < rank;
        const float d = valid ? diag_all[offset + i] : 0.0f;
        inv_d[k] = d != 0.0f ? 1.0f / d : 0.0f;
        x[k] = valid ? x0_all[offset + i] : 0.0f;
        r[k] = valid ? b_all[offset + i] : 0.0f;  // b for now
        bb[0] = fmaf(r[k], r[k], bb[0]);
        if (valid) p_s[i] = x[k];
    }
    __syncthreads();  // x0 (and A) staged
    cg_matvec<AT, PER_THREAD>(A, p_s, rank, scale, ap);
    float dots[2] = {0.0f, 0.0f};  // r.z, r.r
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        r[k] -= ap[k];
        z[k] = inv_d[k] * r[k];
        p[k] = z[k];
        dots[0] = fmaf(r[k], z[k], dots[0]);
        dots[1] = fmaf(r[k], r[k], dots[1]);
    }
    block_sum<1>(bb, scratch);  // its barriers also end every read of p_s by the matvec
    block_sum<2>(dots, scratch);
    float rz = dots[0];
    float rr = dots[1];
    const float limit = (tolerance * tolerance) * bb[0];

    for (int it = 0; it < iterations && rr > limit; ++it) {
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < rank) p_s[i] = p[k];
        }
        __syncthreads();  // p staged
        cg_matvec<AT, PER_THREAD>(A, p_s, rank, scale, ap);
        float pap[1] = {0.0f};
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) pap[0] = fmaf(p[k], ap[k], pap[0]);
        block_sum<1>(pap, scratch);  // also: every thread is done reading p_s
        const float step = pap[0] > 0.0f ? rz / pap[0] : 0.0f;
        dots[0] = 0.0f;
        dots[1] = 0.0f;
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) {
            x[k] = fmaf(step, p[k], x[k]);
            r[k] = fmaf(-step, ap[k], r[k]);
            z[k] = inv_d[k] * r[k];
            dots[0] = fmaf(r[k], z[k], dots[0]);
            dots[1] = fmaf(r[k], r[k], dots[1]);
        }
        block_sum<2>(dots, scratch);
        const float beta = rz > 0.0f ? dots[0] / rz : 0.0f;
#pragma unroll
        for (int k = 0; k < PER_THREAD; ++k) p[k] = fmaf(beta, p[k], z[k]);
        rz = dots[0];
        rr = dots[1];
    }
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
        const int i = threadIdx.x + k * blockDim.x;
        if (i < rank) x_out[offset + i] = x[k];
    }
}

}  // namespace gpumf

// One extern "C" entry point per (storage type, components per thread, where A lives).
// __launch_bounds__(256, 1): with the default minimum of blocks, ptxas (13.0) trades a few bytes
// of spills for occupancy in some variants; occupancy here is set by shared memory anyway.
#define GPUMF_CG_ENTRY(AT, suffix, PER_THREAD, A_IN_SMEM, where)                                \
    extern "C" __global__ void __launch_bounds__(256, 1)                                         \
        cg_solve_##suffix##_p##PER_THREAD##_##where(                                             \
        const AT* __restrict__ A, const float* __restrict__ scale,                              \
        const float* __restrict__ diag, const float* __restrict__ b,                            \
        const float* __restrict__ x0, float* __restrict__ x_out, int n_rows, int rank,          \
        int iterations, float tolerance) {                                                      \
        gpumf::cg_solve_row<AT, PER_THREAD, A_IN_SMEM>(A, scale, diag, b, x0, x_out, n_rows,     \
                                                       rank, iterations, tolerance);             \
    }

#define GPUMF_CG_ENTRIES(PER_THREAD)                           \
    GPUMF_CG_ENTRY(float, f32, PER_THREAD, true, smem)         \
    GPUMF_CG_ENTRY(float, f32, PER_THREAD, false, global)      \
    GPUMF_CG_ENTRY(__half, f16, PER_THREAD, true, smem)        \
    GPUMF_CG_ENTRY(__half, f16, PER_THREAD, false, global)

GPUMF_CG_ENTRIES(1)
GPUMF_CG_ENTRIES(2)
GPUMF_CG_ENTRIES(4)
GPUMF_CG_ENTRIES(8)
GPUMF_CG_ENTRIES(16)
