#include "energy_bands.h"

#include <algorithm>
#include <cstring>

DALI_SCHEMA(medswav__EnergyBands)
    .DocStr(R"(Energy-band augmentation (Philipsen et al., IEEE TMI 34(9), 2015; METHOD.md section 4).

The image is split by a cascade of Gaussian blurs with the given ``sigmas`` (pixels; default
1, 2, 4, 8, 16): ``band_i = I_i - G_i * I_i``, ``I_{i+1} = G_i * I_i``, with the last low-pass image
``r`` kept as one more band (``len(sigmas) + 1`` bands in all). The energy of a band is its standard
deviation over the whole image. The output is

    out = sum_i ref_i / e_i * band_i + mean(r) + ref_last / e_last * (r - mean(r)),

so the low-pass residual is rescaled about its mean (contrast, not brightness). Passing the image's
own energies reproduces the input (up to float rounding). A band with energy <= 1e-6 (e.g. every band
of a constant image) is passed through unscaled, so the output is always finite for finite input.

Blurs are separable along every axis of the sample (2-D "HW" now, 3-D ready) with kernel radius
``ceil(3 sigma)`` and reflect-101 borders (mirror without repeating the edge pixel).)")
    .NumInput(1)
    .NumOutput(1)
    .AddArg("ref_energies",
            "Target energy (standard deviation) per band, ``len(sigmas) + 1`` floats per sample; "
            "typically drawn from [mean - std, mean + std] of the data set's reference statistics.",
            DALI_FLOAT_VEC, true)
    .AddOptionalArg("sigmas", "Gaussian sigmas (pixels) of the cascade, ascending.",
                    std::vector<float>{1.f, 2.f, 4.f, 8.f, 16.f}, true);

DALI_SCHEMA(medswav__BandEnergies)
    .DocStr(R"(Band energies of each image: ``len(sigmas) + 1`` float32 values, the standard deviations over
the image of the Gaussian-cascade bands and of the low-pass residual, exactly as ``energy_bands``
measures them (see there). Used to collect the data set's reference statistics.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("sigmas", "Gaussian sigmas (pixels) of the cascade, ascending.",
                    std::vector<float>{1.f, 2.f, 4.f, 8.f, 16.f}, true);

namespace medswav {
namespace {

// The CPU form of conv1d_at: the same taps summed in the same order (from 0, tap -r first) with the
// same reflect101 borders, evaluated for 16 (SSE2) or 32 (AVX2) neighbouring outputs at once in SIMD
// registers (GCC vector extensions). Lines along the last axis are first
// copied into a reflect-padded buffer; along the other axes every output line combines whole
// (reflected) source lines.
typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));

template <typename V>
inline __attribute__((always_inline)) V load_v(const float *p) {
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

void conv_axis_cpu(const float *src, float *dst, const AxisExtent &e, const float *taps, int r,
                   std::vector<float> &pad) {
  int n = e.n, num_taps = 2 * r + 1;
  if (e.inner == 1) {  // lines are contiguous (last axis)
    pad.resize(n + 2 * r);
    for (int64_t o = 0; o < e.outer; o++) {
      const float *s = src + o * n;
      for (int q = 0; q < n + 2 * r; q++) pad[q] = s[reflect101(q - r, n)];
      weighted_sum_dispatch(PaddedLine{pad.data()}, dst + o * n, n, taps, num_taps);
    }
    return;
  }
  // Vertical strips of kStrip columns: the 2r+1 source rows of one output row then stay in L1 for the
  // next output rows, which reuse all but one of them.
  constexpr int64_t kStrip = 128;
  std::vector<const float *> rows(num_taps);
  for (int64_t o = 0; o < e.outer; o++) {
    const float *s = src + o * n * e.inner;
    for (int64_t i0 = 0; i0 < e.inner; i0 += kStrip) {
      int64_t m = std::min(kStrip, e.inner - i0);
      for (int p = 0; p < n; p++) {
        for (int k = 0; k < num_taps; k++) rows[k] = s + reflect101(p - r + k, n) * e.inner + i0;
        weighted_sum_dispatch(RowSet{rows.data()}, dst + (o * n + p) * e.inner + i0, m, taps, num_taps);
      }
    }
  }
}

// Separable blur over all axes; `tmp` is scratch of the same size.
void blur_cpu(const float *src, float *dst, float *tmp, const dali::TensorShape<> &sh, const float *taps,
              int r, std::vector<float> &pad) {
  int nd = sh.size();
  const float *cur = src;
  for (int a = nd - 1; a >= 0; a--) {
    // ping-pong so that the last pass (axis 0) lands in dst
    float *out = ((nd - 1 - a) % 2 == (nd - 1) % 2) ? dst : tmp;
    conv_axis_cpu(cur, out, axis_extent(sh, a), taps, r, pad);
    cur = out;
  }
}

}  // namespace

