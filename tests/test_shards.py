"""The shard format on real DICOM pixels: write, read back three ways, verify, catch corruption."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pydicom
import pytest

import shards
from shards.index import read_index
from shards.verify import verify

SALT = "test-salt"


@pytest.fixture(scope="module")
def real_slices(dicom_dir):
    """(sop_uid, pixels) of the 18 real CT slices and 12 real MR slices."""
    out = []
    for folder, count in (("ct_kits_abdomen_18", 18), ("mr_mprage_sagittal_192", 12)):
        for path in sorted((dicom_dir / folder).glob("*.dcm"))[:count]:
            ds = pydicom.dcmread(path)
            out.append((folder[:2], ds.SOPInstanceUID, ds.pixel_array))
    return out


def _write(root, real_slices, label_names=()):
    by_modality = {}
    for modality, uid, pixels in real_slices:
        by_modality.setdefault(modality, []).append((uid, pixels))
    for modality, items in by_modality.items():
        with shards.ShardWriter(root, modality, f"{modality}-g000-000000", label_names=label_names) as w:
            for i, (uid, pixels) in enumerate(items):
                meta = shards.SampleMeta(modality=modality, split="val" if i % 5 == 0 else "train",
                                         sop_hash=shards.salted_hash(uid, SALT))
                labels = np.array([i % 2], np.float32) if label_names and i % 3 else None
                w.write(shards.sample_key(uid, 0, SALT), pixels, meta, labels=labels)
    return shards.write_dataset_json(root)


@pytest.fixture()
def dataset(tmp_path, real_slices):
    _write(tmp_path, real_slices)
    return tmp_path


def test_keys_are_dot_free_stable_and_salted():
    uid = "1.3.12.2.1107.5.2.19.45152.2013030808110258929186035"
    key = shards.sample_key(uid, 3, SALT)
    assert "." not in key and len(key) == 24 and key == shards.sample_key(uid, 3, SALT)
    assert key != shards.sample_key(uid, 4, SALT)
    assert key != shards.sample_key(uid, 3, "other-salt")
    assert shards.salted_hash(uid, SALT) != shards.salted_hash(uid, "other-salt")
    assert shards.salted_hash(None, SALT) == "" and shards.salted_hash("  ", SALT) == ""
    with pytest.raises(ValueError):
        shards.salted_hash(uid, "")


def test_summary_counts(dataset, real_slices):
    info = shards.Dataset(dataset).info
    assert info["format_version"] == 1 and info["kind"] == "slices"  # slices stay version 1 (FORMAT.md)
    assert info["modalities"]["ct"]["samples"] == 18 and info["modalities"]["mr"]["samples"] == 12
    assert info["modalities"]["ct"]["val"] == 4 and info["modalities"]["ct"]["train"] == 14
    assert info["samples"] == 30


def test_manifest_is_a_hive_dataset(dataset):
    table = pads.dataset(dataset / "manifest", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 30
    assert sorted(set(table.column("modality").to_pylist())) == ["ct", "mr"]
    assert shards.Dataset(dataset).manifest("ct").num_rows == 18


def test_webdataset_reader_is_bit_exact(dataset, real_slices):
    expected = {shards.sample_key(uid, 0, SALT): pixels for _, uid, pixels in real_slices}
    seen = {}
    for key, pixels, meta, labels in shards.reader.iter_samples(dataset):
        assert labels is None
        assert pixels.dtype == expected[key].dtype and np.array_equal(pixels, expected[key])
        assert (meta["rows"], meta["cols"]) == pixels.shape
        seen[key] = meta["modality"]
    assert set(seen) == set(expected)
    assert sum(1 for _ in shards.reader.iter_samples(dataset, "ct", split="val")) == 4


def test_dali_reads_our_index(dataset, real_slices):
    from nvidia.dali import fn, pipeline_def

    expected = {shards.sample_key(uid, 0, SALT): pixels for m, uid, pixels in real_slices if m == "ct"}
    shard = shards.Dataset(dataset).shards("ct")[0]

    @pipeline_def(batch_size=6, num_threads=1, device_id=None)
    def pipe():
        npy, meta = fn.readers.webdataset(paths=[str(shard.tar)], index_paths=[str(shard.idx)], ext=["npy", "json"])
        return fn.decoders.numpy(npy), meta

    p = pipe()
    p.build()
    got = {}
    for _ in range(3):
        pixels, meta = p.run()
        for i in range(len(pixels)):
            m = json.loads(bytes(np.array(meta[i])))
            got[m["sop_hash"]] = np.array(pixels[i])
    manifest = shards.Dataset(dataset).manifest("ct").to_pylist()
    assert len(got) == 18
    for row in manifest:
        assert np.array_equal(got[row["sop_hash"]], expected[row["key"]])


def test_tar_is_plain_ustar_with_integer_mtime(dataset):
    shard = shards.Dataset(dataset).shards("mr")[0]
    with tarfile.open(shard.tar) as tf:
        members = tf.getmembers()
    assert all(m.mtime == 0 and not m.pax_headers for m in members)
    # One 512-byte header per member: data offsets are exactly one block after each header.
    assert all(m.offset_data == m.offset + 512 for m in members)
    assert [m.name for m in members][:2] == [members[0].name.split(".")[0] + ".json", members[0].name.split(".")[0] + ".npy"]


@pytest.mark.parametrize("direct_io", [True, False])
def test_tar_is_byte_identical_to_webdatasets_stream_writer(tmp_path, real_slices, monkeypatch, direct_io):
    """ShardWriter swaps TarWriter's stream-mode tarfile for a seekable one and writes it in background
    blocks (O_DIRECT or buffered): the bytes must be exactly what webdataset's own TarWriter writes."""
    import io

    import webdataset

    import shards.shardfile as shardfile
    import shards.writer as writer

    monkeypatch.setattr(shardfile, "BLOCK", 64 << 10)  # many blocks, members straddling them
    reference = io.BytesIO()
    tw = webdataset.TarWriter(reference, encoder=False, mtime=writer.TAR_MTIME, user="medswav", group="medswav")
    with shards.ShardWriter(tmp_path, "ct", "ct-g000-000000", direct_io=direct_io) as w:
        assert w._file.direct == direct_io or _filesystem(tmp_path) == "tmpfs"  # ext4 / xfs take O_DIRECT
        for i, (modality, uid, pixels) in enumerate(real_slices):
            key = shards.sample_key(uid, 0, SALT)
            meta = shards.SampleMeta(modality="ct", split="train", sop_hash=shards.salted_hash(uid, SALT))
            w.write(key, pixels, meta)
            tw.write({"__key__": key, "json": meta.to_json(), "npy": writer.npy_bytes(pixels.astype(pixels.dtype.newbyteorder("<")))})
        # a key too long for a ustar header: the member gets a PAX extended header, as with TarWriter
        key = "k" * 110
        meta = shards.SampleMeta(modality="ct", split="train", sop_hash=shards.salted_hash("long", SALT))
        w.write(key, pixels, meta)
        tw.write({"__key__": key, "json": meta.to_json(), "npy": writer.npy_bytes(pixels.astype(pixels.dtype.newbyteorder("<")))})
    tw.close()
    written = (tmp_path / "shards" / "ct" / "ct-g000-000000.tar").read_bytes()
    assert len(written) > 3 << 20 and written == reference.getvalue()


