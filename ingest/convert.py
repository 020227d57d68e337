"""Phase 3, convert: one Dask task writes one whole shard.

The task reads its slice list (written by plan), decodes each frame with pydicom and its plugins,
applies the pixel rules of `ingest.pixels`, and writes the samples through `shards.ShardWriter`
(tar + index renamed into place, manifest part last as the commit marker). A file that fails becomes
one row in `errors/<shard>.parquet` (written before the commit) and the task goes on. A shard whose
every slice failed has nothing to commit; an empty marker under `_work` records that it is done.
"""
from __future__ import annotations

import json
import re
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .arrays import is_non_dicom, write_images
from .decoders import release_decoded
from .native import Changed, header_meta, read_frame
from .pixels import to_stored
from .plan import spec_path
from .scan import WORK_DIR, Rejected, _open, inferred_syntax, scan_error, set_syntax, shown_source, sop_uid, text_path

_CACHE_FILES = 4  # open datasets kept per task: frames of one multi-frame file are spread over a shard


def empty_marker(root: Path, generation: int, name: str) -> Path:
    return Path(root) / WORK_DIR / f"g{generation:03d}" / "empty" / name


def shard_done(root: Path, generation: int, modality: str, name: str) -> bool:
    from shards import ShardWriter

    return ShardWriter.is_committed(root, modality, name) or empty_marker(root, generation, name).exists()


def _remove_stale_temporaries(root: Path, modality: str, name: str) -> None:
    """Hidden temporaries of this shard left by a writer that died (killed worker or client)."""
    from shards.layout import idx_path, manifest_path, tar_path, temporary

    for final in (tar_path(root, modality, name), idx_path(root, modality, name), manifest_path(root, modality, name)):
        if final.parent.is_dir():
            for stale in final.parent.glob(temporary(final, "*").name):
                stale.unlink(missing_ok=True)


