// cuMF-style get_hermitian: the ALS normal equations of a batch of rows of a CSR ratings block.
//
// For each row u (rows[pos] of the CSR block), with q_i = src[indices[k]] and r = ratings[k]:
//   explicit:  A_u = sum_i q_i q_i^T                 + lambda * n_u  * I,   b_u = sum_i r q_i
//   implicit:  A_u = YtY + sum_i c1 q_i q_i^T        + lambda * n+_u * I,   b_u = sum_{r>0} (1+c1) q_i
//              with c1 = alpha * |r| and n+_u the number of ratings r > 0.
// Outputs per batch position pos: A (rank x rank, float32, float64 or float16 scaled by
// scale[pos]: A ~= A16 * scale), diag[pos] = float32 diagonal of A (the CG preconditioner),
// b (float32), scale[pos] (1 unless float16).
//
// Design (Tan et al., "cuMF_als", ICPP'18, Section III): a group of threads per row; the row's
// neighbour factors are staged through shared memory in windows of `window` rows; each thread
// owns one T x T tile of the lower triangle of A in registers and accumulates the outer products
// of the staged factors into it; the upper triangle is written as the mirror. Ranks that need
// more tiles than a group has threads loop over tile passes (each pass re-stages the factors), so
// every rank is supported. Several rows share a block when the rank is small.
//
// Accumulation is compensated float32: within a window a tile is a plain FMA sum that starts at
// -comp, and at the end of each window it is added to the running sum with Kahan's rule, so the
// error does not grow with the number of ratings (two float32 registers per entry: sum and acc;
// comp lives in acc's register between windows). b and the diagonal are accumulated the same way
// in shared memory. The epilogue (YtY, lambda * n, the float16 scale) is done in float64.
//
// The float16 scale uses the largest diagonal entry: A is positive semidefinite, so
// |A_ij| <= sqrt(A_ii A_jj) <= max_i A_ii and the peak over all entries is on the diagonal.
#include "common.cuh"

