// Marks per-element math shared by the CPU and CUDA backends: the CPU tests exercise exactly the
// functions the GPU kernels call.
#ifndef MEDSWAV_MATH_HOST_DEVICE_H_
#define MEDSWAV_MATH_HOST_DEVICE_H_

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSW_HD __host__ __device__ __forceinline__
#else
#define MSW_HD inline __attribute__((always_inline))
#endif

namespace medswav {

template <typename T>
MSW_HD T clamp_value(T v, T lo, T hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_HOST_DEVICE_H_
