// Stand-in for CUDA's <cuda_fp16.h> when tests/cuda_shim compiles kernels/*.cu with g++:
// __half is the compiler's IEEE binary16 type and every conversion rounds once, to nearest even,
// like the device intrinsics of the same names.
#pragma once

using __half = _Float16;

inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half(float f) { return static_cast<__half>(f); }
inline __half __float2half_rn(float f) { return static_cast<__half>(f); }
inline __half __double2half(double d) { return static_cast<__half>(d); }
