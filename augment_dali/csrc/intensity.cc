// No code here reads floating-point exception flags; without this GCC keeps the selects of
// math/intensity.h (clamp, pow01) as branches and the per-pixel loops scalar.
#pragma GCC optimize("no-trapping-math")

#include "intensity.h"

#include <algorithm>

#include "robust_window.h"

DALI_SCHEMA(medswav__Gamma)
    .DocStr(R"(Gamma intensity augmentation: ``out = clamp(x, 0, 1) ** gamma``.

The input is a float32 image with intensities mapped to [0, 1] (any number of dimensions). The clamp
makes the result NaN-free for any input. METHOD.md draws ``gamma`` from U[1.8, 2.6] per sample: pass
``gamma=fn.random.uniform(range=[1.8, 2.6])``. ``intensity`` does this and ``linear`` in one pass.)")
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

DALI_SCHEMA(medswav__Intensity)
    .DocStr(R"(Window normalisation and intensity augmentation in one pass:
``out = scale * clamp((x - lo) / (hi - lo), 0, 1) ** gamma + shift``, float32 output.

The window ``(lo, hi)`` of each sample is either ``window`` (e.g. a fixed Hounsfield window for CT,
or ``(0, 1)`` for an image already in [0, 1]) or, where ``robust`` is true, the image's own
``percentiles`` (exact, numpy.percentile's default "linear" method; computed from a histogram of the
integer values, see ``robust_window``). A window narrower than 1e-6 counts as 1e-6 wide, so a
constant image maps to ``shift`` everywhere, never to NaN; NaN input counts as ``lo``.
``gamma == 1`` skips the power (the pass then vectorises), so with ``gamma=1, scale=1, shift=0`` this
is the normalisation alone, and with ``window=(0, 1)`` it equals ``linear(gamma(x, gamma), scale,
shift)`` bit for bit: the pipeline's intensity augmentation (one of gamma or linear) in one pass.
Input: float32, int16, uint16 or uint8 (shard pixels need no cast), any number of dimensions. On the
GPU, ``robust`` is not available: pass ``window=fn.medswav.robust_window(image)`` from the CPU; all
samples are processed by one kernel launch.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("window", "(lo, hi) of the window mapped to [0, 1], per sample (unless robust).",
                    std::vector<float>{0.f, 1.f}, true)
    .AddOptionalArg("robust", "Per sample, 0 or 1 (int32): take the window from the image's percentiles instead.",
                    0, true)
    .AddOptionalArg("percentiles", "(lo, hi) percentiles in [0, 100] of the robust window.",
                    std::vector<float>{0.5f, 99.5f}, true)
    .AddOptionalArg("gamma", "Exponent (> 0) applied to the windowed value, per sample.", 1.0f, true)
    .AddOptionalArg("scale", "Multiplicative factor a after the power, per sample.", 1.0f, true)
    .AddOptionalArg("shift", "Additive offset b (units of the [0, 1] range), per sample.", 0.0f, true);

DALI_SCHEMA(medswav__RobustWindow)
    .DocStr(R"(Robust intensity window of each image: float32 ``(lo, hi)``, the ``percentiles`` of its
values, exactly as numpy.percentile (default "linear" method) computes them; NaNs are ignored, an
empty image gives (0, 0).

Whole-number values in [-32768, 65535] (every int16, uint16 and uint8 image, also once decoded to
float32) are counted in a histogram in one pass and the percentiles read off the cumulative counts;
other values fall back to selection on a copy. CPU only: feeds ``intensity(window=...)`` on the GPU.)")
    .NumInput(1)
    .NumOutput(1)
    .AddOptionalArg("percentiles", "(lo, hi) percentiles in [0, 100], per sample.",
                    std::vector<float>{0.5f, 99.5f}, true);

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

// The fused map over [begin, end) of one sample: intensity_px with its gamma == 1 test taken once,
// outside the loops, and the parameters in locals (a reference could alias dst and be reloaded per
// element). With a power, the window goes through an L1-sized block first: GCC 12 does not vectorise
// the clamp's selects feeding pow01 in one loop, while each of the two loops vectorises alone.
template <typename T>
inline __attribute__((always_inline)) void intensity_range_impl(const T *src, float *dst, int64_t begin,
                                                                int64_t end, const IntensityParams &params) {
  const IntensityParams p = params;
  if (p.gamma == 1.0f) {
    for (int64_t k = begin; k < end; k++)
      dst[k] = linear_px(window_px(static_cast<float>(src[k]), p.lo, p.inv_width), p.scale, p.shift);
    return;
  }
  constexpr int64_t kBlock = 512;
  float windowed[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    int64_t m = std::min(kBlock, end - b);
    for (int64_t j = 0; j < m; j++) windowed[j] = window_px(static_cast<float>(src[b + j]), p.lo, p.inv_width);
    for (int64_t j = 0; j < m; j++) dst[b + j] = linear_px(pow01(windowed[j], p.gamma), p.scale, p.shift);
  }
}

// Baseline x86-64 (SSE2) and, where the CPU has it, AVX2 (3x faster on pow01: 8 lanes, and blends and
// 32-bit integer ops SSE2 lacks). -std=c++20 keeps a * b + c unfused, so both give the same bits.
template <typename T>
void intensity_range_sse(const T *src, float *dst, int64_t begin, int64_t end, const IntensityParams &p) {
  intensity_range_impl(src, dst, begin, end, p);
}
#if defined(__x86_64__) && defined(__GNUC__)
#define MSW_INTENSITY_AVX2 1
template <typename T>
__attribute__((target("avx2"))) void intensity_range_avx2(const T *src, float *dst, int64_t begin, int64_t end,
                                                          const IntensityParams &p) {
  intensity_range_impl(src, dst, begin, end, p);
}
#endif

template <typename T>
void intensity_range(const T *src, float *dst, int64_t begin, int64_t end, const IntensityParams &p) {
#ifdef MSW_INTENSITY_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return intensity_range_avx2(src, dst, begin, end, p);
#endif
  intensity_range_sse(src, dst, begin, end, p);
}

// Work items of at most this many elements: a big image is split in ranges so that both pool threads
// share it even when a batch holds fewer samples than threads.
constexpr int64_t kChunk = 1 << 17;

}  // namespace

