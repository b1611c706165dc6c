"""Ring artifacts: the peak contrast of a thin ring around a rotation axis (``ring_contrast``: the slice in
polar coordinates, the median over the angles at each radius, above that radius's noise floor) and where
the scanner's axis lies in the slice (``isocentre_px``).
"""

from __future__ import annotations

import math

import numpy as np

from medqc.analysis.image import _median5, _min_max

try:  # connected components make the body/lung masks cleaner; numpy alone still gives usable measures
    import cv2
except ImportError:  # pragma: no cover - exercised by the module-hider test
    cv2 = None


RING_ANGLES = 180
RING_MIN_R_PX = 20
RING_FIELD_MARGIN_MM = 12.0  # the ring measure stops this far inside the scan field's edge
RING_NOISE_K = 5.0  # ring contrast is counted above this many robust SDs of the radial profile ...
RING_SE_K = 3.0  # ... and above this many standard errors of each radius's median over the angles ...
# ... or, where a circle's standard error exceeds 3 HU (heavy noise: thin slices, sharp kernels, a low dose), above
# RING_SE_HEAVY_K standard errors less RING_SE_HEAVY_HU. Among the 100-200 radii and 2-4 axis candidates read on a
# slice, one lies 3.5-4 standard errors out by chance now and then, which with standard errors of 4-12 HU is more
# than the 4 HU a ring is flagged at (``medqc.analysis.fusion.RING_HU``): a flagged ring stands at least 4 standard
# errors (and 1 HU) off its circle's noise. On a real GE 1.25 mm lung-kernel chest (RIDER, 0.58 mm pixels) 1 of 40
# clean slices and 3 of its 120 with noise added (σ at 2 mm 66-143 HU) read 4.2-9.5 HU with 3 standard errors, none
# over 3.3 so; injected faint rings (severity 0.05-0.15 in 28 slices of three vendors, standard errors under 3 HU)
# read as before
RING_SE_HEAVY_K = 4.0
RING_SE_HEAVY_HU = 3.0
# ... over at least this share of the angles, where the neighbourhood is smooth. A circle through a head's skull
# crosses bone on about half of them: a real head's injected ring 70-77 mm from the axis had smooth neighbourhoods
# on 88-97 of its 180 angles, on either side of a half. The standard errors below still weigh how many there are
RING_MIN_SHARE = 0.4
RING_CORR_LAGS = 3  # neighbouring angles whose residual correlation discounts a circle's independent samples ...
RING_CORR_NEAR = (4, 8)  # ... read on the circles this many radial pixels inside and outside it (past a ring's side lobes)
RING_TOP_RADII = 24  # radii over the profile's floor whose standard errors are costed, the strongest first
RING_FULL_GATE_HU = 0.05  # a second axis candidate is read at full resolution where its 2 mm reading reaches this
RING_BONE_HU = 400.0  # ... and holds no bone
RING_MIN_R_MM = 30.0  # rings are read from this radius (and RING_MIN_R_PX) outwards
RING_SMOOTH_MM = 10.0  # ... over this radial range at 2 mm (5 pixels; 9 at full resolution)
# what ``ring_contrast`` measures, as learned per-scanner baselines record it: a store whose ring contrasts were
# measured by another definition forgets them (``medqc.baselines``)
RING_MEASURE = "polar-angular-median-cut-arcs-correlated-heavy"
# A circle the image's edges cut is read where its smooth angles' mean unit vector is this short: an arc of at least
# about 216° round the axis (a uniform arc of θ has sin(θ/2) / (θ/2)). An axis far off a targeted field's centre sees
# only arcs, and around it the short ones run through one side of the body along its organs' outlines. In a 0.5 ×
# targeted field round the trunk of a patient lying 50-70 mm below the axis (the real Siemens PET/CT abdomen, the
# real Philips Brilliance 16 chest) the rings in the picture show as arcs of 180-250°: at 0.3 (270°) none of the
# PET/CT's was read, at 0.5 every one (the chest's, 180-205°, still not), and no clean slice of the real-CT
# evaluations (original fields, 0.7 and 0.5 × fields, 256² and 1024² matrices) read more. At 0.64 (a half circle)
# noise injected into a 0.7 × field of a real GE slice read as a 5.2 HU ring
RING_ARC_BALANCE = 0.5
_COS = np.cos(np.arange(RING_ANGLES) * (2 * np.pi / RING_ANGLES))
_SIN = np.sin(np.arange(RING_ANGLES) * (2 * np.pi / RING_ANGLES))
_POLAR_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
FILLED_SHARE = 0.97  # corners (outside the inscribed circle) this uniform are fill, not data
RIM_STEP_HU = 20.0  # ... as are corners whose CT numbers step by this much across the inscribed circle
RIM_CIRCLES = 12  # ... (the median of this many 1-px circles' medians each side ...
RIM_SAMPLES = 257  # ... each over this many of its pixels)
_INSIDE_CACHE: dict[tuple, object] = {}  # polar masks, and per image shape its corners and rim circles


