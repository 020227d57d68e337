"""Training configuration: one typed tree holding every default (METHOD.md section 5, 2-D column).

`Config` holds the training fields; its `augment` field is the augmentation's own typed config
(`augment_dali.config.AugmentConfig`, the one place for its defaults), with `augment.normalize` inside.
Crop sizes and counts live only there (`cfg.crop_sizes` etc. are read-only views of it).

Precedence: dataclass defaults < TOML file (``--config FILE``) < command-line flags.
Every field is a flag: ``batch_size`` is ``--batch-size``; an augmentation field is ``--augment.<name>``
(``--augment.gamma-range 1.8,2.6``, ``--augment.normalize.hu-window -1000,2000``) and a TOML key of the
``[augment]`` / ``[augment.normalize]`` tables; tuples take comma-separated values; the per-modality
normalisation method takes ``ct=hu_window,mr=robust_percentile`` (modalities not named keep theirs);
booleans take ``--synthetic`` / ``--no-synthetic``. Shorthands kept from the flat layout:
``crop_sizes``, ``num_crops``, ``crop_depths`` (``--crop-sizes`` ...) and ``rescale_size_range``
(= ``augment.size_range``), as top-level TOML keys or flags.

A bad key, value or combination raises `ConfigError` (a ValueError) with a one-line message; the
entry points (``python -m train``) print it and exit with status 2.
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

# Plain dataclasses: importing them loads neither DALI nor the operator plugin (augment_dali's __init__).
from augment_dali.config import AugmentConfig, NormalizeConfig

MIN_EPSILON = 0.003   # Sinkhorn: exp(-2 / epsilon) is then still a normal float64 (smallest: exp(-708))


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

    # swapped prediction (crop sizes and counts live in the [augment] section: Config.augment)
    min_scale_crops: tuple[float, ...] = (0.14, 0.05)   # NPZ source: smallest area fraction of each group's crops
    max_scale_crops: tuple[float, ...] = (1.0, 0.14)    # NPZ source: largest area fraction of each group's crops
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

    # augmentation (TOML [augment] table, flags --augment.<name>)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    # read-only views: the crops are defined once, in the augmentation config
    @property
    def crop_sizes(self) -> tuple[int, ...]:
        return self.augment.crop_sizes

    @property
    def num_crops(self) -> tuple[int, ...]:
        return self.augment.num_crops

    @property
    def crop_depths(self) -> tuple[int, ...]:
        return self.augment.crop_depths


class ConfigError(ValueError):
    """A configuration the trainer cannot run: unknown key, wrong type, inconsistent values."""


# Top-level keys / flags of the former flat layout -> their place in the tree.
SHORTHANDS = {"crop_sizes": "augment.crop_sizes", "num_crops": "augment.num_crops",
              "crop_depths": "augment.crop_depths", "rescale_size_range": "augment.size_range"}


def _leaves(cls, prefix: str = "") -> dict[str, type]:
    """Every settable field of the tree: dotted path -> type (nested dataclasses are walked into)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = tp
    return out


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {args[0].__name__}"
        return f"list of {len(args)} {args[0].__name__}"
    if origin is dict:
        return "table of modality = method"
    return tp.__name__


