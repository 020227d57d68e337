// Point-wise intensity transforms (METHOD.md section 4, "Intensity").
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

}  // namespace medswav

#endif  // MEDSWAV_MATH_INTENSITY_H_
