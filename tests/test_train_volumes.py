"""3-D pretraining from a volume dataset: the loader's 3-D DALI graph, modality-balanced batches of
volume crops, DenseNet3D steps on the CPU with configs/swav_3d_ct.toml (crop sizes shrunk by flags)
and exact mid-epoch resume, on sub-volumes of the real KiTS CT and MPRAGE MR series."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _volume_fixtures import build_volume_dataset

from augment_dali.config import AugmentConfig
from augment_dali.stats import compute_stats, write_stats
from train.main import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "swav_3d_ct.toml"
# METHOD's 3-D augmentation at 1/14 .. 1/8 of its sizes: the DenseNet3D step stays cheap on a CPU
TINY = AugmentConfig.method_3d(size_range=(24, 40), depth_range=(8, 16), crop_sizes=(16, 8), crop_depths=(12, 6))


@pytest.fixture(scope="module")
def volume_dataset(tmp_path_factory, dicom_dir):
    root = build_volume_dataset(tmp_path_factory.mktemp("volumes"), dicom_dir)
    write_stats(root, compute_stats(root, samples=6, seed=0, config=TINY, show_progress=False))
    return root


def _args(root, out, *extra):
    return ["--config", str(CONFIG), "--data", str(root), "--out", str(out), "--device", "cpu",
            "--augment.size-range", "24,40", "--augment.depth-range", "8,16", "--augment.crop-sizes", "16,8",
            "--augment.crop-depths", "12,6", "--num-prototypes", "6", "--queue-length", "0", "--epochs", "1",
            "--warmup-epochs", "0", "--freeze-prototypes-steps", "1", "--log-every", "1", "--no-tensorboard",
            "--num-workers", "1", *extra]


def test_volume_dataset_loader_gives_balanced_3d_crops(volume_dataset):
    from augment_dali.loader import SwavLoader

    loader = SwavLoader(volume_dataset, batch_size=4, augment=TINY, num_threads=1, with_keys=True)
    try:
        assert loader.volumes and loader.modalities == ["ct", "mr"] and len(loader) == 3
        keys = []
        for step in loader:
            assert [tuple(c.shape) for c in step["crops"]] == [(4, 1, 1, 12, 16, 16), (4, 4, 1, 6, 8, 8)]
            assert step["modality"].tolist() == [0, 0, 1, 1]
            big = step["crops"][0]
            assert torch.isfinite(big).all() and float(big.std()) > 0.01  # real anatomy, not padding
            keys += step["key"]
        assert len(set(keys)) == 12   # every volume once per epoch
    finally:
        loader.close()
    # a 2-D augmentation on a volume dataset is refused, naming the missing setting
    with pytest.raises(ValueError, match="holds volumes.*crop_depths"):
        SwavLoader(volume_dataset, batch_size=4, augment=AugmentConfig.small())


@pytest.mark.slow
def test_densenet3d_trains_on_volumes_resumes_exactly_and_serves_downstream(tmp_path, volume_dataset, dicom_dir):
    straight = main(_args(volume_dataset, tmp_path / "a", "--max-steps", "2"))
    assert all(np.isfinite(straight["losses"])) and len(straight["losses"]) == 2
    rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss_ss/ct" in r and "loss_ss/mr" in r for r in rows)   # one prototype bank per modality
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert state["arch"] == "densenet3d" and state["config"]["augment"]["crop_depths"] == [12, 6]

    main(_args(volume_dataset, tmp_path / "b", "--max-steps", "1"))
    mid = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert mid["step_in_epoch"] == 1 and mid["data_positions"] is not None
    resumed = main(_args(volume_dataset, tmp_path / "b", "--max-steps", "2", "--resume", "auto"))
    assert resumed["batches_replayed"] == 0
    assert resumed["losses"] == straight["losses"][1:]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k, v in state["model"].items():
        assert torch.equal(v, b["model"][k]), k

    # downstream: the exported 3-D encoder on labelled volumes (MR vs CT)
    from train.downstream.__main__ import main as downstream
    from train.downstream.data import load
    from train.export import backbone_normalisation, export_backbone

    export_backbone(tmp_path / "a" / "checkpoint.pt", tmp_path / "backbone.pt")
    labelled = build_volume_dataset(tmp_path / "labelled", dicom_dir, labelled=True)
    data = load(labelled, backbone_normalisation(tmp_path / "backbone.pt"), volume_shape=(8, 24, 24))
    assert data.task == "binary"
    assert {s: tuple(data[s].images.shape) for s in ("train", "val", "test")} == {
        "train": (8, 1, 8, 24, 24), "val": (2, 1, 8, 24, 24), "test": (2, 1, 8, 24, 24)}
    assert sorted(data["test"].labels.tolist()) == [0, 1]
    assert downstream(["label-efficiency", "--data", str(labelled), "--pretrained", str(tmp_path / "backbone.pt"),
                       "--out", str(tmp_path / "eval"), "--arch", "densenet3d", "--fractions", "100",
                       "--repeats", "1", "--epochs", "1", "--batch-size", "4", "--n-boot", "5",
                       "--volume-shape", "8,24,24"]) == 0
    (setting,) = json.loads((tmp_path / "eval" / "results.json").read_text())["label-efficiency"]["settings"]
    for init in ("pretrained", "random"):
        assert setting[init]["n_train"] == 8 and 0.0 <= setting[init]["mean"] <= 1.0


def test_robustness_transform_of_volumes_rotates_about_the_depth_axis():
    from train.downstream.robustness import RobustnessConfig, random_transform

    g = torch.Generator().manual_seed(0)
    depth_values = torch.linspace(0.2, 0.9, 6)
    volumes = depth_values.view(1, 1, 6, 1, 1).expand(2, 1, 6, 16, 16).contiguous()   # constant slices
    # gamma only: exactly x ** gamma
    same = random_transform(volumes, g, RobustnessConfig(gamma=(2.0, 2.0), max_rotation_deg=0.0, scale=(1.0, 1.0)))
    torch.testing.assert_close(same, volumes ** 2)
    # a rotation in the rows/cols plane keeps every slice's value inside the field of view
    turned = random_transform(volumes, g, RobustnessConfig(gamma=(1.0, 1.0), max_rotation_deg=40.0, scale=(1.0, 1.0)))
    torch.testing.assert_close(turned[:, 0, :, 6:10, 6:10], volumes[:, 0, :, 6:10, 6:10])
    assert float(turned[:, 0, :, 0, 0].abs().max()) < float(depth_values.min())   # corners rotated out


def test_preview_shows_orthogonal_mid_slices_of_volume_crops(tmp_path, volume_dataset):
    from augment_dali.normalize import normalize_numpy
    from augment_dali.preview import main as preview_main, preview_rows
    from augment_dali.sampling import read_pixels, sample_refs
    from shards import Dataset

    rows = preview_rows(volume_dataset, per_modality=1, seed=0, cfg=TINY, modalities=["ct"])
    assert [r["label"].rsplit("\n", 1)[1] for r in rows] == ["depth mid-slice", "row mid-slice", "column mid-slice"]
    (ref,) = sample_refs(Dataset(volume_dataset), "ct", 1, 0)
    volume = normalize_numpy(read_pixels(ref), "hu_window", TINY.normalize)      # 8 x 64 x 64
    np.testing.assert_array_equal(rows[0]["original"], volume[4])
    np.testing.assert_array_equal(rows[1]["original"], volume[:, 32, :])
    np.testing.assert_array_equal(rows[2]["original"], volume[:, :, 32])
    # 1 + 4 crops per row: the large crop 12 x 16 x 16, the small ones 6 x 8 x 8, cut along each axis
    assert [c.shape for c in rows[0]["crops"]] == [(16, 16)] + [(8, 8)] * 4
    assert [c.shape for c in rows[1]["crops"]] == [(12, 16)] + [(6, 8)] * 4
    assert [c.shape for c in rows[2]["crops"]] == [(12, 16)] + [(6, 8)] * 4
    toml = tmp_path / "t.toml"
    toml.write_text("[augment]\nsize_range = [24, 40]\ndepth_range = [8, 16]\ncrop_sizes = [16, 8]\n"
                    "crop_depths = [12, 6]\nnum_crops = [1, 4]\n")
    out = tmp_path / "p.png"
    assert preview_main([str(volume_dataset), "--out", str(out), "--per-modality", "1", "--config", str(toml)]) == 0
    assert out.stat().st_size > 10_000
