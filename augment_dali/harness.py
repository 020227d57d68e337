"""DALI-free kernel harness: the operators' CUDA kernels against their CPU backend, on real images.

    python -m augment_dali.harness --out DIR [--sanitizer] [--quick] [--force-build]

Builds ``augment_dali/_lib/harness/cuda/libmedswav_harness.so`` (``.../cpu/`` without nvcc) from the DALI-free sources (``csrc/kernels/*.cuh``
with nvcc: the launchers the DALI operators call; ``csrc/cpu/*.h`` with g++: the CPU backend code the DALI
operators run), then compares GPU with CPU output for every operator (energy_bands, band_energies,
rescale, gamma, linear, multicrop) at production sizes and edge cases: 1200 x 1200 and 600 x 600 images
from real DICOM (pydicom's CT_small / MR_small, rescaled), 3-D volumes, per-sample parameters, 1 x 1 and
empty (0-sized) samples, more than 65,535 crops and samples in one call, and checks that energy_bands and
band_energies are bit-reproducible (two runs, one sample alone vs inside a batch, chunked or not). The operators take
float32 only (integer pixels are cast before them), so float32 is the one dtype tested. CPU
self-checks (the harness's CPU path against the NumPy specification, augment_dali/reference.py) run
first and need no GPU. With --sanitizer the GPU checks are then rerun (--quick sizes, same edge cases)
under compute-sanitizer memcheck and racecheck.

Writes DIR/harness.json: {"checks": [{"name", "kind" (cpu | gpu | sanitizer), "status" (pass | fail |
skip), "max_abs_diff", "tolerance", "detail"}], "device", "exit_code", ...}.

Exit codes: 0 every check passed; 1 a check failed (see the JSON); 2 the harness could not be built
or run (message on stderr); 3 no CUDA device or no CUDA backend: the CPU self-checks passed and the GPU
checks were skipped.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

from . import build as plugin_build
from . import reference as R

EXIT_OK, EXIT_FAILED, EXIT_ERROR, EXIT_NO_DEVICE = 0, 1, 2, 3
HARNESS_DIR = plugin_build.LIB_DIR / "harness"
LIB_NAME = "libmedswav_harness.so"
SOURCES = ("harness/harness_cpu.cc", "harness/harness_gpu.cu")
DEFAULT_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
MANY_SAMPLES = 65_600  # > 65,535: the largest gridDim.y / gridDim.z


class HarnessError(RuntimeError):
    """The harness library could not be built, loaded or called."""


# --- build ---------------------------------------------------------------------------------------

def _key(cmds: list[list[str]]) -> str:
    h = hashlib.sha256()
    for f in sorted(plugin_build.CSRC.rglob("*")):
        if f.is_file() and f.suffix in (".cc", ".cu", ".h", ".cuh"):
            h.update(str(f.relative_to(plugin_build.CSRC)).encode() + f.read_bytes())
    h.update(repr(cmds).encode())
    return h.hexdigest()


def build_harness(use_cuda: bool = True, force: bool = False, out_dir: Path | None = None) -> Path:
    """Compile the harness library (with the CUDA half when nvcc exists and use_cuda) into out_dir
    (default _lib/harness/cuda or _lib/harness/cpu); cached by a hash of csrc/ and the commands. nvcc's
    ptxas report (registers, spills, local memory) goes to out_dir/ptxas.txt."""
    nvcc = plugin_build.find_nvcc() if use_cuda else None
    out_dir = Path(out_dir) if out_dir else HARNESS_DIR / ("cuda" if nvcc else "cpu")
    root = plugin_build.cuda_root(nvcc)
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise HarnessError("no C++ compiler found (g++); set CXX")
    out_dir.mkdir(parents=True, exist_ok=True)
    csrc = plugin_build.CSRC
    defines = ["-DMEDSWAV_HARNESS_CUDA=1"] if nvcc else []
    cpu_obj, gpu_obj = out_dir / "harness_cpu.o", out_dir / "harness_gpu.o"
    cmds = [[cxx, "-std=c++20", "-O2", *plugin_build.CXX_VECTORIZE, "-fPIC", "-fvisibility=hidden", "-Wall",
             f"-I{csrc}", *defines, "-c", str(csrc / SOURCES[0]), "-o", str(cpu_obj)]]
    link = [cxx, "-shared", "-o", str(out_dir / LIB_NAME) + ".tmp", str(cpu_obj)]
    if nvcc:
        arch = [a for c in plugin_build.CUDA_ARCHS for a in ("-gencode", f"arch=compute_{c},code=sm_{c}")]
        newest = plugin_build.CUDA_ARCHS[-1]
        arch += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX: newer GPUs JIT it
        cmds.append([nvcc, "-std=c++20", "-O2", *arch, f"-I{csrc}", "-Xptxas", "-v,-warn-spills,-warn-lmem-usage",
                     "-Xcompiler", "-fPIC,-fvisibility=hidden", "-ccbin", cxx, "-c", str(csrc / SOURCES[1]),
                     "-o", str(gpu_obj)])
        link += [str(gpu_obj), f"-L{plugin_build.find_cudart_static(root)}", "-lcudart_static", "-ldl",
                 "-lrt", "-lpthread"]
    lib, stamp = out_dir / LIB_NAME, out_dir / "stamp.txt"
    key = _key(cmds + [link])
    if not force and lib.is_file() and stamp.is_file() and stamp.read_text() == key:
        return lib
    for cmd in cmds:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise HarnessError(f"compiling {Path(cmd[-3]).name} failed (exit {proc.returncode}):\n"
                               f"{(proc.stdout + proc.stderr)[-4000:]}")
        if cmd[0] == nvcc:
            (out_dir / "ptxas.txt").write_text(proc.stdout + proc.stderr)
    proc = subprocess.run(link, capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"linking the harness failed: {(proc.stdout + proc.stderr)[-4000:]}")
    os.replace(str(lib) + ".tmp", lib)
    stamp.write_text(key)
    return lib


# --- ctypes wrapper ------------------------------------------------------------------------------

def _ptrs(arrays) -> ctypes.Array:
    return (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])


def _dhw(shape) -> tuple[int, int, int]:
    """(depth, height, width) of an image (depth 1) or volume shape."""
    shape = tuple(int(v) for v in shape)
    return shape if len(shape) == 3 else (1,) + shape


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


class Harness:
    """The library's C API (csrc/harness/harness.h) on NumPy arrays; gpu=False runs the CPU backend."""

    def __init__(self, lib_path: Path):
        self.lib = ctypes.CDLL(str(lib_path))
        P, I, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
        signatures = {  # csrc/harness/harness.h
            "msw_has_cuda_backend": (I, []), "msw_cuda_devices": (I, []),
            "msw_cuda_device_name": (ctypes.c_char_p, []), "msw_last_error": (ctypes.c_char_p, []),
            "msw_energy_bands": (I, [I, I, I, P, P, I, P, P, P, I64]),
            "msw_rescale_size": (None, [P, F, I, I, P]),
            "msw_rescale": (I, [I, I, P, P, P, P]),
            "msw_multicrop": (I, [I, I, P, P, I, P, P, P, F, P, P]),
            "msw_pointwise": (I, [I, I, I, P, P, P, P, P]),
        }
        for name, (restype, argtypes) in signatures.items():
            fn = getattr(self.lib, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.has_cuda_backend = bool(self.lib.msw_has_cuda_backend())

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise HarnessError(f"{what}: {self.lib.msw_last_error().decode()}")

    def devices(self) -> tuple[int, str]:
        count = self.lib.msw_cuda_devices()
        reason = self.lib.msw_last_error().decode()
        return count, (self.lib.msw_cuda_device_name().decode() if count > 0 else reason)

    def energy_bands(self, images, sigmas, refs=None, gpu=False, budget_bytes: int = 0) -> list[np.ndarray]:
        """refs None: band_energies. sigmas: one row per sample (or one row for all). budget_bytes: GPU
        scratch per chunk of samples (0: the operators' default, 1: one sample per chunk)."""
        images = [_f32(x) for x in images]
        n, ndim = len(images), images[0].ndim if images else 2
        sig = _f32(np.broadcast_to(np.asarray(sigmas, np.float32), (n, np.asarray(sigmas).shape[-1])))
        nb = sig.shape[1]
        shapes = np.ascontiguousarray([x.shape for x in images], dtype=np.int64).reshape(n, ndim)
        outs = [np.empty(x.shape if refs is not None else (nb + 1,), np.float32) for x in images]
        ref = None if refs is None else _f32(np.asarray(refs, np.float32).reshape(n, nb + 1))
        rc = self.lib.msw_energy_bands(int(gpu), n, ndim, shapes.ctypes.data_as(ctypes.c_void_p), _ptrs(images), nb,
                                       sig.ctypes.data_as(ctypes.c_void_p),
                                       None if ref is None else ref.ctypes.data_as(ctypes.c_void_p), _ptrs(outs),
                                       ctypes.c_int64(budget_bytes))
        self._check(rc, "energy_bands")
        return outs

    def rescale_size(self, shape, scale: float, min_size: int = 600, max_size: int = 1200) -> tuple[int, int]:
        src = np.asarray(shape, np.int64)
        out = np.zeros(2, np.int64)
        self.lib.msw_rescale_size(src.ctypes.data_as(ctypes.c_void_p), ctypes.c_float(scale), min_size, max_size,
                                  out.ctypes.data_as(ctypes.c_void_p))
        return int(out[0]), int(out[1])

    def rescale(self, images, out_shapes, gpu=False) -> list[np.ndarray]:
        """2-D images (out_shapes (h, w)) or 3-D volumes (out_shapes (d, h, w)), not mixed."""
        images = [_f32(x) for x in images]
        out_shapes = [tuple(int(v) for v in s) for s in out_shapes]
        in_dhw = np.ascontiguousarray([_dhw(x.shape) for x in images], np.int32).reshape(-1, 3)
        out_dhw = np.ascontiguousarray([_dhw(s) for s in out_shapes], np.int32).reshape(-1, 3)
        outs = [np.empty(s, np.float32) for s in out_shapes]
        rc = self.lib.msw_rescale(int(gpu), len(images), in_dhw.ctypes.data_as(ctypes.c_void_p), _ptrs(images),
                                  out_dhw.ctypes.data_as(ctypes.c_void_p), _ptrs(outs))
        self._check(rc, "rescale")
        return outs

    def multicrop(self, images, crop_sizes, num_crops, border, positions, gpu=False,
                  crop_depths=None) -> list[list[np.ndarray]]:
        """positions: [n, ndim * sum(num_crops)] ((u_y, u_x) or (u_z, u_y, u_x) per crop); returns
        out[i][g] = [num_crops[g], s_g, s_g] for images, [num_crops[g], d_g, s_g, s_g] for volumes
        (crop_depths default: crop_sizes)."""
        images = [_f32(x) for x in images]
        volumes = bool(images) and images[0].ndim == 3
        in_dhw = np.ascontiguousarray([_dhw(x.shape) for x in images], np.int32).reshape(-1, 3)
        sizes, counts = np.asarray(crop_sizes, np.int32), np.asarray(num_crops, np.int32)
        depths = np.asarray(crop_depths if crop_depths is not None else crop_sizes, np.int32) if volumes \
            else np.ones(len(sizes), np.int32)
        pos = np.asarray(positions, np.float64).reshape(len(images), -1, 3 if volumes else 2)
        if not volumes:  # images are volumes of one plane: u_z = 0
            pos = np.concatenate([np.zeros(pos.shape[:2] + (1,)), pos], axis=2)
        pos = np.ascontiguousarray(pos)
        outs = [[np.empty((c, d, s, s) if volumes else (c, s, s), np.float32) for d, s, c in zip(depths, sizes, counts)]
                for _ in images]
        flat = [o for per in outs for o in per]
        rc = self.lib.msw_multicrop(int(gpu), len(images), in_dhw.ctypes.data_as(ctypes.c_void_p), _ptrs(images),
                                    len(sizes), depths.ctypes.data_as(ctypes.c_void_p),
                                    sizes.ctypes.data_as(ctypes.c_void_p),
                                    counts.ctypes.data_as(ctypes.c_void_p), ctypes.c_float(border),
                                    pos.ctypes.data_as(ctypes.c_void_p), _ptrs(flat))
        self._check(rc, "multicrop")
        return outs

    def pointwise(self, op: str, images, a, b=None, gpu=False) -> list[np.ndarray]:
        images = [_f32(x) for x in images]
        sizes = np.asarray([x.size for x in images], np.int64)
        a = _f32(a)
        b = _f32(b if b is not None else np.zeros(len(images)))
        outs = [np.empty_like(x) for x in images]
        rc = self.lib.msw_pointwise(int(gpu), {"gamma": 0, "linear": 1}[op], len(images),
                                    sizes.ctypes.data_as(ctypes.c_void_p), _ptrs(images),
                                    a.ctypes.data_as(ctypes.c_void_p), b.ctypes.data_as(ctypes.c_void_p), _ptrs(outs))
        self._check(rc, op)
        return outs


# --- real test images ----------------------------------------------------------------------------

def real_slices() -> list[np.ndarray]:
    """pydicom's bundled CT_small (128 x 128) and MR_small (64 x 64) in HU / stored values, mapped to [0, 1]."""
    import pydicom
    from pydicom.data import get_testdata_file

    out = []
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        a = ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1)
        a += float(getattr(ds, "RescaleIntercept", 0) or 0)
        out.append(((a - a.min()) / max(a.max() - a.min(), 1e-12)).astype(np.float32))
    return out


