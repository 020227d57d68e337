// CPU backend of energy_bands / band_energies without DALI: the SIMD blur passes, moments and
// combination that the DALI operator (energy_bands.cc) runs per sample on its thread pool, and that the
// kernel harness (harness/harness_cpu.cc) compares the CUDA kernels with.
#ifndef MEDSWAV_CPU_ENERGY_BANDS_CPU_H_
#define MEDSWAV_CPU_ENERGY_BANDS_CPU_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "math/cascade.h"
#include "math/energy.h"
#include "math/gaussian.h"
#include "math/recursive_gaussian.h"

// Vector helpers below are always inlined into their target-specific callers: no vector crosses an ABI.
// (Not popped: GCC reports -Wpsabi where templates are instantiated, at the end of the including file.)
#pragma GCC diagnostic ignored "-Wpsabi"

namespace medswav {
namespace cpu {
// The CPU form of conv1d_at: the same taps summed in the same order (from 0, tap -r first) with the
// same reflect101 borders, evaluated for 16 (SSE2) or 32 (AVX2) neighbouring outputs at once in SIMD
// registers (GCC vector extensions). Lines along the last axis are first
// copied into a reflect-padded buffer; along the other axes every output line combines whole
// (reflected) source lines.
typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));

template <typename V, typename T = float>
inline __attribute__((always_inline)) V load_v(const T *p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[i] = sum_k taps[k] * src(k)[i] for i in [0, m): 4 vectors of outputs per pass, held in
// registers, so no partial sum goes through memory.
template <typename V, typename Src>
inline __attribute__((always_inline)) void weighted_sum(Src src, float *out, int64_t m, const float *taps,
                                                        int num_taps) {
  constexpr int W = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + 4 * W <= m; i += 4 * W) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int k = 0; k < num_taps; k++) {
      const float *q = src(k) + i;
      V t = V{} + taps[k];
      a0 += t * load_v<V>(q);
      a1 += t * load_v<V>(q + W);
      a2 += t * load_v<V>(q + 2 * W);
      a3 += t * load_v<V>(q + 3 * W);
    }
    std::memcpy(out + i, &a0, sizeof(V));
    std::memcpy(out + i + W, &a1, sizeof(V));
    std::memcpy(out + i + 2 * W, &a2, sizeof(V));
    std::memcpy(out + i + 3 * W, &a3, sizeof(V));
  }
  for (; i < m; i++) {
    float a = 0.0f;
    for (int k = 0; k < num_taps; k++) a += taps[k] * src(k)[i];
    out[i] = a;
  }
}

struct PaddedLine {
  const float *padded;
  const float *operator()(int k) const { return padded + k; }
};
struct RowSet {
  const float *const *rows;
  const float *operator()(int k) const { return rows[k]; }
};

// Baseline x86-64 (SSE2) and, picked at run time where the CPU has them, AVX2 + FMA versions.
template <typename Src>
void weighted_sum_sse(Src src, float *out, int64_t m, const float *taps, int num_taps) {
  weighted_sum<v4f>(src, out, m, taps, num_taps);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define MSW_HAVE_AVX2_PATH 1
template <typename Src>
__attribute__((target("avx2,fma"))) void weighted_sum_avx2(Src src, float *out, int64_t m,
                                                            const float *taps, int num_taps) {
  weighted_sum<v8f>(src, out, m, taps, num_taps);
}
#endif

template <typename Src>
void weighted_sum_dispatch(Src src, float *out, int64_t m, const float *taps, int num_taps) {
#ifdef MSW_HAVE_AVX2_PATH
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) return weighted_sum_avx2(src, out, m, taps, num_taps);
#endif
  weighted_sum_sse(src, out, m, taps, num_taps);
}

// Band moments taken while the last blur pass of a band writes its output (those rows are still in L1;
// only the input's rows are read again), instead of re-reading both planes afterwards: sum and sum of squares of hi - lo (the band; hi = the
// blur's input at the same position, lo = the output) and, for the last band, of lo (the residual).
struct MomentSink {
  const float *hi;  // the blur's input, indexed like the pass's dst
  bool residual;
  double sum = 0, sum_sq = 0, res_sum = 0, res_sum_sq = 0;
  inline void add(int64_t offset, const float *lo, int64_t m);  // after band_moments, below
};