namespace gpumf {

// Shared-memory floats of one row group; the launcher (cuda_kernels.hermitian_smem_bytes)
// computes the same: q window, two weights per staged rating, b/diag Kahan pairs, the float64
// diagonal, and 4 floats for the rating count and the scale.
__device__ __forceinline__ int hermitian_group_floats(int stride, int window) {
    return window * stride + 2 * window + 6 * stride + 4;
}

// Lower-triangle tile coordinates (ti >= tj) of tile number t.
__device__ __forceinline__ void lower_tile(int t, int& ti, int& tj) {
    int i = (int)((sqrtf(8.0f * (float)t + 1.0f) - 1.0f) * 0.5f);
    while ((i + 1) * (i + 2) / 2 <= t) ++i;
    while (i * (i + 1) / 2 > t) --i;
    ti = i;
    tj = t - i * (i + 1) / 2;
}

template <int T, typename OutT>
__device__ __forceinline__ void hermitian_rows(
    const long long* __restrict__ indptr, const int* __restrict__ indices,
    const float* __restrict__ ratings, const float* __restrict__ src,
    const long long* __restrict__ rows, int n_rows, int rank, int rows_per_block,
    int threads_per_row, int window, int implicit, float alpha, double reg_param,
    const double* __restrict__ yty, OutT* __restrict__ A_out, float* __restrict__ scale_out,
    float* __restrict__ diag_out, float* __restrict__ b_out) {
    GPUMF_DYNAMIC_SMEM(float, smem);
    const int n_tiles = (rank + T - 1) / T;
    const int stride = n_tiles * T;  // padded row length of a staged factor (zeros past rank)
    const int tiles = n_tiles * (n_tiles + 1) / 2;
    const int group = threadIdx.x / threads_per_row;
    const int lane = threadIdx.x % threads_per_row;
    const long long pos = (long long)blockIdx.x * rows_per_block + group;
    const bool has_row = pos < n_rows;

    float* q = smem + (long long)group * hermitian_group_floats(stride, window);
    float* wa = q + window * stride;  // A weight per staged rating (c1; unused when explicit)
    float* wb = wa + window;          // b weight per staged rating
    float* bsum = wb + window;
    float* bcomp = bsum + stride;
    float* dsum = bcomp + stride;
    float* dcomp = dsum + stride;
    double* diag_final = reinterpret_cast<double*>(dcomp + stride);
    int* count_slot = reinterpret_cast<int*>(diag_final + stride);
    float* scale_slot = reinterpret_cast<float*>(count_slot + 1);

    // Zero the padding columns once (staging writes only columns < rank) and the accumulators.
    for (int e = lane; e < window * stride; e += threads_per_row) q[e] = 0.0f;
    for (int c = lane; c < stride; c += threads_per_row) {
        bsum[c] = 0.0f;
        bcomp[c] = 0.0f;
        dsum[c] = 0.0f;
        dcomp[c] = 0.0f;
    }

    long long start = 0, count = 0;
    if (has_row) {
        const long long row = rows[pos];
        start = indptr[row];
        count = indptr[row + 1] - start;
    }
    // Every thread of the block runs the same number of windows (barriers are block-wide).
    long long most = 0;
    for (int g = 0; g < rows_per_block; ++g) {
        const long long p = (long long)blockIdx.x * rows_per_block + g;
        if (p < n_rows) {
            const long long row = rows[p];
            const long long n = indptr[row + 1] - indptr[row];
            most = n > most ? n : most;
        }
    }
    const int n_windows = (int)((most + window - 1) / window);
    const int passes = (tiles + threads_per_row - 1) / threads_per_row;
    int positives = 0;  // ratings that count for lambda * n (all, or r > 0 when implicit)

    for (int pass = 0; pass < passes; ++pass) {
        const int tile = pass * threads_per_row + lane;
        const bool has_tile = has_row && tile < tiles;
        int ti = 0, tj = 0;
        if (has_tile) lower_tile(tile, ti, tj);
        float sum[T][T], acc[T][T];  // acc holds -comp between windows
#pragma unroll
        for (int a = 0; a < T; ++a) {
#pragma unroll
            for (int c = 0; c < T; ++c) {
                sum[a][c] = 0.0f;
                acc[a][c] = 0.0f;
            }
        }

        for (int win = 0; win < n_windows; ++win) {
            const long long first = (long long)win * window;
            const int m = (int)(count > first ? (count - first < window ? count - first : window) : 0);
            const long long base = start + first;
            __syncthreads();  // the previous window is no longer read
            for (int e = lane; e < m * rank; e += threads_per_row) {
                const int w = e / rank;
                const int c = e - w * rank;
                q[w * stride + c] = src[(long long)indices[base + w] * rank + c];
            }
            for (int w = lane; w < m; w += threads_per_row) {
                const float r = ratings[base + w];
                if (implicit) {
                    const float c1 = alpha * fabsf(r);
                    wa[w] = c1;
                    wb[w] = r > 0.0f ? 1.0f + c1 : 0.0f;
                } else {
                    wa[w] = 1.0f;
                    wb[w] = r;
                }
            }
            __syncthreads();  // the window is staged
            if (m == 0) continue;

            if (has_tile) {
                for (int w = 0; w < m; ++w) {
                    float qa[T], qb[T];
                    load_floats<T>(qa, q + w * stride + ti * T);
                    load_floats<T>(qb, q + w * stride + tj * T);
                    if (implicit) {
                        const float c1 = wa[w];
#pragma unroll
                        for (int a = 0; a < T; ++a) qa[a] *= c1;
                    }
#pragma unroll
                    for (int a = 0; a < T; ++a) {
#pragma unroll
                        for (int c = 0; c < T; ++c) acc[a][c] = fmaf(qa[a], qb[c], acc[a][c]);
                    }
                }
                // Kahan fold of the window: acc = window sum - comp; new comp goes back into acc.
#pragma unroll
                for (int a = 0; a < T; ++a) {
#pragma unroll
                    for (int c = 0; c < T; ++c) {
                        const float t = sum[a][c] + acc[a][c];
                        acc[a][c] = -((t - sum[a][c]) - acc[a][c]);
                        sum[a][c] = t;
                    }
                }
            }
            if (pass == 0) {
                // b and the diagonal, one component per thread; the count, by lane 0.
                for (int c = lane; c < rank; c += threads_per_row) {
                    float bpart = 0.0f, dpart = 0.0f;
                    for (int w = 0; w < m; ++w) {
                        const float v = q[w * stride + c];
                        bpart = fmaf(wb[w], v, bpart);
                        dpart = fmaf(wa[w] * v, v, dpart);
                    }
                    kahan_add(bsum[c], bcomp[c], bpart);
                    kahan_add(dsum[c], dcomp[c], dpart);
                }
                if (lane == 0) {
                    if (implicit) {
                        for (int w = 0; w < m; ++w) positives += wb[w] > 0.0f ? 1 : 0;
                    } else {
                        positives += m;
                    }
                }
            }
        }

        if (pass == 0) {
            if (lane == 0) *count_slot = positives;
            __syncthreads();  // b, the diagonal and the count are complete
            if (has_row) {
                const double reg = reg_param * (double)*count_slot;
                for (int c = lane; c < rank; c += threads_per_row) {
                    double d = (double)dsum[c] - (double)dcomp[c] + reg;
                    if (implicit) d += yty[(long long)c * rank + c];
                    diag_final[c] = d;
                    diag_out[pos * rank + c] = (float)d;
                    b_out[pos * rank + c] = (float)((double)bsum[c] - (double)bcomp[c]);
                }
            }
            __syncthreads();  // the diagonal is final
            if (has_row && lane == 0) {
                double peak = 0.0;
                for (int c = 0; c < rank; ++c) peak = diag_final[c] > peak ? diag_final[c] : peak;
                const double scale = sizeof(OutT) == 2 ? fp16_scale_for_peak(peak) : 1.0;
                *scale_slot = (float)scale;
                scale_out[pos] = (float)scale;
            }
            __syncthreads();  // the scale is known
        }

        if (has_tile) {
            const double inv_scale = 1.0 / (double)*scale_slot;  // a power of two: exact
            OutT* A = A_out + pos * rank * rank;
#pragma unroll
            for (int a = 0; a < T; ++a) {
#pragma unroll
                for (int c = 0; c < T; ++c) {
                    const int i = ti * T + a;
                    const int j = tj * T + c;
                    // Diagonal tiles: the lower half (c < a) gives both A_ij and A_ji.
                    if (i >= rank || j >= rank || (ti == tj && c > a)) continue;
                    double v;
                    if (i == j) {
                        v = diag_final[i];
                    } else {
                        v = (double)sum[a][c] + (double)acc[a][c];  // sum - comp
                        if (implicit) v += yty[(long long)i * rank + j];
                    }
                    v *= inv_scale;
                    store_value(A, (long long)i * rank + j, v);
                    if (i != j) store_value(A, (long long)j * rank + i, v);
                }
            }
        }
    }
}

}  // namespace gpumf

