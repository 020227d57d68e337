"""Per-step cost of SwAV training, split into phases, beside a plain supervised step of the same
encoder on the same crops (the baseline), in one run.

    python -m benchmarks.train_step [--quick] [--json PATH] [--arch resnet50] [--batch-size 32]
        [--data DATASET] [--device cuda] [--precision bf16] [--channels-last] [--num-workers N]

On a GPU the default is the production layout: bf16 autocast and channels_last weights (as
`python -m train`); with --data DATASET (a shard dataset) the batches come from the DALI pipeline on
the GPU, and data_wait_fraction is the share of the step spent waiting for them.

Phases of a SwAV step: data wait, forward (backbone + projector + prototype scores), Sinkhorn + loss
(queue scoring, Sinkhorn, swapped cross-entropies), backward, optimiser (LARS + prototype
normalisation). swav_overhead_fraction = (Sinkhorn + loss + queue + prototype scoring and
normalisation) / total step: what SwAV adds on top of the encoder's own work. Limits: 0.05 for
swav_overhead_fraction at K = 3000 and for data_wait_fraction.

3-D line (`--volumes`): DenseNet3D steps fed by the 3-D DALI CPU pipeline (SwavLoader on a volume
dataset: normalisation, 3-D rescale, energy bands, gamma/linear, 1 + 4 crops), modalities ct and mr,
batch 4 (2 volumes of each per step). Without --data it writes a volume dataset of real series first
(the KiTS CT, 12 sub-volumes of 7 x 512 x 512, and the MPRAGE MR, 12 of 48 x 256 x 256, from
--dicom) and measures its band energies. Sizes: METHOD's 3-D sizes halved by default (crops
112x112x96 + 4 x 56x56x48 from rows/cols 56..125 and depth 48..100); --quick a quarter (56x56x48 +
4 x 28x28x24 from 28..62 and 24..50); --crop-sizes/--crop-depths/--size-range/--depth-range set them.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import parser, print_table, write_json
from augment_dali.config import AugmentConfig
from train.config import Config
from train.data import build_source
from train.models import SwAVModel
from train.optim import LARS, param_groups
from train.swav import FeatureQueue, modality_losses

LIMIT = 0.05
REPO = Path(__file__).resolve().parents[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_volume_dataset(root: Path, dicom: Path, augment: AugmentConfig) -> Path:
    """Sub-volumes of the real KiTS CT and MPRAGE MR series (SimpleITK's series read, stored integer
    voxels, 2 shards per modality) and their band energies at the benchmark's sizes."""
    import SimpleITK as sitk

    import shards
    from augment_dali.stats import compute_stats, write_stats

    # 12 volumes per modality: an epoch (6 steps of 2 per modality) outlasts the timed steps, so the
    # figures are the steady state, not a new epoch's pipeline start
    series = {"ct": (dicom / "ct_kits_abdomen_18", 7, 1, 0, "HU"),
              "mr": (dicom / "mr_mprage_sagittal_192", 48, 8, 40, "raw")}
    count = 12
    for modality, (folder, depth, stride, first, units) in series.items():
        reader = sitk.ImageSeriesReader()
        (uid,) = reader.GetGDCMSeriesIDs(str(folder))
        names = reader.GetGDCMSeriesFileNames(str(folder), uid)
        reader.SetFileNames(names[first:first + (count - 1) * stride + depth])
        image = reader.Execute()
        voxels = sitk.GetArrayFromImage(image)
        sx, sy, sz = image.GetSpacing()
        for s, part in enumerate(np.array_split(np.arange(count), 2)):
            with shards.ShardWriter(root, modality, f"{modality}-bench-{s:06d}") as w:
                for i in part:
                    meta = shards.SampleMeta(modality=modality, split="train", units=units, spacing=[sz, sy, sx])
                    w.write(shards.sample_key(f"{uid}.{i}", 0, "bench"),
                            np.ascontiguousarray(voxels[i * stride:i * stride + depth]), meta)
    shards.write_dataset_json(root)
    write_stats(root, compute_stats(root, samples=4, seed=0, config=augment, show_progress=False))
    return root


