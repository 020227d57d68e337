#include "rescale.h"

namespace medswav {
namespace {

__global__ void rescale_kernel(const float *src, int h, int w, float *dst, int oh, int ow) {
  int x = blockIdx.x * blockDim.x + threadIdx.x;
  int y = blockIdx.y * blockDim.y + threadIdx.y;
  if (x >= ow || y >= oh) return;
  dst[int64_t(y) * ow + x] =
      bilinear_at(src, h, w, resample_src_coord(y, h, oh), resample_src_coord(x, w, ow));
}

}  // namespace

template <>
void Rescale<GPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(in.GetLayout());
  for (int i = 0; i < in.num_samples(); i++) {
    auto is = in.shape()[i], os = out.shape()[i];
    int oh = os[0], ow = os[1];
    if (int64_t(oh) * ow == 0) continue;
    dim3 block(32, 8), grid((ow + 31) / 32, (oh + 7) / 8);
    rescale_kernel<<<grid, block, 0, ws.stream()>>>(in.tensor<float>(i), is[0], is[1],
                                                    out.mutable_tensor<float>(i), oh, ow);
  }
  CUDA_CALL(cudaGetLastError());
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Rescale, ::medswav::Rescale<::dali::GPUBackend>, ::dali::GPU);
