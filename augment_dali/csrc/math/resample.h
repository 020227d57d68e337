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

// Trilinear sample of a row-major D x H x W volume at (sz, sy, sx), clamped to the edge voxels: the
// bilinear samples of the two nearest planes, blended along z. A single plane (d == 1, the 2-D case)
// or an exact plane position returns the bilinear sample unchanged, so 2-D results are bit-identical.
MSW_HD float trilinear_at(const float *vol, int d, int h, int w, float sz, float sy, float sx) {
  float fz0 = floorf(sz);
  float fz = sz - fz0;
  int z0 = static_cast<int>(fz0);
  int za = clamp_value(z0, 0, d - 1), zb = clamp_value(z0 + 1, 0, d - 1);
  int64_t plane = int64_t(h) * w;
  float front = bilinear_at(vol + za * plane, h, w, sy, sx);
  if (za == zb || fz == 0.0f) return front;
  float back = bilinear_at(vol + zb * plane, h, w, sy, sx);
  return front + fz * (back - front);
}

// Output extents of `rescale` (N-D, per-axis bounds): from the target sides t_d (scale times the
// input side, times the axis's spacing over the finest spacing when spacing is known), the
// aspect-preserving factor k closest to 1 that puts every side into [min_d, max_d] is applied,
// k = clamp(1, max_d(min_d / t_d), min_d(max_d / t_d)); if no such k exists (aspect ratio too extreme
// for the range) k = max_d(min_d / t_d). Each side is then round(k t_d), clamped into [min_d, max_d]
// and at least 1. A bound <= 0 is disabled. With equal bounds on every axis this is
// k = clamp(1, min / min(t), max / max(t)).
inline void rescale_output_size_axes(const double *t, int ndim, const int *min_sizes, const int *max_sizes,
                                     int64_t *out) {
  double lo = 0.0, hi = INFINITY;
  for (int d = 0; d < ndim; d++) {
    if (min_sizes[d] > 0) lo = std::max(lo, min_sizes[d] / t[d]);
    if (max_sizes[d] > 0) hi = std::min(hi, max_sizes[d] / t[d]);
  }
  double k = lo <= hi ? std::min(std::max(1.0, lo), hi) : lo;
  for (int d = 0; d < ndim; d++) {
    int64_t s = static_cast<int64_t>(std::floor(t[d] * k + 0.5));
    if (min_sizes[d] > 0) s = std::max<int64_t>(s, min_sizes[d]);
    if (max_sizes[d] > 0) s = std::min<int64_t>(s, max_sizes[d]);
    out[d] = std::max<int64_t>(s, 1);
  }
}

// The same rule with one bound pair for every axis and isotropic spacing (ndim <= 3).
inline void rescale_output_size(const int64_t *in, int ndim, double scale, int min_size, int max_size,
                                int64_t *out) {
  double t[3];
  int lo[3], hi[3];
  for (int d = 0; d < ndim; d++) {
    t[d] = scale * in[d];
    lo[d] = min_size;
    hi[d] = max_size;
  }
  rescale_output_size_axes(t, ndim, lo, hi, out);
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_RESAMPLE_H_
