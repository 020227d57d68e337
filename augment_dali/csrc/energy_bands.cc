#include "energy_bands.h"

#include <algorithm>

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
// same reflect101 borders, but with the loops interchanged so that the compiler vectorises across
// output elements: lines along the last axis are first copied into a reflect-padded buffer; along
// other axes every output line accumulates whole (reflected) source lines.
void conv_axis_cpu(const float *src, float *dst, const AxisExtent &e, const float *taps, int r,
                   std::vector<float> &pad) {
  int n = e.n;
  if (e.inner == 1) {  // lines are contiguous (last axis)
    pad.resize(n + 2 * r);
    for (int64_t o = 0; o < e.outer; o++) {
      const float *s = src + o * n;
      float *__restrict__ d = dst + o * n;
      float *__restrict__ padded = pad.data();
      for (int q = 0; q < n + 2 * r; q++) padded[q] = s[reflect101(q - r, n)];
      std::fill(d, d + n, 0.0f);
      for (int k = 0; k <= 2 * r; k++) {
        const float t = taps[k];
        const float *__restrict__ sk = padded + k;
        for (int p = 0; p < n; p++) d[p] += t * sk[p];
      }
    }
    return;
  }
  for (int64_t o = 0; o < e.outer; o++) {
    const float *s = src + o * n * e.inner;
    for (int p = 0; p < n; p++) {
      float *__restrict__ d = dst + (o * n + p) * e.inner;
      std::fill(d, d + e.inner, 0.0f);
      for (int k = 0; k <= 2 * r; k++) {
        const float t = taps[k];
        const float *__restrict__ sk = s + reflect101(p - r + k, n) * e.inner;
        for (int64_t i = 0; i < e.inner; i++) d[i] += t * sk[i];
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
