// Operator rescale: bilinear resize by a per-sample factor with the result kept in a size range.
#ifndef MEDSWAV_RESCALE_H_
#define MEDSWAV_RESCALE_H_

#include <vector>

#include "math/resample.h"
#include "op_common.h"

namespace medswav {

template <typename Backend>
class Rescale : public dali::StatelessOperator<Backend> {
 public:
  explicit Rescale(const OpSpec &spec)
      : dali::StatelessOperator<Backend>(spec),
        scale_("scale", spec), min_size_("min_size", spec), max_size_("max_size", spec) {}

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &in = float_input<Backend>(ws, "rescale", 2, 2);
    int n = in.num_samples();
    scale_.Acquire(this->spec_, ws, n);
    min_size_.Acquire(this->spec_, ws, n);
    max_size_.Acquire(this->spec_, ws, n);
    dali::TensorListShape<> out_shape(n, 2);
    for (int i = 0; i < n; i++) {
      float s = arg_at(scale_, i);
      int lo = arg_at(min_size_, i), hi = arg_at(max_size_, i);
      DALI_ENFORCE(s > 0 && std::isfinite(s),
                   dali::make_string("medswav.rescale: scale must be finite and > 0, got ", s));
      DALI_ENFORCE(lo <= 0 || hi <= 0 || lo <= hi,
                   dali::make_string("medswav.rescale: min_size (", lo, ") > max_size (", hi, ")"));
      auto sh = in.shape()[i];
      int64_t o[2];
      if (sh.num_elements() == 0) {
        o[0] = o[1] = 0;  // empty stays empty
      } else {
        rescale_output_size(sh.data(), 2, s, lo, hi, o);
      }
      out_shape.set_tensor_shape(i, dali::TensorShape<>(o[0], o[1]));
    }
    out.resize(1);
    out[0] = {out_shape, DALI_FLOAT};
    return true;
  }
  void RunImpl(Workspace &ws) override;

 private:
  dali::ArgValue<float> scale_;
  dali::ArgValue<int> min_size_, max_size_;
};

}  // namespace medswav

#endif  // MEDSWAV_RESCALE_H_
