// CPU backend of rescale without DALI (the DALI operator runs it per sample on its thread pool; the
// kernel harness compares the CUDA kernel with it).
#ifndef MEDSWAV_CPU_RESCALE_CPU_H_
#define MEDSWAV_CPU_RESCALE_CPU_H_

#include <cstdint>
#include <vector>

#include "math/resample.h"

namespace medswav {
namespace cpu {

// The 2-D case of rescale_sample, separably: bilinear_at's two horizontal interpolations (top, bottom)
// depend only on the source row and the output column, so each needed source row is interpolated to
// the output width once (kept while consecutive output rows use it), and each output row is then one
// vertical blend. The same operations in the same order as bilinear_at: bit-identical results.
inline void rescale_plane(const float *src, int h, int w, float *dst, int oh, int ow) {
  static thread_local std::vector<int> xa, xb;
  static thread_local std::vector<float> fx, rows;
  xa.resize(ow);
  xb.resize(ow);
  fx.resize(ow);
  rows.resize(2 * int64_t(ow));
  for (int x = 0; x < ow; x++) {
    float sx = resample_src_coord(x, w, ow), fx0 = floorf(sx);
    int x0 = static_cast<int>(fx0);
    fx[x] = sx - fx0;
    xa[x] = clamp_value(x0, 0, w - 1);
    xb[x] = clamp_value(x0 + 1, 0, w - 1);
  }
  float *slot[2] = {rows.data(), rows.data() + ow};
  int slot_row[2] = {-1, -1};
  auto interpolated = [&](int y) -> const float * {  // source row y at the output width
    for (int i = 0; i < 2; i++)
      if (slot_row[i] == y) return slot[i];
    int i = slot_row[0] == -1 || (slot_row[1] != -1 && slot_row[0] < slot_row[1]) ? 0 : 1;  // the older row
    const float *r = src + int64_t(y) * w;
    float *out = slot[i];
    for (int x = 0; x < ow; x++) out[x] = r[xa[x]] + fx[x] * (r[xb[x]] - r[xa[x]]);
    slot_row[i] = y;
    return out;
  };
  for (int y = 0; y < oh; y++) {
    float sy = resample_src_coord(y, h, oh), fy0 = floorf(sy);
    float fy = sy - fy0;
    int y0 = static_cast<int>(fy0);
    int ya = clamp_value(y0, 0, h - 1), yb = clamp_value(y0 + 1, 0, h - 1);
    const float *top = interpolated(ya);
    const float *bottom = interpolated(yb);
    float *row = dst + int64_t(y) * ow;
    for (int x = 0; x < ow; x++) row[x] = top[x] + fy * (bottom[x] - top[x]);
  }
}

// d x h x w -> od x oh ow (trilinear; d == od == 1 is the 2-D bilinear case).
inline void rescale_sample(const float *src, int d, int h, int w, float *dst, int od, int oh, int ow) {
  if (int64_t(od) * oh * ow == 0 || int64_t(d) * h * w == 0) return;
  if (d == 1 && od == 1) return rescale_plane(src, h, w, dst, oh, ow);
  std::vector<float> sx(ow);
  for (int x = 0; x < ow; x++) sx[x] = resample_src_coord(x, w, ow);
  for (int z = 0; z < od; z++) {
    float sz = resample_src_coord(z, d, od);
    for (int y = 0; y < oh; y++) {
      float sy = resample_src_coord(y, h, oh);
      float *row = dst + (int64_t(z) * oh + y) * ow;
      for (int x = 0; x < ow; x++) row[x] = trilinear_at(src, d, h, w, sz, sy, sx[x]);
    }
  }
}

}  // namespace cpu
}  // namespace medswav

#endif  // MEDSWAV_CPU_RESCALE_CPU_H_
