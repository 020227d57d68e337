// CUDA backend of energy_bands / band_energies without DALI: plain pointers, sizes and a stream. Used by
// the DALI operator (energy_bands.cu) and by the kernel harness (harness/harness_gpu.cu).
//
// Batching: every launch covers all samples of a chunk (blockIdx.y = sample), so one iteration costs
// about 2 x num_axes launches per band plus 3, whatever the batch size, instead of ~17 per sample.
// Samples of a chunk are processed side by side; their planes (num_bands low-pass planes + one
// temporary) and recursive-blur buffers must fit in `budget_bytes`, so a chunk holds at least one sample
// and at most kMaxGridYZ.
//
// Determinism: the moments (sum, sum of squares per band) are reduced in a fixed order: kMomentBlocks
// blocks per (sample, band) each write a partial sum (fixed grid-stride partition, fixed warp-shuffle
// tree), then one thread per (sample, band) adds the partials in index order. No atomics: the output is
// bit-reproducible run to run, independent of the batch it is in and of the GPU model (same binary).
#ifndef MEDSWAV_KERNELS_ENERGY_BANDS_CUH_
#define MEDSWAV_KERNELS_ENERGY_BANDS_CUH_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/device_alloc.cuh"
#include "math/cascade.h"
#include "math/energy.h"
#include "math/gaussian.h"
#include "math/recursive_gaussian.h"

namespace medswav {
namespace gpu {

constexpr int kMaxDims = 3;
constexpr int kEnergyBlock = 256;     // threads of the element-wise and reduction kernels
constexpr int kLineBlock = 64;        // threads of the recursive blur (one per line): more, smaller blocks
constexpr int kMomentBlocks = 64;     // partial sums per (sample, band); fixed for reproducibility
constexpr int kGainStride = kMaxBands + 2;  // per sample: gains[0..nb], then the residual mean

struct BandBlur {
  RecursiveGaussian rg;  // rg.pad > 0: recursive blur; else exact taps
  int taps_offset, radius;
};

// One sample. The caller fills in, out, shape, ndim, num_bands, band, ref (see make_energy_sample); the
// launcher fills vol and the scratch pointers.
struct EnergySample {
  const float *in;
  float *out;  // the image (energy_bands) or num_bands + 1 energies (band_energies)
  int64_t shape[kMaxDims];
  int ndim, num_bands;
  int64_t vol;
  BandBlur band[kMaxBands];
  float ref[kMaxBands + 1];
  float *planes;   // num_bands low-pass planes, then one temporary plane, vol floats each
  double *rg_buf;  // causal outputs of the recursive blur, lines x (n + 2 pad), lines interleaved
};

inline EnergySample make_energy_sample(const float *in, float *out, const int64_t *shape, int ndim,
                                       const CascadeKernels &k, const float *ref) {
  EnergySample s{};
  s.in = in;
  s.out = out;
  s.ndim = ndim;
  s.vol = 1;
  for (int d = 0; d < ndim; d++) s.vol *= (s.shape[d] = shape[d]);
  s.num_bands = k.num_bands();
  for (int b = 0; b < s.num_bands; b++) s.band[b] = {k.recursive[b], k.offset[b], k.radius[b]};
  if (ref)
    for (int b = 0; b <= s.num_bands; b++) s.ref[b] = ref[b];
  return s;
}

// Cascade level I_b (I_0 = the input, I_{b+1} = low-pass plane b).
MSW_HD const float *cascade_level(const EnergySample &s, int b) {
  return b == 0 ? s.in : s.planes + (b - 1) * s.vol;
}
// Pass k of band b blurs along axis ndim - 1 - k; passes alternate between the band's plane and the
// temporary so that the last one lands in the plane.
MSW_HD float *pass_dst(const EnergySample &s, int b, int k) {
  return (k % 2 == (s.ndim - 1) % 2) ? s.planes + b * s.vol : s.planes + s.num_bands * s.vol;
}
MSW_HD const float *pass_src(const EnergySample &s, int b, int k) {
  return k == 0 ? cascade_level(s, b) : pass_dst(s, b, k - 1);
}

__global__ void fir_pass_kernel(const EnergySample *samples, int band, int pass, const float *taps) {
  const EnergySample &s = samples[blockIdx.y];
  if (s.vol == 0 || band >= s.num_bands || pass >= s.ndim || s.band[band].rg.pad > 0) return;
  AxisExtent e = axis_extent(s.shape, s.ndim, s.ndim - 1 - pass);
  const float *src = pass_src(s, band, pass);
  float *dst = pass_dst(s, band, pass);
  const float *t = taps + s.band[band].taps_offset;
  int r = s.band[band].radius;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < s.vol; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t in = i % e.inner, op = i / e.inner;
    int p = static_cast<int>(op % e.n);
    int64_t o = op / e.n;
    dst[i] = conv1d_at(src + o * e.n * e.inner + in, e.n, e.inner, p, t, r);
  }
}

// One thread per line (recursive_gaussian_line, the function the CPU backend runs on its leftover
// lines); causal outputs interleaved with the other lines' (stride = lines) so that a warp's accesses
// to the buffer coalesce.
__global__ void recursive_pass_kernel(const EnergySample *samples, int band, int pass) {
  const EnergySample &s = samples[blockIdx.y];
  if (s.vol == 0 || band >= s.num_bands || pass >= s.ndim || s.band[band].rg.pad == 0) return;
  const RecursiveGaussian c = s.band[band].rg;
  AxisExtent e = axis_extent(s.shape, s.ndim, s.ndim - 1 - pass);
  const float *src = pass_src(s, band, pass);
  float *dst = pass_dst(s, band, pass);
  int64_t lines = e.outer * e.inner;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < lines; t += int64_t(gridDim.x) * blockDim.x) {
    int64_t o = t / e.inner, i = t % e.inner;
    int64_t offset = o * e.n * e.inner + i;
    recursive_gaussian_line(c, src + offset, e.inner, dst + offset, e.inner, e.n, s.rg_buf + t, lines);
  }
}