// The pass along an inner axis (the blur's last pass when the sample has >= 2 axes) feeds `sink`, if
// given, with every output row it completes.
inline void conv_axis_cpu(const float *src, float *dst, const AxisExtent &e, const float *taps, int r,
                   std::vector<float> &pad, MomentSink *sink = nullptr) {
  int n = e.n, num_taps = 2 * r + 1;
  if (e.inner == 1) {  // lines are contiguous (last axis)
    pad.resize(n + 2 * r);
    for (int64_t o = 0; o < e.outer; o++) {
      const float *s = src + o * n;
      for (int q = 0; q < r; q++) pad[q] = s[reflect101(q - r, n)];
      std::copy_n(s, n, pad.data() + r);
      for (int q = n + r; q < n + 2 * r; q++) pad[q] = s[reflect101(q - r, n)];
      weighted_sum_dispatch(PaddedLine{pad.data()}, dst + o * n, n, taps, num_taps);
    }
    return;
  }
  // Vertical strips of kStrip columns: the 2r+1 source rows of one output row then stay in L1/L2 for the
  // next output rows, which reuse all but one of them. 512 columns (2 KiB per row) read each row as a
  // long run the prefetcher follows: 128 halved the pass's speed on 1200-px images (memory stalls).
  constexpr int64_t kStrip = 512;
  std::vector<const float *> rows(num_taps);
  for (int64_t o = 0; o < e.outer; o++) {
    const float *s = src + o * n * e.inner;
    for (int64_t i0 = 0; i0 < e.inner; i0 += kStrip) {
      int64_t m = std::min(kStrip, e.inner - i0);
      for (int p = 0; p < n; p++) {
        for (int k = 0; k < num_taps; k++) rows[k] = s + reflect101(p - r + k, n) * e.inner + i0;
        int64_t at = (o * n + p) * e.inner + i0;
        weighted_sum_dispatch(RowSet{rows.data()}, dst + at, m, taps, num_taps);
        if (sink) sink->add(at, dst + at, m);
      }
    }
  }
}

// --- recursive Gaussian (math/recursive_gaussian.h) on L lines at once -------------------------------
// The recursion of recursive_gaussian_line, run on a vector of L neighbouring lines per step: element j
// of line l is src[l + j * stride] (lines interleaved), so each step loads one vector. Lines are read
// and written as float, the recursion runs in double (see RecursiveGaussian) on U native double vectors
// of W lanes (U * W == L), with the coefficients broadcast once into registers. L = 16 lines use whole
// 64-byte cache lines of a row per step (and give 4 independent dependency chains per step on AVX2);
// L = 8 serves the leftover lines.
constexpr int kMaxLines = 16;
typedef double v2d __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef float v2f __attribute__((vector_size(8)));
template <typename Vd> struct FloatsOf;  // the float vector with as many lanes as Vd
template <> struct FloatsOf<v2d> { typedef v2f type; };
template <> struct FloatsOf<v4d> { typedef v4f type; };
template <> struct FloatsOf<v8d> { typedef v8f type; };

