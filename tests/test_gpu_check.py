"""`make gpu-check`'s orchestration on the CPU: limits, failures, skips and the JSON it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import gpu_check, gpu_kit
from benchmarks.gpu_check import Stage

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def test_limits_failures_and_gpu_skips_each_recorded_and_the_run_goes_on(tmp_path):
    marker = tmp_path / "child-still-alive"
    # The slow stage starts a grandchild that would write the marker after 3 s: killing the stage's
    # process group must take it down too.
    slow = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"\"import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).write_text('x')\"]); "
            f"print('working', flush=True); time.sleep(60)")
    figures = "import json, os; json.dump({'samples_per_s': 12.5}, open(os.environ['MEDSWAV_STAGE_JSON'], 'w'))"
    stages = [Stage("slow", "runs past its limit", 1.5, [PY, "-c", slow]),
              Stage("fails", "exits 3", 30, [PY, "-c", "import sys; print('boom'); sys.exit(3)"]),
              Stage("gpu", "needs a GPU", 30, [PY, "-c", "raise SystemExit(1)"], needs_gpu=True),
              Stage("absent", "not in this checkout", 30, None, unavailable="not available: no harness"),
              Stage("figures", "writes figures", 30, [PY, "-c", figures])]
    t0 = time.monotonic()
    report = gpu_check.run_stages(stages, tmp_path / "out", budget=120, gpu=False)
    assert time.monotonic() - t0 < 20
    by = {r["key"]: r for r in report["stages"]}
    assert [r["key"] for r in report["stages"]] == ["slow", "fails", "gpu", "absent", "figures"]
    assert by["slow"]["status"] == "timeout" and 1.5 <= by["slow"]["seconds"] < 5
    assert "working" in by["slow"]["log_tail"]
    assert by["fails"]["status"] == "failed" and by["fails"]["returncode"] == 3 and "boom" in by["fails"]["log_tail"]
    assert by["gpu"]["status"] == "skipped" and by["gpu"]["reason"] == "skipped: no GPU" and by["gpu"]["seconds"] == 0
    assert by["absent"]["status"] == "skipped" and by["absent"]["reason"] == "not available: no harness"
    assert by["figures"]["status"] == "ok" and by["figures"]["figures"] == {"samples_per_s": 12.5}
    assert report["counts"] == {"ok": 1, "failed": 1, "timeout": 1, "skipped": 2}

    on_disk = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(on_disk) == {"format", "started", "seconds", "budget_s", "gpu", "dali", "counts", "stages"}
    assert all(set(r) == set(gpu_check.STAGE_KEYS) for r in on_disk["stages"])
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| slow | timeout |" in summary and "| figures | ok |" in summary and "samples_per_s=12.5" in summary
    assert (tmp_path / "out" / "logs" / "fails.log").read_text().splitlines()[-1] == "boom"
    time.sleep(3.5)
    assert not marker.exists(), "the timed-out stage's child outlived the kill"


def test_budget_spent_skips_the_remaining_stages(tmp_path):
    stages = [Stage("first", "sleeps", 30, [PY, "-c", "import time; time.sleep(1)"]),
              Stage("second", "never starts", 30, [PY, "-c", "pass"])]
    report = gpu_check.run_stages(stages, tmp_path, budget=5.5, gpu=False)
    first, second = report["stages"]
    assert first["status"] == "ok"
    assert second["status"] == "skipped" and "budget" in second["reason"]


def test_pytest_counts_from_the_summary_line():
    text = "....s\nSKIPPED [1] x\n3 passed, 1 skipped, 2 deselected, 1 error in 4.2s\n"
    assert gpu_check.pytest_counts(text) == {"passed": 3, "skipped": 1, "deselected": 2, "error": 1}


def test_default_stages_cover_the_issue_in_order(tmp_path):
    keys = [s.key for s in gpu_check.default_stages(tmp_path)]
    assert keys == ["env", "dali", "plugin", "harness", "pytest", "augment", "train_step", "ddp"]
    stages = {s.key: s for s in gpu_check.default_stages(tmp_path)}
    assert {"tests/test_augment_ops.py", "tests/test_augment_pipeline.py"} <= set(stages["pytest"].command)
    assert "-m" in stages["pytest"].command and "gpu" in stages["pytest"].command
    assert not stages["ddp"].needs_dali and stages["ddp"].needs_gpu


def test_dali_stage_installs_a_staged_kit_and_later_stages_see_it(tmp_path, dicom_dir):
    """The real `dali` stage on a staged kit (a small real wheel), then a stage importing from it."""
    from test_gpu_kit import make_wheel
    payload_dir = tmp_path / "payload"
    (payload_dir / "wheels").mkdir(parents=True)
    dcm = sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[0]
    make_wheel(payload_dir / "wheels", "medswav_kit_probe", {"medswav_kit_probe/__init__.py": b"X = 1\n",
                                                             "medswav_kit_probe/a.dcm": dcm.read_bytes()})
    import tarfile
    with tarfile.open(payload_dir / "data.tar.gz", "w:gz") as tar:
        tar.add(dcm, arcname="dicom/a.dcm")
    with tarfile.open(tmp_path / gpu_kit.PAYLOAD, "w") as tar:
        for p in sorted(payload_dir.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(payload_dir)))
    gpu_kit.split(tmp_path / gpu_kit.PAYLOAD, tmp_path / "kit", 64 * 1024)
    stage_dir = tmp_path / "stage"
    for part in sorted((tmp_path / "kit").glob("part-*")):
        gpu_kit.stage(part, stage_dir)
    env = {**os.environ, "MEDSWAV_GPU_STAGE": str(stage_dir)}
    env.pop("MEDSWAV_SHARED_DATA", None)
    probe = ("import os, medswav_kit_probe, pathlib; "
             "print(pathlib.Path(os.environ['MEDSWAV_SHARED_DATA'], 'dicom', 'a.dcm').stat().st_size)")
    stages = [Stage("dali", "kit", 120, [PY, "-m", "benchmarks.gpu_check", "--install-kit"]),
              Stage("uses_kit", "imports from the kit", 60, [PY, "-c", probe])]
    report = gpu_check.run_stages(stages, tmp_path / "out", budget=200, env=env, gpu=False)
    dali, uses = report["stages"]
    # DALI itself comes from this venv here; the kit's wheel and data are what the later stage sees.
    assert dali["status"] == "ok", dali["log_tail"]
    assert dali["figures"]["source"] == "kit" and dali["figures"]["wheels"] == 1
    assert uses["status"] == "ok", uses["log_tail"]
    assert uses["log_tail"].splitlines()[-1] == str(dcm.stat().st_size)


def test_cli_on_a_machine_without_gpu_skips_quickly(tmp_path):
    env = {**os.environ, "MEDSWAV_GPU_STAGE": str(tmp_path / "nothing-staged")}
    run = subprocess.run([PY, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "out"), "--only", "harness,ddp,plugin"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["gpu"] is False
    assert [(r["key"], r["status"]) for r in report["stages"]] == [("plugin", "skipped"), ("harness", "skipped"),
                                                                   ("ddp", "skipped")]
    assert {r["reason"] for r in report["stages"] if r["key"] != "harness"} == {"skipped: no GPU"}
