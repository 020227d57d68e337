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
   2**60, is below `val_fraction` (no patient ID: study, then series, then SOP hash stand in). A row
   whose inventory carries its own split (`split`, non-DICOM sources such as a MedMNIST .npz with its
   train / val / test arrays, ingest.arrays) keeps that split instead.
5. Shuffle across patients and series within each (modality, split): each planning unit (a
   single-frame file, or a run of up to `frames_per_unit` frames of a multi-frame file) gets a seeded
   sort key computed from its own SOP hash and first frame (`unit_order`).
6. Cut into shards: a (modality, split) of B estimated bytes gets n = ceil(B / shard_size) shards, n
   equal ranges of the sort key (`shard_of`), so a unit's shard depends on nothing but its own key and
   no global sort is needed; the order inside each shard is permuted with a seeded generator. Each
   shard holds one split only and is named `<modality>-g<generation>-<index>` (index counts train
   shards first, then val shards, then test shards; an empty key range leaves its index unused).

Rules 1-5 need only the rows of one SOP-hash bucket (`plan_rows`), rule 6 only one key range of
every bucket's output (`cut_shards`): `plan_generation` runs them as Dask tasks, `make_plan` in one
process, with the same result.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.layout import ERRORS_DIR, PLAN_DIR
from shards.manifest import ERRORS_SCHEMA
from shards.sample import MODALITIES

from .scan import INVENTORY_EXTENSION, INVENTORY_SCHEMA, WORK_DIR, error_row

SPLITS = ("train", "val", "test")  # "test" only where the source says so (inventory `split`)
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
PLANNED_SCHEMA = pa.schema([*SPEC_SCHEMA, ("group", pa.int8()), ("order", pa.int64()), ("est", pa.int64())])
# plan/gNNN/part-*.parquet: one part per shard-writing task, sorted by sop_key (the first 8 hex digits
# of sop_hash) so that a later generation's bucket task reads only its key range; `position` is the
# slice's place in its shard's write order. (Generations planned before the cluster planner have one
# plan/gNNN.parquet in write order, without these two columns; every reader takes both.)
RECORD_PART_SCHEMA = pa.schema([*RECORD_SCHEMA, ("position", pa.int32()), ("sop_key", pa.int64()),
                                # volumes datasets only (null otherwise): which series a later generation
                                # must not add slices to (plan_rows `volumes`)
                                ("series_hash", pa.string())])
# inventory rows (with the non-DICOM extension columns, null for DICOM) + where to read them
BUCKETED_SCHEMA = pa.schema([*INVENTORY_SCHEMA, *INVENTORY_EXTENSION, ("path", pa.string())])
ORDER_SHIFT = 30                   # shard_of works on order >> 30 (< 2**33), so order * n stays in int64
MAX_SHARDS_PER_GROUP = (1 << 30) - 1
BUCKET_ROWS = 100_000              # inventory rows per planning bucket (~0.5 GB of worker memory each)
# The planning work files are written once and read once or twice, then deleted: LZ4 costs a third of
# zstd's CPU to write and read (20 k slices on 2 workers: plan 0.70 -> 0.53 s) for files ~1.8x larger
# (~170 against ~95 bytes per inventory row), which at 1 B rows is ~0.3 TB more transient I/O.
WORK_COMPRESSION = "lz4"
ROW_GROUP_ROWS = 16_384            # row groups / record batches of the planning work files


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
    rejected: int = 0  # plan_generation: rejections written to errors/ by the bucket tasks (not gathered)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # plan_generation: per phase


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
        return "no partition for modality", f"Modality {shown} is not mapped to {'/'.join(MODALITIES)} (see modality_map)"
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


