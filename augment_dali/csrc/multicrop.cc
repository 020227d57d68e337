#include "multicrop.h"
#include "cpu/multicrop_cpu.h"

#include <algorithm>

DALI_SCHEMA(medswav__Multicrop)
    .DocStr(R"(Multi-crop for swapped prediction: ``num_crops[g]`` square crops of side ``crop_sizes[g]``
per image and group, at uniformly random positions. Returns one output per group; output ``g`` holds,
per sample, a ``[num_crops[g], s_g, s_g]`` float32 tensor (layout "NHW").

Positions: along each side of n pixels a margin ``m = floor(border * n)`` is excluded on both ends
(shrunk to ``floor((n - s) / 2)`` when the crop would not fit otherwise) and the crop's origin is a
uniform integer in ``[m, n - s - m]``. A crop larger than the image gets the image at a uniform offset
inside it and zeros elsewhere (zero padding). Positions come from an internal generator seeded by
``seed`` (a new draw every iteration), or from the ``positions`` argument input: ``2 * sum(num_crops)``
values in [0, 1] per sample, ``(u_y, u_x)`` crop by crop in group order, mapped through the rule
above.)")
    .NumInput(1)
    .OutputFn([](const dali::OpSpec &spec) {
      return static_cast<int>(spec.GetRepeatedArgument<int>("crop_sizes").size());
    })
    .AddOptionalArg("crop_sizes", "Side length of the crops of each group (pixels).",
                    std::vector<int>{224, 92})
    .AddOptionalArg("num_crops", "Number of crops of each group.", std::vector<int>{2, 6})
    .AddOptionalArg("border", "Fraction of each side that may be excluded from crops, in [0, 0.5).", 0.1f,
                    true)
    .AddOptionalArg<std::vector<float>>("positions",
                                        "Optional crop positions in [0, 1] (see above) overriding the "
                                        "internal generator, 2 * sum(num_crops) floats per sample.",
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
    int s = crop_sizes_[g];
    for (int d = group_start[g]; d < group_start[g + 1]; d++) {
      pool.AddWork([&descs, d, s](int) { cpu::crop_one(descs[d], s); }, int64_t(s) * s);
    }
  }
  pool.RunAll();
}

}  // namespace medswav

DALI_REGISTER_OPERATOR(medswav__Multicrop, ::medswav::MultiCrop<::dali::CPUBackend>, ::dali::CPU);
