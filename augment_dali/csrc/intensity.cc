#include "intensity.h"

DALI_SCHEMA(medswav__Gamma)
    .DocStr(R"(Gamma intensity augmentation: ``out = clamp(x, 0, 1) ** gamma``.

The input is a float32 image with intensities mapped to [0, 1] (any number of dimensions). The clamp
makes the result NaN-free for any input. METHOD.md draws ``gamma`` from U[1.8, 2.6] per sample: pass
``gamma=fn.random.uniform(range=[1.8, 2.6])``.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("gamma", "Exponent (> 0), per sample.", 2.2f, true);

DALI_SCHEMA(medswav__Linear)
    .DocStr(R"(Linear intensity augmentation: ``out = scale * x + shift`` (no clamping).

``shift`` is in units of the [0, 1] intensity range, so METHOD.md's "b within +-20% of the range" is
``shift ~ U[-0.2, 0.2]``; ``scale ~ U[0.9, 1.1]``. Both accept per-sample argument inputs.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("scale", "Multiplicative factor a, per sample.", 1.0f, true)
    .AddOptionalArg("shift", "Additive offset b (units of the [0, 1] range), per sample.", 0.0f, true);

namespace medswav {
namespace {

// out[k] = px(in[k]) over every pixel of sample i, px = make_px(i); samples on the thread pool.
template <typename MakePx>
void map_pixels(Workspace &ws, MakePx make_px) {
  const auto &in = ws.Input<CPUBackend>(0);
  auto &out = ws.Output<CPUBackend>(0);
  out.SetLayout(in.GetLayout());
  for_each_sample(ws, in.shape(), [&](int i) {
    const float *src = in.tensor<float>(i);
    float *dst = out.mutable_tensor<float>(i);
    const auto px = make_px(i);
    for (int64_t k = 0, n = in.shape().tensor_size(i); k < n; k++) dst[k] = px(src[k]);
  });
}

}  // namespace

template <>
void Gamma<CPUBackend>::RunImpl(Workspace &ws) {
  map_pixels(ws, [&](int i) { return GammaPx{arg_at(gamma_, i)}; });
}

template <>
void Linear<CPUBackend>::RunImpl(Workspace &ws) {
  map_pixels(ws, [&](int i) { return LinearPx{arg_at(scale_, i), arg_at(shift_, i)}; });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Gamma, ::medswav::Gamma<::dali::CPUBackend>, ::dali::CPU);
DALI_REGISTER_OPERATOR(medswav__Linear, ::medswav::Linear<::dali::CPUBackend>, ::dali::CPU);
