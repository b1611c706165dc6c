"""Classical CT detectors: physics and HU anatomy measured on one slice, beside the network.

``measure(hu, info)`` returns plain floats (NaN when a measure does not apply) in about 7 ms for a 512²
slice on one core of the 2-core development machine (the ring measure 2.1, the air streaks 1.3, noise at
2 mm 1.3 plus 0.5 for the 2 mm pooling, on the bench study): the metal search and the fine ring scale work at full resolution, the masks on a 2×
subsampled view, noise and air streaks at ~2 mm. The noise and ring measures are in
``medqc.analysis.noise`` and ``.ring``, the air streaks in ``.airstreaks``, the helpers they share in
``.image``; ``medqc.analysis.fusion.fuse(net, measures)`` combines the network's per-class probabilities
with this classical evidence (its rules there and in ``docs/checks.md``).

Robustness rules that hold for every vendor we know of:

* pixels below ``PAD_HU`` (-1500) that hold the image's fill value are padding outside the reconstructed
  field (-2000, -2048, -3024 ...; ``image.padding``): darker pixels that vary are streaks in an unclipped
  reconstruction, not padding; the field of view (FOV) is what is left. Truncation shows where the patient meets the *scan* field's
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

import numpy as np

from medqc.analysis import airstreaks, lungstreaks
from medqc.analysis.image import (BODY_HU, PAD_HU, _border_connected, _edge_geometry, _erode_cross, _holes,
                                  _median_index, _radius, _ring, _sector_share, _sectors, _trunk_hull, padding)
from medqc.analysis.noise import (NOISE_MIN_AREA_HEAD_MM2, NOISE_MIN_AREA_MM2, _robust_noise,
                                  noise_2mm, noise_ratio, noise_size_mm, noise_texture, pool_2mm, sharp_kernel,
                                  water_equivalent_diameter)
from medqc.analysis.ring import (RING_FIELD_MARGIN_MM, RING_FULL_GATE_HU, RING_MIN_R_MM, RING_MIN_R_PX, RING_SMOOTH_MM,
                                 corners_filled, isocentre_px, ring_contrast, ring_readings)

try:  # connected components make the body/lung masks cleaner; numpy alone still gives usable measures
    import cv2
except ImportError:  # pragma: no cover - exercised by the module-hider test
    cv2 = None


METAL_HU = 2500.0
METAL_MIN_HU = 3000.0  # the densest bone and enamel rarely exceed this; metal saturates far above it
METAL_CLIPPED_PX = 3  # pixels sharing a slice's densest value (>= METAL_HU): the store clipped them there (GE
# writes metal at 3071 HU, a Philips Big Bore at 2976): their objects' streaks are metal's (airstreaks) ...
METAL_CLIPPED_MM2 = 10.0  # ... and where that one value covers this much area, metal density whatever level the
# store let it reach: an implant's core far above the ceiling. A skin marker's few mm² stay judged by the level,
# as on stores that keep it, and so do the few pixels a resampled image repeats at its top value (dental
# fillings at 2,986 HU on 768²: 4 mm²); noise never holds one value over 10 mm² above 2,500 HU
METAL_SKIN_MM = 5.0  # metal within this depth of the skin, or outside the body, is external (metal_inside)
METAL_PARTIAL_HU = 2000.0  # a densest pixel from here up is placed (metal_row_mm / metal_col_mm): cortical bone
# stays below it, the partial-volumed end of an implant next to its full-density slices often does not
METAL_OBJECT_MM2 = 1.0  # metal objects whose streaks the air measure leaves out (see airstreaks), from this area ...
METAL_OBJECTS = 8  # ... the largest this many
BONE_HU = 300.0
SKULL_HU = 700.0
LUNG_HU = (-950.0, -500.0)
TARGETED_RIM = 0.6  # trunk along this share of the displayed rim: a targeted reconstruction
SCAN_FIELD_MM = 500.0  # the scan field of CT scanners, assumed where DataCollectionDiameter is missing
MASK_MAX_PX_MM = 2.5  # the coarsest pixel (mm) the body, lung and field-edge masks are worked out on
RING_FINE_PX_MM = 0.9  # the fine ring scale's pixel (mm): finer pixels are area-averaged by the nearest integer factor

MEASURES = (
    "metal_area_mm2", "metal_max_hu", "noise_sd", "body_touches_fov", "body_center_offset_x_mm",
    "body_center_offset_y_mm", "body_area_mm2", "lung_area_mm2", "bone_area_mm2", "skull_ring",
    "lateral_bone_mm2", "noise_sd_2mm", "noise_ratio", "ring_contrast_hu", "field_inside_body", "air_dark_hu",
    "display_touch", "noise_ratio_plain", "water_eq_diameter_mm", "anterior_bone_mm2", "trunk_width_mm",
    "metal_row_mm", "metal_col_mm", "metal_clipped", "metal_inside", "noise_texture", "noise_ratio_kernel",
    "lung_dark_mm2",
)


def _pixel_mm(info) -> tuple[float, float]:
    ps = getattr(info, "pixel_spacing", None)
    if ps and ps[0] and ps[1] and ps[0] > 0 and ps[1] > 0:
        return float(ps[0]), float(ps[1])
    rd = getattr(info, "reconstruction_diameter", None)
    cols = getattr(info, "cols", 0) or 0
    if rd and cols:
        return float(rd) / cols, float(rd) / cols
    return 0.7, 0.7  # a typical body FOV of 360 mm on 512²; only areas depend on it


DISPLAYED_CIRCLE = 0.95  # padding whose edge lies this far out (of the image's half-width) is the displayed circle
CROP_MARGIN_MM = 15.0  # ... and a crop where the scan field reaches at least this much beyond it
TRUNC_RIM_HU = 150.0  # ... unless this share of the patient's pixels along it are brighter than this: a cut's band
TRUNC_RIM_BRIGHT = 0.2


def _displayed_circle(rim: np.ndarray, sub: np.ndarray, h: int, w: int, dcd: float | None, display_d_mm: float) -> bool:
    """Whether the padding beside ``rim`` (the valid pixels next to it) is the displayed field's own circle
    rather than the scan field's edge: the header gives a scan field (DataCollectionDiameter) reaching at
    least ``CROP_MARGIN_MM`` beyond the displayed one all round (a patient on a displayed circle only a few mm
    inside the scan field's edge is most likely cut by it too: a synthetic 250 mm field of a 264 mm scan
    field, truncated, would have been read as a crop), and the padding's edge lies on the displayed circle
    (its median radius at least ``DISPLAYED_CIRCLE`` of the image's half-width). GE pads outside the displayed circle, and an offset
    displayed field moves that circle a few pixels off the image centre, so some padding lies a little inside
    the inscribed circle: that is where the picture was cropped, the data beyond it are there, and a patient
    touching it is no truncation (a large GE abdomen in a 450 mm field of a 500 mm scan field read 10 % of
    its rim as cut). A scan field smaller than the header says (padding deep inside the picture) is still
    its edge."""
    if not dcd or dcd - display_d_mm < 2.0 * CROP_MARGIN_MM or not rim.any():
        return False
    if float(np.median(_radius(h, w)[0][rim])) < DISPLAYED_CIRCLE * min(h, w) / 2.0:
        return False
    # the picture itself still shows a cut: missing data leave a bright band where the patient meets the
    # field's edge (two real Toshiba slices, 447 mm fields of a 500 mm scan field, arms cut: 37 and 47 % of
    # the patient's pixels there over 150 HU; the GE flank on its displayed circle: 4 %)
    touching = rim & (sub > BODY_HU)
    return not (touching.any() and float(np.mean(sub[touching] > TRUNC_RIM_HU)) >= TRUNC_RIM_BRIGHT)


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


LUNG_OPEN_TOUCH = 0.15  # the trunk along this share of the displayed rim: the field cuts it (see measure)
AIR_CUT_TOUCH = 0.25  # ... along this share: no free air round the patient to read motion streaks in
LUNG_HULL_MARGIN_MM = 6.0


SKULL_DEPTH_MM = 20.0  # a skull lies under the scalp: skull-density bone within this depth of the skin ...
SKULL_SECTORS = 0.75  # ... in this share of the 24 sectors round the section's centre makes it a head
SKULL_SEEN = 0.25  # ... of those where its skin is in the picture, at least this share of them ...
SKULL_SECTORS_CUT = 0.9  # ... and where the field hides part of it, bone under the skin in this share of those


def _deeper_than(body: np.ndarray, depth_mm: float, pix_mm: float) -> np.ndarray:
    """The part of ``body`` (a subsampled mask, ``pix_mm`` per pixel) deeper than ``depth_mm`` from its edge."""
    r = max(1, int(round(depth_mm / pix_mm)))
    if cv2 is None:
        return _erode_cross(body, r)
    return cv2.erode(body.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).view(bool)


def _metal_inside(metal_px: np.ndarray, body: np.ndarray, step: int, pix_mm: float) -> float:
    """Share of the slice's metal pixels (full resolution, >= METAL_HU) that lie deeper than ``METAL_SKIN_MM``
    inside the patient's section (``body``: the subsampled mask, enclosed air filled): an implant's, where
    ECG electrodes and leads, clothing and jewellery on or beside the skin read 0."""
    inner = _deeper_than(body, METAL_SKIN_MM, pix_mm)
    ys, xs = np.nonzero(metal_px)
    ys, xs = np.minimum(ys // step, inner.shape[0] - 1), np.minimum(xs // step, inner.shape[1] - 1)
    return float(np.count_nonzero(inner[ys, xs])) / len(ys)


def _skull_under_scalp(dense: np.ndarray, body: np.ndarray, cy: float, cx: float, pix_mm: float,
                       beyond: np.ndarray) -> bool:
    """Whether skull-density bone lies just under the skin all round the section: a skull. Dense bone in
    every direction from the centre is not enough: below the skull base the cervical spine sits near the
    neck's centre, so that it and the mandible cover nearly every sector, but the spine lies 4–6 cm deep.
    ``body``: the section with its enclosed air filled (an airway is not skin). ``beyond``: what lies outside
    the displayed field (padding, fill beyond its circle), where the section goes on unseen: its edge there
    is no skin, so the skull is judged in the sectors where the skin is in the picture (at least
    ``SKULL_SEEN`` of the 24): bone under it in ``SKULL_SECTORS`` of them where the skin shows all round, in
    ``SKULL_SECTORS_CUT`` where the field hides part of it. A skull base is no skull all round (the face and
    the neck): in the whole field its petrous bone, mastoids and clivus lie deep, and shown in a 110–154 mm
    field the face's skin in view lies over bone in 7 of 9 and 9 of 12 sectors, where a real head's vault in
    a 0.7 × field lies under it in 14 of 14 to 17 of 18."""
    whole = body | beyond
    inner = _deeper_than(whole, SKULL_DEPTH_MM, pix_mm) & body
    edge = body & ~_deeper_than(whole, 1.5 * pix_mm, pix_mm)  # the section's own edge: skin
    skin = _sectors(edge, cy, cx)
    if np.count_nonzero(skin) < SKULL_SEEN * 24:
        return False
    bone = _sectors(dense & ~inner, cy, cx)
    need = SKULL_SECTORS if skin.all() else SKULL_SECTORS_CUT
    return np.count_nonzero(bone & skin) >= need * np.count_nonzero(skin)


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


def measure(hu: np.ndarray, info) -> dict[str, float]:
    """Classical measures of one axial HU slice (see module docstring). ``info`` is a ``SliceInfo``."""
    nan = float("nan")
    out = {k: nan for k in MEASURES}
    if hu.ndim != 2 or hu.size == 0:
        return out
    rmm, cmm = _pixel_mm(info)
    # metal: full resolution (small dense objects must not fall between subsamples)
    top_at = int(np.argmax(hu))
    top_hu = hu.flat[top_at]
    if top_hu >= METAL_PARTIAL_HU:  # where the densest pixel lies (mm from the first pixel's centre)
        out["metal_row_mm"] = float(top_at // hu.shape[1]) * rmm
        out["metal_col_mm"] = float(top_at % hu.shape[1]) * cmm
    metal_px = hu >= METAL_HU if top_hu >= METAL_HU else None
    n_metal = 0 if metal_px is None else int(np.count_nonzero(metal_px))
    out["metal_area_mm2"] = n_metal * rmm * cmm
    out["metal_max_hu"] = float(top_hu) if n_metal else float(min(top_hu, METAL_HU))
    # a plateau at the top value is metal the store clipped: its objects' streaks are metal's whatever their size
    at_top = int(np.count_nonzero(hu == top_hu)) if n_metal >= METAL_CLIPPED_PX else 0
    plateau = at_top >= METAL_CLIPPED_PX
    out["metal_clipped"] = float(at_top * rmm * cmm >= METAL_CLIPPED_MM2)
    metal = _metal_objects(metal_px, rmm, cmm) if n_metal and (top_hu >= METAL_MIN_HU or plateau) else []

    # the masks work on a 2× subsampled view unless that would make its pixels coarser than MASK_MAX_PX_MM:
    # a 256² matrix of a 500 mm field (1.95 mm pixels) is read at its own pixels, as a 512² one is at 2
    step = 2 if min(hu.shape) >= 256 and 2.0 * math.sqrt(rmm * cmm) <= MASK_MAX_PX_MM else 1
    sub = np.ascontiguousarray(hu[::step, ::step], dtype=np.float32)
    px_area = rmm * cmm * step * step
    h, w = sub.shape
    band = max(2, int(round(min(h, w) * 0.012)))
    edge_g, inside_circle, central = _edge_geometry(h, w, band)
    pad = padding(sub)
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
        if deep.any() and not _displayed_circle(near_pad & valid & inside_circle, sub, h, w, dcd, display_d_mm):
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
        if n_metal:
            out["metal_inside"] = _metal_inside(metal_px, body_cc | holes, step, pix)
        lung_hu = (sub > LUNG_HU[0]) & (sub < LUNG_HU[1])
        lung = holes & lung_hu
        touch = out["display_touch"]
        hull = None
        if cv2 is not None and math.isfinite(touch) and touch >= LUNG_OPEN_TOUCH:
            # a displayed field that cuts the chest wall opens the lungs to its edge: they are no longer holes
            # in the body. Inside the trunk's convex hull, shrunk by LUNG_HULL_MARGIN_MM (the skin's partial
            # volume), lung-density pixels are lung all the same
            hull = _trunk_hull(core, LUNG_HULL_MARGIN_MM / pix) & valid
            lung = lung | (hull & lung_hu)
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
        filled = corners_filled(hu)  # a displayed circle beyond which the image holds no data
        # brain scale inside a skull: skull-density bone all round a head-sized section, under the scalp
        head = (out["skull_ring"] >= SKULL_SECTORS and out["body_area_mm2"] < 45000.0
                and _skull_under_scalp(dense, body_cc | holes, cy / step, cx / step, pix,
                                       (pad | ~inside_circle) if filled else pad))
        # the trunk's centre is where its noise is read, unless the displayed field cuts the trunk along much of
        # its rim: its centre is not in the picture then (a real chest shown in a 280 mm field read 93 HU on the
        # mediastinum's edges there against 14 HU uncut), and the whole section is read
        cut = math.isfinite(out["display_touch"]) and out["display_touch"] >= AIR_CUT_TOUCH
        out["noise_sd_2mm"] = (noise_2mm(hu, rmm, cmm, pooled, central=not head and not cut,
                                         min_area_mm2=NOISE_MIN_AREA_HEAD_MM2 if head else NOISE_MIN_AREA_MM2)
                               if pooled is not None else nan)
        out["trunk_width_mm"] = float((x1 - x0 + 1) * step * cmm)
        size = noise_size_mm(out)
        # a sharp kernel's allowance in a trunk follows the grain of the slice's noise (medqc.analysis.noise)
        if not head and pooled is not None and sharp_kernel(str(getattr(info, "convolution_kernel", "") or "")):
            out["noise_texture"] = noise_texture(hu, rmm, cmm, central=not cut)
            out["noise_ratio_kernel"] = noise_ratio(out["noise_sd_2mm"], info, head, dw_mm=size)
        out["noise_ratio"] = noise_ratio(out["noise_sd_2mm"], info, head, dw_mm=size,
                                         texture=out["noise_texture"])
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
        coarse, seen = {}, {}
        if pooled is not None and pooled[2] >= 2:
            f = pooled[2]
            smooth = max(3, int(round(RING_SMOOTH_MM / (px_mm * f))) | 1)
            for c in centres:
                coarse[c], seen[c] = ring_readings(pooled[0], [((c[0] + 0.5) / f - 0.5, (c[1] + 0.5) / f - 0.5)],
                                                   field_r / (px_mm * f), smooth_px=smooth, radial=False, filled=filled)
        # then at full resolution (~1-2 ms a centre): around the axis the header gives (or the image centre),
        # and around the other candidate where the 2 mm scale saw anything there at all (its raw reading)
        full = [c for c in centres if c is centres[-1] or not (seen.get(c, 1.0) < RING_FULL_GATE_HU)]
        # and on pixels of about RING_FINE_PX_MM where the slice's are finer (area-averaged by an integer factor):
        # the background's 9 radii must reach past a ring and its side lobes (a detector channel's width at the
        # axis, ~1 mm), which on 0.36-0.5 mm pixels (a 1024² matrix, a targeted field) they do not (a faint GE ring
        # reads 1.2 HU on 0.36 mm pixels, 0.0 on 0.51 mm, 6.1 and 5.7 so, 7.4 on the 0.72 mm original)
        ring = ring_contrast(hu, full, field_r / px_mm, min_r_px=min_r, filled=filled)
        k = max(1, int(round(RING_FINE_PX_MM / px_mm)))
        if k > 1 and cv2 is not None:  # read there too (a ring as thin as the pixels still shows best on them)
            hk, wk = (hu.shape[0] // k) * k, (hu.shape[1] // k) * k
            fine = cv2.resize(np.ascontiguousarray(hu[:hk, :wk], np.float32), (wk // k, hk // k), interpolation=cv2.INTER_AREA)
            ring = float(np.fmax(ring, ring_contrast(fine, [((c[0] + 0.5) / k - 0.5, (c[1] + 0.5) / k - 0.5) for c in full],
                                                     field_r / (px_mm * k),
                                                     min_r_px=max(RING_MIN_R_PX, RING_MIN_R_MM / (px_mm * k)),
                                                     filled=filled)))
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
        if pooled is not None and not head:  # motion evidence inside the trunk: its air spaces darker than air
            f = pooled[2]
            spaces = holes if hull is None else holes | (hull & ~body_cc)  # the lungs, also where opened to the edge
            out["lung_dark_mm2"] = lungstreaks.lung_dark_mm2(
                pooled[0], pooled[1], f * px_mm, lungstreaks.on_grid(spaces, step, f, pooled[0].shape),
                out["lung_area_mm2"], metal=[((cy + 0.5) / f - 0.5, (cx + 0.5) / f - 0.5) for cy, cx in metal])
    else:
        out["lung_area_mm2"] = 0.0
        out["bone_area_mm2"] = 0.0
        out["skull_ring"] = 0.0
    return out
