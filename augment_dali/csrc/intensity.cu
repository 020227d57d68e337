#include "intensity.h"

namespace medswav {
namespace {

__global__ void gamma_kernel(const float *in, float *out, int64_t n, float g) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x)
    out[k] = gamma_px(in[k], g);
}

__global__ void linear_kernel(const float *in, float *out, int64_t n, float a, float b) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x)
    out[k] = linear_px(in[k], a, b);
}

inline int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096)); }

}  // namespace

template <>
void Gamma<GPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(in.GetLayout());
  for (int i = 0; i < in.num_samples(); i++) {
    int64_t n = in.shape().tensor_size(i);
    if (n == 0) continue;
    gamma_kernel<<<grid_for(n), 256, 0, ws.stream()>>>(in.tensor<float>(i), out.mutable_tensor<float>(i),
                                                      n, arg_at(gamma_, i));
  }
  CUDA_CALL(cudaGetLastError());
}

template <>
void Linear<GPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(in.GetLayout());
  for (int i = 0; i < in.num_samples(); i++) {
    int64_t n = in.shape().tensor_size(i);
    if (n == 0) continue;
    linear_kernel<<<grid_for(n), 256, 0, ws.stream()>>>(in.tensor<float>(i), out.mutable_tensor<float>(i),
                                                       n, arg_at(scale_, i), arg_at(shift_, i));
  }
  CUDA_CALL(cudaGetLastError());
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Gamma, ::medswav::Gamma<::dali::GPUBackend>, ::dali::GPU);
DALI_REGISTER_OPERATOR(medswav__Linear, ::medswav::Linear<::dali::GPUBackend>, ::dali::GPU);