template <typename Backend, bool EnergiesOnly>
void EnergyBandsImpl<Backend, EnergiesOnly>::RunCPU(Workspace &ws) {
  const auto &in = ws.Input<CPUBackend>(0);
  auto &out = ws.Output<CPUBackend>(0);
  out.SetLayout(EnergiesOnly ? dali::TensorLayout() : in.GetLayout());
  for_each_sample(ws, in.shape(), [&](int i) {
    auto sh = in.shape()[i];
    int64_t vol = sh.num_elements();
    const auto &k = kernels_[i];
    int nb = k.num_bands();
    if (vol == 0) {  // an empty image has no energy
      if (EnergiesOnly) std::fill_n(out.mutable_tensor<float>(i), nb + 1, 0.0f);
      return;
    }
    // planes[0] is the input; planes[1..nb] the low-pass cascade.
    std::vector<float> storage((nb + 1) * vol);
    float *tmp = storage.data() + nb * vol;
    std::vector<const float *> planes(nb + 1);
    planes[0] = in.tensor<float>(i);
    std::vector<float> pad;
    for (int b = 0; b < nb; b++) {
      float *low = storage.data() + b * vol;
      blur_cpu(planes[b], low, tmp, sh, taps_.data() + k.offset[b], k.radius[b], pad);
      planes[b + 1] = low;
    }
    std::vector<double> sum(nb + 1, 0.0), sum_sq(nb + 1, 0.0);
    for (int b = 0; b <= nb; b++) {
      // four interleaved partial sums: breaks the add-latency chain (order differs from the GPU's
      // tree reduction anyway; both are double precision)
      double s[4] = {0, 0, 0, 0}, ss[4] = {0, 0, 0, 0};
      const float *hi = planes[b], *lo = b < nb ? planes[b + 1] : nullptr;
      for (int64_t p = 0; p < vol; p++) {
        double v = lo ? double(hi[p] - lo[p]) : double(hi[p]);
        s[p & 3] += v;
        ss[p & 3] += v * v;
      }
      sum[b] = (s[0] + s[1]) + (s[2] + s[3]);
      sum_sq[b] = (ss[0] + ss[1]) + (ss[2] + ss[3]);
    }
    if (EnergiesOnly) {
      float *dst = out.mutable_tensor<float>(i);
      for (int b = 0; b <= nb; b++) dst[b] = static_cast<float>(std_from_moments(sum[b], sum_sq[b], vol));
      return;
    }
    float gains[kMaxBands + 1];
    const float *ref = (*refs_)[i].data;
    for (int b = 0; b <= nb; b++) gains[b] = band_gain(ref[b], std_from_moments(sum[b], sum_sq[b], vol));
    float res_mean = static_cast<float>(sum[nb] / vol);
    float *dst = out.mutable_tensor<float>(i);
    float levels[kMaxBands + 1];
    for (int64_t p = 0; p < vol; p++) {
      for (int b = 0; b <= nb; b++) levels[b] = planes[b][p];
      dst[p] = combine_bands(levels, gains, nb, res_mean);
    }
  });
}

template <>
void EnergyBands<CPUBackend>::RunImpl(Workspace &ws) { RunCPU(ws); }
template <>
void BandEnergies<CPUBackend>::RunImpl(Workspace &ws) { RunCPU(ws); }

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__EnergyBands, ::medswav::EnergyBands<::dali::CPUBackend>, ::dali::CPU);
DALI_REGISTER_OPERATOR(medswav__BandEnergies, ::medswav::BandEnergies<::dali::CPUBackend>, ::dali::CPU);
