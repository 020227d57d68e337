// Operators gamma, linear and intensity (point-wise intensity transforms, METHOD.md section 4, and the
// normalisation to [0, 1]), and robust_window (per-image percentile window, CPU).
#ifndef MEDSWAV_INTENSITY_H_
#define MEDSWAV_INTENSITY_H_

#include <string>
#include <type_traits>
#include <vector>

#include "math/intensity.h"
#include "op_common.h"

namespace medswav {

// The per-pixel functors of the operators: one sample's arguments bound to the shared formulas of
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

struct IntensityPx {
  IntensityParams p;
  MSW_HD float operator()(float x) const { return intensity_px(x, p); }
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

// Input types the intensity and robust_window operators read directly (shard pixels need no cast).
inline bool intensity_input_type_ok(dali::DALIDataType t) {
  return t == DALI_FLOAT || t == DALI_INT16 || t == DALI_UINT16 || t == DALI_UINT8;
}

// Calls fn with a value of the C++ type of `t` (one of the types above), so both backends instantiate
// their loops for exactly the types intensity_input_type_ok accepts.
template <typename Fn>
void with_input_type(dali::DALIDataType t, Fn &&fn) {
  switch (t) {
    case DALI_FLOAT: fn(float{}); break;
    case DALI_INT16: fn(int16_t{}); break;
    case DALI_UINT16: fn(uint16_t{}); break;
    case DALI_UINT8: fn(uint8_t{}); break;
    default: DALI_FAIL(dali::make_string("medswav: unsupported input type ", t));
  }
}

inline void check_percentiles(const char *op, const float *p) {
  DALI_ENFORCE(p[0] >= 0 && p[0] <= p[1] && p[1] <= 100,
               dali::make_string("medswav.", op, ": percentiles must satisfy 0 <= lo <= hi <= 100, got (",
                                 p[0], ", ", p[1], ")"));
}

// out = scale * clamp((x - lo) / (hi - lo), 0, 1) ** gamma + shift with a window (lo, hi) per sample,
// either given (`window`) or, where `robust` is set, the image's own percentiles (CPU backend only).
template <typename Backend>
class Intensity : public dali::StatelessOperator<Backend> {
 public:
  explicit Intensity(const OpSpec &spec)
      : dali::StatelessOperator<Backend>(spec), window_("window", spec), percentiles_("percentiles", spec),
        robust_("robust", spec), gamma_("gamma", spec), scale_("scale", spec), shift_("shift", spec) {}

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &in = ws.Input<Backend>(0);
    DALI_ENFORCE(intensity_input_type_ok(in.type()),
                 dali::make_string("medswav.intensity: input must be float32, int16, uint16 or uint8 (got ",
                                   in.type(), ")."));
    int n = in.num_samples();
    window_.Acquire(this->spec_, ws, n, dali::TensorShape<1>(2));
    percentiles_.Acquire(this->spec_, ws, n, dali::TensorShape<1>(2));
    robust_.Acquire(this->spec_, ws, n);
    gamma_.Acquire(this->spec_, ws, n);
    scale_.Acquire(this->spec_, ws, n);
    shift_.Acquire(this->spec_, ws, n);
    params_.resize(n);
    robust_samples_.clear();
    for (int i = 0; i < n; i++) {
      float g = arg_at(gamma_, i), a = arg_at(scale_, i), b = arg_at(shift_, i);
      const float *w = window_[i].data;
      DALI_ENFORCE(g > 0 && std::isfinite(g),
                   dali::make_string("medswav.intensity: gamma must be finite and > 0, got ", g,
                                     " for sample ", i));
      DALI_ENFORCE(std::isfinite(a) && std::isfinite(b),
                   dali::make_string("medswav.intensity: scale and shift must be finite, got ", a, ", ", b,
                                     " for sample ", i));
      if (*robust_[i].data) {
        DALI_ENFORCE((std::is_same_v<Backend, CPUBackend>),
                     "medswav.intensity: robust=True needs the CPU backend; on the GPU pass "
                     "window=fn.medswav.robust_window(image) computed on the CPU.");
        check_percentiles("intensity", percentiles_[i].data);
        robust_samples_.push_back(i);
      } else {
        DALI_ENFORCE(std::isfinite(w[0]) && std::isfinite(w[1]) && w[0] <= w[1],
                     dali::make_string("medswav.intensity: window must be finite with lo <= hi, got (", w[0],
                                       ", ", w[1], ") for sample ", i));
      }
      params_[i] = IntensityParams{w[0], window_inv_width(w[0], w[1]), g, a, b};
    }
    out.resize(1);
    out[0] = {in.shape(), DALI_FLOAT};
    return true;
  }
  void RunImpl(Workspace &ws) override;

 private:
  dali::ArgValue<float, 1> window_, percentiles_;
  dali::ArgValue<int> robust_;  // 0/1 (DALI cannot view bool arguments)
  dali::ArgValue<float> gamma_, scale_, shift_;
  std::vector<IntensityParams> params_;  // windows of robust samples are filled in by RunImpl
  std::vector<int> robust_samples_;
};

// Output: (lo, hi) per sample, float32 [2], the `percentiles` of the image's values (CPU only).
class RobustWindowOp : public dali::StatelessOperator<CPUBackend> {
 public:
  explicit RobustWindowOp(const OpSpec &spec)
      : dali::StatelessOperator<CPUBackend>(spec), percentiles_("percentiles", spec) {}

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override;
  void RunImpl(Workspace &ws) override;

 private:
  dali::ArgValue<float, 1> percentiles_;
};

}  // namespace medswav

#endif  // MEDSWAV_INTENSITY_H_
