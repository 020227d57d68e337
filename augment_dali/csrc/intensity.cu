#include <algorithm>

#include "gpu_scratch.cuh"
#include "intensity.h"

namespace medswav {
namespace {

// One sample of a batched element-wise map: out[k] = px(in[k]) for k < n.
template <typename T, typename Px>
struct MapDesc {
  const T *in;
  float *out;
  int64_t n;
  Px px;
};

// All samples in one launch: blockIdx.y picks the sample, blocks along x stride over its elements.
template <typename T, typename Px>
__global__ void batched_map_kernel(const MapDesc<T, Px> *descs) {
  const MapDesc<T, Px> d = descs[blockIdx.y];
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < d.n; k += int64_t(gridDim.x) * blockDim.x)
    d.out[k] = d.px(static_cast<float>(d.in[k]));
}

constexpr int kBlock = 256;
constexpr int kMaxSamplesPerLaunch = 65535;  // gridDim.y limit

// out[k] = px(in[k]) over every pixel of every sample, px = make_px(i): one kernel launch per batch
// (per 65535 samples), the per-sample descriptors uploaded once.
template <typename T, typename MakePx>
void map_pixels(Workspace &ws, MakePx make_px) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(in.GetLayout());
  using Px = decltype(make_px(0));
  std::vector<MapDesc<T, Px>> descs;
  int64_t longest = 0;
  for (int i = 0; i < in.num_samples(); i++) {
    int64_t n = in.shape().tensor_size(i);
    if (n == 0) continue;
    descs.push_back({in.tensor<T>(i), out.mutable_tensor<float>(i), n, make_px(i)});
    longest = std::max(longest, n);
  }
  if (descs.empty()) return;
  cudaStream_t stream = ws.stream();
  Scratchpad scratch(stream);
  ScratchpadAlloc alloc{scratch};
  const MapDesc<T, Px> *dev = gpu::upload(alloc, stream, descs);
  int blocks_x = static_cast<int>(std::min<int64_t>((longest + 4 * kBlock - 1) / (4 * kBlock), 1024));
  for (size_t first = 0; first < descs.size(); first += kMaxSamplesPerLaunch) {
    int count = static_cast<int>(std::min<size_t>(descs.size() - first, kMaxSamplesPerLaunch));
    batched_map_kernel<<<dim3(blocks_x, count), kBlock, 0, stream>>>(dev + first);
  }
  CUDA_CALL(cudaGetLastError());
}

}  // namespace

template <>
void Gamma<GPUBackend>::RunImpl(Workspace &ws) {
  map_pixels<float>(ws, [&](int i) { return GammaPx{arg_at(gamma_, i)}; });
}

template <>
void Linear<GPUBackend>::RunImpl(Workspace &ws) {
  map_pixels<float>(ws, [&](int i) { return LinearPx{arg_at(scale_, i), arg_at(shift_, i)}; });
}

template <>
void Intensity<GPUBackend>::RunImpl(Workspace &ws) {
  with_input_type(ws.Input<GPUBackend>(0).type(), [&](auto tag) {
    map_pixels<decltype(tag)>(ws, [&](int i) { return IntensityPx{params_[i]}; });
  });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Gamma, ::medswav::Gamma<::dali::GPUBackend>, ::dali::GPU);
DALI_REGISTER_OPERATOR(medswav__Linear, ::medswav::Linear<::dali::GPUBackend>, ::dali::GPU);
DALI_REGISTER_OPERATOR(medswav__Intensity, ::medswav::Intensity<::dali::GPUBackend>, ::dali::GPU);
