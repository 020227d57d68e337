"""Data-parallel behaviour: global equipartition across gloo processes, and a two-node torchrun
(c10d rendezvous on 127.0.0.1) that trains on real images, checkpoints and resumes."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.swav import sinkhorn

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_scores() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    c = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    return z @ c.t()


def _sinkhorn_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        scores = _global_scores().chunk(world)[rank]
        torch.save(sinkhorn(scores, eps=0.03, iterations=3), Path(out) / f"q{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_codes_of_one_process(tmp_path):
    mp.spawn(_sinkhorn_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    split = torch.cat([torch.load(tmp_path / f"q{r}.pt") for r in range(2)])
    whole = sinkhorn(_global_scores(), eps=0.03, iterations=3)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    # The per-process batches alone would give other codes: the all-reduce matters.
    alone = torch.cat([sinkhorn(s) for s in _global_scores().chunk(2)])
    assert not torch.allclose(alone, whole, atol=1e-4)


def _torchrun_pair(port: int, args: list[str], timeout: int = 420) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=medswav-{port}",
           "-m", "train", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.mark.slow
def test_torchrun_two_nodes_train_checkpoint_resume(tmp_path, medmnist_dir):
    run = tmp_path / "run"
    common = ["--data", str(medmnist_dir / "pneumoniamnist.npz"), "--out", str(run), "--arch", "resnet18",
              "--device", "cpu", "--batch-size", "8", "--crop-sizes", "28,16", "--num-crops", "2,2",
              "--min-scale-crops", "0.5,0.2", "--max-scale-crops", "1,0.5", "--num-prototypes", "16",
              "--queue-length", "16", "--epoch-queue-starts", "0", "--freeze-prototypes-steps", "2",
              "--epochs", "1", "--warmup-epochs", "0", "--log-every", "1", "--checkpoint-every", "2",
              "--no-tensorboard"]
    first = _torchrun_pair(_free_port(), common + ["--max-steps", "3"])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["world_size"] == 2
    # Each process keeps its own queue; the checkpoint holds both (8 rows each = 16 / 2 processes).
    assert tuple(state["queue"]["features"].shape) == (2, 1, 2, 8, 128)
    assert (state["queue"]["filled"] == 8).all()
    assert not torch.equal(state["queue"]["features"][0], state["queue"]["features"][1])

    second = _torchrun_pair(_free_port(), common + ["--max-steps", "5", "--resume", "auto"])
    assert any("resumed from" in out and "at step 3" in out for out in second), second[0][-2000:]
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["images_per_s"] > 0 and r["loss"] == r["loss"] for r in rows)
    assert rows[0]["prototypes_frozen"] == 1 and rows[-1]["prototypes_frozen"] == 0
