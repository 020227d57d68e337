"""Reference band energies per modality: `python -m augment_dali.stats DATASET [--samples 1000]`.

For each modality, R slices are drawn uniformly without replacement (seeded) from the shards and sent
through the first steps of the training pipeline, with the same settings: normalisation to [0, 1]
(augment_dali.normalize), rescaling by s ~ U[scale_range] with sides clamped into size_range, then
the Gaussian-cascade band energies (standard deviation of each of the len(sigmas) detail bands and of
the low-pass residual), measured by the `fn.medswav.band_energies` operator: the very cascade the
energy_bands augmentation uses (exact taps for sigma < 4, recursive Gaussian from 4 on; its spec is
`augment_dali.reference.band_energies`). Measuring after the rescale matters: a
band's energy depends on the image's size in pixels, and the energy_bands operator sees rescaled images.

Writes DATASET/stats/energy.json:
    {"version": 1, "seed": 0, "sigmas": [1, 2, 4, 8, 16], "bands": ["detail_s1", ..., "residual"],
     "rescale": {"scale_range": [0.1, 0.7], "size_range": [600, 1200]},
     "normalisation": {...NormalizeConfig...},
     "modalities": {"ct": {"R": 1000, "mean": [6 floats], "std": [6 floats], "units": "HU",
                           "method": "hu_window", "lut_not_applied": 0}, ...}}
The normalisation follows the pixel units recorded at ingest (augment_dali.normalize.modality_units):
ct ingested from 8-bit images has units "raw" and is measured after the robust window, like the
training pipeline normalises it.
The pipeline draws each band's reference energy per sample from U[mean - std, mean + std].
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import sys
from pathlib import Path

import numpy as np

from shards import Dataset
from shards.atomic import write_text_atomically
from shards.layout import energy_stats_path

from .config import HU_WINDOW, AugmentConfig, NormalizeConfig
from .normalize import modality_units, normalize_dali, normalize_numpy
from .sampling import dataset_kind, modality_seed, read_meta, read_pixels, sample_refs

STATS_VERSION = 1


class StatsMissingError(FileNotFoundError):
    pass


def stats_path(root: str | os.PathLike) -> Path:
    return energy_stats_path(Path(root))


def band_names(sigmas) -> list[str]:
    return [f"detail_s{s:g}" for s in sigmas] + ["residual"]


def load_energy_stats(root: str | os.PathLike) -> dict:
    """The dataset's energy.json, or a one-line error naming the command that makes it."""
    path = stats_path(root)
    if not path.exists():
        raise StatsMissingError(
            f"{path} is missing: run `python -m augment_dali.stats {root}` first "
            "(it measures the reference band energies the energy-band augmentation needs)")
    stats = json.loads(path.read_text())
    if stats.get("version") != STATS_VERSION:
        raise ValueError(f"{path}: version {stats.get('version')!r}, expected {STATS_VERSION}; "
                         f"rerun `python -m augment_dali.stats {root}`")
    return stats


def energy_pipeline(sigmas, batch_size: int = 16, num_threads: int = 2, prepare: tuple | None = None):
    """DALI graph: images fed as "images" (float32 HW) -> [len(sigmas) + 1] band energies per image.

    The `fn.medswav.band_energies` operator: the same cascade code as `fn.medswav.energy_bands`, so the
    reference energies are measured with the filter they are later compared against; equal to
    `augment_dali.reference.band_energies` within float32 rounding (tested). With `prepare = (method,
    NormalizeConfig, size_range)` the raw pixels are first normalised and rescaled by the per-sample
    factors fed as "scales", with the training pipeline's own operators.
    """
    from nvidia.dali import fn, pipeline_def, types

    import augment_dali

    augment_dali.load_plugin()  # the medswav operators

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=1)
    def pipe():
        cur = fn.external_source(name="images", layout="HW", dtype=types.FLOAT)
        if prepare is not None:
            method, normalize, (lo, hi) = prepare
            scales = fn.external_source(name="scales", dtype=types.FLOAT)
            cur = fn.medswav.rescale(normalize_dali(cur, method, normalize), scale=scales, min_size=lo, max_size=hi)
        return fn.medswav.band_energies(cur, sigmas=[float(s) for s in sigmas])

    p = pipe()
    p.build()
    return p


# METHOD.md section 5, 3-D: volume sides after rescaling, (D, H, W) from ... to ...
VOLUME_SIZE_RANGE = ((96, 112, 112), (200, 250, 250))


