// Point-wise intensity transforms (METHOD.md section 4, "Intensity"; normalisation to [0, 1]).
#ifndef MEDSWAV_MATH_INTENSITY_H_
#define MEDSWAV_MATH_INTENSITY_H_

#include "math/host_device.h"

namespace medswav {

// x is clamped to [0, 1] first so that out-of-range or NaN input can never yield NaN
// (fmaxf(NaN, 0) == 0), and 0 ** gamma stays 0 for every gamma > 0.
MSW_HD float gamma_px(float x, float gamma) {
  x = fminf(fmaxf(x, 0.0f), 1.0f);
  return powf(x, gamma);
}

// Unclamped on purpose: the shift is in units of the [0, 1] range and later stages may rely on it.
MSW_HD float linear_px(float x, float scale, float shift) {
  return scale * x + shift;
}

// One sample's parameters of the fused intensity map (operator `intensity`):
//   out = scale * clamp((x - lo) * inv_width, 0, 1) ** gamma + shift.
// With lo = 0, inv_width = 1 it is linear_px(gamma_px(x, gamma), scale, shift) exactly ((x - 0) * 1 == x).
struct IntensityParams {
  float lo, inv_width, gamma, scale, shift;
};

// 1 / (hi - lo), the width floored at 1e-6 so that a constant image (hi == lo) maps to zeros, not NaN.
MSW_HD float window_inv_width(double lo, double hi) {
  double w = hi - lo;
  return static_cast<float>(1.0 / (w > 1e-6 ? w : 1e-6));
}

MSW_HD float window_px(float x, float lo, float inv_width) {
  return fminf(fmaxf((x - lo) * inv_width, 0.0f), 1.0f);
}

// gamma == 1 skips powf (x ** 1 == x): the caller may test it once per sample and keep the loop free of
// calls, so it vectorises.
MSW_HD float intensity_px(float x, const IntensityParams &p) {
  float y = window_px(x, p.lo, p.inv_width);
  if (p.gamma != 1.0f) y = powf(y, p.gamma);
  return linear_px(y, p.scale, p.shift);
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_INTENSITY_H_
