"""The trainer on a real shard dataset (CT, MR, X-ray, ultrasound slices from ../shared/data) read by
augment_dali's SwavLoader on the CPU: per-modality clustering, hybrid labels, checkpoint and exact resume."""
from __future__ import annotations

import json

import pytest
import torch

from _augment_fixtures import build_dataset

from augment_dali.config import AugmentConfig
from augment_dali.stats import compute_stats, write_stats
from train.main import main


@pytest.fixture(scope="module")
def shard_dataset(tmp_path_factory, dicom_dir, medmnist_dir):
    root = tmp_path_factory.mktemp("train-shards")
    build_dataset(root, dicom_dir, medmnist_dir)
    write_stats(root, compute_stats(root, samples=16, seed=0, config=AugmentConfig(), show_progress=False))
    return root


def _args(root, out, *extra):
    return ["--data", str(root), "--out", str(out), "--arch", "resnet18", "--device", "cpu",
            "--batch-size", "4", "--crop-sizes", "48,24", "--num-crops", "2,2", "--num-prototypes", "6",
            "--queue-length", "0", "--freeze-prototypes-steps", "1", "--epochs", "1", "--beta", "0.5",
            "--warmup-epochs", "0", "--log-every", "1", "--no-tensorboard", "--num-workers", "1", *extra]


@pytest.mark.slow
def test_four_modalities_from_shards_train_and_resume_exactly(tmp_path, shard_dataset):
    straight = main(_args(shard_dataset, tmp_path / "a", "--max-steps", "4"))
    main(_args(shard_dataset, tmp_path / "b", "--max-steps", "2"))
    mid = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert 0 < mid["step_in_epoch"] == 2   # interrupted mid-epoch: the data position is saved, per rank
    assert [(p.dtype, p.dim()) for p in mid["data_positions"]] == [(torch.uint8, 1)]
    resumed = main(_args(shard_dataset, tmp_path / "b", "--max-steps", "4", "--resume", "auto"))

    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for m in ("ct", "mr", "us", "xr"):   # one prototype bank, loss and collapse watch per modality
        assert all(f"loss_ss/{m}" in r and f"code_entropy/{m}" in r for r in rows)
    assert all("loss_sup" in r for r in rows)  # the X-rays carry the pneumonia label
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert state["modalities"] == ["ct", "mr", "us", "xr"] and state["num_labels"] == 1
    assert len([k for k in state["model"] if k.startswith("prototypes.")]) == 4

    # Same batches after the restart: the loader's pipeline continues from the saved position, without
    # reading or augmenting the first two steps again.
    assert resumed["batches_replayed"] == 0 and straight["batches_replayed"] == 0
    assert resumed["losses"] == straight["losses"][2:]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k, v in state["model"].items():
        assert torch.equal(v, b["model"][k]), k


@pytest.mark.slow
def test_torchrun_two_nodes_on_shards(tmp_path, shard_dataset):
    from test_train_dist import _free_port, _torchrun_pair
    run = tmp_path / "run"
    args = _args(shard_dataset, run)[4:]  # without --data/--out, given below
    _torchrun_pair(_free_port(), ["--data", str(shard_dataset), "--out", str(run), *args, "--max-steps", "2"])
    mid = torch.load(run / "checkpoint.pt", weights_only=False)
    assert mid["step_in_epoch"] == 2 and len(mid["data_positions"]) == 2   # one position per rank, ...
    assert not torch.equal(mid["data_positions"][0], mid["data_positions"][1])  # ... each its own
    out = _torchrun_pair(_free_port(), ["--data", str(shard_dataset), "--out", str(run), *args,
                                        "--max-steps", "3", "--resume", "auto"])
    assert any("at step 2 (epoch 0, data position restored)" in o for o in out)
    assert not any("replaying" in o for o in out)   # every rank accepted its own position
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 3 and state["world_size"] == 2
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
