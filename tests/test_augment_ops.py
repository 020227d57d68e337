"""The medswav DALI operators against their NumPy references, on real CT and MR slices.

Tolerances (float32 operators vs float64 references, intensities in [0, 1]):
- gamma, linear: 1e-6 absolute (one float32 rounding of a pow / multiply-add).
- rescale: 1e-4 absolute (float32 sampling coordinates and weights).
- energy_bands: 2e-4 absolute (float32 planes from blurs of up to 25 taps and, for sigma >= 4, a
  recursive filter run in double; rounding amplified by the band gains); band_energies: 1e-4 relative.
  The NumPy reference runs the same recursive filter; how far that filter is from the exact Gaussian is
  tested separately (test_recursive_gaussian_approximates_the_exact_gaussian).
- multicrop: exact (a copy).
GPU tests compare GPU against CPU operators: 1e-5 absolute (5e-5 for energy_bands, whose energies
are reduced in a different order on the GPU; 1e-6 for band_energies), multicrop exact.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest

import augment_dali
from augment_dali import reference as R
from nvidia.dali import fn, pipeline_def, types

augment_dali.load_plugin()  # the medswav operators (importing the package loads nothing)

MAX_ERR = {"gamma": 1e-6, "linear": 1e-6, "rescale": 1e-4, "energy_bands": 2e-4}


# --- real data ---------------------------------------------------------------------------------

def _load_slices(folder, count):
    files = sorted(folder.glob("*.dcm"))
    picks = [files[int(k)] for k in np.linspace(len(files) // 4, 3 * len(files) // 4, count)]
    out = []
    for f in picks:
        ds = pydicom.dcmread(f)
        a = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
        a += float(getattr(ds, "RescaleIntercept", 0) or 0)
        out.append(((a - a.min()) / max(a.max() - a.min(), 1e-12)).astype(np.float32))
    return out


@pytest.fixture(scope="module")
def ct(dicom_dir):
    imgs = _load_slices(dicom_dir / "ct_kits_abdomen_18", 2)
    assert all(i.shape == (512, 512) for i in imgs)
    return imgs


@pytest.fixture(scope="module")
def mr(dicom_dir):
    imgs = _load_slices(dicom_dir / "mr_mprage_sagittal_192", 3)
    assert all(i.shape == (256, 256) for i in imgs)
    return imgs


def _constant(batch):
    return lambda: batch


def run_pipeline(graph, batches, device="cpu", iterations=1, seed=1234):
    """Feeds `batches` (list per input of lists of arrays) through graph(*inputs) -> outputs.

    Returns, per iteration, a list of outputs, each a list of per-sample NumPy arrays."""
    n = len(batches[0])

    @pipeline_def(batch_size=n, num_threads=2, device_id=0 if device == "gpu" else None, seed=seed)
    def pipe():
        inputs = [fn.external_source(source=_constant(b), batch=True,
                                     layout="HW" if b[0].ndim == 2 else None)
                  for b in batches]
        if device == "gpu":  # the image goes to the GPU; argument inputs must stay on the CPU
            inputs[0] = inputs[0].gpu()
        outs = graph(*inputs)
        return tuple(outs) if isinstance(outs, (list, tuple)) else (outs,)

    p = pipe()
    p.build()
    results = []
    for _ in range(iterations):
        outs = p.run()
        results.append([[np.array(o.as_cpu()[i] if device == "gpu" else o[i]) for i in range(n)]
                        for o in outs])
    return results


# --- gamma / linear ----------------------------------------------------------------------------

def test_gamma_matches_reference_with_sampled_gammas(ct, mr):
    imgs = ct + mr

    def graph(x):
        g = fn.random.uniform(range=[1.8, 2.6])
        return g, fn.medswav.gamma(x, gamma=g)

    seen = []
    for gs, ys in run_pipeline(graph, [imgs], iterations=4):
        for x, g, y in zip(imgs, gs, ys):
            g = float(g)
            seen.append(g)
            assert 1.8 <= g <= 2.6
            assert y.dtype == np.float32 and y.shape == x.shape
            np.testing.assert_allclose(y, R.gamma(x, g), atol=MAX_ERR["gamma"], rtol=0)
            # the exponent actually applied, read back from the pixels, is the drawn one
            m = (x > 0.2) & (x < 0.9)
            np.testing.assert_allclose(np.log(y[m]) / np.log(x[m]), g, rtol=1e-4)
    assert len(set(seen)) == len(seen)  # a new gamma per sample and iteration


def test_gamma_clamps_out_of_range_input_and_never_returns_nan():
    x = np.array([[-0.5, 0.0, 0.25, 1.0, 1.5, np.nan]], np.float32)
    (y,), = run_pipeline(lambda x: fn.medswav.gamma(x, gamma=2.0), [[x]])[0]
    np.testing.assert_allclose(y, [[0.0, 0.0, 0.0625, 1.0, 1.0, 0.0]], atol=1e-7)


def test_linear_matches_reference_with_method_ranges(ct, mr):
    imgs = ct + mr

    def graph(x):
        a = fn.random.uniform(range=[0.9, 1.1])
        b = fn.random.uniform(range=[-0.2, 0.2])
        return a, b, fn.medswav.linear(x, scale=a, shift=b)

    for scales, shifts, ys in run_pipeline(graph, [imgs], iterations=3):
        for x, a, b, y in zip(imgs, scales, shifts, ys):
            a, b = float(a), float(b)
            assert 0.9 <= a <= 1.1 and -0.2 <= b <= 0.2
            np.testing.assert_allclose(y, R.linear(x, a, b), atol=MAX_ERR["linear"], rtol=0)
            # unclamped: the output range is exactly the affine image of the input range
            assert y.min() == pytest.approx(a * x.min() + b, abs=1e-6)
            assert y.max() == pytest.approx(a * x.max() + b, abs=1e-6)


def test_many_draws_stay_in_method_ranges(mr):
    """64 samples x 8 iterations of the METHOD.md draws; every value applied by the ops is in range."""
    x = mr[0][:32, :32].copy()

    def graph(x):
        g = fn.random.uniform(range=[1.8, 2.6])
        a = fn.random.uniform(range=[0.9, 1.1])
        b = fn.random.uniform(range=[-0.2, 0.2])
        s = fn.random.uniform(range=[0.1, 0.7])
        return g, a, b, s, fn.medswav.rescale(x, scale=s)

    values = {k: [] for k in "gabs"}
    for g, a, b, s, r in run_pipeline(graph, [[x] * 64], iterations=8):
        for k, v in zip("gabs", (g, a, b, s)):
            values[k] += [float(t) for t in v]
        assert all(600 <= side <= 1200 for img in r for side in img.shape)
    for k, (lo, hi) in zip("gabs", ((1.8, 2.6), (0.9, 1.1), (-0.2, 0.2), (0.1, 0.7))):
        v = np.array(values[k])
        assert v.min() >= lo and v.max() <= hi
        assert v.max() - v.min() > 0.8 * (hi - lo)  # the whole range is used, not one value


# --- intensity (fused window + gamma + linear) and robust_window ---------------------------------

@pytest.fixture(scope="module")
def raw_slices(dicom_dir, medmnist_dir):
    """Real pixels as stored in shards: CT in HU (int16), MR (uint16), chest X-rays (uint8)."""
    ct = []
    for f in sorted((dicom_dir / "ct_kits_abdomen_18").glob("*.dcm"))[4:6]:
        ds = pydicom.dcmread(f)
        ct.append((ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)).astype(np.int16))
    mr = [pydicom.dcmread(f).pixel_array for f in sorted((dicom_dir / "mr_mprage_sagittal_192").glob("*.dcm"))[70:72]]
    xr = list(np.load(medmnist_dir / "pneumoniamnist.npz")["train_images"][:2])
    assert ct[0].dtype == np.int16 and mr[0].dtype == np.uint16 and xr[0].dtype == np.uint8
    return {"ct": ct, "mr": mr, "xr": xr}


def _np_percentiles(x, pct):
    v = np.asarray(x, np.float64).ravel()
    return np.percentile(v[~np.isnan(v)], pct)


@pytest.mark.parametrize("pct", [(0.5, 99.5), (0.0, 100.0), (2.0, 98.0), (50.0, 50.0)])
def test_robust_window_equals_numpy_percentiles_on_real_slices(raw_slices, pct):
    """Histogram path (integer values, native dtypes and decoded to float32) and selection fallback
    (non-integer values): both exact, i.e. numpy.percentile rounded once to float32."""
    for name, imgs in raw_slices.items():
        fractional = [(i.astype(np.float32) / 7.0 + 0.1).astype(np.float32) for i in imgs]
        for batch in (imgs, [i.astype(np.float32) for i in imgs], fractional):
            (wins,), = run_pipeline(lambda x: fn.medswav.robust_window(x, percentiles=list(pct)), [batch])
            for x, w in zip(batch, wins):
                assert w.dtype == np.float32 and w.shape == (2,)
                np.testing.assert_array_equal(w, _np_percentiles(x, pct).astype(np.float32), err_msg=name)
    # the default window is the 0.5 and 99.5 percentiles: above the minimum and below the maximum on MR
    lo, hi = _np_percentiles(raw_slices["mr"][0], (0.5, 99.5))
    assert raw_slices["mr"][0].min() <= lo < hi < raw_slices["mr"][0].max()


def test_robust_window_ignores_nan_and_handles_wide_values():
    x = np.array([[np.nan, 1.0, 2.0, 3.0], [4.0, np.nan, 1e6, -70000.0]], np.float32)
    (w,), = run_pipeline(lambda x: fn.medswav.robust_window(x, percentiles=[10.0, 90.0]), [[x]])[0]
    np.testing.assert_array_equal(w, _np_percentiles(x, (10.0, 90.0)).astype(np.float32))


def test_intensity_equals_gamma_then_linear_bit_for_bit(ct, mr):
    """The pipeline's intensity step: one pass with window (0, 1) gives exactly linear(gamma(x))."""
    imgs = ct + mr + [np.array([[-0.5, 0.0, 0.25, 1.0, 1.5, np.nan]], np.float32)]

    def graph(x):
        use_gamma = fn.cast(fn.random.coin_flip(probability=0.5), dtype=types.FLOAT)
        g, a, b = (fn.random.uniform(range=r) for r in ([1.8, 2.6], [0.9, 1.1], [-0.2, 0.2]))
        g_, a_, b_ = use_gamma * g + (1.0 - use_gamma), use_gamma + (1.0 - use_gamma) * a, (1.0 - use_gamma) * b
        return (g_, a_, b_, fn.medswav.intensity(x, gamma=g_, scale=a_, shift=b_),
                fn.medswav.linear(fn.medswav.gamma(x, gamma=g_), scale=a_, shift=b_))

    seen_gamma = set()
    for gs, scales, shifts, fused, chained in run_pipeline(graph, [imgs], iterations=3):
        for x, g, a, b, y, z in zip(imgs, gs, scales, shifts, fused, chained):
            assert y.dtype == np.float32 and y.shape == x.shape
            np.testing.assert_array_equal(y, z)
            want = R.linear(R.gamma(x, float(g)), float(a), float(b))
            np.testing.assert_allclose(y, want, atol=MAX_ERR["gamma"], rtol=0)
            seen_gamma.add(float(g) != 1.0)
    assert seen_gamma == {True, False}  # both kinds were drawn


