"""Preprocessing, HU slice → network input: its parameters and the geometry the host computes.

The pixel work runs inside the exported model (``medqc.models.slice_input.SliceInput``, the one
implementation: training, the export gates and every runner execute it — ONNX Runtime in its own threads,
TensorRT and torch batched on the GPU). The host computes only what depends on a slice's geometry (matrix,
pixel spacing, orientation) and the bundle's parameters, once per geometry (:func:`geometry`, cached): for
each output row and column, which stored rows and columns it reads and with which weights. Slices of one
geometry share these arrays and go to the runner as one batch (:func:`group_by_geometry`).

What the graph computes, per slice: padding/outside-FOV pixels (below ``pad_below_hu``, as vendors write
-2048, -3024, ...) become air (-1000 HU) and are 0 in the FOV-mask channel; the slice is resampled to a
fixed physical pixel size ``pixel_mm`` with OpenCV's weights (``cv2.resize``: INTER_AREA's area averaging
when an axis shrinks, INTER_LINEAR when none does — what the shipped network was trained on), so anatomy
has the same size in pixels whatever the FOV or matrix; it is centre-cropped or padded to ``size``²; each
HU window becomes one channel scaled to [-1, 1] (-1 in the pad); the last channel is the FOV mask (the same
resampling of the inside-the-field indicator: 1 inside, 0 outside and in the pad).

Orientation: the networks learn axial slices as a supine head-first patient is displayed (anterior at the
top, the patient's right on the image's left: ImageOrientationPatient 1\\0\\0\\0\\1\\0). Given the
slice's ImageOrientationPatient, an axial slice stored the other way round (prone patients, feet-first
habits, archives that flipped rows) is mirrored into that layout (the flips are folded into the source
indices), so the network sees anatomy the way it was trained whatever the vendor or position. Training
slices are already in that layout (no orientation given: nothing changes).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np


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


# The slice input's inputs besides "hu", in the exported graph's order (after "hu").
GEOMETRY_INPUTS = ("row_index", "row_weight", "col_index", "col_weight", "row_valid", "col_valid")
INPUT_NAMES = ("hu", *GEOMETRY_INPUTS)


@dataclass(frozen=True, eq=False)
class Geometry:
    """How one slice geometry maps onto the network's ``size``² input, per axis: for each output row
    (column), the source rows (columns) of the stored slice and their weights — the resampling to
    ``pixel_mm``, the orientation flips and the centre crop or pad folded together — and whether the output
    row (column) lies inside the resampled image at all (0 where the pad adds a border).

    ``*_index`` (size, K) int64 and ``*_weight`` (size, K) float32 (unused taps: index 0, weight 0);
    ``*_valid`` (size,) float32, 1 or 0. Read-only arrays, shared by every slice of this geometry."""

    rows: int
    cols: int
    row_index: np.ndarray
    row_weight: np.ndarray
    col_index: np.ndarray
    col_weight: np.ndarray
    row_valid: np.ndarray
    col_valid: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in GEOMETRY_INPUTS}

    def feeds(self, hu: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's inputs for a batch ``hu`` (N, rows, cols) of slices with this geometry."""
        hu = np.ascontiguousarray(hu, dtype=np.float32)
        if hu.ndim == 2:
            hu = hu[None]
        if hu.ndim != 3 or hu.shape[1:] != (self.rows, self.cols):
            raise ValueError(f"slices of shape {hu.shape[1:]} given for a {self.rows}x{self.cols} geometry")
        return {"hu": hu, **self.arrays()}


def _area_taps(n_src: int, n_dst: int) -> list[list[tuple[int, float]]]:
    """OpenCV's INTER_AREA weights for shrinking one axis (``computeResizeAreaTab``): each output pixel is
    the area-weighted mean of the source pixels its cell overlaps."""
    scale = 1.0 / (n_dst / n_src)
    taps = []
    for d in range(n_dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, n_src - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, n_src - 1)
        s1 = min(s1, s2)
        t = []
        if s1 - f1 > 1e-3:
            t.append((s1 - 1, float(np.float32((s1 - f1) / cell))))
        t.extend((s, float(np.float32(1.0 / cell))) for s in range(s1, s2))
        if f2 - s2 > 1e-3:
            t.append((s2, float(np.float32(min(min(f2 - s2, 1.0), cell) / cell))))
        taps.append(t)
    return taps


def _linear_taps(n_src: int, n_dst: int, area_mode: bool) -> list[list[tuple[int, float]]]:
    """OpenCV's 2-tap weights of its generic resize: INTER_LINEAR (pixel centres aligned), or INTER_AREA
    where an axis is enlarged (``area_mode``: the edges of the source cell that an output cell starts in)."""
    inv = n_dst / n_src
    scale = 1.0 / inv
    taps = []
    for d in range(n_dst):
        if area_mode:
            s = math.floor(d * scale)
            f = float(np.float32((d + 1) - (s + 1) * inv))  # OpenCV rounds to float here, before the floor
            f = 0.0 if f <= 0 else f - math.floor(f)
        else:
            f = (d + 0.5) * scale - 0.5
            s = math.floor(f)
            f -= s
        if s < 0:
            s, f = 0, 0.0
        if s >= n_src - 1:
            s, f = n_src - 1, 0.0
        taps.append([(s, float(np.float32(1.0 - f))), (min(s + 1, n_src - 1), float(np.float32(f)))])
    return taps


