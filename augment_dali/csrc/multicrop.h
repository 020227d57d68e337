// Operator multicrop: several square (2-D) or square-faced box (3-D) crops per resolution group at
// uniform random positions.
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
        crop_depths_(spec.HasArgument("crop_depths") ? spec.GetRepeatedArgument<int>("crop_depths") : crop_sizes_),
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
    DALI_ENFORCE(crop_depths_.size() == crop_sizes_.size(),
                 "medswav.multicrop: crop_depths needs one depth per crop group");
    for (int depth : crop_depths_) DALI_ENFORCE(depth > 0, "medswav.multicrop: crop depths must be > 0");
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
    const auto &in = float_input<Backend>(ws, "multicrop", 2, 3);
    int n = in.num_samples();
    ndim_ = in.sample_dim();
    border_.Acquire(this->spec_, ws, n);
    bool explicit_pos = positions_.HasExplicitValue();
    if (explicit_pos)
      positions_.Acquire(this->spec_, ws, n, dali::TensorShape<1>(ndim_ * total_crops_));
    // origins_[(i * total + j) * 3 + {0, 1, 2}]: (z0, y0, x0) of crop j of sample i, groups in order
    // (z0 = 0 for 2-D images, which are volumes of one plane).
    origins_.resize(size_t(n) * total_crops_ * 3);
    for (int i = 0; i < n; i++) {
      float border = arg_at(border_, i);
      DALI_ENFORCE(border >= 0 && border < 0.5f,
                   dali::make_string("medswav.multicrop: border must be in [0, 0.5), got ", border));
      auto sh = in.shape()[i];
      int v = ndim_ - 2;
      int d = v ? static_cast<int>(sh[0]) : 1, h = static_cast<int>(sh[v]), w = static_cast<int>(sh[v + 1]);
      int j = 0;
      for (size_t g = 0; g < crop_sizes_.size(); g++) {
        for (int c = 0; c < num_crops_[g]; c++, j++) {
          double u[3] = {0.0, 0.0, 0.0};  // (u_z, u_y, u_x); u_z unused for images
          for (int a = 0; a < ndim_; a++) {
            if (explicit_pos) {
              u[3 - ndim_ + a] = positions_[i].data[ndim_ * j + a];
              DALI_ENFORCE(u[3 - ndim_ + a] >= 0 && u[3 - ndim_ + a] <= 1,
                           "medswav.multicrop: positions must lie in [0, 1]");
            } else {
              u[3 - ndim_ + a] = uniform01();
            }
          }
          int *o = &origins_[(size_t(i) * total_crops_ + j) * 3];
          o[0] = v ? crop_origin(d, crop_depths_[g], border, u[0]) : 0;
          o[1] = crop_origin(h, crop_sizes_[g], border, u[1]);
          o[2] = crop_origin(w, crop_sizes_[g], border, u[2]);
        }
      }
    }
    out.resize(crop_sizes_.size());
    for (size_t g = 0; g < crop_sizes_.size(); g++) {
      int s = crop_sizes_[g];
      auto crop_shape = ndim_ == 3 ? dali::TensorShape<>(num_crops_[g], crop_depths_[g], s, s)
                                   : dali::TensorShape<>(num_crops_[g], s, s);
      out[g] = {dali::uniform_list_shape(n, crop_shape), DALI_FLOAT};
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
      out.SetLayout(ndim_ == 3 ? "NDHW" : "NHW");
      int s = crop_sizes_[g], depth = crop_depth(g);
      int v = ndim_ - 2;
      for (int i = 0; i < n; i++) {
        auto sh = in.shape()[i];
        for (int c = 0; c < num_crops_[g]; c++) {
          const int *o = &origins_[(size_t(i) * total_crops_ + j0 + c) * 3];
          descs.push_back({in.template tensor<float>(i),
                           out.template mutable_tensor<float>(i) + int64_t(c) * depth * s * s,
                           v ? static_cast<int>(sh[0]) : 1, static_cast<int>(sh[v]), static_cast<int>(sh[v + 1]),
                           o[0], o[1], o[2]});
        }
      }
      j0 += num_crops_[g];
    }
    group_start->push_back(static_cast<int>(descs.size()));
    return descs;
  }

  // Depth of group g's crops in this iteration's batch: 1 for 2-D images.
  int crop_depth(size_t g) const { return ndim_ == 3 ? crop_depths_[g] : 1; }
  std::vector<int> crop_depths_now() const {
    std::vector<int> out;
    for (size_t g = 0; g < crop_sizes_.size(); g++) out.push_back(crop_depth(g));
    return out;
  }

  double uniform01() { return static_cast<double>(rng_() >> 11) * 0x1.0p-53; }

  std::vector<int> crop_sizes_, crop_depths_, num_crops_;
  int total_crops_ = 0;
  int ndim_ = 2;  // of the current batch's samples
  dali::ArgValue<float> border_;
  dali::ArgValue<float, 1> positions_;
  std::mt19937_64 rng_;
  std::vector<int> origins_;
};

}  // namespace medswav

#endif  // MEDSWAV_MULTICROP_H_