def volume_energy_pipeline(sigmas, batch_size: int = 4, num_threads: int = 2,
                           size_range=VOLUME_SIZE_RANGE):
    """DALI graph for volumes: float32 "DHW" volumes in [0, 1] fed as "images", per-sample factors as
    "scales" and voxel spacings (3 floats) as "spacings" -> rescale into the 3-D size range (isotropic
    voxels, see fn.medswav.rescale) -> the [len(sigmas) + 1] band energies of each volume, measured with
    the 3-D cascade that fn.medswav.energy_bands applies to volumes (sigmas in voxels along every axis)."""
    from nvidia.dali import fn, pipeline_def, types

    import augment_dali

    augment_dali.load_plugin()  # the medswav operators

    (d_lo, lo, _), (d_hi, hi, _) = size_range

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=1)
    def pipe():
        cur = fn.external_source(name="images", layout="DHW", dtype=types.FLOAT)
        scales = fn.external_source(name="scales", dtype=types.FLOAT)
        spacings = fn.external_source(name="spacings", dtype=types.FLOAT)
        cur = fn.medswav.rescale(cur, scale=scales, spacing=spacings, min_size=lo, max_size=hi,
                                 min_depth=d_lo, max_depth=d_hi)
        return fn.medswav.band_energies(cur, sigmas=[float(s) for s in sigmas])

    p = pipe()
    p.build()
    return p


def measure_volumes(volumes: list[np.ndarray], spacings: list, samples: int, seed: int = 0,
                    scale_range=(0.1, 0.7), sigmas=(1.0, 2.0, 4.0, 8.0, 16.0),
                    size_range=VOLUME_SIZE_RANGE, batch_size: int = 4) -> dict:
    """Reference band energies of one modality's volumes (float32 "DHW" in [0, 1], with their (z, y, x)
    spacings): `samples` draws, each a volume picked uniformly (seeded) and rescaled by s ~ U[scale_range]
    as in training. Returns the summary measure_modality writes for slices (R, mean, std, min, max)."""
    rng = np.random.default_rng(seed)
    pipe = volume_energy_pipeline(sigmas, batch_size, size_range=size_range)
    picks = rng.integers(0, len(volumes), size=samples)
    scales = rng.uniform(*scale_range, size=samples)
    energies = []
    for start in range(0, samples, batch_size):
        idx = range(start, min(start + batch_size, samples))
        pipe.feed_input("images", [np.ascontiguousarray(volumes[picks[i]], np.float32) for i in idx])
        pipe.feed_input("spacings", [np.asarray(spacings[picks[i]], np.float32) for i in idx])
        energies.append(band_energies_batch(pipe, [], [float(scales[i]) for i in idx]))
    del pipe
    return energy_summary(np.concatenate(energies) if energies else np.zeros((0, len(sigmas) + 1)))


def energy_summary(e: np.ndarray) -> dict:
    """R, mean, std, min and max per band of an [R, bands] array of measured energies."""
    return {
        "R": len(e),
        "mean": e.mean(axis=0).tolist() if len(e) else [],
        "std": e.std(axis=0).tolist() if len(e) else [],
        "min": e.min(axis=0).tolist() if len(e) else [],
        "max": e.max(axis=0).tolist() if len(e) else [],
    }


def band_energies_batch(pipe, images: list[np.ndarray], scales: list[float] | None = None) -> np.ndarray:
    """Energies of one batch; images == [] when the caller fed "images" itself (volumes)."""
    if images:
        pipe.feed_input("images", [np.ascontiguousarray(i, dtype=np.float32) for i in images])
    if scales is not None:
        pipe.feed_input("scales", [np.float32(s) for s in scales])
    (out,) = pipe.run()
    return np.stack([np.asarray(out[i], dtype=np.float64) for i in range(len(out))])


def measure_modality(dataset: Dataset, modality: str, samples: int, seed: int, config: AugmentConfig,
                     progress=None, batch_size: int = 16) -> dict:
    units = modality_units(dataset.units(modality))
    method = config.normalize.method_for(modality, units)
    refs = sample_refs(dataset, modality, samples, seed)
    rng = np.random.default_rng(modality_seed(seed + 1, modality))
    pipe = energy_pipeline(config.sigmas, batch_size, prepare=(method, config.normalize, config.size_range))
    energies, lut_not_applied, batch = [], 0, []
    for n, ref in enumerate(refs, start=1):
        if method == HU_WINDOW:
            meta = read_meta(ref)
            identity = meta.get("rescale_slope", 1.0) == 1.0 and meta.get("rescale_intercept", 0.0) == 0.0
            lut_not_applied += int(not meta.get("rescale_applied", False) and not identity)
        batch.append(read_pixels(ref))
        if len(batch) == batch_size or n == len(refs):
            scales = rng.uniform(*config.scale_range, size=len(batch))
            energies.append(band_energies_batch(pipe, batch, list(scales)))
            if progress is not None:
                progress.update(len(batch))
            batch = []
    del pipe
    e = np.concatenate(energies) if energies else np.zeros((0, config.num_bands))
    return {**energy_summary(e), "units": units, "method": method, "lut_not_applied": lut_not_applied}


