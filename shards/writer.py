"""ShardWriter: one shard = one tar + its DALI index + its manifest part, committed atomically.

Commit order is tar, index, then the manifest part: a shard exists for readers exactly when its manifest
part exists. A retried task writes the same name again and replaces the files instead of duplicating.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from .atomic import write_atomically, write_parquet_atomically
from .checksum import crc32
from .index import Member, write_index
from .layout import LABELS_EXT, META_EXT, PIXELS_EXT, idx_path, manifest_path, member_name, tar_path, temporary
from .manifest import KIND_META, LABEL_NAMES_META, MANIFEST_SCHEMA, SUMMARY_META, TAR_CRC32_META, TAR_SIZE_META, UNITS_META
from .sample import KIND_SLICES, KIND_VOLUMES, SPLITS, SampleMeta
from .shardfile import ShardFile

# A fixed integer mtime keeps tars reproducible and avoids PAX headers (a float mtime adds ~1 KB/member).
TAR_MTIME = 0
TAR_COPY_BUFFER = 1 << 30  # larger than any member: tarfile copies a member's data in one read + write


def checksum(data: bytes) -> int:
    """CRC-32 of a member: catches flipped bits and truncation at several GB/s (not a security hash)."""
    return crc32(data)


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes np.save writes, built with one copy of the pixels (np.save into a BytesIO makes three)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return b"".join((header.getvalue(), array.data.cast("B") if array.size else b""))


def _spacing_columns(meta: SampleMeta) -> tuple[float, float, float]:
    """The manifest's (spacing_z, spacing_y, spacing_x) in mm, NaN where unknown: a volume's `spacing`,
    a 2-D sample's `pixel_spacing` (row spacing = y, column spacing = x; no z)."""
    nan = float("nan")
    if meta.depth and meta.spacing is not None:
        return tuple(nan if v is None else float(v) for v in meta.spacing)
    if not meta.depth and meta.pixel_spacing is not None and len(meta.pixel_spacing) == 2:
        return (nan, *(nan if v is None else float(v) for v in meta.pixel_spacing))
    return nan, nan, nan


