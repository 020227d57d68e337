"""The medswav DALI operators on 3-D volumes ("DHW") against their NumPy references, on real series.

Volumes: the MPRAGE MR series (192 sagittal slices of 256 x 256, 0.86 x 0.86 mm, 0.9 mm apart) and the
KiTS abdominal CT slices (18 x 512 x 512, 0.66 x 0.66 mm, 2.5 mm apart), each read with pydicom and
stacked in the order of ImagePositionPatient along the slice normal. To keep the suite fast the MR
volume is taken at every second voxel (96 x 128 x 128) and the CT at every second row and column
(18 x 256 x 256); spacings follow.

Tolerances as in test_augment_ops.py: rescale 1e-4 absolute (float32 coordinates and weights),
energy_bands 2e-4 absolute, gamma / linear 1e-6, multicrop exact.
"""
from __future__ import annotations

import numpy as np
import pytest
from _volume_fixtures import load_series

import augment_dali
from augment_dali import reference as R
from augment_dali import stats
from nvidia.dali import fn, pipeline_def

augment_dali.load_plugin()  # the medswav operators (importing the package loads nothing)

MAX_ERR = {"gamma": 1e-6, "linear": 1e-6, "rescale": 1e-4, "energy_bands": 2e-4}
RANGE_3D = dict(min_size=112, max_size=250, min_depth=96, max_depth=200)  # METHOD.md section 5
(D_LO, H_LO, _), (D_HI, H_HI, _) = stats.VOLUME_SIZE_RANGE


@pytest.fixture(scope="module")
def mr_volume(dicom_dir):
    vol, (dz, dy, dx) = load_series(dicom_dir / "mr_mprage_sagittal_192")
    assert vol.shape == (192, 256, 256) and 0.85 < dz < 0.95
    return np.ascontiguousarray(vol[::2, ::2, ::2]), (2 * dz, 2 * dy, 2 * dx)


@pytest.fixture(scope="module")
def ct_volume(dicom_dir):
    vol, (dz, dy, dx) = load_series(dicom_dir / "ct_kits_abdomen_18")
    assert vol.shape == (18, 512, 512) and dz == pytest.approx(2.5)
    return np.ascontiguousarray(vol[:, ::2, ::2]), (dz, 2 * dy, 2 * dx)


def _constant(batch):
    return lambda: batch


def run_pipeline(graph, batches, iterations=1, seed=1234):
    """Feeds `batches` (per input, a list of per-sample arrays; 3-D ones as "DHW") through graph on the
    CPU; returns per iteration a list of outputs, each a list of per-sample NumPy arrays."""
    n = len(batches[0])

    @pipeline_def(batch_size=n, num_threads=2, device_id=None, seed=seed)
    def pipe():
        inputs = [fn.external_source(source=_constant(b), batch=True, layout="DHW" if b[0].ndim == 3 else None)
                  for b in batches]
        outs = graph(*inputs)
        return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)

    p = pipe()
    p.build()
    return [[[np.array(o[i]) for i in range(n)] for o in p.run()] for _ in range(iterations)]


# --- rescale -----------------------------------------------------------------------------------

def test_rescale_size_rule_for_volumes():
    # in range: the factor is kept; depth has its own bounds
    assert R.rescale_size((192, 256, 256), 0.5, **RANGE_3D) == (96, 128, 128)
    # too small: the binding bound is the depth (96 / 19.2 = 5 > 112 / 25.6)
    assert R.rescale_size((192, 256, 256), 0.1, **RANGE_3D) == (96, 128, 128)
    # too large: the longest side goes to its maximum
    assert R.rescale_size((400, 512, 512), 0.7, **RANGE_3D) == (195, 250, 250)
    # anisotropic CT: 2.5 mm slices count 2.5 / 0.664 times in the target sides (isotropic voxels);
    # 18 planes at s = 0.4 give t = (27.1, 204.8, 204.8): no factor fits both ranges, depth wins
    assert R.rescale_size((18, 512, 512), 0.4, **RANGE_3D, spacing=(2.5, 0.664, 0.664)) == (96, 250, 250)
    # 60 planes at s = 0.3: t = (67.8, 153.6, 153.6), k = 96 / 67.8 brings the depth to its minimum
    assert R.rescale_size((60, 512, 512), 0.3, **RANGE_3D, spacing=(2.5, 0.664, 0.664)) == (96, 218, 218)
    # without depth bounds the in-plane ones hold on every axis (the 2-D rule on three sides)
    assert R.rescale_size((100, 300, 300), 0.5, 112, 250) == (112, 250, 250)


