"""Parallel-beam CT physics: forward projection, ramp-filtered back-projection and projection-domain
artifact models.

Geometry is in pixel units. An ``n × n`` image has pixel centres at ``x = j - (n-1)/2`` (columns, patient
left is +x) and ``y = i - (n-1)/2`` (rows, posterior is +y). The detector has ``n_det`` channels of one
pixel pitch centred on the rotation axis; views cover ``[0, π)`` (rebinned parallel geometry, as
third-generation scanners reconstruct after fan-to-parallel rebinning).

The projector is ray driven (Joseph's method: one sample per image row or column along each ray, linear
interpolation across) and may move the object
per view (patient motion during the rotation). The back-projector is pixel driven with linear detector
interpolation. Both are compiled with numba when it is installed; without numba a vectorised numpy
fallback (bilinear steps for the projector) gives numerically close results, many times slower.

Physical units: the image holds linear attenuation μ in 1/mm; ``project`` returns line integrals
(dimensionless, μ·mm) when given the pixel size; ``fbp`` inverts that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

try:  # pragma: no cover - import guard
    import numba

    _njit = numba.njit(cache=True, fastmath=True, nogil=True)
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

    def _njit(f):
        return f


MU_WATER_70KEV = 0.0193  # 1/mm, effective energy of a 120 kVp beam


def mu_water(kvp: float) -> float:
    """Effective linear attenuation of water (1/mm) for a tube voltage (effective energy ≈ 0.55·kVp)."""
    # μ/ρ of water: 0.227 cm²/g at 50 keV, 0.193 at 70 keV, 0.171 at 90 keV (NIST XCOM), interpolated
    e = 0.55 * kvp
    return float(np.interp(e, [40.0, 50.0, 60.0, 70.0, 80.0, 100.0], [0.268, 0.227, 0.206, 0.193, 0.184, 0.171])) / 10.0


@dataclass(frozen=True)
class Geometry:
    n: int  # image is n × n pixels
    n_views: int
    n_det: int

    @property
    def angles(self) -> np.ndarray:
        return (np.arange(self.n_views) + 0.5) * (math.pi / self.n_views)


# ---------------------------------------------------------------------------------------------- kernels
@_njit
def _project_kernel(img, us_x, us_y, ut_x, ut_y, b_x, b_y, n_det, out):
    """Joseph's method: step one row (or column) at a time along each ray, interpolate linearly across."""
    n = img.shape[0]
    c0 = (n - 1) * 0.5
    d0 = (n_det - 1) * 0.5
    r = n * 0.5
    for v in range(us_x.shape[0]):
        vert = abs(ut_y[v]) >= abs(ut_x[v])
        for d in range(n_det):
            s = d - d0
            if abs(s) >= r:
                out[v, d] = 0.0
                continue
            # ray: p(t) = s·us + t·ut + b (object pixel units, centred), t along the ray
            px0 = s * us_x[v] + b_x[v] + c0
            py0 = s * us_y[v] + b_y[v] + c0
            acc = 0.0
            half = math.sqrt(r * r - s * s) + 2.0  # the ray's chord through the object circle
            if vert:
                inv = 1.0 / ut_y[v]
                ya = py0 - half * abs(ut_y[v])
                yb = py0 + half * abs(ut_y[v])
                i_lo = max(0, int(min(ya, yb)))
                i_hi = min(n, int(max(ya, yb)) + 2)
                for i in range(i_lo, i_hi):
                    t = (i - py0) * inv
                    x = px0 + t * ut_x[v]
                    if x < 0.0 or x >= n - 1:
                        continue
                    ix = int(x)
                    fx = x - ix
                    acc += img[i, ix] * (1.0 - fx) + img[i, ix + 1] * fx
                out[v, d] = acc * abs(inv)
            else:
                inv = 1.0 / ut_x[v]
                xa = px0 - half * abs(ut_x[v])
                xb = px0 + half * abs(ut_x[v])
                j_lo = max(0, int(min(xa, xb)))
                j_hi = min(n, int(max(xa, xb)) + 2)
                for j in range(j_lo, j_hi):
                    t = (j - px0) * inv
                    y = py0 + t * ut_y[v]
                    if y < 0.0 or y >= n - 1:
                        continue
                    iy = int(y)
                    fy = y - iy
                    acc += img[iy, j] * (1.0 - fy) + img[iy + 1, j] * fy
                out[v, d] = acc * abs(inv)


