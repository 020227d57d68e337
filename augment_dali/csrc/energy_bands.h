// Operator energy_bands: Gaussian-cascade band decomposition with per-band energy rescaling.
// The math (cascade, energies, gains, zero-energy rule) is documented in math/energy.h.
#ifndef MEDSWAV_ENERGY_BANDS_H_
#define MEDSWAV_ENERGY_BANDS_H_

#include <optional>
#include <utility>
#include <vector>

#include "math/cascade.h"
#include "math/energy.h"
#include "math/gaussian.h"
#include "math/recursive_gaussian.h"
#include "op_common.h"

namespace medswav {

// EnergiesOnly == false: operator energy_bands (the augmentation).
// EnergiesOnly == true: operator band_energies, which outputs the len(sigmas) + 1 band energies of each
// sample (the statistics behind ref_energies) from the same cascade code.
template <typename Backend, bool EnergiesOnly>
class EnergyBandsImpl : public dali::StatelessOperator<Backend> {
 public:
  explicit EnergyBandsImpl(const OpSpec &spec)
      : dali::StatelessOperator<Backend>(spec), sigmas_("sigmas", spec) {
    if (!EnergiesOnly) refs_.emplace("ref_energies", spec);
  }

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const char *name = EnergiesOnly ? "band_energies" : "energy_bands";
    const auto &in = float_input<Backend>(ws, name, 1, 3);
    int n = in.num_samples();
    sigmas_.Acquire(this->spec_, ws, n);
    dali::TensorListShape<> band_shape(n, 1);
    kernels_.resize(n);
    taps_.clear();
    for (int i = 0; i < n; i++) {
      auto sig = sigmas_[i];
      int nb = static_cast<int>(sig.num_elements());
      DALI_ENFORCE(nb >= 1 && nb < kMaxBands,
                   dali::make_string("medswav.", name, ": need 1..", kMaxBands - 1, " sigmas, got ", nb));
      auto &k = kernels_[i];
      k.offset.clear();
      k.radius.clear();
      k.recursive.clear();
      for (int b = 0; b < nb; b++) {
        float s = sig.data[b];
        DALI_ENFORCE(s > 0 && std::isfinite(s),
                     dali::make_string("medswav.", name, ": sigmas must be > 0, got ", s));
        add_cascade_band(k, taps_, s, [this](float sigma) { return recursive_for(sigma); });
      }
      band_shape.set_tensor_shape(i, dali::TensorShape<>(nb + 1));
    }
    out.resize(1);
    if (EnergiesOnly) {
      out[0] = {band_shape, DALI_FLOAT};
      return true;
    }
    refs_->Acquire(this->spec_, ws, n, band_shape.to_static<1>());
    for (int i = 0; i < n; i++) {
      auto r = (*refs_)[i];
      for (int b = 0; b < r.num_elements(); b++)
        DALI_ENFORCE(r.data[b] >= 0 && std::isfinite(r.data[b]),
                     dali::make_string("medswav.energy_bands: ref_energies must be finite and >= 0, got ",
                                       r.data[b], " (sample ", i, ", band ", b, ")"));
    }
    out[0] = {in.shape(), DALI_FLOAT};
    return true;
  }
  void RunImpl(Workspace &ws) override;

 private:
  // Coefficients per sigma, memoised: solving for them takes a bisection (~20 us), every sample and
  // iteration usually share the same few sigmas.
  const RecursiveGaussian &recursive_for(float sigma) {
    for (auto &entry : rg_cache_)
      if (entry.first == sigma) return entry.second;
    if (rg_cache_.size() >= 64) rg_cache_.clear();  // per-sample random sigmas: stay bounded
    rg_cache_.emplace_back(sigma, recursive_gaussian(sigma));
    return rg_cache_.back().second;
  }

  void RunCPU(Workspace &ws);  // energy_bands.cc
  void RunGPU(Workspace &ws);  // energy_bands.cu

  std::optional<dali::ArgValue<float, 1>> refs_;
  dali::ArgValue<float, 1> sigmas_;
  std::vector<CascadeKernels> kernels_;
  std::vector<float> taps_;  // all samples' taps, packed (offsets in kernels_)
  std::vector<std::pair<float, RecursiveGaussian>> rg_cache_;
};

template <typename Backend>
using EnergyBands = EnergyBandsImpl<Backend, false>;
template <typename Backend>
using BandEnergies = EnergyBandsImpl<Backend, true>;

}  // namespace medswav

#endif  // MEDSWAV_ENERGY_BANDS_H_
