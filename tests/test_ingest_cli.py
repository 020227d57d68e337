"""Command line, configuration, salt, incremental runs and size limits, on real files."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from _ingest_fixtures import PY, REPO, SALT, all_files, cli, error_rows, manifest_rows, readable_error_rows, run_ingest


def test_help_documents_every_option():
    r = cli("--help")
    assert r.returncode == 0
    for opt in ("--out", "--workers", "--scheduler", "--labels", "--shard-size", "--config", "--salt",
                "--keep-paths", "DATASET.paths", "ingest.paths", "--max-side", "--max-pixel-bytes", "--val-fraction", "--seed", "MEDSWAV_SALT",
                "resume", "incremental", "exit status"):
        assert opt in r.stdout, opt


@pytest.mark.parametrize("args, message", [
    ((), "no sources given"),
    (("/nonexistent/dicom", "--out", "{tmp}/ds"), "source not found: /nonexistent/dicom"),
    (("{dicom}", "--out", "{tmp}/ds", "--scheduler", "tcp://127.0.0.1:9"), "cannot reach Dask scheduler"),
    (("{dicom}", "--out", "{tmp}/ds", "--config", "{tmp}/bad.toml"), "is not valid TOML"),
    (("{dicom}", "--out", "{tmp}/ds", "--config", "{tmp}/unknown.toml"), "unknown setting(s)"),
    (("{dicom}", "--out", "{tmp}/ds", "--shard-size", "lots"), "not a size: 'lots'"),
    (("{dicom}", "--out", "{tmp}/ds", "--labels", "{tmp}/nolabels.csv"), "labels file not found"),
])
def test_cannot_run_gives_one_line_and_status_2(tmp_path, dicom_dir, args, message):
    (tmp_path / "bad.toml").write_text("shard_size = [unclosed\n")
    (tmp_path / "unknown.toml").write_text("shard_sise = '1GB'\n")
    args = [a.format(tmp=tmp_path, dicom=dicom_dir / "ct_kits_abdomen_18") for a in args]
    r = cli(*args, "--no-progress", env_extra={"MEDSWAV_SALT": SALT}, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("ingest:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_deprecated_hash_paths_setting_maps_to_keep_paths(tmp_path, capsys):
    from ingest.config import ConfigError, build_config

    toml = tmp_path / "ingest.toml"
    base = 'out = "/data/ds"\nsources = ["/a"]\n'
    toml.write_text(base + "hash_paths = false\n")
    assert build_config(toml).keep_paths is True and not build_config(toml).hash_paths
    assert "deprecated" in capsys.readouterr().err
    toml.write_text(base + "hash_paths = true\n")
    assert build_config(toml).hash_paths is True
    toml.write_text(base)
    assert build_config(toml).hash_paths is True  # the default: private
    toml.write_text(base + "hash_paths = true\nkeep_paths = true\n")
    with pytest.raises(ConfigError, match="disagree"):
        build_config(toml)


def test_config_file_then_command_line(tmp_path):
    from ingest.config import build_config, parse_size

    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size(512) == 512
    toml = tmp_path / "ingest.toml"
    toml.write_text('[ingest]\nout = "/data/ds"\nsources = ["/a", "/b"]\nshard_size = "256MB"\nworkers = 6\n'
                    'val_fraction = 0.1\n[ingest.modality_map]\nOT = "xr"\n')
    cfg = build_config(toml, workers=3)
    assert (cfg.out, cfg.sources, cfg.shard_size, cfg.workers, cfg.val_fraction) == \
        ("/data/ds", ["/a", "/b"], 256 * 10**6, 3, 0.1)
    assert cfg.modality_map == {"OT": "xr"}


def test_salt_file_is_created_outside_the_dataset_and_reused(tmp_path, dicom_dir):
    src = dicom_dir / "ct_kits_abdomen_18"
    env = {"MEDSWAV_SALT": ""}
    first = cli(src, "--out", tmp_path / "ds", "--workers", "1", "--no-progress", "--dashboard-address", ":0",
                env_extra=env)
    assert first.returncode == 0, first.stderr
    salt_file = tmp_path / "ds.salt"
    assert salt_file.exists() and stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    assert len(salt_file.read_text().strip()) == 64
    assert salt_file.read_text().strip().encode() not in b"".join(
        p.read_bytes() for p in (tmp_path / "ds").rglob("*") if p.is_file())
    keys = {r["key"] for r in manifest_rows(tmp_path / "ds")}
    again = cli(src, "--out", tmp_path / "ds", "--workers", "1", "--no-progress", "--dashboard-address", ":0",
                env_extra=env)
    assert again.returncode == 0 and {r["key"] for r in manifest_rows(tmp_path / "ds")} == keys
    other = cli(src, "--out", tmp_path / "ds", "--workers", "1", "--salt", "a-different-but-strong-salt-0123", env_extra=env)
    assert other.returncode == 2 and "salt differs" in other.stderr


def test_incremental_run_appends_only_new_slices(tmp_path, dicom_dir):
    out = tmp_path / "ds"
    ct, mr = dicom_dir / "ct_kits_abdomen_18", dicom_dir / "mr_transfer_syntaxes"
    _, first = run_ingest([ct], out)
    ct_tars = {p: p.read_bytes() for p in (out / "shards" / "ct").glob("*.tar")}
    errors_before = error_rows(out)
    summary, second = run_ingest([ct, mr], out)
    assert (first.new_slices, second.new_slices, second.already_ingested) == (18, 9, 18)
    rows = manifest_rows(out)
    assert len(rows) == 27 == len({r["key"] for r in rows})
    assert {r["shard"].split("-")[1] for r in rows if r["modality"] == "mr"} == {"g001"}
    assert {p: p.read_bytes() for p in (out / "shards" / "ct").glob("*.tar")} == ct_tars
    assert summary["ingest"]["generations"] == [0, 1]
    # LICENSE of mr_transfer_syntaxes rejected once; nothing rejected twice over the runs
    errors = error_rows(out)
    assert len(errors) == len(errors_before) + 1
    _, third = run_ingest([ct, mr], out)
    assert third.new_slices == 0 and len(manifest_rows(out)) == 27 and len(error_rows(out)) == len(errors)


def test_declared_size_limit_rejects_before_decoding(tmp_path):
    big, small = get_testdata_file("RG1_UNCI.dcm"), get_testdata_file("CT_small.dcm")
    out = tmp_path / "ds"
    run_ingest([big, small], out, max_pixel_bytes="1MB")
    errors = {e["source"]: e for e in readable_error_rows(out)}
    assert errors[big]["stage"] == "plan" and errors[big]["reason"] == "declared size above limit"
    assert "1955x1841" in errors[big]["detail"]
    assert [r["modality"] for r in manifest_rows(out)] == ["ct"]
    # runs that plan no shard at all (every input rejected) still record why, and a later run that reuses
    # their generation number keeps those rows (and the map that resolves their sources)
    later = []
    for n in range(2):
        ds = pydicom.dcmread(big)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        later.append(str(tmp_path / f"big{n}.dcm"))
        ds.save_as(later[-1])
        summary, stats = run_ingest([later[-1]], out, max_pixel_bytes="1MB")
        assert stats.new_slices == 0
    errors = {e["source"]: e for e in readable_error_rows(out)}
    assert all(errors[p]["reason"] == "declared size above limit" for p in [big, *later])
    assert summary["errors"] == len(errors) and len(manifest_rows(out)) == 1


def test_default_keeps_no_source_path_inside_and_the_map_beside_resolves_errors(tmp_path, dicom_dir):
    import pyarrow.dataset as pads

    from ingest.paths import map_dir

    src = dicom_dir / "mr_transfer_syntaxes"
    out = tmp_path / "ds"
    run_ingest([src], out)
    assert len(manifest_rows(out)) == 9
    inv = pads.dataset(out / "inventory", format="parquet").to_table()
    assert set(inv.column("source").to_pylist()) == {""}
    errors = error_rows(out)
    assert errors and all(e["source"].startswith("sha:") for e in errors)
    everything = "".join(str(pads.dataset(p, format="parquet").to_table().to_pylist())
                         for p in out.rglob("*.parquet")) + "".join(
        p.read_text(errors="replace") for p in out.rglob("*.json"))
    assert str(src) not in everything and "LICENSE" not in everything
    assert not (out / "_work").exists()
    # the documented command finds the file behind an error row, from the map beside the dataset
    assert map_dir(out) == tmp_path / "ds.paths" and (map_dir(out).stat().st_mode & 0o777) == 0o700
    hashes = sorted({e["source"] for e in errors})
    import subprocess

    res = subprocess.run([PY, "-m", "ingest.paths", str(out), *hashes, "sha:" + "0" * 32], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = dict(line.split("\t") for line in res.stdout.splitlines())
    assert res.returncode == 1 and lines.pop("sha:" + "0" * 32) == "?"  # unknown hash: exit 1
    assert set(lines) == set(hashes) and {Path(p).name for p in lines.values()} >= {"LICENSE"}
    assert all(Path(p).is_file() and str(p).startswith(str(src)) for p in lines.values())


def test_keep_paths_keeps_clear_paths_inside_and_a_dataset_keeps_its_choice(tmp_path, dicom_dir):
    import pyarrow.dataset as pads

    from ingest.config import ConfigError
    from ingest.paths import map_dir

    src = dicom_dir / "mr_transfer_syntaxes"
    out = tmp_path / "ds"
    run_ingest([src], out, keep_paths=True)
    inv = pads.dataset(out / "inventory", format="parquet").to_table()
    assert all(s.startswith(str(src)) for s in inv.column("source").to_pylist())
    assert any(e["source"] == str(src / "LICENSE") for e in error_rows(out))
    assert not map_dir(out).exists()  # only pending work lived beside it
    # a dataset built with clear paths (also: before hashing became the default) is not mixed with hashes
    with pytest.raises(ConfigError, match="pass --keep-paths"):
        run_ingest([src], out)
    _, again = run_ingest([src], out, keep_paths=True)
    assert again.new_slices == 0 and len(manifest_rows(out)) == 9
    hashed = tmp_path / "hashed"
    run_ingest([src], hashed)
    with pytest.raises(ConfigError, match="without --keep-paths"):
        run_ingest([src], hashed, keep_paths=True)


def test_max_side_reduces_by_integer_block_mean(tmp_path, dicom_dir):
    from ingest.convert import all_frames
    from shards.reader import iter_samples

    src = dicom_dir / "ct_kits_abdomen_18"
    out = tmp_path / "ds"
    run_ingest([src], out, max_side=200)
    full = {tuple(a.ravel()[:64]): a for f in sorted(src.glob("*.dcm")) for a in all_frames(str(f))}
    samples = list(iter_samples(out))
    assert len(samples) == 18
    for _, pixels, meta, _ in samples:
        assert pixels.shape == (170, 170)  # 512 / ceil(512 / 200) = 512 / 3, remainder dropped
        matches = [a for a in full.values()
                   if np.array_equal(np.rint(a[:510, :510].astype(np.float64).reshape(170, 3, 170, 3).mean((1, 3))),
                                     pixels)]
        assert len(matches) == 1
        assert meta["pixel_spacing"] is not None and meta["pixel_spacing"][0] > 1.5  # 3 x the source spacing


def test_scan_tasks_cover_every_file_once(dicom_dir, tmp_path):
    """The client lists only the top levels; tasks (folder walks + file chunks) cover each file once."""
    from ingest.scan import _walk, scan_tasks

    from _ingest_fixtures import all_files

    tasks = scan_tasks([str(dicom_dir), str(dicom_dir / "ct_kits_abdomen_18" / "1-001.dcm")], target_tasks=8,
                       files_per_task=50)
    assert len(tasks) >= 4 and [t.index for t in tasks] == list(range(len(tasks)))
    covered = [f for t in tasks for f in t.files] + [f for t in tasks for d in t.walk for f in _walk(d)]
    assert sorted(set(covered)) == all_files([str(dicom_dir)])
    assert len(covered) == len(set(covered))  # 1-001.dcm, given twice (in its folder and alone), listed once
    out = tmp_path / "ds"
    run_ingest([dicom_dir / "ct_kits_abdomen_18", dicom_dir / "ct_kits_abdomen_18" / "1-001.dcm"], out)
    rows = manifest_rows(out)
    assert len(rows) == 18 and not error_rows(out)  # and ingested once, without a false duplicate error


def test_parquet_labels_keyed_by_sop_instance(tmp_path, dicom_dir):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import pydicom
    from shards import salted_hash

    files = sorted((dicom_dir / "mr_transfer_syntaxes").glob("*.dcm"))
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    pq.write_table(pa.table({"SOPInstanceUID": uids[:3], "finding": [1.0, 0.0, None]}), tmp_path / "labels.parquet")
    out = tmp_path / "ds"
    summary, _ = run_ingest([dicom_dir / "mr_transfer_syntaxes"], out, labels=str(tmp_path / "labels.parquet"))
    by_sop = {r["sop_hash"]: r for r in manifest_rows(out)}
    assert summary["label_names"] == ["finding"]
    assert json.loads(by_sop[salted_hash(uids[0], SALT)]["labels"]) == {"finding": 1.0}
    assert json.loads(by_sop[salted_hash(uids[1], SALT)]["labels"]) == {"finding": 0.0}
    assert not by_sop[salted_hash(uids[2], SALT)]["labelled"]  # known row, unknown value
    assert sum(r["labelled"] for r in by_sop.values()) == 2


def test_rescan_records_each_rejection_once_reading_only_those_sources(tmp_path, dicom_dir):
    from ingest.plan import not_yet_reported, previous_error_keys

    out = tmp_path / "ds"
    mr = dicom_dir / "mr_transfer_syntaxes"
    run_ingest([mr], out)
    errors = error_rows(out)
    assert [e["source"] for e in readable_error_rows(out)] == [str(mr / "LICENSE")]
    license_ = errors[0]["source"]  # private by default: the salted hash (sha:...) of the path
    _, again = run_ingest([mr], out, rescan=True)
    assert again.files == len(all_files([mr])) and error_rows(out) == errors  # rescanned, not recorded twice
    keys = {(e["source"], e["reason"]) for e in errors}
    assert previous_error_keys(out, (), {license_, "elsewhere"}) == keys
    assert previous_error_keys(out, (), {"elsewhere"}) == set()
    assert previous_error_keys(out, ("scan-",), {license_}) == set()
    # what a later generation (g1) keeps of its rejections: only those not reported before
    other = {"source": "elsewhere", "reason": errors[0]["reason"]}
    assert not_yet_reported(out, 1, [dict(errors[0]), other]) == [other]