@_njit
def _backproject_kernel(q, cos_t, sin_t, n, out):
    n_views = q.shape[0]
    n_det = q.shape[1]
    c0 = (n - 1) * 0.5
    d0 = (n_det - 1) * 0.5
    for v in range(n_views):
        c = cos_t[v]
        s_ = sin_t[v]
        for i in range(n):
            y = i - c0
            base = y * s_ + d0
            for j in range(n):
                s = (j - c0) * c + base
                if s < 0.0 or s >= n_det - 1:
                    continue
                k = int(s)
                f = s - k
                out[i, j] += q[v, k] * (1.0 - f) + q[v, k + 1] * f


@_njit
def _backproject_multi_kernel(q, cos_t, sin_t, n, out):
    n_ch = q.shape[0]
    n_views = q.shape[1]
    n_det = q.shape[2]
    c0 = (n - 1) * 0.5
    d0 = (n_det - 1) * 0.5
    for v in range(n_views):
        c = cos_t[v]
        s_ = sin_t[v]
        for i in range(n):
            base = (i - c0) * s_ + d0
            for j in range(n):
                s = (j - c0) * c + base
                if s < 0.0 or s >= n_det - 1:
                    continue
                k = int(s)
                f = s - k
                for ch in range(n_ch):
                    out[ch, i, j] += q[ch, v, k] * (1.0 - f) + q[ch, v, k + 1] * f


@_njit
def _backproject_grid_kernel(q, cos_t, sin_t, x0, y0, pitch, ny, nx, j_lo, j_hi, out):
    """Back-project onto an arbitrary square-pixel grid: pixel (i, j) sits at (x0 + j·pitch, y0 + i·pitch)
    in detector-pitch units relative to the rotation axis; row i covers columns j_lo[i] .. j_hi[i] - 1."""
    n_views = q.shape[0]
    n_det = q.shape[1]
    d0 = (n_det - 1) * 0.5
    for v in range(n_views):
        c = cos_t[v]
        s_ = sin_t[v]
        dj = pitch * c
        for i in range(ny):
            s = (x0 + j_lo[i] * pitch) * c + (y0 + i * pitch) * s_ + d0
            for j in range(j_lo[i], j_hi[i]):
                if s >= 0.0 and s < n_det - 1:
                    k = int(s)
                    f = s - k
                    out[i, j] += q[v, k] * (1.0 - f) + q[v, k + 1] * f
                s += dj


def _backproject_grid_numpy(q, cos_t, sin_t, x0, y0, pitch, ny, nx, j_lo, j_hi, out):
    n_det = q.shape[1]
    cols = np.arange(nx)[None, :]
    keep = (cols >= j_lo[:, None]) & (cols < j_hi[:, None])
    xs = x0 + np.arange(nx) * pitch
    ys = y0 + np.arange(ny) * pitch
    for v in range(q.shape[0]):
        s = xs[None, :] * cos_t[v] + ys[:, None] * sin_t[v] + (n_det - 1) * 0.5
        ok = (s >= 0) & (s < n_det - 1)
        k = np.where(ok, s, 0).astype(np.int64)
        f = s - k
        out += np.where(ok & keep, q[v, k] * (1 - f) + q[v, np.minimum(k + 1, n_det - 1)] * f, 0)