def test_rescale_volumes_match_reference_within_the_3d_range(mr_volume, ct_volume):
    (mr, mr_sp), (ct, ct_sp) = mr_volume, ct_volume
    vols = [mr, ct, ct]
    scales = [np.float32(0.6), np.float32(0.3), np.float32(0.3)]
    spacings = [np.float32(mr_sp), np.float32(ct_sp), np.float32((1.0, 1.0, 1.0))]

    def graph(x, s, sp):
        return fn.medswav.rescale(x, scale=s, spacing=sp, **RANGE_3D)

    (outs,), = run_pipeline(graph, [vols, [np.array(s) for s in scales], [np.array(s) for s in spacings]])
    for x, s, sp, y in zip(vols, scales, spacings, outs):
        ref = R.rescale(x, float(s), **RANGE_3D, spacing=tuple(float(v) for v in sp))
        assert y.shape == ref.shape
        assert D_LO <= y.shape[0] <= D_HI and all(H_LO <= side <= H_HI for side in y.shape[1:])
        np.testing.assert_allclose(y, ref, atol=MAX_ERR["rescale"], rtol=0)
    # an 18-slice CT is below the depth minimum at any s: both readings end at 96 x 250 x 250
    assert outs[1].shape == outs[2].shape == (96, 250, 250)
    # trilinear resampling keeps the intensity statistics of the real volume
    assert outs[0].mean() == pytest.approx(mr.mean(), rel=0.02)


def test_rescale_with_spacing_gives_isotropic_voxels(ct_volume):
    """Without size bounds, the 2.5 mm CT planes are resampled to the in-plane voxel size: the output
    voxel's physical extent is (nearly) the same along every axis, unlike the voxel-unit rule's."""
    ct, ct_sp = ct_volume
    free = dict(min_size=0, max_size=0, min_depth=0, max_depth=0)
    (iso, vox), = run_pipeline(lambda x, sp: (fn.medswav.rescale(x, scale=0.5, spacing=sp, **free),
                                              fn.medswav.rescale(x, scale=0.5, **free)),
                               [[ct], [np.float32(ct_sp)]])
    assert iso[0].shape == R.rescale_size(ct.shape, 0.5, spacing=ct_sp, **free) == (17, 128, 128)
    assert vox[0].shape == (9, 128, 128)
    extent = [n * sp / m for n, sp, m in zip(ct.shape, ct_sp, iso[0].shape)]  # mm per output voxel
    assert max(extent) / min(extent) < 1.02
    np.testing.assert_allclose(iso[0], R.rescale(ct, 0.5, spacing=ct_sp, **free), atol=MAX_ERR["rescale"], rtol=0)


def test_rescale_random_scales_keep_volumes_in_range(ct_volume):
    ct, ct_sp = ct_volume
    small = np.ascontiguousarray(ct[:, ::4, ::4])  # the size rule only, on a light input
    rng = np.random.default_rng(7)
    scales = rng.uniform(0.1, 0.7, size=12).astype(np.float32)
    (outs,), = run_pipeline(lambda x, s: fn.medswav.rescale(x, scale=s, **RANGE_3D),
                            [[small] * len(scales), [np.array(s) for s in scales]])
    for s, y in zip(scales, outs):
        assert y.shape == R.rescale_size(small.shape, float(s), **RANGE_3D)
        assert D_LO <= y.shape[0] <= D_HI and all(H_LO <= side <= H_HI for side in y.shape[1:])


