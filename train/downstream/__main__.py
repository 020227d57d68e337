"""python -m train.downstream PROTOCOL --data DATASET_OR_NPZ --pretrained BACKBONE --out DIR"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from train.export import backbone_normalisation

from .data import VOLUME_SHAPE, load
from .protocols import ProtocolConfig, convergence_protocol, label_efficiency, robustness_protocol
from .report import write_report

PROTOCOLS = ("label-efficiency", "convergence", "robustness", "all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.downstream",
        description="Compare a pretrained backbone with random initialisation on a labelled task; "
        "writes report.md, PNG plots and results.json to --out.",
        epilog="Lists are comma-separated. exit status: 0 report written, 2 bad data or backbone file.",
    )
    p.add_argument("protocol", choices=PROTOCOLS,
                   help="label-efficiency (AUC against label fraction), convergence (validation AUC per epoch), "
                        "robustness (prediction change under intensity transforms), or all")
    p.add_argument("--data", required=True,
                   help="MedMNIST-layout .npz, a medswav dataset folder with labels (slices, or volumes for "
                        "--arch densenet3d), or a .csv of NIfTI volumes (path, label columns; optional split, "
                        "modality, units) for --arch densenet3d")
    p.add_argument("--pretrained", required=True, help="backbone file from `python -m train.export`")
    p.add_argument("--out", required=True, help="output folder")
    defaults = ProtocolConfig()
    p.add_argument("--arch", default=defaults.arch,
                   help=f"encoder architecture; must match the backbone file (default {defaults.arch})")
    p.add_argument("--mode", choices=("finetune", "linear"), default=defaults.mode,
                   help=f"finetune every layer, or train a linear head on frozen features (default {defaults.mode})")
    p.add_argument("--fractions", type=lambda s: tuple(float(x) / 100 for x in s.split(",")), default=defaults.fractions,
                   help="label fractions in percent, comma-separated (default 100,50,25,10,1)")
    described = {
        "repeats": "training runs per label fraction and initialisation",
        "epochs": "training epochs per run",
        "batch_size": "samples per training step",
        "seed": "seed of subsets, initialisation and training order",
        "n_boot": "bootstrap resamples of the test set for confidence intervals",
        "n_images": "robustness: test images transformed",
        "n_transforms": "robustness: random intensity transforms per image",
    }
    for name, text in described.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name),
                       help=f"{text} (default {getattr(defaults, name)})")
    p.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate (default 3e-3 for finetune, 1e-2 for linear)")
    p.add_argument("--train-fraction", type=float, default=defaults.train_fraction,
                   help="convergence/robustness: share of the training labels (stratified), default 1.0")
    p.add_argument("--device", default=defaults.device, help=f"cpu or cuda (default {defaults.device})")
    p.add_argument("--volume-shape", type=lambda s: tuple(int(v) for v in s.split(",")), default=VOLUME_SHAPE,
                   metavar="D,H,W", help="volume datasets (with --arch densenet3d): every volume resampled to this "
                   f"depth,rows,cols (default {','.join(map(str, VOLUME_SHAPE))})")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    cfg = ProtocolConfig(**{f.name: getattr(args, f.name) for f in fields(ProtocolConfig)})
    try:
        data = load(args.data, backbone_normalisation(args.pretrained), volume_shape=args.volume_shape)
        start = time.time()
        results = {}
        if args.protocol in ("label-efficiency", "all"):
            results["label-efficiency"] = label_efficiency(data, args.pretrained, cfg)
        if args.protocol in ("convergence", "robustness", "all"):
            # Robustness is measured on the models the convergence runs select, so it reports both.
            results["convergence"], models = convergence_protocol(data, args.pretrained, cfg)
            if args.protocol in ("robustness", "all"):
                results["robustness"] = robustness_protocol(data, models, cfg)
        header = {"data": args.data, "pretrained": args.pretrained, "task": data.task, **asdict(cfg),
                  "wall_time_s": round(time.time() - start, 1)}
        path = write_report(Path(args.out), header, results)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
