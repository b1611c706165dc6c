"""The one preprocessing function: HU slice → network input.

Training (``medqc train``), export parity gates and the agent all call :func:`preprocess` with the
parameters stored in the model bundle's manifest, so what the network sees in service is exactly what it
saw in training.

Steps: padding/outside-FOV pixels (below ``pad_below_hu``, as vendors write -2048, -3024, ...) become
air and are marked 0 in the FOV-mask channel; the slice is resampled to a fixed physical pixel size with
area averaging (so anatomy has the same size in pixels whatever the FOV or matrix); it is centre-cropped
or padded to ``size``²; each HU window becomes one channel scaled to [-1, 1]; the last channel is the
FOV mask (1 inside the reconstructed field, 0 outside).

Orientation: the networks learn axial slices as a supine head-first patient is displayed (anterior at the
top, the patient's right on the image's left: ImageOrientationPatient 1\\0\\0\\0\\1\\0). Given the
slice's ImageOrientationPatient, an axial slice stored the other way round (prone patients, feet-first
habits, archives that flipped rows) is mirrored into that layout, so the network sees anatomy the way it
was trained whatever the vendor or position. Training slices are already in that layout (no orientation
given: nothing changes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

try:  # OpenCV's area resize is ~15x faster than anything in numpy; numpy fallback keeps results equal
    import cv2
except ImportError:  # pragma: no cover - exercised by the module-hider test
    cv2 = None


@dataclass(frozen=True)
class PreprocessParams:
    size: int = 256
    pixel_mm: float = 2.0
    windows: tuple[tuple[float, float], ...] = ((-160.0, 240.0), (-1000.0, 1000.0), (0.0, 3000.0))
    pad_below_hu: float = -1500.0
    fov_mask: bool = True

    @property
    def channels(self) -> int:
        return len(self.windows) + (1 if self.fov_mask else 0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["windows"] = [list(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessParams":
        d = dict(d)
        if "windows" in d:
            d["windows"] = tuple((float(a), float(b)) for a, b in d["windows"])
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameter(s): {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


_ONES_CACHE: dict[tuple[int, int, int, int], np.ndarray] = {}


def _resized_ones(h: int, w: int, out_h: int, out_w: int) -> np.ndarray:
    """The FOV mask of a slice without padding: the same resize of an all-ones image, computed once per
    geometry (read-only; callers copy from it)."""
    key = (h, w, out_h, out_w)
    m = _ONES_CACHE.get(key)
    if m is None:
        m = _area_resize(np.ones((h, w), np.float32), out_h, out_w)
        m.flags.writeable = False
        if len(_ONES_CACHE) < 16:
            _ONES_CACHE[key] = m
    return m


_MASK_CACHE: dict[tuple, np.ndarray] = {}


def _resized_mask(inside: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """The FOV mask channel of a slice with padding: the area resize of ``inside``. A series repeats the
    same padding from slice to slice, so the result is kept per exact mask (its packed bits are the key):
    the same input gives the same output, only once computed (read-only; callers copy from it)."""
    key = (inside.shape, out_h, out_w, np.packbits(inside).tobytes())
    m = _MASK_CACHE.get(key)
    if m is None:
        m = _area_resize(inside.astype(np.float32), out_h, out_w)
        m.flags.writeable = False
        if len(_MASK_CACHE) >= 8:
            _MASK_CACHE.pop(next(iter(_MASK_CACHE)))
        _MASK_CACHE[key] = m
    return m


def _area_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    if img.shape == (out_h, out_w):
        return img
    if cv2 is not None:
        interp = cv2.INTER_AREA if (out_h < img.shape[0] or out_w < img.shape[1]) else cv2.INTER_LINEAR
        return cv2.resize(img, (out_w, out_h), interpolation=interp)
    # numpy fallback: separable linear interpolation of the cumulative sum (exact area average)
    def axis_resize(a: np.ndarray, n: int, axis: int) -> np.ndarray:
        m = a.shape[axis]
        edges = np.linspace(0.0, m, n + 1)
        c = np.concatenate([np.zeros_like(np.take(a, [0], axis=axis)), np.cumsum(a, axis=axis)], axis=axis)
        idx = np.arange(m + 1, dtype=np.float64)
        cs = np.apply_along_axis(lambda v: np.interp(edges, idx, v), axis, c)
        return np.diff(cs, axis=axis) / np.diff(edges).reshape([-1 if i == axis else 1 for i in range(a.ndim)])

    return axis_resize(axis_resize(img.astype(np.float64), out_h, 0), out_w, 1).astype(np.float32)


def canonical_flips(orientation) -> tuple[bool, bool]:
    """(flip rows, flip columns) that bring an axial slice to the training layout: rows running from
    anterior to posterior (column direction +y) and columns from the patient's right to left (row direction
    +x). Only for near-axial slices whose in-plane axes follow x and y; anything else is left as stored."""
    if orientation is None or len(orientation) != 6:
        return False, False
    try:
        rx, ry, _, cx, cy, _ = (float(v) for v in orientation)
    except (TypeError, ValueError):
        return False, False
    if not (abs(rx) >= 0.7 and abs(cy) >= 0.7):  # rotated in-plane (x/y swapped) or not axial: leave it
        return False, False
    return cy < 0, rx < 0


def preprocess(hu: np.ndarray, pixel_spacing: tuple[float, float], params: PreprocessParams,
               orientation=None) -> np.ndarray:
    """Turn one axial HU slice (rows × cols, any matrix, any pixel spacing) into a (C, size, size) float32.

    ``orientation``: the slice's ImageOrientationPatient (six direction cosines), when known; the result is
    mirrored into the training layout (see :func:`canonical_flips`)."""
    if hu.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
    row_mm, col_mm = float(pixel_spacing[0]), float(pixel_spacing[1])
    if not (row_mm > 0 and col_mm > 0):
        raise ValueError(f"pixel spacing must be positive, got {pixel_spacing}")
    img = hu.astype(np.float32, copy=False)
    flip_rows, flip_cols = canonical_flips(orientation)
    if flip_rows or flip_cols:  # mirrored before resampling: exactly what the same slice stored the usual way gives
        img = np.ascontiguousarray(img[::-1 if flip_rows else 1, ::-1 if flip_cols else 1])
    inside = img >= params.pad_below_hu
    everywhere = bool(inside.all())  # no padding: nothing to replace, and the mask resize is known
    if not everywhere:
        img = np.where(inside, img, np.float32(-1000.0))
    out_h = max(1, int(round(img.shape[0] * row_mm / params.pixel_mm)))
    out_w = max(1, int(round(img.shape[1] * col_mm / params.pixel_mm)))
    mask = None
    if params.fov_mask:
        mask = _resized_ones(*img.shape, out_h, out_w) if everywhere else _resized_mask(inside, out_h, out_w)
    img = _area_resize(img, out_h, out_w)

    s = params.size
    chans = len(params.windows) + (1 if params.fov_mask else 0)
    out = np.empty((chans, s, s), dtype=np.float32)
    # centre crop/pad: source and destination windows
    def span(n: int) -> tuple[slice, slice]:
        if n >= s:
            a = (n - s) // 2
            return slice(a, a + s), slice(0, s)
        a = (s - n) // 2
        return slice(0, n), slice(a, a + n)

    (sr, dr), (sc, dc) = span(out_h), span(out_w)
    win = img[sr, sc]
    tmp = np.empty(win.shape, np.float32)
    for i, (lo, hi) in enumerate(params.windows):  # (win - lo) * 2 / (hi - lo) - 1, clipped to [-1, 1]
        out[i].fill(-1.0)
        np.subtract(win, lo, out=tmp)
        np.multiply(tmp, 2.0 / (hi - lo), out=tmp)
        np.subtract(tmp, 1.0, out=tmp)
        np.clip(tmp, -1.0, 1.0, out=out[i][dr, dc])
    if mask is not None:
        out[-1].fill(0.0)
        out[-1][dr, dc] = mask[sr, sc]
    return out


def preprocess_batch(slices, params: PreprocessParams) -> np.ndarray:
    """``slices``: iterable of (hu, pixel_spacing). Returns (N, C, size, size)."""
    arrs = [preprocess(hu, ps, params) for hu, ps in slices]
    if not arrs:
        return np.zeros((0, params.channels, params.size, params.size), np.float32)
    return np.stack(arrs)
