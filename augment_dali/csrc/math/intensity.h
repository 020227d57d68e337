// Point-wise intensity transforms (METHOD.md section 4, "Intensity"; normalisation to [0, 1]).
#ifndef MEDSWAV_MATH_INTENSITY_H_
#define MEDSWAV_MATH_INTENSITY_H_

#include "math/host_device.h"

namespace medswav {

// clamp(x, 0, 1) with NaN -> 0 (x > 0 is false for NaN). Written as two independent selects, not
// fminf/fmaxf (GCC calls libm for those, one call per pixel, to honour their NaN rules) nor two
// chained ones (which GCC leaves as branches): this form vectorises (cmpps + blend).
MSW_HD float clamp01(float x) {
  float upper = x < 1.0f ? x : 1.0f;
  return x > 0.0f ? upper : 0.0f;
}

MSW_HD int32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  return __builtin_bit_cast(int32_t, x);
#endif
}

MSW_HD float bits_float(int32_t b) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(b);
#else
  return __builtin_bit_cast(float, b);
#endif
}

// x ** g for x in [0, 1] and g > 0 as 2 ** (g * log2 x), branch-free so that the CPU loop vectorises
// (powf is a libm call per pixel there). log2 x = e + log2 m with m in [sqrt(1/2), sqrt(2)): the atanh
// series 2 (t + t^3/3 + ... + t^9/9) / ln 2, t = (m - 1) / (m + 1), |t| < 0.172, truncation < 1e-9;
// 2 ** y = 2 ** n * exp(f ln 2), n = round(y), |f| <= 1/2, Taylor to degree 7 (< 1e-8). Subnormal x
// is scaled by 2^24 first; results below 2^-126 are 0. Measured against powf over [0, 1] and
// g in [0.05, 8] (2 M points each, and subnormals): within 1.3e-7 of the exact value.
MSW_HD float pow01(float x, float g) {
  // Selects are written as arithmetic on 0/1 values: GCC turns ternaries here into branches, which
  // mispredict on image data (m > sqrt 2 is a coin flip) and keep the loop from vectorising.
  int32_t x_bits = float_bits(x);  // x >= 0: integer order is float order
  int32_t sub = x_bits < 0x00800000;
  int32_t bits = float_bits(x * (1.0f + 16777215.0f * static_cast<float>(sub)));
  int32_t big = (bits & 0x007fffff) > 0x003504f3;  // mantissa above sqrt 2
  int32_t e = ((bits >> 23) & 0xff) - 127 - 24 * sub + big;
  float m = bits_float((bits & 0x007fffff) | ((127 - big) << 23));  // [sqrt(1/2), sqrt(2))
  float t = (m - 1.0f) / (m + 1.0f), t2 = t * t;
  float series = t * (2.0f + t2 * (0.666666667f + t2 * (0.4f + t2 * (0.285714286f + t2 * 0.222222222f))));
  float y = g * (static_cast<float>(e) + series * 1.44269504f);  // <= 0
  y += (-127.0f - y) * static_cast<float>(y < -127.0f);
  // n = round(y): adding 1.5 * 2^23 leaves round(y) in the low mantissa bits (a float -> int
  // conversion instead would keep GCC from vectorising the loop under -ftrapping-math)
  float shifted = y + 12582912.0f;
  int32_t n = float_bits(shifted) - 0x4b400000;
  float f = (y - (shifted - 12582912.0f)) * 0.693147181f;
  float p = 1.0f + f * (1.0f + f * (0.5f + f * (0.166666667f + f * (0.0416666667f + f * (0.00833333333f +
            f * (0.00138888889f + f * 0.000198412698f))))));
  int32_t keep = (n > -127) & (x_bits > 0);
  return p * bits_float(((n + 127) << 23) & -keep);  // 2^n, or +0 where the result is 0
}

// x is clamped to [0, 1] first so that out-of-range or NaN input can never yield NaN, and 0 ** gamma
// stays 0 for every gamma > 0. gamma == 1 is exact (pow01 is not), as in intensity_px.
MSW_HD float gamma_px(float x, float gamma) {
  float c = clamp01(x);
  return gamma == 1.0f ? c : pow01(c, gamma);
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
  return clamp01((x - lo) * inv_width);
}

// gamma == 1 skips the power (x ** 1 == x): the caller may test it once per sample for a cheaper loop.
MSW_HD float intensity_px(float x, const IntensityParams &p) {
  float y = window_px(x, p.lo, p.inv_width);
  if (p.gamma != 1.0f) y = pow01(y, p.gamma);
  return linear_px(y, p.scale, p.shift);
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_INTENSITY_H_
