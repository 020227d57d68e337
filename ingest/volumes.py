"""Volumes: one sample per DICOM series (`python -m ingest ... --volumes`, docs/INGEST.md "Volumes").
NIfTI files (`--volumes --modality M`) take the same task, their volumes read by ingest.arrays.

Scan and plan are those of slices, keyed by series (ingest.plan `volumes`): a planning bucket and a
shard hold whole series. This module is the convert task of a volumes shard: it groups the shard's
slices by series, reads each slice with the pixel rules of ingest.pixels, and stacks the slices of each
clean volume along the slice normal into one (depth, rows, cols) sample (shards format version 2).

A series gives volumes by these rules, in order; anything else is one errors/ row for the series (its
first file named) and nothing of it is stored:
1. Every slice has ImagePositionPatient and ImageOrientationPatient ("missing positions"); a frame of
   an enhanced multi-frame file is a slice whose position and orientation come from its functional
   groups (PlanePositionSequence per frame, PlaneOrientationSequence per frame or shared; spacing and
   rescale likewise), so its frames, and any other files of its series, stack by the rules below.
2. Split: the slices are grouped by (orientation, rows, cols) (orientations equal within
   ORIENTATION_TOLERANCE); each group is a volume of its own, numbered n = 0, 1, ... in the order of its
   orientation and size (a scout or localizer mixed into an axial series thus becomes its own group).
   A group of one slice is "single slice" (not stored, since a volume has depth >= 2).
3. Order: slices sorted by their position along the normal n = row x column of the orientation.
4. Positions: two slices closer than DUPLICATE_TOLERANCE_MM along n are "duplicate positions".
5. Spacing: every slice within SPACING_TOLERANCE x the mean gap of where evenly spaced slices from the
   first to the last one would lie, else "uneven spacing". A missing or extra slice moves some slices
   by at least about half a gap (from 3 slices on); positions rounded in the header (often to 0.1 mm)
   move them by far less than a fifth of any usual gap.
6. Gantry tilt: slices must be stacked along n: the in-plane offset of any slice from the first one
   within TILT_TOLERANCE_PIXELS of the smaller pixel spacing, else "gantry tilt" (recorded, not
   resampled).
7. Pixels: each slice through ingest.pixels' rules (modality LUT only where exact); the volume's
   dtype is the common type of its slices' when every slice's LUT was applied (values are exact in
   it), else every slice must keep the same slope and intercept and dtype ("modality LUT differs
   between slices" otherwise).
The sample's spacing is [mean gap, row spacing, column spacing] mm, its direction the columns (row
direction, column direction, n), its origin the first slice's ImagePositionPatient (moved to the centre
of the first block with --max-side), as SimpleITK's ImageSeriesReader gives them.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .scan import Rejected, _open, scan_error, text_path

ORIENTATION_TOLERANCE = 1e-4     # per direction cosine: orientations this close are one orientation
DUPLICATE_TOLERANCE_MM = 0.01    # slices closer than this along the normal are at the same position
SPACING_TOLERANCE = 0.2          # how far (in mean gaps) a slice may lie from its evenly spaced position
TILT_TOLERANCE_PIXELS = 0.1      # in-plane drift of the stack allowed, in pixels


def _floats(value, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


class _Slice:
    """One slice of a series: its plan entry and geometry from the header; its stored pixels once
    `decode` ran (pixels are decoded only for series whose geometry makes a clean volume)."""

    def __init__(self, spec: dict, src: str, ds, position: np.ndarray, orientation: np.ndarray, uid: str,
                 series_uid: str, frame: int = 0):
        from .native import header_meta

        self.spec, self.src, self.ds, self.uid, self.series_uid = spec, src, ds, uid, series_uid
        self.position, self.orientation, self.frame = position, orientation, frame
        self.shape = (int(ds.get("Rows") or 0), int(ds.get("Columns") or 0))
        try:
            self.meta = header_meta(ds, frame)
        except Exception as e:  # a value that does not fit its VR (ingest.convert says which element)
            raise Rejected("bad header value", type(e).__name__) from None
        self.pixels: np.ndarray | None = None
        self.info = None

    def decode(self, salt: str, max_side: int | None) -> None:
        """The stored pixels (ingest.pixels' rules), from this copy or else the other copies of the SOP
        instance (ingest.convert's fallbacks); the parsed file is released."""
        from .convert import convert_frame

        failure = None
        for src in [self.src, *(c for c in [self.spec["path"], *(self.spec.get("fallbacks") or [])] if c != self.src)]:
            try:
                ds = self.ds if src == self.src else _load(src, self.spec, salt)[0]
                self.pixels, self.info = convert_frame(ds, self.frame, max_side)
                self.ds = None
                return
            except Rejected as e:
                failure = failure or e
            except Exception as e:  # a bug or an exotic file: its reason, then the next copy
                failure = failure or Rejected("conversion failed", f"{type(e).__name__}: {str(e)[:300]}")
        raise failure


def _load(src: str, spec: dict, salt: str):
    """(parsed file, SOP UID, series UID) of one copy, checked against the plan entry."""
    from shards import salted_hash

    from .convert import load_dataset
    from .scan import sop_uid

    ds = load_dataset(text_path(src))
    if str(ds.get("SOPInstanceUID", "") or "").strip():
        uid = sop_uid(ds, None)
    else:  # keyed by its content (ingest.scan.sop_uid), as scan did
        with _open(text_path(src)) as fp:
            uid = sop_uid(ds, fp)
    if salted_hash(uid, salt) != spec["sop_hash"]:
        raise Rejected("changed since scan", "the file's SOPInstanceUID differs from the inventory")
    series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if salted_hash(series_uid, salt) != spec["series_hash"]:
        raise Rejected("changed since scan", "the file's SeriesInstanceUID differs from the inventory")
    return ds, uid, series_uid


def read_slice(spec: dict, salt: str, loaded: dict | None = None) -> _Slice:
    """The slice (a single-frame file, or one frame of an enhanced multi-frame file) of a plan entry with
    its geometry, from its planned copy or else its fallbacks. `loaded` ({path: parsed copy}) lets the
    frames of one multi-frame file share one parse."""
    from .native import _functional

    failure = None
    frame = int(spec.get("frame") or 0) if spec["frames"] > 1 else 0
    for src in [spec["path"], *(spec.get("fallbacks") or [])]:
        try:
            if loaded is not None and spec["frames"] > 1:
                if src not in loaded:
                    loaded[src] = _load(src, spec, salt)
                ds, uid, series_uid = loaded[src]
            else:
                ds, uid, series_uid = _load(src, spec, salt)
            if spec["frames"] > 1:  # enhanced multi-frame: each frame's plane from its functional groups
                position = _floats(_functional(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3)
                orientation = _floats(_functional(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
            else:
                position = _floats(ds.get("ImagePositionPatient"), 3)
                orientation = _floats(ds.get("ImageOrientationPatient"), 6)
            if position is None or orientation is None:
                raise Rejected("missing positions", "a slice (or frame) without a valid ImagePositionPatient or "
                                                    "ImageOrientationPatient")
            return _Slice(spec, src, ds, position, orientation, uid, series_uid, frame)
        except Rejected as e:
            failure = failure or e
        except Exception as e:  # a bug or an exotic file: its reason, then the next copy
            failure = failure or Rejected("conversion failed", f"{type(e).__name__}: {str(e)[:300]}")
    raise failure


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    return n / np.linalg.norm(n)


def split_series(slices: list[_Slice]) -> list[list[_Slice]]:
    """Rule 2: groups of equal orientation and size, in the order of (orientation, rows, cols)."""
    groups: list[tuple[np.ndarray, tuple[int, int], list[_Slice]]] = []
    for s in slices:
        for orientation, shape, members in groups:
            if shape == s.shape and np.abs(orientation - s.orientation).max() <= ORIENTATION_TOLERANCE:
                members.append(s)
                break
        else:
            groups.append((s.orientation, s.shape, [s]))
    groups.sort(key=lambda g: (tuple(np.round(g[0], 4)), g[1]))
    return [members for _, _, members in groups]


def stack(slices: list[_Slice], salt: str, max_side: int | None) -> tuple[np.ndarray, dict]:
    """Rules 3-7 on one group: (volume, geometry {spacing, direction, origin}); raises Rejected. The
    slices are decoded only once their geometry passed."""
    if len(slices) < 2:
        raise Rejected("single slice", "a series (or one orientation and size of it) with one slice: no volume")
    orientation = slices[0].orientation
    row, col = orientation[:3] / np.linalg.norm(orientation[:3]), orientation[3:] / np.linalg.norm(orientation[3:])
    normal = _normal(orientation)
    slices = sorted(slices, key=lambda s: float(np.dot(s.position, normal)))
    along = np.array([np.dot(s.position, normal) for s in slices])
    gaps = np.diff(along)
    if gaps.min() < DUPLICATE_TOLERANCE_MM:
        raise Rejected("duplicate positions", f"{int((gaps < DUPLICATE_TOLERANCE_MM).sum())} pair(s) of the "
                                              f"{len(slices)} slices at the same position")
    mean_gap = float((along[-1] - along[0]) / (len(slices) - 1))
    worst = float(np.abs(along - along[0] - mean_gap * np.arange(len(slices))).max())
    if worst > SPACING_TOLERANCE * mean_gap:
        raise Rejected("uneven spacing", f"gaps from {gaps.min():.4g} to {gaps.max():.4g} mm between "
                                         f"{len(slices)} slices (mean {mean_gap:.4g} mm; a slice {worst:.3g} mm "
                                         f"off its even position): missing or extra slices")
    spacing_yx = slices[0].meta["pixel_spacing"]
    if not spacing_yx or len(spacing_yx) != 2 or min(spacing_yx) <= 0:
        raise Rejected("missing positions", "no valid PixelSpacing: the in-plane geometry is unknown")
    offsets = np.array([s.position - slices[0].position for s in slices])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = float(np.linalg.norm(in_plane, axis=1).max())
    if drift > TILT_TOLERANCE_PIXELS * min(spacing_yx):
        raise Rejected("gantry tilt", f"the slices drift {drift:.3g} mm in-plane over the stack (tilted "
                                      f"acquisition); recorded, not resampled")
    for s in slices:
        s.decode(salt, max_side)
    volume = _pixels(slices)
    k = slices[0].info.downsample
    origin = slices[0].position + (k - 1) / 2 * (row * spacing_yx[1] + col * spacing_yx[0])
    return volume, {
        "spacing": [mean_gap, spacing_yx[0] * k, spacing_yx[1] * k],
        "direction": np.stack([row, col, normal], axis=1).reshape(9).tolist(),
        "origin": origin.tolist(),
        "slices": slices,
    }


def _pixels(slices: list[_Slice]) -> np.ndarray:
    """Rule 7: the stacked volume in one integer dtype, exact."""
    infos = [s.info for s in slices]
    if all(i.rescale_applied for i in infos):
        dtype = np.result_type(*(s.pixels.dtype for s in slices))
    else:
        first = infos[0]
        if any((i.rescale_applied, i.rescale_slope, i.rescale_intercept)
               != (first.rescale_applied, first.rescale_slope, first.rescale_intercept) for i in infos) \
                or len({s.pixels.dtype for s in slices}) > 1:
            raise Rejected("modality LUT differs between slices",
                           "the slices' rescale slope/intercept cannot all be applied exactly and differ")
        dtype = slices[0].pixels.dtype
    return np.stack([s.pixels.astype(dtype, copy=False) for s in slices])


def _series_meta(first: _Slice, geometry: dict, modality: str):
    from shards import SampleMeta

    from .convert import pixel_units

    spec, meta, info = first.spec, first.meta, first.info
    applied = all(s.info.rescale_applied for s in geometry["slices"])
    return SampleMeta(
        modality=modality, split=spec["split"], series_hash=spec["series_hash"], study_hash=spec["study_hash"],
        patient_hash=spec["patient_hash"], source_hash=spec["source_hash"],
        pixel_spacing=geometry["spacing"][1:], slice_thickness=meta["slice_thickness"],
        rescale_slope=info.rescale_slope, rescale_intercept=info.rescale_intercept, rescale_applied=applied,
        photometric=meta["photometric"], bits_stored=meta["bits_stored"], bits_allocated=meta["bits_allocated"],
        pixel_representation=meta["pixel_representation"], transfer_syntax=meta["transfer_syntax"],
        body_part=meta["body_part"], manufacturer=meta["manufacturer"],
        window_center=meta["window_center"], window_width=meta["window_width"],
        units=pixel_units(modality, meta.get("rescale_type", ""), applied),
        spacing=geometry["spacing"], direction=geometry["direction"], origin=geometry["origin"],
    )


def run_volume_task(root: str, generation: int, name: str, modality: str, label_names: list[str],
                    salt: str, max_side: int | None, hash_paths: bool, direct_io: bool = True,
                    units: str | None = None) -> dict:
    """Dask task: write volumes shard `name` from its slice list (whole series, ingest.plan), or from its
    NIfTI files (one volume each, ingest.arrays.write_volumes; `units` applies to them only). Idempotent
    like ingest.convert.run_convert_task: a committed shard is left alone, a retry rewrites it."""
    from shards import ShardWriter, sample_key

    from .arrays import is_non_dicom, write_volumes
    from .convert import finish_shard, start_shard
    from .decoders import release_decoded
    from .plan import spec_path

    root = Path(root)
    result = start_shard(root, generation, modality, name)
    if result["skipped"]:
        return result
    series: dict[str, list[dict]] = {}
    specs_read = pq.read_table(spec_path(root, generation, name)).to_pylist()
    for spec in specs_read:
        series.setdefault(spec["series_hash"], []).append(spec)
    errors: list[dict] = []
    writer = ShardWriter(root, modality=modality, name=name, label_names=label_names, direct_io=direct_io)

    def reject(specs: list[dict], e: Rejected) -> None:
        first = min(s["path"] for s in specs)
        errors.append(scan_error(first, "convert", e.reason, f"series of {len(specs)} slice(s): {e.detail}",
                                 salt, hash_paths))

    try:
        if specs_read and is_non_dicom(specs_read[0].get("native_layout")):  # a generation is all NIfTI or all DICOM
            series = {}
            errors = write_volumes(writer, specs_read, modality=modality, salt=salt, hash_paths=hash_paths,
                                   units=units)
        del specs_read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for series_hash, specs in series.items():
                if not series_hash:
                    for spec in specs:
                        reject([spec], Rejected("no SeriesInstanceUID", "a file without a series: no volume"))
                    continue
                loaded: dict = {}  # the multi-frame files of this series, each parsed once
                try:
                    slices = [read_slice(spec, salt, loaded) for spec in specs]
                except Rejected as e:
                    reject(specs, e)
                    continue
                finally:
                    del loaded
                for n, group in enumerate(split_series(slices)):
                    try:
                        volume, geometry = stack(group, salt, max_side)
                    except Rejected as e:
                        reject([s.spec for s in group], e)
                        continue
                    except Exception as e:  # a bug or an exotic series: recorded, the task goes on
                        reject([s.spec for s in group],
                               Rejected("conversion failed", f"{type(e).__name__}: {str(e)[:300]}"))
                        continue
                    first = geometry["slices"][0]
                    labels = first.spec["labels"]
                    writer.write(sample_key(first.series_uid, n, salt), volume,
                                 _series_meta(first, geometry, modality),
                                 labels=np.asarray(labels, np.float32) if labels is not None else None)
                del slices
        finish_shard(writer, root, generation, name, errors, result)  # errors first, then the commit
    except BaseException:
        writer.abort()
        raise
    finally:
        release_decoded()
    return result