template <typename Vd, int U>
inline __attribute__((always_inline)) void rg_lines(const RecursiveGaussian &rg, const float *src,
                                                    int64_t stride, float *dst, int64_t dst_stride, int n,
                                                    double *buf) {
  constexpr int W = sizeof(Vd) / sizeof(double), L = U * W;
  typedef typename FloatsOf<Vd>::type Vf;
  const RecursiveGaussian c = rg;  // a local copy: stores through buf cannot alias it
  Vd y1[U], y2[U], y3[U];
  auto load = [&](const float *p, Vd *v) {
    for (int u = 0; u < U; u++) v[u] = __builtin_convertvector(load_v<Vf>(p + u * W), Vd);
  };
  int pad = c.pad, len = n + 2 * pad;
  load(src + reflect101(-pad, n) * stride, y1);
  for (int u = 0; u < U; u++) y2[u] = y3[u] = y1[u];
  for (int q = 0; q < len; q++) {
    Vd x[U];
    load(src + reflect101(q - pad, n) * stride, x);
    for (int u = 0; u < U; u++) {
      Vd y = rg_step(c, x[u], y1[u], y2[u], y3[u]);
      std::memcpy(buf + q * L + u * W, &y, sizeof(Vd));
      y3[u] = y2[u];
      y2[u] = y1[u];
      y1[u] = y;
    }
  }
  for (int u = 0; u < U; u++) y1[u] = y2[u] = y3[u] = load_v<Vd>(buf + (len - 1) * L + u * W);
  for (int q = len - 1; q >= pad; q--) {
    for (int u = 0; u < U; u++) {
      Vd y = rg_step(c, load_v<Vd>(buf + q * L + u * W), y1[u], y2[u], y3[u]);
      if (q < pad + n) {
        Vf f = __builtin_convertvector(y, Vf);
        std::memcpy(dst + (q - pad) * dst_stride + u * W, &f, sizeof(f));
      }
      y3[u] = y2[u];
      y2[u] = y1[u];
      y1[u] = y;
    }
  }
}

template <int L>
void rg_lines_sse(const RecursiveGaussian &c, const float *src, int64_t stride, float *dst,
                  int64_t dst_stride, int n, double *buf) {
  rg_lines<v2d, L / 2>(c, src, stride, dst, dst_stride, n, buf);
}
#ifdef MSW_HAVE_AVX2_PATH
template <int L>
__attribute__((target("avx2,fma"))) void rg_lines_avx2(const RecursiveGaussian &c, const float *src,
                                                       int64_t stride, float *dst, int64_t dst_stride,
                                                       int n, double *buf) {
  rg_lines<v4d, L / 4>(c, src, stride, dst, dst_stride, n, buf);
}
template <int L>
__attribute__((target("avx512f"))) void rg_lines_avx512(const RecursiveGaussian &c, const float *src,
                                                        int64_t stride, float *dst, int64_t dst_stride,
                                                        int n, double *buf) {
  rg_lines<v8d, L / 8>(c, src, stride, dst, dst_stride, n, buf);
}
#endif

// L (8 or 16) lines, interleaved, through the recursion; buf holds (n + 2 pad) * L doubles.
template <int L>
void rg_lines_dispatch(const RecursiveGaussian &c, const float *src, int64_t stride, float *dst,
                       int64_t dst_stride, int n, double *buf) {
  static_assert(L == 8 || L == 16, "8 or 16 lines");
#ifdef MSW_HAVE_AVX2_PATH
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx512) return rg_lines_avx512<L>(c, src, stride, dst, dst_stride, n, buf);
  if (avx2) return rg_lines_avx2<L>(c, src, stride, dst, dst_stride, n, buf);
#endif
  rg_lines_sse<L>(c, src, stride, dst, dst_stride, n, buf);
}

// Lines along the last axis are interleaved for rg_lines by transposing blocks of L lines: 8 x 8 tiles
// in registers (three shuffle stages), leftover columns one by one.
typedef int v8i __attribute__((vector_size(32)));

