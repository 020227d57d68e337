"""Ingestion settings: one dataclass, one place for defaults.

Precedence (lowest to highest): dataclass defaults < TOML file (`--config FILE`) < command line.
The TOML file holds the same names as the dataclass fields, either at top level or under `[ingest]`:

    out = "/data/medswav"
    shard_size = "1GB"
    workers = 8
    [ingest.modality_map]     # extra or overriding modality-code -> partition entries
    OT = "xr"
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from shards.sample import MODALITIES, UNITS

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message is one readable line."""


def parse_size(value: int | float | str) -> int:
    """'1GB' -> 10**9, '64MiB' -> 64 * 2**20, 5000 -> 5000."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise ConfigError(f"not a size: {value!r} (examples: 1GB, 64MB, 512MiB, 100000)")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass
class IngestConfig:
    """Everything `python -m ingest` can be told. Sizes accept strings like '1GB' in TOML/CLI."""

    sources: list[str] = field(default_factory=list)   # files, folders or fsspec URLs
    out: str = ""                                      # dataset root folder
    # engine
    workers: int = 2                                   # embedded LocalCluster size (1 thread each)
    scheduler: str | None = None                       # address of an existing cluster instead
    dashboard_address: str = ":8787"                   # embedded cluster's dashboard (":0" = any port)
    # sharding
    shard_size: int = 1_000_000_000                    # target bytes per shard (estimated before decoding)
    max_pixel_bytes: int = 2 * 2**30                   # declared decoded size and file size; larger = rejected
    max_side: int | None = None                        # downsample (integer block mean) above this side
    frames_per_unit: int = 16                          # multi-frame files are planned in runs of this many frames
    files_per_scan_task: int = 2000                    # scan task granularity for folders listed by the client
    direct_io: bool = True                             # write shards with O_DIRECT where the filesystem allows
    # identity and privacy
    salt: str | None = None                            # else env MEDSWAV_SALT, else DATASET.salt file
    keep_paths: bool = False                           # clear source paths inside the dataset (private use)
    # split and order
    seed: int = 0                                      # shuffle seed
    val_fraction: float = 0.05                         # share of patients in the "val" split
    # labels
    labels: str | None = None                          # CSV / Parquet keyed by SOP/Series/Study UID
    # modality handling
    modality: str | None = None                        # non-DICOM sources (arrays, PNG/TIFF, NIfTI): their partition
    units: str | None = None                           # their pixel units (SampleMeta.units); None = "raw"
    modality_map: dict[str, str] = field(default_factory=dict)  # overrides of plan.MODALITY_MAP
    # sample kind
    volumes: bool = False                              # one volume sample per DICOM series or NIfTI file (ingest.volumes)
    # behaviour
    rescan: bool = False                               # rescan sources even when resuming the same job
    progress: bool = True
    lock_timeout: float = 600.0                        # seconds without heartbeat after which a dataset lock is stale

    def validate(self) -> "IngestConfig":
        if not self.sources:
            raise ConfigError("no sources given (pass one or more folders, files or URLs)")
        if not self.out:
            raise ConfigError("no output dataset folder given (--out DATASET)")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size must be positive, got {self.shard_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"max_side must be >= 1, got {self.max_side}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")  # numpy seeds are unsigned
        if not isinstance(self.lock_timeout, (int, float)) or not self.lock_timeout > 0:
            raise ConfigError(f"--lock-timeout must be positive, got {self.lock_timeout}")
        if self.frames_per_unit < 1 or self.files_per_scan_task < 1:
            raise ConfigError("frames_per_unit and files_per_scan_task must be >= 1")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ConfigError(f"--modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.units is not None and (self.modality is None or self.units not in UNITS):
            raise ConfigError(f"--units (raw or HU, got {self.units!r}) applies only with --modality (non-DICOM "
                              "sources); DICOM units come from the header")
        if not isinstance(self.volumes, bool):
            raise ConfigError(f"volumes must be true or false, got {self.volumes!r}")
        bad = {k: v for k, v in self.modality_map.items() if v not in MODALITIES and v != "reject"}
        if bad:
            raise ConfigError(f"modality_map values must be one of {MODALITIES} or 'reject': {bad}")
        return self

    @property
    def kind(self) -> str:
        """The kind of dataset this job writes (shards.KINDS): one dataset holds one kind."""
        return "volumes" if self.volumes else "slices"

    @property
    def root(self) -> Path:
        return Path(self.out)

    @property
    def hash_paths(self) -> bool:
        """Source paths appear inside the dataset only as salted hashes (the default; ingest.paths)."""
        return not self.keep_paths


_SIZE_FIELDS = {"shard_size", "max_pixel_bytes"}


def _coerce(name: str, value: Any) -> Any:
    if name in _SIZE_FIELDS:
        return parse_size(value)
    if name == "sources" and isinstance(value, str):
        return [value]
    return value


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    data = data.get("ingest", data)
    if "hash_paths" in data:  # the setting before hashing became the default: false meant keep_paths
        hashed = data.pop("hash_paths")
        if not isinstance(hashed, bool):
            raise ConfigError(f"hash_paths in {path} must be true or false (it is deprecated: use keep_paths)")
        if "keep_paths" in data and data["keep_paths"] == hashed:
            raise ConfigError(f"{path} sets both hash_paths and keep_paths, and they disagree")
        data.setdefault("keep_paths", not hashed)
        print(f"ingest: note: hash_paths in {path} is deprecated (hashing is the default); use "
              f"keep_paths = {str(not hashed).lower()}", file=sys.stderr)
    names = {f.name for f in dataclasses.fields(IngestConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {path}: {', '.join(unknown)}")
    return data


def build_config(file: str | Path | None = None, **overrides: Any) -> IngestConfig:
    """Defaults < TOML file < overrides (None in overrides means 'not given')."""
    values: dict[str, Any] = {}
    if file:
        values.update(load_toml(file))
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return IngestConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()
    except TypeError as e:  # an unknown keyword, or a value of the wrong type (workers = "two" in TOML)
        raise ConfigError(f"invalid setting: {e}") from None