def _axis(n_src: int, n_res: int, size: int, flip: bool, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index (size, K), weight (size, K), valid (size,)) of one axis: ``n_src`` stored pixels resampled to
    ``n_res`` (``kind``: "area", "linear" or "area-linear"), mirrored when ``flip``, then centre-cropped or
    padded to ``size``."""
    if n_res == n_src:
        taps = [[(i, 1.0)] for i in range(n_src)]
    elif kind == "area":
        taps = _area_taps(n_src, n_res)
    else:
        taps = _linear_taps(n_src, n_res, area_mode=(kind == "area-linear"))
    if n_res >= size:  # crop: output o is resampled pixel o + a
        a = (n_res - size) // 2
        src = [a + o for o in range(size)]
    else:  # pad: output o is resampled pixel o - a, where that exists
        a = (size - n_res) // 2
        src = [o - a if 0 <= o - a < n_res else -1 for o in range(size)]
    k = max(len(t) for t in taps)
    index = np.zeros((size, k), np.int64)
    weight = np.zeros((size, k), np.float32)
    valid = np.zeros(size, np.float32)
    for o, j in enumerate(src):
        if j < 0:
            continue
        valid[o] = 1.0
        for q, (i, w) in enumerate(taps[j]):
            index[o, q] = (n_src - 1 - i) if flip else i
            weight[o, q] = w
    return index, weight, valid


def resampled_shape(rows: int, cols: int, pixel_spacing, params: PreprocessParams) -> tuple[int, int]:
    """The slice's matrix at ``params.pixel_mm`` pixels (before the centre crop or pad)."""
    row_mm, col_mm = float(pixel_spacing[0]), float(pixel_spacing[1])
    if not (row_mm > 0 and col_mm > 0 and math.isfinite(row_mm) and math.isfinite(col_mm)):
        raise ValueError(f"pixel spacing must be positive, got {tuple(pixel_spacing)}")
    return max(1, int(round(rows * row_mm / params.pixel_mm))), max(1, int(round(cols * col_mm / params.pixel_mm)))


def geometry(rows: int, cols: int, pixel_spacing, params: PreprocessParams, orientation=None) -> Geometry:
    """The :class:`Geometry` of a ``rows`` × ``cols`` slice with this pixel spacing (mm, row then column) and
    ImageOrientationPatient (see :func:`canonical_flips`). Kept per geometry: a series repeats one."""
    rows, cols = int(rows), int(cols)
    if rows < 1 or cols < 1:
        raise ValueError(f"expected a 2-D slice, got {rows}x{cols}")
    spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    return _geometry(rows, cols, spacing, canonical_flips(orientation), params)


@functools.lru_cache(maxsize=64)
def _geometry(rows: int, cols: int, spacing: tuple[float, float], flips: tuple[bool, bool], params: PreprocessParams) -> Geometry:
    out_h, out_w = resampled_shape(rows, cols, spacing, params)
    # OpenCV's choice, as the network was trained with: area averaging when either axis shrinks (its
    # true area weights when both do, its 2-tap area-mode weights otherwise), bilinear when none does
    if out_h < rows or out_w < cols:
        kind = "area" if (out_h <= rows and out_w <= cols) else "area-linear"
    else:
        kind = "linear"
    ri, rw, rv = _axis(rows, out_h, params.size, flips[0], kind)
    ci, cw, cv = _axis(cols, out_w, params.size, flips[1], kind)
    for a in (ri, rw, rv, ci, cw, cv):
        a.flags.writeable = False
    return Geometry(rows, cols, ri, rw, ci, cw, rv, cv)


def geometry_key(shape, pixel_spacing, orientation) -> tuple:
    """What decides a slice's geometry: slices with equal keys share one :class:`Geometry` (one batch)."""
    return (int(shape[0]), int(shape[1]), float(pixel_spacing[0]), float(pixel_spacing[1]), canonical_flips(orientation))


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


def group_by_geometry(slices, params: PreprocessParams) -> list[tuple[Geometry, list[int]]]:
    """``slices``: [(hu shape, pixel_spacing, orientation)]. Returns [(geometry, indices)] in first-seen
    order, one entry per distinct geometry. Raises ValueError for a slice whose geometry is invalid."""
    groups: dict[tuple, tuple[Geometry, list[int]]] = {}
    for k, (shape, spacing, orientation) in enumerate(slices):
        key = geometry_key(shape, spacing, orientation)
        g = groups.get(key)
        if g is None:
            g = groups[key] = (geometry(shape[0], shape[1], spacing, params, orientation), [])
        g[1].append(k)
    return list(groups.values())
