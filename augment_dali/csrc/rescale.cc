#include "rescale.h"

#include "cpu/rescale_cpu.h"

DALI_SCHEMA(medswav__Rescale)
    .DocStr(R"(Rescales a 2-D image ("HW") or a 3-D volume ("DHW") by a per-sample factor, keeping the result's
sides in a range.

Size rule (METHOD.md section 4): with target sides ``t_d = scale * shape_d`` (times
``spacing_d / min(spacing)`` when ``spacing`` is given), the aspect-preserving factor ``k`` closest to 1
that brings every side into its range ``[min_d, max_d]`` is applied:
``k = clip(1, max_d(min_d / t_d), min_d(max_d / t_d))``. If the aspect ratio is too extreme for the
ranges, ``k = max_d(min_d / t_d)``. Each output side is ``round(k * t_d)`` clamped into
``[min_d, max_d]`` (the only place where the aspect ratio may change) and at least 1. H and W use
``min_size`` / ``max_size``; the depth D of a volume uses ``min_depth`` / ``max_depth`` (default: the
same as H and W). A bound <= 0 disables it. Example: a 512 x 512 CT slice with scale 0.4 gives
t = 204.8, k = 600 / 204.8, output 600 x 600; a 3000 x 2500 radiograph with scale 0.3 gives 900 x 750;
a 192 x 256 x 256 MR volume with scale 0.5 and the 3-D range (96, 112, 112) - (200, 250, 250) gives
96 x 128 x 128.

Anisotropic spacing: without ``spacing`` the op works in voxels (one factor for every axis, so the
voxel aspect is kept). With ``spacing`` (``ndim`` floats per sample, e.g. (slice spacing, row
spacing, column spacing) in mm) the volume is resampled towards isotropic voxels of the finest
spacing times 1 / (k * scale): a 0.7 x 0.7 x 2.5 mm CT gets 2.5 / 0.7 times more planes than
without, so later voxel-unit steps (energy_bands' sigmas, crop sizes) mean the same physical length
along every axis.

Resampling is bilinear / trilinear with voxel centres aligned (``src = (dst + 0.5) * in / out - 0.5``
per axis) and edge clamping; there is no antialiasing filter when shrinking.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("scale", "Resize factor s (> 0), per sample; METHOD.md draws s ~ U[0.1, 0.7].", 0.4f,
                    true)
    .AddOptionalArg("min_size", "Smallest allowed output H and W (<= 0: no bound).", 600, true)
    .AddOptionalArg("max_size", "Largest allowed output H and W (<= 0: no bound).", 1200, true)
    .AddOptionalArg("min_depth", "Smallest allowed output D of a volume (<= 0: no bound; default min_size).",
                    0, true)
    .AddOptionalArg("max_depth", "Largest allowed output D of a volume (<= 0: no bound; default max_size).",
                    0, true)
    .AddOptionalArg<std::vector<float>>("spacing",
                                        "Optional voxel spacing per axis (ndim floats > 0 per sample); "
                                        "output voxels become isotropic (see above).",
                                        nullptr, true);

namespace medswav {

template <>
void Rescale<CPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<CPUBackend>(0);
  auto &out = ws.Output<CPUBackend>(0);
  out.SetLayout(in.GetLayout());
  for_each_sample(ws, out.shape(), [&](int i) {
    auto is = in.shape()[i], os = out.shape()[i];
    int v = is.size() == 3 ? 1 : 0;  // a 2-D image is a volume of one plane
    int d = v ? is[0] : 1, od = v ? os[0] : 1;
    if (os.num_elements() == 0) return;
    cpu::rescale_sample(in.tensor<float>(i), d, is[v], is[v + 1], out.mutable_tensor<float>(i), od, os[v],
                        os[v + 1]);
  });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Rescale, ::medswav::Rescale<::dali::CPUBackend>, ::dali::CPU);
