// CPU half of the kernel harness: the CPU backend code of the operators (cpu/*.h, the functions the
// DALI operators run per sample), behind the C API of harness.h.
#include <string>
#include <vector>

#include "cpu/energy_bands_cpu.h"
#include "cpu/multicrop_cpu.h"
#include "cpu/rescale_cpu.h"
#include "harness/harness.h"
#include "harness/harness_common.h"
#include "math/intensity.h"
#include "math/resample.h"

namespace medswav {
namespace harness {

std::string &last_error() {
  static thread_local std::string message;
  return message;
}

// The GPU half (harness_gpu.cu); absent from a library built without nvcc.
#ifdef MEDSWAV_HARNESS_CUDA
int gpu_energy_bands(int n, int ndim, const int64_t *shapes, const float *const *inputs, int num_sigmas,
                     const float *sigmas, const float *refs, float *const *outputs, int64_t budget_bytes);
int gpu_rescale(int n, const int *in_dhw, const float *const *inputs, const int *out_dhw, float *const *outputs);
int gpu_multicrop(int n, const int *in_dhw, const float *const *inputs, int num_groups, const int *crop_depths,
                  const int *crop_sizes, const int *num_crops, float border, const double *positions,
                  float *const *outputs);
int gpu_pointwise(int op, int n, const int64_t *sizes, const float *const *inputs, const float *a, const float *b,
                  float *const *outputs);
int gpu_devices(std::string *name);
#endif

int no_gpu() {
  last_error() = "this harness library was built without nvcc: no CUDA backend";
  return -1;
}

}  // namespace harness
}  // namespace medswav

using namespace medswav;           // NOLINT: C API glue
using namespace medswav::harness;  // NOLINT

MSW_API const char *msw_last_error(void) { return last_error().c_str(); }

MSW_API int msw_has_cuda_backend(void) {
#ifdef MEDSWAV_HARNESS_CUDA
  return 1;
#else
  return 0;
#endif
}

static std::string &device_name() {
  static std::string name;
  return name;
}

MSW_API int msw_cuda_devices(void) {
#ifdef MEDSWAV_HARNESS_CUDA
  return gpu_devices(&device_name());
#else
  no_gpu();
  return 0;
#endif
}

MSW_API const char *msw_cuda_device_name(void) { return device_name().c_str(); }

MSW_API int msw_energy_bands(int use_gpu, int n, int ndim, const int64_t *shapes, const float *const *inputs,
                             int num_sigmas, const float *sigmas, const float *refs, float *const *outputs,
                             int64_t budget_bytes) {
  if (use_gpu) {
#ifdef MEDSWAV_HARNESS_CUDA
    return gpu_energy_bands(n, ndim, shapes, inputs, num_sigmas, sigmas, refs, outputs, budget_bytes);
#else
    return no_gpu();
#endif
  }
  return guarded([&] {
    std::vector<float> taps;
    auto plans = plan_cascades(n, num_sigmas, sigmas, taps);
    for (int i = 0; i < n; i++)
      cpu::energy_bands_sample(inputs[i], shapes + size_t(i) * ndim, ndim, plans[i], taps.data(),
                               refs ? refs + size_t(i) * (num_sigmas + 1) : nullptr, outputs[i]);
  });
}

MSW_API void msw_rescale_size(const int64_t *in_hw, float scale, int min_size, int max_size, int64_t *out_hw) {
  if (in_hw[0] * in_hw[1] == 0) {
    out_hw[0] = out_hw[1] = 0;  // empty stays empty (as the operator's SetupImpl)
    return;
  }
  rescale_output_size(in_hw, 2, scale, min_size, max_size, out_hw);
}

MSW_API int msw_rescale(int use_gpu, int n, const int *in_dhw, const float *const *inputs, const int *out_dhw,
                        float *const *outputs) {
  if (use_gpu) {
#ifdef MEDSWAV_HARNESS_CUDA
    return gpu_rescale(n, in_dhw, inputs, out_dhw, outputs);
#else
    return no_gpu();
#endif
  }
  return guarded([&] {
    for (int i = 0; i < n; i++) {
      const int *a = in_dhw + 3 * i, *b = out_dhw + 3 * i;
      cpu::rescale_sample(inputs[i], a[0], a[1], a[2], outputs[i], b[0], b[1], b[2]);
    }
  });
}

MSW_API int msw_multicrop(int use_gpu, int n, const int *in_dhw, const float *const *inputs, int num_groups,
                          const int *crop_depths, const int *crop_sizes, const int *num_crops, float border,
                          const double *positions, float *const *outputs) {
  if (use_gpu) {
#ifdef MEDSWAV_HARNESS_CUDA
    return gpu_multicrop(n, in_dhw, inputs, num_groups, crop_depths, crop_sizes, num_crops, border, positions,
                         outputs);
#else
    return no_gpu();
#endif
  }
  return guarded([&] {
    std::vector<int> group_start;
    auto descs = plan_crops(n, in_dhw, inputs, num_groups, crop_depths, crop_sizes, num_crops, border, positions,
                            outputs, group_start);
    for (int g = 0; g < num_groups; g++)
      for (int d = group_start[g]; d < group_start[g + 1]; d++) cpu::crop_one(descs[d], crop_depths[g], crop_sizes[g]);
  });
}

MSW_API int msw_pointwise(int use_gpu, int op, int n, const int64_t *sizes, const float *const *inputs,
                          const float *a, const float *b, float *const *outputs) {
  if (use_gpu) {
#ifdef MEDSWAV_HARNESS_CUDA
    return gpu_pointwise(op, n, sizes, inputs, a, b, outputs);
#else
    return no_gpu();
#endif
  }
  return guarded([&] {
    if (op != 0 && op != 1) throw std::invalid_argument("op must be 0 (gamma) or 1 (linear)");
    for (int i = 0; i < n; i++)
      for (int64_t k = 0; k < sizes[i]; k++)
        outputs[i][k] = op == 0 ? gamma_px(inputs[i][k], a[i]) : linear_px(inputs[i][k], a[i], b[i]);
  });
}
