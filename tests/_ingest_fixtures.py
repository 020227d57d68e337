"""Helpers shared by the ingest tests: running a job, finding sources, the pydicom reference decoding."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SALT = "ingest-tests-salt"


def pydicom_sources() -> list[str]:
    from ingest.demo import demo_sources

    return demo_sources()


def all_files(sources: list[str]) -> list[str]:
    out = []
    for src in sources:
        if os.path.isfile(src):
            out.append(src)
            continue
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            out.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(out)


def run_ingest(sources, out, **overrides):
    """In-process job with a small local cluster; returns (dataset.json dict, RunStats)."""
    from ingest.config import build_config
    from ingest.job import run

    settings = dict(sources=[str(s) for s in sources], out=str(out), workers=1, salt=SALT, shard_size="4MB",
                    dashboard_address=":0", progress=False)
    settings.update(overrides)
    return run(build_config(**settings))


def cli(*args, env_extra=None, timeout=300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([PY, "-m", "ingest", *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


def manifest_rows(root) -> list[dict]:
    """Every manifest row; the NaN of an unknown spacing becomes None, so that rows compare equal."""
    from shards import Dataset

    return [{k: None if isinstance(v, float) and v != v else v for k, v in row.items()}
            for row in Dataset(root).manifest().to_pylist()]


def error_rows(root) -> list[dict]:
    from shards import Dataset

    return Dataset(root).errors().to_pylist()


def readable_error_rows(root) -> list[dict]:
    """errors/ rows with each hashed source (`sha:...`, the default) replaced by the path that the map
    beside the dataset holds for it (ingest.paths): a hash the map cannot resolve fails the test."""
    from ingest.paths import resolve

    rows = error_rows(root)
    found = resolve(root, [r["source"] for r in rows if r["source"].startswith("sha:")])
    for r in rows:
        if r["source"].startswith("sha:"):
            r["source"] = found[r["source"][len("sha:"):]]
    return rows


def source_by_hash(files: list[str]) -> dict[str, str]:
    from shards import salted_hash

    return {salted_hash(f, SALT): f for f in files}


# the documented decoder order (docs/INGEST.md): GDCM only when the others fail; "" = uncompressed (no plugin)
DECODER_ORDER = ("pylibjpeg", "pydicom", "pyjpegls", "pillow", "gdcm", "")


def reference_frames(path: str) -> tuple[object, list[np.ndarray]]:
    """pydicom's own decoding of every frame (palette applied), before our integer rules."""
    import pydicom
    from pydicom.pixels import apply_color_lut, pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        for plugin in DECODER_ORDER:
            try:
                arr = pixel_array(ds, decoding_plugin=plugin)
                break
            except Exception as e:
                failure = e
        else:
            raise failure
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
    frames = int(ds.get("NumberOfFrames") or 1)
    arr = arr.astype(arr.dtype.newbyteorder("="))
    return ds, ([arr] if frames == 1 else [arr[i] for i in range(frames)])


def expected_stored(ds, frame: np.ndarray, meta: dict) -> np.ndarray:
    """The documented rules, written out independently of ingest.pixels (values as int64)."""
    a = frame.astype(np.int64)
    if a.ndim == 3:  # colour: BT.601 luma, integer, rounded half up
        return (299 * a[..., 0] + 587 * a[..., 1] + 114 * a[..., 2] + 500) // 1000
    if ds.PhotometricInterpretation == "MONOCHROME1":
        bits = int(ds.BitsStored)
        a = -1 - a if int(ds.PixelRepresentation) == 1 else (2**bits - 1) - (a & (2**bits - 1))
    if meta["rescale_applied"]:
        a = a * int(meta["rescale_slope"]) + int(meta["rescale_intercept"])
    return a


def file_rescale(ds) -> tuple[float, float]:
    """Top-level or shared-functional-group Rescale Slope / Intercept of a file (1, 0 when absent)."""
    try:
        item = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
        return float(item.RescaleSlope), float(item.RescaleIntercept)
    except (AttributeError, IndexError, KeyError):
        pass
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def expected_shard_table(root, modality) -> list[dict]:
    """The shard table of `modality` counted sample by sample from the manifest rows and the tar files."""
    import zlib
    from collections import Counter

    from shards import Dataset
    from shards.layout import tar_path

    import json

    from shards.reader import iter_samples

    rows = Dataset(root).manifest(modality, columns=["key", "shard", "split", "labelled"]).to_pylist()
    shard_of = {r["key"]: r["shard"] for r in rows}
    units: dict[str, set[str]] = {}
    for key, _, meta, _ in iter_samples(root, modality):
        if key in shard_of:
            units.setdefault(shard_of[key], set()).add(meta.get("units", ""))
    out = []
    for shard in sorted({r["shard"] for r in rows}):
        mine = [r for r in rows if r["shard"] == shard]
        splits = Counter(r["split"] for r in mine)
        data = tar_path(root, modality, shard).read_bytes()
        out.append({"shard": shard, "samples": len(mine), "train": splits["train"], "val": splits["val"],
                    "test": splits["test"], "labelled": sum(r["labelled"] for r in mine), "bytes": len(data),
                    "tar_crc32": zlib.crc32(data), "units": json.dumps(sorted(units[shard]))})
    return out
