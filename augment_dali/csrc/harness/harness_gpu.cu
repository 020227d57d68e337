// GPU half of the kernel harness: the operators' CUDA launchers (kernels/*.cuh, exactly what the DALI
// operators call) on plain device buffers. Every sample gets its own cudaMalloc of its exact size, so
// compute-sanitizer's memcheck sees any access past a sample.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "harness/harness_common.h"
#include "kernels/energy_bands.cuh"
#include "kernels/multicrop.cuh"
#include "kernels/pointwise.cuh"
#include "kernels/rescale.cuh"

namespace medswav {
namespace harness {
namespace {

using gpu::check_cuda;

// The launchers' allocator: plain allocations, freed after the stream has finished.
class DeviceSession {
 public:
  DeviceSession() { check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"); }
  ~DeviceSession() {
    cudaStreamSynchronize(stream_);
    for (void *p : dev_) cudaFree(p);
    for (void *p : host_) cudaFreeHost(p);
    cudaStreamDestroy(stream_);
  }
  DeviceSession(const DeviceSession &) = delete;
  DeviceSession &operator=(const DeviceSession &) = delete;

  void *gpu(size_t bytes) {
    void *p = nullptr;
    if (bytes == 0) return nullptr;
    check_cuda(cudaMalloc(&p, bytes), "cudaMalloc");
    dev_.push_back(p);
    return p;
  }
  void *pinned(size_t bytes) {
    void *p = nullptr;
    check_cuda(cudaMallocHost(&p, bytes ? bytes : 1), "cudaMallocHost");
    host_.push_back(p);
    return p;
  }
  template <typename T>
  T *to_device(const T *host, size_t count) {
    T *d = static_cast<T *>(gpu(count * sizeof(T)));
    if (count) check_cuda(cudaMemcpyAsync(d, host, count * sizeof(T), cudaMemcpyHostToDevice, stream_), "copy in");
    return d;
  }
  template <typename T>
  void to_host(T *host, const T *dev, size_t count) {
    if (count) check_cuda(cudaMemcpyAsync(host, dev, count * sizeof(T), cudaMemcpyDeviceToHost, stream_), "copy out");
  }
  void finish() {
    check_cuda(cudaStreamSynchronize(stream_), "kernel execution");
    check_cuda(cudaGetLastError(), "kernel execution");
  }
  cudaStream_t stream() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
  std::vector<void *> dev_, host_;
};

}  // namespace

int gpu_devices(std::string *name) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    last_error() = std::string("no CUDA device: ") + cudaGetErrorString(e);
    cudaGetLastError();  // reset the runtime's last-error state for the calls that follow
    return 0;
  }
  if (count > 0) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) *name = prop.name;
  } else {
    last_error() = "no CUDA device";
  }
  return count;
}

int gpu_energy_bands(int n, int ndim, const int64_t *shapes, const float *const *inputs, int num_sigmas,
                     const float *sigmas, const float *refs, float *const *outputs, int64_t budget_bytes) {
  return guarded([&] {
    std::vector<float> taps;
    auto plans = plan_cascades(n, num_sigmas, sigmas, taps);
    DeviceSession dev;
    std::vector<gpu::EnergySample> samples;
    std::vector<float *> dev_out(n);
    std::vector<size_t> out_count(n);
    for (int i = 0; i < n; i++) {
      const int64_t *sh = shapes + size_t(i) * ndim;
      size_t vol = 1;
      for (int d = 0; d < ndim; d++) vol *= size_t(sh[d]);
      out_count[i] = refs ? vol : size_t(num_sigmas + 1);
      const float *in = dev.to_device(inputs[i], vol);
      dev_out[i] = static_cast<float *>(dev.gpu(out_count[i] * sizeof(float)));
      samples.push_back(gpu::make_energy_sample(in, dev_out[i], sh, ndim, plans[i],
                                                refs ? refs + size_t(i) * (num_sigmas + 1) : nullptr));
    }
    if (budget_bytes > 0)
      gpu::energy_bands(std::move(samples), taps, refs == nullptr, dev, dev.stream(), size_t(budget_bytes));
    else
      gpu::energy_bands(std::move(samples), taps, refs == nullptr, dev, dev.stream());
    for (int i = 0; i < n; i++) dev.to_host(outputs[i], dev_out[i], out_count[i]);
    dev.finish();
  });
}

