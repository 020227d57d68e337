"""NumPy reference implementations of the medswav DALI operators.

They are the specification the operators are tested against (same math, float64 where the operators
use float32) and the baseline of ``benchmarks.augment``. Every function takes one single-channel image
(2-D float array) or volume (3-D, "DHW"), intensities in [0, 1], and the per-sample parameters; nothing here draws random
numbers except where a caller passes positions explicitly.
"""
from __future__ import annotations

import math

import numpy as np

DEFAULT_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
MIN_BAND_ENERGY = 1e-6  # energies at or below this count as zero (band passed through unscaled)


# --- intensity -----------------------------------------------------------------------------------

def gamma(x: np.ndarray, gamma: float) -> np.ndarray:
    """clamp(x, 0, 1) ** gamma (NaN input counts as 0)."""
    x = np.nan_to_num(np.asarray(x, np.float64), nan=0.0)
    return np.clip(x, 0.0, 1.0) ** gamma


def linear(x: np.ndarray, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """scale * x + shift, unclamped (shift in units of the [0, 1] range)."""
    return scale * np.asarray(x, np.float64) + shift


# --- energy bands --------------------------------------------------------------------------------

def gaussian_taps(sigma: float) -> np.ndarray:
    """Normalised taps of radius ceil(3 sigma) (at least 1)."""
    r = max(1, math.ceil(3.0 * sigma))
    k = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * k * k / (sigma * sigma))
    return w / w.sum()


def reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    """Mirror indices about the edge pixels without repeating them, folding as often as needed."""
    if n <= 1:
        return np.zeros_like(idx)
    period = 2 * (n - 1)
    idx = np.mod(idx, period)
    return np.where(idx < n, idx, period - idx)


RECURSIVE_MIN_SIGMA = 4.0  # sigmas at or above this use the recursive filter (csrc/math/recursive_gaussian.h)
_VYV_D1, _VYV_D3 = complex(1.41650, 1.00829), 1.86543  # van Vliet, Young & Verbeek (1998) poles at q = 1


def _recursive_poles(q: float) -> tuple[complex, float]:
    return (abs(_VYV_D1) ** (-1.0 / q)) * np.exp(1j * np.angle(_VYV_D1) / q), _VYV_D3 ** (-1.0 / q)


def recursive_gaussian_coeffs(sigma: float) -> tuple[float, float, float, float, int]:
    """(b, a1, a2, a3, pad) of the recursive Gaussian: y[k] = b x[k] + a1 y[k-1] + a2 y[k-2] + a3 y[k-3].

    The 1998 poles are scaled as d^(1/q) with q solved by bisection so that the variance of the causal +
    anti-causal impulse response, 2 sum_p p / (1 - p)^2, is sigma^2; b = 1 - a1 - a2 - a3 (unit DC gain).
    pad = ceil(3 sigma) reflect-101 elements extend each line end. The operator also runs the recursion
    in double (its rounding would be amplified ~1/b ~ 1e3 times at sigma 16 in float)."""
    def variance(q):
        p, p3 = _recursive_poles(q)
        return 2.0 * (2.0 * (p / (1.0 - p) ** 2).real + p3 / (1.0 - p3) ** 2)

    lo, hi = 1e-3, 10.0 * sigma + 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if variance(mid) < sigma * sigma else (lo, mid)
    p, p3 = _recursive_poles(0.5 * (lo + hi))
    r, c = abs(p), p.real / abs(p)
    a1, a2, a3 = 2 * r * c + p3, -(r * r + 2 * r * c * p3), r * r * p3
    return 1.0 - a1 - a2 - a3, a1, a2, a3, max(1, math.ceil(3.0 * sigma))


def recursive_blur_axis0(x: np.ndarray, sigma: float) -> np.ndarray:
    """The recursive Gaussian along axis 0 (all other axes at once): reflect-101 extension by pad,
    causal pass from the steady state of the first extended element, anti-causal pass from that of the
    last causal output; operation order as in rg_step (y[k-1] added last)."""
    b, a1, a2, a3, pad = recursive_gaussian_coeffs(sigma)
    n = x.shape[0]
    xp = x[reflect101(np.arange(-pad, n + pad), n)]
    buf = np.empty_like(xp)
    y1 = y2 = y3 = xp[0]
    for q in range(len(xp)):
        y = ((b * xp[q] + a3 * y3) + a2 * y2) + a1 * y1
        buf[q] = y
        y1, y2, y3 = y, y1, y2
    out = np.empty_like(x)
    y1 = y2 = y3 = buf[-1]
    for q in range(len(xp) - 1, pad - 1, -1):
        y = ((b * buf[q] + a3 * y3) + a2 * y2) + a1 * y1
        if q < pad + n:
            out[q - pad] = y
        y1, y2, y3 = y, y1, y2
    return out


