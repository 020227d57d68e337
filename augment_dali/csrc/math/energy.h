// Energy-band normalisation / augmentation (Philipsen et al., IEEE TMI 2015; METHOD.md section 4).
//
// Cascade: I_0 = x; L_i = G_{sigma_i} * I_i; band_i = I_i - L_i; I_{i+1} = L_i (i < B).
// The residual r = I_B is the sixth band. Energies: e_i = std(band_i), e_B = std(r) (population std
// over the whole image). Output:
//   out = sum_{i<B} g_i * band_i + mean(r) + g_B * (r - mean(r)),  g_i = ref_i / e_i,
// so the bands telescope back to x when ref_i == e_i. A band whose energy is (numerically) zero has no
// structure to scale: it gets g_i = 1 (passed through unscaled), which makes a constant image a fixed
// point and never divides by zero.
#ifndef MEDSWAV_MATH_ENERGY_H_
#define MEDSWAV_MATH_ENERGY_H_

#include "math/host_device.h"

namespace medswav {

// Energies at or below this (in [0, 1] intensity units, far below one 16-bit grey level) count as zero.
constexpr double kMinBandEnergy = 1e-6;
constexpr int kMaxBands = 16;

MSW_HD double std_from_moments(double sum, double sum_sq, double n) {
  if (n <= 0) return 0.0;
  double mean = sum / n;
  double var = sum_sq / n - mean * mean;
  return var > 0 ? sqrt(var) : 0.0;
}

MSW_HD float band_gain(float ref, double energy) {
  return energy > kMinBandEnergy ? static_cast<float>(ref / energy) : 1.0f;
}

// Output pixel from the cascade levels I_0..I_B at one position (level(i) = I_i there). The levels are
// read once each, in order, so a GPU thread keeps two in registers instead of an array in local memory.
template <typename Level>
MSW_HD float combine_bands(Level level, const float *gains, int num_bands, float residual_mean) {
  float acc = 0.0f, hi = level(0);
  for (int i = 0; i < num_bands; i++) {
    float lo = level(i + 1);
    acc += gains[i] * (hi - lo);
    hi = lo;
  }
  return acc + residual_mean + gains[num_bands] * (hi - residual_mean);
}

}  // namespace medswav

#endif  // MEDSWAV_MATH_ENERGY_H_
