#include "energy_bands.h"

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

}  // namespace

template <>
void EnergyBands<GPUBackend>::RunImpl(Workspace &ws) {
  const auto &in = ws.Input<GPUBackend>(0);
  auto &out = ws.Output<GPUBackend>(0);
  out.SetLayout(in.GetLayout());
  cudaStream_t stream = ws.stream();
  int n = in.num_samples();
  int64_t max_vol = 0;
  int max_nb = 0;
  for (int i = 0; i < n; i++) {
    max_vol = std::max(max_vol, in.shape().tensor_size(i));
    max_nb = std::max(max_nb, kernels_[i].num_bands());
  }
  if (max_vol == 0) return;
  dev_taps_.from_host(taps_.data(), taps_.size(), stream);
  // Samples run one after another on the stream, reusing one set of planes: nb low-pass + 1 scratch.
  dev_planes_.resize((max_nb + 1) * max_vol, stream);
  dev_moments_.resize(2 * (kMaxBands + 1) * n, stream);
  CUDA_CALL(cudaMemsetAsync(dev_moments_.data(), 0, dev_moments_.size() * sizeof(double), stream));
  for (int i = 0; i < n; i++) {
    auto sh = in.shape()[i];
    int64_t vol = sh.num_elements();
    if (vol == 0) continue;
    const auto &k = kernels_[i];
    int nb = k.num_bands();
    float *tmp = dev_planes_.data() + nb * max_vol;
    CombineArgs args{};
    args.num_bands = nb;
    args.planes[0] = in.tensor<float>(i);
    int nd = sh.size();
    for (int b = 0; b < nb; b++) {
      float *low = dev_planes_.data() + b * max_vol;
      const float *cur = args.planes[b];
      for (int a = nd - 1; a >= 0; a--) {
        float *dst = ((nd - 1 - a) % 2 == (nd - 1) % 2) ? low : tmp;
        conv_axis_kernel<<<grid_for(vol), kBlock, 0, stream>>>(cur, dst, axis_extent(sh, a),
                                                              dev_taps_.data() + k.offset[b], k.radius[b]);
        cur = dst;
      }
      args.planes[b + 1] = low;
    }
    double *moments = dev_moments_.data() + 2 * (kMaxBands + 1) * i;
    for (int b = 0; b <= nb; b++)
      moments_kernel<<<std::min(grid_for(vol), 1024), kBlock, 0, stream>>>(
          args.planes[b], b < nb ? args.planes[b + 1] : nullptr, vol, moments + 2 * b);
    for (int b = 0; b <= nb; b++) args.ref[b] = refs_[i].data[b];
    combine_kernel<<<grid_for(vol), kBlock, 0, stream>>>(args, moments, vol, out.mutable_tensor<float>(i));
  }
  CUDA_CALL(cudaGetLastError());
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__EnergyBands, ::medswav::EnergyBands<::dali::GPUBackend>, ::dali::GPU);
