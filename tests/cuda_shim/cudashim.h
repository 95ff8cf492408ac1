// A CUDA execution model on the CPU, just large enough to run the unchanged kernels/*.cu.
//
// Every CUDA thread of a block is a fiber (default: ucontext, one OS thread, deterministic) or an
// std::thread (-DCUDASHIM_THREADS, for ThreadSanitizer). Blocks run one after the other.
// __syncthreads is a block barrier, __shfl_xor_sync exchanges through a per-warp buffer between two
// warp barriers, threads that return drop out of both barriers (as on Volta and later). Dynamic
// shared memory is one buffer per launch, filled with 0xff bytes (float NaN) before every block
// so that reading it before writing shows up. In fiber mode a barrier that can never complete
// aborts with a message instead of hanging.
//
// Not modelled: blocks running at the same time, the weak GPU memory model, lockstep warps,
// timing. See docs/performance.md and the shared gpu-verification notes.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
    float x, y, z, w;
};

namespace cudashim {

struct ThreadContext {
    uint3 thread_idx;
    unsigned linear;  // threadIdx flattened
};

ThreadContext* current();
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;
void* dynamic_smem();
void syncthreads();
// Exchanges 8 bytes with the other lanes of the warp; returns the value of lane `src_lane`.
std::uint64_t warp_exchange(std::uint64_t mine, unsigned src_lane);

template <typename T>
T shfl_xor(T value, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
    std::uint64_t bits = 0;
    __builtin_memcpy(&bits, &value, sizeof(T));
    const unsigned lane = current()->linear % 32;
    bits = warp_exchange(bits, lane ^ static_cast<unsigned>(lane_mask));
    T out;
    __builtin_memcpy(&out, &bits, sizeof(T));
    return out;
}

}  // namespace cudashim

#define threadIdx (::cudashim::current()->thread_idx)
#define blockIdx (::cudashim::g_block_idx)
#define blockDim (::cudashim::g_block_dim)
#define gridDim (::cudashim::g_grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define GPUMF_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::cudashim::dynamic_smem())

inline void __syncthreads() { ::cudashim::syncthreads(); }
template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: full warps only*/, T value, int lane_mask) {
    return ::cudashim::shfl_xor(value, lane_mask);
}
