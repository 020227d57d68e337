"""Planning as Dask work (ingest.plan.plan_generation) on real DICOM headers: the same plan as planning in
one process whatever the number of buckets, earlier generations' slices found per bucket, and the
shuffle guarantee the DALI reader depends on (the slices of one series spread over many shards)."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from _ingest_fixtures import SALT, all_files, pydicom_sources

SETTINGS = dict(modality_map={}, max_pixel_bytes=2 * 2**30, max_side=None, frames_per_unit=4, val_fraction=0.3,
                seed=7)


def _headers(files: list[str]) -> list[dict]:
    from ingest.scan import Rejected, read_header

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            try:
                rows.append(read_header(f, SALT, False))
            except Rejected:
                pass
    return rows


@pytest.fixture(scope="module")
def real_inventory(dicom_dir, tmp_path_factory) -> list[dict]:
    """Headers of the real series and pydicom's files, plus second copies of some files (same SOP
    instance, another path: one of a single-frame MR, one of a multi-frame file)."""
    copies = tmp_path_factory.mktemp("copies")
    mr = sorted((dicom_dir / "mr_mprage_sagittal_192").iterdir())
    files = all_files([str(dicom_dir / "mr_mprage_sagittal_192"), str(dicom_dir / "ct_kits_abdomen_18"),
                       *pydicom_sources()])
    from pydicom.data import get_testdata_file

    for src in (mr[0], mr[5], Path(get_testdata_file("emri_small.dcm"))):
        dst = copies / f"copy-{src.name}"
        shutil.copyfile(src, dst)
        files.append(str(dst))
    rows = _headers(files)
    assert len(rows) > 300 and sum(r["frames"] > 1 for r in rows) >= 5
    return rows


def _write_inventory(root: Path, generation: int, rows: list[dict], parts: int) -> None:
    from ingest.scan import INVENTORY_SCHEMA

    (root / "inventory").mkdir(parents=True, exist_ok=True)
    for i in range(parts):
        part = pa.Table.from_pylist(rows[i::parts], schema=INVENTORY_SCHEMA)
        pq.write_table(part, root / "inventory" / f"part-g{generation:03d}-{i:05d}-000.parquet")


def _slices(specs: dict[str, pa.Table]) -> dict[str, list[tuple]]:
    cols = ["sop_hash", "frame", "path", "split", "fallbacks", "patient_hash"]
    return {name: [tuple(str(r[c]) for c in cols) for r in t.select(cols).to_pylist()] for name, t in specs.items()}


def _written_specs(root: Path, generation: int, names) -> dict[str, pa.Table]:
    from ingest.plan import spec_path

    return {n: pq.read_table(spec_path(root, generation, n)) for n in names}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        yield c


def test_cluster_planning_equals_one_process_planning_for_any_bucket_count(real_inventory, client, tmp_path):
    from shards import Dataset

    from ingest import plan as planning

    from ingest.scan import INVENTORY_SCHEMA

    inventory = pa.Table.from_pylist(real_inventory, schema=INVENTORY_SCHEMA)
    inventory = planning.first_per_source(inventory.append_column("path", inventory.column("source")))
    expected_plan, expected = planning.make_plan(inventory, generation=0, shard_size=1_500_000, previous=set(),
                                                 **SETTINGS)
    assert len(expected) >= 8 and {i["split"] for i in expected_plan.shards.values()} == {"train", "val"}
    assert any(e["reason"] == "duplicate SOPInstanceUID" for e in expected_plan.errors)
    assert any(len(f) for t in expected.values() for f in t.column("fallbacks").to_pylist())
    for buckets, parts in ((1, 3), (7, 9)):  # 9 parts on 2 workers: phase A reads 3 parts per task
        root = tmp_path / f"b{buckets}"
        _write_inventory(root, 0, real_inventory, parts=parts)
        assert len(planning.part_groups([str(i) for i in range(parts)], len(real_inventory), 2)) == 3  # 3 x 1 part, 3 x 3 parts
        plan = planning.plan_generation(client, root, 0, rows=len(real_inventory), shard_size=1_500_000, salt=SALT,
                                        hash_paths=False, labels_path=None, buckets=buckets, **SETTINGS)
        assert plan.shards == expected_plan.shards
        assert _slices(_written_specs(root, 0, plan.shards)) == _slices(expected)
        errors = Dataset(root).errors()
        assert sorted(zip(errors.column("source").to_pylist(), errors.column("reason").to_pylist())) == \
            sorted((e["source"], e["reason"]) for e in expected_plan.errors)
        # the plan records give each shard's slices back in write order (what rewriting a lost shard uses)
        records = planning.shard_records(root, 0, sorted(plan.shards))
        for name, spec in _written_specs(root, 0, plan.shards).items():
            mine = records.filter(pa.compute.equal(records.column("shard"), name))
            assert mine.column("sop_hash").to_pylist() == spec.column("sop_hash").to_pylist()
            assert mine.column("frame").to_pylist() == spec.column("frame").to_pylist()


def test_phase_a_tasks_group_parts_without_exceeding_a_bucket_of_rows():
    from ingest.plan import BUCKET_ROWS, part_groups

    parts = [f"p{i:03d}" for i in range(100)]
    for rows, workers, tasks in ((20_000, 1, 2), (20_000, 2, 4), (10 * BUCKET_ROWS, 2, 10), (300 * BUCKET_ROWS, 8, 100)):
        groups = part_groups(parts, rows, workers)
        assert len(groups) == tasks and [p for g in groups for p in g] == parts  # every part once, in order
        assert max(map(len, groups)) * rows / len(parts) <= max(BUCKET_ROWS, rows / len(parts))
    assert part_groups([], 0, 2) == []


def test_a_later_generation_skips_every_slice_planned_before_whatever_the_bucket_counts(real_inventory, client,
                                                                                       tmp_path):
    from ingest import plan as planning

    def planned_keys(root, generation, plan):
        return {(r["sop_hash"], r["frame"]) for t in _written_specs(root, generation, plan.shards).values()
                for r in t.select(["sop_hash", "frame"]).to_pylist()}

    run = dict(shard_size=1_500_000, salt=SALT, hash_paths=False, labels_path=None, **SETTINGS)
    once = tmp_path / "once"
    _write_inventory(once, 0, real_inventory, parts=2)
    everything = planning.plan_generation(client, once, 0, rows=len(real_inventory), buckets=3, **run)
    root = tmp_path / "ds"
    first = real_inventory[: len(real_inventory) // 2]
    _write_inventory(root, 0, first, parts=2)
    g0 = planning.plan_generation(client, root, 0, rows=len(first), buckets=7, **run)
    planning.write_plan_meta(root, 0, {"generation": 0, "status": "complete", "shards": g0.shards})
    _write_inventory(root, 1, real_inventory, parts=3)  # the first half again, and the rest
    g1 = planning.plan_generation(client, root, 1, rows=len(real_inventory), buckets=5, **run)
    assert g0.slices > 100 and g1.already_ingested == g0.slices
    assert g0.slices + g1.slices == everything.slices
    assert not planned_keys(root, 0, g0) & planned_keys(root, 1, g1)
    assert planned_keys(root, 0, g0) | planned_keys(root, 1, g1) == planned_keys(once, 0, everything)


def test_the_slices_of_one_series_spread_over_many_shards(dicom_dir):
    """The documented shuffle guarantee (docs/INGEST.md, "Shuffle"): a series of S slices whose group
    (modality, split) is cut into n shards lands in shards drawn independently per planning unit, so
    with S >= 4n it touches every shard and no shard holds more than 2 S / n of its slices."""
    from ingest.plan import make_plan
    from ingest.scan import INVENTORY_SCHEMA

    rows = _headers([str(p) for p in sorted((dicom_dir / "mr_mprage_sagittal_192").iterdir())])
    series = {r["series_hash"] for r in rows}
    assert len(rows) == 192 and len(series) == 1
    inventory = pa.Table.from_pylist(rows, schema=INVENTORY_SCHEMA)
    inventory = inventory.append_column("path", inventory.column("source"))
    plan, specs = make_plan(inventory, generation=0, shard_size=2_000_000, previous=set(),
                            **{**SETTINGS, "val_fraction": 0.0})
    n = len(plan.shards)
    assert 10 <= n <= 192 // 4
    per_shard = [t.num_rows for t in specs.values()]
    assert sum(per_shard) == 192 and len(per_shard) == n
    assert max(per_shard) <= 2 * 192 / n
    # inside a shard, neighbouring slices of the series are not neighbours in the write order
    for t in specs.values():
        paths = t.column("path").to_pylist()
        assert paths != sorted(paths) or len(paths) < 3
