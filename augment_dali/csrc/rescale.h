// Operator rescale: bilinear ("HW") or trilinear ("DHW") resize by a per-sample factor with the result
// kept in a size range (per axis for volumes), optionally to isotropic spacing.
#ifndef MEDSWAV_RESCALE_H_
#define MEDSWAV_RESCALE_H_

#include <algorithm>
#include <cmath>
#include <vector>

#include "math/resample.h"
#include "op_common.h"

namespace medswav {

template <typename Backend>
class Rescale : public dali::StatelessOperator<Backend> {
 public:
  explicit Rescale(const OpSpec &spec)
      : dali::StatelessOperator<Backend>(spec),
        scale_("scale", spec), min_size_("min_size", spec), max_size_("max_size", spec),
        min_depth_("min_depth", spec), max_depth_("max_depth", spec), spacing_("spacing", spec) {}

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &in = float_input<Backend>(ws, "rescale", 2, 3);
    int n = in.num_samples(), ndim = in.sample_dim();
    scale_.Acquire(this->spec_, ws, n);
    min_size_.Acquire(this->spec_, ws, n);
    max_size_.Acquire(this->spec_, ws, n);
    // Depth bounds default to the in-plane ones (the 2-D rule on every axis).
    bool own_depth_min = min_depth_.HasExplicitValue(), own_depth_max = max_depth_.HasExplicitValue();
    if (own_depth_min) min_depth_.Acquire(this->spec_, ws, n);
    if (own_depth_max) max_depth_.Acquire(this->spec_, ws, n);
    bool has_spacing = spacing_.HasExplicitValue();
    if (has_spacing) spacing_.Acquire(this->spec_, ws, n, dali::TensorShape<1>(ndim));
    dali::TensorListShape<> out_shape(n, ndim);
    for (int i = 0; i < n; i++) {
      float s = arg_at(scale_, i);
      int lo = arg_at(min_size_, i), hi = arg_at(max_size_, i);
      int dlo = own_depth_min ? arg_at(min_depth_, i) : lo, dhi = own_depth_max ? arg_at(max_depth_, i) : hi;
      DALI_ENFORCE(s > 0 && std::isfinite(s),
                   dali::make_string("medswav.rescale: scale must be finite and > 0, got ", s));
      DALI_ENFORCE(lo <= 0 || hi <= 0 || lo <= hi,
                   dali::make_string("medswav.rescale: min_size (", lo, ") > max_size (", hi, ")"));
      DALI_ENFORCE(ndim == 2 || dlo <= 0 || dhi <= 0 || dlo <= dhi,
                   dali::make_string("medswav.rescale: min_depth (", dlo, ") > max_depth (", dhi, ")"));
      auto sh = in.shape()[i];
      // Target sides: scale times the side, times spacing / finest spacing (isotropic output voxels).
      double t[3], finest = INFINITY;
      if (has_spacing) {
        for (int d = 0; d < ndim; d++) {
          float sp = spacing_[i].data[d];
          DALI_ENFORCE(sp > 0 && std::isfinite(sp),
                       dali::make_string("medswav.rescale: spacing must be finite and > 0, got ", sp));
          finest = std::min<double>(finest, sp);
        }
      }
      for (int d = 0; d < ndim; d++) t[d] = double(s) * sh[d] * (has_spacing ? spacing_[i].data[d] / finest : 1.0);
      int mins[3] = {lo, lo, lo}, maxs[3] = {hi, hi, hi};
      if (ndim == 3) {
        mins[0] = dlo;
        maxs[0] = dhi;
      }
      int64_t o[3] = {0, 0, 0};  // empty stays empty
      if (sh.num_elements() != 0) rescale_output_size_axes(t, ndim, mins, maxs, o);
      dali::TensorShape<> osh;
      osh.resize(ndim);
      for (int d = 0; d < ndim; d++) osh[d] = o[d];
      out_shape.set_tensor_shape(i, osh);
    }
    out.resize(1);
    out[0] = {out_shape, DALI_FLOAT};
    return true;
  }
  void RunImpl(Workspace &ws) override;

 private:
  dali::ArgValue<float> scale_;
  dali::ArgValue<int> min_size_, max_size_, min_depth_, max_depth_;
  dali::ArgValue<float, 1> spacing_;
};

}  // namespace medswav

#endif  // MEDSWAV_RESCALE_H_