def test_rescale_of_one_plane_volume_equals_2d_rescale(mr_volume):
    """A 2-D image and the same image as a one-plane volume are resampled identically in-plane."""
    mr, _ = mr_volume
    img = mr[40]
    (flat,), = run_pipeline(lambda x: fn.medswav.rescale(x, scale=0.7, min_size=0, max_size=0), [[img]])
    (vol,), = run_pipeline(lambda x: fn.medswav.rescale(x, scale=0.7, min_size=0, max_size=0, min_depth=0,
                                                        max_depth=0), [[img[None].copy()]])
    assert vol[0].shape == (1,) + flat[0].shape
    np.testing.assert_array_equal(vol[0][0], flat[0])


# --- energy bands with per-modality reference statistics ------------------------------------------

def test_energy_bands_on_volumes_with_per_modality_reference_stats(mr_volume, ct_volume):
    """Reference energies per modality measured on rescaled volumes by augment_dali.stats, drawn from
    [mean - std, mean + std] as in training, applied by the 3-D cascade (sigmas in voxels along every
    axis of the isotropically rescaled volume); equal to the NumPy reference."""
    rng = np.random.default_rng(5)
    per_modality = {"mr": mr_volume, "ct": ct_volume}
    sigmas = (1.0, 2.0, 4.0, 8.0, 16.0)
    small_range = ((24, 64, 64), (48, 96, 96))  # the 3-D rule at a test-friendly size (float64 reference)
    as_args = dict(min_depth=24, min_size=64, max_depth=48, max_size=96)
    for modality, (vol, spacing) in per_modality.items():
        s = stats.measure_volumes([vol], [spacing], samples=2, seed=1, scale_range=(0.5, 0.5),
                                  size_range=small_range)
        assert s["R"] == 2 and len(s["mean"]) == len(sigmas) + 1
        (rescaled,), = run_pipeline(lambda x, sp: fn.medswav.rescale(x, scale=0.5, spacing=sp, **as_args),
                                    [[vol], [np.float32(spacing)]])
        x = rescaled[0]
        own = R.band_energies(x, sigmas)
        np.testing.assert_allclose(s["mean"], own, rtol=1e-4)  # stats measured the same volume twice
        mean, std = np.asarray(s["mean"]), np.maximum(np.asarray(s["std"]), 0.2 * np.asarray(s["mean"]))
        ref = rng.uniform(mean - std, mean + std).astype(np.float32)
        (ys,), = run_pipeline(lambda v, r: fn.medswav.energy_bands(v, ref_energies=r), [[x], [ref]])
        want = R.energy_bands(x, ref, sigmas)
        assert ys[0].shape == x.shape and 24 <= x.shape[0] <= 48 and all(64 <= v <= 96 for v in x.shape[1:])
        np.testing.assert_allclose(ys[0], want, atol=MAX_ERR["energy_bands"], rtol=0)
        assert np.abs(ys[0] - x).max() > 10 * MAX_ERR["energy_bands"]  # the drawn energies changed it


# --- gamma / linear ----------------------------------------------------------------------------

def test_gamma_and_linear_accept_volumes(mr_volume):
    mr, _ = mr_volume
    vols = [mr, np.ascontiguousarray(mr[10:50, 20:90, 5:120])]
    params = [np.float32([2.2, 1.05, -0.1]), np.float32([1.8, 0.9, 0.2])]

    def graph(x, p):
        return fn.medswav.gamma(x, gamma=p[0]), fn.medswav.linear(x, scale=p[1], shift=p[2])

    (g, lin), = run_pipeline(graph, [vols, params])
    for x, p, gy, ly in zip(vols, params, g, lin):
        assert gy.shape == x.shape and ly.shape == x.shape
        np.testing.assert_allclose(gy, R.gamma(x, float(p[0])), atol=MAX_ERR["gamma"], rtol=0)
        np.testing.assert_allclose(ly, R.linear(x, float(p[1]), float(p[2])), atol=MAX_ERR["linear"], rtol=0)


# --- multicrop: 1 + 4 crops of 224 x 224 x 192 and 112 x 112 x 96 ---------------------------------