def test_intensity_power_is_accurate_for_any_gamma(ct, mr):
    """The power is computed without powf (2 ** (g log2 x), vectorised): hold it to 1e-6 of float64
    over the whole valid range of gamma, not only METHOD's [1.8, 2.6], on real slices plus tiny values."""
    tiny = np.array([[0.0, 1e-42, 1e-39, 1.2e-38, 1e-30, 1e-12, 1e-6, 0.5, 0.999999, 1.0]], np.float32)
    imgs = [ct[0], mr[0], tiny]
    for g in (0.05, 0.3, 0.7, 1.3, 3.0, 8.0):
        (ys,), = run_pipeline(lambda x: fn.medswav.intensity(x, gamma=g), [imgs])
        for x, y in zip(imgs, ys):
            np.testing.assert_allclose(y, R.gamma(x, g), atol=1e-6, rtol=0, err_msg=f"gamma {g}")


def test_intensity_normalises_native_and_float_pixels_like_the_numpy_twin(raw_slices):
    """Fixed window (HU) and robust percentile window, on int16 / uint16 / uint8 pixels read directly
    and on the same pixels decoded to float32; then gamma and linear on top in the same pass."""
    from augment_dali.config import NormalizeConfig
    from augment_dali.normalize import normalize_numpy, window_numpy

    cfg = NormalizeConfig()
    cases = [("ct", "hu_window"), ("ct", "robust_percentile"), ("mr", "robust_percentile"),
             ("xr", "robust_percentile")]
    for name, method in cases:
        for batch in (raw_slices[name], [i.astype(np.float32) for i in raw_slices[name]]):
            def graph(x):
                args = (dict(window=list(cfg.hu_window)) if method == "hu_window"
                        else dict(robust=True, percentiles=list(cfg.robust_percentiles)))
                return fn.medswav.intensity(x, **args), fn.medswav.intensity(x, gamma=2.2, scale=0.9, shift=0.1, **args)

            norm, augmented = run_pipeline(graph, [batch])[0]
            for x, y, z in zip(batch, norm, augmented):
                want = normalize_numpy(x, method, cfg)
                np.testing.assert_allclose(y, want, atol=2e-6, rtol=0, err_msg=f"{name} {method}")
                np.testing.assert_allclose(z, 0.9 * want.astype(np.float64) ** 2.2 + 0.1, atol=2e-6, rtol=0)
                lo, hi = window_numpy(x, method, cfg)
                assert (y[x <= lo] == 0).all() and (y[x > hi] == 1).all() and (y[x >= hi] > 1 - 1e-6).all()
                inside = (x > lo) & (x < hi)
                assert inside.mean() > 0.3 and 0 < y[inside].min() and y[inside].max() < 1