def measure_modality_volumes(dataset: Dataset, modality: str, samples: int, seed: int, config: AugmentConfig,
                             progress=None, batch_size: int = 2) -> dict:
    """measure_modality for a volume dataset: each drawn volume normalised (NumPy twin of the pipeline's
    normalisation), rescaled on its stored voxel grid as the training pipeline does (rows/cols into
    size_range, depth into depth_range) and measured with the 3-D cascade. Holds `batch_size` volumes."""
    units = modality_units(dataset.units(modality))
    method = config.normalize.method_for(modality, units)
    refs = sample_refs(dataset, modality, samples, seed)
    rng = np.random.default_rng(modality_seed(seed + 1, modality))
    (lo, hi), (d_lo, d_hi) = config.size_range, config.depth_range
    pipe = volume_energy_pipeline(config.sigmas, batch_size, size_range=((d_lo, lo, lo), (d_hi, hi, hi)))
    energies = []
    for start in range(0, len(refs), batch_size):
        chunk = refs[start:start + batch_size]
        volumes = [normalize_numpy(read_pixels(r), method, config.normalize) for r in chunk]
        if any(v.ndim != 3 for v in volumes):
            raise ValueError(f"{modality}: a sample of this volume dataset is not 3-D")
        pipe.feed_input("images", volumes)
        pipe.feed_input("spacings", [np.ones(3, np.float32)] * len(chunk))  # the stored grid, as in training
        energies.append(band_energies_batch(pipe, [], list(rng.uniform(*config.scale_range, size=len(chunk)))))
        if progress is not None:
            progress.update(len(chunk))
    del pipe
    e = np.concatenate(energies) if energies else np.zeros((0, config.num_bands))
    return {**energy_summary(e), "units": units, "method": method, "lut_not_applied": 0}


def compute_stats(root: str | os.PathLike, samples: int = 1000, seed: int = 0,
                  config: AugmentConfig = AugmentConfig(), modalities: list[str] | None = None,
                  show_progress: bool = True) -> dict:
    from tqdm import tqdm

    dataset = Dataset(root)
    available = dataset.modalities
    if not available:
        raise ValueError(f"{root}: no committed shards (run `python -m ingest` first)")
    chosen = modalities or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"modalities {unknown} not in {root}; available: {', '.join(available)}")
    counts = {m: sum(s.samples for s in dataset.shards(m)) for m in chosen}
    volumes = dataset_kind(root, dataset) == "volumes"
    measure = measure_modality_volumes if volumes else measure_modality
    total = sum(min(samples, n) for n in counts.values())
    result = {
        "version": STATS_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "samples_requested": samples,
        "sigmas": list(config.sigmas),
        "bands": band_names(config.sigmas),
        "rescale": {"scale_range": list(config.scale_range), "size_range": list(config.size_range),
                    **({"depth_range": list(config.depth_range)} if volumes else {})},
        "normalisation": config.normalize.to_dict(),
        "modalities": {},
    }
    with tqdm(total=total, unit="slice", desc="band energies", disable=not show_progress) as bar:
        for m in chosen:
            bar.set_postfix_str(m)
            result["modalities"][m] = measure(dataset, m, samples, seed, config, bar)
    return result


def write_stats(root: str | os.PathLike, stats: dict) -> Path:
    path = stats_path(root)
    write_text_atomically(path, json.dumps(stats, indent=2) + "\n")
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m augment_dali.stats",
        description="Measure reference band energies per modality (mean and std over R slices) and write "
                    "DATASET/stats/energy.json for the energy-band augmentation.")
    p.add_argument("dataset", help="dataset folder written by `python -m ingest`")
    p.add_argument("--samples", type=int, default=1000, help="reference slices R per modality (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--modalities", help="comma-separated subset, e.g. ct,mr (default: all present)")
    p.add_argument("--min-size", type=int, default=None,
                   help="smallest side after rescaling (default 600; 112 for a volume dataset)")
    p.add_argument("--max-size", type=int, default=None,
                   help="largest side after rescaling (default 1200; 250 for a volume dataset)")
    p.add_argument("--min-depth", type=int, default=None, help="volumes: smallest depth after rescaling (default 96)")
    p.add_argument("--max-depth", type=int, default=None, help="volumes: largest depth after rescaling (default 200)")
    p.add_argument("--small", action="store_true",
                   help="the small preset of AugmentConfig (sides 48..96) for 28x28 MedMNIST-sized data")
    args = p.parse_args(argv)
    volumes = dataset_kind(args.dataset) == "volumes"
    config = AugmentConfig.small() if args.small else AugmentConfig.method_3d() if volumes else AugmentConfig()
    if args.min_size or args.max_size:
        lo, hi = config.size_range
        config = dataclasses.replace(config, size_range=(args.min_size or lo, args.max_size or hi))
    if args.min_depth or args.max_depth:
        lo, hi = config.depth_range
        config = dataclasses.replace(config, depth_range=(args.min_depth or lo, args.max_depth or hi))
    try:
        stats = compute_stats(args.dataset, args.samples, args.seed, config,
                              args.modalities.split(",") if args.modalities else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_stats(args.dataset, stats)
    print(f"{'modality':<9}{'R':>6}  " + "  ".join(f"{b:>11}" for b in stats["bands"]))
    for m, s in stats["modalities"].items():
        print(f"{m:<9}{s['R']:>6}  " + "  ".join(f"{mu:>5.3f}±{sd:<5.3f}" for mu, sd in zip(s["mean"], s["std"])))
        if s["lut_not_applied"]:
            print(f"warning: {s['lut_not_applied']} of {s['R']} sampled {m} slices carry raw stored values "
                  "(modality LUT not applied); the HU window assumes Hounsfield units", file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