// Partial (sum, sum of squares) of band z = blockIdx.z (I_z - I_{z+1}; the residual I_nb for z == nb)
// over this block's grid-stride share, into partials[((sample * (kMaxBands + 1) + z) * gridDim.x + x) * 2].
__global__ void moments_kernel(const EnergySample *samples, double *partials) {
  const EnergySample &s = samples[blockIdx.y];
  int b = blockIdx.z;
  if (b > s.num_bands) return;  // uniform over the block: no thread reaches the barrier below
  const float *hi = cascade_level(s, b);
  const float *lo = b < s.num_bands ? cascade_level(s, b + 1) : nullptr;
  double sum = 0, sum_sq = 0;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < s.vol; t += int64_t(gridDim.x) * blockDim.x) {
    double v = lo ? double(hi[t] - lo[t]) : double(hi[t]);
    sum += v;
    sum_sq += v * v;
  }
  for (int off = 16; off > 0; off >>= 1) {
    sum += __shfl_down_sync(0xffffffffu, sum, off);
    sum_sq += __shfl_down_sync(0xffffffffu, sum_sq, off);
  }
  __shared__ double warp_sum[kEnergyBlock / 32], warp_sum_sq[kEnergyBlock / 32];
  int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    warp_sum[warp] = sum;
    warp_sum_sq[warp] = sum_sq;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kEnergyBlock / 32; w++) {
      sum += warp_sum[w];
      sum_sq += warp_sum_sq[w];
    }
    double *p = partials + ((size_t(blockIdx.y) * (kMaxBands + 1) + b) * gridDim.x + blockIdx.x) * 2;
    p[0] = sum;
    p[1] = sum_sq;
  }
}

// Thread b of block `sample`: band b's energy from the partials in index order; then either the energy
// (band_energies) or the gain and, for the residual, its mean (energy_bands).
__global__ void finalize_kernel(const EnergySample *samples, const double *partials, int num_partials,
                                bool energies_only, float *gains) {
  const EnergySample &s = samples[blockIdx.x];
  int b = threadIdx.x;
  if (b > s.num_bands) return;
  const double *p = partials + (size_t(blockIdx.x) * (kMaxBands + 1) + b) * num_partials * 2;
  double sum = 0, sum_sq = 0;
  for (int k = 0; k < num_partials; k++) {
    sum += p[2 * k];
    sum_sq += p[2 * k + 1];
  }
  double energy = std_from_moments(sum, sum_sq, double(s.vol));
  if (energies_only) {
    s.out[b] = static_cast<float>(energy);
    return;
  }
  float *g = gains + size_t(blockIdx.x) * kGainStride;
  g[b] = band_gain(s.ref[b], energy);
  if (b == s.num_bands) g[kMaxBands + 1] = s.vol > 0 ? static_cast<float>(sum / s.vol) : 0.0f;
}

__global__ void combine_kernel(const EnergySample *samples, const float *gains) {
  const EnergySample &s = samples[blockIdx.y];
  if (s.vol == 0) return;  // uniform over the block
  int nb = s.num_bands;
  __shared__ float g[kGainStride];
  const float *src = gains + size_t(blockIdx.y) * kGainStride;
  if (threadIdx.x <= nb || threadIdx.x == kMaxBands + 1) g[threadIdx.x] = src[threadIdx.x];
  __syncthreads();
  float residual_mean = g[kMaxBands + 1];
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < s.vol; t += int64_t(gridDim.x) * blockDim.x)
    s.out[t] = combine_bands([&](int b) { return cascade_level(s, b)[t]; }, g, nb, residual_mean);
}

inline unsigned blocks_for(int64_t work, int block, int64_t cap) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + block - 1) / block, cap)));
}

// Doubles of recursive-blur buffer sample s needs (the largest recursive pass).
inline int64_t rg_buffer_doubles(const EnergySample &s) {
  int64_t m = 0;
  for (int b = 0; b < s.num_bands; b++) {
    if (s.band[b].rg.pad == 0) continue;
    for (int a = 0; a < s.ndim; a++) {
      AxisExtent e = axis_extent(s.shape, s.ndim, a);
      m = std::max(m, e.outer * e.inner * (e.n + 2 * int64_t(s.band[b].rg.pad)));
    }
  }
  return s.vol > 0 ? m : 0;
}

inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Runs the cascade of every sample on `stream`. `samples` from make_energy_sample (in/out: device
// pointers), `taps` the packed exact taps their offsets refer to (host).
template <typename Alloc>
void energy_bands(std::vector<EnergySample> samples, const std::vector<float> &taps, bool energies_only,
                  Alloc &alloc, cudaStream_t stream, size_t budget_bytes = size_t(1) << 30) {
  int n = static_cast<int>(samples.size());
  if (n == 0) return;
  for (auto &s : samples)
    if (s.ndim < 1 || s.ndim > kMaxDims || s.num_bands < 1 || s.num_bands >= kMaxBands)
      throw std::invalid_argument("energy_bands: need 1..3-D samples and 1..15 bands");
  // Chunks of consecutive samples whose scratch fits the budget; offsets relative to the chunk.
  std::vector<int> chunk_start{0};
  std::vector<size_t> offset(n);
  size_t used = 0, scratch_bytes = 0;
  for (int i = 0; i < n; i++) {
    auto &s = samples[i];
    size_t bytes = align_up(sizeof(float) * (s.num_bands + 1) * size_t(s.vol)) +
                   align_up(sizeof(double) * size_t(rg_buffer_doubles(s)));
    if (i > chunk_start.back() && (used + bytes > budget_bytes || i - chunk_start.back() == kMaxGridYZ)) {
      chunk_start.push_back(i);
      used = 0;
    }
    offset[i] = used;
    used += bytes;
    scratch_bytes = std::max(scratch_bytes, used);
  }
  chunk_start.push_back(n);
  char *scratch = scratch_bytes ? static_cast<char *>(alloc.gpu(scratch_bytes)) : nullptr;
  int max_chunk = 0;
  for (size_t c = 0; c + 1 < chunk_start.size(); c++)
    max_chunk = std::max(max_chunk, chunk_start[c + 1] - chunk_start[c]);
  for (int i = 0; i < n; i++) {
    auto &s = samples[i];
    s.planes = s.vol > 0 ? reinterpret_cast<float *>(scratch + offset[i]) : nullptr;
    s.rg_buf = s.vol > 0 ? reinterpret_cast<double *>(scratch + offset[i] +
                                                      align_up(sizeof(float) * (s.num_bands + 1) * size_t(s.vol)))
                         : nullptr;
  }
  const EnergySample *dev_samples = upload(alloc, stream, samples);
  const float *dev_taps = upload(alloc, stream, taps);
  size_t partials_bytes = sizeof(double) * 2 * kMomentBlocks * (kMaxBands + 1) * size_t(max_chunk);
  auto *partials = static_cast<double *>(alloc.gpu(partials_bytes));
  float *gains = nullptr;
  if (!energies_only) gains = static_cast<float *>(alloc.gpu(sizeof(float) * kGainStride * size_t(max_chunk)));
  for (size_t c = 0; c + 1 < chunk_start.size(); c++) {
    int first = chunk_start[c], count = chunk_start[c + 1] - first;
    int64_t max_vol = 0, max_lines = 0;
    int max_nb = 0, max_nd = 0;
    bool any_fir[kMaxBands] = {}, any_rg[kMaxBands] = {};
    for (int i = first; i < first + count; i++) {
      const auto &s = samples[i];
      max_nb = std::max(max_nb, s.num_bands);  // empty samples too: their (zero) partials are written
      if (s.vol == 0) continue;  // nothing to blur
      max_vol = std::max(max_vol, s.vol);
      max_nd = std::max(max_nd, s.ndim);
      for (int a = 0; a < s.ndim; a++) max_lines = std::max(max_lines, s.vol / s.shape[a]);
      for (int b = 0; b < s.num_bands; b++) (s.band[b].rg.pad > 0 ? any_rg : any_fir)[b] = true;
    }
    const EnergySample *d = dev_samples + first;
    unsigned grid_vol = blocks_for(max_vol, kEnergyBlock, 1024);
    unsigned grid_lines = blocks_for(max_lines, kLineBlock, 1024);
    for (int b = 0; b < max_nb; b++) {
      for (int k = 0; k < max_nd; k++) {
        if (any_fir[b]) fir_pass_kernel<<<dim3(grid_vol, count), kEnergyBlock, 0, stream>>>(d, b, k, dev_taps);
        if (any_rg[b])
          recursive_pass_kernel<<<dim3(grid_lines, count), kLineBlock, 0, stream>>>(d, b, k);
      }
    }
    moments_kernel<<<dim3(kMomentBlocks, count, max_nb + 1), kEnergyBlock, 0, stream>>>(d, partials);
    finalize_kernel<<<count, 32, 0, stream>>>(d, partials, kMomentBlocks, energies_only, gains);
    if (!energies_only && max_vol > 0) combine_kernel<<<dim3(grid_vol, count), kEnergyBlock, 0, stream>>>(d, gains);
  }
  check_cuda(cudaGetLastError(), "energy_bands kernels");
}

}  // namespace gpu
}  // namespace medswav

#endif  // MEDSWAV_KERNELS_ENERGY_BANDS_CUH_
