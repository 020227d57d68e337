// Recursive (IIR) Gaussian blur for the large sigmas of the energy-band cascade: constant cost per
// pixel whatever sigma, where the exact FIR kernel costs 2 ceil(3 sigma) + 1 taps per pixel and axis.
//
// Filter: the third-order causal + anti-causal recursion of Young & van Vliet with the poles of
// van Vliet, Young & Verbeek (ICPR 1998, optimised in the L-infinity norm at sigma = 2):
// d = 1.41650 +- 1.00829 i, 1.86543, scaled as d^(1/q) with q solved (bisection, double) so that the
// variance of the whole impulse response equals sigma^2 exactly. Unit gain at DC (a constant stays
// constant). Against the exact Gaussian, the impulse response differs by at most ~1% of its peak for
// sigma >= 4 and a smooth image by ~0.3% of its standard deviation (docs/AUGMENT_OPERATORS.md).
//
// Borders: every line is extended by pad = ceil(3 sigma) elements on each side with reflect-101
// (as the FIR path reads them); the causal pass starts in the steady state of the first extended
// element, the anti-causal pass in that of the last causal output. The same recursion, in the same
// operation order, runs on the CPU (whole SIMD vectors of lines at once), on the GPU (one thread per
// line) and in float64 in augment_dali/reference.py.
#ifndef MEDSWAV_MATH_RECURSIVE_GAUSSIAN_H_
#define MEDSWAV_MATH_RECURSIVE_GAUSSIAN_H_

#include <cmath>
#include <complex>

#include "math/gaussian.h"
#include "math/host_device.h"

namespace medswav {

// Sigmas at or above this use the recursive filter; smaller ones the exact taps (where the FIR is cheap
// and a recursive filter's relative error grows).
constexpr float kRecursiveMinSigma = 4.0f;

// y[k] = b x[k] + a1 y[k-1] + a2 y[k-2] + a3 y[k-3] (and the mirror recursion backwards). Coefficients
// and state are double: at sigma 16, b ~ 1e-3 and the third-order recursion amplifies the rounding of
// its state by ~1/b, which in float would reach ~1e-4 of the signal (images and outputs stay float).
struct RecursiveGaussian {
  double b, a1, a2, a3;
  int pad;
};

namespace detail {
// Causal poles p = 1 / d^(1/q) of the 1998 filter: the complex pair r e^(+-i theta) and the real p3.
inline void rg_poles(double q, double *r, double *theta, double *p3) {
  const std::complex<double> d1(1.41650, 1.00829);
  *r = std::pow(std::abs(d1), -1.0 / q);
  *theta = std::arg(d1) / q;
  *p3 = std::pow(1.86543, -1.0 / q);
}

// Variance of the causal + anti-causal impulse response: 2 sum_p p / (1 - p)^2.
inline double rg_variance(double q) {
  double r, theta, p3;
  rg_poles(q, &r, &theta, &p3);
  std::complex<double> p = std::polar(r, theta);
  return 2.0 * (2.0 * std::real(p / ((1.0 - p) * (1.0 - p))) + p3 / ((1.0 - p3) * (1.0 - p3)));
}
}  // namespace detail

inline RecursiveGaussian recursive_gaussian(float sigma) {
  double target = double(sigma) * sigma, lo = 1e-3, hi = 10.0 * sigma + 10.0;
  for (int it = 0; it < 200; it++) {  // the variance grows monotonically with q
    double mid = 0.5 * (lo + hi);
    (detail::rg_variance(mid) < target ? lo : hi) = mid;
  }
  double r, theta, p3;
  detail::rg_poles(0.5 * (lo + hi), &r, &theta, &p3);
  // (1 - 2 r cos(theta) z^-1 + r^2 z^-2)(1 - p3 z^-1) = 1 - a1 z^-1 - a2 z^-2 - a3 z^-3
  double a1 = 2.0 * r * std::cos(theta) + p3;
  double a2 = -(r * r + 2.0 * r * std::cos(theta) * p3);
  double a3 = r * r * p3;
  return {1.0 - a1 - a2 - a3, a1, a2, a3, gaussian_radius(sigma)};
}

// One step of the recursion; y1 (the previous output) enters last, so the loop-carried dependency is a
// single multiply-add. T is double or a SIMD vector of doubles.
template <typename T>
MSW_HD T rg_step(const RecursiveGaussian &c, T x, T y1, T y2, T y3) {
  return ((c.b * x + c.a3 * y3) + c.a2 * y2) + c.a1 * y1;
}

// Filters one line of n elements (spaced `stride`) into dst (spaced `dst_stride`; may alias src).
// `buf` holds the n + 2 pad causal outputs, spaced `buf_stride`.
MSW_HD void recursive_gaussian_line(const RecursiveGaussian &c, const float *src, int64_t stride,
                                    float *dst, int64_t dst_stride, int n, double *buf,
                                    int64_t buf_stride) {
  int pad = c.pad, len = n + 2 * pad;
  double y1 = src[reflect101(-pad, n) * stride], y2 = y1, y3 = y1;
  for (int q = 0; q < len; q++) {
    double y = rg_step(c, double(src[reflect101(q - pad, n) * stride]), y1, y2, y3);
    buf[q * buf_stride] = y;
    y3 = y2;
    y2 = y1;
    y1 = y;
  }
  y1 = y2 = y3 = buf[(len - 1) * buf_stride];
  for (int q = len - 1; q >= pad; q--) {
    double y = rg_step(c, buf[q * buf_stride], y1, y2, y3);
    if (q < pad + n) dst[(q - pad) * dst_stride] = static_cast<float>(y);
    y3 = y2;
    y2 = y1;
    y1 = y;
  }
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_RECURSIVE_GAUSSIAN_H_
