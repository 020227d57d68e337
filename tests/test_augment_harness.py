"""The DALI-free kernel harness (augment_dali.harness): its CPU path is the DALI operators' CPU backend
(bit for bit, on real CT and MR slices), its CLI reports and exits as documented without a GPU, it
compiles with nvcc (slow), and on a GPU every kernel matches the CPU backend (gpu)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pydicom
import pytest

import augment_dali
from augment_dali import build as plugin_build
from augment_dali import harness as H
from nvidia.dali import fn, pipeline_def

augment_dali.load_plugin()  # the medswav operators (importing the package loads nothing)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMAS = [1.0, 2.0, 4.0, 8.0, 16.0]


def _slice(folder):
    files = sorted(folder.glob("*.dcm"))
    ds = pydicom.dcmread(files[len(files) // 2])
    a = ds.pixel_array.astype(np.float64)
    return ((a - a.min()) / max(a.max() - a.min(), 1e-12)).astype(np.float32)


@pytest.fixture(scope="module")
def images(dicom_dir):
    ct = _slice(dicom_dir / "ct_kits_abdomen_18")
    mr = _slice(dicom_dir / "mr_mprage_sagittal_192")
    return [ct, mr[:200, :150].copy(), ct[100:101, 200:201].copy()]


@pytest.fixture(scope="module")
def cpu_harness():
    return H.Harness(H.build_harness(use_cuda=False))


def _dali_cpu(graph, images, params):
    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None, seed=0)
    def pipe():
        x = fn.external_source(source=lambda: images, layout="HW" if images[0].ndim == 2 else "DHW")
        p = fn.external_source(source=lambda: params)
        out = graph(x, p)
        return tuple(out) if isinstance(out, (list, tuple)) else out

    p = pipe()
    p.build()
    outs = p.run()
    return [[np.array(o[i]) for i in range(len(images))] for o in outs]


def test_harness_cpu_path_is_the_dali_cpu_backend(cpu_harness, images):
    """The harness's CPU side runs the operators' own CPU code: equal bit for bit, per-sample parameters."""
    rng = np.random.default_rng(3)
    refs = [rng.uniform(0.01, 0.2, 6).astype(np.float32) for _ in images]
    got = cpu_harness.energy_bands(images, SIGMAS, refs)
    want = _dali_cpu(lambda x, p: fn.medswav.energy_bands(x, ref_energies=p, sigmas=SIGMAS), images, refs)[0]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    got = cpu_harness.energy_bands(images, SIGMAS)
    want = _dali_cpu(lambda x, p: fn.medswav.band_energies(x, sigmas=SIGMAS), images, refs)[0]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert np.all(got[0] > 0)  # a real slice has energy in every band

    scales = [np.float32([s]) for s in (0.4, 0.7, 0.5)]
    want = _dali_cpu(lambda x, p: fn.medswav.rescale(x, scale=p[0]), images, scales)[0]
    sizes = [cpu_harness.rescale_size(img.shape, float(s[0])) for img, s in zip(images, scales)]
    assert sizes == [w.shape for w in want]
    for g, w in zip(cpu_harness.rescale(images, sizes), want):
        np.testing.assert_array_equal(g, w)

    pos = [rng.uniform(0, 1, 16).astype(np.float32) for _ in images]
    want = _dali_cpu(lambda x, p: fn.medswav.multicrop(x, crop_sizes=[96, 32], num_crops=[2, 6], border=0.1,
                                                        positions=p), images, pos)
    got = cpu_harness.multicrop(images, (96, 32), (2, 6), 0.1, np.asarray(pos, np.float64))
    for g in range(2):
        for i in range(len(images)):
            np.testing.assert_array_equal(got[i][g], want[g][i])


def test_harness_cpu_path_is_the_dali_cpu_backend_on_volumes(cpu_harness, dicom_dir):
    """3-D rescale (trilinear) and 1 + 4 volume crops: the harness's CPU side equals the DALI CPU operators
    bit for bit on a real MR volume (every 4th voxel of the MPRAGE series) and a one-voxel volume."""
    from _volume_fixtures import load_series

    vol, _ = load_series(dicom_dir / "mr_mprage_sagittal_192")
    vols = [np.ascontiguousarray(vol[::4, ::4, ::4]), np.ascontiguousarray(vol[:1, :1, :1])]
    scales = [np.float32([s]) for s in (0.6, 0.3)]
    want = _dali_cpu(lambda x, p: fn.medswav.rescale(x, scale=p[0], min_size=40, max_size=90, min_depth=30,
                                                      max_depth=60), vols, scales)[0]
    assert want[0].shape == (30, 40, 40) and want[1].shape == (40, 40, 40)  # the depth range holds
    for g, w in zip(cpu_harness.rescale(vols, [w.shape for w in want]), want):
        np.testing.assert_array_equal(g, w)
    rng = np.random.default_rng(4)
    pos = [rng.uniform(0, 1, 15).astype(np.float32) for _ in vols]
    want = _dali_cpu(lambda x, p: fn.medswav.multicrop(x, crop_sizes=[48, 24], crop_depths=[40, 20], num_crops=[1, 4],
                                                        border=0.1, positions=p), vols, pos)
    got = cpu_harness.multicrop(vols, (48, 24), (1, 4), 0.1, np.asarray(pos, np.float64), crop_depths=(40, 20))
    for g in range(2):
        for i in range(len(vols)):
            np.testing.assert_array_equal(got[i][g], want[g][i])


def test_harness_cli_without_gpu_runs_cpu_self_checks_and_exits_3(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "augment_dali.harness", "--out", str(tmp_path), "--no-cuda"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == H.EXIT_NO_DEVICE, r.stdout + r.stderr
    report = json.loads((tmp_path / "harness.json").read_text())
    cpu = [c for c in report["checks"] if c["kind"] == "cpu"]
    assert len(cpu) >= 8 and all(c["status"] == "pass" for c in cpu), cpu
    assert [c["status"] for c in report["checks"] if c["kind"] == "gpu"] == ["skip"]
    assert report["exit_code"] == H.EXIT_NO_DEVICE and report["cuda_backend"] is False


def test_harness_cli_rejects_missing_out():
    r = subprocess.run([sys.executable, "-m", "augment_dali.harness"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "--out" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(plugin_build.find_nvcc() is None, reason="needs nvcc")
def test_harness_compiles_with_nvcc_without_spills_or_local_memory():
    lib = H.build_harness(use_cuda=True)
    h = H.Harness(lib)
    assert h.has_cuda_backend
    report = (lib.parent / "ptxas.txt").read_text()
    kernels = [ln for ln in report.splitlines() if "Compiling entry function" in ln]
    for name in ("fir_pass_kernel", "recursive_pass_kernel", "moments_kernel", "finalize_kernel", "combine_kernel",
                 "rescale_kernel", "multicrop_kernel", "pointwise_kernel"):
        assert any(name in k for k in kernels), name
    assert "Local memory used" not in report and "spill" in report
    assert all(ln.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
               for ln in report.splitlines() if "bytes spill stores" in ln), report
    count, _ = h.devices()
    if count == 0:  # no GPU here: the GPU half answers with the documented error, not a crash
        with pytest.raises(H.HarnessError, match="(?i)cuda|device|driver"):
            h.rescale([np.ones((4, 4), np.float32)], [(2, 2)], gpu=True)


def _device_count():
    if plugin_build.find_nvcc() is None:
        return 0
    try:
        return H.Harness(H.build_harness(use_cuda=True)).devices()[0]
    except H.HarnessError:
        return 0


@pytest.mark.gpu
@pytest.mark.slow
def test_harness_gpu_kernels_equal_cpu_backend(tmp_path):
    if not augment_dali.gpu_backend_usable() or _device_count() == 0:
        pytest.skip("needs a CUDA GPU and nvcc")
    rc = H.main(["--out", str(tmp_path), "--quick"])
    report = json.loads((tmp_path / "harness.json").read_text())
    failed = [c for c in report["checks"] if c["status"] != "pass"]
    assert rc == H.EXIT_OK and not failed, failed
    names = {c["name"] for c in report["checks"]}
    assert {"gpu/multicrop_over_65535_crops", "gpu/energy_bands_bit_reproducible", "gpu/energy_bands_3d",
            "gpu/rescale_3d", "gpu/multicrop_3d"} <= names
