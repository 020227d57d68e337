#include "energy_bands.h"
#include "gpu_scratch.cuh"

#include <algorithm>

namespace medswav {
namespace {

constexpr int kBlock = 256;

inline int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kBlock - 1) / kBlock, 8192)); }

__global__ void conv_axis_kernel(const float *src, float *dst, AxisExtent e, const float *taps, int r) {
  int64_t total = e.outer * e.n * e.inner;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total;
       t += int64_t(gridDim.x) * blockDim.x) {
    int64_t i = t % e.inner;
    int64_t op = t / e.inner;
    int p = static_cast<int>(op % e.n);
    int64_t o = op / e.n;
    dst[t] = conv1d_at(src + o * e.n * e.inner + i, e.n, e.inner, p, taps, r);
  }
}

// The recursive Gaussian along one axis: one thread per line (recursive_gaussian_line, the function
// the CPU backend runs on its leftover lines). Each thread keeps its causal pass in `buf`, interleaved
// with the other lines' (stride = number of lines) so that neighbouring threads access memory together.
__global__ void recursive_axis_kernel(const float *src, float *dst, AxisExtent e, RecursiveGaussian c,
                                      double *buf) {
  int64_t lines = e.outer * e.inner;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < lines;
       t += int64_t(gridDim.x) * blockDim.x) {
    int64_t o = t / e.inner, i = t % e.inner;
    int64_t offset = o * e.n * e.inner + i;
    recursive_gaussian_line(c, src + offset, e.inner, dst + offset, e.inner, e.n, buf + t, lines);
  }
}

// Accumulates sum and sum of squares of (hi - lo) (or of hi when lo is null) into moments[0..1].
__global__ void moments_kernel(const float *hi, const float *lo, int64_t n, double *moments) {
  double s = 0, ss = 0;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    double v = lo ? double(hi[t] - lo[t]) : double(hi[t]);
    s += v;
    ss += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_down_sync(0xffffffffu, s, off);
    ss += __shfl_down_sync(0xffffffffu, ss, off);
  }
  __shared__ double warp_s[kBlock / 32], warp_ss[kBlock / 32];
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_s[warp] = s;
    warp_ss[warp] = ss;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < blockDim.x / 32; w++) {
      s += warp_s[w];
      ss += warp_ss[w];
    }
    atomicAdd(moments, s);
    atomicAdd(moments + 1, ss);
  }
}

struct CombineArgs {
  const float *planes[kMaxBands + 1];
  float ref[kMaxBands + 1];
  int num_bands;
};

__global__ void combine_kernel(CombineArgs a, const double *moments, int64_t n, float *dst) {
  __shared__ float gains[kMaxBands + 1];
  __shared__ float res_mean;
  int nb = a.num_bands;
  if (threadIdx.x <= nb)
    gains[threadIdx.x] = band_gain(a.ref[threadIdx.x], std_from_moments(moments[2 * threadIdx.x],
                                                                       moments[2 * threadIdx.x + 1], n));
  if (threadIdx.x == 0) res_mean = static_cast<float>(moments[2 * nb] / n);
  __syncthreads();
  float levels[kMaxBands + 1];
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    for (int b = 0; b <= nb; b++) levels[b] = a.planes[b][t];
    dst[t] = combine_bands(levels, gains, nb, res_mean);
  }
}

__global__ void energies_kernel(const double *moments, int num_bands, int64_t n, float *dst) {
  int b = threadIdx.x;
  if (b <= num_bands)
    dst[b] = n > 0 ? static_cast<float>(std_from_moments(moments[2 * b], moments[2 * b + 1], n)) : 0.0f;
}

}  // namespace

