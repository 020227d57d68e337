"""The DALI graph from shard bytes to multi-crop views, one branch per modality.

Per branch (modality m, B/M samples per step), in METHOD.md section 4 order:

    fn.readers.webdataset (tar + .idx, ext "npy" [+ "labels.npy"])
    -> fn.decoders.numpy (float32) -> [.gpu()]
    -> normalise to [0, 1]      fn.medswav.intensity with the window of the modality and its pixel units
                                (HU window for HU, robust window for raw; augment_dali.normalize),
                                reading the stored integer dtype directly (float32 out)
    -> fn.medswav.rescale       s ~ U[scale_range], sides clamped into size_range
    -> fn.medswav.energy_bands  ref_i ~ U[mean_i - std_i, mean_i + std_i] from stats/energy.json
    -> intensity: ONE of gamma (probability p_gamma, gamma ~ U[1.8, 2.6]) or linear
       (a ~ U[0.9, 1.1], b ~ U[-0.2, 0.2]), one fn.medswav.intensity pass with window (0, 1):
       scale * clamp(x, 0, 1) ** gamma + shift with (gamma, 1, 0) or (1, a, b), i.e. linear always acts
       on [0, 1] intensities
    -> fn.medswav.multicrop     crop positions drawn here with fn.random.uniform (border 10 %)

Why one intensity transform, not both: METHOD lists gamma and linear as "two kinds" of intensity
augmentation; stacking them would widen the range beyond what the paper describes. Output values lie in
[-0.2, 1.3] (the linear transform may leave [0, 1], by design).

Why normalisation and the intensity augmentation are two passes although `intensity` could do both in
one: METHOD puts rescale and energy_bands between them, and energy_bands rescales every band to a
reference energy, which would undo a contrast change (a) made before it.

Volumes (dataset kind "volumes", `AugmentConfig.crop_depths` given): the same graph on "DHW" volumes;
rescale keeps depth in `depth_range` and rows/cols in `size_range`, energy_bands runs its 3-D cascade
(sigmas in voxels along every axis), and multicrop cuts `crop_depths[g] x crop_sizes[g] x crop_sizes[g]`
boxes. Rescale works on the stored voxel grid (no `spacing` input): the loader reads only the `.npy`
member, so anisotropic voxels stay anisotropic through the augmentation (METHOD gives no resampling for
the 3-D data; a dataset resampled at ingest gets isotropic crops).

All random parameters come from fn.random.* seeded by the pipeline seed, so a pipeline is reproducible
from (seed, epoch, rank) alone. The graph runs on the CPU (device_id=None) or on the GPU (everything
after decoding; robust normalisation windows are computed from the decoded image on the CPU, see
augment_dali.normalize); readers, decoders and random parameter draws are CPU operators in both cases.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.layout import LABELS_EXT, PIXELS_EXT

from .config import AugmentConfig
from .normalize import normalize_dali


@dataclass(frozen=True)
class Branch:
    """One modality's part of the pipeline."""

    modality: str
    tars: list[str]
    indices: list[str]
    energy_mean: list[float]
    energy_std: list[float]
    read_labels: bool          # dataset has label names: read "<key>.labels.npy" raw (may be missing)
    reader_seed: int
    initial_fill: int          # shuffle buffer of the reader
    with_keys: bool = False    # also output each sample's "tar:offset:member" (tests, previews)
    units: str = ""            # pixel units of the branch's samples (augment_dali.normalize.modality_units)
    volumes: bool = False      # samples are "DHW" volumes (dataset kind "volumes")


def _uniform(fn, bounds):
    """A per-sample draw from U[lo, hi]; lo == hi (a stage held fixed, e.g. no linear shift) draws from
    {lo}, since DALI refuses an empty range."""
    lo, hi = bounds
    return fn.random.uniform(values=[float(lo)]) if lo == hi else fn.random.uniform(range=[lo, hi])


