"""3-D augmentation throughput: medswav's DALI operators on volumes vs the same chain in MONAI's 3-D transforms.

`python -m benchmarks.augment3d [--quick] [--json PATH] [--workers N] [--data DIR]`
(to be reachable later as `python -m benchmarks.augment --volumes`)

Same volumes, same machine, same run, same augmentation family (METHOD.md sections 4-5, 3-D column):
rescale by s ~ U[0.1, 0.7] with sides kept in (96, 112, 112) - (200, 250, 250) (D, H, W) and isotropic
voxels from the series' spacing, 5 + 1 energy bands (sigmas 1, 2, 4, 8, 16 voxels along every axis)
with reference energies drawn from [mean - std, mean + std] of the volumes' own statistics
(augment_dali.stats.measure_volumes), gamma ~ U[1.8, 2.6] or linear a ~ U[0.9, 1.1], b ~ U[-0.2, 0.2]
(one of them, p = 0.5), then 1 crop of 224 x 224 x 192 and 4 of 112 x 112 x 96 with up to 10 % of
every border cut (zero padding where a volume is thinner than a crop).

(a) dali_cpu: one DALI CPU pipeline (num_threads = N, batch of N volumes) of fn.medswav.rescale,
    energy_bands, gamma / linear (selected per sample) and multicrop; outputs copied to NumPy.
(b) monai: a torch DataLoader with N workers (1 torch thread each) running MONAI transforms: Resize
    (trilinear, to the same size rule), a GaussianSmooth cascade with band energies from torch.std and
    the same band scaling, AdjustContrast (gamma) or ScaleIntensity + ShiftIntensity, SpatialCrop that
    drops the 10 % border, SpatialPad to the crop size and RandSpatialCropSamples per crop group.
Volumes: the real MPRAGE MR series (192 x 256 x 256, ~0.9 mm) and the KiTS CT slices (18 x 512 x 512,
0.66 x 0.66 x 2.5 mm) of ../shared/data, stacked along the slice normal. Timings are steady state (DALI
after one warm-up batch, MONAI from its first batch on); besides samples/s the table gives CPU
milliseconds per volume (process plus workers), the figure that survives a shared machine.

Projection (measured 2026-11-30, benchmarks/RESULTS.md: 345 CPU ms per volume for DALI CPU, 7.5 CPU s
for MONAI): the paper's 3-D set is 24,440 head-CT volumes; 100 epochs are 2.44 M volume augmentations,
234 core-hours with DALI CPU (7.3 h on a 32-core node) against ~5,100 with MONAI. At 100 M / 1 B slices
stacked into volumes of ~55 slices (1.8 M / 18 M volumes) one epoch costs 173 / 1,725 core-hours on the
CPU: at those sizes the CUDA backends have to carry the load.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

from ._common import machine, parser, print_table, write_json
from .augment import combine_bands

REPO = Path(__file__).resolve().parents[1]
SIZE_RANGE = ((96, 112, 112), (200, 250, 250))
CROP_SIZES, CROP_DEPTHS, NUM_CROPS = (224, 112), (192, 96), (1, 4)
SCALE_RANGE, GAMMA_RANGE, LINEAR_A, LINEAR_B = (0.1, 0.7), (1.8, 2.6), (0.9, 1.1), (-0.2, 0.2)
SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
BORDER = 0.1


def load_series(folder: Path):
    """[D, H, W] float32 in [0, 1] and the (z, y, x) spacing, slices sorted along the plane normal."""
    import pydicom

    slices = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    if not slices:
        raise FileNotFoundError(f"no DICOM files in {folder} (see --data)")
    row, col = np.asarray(slices[0].ImageOrientationPatient, np.float64).reshape(2, 3)
    normal = np.cross(row, col)
    where = {id(ds): float(np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64))) for ds in slices}
    slices.sort(key=lambda ds: where[id(ds)])
    vol = np.stack([ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1)
                    + float(getattr(ds, "RescaleIntercept", 0) or 0) for ds in slices])
    vol = (vol - vol.min()) / max(float(vol.max() - vol.min()), 1e-12)
    dz = float(np.median(np.diff([where[id(ds)] for ds in slices])))
    return np.ascontiguousarray(vol, np.float32), (dz, *(float(v) for v in slices[0].PixelSpacing))


def _clock() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_dali(volumes, spacings, stats, workers: int, samples: int) -> tuple[int, float, float]:
    from nvidia.dali import fn, math, pipeline_def, types

    import augment_dali

    augment_dali.load_plugin()  # the medswav operators

    (d_lo, lo, _), (d_hi, hi, _) = SIZE_RANGE
    mean, std = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
    batch = max(1, workers)
    order = [k % len(volumes) for k in range(samples + batch)]

    def feed(info):
        k = order[(info.iteration * batch + info.idx_in_batch) % len(order)]
        return volumes[k], np.asarray(spacings[k], np.float32)

    @pipeline_def(batch_size=batch, num_threads=workers, device_id=None, seed=0, prefetch_queue_depth=1)
    def pipe():
        vol, spacing = fn.external_source(source=feed, num_outputs=2, batch=False, layout=["DHW", None],
                                          dtype=[types.FLOAT, types.FLOAT])
        x = fn.medswav.rescale(vol, scale=fn.random.uniform(range=list(SCALE_RANGE)), spacing=spacing,
                               min_size=lo, max_size=hi, min_depth=d_lo, max_depth=d_hi)
        unit = fn.random.uniform(range=[-1.0, 1.0], shape=[len(SIGMAS) + 1])
        ref = math.max(types.Constant(mean, device="cpu") + unit * types.Constant(std, device="cpu"), 0.0)
        x = fn.medswav.energy_bands(x, ref_energies=ref, sigmas=list(SIGMAS))
        # one of gamma / linear per volume, as augment_dali.pipeline does it: the other gets identity
        # parameters (gamma 1 on [0, 1] data, scale 1 and shift 0)
        use_gamma = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)
        gamma = fn.random.uniform(range=list(GAMMA_RANGE))
        a, b = fn.random.uniform(range=list(LINEAR_A)), fn.random.uniform(range=list(LINEAR_B))
        x = fn.medswav.gamma(x, gamma=use_gamma * gamma + (1.0 - use_gamma))
        x = fn.medswav.linear(x, scale=use_gamma + (1.0 - use_gamma) * a, shift=(1.0 - use_gamma) * b)
        return tuple(fn.medswav.multicrop(x, crop_sizes=list(CROP_SIZES), crop_depths=list(CROP_DEPTHS),
                                          num_crops=list(NUM_CROPS), border=BORDER))

    p = pipe()
    p.build()

    def step():
        outs = p.run()
        return sum(np.array(o[i]).shape[0] for o in outs for i in range(len(o)))

    step()  # warm-up: buffers allocated, threads started
    start = _clock()
    n = 0
    while n < samples:
        step()
        n += batch
    wall, cpu = (b - a for a, b in zip(start, _clock()))
    del p
    return n, wall, cpu


class MonaiVolumeAugment:
    """The same 3-D chain with MONAI transforms (channel-first tensors)."""

    def __init__(self, stats: dict):
        self.mean, self.std = np.asarray(stats["mean"]), np.asarray(stats["std"])

    def __call__(self, vol, spacing, rng):
        import torch
        from monai.transforms import (AdjustContrast, GaussianSmooth, RandSpatialCropSamples, Resize,
                                      ScaleIntensity, ShiftIntensity, SpatialCrop, SpatialPad)

        from augment_dali.reference import rescale_size

        (d_lo, lo, _), (d_hi, hi, _) = SIZE_RANGE
        x = torch.from_numpy(vol)[None]
        size = rescale_size(vol.shape, rng.uniform(*SCALE_RANGE), lo, hi, d_lo, d_hi, spacing=spacing)
        x = Resize(size, mode="trilinear")(x)
        low, bands = x, []
        for sigma in SIGMAS:
            smooth = GaussianSmooth(sigma)(low)
            bands.append(low - smooth)
            low = smooth
        bands.append(low)
        target = np.maximum(self.mean + rng.uniform(-1, 1, len(bands)) * self.std, 0)
        out = combine_bands(bands, target).clamp(0, 1)  # as fn.medswav.gamma clamps (it runs with gamma 1 on the linear path)
        if rng.random() < 0.5:
            out = AdjustContrast(rng.uniform(*GAMMA_RANGE))(out)
        else:
            a, b = rng.uniform(*LINEAR_A), rng.uniform(*LINEAR_B)
            out = ShiftIntensity(b)(ScaleIntensity(minv=None, maxv=None, factor=a - 1.0)(out))
        shape = out.shape[1:]
        margin = [int(BORDER * n) for n in shape]
        out = SpatialCrop(roi_start=margin, roi_end=[n - m for n, m in zip(shape, margin)])(out)
        groups = []
        for size, depth, count in zip(CROP_SIZES, CROP_DEPTHS, NUM_CROPS):
            box = (depth, size, size)
            padded = SpatialPad(box)(out)
            cropper = RandSpatialCropSamples(box, num_samples=count, random_size=False)
            cropper.set_random_state(int(rng.integers(2**31)))
            groups.append(torch.stack([torch.as_tensor(c) for c in cropper(padded)]))
        return groups


class MonaiVolumes:
    def __init__(self, volumes, spacings, stats, count: int):
        self.volumes, self.spacings, self.augment, self.count = volumes, spacings, MonaiVolumeAugment(stats), count

    def __len__(self):
        return self.count

    def __getitem__(self, i):
        k = i % len(self.volumes)
        return self.augment(self.volumes[k], self.spacings[k], np.random.default_rng([0, i]))


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


def _first(batch):
    return batch[0]


def run_monai(volumes, spacings, stats, workers: int, samples: int) -> tuple[int, float, float]:
    """Steady state: timing starts when the first volume arrives (worker start-up excluded)."""
    from torch.utils.data import DataLoader

    loader = DataLoader(MonaiVolumes(volumes, spacings, stats, samples + 1), batch_size=1, num_workers=workers,
                        worker_init_fn=_worker_init, collate_fn=_first, persistent_workers=True, prefetch_factor=1)
    items = iter(loader)
    next(items)
    pids = [w.pid for w in items._workers]
    wall0, cpu0 = _clock()
    cpu0 += sum(_process_cpu(p) for p in pids)
    n = sum(1 for _ in items)
    wall1, cpu1 = _clock()
    cpu1 += sum(_process_cpu(p) for p in pids)
    del items, loader
    return n, wall1 - wall0, cpu1 - cpu0


def main(argv=None) -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--data", default=os.environ.get("MEDSWAV_SHARED_DATA", str(REPO.parent / "shared" / "data")),
                   help="real data folder with dicom/mr_mprage_sagittal_192 and dicom/ct_kits_abdomen_18 "
                        "(default: $MEDSWAV_SHARED_DATA or ../shared/data)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers (default 2)")
    args = p.parse_args(argv)
    from augment_dali.stats import measure_volumes

    dicom = Path(args.data) / "dicom"
    series = [load_series(dicom / "mr_mprage_sagittal_192"), load_series(dicom / "ct_kits_abdomen_18")]
    volumes, spacings = [v for v, _ in series], [s for _, s in series]
    n_dali, n_monai, n_stats = (4, 2, 4) if args.quick else (24, 8, 16)
    stats = measure_volumes(volumes, spacings, samples=n_stats, seed=0, scale_range=SCALE_RANGE, sigmas=SIGMAS,
                            size_range=SIZE_RANGE, batch_size=2)
    rows, figures = [], {}
    for name, run in [("dali_cpu", lambda: run_dali(volumes, spacings, stats, args.workers, n_dali)),
                      ("monai", lambda: run_monai(volumes, spacings, stats, args.workers, n_monai))]:
        n, seconds, cpu = run()
        figures[f"{name}_volumes_per_s"] = n / seconds
        figures[f"{name}_cpu_ms_per_volume"] = 1000 * cpu / n
        rows.append({"path": name, "volumes": n, "seconds": seconds, "volumes_per_s": n / seconds,
                     "cpu_ms_per_volume": 1000 * cpu / n})
        print(f"  {name}: {n / seconds:.3f} volumes/s", flush=True)
    figures["speedup_vs_monai"] = figures["dali_cpu_volumes_per_s"] / figures["monai_volumes_per_s"]
    figures["cpu_time_ratio_monai_over_dali"] = figures["monai_cpu_ms_per_volume"] / figures["dali_cpu_cpu_ms_per_volume"]
    for r in rows:
        r["vs_monai"] = r["volumes_per_s"] / figures["monai_volumes_per_s"]
    print_table(f"3-D augmentation throughput ({args.workers} workers, sides {SIZE_RANGE[0]} - {SIZE_RANGE[1]}, "
                f"crops 1 x 224x224x192 + 4 x 112x112x96; {machine()})", rows,
                ["path", "volumes", "seconds", "volumes_per_s", "cpu_ms_per_volume", "vs_monai"])
    target = 5.0
    verdict = "meets" if figures["speedup_vs_monai"] >= target else "MISSES"
    print(f"\nspeedup vs MONAI 3-D on CPU: {figures['speedup_vs_monai']:.1f}x ({verdict} the target of {target:g}x); "
          f"CPU time per volume: MONAI / DALI = {figures['cpu_time_ratio_monai_over_dali']:.2f}")
    write_json(args.json, "augment3d", figures, {"workers": args.workers, "quick": args.quick,
                                                 "size_range": [list(r) for r in SIZE_RANGE],
                                                 "samples": {"dali": n_dali, "monai": n_monai}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
