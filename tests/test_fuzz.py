"""The standing fuzz test: a seeded run of `benchmarks.fuzz` over real DICOM (pydicom's files and
../shared/data) through scan, plan and convert; no crash, no hang, bounded memory, a reason for every
rejected file. The longer run is `python -m benchmarks.fuzz` (benchmarks/RESULTS.md)."""
from __future__ import annotations

import hashlib
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.fuzz import MUTATIONS, classify, load_bases, mutant, run

FILES = 400
SEED = 2026


@pytest.fixture(scope="module")
def bases(shared_data):
    return load_bases(shared_data)


def test_seeded_fuzz_run_has_no_findings(bases, tmp_path):
    r = run(FILES, seed=SEED, jobs=1, timeout=60, memory_mib=1024, bases=bases, out=str(tmp_path / "findings"))
    assert r["findings"] == [], r["findings"][:5]
    counts = r["counts"]
    assert counts["accepted"] + counts["rejected"] == FILES
    assert len(r["outcomes"]) == FILES
    for outcome, reason in r["outcomes"].values():
        assert (outcome == "accepted") == (reason == "")  # every rejection says why
    # the mutants reach every stage: some get through, others are turned away at scan, plan and convert
    assert counts["accepted"] >= FILES // 10
    stages = Counter(reason.split(":")[0] for outcome, reason in r["outcomes"].values() if reason)
    assert stages["scan"] and stages["plan"] and stages["convert"], stages
    # the child runs under RLIMIT_AS = its warm-up size + 1 GiB (memory_mib); its RSS stays far below that
    # (~0.3 GiB typical; 1.67 GiB seen once on a loaded machine): 2 GiB flags a runaway decoder
    assert 0 < r["peak_child_rss"] < 2 * 2**30


def test_mutants_are_seeded_and_use_every_mutation(bases):
    names = Counter()
    for i in range(FILES):
        base, data, done = mutant(bases, SEED, i)
        assert 1 <= len(done) <= 3
        names.update(d.split(" ")[0] for d in done)
        if i < 20:
            assert mutant(bases, SEED, i)[1] == data  # the same seed and index: the same bytes
            original = next(b.data for b in bases if b.name == base)
            assert data != original
    assert {m for m in MUTATIONS} <= set(names), names
    assert mutant(bases, SEED, 0)[1] != mutant(bases, SEED + 1, 0)[1]


def _misbehaving(path: str, max_pixel_bytes: int):
    """A stand-in for the ingest functions that crashes, hangs or allocates without bound on some files
    (chosen by content), to check that the driver reports each as a finding and goes on."""
    kind = hashlib.sha1(Path(path).read_bytes()).digest()[0] % 4
    if kind == 0:
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == 1:
        time.sleep(120)
    if kind == 2:
        bytearray(4 * 2**30)
    return classify(path, max_pixel_bytes)


def test_driver_reports_crash_hang_and_memory_and_saves_reproducers(bases, tmp_path):
    files = 5  # with this seed: memory, hang, crash, crash, a normal file
    expected = {}
    for i in range(files):
        kind = hashlib.sha1(mutant(bases, SEED, i)[1]).digest()[0] % 4
        expected[i] = {0: "crash", 1: "hang", 2: "memory"}.get(kind)
    out = tmp_path / "findings"
    r = run(files, seed=SEED, jobs=2, timeout=3, memory_mib=256, bases=bases, out=str(out), target=_misbehaving)
    found = {f["index"]: f for f in r["findings"]}
    assert {i: f["kind"] for i, f in found.items()} == {i: k for i, k in expected.items() if k}
    assert len(r["outcomes"]) == files  # the run went on past every finding
    for i, f in found.items():
        assert Path(f["file"]).read_bytes() == mutant(bases, SEED, i)[1]
        if f["kind"] == "crash":
            assert "SIGSEGV" in f["reason"]
    assert (out / "findings.jsonl").read_text().count("\n") == len(found)
    assert set(expected.values()) == {"crash", "hang", "memory", None}  # the check covers every kind