def test_images(h: Harness, big: int) -> dict:
    """Real slices resized (CPU rescale) to production sizes, plus a volume and the edge cases."""
    ct, mr = real_slices()
    half = big // 2
    (ct_big, mr_half, ct_wide) = h.rescale([ct, mr, ct], [(big, big), (half, half), (big // 4 + 1, big + 1)])
    ct_vol = np.stack([np.roll(ct, 3 * k, axis=1) * (1 - k / 40) for k in range(12)])  # [12, 128, 128]
    return {"ct": ct, "mr": mr, "big": ct_big, "half": mr_half, "wide": ct_wide, "volume": ct_vol}


# --- checks --------------------------------------------------------------------------------------

def _result(name, kind, diffs, tol, detail="") -> dict:
    worst = max([float(d) for d in diffs] or [0.0])
    ok = bool(np.isfinite(worst) and worst <= tol)
    return {"name": name, "kind": kind, "status": "pass" if ok else "fail", "max_abs_diff": worst,
            "tolerance": tol, "detail": detail}


def _diffs(a_list, b_list):
    out = []
    for a, b in zip(a_list, b_list):
        if a.shape != b.shape:
            return [float("inf")]
        out.append(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0)
    return out


def cpu_self_checks(h: Harness) -> list[dict]:
    """The harness's CPU path (the CPU backend code) against the NumPy specification, on real slices."""
    ct, mr = real_slices()
    checks = []
    e = h.energy_bands([ct, mr], DEFAULT_SIGMAS)
    checks.append(_result("cpu/band_energies_vs_reference", "cpu",
                          [np.max(np.abs(x / R.band_energies(img) - 1)) for x, img in zip(e, (ct, mr))], 1e-4,
                          "relative"))
    ref = [x * np.linspace(0.8, 1.2, x.size) for x in e]
    out = h.energy_bands([ct, mr], DEFAULT_SIGMAS, refs=ref)
    checks.append(_result("cpu/energy_bands_vs_reference", "cpu",
                          _diffs(out, [R.energy_bands(img, r) for img, r in zip((ct, mr), ref)]), 2e-4))
    same = h.energy_bands([ct, mr], DEFAULT_SIGMAS, refs=e)
    checks.append(_result("cpu/energy_bands_own_energies_is_identity", "cpu", _diffs(same, [ct, mr]), 1e-5))
    shapes = [(128, 128, 0.4), (3000, 2500, 0.3), (1, 1, 0.5), (64, 4000, 0.7)]
    size_ok = [0.0 if h.rescale_size(s[:2], s[2]) == R.rescale_size(s[:2], s[2]) else 1.0 for s in shapes]
    checks.append(_result("cpu/rescale_size_vs_reference", "cpu", size_ok, 0.0))
    targets = [h.rescale_size(ct.shape, 0.4), (37, 91)]
    res = h.rescale([ct, mr], targets)
    checks.append(_result("cpu/rescale_vs_reference", "cpu",
                          _diffs(res, [R.bilinear_resize(ct, targets[0]), R.bilinear_resize(mr, targets[1])]), 1e-4))
    rng = np.random.default_rng(0)
    pos = rng.uniform(0, 1, (2, 2 * 8))
    crops = h.multicrop([ct, mr], (96, 160), (2, 6), 0.1, pos)
    want = [R.multicrop(img, p, (96, 160), (2, 6), 0.1) for img, p in zip((ct, mr), pos)]
    checks.append(_result("cpu/multicrop_vs_reference", "cpu",
                          _diffs([c for per in crops for c in per], [c for per in want for c in per]), 0.0))
    vol = np.stack([np.roll(ct, 3 * k, axis=1) * (1 - k / 40) for k in range(12)])  # [12, 128, 128]
    v_targets = [(30, 64, 70), (5, 200, 131)]
    v_res = h.rescale([vol, vol], v_targets)
    checks.append(_result("cpu/rescale_3d_vs_reference", "cpu",
                          _diffs(v_res, [R.trilinear_resize(vol, t) for t in v_targets]), 1e-4))
    v_pos = rng.uniform(0, 1, (1, 3 * 5))
    v_crops = h.multicrop([vol], (96, 40), (1, 4), 0.1, v_pos, crop_depths=(16, 8))
    v_want = R.multicrop(vol, v_pos[0], (96, 40), (1, 4), 0.1, crop_depths=(16, 8))
    checks.append(_result("cpu/multicrop_3d_vs_reference", "cpu", _diffs(v_crops[0], v_want), 0.0))
    g = h.pointwise("gamma", [ct, mr], [2.2, 1.8])
    checks.append(_result("cpu/gamma_vs_reference", "cpu", _diffs(g, [R.gamma(ct, 2.2), R.gamma(mr, 1.8)]), 1e-6))
    li = h.pointwise("linear", [ct, mr], [0.9, 1.1], [0.2, -0.1])
    checks.append(_result("cpu/linear_vs_reference", "cpu",
                          _diffs(li, [R.linear(ct, 0.9, 0.2), R.linear(mr, 1.1, -0.1)]), 1e-6))
    return checks


def _compare(h: Harness, name: str, tol: float, run, detail: str = "") -> dict:
    """run(gpu: bool) -> list of arrays; GPU vs CPU."""
    try:
        cpu, gpu = run(False), run(True)
    except HarnessError as e:
        return {"name": name, "kind": "gpu", "status": "fail", "max_abs_diff": None, "tolerance": tol,
                "detail": str(e)}
    return _result(name, "gpu", _diffs(gpu, cpu), tol, detail)


def gpu_checks(h: Harness, quick: bool) -> list[dict]:
    big = 300 if quick else 1200
    im = test_images(h, big)
    empty, one = np.zeros((0, 0), np.float32), im["ct"][60:61, 60:61]
    batch = [im["big"], im["half"], one, empty, np.zeros((0, 7), np.float32), im["wide"]]
    desc = f"{big}x{big}, {big // 2}x{big // 2}, 1x1, 0x0, 0x7, {im['wide'].shape[0]}x{im['wide'].shape[1]}"
    alt = (0.7, 1.5, 3.0, 6.0, 12.0)  # per-sample cascades: FIR/recursive split differs per sample
    sigmas = [DEFAULT_SIGMAS if k % 2 == 0 else alt for k in range(len(batch))]
    own = h.energy_bands(batch, sigmas)
    refs = [e * np.linspace(0.7, 1.3, e.size)[::(1 if k % 2 else -1)] for k, e in enumerate(own)]
    checks = [
        _compare(h, "gpu/band_energies_2d", 1e-6, lambda g: h.energy_bands(batch, sigmas, gpu=g), desc),
        _compare(h, "gpu/energy_bands_2d", 5e-5, lambda g: h.energy_bands(batch, sigmas, refs, gpu=g), desc),
    ]
    vols = [im["volume"], im["volume"][:1, :1, :1], np.zeros((0, 4, 4), np.float32)]
    vol_refs = [e * 1.1 for e in h.energy_bands(vols, DEFAULT_SIGMAS)]
    checks.append(_compare(h, "gpu/band_energies_3d", 1e-6, lambda g: h.energy_bands(vols, DEFAULT_SIGMAS, gpu=g),
                           "12x128x128, 1x1x1, 0x4x4"))
    checks.append(_compare(h, "gpu/energy_bands_3d", 5e-5,
                           lambda g: h.energy_bands(vols, DEFAULT_SIGMAS, vol_refs, gpu=g), "12x128x128, 1x1x1, 0x4x4"))
    # Bit-reproducibility: a second run, and the first sample alone instead of inside the batch.
    try:
        a = h.energy_bands(batch, sigmas, refs, gpu=True)
        b = h.energy_bands(batch, sigmas, refs, gpu=True)
        alone = h.energy_bands(batch[:1], sigmas[:1], refs[:1], gpu=True)
        chunked = h.energy_bands(batch, sigmas, refs, gpu=True, budget_bytes=1)  # one sample per chunk
        ea, eb = h.energy_bands(batch, sigmas, gpu=True), h.energy_bands(batch, sigmas, gpu=True)
        same = all(np.array_equal(x, y) for x, y in zip(a + ea + chunked, b + eb + a))
        same = same and np.array_equal(alone[0], a[0])
        checks.append({"name": "gpu/energy_bands_bit_reproducible", "kind": "gpu",
                       "status": "pass" if same else "fail", "max_abs_diff": 0.0 if same else None,
                       "tolerance": 0.0, "detail": "two runs, batch vs alone, one chunk vs one sample per chunk: "
                                                   "bit for bit"})
    except HarnessError as e:
        checks.append({"name": "gpu/energy_bands_bit_reproducible", "kind": "gpu", "status": "fail",
                       "max_abs_diff": None, "tolerance": 0.0, "detail": str(e)})
    # rescale: the size rule's cases (shrink, grow, clamp, 1x1, empty) at production sizes
    r_in = [im["big"], im["half"], im["ct"], one, empty, im["wide"]]
    r_scale = [0.7, 0.7, 0.4, 0.5, 0.4, 0.3]
    r_out = [h.rescale_size(x.shape, s) if x.size else (0, 0) for x, s in zip(r_in, r_scale)]
    r_in.append(im["big"])  # a strong, anisotropic shrink (no size rule)
    r_out.append((37, 53))
    checks.append(_compare(h, "gpu/rescale", 1e-5, lambda g: h.rescale(r_in, r_out, gpu=g),
                           "outputs " + ", ".join(f"{a}x{b}" for a, b in r_out)))
    rng = np.random.default_rng(1)
    c_in = [im["big"], im["half"], one, empty]
    pos = rng.uniform(0, 1, (len(c_in), 2 * 8))
    checks.append(_compare(h, "gpu/multicrop", 0.0, lambda g: [
        c for per in h.multicrop(c_in, (224, 92), (2, 6), 0.1, pos, gpu=g) for c in per], "224 x2, 92 x6 per image"))
    # 3-D: trilinear rescale into and out of METHOD's volume range, and the 1 + 4 volume crops
    # (224 x 224 x 192 + 4 x 112 x 112 x 96, 10 % border) of a largest-range volume
    v_big = (200, 250, 250) if not quick else (100, 125, 125)
    vol = im["volume"]
    (v_max,) = h.rescale([vol], [v_big])
    v_in = [vol, vol, v_max, vol[:1, :1, :1].copy(), np.zeros((0, 4, 4), np.float32), vol[:, :1, :].copy()]
    v_out = [(96, 250, 250) if not quick else (48, 125, 125), (5, 37, 53), (96, 112, 112), (3, 2, 2), (0, 0, 0),
             (7, 1, 131)]
    checks.append(_compare(h, "gpu/rescale_3d", 1e-5, lambda g: h.rescale(v_in, v_out, gpu=g),
                           "outputs " + ", ".join("x".join(map(str, t)) for t in v_out)))
    sizes3, depths3 = ((224, 112), (192, 96)) if not quick else ((112, 56), (96, 48))
    v_crop_in = [v_max, vol, vol[:1, :1, :1].copy()]
    v_pos = rng.uniform(0, 1, (len(v_crop_in), 3 * 5))
    checks.append(_compare(h, "gpu/multicrop_3d", 0.0, lambda g: [
        c for per in h.multicrop(v_crop_in, sizes3, (1, 4), 0.1, v_pos, gpu=g, crop_depths=depths3) for c in per],
        f"{'x'.join(map(str, v_big))} volume (+ padded small ones): 1 of {sizes3[0]}x{sizes3[0]}x{depths3[0]}, "
        f"4 of {sizes3[1]}x{sizes3[1]}x{depths3[1]}"))
    many = 66_000  # > 65,535 crops of one group: the launch must split along gridDim.z
    pos_many = rng.uniform(0, 1, (1, 2 * (many + 3)))
    checks.append(_compare(h, "gpu/multicrop_over_65535_crops", 0.0, lambda g: [
        c for per in h.multicrop([im["half"]], (4, 33), (many, 3), 0.1, pos_many, gpu=g) for c in per],
        f"{many} crops of 4 x 4 + 3 of 33 x 33"))
    # More samples than gridDim.y / gridDim.z allow in one launch: every launcher must split the batch.
    tiny = [im["ct"][k % 120:k % 120 + 2, k % 97:k % 97 + 3].copy() for k in range(MANY_SAMPLES)]
    checks.append(_compare(h, "gpu/band_energies_over_65535_samples", 1e-6,
                           lambda g: h.energy_bands(tiny, DEFAULT_SIGMAS, gpu=g), f"{MANY_SAMPLES} samples of 2 x 3"))
    checks.append(_compare(h, "gpu/rescale_over_65535_samples", 1e-5,
                           lambda g: h.rescale(tiny, [(3, 2)] * MANY_SAMPLES, gpu=g), f"{MANY_SAMPLES} samples"))
    checks.append(_compare(h, "gpu/gamma_over_65535_samples", 1e-6,
                           lambda g: h.pointwise("gamma", tiny, np.full(MANY_SAMPLES, 2.2), gpu=g),
                           f"{MANY_SAMPLES} samples"))
    p_in = [im["big"], im["mr"], one, empty]
    gam = [2.6, 1.8, 2.2, 2.0]
    checks.append(_compare(h, "gpu/gamma", 1e-6, lambda g: h.pointwise("gamma", p_in, gam, gpu=g)))
    checks.append(_compare(h, "gpu/linear", 1e-6,
                           lambda g: h.pointwise("linear", p_in, [0.9, 1.1, 1.0, 0.95], [0.2, -0.2, 0.0, 0.1], gpu=g)))
    return checks


# --- compute-sanitizer ---------------------------------------------------------------------------

SANITIZER_ERROR_EXIT = 86


def find_sanitizer() -> str | None:
    """compute-sanitizer from PATH, the CUDA toolkit, or the nvidia-cuda-sanitizer-api wheel (medswav[test])."""
    nvcc = plugin_build.find_nvcc()
    root = plugin_build.cuda_root(nvcc)
    wheels = Path(sysconfig.get_paths()["purelib"]) / "nvidia"
    for cand in (shutil.which("compute-sanitizer"), root and str(root / "bin" / "compute-sanitizer"),
                 "/usr/local/cuda/bin/compute-sanitizer",
                 *map(str, sorted(wheels.glob("*/compute-sanitizer/compute-sanitizer")))):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def sanitizer_check(tool: str, out: Path, timeout: int) -> dict:
    exe = find_sanitizer()
    name = f"sanitizer/{tool}"
    if exe is None:
        return {"name": name, "kind": "sanitizer", "status": "fail", "max_abs_diff": None, "tolerance": None,
                "detail": "compute-sanitizer not found (CUDA toolkit bin/; or pip install nvidia-cuda-sanitizer-api)"}
    sub = out / tool
    cmd = [exe, "--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT), "--print-limit", "50",
           sys.executable, "-m", "augment_dali.harness", "--out", str(sub), "--quick", "--gpu-only"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        return {"name": name, "kind": "sanitizer", "status": "fail", "max_abs_diff": None, "tolerance": None,
                "detail": f"timed out after {timeout} s"}
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "sanitizer.log").write_text(proc.stdout + proc.stderr)
    summary = [ln for ln in (proc.stdout + proc.stderr).splitlines()
               if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
    ok = proc.returncode == 0
    detail = (summary[-1].strip() if summary else "") + f" (exit {proc.returncode}; log {sub / 'sanitizer.log'})"
    return {"name": name, "kind": "sanitizer", "status": "pass" if ok else "fail", "max_abs_diff": None,
            "tolerance": None, "detail": detail}


# --- entry point ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m augment_dali.harness", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--out", type=Path, help="folder for harness.json (and sanitizer logs)")
    p.add_argument("--sanitizer", action="store_true", help="also rerun the GPU checks under compute-sanitizer "
                   "memcheck and racecheck (--quick sizes)")
    p.add_argument("--quick", action="store_true", help="300 x 300 instead of 1200 x 1200 (same edge cases)")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU self-checks (used under the sanitizer)")
    p.add_argument("--no-cuda", action="store_true", help="build and run the CPU half only")
    p.add_argument("--force-build", action="store_true", help="rebuild the harness library")
    p.add_argument("--build-only", action="store_true", help="build the harness library, print its path, stop")
    p.add_argument("--sanitizer-timeout", type=int, default=600, help="seconds per sanitizer run (default 600)")
    args = p.parse_args(argv)
    if args.out is None and not args.build_only:
        p.error("--out is required")
    try:
        lib = build_harness(use_cuda=not args.no_cuda, force=args.force_build)
        if args.build_only:
            print(lib)
            return EXIT_OK
        h = Harness(lib)
    except (HarnessError, plugin_build.BuildError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    report = {"harness": "medswav DALI-free kernel harness", "cuda_backend": h.has_cuda_backend, "quick": args.quick,
              "dtypes": ["float32"], "checks": []}
    try:
        if not args.gpu_only:
            report["checks"] += cpu_self_checks(h)
        count, device = h.devices() if h.has_cuda_backend else (0, "harness built without nvcc")
        report["cuda_devices"], report["device"] = count, device
        if count > 0:
            report["checks"] += gpu_checks(h, args.quick)
            if args.sanitizer:
                for tool in ("memcheck", "racecheck"):
                    report["checks"].append(sanitizer_check(tool, args.out, args.sanitizer_timeout))
        else:
            report["checks"].append({"name": "gpu/*", "kind": "gpu", "status": "skip", "max_abs_diff": None,
                                     "tolerance": None, "detail": device})
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    failed = [c["name"] for c in report["checks"] if c["status"] == "fail"]
    skipped = any(c["status"] == "skip" for c in report["checks"])
    rc = EXIT_FAILED if failed else (EXIT_NO_DEVICE if skipped else EXIT_OK)
    report["exit_code"] = rc
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "harness.json").write_text(json.dumps(report, indent=2) + "\n")
    for c in report["checks"]:
        print(f"{c['status']:4}  {c['name']}  {c['detail']}" + (
            f"  max|diff| {c['max_abs_diff']:.3g} (tol {c['tolerance']:.3g})" if c["max_abs_diff"] is not None else ""))
    print(f"{len(failed)} failed; report {args.out / 'harness.json'}; exit {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
