#include "rescale.h"

#include "cpu/rescale_cpu.h"

DALI_SCHEMA(medswav__Rescale)
    .DocStr(R"(Rescales a 2-D image by a per-sample factor, keeping the result's sides in a range.

Size rule (METHOD.md section 4; N-D in design): with target sides ``t = scale * shape``, the
aspect-preserving factor ``k`` closest to 1 that brings every side into ``[min_size, max_size]`` is
applied: ``k = clip(1, min_size / min(t), max_size / max(t))``. If the aspect ratio is too extreme for
the range (``min_size / min(t) > max_size / max(t)``), ``k = min_size / min(t)``. Each output side is
``round(k * t)`` clamped into ``[min_size, max_size]`` (the only place where the aspect ratio may
change) and at least 1. A bound <= 0 disables it. Example: a 512 x 512 CT slice with scale 0.4 gives
t = 204.8, k = 600 / 204.8, output 600 x 600; a 3000 x 2500 radiograph with scale 0.3 gives 900 x 750.

Resampling is bilinear with pixel centres aligned (``src = (dst + 0.5) * in / out - 0.5``) and edge
clamping; there is no antialiasing filter when shrinking.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("scale", "Resize factor s (> 0), per sample; METHOD.md draws s ~ U[0.1, 0.7].", 0.4f,
                    true)
    .AddOptionalArg("min_size", "Smallest allowed output side in pixels (<= 0: no bound).", 600, true)
    .AddOptionalArg("max_size", "Largest allowed output side in pixels (<= 0: no bound).", 1200, true);

namespace medswav {

template <>
void Rescale<CPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<CPUBackend>(0);
  auto &out = ws.Output<CPUBackend>(0);
  out.SetLayout(in.GetLayout());
  for_each_sample(ws, out.shape(), [&](int i) {
    auto is = in.shape()[i], os = out.shape()[i];
    int h = is[0], w = is[1], oh = os[0], ow = os[1];
    if (int64_t(oh) * ow == 0) return;
    cpu::rescale_sample(in.tensor<float>(i), h, w, out.mutable_tensor<float>(i), oh, ow);
  });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Rescale, ::medswav::Rescale<::dali::CPUBackend>, ::dali::CPU);
