"""Augmentation throughput: medswav's DALI pipeline vs the NumPy reference vs an equivalent MONAI chain.

`python -m benchmarks.augment [--quick] [--json PATH] [--dataset DATASET] [--workers N]`

Same input shards, same machine, same run, same augmentation family (METHOD.md section 4, 2-D
defaults: rescale s ~ U[0.1, 0.7] into sides [600, 1200], 5 + 1 energy bands, gamma or linear,
2 x 224 + 6 x 92 crops with a 10 % border):

(a) dali_cpu: `SwavLoader(device="cpu", num_threads=N)`, modality-balanced batches, to torch tensors.
(b) reference: the NumPy reference chain of `augment_dali.reference`, one process (the spec, not a
    contender).
(c) monai: a torch DataLoader with N workers (1 torch thread each) running MONAI transforms: Resize
    (bilinear, to the same size rule), a GaussianSmooth cascade with band energies from torch.std and
    the same band scaling, AdjustContrast (gamma) or ScaleIntensity + ShiftIntensity, then
    RandSpatialCropSamples inside a SpatialCrop that drops the 10 % border.
(d) dali_gpu (only with a CUDA GPU): `SwavLoader(device="gpu")`.
Timings are steady state: DALI from its first step on (pipeline build and buffer fill excluded; the
per-epoch rebuilds of a long run are included), MONAI from its first batch on (worker start-up
excluded). Besides wall-clock samples/s, the table gives CPU milliseconds per sample (process plus
worker CPU time), the figure that holds on a machine shared with other jobs.
All read the same samples from the same dataset's tars and normalise them with the same function.
Without --dataset, a dataset of the 18 real CT slices (512 x 512) and 48 real MR slices (256 x 256) of
../shared/data is written to a temporary folder first.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._common import machine, parser, print_table, write_json

CROPS_PER_SAMPLE = 8
REPO = Path(__file__).resolve().parents[1]


def real_slices(data_dir: Path) -> dict[str, list[tuple[str, np.ndarray, dict]]]:
    """{modality: [(SOPInstanceUID, stored pixels, SampleMeta fields)]} of the real CT and MR series."""
    import pydicom

    series = {"ct": sorted((data_dir / "dicom" / "ct_kits_abdomen_18").glob("*.dcm")),
              "mr": sorted((data_dir / "dicom" / "mr_mprage_sagittal_192").glob("*.dcm"))[2:194:4]}
    out = {}
    for modality, paths in series.items():
        if not paths:
            raise FileNotFoundError(f"no DICOM files for {modality} under {data_dir / 'dicom'} (see --data)")
        out[modality] = []
        for path in paths:
            ds = pydicom.dcmread(path)
            pixels, extra = ds.pixel_array, {}
            if modality == "ct":  # modality LUT -> Hounsfield units, as ingest does for exact integers
                pixels = (pixels.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)).astype(np.int16)
                extra = dict(rescale_slope=float(ds.RescaleSlope), rescale_intercept=float(ds.RescaleIntercept),
                             rescale_applied=True)
            out[modality].append((ds.SOPInstanceUID, pixels, extra))
    return out


def build_dataset(root: Path, data_dir: Path) -> Path:
    import shards

    for modality, slices in real_slices(data_dir).items():
        with shards.ShardWriter(root, modality, f"{modality}-g000-000000") as w:
            for uid, pixels, extra in slices:
                meta = shards.SampleMeta(modality=modality, split="train", **extra)
                w.write(shards.sample_key(uid, 0, "bench"), pixels, meta)
    shards.write_dataset_json(root)
    return root


# --- (b) NumPy reference chain -----------------------------------------------------------------------

def reference_chain(pixels, method, cfg, stats, rng):
    from augment_dali import reference as ref
    from augment_dali.normalize import normalize_numpy

    x = normalize_numpy(pixels, method, cfg.normalize)
    x = ref.rescale(x, rng.uniform(*cfg.scale_range), *cfg.size_range)
    target = np.maximum(np.asarray(stats["mean"]) + rng.uniform(-1, 1, cfg.num_bands) * np.asarray(stats["std"]), 0)
    x = ref.energy_bands(x, target, cfg.sigmas)
    if rng.random() < cfg.p_gamma:
        x = ref.gamma(x, rng.uniform(*cfg.gamma_range))
    else:
        x = ref.linear(ref.gamma(x, 1.0), rng.uniform(*cfg.linear_scale_range), rng.uniform(*cfg.linear_shift_range))
    return ref.multicrop(x, rng.random(2 * sum(cfg.num_crops)), cfg.crop_sizes, cfg.num_crops, cfg.border)


# --- (c) MONAI chain -------------------------------------------------------------------------------


def combine_bands(bands, target):
    """MONAI baseline's energy-band recombination (2-D and 3-D): each detail band scaled to its target
    energy, the low-pass residual standardised around its mean (as fn.medswav.energy_bands does)."""
    import torch

    out = torch.zeros_like(bands[0])
    for i, band in enumerate(bands):
        e = float(band.std(unbiased=False))
        gain = float(target[i] / e) if e > 1e-6 else 1.0
        if i < len(bands) - 1:
            out = out + gain * band
        else:
            m = band.mean()
            out = out + m + gain * (band - m)
    return out

class MonaiAugment:
    """The same augmentation family written with MONAI transforms (what a MONAI user would write)."""

    def __init__(self, cfg, stats: dict):
        self.cfg, self.stats = cfg, stats

    def __call__(self, pixels, method, rng):
        import torch
        from monai.transforms import (AdjustContrast, GaussianSmooth, RandSpatialCropSamples, Resize, ScaleIntensity,
                                      ShiftIntensity, SpatialCrop)

        from augment_dali.normalize import normalize_numpy
        from augment_dali.reference import rescale_size

        cfg = self.cfg
        x = torch.from_numpy(normalize_numpy(pixels, method, cfg.normalize))[None]  # channel-first
        size = rescale_size(x.shape[1:], rng.uniform(*cfg.scale_range), *cfg.size_range)
        x = Resize(size, mode="bilinear")(x)
        low, bands = x, []
        for sigma in cfg.sigmas:
            smooth = GaussianSmooth(sigma)(low)
            bands.append(low - smooth)
            low = smooth
        bands.append(low)
        target = np.maximum(np.asarray(self.stats["mean"]) + rng.uniform(-1, 1, cfg.num_bands) * np.asarray(self.stats["std"]), 0)
        out = combine_bands(bands, target).clamp(0, 1)
        if rng.random() < cfg.p_gamma:
            out = AdjustContrast(rng.uniform(*cfg.gamma_range))(out)
        else:
            a, b = rng.uniform(*cfg.linear_scale_range), rng.uniform(*cfg.linear_shift_range)
            out = ShiftIntensity(b)(ScaleIntensity(minv=None, maxv=None, factor=a - 1.0)(out))
        h, w = out.shape[1:]
        mh, mw = int(cfg.border * h), int(cfg.border * w)
        out = SpatialCrop(roi_start=(mh, mw), roi_end=(h - mh, w - mw))(out)
        groups = []
        for size, count in zip(cfg.crop_sizes, cfg.num_crops):
            cropper = RandSpatialCropSamples((size, size), num_samples=count, random_size=False)
            cropper.set_random_state(int(rng.integers(2**31)))
            groups.append(torch.stack([torch.as_tensor(c) for c in cropper(out)]))
        return groups


class MonaiDataset:
    """torch map-style dataset: item i -> MONAI-augmented crop groups of sample refs[i]."""

    def __init__(self, refs, methods: dict, augment_by_modality: dict, seed: int):
        self.refs, self.methods, self.augment, self.seed = refs, methods, augment_by_modality, seed

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, i):
        from augment_dali.sampling import read_pixels

        ref = self.refs[i]
        return self.augment[ref.modality](read_pixels(ref), self.methods[ref.modality],
                                          np.random.default_rng([self.seed, i]))


def _worker_init(_):
    import torch

    torch.set_num_threads(1)


def _collate(batch):
    import torch

    return [torch.stack([sample[g] for sample in batch]) for g in range(len(batch[0]))]


def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its finished children): CPU time per sample is the
    figure that survives a machine shared with other jobs."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _since(start) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


def _process_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def run_monai(refs, methods, cfg, stats, workers, batch_size, samples) -> tuple[int, float, float]:
    """Steady state like run_dali: timing starts when the first batch arrives (worker start-up excluded).
    Batches of 2 with prefetch_factor 1 keep the work already done at that moment (a bias in MONAI's
    favour) to at most one batch per worker. CPU time: this process plus the workers, read from /proc."""
    from torch.utils.data import DataLoader

    batch_size = 2
    items = (refs * -(-(samples + batch_size) // len(refs)))[:samples + batch_size]
    dataset = MonaiDataset(items, methods, {m: MonaiAugment(cfg, s) for m, s in stats.items()}, seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, worker_init_fn=_worker_init,
                        collate_fn=_collate, persistent_workers=True, prefetch_factor=1)
    batches = iter(loader)
    next(batches)
    pids = [w.pid for w in batches._workers]
    wall0, cpu0 = _clock()
    cpu0 += sum(_process_cpu(p) for p in pids)
    n = sum(batch[0].shape[0] for batch in batches)
    wall1, cpu1 = _clock()
    cpu1 += sum(_process_cpu(p) for p in pids)
    del batches, loader
    return n, wall1 - wall0, cpu1 - cpu0


def run_reference(refs, methods, cfg, stats, samples) -> tuple[int, float, float]:
    from augment_dali.sampling import read_pixels

    rng = np.random.default_rng(0)
    start = _clock()
    for i in range(samples):
        ref = refs[i % len(refs)]
        reference_chain(read_pixels(ref), methods[ref.modality], cfg, stats[ref.modality], rng)
    return (samples, *_since(start))


def run_dali(root, device, workers, batch_size, samples) -> tuple[int, float, float]:
    """Steady state: the first step (pipeline build, buffer fill) is excluded, later epochs' rebuilds are not.
    Returns (samples, wall seconds, CPU seconds)."""
    from augment_dali.loader import SwavLoader

    loader = SwavLoader(root, batch_size=batch_size, device=device, num_threads=workers, seed=0)
    n, start = 0, None
    try:
        while n < samples:
            for step in loader:
                if start is None:
                    start = _clock()
                    continue
                n += step["crops"][0].shape[0]
                if n >= samples:
                    break
        if device == "gpu":
            import torch

            torch.cuda.synchronize()
        return (n, *_since(start))
    finally:
        loader.close()


def stage_costs(cfg, workers: int, batch: int = 8, iters: int = 4) -> list[dict]:
    """CPU ms per sample of each DALI stage alone (where the time goes): 600 x 600 float32 inputs, except
    rescale, which takes 512 x 512 (a CT slice) to 600 x 600. The normalisation stages get whole-number
    pixel values like decoded shard pixels (12-bit range), the others values in [0, 1]. The two
    intensity rows are the pipeline's one pass (gamma drawn, or linear drawn); gamma and linear are the
    separate operators it replaces."""
    import augment_dali
    augment_dali.load_plugin()  # the medswav operators
    from nvidia.dali import fn, pipeline_def

    from augment_dali.normalize import normalize_dali

    def images(side, whole_numbers=False):
        rngs = [np.random.default_rng(i) for i in range(batch)]
        if whole_numbers:
            return [r.integers(0, 4096, (side, side)).astype(np.float32) for r in rngs]
        return [r.random((side, side)).astype(np.float32) for r in rngs]

    stages = {
        "source (baseline)": (600, False, lambda x: x + 0.0),
        "normalise (hu_window)": (600, True, lambda x: normalize_dali(x, "hu_window", cfg.normalize)),
        "normalise (robust_percentile)": (600, True, lambda x: normalize_dali(x, "robust_percentile", cfg.normalize)),
        "rescale 512 -> 600": (512, False, lambda x: fn.medswav.rescale(x, scale=0.5, min_size=cfg.size_range[0],
                                                                       max_size=cfg.size_range[1])),
        "energy_bands": (600, False, lambda x: fn.medswav.energy_bands(x, ref_energies=[0.01] * cfg.num_bands,
                                                                       sigmas=list(cfg.sigmas))),
        "intensity (gamma drawn)": (600, False, lambda x: fn.medswav.intensity(x, gamma=2.2)),
        "intensity (linear drawn)": (600, False, lambda x: fn.medswav.intensity(x, scale=1.05, shift=0.1)),
        "gamma (separate op)": (600, False, lambda x: fn.medswav.gamma(x, gamma=2.2)),
        "linear (separate op)": (600, False, lambda x: fn.medswav.linear(x, scale=1.05, shift=0.1)),
        "multicrop": (600, False, lambda x: fn.medswav.multicrop(x, crop_sizes=list(cfg.crop_sizes),
                                                                 num_crops=list(cfg.num_crops), border=cfg.border)[0]),
    }
    rows, baseline = [], None
    for name, (side, whole_numbers, stage) in stages.items():
        data = images(side, whole_numbers)

        @pipeline_def(batch_size=batch, num_threads=workers, device_id=None, prefetch_queue_depth=1)
        def pipe():
            return stage(fn.external_source(source=lambda: data, batch=True, layout="HW"))

        p = pipe()
        p.build()
        p.run()
        start = _clock()
        for _ in range(iters):
            p.run()
        ms = 1000 * _since(start)[1] / (iters * batch)
        baseline = ms if baseline is None else baseline
        rows.append({"stage": name, "cpu_ms_per_sample": ms, "net_of_baseline": ms - baseline})
        del p
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--volumes" in argv:  # the 3-D chain against MONAI's 3-D transforms: benchmarks.augment3d
        from .augment3d import main as main_volumes

        return main_volumes([a for a in argv if a != "--volumes"])
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--volumes", action="store_true",
                   help="measure the 3-D chain on real volumes instead (benchmarks.augment3d; default 2-D)")
    p.add_argument("--dataset", help="existing dataset folder (default: build one from ../shared/data)")
    p.add_argument("--data", default=os.environ.get("MEDSWAV_SHARED_DATA", str(REPO.parent / "shared" / "data")),
                   help="real data folder used to build the default dataset (default: $MEDSWAV_SHARED_DATA or "
                        "../shared/data)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader workers (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step, a multiple of the modalities (default 8)")
    args = p.parse_args(argv)
    from augment_dali.config import AugmentConfig
    from augment_dali.sampling import sample_refs
    from augment_dali.stats import compute_stats, stats_path, write_stats
    from shards import Dataset

    n_dali, n_monai, n_ref = (64, 24, 2) if args.quick else (400, 96, 8)
    load_before = os.getloadavg()
    cfg = AugmentConfig()
    with tempfile.TemporaryDirectory(prefix="medswav-bench-") as tmp:
        root = Path(args.dataset) if args.dataset else build_dataset(Path(tmp), Path(args.data))
        if not stats_path(root).exists():
            write_stats(root, compute_stats(root, samples=50, config=cfg, show_progress=False))
        stats = json.loads(stats_path(root).read_text())["modalities"]
        ds = Dataset(root)
        refs = [r for m in ds.modalities for r in sample_refs(ds, m, 10**9, seed=0, split="train")]
        methods = {m: cfg.normalize.method_for(m) for m in ds.modalities}
        rows, figures = [], {}
        for name, fn in [("dali_cpu", lambda: run_dali(root, "cpu", args.workers, args.batch_size, n_dali)),
                         ("monai", lambda: run_monai(refs, methods, cfg, stats, args.workers, args.batch_size, n_monai)),
                         ("reference", lambda: run_reference(refs, methods, cfg, stats, n_ref))]:
            n, seconds, cpu = fn()
            figures[f"{name}_samples_per_s"] = n / seconds
            figures[f"{name}_cpu_ms_per_sample"] = 1000 * cpu / n
            rows.append({"path": name, "samples": n, "seconds": seconds, "samples_per_s": n / seconds,
                         "crops_per_s": n * CROPS_PER_SAMPLE / seconds, "cpu_ms_per_sample": 1000 * cpu / n})
            print(f"  {name}: {n / seconds:.2f} samples/s", flush=True)
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
        if has_gpu:
            n, seconds, _ = run_dali(root, "gpu", args.workers, args.batch_size, n_dali * 4)
            figures["dali_gpu_samples_per_s"] = n / seconds
            rows.append({"path": f"dali_gpu ({machine().get('gpu')})", "samples": n, "seconds": seconds,
                         "samples_per_s": n / seconds, "crops_per_s": n * CROPS_PER_SAMPLE / seconds})
    figures["speedup_vs_monai"] = figures["dali_cpu_samples_per_s"] / figures["monai_samples_per_s"]
    figures["speedup_vs_reference"] = figures["dali_cpu_samples_per_s"] / figures["reference_samples_per_s"]
    figures["cpu_time_ratio_monai_over_dali"] = (figures["monai_cpu_ms_per_sample"]
                                                 / figures["dali_cpu_cpu_ms_per_sample"])
    figures["crops_per_sample"] = CROPS_PER_SAMPLE
    for r in rows:
        r["vs_monai"] = r["samples_per_s"] / figures["monai_samples_per_s"]
    print_table(f"Augmentation throughput ({args.workers} workers, sides {cfg.size_range}, crops "
                f"{cfg.num_crops} x {cfg.crop_sizes})", rows,
                ["path", "samples", "seconds", "samples_per_s", "crops_per_s", "cpu_ms_per_sample", "vs_monai"])
    costs = stage_costs(cfg, args.workers)
    print_table(f"DALI CPU stages alone, 600 x 600 float32, {args.workers} threads", costs,
                ["stage", "cpu_ms_per_sample", "net_of_baseline"])
    figures["stage_cpu_ms_per_sample"] = {r["stage"]: r["net_of_baseline"] for r in costs}
    target = 8.0
    verdict = "meets" if figures["speedup_vs_monai"] >= target else "MISSES"
    load_after = os.getloadavg()
    figures["load_average_1min"] = [load_before[0], load_after[0]]
    print(f"\nmachine: {machine()}; 1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
          f"(above {os.cpu_count()} the machine was shared with other work)")
    print(f"\nspeedup vs MONAI on CPU: {figures['speedup_vs_monai']:.1f}x ({verdict} the target of {target:g}x); "
          f"CPU time per sample: MONAI / DALI = {figures['cpu_time_ratio_monai_over_dali']:.2f}")
    write_json(args.json, "augment", figures, {"workers": args.workers, "batch_size": args.batch_size,
                                               "quick": args.quick, "size_range": list(cfg.size_range),
                                               "dataset": args.dataset or "built from ../shared/data"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
