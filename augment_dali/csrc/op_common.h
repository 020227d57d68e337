// Helpers shared by the medswav operators (both backends).
#ifndef MEDSWAV_OP_COMMON_H_
#define MEDSWAV_OP_COMMON_H_

#include <string>
#include <vector>

#include "dali/pipeline/operator/arg_helper.h"
#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/operator.h"
#include "dali/pipeline/workspace/workspace.h"

namespace medswav {

using dali::CPUBackend;
using dali::GPUBackend;
using dali::OpSpec;
using dali::OutputDesc;
using dali::Workspace;

// Every operator takes single-channel float32 images or volumes (intensities already mapped to [0, 1]).
template <typename Backend>
const dali::TensorList<Backend> &float_input(const Workspace &ws, const char *op, int min_ndim = 1,
                                              int max_ndim = 64) {
  const auto &in = ws.Input<Backend>(0);
  DALI_ENFORCE(in.type() == DALI_FLOAT,
               dali::make_string("medswav.", op, ": input must be float32 (got ", in.type(),
                                 "); cast with fn.cast(x, dtype=types.FLOAT) first."));
  int ndim = in.sample_dim();
  DALI_ENFORCE(ndim >= min_ndim && ndim <= max_ndim,
               min_ndim == max_ndim
                   ? dali::make_string("medswav.", op, ": expected ", min_ndim, "-D samples (single-channel \"HW\"), got ",
                                       ndim, "-D.")
                   : dali::make_string("medswav.", op, ": expected ", min_ndim, "-D to ", max_ndim,
                                       "-D samples (single-channel \"HW\" images or \"DHW\" volumes), got ", ndim,
                                       "-D."));
  return in;
}

// Scalar per-sample argument value (constant or argument input).
inline float arg_at(const dali::ArgValue<float> &a, int i) { return a[i].data[0]; }
inline int arg_at(const dali::ArgValue<int> &a, int i) { return a[i].data[0]; }

// Runs fn(sample) for every sample on the workspace thread pool, biggest samples first.
template <typename Fn>
void for_each_sample(Workspace &ws, const dali::TensorListShape<> &shape, Fn &&fn) {
  auto &pool = ws.GetThreadPool();
  for (int i = 0; i < shape.num_samples(); i++) {
    pool.AddWork([fn, i](int) { fn(i); }, shape.tensor_size(i));
  }
  pool.RunAll();
}

}  // namespace medswav

#endif  // MEDSWAV_OP_COMMON_H_
