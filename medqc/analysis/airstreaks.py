"""Dark streaks in the free air around the patient: classical evidence of patient motion.

Physics. Filtered back-projection of inconsistent projections (a skin/air or bone edge that moved during
the rotation) leaves streaks tangent to the moving edge that run beyond the body into the air around the
patient, with both signs. In a consistent slice that air is flat: about -1000 HU plus fine noise. Nothing
in a scanner room is *darker* than air, while foam pads, blankets, head holders and clothes are brighter,
so only the dark side is counted: air that reads below its own level after low-pass filtering is
reconstruction inconsistency (motion; also metal streaks, and heavy noise to a lesser degree).

Steps, on the slice area-averaged to ~4 mm pixels (from ``noise.pool_2mm``'s ~2 mm slice; the streaks
are wide and the band is 8-40 mm, and at 4 mm it costs ~1 ms), every length in mm so any matrix, pixel
spacing or field of view reads alike:

1. field: valid pixels (no vendor padding) inside the inscribed circle, minus constant-fill regions that
   reach its rim (a vendor's -1024 outside the circle) and, when the header gives the scan field
   (DataCollectionDiameter around the isocentre), everything beyond it; shrunk by ``EDGE_MM``;
2. the slice smoothed with a Gaussian of ``SIGMA_MM``; the patient is the > -400 HU object with most
   pixels in the central disk (after a ``OPEN_MM`` opening that breaks thin contacts) plus large objects
   beside it, holes filled, plus anything faintly denser than air (> -850 HU) touching it;
3. other objects (couch, head holders, frames: > -850 HU, >= 30 mm², not the patient) are left out with
   an ``OTHER_MM`` margin, and so is the air between them and the patient (the convex hull of both minus
   the patient's own hull); a long flat object also loses its whole row (or column) strip, whose edges
   streak along it;
4. the band: free air ``BAND_MM[0]``..``BAND_MM[1]`` from the patient; its level is the median of band
   pixels within 30 HU of -1000, leaving out pixels at the storage floor: where a vendor clips stored values
   (at -1024 HU, ``FLOOR_HU``), a 4 mm pixel sits exactly on the floor only where a wide dark streak took
   the whole of it below; in a heavily streaked slice those were most of the near-air pixels and put the
   level on the floor itself, so the measure read 0 (10-20 % of the band on the floor in slices moved
   6-10 mm, 0-1 % without motion). A band with hardly any pixel near air (``MIN_AIR_PX``) takes its
   median as the level (air streaked both ways all over), unless that median reads above ``NOT_AIR_HU``
   (-950): then the band is no free air but lung, opened to the edge by a display field that cuts the
   chest wall, or tissue inside a targeted field, whose texture read as 2-10 HU of dark streaks on clean
   slices; it is not judged;
5. the measure: the band's mean of max(0, level - smoothed slice), in HU. NaN (not judged) when the band is
   under ``MIN_BAND_MM2`` (a body filling the field, a targeted reconstruction, truncation);
6. metal: where the slice holds metal objects (``measures`` passes their centroids), darkness that is the
   metal's counts as none: band pixels whose local structure (structure tensor over ``METAL_TENSOR_MM``,
   coherence >= ``METAL_COHERENCE``) is a line pointing at a metal object within ``METAL_ALIGN_DEG`` (metal
   streaks are straight lines through the metal; motion streaks run tangent to the moving skin and bone),
   and any band pixel within ``METAL_NEAR_MM`` of one (the shading beside it). Metal streaks reach the air
   (dental fillings, an implant or a clip near the skin): counted, they read a 90th percentile of 4.5-5.7 HU
   (max 18-30) on the evaluation slices with metal but no motion, and make most of the top-scoring slices
   without motion; with this step those slices read 1.7-1.9 HU (max 9-10), as slices without metal do.

Constants were chosen on synthetic slices of seed 777 and checked on seed 31337 and on real clean CT
(docs/checks.md has the figures). On real scans it reads a little higher than on clean synthetic ones
(up to 2.6 HU on a real head phantom in its holder against a 95th percentile of ~0.7 HU synthetic), and
vendors that clip stored values at -1024 HU cap the dark side at about 24 HU below air.
"""

