"""Stages `augment` and `train_step` of `make gpu-check`: the DALI pipeline on the GPU against the
same pipeline on the CPU at batch 32 to 256, and the SwAV step fed by the GPU pipeline.

    python -m benchmarks.gpu_augment --dataset DIR [--batch-sizes 32,64,128,256] [--workers N]
    python -m benchmarks.gpu_augment --dataset DIR --then train_step

The dataset (written on first use, reused after): the 18 real CT slices (512 x 512) and 48 real MR
slices (256 x 256) of ../shared/data (or $MEDSWAV_SHARED_DATA), each slice repeated under distinct
keys up to --per-modality samples per modality, so that a modality-balanced batch of 256 fills
several steps of an epoch; METHOD 2-D sizes (rescale into sides 600..1200, 2 x 224 + 6 x 92 crops).
Figures (samples/s per device and batch, GPU / CPU) go to --json or $MEDSWAV_STAGE_JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks._common import print_table
from shards.layout import DATASET_JSON

REPO = Path(__file__).resolve().parents[1]


def build_dataset(root: Path, data_dir: Path, per_modality: int) -> Path:
    """Real CT and MR slices, each repeated under distinct keys to ``per_modality`` samples; energy stats."""
    import shards
    from benchmarks.augment import real_slices
    from augment_dali.config import AugmentConfig
    from augment_dali.stats import compute_stats, write_stats

    if (root / DATASET_JSON).exists():
        return root
    tmp = root.with_name(root.name + ".partial")
    for modality, slices in real_slices(data_dir).items():
        per_shard = 128
        for s in range(0, per_modality, per_shard):
            with shards.ShardWriter(tmp, modality, f"{modality}-g000-{s // per_shard:06d}") as w:
                for i in range(s, min(per_modality, s + per_shard)):
                    uid, pixels, extra = slices[i % len(slices)]
                    meta = shards.SampleMeta(modality=modality, split="train", **extra)
                    w.write(shards.sample_key(uid, i // len(slices), "gpu-bench"), pixels, meta)
    shards.write_dataset_json(tmp)
    write_stats(tmp, compute_stats(tmp, samples=48, config=AugmentConfig(), show_progress=False))
    os.replace(tmp, root)
    return root


def augment_figures(root: Path, batch_sizes: list[int], workers: int, steps: dict[str, int]) -> dict:
    """samples/s of the same pipeline on each device of ``steps`` ("cpu", "gpu"), ``steps[device]``
    timed steps per batch size (the first step, pipeline build and buffer fill, is not timed)."""
    from benchmarks.augment import run_dali

    rows, figures = [], {"workers": workers}
    if "gpu" in steps:
        import torch
        figures["gpu"] = torch.cuda.get_device_name(0)
    for b in batch_sizes:
        row = {"batch": b}
        for device in steps:
            n, seconds, _ = run_dali(root, device, workers, b, steps[device] * b)
            row[f"{device}_samples_per_s"] = n / seconds
            figures[f"{device}_samples_per_s_b{b}"] = round(n / seconds, 2)
        if {"cpu", "gpu"} <= set(steps):
            row["gpu_over_cpu"] = row["gpu_samples_per_s"] / row["cpu_samples_per_s"]
            figures[f"gpu_over_cpu_b{b}"] = round(row["gpu_over_cpu"], 2)
        rows.append(row)
        print(f"  batch {b}: " + ", ".join(f"{d} {row[d + '_samples_per_s']:.1f}" for d in steps) + " samples/s",
              flush=True)
    print_table(f"DALI pipeline, METHOD 2-D sizes, {workers} CPU threads, {figures.get('gpu', 'no GPU')}", rows,
                ["batch", *(f"{d}_samples_per_s" for d in steps), *(["gpu_over_cpu"] if len(steps) == 2 else [])])
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_augment", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", type=Path, required=True, help="benchmark dataset folder (written if absent)")
    p.add_argument("--data", type=Path, default=Path(os.environ.get("MEDSWAV_SHARED_DATA", REPO.parent / "shared" / "data")),
                   help="real data (default $MEDSWAV_SHARED_DATA or ../shared/data)")
    p.add_argument("--per-modality", type=int, default=640, help="samples per modality in the dataset (default 640)")
    p.add_argument("--batch-sizes", default="32,64,128,256", help="batch sizes to measure, comma-separated (default 32,64,128,256)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                   help="DALI CPU threads (default: the cores, at most 16)")
    p.add_argument("--cpu-steps", type=int, default=2, help="timed CPU steps per batch size, after the first (default 2)")
    p.add_argument("--gpu-steps", type=int, default=4, help="timed GPU steps per batch size, after the first (default 4)")
    p.add_argument("--then", choices=["augment", "train_step"], default="augment",
                   help="train_step: run benchmarks.train_step on this dataset (GPU pipeline, ResNet-50, bf16, "
                        "channels_last) instead (default augment)")
    p.add_argument("--json", type=Path, default=os.environ.get("MEDSWAV_STAGE_JSON"), help="write the figures here (default $MEDSWAV_STAGE_JSON)")
    args = p.parse_args(argv)
    root = build_dataset(args.dataset, args.data, args.per_modality)
    if args.then == "train_step":
        from benchmarks import train_step
        fig = train_step.main(["--data", str(root), "--device", "cuda", "--arch", "resnet50", "--batch-size", "64",
                               "--steps", "10", "--warmup", "3", "--precision", "bf16", "--channels-last",
                               "--num-workers", str(args.workers)] + (["--json", str(args.json)] if args.json else []))
        if args.json:   # the stage's figures: the flat ones of train_step
            Path(args.json).write_text(json.dumps({k: v for k, v in fig.items() if not isinstance(v, dict)}, indent=1))
        return 0
    figures = augment_figures(root, [int(b) for b in args.batch_sizes.split(",")], args.workers,
                              {"cpu": args.cpu_steps, "gpu": args.gpu_steps})
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
