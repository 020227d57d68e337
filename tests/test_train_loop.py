"""The training loop end to end on CPU: prototype freezing, queue start, exact resume, non-finite
stop, export, configuration, and a learning signal on real chest X-rays (PneumoniaMNIST)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import subprocess
import sys

from train.config import Config, ConfigError, load_config
from train.errors import RunError
from train.export import export_backbone, load_backbone
from train.main import main

TINY = ["--arch", "resnet18", "--device", "cpu", "--batch-size", "4", "--crop-sizes", "16,8",
        "--num-crops", "2,2", "--num-prototypes", "8", "--warmup-epochs", "0", "--lr-ref-batch", "0",
        "--log-every", "1", "--no-tensorboard", "--queue-length", "0"]


def _run(tmp_path, *extra):
    return main(TINY + ["--out", str(tmp_path / "run"), *extra])


def _ckpt(tmp_path):
    return torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)


def _metrics(tmp_path):
    return [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def test_prototype_gradient_dropped_exactly_during_freeze_window(tmp_path):
    synth = ["--synthetic", "--synthetic-steps", "10", "--epochs", "1", "--freeze-prototypes-steps", "2"]
    _run(tmp_path, *synth, "--max-steps", "1")
    s1 = _ckpt(tmp_path)
    _run(tmp_path, *synth, "--max-steps", "2", "--resume", "auto")
    s2 = _ckpt(tmp_path)
    _run(tmp_path, *synth, "--max-steps", "3", "--resume", "auto")
    s3 = _ckpt(tmp_path)
    key = "prototypes.0.weight"
    # Steps 0 and 1 are frozen: no change, and the optimiser never saw a gradient (no momentum state).
    torch.testing.assert_close(s2["model"][key], s1["model"][key], rtol=0, atol=1e-7)
    proto_index = next(i for i, k in enumerate(k for k in s1["model"] if k.endswith("weight") and
                                               s1["model"][k].ndim > 1) if k == key)
    assert proto_index not in s2["optimizer"]["state"]
    # ... while the backbone did move (the learning rate is not zero).
    assert not torch.equal(s2["model"]["backbone.conv1.weight"], s1["model"]["backbone.conv1.weight"])
    # Step 2 is the first update of the prototypes.
    assert (s3["model"][key] - s2["model"][key]).abs().max() > 1e-6
    assert proto_index in s3["optimizer"]["state"]


def test_queue_starts_at_its_epoch_and_is_used_once_full(tmp_path):
    # 2 steps per epoch, queue from epoch 1, 2 batches long (b = 4 rows per step).
    _run(tmp_path, "--synthetic", "--synthetic-steps", "2", "--epochs", "3", "--queue-length", "8",
         "--epoch-queue-starts", "1", "--freeze-prototypes-steps", "0", "--max-steps", "6")
    rows = _metrics(tmp_path)
    assert [r["queue_in_use"] for r in rows] == [0, 0, 0, 1, 1, 1]
    state = _ckpt(tmp_path)
    assert (state["queue"]["filled"] == 8).all()
    # The run's picture is drawn from the same metrics.
    from train.plot import plot_run
    png = plot_run(tmp_path / "run", tmp_path / "run.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_trend_is_a_trailing_mean_that_skips_missing_modalities():
    import math

    from train.plot import trailing_mean

    values = [4.0, 2.0, math.nan, 0.0, 6.0]
    got = trailing_mean(values, 3)
    assert got == [4.0, 3.0, 3.0, 1.0, 3.0]  # NaN rows are left out of each window, not counted as 0
    assert math.isnan(trailing_mean([math.nan, math.nan, 1.0], 2)[1])
    assert trailing_mean(values, 1)[:2] == [4.0, 2.0]


def test_resume_is_exact(tmp_path, medmnist_dir):
    data = ["--data", str(medmnist_dir / "pneumoniamnist.npz"), "--epochs", "1", "--queue-length", "8",
            "--epoch-queue-starts", "0", "--freeze-prototypes-steps", "1", "--checkpoint-every", "100",
            "--crop-sizes", "28,16", "--num-crops", "2,1"]
    straight = main(TINY + ["--out", str(tmp_path / "a"), *data, "--max-steps", "4"])
    main(TINY + ["--out", str(tmp_path / "b"), *data, "--max-steps", "2"])
    resumed = main(TINY + ["--out", str(tmp_path / "b"), *data, "--max-steps", "4", "--resume", "auto"])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert torch.equal(a["queue"]["features"], b["queue"]["features"])
    losses = lambda run: [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]
    assert losses("a") == losses("b") and len(losses("a")) == 4
    assert straight["losses"][2:] == resumed["losses"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    args = ["--synthetic", "--synthetic-steps", "10", "--epochs", "1", "--freeze-prototypes-steps", "0",
            "--checkpoint-every", "1", "--max-steps", "10"]
    _run(tmp_path, *args, "--max-steps", "1")
    good = _ckpt(tmp_path)
    with pytest.raises(RunError, match="non-finite"):
        _run(tmp_path, *args, "--resume", "auto", "--base-lr", "1e38", "--lars-trust", "1e38")
    kept = _ckpt(tmp_path)
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert kept["step"] >= good["step"]


def test_export_loads_into_same_encoder_only(tmp_path):
    _run(tmp_path, "--synthetic", "--synthetic-steps", "2", "--epochs", "1", "--max-steps", "1")
    blob = export_backbone(tmp_path / "run" / "checkpoint.pt", tmp_path / "backbone.pt")
    encoder = load_backbone(tmp_path / "backbone.pt", arch="resnet18").eval()
    state = _ckpt(tmp_path)["model"]
    torch.testing.assert_close(encoder.conv1.weight, state["backbone.conv1.weight"])
    assert blob["num_features"] == 512 and encoder(torch.rand(2, 1, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="resnet18.*resnet50"):
        load_backbone(tmp_path / "backbone.pt", arch="resnet50")


def test_config_defaults_toml_and_flags(tmp_path):
    cfg = load_config(["--synthetic"])
    assert (cfg.num_prototypes, cfg.queue_length, cfg.epoch_queue_starts, cfg.freeze_prototypes_steps) == \
        (3000, 3840, 10, 10000)
    assert (cfg.crop_sizes, cfg.num_crops, cfg.temperature, cfg.epsilon) == ((224, 92), (2, 6), 0.1, 0.03)
    toml = tmp_path / "c.toml"
    toml.write_text('arch = "resnet18"\nbatch_size = 16\ncrop_sizes = [96, 48]\nbase_lr = 1\n')
    cfg = load_config(["--config", str(toml), "--synthetic", "--batch-size", "8"])
    assert (cfg.arch, cfg.batch_size, cfg.crop_sizes, cfg.base_lr) == ("resnet18", 8, (96, 48), 1.0)
    toml.write_text('batch_sise = 16\n')
    with pytest.raises(ConfigError, match="batch_sise"):
        load_config(["--config", str(toml), "--synthetic"])
    with pytest.raises(ConfigError, match="--data"):
        load_config([])


def test_augment_section_of_the_config_tree(tmp_path):
    """Every augmentation field is a key of the TOML [augment] table (and [augment.normalize]) and a
    --augment.NAME flag; the crops are defined once, there; flags override the file."""
    toml = tmp_path / "c.toml"
    toml.write_text('arch = "resnet18"\n[augment]\ngamma_range = [2.0, 2.2]\nsigmas = [1, 3]\nborder = 0.25\n'
                    'size_range = [40, 80]\ncrop_sizes = [32, 16]\nnum_crops = [2, 3]\np_gamma = 1\n'
                    '[augment.normalize]\nhu_window = [-1000, 2000]\nmethod = { ct = "robust_percentile" }\n')
    cfg = load_config(["--config", str(toml), "--synthetic", "--augment.linear-shift-range=-0.1,0.1",
                       "--augment.num-crops", "2,4"])
    aug = cfg.augment
    assert (aug.gamma_range, aug.sigmas, aug.border, aug.size_range, aug.p_gamma) == \
        ((2.0, 2.2), (1.0, 3.0), 0.25, (40, 80), 1.0)
    assert (aug.crop_sizes, aug.num_crops, aug.linear_shift_range) == ((32, 16), (2, 4), (-0.1, 0.1))
    assert (cfg.crop_sizes, cfg.num_crops) == ((32, 16), (2, 4))   # views of the one definition
    assert aug.normalize.hu_window == (-1000.0, 2000.0)
    assert aug.normalize.method == {"ct": "robust_percentile", "mr": "robust_percentile",
                                    "xr": "robust_percentile", "us": "robust_percentile"}
    # the former flat keys still land in the same place
    assert load_config(["--synthetic", "--rescale-size-range", "48,96"]).augment.size_range == (48, 96)

    for text, message in [('[augment]\ngamma_range = [1.8, "x"]\n', "augment.gamma_range: expected float, got 'x'"),
                          ('[augment]\nsize_range = [1, 2, 3]\n', "augment.size_range: expected list of 2 int"),
                          ('[augment]\nborder = "wide"\n', "augment.border: expected float"),
                          ('[augment]\ngama_range = [1, 2]\n', "unknown config key 'augment.gama_range'"),
                          ('augment = 3\n', r"\[augment\] must be a table"),
                          ('[augment]\ncrop_sizes = [32]\n', "crop_sizes .* and num_crops .* differ")]:
        toml.write_text(text)
        with pytest.raises(ConfigError, match=message) as err:
            load_config(["--config", str(toml), "--synthetic"])
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="--augment.sigmas '1,a': expected float, got 'a'"):
        load_config(["--synthetic", "--augment.sigmas", "1,a"])
    with pytest.raises(ConfigError, match="epsilon 0.001: must be >= 0.003"):
        load_config(["--synthetic", "--epsilon", "0.001"])


def test_bad_config_type_is_one_line_and_exit_2_from_the_entry_point(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[augment]\ngamma_range = "steep"\n')
    run = subprocess.run([sys.executable, "-m", "train", "--config", str(toml), "--synthetic"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {toml}: augment.gamma_range: expected list of 2 float, got 'steep'"]


@pytest.mark.slow
def test_learning_signal_on_chest_xrays_without_collapse(tmp_path, medmnist_dir):
    """ResNet-18 on PneumoniaMNIST: the swapped-prediction loss falls well below ln(K) (where it sits
    at the start and where a collapsed model stays) while the codes stay spread over the prototypes."""
    k = 10
    out = main(["--data", str(medmnist_dir / "pneumoniamnist.npz"), "--out", str(tmp_path / "run"),
                "--arch", "resnet18", "--device", "cpu", "--batch-size", "16", "--crop-sizes", "28",
                "--num-crops", "2", "--min-scale-crops", "0.5", "--max-scale-crops", "1",
                "--num-prototypes", str(k), "--queue-length", "0", "--freeze-prototypes-steps", "10",
                "--epochs", "1", "--warmup-epochs", "0.02", "--lr-ref-batch", "0", "--base-lr", "0.6",
                "--max-steps", "200", "--log-every", "1", "--checkpoint-every", "1000", "--no-tensorboard"])
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 200 and out["losses"] == losses
    ln_k = math.log(k)
    start, end = sum(losses[:10]) / 10, sum(losses[-30:]) / 30
    assert start > 0.95 * ln_k
    assert end < 0.8 * ln_k, (start / ln_k, end / ln_k)
    entropy = [r["code_entropy/pneumoniamnist"] for r in rows[-30:]]
    assert sum(entropy) / len(entropy) > 0.75
    assert min(r["proto_usage/pneumoniamnist"] for r in rows[-30:]) >= 0.3


def test_3d_densenet_one_plus_four_crops(tmp_path):
    from train.models import build_encoder
    encoder = build_encoder("densenet3d").eval()
    # Variable input size, 1024-d features; in-plane blocks leave a single slice a single slice.
    assert encoder(torch.rand(1, 1, 1, 24, 20)).shape == (1, 1024)
    assert encoder(torch.rand(2, 1, 12, 32, 32)).shape == (2, 1024)
    units = [m for m in encoder.modules() if type(m).__name__ == "DenseUnit"]
    assert len(units) == 12 and [u.conv.kernel_size for u in units[:3]] == [(1, 3, 3)] * 3
    assert all(u.conv.kernel_size == (3, 3, 3) for u in units[3:])
    # One large + four small crops, views 0 (large) and 1 (first small) assigned; hybrid head on both.
    out = main(["--synthetic", "--synthetic-steps", "2", "--synthetic-labels", "1", "--beta", "1",
                "--arch", "densenet3d", "--crop-sizes", "24,12", "--crop-depths", "8,4", "--num-crops", "1,4",
                "--batch-size", "2", "--num-prototypes", "6", "--queue-length", "0", "--epochs", "1",
                "--device", "cpu", "--no-tensorboard", "--out", str(tmp_path / "run")])
    assert len(out["losses"]) == 2 and all(math.isfinite(l) for l in out["losses"])


def test_two_modalities_with_partial_labels(tmp_path, medmnist_dir):
    """Chest X-ray + breast ultrasound: per-modality losses and codes, hybrid term on half the labels."""
    data = f"{medmnist_dir / 'pneumoniamnist.npz'},{medmnist_dir / 'breastmnist.npz'}"
    out = _run(tmp_path, "--data", data, "--crop-sizes", "28,16", "--beta", "0.5", "--npz-label-fraction", "0.5",
               "--epochs", "1", "--max-steps", "2")
    rows = _metrics(tmp_path)
    assert len(rows) == 2 and len(out["losses"]) == 2
    for r in rows:
        assert {"loss_ss/pneumoniamnist", "loss_ss/breastmnist", "code_entropy/breastmnist", "loss_sup"} <= set(r)
        assert r["loss"] == pytest.approx(r["loss_ss"] + 0.5 * r["loss_sup"], rel=1e-5)
        assert r["loss_ss"] == pytest.approx(r["loss_ss/pneumoniamnist"] + r["loss_ss/breastmnist"], rel=1e-5)
    state = _ckpt(tmp_path)
    assert state["modalities"] == ["pneumoniamnist", "breastmnist"] and state["num_labels"] == 2
    assert state["model"]["prototypes.1.weight"].shape == (8, 128)


def test_time_budget_stops_after_a_whole_step_and_checkpoints(tmp_path, medmnist_dir):
    # A budget shorter than any step: the loop stops after exactly one whole step, saves it, and the
    # learning-rate schedule stays the full epoch's (the budget cuts the run, it does not compress it).
    data = ["--data", str(medmnist_dir / "pneumoniamnist.npz"), "--epochs", "1", "--crop-sizes", "28,16",
            "--num-crops", "2,1", "--checkpoint-every", "1000", "--warmup-epochs", "1"]
    result = _run(tmp_path, *data, "--max-seconds", "1e-9")
    state = _ckpt(tmp_path)
    assert result["step"] == 1 and len(result["losses"]) == 1 and state["step"] == 1
    assert state["config"]["max_seconds"] == 1e-9
    row, = _metrics(tmp_path)
    assert row["lr"] == 0.0  # first step of a full-epoch warm-up from 0, not of a one-step schedule
    # Without a budget the same run continues past that step.
    again = _run(tmp_path, *data, "--max-steps", "2", "--out", str(tmp_path / "run2"))
    assert again["step"] == 2 and again["losses"][0] == result["losses"][0]
    with pytest.raises(ConfigError, match="max_seconds"):
        load_config(["--synthetic", "--max-seconds", "-1"])