def load_dataset(src: str):
    """The whole file (pixels included); force only for files without a meta header."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with _open(src) as fp:
            try:
                ds = pydicom.dcmread(fp)
            except InvalidDicomError:
                fp.seek(0)
                ds = pydicom.dcmread(fp, force=True)
    except OSError as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {e}") from None
    except Exception as e:
        raise Rejected("damaged file", f"{type(e).__name__}: {str(e)[:200]}") from None
    if "SOPInstanceUID" not in ds and not any(tag in ds for tag in (0x7FE00008, 0x7FE00009, 0x7FE00010)):
        # pydicom returns an empty dataset when the file ends inside an element (often the pixel data);
        # a file without SOPInstanceUID but with pixel data was read to its end (keyed by content)
        raise Rejected("damaged file", "the file cannot be parsed to its end (truncated or corrupted data)")
    if not getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None):
        # no File Meta Information: decode with the syntax scan inferred from the same encoding
        pixels = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
        encapsulated = pixels is not None and (getattr(pixels, "length", None) == 0xFFFFFFFF
                                               or getattr(pixels, "is_undefined_length", False))
        set_syntax(ds, inferred_syntax(ds, encapsulated))
    return ds


def decode_frame(ds, frame: int) -> np.ndarray:
    """Rule 1 of ingest.pixels: one frame decoded in the order of ingest.decoders (YBR -> RGB), palette
    applied."""
    from pydicom.pixels import apply_color_lut

    from .decoders import decode

    try:
        arr = decode(ds, frame)
    except Rejected:
        raise
    except Exception as e:
        raise Rejected("pixel decoding failed", f"{type(e).__name__}: {str(e)[:300]}") from None
    except BaseException as e:
        # decoders written in Rust (pylibjpeg-rle) panic on some damaged data; pyo3 raises the panic
        # as PanicException, a BaseException, which would otherwise end the whole convert task
        if type(e).__name__ != "PanicException":
            raise
        raise Rejected("pixel decoding failed", f"decoder panic: {str(e)[:300]}") from None
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise Rejected("bad palette", f"{type(e).__name__}: {str(e)[:200]}") from None
    return arr


def convert_frame(ds, frame: int, max_side: int | None = None):
    """(stored 2-D array, PixelInfo) of one frame: decode + the documented pixel rules."""
    arr = decode_frame(ds, frame)
    try:
        meta = header_meta(ds, frame)
    except Exception as e:  # pydicom converts a value on first access: one that does not fit its VR raises
        # pydicom's message quotes the raw value (it may be a name): only the element and VR are kept
        where = re.search(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\) according to VR '\w+'", str(e))
        detail = type(e).__name__ + (f" parsing {where.group(0)}" if where else "")
        raise Rejected("bad header value", detail) from None
    return apply_rules(arr, meta, max_side)


def apply_rules(arr: np.ndarray, meta: dict, max_side: int | None):
    try:
        return to_stored(
            arr, photometric=meta["photometric"].upper(), bits_stored=meta["rule_bits_stored"],
            signed=meta["signed"], slope=meta["slope"], intercept=meta["intercept"],
            modality_lut_sequence=meta["modality_lut_sequence"], max_side=max_side,
        )
    except ValueError as e:
        raise Rejected("unsupported pixels", str(e)) from None


def fast_frame(layout: dict, path: str, frame: int, max_side: int | None = None):
    """Like convert_frame for a file with a native layout (ingest.native): no pydicom parse."""
    return apply_rules(read_frame(layout, path, frame), layout["meta"], max_side)


def all_frames(path: str, max_side: int | None = None) -> list[np.ndarray]:
    """Every frame of a file as stored in a shard (used by tests and tools)."""
    ds = load_dataset(path)
    frames = max(1, int(ds.get("NumberOfFrames") or 1))
    return [convert_frame(ds, f, max_side)[0] for f in range(frames)]


def pixel_units(modality: str, rescale_type: str, rescale_applied: bool) -> str:
    """"HU" for CT whose modality LUT was applied exactly and whose output is Hounsfield units (Rescale
    Type HU, or absent: the CT default); "raw" for everything else (other modalities, other rescale
    types, LUTs kept unapplied), whose values the HU window would misread."""
    from shards import UNITS_HU, UNITS_RAW

    hounsfield = modality == "ct" and rescale_applied and rescale_type.strip().upper() in ("", "HU")
    return UNITS_HU if hounsfield else UNITS_RAW


def _meta(meta: dict, spec: dict, modality: str, info) -> "SampleMeta":
    from shards import SampleMeta

    spacing = meta["pixel_spacing"]
    return SampleMeta(
        modality=modality, split=spec["split"], frame=spec["frame"], frames=spec["frames"],
        sop_hash=spec["sop_hash"], series_hash=spec["series_hash"], study_hash=spec["study_hash"],
        patient_hash=spec["patient_hash"], source_hash=spec["source_hash"],
        pixel_spacing=[v * info.downsample for v in spacing] if spacing else None,
        slice_thickness=meta["slice_thickness"],
        rescale_slope=info.rescale_slope, rescale_intercept=info.rescale_intercept,
        rescale_applied=info.rescale_applied, photometric=meta["photometric"],
        bits_stored=meta["bits_stored"], bits_allocated=meta["bits_allocated"],
        pixel_representation=meta["pixel_representation"], transfer_syntax=meta["transfer_syntax"],
        body_part=meta["body_part"], manufacturer=meta["manufacturer"],
        window_center=meta["window_center"], window_width=meta["window_width"],
        units=pixel_units(modality, meta.get("rescale_type", ""), info.rescale_applied),
    )


def _failure(e: Exception, frames: int, frame: int) -> tuple[str, str]:
    """(reason, detail) of a copy that failed on `frame`."""
    if not isinstance(e, Rejected):
        return "conversion failed", f"{type(e).__name__}: {str(e)[:300]}"
    frame_level = e.reason in ("pixel decoding failed", "unsupported pixels") and frames > 1
    return e.reason, f"frame {frame}: {e.detail}" if frame_level else e.detail


def _note_fallback(errors: list[dict], logged: dict[str, int], failed_copies: list[str], used: str) -> None:
    """Say in the failed copies' error rows which duplicate stood in for them (once per row)."""
    note = f"; fallback used: duplicate copy {used}"
    for src in failed_copies:
        if src not in logged:
            continue
        row = errors[logged[src]]
        if "; fallback used: " not in row["detail"]:
            row["detail"] = (row["detail"][:500 - len(note)] + note)


def start_shard(root: Path, generation: int, modality: str, name: str) -> dict:
    """A convert task's result so far; `skipped` when the shard is committed already (a retried task
    leaves it alone), else the temporaries of an earlier attempt are removed."""
    result = {"name": name, "modality": modality, "samples": 0, "errors": Counter(), "skipped": False}
    if shard_done(root, generation, modality, name):
        result["skipped"] = True
    else:
        _remove_stale_temporaries(root, modality, name)
    return result