def exact_gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable blur with the exact taps of radius ceil(3 sigma), reflect-101 borders, every sigma."""
    w = gaussian_taps(sigma)
    r = len(w) // 2
    out = np.asarray(x, np.float64)
    for axis in range(out.ndim - 1, -1, -1):  # same axis order as the operator (last axis first)
        n = out.shape[axis]
        src = np.moveaxis(out, axis, 0)
        acc = np.zeros_like(src)
        pos = np.arange(n)
        for j, wk in enumerate(w):
            acc += wk * src[reflect101(pos + j - r, n)]
        out = np.moveaxis(acc, 0, axis)
    return out


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """The cascade's separable Gaussian blur (reflect-101 borders): exact taps below RECURSIVE_MIN_SIGMA,
    the recursive filter along every axis from there on (constant cost whatever sigma)."""
    if sigma < RECURSIVE_MIN_SIGMA:
        return exact_gaussian_blur(x, sigma)
    out = np.asarray(x, np.float64)
    for axis in range(out.ndim - 1, -1, -1):
        out = np.moveaxis(recursive_blur_axis0(np.moveaxis(out, axis, 0), sigma), 0, axis)
    return out


def band_decomposition(x: np.ndarray, sigmas=DEFAULT_SIGMAS) -> list[np.ndarray]:
    """[band_0, ..., band_{B-1}, residual]: band_i = I_i - G_i * I_i, I_{i+1} = G_i * I_i."""
    cur = np.asarray(x, np.float64)
    bands = []
    for s in sigmas:
        low = gaussian_blur(cur, s)
        bands.append(cur - low)
        cur = low
    bands.append(cur)
    return bands


def band_energies(x: np.ndarray, sigmas=DEFAULT_SIGMAS) -> np.ndarray:
    """Energy (population standard deviation over the image) of every band, len(sigmas) + 1 values."""
    return np.array([b.std() for b in band_decomposition(x, sigmas)])


def energy_bands(x: np.ndarray, ref_energies, sigmas=DEFAULT_SIGMAS) -> np.ndarray:
    """sum_i ref_i / e_i * band_i + mean(r) + ref_B / e_B * (r - mean(r)); gain 1 where e_i <= 1e-6."""
    bands = band_decomposition(x, sigmas)
    ref = np.asarray(ref_energies, np.float64)
    if ref.shape != (len(bands),):
        raise ValueError(f"ref_energies needs {len(bands)} values (len(sigmas) + 1), got {ref.shape}")
    e = np.array([b.std() for b in bands])
    gains = np.where(e > MIN_BAND_ENERGY, ref / np.where(e > 0, e, 1.0), 1.0)
    res = bands[-1]
    m = res.mean()
    out = sum(g * b for g, b in zip(gains[:-1], bands[:-1]))
    return out + m + gains[-1] * (res - m)


# --- rescale -------------------------------------------------------------------------------------

def rescale_size(shape, scale: float, min_size: int = 600, max_size: int = 1200, min_depth: int | None = None,
                 max_depth: int | None = None, spacing=None) -> tuple[int, ...]:
    """Output shape of ``rescale`` (see docs/AUGMENT_OPERATORS.md, "Rescale rule").

    t_d = scale * shape_d (times spacing_d / min(spacing) when spacing is given); the aspect-preserving
    factor k closest to 1 with min_d <= k * t_d <= max_d on every axis is applied
    (k = clip(1, max_d(min_d / t_d), min_d(max_d / t_d))); when the aspect ratio is too extreme for the
    ranges, k = max_d(min_d / t_d). Each side is then round(k * t_d) clamped to [min_d, max_d] and at
    least 1. H and W use min_size / max_size, the depth of a 3-D shape min_depth / max_depth (None: the
    same as H and W). A bound <= 0 is absent.
    """
    t = [scale * float(n) for n in shape]
    if spacing is not None:
        finest = min(float(v) for v in spacing)
        t = [v * float(sp) / finest for v, sp in zip(t, spacing)]
    mins, maxs = [min_size] * len(t), [max_size] * len(t)
    if len(t) == 3:
        mins[0] = min_size if min_depth is None else min_depth
        maxs[0] = max_size if max_depth is None else max_depth
    lo = max([m / v for m, v in zip(mins, t) if m > 0], default=0.0)
    hi = min([m / v for m, v in zip(maxs, t) if m > 0], default=math.inf)
    k = min(max(1.0, lo), hi) if lo <= hi else lo
    out = []
    for v, mn, mx in zip(t, mins, maxs):
        s = int(math.floor(v * k + 0.5))
        if mn > 0:
            s = max(s, mn)
        if mx > 0:
            s = min(s, mx)
        out.append(max(s, 1))
    return tuple(out)


def rescale(x: np.ndarray, scale: float, min_size: int = 600, max_size: int = 1200, min_depth: int | None = None,
            max_depth: int | None = None, spacing=None) -> np.ndarray:
    """Bilinear (2-D) or trilinear (3-D) resampling to ``rescale_size`` (voxel centres aligned,
    clamp-to-edge, no antialias)."""
    x = np.asarray(x, np.float64)
    out_shape = rescale_size(x.shape, scale, min_size, max_size, min_depth, max_depth, spacing)
    return bilinear_resize(x, out_shape) if x.ndim == 2 else trilinear_resize(x, out_shape)


def bilinear_resize(x: np.ndarray, out_shape) -> np.ndarray:
    h, w = x.shape
    oh, ow = out_shape
    sy = (np.arange(oh) + 0.5) * (h / oh) - 0.5
    sx = (np.arange(ow) + 0.5) * (w / ow) - 0.5
    y0 = np.floor(sy).astype(np.int64)
    x0 = np.floor(sx).astype(np.int64)
    fy = (sy - y0)[:, None]
    fx = (sx - x0)[None, :]
    y0c, y1c = np.clip(y0, 0, h - 1), np.clip(y0 + 1, 0, h - 1)
    x0c, x1c = np.clip(x0, 0, w - 1), np.clip(x0 + 1, 0, w - 1)
    top = x[y0c][:, x0c] * (1 - fx) + x[y0c][:, x1c] * fx
    bottom = x[y1c][:, x0c] * (1 - fx) + x[y1c][:, x1c] * fx
    return np.ascontiguousarray(top * (1 - fy) + bottom * fy)


def _linear_axis(n_in: int, n_out: int):
    """Lower/upper source indices and weight of the upper one for each output index along an axis."""
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src).astype(np.int64)
    return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), src - i0


def trilinear_resize(x: np.ndarray, out_shape) -> np.ndarray:
    """Separable linear interpolation along z, y and x (the operator's trilinear_at in float64)."""
    out = np.asarray(x, np.float64)
    for axis, n_out in enumerate(out_shape):
        a, b, f = _linear_axis(out.shape[axis], n_out)
        shape = [1] * out.ndim
        shape[axis] = n_out
        f = f.reshape(shape)
        lo, hi = np.take(out, a, axis=axis), np.take(out, b, axis=axis)
        out = lo + f * (hi - lo)
    return np.ascontiguousarray(out)


# --- multicrop -----------------------------------------------------------------------------------

def crop_origin(n: int, c: int, border: float, u: float) -> int:
    """Top-left coordinate of a crop of size c along a side of n pixels, for u in [0, 1].

    A margin m = floor(border * n) on each side is excluded, shrunk to floor((n - c) / 2) when the crop
    would not fit otherwise; origins are uniform integers in [m, n - c - m]. When c > n the image lies
    inside the crop at a uniform offset (origin in [n - c, 0]) and the rest is zero.
    """
    if c > n:
        lo, hi = n - c, 0
    else:
        m = min(int(math.floor(border * n)), (n - c) // 2)
        lo, hi = m, n - c - m
    return lo + min(int(math.floor(u * (hi - lo + 1))), hi - lo)


def crop(x: np.ndarray, y0: int, x0: int, size: int) -> np.ndarray:
    """size x size window at (y0, x0), zero outside the image."""
    h, w = x.shape
    out = np.zeros((size, size), np.float64)
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + size), min(w, x0 + size)
    if ye > ys and xe > xs:
        out[ys - y0:ye - y0, xs - x0:xe - x0] = x[ys:ye, xs:xe]
    return out


def crop3d(x: np.ndarray, origin, box) -> np.ndarray:
    """box = (d, h, w) window of a volume at origin (z0, y0, x0), zero outside the volume."""
    out = np.zeros(tuple(box), np.float64)
    src, dst = [], []
    for o, c, n in zip(origin, box, x.shape):
        lo, hi = max(0, o), min(n, o + c)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = x[tuple(src)]
    return out


def multicrop(x: np.ndarray, positions, crop_sizes=(224, 92), num_crops=(2, 6),
              border: float = 0.1, crop_depths=None) -> list[np.ndarray]:
    """One array per group: [num_crops[g], s_g, s_g] for an image, [num_crops[g], d_g, s_g, s_g] for a
    volume (d_g = crop_depths[g], default s_g). positions: (u_y, u_x) or (u_z, u_y, u_x) per crop in
    [0, 1], crop by crop in group order (ndim * sum(num_crops) values)."""
    nd = x.ndim
    pos = np.asarray(positions, np.float64).reshape(-1, nd)
    if len(pos) != sum(num_crops):
        raise ValueError(f"need {nd * sum(num_crops)} position values, got {pos.size}")
    depths = crop_sizes if crop_depths is None else crop_depths
    out, j = [], 0
    for size, depth, count in zip(crop_sizes, depths, num_crops):
        box = (depth, size, size) if nd == 3 else (size, size)
        group = []
        for _ in range(count):
            origin = [crop_origin(n, c, border, u) for n, c, u in zip(x.shape, box, pos[j])]
            j += 1
            group.append(crop3d(x, origin, box) if nd == 3 else crop(x, origin[0], origin[1], size))
        out.append(np.stack(group) if group else np.zeros((0,) + box))
    return out
