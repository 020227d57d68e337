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
      // crop_fetch along the row: zeros left and right of the image, one copy of the columns inside it.
      int x_begin = std::clamp(-c.x0, 0, s), x_end = std::clamp(c.w - c.x0, x_begin, s);
      std::fill(row, row + x_begin, 0.0f);
      std::copy(c.src + (int64_t(sz) * c.h + sy) * c.w + c.x0 + x_begin,
                c.src + (int64_t(sz) * c.h + sy) * c.w + c.x0 + x_end, row + x_begin);
      std::fill(row + x_end, row + s, 0.0f);
    }
  }
}

}  // namespace cpu
}  // namespace medswav

#endif  // MEDSWAV_CPU_MULTICROP_CPU_H_
