// CPU backend of rescale without DALI (the DALI operator runs it per sample on its thread pool; the
// kernel harness compares the CUDA kernel with it).
#ifndef MEDSWAV_CPU_RESCALE_CPU_H_
#define MEDSWAV_CPU_RESCALE_CPU_H_

#include <cstdint>
#include <vector>

#include "math/resample.h"

namespace medswav {
namespace cpu {

inline void rescale_sample(const float *src, int h, int w, float *dst, int oh, int ow) {
  if (int64_t(oh) * ow == 0 || int64_t(h) * w == 0) return;
  std::vector<float> sx(ow);
  for (int x = 0; x < ow; x++) sx[x] = resample_src_coord(x, w, ow);
  for (int y = 0; y < oh; y++) {
    float sy = resample_src_coord(y, h, oh);
    for (int x = 0; x < ow; x++) dst[int64_t(y) * ow + x] = bilinear_at(src, h, w, sy, sx[x]);
  }
}

}  // namespace cpu
}  // namespace medswav

#endif  // MEDSWAV_CPU_RESCALE_CPU_H_
