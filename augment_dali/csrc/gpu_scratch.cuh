// Stream-ordered temporary GPU memory for the CUDA backends.
#ifndef MEDSWAV_GPU_SCRATCH_CUH_
#define MEDSWAV_GPU_SCRATCH_CUH_

#include <cstdint>

#include "dali/kernels/dynamic_scratchpad.h"
#include "kernels/device_alloc.cuh"

namespace medswav {

// Scratch allocations live until the scratchpad goes out of scope and are released in the order of
// the workspace stream, so kernels still queued on it keep valid buffers.
using Scratchpad = dali::kernels::DynamicScratchpad;

// The allocator the DALI-free launchers of kernels/*.cuh take (see kernels/device_alloc.cuh).
struct ScratchpadAlloc {
  Scratchpad &scratch;
  void *gpu(size_t bytes) { return scratch.AllocateGPU<uint8_t>(bytes, 256); }
  void *pinned(size_t bytes) { return scratch.Allocate<dali::mm::memory_kind::pinned, uint8_t>(bytes, 256); }
};

// Runs a launcher, turning its exceptions into DALI errors that name the operator.
template <typename Fn>
void launch_or_raise(const char *op, Fn &&fn) {
  try {
    fn();
  } catch (const std::exception &e) {
    DALI_FAIL(dali::make_string("medswav.", op, ": ", e.what()));
  }
}

}  // namespace medswav

#endif  // MEDSWAV_GPU_SCRATCH_CUH_