def _scalar(tp, value, where: str):
    """`value` (from TOML, or a flag's text) as `tp`; ConfigError naming `where` otherwise."""
    if isinstance(value, str) and tp is not str:
        text = value.strip()
        if tp is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
        else:
            try:
                return tp(text)
            except ValueError:
                pass
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce(where: str, value, tp, from_flag: bool = False):
    """A TOML value or a flag's text as the field type `tp`, checked (lists: element type and count);
    only a flag's text is split at commas (a TOML string where a list belongs is an error)."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and from_flag:
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        if fixed and len(value) != len(args):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {len(value)} values {list(value)!r}")
        inner = args[0]
        return tuple(_scalar(inner, v, where) for v in value)
    if origin is dict:
        if isinstance(value, str) and from_flag:
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"{where}: expected MODALITY=METHOD,..., got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return dict(value)
    return _scalar(tp, value, where)


def _flatten_toml(table: dict, source: str, prefix: str = "") -> dict[str, object]:
    """A TOML document -> {dotted path: value}; sub-tables only where the tree has a section."""
    leaves = _leaves(Config)
    sections = {p.rsplit(".", 1)[0] for p in leaves if "." in p}
    out = {}
    for key, value in table.items():
        path = prefix + key
        if path in SHORTHANDS and not prefix:
            path = SHORTHANDS[path]
        if path in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{path}] must be a table, got {value!r}")
            out.update(_flatten_toml(value, source, path + "."))
        elif path in leaves:
            out[path] = value
        else:
            raise ConfigError(f"{source}: unknown config key {path!r}")
    return out


def _field_help() -> dict[str, str]:
    """The comment beside each field of the dataclasses: one source for code and --help."""
    import inspect
    import re

    def comments(cls) -> dict[str, str]:
        found = {}
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+):[^#]*#\s*(.*)$", line)
            if m:
                found[m.group(1)] = m.group(2)
        return found

    notes = {k: v for k, v in comments(Config).items()}
    notes.update({f"augment.{k}": v for k, v in comments(AugmentConfig).items()})
    notes.update({f"augment.normalize.{k}": v for k, v in comments(NormalizeConfig).items()})
    return notes


def _default(path: str):
    obj = Config()
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="SwAV pretraining with per-modality prototypes (launch with torchrun for several processes).",
        epilog="Precedence: defaults < --config FILE < flags. Lists are comma-separated. Augmentation fields "
               "are --augment.NAME flags and keys of the TOML [augment] / [augment.normalize] tables. "
               "exit status: 0 done, 2 bad configuration, 1 other errors.")
    parser.add_argument("--config", metavar="FILE", help="TOML file with Config fields (flags override it)")
    notes = _field_help()
    for path, tp in _leaves(Config).items():
        if path == "config":
            continue
        default = _default(path)
        if tp is bool:
            parser.add_argument(_flag(path), dest=path, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{notes.get(path, '')} (default: {default})")
            continue
        if isinstance(default, tuple):
            shown = ",".join(map(str, default)) or "empty"
        elif isinstance(default, dict):
            shown = ",".join(f"{k}={v}" for k, v in default.items())
        else:
            shown = default
        metavar = {tuple: "A,B", dict: "M=METHOD,..."}.get(typing.get_origin(tp), getattr(tp, "__name__", "X").upper())
        parser.add_argument(_flag(path), dest=path, type=str, default=argparse.SUPPRESS, metavar=metavar,
                            help=f"{notes.get(path, '')} (default: {shown})")
    for short, path in SHORTHANDS.items():
        parser.add_argument(_flag(short), dest=path, type=str, default=argparse.SUPPRESS, metavar="A,B",
                            help=f"shorthand for {_flag(path)} (default: {','.join(map(str, _default(path))) or 'empty'})")
    return parser


def _build(values: dict[str, object]) -> Config:
    """Config from {dotted path: typed value}; the dict-valued normalisation method merges into the default."""
    norm_default = NormalizeConfig()
    norm = {k.split(".")[-1]: v for k, v in values.items() if k.startswith("augment.normalize.")}
    if "method" in norm:
        norm["method"] = {**norm_default.method, **norm["method"]}
    aug = {k.split(".", 1)[1]: v for k, v in values.items()
           if k.startswith("augment.") and not k.startswith("augment.normalize.")}
    top = {k: v for k, v in values.items() if "." not in k}
    try:
        return Config(**top, augment=AugmentConfig(**aug, normalize=NormalizeConfig(**norm)))
    except ValueError as e:
        raise ConfigError(f"augment: {e}") from None


def load_config(argv: list[str] | None = None) -> Config:
    """Config from defaults, --config FILE and flags; raises ConfigError (argparse itself exits on
    unknown flags, with status 2 as well)."""
    args = vars(build_parser().parse_args(argv))
    types = _leaves(Config)
    values: dict = {}
    if args.get("config"):
        try:
            with open(args["config"], "rb") as f:
                table = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"--config {args['config']}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{args['config']}: not valid TOML ({e})") from None
        for path, value in _flatten_toml(table, args["config"]).items():
            values[path] = _coerce(f"{args['config']}: {path}", value, types[path])
        values["config"] = args["config"]
    for path, text in args.items():
        if path == "config" or text is None:
            continue
        values[path] = text if isinstance(text, bool) else _coerce(f"{_flag(path)} {text!r}", text, types[path],
                                                                       from_flag=True)
    cfg = _build(values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def fail(msg: str):
        raise ConfigError(msg)
    if list(cfg.crops_for_assign) != list(range(len(cfg.crops_for_assign))):
        fail("the assigned crops must be the first views (default 0,1)")
    if len(cfg.crops_for_assign) > sum(cfg.num_crops) or sum(cfg.num_crops) < 2:
        fail("need at least two crops, and no more assigned crops than crops")
    if cfg.crop_depths and cfg.data and all(p.endswith(".npz") for p in cfg.data.split(",") if p):
        fail("3-D crops (crop_depths) need a volume dataset folder, not .npz images")
    if cfg.precision not in ("bf16", "fp16", "fp32"):
        fail(f"precision {cfg.precision!r}: choose bf16, fp16 or fp32")
    if cfg.sup_loss not in ("bce", "ce"):
        fail(f"sup_loss {cfg.sup_loss!r}: choose bce or ce")
    if cfg.device not in ("auto", "cpu", "cuda"):
        fail(f"device {cfg.device!r}: choose auto, cpu or cuda")
    if cfg.max_seconds < 0:
        fail(f"max_seconds {cfg.max_seconds}: must be >= 0 (0: no time budget)")
    if cfg.epsilon < MIN_EPSILON:
        fail(f"epsilon {cfg.epsilon}: must be >= {MIN_EPSILON} (exp(-2 / epsilon) underflows below; METHOD uses 0.03-0.05)")
    if not cfg.synthetic and not cfg.data:
        fail("give --data DATASET (a shard dataset folder or .npz files) or --synthetic")


def to_dict(cfg: Config) -> dict:
    """The whole tree as plain data (tuples as lists; `augment` a nested dict), e.g. for checkpoints."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v
    return plain(dataclasses.asdict(cfg))
