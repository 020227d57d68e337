// CUDA backend of rescale without DALI: one launch per batch (blockIdx.z = sample, chunks of
// kMaxGridYZ), grid-stride over each output so any size fits the grid limits. Volumes (d > 1) stride
// over their od * oh output rows in y (64-bit row index); images are volumes of one plane.
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
  int d, h, w, od, oh, ow;
};

__global__ void rescale_kernel(const RescaleSample *samples) {
  const RescaleSample s = samples[blockIdx.z];
  int64_t rows = int64_t(s.od) * s.oh;
  for (int64_t r = blockIdx.y * int64_t(blockDim.y) + threadIdx.y; r < rows; r += int64_t(gridDim.y) * blockDim.y) {
    int z = static_cast<int>(r / s.oh), y = static_cast<int>(r % s.oh);
    float sz = resample_src_coord(z, s.d, s.od), sy = resample_src_coord(y, s.h, s.oh);
    for (int x = blockIdx.x * blockDim.x + threadIdx.x; x < s.ow; x += gridDim.x * blockDim.x)
      s.dst[r * s.ow + x] = trilinear_at(s.src, s.d, s.h, s.w, sz, sy, resample_src_coord(x, s.w, s.ow));
  }
}

template <typename Alloc>
void rescale(const std::vector<RescaleSample> &all, Alloc &alloc, cudaStream_t stream) {
  std::vector<RescaleSample> samples;  // an empty input or output has nothing to compute
  int64_t max_rows = 0;
  int max_ow = 0;
  for (const auto &s : all) {
    if (int64_t(s.od) * s.oh * s.ow == 0 || int64_t(s.d) * s.h * s.w == 0) continue;
    samples.push_back(s);
    max_rows = std::max(max_rows, int64_t(s.od) * s.oh);
    max_ow = std::max(max_ow, s.ow);
  }
  if (samples.empty()) return;
  const RescaleSample *dev = upload(alloc, stream, samples);
  dim3 block(32, 8);
  int n = static_cast<int>(samples.size());
  for (int first = 0; first < n; first += kMaxGridYZ) {
    dim3 grid(std::min((max_ow + 31) / 32, 64), static_cast<int>(std::min<int64_t>((max_rows + 7) / 8, 1024)), std::min(n - first, kMaxGridYZ));
    rescale_kernel<<<grid, block, 0, stream>>>(dev + first);
  }
  check_cuda(cudaGetLastError(), "rescale kernel");
}

}  // namespace gpu
}  // namespace medswav

#endif  // MEDSWAV_KERNELS_RESCALE_CUH_