def _polar(hu: np.ndarray, cy: float, cx: float, rad: float) -> np.ndarray:
    """(angles × radius) resampling of the disk of radius ``rad`` around (cy, cx), 1 px per radial step."""
    nr = int(rad)
    if cv2 is not None:
        return cv2.warpPolar(hu.astype(np.float32, copy=False), (nr, RING_ANGLES), (cx, cy), rad,
                             cv2.INTER_LINEAR + cv2.WARP_POLAR_LINEAR + cv2.WARP_FILL_OUTLIERS)
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


def _rim_bands(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices of the pixels outside the inscribed circle (the corners), and of ``RIM_CIRCLES`` 1-px
    circles either side of it, every pixel on a matrix up to 512², every n-th on n × 512² (inside it, along the
    rays that reach the corners), ``RIM_SAMPLES`` pixels spread over each: one row per circle, the inner ones
    first."""
    key = ("rim", h, w)
    got = _INSIDE_CACHE.get(key)
    if got is None:
        cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
        big = min(h, w) / 2.0
        gap = max(1, int(round(big / 256.0)))
        yy, xx = np.mgrid[:h, :w]
        r = np.hypot(yy - cy, xx - cx)
        scale = (big + 2.0 + gap * RIM_CIRCLES) / np.maximum(r, 1.0)  # the same ray, past the outer circles
        ys, xs = cy + (yy - cy) * scale, cx + (xx - cx) * scale
        reach = (ys >= 0) & (ys <= h - 1) & (xs >= 0) & (xs <= w - 1)
        corners = np.flatnonzero(r > big + 1.0)
        rows = [np.flatnonzero(reach & (r >= big - 2.0 - k * gap) & (r < big - 1.0 - k * gap)) for k in range(RIM_CIRCLES)]
        rows += [np.flatnonzero((r > big + 1.0 + k * gap) & (r <= big + 2.0 + k * gap)) for k in range(RIM_CIRCLES)]
        circles = np.empty((0, RIM_SAMPLES), np.intp)
        if all(c.size for c in rows):
            circles = np.stack([c[np.linspace(0, c.size - 1, RIM_SAMPLES).round().astype(np.intp)] for c in rows])
        got = (corners, circles)
        _INSIDE_CACHE[key] = got
    return got


def corners_filled(hu: np.ndarray) -> bool:
    """Whether the image holds no data outside its inscribed circle (the displayed circle): at least
    ``FILLED_SHARE`` of the corners' pixels hold the corner's value (GE's and Toshiba's padding, a Philips Big
    Bore's constant −1024), or the CT number steps by ``RIM_STEP_HU`` right at the circle: between the
    medians of the 3 nearest 1-px circles' medians either side (along the rays that reach the corners), and
    between those of 12 either side (every n-th pixel on n × 512²). A fill's step is abrupt and lasts: the Big
    Bore's air reads −975 inside its circle and its fill −1024 beyond, 40–53 HU on both, which noise added to
    the whole square keeps; the corners' own air darkens gradually (a real Philips Brilliance 16 chest's: up
    to 27 HU over the 12 circles, up to 17 across the nearest 3, never 20 on both), and a ring with its side
    lobes lies on a third of the 12 at most. False where the corners hold measured data (noisy air, the
    patient: a Philips Brilliance 16 chest's 431 mm field of a 500 mm scan field)."""
    corners, circles = _rim_bands(*hu.shape)
    if corners.size == 0:
        return False
    flat = hu.ravel()
    c = flat[corners]
    if np.count_nonzero(c == c[0]) >= FILLED_SHARE * corners.size:
        return True
    if not circles.size:
        return False
    v = np.sort(flat[circles], axis=1)[:, RIM_SAMPLES // 2]  # each circle's median
    inner, outer = v[:RIM_CIRCLES], v[RIM_CIRCLES:]
    wide = float(np.median(inner) - np.median(outer))
    near = float(np.median(inner[:3]) - np.median(outer[:3]))
    return min(abs(wide), abs(near)) >= RIM_STEP_HU and wide * near > 0


def _inside(shape: tuple[int, int], cy: float, cx: float, nr: int, ahead: int, around: int,
            disk: float | None) -> np.ndarray:
    """(angles × radius) mask of the polar samples (as ``_polar`` takes them) whose neighbourhood holds data:
    the sample ``ahead`` radii further out lies in the image (and within ``disk`` px of its centre, where the
    corners are fill) — a ray from a point inside that convex region leaves it once, so every sample before
    it is inside too — and so does every angle within ``around`` of it."""
    key = (shape, round(cy, 2), round(cx, 2), nr, ahead, around, disk)
    m = _INSIDE_CACHE.get(key)
    if m is None:
        h, w = shape
        r = np.arange(nr, dtype=np.float64) + ahead
        y = cy + _SIN[:, None] * r[None, :]
        x = cx + _COS[:, None] * r[None, :]
        m = (y >= 0) & (y <= h - 1) & (x >= 0) & (x <= w - 1)
        if disk is not None:
            m &= np.hypot(y - (h - 1) / 2.0, x - (w - 1) / 2.0) <= disk
        for k in range(1, around + 1):
            m = m & np.roll(m, k, axis=0) & np.roll(m, -k, axis=0)
        if len(_INSIDE_CACHE) < 32:
            _INSIDE_CACHE[key] = m
    return m


def isocentre_px(info, shape: tuple[int, int]) -> tuple[float, float] | None:
    """(row, col) of the scanner axis in this slice; None when unknown. Where the header says where the
    displayed field's centre lies from the isocentre (ReconstructionTargetCenterPatient −
    DataCollectionCenterPatient: ``info.recon_offset_mm``, written by the scanners that offset targeted
    reconstructions), from that; else where patient x = y = 0 crosses the slice (where most scanners put the
    isocentre), from ImagePositionPatient / ImageOrientationPatient / PixelSpacing."""
    ps = getattr(info, "pixel_spacing", None)
    off = getattr(info, "recon_offset_mm", None)
    h, w = shape
    if off is not None and ps and ps[0] and ps[1]:
        row, col = (h - 1) / 2.0 - off[1] / float(ps[0]), (w - 1) / 2.0 - off[0] / float(ps[1])
        return (row, col) if 0 <= row < h and 0 <= col < w else None
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


def _angular_inflation(dev: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per circle (column), how much the correlation of its residual between neighbouring angles inflates the
    variance of its median over the angles: ``1 + 2 Σ ρ_k`` over lags 1..``RING_CORR_LAGS`` (at least 1), ρ_k the
    correlation of the residual (winsorised at 3 σ, so that a vessel or an edge does not set it) with itself
    ``k`` angles on, around the circle, over its smooth samples. Noise is correlated over about a kernel's width
    (0.6-1.5 mm): where neighbouring angles lie closer than that (inner circles, fine pixels, the 2 mm scale's
    5 × 5 median background), 180 angles are far fewer independent samples, and heavy noise left the median of
    a real 1 mm cardiac slice's inner circle 34 HU off (σ 84 HU, neighbouring angles correlated 0.36)."""
    sig = 1.4826 * _column_median(np.abs(dev), ok)
    lim = 3.0 * np.maximum(sig, 1e-6)[None, :]
    x = np.where(ok, np.clip(dev, -lim, lim), 0.0).astype(np.float32)
    energy = np.einsum("ij,ij->j", x, x)
    total = np.zeros(x.shape[1], np.float32)
    for k in range(1, RING_CORR_LAGS + 1):
        total += np.einsum("ij,ij->j", x, np.roll(x, -k, axis=0))
    return np.maximum(1.0, 1.0 + 2.0 * total / np.maximum(energy, 1e-12))


def ring_contrast(hu: np.ndarray, centres=None, max_r_px: float | None = None, smooth_px: int = 9,
                  min_share: float = RING_MIN_SHARE, min_r_px: float = RING_MIN_R_PX, radial: bool = True,
                  filled: bool | None = None) -> float:
    """The ring contrast (HU) of ``ring_readings``."""
    return ring_readings(hu, centres, max_r_px, smooth_px, min_share, min_r_px, radial, filled)[0]


def ring_readings(hu: np.ndarray, centres=None, max_r_px: float | None = None, smooth_px: int = 9,
                  min_share: float = RING_MIN_SHARE, min_r_px: float = RING_MIN_R_PX, radial: bool = True,
                  filled: bool | None = None) -> tuple[float, float]:
    """Peak contrast (HU) of a thin ring around a rotation centre: the slice in polar coordinates (180 angles
    × 1 px radial steps), minus its background: with ``radial`` (full resolution) the median of 9
    neighbouring radii (a ring and its ramp-filter side lobes span up to ~6 px, which a 5-px median partly
    follows), else the 5×5 median (at ~2 mm, where a ring is 1–3 px wide); both keep edges. Then for each radius from ``min_r_px`` on the median over the angles where the neighbourhood is
    smooth (the ``smooth_px`` radial range of the median image < 250 HU, no bone: skull, skin and organ
    boundaries are out) — at least ``min_share`` of them; the largest
    |value| out to the disk's edge above its noise floor: the larger of ``RING_SE_K`` standard
    errors of that radius's median (its own residual spread — the median absolute deviation — over √ of its
    independent samples: the angles, fewer where neighbouring ones share pixels or correlated noise, see
    ``_angular_inflation``; ``RING_SE_HEAVY_K`` of them less ``RING_SE_HEAVY_HU`` where that is more: heavy
    noise) and ``RING_NOISE_K`` robust SDs of the radial profile. A detector channel with a gain error adds the
    same error along its whole circle around the isocentre, so the median over angles keeps it, while anatomy, noise and
    streaks (different at each angle) cancel. ``centres``: (row, col) candidates (default: the image centre;
    the agent adds the isocentre from the header, which an offset displayed field moves off the centre);
    the largest contrast wins. Half circles and short arcs are not seen; a circle the image's edges cut (a displayed
    field narrower than the scan field) is read on the angles it shows, where as many are smooth as a whole circle
    needs and they lie all round the axis (``RING_ARC_BALANCE``), and not beyond a displayed circle the image fills
    outside (``filled``: ``corners_filled``, computed here when not given). ``max_r_px``: radii from this on are not
    read (the scan field's edge, ``RING_FIELD_MARGIN_MM`` inside it: a patient cut by the scan field leaves a bright
    rim there, a circle around the rotation axis like a ring's, and beyond it the image holds no measured data).

    Returns (contrast, raw): raw counts every angle of a circle as independent (no correlation discount). Raw
    reads any faint circle a little sooner, which is what deciding whether to look closer (at full resolution,
    around a second candidate axis) needs; the contrast is the evidence."""
    h, w = hu.shape
    cands = list(centres) if centres else [((h - 1) / 2.0, (w - 1) / 2.0)]
    best = best_raw = float("nan")
    if filled is None:
        filled = corners_filled(hu)
    disk = min(h, w) / 2.0 - 1.0 if filled else None  # the displayed circle, beyond which nothing is data
    for cy, cx in cands:
        if min(cy, cx, h - 1 - cy, w - 1 - cx) < 31.5:
            continue
        # out to the farthest corner (or just past the scan field's edge), whole pixels: one radial sample per
        # pixel. Beyond the inscribed circle the image shows arcs of each circle: the corners of a displayed
        # field narrower than the scan field hold detector channels too (a real chest's 431 mm field of a 500 mm
        # scan field: channels 215-250 mm from the axis draw their rings only there)
        rad = math.hypot(max(cy, h - 1 - cy), max(cx, w - 1 - cx))
        if disk is not None:  # nothing to read beyond the displayed circle
            rad = min(rad, disk + math.hypot(cy - (h - 1) / 2.0, cx - (w - 1) / 2.0) + 1.0)
        if max_r_px is not None:
            rad = min(rad, max_r_px + smooth_px + 6)
        rad = float(int(rad + 0.5))
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
        # ... whose background window (the median's and the smoothness range's radii, the 5 × 5 median's
        # angles) lies in the image
        inside = _inside((h, w), cy, cx, pol.shape[1], (4 if radial else 2) + smooth_px // 2, 0 if radial else 2, disk)
        ok &= inside
        count = ok.sum(axis=0)
        good = count >= min_share * RING_ANGLES
        # a circle the image cuts is read where its smooth arcs lie all round the axis, not on one side of it
        # (around an axis far off a targeted field's centre, the arcs it shows run through one side of the body
        # alongside its organs' outlines): the resultant of their angles' unit vectors is short
        cut = good & ~inside.all(axis=0)
        if cut.any():
            res_len = np.hypot(_COS @ ok[:, cut], _SIN @ ok[:, cut]) / count[cut]
            good[np.flatnonzero(cut)[res_len > RING_ARC_BALANCE]] = False
        # near the centre few distinct pixels share the 180 angles, and a round organ or vessel centred there
        # (the aorta, a vertebral body) reads as a ring over all of them
        good[:int(math.ceil(min_r_px))] = False
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
            v = v_raw = 0.0
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

                def excess(n_eff: np.ndarray) -> float:  # the largest reading over its floor, given the samples
                    se = 1.2533 * sig / np.sqrt(np.maximum(n_eff, 1.0))
                    need = np.maximum(np.maximum(RING_SE_K * se, RING_SE_HEAVY_K * se - RING_SE_HEAVY_HU),
                                      RING_NOISE_K * floor)
                    return max(0.0, float(np.max(np.abs(prof[over]) - need)))

                n_eff = np.minimum(n, n * 2.0 * math.pi * np.maximum(c, 1).astype(np.float64) / RING_ANGLES)
                v_raw = excess(n_eff)
                # ... and as many as the noise's correlation between neighbouring angles leaves independent, read on
                # the circles RING_CORR_NEAR px inside and outside each costed one (the noise there is the same;
                # its own residual a ring's slightly off-centre circle makes vary smoothly with the angle)
                gap = np.abs(c[:, None] - cols[None, :])
                near = (gap >= RING_CORR_NEAR[0]) & (gap <= RING_CORR_NEAR[1])
                use = near.any(axis=0)
                if use.any():
                    u = cols[use]
                    infl = _angular_inflation(res[:, u] - prof[use][None, :], ok[:, u])
                    wt = near[:, use].astype(np.float64)
                    k_near = wt.sum(axis=1)
                    n_eff = np.minimum(n_eff, n / np.where(k_near > 0, (wt @ infl) / np.maximum(k_near, 1.0), 1.0))
                v = excess(n_eff)
            best = v if not math.isfinite(best) else max(best, v)
            best_raw = v_raw if not math.isfinite(best_raw) else max(best_raw, v_raw)
    return best, best_raw