def test_intensity_maps_a_constant_image_to_the_shift():
    x = np.full((20, 30), 77, np.uint16)
    (y,), = run_pipeline(lambda x: fn.medswav.intensity(x, robust=True, scale=2.0, shift=0.25), [[x]])[0]
    assert np.isfinite(y).all() and (y == 0.25).all()


# --- rescale -----------------------------------------------------------------------------------

def test_rescale_size_rule_examples():
    assert R.rescale_size((512, 512), 0.4) == (600, 600)        # too small: upscaled to min_size
    assert R.rescale_size((3000, 2500), 0.3) == (900, 750)      # in range: factor kept
    assert R.rescale_size((4000, 3000), 0.7) == (1200, 900)     # too large: longest side -> max
    assert R.rescale_size((3000, 500), 0.5) == (1200, 600)      # extreme aspect: short side wins
    assert R.rescale_size((512, 256), 0.5, 0, 0) == (256, 128)  # no bounds: plain factor


def test_rescale_matches_reference_on_real_slices(ct, mr):
    imgs = [ct[0], mr[0], mr[1][:, :100].copy()]
    scales = [np.float32(0.35), np.float32(0.6), np.float32(0.5)]

    def graph(x, s):
        return fn.medswav.rescale(x, scale=s), fn.medswav.rescale(x, scale=s, min_size=0, max_size=0)

    (bounded, free), = run_pipeline(graph, [imgs, [np.array(s) for s in scales]])
    for x, s, y, z in zip(imgs, scales, bounded, free):
        ref = R.rescale(x, float(s))
        assert y.shape == ref.shape and all(600 <= side <= 1200 for side in y.shape)
        np.testing.assert_allclose(y, ref, atol=MAX_ERR["rescale"], rtol=0)
        ref_free = R.rescale(x, float(s), 0, 0)
        assert z.shape == ref_free.shape
        np.testing.assert_allclose(z, ref_free, atol=MAX_ERR["rescale"], rtol=0)
    # a pure scale factor keeps the intensity statistics of a smooth image
    assert free[0].mean() == pytest.approx(imgs[0].mean(), rel=0.02)


