// Operators gamma and linear: point-wise intensity augmentations (METHOD.md section 4).
#ifndef MEDSWAV_INTENSITY_H_
#define MEDSWAV_INTENSITY_H_

#include <vector>

#include "math/intensity.h"
#include "op_common.h"

namespace medswav {

// The per-pixel functors of the two operators: one sample's arguments bound to the shared formula of
// math/intensity.h. Both backends apply them through one element-wise loop (map_pixels in the .cc and
// the .cu), so the operators differ only in which functor they build per sample.
struct GammaPx {
  float gamma;
  MSW_HD float operator()(float x) const { return gamma_px(x, gamma); }
};

struct LinearPx {
  float scale, shift;
  MSW_HD float operator()(float x) const { return linear_px(x, scale, shift); }
};

// out = clamp(x, 0, 1) ** gamma, gamma per sample (> 0).
template <typename Backend>
class Gamma : public dali::StatelessOperator<Backend> {
 public:
  explicit Gamma(const OpSpec &spec) : dali::StatelessOperator<Backend>(spec), gamma_("gamma", spec) {}

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &in = float_input<Backend>(ws, "gamma");
    int n = in.num_samples();
    gamma_.Acquire(this->spec_, ws, n);
    for (int i = 0; i < n; i++) {
      float g = arg_at(gamma_, i);
      DALI_ENFORCE(g > 0 && std::isfinite(g),
                   dali::make_string("medswav.gamma: gamma must be finite and > 0, got ", g,
                                     " for sample ", i));
    }
    out.resize(1);
    out[0] = {in.shape(), DALI_FLOAT};
    return true;
  }
  void RunImpl(Workspace &ws) override;

 private:
  dali::ArgValue<float> gamma_;
};

// out = scale * x + shift (no clamp), scale and shift per sample.
template <typename Backend>
class Linear : public dali::StatelessOperator<Backend> {
 public:
  explicit Linear(const OpSpec &spec)
      : dali::StatelessOperator<Backend>(spec), scale_("scale", spec), shift_("shift", spec) {}

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &in = float_input<Backend>(ws, "linear");
    int n = in.num_samples();
    scale_.Acquire(this->spec_, ws, n);
    shift_.Acquire(this->spec_, ws, n);
    out.resize(1);
    out[0] = {in.shape(), DALI_FLOAT};
    return true;
  }
  void RunImpl(Workspace &ws) override;

 private:
  dali::ArgValue<float> scale_, shift_;
};

}  // namespace medswav

#endif  // MEDSWAV_INTENSITY_H_