def augment(image, modality: str, energy_mean, energy_std, cfg: AugmentConfig,
            cpu_image=None, units: str = "") -> tuple[list, dict]:
    """The augmentation graph for one modality, from a decoded "HW" image or, when `cfg.volumes`
    (crop_depths given), "DHW" volume node (CPU or GPU; float32,
    int16, uint16 or uint8). A GPU image needs the same image on the CPU as `cpu_image` when the
    modality's normalisation is robust_percentile (its window is computed there). `units` (HU, raw, or
    "" when unrecorded) chooses the normalisation with the modality (NormalizeConfig.method_for).

    Returns (crop groups, drawn parameters); the parameters (CPU nodes: scale, ref_energies, use_gamma,
    gamma, scale_a, shift_b, positions) are for previews and tests.
    """
    import augment_dali
    augment_dali.load_plugin()  # the medswav operators
    from nvidia.dali import fn, math, types

    image = normalize_dali(image, cfg.normalize.method_for(modality, units), cfg.normalize, window_source=cpu_image)

    scale = _uniform(fn, cfg.scale_range)
    depth = dict(min_depth=cfg.depth_range[0], max_depth=cfg.depth_range[1]) if cfg.volumes else {}
    image = fn.medswav.rescale(image, scale=scale, min_size=cfg.size_range[0], max_size=cfg.size_range[1], **depth)

    mean = types.Constant(np.asarray(energy_mean, np.float32), device="cpu")
    std = types.Constant(np.asarray(energy_std, np.float32), device="cpu")
    unit = fn.random.uniform(range=[-1.0, 1.0], shape=[cfg.num_bands])
    ref = math.max(mean + unit * std, 0.0)
    if cfg.energy_bands:
        image = fn.medswav.energy_bands(image, ref_energies=ref, sigmas=list(cfg.sigmas))

    use_gamma = fn.cast(fn.random.coin_flip(probability=cfg.p_gamma), dtype=types.FLOAT)
    gamma = _uniform(fn, cfg.gamma_range)
    a = _uniform(fn, cfg.linear_scale_range)
    b = _uniform(fn, cfg.linear_shift_range)
    image = fn.medswav.intensity(image, gamma=use_gamma * gamma + (1.0 - use_gamma),
                                 scale=use_gamma + (1.0 - use_gamma) * a, shift=(1.0 - use_gamma) * b)

    ndim = 3 if cfg.volumes else 2
    positions = fn.random.uniform(range=[0.0, 1.0], shape=[ndim * sum(cfg.num_crops)])
    depths = dict(crop_depths=list(cfg.crop_depths)) if cfg.volumes else {}
    crops = fn.medswav.multicrop(image, crop_sizes=list(cfg.crop_sizes), num_crops=list(cfg.num_crops),
                                 border=cfg.border, positions=positions, **depths)
    crops = list(crops) if isinstance(crops, (list, tuple)) else [crops]
    params = {"scale": scale, "ref_energies": ref, "use_gamma": use_gamma, "gamma": gamma, "scale_a": a,
              "shift_b": b, "positions": positions}
    return crops, params


def _branch(b: Branch, cfg: AugmentConfig, device: str) -> dict:
    from nvidia.dali import fn, types

    ext = [PIXELS_EXT, LABELS_EXT] if b.read_labels else [PIXELS_EXT]
    outs = fn.readers.webdataset(
        paths=b.tars, index_paths=b.indices, ext=ext, missing_component_behavior="empty",
        random_shuffle=True, initial_fill=b.initial_fill, seed=b.reader_seed, shard_id=0, num_shards=1,
        name=f"reader_{b.modality}")
    outs = outs if isinstance(outs, list) else [outs]
    # float32 on decode: DALI's numpy decoder needs one dtype across a reader's samples, and one modality
    # may mix int16 and uint16 (or uint8) shards, as the demo's pydicom files do; robust_window's
    # histogram still takes whole-number float32 pixels exactly
    cpu_image = fn.reshape(fn.decoders.numpy(outs[0], dtype=types.FLOAT), layout="DHW" if b.volumes else "HW")
    image = cpu_image.gpu() if device == "gpu" else cpu_image
    crops, _ = augment(image, b.modality, b.energy_mean, b.energy_std, cfg, cpu_image=cpu_image, units=b.units)
    named = {f"crops{g}": c for g, c in enumerate(crops)}
    if b.read_labels:
        named["labels"] = outs[1]
    if b.with_keys:
        named["source"] = fn.get_property(outs[0], key="source_info")
    return named


def build_pipeline(branches: list[Branch], batch_per_modality: int, cfg: AugmentConfig, device: str = "cpu",
                   device_id: int | None = None, num_threads: int = 2, seed: int = 0, prefetch: int = 2,
                   checkpoint: bytes | None = None):
    """One DALI pipeline holding every modality's branch; batch size = samples per modality per step.

    Checkpointing is always enabled: `pipe.checkpoint()` is the position after the last returned step
    (readers, fn.random.* and the medswav operators all save their state), and `checkpoint=` builds a
    pipeline that continues from there without running the earlier steps again.

    Returns (pipeline, names): output i is `names[i]` = (modality, what) with `what` one of "crops<g>"
    ([B/M, n_g, s_g, s_g]), "labels" (raw `.labels.npy` bytes, empty where a sample has none) and
    "source" (source_info bytes); crops of volumes are [B/M, n_g, d_g, s_g, s_g].
    """
    from nvidia.dali import Pipeline

    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    mismatched = [b.modality for b in branches if b.volumes != cfg.volumes]
    if mismatched:
        raise ValueError(f"{mismatched}: {'volumes' if not cfg.volumes else '2-D images'} but the augmentation "
                         f"is {'3-D (crop_depths given)' if cfg.volumes else '2-D (no crop_depths)'}")
    pipe = Pipeline(batch_size=batch_per_modality, num_threads=num_threads,
                    device_id=None if device == "cpu" else (device_id or 0), seed=seed,
                    prefetch_queue_depth=prefetch, enable_checkpointing=True, checkpoint=checkpoint)
    names, outputs = [], []
    with pipe:
        for b in branches:
            for what, node in _branch(b, cfg, device).items():
                names.append((b.modality, what))
                outputs.append(node)
        pipe.set_outputs(*outputs)
    pipe.build()
    return pipe, names
