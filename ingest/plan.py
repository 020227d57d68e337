"""Phase 2, plan: from the inventory to a list of shards, each one future Dask task.

Rules, in order:
1. Rejections before any decoding (one row each in errors/, stage "plan"): no SOPInstanceUID,
   non-image objects (SEG, RTSTRUCT, SR, PR, RTDOSE, RTPLAN, KO, DOC, ...), modality codes without a
   partition, no pixel data, float pixel data, odd geometry, pixel data shorter than the geometry
   says (native syntaxes), declared decoded size above `max_pixel_bytes`, a file larger than
   `max_pixel_bytes` (convert may hold a whole file in memory, e.g. excess pixel data).
2. Deduplication by SOPInstanceUID + frame: files with the same SOP instance are ranked lossless
   first, then by smallest source path; each frame comes from the first ranked file that has it, and
   up to MAX_FALLBACKS worse copies holding that frame are carried as its fallbacks (convert tries
   them in order when the planned copy fails). Files that contribute no frame are recorded as
   duplicates. Frames already planned by an earlier generation are skipped silently ("already
   ingested").
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
MAX_FALLBACKS = 4  # copies carried per slice to stand in for a copy that fails to decode

SPEC_SCHEMA = pa.schema([
    ("path", pa.string()), ("frame", pa.int32()), ("frames", pa.int32()),
    ("sop_hash", pa.string()), ("series_hash", pa.string()), ("study_hash", pa.string()),
    ("patient_hash", pa.string()), ("source_hash", pa.string()), ("split", pa.string()),
    ("labels", pa.list_(pa.float32())), ("native_layout", pa.string()),
    # paths of other copies of the same SOP instance that hold this frame, best first (tried in order
    # when `path` fails); empty for the vast majority of slices, whose SOP instance has one copy
    ("fallbacks", pa.list_(pa.string())),
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
    """A pending shard's slice list (it names source paths): beside the dataset (ingest.paths.work_dir),
    so that even a crash leaves no clear path inside; a plan pending since an older version keeps its own."""
    from .paths import work_dir

    legacy = Path(root) / WORK_DIR / f"g{generation:03d}" / "shards" / f"{name}.parquet"
    return legacy if legacy.exists() else work_dir(root, generation) / "shards" / f"{name}.parquet"


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
    if r["size"] > max_bytes:  # convert's pydicom path holds the whole file: it counts against the same budget
        return ("file above limit", f"the file is {_mb(r['size'])} > max_pixel_bytes {_mb(max_bytes)} "
                                    f"(it declares {_mb(r['declared_bytes'])} of pixels)")
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


def _fallback_column(slice_row: np.ndarray, frame_no: np.ndarray,
                     alternates: dict[int, list[tuple[str, int]]]) -> pa.Array:
    """Per slice, the paths of the worse copies of its SOP instance that have its frame (best first)."""
    counts = np.zeros(len(slice_row), dtype=np.int32)
    values: list[str] = []
    if alternates:
        with_alternates = np.nonzero(np.isin(slice_row, np.fromiter(alternates, dtype=np.int64)))[0]
        for s, row, frame in zip(with_alternates.tolist(), slice_row[with_alternates].tolist(),
                                 frame_no[with_alternates].tolist()):
            paths = [path for path, frames in alternates[row] if frames > frame][:MAX_FALLBACKS]
            counts[s] = len(paths)
            values.extend(paths)
    offsets = np.zeros(len(slice_row) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.string()))


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table.column(name).to_numpy()


def _split_threshold(val_fraction: float) -> str | None:
    """`split_of` as a string comparison: hash[:15] < threshold  <=>  int(hash[:15], 16) / 2**60 < f."""
    if val_fraction <= 0:
        return None
    return format(math.ceil(val_fraction * SPLIT_SCALE), "015x")


def make_plan(inventory: pa.Table, *, generation: int, modality_map: dict[str, str], max_pixel_bytes: int,
              max_side: int | None, shard_size: int, frames_per_unit: int, val_fraction: float, seed: int,
              previous: "pa.Table | set[tuple[str, int]]", labels: "LabelTable | None" = None,
              shown=lambda r: r["source"]) -> tuple[Plan, dict[str, pa.Table]]:
    """Pure planning: the plan summary and, per shard, its slices (SPEC_SCHEMA) in write order.

    Columnar (pyarrow + numpy) so that it scales to ~10**8 inventory rows on one head node; only
    rejected rows and the per-unit shard cut go through Python.
    """
    import pyarrow.compute as pc

    mmap = {**MODALITY_MAP, **{k.upper(): v for k, v in modality_map.items()}}
    plan = Plan(generation)
    inventory = inventory.combine_chunks()
    # 1. rejections: a vectorised superset of suspects, each then judged exactly by _reject_reason
    codes = pc.dictionary_encode(inventory.column("modality_code")).combine_chunks()
    part_of_code = np.array([PARTITIONS.index(mmap[c]) if mmap.get(c) in PARTITIONS else -1
                             for c in codes.dictionary.to_pylist()] or [-1], dtype=np.int64)
    partition = part_of_code[codes.indices.to_numpy(zero_copy_only=False)] if len(inventory) else np.zeros(0, np.int64)
    rows_, cols_, frames_ = _np(inventory, "rows"), _np(inventory, "cols"), _np(inventory, "frames")
    plen, declared = _np(inventory, "pixel_length"), _np(inventory, "declared_bytes")
    native = pc.is_in(inventory.column("transfer_syntax"), value_set=pa.array(sorted(NATIVE_SYNTAXES))).to_numpy(
        zero_copy_only=False)
    suspect = (
        (pc.equal(inventory.column("sop_hash"), "").to_numpy(zero_copy_only=False)) | (partition < 0)
        | ~inventory.column("has_pixels").to_numpy(zero_copy_only=False)
        | inventory.column("float_pixels").to_numpy(zero_copy_only=False)
        | (rows_ <= 0) | (cols_ <= 0) | ~np.isin(_np(inventory, "samples_per_pixel"), (1, 3))
        | ~np.isin(_np(inventory, "bits_allocated"), (1, 8, 16, 32)) | (declared > max_pixel_bytes)
        | (_np(inventory, "size") > max_pixel_bytes)
        | (native & (plen >= 0) & ((plen < declared) | (_np(inventory, "pixel_end") > _np(inventory, "size"))))
    )
    accepted = ~suspect
    suspects = np.nonzero(suspect)[0]
    for i, r in zip(suspects, inventory.take(suspects).to_pylist()):
        why = _reject_reason(r, mmap, max_pixel_bytes)
        if why:
            plan.errors.append(error_row(shown(r), "plan", *why))
        else:
            accepted[i] = True
    # 2. dedupe by SOP instance + frame: files ranked lossless first, then path; each frame comes from
    # the first ranked file that has it, and the later files that have it are its fallbacks
    acc = np.nonzero(accepted)[0]
    keys = inventory.select(["sop_hash", "lossy", "path"]).take(acc)
    order = pc.sort_indices(keys, sort_keys=[("sop_hash", "ascending"), ("lossy", "ascending"),
                                             ("path", "ascending")]).to_numpy()
    ranked = acc[order]
    sop_sorted = inventory.column("sop_hash").take(ranked)
    dup = np.zeros(len(ranked), dtype=bool)
    if len(ranked) > 1:
        dup[1:] = pc.equal(sop_sorted.slice(1), sop_sorted.slice(0, len(ranked) - 1)).to_numpy(zero_copy_only=False)
    ranked_frames = frames_[ranked].astype(np.int64)
    first_frame = np.zeros(len(ranked), dtype=np.int64)  # frames below this are taken from better copies
    alternates: dict[int, list[tuple[str, int]]] = {}   # row -> the worse copies of its SOP (path, frames)
    if dup.any():
        # the most frames of any better copy of the same SOP: a running max that restarts per SOP (each
        # SOP's values are offset above every earlier SOP's, so the global running max stays inside it)
        sop_index = np.cumsum(~dup) - 1
        running = np.maximum.accumulate(sop_index * (1 << 32) + ranked_frames) - sop_index * (1 << 32)
        first_frame[1:] = np.where(dup[1:], running[:-1], 0)
        run_start = np.maximum.accumulate(np.where(dup, 0, np.arange(len(ranked))))
        redundant = dup & (ranked_frames <= first_frame)
        dup_rows = inventory.take(ranked[redundant]).to_pylist()
        kept_rows = inventory.take(ranked[run_start[redundant]]).to_pylist()
        for r, k in zip(dup_rows, kept_rows):
            plan.errors.append(error_row(shown(r), "plan", "duplicate SOPInstanceUID",
                                         f"same SOP instance as {shown(k)}, which is kept (this copy is "
                                         f"its fallback should it fail to decode)"))
        in_group = dup.copy()
        in_group[:-1] |= dup[1:]
        members = np.nonzero(in_group)[0]
        paths = inventory.column("path").take(ranked[members]).to_pylist()
        for pos, (i, path) in enumerate(zip(members.tolist(), paths)):
            if dup[i]:
                start = pos - (i - run_start[i])
                for j in range(start, pos):
                    better = alternates.setdefault(int(ranked[members[j]]), [])
                    if len(better) < 2 * MAX_FALLBACKS:
                        better.append((path, int(ranked_frames[i])))
    keep_ranked = ranked_frames > first_frame
    kept, kept_first = ranked[keep_ranked], first_frame[keep_ranked]
    # 3. one slice per (file, frame) it wins, minus frames planned by earlier generations
    nf = frames_[kept].astype(np.int64) - kept_first
    slice_row = np.repeat(kept, nf)
    frame_no = (np.arange(len(slice_row), dtype=np.int64) - np.repeat(np.cumsum(nf) - nf, nf)
                + np.repeat(kept_first, nf))
    if isinstance(previous, set):
        previous = pa.table({"sop_hash": pa.array([p[0] for p in previous], pa.string()),
                             "frame": pa.array([p[1] for p in previous], pa.int64())})
    if previous.num_rows and len(slice_row):
        probe = pa.table({"sop_hash": inventory.column("sop_hash").take(slice_row), "frame": frame_no,
                          "_i": np.arange(len(slice_row))})
        prev = previous.select(["sop_hash", "frame"]).cast(pa.schema([("sop_hash", pa.string()), ("frame", pa.int64())]))
        left = probe.join(prev, keys=["sop_hash", "frame"], join_type="left anti")
        keep = np.sort(left.column("_i").to_numpy())
        plan.already_ingested = len(slice_row) - len(keep)
        slice_row, frame_no = slice_row[keep], frame_no[keep]
    fallbacks = _fallback_column(slice_row, frame_no, alternates)
    # 4. per-row attributes: partition, split, estimated bytes, labels
    group = inventory.column("patient_hash")
    for fallback in ("study_hash", "series_hash", "sop_hash"):
        group = pc.if_else(pc.equal(group, ""), inventory.column(fallback), group)
    threshold = _split_threshold(val_fraction)
    is_val = np.zeros(len(inventory), dtype=bool)
    if threshold is not None and len(inventory):
        is_val = (pc.not_equal(group, "").to_numpy(zero_copy_only=False)
                  & pc.less(pc.utf8_slice_codeunits(group, 0, 15), threshold).to_numpy(zero_copy_only=False))
    out_r, out_c = rows_.astype(np.int64), cols_.astype(np.int64)
    if max_side:
        k = np.maximum(1, -(-np.maximum(out_r, out_c) // max_side))
        out_r, out_c = out_r // k, out_c // k
    itemsize = np.where(pc.equal(inventory.column("photometric"), "PALETTE COLOR").to_numpy(zero_copy_only=False),
                        2, np.maximum(1, _np(inventory, "bits_allocated") // 8))
    est_row = out_r * out_c * itemsize + SAMPLE_OVERHEAD
    label_col = pa.nulls(len(inventory), pa.list_(pa.float32()))
    if labels is not None and len(kept):
        looked = [None] * len(inventory)
        for i, r in zip(kept, inventory.select(["sop_hash", "series_hash", "study_hash"]).take(kept).to_pylist()):
            looked[i] = labels.lookup(r)
        label_col = pa.array(looked, pa.list_(pa.float32()))
    # 5. planning units: runs of frames_per_unit remaining frames of one file
    n = len(slice_row)
    new_row = np.ones(n, dtype=bool)
    new_row[1:] = slice_row[1:] != slice_row[:-1]
    row_first = np.maximum.accumulate(np.where(new_row, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    unit_in_row = (np.arange(n) - row_first) // frames_per_unit
    unit_start = new_row.copy()
    unit_start[1:] |= unit_in_row[1:] != unit_in_row[:-1]
    starts = np.nonzero(unit_start)[0]
    lengths = np.diff(np.append(starts, n))
    u_row = slice_row[starts]
    u_bytes = est_row[u_row] * lengths
    u_key = partition[u_row] * 2 + is_val[u_row]
    slices = pa.table({
        "path": inventory.column("path").take(slice_row), "frame": pa.array(frame_no, pa.int32()),
        "frames": pa.array(frames_[slice_row], pa.int32()),
        **{c: inventory.column(c).take(slice_row) for c in
           ("sop_hash", "series_hash", "study_hash", "patient_hash", "source_hash")},
        "split": pa.array(np.where(is_val[slice_row], "val", "train"), pa.string()),
        "labels": label_col.take(slice_row),
        # inventories written before the fast path have no layouts: every slice takes the pydicom path
        "native_layout": (inventory.column("native_layout") if "native_layout" in inventory.column_names
                          else pa.nulls(len(inventory), pa.string())).take(slice_row),
        "fallbacks": fallbacks,
    }, schema=SPEC_SCHEMA)
    u_sop = inventory.column("sop_hash").take(u_row)
    specs: dict[str, pa.Table] = {}
    # 6. per (modality, split): sort units by hash, seeded permutation, greedy cut by estimated bytes
    for mi, modality in enumerate(PARTITIONS):
        index = 0
        for si, split in enumerate(("train", "val")):
            units = np.nonzero(u_key == mi * 2 + si)[0]
            if not len(units):
                continue
            by_hash = pc.sort_indices(pa.table({"s": u_sop.take(units), "f": frame_no[starts[units]]}),
                                      sort_keys=[("s", "ascending"), ("f", "ascending")]).to_numpy()
            units = units[by_hash]
            units = units[np.random.default_rng([seed, generation, mi, si]).permutation(len(units))]
            chunks: list[list[int]] = []
            current: list[int] = []
            size = 0
            for u, b in zip(units.tolist(), u_bytes[units].tolist()):
                if current and size + b > shard_size:
                    chunks.append(current)
                    current, size = [], 0
                current.append(u)
                size += b
            if current:
                chunks.append(current)
            for chunk in chunks:
                name = shard_name(modality, generation, index)
                positions = np.concatenate([np.arange(starts[u], starts[u] + lengths[u]) for u in chunk])
                inner = np.random.default_rng([seed, generation, mi, si, index]).permutation(len(positions))
                specs[name] = slices.take(positions[inner])
                plan.shards[name] = {"modality": modality, "split": split, "slices": len(positions),
                                     "est_bytes": int(u_bytes[chunk].sum())}
                plan.slices += len(positions)
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

def write_plan(root: Path, plan: Plan, specs: dict[str, pa.Table], meta: dict) -> None:
    """Per-shard slice lists beside the dataset (with paths), compact record + meta under plan/ (no paths)."""
    from shards.manifest import write_parquet_atomically

    records = []
    for name, table in specs.items():
        write_parquet_atomically(table, spec_path(root, plan.generation, name))
        info = plan.shards[name]
        records.append(pa.table({
            "shard": pa.array([name] * len(table), pa.string()),
            "modality": pa.array([info["modality"]] * len(table), pa.string()),
            "split": table.column("split"), "sop_hash": table.column("sop_hash"), "frame": table.column("frame"),
            "source_hash": table.column("source_hash")}, schema=RECORD_SCHEMA))
    record = pa.concat_tables(records) if records else RECORD_SCHEMA.empty_table()
    write_parquet_atomically(record, plan_record_path(root, plan.generation))
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


def previous_frames(root: Path) -> pa.Table:
    """(sop_hash, frame) of every slice planned by an existing generation."""
    parts = [pq.read_table(plan_record_path(root, g), columns=["sop_hash", "frame"]) for g in generations(root)]
    schema = pa.schema([("sop_hash", pa.string()), ("frame", pa.int64())])
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts).cast(schema)
