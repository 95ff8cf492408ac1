// Helpers shared by the spark_gpu_mf CUDA kernels (hermitian.cu, cg_solver.cu).
//
// The kernels are compiled three ways: by NVRTC through cupy.RawModule on GPU executors, by
// nvcc/NVRTC in the compile tests (ptxas resource report), and by g++ through the host shim in
// tests/cuda_shim/ (correctness and ThreadSanitizer runs on machines without a GPU). That is why
// the code sticks to: extern "C" entry points, no inline PTX, no cooperative groups, and dynamic
// shared memory declared only through GPUMF_DYNAMIC_SMEM (the shim predefines it).
#pragma once

#include <cuda_fp16.h>

#ifndef GPUMF_DYNAMIC_SMEM
// The one dynamic shared-memory declaration of a kernel, 16-byte aligned for float4 loads.
#define GPUMF_DYNAMIC_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace gpumf {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;

// Loads T consecutive floats from shared memory into registers; float4 loads when T % 4 == 0
// (the caller guarantees 16-byte alignment: row strides and tile offsets are multiples of 4).
template <int T>
__device__ __forceinline__ void load_floats(float (&out)[T], const float* src) {
    if constexpr (T % 4 == 0) {
        const float4* v = reinterpret_cast<const float4*>(src);
#pragma unroll
        for (int i = 0; i < T / 4; ++i) {
            const float4 f = v[i];
            out[4 * i + 0] = f.x;
            out[4 * i + 1] = f.y;
            out[4 * i + 2] = f.z;
            out[4 * i + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < T; ++i) out[i] = src[i];
    }
}

// Compensated (Kahan) accumulation: after any number of calls, sum - comp is the exact sum of
// the added values up to O(eps) * |sum|, independently of how many values were added.
__device__ __forceinline__ void kahan_add(float& sum, float& comp, float value) {
    const float y = value - comp;
    const float t = sum + y;
    comp = (t - sum) - y;
    sum = t;
}

// Converts a float32/float64 value to the storage type of a matrix.
__device__ __forceinline__ float load_as_float(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const __half* p, long long i) {
    return __half2float(p[i]);
}

__device__ __forceinline__ void store_value(float* p, long long i, double v) { p[i] = (float)v; }
__device__ __forceinline__ void store_value(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void store_value(__half* p, long long i, double v) {
    p[i] = __double2half(v);
}

// Sum of N values over a whole thread block, returned to every thread, in a fixed order (so the
// result is deterministic). blockDim.x must be a multiple of 32; every thread must call it.
// scratch: shared memory of at least N * (blockDim.x / 32) floats, reused after the call.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float* scratch) {
#pragma unroll
    for (int n = 0; n < N; ++n) {
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
            v[n] += __shfl_xor_sync(kFullWarp, v[n], offset);
        }
    }
    const int warp = threadIdx.x / kWarpSize;
    const int n_warps = blockDim.x / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) {
#pragma unroll
        for (int n = 0; n < N; ++n) scratch[n * n_warps + warp] = v[n];
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < N; ++n) {
        float total = 0.0f;
        for (int w = 0; w < n_warps; ++w) total += scratch[n * n_warps + w];
        v[n] = total;
    }
    __syncthreads();
}

// The power-of-two scale that puts the largest |entry| of a row's matrix in [2^13, 2^14), so that
// its float16 copy keeps 11 significant bits and can never overflow (float16's max is 65504).
// Same rule as numpy_backend._fp16_scaled.
__device__ __forceinline__ double fp16_scale_for_peak(double peak) {
    return peak > 0.0 ? ldexp(1.0, ilogb(peak) - 13) : 1.0;
}

}  // namespace gpumf
