// Robust intensity window of one image: two exact percentiles (NumPy's default "linear" method) from a
// histogram of its integer values, host code (CPU backend of `intensity` and operator `robust_window`).
//
// Shard pixels are integers (int16 CT in HU, uint16 MR, uint8 radiographs), usually decoded to float32.
// Values that are whole numbers in [-32768, 65535] index a 98304-bin histogram in one pass; the order
// statistics, and so the exact percentiles, follow from the cumulative counts walked between the
// smallest and the largest value seen. Only that range of bins is cleared afterwards, so a sample costs
// one pass over its pixels plus its value range. An image with other values (fractions, wider integers,
// +-inf) falls back to std::nth_element on a copy: exact as well, about 3x slower. NaNs are left out.
#ifndef MEDSWAV_ROBUST_WINDOW_H_
#define MEDSWAV_ROBUST_WINDOW_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace medswav {

constexpr int32_t kHistMin = -32768, kHistMax = 65535;

struct Window {
  double lo, hi;
};

// Value at fractional position pos in [0, n - 1] of the sorted values, interpolated between the two
// neighbouring order statistics like numpy.percentile (method "linear").
inline double interpolate_order(double a, double b, double frac) {
  return frac < 0.5 ? a + (b - a) * frac : b - (b - a) * (1.0 - frac);
}

// Ranks k and k + 1 (clamped to n - 1) of both positions, ascending: what one cumulative walk visits.
struct RankQuery {
  int64_t rank[4];
  double frac[2];
  RankQuery(int64_t n, double p_lo, double p_hi) {
    double pos[2] = {p_lo / 100.0 * double(n - 1), p_hi / 100.0 * double(n - 1)};
    for (int j = 0; j < 2; j++) {
      int64_t k = std::min<int64_t>(static_cast<int64_t>(std::floor(pos[j])), n - 1);
      rank[2 * j] = k;
      rank[2 * j + 1] = std::min<int64_t>(k + 1, n - 1);
      frac[j] = pos[j] - double(k);
    }
  }
  Window window(const double *v) const {
    return {interpolate_order(v[0], v[1], frac[0]), interpolate_order(v[2], v[3], frac[1])};
  }
};

// Histogram pass. Returns false (histogram left all zero) when a value does not fit.
template <typename T>
bool histogram_window(const T *x, int64_t n, const RankQuery &q, Window *out) {
  static thread_local std::vector<uint32_t> hist(kHistMax - kHistMin + 1, 0u);
  uint32_t *h = hist.data() - kHistMin;  // h[v] counts value v
  int32_t vmin = kHistMax, vmax = kHistMin;
  bool fits = n < int64_t(std::numeric_limits<uint32_t>::max());
  if constexpr (std::is_integral_v<T> && sizeof(T) <= 2) {
    for (int64_t k = 0; k < n; k++) {
      int32_t v = x[k];
      h[v]++;
      vmin = std::min(vmin, v);
      vmax = std::max(vmax, v);
    }
  } else {
    for (int64_t k = 0; k < n && fits; k++) {
      // NaN fails the range test; the clamp keeps the index in bounds before the check ends the loop
      float f = static_cast<float>(x[k]);
      bool ok = f >= float(kHistMin) && f <= float(kHistMax);
      int32_t v = ok ? static_cast<int32_t>(f) : 0;
      fits = ok && static_cast<float>(v) == f;
      h[v] += fits;
      vmin = std::min(vmin, v);
      vmax = std::max(vmax, v);
    }
  }
  if (!fits) {
    if (vmin <= vmax) std::fill(h + vmin, h + vmax + 1, 0u);
    return false;
  }
  double v[4];
  int j = 0;
  uint64_t below = 0;  // values < b
  for (int32_t b = vmin; b <= vmax && j < 4; b++) {
    below += h[b];
    while (j < 4 && int64_t(below) > q.rank[j]) v[j++] = b;
  }
  std::fill(h + vmin, h + vmax + 1, 0u);
  *out = q.window(v);
  return true;
}

// Exact fallback for any values: order statistics by selection on a copy (NaNs dropped).
template <typename T>
Window selection_window(const T *x, int64_t n, double p_lo, double p_hi) {
  static thread_local std::vector<double> buf;
  buf.clear();
  for (int64_t k = 0; k < n; k++)
    if (!std::isnan(static_cast<double>(x[k]))) buf.push_back(static_cast<double>(x[k]));
  if (buf.empty()) return {0.0, 0.0};
  RankQuery q(static_cast<int64_t>(buf.size()), p_lo, p_hi);
  double v[4];
  auto begin = buf.begin();
  for (int j = 0; j < 4; j++) {  // ranks ascend: each selection only needs the part above the last
    auto nth = buf.begin() + q.rank[j];
    if (nth >= begin) {
      std::nth_element(begin, nth, buf.end());
      begin = nth + 1;
    }
    v[j] = *nth;
  }
  return q.window(v);
}

// Percentiles p_lo <= p_hi (in [0, 100]) of the n values at x; {0, 0} for an empty image.
template <typename T>
Window robust_window(const T *x, int64_t n, double p_lo, double p_hi) {
  if (n == 0) return {0.0, 0.0};
  Window w;
  if (histogram_window(x, n, RankQuery(n, p_lo, p_hi), &w)) return w;
  return selection_window(x, n, p_lo, p_hi);
}

}  // namespace medswav

#endif  // MEDSWAV_ROBUST_WINDOW_H_
