"""Training configuration: one typed dataclass holding every default (METHOD.md section 5, 2-D column).

Precedence: dataclass defaults < TOML file (``--config FILE``) < command-line flags.
Every field is a flag: ``batch_size`` is ``--batch-size``; tuples take comma-separated values
(``--crop-sizes 224,92``); booleans take ``--synthetic`` / ``--no-synthetic``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field, fields

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Config:
    # data
    data: str = ""                      # dataset folder (shards, read by augment_dali) or .npz file(s), comma-separated
    synthetic: bool = False             # random multi-crop batches instead of data (benchmarks, smoke tests)
    synthetic_modalities: int = 1       # modalities of the synthetic source
    synthetic_labels: int = 0           # label columns of the synthetic source
    synthetic_steps: int = 100          # steps per epoch of the synthetic source
    modalities: tuple[str, ...] = ()    # subset of the dataset's modalities (empty: all)
    split: str = "train"                # dataset split to train on
    num_workers: int = 2                # data threads
    verify_shards: bool = True          # shard datasets: check each tar's checksum before this process first reads it
    npz_label_fraction: float = 1.0     # NPZ source: fraction of samples that keep their label
    out: str = "runs/swav"              # run folder: checkpoint.pt, metrics.jsonl, tensorboard/

    # model
    arch: str = "resnet50"              # resnet18 (small, CPU), resnet50, resnet50w2, resnet50w4, resnet152, densenet3d
    feat_dim: int = 128                 # F, dimension of the L2-normalised feature
    hidden_dim: int = 0                 # 0: follows the encoder width (2048 for ResNet-50, 2048*w for 50wN)
    num_prototypes: int = 3000          # K, per modality

    # swapped prediction
    crop_sizes: tuple[int, ...] = (224, 92)   # side of each crop group (group 0: full resolution)
    num_crops: tuple[int, ...] = (2, 6)       # crops per group
    crop_depths: tuple[int, ...] = ()   # 3-D volumes: depth of each group's crops (empty: 2-D images)
    min_scale_crops: tuple[float, ...] = (0.14, 0.05)   # NPZ source: smallest area fraction of each group's crops
    max_scale_crops: tuple[float, ...] = (1.0, 0.14)    # NPZ source: largest area fraction of each group's crops
    rescale_size_range: tuple[int, ...] = (600, 1200)   # shard datasets: image sides after the rescale augmentation
    crops_for_assign: tuple[int, ...] = (0, 1)  # views whose codes are predicted (the first views)
    temperature: float = 0.1            # tau of the prediction softmax
    epsilon: float = 0.03               # Sinkhorn entropy weight
    sinkhorn_iterations: int = 3        # Sinkhorn-Knopp normalisation rounds per code computation
    queue_length: int = 3840            # global per modality; each process keeps queue_length/world_size
    epoch_queue_starts: int = 10        # the queue fills from this epoch, is used once full
    freeze_prototypes_steps: int = 10000  # prototypes get no update for these first steps

    # hybrid objective: alpha * L_ss + beta * L_sup
    alpha: float = 1.0                  # weight of the swapped-prediction loss
    beta: float = 0.0                   # > 0 adds the supervised head (needs labels in the data)
    sup_loss: str = "bce"               # bce (multi-label, NaN = unknown) or ce (classes, one-hot)

    # optimisation
    epochs: int = 100                   # length of the learning-rate schedule
    max_steps: int = 0                  # stop at this global step (0: full schedule); the schedule is unchanged
    max_seconds: float = 0.0            # wall-clock budget of the loop: stop after the step that reaches it, checkpoint (0: none); the schedule is unchanged
    batch_size: int = 32                # per process
    base_lr: float = 0.6                # peak learning rate (at lr_ref_batch)
    final_lr: float = 0.0006            # end of the cosine
    lr_ref_batch: int = 1024            # lr = base_lr * global_batch / lr_ref_batch (0: no scaling)
    warmup_epochs: float = 10.0         # linear warm-up from start_warmup
    start_warmup: float = 0.0           # learning rate of the first step
    weight_decay: float = 1e-6          # on weights only (not biases / norms)
    momentum: float = 0.9               # SGD momentum
    lars_trust: float = 0.001           # LARS trust coefficient (SwAV LARC, no clipping)

    # system
    device: str = "auto"                # auto, cpu or cuda
    precision: str = "bf16"             # bf16 (GPU autocast), fp16 (autocast + grad scaler) or fp32; CPU runs fp32
    sync_bn: bool = True                # SyncBatchNorm when several GPU processes
    channels_last: bool = True          # NHWC memory format on GPU (2-D)
    seed: int = 0                       # weights, data order and augmentations
    deterministic: bool = False         # torch deterministic algorithms
    checkpoint_every: int = 1000        # steps (and at the end of every epoch)
    log_every: int = 10                 # steps between console lines and metrics.jsonl rows
    resume: str = ""                    # "", "auto" (the run folder's checkpoint.pt if present) or a path
    tensorboard: bool = True            # also write TensorBoard events under out/tensorboard
    config: str = ""                    # the TOML file this came from (informational)


def _parse_value(tp, text: str):
    origin = typing.get_origin(tp)
    if origin is tuple:
        (inner, _) = typing.get_args(tp)
        return tuple(inner(v) for v in text.split(",") if v.strip() != "")
    if tp is bool:
        return text.lower() in ("1", "true", "yes", "on")
    return tp(text)


def _types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(name: str, value, tp):
    if typing.get_origin(tp) is tuple:
        (inner, _) = typing.get_args(tp)
        if isinstance(value, str):
            return _parse_value(tp, value)
        return tuple(inner(v) for v in value)
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise ValueError(f"config key {name!r}: expected {tp.__name__}, got {value!r}")
    return value


def _field_help() -> dict[str, str]:
    """The comment beside each field in the dataclass above: one source for code and --help."""
    import inspect
    import re
    found = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="SwAV pretraining with per-modality prototypes (launch with torchrun for several processes).",
        epilog="Precedence: defaults < --config FILE < flags. Lists are comma-separated.")
    parser.add_argument("--config", metavar="FILE", help="TOML file with Config fields (flags override it)")
    notes = _field_help()
    for name, tp in _types().items():
        if name == "config":
            continue
        flag = "--" + name.replace("_", "-")
        default = getattr(Config, name, None)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=f"{notes.get(name, '')} (default: {default})")
        else:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            metavar = "A,B" if typing.get_origin(tp) is tuple else tp.__name__.upper()
            parser.add_argument(flag, type=str, default=argparse.SUPPRESS, metavar=metavar,
                                help=f"{notes.get(name, '')} (default: {shown})")
    return parser


def load_config(argv: list[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    types = _types()
    values: dict = {}
    if args.get("config"):
        with open(args["config"], "rb") as f:
            table = tomllib.load(f)
        unknown = sorted(set(table) - set(types))
        if unknown:
            raise SystemExit(f"error: {args['config']}: unknown config keys {unknown}")
        values.update({k: _coerce(k, v, types[k]) for k, v in table.items()})
        values["config"] = args["config"]
    for name, text in args.items():
        if name == "config" or text is None:
            continue
        try:
            values[name] = text if isinstance(text, bool) else _parse_value(types[name], text)
        except ValueError:
            raise SystemExit(f"error: --{name.replace('_', '-')} {text!r}: not a valid {getattr(types[name], '__name__', types[name])}") from None
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def fail(msg: str):
        raise SystemExit(f"error: {msg}")
    if len(cfg.crop_sizes) != len(cfg.num_crops):
        fail("crop_sizes and num_crops must have the same length")
    if list(cfg.crops_for_assign) != list(range(len(cfg.crops_for_assign))):
        fail("the assigned crops must be the first views (default 0,1)")
    if len(cfg.crops_for_assign) > sum(cfg.num_crops) or sum(cfg.num_crops) < 2:
        fail("need at least two crops, and no more assigned crops than crops")
    if cfg.crop_depths and len(cfg.crop_depths) != len(cfg.crop_sizes):
        fail("crop_depths (3-D) needs one depth per crop group")
    if cfg.crop_depths and not cfg.synthetic:
        fail("3-D volumes run only with --synthetic for now (no volume loader yet)")
    if cfg.precision not in ("bf16", "fp16", "fp32"):
        fail(f"precision {cfg.precision!r}: choose bf16, fp16 or fp32")
    if cfg.sup_loss not in ("bce", "ce"):
        fail(f"sup_loss {cfg.sup_loss!r}: choose bce or ce")
    if cfg.device not in ("auto", "cpu", "cuda"):
        fail(f"device {cfg.device!r}: choose auto, cpu or cuda")
    if cfg.max_seconds < 0:
        fail(f"max_seconds {cfg.max_seconds}: must be >= 0 (0: no time budget)")
    if not cfg.synthetic and not cfg.data:
        fail("give --data DATASET (a shard dataset folder or .npz files) or --synthetic")


def to_dict(cfg: Config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