def _filesystem(path) -> str:
    """The type of the filesystem holding `path` (longest mount point in /proc/mounts)."""
    best, kind = "", ""
    for line in open("/proc/mounts"):
        _, mount, fs = line.split()[:3]
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fs
    return kind


def test_shard_file_switches_to_buffered_writes_when_o_direct_is_refused(tmp_path, monkeypatch):
    """Some filesystems accept O_DIRECT at open and refuse the writes (EINVAL): the file must carry on
    with ordinary writes and still hold exactly the bytes given."""
    import errno
    import fcntl

    import shards.shardfile as shardfile

    real_pwrite, refused = os.pwrite, []

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(shardfile.os, "pwrite", pwrite)
    monkeypatch.setattr(shardfile, "BLOCK", 1 << 20)
    data = np.random.default_rng(1).integers(0, 256, (3 << 20) + 123, dtype=np.uint8).tobytes()
    f = shardfile.ShardFile(tmp_path / "x.tar")
    assert f.direct or _filesystem(tmp_path) == "tmpfs"
    f.write(data[:5]), f.write(data[5:])
    f.close(sync=True)
    assert (tmp_path / "x.tar").read_bytes() == data and not f.direct
    assert refused or _filesystem(tmp_path) == "tmpfs"  # the first block(s) in flight were refused
    assert all(offset % shardfile.BLOCK == 0 for offset in refused)


