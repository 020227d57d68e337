"""The shard-to-batch pipeline on a real dataset (CT, MR, X-ray, ultrasound slices from ../shared/data).

Small sizes keep it fast (AugmentConfig.small(): sides 48..96, crops 2 x 32 + 6 x 16); the graph is the
same as with the METHOD defaults.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from _augment_fixtures import COUNTS, LABEL_NAMES, SALT, build_dataset, train_count

import augment_dali
import shards
from augment_dali.config import AugmentConfig
from augment_dali.loader import SwavLoader
from augment_dali.normalize import normalize_dali, normalize_numpy
from augment_dali.plan import EpochPlanner, _rotate, rank_range, steps_per_epoch
from augment_dali.stats import StatsMissingError, compute_stats, load_energy_stats, write_stats

augment_dali.load_plugin()  # the medswav operators (importing the package loads nothing)

SMALL = AugmentConfig.small()
B = 8  # 4 modalities x 2 samples per step


@pytest.fixture(scope="session")
def aug_dataset(tmp_path_factory, dicom_dir, medmnist_dir):
    root = tmp_path_factory.mktemp("augment-dataset")
    build_dataset(root, dicom_dir, medmnist_dir)
    write_stats(root, compute_stats(root, samples=24, seed=0, config=SMALL, show_progress=False))
    return root


@pytest.fixture(scope="session")
def xr_labels(medmnist_dir):
    z = np.load(medmnist_dir / "pneumoniamnist.npz")
    return {shards.sample_key(f"pneumoniamnist.train.{i}", 0, SALT): float(z["train_labels"][i, 0])
            for i in range(COUNTS["xr"])}


def _keys_by_split(root, split):
    table = shards.Dataset(root).manifest(columns=["key", "split", "modality"]).to_pylist()
    return {r["key"]: r["modality"] for r in table if r["split"] == split}


def _loader(root, **kw):
    kw.setdefault("batch_size", B)
    kw.setdefault("augment", SMALL)
    kw.setdefault("with_keys", True)
    return SwavLoader(root, **kw)


# --- normalisation -------------------------------------------------------------------------------

def _dali_normalize(images, method):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [i.astype(np.float32) for i in images], batch=True, layout="HW")
        return normalize_dali(x, method)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.asarray(out[i]) for i in range(len(images))]


def test_normalisation_dali_equals_numpy_twin_on_real_slices(dicom_dir):
    ct = [pydicom.dcmread(p) for p in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:3]]
    ct_hu = [(d.pixel_array.astype(np.int32) + int(d.RescaleIntercept)).astype(np.int16) for d in ct]
    mr = [pydicom.dcmread(p).pixel_array for p in sorted((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm"))[60:63]]
    constant = [np.full((40, 30), 123, np.uint16)]
    for method, images in (("hu_window", ct_hu + constant), ("robust_percentile", mr + constant)):
        for got, img in zip(_dali_normalize(images, method), images):
            want = normalize_numpy(img, method)
            assert got.shape == img.shape and np.isfinite(got).all()
            np.testing.assert_allclose(got, want, atol=2e-6)
            assert got.min() >= 0.0 and got.max() <= 1.0
    # CT window: air -> 0, water -> 1024/4095, the top of the 12-bit range -> 1
    hu = np.array([[-2000, -1024, 0, 3071, 4000]], np.int16)
    np.testing.assert_allclose(normalize_numpy(hu, "hu_window")[0], [0, 0, 1024 / 4095, 1, 1], atol=1e-6)
    # MR: a real slice uses the whole range; a constant image maps to zeros, never NaN
    mr_norm = normalize_numpy(mr[0], "robust_percentile")
    assert mr_norm.min() == 0.0 and mr_norm.max() == 1.0
    assert not normalize_numpy(constant[0], "robust_percentile").any()


# --- stats ---------------------------------------------------------------------------------------

def test_stats_energies_are_sensible_and_reproducible(aug_dataset):
    stats = load_energy_stats(aug_dataset)
    assert sorted(stats["modalities"]) == ["ct", "mr", "us", "xr"]
    assert stats["sigmas"] == list(SMALL.sigmas) and len(stats["bands"]) == 6
    for m, s in stats["modalities"].items():
        assert s["R"] == min(24, COUNTS[m])
        mean, std = np.array(s["mean"]), np.array(s["std"])
        assert mean.shape == std.shape == (6,)
        # energies are standard deviations of bands of [0, 1] images: positive and below 0.5
        assert np.all(mean > 1e-4) and np.all(mean < 0.5), (m, mean)
        assert np.all(std >= 0) and np.all(std < mean + 1e-9), (m, std)
        assert np.all(np.array(s["min"]) <= mean) and np.all(mean <= np.array(s["max"]))
    again = compute_stats(aug_dataset, samples=24, seed=0, config=SMALL, show_progress=False)
    assert again["modalities"] == stats["modalities"]
    other = compute_stats(aug_dataset, samples=24, seed=1, config=SMALL, modalities=["mr"], show_progress=False)
    assert other["modalities"]["mr"]["mean"] != stats["modalities"]["mr"]["mean"]


def test_stats_energies_match_the_numpy_reference(aug_dataset):
    from augment_dali import reference
    from augment_dali.sampling import read_pixels, sample_refs
    from augment_dali.stats import band_energies_batch, energy_pipeline

    ds = shards.Dataset(aug_dataset)
    images = [reference.rescale(normalize_numpy(read_pixels(r), "robust_percentile"), 0.5, 48, 96)
              for r in sample_refs(ds, "mr", 3, seed=5)]
    got = band_energies_batch(energy_pipeline(SMALL.sigmas, batch_size=4), images)
    want = np.stack([reference.band_energies(i, SMALL.sigmas) for i in images])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # the stats path: raw pixels normalised and rescaled by the pipeline's operators, then energies
    raw = [read_pixels(r) for r in sample_refs(ds, "mr", 3, seed=5)]
    prepared = energy_pipeline(SMALL.sigmas, batch_size=4, prepare=("robust_percentile", SMALL.normalize, (48, 96)))
    np.testing.assert_allclose(band_energies_batch(prepared, raw, [0.5] * 3), want, rtol=2e-3, atol=1e-6)


def test_stats_cli_writes_energy_json(aug_dataset, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(aug_dataset, root)
    (root / "stats" / "energy.json").unlink()
    r = subprocess.run([sys.executable, "-m", "augment_dali.stats", str(root), "--samples", "5", "--small",
                        "--modalities", "ct,xr"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    stats = json.loads((root / "stats" / "energy.json").read_text())
    assert sorted(stats["modalities"]) == ["ct", "xr"] and stats["modalities"]["ct"]["R"] == 5
    bad = subprocess.run([sys.executable, "-m", "augment_dali.stats", str(root), "--modalities", "pet"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "available: ct, mr, us, xr" in bad.stderr


def test_missing_stats_and_unknown_modality_are_clear_errors(aug_dataset, tmp_path):
    root = tmp_path / "nostats"
    shutil.copytree(aug_dataset, root)
    (root / "stats" / "energy.json").unlink()
    with pytest.raises(StatsMissingError, match=r"python -m augment_dali.stats"):
        SwavLoader(root, batch_size=B)
    with pytest.raises(ValueError, match=r"available: ct, mr, us, xr"):
        SwavLoader(aug_dataset, batch_size=B, modalities=["ct", "pet"])
    with pytest.raises(ValueError, match=r"multiple of the number of modalities"):
        SwavLoader(aug_dataset, batch_size=6)


# --- epoch plan ----------------------------------------------------------------------------------

def test_rank_ranges_partition_and_steps_are_equal():
    for total in (0, 1, 7, 15, 1001):
        for world in (1, 2, 3, 8):
            ranges = [rank_range(total, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    assert steps_per_epoch({"ct": 15, "mr": 40}, 2, 2) == 3


def test_rotated_reading_order_keeps_every_sample_once():
    segments = [("a", 0, 5), ("b", 2, 4), ("c", 0, 3)]

    def flat(segs):
        return [(name, i) for name, lo, hi in segs for i in range(lo, hi)]

    for by in range(10):
        assert flat(_rotate(segments, by)) == flat(segments)[by:] + flat(segments)[:by]


def test_derived_index_holds_exactly_the_split(aug_dataset, tmp_path):
    ds = shards.Dataset(aug_dataset)
    planner = EpochPlanner(ds, "mr", "train", tmp_path)
    assert planner.selected == train_count("mr")
    train = _keys_by_split(aug_dataset, "train")
    seen = []
    for rank in range(3):
        files = planner.files(seed=0, epoch=4, rank=rank, world_size=3)
        keys = []
        for idx in files.indices:
            lines = open(idx).read().splitlines()
            assert lines[0] == f"v1.2 {len(lines) - 1}"
            keys += [line.split()[3].split(".")[0] for line in lines[1:]]
        assert len(keys) == files.samples and all(train.get(k) == "mr" for k in keys)
        seen += keys
    assert sorted(seen) == sorted(k for k, m in train.items() if m == "mr")


def test_rank_start_up_reads_the_shard_table_and_only_its_own_share(aug_dataset, tmp_path, monkeypatch):
    """Rank 0 of 3 starts and reads its first batch from a copy holding only its own share of every
    modality's shards (tars, indices, manifest parts) plus the shard tables: identical first batch."""
    from pathlib import Path

    world, seed = 3, 11
    share = {m: {Path(t).stem for t in EpochPlanner(shards.Dataset(aug_dataset), m, "train", tmp_path / "idx")
                 .files(seed, 0, 0, world).tars} for m in COUNTS}
    copy = tmp_path / "copy"
    shutil.copytree(aug_dataset, copy)
    removed = 0
    for m, own in share.items():
        for f in [*(copy / "manifest" / f"modality={m}").glob("*.parquet"), *(copy / "shards" / m).glob("*")]:
            if f.stem not in own:
                f.unlink()
                removed += 1
    assert removed >= 6  # mr keeps 1-2 of its 3 shards, xr 1 of 2, ct 1 of 2 (3 files per shard)

    def first_keys(root):
        return next(iter(_loader(root, rank=0, world_size=world, seed=seed, steps_per_epoch=1)))["key"]

    assert first_keys(copy) == first_keys(aug_dataset)

    # and on the whole dataset no other shard's manifest part is opened, not even its footer (the units
    # of each modality come from dataset.json)
    import pyarrow.parquet as pq

    opened = []
    for name in ("read_schema", "read_metadata"):
        original = getattr(pq, name)
        monkeypatch.setattr(pq, name, lambda where, *a, _f=original, **k: (opened.append(Path(where)), _f(where, *a, **k))[1])
    _loader(aug_dataset, rank=0, world_size=world, seed=seed, steps_per_epoch=1)
    others = [p for p in opened if p.parent.name.startswith("modality=")
              and p.stem not in share[p.parent.name.split("=", 1)[1]]]
    assert not others, others


