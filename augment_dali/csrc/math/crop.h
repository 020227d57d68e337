// Random-position crops (applied last, METHOD.md section 4).
#ifndef MEDSWAV_MATH_CROP_H_
#define MEDSWAV_MATH_CROP_H_

#include <cmath>
#include <cstdint>

#include "math/host_device.h"

namespace medswav {

// Origin of a crop of size c along a side of n pixels for a uniform u in [0, 1]. A margin
// m = floor(border * n) is excluded on both sides, shrunk to floor((n - c) / 2) when the crop would not
// fit otherwise; the origin is then a uniform integer in [m, n - c - m]. A crop larger than the image
// (c > n) gets an origin in [n - c, 0]: the image lands at a uniform offset inside the crop and the
// rest of the crop is zero.
MSW_HD int crop_origin(int n, int c, float border, double u) {
  int lo, hi;
  if (c > n) {
    lo = n - c;
    hi = 0;
  } else {
    int m = static_cast<int>(floor(static_cast<double>(border) * n));
    int fit = (n - c) / 2;
    if (m > fit) m = fit;
    if (m < 0) m = 0;
    lo = m;
    hi = n - c - m;
  }
  int k = static_cast<int>(floor(u * (hi - lo + 1)));
  return lo + clamp_value(k, 0, hi - lo);
}

// One crop: the depth x size x size output at dst (row-major) shows src (d x h x w) from (z0, y0, x0)
// on. A 2-D image is a volume of one plane (d == 1, z0 == 0, crop depth 1).
struct CropDesc {
  const float *src;
  float *dst;
  int d, h, w, z0, y0, x0;
};

// Voxel (z, y, x) of a d x h x w volume, zero outside it.
MSW_HD float crop_fetch(const float *img, int d, int h, int w, int z, int y, int x) {
  return (z >= 0 && z < d && y >= 0 && y < h && x >= 0 && x < w) ? img[(int64_t(z) * h + y) * w + x] : 0.0f;
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_CROP_H_
