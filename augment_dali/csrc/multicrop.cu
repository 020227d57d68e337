#include "gpu_scratch.cuh"
#include "multicrop.h"

namespace medswav {
namespace {

// blockIdx.z: crop index within the group's descriptors.
__global__ void multicrop_kernel(const CropDesc *descs, int s) {
  const CropDesc c = descs[blockIdx.z];
  int x = blockIdx.x * blockDim.x + threadIdx.x;
  int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= s || y >= s) return;
  c.dst[int64_t(y) * s + x] = crop_fetch(c.src, c.h, c.w, c.y0 + y, c.x0 + x);
}

}  // namespace

template <>
void MultiCrop<GPUBackend>::RunImpl(Workspace &ws) {
  std::vector<int> group_start;
  auto descs = crop_descs(ws, &group_start);
  if (descs.empty()) return;
  cudaStream_t stream = ws.stream();
  Scratchpad scratch(stream);
  const CropDesc *dev_descs = upload(scratch, stream, descs);
  for (size_t g = 0; g < crop_sizes_.size(); g++) {
    int count = group_start[g + 1] - group_start[g];
    int s = crop_sizes_[g];
    for (int first = 0; first < count; first += 65535) {  // gridDim.z limit
      dim3 block(32, 8), grid((s + 31) / 32, (s + 7) / 8, std::min(count - first, 65535));
      multicrop_kernel<<<grid, block, 0, stream>>>(dev_descs + group_start[g] + first, s);
    }
  }
  CUDA_CALL(cudaGetLastError());
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Multicrop, ::medswav::MultiCrop<::dali::GPUBackend>, ::dali::GPU);
