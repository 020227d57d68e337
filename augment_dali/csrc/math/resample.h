// Bilinear resampling and the rescale output-size rule.
#ifndef MEDSWAV_MATH_RESAMPLE_H_
#define MEDSWAV_MATH_RESAMPLE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "math/host_device.h"

namespace medswav {

// Source coordinate of output pixel `dst` when a side of n_in pixels becomes n_out pixels: pixel
// centres are aligned (the "align_corners=False" convention), computed in double for exactness.
MSW_HD float resample_src_coord(int dst, int n_in, int n_out) {
  return static_cast<float>((dst + 0.5) * (static_cast<double>(n_in) / n_out) - 0.5);
}

// Bilinear sample of a row-major H x W image at (sy, sx); coordinates clamp to the edge pixels.
MSW_HD float bilinear_at(const float *img, int h, int w, float sy, float sx) {
  float fy0 = floorf(sy), fx0 = floorf(sx);
  float fy = sy - fy0, fx = sx - fx0;
  int y0 = static_cast<int>(fy0), x0 = static_cast<int>(fx0);
  int ya = clamp_value(y0, 0, h - 1), yb = clamp_value(y0 + 1, 0, h - 1);
  int xa = clamp_value(x0, 0, w - 1), xb = clamp_value(x0 + 1, 0, w - 1);
  const float *ra = img + int64_t(ya) * w, *rb = img + int64_t(yb) * w;
  float top = ra[xa] + fx * (ra[xb] - ra[xa]);
  float bottom = rb[xa] + fx * (rb[xb] - rb[xa]);
  return top + fy * (bottom - top);
}

// Output extents of `rescale` (N-D): t_d = scale * in_d; the aspect-preserving factor k closest to 1
// that puts every side into [min_size, max_size] is applied, k = clamp(1, min_size / min(t),
// max_size / max(t)); if no such k exists (aspect ratio too extreme for the range) k = min_size / min(t).
// Each side is then round(k t_d), clamped into [min_size, max_size] and at least 1. A bound <= 0 is
// disabled.
inline void rescale_output_size(const int64_t *in, int ndim, double scale, int min_size, int max_size,
                                int64_t *out) {
  double tmin = INFINITY, tmax = 0;
  for (int d = 0; d < ndim; d++) {
    tmin = std::min(tmin, scale * in[d]);
    tmax = std::max(tmax, scale * in[d]);
  }
  double lo = min_size > 0 ? min_size / tmin : 0.0;
  double hi = max_size > 0 ? max_size / tmax : INFINITY;
  double k = lo <= hi ? std::min(std::max(1.0, lo), hi) : lo;
  for (int d = 0; d < ndim; d++) {
    int64_t s = static_cast<int64_t>(std::floor(scale * in[d] * k + 0.5));
    if (min_size > 0) s = std::max<int64_t>(s, min_size);
    if (max_size > 0) s = std::min<int64_t>(s, max_size);
    out[d] = std::max<int64_t>(s, 1);
  }
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_RESAMPLE_H_