def plan_rows(inventory: pa.Table, *, generation: int, modality_map: dict[str, str], max_pixel_bytes: int,
              max_side: int | None, frames_per_unit: int, val_fraction: float, seed: int,
              previous: "pa.Table | set[tuple[str, int]]", labels: "LabelTable | None" = None,
              shown=lambda r: r["source"], volumes: bool = False) -> tuple[Plan, pa.Table]:
    """Rules 1-5 on a set of inventory rows that holds every copy of its SOP instances (the whole
    inventory, or one bucket of it): (summary with errors and already_ingested, planned slices).

    With `volumes` (a volumes dataset, ingest.volumes) the rows hold whole series, every slice of a
    series is one planning unit (keyed by the series hash, so a series lands in one shard), and the new
    slices of a series of which an earlier generation planned some are rejected ("series already
    ingested"): a series is stored once, whole, by the generation that first saw it.

    The planned slices are SPEC_SCHEMA plus `group` (partition * len(SPLITS) + split index), `order` (the unit's
    seeded sort key, `unit_order`) and `est` (estimated bytes of the slice). Columnar (pyarrow + numpy);
    only rejected rows and duplicates go through Python.
    """
    import pyarrow.compute as pc

    mmap = {**MODALITY_MAP, **{k.upper(): v for k, v in modality_map.items()}}
    plan = Plan(generation)
    inventory = inventory.combine_chunks()
    # 1. rejections: a vectorised superset of suspects, each then judged exactly by _reject_reason
    codes = pc.dictionary_encode(inventory.column("modality_code")).combine_chunks()
    part_of_code = np.array([MODALITIES.index(mmap[c]) if mmap.get(c) in MODALITIES else -1
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
    if volumes and "series_hash" in previous.column_names and len(slice_row):
        # a series of which an earlier generation planned slices gets no more (whatever became of them)
        slice_row, frame_no = _drop_partial_series(inventory, slice_row, frame_no, previous, plan, shown)
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
    if volumes and len(inventory):  # one split per series (val if any of its files is), so it stays one shard's
        series = pc.dictionary_encode(inventory.column("series_hash")).combine_chunks()
        index = series.indices.to_numpy(zero_copy_only=False)
        series_val = np.zeros(len(series.dictionary), dtype=bool)
        np.logical_or.at(series_val, index, is_val)
        is_val = series_val[index]
    split_index = is_val.astype(np.int64)
    if "split" in inventory.column_names and inventory.column("split").null_count < len(inventory):
        own = inventory.column("split")  # the source's own split (ingest.arrays): kept as it is
        for k, name in enumerate(SPLITS):
            split_index = np.where(pc.fill_null(pc.equal(own, name), False).to_numpy(zero_copy_only=False),
                                   k, split_index)
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
    if "labels" in inventory.column_names and inventory.column("labels").null_count < len(inventory):
        # labels the scan found with the image itself (ingest.arrays: an .npz's labels, a path table)
        label_col = pc.if_else(pc.is_null(label_col), inventory.column("labels").cast(pa.list_(pa.float32())),
                               label_col)
    # 5. planning units: runs of frames_per_unit remaining frames of one file; every slice of a unit
    # carries the unit's group and seeded sort key, so that a later cut keeps units together
    n = len(slice_row)
    new_row = np.ones(n, dtype=bool)
    new_row[1:] = slice_row[1:] != slice_row[:-1]
    row_first = np.maximum.accumulate(np.where(new_row, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    unit_in_row = (np.arange(n) - row_first) // frames_per_unit
    unit_start = new_row.copy()
    unit_start[1:] |= unit_in_row[1:] != unit_in_row[:-1]
    unit_of_slice = np.cumsum(unit_start) - 1
    starts = np.nonzero(unit_start)[0]
    if volumes:  # one unit per series: its slices share the series' sort key, hence one shard
        unit_of_slice = np.arange(n)
        u_order = unit_order(inventory.column("series_hash").take(slice_row), np.zeros(n, np.int64), seed, generation)
    else:
        u_order = unit_order(inventory.column("sop_hash").take(slice_row[starts]), frame_no[starts], seed, generation)
    slice_group = partition[slice_row] * len(SPLITS) + split_index[slice_row]
    planned = pa.table({
        "path": inventory.column("path").take(slice_row), "frame": pa.array(frame_no, pa.int32()),
        "frames": pa.array(frames_[slice_row], pa.int32()),
        **{c: inventory.column(c).take(slice_row) for c in
           ("sop_hash", "series_hash", "study_hash", "patient_hash", "source_hash")},
        "split": pa.array(SPLITS, pa.string()).take(pa.array(split_index[slice_row], pa.int64())),
        "labels": label_col.take(slice_row),
        # inventories written before the fast path have no layouts: every slice takes the pydicom path
        "native_layout": (inventory.column("native_layout") if "native_layout" in inventory.column_names
                          else pa.nulls(len(inventory), pa.string())).take(slice_row),
        "fallbacks": fallbacks,
        "group": pa.array(slice_group.astype(np.int8), pa.int8()),
        "order": pa.array(u_order[unit_of_slice] if n else np.zeros(0, np.int64), pa.int64()),
        "est": pa.array(est_row[slice_row].astype(np.int64), pa.int64()),
    }, schema=PLANNED_SCHEMA)
    return plan, planned


def _drop_partial_series(inventory: pa.Table, slice_row: np.ndarray, frame_no: np.ndarray, previous: pa.Table,
                         plan: Plan, shown) -> tuple[np.ndarray, np.ndarray]:
    """Volumes: the slices of series that an earlier generation planned (in `previous`) that it did not
    plan themselves (new files of such a series) are recorded as rejected and left out. A series is
    stored once, whole, by the generation that first saw it. Returns the remaining slices."""
    import pyarrow.compute as pc

    planned_series = pc.unique(pc.drop_null(previous.column("series_hash")))
    series = inventory.column("series_hash").take(slice_row)
    old = np.nonzero(pc.is_in(series, value_set=planned_series).to_numpy(zero_copy_only=False))[0]
    if not len(old):
        return slice_row, frame_no
    probe = pa.table({"sop_hash": inventory.column("sop_hash").take(slice_row[old]), "frame": frame_no[old],
                      "_i": old})
    prev = previous.select(["sop_hash", "frame"]).cast(pa.schema([("sop_hash", pa.string()), ("frame", pa.int64())]))
    new = np.sort(probe.join(prev, keys=["sop_hash", "frame"], join_type="left anti").column("_i").to_numpy())
    for r in inventory.take(slice_row[new]).to_pylist():
        plan.errors.append(error_row(shown(r), "plan", "series already ingested",
                                     "an earlier generation planned this file's series without it; a series is "
                                     "stored once, whole (ingest it into a new dataset to rebuild its volume)"))
    keep = np.ones(len(slice_row), dtype=bool)
    keep[new] = False
    return slice_row[keep], frame_no[keep]


def make_plan(inventory: pa.Table, *, generation: int, modality_map: dict[str, str], max_pixel_bytes: int,
              max_side: int | None, shard_size: int, frames_per_unit: int, val_fraction: float, seed: int,
              previous: "pa.Table | set[tuple[str, int]]", labels: "LabelTable | None" = None,
              shown=lambda r: r["source"], volumes: bool = False) -> tuple[Plan, dict[str, pa.Table]]:
    """All of planning in one process (small inventories, tests): the summary and, per shard, its slices
    (SPEC_SCHEMA) in write order. The same rules and the same cut as `plan_generation` on a cluster,
    which gives the same shards for the same inventory."""
    plan, planned = plan_rows(inventory, generation=generation, modality_map=modality_map,
                              max_pixel_bytes=max_pixel_bytes, max_side=max_side, frames_per_unit=frames_per_unit,
                              val_fraction=val_fraction, seed=seed, previous=previous, labels=labels, shown=shown,
                              volumes=volumes)
    totals = group_totals(planned)
    specs: dict[str, pa.Table] = {}
    for group, (_, est) in sorted(totals.items()):
        n = shards_needed(est, shard_size)
        offset = split_offset(group, {g: shards_needed(e, shard_size) for g, (_, e) in totals.items()})
        for name, spec, info in cut_shards(planned, group, 0, n - 1, n, offset, seed, generation):
            specs[name] = spec
            plan.shards[name] = info
            plan.slices += info["slices"]
    return plan, specs


def split_offset(group: int, shards: dict[int, int]) -> int:
    """The first shard index of `group`: a partition's train shards come first, then val, then test."""
    first = group - group % len(SPLITS)
    return sum(shards.get(g, 0) for g in range(first, group))


def group_totals(planned: pa.Table) -> dict[int, tuple[int, int]]:
    """{group: (slices, estimated bytes)} of planned slices."""
    group, est = _np(planned, "group").astype(np.int64), _np(planned, "est")
    slices = np.bincount(group, minlength=len(SPLITS) * len(MODALITIES))
    sizes = np.bincount(group, weights=est, minlength=len(SPLITS) * len(MODALITIES))
    return {g: (int(slices[g]), int(sizes[g])) for g in np.nonzero(slices)[0].tolist()}


def shards_needed(est_bytes: int, shard_size: int) -> int:
    return max(1, min(MAX_SHARDS_PER_GROUP, -(-int(est_bytes) // max(1, int(shard_size)))))


def shard_of(order: np.ndarray, n: int) -> np.ndarray:
    """The shard (0..n-1) of each sort key: n equal ranges of the key space (exact integer arithmetic,
    monotone in the key, so a key range read from disk can be cut without a global sort)."""
    return ((order >> ORDER_SHIFT) * n) >> (63 - ORDER_SHIFT)


def order_range(first: int, last: int, n: int) -> tuple[int, int]:
    """[lo, hi] (inclusive) of the sort keys of shards first..last (of n)."""
    span = 1 << (63 - ORDER_SHIFT)
    lo = -(-first * span // n) << ORDER_SHIFT
    hi = -(-(last + 1) * span // n) << ORDER_SHIFT
    return lo, hi - 1


def cut_shards(planned: pa.Table, group: int, first: int, last: int, n: int, index_offset: int, seed: int,
               generation: int) -> list[tuple[str, pa.Table, dict]]:
    """The shards first..last of `group` (of n) from planned slices that include all of theirs:
    [(name, spec in write order, info)]; an empty hash range gives no shard (its index is skipped)."""
    import pyarrow.compute as pc

    mi, si = divmod(group, len(SPLITS))
    modality, split = MODALITIES[mi], SPLITS[si]
    lo, hi = order_range(first, last, n)
    order = _np(planned, "order")
    rows = np.nonzero((_np(planned, "group") == group) & (order >= lo) & (order <= hi))[0]
    mine = planned.take(rows)
    # units in key order (ties, e.g. the units of one file, by SOP hash and frame): deterministic
    mine = mine.take(pc.sort_indices(mine, sort_keys=[("order", "ascending"), ("sop_hash", "ascending"),
                                                      ("frame", "ascending")]))
    shard = shard_of(_np(mine, "order"), n)
    bounds = np.searchsorted(shard, np.arange(first, last + 2))
    out = []
    for i in range(first, last + 1):
        a, b = int(bounds[i - first]), int(bounds[i - first + 1])
        if a == b:
            continue
        index = index_offset + i
        inner = np.random.default_rng([seed, generation, mi, si, index]).permutation(b - a)
        part = mine.slice(a, b - a).take(inner)
        name = shard_name(modality, generation, index)
        out.append((name, part.select(SPEC_SCHEMA.names),
                    {"modality": modality, "split": split, "slices": int(b - a), "est_bytes": int(pc.sum(part.column("est")).as_py())}))
    return out


def _hex_prefix64(col) -> np.ndarray:
    """The first 16 hex digits of each string as uint64 (shorter strings padded with 0, "" -> 0)."""
    import pyarrow.compute as pc

    arr = pc.utf8_rpad(pc.utf8_slice_codeunits(pc.fill_null(col.cast(pa.string()), ""), 0, 16), 16, "0")
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset:arr.offset + n + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].reshape(n, 16)
    nibble = np.where(data >= 97, data - 87, np.where(data >= 65, data - 55, data - 48)).astype(np.uint64) & np.uint64(15)
    return np.bitwise_or.reduce(nibble << np.arange(60, -4, -4, dtype=np.uint64), axis=1)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look uniform for any inputs."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def unit_order(sop_hash, first_frame: np.ndarray, seed: int, generation: int) -> np.ndarray:
    """The seeded sort key (0 <= key < 2**63) of each planning unit: a hash of (seed, generation, SOP
    hash, first frame). Independent of the unit's patient, series and position in the inventory, so
    sorting by it shuffles across patients and series, and it needs no other row to compute."""
    base = _mix64(np.array([(int(seed) * 1_000_003 + int(generation)) % (1 << 64)], np.uint64))[0]
    with np.errstate(over="ignore"):
        mixed = _mix64(_hex_prefix64(sop_hash) ^ base) + np.asarray(first_frame, np.uint64) * np.uint64(0xD1B54A32D192ED03)
    return (_mix64(mixed) >> np.uint64(1)).astype(np.int64)


def sop_key32(sop_hash) -> np.ndarray:
    """The first 8 hex digits of the SOP hash as an integer: what buckets and plan records are keyed by."""
    return (_hex_prefix64(sop_hash) >> np.uint64(32)).astype(np.int64)


def bucket_key32(table: pa.Table, volumes: bool) -> np.ndarray:
    """The key of planning buckets and plan records (the records' `sop_key` column): the SOP hash's,
    or in a volumes dataset the series hash's, so that a bucket holds whole series (every copy of a
    SOP instance has its series, so deduplication stays exact)."""
    return sop_key32(table.column("series_hash" if volumes else "sop_hash"))


def bucket_of(key32: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket b of `buckets` holds the key range [ceil(b * 2**32 / buckets), ceil((b + 1) * 2**32 / buckets))."""
    return (key32 * buckets) >> 32


def bucket_range(bucket: int, buckets: int) -> tuple[int, int]:
    return -(-bucket * (1 << 32) // buckets), -(-(bucket + 1) * (1 << 32) // buckets)


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

def write_plan_meta(root: Path, generation: int, meta: dict) -> None:
    """plan/gNNN.json, written last: a generation exists once its meta exists."""
    from shards.atomic import write_text_atomically

    write_text_atomically(plan_meta_path(root, generation), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def read_plan_meta(root: Path, generation: int) -> dict:
    return json.loads(plan_meta_path(root, generation).read_text())


def generations(root: Path) -> list[int]:
    base = Path(root) / PLAN_DIR
    if not base.is_dir():
        return []
    return sorted(int(p.stem[1:]) for p in base.glob("g*.json"))


def record_parts_dir(root: Path, generation: int) -> Path:
    return Path(root) / PLAN_DIR / f"g{generation:03d}"


def _record_parts(root: Path, generation: int) -> list[Path]:
    return sorted(record_parts_dir(root, generation).glob("part-*.parquet"))


def shard_records(root: Path, generation: int, names: list[str]) -> pa.Table:
    """The plan records (RECORD_SCHEMA) of the named shards, each shard's slices in its write order."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    legacy = plan_record_path(root, generation)
    if legacy.exists():  # one file in write order
        return pq.read_table(legacy, filters=[("shard", "in", names)]).select(RECORD_SCHEMA.names)
    parts = _record_parts(root, generation)
    if not parts:
        return RECORD_SCHEMA.empty_table()
    table = pads.dataset(parts, schema=RECORD_PART_SCHEMA).to_table(filter=pc.field("shard").isin(names))
    return table.sort_by([("shard", "ascending"), ("position", "ascending")]).select(RECORD_SCHEMA.names)


def previous_frames(root: Path, key_range: tuple[int, int] | None = None, with_series: bool = False) -> pa.Table:
    """(sop_hash, frame) of every slice planned by an existing generation; with key_range = [lo, hi),
    only those whose record key (`bucket_key32`: of the SOP, or of the series in a volumes dataset) lies
    in it (one bucket's, read from the records' sorted parts). `with_series` adds their series_hash
    (recorded in volumes datasets only, else null)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    columns = ["sop_hash", "frame", *(["series_hash"] if with_series else [])]
    schema = pa.schema([("sop_hash", pa.string()), ("frame", pa.int64()),
                        *([("series_hash", pa.string())] if with_series else [])])
    parts = []
    for g in generations(root):
        legacy = plan_record_path(root, g)
        if legacy.exists():
            t = pq.read_table(legacy, columns=["sop_hash", "frame"])
            if key_range is not None:
                key = sop_key32(t.column("sop_hash"))
                t = t.filter(pa.array((key >= key_range[0]) & (key < key_range[1])))
            if with_series:
                t = t.append_column("series_hash", pa.nulls(t.num_rows, pa.string()))
        else:
            files = _record_parts(root, g)
            if not files:
                continue
            where = None
            if key_range is not None:
                where = (pc.field("sop_key") >= key_range[0]) & (pc.field("sop_key") < key_range[1])
            t = pads.dataset(files, schema=RECORD_PART_SCHEMA).to_table(columns=columns, filter=where)
        parts.append(t.cast(schema))
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts)


# ---------------------------------------------------------------- planning on a cluster
#
# A. one task per few consecutive inventory parts (`part_groups`): attach the source path, add the bucket
#    of each row (a range of the SOP hash), write the rows again sorted by bucket (with an index of each
#    bucket's byte range) under DATASET.paths/work/gNNN/buckets (ingest.paths.work_dir: the rows carry
#    source paths).
# B. one task per bucket: read the bucket's byte range of every phase-A file (its index gives the range),
#    keep one row per source file, plan them (`plan_rows`: every copy of a SOP instance is in the same
#    bucket, so dedup is exact), write the errors (errors/plan-gNNN-bBBBBB.parquet) and the planned
#    slices sorted by (group, order) under DATASET.paths/work/gNNN/planned. Returns counts per group only.
# The client sums the counts (O(buckets x groups) numbers) into the number of shards per group.
# C. one task per range of shards of a group: read that key range of every bucket's planned slices, cut
#    it into shards (`cut_shards`), write their spec files and one plan-record part. Returns per shard
#    its name, slice count and estimated bytes: the client's state is O(buckets + shards).

class PlanFailed(RuntimeError):
    """Some planning tasks failed; nothing of the generation is visible (no plan/gNNN.json)."""


def _work(root: Path, generation: int, what: str) -> Path:
    """Planning work files (bucketed rows carry source paths): beside the dataset, never inside it."""
    from .paths import work_dir

    return work_dir(root, generation) / what


def with_paths(table: pa.Table, paths: pa.Table) -> pa.Table:
    """`table` plus the `path` of each row's source_hash in `paths` (one row per hash; null where none),
    rows in their order. Joined on the hash alone: Arrow's join refuses list columns (`labels`)."""
    probe = pa.table({"source_hash": table.column("source_hash"), "_row": np.arange(table.num_rows)})
    joined = probe.join(paths.select(["source_hash", "path"]), keys="source_hash", join_type="left outer")
    joined = joined.sort_by("_row")
    return table.append_column("path", joined.column("path"))


def first_per_source(table: pa.Table) -> pa.Table:
    """One row per source_hash (overlapping sources, /a and /a/b, list some files twice): the first."""
    import pyarrow.compute as pc

    if table.num_rows < 2:
        return table
    table = table.take(pc.sort_indices(table, sort_keys=[("source_hash", "ascending")]))
    hashes = table.column("source_hash")
    repeat = np.zeros(table.num_rows, dtype=bool)
    repeat[1:] = pc.equal(hashes.slice(1), hashes.slice(0, table.num_rows - 1)).to_numpy(zero_copy_only=False)
    return table.filter(pa.array(~repeat)) if repeat.any() else table


def _write_sorted(table: pa.Table, path: Path, by: np.ndarray, stats: list[str]) -> None:
    """Write `table` (already sorted by `by`) with row groups that never span two values of `by` (and
    at most ROW_GROUP_ROWS rows), atomically. Only the `stats` columns carry row-group statistics (what
    readers filter on): every reader parses the footer, and min/max of paths and layouts would bloat it."""
    from shards.atomic import write_atomically

    starts = np.flatnonzero(np.r_[True, by[1:] != by[:-1]]) if len(by) else np.zeros(0, np.int64)

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, table.schema, write_statistics=stats) as writer:
            for a, b in zip(starts.tolist(), np.r_[starts[1:], len(by)].tolist()):
                writer.write_table(table.slice(a, b - a), row_group_size=ROW_GROUP_ROWS)
            if not len(by):
                writer.write_table(table)

    write_atomically(path, write)


def _write_slots(table: pa.Table, path: Path, slot: np.ndarray, slots: int) -> None:
    """Write `table` (sorted by `slot`, each in 0..slots-1) as an Arrow IPC stream plus an index
    `<path>.idx.npy` of slots + 1 byte offsets: the rows of slot k lie in [index[k], index[k + 1]).
    A reader of one slot (or a run of slots) reads two index entries and that byte range only, so
    its cost does not grow with the number of slots, unlike a Parquet footer that lists them all."""
    from shards.atomic import write_atomically

    bounds = np.searchsorted(slot, np.arange(slots + 1)).tolist()
    offsets = np.empty(slots + 1, np.int64)
    options = pa.ipc.IpcWriteOptions(compression=WORK_COMPRESSION)

    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema, options=options) as writer:
            for k in range(slots):
                offsets[k] = sink.tell()
                if bounds[k + 1] > bounds[k]:
                    writer.write_table(table.slice(bounds[k], bounds[k + 1] - bounds[k]), max_chunksize=ROW_GROUP_ROWS)
            offsets[slots] = sink.tell()
        # the index is in place before the stream it indexes is renamed into place
        write_atomically(_slot_index(path), write_index)

    def write_index(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a temporary's name
            np.save(f, offsets)

    write_atomically(path, write)


def _slot_index(path: Path) -> Path:
    return path.with_name(path.name + ".idx.npy")


def _read_slots(path: Path, first: int, last: int, schema: pa.Schema) -> pa.Table:
    """The rows of slots first..last of a `_write_slots` file."""
    index = np.load(_slot_index(path), mmap_mode="r")
    a, b = int(index[first]), int(index[last + 1])
    if a == b:
        return schema.empty_table()
    with pa.memory_map(str(path)) as source:
        source.seek(a)
        reader = pa.BufferReader(source.read_buffer(b - a))
    batches = []
    while True:
        try:
            message = pa.ipc.read_message(reader)
        except EOFError:
            break
        if message.type == "record batch":  # the first slot written also holds the schema message
            batches.append(pa.ipc.read_record_batch(message, schema))
    return pa.Table.from_batches(batches, schema)


def _part_with_paths(part: str, root: Path, generation: int, hash_paths: bool) -> pa.Table:
    """One inventory part with every column phase A writes, "path" included."""
    import pyarrow.compute as pc

    from .paths import PATHS_SCHEMA, generation_map_dir

    table = pq.read_table(part)
    for name, kind in [("native_layout", pa.string()), *((f.name, f.type) for f in INVENTORY_EXTENSION)]:
        # absent: an older part, or a DICOM one (the extension is for non-DICOM rows)
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    table = table.select([*INVENTORY_SCHEMA.names, *INVENTORY_EXTENSION.names])
    if hash_paths:  # the scan task wrote its path map beside the dataset: part-gNNN-TTTTT-BBB <-> map/part-TTTTT-BBB
        paths_file = generation_map_dir(root, generation) / "map" / ("part-" + Path(part).name.split("-", 2)[2])
        if paths_file.exists():
            paths = first_per_source(pq.read_table(paths_file, schema=PATHS_SCHEMA))
            table = with_paths(table, paths)
            return table.set_column(table.column_names.index("path"), "path", pc.fill_null(table.column("path"), ""))
        return table.append_column("path", pa.array([""] * table.num_rows, pa.string()))
    return table.append_column("path", table.column("source"))


def bucket_parts(parts: list[str], *, root: str, generation: int, buckets: int, hash_paths: bool,
                 volumes: bool = False) -> int:
    """Phase A for a few inventory parts (one file out); returns their row count."""
    root_ = Path(root)
    table = pa.concat_tables([_part_with_paths(p, root_, generation, hash_paths).select(BUCKETED_SCHEMA.names)
                              .cast(BUCKETED_SCHEMA) for p in parts])
    bucket = bucket_of(bucket_key32(table, volumes), buckets).astype(np.int32)
    order = np.argsort(bucket, kind="stable")
    table = table.take(pa.array(order))
    _write_slots(table, _work(root_, generation, "buckets") / f"{Path(parts[0]).stem}.arrows", bucket[order], buckets)
    return table.num_rows


def part_groups(parts: list[str], rows: int, workers: int) -> list[list[str]]:
    """Phase A's tasks: consecutive inventory parts, about two tasks per worker, at most about BUCKET_ROWS
    rows each. One task per part would make phase A (a Dask round trip and a file written per task) and
    phase B (every bucket task reads every phase-A file) grow with the scan's task count, 16 per worker."""
    if not parts:
        return []
    by_tasks = -(-len(parts) // (2 * max(1, workers)))
    by_rows = max(1, BUCKET_ROWS * len(parts) // max(1, rows))  # parts of average size that fit in a task
    per = max(1, min(by_tasks, by_rows))
    return [parts[i:i + per] for i in range(0, len(parts), per)]


_LABELS: dict = {}


def _labels_for(path: str | None, salt: str) -> "LabelTable | None":
    """The labels table, loaded once per worker process."""
    if not path:
        return None
    stat = Path(path).stat()
    key = (str(path), salt, stat.st_mtime_ns, stat.st_size)
    if key not in _LABELS:
        _LABELS.clear()
        _LABELS[key] = LabelTable.load(path, salt)
    return _LABELS[key]


def previous_error_keys(root: Path, skip_prefixes: tuple[str, ...], sources: set[str | None]) -> set[tuple[str, str]]:
    """(source, reason) of the earlier error files' rows whose source is one of `sources` (the inputs this
    run rejects): read with a filter, so memory follows this run's rejections, not the ledger's size."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from shards.manifest import ERRORS_SCHEMA

    base = Path(root) / ERRORS_DIR
    files = sorted(p for p in base.glob("*.parquet") if not p.stem.startswith(skip_prefixes)) if base.is_dir() else []
    seen: set[tuple[str, str]] = set()
    if not files or not sources:
        return seen
    wanted = pc.field("source").isin(pa.array(sorted(s for s in sources if s is not None), pa.string()))
    if None in sources:
        wanted = wanted | pc.field("source").is_null()
    scanner = pads.dataset(files, format="parquet", schema=ERRORS_SCHEMA).scanner(
        columns=["source", "reason"], filter=wanted)
    for batch in scanner.to_batches():
        seen.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
    return seen


def not_yet_reported(root: Path, generation: int, errors: list[dict]) -> list[dict]:
    """The errors not already recorded by an earlier generation (same source and reason): a rerun over
    the same sources does not report the same rejected file again. Only the error files' rows of these
    errors' sources are read (a pyarrow filter), never the whole ledger."""
    if not errors:
        return errors
    mine = (f"scan-g{generation:03d}", f"plan-g{generation:03d}")
    seen = previous_error_keys(root, mine, {e["source"] for e in errors})
    return [e for e in errors if (e["source"], e["reason"]) not in seen]


def plan_bucket(bucket: int, *, root: str, generation: int, buckets: int, slabs_log2: int,
                modality_map: dict[str, str],
                max_pixel_bytes: int, max_side: int | None, frames_per_unit: int, val_fraction: float, seed: int,
                salt: str, hash_paths: bool, labels_path: str | None, volumes: bool = False) -> dict:
    """Phase B for one bucket; returns {"groups": {group: [slices, est_bytes]}, "already": n, "rejected": n}."""
    import pyarrow.compute as pc

    from shards import write_errors

    from .scan import shown_source

    root_ = Path(root)
    parts = sorted(_work(root_, generation, "buckets").glob("*.arrows"))
    pieces = [_read_slots(p, bucket, bucket, BUCKETED_SCHEMA) for p in parts]
    table = pa.concat_tables(pieces) if pieces else BUCKETED_SCHEMA.empty_table()
    if not table.num_rows:
        write_errors(root_, f"plan-g{generation:03d}-b{bucket:06d}", [])
        return {"groups": {}, "already": 0, "rejected": 0}
    table = first_per_source(table)
    plan, planned = plan_rows(
        table, generation=generation, modality_map=modality_map, max_pixel_bytes=max_pixel_bytes, max_side=max_side,
        frames_per_unit=frames_per_unit, val_fraction=val_fraction, seed=seed,
        previous=previous_frames(root_, bucket_range(bucket, buckets), with_series=volumes), labels=_labels_for(labels_path, salt),
        shown=lambda r: shown_source(r["path"], salt, hash_paths), volumes=volumes)
    del table
    errors = not_yet_reported(root_, generation, plan.errors)
    write_errors(root_, f"plan-g{generation:03d}-b{bucket:06d}", errors)
    sort = pc.sort_indices(planned, sort_keys=[("group", "ascending"), ("order", "ascending")])
    planned = planned.take(sort)
    _write_slots(planned, _work(root_, generation, "planned") / f"bucket-{bucket:06d}.arrows",
                 _np(planned, "group").astype(np.int64) * (1 << slabs_log2) + (_np(planned, "order") >> (63 - slabs_log2)),
                 len(SPLITS) * len(MODALITIES) << slabs_log2)
    return {"groups": {g: list(v) for g, v in group_totals(planned).items()}, "already": plan.already_ingested,
            "rejected": len(errors)}


def write_shard_range(item: tuple[int, int, int, int, int], *, root: str, generation: int, seed: int,
                      slabs_log2: int, volumes: bool = False) -> dict:
    """Phase C for shards first..last of one group (of n, names counted from index_offset): their spec
    files and one plan-record part. Returns {shard name: info}."""
    from shards.atomic import write_parquet_atomically

    group, first, last, n, index_offset = item
    root_ = Path(root)
    lo, hi = order_range(first, last, n)
    files = sorted(_work(root_, generation, "planned").glob("bucket-*.arrows"))
    base = group << slabs_log2  # the slabs (equal key ranges) that hold keys lo..hi; cut_shards keeps lo..hi
    pieces = [_read_slots(f, base + (lo >> (63 - slabs_log2)), base + (hi >> (63 - slabs_log2)), PLANNED_SCHEMA)
              for f in files]
    planned = pa.concat_tables(pieces) if pieces else PLANNED_SCHEMA.empty_table()
    infos, records = {}, []
    for name, spec, info in cut_shards(planned, group, first, last, n, index_offset, seed, generation):
        write_parquet_atomically(spec, spec_path(root_, generation, name))
        infos[name] = info
        records.append(pa.table({
            "shard": pa.array([name] * spec.num_rows, pa.string()),
            "modality": pa.array([info["modality"]] * spec.num_rows, pa.string()),
            "split": spec.column("split"), "sop_hash": spec.column("sop_hash"), "frame": spec.column("frame"),
            "source_hash": spec.column("source_hash"),
            "position": pa.array(np.arange(spec.num_rows, dtype=np.int32)),
            "sop_key": pa.array(bucket_key32(spec, volumes)),
            "series_hash": spec.column("series_hash") if volumes else pa.nulls(spec.num_rows, pa.string()),
        }, schema=RECORD_PART_SCHEMA))
    if records:
        record = pa.concat_tables(records).sort_by([("sop_key", "ascending")])
        first_name = shard_name(MODALITIES[group // len(SPLITS)], generation, index_offset + first)
        # row groups of ROW_GROUP_ROWS sorted keys: a later bucket task reads only the groups of its key range
        _write_sorted(record, record_parts_dir(root_, generation) / f"part-{first_name}.parquet",
                      np.zeros(record.num_rows, np.int8), ["shard", "sop_key"])
    return infos


def buckets_for(rows: int, workers: int) -> int:
    return max(1, workers, -(-int(rows) // BUCKET_ROWS))


def clear_generation_plan(root: Path, generation: int) -> None:
    """Remove what an interrupted planning of this generation left (before its meta existed)."""
    import shutil

    shutil.rmtree(record_parts_dir(root, generation), ignore_errors=True)
    plan_record_path(root, generation).unlink(missing_ok=True)
    base = Path(root) / ERRORS_DIR
    if base.is_dir():
        for stale in [*base.glob(f"plan-g{generation:03d}-b*.parquet"), base / f"plan-g{generation:03d}.parquet"]:
            stale.unlink(missing_ok=True)


def plan_generation(client, root: Path, generation: int, *, rows: int, modality_map: dict[str, str],
                    max_pixel_bytes: int, max_side: int | None, shard_size: int, frames_per_unit: int,
                    val_fraction: float, seed: int, salt: str, hash_paths: bool, labels_path: str | None,
                    progress: bool = False, token: str = "", buckets: int | None = None,
                    volumes: bool = False) -> Plan:
    """Plan generation `generation` from its inventory parts as Dask tasks (phases A-C above): spec files
    under DATASET.paths/work/gNNN/shards, plan records under plan/gNNN/, errors under errors/. Returns the summary
    (per shard info; counts); raises PlanFailed when a task failed. The caller writes plan/gNNN.json."""
    from .engine import run_phase
    from .scan import INVENTORY_DIR

    root = Path(root)
    clear_generation_plan(root, generation)
    parts = [str(p) for p in sorted((root / INVENTORY_DIR).glob(f"part-g{generation:03d}-*.parquet"))]
    workers = max(1, len(client.scheduler_info().get("workers", {})))
    buckets = buckets or buckets_for(rows, workers)  # any count gives the same plan; it sets task sizes
    # key ranges ("slabs") per group in the planned files: about one per shard-range task, so that a
    # task reads little beyond its own range
    slabs_log2 = min(16, max(4, (buckets - 1).bit_length()))
    tag = f"g{generation:03d}-{token}"

    seconds: dict[str, float] = {}

    def phase(desc, fn, items, key_of, **kwargs):
        start = time.perf_counter()
        results, failures = run_phase(client, desc, fn, items, key_of=key_of, progress=progress, **kwargs)
        seconds[desc.split()[-1]] = time.perf_counter() - start
        if failures:
            first = failures[0][1]
            raise PlanFailed(f"{len(failures)} {desc} task(s) failed: {type(first).__name__}: {first}")
        return results

    phase("plan: bucket", bucket_parts, part_groups(parts, rows, workers), lambda ps: f"plan-bucket-{Path(ps[0]).stem}-{tag}", root=str(root),
          generation=generation, buckets=buckets, hash_paths=hash_paths, volumes=volumes)
    counted = phase("plan: dedup", plan_bucket, list(range(buckets)), lambda b: f"plan-dedup-{b}-{tag}",
                    root=str(root), generation=generation, buckets=buckets, slabs_log2=slabs_log2,
                    modality_map=modality_map,
                    max_pixel_bytes=max_pixel_bytes, max_side=max_side, frames_per_unit=frames_per_unit,
                    val_fraction=val_fraction, seed=seed, salt=salt, hash_paths=hash_paths, labels_path=labels_path,
                    volumes=volumes)
    plan = Plan(generation)
    totals: dict[int, int] = {}
    for r in counted:
        plan.already_ingested += r["already"]
        plan.rejected += r["rejected"]
        for group, (_, est) in r["groups"].items():
            totals[int(group)] = totals.get(int(group), 0) + est
    shards = {group: shards_needed(est, shard_size) for group, est in totals.items()}
    per_task = max(1, -(-sum(shards.values()) // max(buckets, 4 * workers)))
    ranges = []
    for group, n in sorted(shards.items()):
        offset = split_offset(group, shards)  # val shards are numbered after train shards, test after val
        ranges += [(group, first, min(n, first + per_task) - 1, n, offset) for first in range(0, n, per_task)]
    for infos in phase("plan: shards", write_shard_range, ranges, lambda it: f"plan-shards-{it[0]}-{it[1]}-{tag}",
                       root=str(root), generation=generation, seed=seed, slabs_log2=slabs_log2, volumes=volumes):
        plan.shards.update(infos)
    plan.shards = dict(sorted(plan.shards.items()))
    plan.slices = sum(info["slices"] for info in plan.shards.values())
    plan.phase_seconds = seconds
    return plan


# ---------------------------------------------------------------- scan rejections, merged on workers
#
# A scan task writes its rejections (already hashed and scrubbed: errors/ rows) into error parts beside
# the dataset, DATASET.paths/work/gNNN/scan-errors/part-TTTTT-BBB.arrows, sorted into ERROR_SLOTS key
# slots of a hash of the row's source; it returns only their count. Then one merge task per range of
# slots reads that range of every part, keeps one row per (source, reason) (overlapping sources, /a
# and /a/b, reject the same file twice; the lowest task's row wins), drops those an earlier generation
# reported and writes errors/scan-gNNN-bBBBBB.parquet. The client sums counts: it never holds the rows.

ERROR_SLOTS = 1024           # key slots of an error part (its index: ERROR_SLOTS + 1 offsets)
ERROR_BUCKET_ROWS = 100_000  # rejections per merge task
ERROR_PART_SCHEMA = ERRORS_SCHEMA


def _error_slot(source: str | None) -> int:
    import hashlib

    text = (source or "").encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "big") * ERROR_SLOTS >> 32


def scan_error_part(root: str | Path, generation: int, task_index: int, batch: int = 0) -> Path:
    return _work(Path(root), generation, "scan-errors") / f"part-{task_index:05d}-{batch:03d}.arrows"


def write_scan_error_part(path: Path, errors: list[dict]) -> None:
    """One scan task's rejections (errors/ rows), sorted into key slots for the merge tasks."""
    slots = np.array([_error_slot(e["source"]) for e in errors], np.int64)
    order = np.argsort(slots, kind="stable")
    table = pa.Table.from_pylist([{f: errors[i].get(f) for f in ERROR_PART_SCHEMA.names} for i in order.tolist()],
                                 schema=ERROR_PART_SCHEMA)
    _write_slots(table, path, slots[order], ERROR_SLOTS)


def scan_error_buckets(rejections: int) -> int:
    return min(ERROR_SLOTS, max(1, -(-rejections // ERROR_BUCKET_ROWS)))


def merge_scan_errors(bucket: int, *, root: str, generation: int, buckets: int) -> int:
    """One merge task (see above): writes errors/scan-gNNN-bBBBBB.parquet; returns its row count."""
    from shards import write_errors

    root_ = Path(root)
    first, last = bucket * ERROR_SLOTS // buckets, (bucket + 1) * ERROR_SLOTS // buckets - 1
    parts = sorted(_work(root_, generation, "scan-errors").glob("part-*.arrows"))  # task order: the winner is stable
    unique: dict[tuple, dict] = {}
    for part in parts:
        for row in _read_slots(part, first, last, ERROR_PART_SCHEMA).to_pylist():
            unique.setdefault((row["source"], row["reason"]), row)
    errors = not_yet_reported(root_, generation, list(unique.values()))
    write_errors(root_, f"scan-g{generation:03d}-b{bucket:06d}", errors)
    return len(errors)


def clear_scan_errors(root: Path, generation: int) -> None:
    """Remove the scan error files an interrupted run of this generation left (the merged ones of an
    earlier attempt may have used another bucket count)."""
    base = Path(root) / ERRORS_DIR
    if base.is_dir():
        for stale in [*base.glob(f"scan-g{generation:03d}-b*.parquet"), base / f"scan-g{generation:03d}.parquet"]:
            stale.unlink(missing_ok=True)
