// C API of the DALI-free kernel harness (libmedswav_harness.so, driven by augment_dali/harness.py).
// Every function takes host memory and returns 0, or -1 with a one-line message in
// msw_last_error(). use_gpu == 0 runs the CPU backend code (cpu/*.h), use_gpu == 1 copies the inputs to
// the GPU, runs the CUDA launchers (kernels/*.cuh) on a stream, copies the outputs back and synchronises.
#ifndef MEDSWAV_HARNESS_HARNESS_H_
#define MEDSWAV_HARNESS_HARNESS_H_

#include <cstdint>

#define MSW_API extern "C" __attribute__((visibility("default")))

// 1 when the library holds the CUDA backend (built with nvcc).
MSW_API int msw_has_cuda_backend(void);
// Number of usable CUDA devices (0 without a driver or device; the reason in msw_last_error()).
MSW_API int msw_cuda_devices(void);
MSW_API const char *msw_cuda_device_name(void);
MSW_API const char *msw_last_error(void);

// energy_bands (refs != NULL; refs: n x (num_sigmas + 1)) or band_energies (refs == NULL; outputs[i]
// holds num_sigmas + 1 floats). shapes: n x ndim; sigmas: n x num_sigmas (per-sample cascades).
// budget_bytes: GPU scratch per chunk of samples (0: the operators' default; 1: one sample per chunk).
MSW_API int msw_energy_bands(int use_gpu, int n, int ndim, const int64_t *shapes, const float *const *inputs,
                             int num_sigmas, const float *sigmas, const float *refs, float *const *outputs,
                             int64_t budget_bytes);
// The rescale size rule for one 2-D sample (out: 2 sides).
MSW_API void msw_rescale_size(const int64_t *in_hw, float scale, int min_size, int max_size, int64_t *out_hw);
// in_dhw, out_dhw: n x 3 (depth, height, width; a 2-D image has depth 1).
MSW_API int msw_rescale(int use_gpu, int n, const int *in_dhw, const float *const *inputs, const int *out_dhw,
                        float *const *outputs);
// in_dhw: n x 3; positions: n x 3 x sum(num_crops) in [0, 1] (u_z, u_y, u_x per crop, groups in order);
// outputs[i * G + g] holds num_crops[g] x d_g x s_g x s_g floats (d_g = crop_depths[g]; pass 1 for images).
MSW_API int msw_multicrop(int use_gpu, int n, const int *in_dhw, const float *const *inputs, int num_groups,
                          const int *crop_depths, const int *crop_sizes, const int *num_crops, float border,
                          const double *positions, float *const *outputs);
// op 0: gamma (a = gamma), op 1: linear (a = scale, b = shift); one parameter pair per sample.
MSW_API int msw_pointwise(int use_gpu, int op, int n, const int64_t *sizes, const float *const *inputs,
                          const float *a, const float *b, float *const *outputs);

#endif  // MEDSWAV_HARNESS_HARNESS_H_
