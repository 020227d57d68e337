"""`python -m augment_dali.preview DATASET --out preview.png`: originals beside their 8 augmented crops.

For each modality, `--per-modality` slices are drawn uniformly (seeded) from the shards and sent through
the training pipeline's augmentation graph (augment_dali.pipeline.augment, CPU): normalisation,
rescale, energy bands, gamma or linear, multi-crop. One row per slice: the normalised original, then
the 2 assigned crops and the 6 small crops, all on the same grey scale [0, 1] (linear-shifted values
outside it saturate). Row labels give the drawn rescale factor and intensity transform.

Volume datasets (kind "volumes"): each drawn volume gives three rows, its orthogonal mid-slices
(the middle of the depth axis, the middle row, the middle column) of the
normalised volume and of every crop, through the 3-D graph (AugmentConfig.method_3d() unless
`--config TRAIN_TOML` gives the [augment] table of a training config).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from shards import Dataset

from .config import AugmentConfig
from .normalize import modality_units, normalize_numpy
from .sampling import dataset_kind, read_pixels, sample_refs
from .stats import load_energy_stats


def augment_images(images: list[np.ndarray], modality: str, stats: dict, cfg: AugmentConfig, seed: int = 0,
                   units: str = ""):
    """Run the pipeline's augmentation graph on raw pixel arrays of one modality.

    Returns (crop groups as arrays [n, n_g, s_g, s_g], or [n, n_g, d_g, s_g, s_g] for volumes with a 3-D
    `cfg`, drawn parameters as dict of arrays).
    """
    from nvidia.dali import fn, pipeline_def

    from .pipeline import augment

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=seed, prefetch_queue_depth=1)
    def pipe():
        raw = fn.external_source(source=lambda: [np.asarray(i, np.float32) for i in images], batch=True,
                                 layout="DHW" if cfg.volumes else "HW")
        crops, params = augment(raw, modality, stats["mean"], stats["std"], cfg, units=units)
        return (*crops, *params.values())

    p = pipe()
    p.build()
    outs = p.run()
    groups = len(cfg.crop_sizes)
    crops = [np.array(outs[g].as_tensor()) for g in range(groups)]
    names = ["scale", "ref_energies", "use_gamma", "gamma", "scale_a", "shift_b", "positions"]
    params = {n: np.stack([np.asarray(outs[groups + k][i]) for i in range(len(images))]) for k, n in enumerate(names)}
    return crops, params


# array axes, not anatomy: the depth axis is the series' slice axis (axial for most CT, sagittal for the
# MPRAGE MR of the tests)
VIEWS = ("depth mid-slice", "row mid-slice", "column mid-slice")


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three orthogonal mid-slices of a (depth, rows, cols) volume: [d/2, :, :], [:, h/2, :], [:, :, w/2]."""
    d, h, w = volume.shape
    return [volume[d // 2], volume[:, h // 2, :], volume[:, :, w // 2]]


def render(rows: list[dict], cfg: AugmentConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_crops = sum(cfg.num_crops)
    cols, side = 1 + n_crops, 1.4  # inches per square panel
    fig, axes = plt.subplots(len(rows), cols, figsize=(side * cols, side * 1.08 * len(rows) + 0.5), squeeze=False,
                             gridspec_kw={"wspace": 0.04, "hspace": 0.08})
    fig.subplots_adjust(left=0.06, right=0.995, bottom=0.005, top=1 - 0.5 / (side * 1.08 * len(rows) + 0.5))
    for r, row in enumerate(rows):
        panels = [row["original"]] + row["crops"]
        for c, (ax, img) in enumerate(zip(axes[r], panels)):
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else
                             (f"assigned {c}" if c <= cfg.num_crops[0] else f"small {c - cfg.num_crops[0]}"),
                             fontsize=8)
        axes[r][0].set_ylabel(row["label"], fontsize=7)
    depths = cfg.crop_depths or (None,) * len(cfg.crop_sizes)
    fig.suptitle(f"medswav augmentations: rescale sides {cfg.size_range}"
                 + (f", depth {cfg.depth_range}" if cfg.volumes else "") + ", crops "
                 + " + ".join(f"{n}x{s}x{s}" + (f"x{d}" if d else "")
                              for n, s, d in zip(cfg.num_crops, cfg.crop_sizes, depths)), fontsize=10, y=0.999)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def preview_rows(root, per_modality: int = 3, seed: int = 0, cfg: AugmentConfig | None = None,
                 modalities: list[str] | None = None) -> list[dict]:
    """The picture's rows: {"original", "crops" (2-D arrays), "label"}; three rows per volume."""
    dataset = Dataset(root)
    volumes = dataset_kind(root, dataset) == "volumes"
    if cfg is None:
        cfg = AugmentConfig.method_3d() if volumes else AugmentConfig()
    if cfg.volumes != volumes:
        raise ValueError(f"{root} holds {'volumes' if volumes else '2-D slices'}: the augmentation must "
                         f"{'have' if volumes else 'not have'} crop depths")
    stats = load_energy_stats(root)
    available = dataset.modalities
    chosen = modalities or available
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise ValueError(f"modalities {unknown} not in {root}; available: {', '.join(available)}")
    rows = []
    for k, m in enumerate(chosen):
        if m not in stats["modalities"]:
            raise ValueError(f"stats/energy.json has no entry for {m}: rerun `python -m augment_dali.stats {root}`")
        refs = sample_refs(dataset, m, per_modality, seed)
        images = [read_pixels(r) for r in refs]
        units = modality_units(dataset.units(m))
        crops, params = augment_images(images, m, stats["modalities"][m], cfg, seed * 1000 + k, units)
        method = cfg.normalize.method_for(m, units)
        for i, img in enumerate(images):
            intensity = (f"gamma {params['gamma'][i]:.2f}" if params["use_gamma"][i] > 0.5
                         else f"linear {params['scale_a'][i]:.2f}x{params['shift_b'][i]:+.2f}")
            original = normalize_numpy(img, method, cfg.normalize)
            views = [crops[g][i, k] for g in range(len(crops)) for k in range(crops[g].shape[1])]
            label = f"{m} {'x'.join(map(str, img.shape))}\ns={float(params['scale'][i]):.2f} {intensity}"
            if not volumes:
                rows.append({"original": original, "crops": views, "label": label})
                continue
            for v, name in enumerate(VIEWS):
                rows.append({"original": mid_slices(original)[v], "crops": [mid_slices(c)[v] for c in views],
                             "label": f"{label}\n{name}"})
    return rows


def preview(root, out, per_modality: int = 3, seed: int = 0, cfg: AugmentConfig | None = None,
            modalities: list[str] | None = None) -> Path:
    rows = preview_rows(root, per_modality, seed, cfg, modalities)
    if cfg is None:
        cfg = AugmentConfig.method_3d() if dataset_kind(root) == "volumes" else AugmentConfig()
    out = Path(out)
    render(rows, cfg, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m augment_dali.preview",
                                description="Picture of augmented multi-crop views: per modality, a few "
                                            "originals beside their 8 crops.")
    p.add_argument("dataset", help="dataset folder (needs stats/energy.json: python -m augment_dali.stats)")
    p.add_argument("--out", default="preview.png", help="output PNG (default preview.png)")
    p.add_argument("--per-modality", type=int, default=3, help="slices per modality (default 3)")
    p.add_argument("--seed", type=int, default=0, help="which slices and which augmentations are drawn (default 0)")
    p.add_argument("--modalities", help="comma-separated subset (default: all present)")
    p.add_argument("--small", action="store_true", help="the small preset (sides 48..96, crops 32/16)")
    p.add_argument("--config", metavar="TRAIN_TOML",
                   help="take the augmentation of a training config's [augment] table (default: METHOD's 2-D "
                        "values, or its 3-D values for a volume dataset)")
    args = p.parse_args(argv)
    cfg = AugmentConfig.small() if args.small else None
    try:
        if args.config:
            from train.config import load_config

            cfg = load_config(["--config", args.config, "--synthetic"]).augment
        out = preview(args.dataset, args.out, args.per_modality, args.seed, cfg,
                      args.modalities.split(",") if args.modalities else None)
    except (ValueError, FileNotFoundError) as e:  # train.config.ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
