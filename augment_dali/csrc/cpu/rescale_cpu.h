// CPU backend of rescale without DALI (the DALI operator runs it per sample on its thread pool; the
// kernel harness compares the CUDA kernel with it).
#ifndef MEDSWAV_CPU_RESCALE_CPU_H_
#define MEDSWAV_CPU_RESCALE_CPU_H_

#include <cstdint>
#include <vector>

#include "math/resample.h"

namespace medswav {
namespace cpu {

// d x h x w -> od x oh ow (trilinear; d == od == 1 is the 2-D bilinear case).
inline void rescale_sample(const float *src, int d, int h, int w, float *dst, int od, int oh, int ow) {
  if (int64_t(od) * oh * ow == 0 || int64_t(d) * h * w == 0) return;
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