template <>
void Gamma<CPUBackend>::RunImpl(Workspace &ws) {
  map_pixels(ws, [&](int i) { return GammaPx{arg_at(gamma_, i)}; });
}

template <>
void Linear<CPUBackend>::RunImpl(Workspace &ws) {
  map_pixels(ws, [&](int i) { return LinearPx{arg_at(scale_, i), arg_at(shift_, i)}; });
}

template <>
void Intensity<CPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<CPUBackend>(0);
  auto &out = ws.Output<CPUBackend>(0);
  out.SetLayout(in.GetLayout());
  auto &pool = ws.GetThreadPool();
  with_input_type(in.type(), [&](auto tag) {
    using T = decltype(tag);
    // 1) the robust samples' windows (one histogram pass each), 2) the map, in chunks
    for (int i : robust_samples_) {
      pool.AddWork([&, i](int) {
        const float *pct = percentiles_[i].data;
        Window w = robust_window(in.tensor<T>(i), in.shape().tensor_size(i), pct[0], pct[1]);
        params_[i].lo = static_cast<float>(w.lo);
        params_[i].inv_width = window_inv_width(static_cast<float>(w.lo), static_cast<float>(w.hi));
      }, in.shape().tensor_size(i));
    }
    pool.RunAll();
    for (int i = 0; i < in.num_samples(); i++) {
      int64_t n = in.shape().tensor_size(i);
      for (int64_t b = 0; b < n; b += kChunk) {
        int64_t e = std::min(n, b + kChunk);
        pool.AddWork([&, i, b, e](int) {
          intensity_range(in.tensor<T>(i), out.mutable_tensor<float>(i), b, e, params_[i]);
        }, e - b);
      }
    }
    pool.RunAll();
  });
}

bool RobustWindowOp::SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) {
  const auto &in = ws.Input<CPUBackend>(0);
  DALI_ENFORCE(intensity_input_type_ok(in.type()),
               dali::make_string("medswav.robust_window: input must be float32, int16, uint16 or uint8 (got ",
                                 in.type(), ")."));
  int n = in.num_samples();
  percentiles_.Acquire(spec_, ws, n, dali::TensorShape<1>(2));
  for (int i = 0; i < n; i++) check_percentiles("robust_window", percentiles_[i].data);
  out.resize(1);
  out[0] = {dali::uniform_list_shape(n, dali::TensorShape<>(2)), DALI_FLOAT};
  return true;
}

void RobustWindowOp::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<CPUBackend>(0);
  auto &out = ws.Output<CPUBackend>(0);
  with_input_type(in.type(), [&](auto tag) {
    using T = decltype(tag);
    for_each_sample(ws, in.shape(), [&](int i) {
      const float *pct = percentiles_[i].data;
      Window w = robust_window(in.tensor<T>(i), in.shape().tensor_size(i), pct[0], pct[1]);
      float *dst = out.mutable_tensor<float>(i);
      dst[0] = static_cast<float>(w.lo);
      dst[1] = static_cast<float>(w.hi);
    });
  });
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Gamma, ::medswav::Gamma<::dali::CPUBackend>, ::dali::CPU);
DALI_REGISTER_OPERATOR(medswav__Linear, ::medswav::Linear<::dali::CPUBackend>, ::dali::CPU);
DALI_REGISTER_OPERATOR(medswav__Intensity, ::medswav::Intensity<::dali::CPUBackend>, ::dali::CPU);
DALI_REGISTER_OPERATOR(medswav__RobustWindow, ::medswav::RobustWindowOp, ::dali::CPU);