def test_shard_files_reuse_blocks_and_a_short_file_holds_none_of_the_last_ones_bytes(tmp_path, monkeypatch):
    """A closed shard file's blocks serve the next one (no fresh pages to fault in); the next file's
    padded last block still carries the earlier file's bytes, which must never reach the file."""
    import zlib

    import shards.shardfile as shardfile

    monkeypatch.setattr(shardfile, "BLOCK", 1 << 20)
    monkeypatch.setattr(shardfile, "_SPARE_BLOCKS", [])
    rng = np.random.default_rng(2)
    first = rng.integers(1, 256, (2 << 20) + 5000, dtype=np.uint8).tobytes()  # no zero byte anywhere
    f = shardfile.ShardFile(tmp_path / "a.tar")
    f.write(first)
    f.close(sync=True)
    spare = list(shardfile._SPARE_BLOCKS)
    assert len(spare) == shardfile.IN_FLIGHT + 1
    second = bytes(777)  # zeros, shorter than one alignment unit
    g = shardfile.ShardFile(tmp_path / "b.tar")
    assert {id(b) for b in g._blocks} == {id(b) for b in spare}  # the same blocks, not new mappings
    g.write(second)
    g.close(sync=True)
    assert (tmp_path / "b.tar").read_bytes() == second and g.crc == zlib.crc32(second)
    assert (tmp_path / "a.tar").read_bytes() == first
    # an aborted file (close without sync after a failed write) does not hand its blocks on
    monkeypatch.setattr(shardfile, "_SPARE_BLOCKS", [])
    h = shardfile.ShardFile(tmp_path / "c.tar")
    h._error = OSError(28, "No space left on device")
    with pytest.raises(OSError):
        h.close(sync=True)
    assert shardfile._SPARE_BLOCKS == [] and all(b.closed for b in h._blocks)


def test_checksums_are_zlib_crc32():
    import zlib

    from shards.checksum import crc32

    data = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data[1000:], crc32(data[:1000])) == zlib.crc32(data)  # running value, as the tar's CRC
    assert crc32(b"") == 0


