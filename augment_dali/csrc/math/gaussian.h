// Separable Gaussian blur used by the energy-band cascade.
//
// Border handling: "reflect-101" (mirror about the edge pixel without repeating it:
// ... 2 1 | 0 1 2 ... n-1 | n-2 ...), folded as often as needed, so kernels wider than the image
// (sigma 16 has radius 48) are well defined. It preserves the mean of a constant image exactly.
#ifndef MEDSWAV_MATH_GAUSSIAN_H_
#define MEDSWAV_MATH_GAUSSIAN_H_

#include <cmath>
#include <vector>

#include "math/host_device.h"

namespace medswav {

MSW_HD int reflect101(int i, int n) {
  if (i >= 0 && i < n) return i;
  if (n <= 1) return 0;
  if (i < 0 && -i < n) return -i;                    // one fold on the left
  if (i >= n && i < 2 * n - 1) return 2 * (n - 1) - i;  // one fold on the right
  int period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - i;
}

// Radius ceil(3 sigma) (at least 1): the dropped tails weigh < 0.3% before renormalisation.
inline int gaussian_radius(float sigma) {
  return std::max(1, static_cast<int>(std::ceil(3.0 * sigma)));
}

// 2r+1 normalised taps, computed in double and rounded once to float.
inline std::vector<float> gaussian_taps(float sigma) {
  int r = gaussian_radius(sigma);
  std::vector<double> w(2 * r + 1);
  double sum = 0;
  for (int k = -r; k <= r; k++) sum += w[k + r] = std::exp(-0.5 * k * k / (double(sigma) * sigma));
  std::vector<float> out(w.size());
  for (size_t k = 0; k < w.size(); k++) out[k] = static_cast<float>(w[k] / sum);
  return out;
}

// One output element of a 1-D convolution along a line of n elements spaced `stride` apart.
// Taps are summed from -r to r in this order on both backends.
MSW_HD float conv1d_at(const float *line, int n, int64_t stride, int pos, const float *taps, int r) {
  float acc = 0.0f;
  if (pos - r >= 0 && pos + r < n) {  // interior: no border folding
    const float *p = line + (pos - r) * stride;
    for (int k = 0; k <= 2 * r; k++) acc += taps[k] * p[k * stride];
  } else {
    for (int k = -r; k <= r; k++) acc += taps[k + r] * line[reflect101(pos + k, n) * stride];
  }
  return acc;
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_GAUSSIAN_H_
