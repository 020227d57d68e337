// CUDA backend of multicrop without DALI: one launch per crop group (blockIdx.z = crop, in chunks of
// kMaxGridYZ crops: a batch may hold more than 65,535 crops of one size).
#ifndef MEDSWAV_KERNELS_MULTICROP_CUH_
#define MEDSWAV_KERNELS_MULTICROP_CUH_

#include <algorithm>
#include <vector>

#include "kernels/device_alloc.cuh"
#include "math/crop.h"

namespace medswav {
namespace gpu {

// One crop of depth x s x s per blockIdx.z; y strides over the depth * s output rows (depth 1: 2-D).
__global__ void multicrop_kernel(const CropDesc *descs, int depth, int s) {
  const CropDesc c = descs[blockIdx.z];
  int64_t rows = int64_t(depth) * s;
  for (int64_t r = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; r < rows; r += int64_t(gridDim.y) * blockDim.y) {
    int z = static_cast<int>(r / s), y = static_cast<int>(r % s);
    for (int x = blockIdx.x * blockDim.x + threadIdx.x; x < s; x += gridDim.x * blockDim.x)
      c.dst[r * s + x] = crop_fetch(c.src, c.d, c.h, c.w, c.z0 + z, c.y0 + y, c.x0 + x);
  }
}

// descs: every crop, group-major; group g is descs[group_start[g] .. group_start[g + 1]) of
// crop_depths[g] x crop_sizes[g] x crop_sizes[g] (depth 1 for 2-D images).
template <typename Alloc>
void multicrop(const std::vector<CropDesc> &descs, const std::vector<int> &group_start,
               const std::vector<int> &crop_depths, const std::vector<int> &crop_sizes, Alloc &alloc,
               cudaStream_t stream) {
  if (descs.empty()) return;
  const CropDesc *dev = upload(alloc, stream, descs);
  for (size_t g = 0; g + 1 < group_start.size(); g++) {
    int count = group_start[g + 1] - group_start[g], s = crop_sizes[g], depth = crop_depths[g];
    int64_t rows = int64_t(depth) * s;
    for (int first = 0; first < count; first += kMaxGridYZ) {
      dim3 block(32, 8);
      dim3 grid(std::min((s + 31) / 32, 64), static_cast<int>(std::min<int64_t>((rows + 7) / 8, 1024)), std::min(count - first, kMaxGridYZ));
      multicrop_kernel<<<grid, block, 0, stream>>>(dev + group_start[g] + first, depth, s);
    }
  }
  check_cuda(cudaGetLastError(), "multicrop kernel");
}

}  // namespace gpu
}  // namespace medswav

#endif  // MEDSWAV_KERNELS_MULTICROP_CUH_
