#include "multicrop.h"
#include "cpu/multicrop_cpu.h"

#include <algorithm>

DALI_SCHEMA(medswav__Multicrop)
    .DocStr(R"(Multi-crop for swapped prediction: ``num_crops[g]`` crops per sample and group at uniformly
random positions; square ``crop_sizes[g]`` x ``crop_sizes[g]`` crops of 2-D images ("HW"), boxes of
``crop_depths[g]`` x ``crop_sizes[g]`` x ``crop_sizes[g]`` of 3-D volumes ("DHW"; depth defaults to the
side, METHOD.md's 3-D crops are 192 x 224 x 224 and 96 x 112 x 112). Returns one output per group;
output ``g`` holds, per sample, a ``[num_crops[g], s_g, s_g]`` (layout "NHW") or
``[num_crops[g], d_g, s_g, s_g]`` (layout "NDHW") float32 tensor.

Positions: along each axis of n voxels a margin ``m = floor(border * n)`` is excluded on both ends
(shrunk to ``floor((n - s) / 2)`` when the crop would not fit otherwise) and the crop's origin is a
uniform integer in ``[m, n - s - m]``; the same rule holds for depth. A crop larger than the input
along an axis gets the input at a uniform offset inside it and zeros elsewhere (zero padding).
Positions come from an internal generator seeded by ``seed`` (a new draw every iteration), or from
the ``positions`` argument input: ``ndim * sum(num_crops)`` values in [0, 1] per sample, ``(u_y, u_x)``
(images) or ``(u_z, u_y, u_x)`` (volumes) crop by crop in group order, mapped through the rule
above.)")
    .NumInput(1)
    .OutputFn([](const dali::OpSpec &spec) {
      return static_cast<int>(spec.GetRepeatedArgument<int>("crop_sizes").size());
    })
    .AddOptionalArg("crop_sizes", "Side length of the crops of each group (pixels).",
                    std::vector<int>{224, 92})
    .AddOptionalArg<std::vector<int>>("crop_depths",
                                      "Depth (D) of the crops of each group for 3-D volumes (voxels); "
                                      "default: crop_sizes. Ignored for 2-D images.",
                                      nullptr)
    .AddOptionalArg("num_crops", "Number of crops of each group.", std::vector<int>{2, 6})
    .AddOptionalArg("border", "Fraction of each side that may be excluded from crops, in [0, 0.5).", 0.1f,
                    true)
    .AddOptionalArg<std::vector<float>>("positions",
                                        "Optional crop positions in [0, 1] (see above) overriding the "
                                        "internal generator, ndim * sum(num_crops) floats per sample.",
                                        nullptr, true)
    .AddRandomSeedArg();

namespace medswav {

template <>
void MultiCrop<CPUBackend>::RunImpl(Workspace &ws) {
  std::vector<int> group_start;
  auto descs = crop_descs(ws, &group_start);
  int ng = static_cast<int>(crop_sizes_.size());
  auto &pool = ws.GetThreadPool();
  for (int g = 0; g < ng; g++) {
    int s = crop_sizes_[g], depth = crop_depth(g);
    for (int d = group_start[g]; d < group_start[g + 1]; d++) {
      pool.AddWork([&descs, d, depth, s](int) { cpu::crop_one(descs[d], depth, s); }, int64_t(depth) * s * s);
    }
  }
  pool.RunAll();
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Multicrop, ::medswav::MultiCrop<::dali::CPUBackend>, ::dali::CPU);
