#include "gpu_scratch.cuh"
#include "kernels/rescale.cuh"
#include "rescale.h"

namespace medswav {

template <>
void Rescale<GPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(in.GetLayout());
  std::vector<gpu::RescaleSample> samples;
  for (int i = 0; i < in.num_samples(); i++) {
    auto is = in.shape()[i], os = out.shape()[i];
    int v = is.size() == 3 ? 1 : 0;  // a 2-D image is a volume of one plane
    samples.push_back({in.tensor<float>(i), out.mutable_tensor<float>(i), v ? static_cast<int>(is[0]) : 1,
                       static_cast<int>(is[v]), static_cast<int>(is[v + 1]), v ? static_cast<int>(os[0]) : 1,
                       static_cast<int>(os[v]), static_cast<int>(os[v + 1])});
  }
  Scratchpad scratch(ws.stream());
  ScratchpadAlloc alloc{scratch};
  launch_or_raise("rescale", [&] { gpu::rescale(samples, alloc, ws.stream()); });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Rescale, ::medswav::Rescale<::dali::GPUBackend>, ::dali::GPU);
