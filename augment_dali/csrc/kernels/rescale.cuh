// CUDA backend of rescale without DALI: one launch per batch (blockIdx.z = sample, chunks of
// kMaxGridYZ), grid-stride over each output so any size fits the grid limits.
#ifndef MEDSWAV_KERNELS_RESCALE_CUH_
#define MEDSWAV_KERNELS_RESCALE_CUH_

#include <algorithm>
#include <vector>

#include "kernels/device_alloc.cuh"
#include "math/resample.h"

namespace medswav {
namespace gpu {

struct RescaleSample {
  const float *src;
  float *dst;
  int h, w, oh, ow;
};

__global__ void rescale_kernel(const RescaleSample *samples) {
  const RescaleSample s = samples[blockIdx.z];
  for (int y = blockIdx.y * blockDim.y + threadIdx.y; y < s.oh; y += gridDim.y * blockDim.y) {
    float sy = resample_src_coord(y, s.h, s.oh);
    for (int x = blockIdx.x * blockDim.x + threadIdx.x; x < s.ow; x += gridDim.x * blockDim.x)
      s.dst[int64_t(y) * s.ow + x] = bilinear_at(s.src, s.h, s.w, sy, resample_src_coord(x, s.w, s.ow));
  }
}

template <typename Alloc>
void rescale(const std::vector<RescaleSample> &all, Alloc &alloc, cudaStream_t stream) {
  std::vector<RescaleSample> samples;  // an empty input or output has nothing to compute
  int max_oh = 0, max_ow = 0;
  for (const auto &s : all) {
    if (int64_t(s.oh) * s.ow == 0 || int64_t(s.h) * s.w == 0) continue;
    samples.push_back(s);
    max_oh = std::max(max_oh, s.oh);
    max_ow = std::max(max_ow, s.ow);
  }
  if (samples.empty()) return;
  const RescaleSample *dev = upload(alloc, stream, samples);
  dim3 block(32, 8);
  int n = static_cast<int>(samples.size());
  for (int first = 0; first < n; first += kMaxGridYZ) {
    dim3 grid(std::min((max_ow + 31) / 32, 64), std::min((max_oh + 7) / 8, 1024), std::min(n - first, kMaxGridYZ));
    rescale_kernel<<<grid, block, 0, stream>>>(dev + first);
  }
  check_cuda(cudaGetLastError(), "rescale kernel");
}

}  // namespace gpu
}  // namespace medswav

#endif  // MEDSWAV_KERNELS_RESCALE_CUH_
