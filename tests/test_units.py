"""Pixel units recorded at ingest choose the normalisation: the HU window only for Hounsfield units,
the per-image robust window for everything else, the same in the DALI pipeline, stats, preview and
downstream inputs."""
from __future__ import annotations

import numpy as np

import shards
from augment_dali.config import HU_WINDOW, ROBUST_PERCENTILE, AugmentConfig, NormalizeConfig
from augment_dali.normalize import modality_units, normalize_dali, normalize_numpy
from augment_dali.stats import compute_stats


def dali_normalize(images, method):
    """The pipeline's operator on the stored integer pixels (CPU)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: [np.ascontiguousarray(i) for i in images], batch=True, layout="HW")
        return normalize_dali(x, method)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.asarray(out[i]) for i in range(len(images))]


def test_medmnist_ingested_as_ct_is_raw_and_gets_the_robust_window(tmp_path, medmnist_dir):
    from test_ingest_arrays import _ingest

    root = _ingest(tmp_path, [medmnist_dir / "breastmnist.npz"], "ct")
    metas = [(pixels, meta) for _, pixels, meta, _ in shards.reader.iter_samples(root)]
    assert len(metas) == 780 and {m["units"] for _, m in metas} == {"raw"}
    ds = shards.Dataset(root)
    assert ds.units("ct") == {"raw"}
    method = NormalizeConfig().method_for("ct", modality_units(ds.units("ct")))
    assert method == ROBUST_PERCENTILE
    stats = compute_stats(root, samples=8, seed=0, config=AugmentConfig.small(), show_progress=False)
    assert stats["modalities"]["ct"]["units"] == "raw" and stats["modalities"]["ct"]["method"] == method

    images = [p for p, _ in metas[:24] if p.max() > p.min()]
    normalised = dali_normalize(images, method)
    for got, img in zip(normalised, images):
        assert img.dtype == np.uint8
        np.testing.assert_allclose(got, normalize_numpy(img, method), atol=2e-6)
        # 0..255 images span [0, 1], not the 0.25..0.31 the HU window gave them
        assert got.min() == 0.0 and got.max() == 1.0
    hu = normalize_numpy(images[0], HU_WINDOW)
    assert 0.25 <= hu.min() and hu.max() <= 0.32


def test_downstream_dataset_inputs_follow_the_recorded_units(tmp_path, dicom_dir, medmnist_dir):
    """A labelled dataset with HU CT slices and raw 8-bit X-rays: each input is the pipeline operator's
    normalisation of the stored pixels with the method its units choose."""
    import pydicom

    from train.downstream.data import load_dataset

    root = tmp_path / "ds"
    ct = [pydicom.dcmread(p) for p in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:12]]
    ct = [(d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept)).astype(np.int16)
          [242:270, 242:270].copy() for d in ct]  # the centre of the abdomen, the X-rays' 28 x 28
    z = np.load(medmnist_dir / "pneumoniamnist.npz")
    xr = list(z["train_images"][:24])
    for modality, images, units in (("ct", ct, "HU"), ("xr", xr, "raw")):
        with shards.ShardWriter(root, modality, f"{modality}-0", label_names=("finding",)) as w:
            for i, img in enumerate(images):
                meta = shards.SampleMeta(modality=modality, split="val" if i % 3 == 0 else "train", units=units,
                                         patient_hash=shards.salted_hash(f"{modality}{i}", "s"),
                                         sop_hash=shards.salted_hash(f"{modality}{i}", "s"))
                w.write(shards.sample_key(f"{modality}{i}", 0, "s"), img, meta, labels=np.array([i % 2]))
    shards.write_dataset_json(root)
    data = load_dataset(root)
    want = {}
    for images, method in ((ct, HU_WINDOW), (xr, ROBUST_PERCENTILE)):
        want.update({img.tobytes(): out for img, out in zip(images, dali_normalize(images, method))})
    inputs = {"train": [], "val": [], "test": []}
    for _, pixels, meta, _ in shards.reader.iter_samples(root):
        split = meta["split"]
        if split == "val":  # load_dataset halves val by patient hash into val and test
            split = "test" if int(meta["patient_hash"], 16) % 2 else "val"
        inputs[split].append(want[pixels.tobytes()])
    assert sum(len(v) for v in inputs.values()) == 36
    for split, images in inputs.items():
        np.testing.assert_allclose(data[split].images[:, 0].numpy(), np.stack(images), atol=2e-6)


def test_nifti_ct_known_to_be_hu_can_be_ingested_as_hu(tmp_path, dicom_dir):
    import pydicom
    import SimpleITK as sitk

    from test_ingest_arrays import _ingest

    slices = [pydicom.dcmread(p) for p in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[:6]]
    volume = np.stack([(d.pixel_array.astype(np.int32) * int(d.RescaleSlope) + int(d.RescaleIntercept))
                       for d in slices]).astype(np.int16)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "abdomen.nii.gz"))
    hu = _ingest(tmp_path / "hu", [tmp_path / "abdomen.nii.gz"], "ct", units="HU")
    plain = _ingest(tmp_path / "plain", [tmp_path / "abdomen.nii.gz"], "ct")
    assert shards.Dataset(hu).units("ct") == {"HU"} and shards.Dataset(plain).units("ct") == {"raw"}
    config = NormalizeConfig()
    assert config.method_for("ct", "HU") == HU_WINDOW and config.method_for("ct", "raw") == ROBUST_PERCENTILE
    import subprocess
    import sys
    bad = subprocess.run([sys.executable, "-m", "ingest", str(dicom_dir), "--out", str(tmp_path / "x"),
                          "--units", "HU"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--units" in bad.stderr and "Traceback" not in bad.stderr
