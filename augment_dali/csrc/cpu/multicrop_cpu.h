// CPU backend of multicrop without DALI: one crop (the DALI operator runs one task per crop; the
// kernel harness compares the CUDA kernel with it).
#ifndef MEDSWAV_CPU_MULTICROP_CPU_H_
#define MEDSWAV_CPU_MULTICROP_CPU_H_

#include <algorithm>
#include <cstdint>

#include "math/crop.h"

namespace medswav {
namespace cpu {

// One crop of depth x s x s (depth 1 for 2-D images).
inline void crop_one(const CropDesc &c, int depth, int s) {
  for (int z = 0; z < depth; z++) {
    int sz = c.z0 + z;
    for (int y = 0; y < s; y++) {
      float *row = c.dst + (int64_t(z) * s + y) * s;
      int sy = c.y0 + y;
      if (sz < 0 || sz >= c.d || sy < 0 || sy >= c.h) {
        std::fill(row, row + s, 0.0f);
        continue;
      }
      for (int x = 0; x < s; x++) row[x] = crop_fetch(c.src, c.d, c.h, c.w, sz, sy, c.x0 + x);
    }
  }
}

}  // namespace cpu
}  // namespace medswav

#endif  // MEDSWAV_CPU_MULTICROP_CPU_H_
