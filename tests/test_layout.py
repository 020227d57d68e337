"""Where the format's names live: shards/ alone; ingest's modules import without cycles."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

import shards
from shards.verify import verify

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_every_ingest_and_shards_module_imports_first():
    """Each module imported first (the project's modules forgotten in between, third-party ones kept so
    that this stays cheap): a module-level import cycle fails here as "partially initialized module"."""
    modules = sorted([*(f"ingest.{p.stem}" for p in (REPO / "ingest").glob("*.py") if p.stem != "__init__"),
                      *(f"shards.{p.stem}" for p in (REPO / "shards").glob("*.py") if p.stem != "__init__")])
    code = f"""
import importlib, sys
failed = []
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("ingest", "shards")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{{name}}: {{type(e).__name__}}: {{e}}")
print("\\n".join(failed))
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


def test_config_validation_uses_the_format_modalities_without_the_planner(dicom_dir, tmp_path):
    """The command line's checks take the modality names from shards (one list) and load neither the
    planner (the old config <-> plan cycle) nor pyarrow."""
    code = f"""
import sys
from ingest.config import ConfigError, build_config
import shards.sample
try:
    build_config(sources=[{str(dicom_dir)!r}], out={str(tmp_path / "out")!r}, modality="pet")
except ConfigError as e:
    print(e)
cfg = build_config(sources=[{str(dicom_dir)!r}], out={str(tmp_path / "out")!r}, modality="mr", units="raw")
print(cfg.modality, cfg.units)
print(sorted(m for m in ("ingest.plan", "pyarrow") if m in sys.modules))
print(shards.sample.MODALITIES)
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    refused, accepted, loaded, modalities = proc.stdout.strip().splitlines()
    assert refused == f"--modality must be one of {modalities}, got 'pet'"
    assert accepted == "mr raw"
    assert loaded == "[]"


@pytest.fixture()
def small_dataset(tmp_path, dicom_dir):
    """One CT and one MR shard of real slices (4 each), with dataset.json and shard tables."""
    for modality, folder in (("ct", "ct_kits_abdomen_18"), ("mr", "mr_mprage_sagittal_192")):
        with shards.ShardWriter(tmp_path, modality, f"{modality}-g000-000000") as w:
            for path in sorted((dicom_dir / folder).glob("*.dcm"))[:4]:
                ds = pydicom.dcmread(path)
                w.write(shards.sample_key(ds.SOPInstanceUID, 0, "test-salt"), ds.pixel_array,
                        shards.SampleMeta(modality=modality, split="train"))
    shards.write_dataset_json(tmp_path)
    return tmp_path


def test_atomic_write_that_fails_midway_leaves_the_old_file_and_no_temporary(small_dataset):
    from shards.atomic import write_atomically, write_text_atomically
    from shards.layout import table_path
    from shards.manifest import SHARD_TABLE_SCHEMA

    info = small_dataset / "dataset.json"
    old_info = info.read_bytes()
    new_info = old_info.replace(b'"samples": 8', b'"samples": 9')
    assert new_info != old_info

    def half_then_fail(tmp):
        tmp.write_bytes(new_info[: len(new_info) // 2])
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(info, half_then_fail)
    assert info.read_bytes() == old_info

    # a Parquet file whose second batch has the wrong schema: pyarrow fails after writing the first
    table_file = table_path(small_dataset, "ct")
    old_table = table_file.read_bytes()
    rows = shards.Dataset(small_dataset).shard_table("ct")
    manifest = shards.Dataset(small_dataset).manifest("ct")

    def rows_then_wrong_schema(tmp):
        with pq.ParquetWriter(tmp, SHARD_TABLE_SCHEMA) as writer:
            writer.write_table(rows)
            writer.write_table(manifest)

    with pytest.raises(ValueError, match="schema"):
        write_atomically(table_file, rows_then_wrong_schema)
    assert table_file.read_bytes() == old_table
    assert [p for p in small_dataset.rglob("*") if ".tmp-" in p.name] == []
    assert verify(small_dataset).ok

    # exclusive: the first writer wins, a second finds the name taken and changes nothing
    once = small_dataset / "created-once.txt"
    assert write_text_atomically(once, "first\n", exclusive=True)
    assert not write_text_atomically(once, "second\n", exclusive=True)
    assert once.read_text() == "first\n"
    write_text_atomically(info, new_info.decode())
    assert json.loads(info.read_text())["samples"] == 9
    assert [p for p in small_dataset.rglob("*") if ".tmp-" in p.name] == []
