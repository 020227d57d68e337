"""The trainer on a real shard dataset (CT, MR, X-ray, ultrasound slices from ../shared/data) read by
augment_dali's SwavLoader on the CPU: per-modality clustering, hybrid labels, checkpoint and exact resume."""
from __future__ import annotations

import json

import pytest
import torch

from _augment_fixtures import build_dataset

from augment_dali.config import AugmentConfig, NormalizeConfig
from augment_dali.stats import compute_stats, write_stats
from train.errors import DataError
from train.export import backbone_normalisation, export_backbone
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
    # the normalisation each modality got travels with the checkpoint into the exported backbone
    export_backbone(tmp_path / "a" / "checkpoint.pt", tmp_path / "backbone.pt")
    norm = backbone_normalisation(tmp_path / "backbone.pt")
    assert norm == state["normalisation"]
    assert {m: (r["units"], r["method"]) for m, r in norm.items()} == {
        "ct": ("HU", "hu_window"), "mr": ("raw", "robust_percentile"), "us": ("raw", "robust_percentile"),
        "xr": ("raw", "robust_percentile")}
    assert NormalizeConfig.from_dict(norm["ct"]["config"]) == AugmentConfig().normalize

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


def test_augment_section_reaches_the_dali_pipeline(tmp_path, shard_dataset):
    """[augment] of a training TOML is the loader's AugmentConfig, and real augmented batches show it."""
    from train.config import load_config
    from train.data import build_source

    toml = tmp_path / "c.toml"
    toml.write_text('[augment]\ngamma_range = [2.0, 2.1]\nborder = 0.2\nsize_range = [40, 64]\n'
                    'crop_sizes = [40, 12]\nnum_crops = [2, 3]\np_gamma = 1.0\n'
                    '[augment.normalize]\nhu_window = [-1000.0, 1000.0]\n')
    cfg = load_config(["--config", str(toml), "--data", str(shard_dataset), "--batch-size", "4",
                       "--modalities", "ct,mr", "--num-workers", "1"])
    source = build_source(cfg, 0, 1, "cpu")
    try:
        assert source.loader.config == cfg.augment
        assert source.normalisation["ct"]["config"]["hu_window"] == [-1000.0, 1000.0]
        batch = next(iter(source.epoch_iter(0)))
        assert [tuple(c.shape) for c in batch["crops"]] == [(4, 2, 1, 40, 40), (4, 3, 1, 12, 12)]
        # rescaled sides in [40, 64] and a border of 20 %: every 40-px crop lies inside a <= 64-px image,
        # so no crop is padding only; values stay in [0, 1] (gamma only: p_gamma = 1)
        for c in batch["crops"]:
            assert float(c.min()) >= 0.0 and float(c.max()) <= 1.0 + 1e-6
    finally:
        source.close()
    # the sigmas reach the pipeline too: stats measured with other sigmas are refused, naming both
    toml.write_text('[augment]\nsigmas = [1.0, 3.0]\nsize_range = [40, 64]\ncrop_sizes = [40, 12]\n')
    cfg = load_config(["--config", str(toml), "--data", str(shard_dataset), "--batch-size", "4"])
    with pytest.raises(DataError, match=r"sigmas .*the pipeline uses \[1.0, 3.0\]"):
        build_source(cfg, 0, 1, "cpu")