CROPS_3D = dict(crop_sizes=[224, 112], crop_depths=[192, 96], num_crops=[1, 4])


def _coordinate_volume(d, h, w):
    """Voxel value = flat index + 1 (exact in float32 below 2^24), so a crop shows where it was taken."""
    return (np.arange(d * h * w, dtype=np.float32) + 1).reshape(d, h, w)


def _origin3(crop, shape):
    v = int(crop[crop > 0].min()) - 1
    d, h, w = shape
    return v // (h * w), (v // w) % h, v % w


def test_multicrop_volumes_match_reference_with_explicit_positions(mr_volume, ct_volume):
    vols = [mr_volume[0], ct_volume[0]]  # 96 x 128 x 128 and 18 x 256 x 256: smaller than the crops
    rng = np.random.default_rng(11)
    pos = [rng.random(15).astype(np.float32) for _ in vols]
    (big, small), = run_pipeline(lambda x, p: fn.medswav.multicrop(x, positions=p, **CROPS_3D), [vols, pos])
    for x, p, b, s in zip(vols, pos, big, small):
        ref_big, ref_small = R.multicrop(x, p, (224, 112), (1, 4), 0.1, crop_depths=(192, 96))
        assert b.shape == (1, 192, 224, 224) and s.shape == (4, 96, 112, 112)
        np.testing.assert_array_equal(b, ref_big)
        np.testing.assert_array_equal(s, ref_small)
        if all(n <= c for n, c in zip(x.shape, b.shape[1:])):  # the MR fits the large crop whole
            assert b.sum() == pytest.approx(x.sum(dtype=np.float64), rel=1e-5)  # zero-padded, nothing lost


def test_multicrop_volume_crops_respect_the_10_percent_border(mr_volume):
    """Random crops of a volume inside the 3-D range: every origin keeps floor(0.1 n) voxels of each
    axis' border free (or is centred where the crop does not fit), and positions change per iteration."""
    shape = (200, 250, 250)  # the largest volume the 3-D rescale produces
    vol = _coordinate_volume(*shape)
    runs = run_pipeline(lambda x: fn.medswav.multicrop(x, **CROPS_3D), [[vol]], iterations=3)
    seen = set()
    for big, small in runs:
        crops = [(c, (192, 224, 224)) for c in big[0]] + [(c, (96, 112, 112)) for c in small[0]]
        for crop, box in crops:
            o = _origin3(crop, shape)
            seen.add(o)
            for n, c, start in zip(shape, box, o):
                m = min(int(0.1 * n), (n - c) // 2)
                assert m <= start <= n - c - m, (o, box)
            z, y, x = o
            np.testing.assert_array_equal(crop, vol[z:z + box[0], y:y + box[1], x:x + box[2]])
    assert len(seen) >= 12  # 5 crops x 3 iterations, fresh positions


def test_multicrop_volume_zero_pads_a_thin_ct(ct_volume):
    """An 18-slice CT is thinner than both crop depths: it lands at an offset inside each crop, zeros
    elsewhere, and every crop holds all its planes."""
    ct, _ = ct_volume
    x = np.ascontiguousarray(ct[:, :150, :150])
    (big, small), = run_pipeline(lambda v: fn.medswav.multicrop(v, **CROPS_3D), [[x]])
    for crops in (big[0], small[0]):
        for crop in crops:
            planes = np.flatnonzero(np.abs(crop).reshape(crop.shape[0], -1).sum(1) > 0)
            assert len(planes) == x.shape[0] and planes[-1] - planes[0] == x.shape[0] - 1


# --- GPU == CPU on volumes -----------------------------------------------------------------------

gpu = pytest.mark.skipif(not augment_dali.gpu_backend_usable(), reason="needs a CUDA GPU and a plugin built with nvcc")


def _run_on(device, graph, vols, params):
    @pipeline_def(batch_size=len(vols), num_threads=2, device_id=0 if device == "gpu" else None, seed=9)
    def pipe():
        x = fn.external_source(source=_constant(vols), batch=True, layout="DHW")
        p = fn.external_source(source=_constant(params), batch=True)
        outs = graph(x.gpu() if device == "gpu" else x, p)
        return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)

    p = pipe()
    p.build()
    return [[np.array(o.as_cpu()[i] if device == "gpu" else o[i]) for i in range(len(vols))] for o in p.run()]


