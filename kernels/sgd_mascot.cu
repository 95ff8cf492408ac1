// MascotMF: the SGD update of one DSGD cell with FP16 parameter storage and group-wise precision
// (MASCOT, Ko et al., ICDM 2021), and the per-group sums MASCOT's g-switching needs.
//
// For each rating (u, i, r) of the cell, with p = P[u] and q = Q[i] widened to float32:
//   e  = r - p . q
//   gp = e q - reg p            gq = e p - reg q            (from the old p and q)
//   P[u] = store(p + lr gp)     Q[i] = store(q + lr gq)
// store() rounds to the row's storage: __half (round to nearest even) for rows of FP16 groups,
// float for rows of FP32 groups. All arithmetic is float32 (MASCOT-N1 semantics, used by every
// storage mode; docs/mascot.md says why). spark_gpu_mf/sgd/mascot_numba.py is the same update on
// the CPU.
//
// Row storage of a block: `half` (rows x rank __half) holds the rows of FP16 groups, `single`
// (rows x rank float) those of FP32 groups; slot[row] is the row's position in the array of its
// group's precision, group[row] its group, group_fp32[group] != 0 when the group is FP32.
//
// Design: one warp per rating, the rank spread over the lanes: lane l owns dimensions l, l + 32,
// ... (DPL of them, in registers), so ranks up to 32 * DPL. A warp's loads of a row are contiguous
// (64 bytes per 32 halves: two full 32-byte sectors), the dot product is a butterfly sum of xor
// shuffles that leaves the same total in every lane. Each warp runs a contiguous slice of the
// cell's ratings in order (warp w: [n w / W, n (w + 1) / W)); DSGD guarantees no other task
// touches the cell's rows, and within the cell the warps update rows Hogwild-style, as MASCOT's
// own kernel does. With a single warp every rating runs in the given order, which is how the
// tests compare this kernel with the Numba kernel.
//
// g-switching statistics (collect != 0): the last ceil(sample_ratio * len) ratings of every warp's
// slice are sampled (MASCOT samples each worker's last updates). The sampled update vectors go to
// `user_records` / `item_records` (rows record_offset[w] + j, j-th sampled rating of warp w; the
// host computes the offsets from the same slicing), and mascot_group_sums adds them per group in
// a fixed order. This keeps the statistics deterministic and needs no atomics (which the host shim
// does not have) at the cost of a buffer of sampled-ratings x rank floats per side. Each sampled
// update also records two scalars per side in `user_rounding` / `item_rounding` (rows
// 2 record, 2 record + 1): |store_half(x) - x|^2 for the new value x = p + lr gp (what float16
// rounding would change of it) and |lr gp|^2 (the update asked for), for the `rounding` switch
// rule; the host adds them per group.
//
// Memory: every lane reads only the entries it owns and writes them back, so a lane always sees
// its own previous update of a row; no shared memory, no barriers.
#include "common.cuh"

namespace gpumf {

__device__ __forceinline__ float mascot_warp_sum(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(kFullWarp, v, offset);
    }
    return v;
}

// Loads this lane's entries of one row from the storage of its precision.
template <int DPL>
__device__ __forceinline__ void mascot_load_row(const __half* __restrict__ half,
                                                const float* __restrict__ single, bool fp32,
                                                long long slot, int rank, int lane,
                                                float (&out)[DPL]) {
    const long long base = slot * rank;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
        const int d = c * kWarpSize + lane;
        out[c] = 0.0f;
        if (d < rank) out[c] = fp32 ? single[base + d] : __half2float(half[base + d]);
    }
}

template <int DPL>
__device__ __forceinline__ void mascot_store_row(__half* __restrict__ half,
                                                 float* __restrict__ single, bool fp32,
                                                 long long slot, int rank, int lane,
                                                 const float (&values)[DPL]) {
    const long long base = slot * rank;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
        const int d = c * kWarpSize + lane;
        if (d < rank) {
            if (fp32) {
                single[base + d] = values[c];
            } else {
                half[base + d] = __float2half_rn(values[c]);
            }
        }
    }
}