def _project_numpy(img, us_x, us_y, ut_x, ut_y, b_x, b_y, n_det, out):  # same maths, vectorised per view
    n = img.shape[0]
    c0 = (n - 1) * 0.5
    s = np.arange(n_det) - (n_det - 1) * 0.5
    t = np.arange(-(n // 2) - 1, n // 2 + 2, dtype=np.float64)
    for v in range(us_x.shape[0]):
        x = s[:, None] * us_x[v] + t[None, :] * ut_x[v] + b_x[v] + c0
        y = s[:, None] * us_y[v] + t[None, :] * ut_y[v] + b_y[v] + c0
        ok = (x >= 0) & (y >= 0) & (x < n - 1) & (y < n - 1) & ((s[:, None] ** 2 + t[None, :] ** 2) <= (n * 0.5) ** 2)
        ix = np.where(ok, x, 0).astype(np.int64)
        iy = np.where(ok, y, 0).astype(np.int64)
        fx = np.where(ok, x - ix, 0)
        fy = np.where(ok, y - iy, 0)
        a = img[iy, ix] * (1 - fx) + img[iy, np.minimum(ix + 1, n - 1)] * fx
        b = img[np.minimum(iy + 1, n - 1), ix] * (1 - fx) + img[np.minimum(iy + 1, n - 1), np.minimum(ix + 1, n - 1)] * fx
        out[v] = np.where(ok, a * (1 - fy) + b * fy, 0).sum(1)
        out[v, np.abs(s) >= n * 0.5] = 0


def _backproject_numpy(q, cos_t, sin_t, n, out):
    c0 = (n - 1) * 0.5
    n_det = q.shape[1]
    x = np.arange(n) - c0
    for v in range(q.shape[0]):
        s = x[None, :] * cos_t[v] + x[:, None] * sin_t[v] + (n_det - 1) * 0.5
        ok = (s >= 0) & (s < n_det - 1)
        k = np.where(ok, s, 0).astype(np.int64)
        f = s - k
        out += np.where(ok, q[v, k] * (1 - f) + q[v, np.minimum(k + 1, n_det - 1)] * f, 0)


_project = _project_kernel if numba is not None else _project_numpy
_backproject_grid = _backproject_grid_kernel if numba is not None else _backproject_grid_numpy
_backproject = _backproject_kernel if numba is not None else _backproject_numpy


# ---------------------------------------------------------------------------------------------- public
def project(img: np.ndarray, geo: Geometry, pixel_mm: float = 1.0, motion: np.ndarray | None = None) -> np.ndarray:
    """Line integrals of ``img`` (μ in 1/mm) → sinogram (n_views, n_det).

    ``motion``: optional (n_views, 3) array of the object's pose at each view: x and y shift in pixels
    and in-plane rotation in radians (the object is moved, the gantry keeps its path)."""
    if img.shape != (geo.n, geo.n):
        raise ValueError(f"image {img.shape} does not match geometry n={geo.n}")
    th = geo.angles
    es = np.stack([np.cos(th), np.sin(th)], 1)
    et = np.stack([-np.sin(th), np.cos(th)], 1)
    if motion is None:
        us, ut, b = es, et, np.zeros_like(es)
    else:
        # object point q = R(-φ)(p - d): sample the static image there
        dx, dy, phi = motion[:, 0], motion[:, 1], motion[:, 2]
        c, s = np.cos(-phi), np.sin(-phi)

        def rot(u):
            return np.stack([c * u[:, 0] - s * u[:, 1], s * u[:, 0] + c * u[:, 1]], 1)

        us, ut = rot(es), rot(et)
        b = -rot(np.stack([dx, dy], 1))
    out = np.empty((geo.n_views, geo.n_det), np.float64)
    f = lambda a: np.ascontiguousarray(a, dtype=np.float64)  # noqa: E731
    _project(f(img), f(us[:, 0]), f(us[:, 1]), f(ut[:, 0]), f(ut[:, 1]), f(b[:, 0]), f(b[:, 1]), geo.n_det, out)
    return out * pixel_mm


# Reconstruction kernels: a window on the ramp in physical frequency (cycles/mm): a smooth roll-off with
# 50% response at ``f50`` and an optional mid-frequency boost (edge enhancement of bone/lung kernels).
KERNELS: dict[str, tuple[float, float]] = {
    "soft": (0.26, 0.0),
    "standard": (0.36, 0.0),
    "detail": (0.50, 0.15),
    "lung": (0.70, 0.35),
    "bone": (0.85, 0.55),
}


def kernel_window(freq_cyc_per_mm: np.ndarray, kernel: str) -> np.ndarray:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    f50, boost = KERNELS[kernel]
    f = np.abs(freq_cyc_per_mm)
    w = 1.0 / (1.0 + (f / f50) ** 6)
    if boost:
        w = w * (1.0 + boost * (f / f50) ** 2 * np.exp(1.0 - (f / f50) ** 2))
    return w


def ramp_filter(sino: np.ndarray, pixel_mm: float, kernel: str = "standard", recon_pixel_mm: float | None = None) -> np.ndarray:
    """Ramp filter along the detector (spatial-domain Ram-Lak, no DC bias) times the kernel window.

    ``recon_pixel_mm``: when the image grid is coarser than the detector, frequencies above the grid's
    Nyquist limit are rolled off (as scanners do) instead of aliasing into the image."""
    n_det = sino.shape[-1]
    size = 1 << int(math.ceil(math.log2(2 * n_det)))
    k = np.arange(-(size // 2), size // 2)
    h = np.zeros(size)
    h[size // 2] = 0.25
    odd = (k % 2) == 1
    h[odd] = -1.0 / (math.pi * k[odd]) ** 2
    H = np.real(np.fft.fft(np.fft.ifftshift(h)))
    freq = np.fft.fftfreq(size) / pixel_mm
    H = H * kernel_window(freq, kernel)
    if recon_pixel_mm is not None and recon_pixel_mm > pixel_mm:
        H = H / (1.0 + (np.abs(freq) * 2.0 * recon_pixel_mm / 1.1) ** 8)
    P = np.fft.fft(sino, n=size, axis=-1)
    return np.real(np.fft.ifft(P * H, axis=-1))[..., :n_det]


def backproject(q: np.ndarray, geo: Geometry) -> np.ndarray:
    """Back-project one filtered sinogram (views, det) or several at once (channels, views, det)."""
    th = geo.angles
    q = np.ascontiguousarray(q, dtype=np.float64)
    if q.ndim == 2:
        out = np.zeros((geo.n, geo.n), np.float64)
        _backproject(q, np.cos(th), np.sin(th), geo.n, out)
    elif numba is not None:
        out = np.zeros((q.shape[0], geo.n, geo.n), np.float64)
        _backproject_multi_kernel(q, np.cos(th), np.sin(th), geo.n, out)
    else:
        out = np.zeros((q.shape[0], geo.n, geo.n), np.float64)
        for c in range(q.shape[0]):
            _backproject_numpy(q[c], np.cos(th), np.sin(th), geo.n, out[c])
    return out * (math.pi / geo.n_views)


def backproject_grid(q: np.ndarray, geo: Geometry, x0: float, y0: float, pitch: float, ny: int, nx: int,
                     circle: tuple[float, float, float] | None = None) -> np.ndarray:
    """Back-project a filtered sinogram onto a grid given in detector-pitch units (see the kernel).

    ``circle`` = (centre row, centre column, radius) in grid pixels: only pixels inside it are computed
    (the rest stay 0), for reconstructions whose corners are padded anyway."""
    th = geo.angles
    out = np.zeros((ny, nx), np.float64)
    if circle is None:
        j_lo = np.zeros(ny, np.int64)
        j_hi = np.full(ny, nx, np.int64)
    else:
        ci, cj, rad = circle
        h = np.sqrt(np.clip(rad**2 - (np.arange(ny) - ci) ** 2, 0.0, None))
        j_lo = np.clip(np.floor(cj - h - 1), 0, nx).astype(np.int64)
        j_hi = np.clip(np.ceil(cj + h + 2), 0, nx).astype(np.int64)
        j_hi = np.maximum(j_hi, j_lo)
    _backproject_grid(np.ascontiguousarray(q, dtype=np.float64), np.cos(th), np.sin(th), float(x0), float(y0), float(pitch),
                      int(ny), int(nx), j_lo, j_hi, out)
    return out * (math.pi / geo.n_views)


def fbp(sino: np.ndarray, geo: Geometry, pixel_mm: float, kernel: str = "standard") -> np.ndarray:
    """Filtered back-projection of line integrals → μ (1/mm)."""
    return backproject(ramp_filter(sino, pixel_mm, kernel), geo) / pixel_mm


# ------------------------------------------------------------------------------------- artifact physics
def bowtie(n_det: int, pixel_mm: float) -> np.ndarray:
    """Relative fluence across the fan (bowtie filter): 1 at the centre, about 0.25 at 250 mm."""
    s = (np.arange(n_det) - (n_det - 1) * 0.5) * pixel_mm
    return np.exp(-((s / 210.0) ** 2) * 1.4)


def photon_counts(sino: np.ndarray, i0, pixel_mm: float) -> np.ndarray:
    """Expected detected photons per ray (``i0``: a number, or per view (views, 1) for tube-current
    modulation)."""
    return i0 * bowtie(sino.shape[1], pixel_mm)[None, :] * np.exp(-sino)


def noisy_log(sino: np.ndarray, i0: float, pixel_mm: float, rng: np.random.Generator, electronic: float = 8.0) -> np.ndarray:
    """Poisson photon statistics plus electronic noise, then the log; rays with (almost) no photons
    are clipped as the scanner does (photon starvation)."""
    lam = photon_counts(sino, i0, pixel_mm)
    counts = rng.poisson(lam).astype(np.float64) + rng.normal(0.0, electronic, lam.shape)
    counts = np.maximum(counts, 0.5)
    return -np.log(counts / (i0 * bowtie(sino.shape[1], pixel_mm)[None, :]))


def log_noise_std(sino: np.ndarray, i0: float, pixel_mm: float, electronic: float = 8.0) -> np.ndarray:
    """Standard deviation of the log of Poisson counts plus electronic noise: √(1/λ + σe²/λ²)."""
    lam = np.maximum(photon_counts(sino, i0, pixel_mm), 1e-3)
    return np.sqrt(1.0 / lam + (electronic**2) / lam**2)


def gaussian_noise_sino(sino: np.ndarray, i0: float, pixel_mm: float, rng: np.random.Generator, electronic: float = 8.0) -> np.ndarray:
    """Noise-only sinogram (Gaussian approximation of the log of Poisson counts)."""
    return rng.standard_normal(sino.shape) * log_noise_std(sino, i0, pixel_mm, electronic)


def beam_hardening(p_metal: np.ndarray, strength: float = 0.06) -> np.ndarray:
    """Polychromatic metal line integral: the measured value grows less than linearly with metal path
    (the beam hardens), p → p·(1 − β p / (1 + β p)); β ~ 0.03..0.1 for titanium..steel at 120 kVp."""
    return p_metal / (1.0 + strength * p_metal)


def ring_gains(n_det: int, rng: np.random.Generator, n_bad: int, amplitude: float) -> np.ndarray:
    """Additive log-domain offsets of miscalibrated detector channels (−ln g for gain g)."""
    off = np.zeros(n_det)
    centre = (n_det - 1) * 0.5
    # bad channels anywhere but the very edge; a few adjacent channels often fail together (a module)
    for _ in range(n_bad):
        c = int(centre + rng.choice([-1.0, 1.0]) * rng.uniform(0.06, 0.4) * n_det)
        w = int(rng.integers(1, 4))
        sign = rng.choice([-1.0, 1.0])
        off[c : c + w] += sign * amplitude * rng.uniform(0.6, 1.0)
    # a fan-beam channel sees the ray (θ, s) in one half-rotation and (θ + π, −s) in the other: after
    # rebinning to parallel views over [0, π) a bad channel appears at both +s and −s, a full ring
    return 0.5 * (off + off[::-1])


def truncate(sino: np.ndarray, radius_px: float, taper_px: float = 12.0) -> np.ndarray:
    """Detector channels beyond the scan field of view are missing; the scanner extrapolates the edge
    of each projection smoothly to zero (which leaves the bright rim and cupping of real truncation)."""
    n_det = sino.shape[1]
    s = np.arange(n_det) - (n_det - 1) * 0.5
    inside = np.abs(s) <= radius_px
    out = np.where(inside[None, :], sino, 0.0)
    left = int(np.argmax(inside))
    right = n_det - 1 - int(np.argmax(inside[::-1]))
    t = np.arange(1, int(taper_px) + 1)
    fall = np.cos(0.5 * math.pi * t / (taper_px + 1)) ** 2
    for edge, direction in ((left, -1), (right, 1)):
        idx = edge + direction * t
        ok = (idx >= 0) & (idx < n_det)
        out[:, idx[ok]] = sino[:, edge : edge + 1] * fall[ok][None, :]
    return out
