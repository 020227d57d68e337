"""Stage `ddp` of make gpu-check, run on the CPU: one process under torchrun's environment (gloo),
DDP + SyncBatchNorm conversion path, the queue, checkpoint and exact resume with --deterministic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_process_ddp_queue_checkpoint_and_exact_resume_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train_check", "--out", str(tmp_path / "runs"),
                          "--device", "cpu", "--json", str(tmp_path / "ddp.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})   # three runs on 2 shared cores
    assert run.returncode == 0, run.stdout + run.stderr
    fig = json.loads((tmp_path / "ddp.json").read_text())
    assert fig["setup"].startswith("DDP over gloo")       # one process still runs the DDP code
    assert "deterministic on" in fig["setup"] and fig["deterministic"] == "on"
    assert fig["queue_in_use_at_end"] == 1                 # the last steps used a full queue
    assert fig["resume_exact"] and fig["resume_compared_steps"] == [4, 5, 6] and fig["resume_step"] == 6
    assert fig["resume_max_abs_param_diff"] == 0.0
    # The resumed run started from the part run's checkpoint, not from scratch.
    log = (tmp_path / "runs" / "runs.log").read_text()
    assert "resumed from" in log and "at step 3" in log
