// Stream-ordered temporary GPU memory for the CUDA backends.
#ifndef MEDSWAV_GPU_SCRATCH_CUH_
#define MEDSWAV_GPU_SCRATCH_CUH_

#include <algorithm>
#include <vector>

#include "dali/kernels/dynamic_scratchpad.h"

namespace medswav {

// Scratch allocations live until the scratchpad goes out of scope and are released in the order of
// the workspace stream, so kernels still queued on it keep valid buffers.
using Scratchpad = dali::kernels::DynamicScratchpad;

// Copies host data to the device through pinned memory (a truly asynchronous copy on `stream`).
template <typename T>
T *upload(Scratchpad &scratch, cudaStream_t stream, const std::vector<T> &host) {
  if (host.empty()) return nullptr;
  T *pinned = scratch.Allocate<dali::mm::memory_kind::pinned, T>(host.size());
  std::copy(host.begin(), host.end(), pinned);
  T *dev = scratch.AllocateGPU<T>(host.size());
  CUDA_CALL(cudaMemcpyAsync(dev, pinned, host.size() * sizeof(T), cudaMemcpyHostToDevice, stream));
  return dev;
}

}  // namespace medswav

#endif  // MEDSWAV_GPU_SCRATCH_CUH_