def _augment(args) -> AugmentConfig:
    if not args.volumes:
        return AugmentConfig(crop_sizes=tuple(args.crop_sizes), num_crops=tuple(args.num_crops))
    return AugmentConfig.method_3d(crop_sizes=tuple(args.crop_sizes), crop_depths=tuple(args.crop_depths),
                                   num_crops=tuple(args.num_crops), size_range=tuple(args.size_range),
                                   depth_range=tuple(args.depth_range))


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    amp = device.type == "cuda" and args.precision == "bf16"
    channels_last = device.type == "cuda" and args.channels_last and not args.volumes
    augment = _augment(args)
    scratch = None
    if args.volumes and not args.data:
        scratch = tempfile.TemporaryDirectory(prefix="medswav-bench-volumes-")
        args.data = str(write_volume_dataset(Path(scratch.name), Path(args.dicom), augment))
    cfg = Config(synthetic=not args.data, data=args.data or "", batch_size=args.batch_size, augment=augment,
                 synthetic_steps=2 * (args.steps + args.warmup) + 1, num_workers=args.num_workers)
    torch.backends.cudnn.benchmark = device.type == "cuda"   # fixed crop sizes, as in train
    source = build_source(cfg, 0, 1, device.type)

    def cycle():  # as many steps as asked for, whatever an epoch's length
        epoch = 0
        while True:
            yield from source.epoch_iter(epoch)
            epoch += 1

    batches = cycle()
    torch.manual_seed(0)
    model = SwAVModel(args.arch, len(source.modalities), args.num_prototypes).to(device)
    if channels_last:  # single-channel inputs are NHWC already; the weights carry the format onwards
        model = model.to(memory_format=torch.channels_last)
    opt = LARS(param_groups(model), lr=0.1)
    b = args.batch_size
    queue = None
    if args.queue_length:
        sub = b // len(source.modalities)
        queue = FeatureQueue(len(source.modalities), 2, args.queue_length - args.queue_length % sub, 128, device)
        queue.features.copy_(F.normalize(torch.randn_like(queue.features), dim=-1))
        queue.filled.fill_(queue.length)  # full: the heaviest case (after the queue's start epoch)
    protos = [p.weight for p in model.prototypes]

    def proto_cost() -> float:
        """Forward + backward of the prototype layer alone, same shapes (it runs inside forward)."""
        sub = b // len(protos)
        z = torch.randn(sum(args.num_crops) * sub, 128, device=device, requires_grad=True)
        _sync(device)
        t = time.perf_counter()
        for w in protos:
            s = z @ w.float().t()
            s.sum().backward()
        _sync(device)
        for w in protos:
            w.grad = None
        return time.perf_counter() - t

    phases = ("data", "forward", "sinkhorn_loss", "backward", "optimizer", "normalize_prototypes")
    swav = {k: 0.0 for k in phases}
    scoring = [0.0]  # prototype scoring: inside forward + backward; measured alone to count it as overhead

    def swav_step(record: bool) -> None:
        t = [time.perf_counter()]
        batch = next(batches)
        crops = [c.to(device, non_blocking=True) for c in batch["crops"]]
        _sync(device); t.append(time.perf_counter())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(crops)
        _sync(device); t.append(time.perf_counter())
        losses, _ = modality_losses(out["scores"], out["z"], protos, queue=queue, fill_queue=queue is not None)
        loss = torch.stack(losses).sum()
        _sync(device); t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device); t.append(time.perf_counter())
        opt.step()
        _sync(device); t.append(time.perf_counter())
        model.normalize_prototypes()
        _sync(device); t.append(time.perf_counter())
        if record:
            for k, a, b_ in zip(phases, t, t[1:]):
                swav[k] += b_ - a
            scoring[0] += proto_cost()

    # Baseline: the same encoder, same crops, a linear classifier and cross-entropy, SGD step.
    torch.manual_seed(0)
    encoder = SwAVModel(args.arch, 1, 1).backbone.to(device)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    head = torch.nn.Linear(encoder.num_features, 1000).to(device)
    base_opt = torch.optim.SGD(list(encoder.parameters()) + list(head.parameters()), lr=0.1, momentum=0.9)
    sup = {k: 0.0 for k in ("data", "forward", "loss", "backward", "optimizer")}

    def supervised_step(record: bool) -> None:
        t = [time.perf_counter()]
        batch = next(batches)
        crops = [c.to(device, non_blocking=True) for c in batch["crops"]]
        _sync(device); t.append(time.perf_counter())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = torch.cat([head(encoder(g.transpose(0, 1).reshape(-1, *g.shape[2:]))) for g in crops])
        _sync(device); t.append(time.perf_counter())
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
        loss = F.cross_entropy(logits.float(), target)
        _sync(device); t.append(time.perf_counter())
        base_opt.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device); t.append(time.perf_counter())
        base_opt.step()
        _sync(device); t.append(time.perf_counter())
        if record:
            for k, a, b_ in zip(sup, t, t[1:]):
                sup[k] += b_ - a

    # Interleaved, so that a machine's changing load weighs on both alike.
    for i in range(args.warmup + args.steps):
        swav_step(i >= args.warmup)
        supervised_step(i >= args.warmup)
    proto_scoring = scoring[0]

    n = args.steps
    swav_step = sum(swav.values()) / n
    overhead = (swav["sinkhorn_loss"] + swav["normalize_prototypes"] + proto_scoring) / n
    sup_step = sum(sup.values()) / n
    figures = {
        "swav_step_s": swav_step,
        "supervised_step_s": sup_step,
        "swav_over_supervised": swav_step / sup_step,
        "swav_overhead_fraction": overhead / swav_step,
        "data_wait_fraction": swav["data"] / n / swav_step,
        "images_per_s": b / swav_step,
        "supervised_images_per_s": b / sup_step,
        "phases_s": {**{k: v / n for k, v in swav.items()}, "prototype_scoring_in_fwd_bwd": proto_scoring / n},
        "supervised_phases_s": {k: v / n for k, v in sup.items()},
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "precision": "bf16" if amp else "fp32", "channels_last": channels_last,
        "data": "DALI GPU pipeline" if args.data and device.type == "cuda" else
                ("volumes of real CT/MR series, DALI CPU pipeline" if scratch else (args.data or "synthetic")),
        "crops": [list(g) for g in zip(augment.num_crops, augment.crop_sizes, augment.crop_depths or augment.crop_sizes)],
    }
    if hasattr(source, "close"):
        source.close()
    if scratch is not None:
        scratch.cleanup()
        args.data = ""
    return figures


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser():
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=None, help="encoder (default resnet50; resnet18 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (default 32; 4 with --volumes)")
    p.add_argument("--crop-sizes", type=_ints, default=None, metavar="A,B",
                   help="side of the crops of each group, comma-separated (default 224,92; with --volumes 112,56, "
                        "--quick 56,28)")
    p.add_argument("--num-crops", type=_ints, default=None, metavar="A,B",
                   help="crops per group, comma-separated (default 2,6; with --volumes 1,4)")
    p.add_argument("--volumes", action="store_true",
                   help="3-D line: DenseNet3D fed by the 3-D CPU pipeline from a volume dataset (--data, or real "
                        "series written to a temporary one)")
    p.add_argument("--crop-depths", type=_ints, default=None, metavar="A,B",
                   help="--volumes: crop depths per group (default 96,48; --quick 48,24)")
    p.add_argument("--size-range", type=_ints, default=None, metavar="A,B",
                   help="--volumes: rows/cols after rescaling (default 56,125; --quick 28,62)")
    p.add_argument("--depth-range", type=_ints, default=None, metavar="A,B",
                   help="--volumes: depth after rescaling (default 48,100; --quick 24,50)")
    p.add_argument("--dicom", default=os.path.join(os.environ.get("MEDSWAV_SHARED_DATA", str(REPO.parent / "shared" / "data")), "dicom"),
                   help="--volumes without --data: folder of the real series (default: $MEDSWAV_SHARED_DATA/dicom "
                        "or ../shared/data/dicom)")
    p.add_argument("--num-prototypes", type=int, default=None, help="prototypes K (default 3000; 1500 with --volumes)")
    p.add_argument("--queue-length", type=int, default=None,
                   help="full queue of this length (0: none; default 3840; 1920 with --volumes)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run (default auto: cuda when visible)")
    p.add_argument("--data", default="", help="data source (.npz or shard dataset); default synthetic crops")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="GPU autocast (default bf16; CPU runs fp32)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC weights on the GPU (default on, as in train)")
    p.add_argument("--num-workers", type=int, default=2, help="DALI threads of a shard dataset source (default 2)")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.volumes:
        div = 4 if args.quick else 2   # METHOD's 3-D sizes divided by this
        args.arch = args.arch or "densenet3d"
        args.batch_size = args.batch_size or 4
        args.crop_sizes = args.crop_sizes or [224 // div, 112 // div]
        args.crop_depths = args.crop_depths or [192 // div, 96 // div]
        args.num_crops = args.num_crops or [1, 4]
        args.size_range = args.size_range or [112 // div, 250 // div]
        args.depth_range = args.depth_range or [96 // div, 200 // div]
        args.num_prototypes = args.num_prototypes or 1500
        args.queue_length = 1920 if args.queue_length is None else args.queue_length
    args.arch = args.arch or ("resnet18" if args.quick else "resnet50")
    args.batch_size = args.batch_size or 32
    args.crop_sizes = args.crop_sizes or [224, 92]
    args.num_crops = args.num_crops or [2, 6]
    args.num_prototypes = args.num_prototypes or 3000
    args.queue_length = 3840 if args.queue_length is None else args.queue_length
    args.steps = args.steps or (2 if args.quick else 3)
    fig = run(args)
    ph, sp = fig["phases_s"], fig["supervised_phases_s"]
    rows = [{"phase": "data wait", "swav_ms": 1e3 * ph["data"], "supervised_ms": 1e3 * sp["data"]},
            {"phase": "forward", "swav_ms": 1e3 * ph["forward"], "supervised_ms": 1e3 * sp["forward"]},
            {"phase": "sinkhorn + loss", "swav_ms": 1e3 * ph["sinkhorn_loss"], "supervised_ms": 1e3 * sp["loss"]},
            {"phase": "backward", "swav_ms": 1e3 * ph["backward"], "supervised_ms": 1e3 * sp["backward"]},
            {"phase": "optimiser", "swav_ms": 1e3 * (ph["optimizer"] + ph["normalize_prototypes"]),
             "supervised_ms": 1e3 * sp["optimizer"]},
            {"phase": "(prototype scoring, in fwd+bwd)", "swav_ms": 1e3 * ph["prototype_scoring_in_fwd_bwd"],
             "supervised_ms": 0.0},
            {"phase": "step", "swav_ms": 1e3 * fig["swav_step_s"], "supervised_ms": 1e3 * fig["supervised_step_s"]}]
    shape = [f"{s}x{s}x{d}" for s, d in zip(args.crop_sizes, args.crop_depths)] if args.volumes else \
        [str(s) for s in args.crop_sizes]
    print_table(f"train step: {args.arch}, batch {args.batch_size}, crops {args.num_crops[0]} x {shape[0]} + "
                f"{args.num_crops[1]} x {shape[1]}, K={args.num_prototypes}, queue {args.queue_length}, "
                f"{fig['device']}", rows, ["phase", "swav_ms", "supervised_ms"])
    checks = [("swav_overhead_fraction", fig["swav_overhead_fraction"]), ("data_wait_fraction", fig["data_wait_fraction"])]
    print_table("against the limits", [{"figure": k, "value": v, "limit": LIMIT, "ok": "yes" if v <= LIMIT else "NO"}
                                       for k, v in checks] +
                [{"figure": "images_per_s", "value": fig["images_per_s"], "limit": "-", "ok": "-"},
                 {"figure": "supervised_images_per_s", "value": fig["supervised_images_per_s"], "limit": "-", "ok": "-"}],
                ["figure", "value", "limit", "ok"])
    write_json(args.json, "train_step", fig, {k: v for k, v in vars(args).items() if k != "json"})
    return fig


if __name__ == "__main__":
    main()
