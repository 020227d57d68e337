// Host-side plans shared by the CPU and GPU halves of the harness (the same derivations the DALI
// operators make in SetupImpl).
#ifndef MEDSWAV_HARNESS_HARNESS_COMMON_H_
#define MEDSWAV_HARNESS_HARNESS_COMMON_H_

#include <cmath>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "math/cascade.h"
#include "math/crop.h"
#include "math/energy.h"

namespace medswav {
namespace harness {

// The message msw_last_error() returns (defined in harness_cpu.cc).
std::string &last_error();

// Runs fn, turning an exception into -1 and its message.
template <typename Fn>
int guarded(Fn &&fn) {
  try {
    fn();
    return 0;
  } catch (const std::exception &e) {
    last_error() = e.what();
    return -1;
  }
}

// One cascade per sample from its sigmas; exact taps packed into `taps`.
inline std::vector<CascadeKernels> plan_cascades(int n, int num_sigmas, const float *sigmas, std::vector<float> &taps) {
  if (num_sigmas < 1 || num_sigmas >= kMaxBands)
    throw std::invalid_argument("need 1.." + std::to_string(kMaxBands - 1) + " sigmas, got " +
                                std::to_string(num_sigmas));
  std::vector<CascadeKernels> plans(n);
  std::map<float, RecursiveGaussian> memo;  // the coefficients take a bisection; samples share sigmas
  auto recursive_for = [&memo](float sigma) {
    auto it = memo.find(sigma);
    return it != memo.end() ? it->second : (memo[sigma] = recursive_gaussian(sigma));
  };
  for (int i = 0; i < n; i++)
    for (int b = 0; b < num_sigmas; b++) {
      float s = sigmas[i * num_sigmas + b];
      if (!(s > 0) || !std::isfinite(s))
        throw std::invalid_argument("sigmas must be finite and > 0, got " + std::to_string(s));
      add_cascade_band(plans[i], taps, s, recursive_for);
    }
  return plans;
}

// Crop descriptors group-major (as MultiCrop::crop_descs), dst pointers into outputs[i * G + g].
inline std::vector<CropDesc> plan_crops(int n, const int *in_dhw, const float *const *inputs, int num_groups,
                                        const int *crop_depths, const int *crop_sizes, const int *num_crops,
                                        float border, const double *positions, float *const *outputs,
                                        std::vector<int> &group_start) {
  if (!(border >= 0 && border < 0.5f)) throw std::invalid_argument("border must be in [0, 0.5)");
  int total = 0;
  for (int g = 0; g < num_groups; g++) {
    if (crop_sizes[g] <= 0 || crop_depths[g] <= 0 || num_crops[g] < 0)
      throw std::invalid_argument("crop sizes and depths must be > 0, counts >= 0");
    total += num_crops[g];
  }
  std::vector<CropDesc> descs;
  group_start.clear();
  int j0 = 0;
  for (int g = 0; g < num_groups; g++) {
    group_start.push_back(static_cast<int>(descs.size()));
    int s = crop_sizes[g], depth = crop_depths[g];
    for (int i = 0; i < n; i++) {
      int d = in_dhw[3 * i], h = in_dhw[3 * i + 1], w = in_dhw[3 * i + 2];
      for (int c = 0; c < num_crops[g]; c++) {
        const double *u = positions + (size_t(i) * total + j0 + c) * 3;
        for (int a = 0; a < 3; a++)
          if (!(u[a] >= 0 && u[a] <= 1)) throw std::invalid_argument("positions must lie in [0, 1]");
        descs.push_back({inputs[i], outputs[size_t(i) * num_groups + g] + int64_t(c) * depth * s * s, d, h, w,
                         crop_origin(d, depth, border, u[0]), crop_origin(h, s, border, u[1]),
                         crop_origin(w, s, border, u[2])});
      }
    }
    j0 += num_crops[g];
  }
  group_start.push_back(static_cast<int>(descs.size()));
  return descs;
}

}  // namespace harness
}  // namespace medswav

#endif  // MEDSWAV_HARNESS_HARNESS_COMMON_H_