def test_verify_passes_then_catches_a_flipped_byte_anywhere(dataset):
    assert verify(dataset).ok
    shard = shards.Dataset(dataset).shards("ct")[0]
    original = shard.tar.read_bytes()
    index = read_index(shard.idx)
    npy = next(m for m in index[5] if m.extension == "npy")
    header_byte = index[2][0].offset - 512 + 130  # inside a member header (mode field)
    padding_byte = index[0][0].offset + index[0][0].size + 3  # zero padding after the first json
    for position in (npy.offset + npy.size // 2, header_byte, padding_byte, len(original) - 10):
        data = bytearray(original)
        data[position] ^= 0x40
        shard.tar.write_bytes(bytes(data))
        report = verify(dataset)
        assert not report.ok, f"flip at {position} not detected"
    shard.tar.write_bytes(original)
    assert verify(dataset).ok
    # The member-level checks say which sample is damaged.
    data = bytearray(original)
    data[npy.offset + 100] ^= 1
    shard.tar.write_bytes(bytes(data))
    assert any(f"{npy.key}.npy checksum mismatch" in p for p in verify(dataset).problems)


def test_verify_catches_index_and_summary_mismatch(dataset):
    shard = shards.Dataset(dataset).shards("mr")[0]
    text = shard.idx.read_text().splitlines()
    text[1], text[2] = text[2], text[1]
    shard.idx.write_text("\n".join(text) + "\n")
    assert not verify(dataset).ok
    _ = shards.write_dataset_json(dataset)
    info = json.loads((dataset / "dataset.json").read_text())
    info["modalities"]["ct"]["samples"] += 1
    (dataset / "dataset.json").write_text(json.dumps(info))
    assert any("dataset.json" in p for p in verify(dataset).problems)


def test_failed_writer_commits_nothing(tmp_path, real_slices):
    _, uid, pixels = real_slices[0]
    with pytest.raises(RuntimeError):
        with shards.ShardWriter(tmp_path, "ct", "ct-g000-000009") as w:
            w.write(shards.sample_key(uid, 0, SALT), pixels, shards.SampleMeta(modality="ct", split="train"))
            raise RuntimeError("worker died")
    assert not shards.ShardWriter.is_committed(tmp_path, "ct", "ct-g000-000009")
    assert list(tmp_path.rglob("*.tar")) == [] and list(tmp_path.rglob("*.tmp-*")) == []
    assert shards.Dataset(tmp_path).modalities == []


def test_rewriting_a_shard_replaces_it(tmp_path, real_slices):
    _write(tmp_path, real_slices)
    _write(tmp_path, real_slices)  # a retried task writes the same names again
    assert shards.Dataset(tmp_path).manifest().num_rows == 30
    assert verify(tmp_path).ok


def test_writer_rejects_bad_input(tmp_path, real_slices):
    _, uid, pixels = real_slices[0]
    with shards.ShardWriter(tmp_path, "ct", "ct-g000-000001") as w:
        meta = shards.SampleMeta(modality="ct", split="train")
        with pytest.raises(ValueError):
            w.write("a.b", pixels, meta)
        with pytest.raises(ValueError):
            w.write("abc", pixels.astype(np.float32), meta)
        with pytest.raises(ValueError):
            w.write("abc", pixels, shards.SampleMeta(modality="ct", split="holdout"))
        w.write("abc", pixels, meta)
        with pytest.raises(ValueError):
            w.write("abc", pixels, meta)
    assert shards.Dataset(tmp_path).manifest().num_rows == 1


def test_labels_are_stored_and_masked(tmp_path, real_slices):
    info = _write(tmp_path, real_slices, label_names=("finding",))
    assert info["label_names"] == ["finding"]
    rows = {r["key"]: r for r in shards.Dataset(tmp_path).manifest().to_pylist()}
    labelled = 0
    for key, _, meta, labels in shards.reader.iter_samples(tmp_path):
        assert labels.shape == (1,) and labels.dtype == np.float32
        assert rows[key]["labelled"] == bool(np.isfinite(labels).any())
        labelled += rows[key]["labelled"]
        if rows[key]["labelled"]:
            assert meta["labels"] == {"finding": float(labels[0])}
    assert labelled == info["modalities"]["ct"]["labelled"] + info["modalities"]["mr"]["labelled"] > 0
    assert verify(tmp_path).ok


def test_cli_info_and_verify(dataset):
    info = subprocess.run([sys.executable, "-m", "shards", "info", str(dataset)], capture_output=True, text=True)
    assert info.returncode == 0 and "ct" in info.stdout and "18" in info.stdout
    ok = subprocess.run([sys.executable, "-m", "shards", "verify", "-q", str(dataset)], capture_output=True, text=True)
    assert ok.returncode == 0 and "30 sample(s): OK" in ok.stdout
    tar = shards.Dataset(dataset).shards("ct")[0].tar
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, "-m", "shards", "verify", "-q", str(dataset)], capture_output=True, text=True)
    assert bad.returncode == 1 and "PROBLEM" in bad.stdout
    missing = subprocess.run([sys.executable, "-m", "shards", "info", str(dataset / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "no dataset folder" in missing.stderr


def _verify_cli(root):
    return subprocess.run([sys.executable, "-m", "shards", "verify", "-q", str(root)], capture_output=True, text=True)


def test_verify_reports_duplicate_keys_across_shards(dataset, real_slices):
    # The same CT slices committed a second time under another shard name: every key twice.
    with shards.ShardWriter(dataset, "ct", "ct-g001-000000") as w:
        for modality, uid, pixels in real_slices[:3]:
            w.write(shards.sample_key(uid, 0, SALT), pixels, shards.SampleMeta(modality="ct", split="train"))
    shards.write_dataset_json(dataset)
    result = _verify_cli(dataset)
    assert result.returncode == 1, result.stdout + result.stderr
    problems = [l for l in result.stdout.splitlines() if l.startswith("PROBLEM")]
    assert len(problems) == 1 and "3 duplicate key(s)" in problems[0], result.stdout
    assert "ct/ct-g000-000000" in problems[0] and "ct/ct-g001-000000" in problems[0]
    example = problems[0].rsplit("e.g. ", 1)[1]
    assert example in {shards.sample_key(uid, 0, SALT) for _, uid, _ in real_slices[:3]}



def test_verify_finds_duplicates_when_the_keys_spill_to_bucket_files(dataset, real_slices, monkeypatch):
    """Past KeyBuckets.IN_MEMORY_KEYS the key prefixes go to 256 bucket files: duplicates are found the same."""
    from shards.verify import KeyBuckets

    with shards.ShardWriter(dataset, "ct", "ct-g001-000000") as w:
        for modality, uid, pixels in real_slices[:3]:
            w.write(shards.sample_key(uid, 0, SALT), pixels, shards.SampleMeta(modality="ct", split="train"))
    shards.write_dataset_json(dataset)
    monkeypatch.setattr(KeyBuckets, "IN_MEMORY_KEYS", 4)  # 33 keys in 3 shards: spills after the first
    spilled = []
    original = KeyBuckets._spill
    monkeypatch.setattr(KeyBuckets, "_spill", lambda self: (spilled.append(self.held_keys), original(self)))
    report = verify(dataset, workers=0)
    assert spilled and sum(spilled) == 33
    dup = [p for p in report.problems if "duplicate key(s)" in p]
    assert len(dup) == 1 and dup[0].startswith("3 duplicate key(s) in ct/ct-g000-000000, ct/ct-g001-000000"), report.problems

def test_verify_reports_missing_and_corrupt_metadata_files(dataset):
    (dataset / "dataset.json").unlink()
    result = _verify_cli(dataset)
    assert result.returncode == 1 and "PROBLEM: dataset.json missing" in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr

    (dataset / "dataset.json").write_text('{"format": "medswav-shards", "samp')  # truncated
    result = _verify_cli(dataset)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert any(l.startswith("PROBLEM: dataset.json: not valid JSON") for l in result.stdout.splitlines()), result.stdout
    shards.write_dataset_json(dataset)

    part = dataset / "manifest" / "modality=mr" / "mr-g000-000000.parquet"
    original = part.read_bytes()
    part.write_bytes(original[: len(original) // 2])  # truncated: no footer
    result = _verify_cli(dataset)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert any(l.startswith("PROBLEM: manifest/modality=mr/mr-g000-000000.parquet: unreadable Parquet")
               for l in result.stdout.splitlines()), result.stdout
    part.write_bytes(original)
    assert _verify_cli(dataset).returncode == 0

    errors = dataset / "errors" / "scan-g000.parquet"
    shards.write_errors(dataset, "scan-g000", [{"source": "x.dcm", "stage": "scan", "reason": "not DICOM"}])
    data = bytearray(errors.read_bytes())
    data[4:40] = b"\xff" * 36  # garbage in the first column chunk
    errors.write_bytes(bytes(data))
    result = _verify_cli(dataset)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert any(l.startswith("PROBLEM: errors/scan-g000.parquet: unreadable Parquet")
               for l in result.stdout.splitlines()), result.stdout


def test_reader_refuses_a_damaged_shard_naming_it(dataset):
    import pyarrow.compute as pc

    from shards.verify import DamagedShardError

    shard = shards.Dataset(dataset).shards("mr")[0]
    data = bytearray(shard.tar.read_bytes())
    row = shards.Dataset(dataset).manifest("mr").filter(pc.equal(pc.field("shard"), shard.name)).to_pylist()[0]
    # one bit of pixel data (past the .npy header: the member's last byte): webdataset alone would decode
    # it silently
    data[row["npy_offset"] + row["npy_size"] - 1] ^= 0x01
    shard.tar.write_bytes(bytes(data))
    assert sum(1 for _ in shards.reader.iter_samples(dataset, "ct")) == 18  # the intact modality reads
    with pytest.raises(DamagedShardError, match="shard mr/mr-g000-000000 .*checksum"):
        list(shards.reader.iter_samples(dataset, "mr"))
    assert sum(1 for _ in shards.reader.iter_samples(dataset, "mr", verify=False)) == 12


def _flip_pixel_byte(shard) -> str:
    """One bit of the first sample's pixel data; returns that sample's key."""
    npy = next(m for m in read_index(shard.idx)[0] if m.extension == "npy")
    data = bytearray(shard.tar.read_bytes())
    data[npy.offset + npy.size // 2] ^= 0x01
    shard.tar.write_bytes(bytes(data))
    return npy.key


def test_verify_on_dask_reports_a_flipped_byte_in_each_of_two_shards(dataset):
    ds = shards.Dataset(dataset)
    damaged = {f"{s.modality}/{s.name}": _flip_pixel_byte(s) for s in (ds.shards("ct")[0], ds.shards("mr")[0])}
    report = verify(dataset, workers=2)  # an embedded LocalCluster: one task per shard
    assert report.shards == 2 and report.samples == 30
    for where, key in damaged.items():
        assert f"{where}: tar checksum differs from the manifest (the file was modified)" in report.problems
        assert f"{where}: {key}.npy checksum mismatch" in report.problems
    assert len(report.problems) == 4, report.problems
    # the workers read each tar once: as many bytes as the tars hold, not two or three times that
    assert report.tar_opens == 1
    assert report.tar_bytes_read == sum(s.tar.stat().st_size for m in ds.modalities for s in ds.shards(m))


def test_verify_opens_and_reads_each_tar_once(dataset, monkeypatch):
    import builtins
    import tarfile as tarfile_module

    opens, bytes_read = {}, {}
    real_open = builtins.open

    class CountingFile:
        def __init__(self, f, name):
            self._f, self._name = f, name

        def read(self, *args):
            data = self._f.read(*args)
            bytes_read[self._name] = bytes_read.get(self._name, 0) + len(data)
            return data

        def readall(self):
            return self.read()

        def readinto(self, buffer):
            n = self._f.readinto(buffer)
            bytes_read[self._name] = bytes_read.get(self._name, 0) + (n or 0)
            return n

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def counting_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        if str(file).endswith(".tar"):
            opens[str(file)] = opens.get(str(file), 0) + 1
            return CountingFile(f, str(file))
        return f

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(tarfile_module, "bltn_open", counting_open)
    ds = shards.Dataset(dataset)
    report = verify(dataset, workers=0)  # in this process, where the counting open sees every read
    monkeypatch.undo()
    assert report.ok, report.problems
    tars = {str(s.tar): s.tar.stat().st_size for m in ds.modalities for s in ds.shards(m)}
    assert opens == {t: 1 for t in tars}
    assert bytes_read == tars


def test_verify_reports_a_truncated_tar_without_reading_past_it(dataset):
    shard = shards.Dataset(dataset).shards("mr")[0]
    npy = next(m for m in read_index(shard.idx)[3] if m.extension == "npy")
    size = shard.tar.stat().st_size
    with open(shard.tar, "r+b") as f:
        f.truncate(npy.offset + 1000)  # cut inside the fourth slice's pixels
    report = verify(dataset, workers=0)
    where = "mr/mr-g000-000000"
    assert f"{where}: tar is {npy.offset + 1000} bytes, manifest says {size}" in report.problems
    assert any(p.startswith(f"{where}: tar headers unreadable: member {npy.name} truncated") for p in report.problems), report.problems
    assert not any(p.startswith("ct/") for p in report.problems)
    assert report.tar_bytes_read == npy.offset + 1000 + shards.Dataset(dataset).shards("ct")[0].tar.stat().st_size


def test_verify_reports_an_unreadable_tar_as_that_shards_problem(dataset):
    shard = shards.Dataset(dataset).shards("ct")[0]
    shard.tar.unlink()
    shard.tar.mkdir()  # present but unreadable as a file (as root, permissions would not stop the read)
    result = _verify_cli(dataset)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    problems = [l for l in result.stdout.splitlines() if l.startswith("PROBLEM")]
    assert problems == [f"PROBLEM: ct/{shard.name}: unreadable (IsADirectoryError: [Errno 21] Is a directory: '{shard.tar}')"]
    assert "verified 2 shard(s), 30 sample(s)" in result.stdout


def test_dataset_without_shard_tables_still_reads_and_reindexes(dataset):
    import pyarrow.parquet as pq

    from _ingest_fixtures import expected_shard_table
    from augment_dali.plan import modality_shards
    from shards.layout import table_path
    from shards.manifest import SUMMARY_META

    expected = {m: expected_shard_table(dataset, m) for m in ("ct", "mr")}
    # as written before shard tables and footer summaries existed
    for m in expected:
        table_path(dataset, m).unlink()
    for part in (dataset / "manifest").rglob("*.parquet"):
        table = pq.read_table(part)
        old_meta = {k: v for k, v in table.schema.metadata.items() if k != SUMMARY_META}
        pq.write_table(table.replace_schema_metadata(old_meta), part)
    info = json.loads((dataset / "dataset.json").read_text())
    info["ingest"] = {"generations": [0]}
    (dataset / "dataset.json").write_text(json.dumps(info))

    ds = shards.Dataset(dataset)
    assert {m: ds.shard_table(m).to_pylist() for m in expected} == expected
    assert [(s.name, s.total, s.selected) for s in modality_shards(ds, "ct", "val")] == [("ct-g000-000000", 18, 4)]

    done = subprocess.run([sys.executable, "-m", "shards", "reindex", str(dataset)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {m: pq.read_table(table_path(dataset, m)).to_pylist() for m in expected} == expected
    info = json.loads((dataset / "dataset.json").read_text())
    assert info["ingest"] == {"generations": [0]} and info["modalities"]["ct"]["val"] == 4
    assert info["modalities"]["mr"]["bytes"] == expected["mr"][0]["bytes"]
    assert verify(dataset).ok


def test_verify_catches_a_stale_shard_table(dataset, real_slices):
    _, uid, pixels = real_slices[0]
    with shards.ShardWriter(dataset, "ct", "ct-g001-000000") as w:  # committed after the table was written
        w.write(shards.sample_key(uid, 1, SALT), pixels, shards.SampleMeta(modality="ct", split="train"))
    problems = verify(dataset).problems
    assert any("table/ct.parquet lacks committed shard(s) ct-g001-000000" in p for p in problems)
    shards.write_dataset_json(dataset)
    assert verify(dataset).ok
    (dataset / "manifest" / "modality=ct" / "ct-g001-000000.parquet").unlink()
    (dataset / "shards" / "ct" / "ct-g001-000000.tar").unlink()
    assert any("table/ct.parquet lists uncommitted shard(s) ct-g001-000000" in p for p in verify(dataset).problems)


def test_verify_counts_rows_on_workers_and_catches_a_lying_footer(dataset, monkeypatch):
    """dataset.json and the shard tables are checked against counts the shard tasks take from the manifest
    rows: a footer summary that disagrees with its rows is a problem, and the client reads no manifest row."""
    from shards.manifest import SUMMARY_META

    part = next((dataset / "manifest" / "modality=mr").glob("*.parquet"))
    table = pq.read_table(part)
    meta = dict(table.schema.metadata)
    footer = json.loads(meta[SUMMARY_META])
    footer["train"], footer["val"] = footer["train"] + 1, footer["val"] - 1  # rows unchanged
    meta[SUMMARY_META] = json.dumps(footer).encode()
    pq.write_table(table.replace_schema_metadata(meta), part)
    shards.write_dataset_json(dataset)  # dataset.json and table/mr.parquet now agree with the lying footer

    def no_rows_on_the_client(*args, **kwargs):
        raise AssertionError("the client read manifest rows")

    monkeypatch.setattr(shards.Dataset, "manifest", no_rows_on_the_client)
    report = verify(dataset, workers=2)  # workers are other processes: the patch holds for the client only
    rows_val = sum(1 for s in pq.read_table(part).column("split").to_pylist() if s == "val")
    assert f"manifest/modality=mr/{part.name}: footer summary {footer} disagrees with its rows" in report.problems
    assert f"dataset.json: mr.val is {rows_val - 1}, manifests give {rows_val}" in report.problems
    assert report.shards == 2 and report.samples == 30


# ---- format version 2: volume samples ----

@pytest.fixture(scope="module")
def real_volumes(dicom_dir):
    """(modality, series uid, volume, spacing, direction, origin) of two short real volumes: the first 4
    CT slices and the first 3 MR slices along their slice normal."""
    out = []
    for folder, depth in (("ct_kits_abdomen_18", 4), ("mr_mprage_sagittal_192", 3)):
        slices = [pydicom.dcmread(p) for p in sorted((dicom_dir / folder).glob("*.dcm"))]
        iop = np.asarray(slices[0].ImageOrientationPatient, np.float64)
        normal = np.cross(iop[:3], iop[3:])
        slices.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64))))
        slices = slices[:depth]
        positions = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, np.float64)) for ds in slices])
        spacing = [float(np.diff(positions).mean()), *(float(v) for v in slices[0].PixelSpacing)]
        direction = np.stack([iop[:3], iop[3:], normal], axis=1).reshape(9).tolist()
        out.append((folder[:2], slices[0].SeriesInstanceUID, np.stack([ds.pixel_array for ds in slices]), spacing,
                    direction, [float(v) for v in slices[0].ImagePositionPatient]))
    return out


