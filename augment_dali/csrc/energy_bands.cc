#include "energy_bands.h"
#include "cpu/energy_bands_cpu.h"


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

Blurs are separable along every axis of the sample (2-D "HW" now, 3-D ready) with reflect-101 borders
(mirror without repeating the edge pixel). Sigmas below 4 use the exact normalised taps of radius
``ceil(3 sigma)``; sigmas from 4 on a recursive (IIR) Gaussian whose cost per pixel does not grow with
sigma: third order, causal + anti-causal, poles of van Vliet, Young & Verbeek (1998) scaled so the
variance is exactly sigma^2, run in double, lines extended by ``ceil(3 sigma)`` reflect-101 elements.
Against the exact Gaussian its impulse response differs by at most ~1% of the peak; on real CT/MR
slices the band energies differ by < 0.5% and the output by < 2e-3 (intensities in [0, 1]).
``band_energies`` measures energies with this same cascade.)")
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

template <typename Backend, bool EnergiesOnly>
void EnergyBandsImpl<Backend, EnergiesOnly>::RunCPU(Workspace &ws) {
  const auto &in = ws.Input<CPUBackend>(0);
  auto &out = ws.Output<CPUBackend>(0);
  out.SetLayout(EnergiesOnly ? dali::TensorLayout() : in.GetLayout());
  for_each_sample(ws, in.shape(), [&](int i) {
    auto sh = in.shape()[i];
    cpu::energy_bands_sample(in.tensor<float>(i), sh.data(), sh.size(), kernels_[i], taps_.data(),
                             EnergiesOnly ? nullptr : (*refs_)[i].data, out.mutable_tensor<float>(i));
  });
}

template <>
void EnergyBands<CPUBackend>::RunImpl(Workspace &ws) { RunCPU(ws); }
template <>
void BandEnergies<CPUBackend>::RunImpl(Workspace &ws) { RunCPU(ws); }

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__EnergyBands, ::medswav::EnergyBands<::dali::CPUBackend>, ::dali::CPU);
DALI_REGISTER_OPERATOR(medswav__BandEnergies, ::medswav::BandEnergies<::dali::CPUBackend>, ::dali::CPU);