# --- energy bands ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mr_energies(mr):
    return [R.band_energies(x) for x in mr]


def _energy_graph(x, ref):
    return fn.medswav.energy_bands(x, ref_energies=ref)


def test_energy_bands_matches_reference(ct, mr, mr_energies):
    rng = np.random.default_rng(3)
    imgs = [ct[0], mr[0], mr[1]]
    ct_e = R.band_energies(ct[0])
    refs = [(e * rng.uniform(0.7, 1.3, 6)).astype(np.float32) for e in (ct_e, mr_energies[0], mr_energies[1])]
    (ys,), = run_pipeline(_energy_graph, [imgs, refs])
    for x, ref, y in zip(imgs, refs, ys):
        expected = R.energy_bands(x, ref)
        np.testing.assert_allclose(y, expected, atol=MAX_ERR["energy_bands"], rtol=0)
        assert np.abs(y - x).max() > 10 * MAX_ERR["energy_bands"]  # it did change the image


def test_energy_bands_matches_reference_across_cpu_blocks(ct):
    """The CPU blur splits an image into blocks: rows in groups of 16, then 8, then single lines;
    columns in strips of 512 for the passes down the columns (the band moments are summed per strip
    row). 523 x 1100 of real CT (the two slices side by side, then flipped rows below) crosses every one
    of those boundaries, including a partial last strip."""
    top = np.hstack([ct[0], ct[1], ct[0][:, :76]])
    x = np.ascontiguousarray(np.vstack([top, top[::-1][:11]]))
    assert x.shape == (523, 1100)
    ref = (R.band_energies(x) * np.array([1.2, 0.8, 1.1, 0.9, 1.25, 0.85])).astype(np.float32)
    (ys,), = run_pipeline(_energy_graph, [[x], [ref]])
    np.testing.assert_allclose(ys[0], R.energy_bands(x, ref), atol=MAX_ERR["energy_bands"], rtol=0)
    (es,), = run_pipeline(lambda x: fn.medswav.band_energies(x), [[x]])
    np.testing.assert_allclose(es[0], R.band_energies(x), rtol=1e-4, atol=1e-7)


def test_energy_bands_identity_with_own_energies(mr, mr_energies):
    refs = [e.astype(np.float32) for e in mr_energies]
    (ys,), = run_pipeline(_energy_graph, [mr, refs])
    for x, y in zip(mr, ys):
        np.testing.assert_allclose(y, x, atol=1e-5, rtol=0)


def test_energy_bands_output_energies_equal_targets(mr, mr_energies):
    """Scaling every band by one factor c gives exactly c times each band energy. With per-band targets
    the cascade's bands overlap in frequency, so re-measured energies land near (not on) the targets:
    for targets within +-10% of the image's own energies they are within 12% and closer to the target
    than the input was on average."""
    rng = np.random.default_rng(7)
    uniform = [(1.5 * e).astype(np.float32) for e in mr_energies]
    jitter = [(e * rng.uniform(0.9, 1.1, 6)).astype(np.float32) for e in mr_energies]
    (ys_uniform,), = run_pipeline(_energy_graph, [mr, uniform])
    (ys_jitter,), = run_pipeline(_energy_graph, [mr, jitter])
    for y, target in zip(ys_uniform, uniform):
        np.testing.assert_allclose(R.band_energies(y), target, rtol=1e-4)
    for x, y, target in zip(mr, ys_jitter, jitter):
        got, before = R.band_energies(y), R.band_energies(x)
        np.testing.assert_allclose(got, target, rtol=0.12)
        assert np.abs(got / target - 1).mean() < np.abs(before / target - 1).mean()


