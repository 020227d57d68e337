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

from .native import Changed, header_meta, read_frame
from .pixels import to_stored
from .plan import spec_path
from .scan import WORK_DIR, Rejected, _open, error_row, shown_source

_CACHE_FILES = 4  # open datasets kept per task: frames of one multi-frame file are spread over a shard


def empty_marker(root: Path, generation: int, name: str) -> Path:
    return Path(root) / WORK_DIR / f"g{generation:03d}" / "empty" / name


def shard_done(root: Path, generation: int, modality: str, name: str) -> bool:
    from shards import ShardWriter

    return ShardWriter.is_committed(root, modality, name) or empty_marker(root, generation, name).exists()


def _remove_stale_temporaries(root: Path, modality: str, name: str) -> None:
    """Hidden temporaries of this shard left by a writer that died (killed worker or client)."""
    from shards.layout import idx_path, manifest_path, tar_path

    for final in (tar_path(root, modality, name), idx_path(root, modality, name), manifest_path(root, modality, name)):
        if final.parent.is_dir():
            for stale in final.parent.glob(f".{final.name}.tmp-*"):
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
    if "SOPInstanceUID" not in ds:
        # pydicom returns an empty dataset when the file ends inside an element (often the pixel data)
        raise Rejected("damaged file", "the file cannot be parsed to its end (truncated or corrupted data)")
    return ds


# python-gdcm is no dependency of ours, but where it is installed pydicom uses it as a decoder (first for
# JPEG baseline and JPEG 2000, as the fallback for the rest). On a codestream that disagrees with the
# header (samples, bits, size) it throws a C++ exception that nothing catches and the process aborts
# (SIGABRT): the Dask worker dies, the task is retried on the next one, and the job fails. Found by
# benchmarks.fuzz; the declared plugins raise instead.
ABORTING_PLUGINS = ("gdcm",)
_aborting_plugins_removed = False


def remove_aborting_plugins() -> None:
    """Remove ABORTING_PLUGINS from pydicom's decoders in this process (idempotent). Where python-gdcm
    is installed pydicom tries it first for JPEG baseline: without it those decode with pylibjpeg."""
    global _aborting_plugins_removed
    if _aborting_plugins_removed:
        return
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    for uid in AllTransferSyntaxes:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            continue
        for label in ABORTING_PLUGINS:
            if label in decoder.available_plugins:
                decoder.remove_plugin(label)
    _aborting_plugins_removed = True


def decode_frame(ds, frame: int) -> np.ndarray:
    """Rule 1 of ingest.pixels: pydicom's decoding of one frame (YBR -> RGB), palette applied."""
    from pydicom.pixels import apply_color_lut, pixel_array

    remove_aborting_plugins()
    try:
        arr = pixel_array(ds, index=frame)
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
    )


def run_convert_task(root: str, generation: int, name: str, modality: str, label_names: list[str],
                     salt: str, max_side: int | None, hash_paths: bool, direct_io: bool = True) -> dict:
    """Dask task: write shard `name` from its slice list. Idempotent: a committed shard is left alone."""
    from shards import ShardWriter, sample_key, salted_hash, write_errors

    root = Path(root)
    result = {"name": name, "modality": modality, "samples": 0, "errors": Counter(), "skipped": False}
    if shard_done(root, generation, modality, name):
        result["skipped"] = True
        return result
    _remove_stale_temporaries(root, modality, name)
    specs = pq.read_table(spec_path(root, generation, name)).to_pylist()
    cache: OrderedDict[str, object] = OrderedDict()
    failed: set[str] = set()
    slow: set[str] = set()  # files with a native layout that must take the pydicom path after all
    errors: list[dict] = []
    writer = ShardWriter(root, modality=modality, name=name, label_names=label_names, direct_io=direct_io)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for spec in specs:
                src = spec["path"]
                if src in failed:
                    continue
                try:
                    layout = spec.get("native_layout")
                    if layout is not None and src not in slow:
                        layout = json.loads(layout)
                        try:
                            pixels, info = fast_frame(layout, src, spec["frame"], max_side)
                        except (Changed, OSError):
                            slow.add(src)  # replaced since the scan (or unreadable): pydicom path decides
                        else:
                            labels = np.asarray(spec["labels"], dtype=np.float32) if spec["labels"] is not None else None
                            writer.write(layout["keys"][spec["frame"]], pixels,
                                         _meta(layout["meta"], spec, modality, info), labels=labels)
                            continue
                    ds = cache.get(src)
                    if ds is None:
                        ds = load_dataset(src)
                        uid = str(ds.get("SOPInstanceUID", "") or "")
                        if salted_hash(uid, salt) != spec["sop_hash"]:
                            raise Rejected("changed since scan", "the file's SOPInstanceUID differs from the inventory")
                        cache[src] = ds
                        if len(cache) > _CACHE_FILES:
                            cache.popitem(last=False)
                    pixels, info = convert_frame(ds, spec["frame"], max_side)
                    key = sample_key(str(ds.SOPInstanceUID), spec["frame"], salt)
                    labels = np.asarray(spec["labels"], dtype=np.float32) if spec["labels"] is not None else None
                    writer.write(key, pixels, _meta(header_meta(ds, spec["frame"]), spec, modality, info), labels=labels)
                except Rejected as e:
                    failed.add(src)
                    cache.pop(src, None)
                    frame_level = e.reason in ("pixel decoding failed", "unsupported pixels") and spec["frames"] > 1
                    detail = f"frame {spec['frame']}: {e.detail}" if frame_level else e.detail
                    errors.append(error_row(shown_source(src, salt, hash_paths), "convert", e.reason, detail))
                except Exception as e:  # a bug or an exotic file: record it, keep the shard going
                    failed.add(src)
                    cache.pop(src, None)
                    errors.append(error_row(shown_source(src, salt, hash_paths), "convert", "conversion failed",
                                            f"{type(e).__name__}: {str(e)[:300]}"))
        write_errors(root, name, errors)  # before the commit: a committed shard has its errors on disk
        result["errors"] = Counter(e["reason"] for e in errors)
        if len(writer):
            result["samples"] = writer.commit()
        else:
            writer.abort()
            marker = empty_marker(root, generation, name)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    except BaseException:
        writer.abort()
        raise
    return result
