"""The data side of the GPU check's benchmark stages, on the CPU: the benchmark dataset (real slices
repeated under distinct keys) and benchmarks.train_step fed by the DALI pipeline from it, with the
flags the train_step stage passes (only the device differs there)."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

import shards
from benchmarks import gpu_augment, train_step


@pytest.mark.slow
def test_benchmark_dataset_repeats_real_slices_under_distinct_keys_and_feeds_train_step(tmp_path, dicom_dir, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = gpu_augment.build_dataset(tmp_path / "bench", dicom_dir.parent, per_modality=40)
    ds = shards.Dataset(root)
    assert ds.modalities == ["ct", "mr"]
    ct_paths = sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))
    ct = list(shards.reader.iter_samples(root, "ct"))
    assert len(ct) == 40 and len({key for key, *_ in ct}) == 40            # distinct keys
    assert len(list(shards.reader.iter_samples(root, "mr"))) == 40
    assert (root / "stats" / "energy.json").exists()
    for i in (0, 18, 39):   # sample i is slice i mod 18, in Hounsfield units
        ds = pydicom.dcmread(ct_paths[i % 18])
        hu = (ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)).astype(np.int16)
        assert np.array_equal(ct[i][1], hu)
    fig = train_step.main(["--data", str(root), "--device", "cpu", "--arch", "resnet18", "--batch-size", "4",
                           "--crop-sizes", "32,16", "--steps", "1", "--warmup", "0", "--num-prototypes", "50",
                           "--queue-length", "8", "--precision", "bf16", "--channels-last", "--num-workers", "1"])
    assert fig["data"] == str(root) and fig["precision"] == "fp32" and fig["channels_last"] is False
    assert 0 <= fig["data_wait_fraction"] < 1 and fig["images_per_s"] > 0
    # The augment stage's measurement, CPU half (the GPU half is the same call with device "gpu").
    aug = gpu_augment.augment_figures(root, [4], workers=1, steps={"cpu": 1})
    assert set(aug) == {"workers", "cpu_samples_per_s_b4"} and aug["cpu_samples_per_s_b4"] > 0
