"""python -m train.downstream PROTOCOL --data DATASET_OR_NPZ --pretrained BACKBONE --out DIR"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from .data import load
from .protocols import ProtocolConfig, convergence_protocol, label_efficiency, robustness_protocol
from .report import write_report

PROTOCOLS = ("label-efficiency", "convergence", "robustness", "all")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.downstream",
        description="Compare a pretrained backbone with random initialisation on a labelled task; "
        "writes report.md, PNG plots and results.json to --out.",
    )
    p.add_argument("protocol", choices=PROTOCOLS)
    p.add_argument("--data", required=True, help="MedMNIST-layout .npz, or a medswav dataset folder with labels")
    p.add_argument("--pretrained", required=True, help="backbone file from `python -m train.export`")
    p.add_argument("--out", required=True, help="output folder")
    defaults = ProtocolConfig()
    p.add_argument("--arch", default=defaults.arch)
    p.add_argument("--mode", choices=("finetune", "linear"), default=defaults.mode)
    p.add_argument("--fractions", type=lambda s: tuple(float(x) / 100 for x in s.split(",")), default=defaults.fractions,
                   help="label fractions in percent, comma-separated (default 100,50,25,10,1)")
    for name in ("repeats", "epochs", "batch_size", "seed", "n_boot", "n_images", "n_transforms"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--device", default=defaults.device)
    args = p.parse_args(argv)
    cfg = ProtocolConfig(**{f.name: getattr(args, f.name) for f in fields(ProtocolConfig)})
    try:
        data = load(args.data)
        start = time.time()
        results = {}
        if args.protocol in ("label-efficiency", "all"):
            results["label-efficiency"] = label_efficiency(data, args.pretrained, cfg)
        if args.protocol in ("convergence", "robustness", "all"):
            conv, models = convergence_protocol(data, args.pretrained, cfg if args.protocol != "robustness" else
                                                ProtocolConfig(**{**asdict(cfg), "repeats": 1}))
            if args.protocol != "robustness":
                results["convergence"] = conv
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