def finish_shard(writer, root: Path, generation: int, name: str, errors: list[dict], result: dict) -> None:
    """Errors first (a committed shard has its errors on disk), then the commit, or the empty marker of
    a shard whose every slice failed."""
    from shards import write_errors

    write_errors(root, name, errors)
    result["errors"] = Counter(e["reason"] for e in errors)
    if len(writer):
        result["samples"] = writer.commit()
    else:
        writer.abort()
        marker = empty_marker(root, generation, name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def run_convert_task(root: str, generation: int, name: str, modality: str, label_names: list[str],
                     salt: str, max_side: int | None, hash_paths: bool, direct_io: bool = True,
                     units: str | None = None) -> dict:
    """Dask task: write shard `name` from its slice list. Idempotent: a committed shard is left alone.
    Non-DICOM slices (ingest.arrays) are read by ingest.arrays, with `units` as their pixel units."""
    from shards import ShardWriter, sample_key, salted_hash

    root = Path(root)
    result = start_shard(root, generation, modality, name)
    if result["skipped"]:
        return result
    specs = pq.read_table(spec_path(root, generation, name)).to_pylist()
    if specs and is_non_dicom(specs[0].get("native_layout")):  # a generation is all DICOM or all not
        writer = ShardWriter(root, modality=modality, name=name, label_names=label_names, direct_io=direct_io)
        try:
            errors = write_images(writer, specs, modality=modality, salt=salt, hash_paths=hash_paths, units=units)
            finish_shard(writer, root, generation, name, errors, result)
        except BaseException:
            writer.abort()
            raise
        return result
    cache: OrderedDict[str, object] = OrderedDict()
    failed: dict[str, tuple[str, str]] = {}  # source -> (reason, detail) of its failure in this task
    slow: set[str] = set()  # files with a native layout that must take the pydicom path after all
    errors: list[dict] = []
    logged: dict[str, int] = {}  # source -> index of its row in `errors`
    writer = ShardWriter(root, modality=modality, name=name, label_names=label_names, direct_io=direct_io)

    def fail(src: str, frames: int, frame: int, e: Exception, log: bool) -> None:
        failed[src] = _failure(e, frames, frame)
        cache.pop(src, None)
        # a fallback copy is already in errors/ as a duplicate (plan), or under its own frames
        if log and src not in logged:
            logged[src] = len(errors)
            errors.append(scan_error(src, "convert", *failed[src], salt, hash_paths))

    def frame_from(src: str, spec: dict, fallback: bool):
        """(key, pixels, meta dict, PixelInfo, frames) of the spec's frame read from copy `src`."""
        local = text_path(src)  # src is path text (ingest.scan.path_text)
        layout = spec.get("native_layout") if not fallback else None
        if layout is not None and src not in slow:
            layout = json.loads(layout)
            try:
                pixels, info = fast_frame(layout, local, spec["frame"], max_side)
            except (Changed, OSError):
                slow.add(src)  # replaced since the scan (or unreadable): pydicom path decides
            else:
                return layout["keys"][spec["frame"]], pixels, layout["meta"], info, spec["frames"]
        cached = cache.get(src)
        if cached is None:
            ds = load_dataset(local)
            if str(ds.get("SOPInstanceUID", "") or "").strip():
                uid = sop_uid(ds, None)
            else:  # keyed by its content (ingest.scan.sop_uid): hashed again, as scan did
                try:
                    with _open(local) as fp:
                        uid = sop_uid(ds, fp)
                except OSError as e:
                    raise Rejected("unreadable", f"{type(e).__name__}: {e.strerror or e}") from None
            if salted_hash(uid, salt) != spec["sop_hash"]:
                raise Rejected("changed since scan", "the file's SOPInstanceUID differs from the inventory")
            cache[src] = cached = (ds, uid)
            if len(cache) > _CACHE_FILES:
                cache.popitem(last=False)
        ds, uid = cached
        pixels, info = convert_frame(ds, spec["frame"], max_side)
        frames = max(1, int(ds.get("NumberOfFrames") or 1)) if fallback else spec["frames"]
        return sample_key(uid, spec["frame"], salt), pixels, header_meta(ds, spec["frame"]), info, frames

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for spec in specs:
                # the planned copy first, then the other copies of the same SOP instance, best first
                copies = [spec["path"], *(spec.get("fallbacks") or [])]
                for n, src in enumerate(copies):
                    if src in failed:
                        continue
                    try:
                        key, pixels, meta, info, frames = frame_from(src, spec, fallback=n > 0)
                        labels = np.asarray(spec["labels"], dtype=np.float32) if spec["labels"] is not None else None
                        source_hash = spec["source_hash"] if n == 0 else salted_hash(src, salt)
                        writer.write(key, pixels, _meta(meta, {**spec, "frames": frames, "source_hash": source_hash},
                                                        modality, info), labels=labels)
                    except Exception as e:  # Rejected, or a bug / exotic file: record it, try the next copy
                        fail(src, spec["frames"], spec["frame"], e, log=n == 0)
                        continue
                    if n > 0:
                        _note_fallback(errors, logged, copies[:n], shown_source(src, salt, hash_paths))
                    break
        finish_shard(writer, root, generation, name, errors, result)
    except BaseException:
        writer.abort()
        raise
    finally:
        release_decoded()  # a whole file decoded by GDCM is not kept beyond its task
    return result
