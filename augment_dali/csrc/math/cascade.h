// The blur plan of one sample's energy-band cascade and the line geometry of a separable pass, shared
// by the DALI operators, the DALI-free kernels (kernels/energy_bands.cuh, cpu/energy_bands_cpu.h) and
// the harness.
#ifndef MEDSWAV_MATH_CASCADE_H_
#define MEDSWAV_MATH_CASCADE_H_

#include <cstdint>
#include <vector>

#include "math/gaussian.h"
#include "math/host_device.h"
#include "math/recursive_gaussian.h"

namespace medswav {

// Blur kernels of one sample's cascade. Band b uses the recursive filter recursive[b] when
// recursive[b].pad > 0 (sigma >= kRecursiveMinSigma), else the exact taps
// taps[offset[b] .. offset[b] + 2 radius[b]] (packed over all samples).
struct CascadeKernels {
  std::vector<int> offset, radius;
  std::vector<RecursiveGaussian> recursive;
  int num_bands() const { return static_cast<int>(radius.size()); }
  bool is_recursive(int b) const { return recursive[b].pad > 0; }
};

// Appends band sigma's kernel to `k` (its exact taps to `taps`); `recursive_for(sigma)` supplies the
// recursive coefficients (the operators memoise them).
template <typename RecursiveFor>
void add_cascade_band(CascadeKernels &k, std::vector<float> &taps, float sigma, RecursiveFor &&recursive_for) {
  k.offset.push_back(static_cast<int>(taps.size()));
  k.radius.push_back(gaussian_radius(sigma));
  if (sigma >= kRecursiveMinSigma) {
    k.recursive.push_back(recursive_for(sigma));
  } else {
    auto t = gaussian_taps(sigma);
    taps.insert(taps.end(), t.begin(), t.end());
    k.recursive.push_back(RecursiveGaussian{0, 0, 0, 0, 0});
  }
}

// Extents of a convolution along `axis`: elements are (outer, n, inner), `inner` contiguous.
struct AxisExtent {
  int64_t outer, inner;
  int n;
};

MSW_HD AxisExtent axis_extent(const int64_t *shape, int ndim, int axis) {
  AxisExtent e{1, 1, static_cast<int>(shape[axis])};
  for (int d = 0; d < axis; d++) e.outer *= shape[d];
  for (int d = axis + 1; d < ndim; d++) e.inner *= shape[d];
  return e;
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_CASCADE_H_
