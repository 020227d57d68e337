"""Fine-tuning, linear probing and the protocol command on real MedMNIST images."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from train.downstream.data import Split, load, load_npz
from train.downstream.finetune import FitConfig, build_encoder, fit


@pytest.fixture(scope="module")
def pneumonia(medmnist_dir):
    return load_npz(medmnist_dir / "pneumoniamnist.npz")


def _subset(split, n, seed):
    idx = np.random.default_rng(seed).choice(len(split.labels), n, replace=False)
    return Split(split.images[idx], split.labels[idx])


def test_npz_loading_matches_the_archive(pneumonia, medmnist_dir):
    from augment_dali.normalize import normalize_numpy

    raw = np.load(medmnist_dir / "pneumoniamnist.npz")
    assert pneumonia.task == "binary" and pneumonia.n_outputs == 1
    for split in ("train", "val", "test"):
        assert np.array_equal(pneumonia[split].labels, raw[f"{split}_labels"].ravel())
        images = raw[f"{split}_images"]
        assert pneumonia[split].images.shape == (len(images), 1, 28, 28)
        for i in range(0, len(images), 97):  # 8-bit "raw" pixels: the robust window, as in pretraining
            want = normalize_numpy(images[i], "robust_percentile")
            assert torch.equal(pneumonia[split].images[i, 0], torch.from_numpy(want))


def test_npz_fixed_window_gives_other_libraries_uint8_over_255(pneumonia, medmnist_dir):
    """Encoders pretrained elsewhere (lightly, in benchmarks.representation) saw uint8 / 255: window (0, 255)."""
    raw = np.load(medmnist_dir / "pneumoniamnist.npz")
    fixed = load_npz(medmnist_dir / "pneumoniamnist.npz", window=(0, 255))
    for split in ("train", "val", "test"):
        assert np.array_equal(fixed[split].labels, pneumonia[split].labels)
        want = raw[f"{split}_images"].astype(np.float32) / np.float32(255)
        np.testing.assert_allclose(fixed[split].images[:, 0].numpy(), want, rtol=0, atol=1e-7)
    # not the robust window: that one stretches each image to its own 0.5-99.5 percentiles
    assert float((fixed["train"].images - pneumonia["train"].images).abs().max()) > 0.05


def test_npz_inputs_equal_the_pretraining_pipeline_normalisation(pneumonia, medmnist_dir):
    """The downstream input of an image is what the DALI operator makes of the same stored pixels."""
    from test_units import dali_normalize

    raw = np.load(medmnist_dir / "pneumoniamnist.npz")["train_images"][:32]
    got = dali_normalize(list(raw), "robust_percentile")
    for i, img in enumerate(got):
        np.testing.assert_allclose(pneumonia["train"].images[i, 0].numpy(), img, atol=2e-6)
    assert min(float(g.min()) for g in got) == 0.0 and max(float(g.max()) for g in got) == 1.0


def test_finetuning_a_small_real_subset_beats_chance(pneumonia):
    train, val = _subset(pneumonia["train"], 300, 0), _subset(pneumonia["val"], 200, 1)
    result = fit(build_encoder("resnet18", None), 1, "binary", train, val, FitConfig(epochs=5, batch_size=64, seed=0))
    assert len(result.val_curve) == 5 and result.best_epoch == int(np.argmax(result.val_curve)) + 1
    assert max(result.val_curve) > 0.75  # chance is 0.5; 200 validation images put its spread near 0.04


def test_linear_probe_trains_only_the_head(pneumonia):
    train, val = _subset(pneumonia["train"], 300, 2), _subset(pneumonia["val"], 200, 3)
    encoder = build_encoder("resnet18", None)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = fit(encoder, 1, "binary", train, val, FitConfig(mode="linear", epochs=5, seed=0))
    after = result.model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen, BN statistics included
    assert max(result.val_curve) > 0.6


def test_bad_inputs_get_clear_errors(pneumonia, tmp_path, medmnist_dir):
    single = Split(pneumonia["train"].images[:20], np.zeros(20, np.int64))
    with pytest.raises(ValueError, match="single class"):
        fit(build_encoder("resnet18", None), 1, "binary", single, pneumonia["val"], FitConfig(epochs=1))
    raw = dict(np.load(medmnist_dir / "breastmnist.npz"))
    raw["train_labels"] = raw["train_labels"][:-3]
    np.savez(tmp_path / "broken.npz", **raw)
    with pytest.raises(ValueError, match="546 train images but 543 labels"):
        load(tmp_path / "broken.npz")
    torch.save({"arch": "resnet50", "state_dict": build_encoder("resnet50", None).state_dict()}, tmp_path / "r50.pt")
    with pytest.raises(ValueError, match="holds resnet50 weights; they cannot be loaded into resnet18"):
        build_encoder("resnet18", tmp_path / "r50.pt")


@pytest.mark.slow
def test_protocol_command_writes_report(tmp_path, medmnist_dir):
    raw = np.load(medmnist_dir / "breastmnist.npz")
    small = {k: v for k, v in raw.items()}
    small["test_images"], small["test_labels"] = raw["test_images"][:80], raw["test_labels"][:80]
    np.savez(tmp_path / "breast_small.npz", **small)
    torch.save({"arch": "resnet18", "state_dict": build_encoder("resnet18", None).state_dict()}, tmp_path / "bb.pt")
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "train.downstream", "all", "--data", str(tmp_path / "breast_small.npz"),
           "--pretrained", str(tmp_path / "bb.pt"), "--out", str(out), "--fractions", "100,10", "--repeats", "2",
           "--epochs", "2", "--mode", "linear", "--n-boot", "50", "--n-images", "10", "--n-transforms", "4"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    results = json.loads((out / "results.json").read_text())
    le = results["label-efficiency"]["settings"]
    assert [s["fraction"] for s in le] == [1.0, 0.1]
    assert le[0]["pretrained"]["n_train"] == 546 and le[1]["pretrained"]["n_train"] == pytest.approx(55, abs=1)
    for s in le:
        for init in ("pretrained", "random"):
            r = s[init]
            assert len(r["repeats"]) == 2 and r["mean"] == pytest.approx(np.mean([x["test_auc"] for x in r["repeats"]]))
            assert r["ci_low"] <= r["ci_high"]
    conv = results["convergence"]["runs"]
    assert all(1 <= e <= 2 for i in conv for e in conv[i]["epochs_to_98"])
    assert len(results["robustness"]["runs"]["pretrained"]["per_image_mean"]) == 10
    for name in ("report.md", "label_efficiency.png", "convergence.png", "robustness.png"):
        assert (out / name).stat().st_size > 0
