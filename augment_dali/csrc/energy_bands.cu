#include "energy_bands.h"
#include "gpu_scratch.cuh"
#include "kernels/energy_bands.cuh"

namespace medswav {

// The batched, deterministic launcher of kernels/energy_bands.cuh on the workspace stream.
template <typename Backend, bool EnergiesOnly>
void EnergyBandsImpl<Backend, EnergiesOnly>::RunGPU(Workspace &ws) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(EnergiesOnly ? dali::TensorLayout() : in.GetLayout());
  int n = in.num_samples();
  std::vector<gpu::EnergySample> samples;
  samples.reserve(n);
  for (int i = 0; i < n; i++) {
    auto sh = in.shape()[i];
    samples.push_back(gpu::make_energy_sample(in.tensor<float>(i), out.mutable_tensor<float>(i), sh.data(),
                                              sh.size(), kernels_[i], EnergiesOnly ? nullptr : (*refs_)[i].data));
  }
  Scratchpad scratch(ws.stream());
  ScratchpadAlloc alloc{scratch};
  launch_or_raise(EnergiesOnly ? "band_energies" : "energy_bands",
                  [&] { gpu::energy_bands(std::move(samples), taps_, EnergiesOnly, alloc, ws.stream()); });
}

template <>
void EnergyBands<GPUBackend>::RunImpl(Workspace &ws) { RunGPU(ws); }
template <>
void BandEnergies<GPUBackend>::RunImpl(Workspace &ws) { RunGPU(ws); }

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__EnergyBands, ::medswav::EnergyBands<::dali::GPUBackend>, ::dali::GPU);
DALI_REGISTER_OPERATOR(medswav__BandEnergies, ::medswav::BandEnergies<::dali::GPUBackend>, ::dali::GPU);