from __future__ import annotations

import math

import numpy as np

from medqc.analysis.image import _block_all, _radius

try:
    import cv2
except ImportError:  # pragma: no cover - exercised by the module-hider test
    cv2 = None

GRID_MM = 4.0  # working pixel size (at most; a slice already coarser is used as it is)
SIGMA_MM = 2.5
OPEN_MM = 3.0
EDGE_MM = 8.0
OTHER_MM = 15.0
TOUCH_MM = 4.0
BAND_MM = (8.0, 40.0)
MIN_BAND_MM2 = 500.0
PATIENT_HU = -400.0
OBJECT_HU = -850.0
MIN_OBJECT_MM2 = 30.0
MIN_AIR_PX = 50  # band pixels near air (within 30 HU of -1000, off the floor) needed to read the air's level
NOT_AIR_HU = -950.0  # a band without them whose median reads above this is not free air: not judged
FLOOR_HU = (-1035.0, -1010.0)  # a band minimum in this range is taken as a storage floor (vendors clip at -1024)
# evidence: 0 at the clean synthetic 95th percentile (seed 777); 1 at 5 HU, between the median of motion injected
# into real patient CT (4.4 HU: vendors clip stored air at -1024 HU, which caps the dark side) and that of
# synthetic motion (5.9 HU, seed 777). Lower, the clean real air (0.5-2.3 HU at the median per scanner; up to 4.2
# at a real head's vertex, whose hair and pads streak it) would need still less of the network to flag
EVIDENCE_HU = (0.67, 5.0)
METAL_ALIGN_DEG = 20.0  # a dark streak within this angle of the line to a metal object is the metal's
METAL_COHERENCE = 0.2  # ... where the local structure is that oriented (structure-tensor coherence)
METAL_TENSOR_MM = 4.0  # the structure tensor's integration scale
METAL_NEAR_MM = 60.0  # and any darkness this close to a metal object (the shading beside it)


