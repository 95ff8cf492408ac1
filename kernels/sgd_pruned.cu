// PrunedMF: the SGD update of one DSGD cell with DP-MF's dynamic pruning (arXiv 2404.04265).
//
// For each rating (u, i, r) of the cell, with p = P[u], q = Q[i] (row-major, `rank` floats):
//   d*  = first d with |p[d]| < threshold_p or |q[d]| < threshold_q   (rank if none; 0 prunes nothing)
//   e   = r - sum_{d < d*} p[d] q[d]
//   for d < d*, from the old values:  gp = -e q[d] + reg p[d],  gq = -e p[d] + reg q[d]
//                                     p[d] -= eta_p gp,          q[d] -= eta_q gq
//   row-wise AdaGrad (LIBMF): eta_p = step / sqrt(G_u) with G_u read before the update, then
//   G_u += sum_{d < d*} gp^2 / rank; likewise G_i. Plain SGD (adagrad = 0): eta = step, G unused.
//   regrowth != 0: the update (and G's sums) also cover d = d* when d* < rank, so an entry below its
//   threshold keeps learning and can grow back; the dot product still stops at d*.
// Per warp it writes the sum of e^2 (float64) and the executed multiply-adds sum d* (int64).
// spark_gpu_mf/sgd/pruned_numba.py is the same update on the CPU; its docstring has the why.
//
// Design: one warp per rating, the rank spread over the lanes: lane l owns dimensions
// l, l + 32, l + 64, ... (DPL of them, in registers), so ranks up to 32 * DPL. d* is found chunk
// by chunk of 32 dimensions: every lane tests its dimension and a butterfly minimum (5 xor
// shuffles) gives the warp the first insignificant one; chunks past d* are never loaded, so the
// pruned tail costs neither arithmetic nor memory traffic. The dot product and the two squared
// gradient sums are butterfly sums too, which leave the bit-identical total in every lane.
//
// Each warp runs a contiguous slice of the cell's ratings in order. DSGD already guarantees that
// no other task touches the cell's rows; within the cell, warps update rows Hogwild-style, as
// cuMF_SGD and MASCOT do. With a single warp (grid 1, block 32) every rating runs in the given
// order, which is how the tests compare this kernel with the Numba kernel rating by rating.
//
// Memory: every lane reads only the factor entries it owns and writes them back, so a lane always
// sees its own previous update of a row. G_u is needed by all lanes: every lane stores the same
// new value (each computed it from the same butterfly sums and the same old value), so the next
// rating's read of G_u by any lane returns that value without a warp barrier or atomics (the
// host shim has neither __syncwarp nor atomics). No shared memory.
#include "common.cuh"

namespace gpumf {

__device__ __forceinline__ int warp_min_int(int v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        const int other = __shfl_xor_sync(kFullWarp, v, offset);
        v = other < v ? other : v;
    }
    return v;
}

__device__ __forceinline__ float warp_sum_float(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(kFullWarp, v, offset);
    }
    return v;
}

template <int DPL>
__device__ __forceinline__ void sgd_pruned_cell(
    const int* __restrict__ users, const int* __restrict__ items,
    const float* __restrict__ ratings, long long n, float* __restrict__ P,
    float* __restrict__ Q, float* __restrict__ GP, float* __restrict__ GQ, int rank, float step,
    float reg, float threshold_p, float threshold_q, int adagrad, int regrowth,
    double* __restrict__ sse_out, long long* __restrict__ macs_out) {
    const int lane = threadIdx.x % kWarpSize;
    const long long warps_per_block = blockDim.x / kWarpSize;
    const long long warp = (long long)blockIdx.x * warps_per_block + threadIdx.x / kWarpSize;
    const long long n_warps = (long long)gridDim.x * warps_per_block;
    const long long begin = n * warp / n_warps;
    const long long end = n * (warp + 1) / n_warps;
    const int chunks = (rank + kWarpSize - 1) / kWarpSize;
    const float inv_rank = 1.0f / (float)rank;

    double sse = 0.0;
    long long macs = 0;
    for (long long pos = begin; pos < end; ++pos) {
        const long long u = users[pos];
        const long long i = items[pos];
        float* p = P + u * rank;
        float* q = Q + i * rank;

        // Load chunk by chunk until the first insignificant dimension is known (warp-uniform).
        float pv[DPL];
        float qv[DPL];
        int stop = rank;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            pv[c] = 0.0f;
            qv[c] = 0.0f;
            if (c < chunks && c * kWarpSize < stop) {
                const int d = c * kWarpSize + lane;
                int first = rank;
                if (d < rank) {
                    pv[c] = p[d];
                    qv[c] = q[d];
                    if (fabsf(pv[c]) < threshold_p || fabsf(qv[c]) < threshold_q) first = d;
                }
                const int chunk_first = warp_min_int(first);
                stop = chunk_first < stop ? chunk_first : stop;
            }
        }

        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            if (c * kWarpSize + lane < stop) dot += pv[c] * qv[c];
        }
        dot = warp_sum_float(dot);
        const float error = ratings[pos] - dot;
        const float g_u = GP[u];
        const float g_i = GQ[i];
        const float eta_p = adagrad ? step / sqrtf(g_u) : step;
        const float eta_q = adagrad ? step / sqrtf(g_i) : step;

        // d* lies in a chunk that was loaded (finding it needed that chunk), so with regrowth the
        // lane owning d* already holds p[d*] and q[d*] in registers.
        const int updated = (regrowth && stop < rank) ? stop + 1 : stop;
        float gp_squares = 0.0f;
        float gq_squares = 0.0f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = c * kWarpSize + lane;
            if (d < updated) {
                const float gp = -error * qv[c] + reg * pv[c];
                const float gq = -error * pv[c] + reg * qv[c];
                gp_squares += gp * gp;
                gq_squares += gq * gq;
                p[d] = pv[c] - eta_p * gp;
                q[d] = qv[c] - eta_q * gq;
            }
        }
        if (adagrad) {
            gp_squares = warp_sum_float(gp_squares);
            gq_squares = warp_sum_float(gq_squares);
            GP[u] = g_u + gp_squares * inv_rank;
            GQ[i] = g_i + gq_squares * inv_rank;
        }
        sse += (double)error * (double)error;
        macs += stop;
    }
    if (lane == 0) {
        sse_out[warp] = sse;
        macs_out[warp] = macs;
    }
}

}  // namespace gpumf

// One entry point per dimensions-per-lane DPL (rank <= 32 * DPL); see sgd/pruned_cuda.py.
#define GPUMF_SGD_PRUNED_ENTRY(DPL)                                                                \
    extern "C" __global__ void __launch_bounds__(256) sgd_pruned_d##DPL(                          \
        const int* __restrict__ users, const int* __restrict__ items,                             \
        const float* __restrict__ ratings, long long n, float* __restrict__ P,                    \
        float* __restrict__ Q, float* __restrict__ GP, float* __restrict__ GQ, int rank,          \
        float step, float reg, float threshold_p, float threshold_q, int adagrad, int regrowth,   \
        double* __restrict__ sse_out, long long* __restrict__ macs_out) {                         \
        gpumf::sgd_pruned_cell<DPL>(users, items, ratings, n, P, Q, GP, GQ, rank, step, reg,      \
                                    threshold_p, threshold_q, adagrad, regrowth, sse_out,         \
                                    macs_out);                                                    \
    }

GPUMF_SGD_PRUNED_ENTRY(1)
GPUMF_SGD_PRUNED_ENTRY(2)
GPUMF_SGD_PRUNED_ENTRY(4)
GPUMF_SGD_PRUNED_ENTRY(8)
