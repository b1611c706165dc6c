"""Classical CT detectors: physics and HU anatomy measured on one slice, beside the network.

``measure(hu, info)`` returns plain floats (NaN when a measure does not apply) in about 7 ms for a 512²
slice on one core of the 2-core development machine (the ring measure 2.1, the air streaks 1.3, noise at
2 mm 1.3 plus 0.5 for the 2 mm pooling, on the bench study): the metal search and the fine ring scale work at full resolution, the masks on a 2×
subsampled view, noise and air streaks at ~2 mm. ``fuse(net, measures)``
combines the network's per-class probabilities with this classical evidence (rule below and in
``docs/checks.md``).

Robustness rules that hold for every vendor we know of:

* pixels below ``PAD_HU`` (-1500) are padding outside the reconstructed field (-2000, -2048, -3024 ...);
  the field of view (FOV) is what is left. Truncation shows where the patient meets the *scan* field's
  edge (DataCollectionDiameter, padding deep inside the displayed circle, or a displayed circle about as
  wide as the scanner's 500 mm field); a smaller displayed field that cuts the body only crops it;
* the FOV edge is also the rim of the inscribed reconstruction circle (vendors that write -1024 outside
  the circle leave no padding value to find; a body wider than a square reconstruction crosses the rim
  where it meets the image border);
* body = HU > -400 (skin, fat, tissue, bone); the couch is part of it but is thin, so medians and the
  largest connected component (when OpenCV is present) keep it from dominating;
* lung = enclosed voxels between -950 and -500 HU: aerated parenchyma, not the -1000 HU of air in the
  room, trachea or bowel gas (mostly).
"""

from __future__ import annotations

import math
import re

import numpy as np

from medqc.analysis import airstreaks

try:  # connected components make the body/lung masks cleaner; numpy alone still gives usable measures
    import cv2
except ImportError:  # pragma: no cover - exercised by the module-hider test
    cv2 = None

PAD_HU = -1500.0
BODY_HU = -400.0
METAL_HU = 2500.0
METAL_OBJECT_MM2 = 1.0  # metal objects whose streaks the air measure leaves out (see airstreaks), from this area ...
METAL_OBJECTS = 8  # ... the largest this many
BONE_HU = 300.0
SKULL_HU = 700.0
LUNG_HU = (-950.0, -500.0)
NOISE_BLOCK = 8  # block edge on the subsampled grid (16 px at full resolution)
SOFT_HU = (-100.0, 150.0)
TARGETED_RIM = 0.6  # trunk along this share of the displayed rim: a targeted reconstruction
SCAN_FIELD_MM = 500.0  # the scan field of CT scanners, assumed where DataCollectionDiameter is missing

MEASURES = (
    "metal_area_mm2", "metal_max_hu", "noise_sd", "body_touches_fov", "body_center_offset_x_mm",
    "body_center_offset_y_mm", "body_area_mm2", "lung_area_mm2", "bone_area_mm2", "skull_ring",
    "lateral_bone_mm2", "noise_sd_2mm", "noise_ratio", "ring_contrast_hu", "field_inside_body", "air_dark_hu",
    "display_touch", "noise_ratio_plain", "water_eq_diameter_mm", "anterior_bone_mm2", "trunk_width_mm",
)

# Noise judged at 2 mm (the scale a reader sees and the network's input pixel), where kernels differ far less
# than at their own pixel: σ at which noise becomes an artifact, brain and body (synthetic CT uses the same
# scale: clean ≤ 5 / 14 HU, artifact ≥ 8 / 20 HU). Real routine scans run higher than our clean synthetic
# ones (texture, thin slices, shoulders), so the classical evidence starts at these levels (ratio 1) and
# is only strong (0.95) at NOISE_RATIO_HI times them.
NOISE_2MM_HU = {"head": 12.0, "body": 38.0}
# The body level holds across vendors: on real clean slices of three vendors (GE STANDARD 1.25–5 mm,
# Toshiba FC17 1–5 mm, Philips C 2 mm, shoulders included) the ratio reads at most 0.9 after the kernel and
# size allowances below, and with four times their own σ added in the projection domain at least 1.05.
NOISE_HEAD_QUANTILE = 0.25  # inside a skull (see noise_2mm)
NOISE_SIZE_REF_MM = 320.0  # a trunk wider than this (water-equivalent diameter) is allowed its extra noise ...
NOISE_WIDTH_REF_MM = 380.0  # ... as is one wider than this from side to side
NOISE_RATIO_HI = 2.0
NOISE_MIN_AREA_MM2 = 2000.0  # soft tissue measured (≥ 20 cm²: a neck holds 21–30 after the 10 mm margin) ...
NOISE_MIN_AREA_HEAD_MM2 = 500.0  # ... 5 cm² inside a skull (the brain is homogeneous; near the vertex it is small)
NOISE_MIN_FRACTION = 0.25  # ... and a quarter of the patient's interior, or no noise figure
NOISE_CENTRAL = 0.4  # trunk noise is read within 0.4 × the body's equivalent radius of its centroid ...
NOISE_CENTRAL_MIN_MM2 = 1000.0  # ... where at least 10 cm² of soft tissue lies there (else the whole section)
NOISE_REF_THICKNESS_MM = 3.0  # thinner slices are noisier by design: σ is scaled by √(t / 3 mm) below 3 mm
# Kernels whose noise is high by design (bone, lung, high-resolution): judged against SHARP_NOISE_FACTOR
# times the level, so that only gross noise (a failed or wrongly set tube current) is flagged there. Area
# averaging to 2 mm removes most of a sharp kernel's noise but not all (edge enhancement below 0.25 lp/mm,
# the box filter's side lobes): a routine real bone or lung kernel reads roughly 1.5–2.5 × a standard one.
# The factor is the top of that range: a sharp kernel is flagged only at a dose that would be flagged on a
# standard kernel, or a lower one (on the evaluation slices 2.5 ranks noisy sharp-kernel slices with the
# rest, and moves no clean sharp-kernel slice over the threshold).
# Siemens B/Br/Hr/Qr/Ur ≥ 60 and Bl lung, GE BONE/LUNG/EDGE/DETAIL, Philips D/E/L/Y* (C is its sharper
# standard body kernel: real Philips C chests read like a GE STANDARD), Canon FC30–39
# (bone) and FC5x–9x (lung, high resolution).
SHARP_KERNEL = re.compile(
    r"BONE|LUNG|SHARP|EDGE|DETAIL|ULTRA|HIGH ?RES|\b[A-Z]{1,2}[6-9]\d[A-Z]?\b|\bBL\d\d|FC3\d|FC[5-9]\d|^(D|E|L|Y[A-F])$", re.I)
SHARP_NOISE_FACTOR = 2.5
# Kernels a step sharper than a vendor's standard body kernel (Philips C; GE DETAIL is listed as sharp):
# their routine noise reads about 1.5 × a standard kernel's (a real Philips C chest at 21 mGy: σ at 2 mm
# 16–54 HU, shoulders the highest, against 10–38 for GE STANDARD chests and abdomens)
MEDIUM_KERNEL = re.compile(r"^C$", re.I)
MEDIUM_NOISE_FACTOR = 1.5


def kernel_noise_factor(kernel: str) -> float:
    """How much more noise than a standard kernel a reconstruction kernel gives by design (1 when unknown)."""
    k = (kernel or "").strip()
    if not k:
        return 1.0
    if SHARP_KERNEL.search(k):
        return SHARP_NOISE_FACTOR
    if MEDIUM_KERNEL.search(k):
        return MEDIUM_NOISE_FACTOR
    return 1.0

_NOISE_CAL: list[float] = []

_GEOM_CACHE: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
_RADIUS_CACHE: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}


def _pixel_mm(info) -> tuple[float, float]:
    ps = getattr(info, "pixel_spacing", None)
    if ps and ps[0] and ps[1] and ps[0] > 0 and ps[1] > 0:
        return float(ps[0]), float(ps[1])
    rd = getattr(info, "reconstruction_diameter", None)
    cols = getattr(info, "cols", 0) or 0
    if rd and cols:
        return float(rd) / cols, float(rd) / cols
    return 0.7, 0.7  # a typical body FOV of 360 mm on 512²; only areas depend on it