def _disk(r_px: float) -> np.ndarray:
    r = max(1, int(round(r_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _outline(m: np.ndarray) -> np.ndarray | None:
    """(N, 2) int32 points of the outer contours of a uint8 mask (its convex hull is the mask's), or None."""
    contours, _ = cv2.findContours(np.ascontiguousarray(m), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    return np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.int32)


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """``m`` with everything not reachable from the image border through ``~m`` added."""
    h, w = m.shape
    bg = np.ones((h + 2, w + 2), np.uint8)
    bg[1:-1, 1:-1] = ~m
    cv2.floodFill(bg, np.zeros((h + 4, w + 4), np.uint8), (0, 0), 2)
    return bg[1:-1, 1:-1] != 2


def metal_aligned(smooth: np.ndarray, band: np.ndarray, metal, p: float) -> np.ndarray:
    """Band pixels whose local structure is a line pointing at one of the ``metal`` objects ((row, col) in
    pixels of ``smooth``): metal streaks are straight lines through the metal, so their darkness there is the
    metal's, not motion's (motion streaks run tangent to the moving skin and bone edges)."""
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    s = METAL_TENSOR_MM / p
    jxx = cv2.GaussianBlur(gx * gx, (0, 0), s)[band]
    jyy = cv2.GaussianBlur(gy * gy, (0, 0), s)[band]
    jxy = cv2.GaussianBlur(gx * gy, (0, 0), s)[band]
    coh = np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy ** 2) / np.maximum(jxx + jyy, 1e-6)
    theta = 0.5 * np.arctan2(2.0 * jxy, jxx - jyy)  # the gradient's direction; the line runs across it
    ys, xs = np.nonzero(band)
    tol = math.sin(math.radians(METAL_ALIGN_DEG))
    out = np.zeros(ys.shape, bool)
    near = np.zeros(ys.shape, bool)
    for cy, cx in metal:
        phi = np.arctan2(ys - cy, xs - cx)  # the line from the metal to the pixel
        out |= np.abs(np.cos(theta - phi)) < tol  # gradient across that line: a streak along it
        near |= np.hypot(ys - cy, xs - cx) * p <= METAL_NEAR_MM
    return (out & (coh >= METAL_COHERENCE)) | near


def air_dark_hu(img: np.ndarray, valid: np.ndarray, p: float, scan_field=None, metal=None) -> float:
    """The measure (HU; NaN when not judged) on a pooled slice ``img`` (HU, padding already air), ``valid``
    marking pixels that are not padding, ``p`` mm per pixel. ``scan_field``: (row, col, radius) in pixels of
    the scan field when the header gives it, else None. ``metal``: (row, col) in pixels of the metal objects
    in the slice; dark streaks in the band that point at one of them count as none (step 6)."""
    if cv2 is None or img.ndim != 2 or min(img.shape) < 16 or not (p > 0):
        return float("nan")

    img = np.ascontiguousarray(img, dtype=np.float32)
    f = int(round(GRID_MM / p))
    if f >= 2:  # area-average to the working grid (streaks are wide; the band is 8-40 mm)
        hh, ww = (img.shape[0] // f) * f, (img.shape[1] // f) * f
        img = cv2.resize(img[:hh, :ww], (ww // f, hh // f), interpolation=cv2.INTER_AREA)
        valid = _block_all(valid[:hh, :ww], f)
        if scan_field is not None:
            cy, cx, rad = scan_field
            scan_field = ((cy + 0.5) / f - 0.5, (cx + 0.5) / f - 0.5, rad / f)
        if metal:
            metal = [((cy + 0.5) / f - 0.5, (cx + 0.5) / f - 0.5) for cy, cx in metal]
        p *= f
    h, w = img.shape
    smooth = cv2.GaussianBlur(img, (0, 0), SIGMA_MM / p)
    yy, xx = np.ogrid[0:h, 0:w]
    r = _radius(h, w)[0]
    half = min(h, w) / 2.0
    field = valid & (r <= half)
    k3 = np.ones((3, 3), np.uint8)
    const = (cv2.erode(img, k3) == cv2.dilate(img, k3)).view(np.uint8)
    if const.any():  # constant fill reaching the rim (a vendor's -1024 outside the circle) is not air
        nc, labc = cv2.connectedComponents(const, connectivity=8)
        rim = (r >= half - 3) | (yy == 0) | (yy == h - 1) | (xx == 0) | (xx == w - 1)
        hit = np.bincount(labc[rim & (const == 1)], minlength=nc) > 0
        hit[0] = False
        field &= ~hit[labc]
    if scan_field is not None:  # beyond the scan field the image holds no measured data
        cy, cx, rad = scan_field
        field &= np.hypot(yy - cy, xx - cx) <= rad
    field_in = cv2.erode(field.view(np.uint8), _disk(EDGE_MM / p)).view(bool)
    if not field_in.any():
        return float("nan")

    dense = ((smooth > PATIENT_HU) & valid).view(np.uint8)
    opened = cv2.morphologyEx(dense, cv2.MORPH_OPEN, _disk(OPEN_MM / p))
    n, lab, st, cen = cv2.connectedComponentsWithStats(opened, connectivity=8)
    if n < 2:
        return float("nan")
    inc = np.bincount(lab[r <= half * 0.5], minlength=n)
    inc[0] = 0
    main = int(np.argmax(inc)) if inc.max() > 0 else 1 + int(np.argmax(st[1:, cv2.CC_STAT_AREA]))
    top = st[main, cv2.CC_STAT_TOP]
    bottom = top + st[main, cv2.CC_STAT_HEIGHT]
    keep = np.zeros(n, bool)
    keep[main] = True
    for k in range(1, n):  # large objects beside the main one (arms, legs)
        if k != main and st[k, cv2.CC_STAT_AREA] >= 0.05 * st[main, cv2.CC_STAT_AREA] and top <= cen[k][1] <= bottom:
            keep[k] = True
    core = _fill_holes(keep[lab])

    obj = (smooth > OBJECT_HU) & valid & field
    near = cv2.dilate(core.view(np.uint8), _disk(TOUCH_MM / p)).view(bool)
    n2, lab2, st2, _ = cv2.connectedComponentsWithStats(obj.view(np.uint8), connectivity=8)
    touch = np.bincount(lab2[near & obj], minlength=n2) > 0
    touch[0] = False
    patient = _fill_holes(core | touch[lab2])  # with what touches it (blankets, clothes)
    other = obj & ~patient
    excl = cv2.dilate(other.view(np.uint8), _disk(OTHER_MM / p)).view(bool)
    pts_p = _outline(patient.view(np.uint8))
    if pts_p is None:
        return float("nan")
    pts_p = cv2.convexHull(pts_p).reshape(-1, 2)  # the hull of the patient with any object follows from these
    hull_p = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(hull_p, pts_p, 1)
    margin = OTHER_MM / p
    area = st2[:, cv2.CC_STAT_AREA].astype(np.float64)
    area[0] = 0
    area[touch] = 0
    for k in np.argsort(-area)[:30]:
        if area[k] * p * p < MIN_OBJECT_MM2:
            break
        # the air between the patient and another object (under the body, inside a head holder) is not free
        x0, y0, ww, hh = (int(v) for v in st2[k, :4])
        pts = _outline((lab2[y0:y0 + hh, x0:x0 + ww] == k).view(np.uint8)) + np.array([x0, y0], np.int32)
        hull = np.zeros((h, w), np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(np.vstack([pts_p, pts])), 1)
        excl |= (hull == 1) & (hull_p == 0)
        if ww >= 3 * hh:  # long flat object (the couch): its rows streak along its edges
            excl[max(0, int(y0 - margin)):int(y0 + hh + margin), :] = True
        elif hh >= 3 * ww:
            excl[:, max(0, int(x0 - margin)):int(x0 + ww + margin)] = True
    dist = cv2.distanceTransform((~patient).view(np.uint8), cv2.DIST_L2, 5) * p
    band = (dist >= BAND_MM[0]) & (dist <= BAND_MM[1]) & field_in & ~excl
    n_band = int(np.count_nonzero(band))
    if n_band * p * p < MIN_BAND_MM2:
        return float("nan")
    raw = img[band]
    airish = np.abs(raw + 1000.0) < 30.0
    floor = float(raw.min())
    if FLOOR_HU[0] < floor <= FLOOR_HU[1]:  # clipped at a storage floor: the floor is no air level
        airish &= raw > floor + 0.01
    if np.count_nonzero(airish) > MIN_AIR_PX:
        level = float(np.median(raw[airish]))
    else:  # hardly a pixel near air: streaks both ways across the whole band, or no free air at all
        level = float(np.median(raw))
        if level > NOT_AIR_HU:  # lung opened by a display field that cuts the chest, tissue in a targeted field
            return float("nan")
    dark = np.maximum(0.0, level - smooth[band])
    if metal:
        dark[metal_aligned(smooth, band, metal, p)] = 0.0
    return float(dark.mean())


def evidence(hu_dark: float) -> float:
    """0..1 motion evidence from :func:`air_dark_hu` (linear between ``EVIDENCE_HU``); NaN stays NaN."""
    if hu_dark is None or not math.isfinite(hu_dark):
        return float("nan")
    lo, hi = EVIDENCE_HU
    return float(min(1.0, max(0.0, (hu_dark - lo) / (hi - lo))))
