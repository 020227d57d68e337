#include "gpu_scratch.cuh"
#include "kernels/multicrop.cuh"
#include "multicrop.h"

namespace medswav {

template <>
void MultiCrop<GPUBackend>::RunImpl(Workspace &ws) {
  std::vector<int> group_start;
  auto descs = crop_descs(ws, &group_start);
  Scratchpad scratch(ws.stream());
  ScratchpadAlloc alloc{scratch};
  launch_or_raise("multicrop", [&] { gpu::multicrop(descs, group_start, crop_depths_now(), crop_sizes_, alloc, ws.stream()); });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Multicrop, ::medswav::MultiCrop<::dali::GPUBackend>, ::dali::GPU);
