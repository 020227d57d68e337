#include "intensity.h"

namespace medswav {
namespace {

template <typename Px>
__global__ void map_kernel(const float *in, float *out, int64_t n, Px px) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < n;
       k += int64_t(gridDim.x) * blockDim.x)
    out[k] = px(in[k]);
}

inline int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + 255) / 256, 4096)); }

// out[k] = px(in[k]) over every pixel of sample i, px = make_px(i); one launch per sample on ws.stream().
template <typename MakePx>
void map_pixels(Workspace &ws, MakePx make_px) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(in.GetLayout());
  for (int i = 0; i < in.num_samples(); i++) {
    int64_t n = in.shape().tensor_size(i);
    if (n == 0) continue;
    map_kernel<<<grid_for(n), 256, 0, ws.stream()>>>(in.tensor<float>(i), out.mutable_tensor<float>(i), n,
                                                    make_px(i));
  }
  CUDA_CALL(cudaGetLastError());
}

}  // namespace

template <>
void Gamma<GPUBackend>::RunImpl(Workspace &ws) {
  map_pixels(ws, [&](int i) { return GammaPx{arg_at(gamma_, i)}; });
}

template <>
void Linear<GPUBackend>::RunImpl(Workspace &ws) {
  map_pixels(ws, [&](int i) { return LinearPx{arg_at(scale_, i), arg_at(shift_, i)}; });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Gamma, ::medswav::Gamma<::dali::GPUBackend>, ::dali::GPU);
DALI_REGISTER_OPERATOR(medswav__Linear, ::medswav::Linear<::dali::GPUBackend>, ::dali::GPU);