def _radius(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Distance (px) of every pixel from the image centre, as floats and truncated to whole pixels (cached)."""
    g = _RADIUS_CACHE.get((h, w))
    if g is None:
        yy, xx = np.ogrid[0:h, 0:w]
        r = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
        g = (r, r.astype(np.int32))
        if len(_RADIUS_CACHE) < 16:
            _RADIUS_CACHE[(h, w)] = g
    return g


def _edge_geometry(h: int, w: int, band: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (subsampled grid): the FOV-edge band (the inscribed circle's rim, which also meets the
    image border at its four sides), the inscribed circle and the central disk (half its radius)."""
    key = (h, w, band)
    g = _GEOM_CACHE.get(key)
    if g is None:
        r = _radius(h, w)[0]
        rmax = min(h, w) / 2.0
        edge = (r >= rmax - band) & (r <= rmax + 0.5)
        inside = r <= rmax + 0.5
        g = (edge, inside, r <= rmax * 0.5)
        if len(_GEOM_CACHE) < 16:
            _GEOM_CACHE[key] = g
    return g


def _ring(h: int, w: int, r_px: float, band: int) -> np.ndarray:
    r = _radius(h, w)[0]
    return (r >= r_px - band) & (r <= r_px + 0.5)


def _constant_fill_radius(sub: np.ndarray, band: int) -> float | None:
    """Radius (px) of a scan-field edge that the vendor (or a reconstruction) fills with one constant air-like
    value instead of padding: every pixel from that radius out to the displayed rim holds exactly the
    value (≤ −900 HU) that fills ≥ 97 % of the rim band. Air around a patient is noisy (even where -1024 clips it, about half its
    pixels differ), so a ≥ 97 % constant annulus is the scan field, not air — when noisy air lies inside it
    (≥ 5 % of the annulus just inside): a reconstruction that clamps all its air to one value has none. None
    when there is none."""
    h, w = sub.shape
    rb = _radius(h, w)[1]
    rmax = min(h, w) // 2
    hi = rmax - band  # bins [r0, hi) must all be constant fill
    rim = sub[(rb >= hi - band) & (rb < hi)]
    if rim.size == 0:
        return None
    vals, counts = np.unique(rim, return_counts=True)
    k = int(np.argmax(counts))
    v = float(vals[k])
    if counts[k] < 0.97 * rim.size or v > -900.0 or v < PAD_HU:
        return None
    inside = rb < hi
    const = sub[inside] == v
    tot = np.bincount(rb[inside], minlength=hi)
    frac = np.bincount(rb[inside], weights=const, minlength=hi) / np.maximum(tot, 1)
    ok = frac[:hi] >= 0.97
    bad = np.flatnonzero(~ok)
    r0 = int(bad[-1]) + 1 if bad.size else 0
    if r0 > hi - 2 * band or r0 < 0.2 * rmax:
        return None
    # a field edge has the scanner's own, noisy air inside it wherever the patient does not reach it; where the
    # constant value runs right up to the object all round (a reconstruction that clamps its air at -1000, as
    # cone-beam CT does round a phantom), it is the air, not a field edge
    near = (rb >= max(0, r0 - 2 * band)) & (rb < r0)
    ring = sub[near]
    if ring.size and np.count_nonzero((ring < -900.0) & (ring != v)) < 0.05 * ring.size:
        return None
    return float(r0)


def _metal_objects(metal_px: np.ndarray, rmm: float, cmm: float) -> list[tuple[float, float]]:
    """(row, col) centroids of the metal objects (``metal_px``: the slice's pixels >= METAL_HU; objects of
    >= ``METAL_OBJECT_MM2``) of a slice, the largest ``METAL_OBJECTS`` of them: the sources of its metal
    streaks."""
    if cv2 is None:
        ys, xs = np.nonzero(metal_px)
        return [(float(ys.mean()), float(xs.mean()))] if ys.size else []
    n, _, st, cen = cv2.connectedComponentsWithStats(metal_px.view(np.uint8), connectivity=8)
    area = st[1:, cv2.CC_STAT_AREA] * rmm * cmm
    order = np.argsort(-area)[:METAL_OBJECTS]
    return [(float(cen[1 + k][1]), float(cen[1 + k][0])) for k in order if area[k] >= METAL_OBJECT_MM2]


def _patient_mask(mask: np.ndarray, central: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patient among the dense objects of a slice → (patient, trunk, beside): the trunk is the connected
    component with most pixels in the central disk; the patient adds components beside it (arms: centroid
    row within its row range, area >= 5 % of it). The couch (below), head holders and frames (above) are
    left out. ``beside`` is the patient plus every smaller piece beside the trunk (>= 8 pixels): the sliver
    of an arm that a scan field cuts is small, but it is anatomy outside the field all the same. Without
    OpenCV: the whole mask for all three."""
    if cv2 is None or not mask.any():
        return mask, mask, mask
    n, labels, stats, cents = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    if n <= 2:
        return mask, mask, mask
    in_centre = np.bincount(labels[central], minlength=n)
    in_centre[0] = 0
    main = int(np.argmax(in_centre)) if in_centre.max() > 0 else 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    top = stats[main, cv2.CC_STAT_TOP]
    bottom = top + stats[main, cv2.CC_STAT_HEIGHT]
    min_area = 0.05 * stats[main, cv2.CC_STAT_AREA]
    keep = np.zeros(n, bool)
    keep[main] = True
    side = keep.copy()
    for k in range(1, n):
        if k != main and top <= cents[k][1] <= bottom:
            keep[k] = stats[k, cv2.CC_STAT_AREA] >= min_area
            side[k] = stats[k, cv2.CC_STAT_AREA] >= 8
    trunk = labels == main
    patient = keep[labels] if np.count_nonzero(keep) > 1 else trunk
    return patient, trunk, (side[labels] if np.count_nonzero(side) > np.count_nonzero(keep) else patient)


def _border_connected(pad: np.ndarray) -> np.ndarray:
    """The padded pixels connected to the image border: padding outside a scan field. Values below the
    padding level inside the picture (the darkest streaks of metal or motion on a scanner that does not
    clip at −1024) are not a field edge."""
    if cv2 is None:
        return pad
    n, lab = cv2.connectedComponents(pad.view(np.uint8), connectivity=8)
    if n <= 2:
        return pad
    ids = np.unique(np.concatenate((lab[0], lab[-1], lab[:, 0], lab[:, -1])))
    keep = np.zeros(n, bool)
    keep[ids[ids > 0]] = True
    return keep[lab]


def _median_index(counts: np.ndarray) -> float:
    """The median of the indices of a mask's pixels along one axis, from that axis's pixel counts (what
    ``np.median`` of their coordinates gives: the mean of the two middle ones for an even count)."""
    cum = np.cumsum(counts)
    n = int(cum[-1])
    lo = int(np.searchsorted(cum, (n - 1) // 2, side="right"))
    hi = int(np.searchsorted(cum, n // 2, side="right"))
    return (lo + hi) / 2.0


def _border_pixels(a: np.ndarray):
    """(y, x) of border pixels of ``a`` that are still 1 (unfilled background)."""
    h, w = a.shape
    ys, xs = [], []
    for y0, row in ((0, a[0]), (h - 1, a[-1])):
        x = np.flatnonzero(row == 1)
        ys.append(np.full(len(x), y0))
        xs.append(x)
    for x0, col in ((0, a[:, 0]), (w - 1, a[:, -1])):
        y = np.flatnonzero(col == 1)
        ys.append(y)
        xs.append(np.full(len(y), x0))
    return zip(np.concatenate(ys).tolist(), np.concatenate(xs).tolist())


LUNG_OPEN_TOUCH = 0.15  # the trunk along this share of the displayed rim: the field cuts it (see measure)
AIR_CUT_TOUCH = 0.25  # ... along this share: no free air round the patient to read motion streaks in
LUNG_HULL_MARGIN_MM = 6.0


def _trunk_hull(mask: np.ndarray, margin_px: float) -> np.ndarray:
    """The convex hull of ``mask``, shrunk by ``margin_px``."""
    pts = cv2.findNonZero(mask.view(np.uint8))
    out = np.zeros(mask.shape, np.uint8)
    if pts is None:
        return out.astype(bool)
    cv2.fillConvexPoly(out, cv2.convexHull(pts), 1)
    k = int(round(margin_px))
    if k >= 1:
        out = cv2.erode(out, np.ones((2 * k + 1, 2 * k + 1), np.uint8))
    return out.astype(bool)


def _holes(body: np.ndarray) -> np.ndarray:
    """Pixels enclosed by ``body`` (not reachable from the image border through non-body pixels)."""
    if cv2 is not None:
        outside = (~body).view(np.uint8).copy()
        h, w = outside.shape
        ff = np.zeros((h + 2, w + 2), np.uint8)
        # flood the background from every border pixel that is background (corners cover the usual case)
        for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):
            if outside[y, x] == 1:
                cv2.floodFill(outside, ff, (x, y), 2)
        # background pockets on the border not connected to a corner (a body touching the image edge)
        for y, x in _border_pixels(outside):
            if outside[y, x] == 1:
                cv2.floodFill(outside, ff, (int(x), int(y)), 2)
        return outside == 1
    # numpy fallback: inside both the row span and the column span of the body
    rows = body.any(axis=1)
    cols = body.any(axis=0)
    h, w = body.shape
    left = np.where(rows, body.argmax(axis=1), w)
    right = np.where(rows, w - 1 - body[:, ::-1].argmax(axis=1), -1)
    top = np.where(cols, body.argmax(axis=0), h)
    bottom = np.where(cols, h - 1 - body[::-1, :].argmax(axis=0), -1)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = (xx > left[:, None]) & (xx < right[:, None]) & (yy > top[None, :]) & (yy < bottom[None, :])
    return inside & ~body


SKULL_DEPTH_MM = 20.0  # a skull lies under the scalp: skull-density bone within this depth of the skin ...
SKULL_SECTORS = 0.75  # ... in this share of the 24 sectors round the section's centre makes it a head


def _skull_under_scalp(dense: np.ndarray, body: np.ndarray, cy: float, cx: float, pix_mm: float) -> bool:
    """Whether skull-density bone lies just under the skin all round the section: a skull. Dense bone in
    every direction from the centre is not enough: below the skull base the cervical spine sits near the
    neck's centre, so that it and the mandible cover nearly every sector, but the spine lies 4–6 cm deep.
    ``body``: the section with its enclosed air filled (an airway is not skin)."""
    r = max(1, int(round(SKULL_DEPTH_MM / pix_mm)))
    if cv2 is not None:
        inner = cv2.erode(body.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).view(bool)
    else:
        inner = _erode_cross(body, r)
    return _sector_share(dense & ~inner, cy, cx) >= SKULL_SECTORS


ANTERIOR_DEPTH = 0.35  # the anterior share of the trunk's front-to-back extent ...
ANTERIOR_HALF_WIDTH = 0.12  # ... within this share of its width either side of the midline


def _anterior_midline_bone(bone: np.ndarray, core: np.ndarray, x0: int, x1: int, info) -> float:
    """Pixels of trunk bone in front of the body's midline: the anterior ``ANTERIOR_DEPTH`` of the trunk's
    front-to-back extent, within ``ANTERIOR_HALF_WIDTH`` of its width of the midline. Bone lies there only at
    the sternum (with the lungs beside it) and at the pubic bones (the symphysis, below the pelvis's wings):
    the abdomen between holds bowel, bladder and the abdominal wall in front of the spine. Which image rows
    are anterior comes from ImageOrientationPatient (patient +y is posterior); a prone or flipped image has
    its front at the bottom."""
    ori = getattr(info, "orientation", None)
    front_at_top = not (ori and len(ori) == 6 and ori[4] < 0)
    cxm = 0.5 * (x0 + x1)
    half = ANTERIOR_HALF_WIDTH * (x1 - x0)
    a, b = int(max(0, cxm - half)), int(cxm + half) + 1
    rows = np.flatnonzero(core[:, a:b].any(axis=1))
    if rows.size == 0:
        return 0.0
    r0, r1 = int(rows[0]), int(rows[-1])
    depth = int(round(ANTERIOR_DEPTH * (r1 - r0 + 1)))
    band = bone[r0:r0 + depth, a:b] if front_at_top else bone[r1 - depth + 1:r1 + 1, a:b]
    return float(np.count_nonzero(band))


def _erode_cross(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` eroded ``r`` times by the 4-neighbour cross (numpy only: the fallback without OpenCV)."""
    out = mask.copy()
    for _ in range(r):
        out[1:, :] &= out[:-1, :].copy()
        out[:-1, :] &= out[1:, :].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def _sector_share(mask: np.ndarray, cy: float, cx: float) -> float:
    """Share of the 24 angular sectors round (cy, cx) that hold a pixel of ``mask`` (0 for an empty one)."""
    if not mask.any():
        return 0.0
    dy_, dx_ = np.nonzero(mask)
    ang = np.arctan2(dy_ - cy, dx_ - cx)
    sectors = np.bincount(((ang + math.pi) / (2 * math.pi) * 24).astype(int) % 24, minlength=24)
    return np.count_nonzero(sectors) / 24.0


def _robust_noise(sub: np.ndarray, valid: np.ndarray) -> float:
    """Robust σ (HU, at the image's own pixel size) in homogeneous soft tissue.

    8×8 blocks of the 2× subsampled grid (16×16 px at full resolution) whose mean is soft tissue
    (-100..150 HU) and that hold no air, lung or bone (every pixel within -500..500 HU: selecting by the
    mean, not by every pixel, keeps very noisy slices measurable). Blocks that straddle fat/muscle/organ
    boundaries have inflated SDs, so the low end of the distribution is used: the 10th percentile of
    block SDs, divided by 0.886 (the 10th percentile of a χ distribution with 63 degrees of freedom)."""
    b = NOISE_BLOCK
    h, w = (sub.shape[0] // b) * b, (sub.shape[1] // b) * b
    ok = _block_all((sub[:h, :w] >= -500.0) & (sub[:h, :w] <= 500.0) & valid[:h, :w], b)
    if np.count_nonzero(ok) < 8:
        return float("nan")
    cand = sub[:h, :w].reshape(h // b, b, w // b, b).swapaxes(1, 2)[ok].reshape(-1, b * b)
    mean = cand.mean(axis=1)
    cand = cand[(mean >= SOFT_HU[0]) & (mean <= SOFT_HU[1])]
    if len(cand) < 8:
        return float("nan")
    return float(np.percentile(cand.std(axis=1), 10) / 0.886)


def _block_all(m: np.ndarray, b: int) -> np.ndarray:
    """(h/b, w/b) booleans: every pixel of the b×b block of ``m`` (h, w multiples of b) is set."""
    h, w = m.shape
    if cv2 is not None:  # block minimum: erode with the block as kernel, anchored at its top-left pixel
        k = np.ones((b, b), np.uint8)
        return cv2.erode(m.view(np.uint8), k, anchor=(0, 0), borderType=cv2.BORDER_CONSTANT, borderValue=0)[::b, ::b] == 1
    return m.reshape(h // b, b, w // b, b).all(axis=(1, 3))


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """k×k box mean (same size, edges replicated)."""
    if cv2 is not None:
        return cv2.blur(a, (k, k), borderType=cv2.BORDER_REPLICATE)
    p = k // 2
    c = np.pad(a, p, mode="edge").astype(np.float64).cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0)))
    h, w = a.shape
    return ((c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)).astype(np.float32)


def _min_max(a: np.ndarray, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum over the kh×kw window around each pixel (odd sizes; edges replicated)."""
    if cv2 is not None:
        kern = np.ones((kh, kw), np.uint8)
        return cv2.erode(a, kern), cv2.dilate(a, kern)
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(np.pad(a, ((kh // 2, kh // 2), (kw // 2, kw // 2)), mode="edge"), (kh, kw))
    return win.min(axis=(-2, -1)), win.max(axis=(-2, -1))


def _median5(a: np.ndarray) -> np.ndarray:
    if cv2 is not None:
        return cv2.medianBlur(a.astype(np.float32), 5)
    from numpy.lib.stride_tricks import sliding_window_view

    return np.median(sliding_window_view(np.pad(a, 2, mode="edge"), (5, 5)), axis=(-2, -1)).astype(np.float32)


def _noise_cal() -> float:
    """Mean |x - median5(x)| of unit white noise: turns the mean residual into σ."""
    if not _NOISE_CAL:
        z = np.random.default_rng(0).normal(0.0, 1.0, (256, 256)).astype(np.float32)
        _NOISE_CAL.append(float(np.mean(np.abs(z - _median5(z))[4:-4, 4:-4])))
    return _NOISE_CAL[0]


def pool_2mm(hu: np.ndarray, rmm: float, cmm: float):
    """The slice area-averaged over f×f blocks (f = the integer nearest 2 mm / pixel) → (pooled, valid, f),
    valid marking blocks without padding; None when the slice is too small. Shared by the noise measure and
    the coarse scale of the ring measure."""
    f = max(1, int(round(2.0 / math.sqrt(rmm * cmm))))
    h, w = (hu.shape[0] // f) * f, (hu.shape[1] // f) * f
    if h < 5 * f or w < 5 * f:
        return None
    valid = hu[:h, :w] > PAD_HU
    everywhere = bool(valid.all())  # no padding (the usual case): nothing to replace, every pooled pixel valid
    img = (hu[:h, :w] if everywhere else np.where(valid, hu[:h, :w], np.float32(-1000.0))).astype(np.float32, copy=False)
    if cv2 is not None:  # exact f×f area means (an integer factor), ~50× faster than the reshape
        pooled = cv2.resize(np.ascontiguousarray(img), (w // f, h // f), interpolation=cv2.INTER_AREA)
    else:
        pooled = img.reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float32)
    pvalid = np.ones(pooled.shape, bool) if everywhere else _block_all(valid, f)
    return pooled, pvalid, f


def noise_2mm(hu: np.ndarray, rmm: float, cmm: float, pooled=None, central: bool = False,
              min_area_mm2: float = NOISE_MIN_AREA_MM2, quantile: float = 0.5) -> float:
    """Median local σ (HU) in the body's soft tissue after area-averaging the slice to ~2 mm pixels.

    Area-averaging to 2 mm makes kernels comparable (their difference is mostly above 0.25 lp/mm). Noise is
    the residual from a 5×5 median (which keeps edges), its local mean absolute value over 7×7 (14 mm)
    windows calibrated to σ on white noise; it is read where the median image is soft tissue (−120…170 HU
    over the window, nothing below −300 or above 400 HU in it) inside the patient, ≥ 10 mm from the skin,
    and the median over those pixels is returned (NaN where they cover under ``min_area_mm2``: 20 cm² in a
    trunk or neck, 5 cm² of brain inside a skull, or under a quarter of the interior). On the 1,500 evaluation slices
    of generator 8 it reads the simulated σ at 2 mm at the body centre with a median ratio of 0.84 (5–95 %:
    0.58–1.99; 0.80 and 0.58–1.32 on slices without another artifact: the residual from a median misses
    the lowest frequencies of correlated CT noise, and metal or ring streaks read as noise); streak noise
    from photon starvation concentrated on a few paths reads low.

    ``central``: the median is taken over the soft tissue within ``NOISE_CENTRAL`` × the body's equivalent
    radius of its centroid (where at least ``NOISE_CENTRAL_MIN_MM2`` of it lies there). Noise in a trunk is
    highest at its centre (the longest paths) and that is where a reader, and a scanner's noise index,
    judge it; in the abdomen and pelvis the median over the whole section reads 0.6 of the centre's σ, in
    the neck and chest 0.8, so a whole-section median ranks slices by body shape as much as by dose. Not
    used inside a skull: the brain is nearly round (little difference) and the posterior fossa's streaks
    lie at its centre.

    ``quantile``: the share of the soft tissue whose local σ is at or under the figure returned (the median by
    default). Inside a skull it is ``NOISE_HEAD_QUANTILE``: noise is everywhere in the brain, while the
    streaks of the skull base (petrous bones, the posterior fossa) cover part of it, and a real head's
    skull-base slices read twice its supratentorial σ at the median."""
    got = pooled if pooled is not None else pool_2mm(hu, rmm, cmm)
    if got is None:
        return float("nan")
    pooled, pvalid, f = got
    med = _median5(pooled)
    resid = np.abs(pooled - med)
    local = _box(resid, 7) / _noise_cal()
    mean7 = _box(med, 7)
    lo, hi = _min_max(med, 7, 7)
    body = (med > BODY_HU) & pvalid
    if cv2 is not None:
        n, lab, st, _ = cv2.connectedComponentsWithStats(body.view(np.uint8), connectivity=8)
        if n < 2:
            return float("nan")
        body = lab == 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))
        inner = cv2.erode(body.view(np.uint8), np.ones((11, 11), np.uint8)).view(bool)
    else:
        inner = _erode_cross(body, 5)
    soft = inner & (mean7 > -120.0) & (mean7 < 170.0) & (lo > -300.0) & (hi < 400.0)
    v = local[soft]
    # too little soft tissue to judge (a phantom's inserts in air, a slice through the skull vertex)
    if v.size * (f * f * rmm * cmm) < min_area_mm2 or v.size < NOISE_MIN_FRACTION * max(1, int(inner.sum())):
        return float("nan")
    if central:
        if cv2 is not None:
            mo = cv2.moments(body.view(np.uint8), binaryImage=True)
            area, cy, cx = mo["m00"], mo["m01"] / max(mo["m00"], 1.0), mo["m10"] / max(mo["m00"], 1.0)
        else:
            ys, xs = np.nonzero(body)
            area, cy, cx = float(ys.size), float(ys.mean()), float(xs.mean())
        yy, xx = np.ogrid[0:body.shape[0], 0:body.shape[1]]
        near = soft & ((yy - cy) ** 2 + (xx - cx) ** 2 <= (NOISE_CENTRAL ** 2) * area / math.pi)
        vn = local[near]
        if vn.size * (f * f * rmm * cmm) >= NOISE_CENTRAL_MIN_MM2:
            v = vn
    return float(np.median(v)) if quantile == 0.5 else float(np.quantile(v, quantile))


RING_ANGLES = 180
RING_MIN_R_PX = 20
RING_FIELD_MARGIN_MM = 12.0  # the ring measure stops this far inside the scan field's edge
RING_NOISE_K = 5.0  # ring contrast is counted above this many robust SDs of the radial profile ...
RING_SE_K = 3.0  # ... and above this many standard errors of each radius's median over the angles
RING_MIN_SHARE = 0.5  # ... over at least this share of the angles, where the neighbourhood is smooth
RING_TOP_RADII = 24  # radii over the profile's floor whose standard errors are costed, the strongest first
RING_FULL_GATE_HU = 0.05  # a second axis candidate is read at full resolution where its 2 mm reading reaches this
RING_BONE_HU = 400.0  # ... and holds no bone
RING_MIN_R_MM = 30.0  # rings are read from this radius (and RING_MIN_R_PX) outwards
RING_SMOOTH_MM = 10.0  # ... over this radial range at 2 mm (5 pixels; 9 at full resolution)
_POLAR_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _polar(hu: np.ndarray, cy: float, cx: float, rad: float) -> np.ndarray:
    """(angles × radius) resampling of the disk of radius ``rad`` around (cy, cx), 1 px per radial step."""
    nr = int(rad)
    if cv2 is not None:
        return cv2.warpPolar(hu.astype(np.float32, copy=False), (nr, RING_ANGLES), (cx, cy), rad,
                             cv2.INTER_LINEAR + cv2.WARP_POLAR_LINEAR)
    h, w = hu.shape
    key = (h, w, round(cy, 1), round(cx, 1), nr)
    idx = _POLAR_CACHE.get(key)
    if idx is None:  # nearest-neighbour sampling without OpenCV
        th = np.arange(RING_ANGLES) * (2 * np.pi / RING_ANGLES)
        r = np.arange(nr) * (rad / nr)
        yy = np.clip(np.rint(cy + np.sin(th)[:, None] * r[None, :]), 0, h - 1).astype(np.intp)
        xx = np.clip(np.rint(cx + np.cos(th)[:, None] * r[None, :]), 0, w - 1).astype(np.intp)
        idx = (yy, xx)
        if len(_POLAR_CACHE) < 8:
            _POLAR_CACHE[key] = idx
    return hu[idx].astype(np.float32)


def isocentre_px(info, shape: tuple[int, int]) -> tuple[float, float] | None:
    """(row, col) of the scanner axis (patient x = y = 0, where scanners put the isocentre) in this slice,
    from ImagePositionPatient / ImageOrientationPatient / PixelSpacing; None when unknown."""
    pos = getattr(info, "position", None)
    ori = getattr(info, "orientation", None)
    ps = getattr(info, "pixel_spacing", None)
    if not pos or not ori or not ps or len(ori) != 6 or not (ps[0] and ps[1]):
        return None
    ipp = np.asarray(pos, float)
    rowcos, colcos = np.asarray(ori[:3], float), np.asarray(ori[3:], float)
    n = np.cross(rowcos, colcos)
    if abs(n[2]) < 0.5:  # not an axial-ish plane
        return None
    t = ipp[2] + (n[0] * ipp[0] + n[1] * ipp[1]) / n[2]  # where the axis (0, 0, t) crosses the slice plane
    d = np.array([0.0, 0.0, t]) - ipp
    col = float(d @ rowcos) / float(ps[1])
    row = float(d @ colcos) / float(ps[0])
    h, w = shape
    return (row, col) if 0 <= row < h and 0 <= col < w else None


def _column_median(vals: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """``np.nanmedian(np.where(ok, vals, nan), axis=0)`` with one sort instead of a masked-array median (7×
    faster, the same values: the middle one, or the mean of the two middle ones; NaN for an empty column)."""
    x = np.where(ok, vals, np.nan).T.copy()  # one row per column, contiguous for the sort
    x.sort(axis=1)  # NaN last
    n = np.count_nonzero(~np.isnan(x), axis=1)
    rows = np.arange(x.shape[0])
    return (x[rows, np.maximum(n - 1, 0) // 2] + x[rows, n // 2 - (n == 0)]) / 2


# the exchanges of a 9-input median network (Paeth; Devillard, "Fast median search", opt_med9): 19 of them
_MED9 = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8), (4, 7), (3, 6),
         (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))


def _radial_median(pol: np.ndarray, k: int = 9) -> np.ndarray:
    """The median over ``k`` = 9 neighbouring radii of each (angle, radius) sample, by a sorting network on
    whole arrays (a tenth of the cost of a sort); ends padded by repetition."""
    if k != 9:
        raise ValueError("the radial median spans 9 radii")
    n = pol.shape[1]
    x = np.pad(np.asarray(pol, np.float32), ((0, 0), (4, 4)), mode="edge")
    p = [np.ascontiguousarray(x[:, i:i + n]) for i in range(9)]
    spare = np.empty_like(p[0])
    for a, b in _MED9:  # exchange: p[a] <- min, p[b] <- max, in place (the old p[a] becomes the spare buffer)
        np.minimum(p[a], p[b], out=spare)
        np.maximum(p[a], p[b], out=p[b])
        p[a], spare = spare, p[a]
    return p[4]


def ring_contrast(hu: np.ndarray, centres=None, max_r_px: float | None = None, smooth_px: int = 9,
                  min_share: float = RING_MIN_SHARE, min_r_px: float = RING_MIN_R_PX, radial: bool = True) -> float:
    """Peak contrast (HU) of a thin ring around a rotation centre: the slice in polar coordinates (180 angles
    × 1 px radial steps), minus its background: with ``radial`` (full resolution) the median of 9
    neighbouring radii (a ring and its ramp-filter side lobes span up to ~6 px, which a 5-px median partly
    follows), else the 5×5 median (at ~2 mm, where a ring is 1–3 px wide); both keep edges. Then for each radius from ``min_r_px`` on the median over the angles where the neighbourhood is
    smooth (the ``smooth_px`` radial range of the median image < 250 HU, no bone: skull, skin and organ
    boundaries are out) — at least ``min_share`` of them; the largest
    |value| out to the disk's edge above its noise floor: the larger of ``RING_SE_K`` standard
    errors of that radius's median (its own residual spread — the median absolute deviation — over √ of its
    independent samples) and
    ``RING_NOISE_K`` robust SDs of the radial profile. A detector channel with a gain error adds the same error along
    its whole circle around the isocentre, so the median over angles keeps it, while anatomy, noise and
    streaks (different at each angle) cancel. ``centres``: (row, col) candidates (default: the image centre;
    the agent adds the isocentre from the header, which an offset displayed field moves off the centre);
    the largest contrast wins. Half circles and short arcs are not seen. ``max_r_px``: radii from this on are
    not read (the scan field's edge, ``RING_FIELD_MARGIN_MM`` inside it: a patient cut by the scan field
    leaves a bright rim there, a circle around the rotation axis like a ring's, and beyond it the image holds
    no measured data)."""
    h, w = hu.shape
    cands = list(centres) if centres else [((h - 1) / 2.0, (w - 1) / 2.0)]
    best = float("nan")
    for cy, cx in cands:
        rad = float(int(min(cy, cx, h - 1 - cy, w - 1 - cx) + 0.5))  # whole pixels: one radial sample per pixel
        if rad < 32:
            continue
        pol = _polar(hu, cy, cx, rad)
        # the background each ring pixel is read against: at full resolution a radial median over smooth_px
        # pixels (a ring with its ramp-filter side lobes spans up to ~6 pixels, which a 5-pixel median partly
        # follows: on a real 1.25 mm chest it kept a third of a 34 HU ring), at 2 mm the 5 × 5 median
        med = _radial_median(pol) if radial else _median5(pol)
        res = pol - med
        lo, hi = _min_max(med, 1, smooth_px)
        span = hi - lo
        # smooth neighbourhoods of air, lung, fat and soft tissue: bone is left out (the skull's tables and
        # diploë are a ring round a head's centre, coherent over every angle)
        ok = (span < 250.0) & (pol > -1090.0) & (hi < RING_BONE_HU)
        good = ok.sum(axis=0) >= min_share * RING_ANGLES
        # near the centre few distinct pixels share the 180 angles, and a round organ or vessel centred there
        # (the aorta, a vertebral body) reads as a ring over all of them
        good[:int(math.ceil(min_r_px))] = False
        good[-6:] = False
        if max_r_px is not None:
            good[max(0, int(max_r_px)):] = False
        if not good.any():
            continue
        cols = np.flatnonzero(good)
        prof = _column_median(res[:, cols], ok[:, cols])
        fin = np.isfinite(prof)
        prof, cols = prof[fin], cols[fin]
        if prof.size >= 16:
            # above the profile's own floor (a radial pattern shared by every radius, e.g. texture) ...
            floor = 1.4826 * float(np.median(np.abs(prof - np.median(prof))))
            over = np.abs(prof) > RING_NOISE_K * floor
            if np.count_nonzero(over) > RING_TOP_RADII:
                # the standard errors below cost a median per radius: only the strongest radii are costed (a
                # ring's radius is among them; a weaker one could only win where its own noise is far lower)
                keep = np.argsort(np.where(over, -np.abs(prof), 0.0))[:RING_TOP_RADII]
                over = np.zeros_like(over)
                over[keep] = True
            v = 0.0
            if over.any():
                # ... and above each radius's own floor: the standard error of its median over the angles,
                # from the residual's spread there (its median absolute deviation from the circle's median ×
                # 1.4826 = σ: neither the ring's own offset nor the lung's vessels inflate it) and the
                # independent samples on that circle (the angles, or its circumference in pixels when
                # shorter). Near the centre a circle holds few distinct pixels, so heavy noise leaves its
                # median tens of HU off. Only radii over the first floor can count, so only they are costed
                c = cols[over]
                okc = ok[:, c]
                n = okc.sum(axis=0)
                sig = 1.4826 * _column_median(np.abs(res[:, c] - prof[over][None, :]), okc)
                n_eff = np.minimum(n, n * 2.0 * math.pi * np.maximum(c, 1).astype(np.float64) / RING_ANGLES)
                se = 1.2533 * sig / np.sqrt(np.maximum(n_eff, 1.0))
                v = max(0.0, float(np.max(np.abs(prof[over]) - np.maximum(RING_SE_K * se, RING_NOISE_K * floor))))
            best = v if not math.isfinite(best) else max(best, v)
    return best


def water_equivalent_diameter(hu: np.ndarray, patient: np.ndarray, px_area_mm2: float) -> float:
    """The patient's water-equivalent diameter Dw (mm; AAPM Report 220): the diameter of the water disk that
    attenuates as the section does, 2·√((mean HU / 1000 + 1)·A / π) over the patient's section A (its
    enclosed lungs and air included, the couch not). Values below air (padding) count as air."""
    n = int(np.count_nonzero(patient))
    if n == 0:
        return float("nan")
    mean = float(np.maximum(hu[patient], -1000.0).mean(dtype=np.float64))
    return 2.0 * math.sqrt(max(0.0, mean / 1000.0 + 1.0) * n * px_area_mm2 / math.pi)


def noise_ratio(sd_2mm: float, info, head: bool, kernel_allowance: bool = True, dw_mm: float = float("nan")) -> float:
    """σ at 2 mm over the artifact level of its region (brain or body), thin slices scaled to 3 mm — in a trunk
    scaled down by the patient's size (``dw_mm``) beyond ``NOISE_SIZE_REF_MM``; a sharp
    (bone, lung, high-resolution) kernel, whose noise is high by design, is judged against
    ``SHARP_NOISE_FACTOR`` times the level (gross noise only) — unless ``kernel_allowance`` is False: the σ
    against the plain level, whatever made it (what confounds the motion cues, see ``fuse``)."""
    if not math.isfinite(sd_2mm):
        return float("nan")
    level = NOISE_2MM_HU["head" if head else "body"]
    if kernel_allowance:
        level *= kernel_noise_factor(str(getattr(info, "convolution_kernel", "") or ""))
    t = getattr(info, "slice_thickness", None)
    thin = math.sqrt(t / NOISE_REF_THICKNESS_MM) if t is not None and math.isfinite(t) and 0 < t < NOISE_REF_THICKNESS_MM else 1.0
    ratio = sd_2mm * thin / level
    if not head:  # a larger patient attenuates more: scanners (and readers) accept the extra noise
        ratio *= size_allowance(dw_mm)
    return ratio


def noise_size_mm(measures: dict) -> float:
    """The patient's size for the noise allowance (mm): the water-equivalent diameter, or the trunk's width
    scaled to it (wide, flat sections — the shoulders — are noisiest at their centre along the long lateral
    paths), whichever is larger; NaN when neither was measured."""
    dw, width = measures.get("water_eq_diameter_mm"), measures.get("trunk_width_mm")
    sizes = [v for v in (dw, None if width is None else width * NOISE_SIZE_REF_MM / NOISE_WIDTH_REF_MM)
             if v is not None and math.isfinite(v)]
    return max(sizes) if sizes else float("nan")


def size_allowance(size_mm: float) -> float:
    """≤ 1: the factor on σ for a patient of ``size_mm`` (``noise_size_mm``) larger than ``NOISE_SIZE_REF_MM``."""
    return NOISE_SIZE_REF_MM / size_mm if math.isfinite(size_mm) and size_mm > NOISE_SIZE_REF_MM else 1.0


def measure(hu: np.ndarray, info) -> dict[str, float]:
    """Classical measures of one axial HU slice (see module docstring). ``info`` is a ``SliceInfo``."""
    nan = float("nan")
    out = {k: nan for k in MEASURES}
    if hu.ndim != 2 or hu.size == 0:
        return out
    rmm, cmm = _pixel_mm(info)
    # metal: full resolution (small dense objects must not fall between subsamples)
    top_hu = hu.max()
    metal_px = hu >= METAL_HU if top_hu >= METAL_HU else None
    n_metal = 0 if metal_px is None else int(np.count_nonzero(metal_px))
    out["metal_area_mm2"] = n_metal * rmm * cmm
    out["metal_max_hu"] = float(top_hu) if n_metal else float(min(top_hu, METAL_HU))
    metal = _metal_objects(metal_px, rmm, cmm) if n_metal and top_hu >= METAL_MIN_HU else []

    step = 2 if min(hu.shape) >= 256 else 1
    sub = np.ascontiguousarray(hu[::step, ::step], dtype=np.float32)
    px_area = rmm * cmm * step * step
    h, w = sub.shape
    band = max(2, int(round(min(h, w) * 0.012)))
    edge_g, inside_circle, central = _edge_geometry(h, w, band)
    pad = sub < PAD_HU
    valid = ~pad
    body, trunk, beside = _patient_mask((sub > BODY_HU) & valid, central)
    # Field edges. Truncation artifacts come from anything outside the *scan* field (SFOV:
    # DataCollectionDiameter, or padding / constant fill well inside the displayed circle), so the whole
    # patient (arms, and the slivers of them that the field cuts) counts there. A displayed field smaller
    # than the scan field only crops the picture (the data are all there: no artifact), so contact with it
    # is not truncation evidence. Without DataCollectionDiameter (Philips writes none) the scan field is
    # taken to be the 500 mm that CT scanners have: the displayed circle is the scan field only when it is
    # about that wide, and a smaller displayed field that cuts the body is a crop.
    scan_edge = np.zeros_like(edge_g)
    display_edge = edge_g
    dcd = getattr(info, "data_collection_diameter", None)
    pix = step * math.sqrt(rmm * cmm)  # mm per subsampled pixel
    display_d_mm = min(h, w) * pix
    if dcd and dcd > 0:
        r_px = dcd / 2.0 / pix
        if r_px < min(h, w) / 2.0 - band:
            scan_edge = _ring(h, w, r_px, band)
        elif dcd <= display_d_mm * 1.03:
            scan_edge = edge_g  # the displayed circle is the scan field
    elif display_d_mm >= 0.96 * SCAN_FIELD_MM:
        scan_edge = edge_g
    field_edge_px = None  # the scan field's edge where the image shows it (padding or fill inside the circle)
    if pad.any():
        inner = pad & inside_circle & ~edge_g
        outer = pad
        if inner.any() and (_radius(h, w)[0][inner] < min(h, w) / 2.0 - 3 * band).any():
            # padding deep inside the displayed circle: a small scan field, or streaks below the padding
            # level (near the rim it is an offset scan field's edge, and the costlier test is not needed)
            outer = _border_connected(pad)
        near_pad = outer.copy()
        near_pad[band:, :] |= outer[:-band, :]
        near_pad[:-band, :] |= outer[band:, :]
        near_pad[:, band:] |= outer[:, :-band]
        near_pad[:, :-band] |= outer[:, band:]
        deep = outer & inside_circle & ~edge_g
        if deep.any():
            scan_edge = scan_edge | near_pad
            field_edge_px = float(_radius(h, w)[0][deep].min())
        else:
            display_edge = display_edge | near_pad
    else:
        r_fill = _constant_fill_radius(sub, band)
        if r_fill is not None:  # a scan field filled with constant air inside the displayed circle
            scan_edge = scan_edge | _ring(h, w, r_fill, band)
            field_edge_px = float(r_fill)
    # the displayed rim: how much of it the trunk covers (a crop, for the centring check), and whether the
    # field lies inside the trunk nearly all round (a targeted reconstruction: spine, heart, a joint)
    n_edge = int(np.count_nonzero(display_edge & valid))
    if n_edge:
        out["display_touch"] = float(np.count_nonzero(display_edge & valid & trunk)) / n_edge
        out["field_inside_body"] = float(out["display_touch"] >= TARGETED_RIM)
    n_edge = int(np.count_nonzero(scan_edge & valid))
    out["body_touches_fov"] = float(np.count_nonzero(scan_edge & valid & beside)) / n_edge if n_edge else 0.0

    body_cc = body
    n_body = int(np.count_nonzero(body_cc))
    out["body_area_mm2"] = n_body * px_area
    if n_body >= 50:
        core = trunk if trunk.any() else body_cc  # centre and lateral thirds: the trunk, not the arms
        rows_n, cols_n = np.count_nonzero(core, axis=1), np.count_nonzero(core, axis=0)
        cy, cx = _median_index(rows_n) * step, _median_index(cols_n) * step
        dx_px = cx - (hu.shape[1] - 1) / 2.0
        dy_px = cy - (hu.shape[0] - 1) / 2.0
        ox, oy = dx_px * cmm, dy_px * rmm
        # relative to the reconstruction centre: scanners centre the displayed field on the isocentre unless
        # the technologist offsets it; patient-coordinate origins differ between vendors, so they are not used
        out["body_center_offset_x_mm"] = float(ox)
        out["body_center_offset_y_mm"] = float(oy)
        holes = _holes(body_cc)
        lung_hu = (sub > LUNG_HU[0]) & (sub < LUNG_HU[1])
        lung = holes & lung_hu
        touch = out["display_touch"]
        if cv2 is not None and math.isfinite(touch) and touch >= LUNG_OPEN_TOUCH:
            # a displayed field that cuts the chest wall opens the lungs to its edge: they are no longer holes
            # in the body. Inside the trunk's convex hull, shrunk by LUNG_HULL_MARGIN_MM (the skin's partial
            # volume), lung-density pixels are lung all the same
            lung = lung | (_trunk_hull(trunk if trunk.any() else body_cc, LUNG_HULL_MARGIN_MM / pix) & lung_hu & valid)
        out["lung_area_mm2"] = float(np.count_nonzero(lung)) * px_area
        bone = body_cc & (sub >= BONE_HU)
        out["bone_area_mm2"] = float(np.count_nonzero(bone)) * px_area
        out["water_eq_diameter_mm"] = water_equivalent_diameter(sub, body_cc | holes, px_area)
        # skull ring: dense bone enclosing soft tissue (brain) — fraction of angular sectors around the
        # body centre that contain skull-density bone
        dense = body_cc & (sub >= SKULL_HU)
        out["skull_ring"] = _sector_share(dense, cy / step, cx / step)
        # bone in the lateral thirds of the body (iliac wings are broad; ribs are thin)
        x0, x1 = np.flatnonzero(cols_n)[[0, -1]]
        third = (x1 - x0) / 3.0
        if third > 0:
            lat = np.zeros_like(bone)
            lat[:, : int(x0 + third)] = True
            lat[:, int(x1 - third) + 1:] = True
            # trunk bone only: the humeri and forearms of arms held down lie in (or beyond) those thirds
            # on every slice and would hide the lumbar gap above the iliac wings
            own = bone & trunk if trunk.any() else bone
            out["lateral_bone_mm2"] = float(np.count_nonzero(own & lat)) * px_area
            out["anterior_bone_mm2"] = _anterior_midline_bone(own, core, x0, x1, info) * px_area
        out["noise_sd"] = _robust_noise(sub, valid & inside_circle)
        pooled = pool_2mm(hu, rmm, cmm)
        # brain scale inside a skull: skull-density bone all round a head-sized section, under the scalp
        head = (out["skull_ring"] >= SKULL_SECTORS and out["body_area_mm2"] < 45000.0
                and _skull_under_scalp(dense, body_cc | holes, cy / step, cx / step, pix))
        # the trunk's centre is where its noise is read, unless the displayed field cuts the trunk along much of
        # its rim: its centre is not in the picture then (a real chest shown in a 280 mm field read 93 HU on the
        # mediastinum's edges there against 14 HU uncut), and the whole section's median is read
        cut = math.isfinite(out["display_touch"]) and out["display_touch"] >= AIR_CUT_TOUCH
        out["noise_sd_2mm"] = (noise_2mm(hu, rmm, cmm, pooled, central=not head and not cut,
                                         min_area_mm2=NOISE_MIN_AREA_HEAD_MM2 if head else NOISE_MIN_AREA_MM2,
                                         quantile=NOISE_HEAD_QUANTILE if head else 0.5)
                               if pooled is not None else nan)
        out["trunk_width_mm"] = float((x1 - x0 + 1) * step * cmm)
        size = noise_size_mm(out)
        out["noise_ratio"] = noise_ratio(out["noise_sd_2mm"], info, head, dw_mm=size)
        out["noise_ratio_plain"] = noise_ratio(out["noise_sd_2mm"], info, head, kernel_allowance=False, dw_mm=size)
        centre = ((hu.shape[0] - 1) / 2.0, (hu.shape[1] - 1) / 2.0)
        iso = isocentre_px(info, hu.shape)
        far = iso is not None and math.hypot(iso[0] - centre[0], iso[1] - centre[1]) >= 2.0
        centres = [centre, iso] if far else [centre]
        field_r = (dcd if dcd and dcd > 0 else SCAN_FIELD_MM) / 2.0 - RING_FIELD_MARGIN_MM  # mm from the axis
        if field_edge_px is not None:  # a scan field the image shows (padding or fill inside the circle): its edge
            field_r = min(field_r, field_edge_px * pix - RING_FIELD_MARGIN_MM)
        px_mm = math.sqrt(rmm * cmm)
        # both candidates for the rotation axis are read: the header's isocentre assumes the scanner puts the
        # axis at patient x = y = 0, which not every vendor's coordinates do, and the image centre is where an
        # unoffset displayed field has it. First at ~2 mm pixels (~0.5 ms a centre): a ring several display
        # pixels wide (a failing detector module, a fine display grid) shows there best
        min_r = max(RING_MIN_R_PX, RING_MIN_R_MM / px_mm)
        coarse = {}
        if pooled is not None and pooled[2] >= 2:
            f = pooled[2]
            smooth = max(3, int(round(RING_SMOOTH_MM / (px_mm * f))) | 1)
            for c in centres:
                coarse[c] = ring_contrast(pooled[0], [((c[0] + 0.5) / f - 0.5, (c[1] + 0.5) / f - 0.5)],
                                          field_r / (px_mm * f), smooth_px=smooth, radial=False)
        # then at full resolution (~1-2 ms a centre): around the axis the header gives (or the image centre),
        # and around the other candidate where the 2 mm scale saw anything there at all
        full = [c for c in centres if c is centres[-1] or not (coarse.get(c, 1.0) < RING_FULL_GATE_HU)]
        ring = ring_contrast(hu, full, field_r / px_mm, min_r_px=min_r)
        for v in coarse.values():
            ring = float(np.fmax(ring, v))  # the larger scale; NaN only where both are
        out["ring_contrast_hu"] = ring
        touch = out["display_touch"]
        if math.isfinite(touch) and touch >= AIR_CUT_TOUCH:
            # a displayed field that cuts the trunk along much of its rim leaves no air round the patient, only
            # slivers and the gap over the couch, whose pads and foam read as dark streaks (a real chest shown in
            # a 260 mm field: 4-5 HU on clean slices, a false motion finding on 129 of 141): not judged
            out["air_dark_hu"] = nan
        elif pooled is not None:  # motion evidence: dark streaks in the free air around the patient
            f = pooled[2]
            p2 = f * px_mm  # mm per pooled pixel
            scan = None
            if dcd and dcd > 0 and iso is not None:
                scan = ((iso[0] + 0.5) / f - 0.5, (iso[1] + 0.5) / f - 0.5, dcd / 2.0 / p2)
            out["air_dark_hu"] = airstreaks.air_dark_hu(pooled[0], pooled[1], p2, scan,
                                                        [((cy + 0.5) / f - 0.5, (cx + 0.5) / f - 0.5) for cy, cx in metal])
    else:
        out["lung_area_mm2"] = 0.0
        out["bone_area_mm2"] = 0.0
        out["skull_ring"] = 0.0
    return out


# --------------------------------------------------------------------------------------------------------
# fusion

METAL_AREA_MM2 = (5.0, 40.0)  # classical metal evidence ramps from 0.5 to 0.95 over this area at >= 2500 HU
METAL_MIN_HU = 3000.0  # the densest bone and enamel rarely exceed this; metal saturates far above it
METAL_SUBLEVEL = 0.1  # the most metal evidence a slice whose densest pixel stays under METAL_MIN_HU gets
TRUNC_EDGE = (0.06, 0.25)  # fraction of the scan field's edge covered by the patient: evidence ramps from 0.5 to 0.95
CLASSICAL_THRESHOLD = 0.5  # the checks' threshold for a class the bundle's network does not score
MOTION_NETWORK_WEIGHT = 0.4  # the network's share of the fused motion score, the air evidence's the rest
MOTION_EXPLAINED = 0.7  # motion score factor on a slice whose noise or ring evidence is over the threshold
MOTION_NOISE_FROM = 0.1  # ... and from 1 down to it as the noise evidence rises from this (half the level) to it
NOISE_EXPLAINED = 0.5  # classical noise evidence factor on a slice whose ring evidence, or metal area, is over its level
# Dense material (>= METAL_HU) over this area streaks the trunk's centre, where noise is read: σ there is partly
# its streaks. A smaller object (an ECG electrode or lead, a clip: under ~8 mm across) starves only the few
# rays through it, thin lines that the median of local σ passes over: real slices with 5-46 mm² of it read σ at
# their dose's level (11-32 HU at 2 mm), while injected objects of 270 mm² and more raised it by up to 40 HU.
NOISE_METAL_AREA_MM2 = 50.0
CLASSICAL_CLASSES = ("metal", "truncation", "noise", "ring")  # classes with classical evidence (classical_probs)
RING_HU = (4.0, 15.0)  # ring contrast above its noise floors: evidence ramps from 0.5 to 0.95


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 below lo/2; 0.5 at lo; 0.95 at hi; capped at 0.95 (classical evidence is never certainty)."""
    if x is None or not math.isfinite(x) or x < lo * 0.5:
        return 0.0
    if x < lo:
        return 0.5 * (x - lo * 0.5) / (lo * 0.5)
    if x >= hi:
        return 0.95
    return 0.5 + 0.45 * (x - lo) / (hi - lo)


def classical_probs(measures: dict[str, float]) -> dict[str, float]:
    """Per-class probabilities from classical evidence alone (only for classes physics can see)."""
    m = measures or {}
    out: dict[str, float] = {}
    if math.isfinite(m.get("metal_area_mm2", float("nan"))):
        p = _ramp(m["metal_area_mm2"], *METAL_AREA_MM2)
        if m.get("metal_max_hu", 0.0) < METAL_MIN_HU:
            # bone, enamel, contrast — or metal whose densest pixel partial volume or a store that saturates
            # below 3,000 HU kept under the level (the ends of a real hip implant): never a metal flag (the
            # bundle's metal threshold is 0.14), but more dense area ranks higher than none
            p *= METAL_SUBLEVEL / 0.95
        out["metal"] = p
    if math.isfinite(m.get("body_touches_fov", float("nan"))):
        out["truncation"] = _ramp(m["body_touches_fov"], *TRUNC_EDGE)
    if math.isfinite(m.get("ring_contrast_hu", float("nan"))):
        # from 0 (not from half the level, as the other ramps): the contrast is already above its noise
        # floors, so any reading ranks slices (the clean real head phantom reads 0.0–0.1 HU)
        x = max(0.0, m["ring_contrast_hu"])
        out["ring"] = 0.5 * x / RING_HU[0] if x < RING_HU[0] else _ramp(x, *RING_HU)
    if math.isfinite(m.get("noise_ratio", float("nan"))):
        out["noise"] = noise_evidence(m["noise_ratio"])
    return out


def noise_evidence(ratio: float) -> float:
    """0..0.95 noise evidence from a ``noise_ratio``. Below the artifact level the score keeps rising with σ
    instead of sitting at 0 (a slice at 0.4 of the level reads noisier than one at 0.2): 0 → 0.1 up to half
    the level, 0.1 → 0.5 from there to the level, where the flag starts (the checks' threshold) — the
    console's amber "near threshold" mark (half the threshold) still needs about 0.7 of the level."""
    r = max(0.0, ratio)
    return 0.2 * r if r < 0.5 else 0.1 + 0.8 * (r - 0.5) if r < 1.0 else _ramp(r, 1.0, NOISE_RATIO_HI)


def fuse(net_probs: dict[str, float], measures: dict[str, float]) -> dict[str, float]:
    """Final per-class probability.

    * metal, truncation: ``max(network, classical)`` — both are direct physical signals (dense pixels,
      tissue on the FOV edge) that a network trained on synthetic data must not be able to overrule;
    * noise: ``1 - (1 - net) * (1 - classical)`` (noisy-OR: either source can raise it, agreement raises
      it further) — σ alone cannot tell a sharp kernel from a low dose, so classical evidence ramps late;
    * ring: ``max(network, classical)`` — a thin ring centred on the reconstruction centre is physics too;
    * motion: ``MOTION_NETWORK_WEIGHT`` (0.4) × the network + 0.6 × the dark-streak evidence in the free air
      around the patient (``medqc.airstreaks``); where no air can be measured (a body filling the field, a
      targeted reconstruction, lung in the band) the air's evidence is unknown and
      ``airstreaks.UNJUDGED_EVIDENCE`` (0.4) stands in for it, so that the network must read about 0.85 to
      reach its threshold alone there (standing alone, it raises false motion flags on such slices). The
      network weighs less than the air: it is the weaker cue (AUROC 0.77-0.84 alone against 0.98-0.99 for
      the air where judged) and the one that misreads real clean anatomy as motion (0.3-0.8 on real patient
      slices); over the real clean air we have (evidence <= 0.38) it must read 0.88 to flag. Air streaks at
      full evidence (>= 5.9 HU; real clean CT here reads <= 2.6) flag on their own. The weights 0.4 /
      0.6 rank the evaluation slices better than the plain mean (by 0.003-0.006 of AUROC on seeds 31337
      and 777); 0.3-0.35 for the network rank them alike.
    On a slice whose classical noise or ring evidence is over the threshold, the motion score is scaled by
    ``MOTION_EXPLAINED`` (0.7): both motion cues are confounded by them (the network reads heavy noise and
    rings as motion, the air measure reads noisy air and a ring's arcs in the air as dark streaks; on the
    evaluation slices these were most of the top-scoring slices without motion), and the finding there is
    the noise or the ring; motion still qualifies when the unscaled score reaches about 0.83. Noise confounds
    them before it reaches its own threshold, so from ``MOTION_NOISE_FROM`` (noise evidence 0.1: σ at half
    the level) the factor ramps from 1 down to 0.7 at the threshold (:func:`motion_explained`); and the
    noise evidence used here is the one before the metal's share is taken out — metal streaks that read as
    noise-level σ confound both cues all the same (the noise check itself still stays quiet there) — and
    without the sharp kernels' allowance (``noise_ratio_plain``): a lung or bone kernel's σ is no artifact
    for the noise check, but it confounds the motion cues as any σ does. With the metal streaks left out of
    the air measure (``airstreaks``, step 6) the fused motion score reaches a specificity of 0.99 at the
    threshold on the evaluation slices (``bench/results/slice-eval.md``).
    Likewise the classical noise evidence is scaled by ``NOISE_EXPLAINED`` (0.5, below the threshold
    whatever σ reads) where the metal or ring detector is over its threshold: metal streaks and a ring's
    circles raise the measured σ (47–98 HU on synthetic slices with metal at a routine dose), and the
    finding there is the metal or the ring; the series' other slices still judge its noise. On the
    evaluation slices this keeps metal and ring slices without noise from being flagged for noise, at the
    cost of a few noisy slices that also carry metal or a ring.
    Metal needs metal-density pixels: a measured slice whose densest pixel stays below ``METAL_MIN_HU``
    (3,000 HU; enamel and dense cortical bone stay below it, implants reconstruct far above it and saturate
    at the top of the CT number range) cannot show a metal artifact, so there the network's metal score is
    dropped too: metal is 0 on such a slice.
    Missing network classes take the classical value; missing measures leave the network value.
    """
    out = {k: float(v) for k, v in (net_probs or {}).items()}
    m = measures or {}
    cls = classical_probs(m)
    # what confounds the motion cues: σ as it is (a sharp kernel's too), before the metal's or ring's share is
    # taken out (streaks all the same)
    plain = m.get("noise_ratio_plain", float("nan"))
    noisy = noise_evidence(plain) if plain is not None and math.isfinite(plain) else cls.get("noise", 0.0)
    if "noise" in cls and (cls.get("ring", 0.0) >= CLASSICAL_THRESHOLD or dense_streaks(m)):
        cls["noise"] *= NOISE_EXPLAINED  # the σ measured there is the metal's streaks or the ring's circles
    n = out.get("motion")
    if n is not None and math.isfinite(n):
        if "air_dark_hu" in m:  # measured: streaked or flat air, or none to judge (a neutral value then)
            air = airstreaks.evidence(m["air_dark_hu"])
            w = MOTION_NETWORK_WEIGHT
            n = w * n + (1.0 - w) * (air if math.isfinite(air) else airstreaks.UNJUDGED_EVIDENCE)
        n *= motion_explained(noisy, max(cls.get("ring", 0.0), cls.get("truncation", 0.0)))
        out["motion"] = n
    for k, p in cls.items():
        n = out.get(k)
        if n is None or not math.isfinite(n):
            out[k] = p
        elif k == "noise":
            out[k] = 1.0 - (1.0 - n) * (1.0 - p)
        elif k == "metal" and no_metal_density(m):
            out[k] = p
        else:
            out[k] = max(n, p)
    return out


def dense_streaks(measures: dict[str, float]) -> bool:
    """The slice holds enough very dense material (>= ``METAL_HU``, 2,500 HU, over ``NOISE_METAL_AREA_MM2``) to
    streak the trunk's centre — metal, also short of the metal check's ``METAL_MIN_HU`` (dental work in a store
    that saturates below it) — so that the σ measured there is partly streaks, not the dose."""
    a = (measures or {}).get("metal_area_mm2", float("nan"))
    return a is not None and math.isfinite(a) and a >= NOISE_METAL_AREA_MM2


def motion_explained(noise: float, ring: float) -> float:
    """The factor on the motion score of a slice with this much classical noise and ring (or truncation)
    evidence (see ``fuse``): ``MOTION_EXPLAINED`` from the threshold on, and for noise from
    ``MOTION_NOISE_FROM`` (half the noise level) a ramp from 1 down to it. A patient outside the scan field
    streaks the slice from the cut edge as a ring does with its circles: the finding there is the truncation."""
    if max(noise, ring) >= CLASSICAL_THRESHOLD:
        return MOTION_EXPLAINED
    if noise > MOTION_NOISE_FROM:
        return 1.0 - (1.0 - MOTION_EXPLAINED) * (noise - MOTION_NOISE_FROM) / (CLASSICAL_THRESHOLD - MOTION_NOISE_FROM)
    return 1.0


def no_metal_density(measures: dict[str, float]) -> bool:
    """True when the slice was measured and holds no pixel at metal density (>= METAL_MIN_HU)."""
    hu = (measures or {}).get("metal_max_hu", float("nan"))
    return hu is not None and math.isfinite(hu) and hu < METAL_MIN_HU