template <typename Backend, bool EnergiesOnly>
void EnergyBandsImpl<Backend, EnergiesOnly>::RunGPU(Workspace &ws) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(EnergiesOnly ? dali::TensorLayout() : in.GetLayout());
  cudaStream_t stream = ws.stream();
  int n = in.num_samples();
  int64_t max_vol = 0;
  int max_nb = 0;
  for (int i = 0; i < n; i++) {
    max_vol = std::max(max_vol, in.shape().tensor_size(i));
    max_nb = std::max(max_nb, kernels_[i].num_bands());
  }
  if (max_vol == 0 && !EnergiesOnly) return;
  max_vol = std::max<int64_t>(max_vol, 1);
  Scratchpad scratch(stream);
  const float *dev_taps = upload(scratch, stream, taps_);
  // Samples run one after another on the stream, reusing one set of planes: nb low-pass + 1 scratch.
  float *dev_planes = scratch.AllocateGPU<float>((max_nb + 1) * max_vol);
  int64_t rg_buf = 0;  // doubles for the causal passes of the largest recursive blur along any axis
  for (int i = 0; i < n; i++) {
    auto sh = in.shape()[i];
    const auto &k = kernels_[i];
    for (int b = 0; b < k.num_bands(); b++) {
      if (!k.is_recursive(b)) continue;
      for (int a = 0; a < sh.size(); a++) {
        auto e = axis_extent(sh, a);
        rg_buf = std::max(rg_buf, e.outer * e.inner * (e.n + 2 * k.recursive[b].pad));
      }
    }
  }
  double *dev_rg_buf = rg_buf > 0 ? scratch.AllocateGPU<double>(rg_buf) : nullptr;
  size_t num_moments = 2 * (kMaxBands + 1) * size_t(n);
  double *dev_moments = scratch.AllocateGPU<double>(num_moments);
  CUDA_CALL(cudaMemsetAsync(dev_moments, 0, num_moments * sizeof(double), stream));
  for (int i = 0; i < n; i++) {
    auto sh = in.shape()[i];
    int64_t vol = sh.num_elements();
    const auto &k = kernels_[i];
    int nb = k.num_bands();
    double *moments = dev_moments + 2 * (kMaxBands + 1) * i;
    if (vol == 0) {  // moments stay zero: an empty image has no energy
      if (EnergiesOnly) energies_kernel<<<1, 32, 0, stream>>>(moments, nb, 0, out.mutable_tensor<float>(i));
      continue;
    }
    float *tmp = dev_planes + nb * max_vol;
    CombineArgs args{};
    args.num_bands = nb;
    args.planes[0] = in.tensor<float>(i);
    int nd = sh.size();
    for (int b = 0; b < nb; b++) {
      float *low = dev_planes + b * max_vol;
      const float *cur = args.planes[b];
      for (int a = nd - 1; a >= 0; a--) {
        float *dst = ((nd - 1 - a) % 2 == (nd - 1) % 2) ? low : tmp;
        auto e = axis_extent(sh, a);
        if (k.is_recursive(b))
          recursive_axis_kernel<<<grid_for(e.outer * e.inner), kBlock, 0, stream>>>(cur, dst, e, k.recursive[b],
                                                                                   dev_rg_buf);
        else
          conv_axis_kernel<<<grid_for(vol), kBlock, 0, stream>>>(cur, dst, e, dev_taps + k.offset[b], k.radius[b]);
        cur = dst;
      }
      args.planes[b + 1] = low;
    }
    for (int b = 0; b <= nb; b++)
      moments_kernel<<<std::min(grid_for(vol), 1024), kBlock, 0, stream>>>(
          args.planes[b], b < nb ? args.planes[b + 1] : nullptr, vol, moments + 2 * b);
    if (EnergiesOnly) {
      energies_kernel<<<1, 32, 0, stream>>>(moments, nb, vol, out.mutable_tensor<float>(i));
      continue;
    }
    for (int b = 0; b <= nb; b++) args.ref[b] = (*refs_)[i].data[b];
    combine_kernel<<<grid_for(vol), kBlock, 0, stream>>>(args, moments, vol, out.mutable_tensor<float>(i));
  }
  CUDA_CALL(cudaGetLastError());
}

template <>
void EnergyBands<GPUBackend>::RunImpl(Workspace &ws) { RunGPU(ws); }
template <>
void BandEnergies<GPUBackend>::RunImpl(Workspace &ws) { RunGPU(ws); }

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__EnergyBands, ::medswav::EnergyBands<::dali::GPUBackend>, ::dali::GPU);
DALI_REGISTER_OPERATOR(medswav__BandEnergies, ::medswav::BandEnergies<::dali::GPUBackend>, ::dali::GPU);
