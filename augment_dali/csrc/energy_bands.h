// Operator energy_bands: Gaussian-cascade band decomposition with per-band energy rescaling.
// The math (cascade, energies, gains, zero-energy rule) is documented in math/energy.h.
#ifndef MEDSWAV_ENERGY_BANDS_H_
#define MEDSWAV_ENERGY_BANDS_H_

#include <vector>

#include "dali/core/dev_buffer.h"
#include "math/energy.h"
#include "math/gaussian.h"
#include "op_common.h"

namespace medswav {

// Blur kernels of one sample's cascade, packed: band b uses taps[offset[b] .. offset[b] + 2 r[b]].
struct CascadeKernels {
  std::vector<int> offset, radius;
  int num_bands() const { return static_cast<int>(radius.size()); }
};

template <typename Backend>
class EnergyBands : public dali::StatelessOperator<Backend> {
 public:
  explicit EnergyBands(const OpSpec &spec)
      : dali::StatelessOperator<Backend>(spec), refs_("ref_energies", spec), sigmas_("sigmas", spec) {}

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &in = float_input<Backend>(ws, "energy_bands", 1, 3);
    int n = in.num_samples();
    sigmas_.Acquire(this->spec_, ws, n);
    dali::TensorListShape<1> ref_shape(n);
    kernels_.resize(n);
    taps_.clear();
    for (int i = 0; i < n; i++) {
      auto sig = sigmas_[i];
      int nb = static_cast<int>(sig.num_elements());
      DALI_ENFORCE(nb >= 1 && nb < kMaxBands,
                   dali::make_string("medswav.energy_bands: need 1..", kMaxBands - 1, " sigmas, got ", nb));
      auto &k = kernels_[i];
      k.offset.clear();
      k.radius.clear();
      for (int b = 0; b < nb; b++) {
        float s = sig.data[b];
        DALI_ENFORCE(s > 0 && std::isfinite(s),
                     dali::make_string("medswav.energy_bands: sigmas must be > 0, got ", s));
        auto taps = gaussian_taps(s);
        k.offset.push_back(static_cast<int>(taps_.size()));
        k.radius.push_back(gaussian_radius(s));
        taps_.insert(taps_.end(), taps.begin(), taps.end());
      }
      ref_shape.set_tensor_shape(i, dali::TensorShape<1>(nb + 1));
    }
    refs_.Acquire(this->spec_, ws, n, ref_shape);
    for (int i = 0; i < n; i++) {
      auto r = refs_[i];
      for (int b = 0; b < r.num_elements(); b++)
        DALI_ENFORCE(r.data[b] >= 0 && std::isfinite(r.data[b]),
                     dali::make_string("medswav.energy_bands: ref_energies must be finite and >= 0, got ",
                                       r.data[b], " (sample ", i, ", band ", b, ")"));
    }
    out.resize(1);
    out[0] = {in.shape(), DALI_FLOAT};
    return true;
  }
  void RunImpl(Workspace &ws) override;

 private:
  dali::ArgValue<float, 1> refs_, sigmas_;
  std::vector<CascadeKernels> kernels_;
  std::vector<float> taps_;  // all samples' taps, packed (offsets in kernels_)
  // GPU scratch (unused by the CPU backend).
  dali::DeviceBuffer<float> dev_taps_, dev_planes_;
  dali::DeviceBuffer<double> dev_moments_;
};

// Extents of a convolution along `axis`: elements are (outer, n, inner), `inner` contiguous.
struct AxisExtent {
  int64_t outer, inner;
  int n;
};

inline AxisExtent axis_extent(const dali::TensorShape<> &sh, int axis) {
  AxisExtent e{1, 1, static_cast<int>(sh[axis])};
  for (int d = 0; d < axis; d++) e.outer *= sh[d];
  for (int d = axis + 1; d < sh.size(); d++) e.inner *= sh[d];
  return e;
}

}  // namespace medswav

#endif  // MEDSWAV_ENERGY_BANDS_H_
