// Operator multicrop: several square crops per resolution group at uniform random positions.
#ifndef MEDSWAV_MULTICROP_H_
#define MEDSWAV_MULTICROP_H_

#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "dali/pipeline/operator/checkpointing/op_checkpoint.h"
#include "math/crop.h"
#include "op_common.h"

namespace medswav {

template <typename Backend>
class MultiCrop : public dali::Operator<Backend> {
 public:
  explicit MultiCrop(const OpSpec &spec)
      : dali::Operator<Backend>(spec),
        crop_sizes_(spec.GetRepeatedArgument<int>("crop_sizes")),
        num_crops_(spec.GetRepeatedArgument<int>("num_crops")),
        border_("border", spec),
        positions_("positions", spec),
        rng_(static_cast<uint64_t>(spec.GetArgument<int64_t>("seed"))) {
    DALI_ENFORCE(!crop_sizes_.empty() && crop_sizes_.size() == num_crops_.size(),
                 "medswav.multicrop: crop_sizes and num_crops must be non-empty and of equal length");
    for (size_t g = 0; g < crop_sizes_.size(); g++) {
      DALI_ENFORCE(crop_sizes_[g] > 0 && num_crops_[g] >= 0,
                   "medswav.multicrop: crop sizes must be > 0 and crop counts >= 0");
      total_crops_ += num_crops_[g];
    }
  }

 // Checkpointing: the whole state is the position generator.
  void SaveState(dali::OpCheckpoint &cpt, dali::AccessOrder) override { cpt.MutableCheckpointState() = rng_; }
  void RestoreState(const dali::OpCheckpoint &cpt) override { rng_ = cpt.CheckpointState<std::mt19937_64>(); }
  std::string SerializeCheckpoint(const dali::OpCheckpoint &cpt) const override {
    std::ostringstream os;
    os << cpt.CheckpointState<std::mt19937_64>();
    return os.str();
  }
  void DeserializeCheckpoint(dali::OpCheckpoint &cpt, const std::string &data) const override {
    std::istringstream is(data);
    std::mt19937_64 rng;
    is >> rng;
    DALI_ENFORCE(!is.fail(), "medswav.multicrop: corrupt checkpoint");
    cpt.MutableCheckpointState() = rng;
  }

 protected:
  bool SetupImpl(std::vector<OutputDesc> &out, const Workspace &ws) override {
    const auto &in = float_input<Backend>(ws, "multicrop", 2, 2);
    int n = in.num_samples();
    border_.Acquire(this->spec_, ws, n);
    bool explicit_pos = positions_.HasExplicitValue();
    if (explicit_pos)
      positions_.Acquire(this->spec_, ws, n, dali::TensorShape<1>(2 * total_crops_));
    // origins_[(i * total + j) * 2 + {0, 1}]: (y0, x0) of crop j of sample i, groups in order.
    origins_.resize(size_t(n) * total_crops_ * 2);
    for (int i = 0; i < n; i++) {
      float border = arg_at(border_, i);
      DALI_ENFORCE(border >= 0 && border < 0.5f,
                   dali::make_string("medswav.multicrop: border must be in [0, 0.5), got ", border));
      auto sh = in.shape()[i];
      int h = static_cast<int>(sh[0]), w = static_cast<int>(sh[1]);
      int j = 0;
      for (size_t g = 0; g < crop_sizes_.size(); g++) {
        for (int c = 0; c < num_crops_[g]; c++, j++) {
          double uy, ux;
          if (explicit_pos) {
            uy = positions_[i].data[2 * j];
            ux = positions_[i].data[2 * j + 1];
            DALI_ENFORCE(uy >= 0 && uy <= 1 && ux >= 0 && ux <= 1,
                         "medswav.multicrop: positions must lie in [0, 1]");
          } else {
            uy = uniform01();
            ux = uniform01();
          }
          int *o = &origins_[(size_t(i) * total_crops_ + j) * 2];
          o[0] = crop_origin(h, crop_sizes_[g], border, uy);
          o[1] = crop_origin(w, crop_sizes_[g], border, ux);
        }
      }
    }
    out.resize(crop_sizes_.size());
    for (size_t g = 0; g < crop_sizes_.size(); g++) {
      int s = crop_sizes_[g];
      out[g] = {dali::uniform_list_shape(n, dali::TensorShape<>(num_crops_[g], s, s)), DALI_FLOAT};
    }
    return true;
  }
  void RunImpl(Workspace &ws) override;

  // Crop descriptors of every sample and group, group-major (crops of group g contiguous).
  std::vector<CropDesc> crop_descs(Workspace &ws, std::vector<int> *group_start) {
    const auto &in = ws.Input<Backend>(0);
    int n = in.num_samples();
    std::vector<CropDesc> descs;
    descs.reserve(size_t(n) * total_crops_);
    group_start->clear();
    int j0 = 0;
    for (size_t g = 0; g < crop_sizes_.size(); g++) {
      group_start->push_back(static_cast<int>(descs.size()));
      auto &out = ws.Output<Backend>(g);
      out.SetLayout("NHW");
      int s = crop_sizes_[g];
      for (int i = 0; i < n; i++) {
        auto sh = in.shape()[i];
        for (int c = 0; c < num_crops_[g]; c++) {
          const int *o = &origins_[(size_t(i) * total_crops_ + j0 + c) * 2];
          descs.push_back({in.template tensor<float>(i), out.template mutable_tensor<float>(i) + int64_t(c) * s * s,
                           static_cast<int>(sh[0]), static_cast<int>(sh[1]), o[0], o[1]});
        }
      }
      j0 += num_crops_[g];
    }
    group_start->push_back(static_cast<int>(descs.size()));
    return descs;
  }

  double uniform01() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

  std::vector<int> crop_sizes_, num_crops_;
  int total_crops_ = 0;
  dali::ArgValue<float> border_;
  dali::ArgValue<float, 1> positions_;
  std::mt19937_64 rng_;
  std::vector<int> origins_;
};

}  // namespace medswav

#endif  // MEDSWAV_MULTICROP_H_
