// Batched point-wise intensity kernels (gamma, linear) without DALI: one launch per batch
// (blockIdx.y = sample, chunks of kMaxGridYZ), the per-pixel math of math/intensity.h.
#ifndef MEDSWAV_KERNELS_POINTWISE_CUH_
#define MEDSWAV_KERNELS_POINTWISE_CUH_

#include <algorithm>
#include <vector>

#include "kernels/device_alloc.cuh"
#include "math/intensity.h"

namespace medswav {
namespace gpu {

// gamma: a = gamma; linear: a = scale, b = shift.
struct PointwiseSample {
  const float *in;
  float *out;
  int64_t n;
  float a, b;
};

struct GammaOp {
  MSW_HD float operator()(float x, const PointwiseSample &s) const { return gamma_px(x, s.a); }
};
struct LinearOp {
  MSW_HD float operator()(float x, const PointwiseSample &s) const { return linear_px(x, s.a, s.b); }
};

template <typename Op>
__global__ void pointwise_kernel(const PointwiseSample *samples, Op op) {
  const PointwiseSample s = samples[blockIdx.y];
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < s.n; k += int64_t(gridDim.x) * blockDim.x)
    s.out[k] = op(s.in[k], s);
}

template <typename Op, typename Alloc>
void pointwise(const std::vector<PointwiseSample> &all, Op op, Alloc &alloc, cudaStream_t stream) {
  std::vector<PointwiseSample> samples;
  int64_t max_n = 0;
  for (const auto &s : all)
    if (s.n > 0) {
      samples.push_back(s);
      max_n = std::max(max_n, s.n);
    }
  if (samples.empty()) return;
  const PointwiseSample *dev = upload(alloc, stream, samples);
  int n = static_cast<int>(samples.size());
  unsigned gx = static_cast<unsigned>(std::min<int64_t>((max_n + 255) / 256, 1024));
  for (int first = 0; first < n; first += kMaxGridYZ)
    pointwise_kernel<<<dim3(gx, std::min(n - first, kMaxGridYZ)), 256, 0, stream>>>(dev + first, op);
  check_cuda(cudaGetLastError(), "pointwise kernel");
}

}  // namespace gpu
}  // namespace medswav

#endif  // MEDSWAV_KERNELS_POINTWISE_CUH_
