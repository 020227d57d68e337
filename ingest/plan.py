"""Phase 2, plan: from the inventory to a list of shards, each one future Dask task.

Rules, in order:
1. Rejections before any decoding (one row each in errors/, stage "plan"): no SOPInstanceUID,
   non-image objects (SEG, RTSTRUCT, SR, PR, RTDOSE, RTPLAN, KO, DOC, ...), modality codes without a
   partition, no pixel data, float pixel data, odd geometry, pixel data shorter than the geometry
   says (native syntaxes), declared decoded size above `max_pixel_bytes`.
2. Deduplication by SOPInstanceUID (+ frame): among files with the same SOP instance the lossless
   one wins, then the smallest source path; the others are recorded as duplicates. Frames already
   planned by an earlier generation are skipped silently ("already ingested").
3. Partition by modality code (MODALITY_MAP, extendable with `modality_map` in the config).
4. Patient-level split: a patient is in "val" when its salted patient hash, read as a fraction of
   2**60, is below `val_fraction` (no patient ID: study, then series, then SOP hash stand in).
5. Shuffle across patients and series within each (modality, split): planning units (a single-frame
   file, or a run of up to `frames_per_unit` frames of a multi-frame file) are sorted by hash and then
   permuted with a seeded generator; the order inside each shard is permuted again.
6. Cut into shards of about `shard_size` estimated bytes; each shard holds one split only and is
   named `<modality>-g<generation>-<index>` (index counts train shards first, then val shards).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .scan import WORK_DIR, error_row

PARTITIONS = ("ct", "mr", "xr", "us")
# Projection radiography of any kind goes to "xr": computed/digital radiography, radiofluoroscopy,
# angiography (XA), digital fluoroscopy, mammography (MG), intra-oral and panoramic dental X-ray.
MODALITY_MAP = {
    "CT": "ct",
    "MR": "mr",
    "CR": "xr", "DX": "xr", "DR": "xr", "RG": "xr", "RF": "xr", "XA": "xr", "DF": "xr", "MG": "xr",
    "IO": "xr", "PX": "xr",
    "US": "us", "IVUS": "us",
}
NON_IMAGE = {
    "SEG": "segmentation", "RTSTRUCT": "RT structure set", "SR": "structured report",
    "PR": "presentation state", "RTDOSE": "RT dose grid", "RTPLAN": "RT plan", "RTRECORD": "RT record",
    "KO": "key object selection", "DOC": "document", "ECG": "waveform", "HD": "waveform", "AU": "audio",
    "REG": "registration", "FID": "fiducials", "RWV": "real world value map", "PLAN": "plan",
    "SMR": "stereometric relationship", "M3D": "3-D model",
}
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", ""}
SAMPLE_OVERHEAD = 2048  # tar headers + JSON per sample, for the shard size estimate
SPLIT_SCALE = float(1 << 60)

SPEC_SCHEMA = pa.schema([
    ("path", pa.string()), ("frame", pa.int32()), ("frames", pa.int32()),
    ("sop_hash", pa.string()), ("series_hash", pa.string()), ("study_hash", pa.string()),
    ("patient_hash", pa.string()), ("source_hash", pa.string()), ("split", pa.string()),
    ("labels", pa.list_(pa.float32())),
])
RECORD_SCHEMA = pa.schema([
    ("shard", pa.string()), ("modality", pa.string()), ("split", pa.string()),
    ("sop_hash", pa.string()), ("frame", pa.int32()), ("source_hash", pa.string()),
])
PLAN_DIR = "plan"


def shard_name(modality: str, generation: int, index: int) -> str:
    return f"{modality}-g{generation:03d}-{index:06d}"


def plan_meta_path(root: Path, generation: int) -> Path:
    return Path(root) / PLAN_DIR / f"g{generation:03d}.json"


def plan_record_path(root: Path, generation: int) -> Path:
    return Path(root) / PLAN_DIR / f"g{generation:03d}.parquet"


def spec_path(root: Path, generation: int, name: str) -> Path:
    return Path(root) / WORK_DIR / f"g{generation:03d}" / "shards" / f"{name}.parquet"


@dataclass
class Plan:
    generation: int
    shards: dict[str, dict] = field(default_factory=dict)   # name -> {modality, split, slices, est_bytes}
    errors: list[dict] = field(default_factory=list)
    already_ingested: int = 0
    slices: int = 0


def split_of(group_hash: str, val_fraction: float) -> str:
    if not group_hash or val_fraction <= 0:
        return "train"
    return "val" if int(group_hash[:15], 16) / SPLIT_SCALE < val_fraction else "train"


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _reject_reason(r: dict, modality_map: dict[str, str], max_bytes: int) -> tuple[str, str] | None:
    code = r["modality_code"]
    if not r["sop_hash"]:
        return "missing SOPInstanceUID", "the file has no SOPInstanceUID to key its samples"
    if code in NON_IMAGE and code not in modality_map:
        return "non-image object", f"Modality {code} ({NON_IMAGE[code]}) holds no image to pretrain on"
    partition = modality_map.get(code)
    if partition is None or partition == "reject":
        shown = code or "(empty)"
        return "no partition for modality", f"Modality {shown} is not mapped to {'/'.join(PARTITIONS)} (see modality_map)"
    if not r["has_pixels"]:
        return "no pixel data", "no Pixel Data element after the header"
    if r["float_pixels"]:
        return "float pixel data", "Float/Double Float Pixel Data is not supported (integer pixels only)"
    if r["rows"] <= 0 or r["cols"] <= 0:
        return "bad geometry", f"Rows x Columns = {r['rows']} x {r['cols']}"
    if r["samples_per_pixel"] not in (1, 3):
        return "bad geometry", f"SamplesPerPixel = {r['samples_per_pixel']}"
    if r["bits_allocated"] not in (1, 8, 16, 32):
        return "bad geometry", f"BitsAllocated = {r['bits_allocated']}"
    if r["declared_bytes"] > max_bytes:
        return ("declared size above limit",
                f"{r['rows']}x{r['cols']}x{r['frames']} frames x {r['samples_per_pixel']} samples x "
                f"{r['bits_allocated']} bits = {_mb(r['declared_bytes'])} > max_pixel_bytes {_mb(max_bytes)}")
    if r["transfer_syntax"] in NATIVE_SYNTAXES and r["pixel_length"] >= 0:
        expected = r["declared_bytes"]
        if r["photometric"] == "YBR_FULL_422":
            expected = expected * 2 // 3
        if r["bits_allocated"] == 1:
            expected = math.ceil(r["rows"] * r["cols"] * r["frames"] * r["samples_per_pixel"] / 8)
        if r["pixel_length"] < expected:
            return "truncated pixel data", f"Pixel Data holds {r['pixel_length']} bytes, the geometry needs {expected}"
        if r["pixel_end"] > r["size"]:
            return "truncated pixel data", f"file ends at byte {r['size']}, Pixel Data should end at {r['pixel_end']}"
    return None


def _est_bytes(r: dict, max_side: int | None) -> int:
    rows, cols = r["rows"], r["cols"]
    if max_side and max(rows, cols) > max_side:
        k = math.ceil(max(rows, cols) / max_side)
        rows, cols = rows // k, cols // k
    itemsize = 2 if r["photometric"] == "PALETTE COLOR" else max(1, r["bits_allocated"] // 8)
    return rows * cols * itemsize + SAMPLE_OVERHEAD


def make_plan(inventory: pa.Table, *, generation: int, modality_map: dict[str, str], max_pixel_bytes: int,
              max_side: int | None, shard_size: int, frames_per_unit: int, val_fraction: float, seed: int,
              previous: set[tuple[str, int]], labels: "LabelTable | None" = None,
              shown=lambda r: r["source"]) -> tuple[Plan, dict[str, list[dict]]]:
    """Pure planning: returns the plan summary and the per-shard slice lists (in write order)."""
    mmap = {**MODALITY_MAP, **{k.upper(): v for k, v in modality_map.items()}}
    plan = Plan(generation)
    rows = inventory.to_pylist()
    # 1. rejections
    ok = []
    for r in rows:
        why = _reject_reason(r, mmap, max_pixel_bytes)
        if why:
            plan.errors.append(error_row(shown(r), "plan", *why))
        else:
            ok.append(r)
    # 2. dedupe: lossless first, then path
    ok.sort(key=lambda r: (r["sop_hash"], bool(r["lossy"]), r["path"]))
    kept: list[dict] = []
    for r in ok:
        if kept and kept[-1]["sop_hash"] == r["sop_hash"]:
            plan.errors.append(error_row(shown(r), "plan", "duplicate SOPInstanceUID",
                                         f"same SOP instance as {shown(kept[-1])}, which is kept"))
            continue
        kept.append(r)
    # 3-5. units per (modality, split)
    groups: dict[tuple[str, str], list[list[dict]]] = defaultdict(list)
    for r in kept:
        frames = [f for f in range(r["frames"]) if (r["sop_hash"], f) not in previous]
        plan.already_ingested += r["frames"] - len(frames)
        if not frames:
            continue
        modality = mmap[r["modality_code"]]
        group = r["patient_hash"] or r["study_hash"] or r["series_hash"] or r["sop_hash"]
        split = split_of(group, val_fraction)
        label_vec = labels.lookup(r) if labels else None
        est = _est_bytes(r, max_side)
        base = {
            "path": r["path"], "frames": r["frames"], "sop_hash": r["sop_hash"], "series_hash": r["series_hash"],
            "study_hash": r["study_hash"], "patient_hash": r["patient_hash"], "source_hash": r["source_hash"],
            "split": split, "labels": label_vec, "_est": est,
        }
        for i in range(0, len(frames), frames_per_unit):
            groups[(modality, split)].append([{**base, "frame": f} for f in frames[i:i + frames_per_unit]])
    specs: dict[str, list[dict]] = {}
    for mi, modality in enumerate(PARTITIONS):
        index = 0
        for si, split in enumerate(("train", "val")):
            units = groups.get((modality, split), [])
            if not units:
                continue
            units.sort(key=lambda u: (u[0]["sop_hash"], u[0]["frame"]))
            rng = np.random.default_rng([seed, generation, mi, si])
            order = rng.permutation(len(units))
            current: list[dict] = []
            size = 0
            chunks: list[list[dict]] = []
            for u in (units[i] for i in order):
                if current and size + sum(s["_est"] for s in u) > shard_size:
                    chunks.append(current)
                    current, size = [], 0
                current.extend(u)
                size += sum(s["_est"] for s in u)
            if current:
                chunks.append(current)
            for chunk in chunks:
                name = shard_name(modality, generation, index)
                inner = np.random.default_rng([seed, generation, mi, si, index]).permutation(len(chunk))
                specs[name] = [chunk[i] for i in inner]
                plan.shards[name] = {"modality": modality, "split": split, "slices": len(chunk),
                                     "est_bytes": int(sum(s["_est"] for s in chunk))}
                plan.slices += len(chunk)
                index += 1
    return plan, specs


# ---------------------------------------------------------------- labels

class LabelTable:
    """Numeric labels keyed by SOP, series or study instance UID (stored here as salted hashes)."""

    LEVELS = (("SOPInstanceUID", "sop_hash"), ("SeriesInstanceUID", "series_hash"), ("StudyInstanceUID", "study_hash"))

    def __init__(self, names: list[str], by_level: dict[str, dict[str, list[float]]]):
        self.names = names
        self.by_level = by_level

    @classmethod
    def load(cls, path: str | Path, salt: str) -> "LabelTable":
        from shards import salted_hash

        from .config import ConfigError

        path = Path(path)
        if not path.exists():
            raise ConfigError(f"labels file not found: {path}")
        try:
            if path.suffix.lower() in (".parquet", ".pq"):
                table = pq.read_table(path)
            else:
                import pyarrow.csv as pacsv

                table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                    column_types={k: pa.string() for k, _ in cls.LEVELS}))
        except (pa.ArrowInvalid, OSError) as e:
            raise ConfigError(f"labels file {path} is unreadable: {str(e).splitlines()[0]}") from None
        keys = [(k, col) for k, col in cls.LEVELS if k in table.column_names]
        if len(keys) != 1:
            raise ConfigError(f"labels file {path} needs exactly one key column of "
                              f"{', '.join(k for k, _ in cls.LEVELS)}; found {[k for k, _ in keys] or 'none'}")
        key, level = keys[0]
        names = [c for c in table.column_names if c != key]
        if not names:
            raise ConfigError(f"labels file {path} has no label columns besides {key}")
        for n in names:
            t = table.schema.field(n).type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_null(t)):
                raise ConfigError(f"label column {n!r} in {path} is not numeric ({t})")
        values = {n: table.column(n).cast(pa.float32()).to_pylist() for n in names}
        mapping = {}
        for i, uid in enumerate(table.column(key).to_pylist()):
            if uid:
                mapping[salted_hash(str(uid), salt)] = [math.nan if values[n][i] is None else values[n][i] for n in names]
        return cls(names, {level: mapping})

    def lookup(self, row: dict) -> list[float] | None:
        for _, level in self.LEVELS:
            hit = self.by_level.get(level, {}).get(row[level])
            if hit is not None:
                return hit
        return None


# ---------------------------------------------------------------- persistence

def write_plan(root: Path, plan: Plan, specs: dict[str, list[dict]], meta: dict) -> None:
    """Per-shard slice lists under _work (with paths), compact record + meta under plan/ (no paths)."""
    from shards.manifest import write_parquet_atomically

    records = []
    for name, slices in specs.items():
        write_parquet_atomically(pa.Table.from_pylist(slices, schema=SPEC_SCHEMA), spec_path(root, plan.generation, name))
        info = plan.shards[name]
        records.extend({"shard": name, "modality": info["modality"], "split": info["split"], "sop_hash": s["sop_hash"],
                        "frame": s["frame"], "source_hash": s["source_hash"]} for s in slices)
    write_parquet_atomically(pa.Table.from_pylist(records, schema=RECORD_SCHEMA), plan_record_path(root, plan.generation))
    path = plan_meta_path(root, plan.generation)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({**meta, "generation": plan.generation, "shards": plan.shards, "slices": plan.slices},
                              indent=1, sort_keys=True) + "\n")
    tmp.replace(path)  # the meta file last: a generation exists once its meta exists


def read_plan_meta(root: Path, generation: int) -> dict:
    return json.loads(plan_meta_path(root, generation).read_text())


def generations(root: Path) -> list[int]:
    base = Path(root) / PLAN_DIR
    if not base.is_dir():
        return []
    return sorted(int(p.stem[1:]) for p in base.glob("g*.json"))


def previous_frames(root: Path) -> set[tuple[str, int]]:
    """(sop_hash, frame) of every slice planned by an existing generation."""
    out: set[tuple[str, int]] = set()
    for g in generations(root):
        t = pq.read_table(plan_record_path(root, g), columns=["sop_hash", "frame"])
        out.update(zip(t.column("sop_hash").to_pylist(), t.column("frame").to_pylist()))
    return out
