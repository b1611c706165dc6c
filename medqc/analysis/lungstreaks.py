"""Dark streaks inside the patient's air spaces (the lungs, airways, bowel gas): motion evidence where no
free air surrounds the patient.

Physics. The air-streak measure (``medqc.analysis.airstreaks``) reads the dark streaks that inconsistent
projections leave in the free air round the patient. A body that fills the displayed field (a chest shown in
a field cut to the chest wall, a targeted reconstruction) leaves no such air, and there motion was judged by
the network alone, which on real CT cannot tell it from anatomy. The same physics holds inside the body:
nothing in the patient is darker than air. Lung parenchyma reads about -850 HU (air and tissue), airways and
bowel gas -1000 HU; smoothed over a couple of millimetres, no clean slice reads below air there. The streaks
that motion leaves run straight across the section, through the lungs too, and where their dark side crosses
an air space it takes the smoothed CT number below air.

Steps, on the slice area-averaged to ~2 mm pixels (``noise.pool_2mm``'s slice, padding made air), every
length in mm:

1. the air spaces: pixels below ``PATIENT_HU`` that the patient encloses (``medqc.analysis.measures`` works
   them out with its body mask; where the displayed field cuts the trunk, opening its lungs to the image's
   edge, also those inside the trunk's convex hull, shrunk by the skin's margin), within the valid field (no
   padding, inside the inscribed circle) shrunk by ``EDGE_MM``; NaN (not judged) where the slice shows under
   ``MIN_LUNG_MM2`` of aerated lung (a neck, an abdomen, a head's air cells: no lungs to read);
2. the slice smoothed with a Gaussian of ``SIGMA_MM``;
3. the measure: the area (mm²) of air-space pixels whose smoothed CT number is below ``DARK_HU`` (10 HU below
   air); near metal objects and along lines through them (``airstreaks.metal_aligned``, the free air's test)
   the darkness is the metal's and is not counted.

On the real-CT evaluation's trunk slices (scanners of four vendors: GE LUNG and STANDARD 1.25-5 mm, Philips C
and L, Toshiba FC17, Siemens Br38f, B25f and B30f) no clean slice read above 0 mm² (407 slices judged of 492).
With motion injected in the projection domain the measure read over 20 mm² on 54 % of the judged slices and
up to 1,000 mm²; on a 1.25 mm GE lung-kernel chest whose field leaves no free air, on 80 %. What else takes
the lungs below air is another artifact's, and ``medqc.analysis.fusion`` leaves it out there: a ring's dark
circles (up to 155 mm²; ring contrast 100-300 HU), heavy noise (up to 90 mm², where σ at 2 mm reached twice
the body level and more; noise added to clean slices in the image reached 7 mm² at 0.7 of the level, 28-78
mm² at 1.3 times it); dense metal's streaks read at most 4 mm² beside the metal left out. Heads are not read: the
sinuses and mastoid cells lie beside the skull base's dense bone, whose streaks took a real head's clean air
cells below air over up to 240 mm².
"""

from __future__ import annotations

import math

import numpy as np

from medqc.analysis.airstreaks import metal_aligned
from medqc.analysis.image import _radius

try:
    import cv2
except ImportError:  # pragma: no cover - exercised by the module-hider test
    cv2 = None

PATIENT_HU = -400.0  # air spaces are below this (the body mask's level, ``image.BODY_HU``)
SIGMA_MM = 1.5  # smoothing on the ~2 mm grid (about 2 mm in all with the area-averaging)
DARK_HU = -1010.0  # 10 HU below air: darker than anything inside a patient
EDGE_MM = 8.0  # the valid field's edge (padding, the inscribed circle) is left this far out
# read where the slice shows this much aerated lung (``measures``' lung_area_mm2, -950..-500 HU enclosed), or not
# judged: a head's air cells and sinuses are air, not lung (in a 0.7 × field round a real head, whose skull the
# field cuts, its skull base's mastoid cells read 312 mm² of "lung" and 351 mm² below air on a clean slice)
MIN_LUNG_MM2 = 2000.0
# evidence: 0 at 20 mm² (five 2 mm pixels: over the clean slices' 0 and noise's 7 mm² at 0.7 of the body level),
# 1 at 150 mm² (the upper quarter of the motion-injected slices that read any)
EVIDENCE_MM2 = (20.0, 150.0)


def lung_dark_mm2(pooled: np.ndarray, valid: np.ndarray, p: float, spaces: np.ndarray, lung_mm2: float,
                  metal=None) -> float:
    """The measure (mm²; NaN when not judged) on a pooled slice ``pooled`` (HU), ``valid`` marking pixels that
    are not padding, ``p`` mm per pixel. ``spaces``: the patient's air spaces on the same grid (step 1: the
    pixels it encloses, and inside its shrunk hull where the displayed field cuts the trunk). ``lung_mm2``:
    the slice's aerated lung (``measures``' ``lung_area_mm2``). ``metal``: (row, col) in pixels of ``pooled``
    of the metal objects in the slice."""
    if (cv2 is None or pooled.ndim != 2 or min(pooled.shape) < 16 or not (p > 0) or spaces.shape != pooled.shape
            or not lung_mm2 >= MIN_LUNG_MM2):
        return float("nan")
    img = np.ascontiguousarray(np.where(valid, pooled, np.float32(-1000.0)), dtype=np.float32)
    h, w = img.shape
    field = valid & (_radius(h, w)[0] <= min(h, w) / 2.0)
    k = 2 * int(round(EDGE_MM / p)) + 1
    field = cv2.erode(field.view(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))).view(bool)
    spaces = spaces & field & (img <= PATIENT_HU)
    smooth = cv2.GaussianBlur(img, (0, 0), SIGMA_MM / p)
    dark = spaces & (smooth < DARK_HU)
    n_dark = int(np.count_nonzero(dark))
    if metal and n_dark:  # near a metal object, and along lines through it, the darkness is the metal's
        n_dark -= int(np.count_nonzero(metal_aligned(smooth, dark, metal, p)))
    return float(n_dark) * p * p


def on_grid(mask: np.ndarray, step: int, f: int, shape: tuple[int, int]) -> np.ndarray:
    """``mask``, worked out on the slice subsampled by ``step``, at the centres of the pixels of the slice
    area-averaged by ``f`` (``shape``: that grid's)."""
    rows = np.minimum(((np.arange(shape[0]) * f + (f - 1) / 2.0) / step).round().astype(np.intp), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) * f + (f - 1) / 2.0) / step).round().astype(np.intp), mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def evidence(mm2: float) -> float:
    """0..1 motion evidence from :func:`lung_dark_mm2` (linear between ``EVIDENCE_MM2``); NaN stays NaN."""
    if mm2 is None or not math.isfinite(mm2):
        return float("nan")
    lo, hi = EVIDENCE_MM2
    return float(min(1.0, max(0.0, (mm2 - lo) / (hi - lo))))