inline __attribute__((always_inline)) void transpose8x8(const float *src, int64_t src_stride, float *dst,
                                                        int64_t dst_stride) {
  v8f r[8], t[8], u[8];
  for (int j = 0; j < 8; j++) r[j] = load_v<v8f>(src + j * src_stride);
  for (int j = 0; j < 8; j += 2) {
    t[j] = __builtin_shuffle(r[j], r[j + 1], v8i{0, 8, 1, 9, 4, 12, 5, 13});
    t[j + 1] = __builtin_shuffle(r[j], r[j + 1], v8i{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int j = 0; j < 8; j += 4) {
    for (int h = 0; h < 2; h++) {
      u[j + 2 * h] = __builtin_shuffle(t[j + h], t[j + h + 2], v8i{0, 1, 8, 9, 4, 5, 12, 13});
      u[j + 2 * h + 1] = __builtin_shuffle(t[j + h], t[j + h + 2], v8i{2, 3, 10, 11, 6, 7, 14, 15});
    }
  }
  for (int k = 0; k < 4; k++) {
    v8f lo = __builtin_shuffle(u[k], u[k + 4], v8i{0, 1, 2, 3, 8, 9, 10, 11});
    v8f hi = __builtin_shuffle(u[k], u[k + 4], v8i{4, 5, 6, 7, 12, 13, 14, 15});
    std::memcpy(dst + k * dst_stride, &lo, sizeof(lo));
    std::memcpy(dst + (k + 4) * dst_stride, &hi, sizeof(hi));
  }
}

// to_block: to[q * L + j] = from[j * n + q] (L lines of n -> interleaved); else the inverse.
template <int L>
inline __attribute__((always_inline)) void interleave_lines(const float *from, float *to, int64_t n,
                                                            bool to_block) {
  int64_t q = 0;
  for (; q + 8 <= n; q += 8) {
    for (int h = 0; h < L; h += 8) {
      if (to_block)
        transpose8x8(from + h * n + q, n, to + q * L + h, L);
      else
        transpose8x8(from + q * L + h, L, to + h * n + q, n);
    }
  }
  for (; q < n; q++)
    for (int j = 0; j < L; j++) {
      if (to_block)
        to[q * L + j] = from[j * n + q];
      else
        to[j * n + q] = from[q * L + j];
    }
}

template <int L>
void interleave_lines_sse(const float *from, float *to, int64_t n, bool to_block) {
  interleave_lines<L>(from, to, n, to_block);
}
#ifdef MSW_HAVE_AVX2_PATH
template <int L>
__attribute__((target("avx2"))) void interleave_lines_avx2(const float *from, float *to, int64_t n,
                                                           bool to_block) {
  interleave_lines<L>(from, to, n, to_block);
}
#endif

template <int L>
void interleave_lines_dispatch(const float *from, float *to, int64_t n, bool to_block) {
  static_assert(L % 8 == 0, "8 x 8 tiles");
#ifdef MSW_HAVE_AVX2_PATH
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return interleave_lines_avx2<L>(from, to, n, to_block);
#endif
  interleave_lines_sse<L>(from, to, n, to_block);
}

// Lines along the last axis, L at a time: transposed into an interleaved block, filtered, transposed back.
template <int L>
inline void rg_rows(const RecursiveGaussian &c, const float *src, float *dst, int n, float *block,
                    double *buf) {
  interleave_lines_dispatch<L>(src, block, n, true);
  rg_lines_dispatch<L>(c, block, L, block, L, n, buf);
  interleave_lines_dispatch<L>(block, dst, n, false);
}

// --- the recursion down the columns of whole rows (axes other than the last) ------------------------
// Along an inner axis, rows of a strip of up to kColumnStrip neighbouring columns go through the
// recursion together: for each row, the loop over the strip's columns is the SIMD loop (no dependency
// between columns; the one between rows is a strip's worth of work apart), and rows are read and written
// as contiguous runs, which the hardware prefetcher follows (stepping 8 or 16 columns down a 1200-row
// image stalls on memory and on the TLB). The state (the last three outputs of each column) stays in
// double in three rotating strip-wide rows; the causal outputs are kept as float (in dst, and in `tail`
// for the pad rows below the image) for the anti-causal pass, which rounds its input by < 1e-7 relative.
constexpr int64_t kColumnStrip = 512;

// y_row[j] = rg_step(x[j], y1[j], y2[j], y3[j]) over m columns, written to y3 (the oldest state row)
// and, as float, to out. Causal and anti-causal steps alike.
inline __attribute__((always_inline)) void rg_row_impl(const RecursiveGaussian &c, const float *__restrict x,
                                                       const double *__restrict y1, const double *__restrict y2,
                                                       double *__restrict y3, float *__restrict out, int64_t m) {
  const double b = c.b, a1 = c.a1, a2 = c.a2, a3 = c.a3;
  for (int64_t j = 0; j < m; j++) {
    double y = ((b * double(x[j]) + a3 * y3[j]) + a2 * y2[j]) + a1 * y1[j];  // rg_step's order
    y3[j] = y;
    out[j] = static_cast<float>(y);
  }
}

inline void rg_row_sse(const RecursiveGaussian &c, const float *x, const double *y1, const double *y2, double *y3,
                       float *out, int64_t m) {
  rg_row_impl(c, x, y1, y2, y3, out, m);
}
#ifdef MSW_HAVE_AVX2_PATH
inline __attribute__((target("avx2"))) void rg_row_avx2(const RecursiveGaussian &c, const float *x,
                                                        const double *y1, const double *y2, double *y3,
                                                        float *out, int64_t m) {
  rg_row_impl(c, x, y1, y2, y3, out, m);
}
#endif

inline void rg_row(const RecursiveGaussian &c, const float *x, const double *y1, const double *y2, double *y3,
                   float *out, int64_t m) {
#ifdef MSW_HAVE_AVX2_PATH
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return rg_row_avx2(c, x, y1, y2, y3, out, m);
#endif
  rg_row_sse(c, x, y1, y2, y3, out, m);
}

// One strip of m columns (spaced 1, rows spaced `stride`) of n rows through the recursion, src -> dst
// (dst may alias src). `state` holds 3 * kColumnStrip doubles, `tail` pad * kColumnStrip floats.
inline void rg_column_strip(const RecursiveGaussian &c, const float *src, float *dst, int64_t stride, int n,
                            int64_t m, double *state, float *tail, MomentSink *sink, int64_t dst_offset) {
  int pad = c.pad, len = n + 2 * pad;
  double *y1 = state, *y2 = state + kColumnStrip, *y3 = state + 2 * kColumnStrip;
  const float *first = src + reflect101(-pad, n) * stride;
  for (int64_t j = 0; j < m; j++) y1[j] = y2[j] = y3[j] = double(first[j]);
  static thread_local std::vector<float> discard;  // causal outputs above the image are not kept
  discard.resize(kColumnStrip);
  for (int q = 0; q < len; q++) {
    float *out = q < pad ? discard.data() : q < pad + n ? dst + (q - pad) * stride : tail + (q - pad - n) * kColumnStrip;
    rg_row(c, src + reflect101(q - pad, n) * stride, y1, y2, y3, out, m);
    double *t = y3;  // y3 now holds the newest output
    y3 = y2;
    y2 = y1;
    y1 = t;
  }
  // Anti-causal: starts in the steady state of the last causal output (still exact, in y1).
  std::copy_n(y1, m, y2);
  std::copy_n(y1, m, y3);
  for (int q = len - 1; q >= pad; q--) {
    float *row = q < pad + n ? dst + (q - pad) * stride : tail + (q - pad - n) * kColumnStrip;
    float *out = q < pad + n ? row : discard.data();
    rg_row(c, row, y1, y2, y3, out, m);
    if (sink && q < pad + n) sink->add(dst_offset + (q - pad) * stride, out, m);
    double *t = y3;
    y3 = y2;
    y2 = y1;
    y1 = t;
  }
}

// Recursive blur along one axis. Along the last axis, lines are transposed in blocks of 16 (then 8)
// into interleaved blocks for rg_lines, leftover lines go through the scalar recursive_gaussian_line;
// along the other axes, strips of whole rows go through rg_column_strip.
inline void recursive_axis_cpu(const float *src, float *dst, const AxisExtent &e, const RecursiveGaussian &c,
                        std::vector<float> &scratch, MomentSink *sink = nullptr) {
  int n = e.n, len = n + 2 * c.pad;
  if (e.inner == 1) {
    scratch.resize(static_cast<size_t>(2 * len + n) * kMaxLines);  // len * kMaxLines doubles, then a block
    double *buf = reinterpret_cast<double *>(scratch.data());
    float *block = scratch.data() + static_cast<size_t>(2 * len) * kMaxLines;
    int64_t l = 0;
    for (; l + 16 <= e.outer; l += 16) rg_rows<16>(c, src + l * n, dst + l * n, n, block, buf);
    for (; l + 8 <= e.outer; l += 8) rg_rows<8>(c, src + l * n, dst + l * n, n, block, buf);
    for (; l < e.outer; l++) recursive_gaussian_line(c, src + l * n, 1, dst + l * n, 1, n, buf, 1);
    return;
  }
  scratch.resize(static_cast<size_t>(6 + c.pad) * kColumnStrip);  // 3 rows of doubles, then pad float rows
  double *state = reinterpret_cast<double *>(scratch.data());
  float *tail = scratch.data() + 6 * kColumnStrip;
  for (int64_t o = 0; o < e.outer; o++) {
    const float *s = src + o * n * e.inner;
    float *d = dst + o * n * e.inner;
    for (int64_t i0 = 0; i0 < e.inner; i0 += kColumnStrip)
      rg_column_strip(c, s + i0, d + i0, e.inner, n, std::min(kColumnStrip, e.inner - i0), state, tail, sink,
                      o * n * e.inner + i0);
  }
}

// Separable blur of cascade band b over all axes; `tmp` is scratch of the same size. With >= 2 axes, the
// last pass (axis 0) feeds `sink` (its hi is src) if given.
inline void blur_cpu(const float *src, float *dst, float *tmp, const int64_t *shape, int nd,
                     const CascadeKernels &k, int b, const float *all_taps, std::vector<float> &scratch,
                     MomentSink *sink = nullptr) {
  const float *cur = src;
  for (int a = nd - 1; a >= 0; a--) {
    // ping-pong so that the last pass (axis 0) lands in dst
    float *out = ((nd - 1 - a) % 2 == (nd - 1) % 2) ? dst : tmp;
    MomentSink *pass_sink = a == 0 && nd >= 2 ? sink : nullptr;
    if (k.is_recursive(b))
      recursive_axis_cpu(cur, out, axis_extent(shape, nd, a), k.recursive[b], scratch, pass_sink);
    else
      conv_axis_cpu(cur, out, axis_extent(shape, nd, a), all_taps + k.offset[b], k.radius[b], scratch, pass_sink);
    cur = out;
  }
}

// Sum and sum of squares of hi - lo (of hi when lo is null), in double: 8 partial sums in two
// vectors break the add-latency chain (the order differs from the GPU's tree reduction anyway).
inline __attribute__((always_inline)) void band_moments_impl(const float *hi, const float *lo, int64_t n,
                                                              double *sum, double *sum_sq) {
  v4d s[2] = {}, ss[2] = {};
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) {
    v4f d[2] = {load_v<v4f>(hi + p), load_v<v4f>(hi + p + 4)};
    if (lo) {
      d[0] -= load_v<v4f>(lo + p);
      d[1] -= load_v<v4f>(lo + p + 4);
    }
    for (int u = 0; u < 2; u++) {
      v4d v = __builtin_convertvector(d[u], v4d);
      s[u] += v;
      ss[u] += v * v;
    }
  }
  v4d st = s[0] + s[1], sst = ss[0] + ss[1];
  double a = (st[0] + st[1]) + (st[2] + st[3]), aa = (sst[0] + sst[1]) + (sst[2] + sst[3]);
  for (; p < n; p++) {
    double v = lo ? double(hi[p] - lo[p]) : double(hi[p]);
    a += v;
    aa += v * v;
  }
  *sum = a;
  *sum_sq = aa;
}

inline void band_moments_sse(const float *hi, const float *lo, int64_t n, double *sum, double *sum_sq) {
  band_moments_impl(hi, lo, n, sum, sum_sq);
}
#ifdef MSW_HAVE_AVX2_PATH
inline __attribute__((target("avx2"))) void band_moments_avx2(const float *hi, const float *lo, int64_t n,
                                                       double *sum, double *sum_sq) {
  band_moments_impl(hi, lo, n, sum, sum_sq);
}
#endif

inline void band_moments(const float *hi, const float *lo, int64_t n, double *sum, double *sum_sq) {
#ifdef MSW_HAVE_AVX2_PATH
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return band_moments_avx2(hi, lo, n, sum, sum_sq);
#endif
  band_moments_sse(hi, lo, n, sum, sum_sq);
}

inline void MomentSink::add(int64_t offset, const float *lo, int64_t m) {
  double s, ss;
  band_moments(hi + offset, lo, m, &s, &ss);
  sum += s;
  sum_sq += ss;
  if (residual) {
    band_moments(lo, nullptr, m, &s, &ss);
    res_sum += s;
    res_sum_sq += ss;
  }
}

// combine_bands for every element, evaluated band by band over blocks of elements: the same operations
// in the same order per element, in a form the compiler vectorises.
inline void combine_cpu(const float *const *planes, const float *gains, int nb, float res_mean, int64_t n,
                 float *dst) {
  constexpr int64_t kBlock = 512;
  float acc[kBlock];
  for (int64_t p0 = 0; p0 < n; p0 += kBlock) {
    int64_t m = std::min(kBlock, n - p0);
    for (int64_t j = 0; j < m; j++) acc[j] = 0.0f;
    for (int b = 0; b < nb; b++) {
      const float *hi = planes[b] + p0, *lo = planes[b + 1] + p0;
      float g = gains[b];
      for (int64_t j = 0; j < m; j++) acc[j] += g * (hi[j] - lo[j]);
    }
    const float *r = planes[nb] + p0;
    float g = gains[nb];
    for (int64_t j = 0; j < m; j++) dst[p0 + j] = acc[j] + res_mean + g * (r[j] - res_mean);
  }
}

// One sample through the cascade: out = the augmented image (ref given) or the num_bands + 1 energies
// (ref null). Work buffers are kept per thread across calls (no page faults, no zero-filling of ~6
// image-sized planes per sample).
inline void energy_bands_sample(const float *in, const int64_t *shape, int nd, const CascadeKernels &k,
                                const float *all_taps, const float *ref, float *out) {
  int64_t vol = 1;
  for (int d = 0; d < nd; d++) vol *= shape[d];
  int nb = k.num_bands();
  if (vol == 0) {  // an empty image has no energy
    if (!ref) std::fill_n(out, nb + 1, 0.0f);
    return;
  }
  // planes[0] is the input; planes[1..nb] the low-pass cascade.
  static thread_local std::vector<float> storage, pad;
  storage.resize((nb + 1) * vol);
  float *tmp = storage.data() + nb * vol;
  const float *planes[kMaxBands + 1];
  planes[0] = in;
  double sum[kMaxBands + 1], sum_sq[kMaxBands + 1];
  bool fused = nd >= 2;  // the blur's last pass runs along an inner axis and takes the moments
  for (int b = 0; b < nb; b++) {
    float *low = storage.data() + b * vol;
    MomentSink sink{planes[b], b == nb - 1};
    blur_cpu(planes[b], low, tmp, shape, nd, k, b, all_taps, pad, fused ? &sink : nullptr);
    planes[b + 1] = low;
    sum[b] = sink.sum;
    sum_sq[b] = sink.sum_sq;
    if (b == nb - 1) {
      sum[nb] = sink.res_sum;
      sum_sq[nb] = sink.res_sum_sq;
    }
  }
  if (!fused)
    for (int b = 0; b <= nb; b++) band_moments(planes[b], b < nb ? planes[b + 1] : nullptr, vol, sum + b, sum_sq + b);
  if (!ref) {
    for (int b = 0; b <= nb; b++) out[b] = static_cast<float>(std_from_moments(sum[b], sum_sq[b], vol));
    return;
  }
  float gains[kMaxBands + 1];
  for (int b = 0; b <= nb; b++) gains[b] = band_gain(ref[b], std_from_moments(sum[b], sum_sq[b], vol));
  combine_cpu(planes, gains, nb, static_cast<float>(sum[nb] / vol), vol, out);
}

}  // namespace cpu
}  // namespace medswav

#endif  // MEDSWAV_CPU_ENERGY_BANDS_CPU_H_