def _write_volumes(root, real_volumes):
    for modality, uid, volume, spacing, direction, origin in real_volumes:
        with shards.ShardWriter(root, modality, f"{modality}-g000-000000") as w:
            meta = shards.SampleMeta(modality=modality, split="train", series_hash=shards.salted_hash(uid, SALT),
                                     spacing=spacing, direction=direction, origin=origin,
                                     pixel_spacing=spacing[1:])
            w.write(shards.sample_key(uid, 0, SALT), volume, meta)
    return shards.write_dataset_json(root)


def test_volume_samples_round_trip_with_depth_and_spacing(tmp_path, real_volumes):
    info = _write_volumes(tmp_path, real_volumes)
    assert info["format_version"] == 2 and info["kind"] == "volumes"
    ds = shards.Dataset(tmp_path)
    assert ds.kind == "volumes"
    rows = {r["key"]: r for r in ds.manifest().to_pylist()}
    expected = {shards.sample_key(uid, 0, SALT): (v, sp, d, o) for _, uid, v, sp, d, o in real_volumes}
    for key, pixels, meta, _ in shards.reader.iter_samples(tmp_path):
        volume, spacing, direction, origin = expected.pop(key)
        assert pixels.dtype == volume.dtype and np.array_equal(pixels, volume)
        assert (meta["depth"], meta["rows"], meta["cols"]) == volume.shape == (rows[key]["depth"], rows[key]["rows"], rows[key]["cols"])
        assert meta["frames"] == volume.shape[0] and meta["frame"] == 0
        assert meta["spacing"] == spacing and meta["direction"] == direction and meta["origin"] == origin
        assert [rows[key][f"spacing_{a}"] for a in "zyx"] == spacing
    assert not expected
    assert verify(tmp_path).ok
    out = subprocess.run([sys.executable, "-m", "shards", "info", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0 and "kind volumes" in out.stdout
    assert "ct volumes: depth 4-4" in out.stdout and "mr volumes: depth 3-3" in out.stdout


def test_verify_reports_a_volume_whose_shape_differs_from_its_manifest(tmp_path, real_volumes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_volumes(tmp_path, real_volumes)
    part = next((tmp_path / "manifest" / "modality=ct").glob("*.parquet"))
    table = pq.read_table(part)
    depth = table.column_names.index("depth")
    table = table.set_column(depth, "depth", pa.array([3], pa.int32())).replace_schema_metadata(table.schema.metadata)
    pq.write_table(table, part)
    problems = verify(tmp_path).problems
    assert any("npy is uint16(4, 512, 512), manifest says uint16(3, 512, 512)" in p for p in problems), problems
    assert any(".json depth is 4, manifest says 3" in p for p in problems), problems


def test_kinds_do_not_mix(tmp_path, real_volumes, real_slices):
    modality, uid, volume, *_ = real_volumes[0]
    with shards.ShardWriter(tmp_path, modality, "ct-g000-000000") as w:
        w.write("a" * 24, volume, shards.SampleMeta(modality=modality, split="train"))
        with pytest.raises(ValueError, match="holds volumes"):
            w.write("b" * 24, volume[0], shards.SampleMeta(modality=modality, split="train"))
        with pytest.raises(ValueError, match="depth >= 2"):
            w.write("c" * 24, volume[:1], shards.SampleMeta(modality=modality, split="train"))
    with pytest.raises(ValueError, match="holds volumes shards"):
        shards.write_dataset_json(tmp_path, kind="slices")
    _write(tmp_path / "slices", real_slices[:2])
    assert shards.Dataset(tmp_path / "slices").kind == "slices"


def test_manifest_parts_from_before_version_2_read_with_depth_0_and_nan_spacing(dataset):
    import pyarrow.parquet as pq

    old = next((dataset / "manifest" / "modality=ct").glob("*.parquet"))
    table = pq.read_table(old)
    pq.write_table(table.drop_columns(["depth", "spacing_z", "spacing_y", "spacing_x"]), old)
    info = json.loads((dataset / "dataset.json").read_text())
    del info["kind"]
    (dataset / "dataset.json").write_text(json.dumps(info))
    ds = shards.Dataset(dataset)
    assert ds.kind == "slices"
    manifest = ds.manifest()
    assert manifest.num_rows == 30 and manifest.column("depth").null_count == 0
    by_modality = {}
    for row in manifest.to_pylist():
        by_modality.setdefault(row["modality"], []).append(row)
    assert {r["depth"] for r in manifest.to_pylist()} == {0}
    assert all(np.isnan(r["spacing_y"]) for r in by_modality["ct"])
    ct = ds.manifest("ct")
    assert ct.column("depth").to_pylist() == [0] * 18 and np.isnan(ct.column("spacing_x").to_numpy()).all()
    assert verify(dataset).ok