int gpu_rescale(int n, const int *in_dhw, const float *const *inputs, const int *out_dhw, float *const *outputs) {
  return guarded([&] {
    DeviceSession dev;
    std::vector<gpu::RescaleSample> samples;
    for (int i = 0; i < n; i++) {
      const int *a = in_dhw + 3 * i, *b = out_dhw + 3 * i;
      samples.push_back({dev.to_device(inputs[i], size_t(a[0]) * a[1] * a[2]),
                         static_cast<float *>(dev.gpu(size_t(b[0]) * b[1] * b[2] * sizeof(float))), a[0], a[1],
                         a[2], b[0], b[1], b[2]});
    }
    gpu::rescale(samples, dev, dev.stream());
    for (int i = 0; i < n; i++) {
      const int *b = out_dhw + 3 * i;
      dev.to_host(outputs[i], samples[i].dst, size_t(b[0]) * b[1] * b[2]);
    }
    dev.finish();
  });
}

int gpu_multicrop(int n, const int *in_dhw, const float *const *inputs, int num_groups, const int *crop_depths,
                  const int *crop_sizes, const int *num_crops, float border, const double *positions,
                  float *const *outputs) {
  return guarded([&] {
    DeviceSession dev;
    std::vector<const float *> dev_in(n);
    for (int i = 0; i < n; i++)
      dev_in[i] = dev.to_device(inputs[i], size_t(in_dhw[3 * i]) * in_dhw[3 * i + 1] * in_dhw[3 * i + 2]);
    std::vector<float *> dev_out(size_t(n) * num_groups);
    auto group_count = [&](int g) { return size_t(num_crops[g]) * crop_depths[g] * crop_sizes[g] * crop_sizes[g]; };
    for (int i = 0; i < n; i++)
      for (int g = 0; g < num_groups; g++)
        dev_out[size_t(i) * num_groups + g] = static_cast<float *>(dev.gpu(group_count(g) * sizeof(float)));
    std::vector<int> group_start;
    auto descs = plan_crops(n, in_dhw, dev_in.data(), num_groups, crop_depths, crop_sizes, num_crops, border,
                            positions, dev_out.data(), group_start);
    gpu::multicrop(descs, group_start, std::vector<int>(crop_depths, crop_depths + num_groups),
                   std::vector<int>(crop_sizes, crop_sizes + num_groups), dev, dev.stream());
    for (int i = 0; i < n; i++)
      for (int g = 0; g < num_groups; g++)
        dev.to_host(outputs[size_t(i) * num_groups + g], dev_out[size_t(i) * num_groups + g], group_count(g));
    dev.finish();
  });
}

int gpu_pointwise(int op, int n, const int64_t *sizes, const float *const *inputs, const float *a, const float *b,
                  float *const *outputs) {
  return guarded([&] {
    if (op != 0 && op != 1) throw std::invalid_argument("op must be 0 (gamma) or 1 (linear)");
    DeviceSession dev;
    std::vector<gpu::PointwiseSample> samples;
    for (int i = 0; i < n; i++)
      samples.push_back({dev.to_device(inputs[i], size_t(sizes[i])),
                         static_cast<float *>(dev.gpu(size_t(sizes[i]) * sizeof(float))), sizes[i], a[i],
                         b ? b[i] : 0.0f});
    if (op == 0)
      gpu::pointwise(samples, gpu::GammaOp{}, dev, dev.stream());
    else
      gpu::pointwise(samples, gpu::LinearOp{}, dev, dev.stream());
    for (int i = 0; i < n; i++) dev.to_host(outputs[i], samples[i].out, size_t(sizes[i]));
    dev.finish();
  });
}

}  // namespace harness
}  // namespace medswav
