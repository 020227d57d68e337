"""What the trainer and its tools do with files they did not expect: checkpoints that would run code
when unpickled, leftovers of a killed save, a metrics log cut mid-line, damaged shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.errors import CheckpointError, RunFolderError
from train.main import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet18", "--device", "cpu", "--batch-size", "4", "--crop-sizes", "16,8",
        "--num-crops", "2,2", "--num-prototypes", "8", "--warmup-epochs", "0", "--lr-ref-batch", "0",
        "--log-every", "1", "--no-tensorboard", "--queue-length", "0", "--epochs", "1",
        "--freeze-prototypes-steps", "1"]


class MakesDirectoryWhenUnpickled:
    """Stands for any payload: unpickling calls os.mkdir(marker), as it could call anything else."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture()
def pneumonia_run(tmp_path, medmnist_dir):
    """Two steps on real chest X-rays: a genuine checkpoint and metrics log to tamper with."""
    args = TINY + ["--data", str(medmnist_dir / "pneumoniamnist.npz"), "--out", str(tmp_path / "run"),
                   "--max-steps", "2"]
    main(args)
    return tmp_path / "run", args


def _cli(module, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_checkpoint_with_code_in_its_pickle_is_refused_everywhere(pneumonia_run, tmp_path):
    run, args = pneumonia_run
    marker = tmp_path / "code-ran"
    genuine = (run / "checkpoint.pt").read_bytes()
    state = torch.load(run / "checkpoint.pt", weights_only=False)  # our own file: trusted here
    state["config"]["note"] = MakesDirectoryWhenUnpickled(marker)
    torch.save(state, run / "checkpoint.pt")

    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        main(args[:-1] + ["3", "--resume", "auto"])
    assert not marker.exists()

    export = _cli("train.export", run / "checkpoint.pt", "--out", tmp_path / "backbone.pt")
    assert export.returncode != 0 and "cannot read checkpoint" in export.stderr, export.stderr
    assert "Traceback" not in export.stderr and not marker.exists()

    plot = _cli("train.plot", run, "--out", tmp_path / "m.png")
    assert plot.returncode != 0 and "cannot read checkpoint" in plot.stderr, plot.stderr
    assert "Traceback" not in plot.stderr and not marker.exists()

    from train.export import export_backbone, load_backbone
    (run / "checkpoint.pt").write_bytes(genuine)
    blob = export_backbone(run / "checkpoint.pt", tmp_path / "backbone.pt")
    blob["modalities"] = [MakesDirectoryWhenUnpickled(marker)]
    torch.save(blob, tmp_path / "evil-backbone.pt")
    with pytest.raises(ValueError, match="evil-backbone.pt"):
        load_backbone(tmp_path / "evil-backbone.pt")
    assert not marker.exists()
    assert load_backbone(tmp_path / "backbone.pt").conv1.weight.shape[1] == 1


def test_checkpoint_loads_with_weights_only_and_resume_restores_every_rng(pneumonia_run):
    import random

    import numpy as np

    from train import checkpoint as ckpt

    run, _ = pneumonia_run
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # plain tensors and values only
    np.random.seed(1)
    random.seed(1)
    torch.manual_seed(1)
    saved = (np.random.get_state(legacy=False), random.getstate(), torch.get_rng_state())
    state["rng"] = ckpt.rng_state()
    ckpt.save_atomic(state, run / "checkpoint.pt")
    np.random.seed(2)
    random.seed(2)
    torch.manual_seed(2)
    ckpt.set_rng_state(ckpt.load(run / "checkpoint.pt")["rng"])
    now = np.random.get_state(legacy=False)
    assert np.array_equal(now["state"]["key"], saved[0]["state"]["key"]) and now["state"]["pos"] == saved[0]["state"]["pos"]
    assert random.getstate() == saved[1] and torch.equal(torch.get_rng_state(), saved[2])


def test_resume_removes_stale_checkpoint_temporaries_and_tolerates_a_cut_log(pneumonia_run, tmp_path):
    run, args = pneumonia_run
    # A save killed before its rename leaves the hidden temporary behind (any process id), and a run
    # killed while appending leaves half a line at the end of metrics.jsonl.
    stale = run / ".checkpoint.pt.tmp4242"
    stale.write_bytes((run / "checkpoint.pt").read_bytes()[:1000])
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    log.write_text("\n".join(lines) + "\n" + lines[-1][:25])
    main(args[:-1] + ["3", "--resume", "auto"])
    assert not stale.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == [1, 2, 3]

    from train.plot import plot_run
    text = log.read_text()
    log.write_text(text + text.splitlines()[-1][:25])
    png = plot_run(run, tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A damaged line that is not the last one is still an error, naming the line.
    lines = text.splitlines()
    log.write_text("\n".join([lines[0], lines[1][:20], lines[2]]) + "\n")
    with pytest.raises(RunFolderError, match="metrics.jsonl:2"):
        plot_run(run, tmp_path / "m2.png")


@pytest.fixture(scope="module")
def ingested_ct(tmp_path_factory, dicom_dir):
    """The 18 real CT slices through `ingest` (several shards), with the band-energy stats training needs."""
    from _ingest_fixtures import run_ingest

    from augment_dali.config import AugmentConfig
    from augment_dali.stats import compute_stats, write_stats

    root = tmp_path_factory.mktemp("damaged") / "ds"
    run_ingest([dicom_dir / "ct_kits_abdomen_18"], root, shard_size="1MB")
    write_stats(root, compute_stats(root, samples=8, seed=0, config=AugmentConfig(), show_progress=False))
    return root


def _train_on(root, out, *extra):
    return _cli("train", "--config", REPO / "configs" / "cpu_demo_shards.toml", "--data", root, "--out", out,
                "--batch-size", "2", "--crop-sizes", "32,16", "--num-crops", "2,1", "--max-steps", "2",
                "--num-prototypes", "4", "--freeze-prototypes-steps", "0", "--no-tensorboard", *extra)


def test_training_stops_on_a_damaged_shard_naming_it(ingested_ct, tmp_path):
    import shards

    ct = shards.Dataset(ingested_ct).shards("ct")
    assert len(ct) >= 3
    damaged = ct[1]
    original = damaged.tar.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01  # one bit inside a pixel array: DALI would read it silently
    damaged.tar.write_bytes(bytes(flipped))
    try:
        result = _train_on(ingested_ct, tmp_path / "run")
        assert result.returncode != 0, result.stdout + result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        assert f"ct/{damaged.name}" in result.stderr and "checksum" in result.stderr, result.stderr
        assert "step 1/" not in result.stdout  # stopped before the first step, not after reading it

        # The check can be switched off (documented flag): then the same run trains.
        skipped = _train_on(ingested_ct, tmp_path / "run2", "--no-verify-shards")
        assert skipped.returncode == 0, skipped.stderr
        assert json.loads((tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2
    finally:
        damaged.tar.write_bytes(original)


def test_loader_reports_uncommitted_tars_and_missing_shards(ingested_ct, tmp_path):
    import shutil

    import shards
    from augment_dali.loader import DamagedShardError, SwavLoader

    root = tmp_path / "ds"
    shutil.copytree(ingested_ct, root)
    ct = shards.Dataset(root).shards("ct")
    lost_part = root / "manifest" / "modality=ct" / f"{ct[0].name}.parquet"
    saved = lost_part.read_bytes()
    lost_part.unlink()  # its tar stays on disk, no longer listed
    with pytest.warns(UserWarning, match=f"1 shard tar.*without a manifest part.*ct/{ct[0].name}"):
        loader = SwavLoader(root, batch_size=2, crop_sizes=(32, 16), num_crops=(2, 1))
    # the shard table still lists it: reading it stops, naming the shard whose manifest part is gone
    with pytest.raises(DamagedShardError, match=f"shard ct/{ct[0].name}: manifest part .* unreadable"):
        next(iter(loader))
    loader.close()
    lost_part.write_bytes(saved)
    loader = SwavLoader(root, batch_size=2, crop_sizes=(32, 16), num_crops=(2, 1))
    ct[2].tar.unlink()
    with pytest.raises(DamagedShardError, match=f"shard ct/{ct[2].name}: tar missing"):
        next(iter(loader))
    loader.close()


def test_unusable_data_raises_in_the_library_and_exits_1_with_one_line_from_the_cli(tmp_path, dicom_dir):
    """--data at a folder of real DICOM files (the export, not the dataset ingested from it): building
    the training source raises DataError (a caller can catch it; no SystemExit from library code),
    while `python -m train` on it still exits 1 with the same single `error:` line, no traceback."""
    from train.config import load_config
    from train.data import build_source
    from train.errors import DataError

    export = dicom_dir / "ct_kits_abdomen_18"
    args = ["--data", str(export), "--out", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "4"]
    with pytest.raises(DataError, match=str(export)) as raised:
        build_source(load_config(args), 0, 1, "cpu")
    assert not isinstance(raised.value, SystemExit)
    done = _cli("train", *args)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: {raised.value}"
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "checkpoint.pt").exists()