// One sampled update of one side: its update vector g into `record`, and into `rounding` (lane 0)
// |store_half(x) - x|^2 and |lr g|^2 for the new float32 value x = p + lr g.
template <int DPL>
__device__ __forceinline__ void mascot_record_update(float* __restrict__ record,
                                                     float* __restrict__ rounding,
                                                     const float (&g)[DPL], const float (&x)[DPL],
                                                     float lr, int rank, int lane) {
    float rounded = 0.0f;
    float step = 0.0f;
#pragma unroll
    for (int c = 0; c < DPL; ++c) {
        const int d = c * kWarpSize + lane;
        if (d < rank) {
            record[d] = g[c];
            const float lost = __half2float(__float2half_rn(x[c])) - x[c];
            rounded = fmaf(lost, lost, rounded);
            step = fmaf(lr * g[c], lr * g[c], step);
        }
    }
    rounded = mascot_warp_sum(rounded);
    step = mascot_warp_sum(step);
    if (lane == 0) {
        rounding[0] = rounded;
        rounding[1] = step;
    }
}

template <int DPL>
__device__ __forceinline__ void mascot_sgd_cell(
    const int* __restrict__ users, const int* __restrict__ items,
    const float* __restrict__ ratings, long long n, __half* __restrict__ user_half,
    float* __restrict__ user_single, const int* __restrict__ user_slot,
    const int* __restrict__ user_group, const unsigned char* __restrict__ user_group_fp32,
    __half* __restrict__ item_half, float* __restrict__ item_single,
    const int* __restrict__ item_slot, const int* __restrict__ item_group,
    const unsigned char* __restrict__ item_group_fp32, int rank, float lr, float reg, int collect,
    double sample_ratio, const long long* __restrict__ record_offset,
    float* __restrict__ user_records, float* __restrict__ item_records,
    float* __restrict__ user_rounding, float* __restrict__ item_rounding,
    double* __restrict__ sse_out) {
    const int lane = threadIdx.x % kWarpSize;
    const long long warps_per_block = blockDim.x / kWarpSize;
    const long long warp = (long long)blockIdx.x * warps_per_block + threadIdx.x / kWarpSize;
    const long long n_warps = (long long)gridDim.x * warps_per_block;
    const long long begin = n * warp / n_warps;
    const long long end = n * (warp + 1) / n_warps;
    const long long sampled_from =
        collect ? end - (long long)ceil(sample_ratio * (double)(end - begin)) : end;
    long long record = collect ? record_offset[warp] : 0;

    double sse = 0.0;
    for (long long pos = begin; pos < end; ++pos) {
        const int u = users[pos];
        const int i = items[pos];
        const bool u_fp32 = user_group_fp32[user_group[u]] != 0;
        const bool i_fp32 = item_group_fp32[item_group[i]] != 0;
        const long long u_slot = user_slot[u];
        const long long i_slot = item_slot[i];
        float p[DPL];
        float q[DPL];
        mascot_load_row<DPL>(user_half, user_single, u_fp32, u_slot, rank, lane, p);
        mascot_load_row<DPL>(item_half, item_single, i_fp32, i_slot, rank, lane, q);

        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < DPL; ++c) dot = fmaf(p[c], q[c], dot);
        dot = mascot_warp_sum(dot);
        const float error = ratings[pos] - dot;

        float gp[DPL];
        float gq[DPL];
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            gp[c] = fmaf(error, q[c], -reg * p[c]);
            gq[c] = fmaf(error, p[c], -reg * q[c]);
            p[c] = fmaf(lr, gp[c], p[c]);
            q[c] = fmaf(lr, gq[c], q[c]);
        }
        mascot_store_row<DPL>(user_half, user_single, u_fp32, u_slot, rank, lane, p);
        mascot_store_row<DPL>(item_half, item_single, i_fp32, i_slot, rank, lane, q);
        if (pos >= sampled_from) {  // warp-uniform; one side, then the other: fewer live registers
            mascot_record_update<DPL>(user_records + record * rank, user_rounding + 2 * record, gp,
                                      p, lr, rank, lane);
            mascot_record_update<DPL>(item_records + record * rank, item_rounding + 2 * record, gq,
                                      q, lr, rank, lane);
            ++record;
        }
        sse += (double)error * (double)error;
    }
    if (lane == 0 && warp < n_warps) sse_out[warp] = sse;
}

}  // namespace gpumf

