// Temporary memory for the DALI-free launchers in kernels/*.cuh. A launcher takes an allocator `alloc`
// with two members:
//   void *gpu(size_t bytes)     device memory valid until every kernel the launcher queued has run
//   void *pinned(size_t bytes)  page-locked host memory, same lifetime (for asynchronous uploads)
// The DALI operators pass an adapter over their stream-ordered Scratchpad (gpu_scratch.cuh); the
// harness passes one that frees after synchronising (harness/harness_gpu.cu).
#ifndef MEDSWAV_KERNELS_DEVICE_ALLOC_CUH_
#define MEDSWAV_KERNELS_DEVICE_ALLOC_CUH_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace medswav {
namespace gpu {

// Raises on a CUDA error (library code raises; the DALI operators turn it into a DALI error).
inline void check_cuda(cudaError_t e, const char *what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Copies host data to the device through pinned memory (a truly asynchronous copy on `stream`).
template <typename T, typename Alloc>
T *upload(Alloc &alloc, cudaStream_t stream, const std::vector<T> &host) {
  if (host.empty()) return nullptr;
  size_t bytes = host.size() * sizeof(T);
  void *pinned = alloc.pinned(bytes);
  std::memcpy(pinned, host.data(), bytes);
  T *dev = static_cast<T *>(alloc.gpu(bytes));
  check_cuda(cudaMemcpyAsync(dev, pinned, bytes, cudaMemcpyHostToDevice, stream), "upload");
  return dev;
}

// Samples per launch along gridDim.y / gridDim.z (their hardware limit).
constexpr int kMaxGridYZ = 65535;

}  // namespace gpu
}  // namespace medswav

#endif  // MEDSWAV_KERNELS_DEVICE_ALLOC_CUH_