// One extern "C" entry point per (tile size, output type). The launcher
// (spark_gpu_mf/backends/cuda_kernels.py) picks T and the group shape from the rank.
#define GPUMF_HERMITIAN_ENTRY(T, OutT, suffix)                                                    \
    extern "C" __global__ void __launch_bounds__(256) hermitian_t##T##_##suffix(                 \
        const long long* __restrict__ indptr, const int* __restrict__ indices,                  \
        const float* __restrict__ ratings, const float* __restrict__ src,                       \
        const long long* __restrict__ rows, int n_rows, int rank, int rows_per_block,           \
        int threads_per_row, int window, int implicit, float alpha, double reg_param,           \
        const double* __restrict__ yty, OutT* __restrict__ A_out, float* __restrict__ scale_out, \
        float* __restrict__ diag_out, float* __restrict__ b_out) {                              \
        gpumf::hermitian_rows<T, OutT>(indptr, indices, ratings, src, rows, n_rows, rank,        \
                                       rows_per_block, threads_per_row, window, implicit, alpha, \
                                       reg_param, yty, A_out, scale_out, diag_out, b_out);       \
    }

GPUMF_HERMITIAN_ENTRY(4, float, f32)
GPUMF_HERMITIAN_ENTRY(4, __half, f16)
GPUMF_HERMITIAN_ENTRY(4, double, f64)
GPUMF_HERMITIAN_ENTRY(8, float, f32)
GPUMF_HERMITIAN_ENTRY(8, __half, f16)
GPUMF_HERMITIAN_ENTRY(8, double, f64)