// One entry point per dimensions-per-lane DPL (rank <= 32 * DPL); see sgd/mascot_cuda.py.
#define GPUMF_MASCOT_SGD_ENTRY(DPL)                                                                \
    extern "C" __global__ void __launch_bounds__(256) mascot_sgd_d##DPL(                          \
        const int* __restrict__ users, const int* __restrict__ items,                             \
        const float* __restrict__ ratings, long long n, __half* __restrict__ user_half,           \
        float* __restrict__ user_single, const int* __restrict__ user_slot,                       \
        const int* __restrict__ user_group, const unsigned char* __restrict__ user_group_fp32,    \
        __half* __restrict__ item_half, float* __restrict__ item_single,                          \
        const int* __restrict__ item_slot, const int* __restrict__ item_group,                    \
        const unsigned char* __restrict__ item_group_fp32, int rank, float lr, float reg,         \
        int collect, double sample_ratio, const long long* __restrict__ record_offset,            \
        float* __restrict__ user_records, float* __restrict__ item_records,                       \
        float* __restrict__ user_rounding, float* __restrict__ item_rounding,                     \
        double* __restrict__ sse_out) {                                                           \
        gpumf::mascot_sgd_cell<DPL>(users, items, ratings, n, user_half, user_single, user_slot,  \
                                    user_group, user_group_fp32, item_half, item_single,          \
                                    item_slot, item_group, item_group_fp32, rank, lr, reg,        \
                                    collect, sample_ratio, record_offset, user_records,           \
                                    item_records, user_rounding, item_rounding, sse_out);         \
    }

GPUMF_MASCOT_SGD_ENTRY(1)
GPUMF_MASCOT_SGD_ENTRY(2)
GPUMF_MASCOT_SGD_ENTRY(4)
GPUMF_MASCOT_SGD_ENTRY(8)

// Per-group sums of sampled update vectors, in a fixed order (deterministic, no atomics):
//   sums[g][d]    = sum over the records r of group g of records[r][d]
//   squares[g][d] = sum over the same records of records[r][d]^2
// in float64; the records of group g are order[group_ptr[g] .. group_ptr[g + 1]). Groups that are
// FP32 (group_fp32[g] != 0) get zeros: MASCOT no longer measures them. Grid (groups,
// ceil(rank / blockDim.x)), one thread per (group, dimension); a warp reads 32 consecutive floats
// of a record.
extern "C" __global__ void __launch_bounds__(256) mascot_group_sums(
    const float* __restrict__ records, const long long* __restrict__ order,
    const long long* __restrict__ group_ptr, const unsigned char* __restrict__ group_fp32,
    int rank, double* __restrict__ sums, double* __restrict__ squares) {
    const int group = blockIdx.x;
    const int d = blockIdx.y * blockDim.x + threadIdx.x;
    if (d >= rank) return;
    double sum = 0.0;
    double square = 0.0;
    if (group_fp32[group] == 0) {
        for (long long r = group_ptr[group]; r < group_ptr[group + 1]; ++r) {
            const double v = records[order[r] * rank + d];
            sum += v;
            square += v * v;
        }
    }
    sums[(long long)group * rank + d] = sum;
    squares[(long long)group * rank + d] = square;
}