@pytest.mark.gpu
@gpu
def test_gpu_volume_operators_equal_cpu(mr_volume, ct_volume):
    """The CUDA rescale (trilinear, isotropic spacing, 3-D range), energy_bands and the 1 + 4 volume crops
    give the CPU backend's results: rescale within 1e-5, energy_bands and the crops (copies of its
    output) within 5e-5."""
    (mr, mr_sp), (ct, ct_sp) = mr_volume, ct_volume
    vols = [mr, ct]
    rng = np.random.default_rng(2)
    params = [np.concatenate([[0.5], sp, rng.random(15)]).astype(np.float32) for sp in (mr_sp, ct_sp)]

    def graph(x, p):
        r = fn.medswav.rescale(x, scale=p[0], spacing=fn.stack(p[1], p[2], p[3]), **RANGE_3D)
        e = fn.medswav.energy_bands(r, ref_energies=fn.stack(*[p[4 + k] * 0.05 for k in range(6)]))
        big, small = fn.medswav.multicrop(e, positions=fn.stack(*[p[4 + k] for k in range(15)]), **CROPS_3D)
        return r, e, big, small

    cpu, gpu_ = _run_on("cpu", graph, vols, params), _run_on("gpu", graph, vols, params)
    for (c_out, g_out), tol in zip(zip(cpu, gpu_), (1e-5, 5e-5, 5e-5, 5e-5)):
        for c, g in zip(c_out, g_out):
            assert c.shape == g.shape
            np.testing.assert_allclose(g, c, atol=tol, rtol=0)


def test_chain_on_a_multiframe_pydicom_series():
    """pydicom's emri_small.dcm (a real 10-frame 64 x 64 MR): rescale into a small 3-D range, energy bands
    (sigmas 1, 2, 4 voxels on every axis) and 1 + 4 crops equal the NumPy reference chain."""
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    raw = dcmread(get_testdata_file("emri_small.dcm")).pixel_array.astype(np.float64)
    assert raw.shape == (10, 64, 64)
    vol = ((raw - raw.min()) / (raw.max() - raw.min())).astype(np.float32)
    bounds = dict(min_size=48, max_size=80, min_depth=12, max_depth=24)
    sigmas = (1.0, 2.0, 4.0)
    pos = np.random.default_rng(8).random(15).astype(np.float32)

    def graph(x, ref, p):
        r = fn.medswav.rescale(x, scale=0.6, **bounds)
        e = fn.medswav.energy_bands(r, ref_energies=ref, sigmas=list(sigmas))
        big, small = fn.medswav.multicrop(e, crop_sizes=[40, 20], crop_depths=[10, 6], num_crops=[1, 4], positions=p)
        return r, e, big, small

    rescaled = R.rescale(vol, 0.6, **bounds)
    assert rescaled.shape == (12, 77, 77)  # t = (6, 38.4, 38.4): the depth minimum doubles every side
    ref = (R.band_energies(rescaled, sigmas) * np.array([1.2, 0.8, 1.1, 0.9])).astype(np.float32)
    (r, e, big, small), = run_pipeline(graph, [[vol], [ref], [pos]])
    np.testing.assert_allclose(r[0], rescaled, atol=MAX_ERR["rescale"], rtol=0)
    want = R.energy_bands(r[0], ref, sigmas)
    np.testing.assert_allclose(e[0], want, atol=MAX_ERR["energy_bands"], rtol=0)
    want_big, want_small = R.multicrop(e[0], pos, (40, 20), (1, 4), 0.1, crop_depths=(10, 6))
    np.testing.assert_array_equal(big[0], want_big)
    np.testing.assert_array_equal(small[0], want_small)