class ShardWriter:
    """Write samples of one modality into one shard.

    >>> with ShardWriter(root, modality="ct", name="ct-g000-000017") as w:
    ...     w.write(key, pixels, meta)

    `pixels` is a 2-D integer array (a slice) or a 3-D one `(depth, rows, cols)` with depth >= 2 (a volume
    sample, format version 2); one shard holds one kind.
    """

    def __init__(self, root: str | os.PathLike, modality: str, name: str, label_names: Sequence[str] = (),
                 direct_io: bool = True):
        if "." in name or "/" in name:
            raise ValueError(f"shard name {name!r} must not contain '.' or '/'")
        self.root = Path(root)
        self.modality = modality
        self.name = name
        self.label_names = tuple(label_names)
        self._token = uuid.uuid4().hex[:12]
        self._tar = tar_path(self.root, modality, name)
        self._tar.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_tar = temporary(self._tar, self._token)
        self._rows: list[dict] = []
        self._samples: list[list[Member]] = []
        self._keys: set[str] = set()
        self._units: set[str] = set()
        self._kind: str | None = None  # of the first sample: a shard (like its dataset) holds one kind
        from webdataset import TarWriter  # imported here: webdataset is slow to import

        self._file = ShardFile(self._tmp_tar, direct=direct_io)  # O_DIRECT where the filesystem allows
        self._tarwriter = TarWriter(io.BytesIO(), encoder=False, mtime=TAR_MTIME, user="medswav", group="medswav")
        # TarWriter opens its tarfile in stream mode ("w|"), which re-buffers every byte through 10 KB
        # records (four copies and ~50 Python calls per CT slice). The same tar written to our seekable
        # file in "w:" mode is byte-identical (tested) and passes each member's data through in one write.
        self._tarwriter.tarstream = tarfile.open(fileobj=self._file, mode="w:", copybufsize=TAR_COPY_BUFFER)
        self._closed = False

    @staticmethod
    def is_committed(root: str | os.PathLike, modality: str, name: str) -> bool:
        return manifest_path(Path(root), modality, name).exists()

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def bytes_written(self) -> int:
        return self._tarwriter.tarstream.offset

    def _add_member(self, key: str, extension: str, data: bytes) -> Member:
        name = member_name(key, extension)
        # A member whose name and size fit the ustar header gets exactly the bytes the PAX writer would give
        # it (which adds an extended header only for what does not fit), without its ~20 us of checks.
        fits = len(name) <= 100 and name.isascii() and len(data) < 8 ** 11  # 100 bytes, 11 octal digits
        self._tarwriter.tarstream.format = tarfile.USTAR_FORMAT if fits else tarfile.PAX_FORMAT
        self._tarwriter.write({"__key__": key, extension: data})
        end = self._tarwriter.tarstream.offset  # end of the data, padded to a 512-byte block
        padded = -(-len(data) // 512) * 512
        return Member(name, end - padded, len(data))

    def write(self, key: str, pixels: np.ndarray, meta: SampleMeta, labels: np.ndarray | None = None) -> None:
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        if not key or "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must be non-empty and free of '.' and '/'")
        if key in self._keys:
            raise ValueError(f"sample key {key} written twice to shard {self.name}")
        pixels = np.asarray(pixels)
        if pixels.dtype.kind not in "iu" or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[0] >= 2)):
            raise ValueError(f"pixels must be a 2-D integer array (rows, cols) or a 3-D one (depth >= 2, rows, "
                             f"cols), got {pixels.dtype} {pixels.shape}")
        kind = KIND_VOLUMES if pixels.ndim == 3 else KIND_SLICES
        if self._kind not in (None, kind):
            raise ValueError(f"shard {self.name} holds {self._kind}: cannot add a {pixels.ndim}-D sample")
        meta.modality = self.modality
        meta.rows, meta.cols = int(pixels.shape[-2]), int(pixels.shape[-1])
        if kind == KIND_VOLUMES:
            meta.depth, meta.frame, meta.frames = int(pixels.shape[0]), 0, int(pixels.shape[0])
        else:
            meta.depth = 0
        meta.dtype = pixels.dtype.name  # stored little-endian whatever the source byte order
        meta.validate()
        label_vector = None
        if self.label_names:
            label_vector = np.full(len(self.label_names), np.nan, dtype=np.float32)
            if labels is not None:
                label_vector[:] = np.asarray(labels, dtype=np.float32).reshape(len(self.label_names))
            meta.labels = {n: float(v) for n, v in zip(self.label_names, label_vector) if np.isfinite(v)} or None
        elif labels is not None:
            raise ValueError("labels given to a ShardWriter opened without label_names")

        json_data = meta.to_json()
        npy_data = npy_bytes(pixels.astype(pixels.dtype.newbyteorder("<"), copy=False))
        # TarWriter sorts a sample's members by extension; we add them one at a time in that same order.
        members = [self._add_member(key, META_EXT, json_data)]
        labels_member = None
        if label_vector is not None:
            labels_member = self._add_member(key, LABELS_EXT, npy_bytes(label_vector))
            members.append(labels_member)
        npy_member = self._add_member(key, PIXELS_EXT, npy_data)
        members.append(npy_member)
        self._samples.append(members)
        self._keys.add(key)
        self._units.add(meta.units)
        self._kind = kind
        spacing_z, spacing_y, spacing_x = _spacing_columns(meta)
        self._rows.append(
            {
                "key": key,
                "shard": self.name,
                "index": len(self._rows),
                "split": meta.split,
                "rows": meta.rows,
                "cols": meta.cols,
                "dtype": meta.dtype,
                "frame": meta.frame,
                "sop_hash": meta.sop_hash,
                "series_hash": meta.series_hash,
                "study_hash": meta.study_hash,
                "patient_hash": meta.patient_hash,
                "source_hash": meta.source_hash,
                "json_offset": members[0].offset,
                "json_size": members[0].size,
                "json_crc32": checksum(json_data),
                "npy_offset": npy_member.offset,
                "npy_size": npy_member.size,
                "npy_crc32": checksum(npy_data),
                "labels_offset": labels_member.offset if labels_member else -1,
                "labels_size": labels_member.size if labels_member else -1,
                "labelled": bool(meta.labels),
                "labels": json.dumps(meta.labels, sort_keys=True) if meta.labels else None,
                "depth": meta.depth,
                "spacing_z": spacing_z,
                "spacing_y": spacing_y,
                "spacing_x": spacing_x,
            }
        )

    def commit(self) -> int:
        """Close the tar and publish tar, index and manifest part (in that order). Returns the sample count."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        self._tarwriter.close()
        self._file.close(sync=True)
        self._closed = True
        try:
            os.replace(self._tmp_tar, self._tar)
            # durable (and the tar's rename with it: same folder) before the manifest part commits the shard
            write_atomically(idx_path(self.root, self.modality, self.name), lambda tmp: write_index(tmp, self._samples))
            table = pa.Table.from_pylist(self._rows, schema=MANIFEST_SCHEMA)
            meta = {
                LABEL_NAMES_META: json.dumps(list(self.label_names)).encode(),
                TAR_CRC32_META: str(self._file.crc).encode(),
                TAR_SIZE_META: str(self._file.size).encode(),
                SUMMARY_META: json.dumps(self._summary(), sort_keys=True).encode(),
                UNITS_META: json.dumps(sorted(self._units)).encode(),
                KIND_META: (self._kind or KIND_SLICES).encode(),
            }
            table = table.replace_schema_metadata(meta)
            write_parquet_atomically(table, manifest_path(self.root, self.modality, self.name))
        finally:
            self._tmp_tar.unlink(missing_ok=True)
        return len(self._rows)

    def _summary(self) -> dict:
        splits = [r["split"] for r in self._rows]
        return {"samples": len(self._rows), **{s: splits.count(s) for s in SPLITS},
                "labelled": sum(1 for r in self._rows if r["labelled"])}

    def abort(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._file.close()
            finally:
                self._tmp_tar.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