# --- loader --------------------------------------------------------------------------------------

def test_batches_are_balanced_shaped_in_range_and_labelled(aug_dataset, xr_labels):
    loader = _loader(aug_dataset, seed=0)
    assert loader.modalities == ["ct", "mr", "us", "xr"]
    assert len(loader) == (train_count("ct") // 2)  # CT is the smallest modality: 15 train slices
    train = _keys_by_split(aug_dataset, "train")
    steps = list(loader)
    assert len(steps) == len(loader)
    for step in steps:
        g0, g1 = step["crops"]
        assert g0.shape == (B, 2, 1, 32, 32) and g1.shape == (B, 6, 1, 16, 16)
        for g in (g0, g1):
            assert g.dtype.is_floating_point and bool(g.isfinite().all())
            assert float(g.min()) >= -0.2 - 1e-5 and float(g.max()) <= 1.3 + 1e-5
        assert float(g0.std()) > 0.01  # real content, not blank crops
        assert step["modality"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert [train[k] for k in step["key"]] == ["ct", "ct", "mr", "mr", "us", "us", "xr", "xr"]
        assert step["label"].shape == (B, len(LABEL_NAMES))
        assert step["labelled"].tolist() == [False] * 6 + [True] * 2
        assert bool(step["label"][:6].isnan().all())
        assert step["label"][6:, 0].tolist() == [xr_labels[k] for k in step["key"][6:]]


def test_two_ranks_get_equal_steps_and_disjoint_samples(aug_dataset):
    per_rank = []
    for rank in (0, 1):
        loader = _loader(aug_dataset, rank=rank, world_size=2, seed=7)
        keys = [k for step in loader for k in step["key"]]
        per_rank.append((len(loader), keys))
    (n0, k0), (n1, k1) = per_rank
    assert n0 == n1 == train_count("ct") // 2 // 2
    assert len(k0) == len(k1) == n0 * B
    assert len(set(k0)) == len(k0) and len(set(k1)) == len(k1)  # no repeat within the epoch on a rank
    assert not set(k0) & set(k1)                                  # ranks read disjoint samples
    train = _keys_by_split(aug_dataset, "train")
    assert all(k in train for k in k0 + k1)                       # only the requested split


def test_same_seed_reproduces_and_epochs_differ(aug_dataset):
    def run(seed, epoch=None):
        loader = _loader(aug_dataset, seed=seed, steps_per_epoch=2)
        if epoch is not None:
            loader.set_epoch(epoch)
        steps = list(loader)
        return [s["key"] for s in steps], [c.numpy() for s in steps for c in s["crops"]]

    keys_a, crops_a = run(3)
    keys_b, crops_b = run(3)
    assert keys_a == keys_b
    for a, b in zip(crops_a, crops_b):
        np.testing.assert_array_equal(a, b)
    keys_c, crops_c = run(4)
    assert keys_c != keys_a or any(not np.array_equal(a, c) for a, c in zip(crops_a, crops_c))
    keys_e1, crops_e1 = run(3, epoch=1)
    assert keys_e1 != keys_a
    # iterating twice moves on to the next epoch, which equals a fresh loader's set_epoch(1)
    loader = _loader(aug_dataset, seed=3, steps_per_epoch=2)
    list(loader)
    assert [s["key"] for s in loader] == keys_e1


def test_mid_epoch_resume_from_checkpoint_runs_only_the_remaining_steps(aug_dataset):
    def steps_of(loader):
        return [(s["key"], [c.numpy() for c in s["crops"]], np.nan_to_num(s["label"].numpy(), nan=-1))
                for s in loader]

    straight = _loader(aug_dataset, seed=5)
    straight.set_epoch(1)
    n = len(straight)
    full, positions = [], {}
    for k, step in enumerate(straight, start=1):
        full.append(steps_of([step])[0])
        if k < n:
            positions[k] = straight.checkpoint()   # the position after k steps
    assert n >= 6 and len(full) == n and straight.batches_run == n

    for k in (2, n - 2):
        resumed = _loader(aug_dataset, seed=5)
        resumed.set_epoch(1, start_step=k, checkpoint=positions[k])
        rest = steps_of(resumed)
        # Only the remaining steps were read and augmented, none of the first k replayed ...
        assert resumed.batches_run == n - k and resumed.batches_replayed == 0
        # ... and they are bit for bit those of the uninterrupted epoch (keys, crops, labels).
        for (keys_a, crops_a, label_a), (keys_b, crops_b, label_b) in zip(full[k:], rest):
            assert keys_a == keys_b
            np.testing.assert_array_equal(label_a, label_b)
            for a, b in zip(crops_a, crops_b):
                np.testing.assert_array_equal(a, b)
        assert len(rest) == n - k

    replay = _loader(aug_dataset, seed=5)  # no checkpoint: the same steps, the first k run and dropped
    replay.set_epoch(1, start_step=3)
    assert [s[0] for s in steps_of(replay)] == [f[0] for f in full[3:]]
    assert replay.batches_run == n and replay.batches_replayed == 3

    other = _loader(aug_dataset, seed=6)  # a position is valid only for its own seed, epoch, step
    with pytest.raises(ValueError, match="seed"):
        other.set_epoch(1, start_step=2, checkpoint=positions[2])
    with pytest.raises(ValueError, match="epoch"):
        _loader(aug_dataset, seed=5).set_epoch(2, start_step=2, checkpoint=positions[2])
    with pytest.raises(ValueError, match="step"):
        _loader(aug_dataset, seed=5).set_epoch(1, start_step=3, checkpoint=positions[2])


def test_cpu_pipeline_runs_without_cuda(aug_dataset):
    code = (
        "import torch; from augment_dali.config import AugmentConfig; from augment_dali.loader import SwavLoader\n"
        f"l = SwavLoader({str(aug_dataset)!r}, batch_size=4, modalities=['mr', 'xr'], augment=AugmentConfig.small(),"
        " steps_per_epoch=1)\n"
        "s = next(iter(l)); print(tuple(s['crops'][0].shape), s['crops'][0].device, torch.cuda.is_initialized())\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "(4, 2, 1, 32, 32) cpu False"


@pytest.mark.gpu
@pytest.mark.skipif(not augment_dali.gpu_backend_usable(), reason="needs a CUDA GPU and a plugin built with nvcc")
def test_gpu_pipeline_equals_cpu_pipeline(aug_dataset):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for torch")
    cpu = list(_loader(aug_dataset, seed=5, steps_per_epoch=2, device="cpu"))
    gpu = list(_loader(aug_dataset, seed=5, steps_per_epoch=2, device="gpu"))
    for a, b in zip(cpu, gpu):
        assert a["key"] == b["key"]
        for ca, cb in zip(a["crops"], b["crops"]):
            assert cb.is_cuda
            np.testing.assert_allclose(ca.numpy(), cb.cpu().numpy(), atol=1e-4)


def test_gpu_loader_refuses_a_plugin_without_cuda(aug_dataset, monkeypatch):
    """device='gpu' with a CPU-only plugin fails at construction with the fix named, not deep in DALI."""
    monkeypatch.setattr(augment_dali, "plugin_has_cuda", lambda *a, **k: False)
    with pytest.raises(ValueError, match="CUDA backend.*--force"):
        SwavLoader(aug_dataset, batch_size=4, modalities=["mr", "xr"], device="gpu", device_id=0, augment=SMALL)


@pytest.mark.gpu
@pytest.mark.skipif(not augment_dali.gpu_backend_usable(), reason="needs a CUDA GPU and a plugin built with nvcc")
def test_cpu_loader_pins_its_crops_on_request(aug_dataset):
    step = next(iter(_loader(aug_dataset, seed=5, steps_per_epoch=1, device="cpu", pin_memory=True)))
    assert all(c.is_pinned() for c in step["crops"])


def test_augment_graph_survives_constant_tiny_and_real_images(aug_dataset, dicom_dir):
    """Bad input through the training graph: a constant image (every band energy 0), an image smaller
    than the crops, a real MR slice; outputs are always finite with the right shapes."""
    from augment_dali.preview import augment_images

    stats = load_energy_stats(aug_dataset)["modalities"]["mr"]
    real = pydicom.dcmread(sorted((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm"))[90]).pixel_array
    images = [np.full((64, 80), 500, np.uint16), np.arange(35, dtype=np.uint16).reshape(5, 7), real]
    cfg = AugmentConfig.small(size_range=(8, 96))  # lets the 5 x 7 image stay smaller than the 32-px crops
    crops, params = augment_images(images, "mr", stats, cfg, seed=1)
    assert crops[0].shape == (3, 2, 32, 32) and crops[1].shape == (3, 6, 16, 16)
    for group in crops:
        assert np.isfinite(group).all()
        assert group.min() >= -0.2 - 1e-5 and group.max() <= 1.3 + 1e-5
    for g in crops:  # the constant image stays constant in every crop (no band to scale)
        assert np.ptp(g[0]) == 0.0
    assert np.ptp(crops[0][2]) > 0.1  # the real slice keeps its structure
    assert np.all((params["scale"] >= 0.1) & (params["scale"] <= 0.7))
    assert set(np.unique(params["use_gamma"])) <= {0.0, 1.0}


def test_energy_bands_can_be_switched_off(aug_dataset, dicom_dir):
    """`energy_bands = false` (the ablation of docs/EVALUATION.md section 7) removes exactly that stage:
    with rescale and intensity held at the identity (ranges of one value), every full-resolution crop
    is then a window of the normalised slice; with the bands on, the same draws give a different image."""
    import dataclasses

    from augment_dali.preview import augment_images

    stats = load_energy_stats(aug_dataset)["modalities"]["mr"]
    real = pydicom.dcmread(sorted((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm"))[90]).pixel_array
    identity = dict(scale_range=(1.0, 1.0), p_gamma=0.0, linear_scale_range=(1.0, 1.0), linear_shift_range=(0.0, 0.0))
    off = dataclasses.replace(AugmentConfig.small(size_range=(8, 512)), energy_bands=False, **identity)
    crops_off, _ = augment_images([real], "mr", stats, off, seed=1)
    crops_on, _ = augment_images([real], "mr", stats, dataclasses.replace(off, energy_bands=True), seed=1)
    norm = normalize_numpy(real, off.normalize.method_for("mr", ""), off.normalize)
    for crop in crops_off[0][0]:
        windows = np.lib.stride_tricks.sliding_window_view(norm, crop.shape)
        assert np.abs(windows - crop).max(axis=(2, 3)).min() < 1e-6
    assert np.abs(crops_on[0] - crops_off[0]).max() > 0.05
    with pytest.raises(ValueError, match="linear_shift_range must satisfy min <= max"):
        AugmentConfig(linear_shift_range=(0.1, -0.1))


def test_preview_cli_draws_every_modality(aug_dataset, tmp_path):
    out = tmp_path / "preview.png"
    r = subprocess.run([sys.executable, "-m", "augment_dali.preview", str(aug_dataset), "--out", str(out),
                        "--small", "--per-modality", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[0] > 400 and img.shape[1] > 800  # 4 rows x 9 panels
    assert img[..., :3].std() > 0.1                  # pictures, not an empty canvas
    bad = subprocess.run([sys.executable, "-m", "augment_dali.preview", str(aug_dataset), "--modalities", "pet"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "available: ct, mr, us, xr" in bad.stderr