def test_band_energies_operator_matches_reference(ct, mr, mr_energies):
    imgs = [ct[0], mr[0], mr[1], np.full((40, 30), 0.5, np.float32)]
    (es,), = run_pipeline(lambda x: fn.medswav.band_energies(x), [imgs])
    for x, e in zip(imgs[1:3], es[1:3]):
        assert e.shape == (6,) and e.dtype == np.float32
    np.testing.assert_allclose(es[0], R.band_energies(ct[0]), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(es[1], mr_energies[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(es[2], mr_energies[1], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(es[3], 0.0, atol=1e-7)  # constant image: no energy in any band
    assert (np.diff(es[1][:5]) > 0).all()  # real anatomy: coarser bands carry more energy


def test_energy_bands_constant_and_tiny_images_stay_finite():
    const = np.full((64, 48), 0.37, np.float32)
    tiny = np.random.default_rng(0).random((9, 13)).astype(np.float32)  # sigma 16: radius 48 > side
    own = R.band_energies(tiny)
    refs = [np.full(6, 0.05, np.float32), np.full(6, 0.05, np.float32), (1.3 * own).astype(np.float32)]
    (ys,), = run_pipeline(_energy_graph, [[const, tiny, tiny], refs])
    assert all(np.isfinite(y).all() for y in ys)
    np.testing.assert_allclose(ys[0], const, atol=1e-6)  # every band has energy 0: passed through
    # Fixed targets of 0.05 give the tiny image's residual (energy ~1e-6 after sigma 16) a gain of
    # ~4e4, which amplifies the float32 rounding of the stored low-pass planes (~3e-8): the tolerance
    # grows with the largest gain there; moderate gains are held to the usual tolerance.
    max_gain = (refs[1] / own).max()
    np.testing.assert_allclose(ys[1], R.energy_bands(tiny, refs[1]), atol=MAX_ERR["energy_bands"] + 1e-7 * max_gain)
    np.testing.assert_allclose(ys[2], R.energy_bands(tiny, refs[2]), atol=MAX_ERR["energy_bands"])


def test_energy_bands_is_nd_ready_on_a_volume(mr):
    """3-D input: the cascade blurs along every axis (the 3-D path of METHOD.md comes later), with
    exact taps (sigma 1, 2) and the recursive filter (sigma 5) along each of the three axes."""
    vol = np.stack([m[96:160, 96:163] for m in mr] * 4)  # 12 x 64 x 67 from real MR slices
    sigmas = (1.0, 2.0, 5.0)
    own = R.band_energies(vol, sigmas)
    ref = (own * np.array([1.2, 0.8, 1.1, 0.9])).astype(np.float32)
    (ys,), = run_pipeline(lambda x, r: fn.medswav.energy_bands(x, ref_energies=r, sigmas=list(sigmas)),
                          [[vol], [ref]])
    assert ys[0].shape == vol.shape
    np.testing.assert_allclose(ys[0], R.energy_bands(vol, ref, sigmas), atol=MAX_ERR["energy_bands"])


def test_recursive_gaussian_approximates_the_exact_gaussian(ct, mr):
    """Sigmas >= 4 use the recursive filter (constant cost per pixel): its impulse response is within
    1.2 % of the exact Gaussian's peak, has unit sum and variance sigma^2, and on real slices every band
    energy is within 1 % of the exact cascade's (so the augmentation is the same up to ~1 %)."""
    n = 401
    delta = np.zeros((n, 1))
    delta[n // 2] = 1.0
    for sigma in (4.0, 8.0, 16.0):
        rec = R.recursive_blur_axis0(delta, sigma)[:, 0]
        exact = R.exact_gaussian_blur(delta[:, 0], sigma)
        assert np.abs(rec - exact).max() < 0.012 * exact.max(), sigma
        assert abs(rec.sum() - 1.0) < 1e-6  # unit DC gain (up to the line-end extension)
        assert abs((rec * (np.arange(n) - n // 2) ** 2).sum() - sigma ** 2) < 1e-3 * sigma ** 2
        assert np.abs(rec - exact).max() > 1e-4 * exact.max()  # really the recursive filter
    for x in (ct[0], mr[0]):
        cur, exact_e = np.asarray(x, np.float64), []
        for s in R.DEFAULT_SIGMAS:
            low = R.exact_gaussian_blur(cur, s)
            exact_e.append((cur - low).std())
            cur = low
        exact_e.append(cur.std())
        np.testing.assert_allclose(R.band_energies(x), exact_e, rtol=0.01)


def test_energy_bands_custom_sigmas_need_matching_ref_count(mr):
    x = mr[0][:64, :64].copy()
    ref = R.band_energies(x, (1.0, 3.0)).astype(np.float32) * 1.2
    (ys,), = run_pipeline(lambda x, r: fn.medswav.energy_bands(x, ref_energies=r, sigmas=[1.0, 3.0]),
                          [[x], [ref]])
    np.testing.assert_allclose(ys[0], R.energy_bands(x, ref, (1.0, 3.0)), atol=MAX_ERR["energy_bands"])
    with pytest.raises(RuntimeError, match="ref_energies"):
        run_pipeline(lambda x, r: fn.medswav.energy_bands(x, ref_energies=r), [[x], [ref]])


# --- multicrop ---------------------------------------------------------------------------------

def _coordinate_image(h, w):
    """Pixel value = its flat index + 1 (exact in float32), so a crop reveals where it was taken."""
    return (np.arange(h * w, dtype=np.float32) + 1).reshape(h, w)


def _origin(crop, w):
    v = int(crop[crop > 0].min()) - 1
    return v // w, v % w


def test_multicrop_matches_reference_with_explicit_positions(ct, mr):
    imgs = [ct[0], mr[0]]
    rng = np.random.default_rng(11)
    pos = [rng.random(16).astype(np.float32) for _ in imgs]
    (big, small), = run_pipeline(lambda x, p: fn.medswav.multicrop(x, positions=p), [imgs, pos])
    for x, p, b, s in zip(imgs, pos, big, small):
        ref_big, ref_small = R.multicrop(x, p)
        assert b.shape == (2, 224, 224) and s.shape == (6, 92, 92)
        np.testing.assert_array_equal(b, ref_big)
        np.testing.assert_array_equal(s, ref_small)


def test_multicrop_random_positions_inside_border_and_new_every_iteration(ct, mr):
    shapes = [ct[0].shape, mr[0].shape]
    imgs = [_coordinate_image(*sh) for sh in shapes]
    origins = {}
    for it, (big, small) in enumerate(run_pipeline(lambda x: fn.medswav.multicrop(x, border=0.1),
                                                   [imgs], iterations=6)):
        for (h, w), b, s in zip(shapes, big, small):
            for group, size in ((b, 224), (s, 92)):
                for c in group:
                    y0, x0 = _origin(c, w)
                    np.testing.assert_array_equal(c, _coordinate_image(h, w)[y0:y0 + size, x0:x0 + size])
                    for n, o in ((h, y0), (w, x0)):
                        m = min(int(0.1 * n), (n - size) // 2)
                        assert m <= o <= n - size - m
                    origins.setdefault((h, size), []).append((y0, x0))
    for (n, size), pts in origins.items():
        pts = np.array(pts)
        m = min(int(0.1 * n), (n - size) // 2)
        width = n - size - 2 * m
        if width == 0:  # 224 crops of a 256 slice: the margin shrinks until the crop fits, centred
            assert (pts == m).all()
            continue
        assert len(np.unique(pts, axis=0)) > 0.9 * len(pts), (n, size)  # different crops per call
        assert np.ptp(pts[:, 0]) > 0.5 * width and np.ptp(pts[:, 1]) > 0.5 * width  # uniform spread


def test_multicrop_seed_reproducible():
    img = [_coordinate_image(128, 100)]
    a = run_pipeline(lambda x: fn.medswav.multicrop(x, crop_sizes=[32], num_crops=[3], seed=5), [img],
                     iterations=2)
    b = run_pipeline(lambda x: fn.medswav.multicrop(x, crop_sizes=[32], num_crops=[3], seed=5), [img],
                     iterations=2)
    c = run_pipeline(lambda x: fn.medswav.multicrop(x, crop_sizes=[32], num_crops=[3], seed=6), [img],
                     iterations=2)
    np.testing.assert_array_equal(a[1][0][0], b[1][0][0])
    assert not np.array_equal(a[0][0][0], c[0][0][0])
    assert not np.array_equal(a[0][0][0], a[1][0][0])


def test_multicrop_checkpoint_restores_the_position_generator():
    img = _coordinate_image(128, 100)

    @pipeline_def(batch_size=2, num_threads=1, device_id=None, enable_checkpointing=True)
    def pipe():
        x = fn.constant(fdata=img.ravel().tolist(), shape=img.shape, layout="HW", dtype=types.FLOAT)
        return fn.medswav.multicrop(x, crop_sizes=[16], num_crops=[3], seed=3)

    first = pipe()
    first.build()
    first.run()
    first.run()
    checkpoint = first.checkpoint()
    expected = np.array(first.run()[0][1])
    resumed = pipe(checkpoint=checkpoint)
    resumed.build()
    np.testing.assert_array_equal(np.array(resumed.run()[0][1]), expected)


def test_multicrop_zero_pads_images_smaller_than_the_crop(mr):
    x = mr[0][:100, :60].copy() + 0.5  # strictly positive so padding is recognisable
    (big,), = run_pipeline(lambda x: fn.medswav.multicrop(x, crop_sizes=[128], num_crops=[4]), [[x]])
    for c in big[0]:
        assert c.shape == (128, 128)
        assert (c > 0).sum() == x.size  # the whole image is inside, the rest is zero
        rows, cols = np.nonzero(c)
        np.testing.assert_array_equal(c[rows.min():rows.max() + 1, cols.min():cols.max() + 1], x)


# --- bad arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("graph, message", [
    (lambda x: fn.medswav.gamma(x, gamma=-1.0), "gamma must be finite and > 0"),
    (lambda x: fn.medswav.intensity(x, gamma=0.0), "intensity: gamma must be finite and > 0"),
    (lambda x: fn.medswav.intensity(x, window=[1.0, 0.0]), r"window must be finite with lo <= hi"),
    (lambda x: fn.medswav.intensity(x, robust=True, percentiles=[60.0, 40.0]), "percentiles must satisfy"),
    (lambda x: fn.medswav.robust_window(x, percentiles=[0.0, 101.0]), "percentiles must satisfy"),
    (lambda x: fn.medswav.intensity(fn.cast(x, dtype=types.INT32)), "input must be float32, int16, uint16 or uint8"),
    (lambda x: fn.medswav.rescale(x, scale=0.5, min_size=800, max_size=600), r"min_size \(800\) > max_size"),
    (lambda x: fn.medswav.rescale(x, scale=0.0), "scale must be finite and > 0"),
    (lambda x: fn.medswav.multicrop(x, border=0.6), r"border must be in \[0, 0.5\)"),
    (lambda x: fn.medswav.multicrop(x, positions=[2.0] * 16), r"positions must lie in \[0, 1\]"),
    (lambda x: fn.medswav.energy_bands(x, ref_energies=[0.1] * 6, sigmas=[0.0, 1.0, 2.0, 4.0, 8.0]),
     "sigmas must be > 0"),
    (lambda x: fn.medswav.gamma(fn.cast(x * 100, dtype=types.INT16)), "input must be float32"),
    (lambda x: fn.medswav.rescale(fn.stack(fn.stack(x, x), fn.stack(x, x))), r"expected 2-D to 3-D samples .*got 4-D"),
    (lambda x: fn.medswav.multicrop(fn.stack(x, x), crop_depths=[8, 0]), "crop depths must be > 0"),
    (lambda x: fn.medswav.rescale(fn.stack(x, x), spacing=[1.0, 0.0, 1.0]), "spacing must be finite and > 0"),
    (lambda x: fn.medswav.rescale(fn.stack(x, x), min_depth=300, max_depth=200), r"min_depth \(300\) > max_depth"),
])
def test_bad_arguments_raise_errors_naming_the_operator(graph, message):
    x = np.random.default_rng(0).random((40, 30)).astype(np.float32)
    with pytest.raises(RuntimeError, match=message):
        run_pipeline(graph, [[x]])


# --- plugin loading ----------------------------------------------------------------------------

def test_missing_plugin_names_the_build_command(tmp_path):
    with pytest.raises(augment_dali.PluginError, match=r"python -m augment_dali\.build"):
        augment_dali.load_plugin(tmp_path)


def test_plugin_built_for_another_dali_is_refused(tmp_path):
    shutil.copy(augment_dali.LIB_DIR / augment_dali.LIB_NAME, tmp_path / augment_dali.LIB_NAME)
    (tmp_path / "build_stamp.json").write_text(json.dumps({"dali_version": "0.0.1", "cuda": False}))
    with pytest.raises(augment_dali.PluginError, match=r"built against DALI 0\.0\.1.*--force"):
        augment_dali.load_plugin(tmp_path)


def test_build_is_skipped_while_sources_and_dali_are_unchanged():
    from augment_dali import build
    lib = augment_dali.LIB_DIR / augment_dali.LIB_NAME
    cuda = augment_dali.plugin_has_cuda()
    build.build(verbose=False, use_cuda=cuda)  # brings a stale checkout up to date first
    before = lib.stat().st_mtime_ns
    assert build.build(verbose=False, use_cuda=cuda) == lib
    assert lib.stat().st_mtime_ns == before
    stamp = build.read_stamp()
    import nvidia.dali
    assert stamp["dali_version"] == nvidia.dali.__version__ and stamp["cuda"] == augment_dali.plugin_has_cuda()


def test_build_command_runs_on_a_checkout_without_plugin(tmp_path):
    """`python -m augment_dali.build` imports the package first: that must not demand the plugin."""
    import subprocess
    import sys
    pkg = tmp_path / "augment_dali"
    shutil.copytree(augment_dali.LIB_DIR.parent, pkg, ignore=shutil.ignore_patterns("_lib", "__pycache__"))
    run = subprocess.run([sys.executable, "-m", "augment_dali.build", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--no-cuda" in run.stdout
    # Importing the package and its configuration needs no plugin; asking for the operators names the build.
    run = subprocess.run([sys.executable, "-c", "import augment_dali.config; import augment_dali; "
                          "augment_dali.load_plugin()"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "python -m augment_dali.build" in run.stderr
    assert "load_plugin" in run.stderr


def test_build_reports_a_missing_compiler(monkeypatch, tmp_path):
    from augment_dali import build
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setattr(build, "LIB_DIR", tmp_path / "lib")  # never touch the real plugin
    with pytest.raises(build.BuildError, match="no-such-g\\+\\+"):
        build.build(force=True, use_cuda=False, verbose=False)


def test_all_operators_registered():
    for name in augment_dali.OPERATORS:
        assert callable(getattr(fn.medswav, name))


# --- GPU == CPU --------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not augment_dali.gpu_backend_usable(), reason="needs a CUDA GPU and a plugin built with nvcc")

def _vec(p, n):
    return fn.stack(*[p[k] for k in range(n)])


# op -> (graph(image, params) with params a float32 vector of 16 values in [0.3, 1], tolerance)
GPU_CASES = {
    "gamma": (lambda x, p: fn.medswav.gamma(x, gamma=p[0] * 3), 1e-5),
    "linear": (lambda x, p: fn.medswav.linear(x, scale=p[1], shift=p[2] - 0.5), 1e-5),
    "intensity": (lambda x, p: fn.medswav.intensity(x, window=fn.stack(p[4] * 0.2, p[5]), gamma=p[0] * 3,
                                                    scale=p[1], shift=p[2] - 0.5), 1e-5),
    "rescale": (lambda x, p: fn.medswav.rescale(x, scale=p[3]), 1e-5),
    "energy_bands": (lambda x, p: fn.medswav.energy_bands(x, ref_energies=_vec(p, 6) * 0.05), 5e-5),
    "band_energies": (lambda x, p: fn.medswav.band_energies(x, sigmas=[1.0, 3.0, 9.0]), 1e-6),
    "multicrop": (lambda x, p: fn.medswav.multicrop(x, positions=_vec(p, 16)), 0.0),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("op", sorted(GPU_CASES))
def test_gpu_operator_equals_cpu(op, ct, mr):
    graph, tol = GPU_CASES[op]
    imgs = [ct[0], mr[0], mr[1][:200, :150].copy()]
    rng = np.random.default_rng(5)
    params = [rng.uniform(0.3, 1.0, 16).astype(np.float32) for _ in imgs]
    cpu = run_pipeline(graph, [imgs, params], device="cpu")[0]
    gpu_ = run_pipeline(graph, [imgs, params], device="gpu")[0]
    for c_out, g_out in zip(cpu, gpu_):
        for c, g in zip(c_out, g_out):
            assert c.shape == g.shape
            np.testing.assert_allclose(g, c, atol=tol, rtol=0)


@pytest.mark.gpu
@gpu
def test_gpu_energy_bands_bit_reproducible(ct, mr):
    """GPU reductions have a fixed order (no atomics): two runs agree bit for bit, and a sample's result
    does not depend on the batch around it."""
    imgs = [ct[0], mr[0], mr[1][:200, :150].copy()]
    params = [np.full(16, 0.5, np.float32) for _ in imgs]
    graph = GPU_CASES["energy_bands"][0]
    a = run_pipeline(graph, [imgs, params], device="gpu")[0]
    b = run_pipeline(graph, [imgs, params], device="gpu")[0]
    alone = run_pipeline(graph, [imgs[1:2], params[1:2]], device="gpu")[0]
    for x, y in zip(a[0], b[0]):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(alone[0][0], a[0][1])
    e1 = run_pipeline(GPU_CASES["band_energies"][0], [imgs, params], device="gpu")[0]
    e2 = run_pipeline(GPU_CASES["band_energies"][0], [imgs, params], device="gpu")[0]
    for x, y in zip(e1[0], e2[0]):
        np.testing.assert_array_equal(x, y)


@pytest.mark.gpu
@gpu
def test_gpu_intensity_with_cpu_robust_window_equals_cpu_robust_intensity(raw_slices):
    """The GPU pipeline's normalisation: window from robust_window on the CPU, applied on the GPU in
    one launch for the batch, against the CPU operator's own robust window; native uint16 and float32."""
    for batch in (raw_slices["mr"], [i.astype(np.float32) for i in raw_slices["ct"]]):
        cpu = run_pipeline(lambda x: fn.medswav.intensity(x, robust=True, gamma=1.7), [batch])[0][0]

        @pipeline_def(batch_size=len(batch), num_threads=2, device_id=0)
        def pipe():
            x = fn.external_source(source=_constant(batch), batch=True, layout="HW")
            return fn.medswav.intensity(x.gpu(), window=fn.medswav.robust_window(x), gamma=1.7)

        p = pipe()
        p.build()
        (out,) = p.run()
        for i, c in enumerate(cpu):
            np.testing.assert_allclose(np.array(out.as_cpu()[i]), c, atol=1e-5, rtol=0)
