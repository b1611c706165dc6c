"""A parametric 3-D anatomical phantom, vertex to mid-thigh, rasterised one axial slice at a time.

Anatomy is placed on the reference craniocaudal scale of :mod:`medqc.analysis.anatomy` (mm below the vertex of a
175 cm adult) and scaled per patient (height factor ``scale``, separate left-right and antero-posterior
girth, subcutaneous fat). In-plane coordinates are millimetres in DICOM LPS: +x towards the patient's left,
+y posterior; the patient lies supine on the table (the table is on the posterior side).

Each slice is returned as a HU map plus the masks the physics needs (metal), so the projector can apply
material-specific effects.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from medqc.analysis.anatomy import LANDMARKS


@dataclass
class Implant:
    kind: str  # dental, spine_screws, hip, pacemaker, clip, port
    r_top: float  # reference mm
    r_bottom: float
    x: float  # mm
    y: float
    size: float  # mm (radius of the main part)
    density: float  # μ relative to water (titanium ≈ 4, steel/CoCr ≈ 10, amalgam ≈ 18)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Patient:
    seed: int
    height_cm: float
    girth_lr: float  # multiplies the reference half-widths
    girth_ap: float
    fat_mm: float
    arms: str  # "up" or "down"
    female: bool
    contrast: bool
    table: bool
    table_curve: float
    table_hu: float
    table_thick: float
    hu_jitter: dict = field(default_factory=dict)
    implants: list = field(default_factory=list)
    vessels: np.ndarray | None = None  # (k, 8): r0, r1, x0, y0, x1, y1 (normalised lung coords), radius, side
    bowel: np.ndarray | None = None  # (k, 7): r, u, v, rr, ru, rv, gas

    @property
    def scale(self) -> float:
        return self.height_cm / 175.0

    def to_dict(self) -> dict:
        return {
            "height_cm": round(self.height_cm, 1),
            "scale": round(self.scale, 4),
            "girth_lr": round(self.girth_lr, 3),
            "girth_ap": round(self.girth_ap, 3),
            "fat_mm": round(self.fat_mm, 1),
            "arms": self.arms,
            "female": self.female,
            "contrast": self.contrast,
            "table": self.table,
            "implants": [i.to_dict() for i in self.implants],
        }


BRAIN_BOTTOM_REF_MM = 135.0  # brain is drawn above this (the posterior fossa's lowest part; reference mm)
SKULL_BOTTOM_REF_MM = 118.0  # the skull vault is drawn above this (the skull base's bones down to 135)


def random_patient(rng: np.random.Generator, *, contrast: bool | None = None, arms: str | None = None) -> Patient:
    height = float(np.clip(rng.normal(172.0, 10.0), 150.0, 200.0))
    obese = rng.random() < 0.25
    girth = float(np.clip(rng.normal(1.0, 0.09), 0.8, 1.25)) * (1.18 if obese else 1.0)
    p = Patient(
        seed=int(rng.integers(2**31)),
        height_cm=height,
        girth_lr=girth * float(rng.uniform(0.93, 1.07)) * (height / 175.0) ** 0.5,
        girth_ap=girth * float(rng.uniform(0.9, 1.1)) * (1.08 if obese else 1.0),
        fat_mm=float(rng.uniform(22.0, 55.0) if obese else rng.uniform(4.0, 28.0)),
        arms=arms or ("up" if rng.random() < 0.65 else "down"),
        female=bool(rng.random() < 0.5),
        contrast=bool(rng.random() < 0.5) if contrast is None else contrast,
        table=bool(rng.random() < 0.93),
        table_curve=float(rng.uniform(0.0, 0.0009)),
        table_hu=float(rng.uniform(150.0, 450.0)),
        table_thick=float(rng.uniform(3.0, 8.0)),
    )
    j = lambda sd: float(rng.normal(0.0, sd))  # noqa: E731
    p.hu_jitter = {"fat": j(12), "muscle": j(6), "liver": j(6), "brain": j(3), "lung": j(25), "bone": j(60), "blood": j(5)}
    # lung vessels: segments radiating from the hilum, tapering towards the periphery
    k = 260
    side = rng.choice([-1.0, 1.0], k)
    r0 = rng.uniform(LANDMARKS["lung_apex"] + 8, LANDMARKS["lung_base"], k)
    length = rng.uniform(10, 45, k)
    rad = rng.uniform(0.05, 1.0, k)
    x0 = rng.uniform(0.05, 0.95, k)
    y0 = rng.uniform(-0.85, 0.85, k)
    dx = rng.normal(0, 0.12, k)
    dy = rng.normal(0, 0.12, k)
    radius = 0.6 + 3.4 * (1 - x0) ** 1.5 * rad
    p.vessels = np.stack([r0, r0 + length, x0, y0, x0 + dx, y0 + dy, radius, side], 1)
    # bowel loops: ellipsoids of fluid or gas in the abdomen and pelvis
    k = 70
    p.bowel = np.stack(
        [
            rng.uniform(LANDMARKS["renal_hilum"] - 20, LANDMARKS["pubic_symphysis"] - 30, k),
            rng.uniform(-0.75, 0.75, k),
            rng.uniform(-0.75, 0.25, k),
            rng.uniform(8, 30, k),
            rng.uniform(7, 22, k),
            rng.uniform(7, 20, k),
            (rng.random(k) < 0.3).astype(float),
        ],
        1,
    )
    return p


def add_implant(p: Patient, rng: np.random.Generator, r_center: float, severity: float) -> Implant:
    """An implant typical for this level of the body, sized by ``severity`` (0 subtle .. 1 gross)."""
    s = p.scale
    r = r_center
    if r < 150:
        kind, x, y = "dental", float(rng.uniform(-25, 25)), -70.0 * p.girth_ap
        size, dens, span = 2.0 + 5.0 * severity, 10.0 + 10.0 * severity, 8 + 10 * severity
    elif 280 < r < 350 and rng.random() < 0.5:
        kind, x, y = "pacemaker", 60.0 * p.girth_lr, -85.0 * p.girth_ap
        size, dens, span = 3.0 + 9.0 * severity, 4.0 + 5.0 * severity, 25.0
    elif LANDMARKS["acetabular_roof"] - 20 < r < LANDMARKS["mid_thigh"] and rng.random() < 0.7:
        side = float(rng.choice([-1.0, 1.0]))
        kind, x, y = "hip", side * 95.0 * p.girth_lr, -5.0
        size, dens, span = 8.0 + 12.0 * severity, 6.0 + 5.0 * severity, 60.0
    elif rng.random() < 0.6 and r > 160:
        kind, x, y = "spine_screws", 0.0, 0.55 * 100.0 * p.girth_ap
        size, dens, span = 2.5 + 3.5 * severity, 4.0 + 6.0 * severity, 30.0 + 30 * severity
    else:
        kind, x, y = "clip", float(rng.uniform(-60, 60)), float(rng.uniform(-50, 40))
        size, dens, span = 1.5 + 6.0 * severity, 6.0 + 8.0 * severity, 6.0 + 10 * severity
    imp = Implant(kind, r - span / 2 / s, r + span / 2 / s, x, y, size, dens)
    p.implants.append(imp)
    return imp


# ------------------------------------------------------------------------------------------ rasteriser
HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 50.0,
    "blood": 40.0,
    "liver": 60.0,
    "spleen": 48.0,
    "kidney": 32.0,
    "brain_gm": 40.0,
    "brain_wm": 28.0,
    "csf": 6.0,
    "lung": -860.0,
    "cortical": 1200.0,
    "cancellous": 230.0,
    "marrow_fatty": 40.0,
    "cartilage": 110.0,
    "bladder": 8.0,
    "bowel_fluid": 20.0,
    "thyroid": 90.0,
    "eye": 12.0,
    "enamel": 2500.0,
}


def _prof(r: float, pts: list[tuple[float, float]]) -> float:
    xs, ys = zip(*pts)
    return float(np.interp(r, xs, ys))


class _Canvas:
    def __init__(self, X: np.ndarray, Y: np.ndarray):
        self.X, self.Y = X, Y
        self.hu = np.full(X.shape, HU["air"], np.float32)
        self.metal = np.zeros(X.shape, np.float32)  # μ/μ_water of metal
        self.table = np.zeros(X.shape, bool)
        # the grid is regular (meshgrid): rows share Y, columns share X
        self._xs = np.ascontiguousarray(X[0, :]) if X.ndim == 2 and X.shape[0] else np.zeros(0)
        self._ys = np.ascontiguousarray(Y[:, 0]) if Y.ndim == 2 and Y.shape[0] else np.zeros(0)

    def ell(self, cx, cy, a, b, angle=0.0, p=2.0):
        """Mask of an ellipse (superellipse for p != 2), evaluated only inside its bounding box."""
        out = np.zeros(self.X.shape, bool)
        if a <= 0 or b <= 0:
            return out
        R = max(a, b) * (1.0 if p >= 2.0 else 1.5)
        i0, i1 = np.searchsorted(self._ys, [cy - R, cy + R])
        j0, j1 = np.searchsorted(self._xs, [cx - R, cx + R])
        if i1 <= i0 or j1 <= j0:
            return out
        dx = self.X[i0:i1, j0:j1] - cx
        dy = self.Y[i0:i1, j0:j1] - cy
        if angle:
            c, s = math.cos(angle), math.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        if p == 2.0:
            out[i0:i1, j0:j1] = (dx / a) ** 2 + (dy / b) ** 2 <= 1.0
        else:
            out[i0:i1, j0:j1] = np.abs(dx / a) ** p + np.abs(dy / b) ** p <= 1.0
        return out

    def paint(self, mask, value):
        self.hu[mask] = value


def rasterize(p: Patient, r: float, X: np.ndarray, Y: np.ndarray) -> _Canvas:
    """HU map of the axial slice at reference position ``r`` (mm below the vertex) on the grid X, Y (mm)."""
    cv = _Canvas(X, Y)
    s = p.scale
    gl, ga = p.girth_lr, p.girth_ap
    jit = p.hu_jitter
    fat = HU["fat"] + jit.get("fat", 0)
    muscle = HU["muscle"] + jit.get("muscle", 0)
    bone_c = HU["cortical"] + jit.get("bone", 0)
    con = p.contrast
    blood = (HU["blood"] + jit.get("blood", 0)) if not con else 230.0 + jit.get("blood", 0) * 8
    L = LANDMARKS

    def bone(cx, cy, a, b, angle=0.0, shell=2.5, inner=None):
        outer = cv.ell(cx, cy, a, b, angle)
        cv.paint(outer, bone_c)
        if a > shell + 1 and b > shell + 1:
            cv.paint(cv.ell(cx, cy, a - shell, b - shell, angle), HU["cancellous"] if inner is None else inner)

    table_top = None
    # ---------------------------------------------------------------- body outline
    if r < L["lung_apex"] - 5:  # head and neck
        # head: a dome from the vertex; face below the orbits; neck from C2
        hr = 1.0 * (0.5 + 0.5 * s)
        if r < 100:
            f = math.sqrt(max(0.0, 1 - ((100 - r) / 100) ** 2))
            a, b, cy = 74 * f * hr, 94 * f * hr, 0.0
        elif r < 150:
            a, b, cy = _prof(r, [(100, 74), (150, 64)]) * hr, _prof(r, [(100, 94), (150, 92)]) * hr, _prof(r, [(100, 0), (150, -8)])
        elif r < 185:
            a, b, cy = _prof(r, [(150, 64), (185, 56)]) * hr, _prof(r, [(150, 92), (185, 62)]) * hr, _prof(r, [(150, -8), (185, 0)])
        else:
            a, b, cy = 56 * hr * gl**0.5, 60 * hr * ga**0.5, 5.0
        # head rests on the head holder: bring the back of the head to the table line
        head = cv.ell(0, cy, a, b)
        soft = muscle if r > 150 else muscle - 10
        cv.paint(head, soft)
        if r < 150:
            cv.paint(head & ~cv.ell(0, cy, a - 2.5, b - 2.5), fat)  # scalp
        table_top = cy + b + 3
        if r < BRAIN_BOTTOM_REF_MM:  # skull and brain
            if r < SKULL_BOTTOM_REF_MM:
                ta = 6.5 * hr
                skull = cv.ell(0, cy, a - 3, b - 3) & ~cv.ell(0, cy, a - 3 - ta, b - 3 - ta)
                cv.paint(skull, bone_c + 200)
                cv.paint(cv.ell(0, cy, a - 3 - 2, b - 3 - 2) & ~cv.ell(0, cy, a - 3 - ta + 2, b - 3 - ta + 2), 500.0)
                brain = cv.ell(0, cy, a - 3 - ta, b - 3 - ta)
                cv.paint(brain, HU["brain_gm"] + jit.get("brain", 0))
                if a > 30:
                    cv.paint(cv.ell(0, cy, (a - 3 - ta) * 0.78, (b - 3 - ta) * 0.8) & brain, HU["brain_wm"] + jit.get("brain", 0))
                if 35 < r < 85:  # lateral ventricles
                    w = 1 - abs(r - 60) / 30
                    cv.paint(cv.ell(-9, cy - 5, 5 * w + 1, 28 * w + 2, 0.15), HU["csf"])
                    cv.paint(cv.ell(9, cy - 5, 5 * w + 1, 28 * w + 2, -0.15), HU["csf"])
                if 8 < r < 30:
                    cv.paint(cv.ell(0, cy, a - 3 - ta, b - 3 - ta) & ~cv.ell(0, cy, a - 5 - ta, b - 5 - ta), HU["csf"])
            if 60 < r < 82:  # frontal sinus
                cv.paint(cv.ell(0, cy - b + 14, 12, 5), HU["air"])
            if 72 < r < 108:  # orbits: fat cone with the globe
                for sx in (-1, 1):
                    cv.paint(cv.ell(sx * 32 * hr, cy - b + 26, 17, 20), fat)
                    if 78 < r < 102:
                        cv.paint(cv.ell(sx * 32 * hr, cy - b + 20, 12, 12), HU["eye"])
                cv.paint(cv.ell(0, cy - b + 28, 7, 18), HU["air"])  # ethmoid / nasal cavity
            if 100 < r < BRAIN_BOTTOM_REF_MM:  # skull base: petrous bones, clivus, mastoids, maxillary sinuses, nasal cavity
                for sx in (-1, 1):
                    bone(sx * 36 * hr, cy + 18, 26, 8, sx * 0.6, shell=3, inner=bone_c + 300)
                    cv.paint(cv.ell(sx * 48 * hr, cy + 38, 8, 9), HU["air"])
                    if r > 108:
                        cv.paint(cv.ell(sx * 28 * hr, cy - b + 35, 15, 17), HU["air"])
                        bone(sx * 28 * hr, cy - b + 35, 17, 19, 0, shell=1.5, inner=HU["air"])
                bone(0, cy + 8, 11, 14, shell=3)
                cv.paint(cv.ell(0, cy - b + 22, 8, 16), HU["air"])
                cv.paint(cv.ell(0, cy + 35, 16, 18), HU["brain_gm"])  # brainstem / posterior fossa
        if 118 <= r < 175:  # maxilla, teeth, mandible, tongue, pharynx
            cv.paint(cv.ell(0, cy + 5, 9, 7), HU["air"])  # pharynx
            if r < 150:
                arch = cv.ell(0, cy - b + 35, 34 * hr, 30) & ~cv.ell(0, cy - b + 35, 26 * hr, 22) & (cv.Y < cy - b + 40)
                cv.paint(arch, HU["enamel"] if 128 < r < 145 else bone_c)
            if r > 138:
                # a U open behind: its angles end in front of the spine (a whole ellipse would close a
                # ring of bone round the pharynx where the neck is short from front to back)
                mand = cv.ell(0, cy - b + 40, 48 * hr, 45) & ~cv.ell(0, cy - b + 40, 42 * hr, 39) & (cv.Y < min(cy + 10, cy - b + 70))
                cv.paint(mand, bone_c)
            bone(0, cy + 22, 10, 10, shell=2)  # C1/C2
        if r >= 150:  # neck: spine, airway, vessels, thyroid
            bone(0, cy + 0.35 * b, 9 + (r - 150) * 0.03, 8, shell=2)
            cv.paint(cv.ell(0, cy + 0.35 * b + 14, 7, 6), HU["csf"])
            bone(0, cy + 0.35 * b + 22, 16, 5, shell=2)  # lamina
            if r > 175:
                cv.paint(cv.ell(0, cy - 0.25 * b, 8, 7), HU["air"])  # trachea / larynx
                if 185 < r < 215:
                    cv.paint(cv.ell(0, cy - 0.25 * b, 12, 10) & ~cv.ell(0, cy - 0.25 * b, 9, 8), HU["cartilage"] + 150)
                for sx in (-1, 1):
                    cv.paint(cv.ell(sx * 20, cy - 0.05 * b, 4.0, 4.0), blood)  # carotid
                    cv.paint(cv.ell(sx * 28, cy - 0.05 * b, 5.5, 4.5), blood - (60 if con else 0))  # jugular
                    if 205 < r < 240:
                        cv.paint(cv.ell(sx * 13, cy - 0.2 * b, 8, 9), HU["thyroid"] + (60 if con else 0))
    else:
        # ------------------------------------------------------------ torso and legs
        A = _prof(r, [(250, 62), (265, 130), (290, 168), (340, 160), (450, 155), (560, 148), (665, 160), (800, 172), (880, 168)]) * gl
        B = _prof(r, [(250, 62), (290, 92), (400, 108), (560, 102), (700, 100), (880, 98)]) * ga
        B *= 1.0 + 0.08 * (p.fat_mm / 40.0) * (500 < r < 800)
        fatm = p.fat_mm * (0.6 if r < 320 else 1.0)
        legs = r > 890
        cy = 0.0
        table_top = cy + B + 2
        if not legs:
            body = cv.ell(0, cy, A, B, p=2.3)
            cv.paint(body, fat)
            Ai, Bi = A - fatm, B - fatm * 0.9
            inner = cv.ell(0, cy, Ai, Bi, p=2.3)
            cv.paint(inner, muscle)
        else:
            Ai, Bi = A, B
            for sx in (-1, 1):
                la = _prof(r, [(890, 92), (1100, 78)]) * gl
                lb = _prof(r, [(890, 90), (1100, 80)]) * ga
                cx = sx * _prof(r, [(890, 78), (1100, 95)]) * gl
                cv.paint(cv.ell(cx, cy, la, lb), fat)
                cv.paint(cv.ell(cx, cy, la - p.fat_mm, lb - p.fat_mm), muscle)
                fx = cx + sx * _prof(r, [(890, 0), (1100, -10)])
                bone(fx, cy - 5, 14, 14, shell=5, inner=HU["marrow_fatty"])
            table_top = cy + B + 2

        def U(u):
            return u * Ai

        def V(v):
            return cy + v * Bi

        if not legs:
            # spine (vertebral body + canal + posterior elements), paraspinal muscles
            vb = _prof(r, [(250, 12), (400, 15), (560, 19), (650, 21)]) * s
            if r < L["iliac_crest"] + 40:
                vy = V(0.55)
                bone(0, vy, vb * 1.1, vb, shell=2.5)
                cv.paint(cv.ell(0, vy + vb + 8, 8, 7), HU["csf"])
                bone(0, vy + vb + 18, 18, 6, shell=2.5)
                bone(0, vy + vb + 30, 5, 10, shell=2)
            # --------------------------------------------------- thorax
            if L["lung_apex"] - 5 <= r < L["lung_base"] + 20:
                dome_top = L["liver_dome"]
                base = L["lung_base"]
                # diaphragm height: highest (dome) in the middle of each hemithorax, lowest posterolaterally
                for sx in (-1, 1):
                    lx = sx * 0.5 * Ai
                    apex_f = min(1.0, (r - L["lung_apex"] + 5) / 55.0)
                    la, lb = 0.42 * Ai * apex_f ** 0.6, 0.72 * Bi * apex_f ** 0.6
                    ly = V(0.02 + 0.25 * (1 - apex_f))
                    lung = cv.ell(lx, ly, la, lb)
                    du = (cv.X - lx) / max(la, 1)
                    dv = (cv.Y - ly) / max(lb, 1)
                    d_r = dome_top + (5 if sx < 0 else 25) + (base - dome_top - (5 if sx < 0 else 25)) * np.clip(1.0 * (du**2) + 1.5 * np.clip(dv, 0, None) ** 2 + 0.3 * np.clip(-dv, 0, None) ** 2, 0, 1) ** 0.7
                    lung &= r < d_r
                    # lung: gravity-dependent density, posterior denser
                    lung_hu = HU["lung"] + jit.get("lung", 0) + 60 * np.clip(dv, 0, 1)
                    cv.hu[lung] = lung_hu[lung]
                    # vessels
                    ves = p.vessels
                    if ves is not None:
                        sel = (ves[:, 0] <= r) & (ves[:, 1] >= r) & (ves[:, 7] == sx)
                        for r0, r1, x0, y0, x1, y1, rad, _ in ves[sel]:
                            t = (r - r0) / max(r1 - r0, 1e-3)
                            vx = lx + sx * (1 - (x0 + t * (x1 - x0))) * la * 0.95
                            vy2 = ly + (y0 + t * (y1 - y0)) * lb * 0.9
                            m = cv.ell(vx, vy2, rad, rad) & lung
                            cv.paint(m, blood if con else 40.0)
                # mediastinum: heart, aorta, trachea/bronchi, pulmonary arteries
                if r < L["carina"]:
                    cv.paint(cv.ell(0, V(-0.05), 8, 8), HU["air"])
                elif r < L["carina"] + 25:
                    for sx in (-1, 1):
                        cv.paint(cv.ell(sx * 14, V(0.02), 6, 6), HU["air"])
                if 300 < r < 345:  # arch
                    cv.paint(cv.ell(-8, V(-0.1), 30 * (1 if r < 320 else 0.5), 11), blood)
                if 330 < r < 380:  # ascending aorta and pulmonary trunk
                    cv.paint(cv.ell(-12, V(-0.35), 15, 15), blood)
                    cv.paint(cv.ell(18, V(-0.38), 14, 13), blood - (30 if con else 0))
                if r > 320:
                    cv.paint(cv.ell(22, V(0.35), 12, 12), blood)  # descending aorta
                if 370 < r < L["liver_dome"] + 40:
                    hf = math.sin(math.pi * (r - 370) / (L["liver_dome"] + 40 - 370))
                    heart = cv.ell(18, V(-0.2), 62 * hf * gl ** 0.3 + 5, 48 * hf + 5, 0.5)
                    cv.paint(heart, 45.0 + (80 if con else 0))
                    if con:
                        cv.paint(cv.ell(30, V(-0.15), 28 * hf + 2, 20 * hf + 2, 0.5), blood)
                        cv.paint(cv.ell(0, V(-0.3), 22 * hf + 2, 16 * hf + 2, 0.5), blood - 60)
                    cv.paint(cv.ell(18, V(-0.2), 62 * hf * gl ** 0.3 + 7, 48 * hf + 7, 0.5) & ~heart & (cv.hu < -500), fat)
                # sternum
                if L["sternal_notch"] < r < L["liver_dome"] + 20:
                    bone(0, V(-0.97), 14 if r < 300 else 10, 6, shell=2)
                # clavicles, scapulae
                if r < L["sternal_notch"] + 15:
                    for sx in (-1, 1):
                        bone(sx * 0.55 * Ai, V(-0.8), 0.4 * Ai, 6, sx * 0.35, shell=3)
                if r < 420:
                    for sx in (-1, 1):
                        bone(sx * 0.65 * Ai, V(0.78), 0.28 * Ai, 4, -sx * 0.45, shell=2)
            # ribs: oblique hoops seen as oval cross-sections around the chest wall
            if L["lung_apex"] - 5 < r < L["renal_hilum"] + 20:
                ang = np.arctan2(cv.X / max(Ai, 1), -(cv.Y - cy) / max(Bi, 1))  # 0 anterior, ±π posterior
                rad = np.sqrt((cv.X / max(Ai, 1)) ** 2 + ((cv.Y - cy) / max(Bi, 1)) ** 2)
                # a rib descends ~90 mm from its posterior end to the anterior costal cartilage; the slice
                # cuts each hoop obliquely: an oval of bone (cortex around marrow) in the chest wall
                thick = 9.0 / max(Ai, 1.0)
                mid = 0.95
                phase = (r + 90.0 * (1 - np.abs(ang) / math.pi)) / (26.0 * s)
                c = np.cos(2 * math.pi * phase)
                along = np.clip((c - 0.6) / 0.4, 0.0, 1.0)  # 0 at the rib's ends, 1 in its middle
                half = 0.5 * thick * np.sqrt(along)
                rib = (np.abs(rad - mid) < half) & ((r - L["lung_apex"]) > 0)
                if r > L["lung_base"]:
                    rib &= np.abs(ang) > 1.0
                marrow = rib & (np.abs(rad - mid) < half - 1.8 / max(Ai, 1.0))
                cart = np.abs(ang) < 0.5
                cv.hu[rib] = np.where(cart[rib], HU["cartilage"] + 40, 900.0 + jit.get("bone", 0))
                cv.hu[marrow & ~cart] = 260.0
            # --------------------------------------------------- abdomen
            if L["liver_dome"] <= r < 640:
                # liver: right upper quadrant (patient right = -x), under the right dome
                lf = min(1.0, (r - L["liver_dome"]) / 40.0) if r < 560 else max(0.0, (640 - r) / 80.0)
                liver_hu = HU["liver"] + jit.get("liver", 0) + (50 if con else 0)
                if lf > 0:
                    liv = cv.ell(-0.35 * Ai, V(0.0), 0.6 * Ai * lf ** 0.5, 0.78 * Bi * lf ** 0.5, 0.3) & (cv.hu > -200)
                    if r < L["lung_base"] + 15:
                        liv &= cv.hu > -500
                    cv.paint(liv, liver_hu)
                    if con:  # portal / hepatic veins
                        for k, (ux, vy) in enumerate(((-0.3, -0.1), (-0.45, 0.2), (-0.2, 0.3))):
                            cv.paint(cv.ell(U(ux), V(vy), 4, 4) & liv, 160.0)
                if 440 < r < 560:  # spleen and stomach
                    sf = math.sin(math.pi * (r - 440) / 120)
                    cv.paint(cv.ell(0.62 * Ai, V(0.35), 0.2 * Ai * sf + 2, 0.35 * Bi * sf + 2, -0.6) & (cv.hu > -200), HU["spleen"] + (70 if con else 0))
                    st = cv.ell(0.3 * Ai, V(-0.35), 0.25 * Ai * sf + 2, 0.3 * Bi * sf + 2) & (cv.hu > -200)
                    cv.paint(st, 25.0)
                    cv.paint(st & (cv.Y < V(-0.48)), HU["air"])
                if 545 < r < 580:
                    cv.paint(cv.ell(-0.25 * Ai, V(-0.25), 14, 18), 12.0)  # gallbladder
                if 540 < r < 575:
                    cv.paint(cv.ell(0.05 * Ai, V(0.05), 0.35 * Ai, 10, -0.2), 45.0 + (50 if con else 0))  # pancreas
            if L["kidney_top"] - 15 <= r < 640:
                for sx, off in ((-1, 15), (1, 0)):  # right kidney a little lower
                    rr = r - off
                    if L["kidney_top"] <= rr < 620:
                        kf = math.sin(math.pi * (rr - L["kidney_top"]) / (620 - L["kidney_top"]))
                        kc = (U(sx * 0.4), V(0.48))
                        kid = cv.ell(kc[0], kc[1], 28 * kf + 3, 40 * kf + 3, sx * 0.5)
                        cv.paint(kid, (HU["kidney"] + 140) if con else HU["kidney"])
                        if con:
                            cv.paint(cv.ell(kc[0], kc[1], 14 * kf + 1, 24 * kf + 1, sx * 0.5), 100.0)
                        cv.paint(cv.ell(kc[0], kc[1], 33 * kf + 5, 45 * kf + 5, sx * 0.5) & ~kid & (cv.hu > -200) & (cv.hu < 100), fat)
            if L["liver_dome"] < r < L["iliac_crest"]:
                cv.paint(cv.ell(U(0.18), V(0.3), 11, 11), blood)  # aorta
                cv.paint(cv.ell(U(-0.18), V(0.28), 13, 10), blood - (80 if con else 0))  # IVC
            # psoas
            if 560 < r < 820:
                pf = min(1.0, (r - 560) / 80)
                for sx in (-1, 1):
                    cv.paint(cv.ell(sx * (25 + 20 * pf), V(0.45), 12 + 10 * pf, 14 + 6 * pf), muscle)
            # bowel and mesenteric fat
            if L["renal_hilum"] - 30 < r < L["pubic_symphysis"] - 10 and p.bowel is not None:
                bw = p.bowel
                sel = np.abs(bw[:, 0] - r) < bw[:, 3]
                for br, u, v, rr, ru, rv, gas in bw[sel]:
                    f = math.sqrt(max(0.0, 1 - ((br - r) / rr) ** 2))
                    m = cv.ell(U(u), V(v), ru * f + 1, rv * f + 1) & (cv.hu > -300) & (cv.hu < 90)
                    cv.paint(m, HU["air"] if gas > 0.5 else HU["bowel_fluid"] + (0 if not con else 20))
                    cv.paint(cv.ell(U(u), V(v), ru * f + 3, rv * f + 3) & ~m & (cv.hu > -300) & (cv.hu < 90), 55.0)
            # --------------------------------------------------- pelvis
            if L["iliac_crest"] - 10 < r < L["ischial_tuberosity"] + 10:
                wide = 1.1 if p.female else 1.0
                if L["iliac_crest"] <= r < L["acetabular_roof"]:  # iliac wings: the crest is their top
                    t = (r - L["iliac_crest"]) / (L["acetabular_roof"] - L["iliac_crest"])
                    for sx in (-1, 1):
                        bone(sx * (0.62 - 0.22 * t) * Ai * wide, V(0.25 - 0.15 * t), 0.28 * Ai * (1 - 0.4 * t), 7 + 6 * t, -sx * (0.9 - 0.5 * t), shell=2.5)
                if r < L["acetabular_roof"] + 20:  # sacrum
                    bone(0, V(0.6), 0.25 * Ai, 14, shell=3)
                if L["acetabular_roof"] - 5 < r < L["femoral_head"] + 40:  # femoral heads and acetabula
                    hf = math.sqrt(max(0.0, 1 - ((r - L["femoral_head"]) / 30.0) ** 2))
                    for sx in (-1, 1):
                        fx = sx * 0.55 * Ai * wide
                        if r < L["femoral_head"] + 15:
                            bone(fx, V(0.05), 24 * hf * s + 2, 24 * hf * s + 2, shell=2.5)
                        else:
                            bone(fx + sx * 15, V(0.05), 20, 16, sx * 0.5, shell=3)
                if L["femoral_head"] + 30 < r:
                    for sx in (-1, 1):
                        bone(sx * 0.62 * Ai, V(0.05), 15, 15, shell=5, inner=HU["marrow_fatty"])
                if L["pubic_symphysis"] - 25 < r < L["ischial_tuberosity"] + 5:  # pubis, ischium
                    for sx in (-1, 1):
                        bone(sx * 0.22 * Ai * wide, V(-0.7), 0.2 * Ai, 8, sx * 0.4, shell=2.5)
                        bone(sx * 0.4 * Ai * wide, V(0.35), 12, 20, shell=2.5)
                if L["acetabular_roof"] - 20 < r < L["pubic_symphysis"] + 10:  # bladder, rectum
                    bf = math.sin(math.pi * (r - L["acetabular_roof"] + 20) / (L["pubic_symphysis"] + 30 - L["acetabular_roof"]))
                    cv.paint(cv.ell(0, V(-0.35), 0.35 * Ai * bf + 2, 0.4 * Bi * bf + 2), HU["bladder"])
                    cv.paint(cv.ell(0, V(0.45), 14, 12), 35.0)
                    cv.paint(cv.ell(0, V(0.45), 6, 5), HU["air"])
        # arms
        if p.arms == "down" and L["sternal_notch"] - 10 < r < 960:
            for sx in (-1, 1):
                ax = sx * (A + 48 * gl)
                cv.paint(cv.ell(ax, cy + 0.1 * B, 45 * gl, 48 * ga), fat)
                cv.paint(cv.ell(ax, cy + 0.1 * B, 45 * gl - 6, 48 * ga - 6), muscle)
                if r < 580:
                    bone(ax, cy + 0.1 * B, 11, 11, shell=4, inner=HU["marrow_fatty"])
                else:
                    bone(ax - 8, cy + 0.1 * B, 7, 7, shell=3)
                    bone(ax + 8, cy + 0.1 * B - 5, 6, 6, shell=3)
            table_top = max(table_top, cy + 0.1 * B + 48 * ga + 2)
    if p.arms == "up" and r < L["lung_apex"] + 20:
        # arms raised beside the head
        hw = 75 if r < 150 else 60
        for sx in (-1, 1):
            ax = sx * (hw + 55) * gl
            cv.paint(cv.ell(ax, 20, 42 * gl, 45 * ga), fat)
            cv.paint(cv.ell(ax, 20, 36 * gl, 39 * ga), muscle)
            bone(ax, 20, 11, 11, shell=4, inner=HU["marrow_fatty"])
        table_top = max(table_top or 0.0, 20 + 45 * ga + 2)
    # metal implants
    for imp in p.implants:
        if imp.r_top <= r <= imp.r_bottom:
            _paint_implant(cv, imp, r)
    # table; the head lies in a narrow, curved head holder
    if p.table and table_top is not None:
        holder = r < L["hyoid"] and p.arms != "up"  # arms raised: the head lies on the table pad
        half = 105.0 if holder else 235.0
        curve = 0.0025 if holder else p.table_curve
        t0 = table_top + (3.0 if holder else 8.0)  # mattress / cushion
        yt = t0 - curve * cv.X**2
        shell = (cv.Y >= yt) & (cv.Y <= yt + p.table_thick) & (np.abs(cv.X) < half)
        core = (cv.Y > yt + p.table_thick) & (cv.Y <= yt + p.table_thick + (10 if holder else 30)) & (np.abs(cv.X) < half - 10)
        bottom = (cv.Y > yt + p.table_thick + (10 if holder else 30)) & (cv.Y <= yt + 2 * p.table_thick + (10 if holder else 30)) & (np.abs(cv.X) < half - 10)
        pad = (cv.Y >= t0 - 8) & (cv.Y < yt) & (np.abs(cv.X) < half - 15) & (cv.hu < -900)
        cv.paint(pad, -880.0)
        cv.paint(shell | bottom, p.table_hu)
        cv.paint(core, -950.0)
        cv.table = pad | shell | core | bottom
    return cv


def _paint_implant(cv: _Canvas, imp: Implant, r: float) -> None:
    mask = None
    if imp.kind == "dental":
        mask = cv.ell(imp.x, imp.y, imp.size * 1.4, imp.size)
        mask |= cv.ell(-imp.x, imp.y + 3, imp.size * 0.9, imp.size * 0.8)
    elif imp.kind == "hip":
        mid = 0.5 * (imp.r_top + imp.r_bottom)
        if r < mid - 10:  # femoral head component (ball)
            mask = cv.ell(imp.x, imp.y, imp.size * 1.3, imp.size * 1.3)
        else:  # stem
            mask = cv.ell(imp.x, imp.y, imp.size * 0.55, imp.size * 0.7)
    elif imp.kind == "spine_screws":
        for sx in (-1, 1):
            m = cv.ell(imp.x + sx * 14, imp.y - 2, imp.size * 4, imp.size, sx * 0.35)
            mask = m if mask is None else mask | m
    elif imp.kind == "pacemaker":
        mask = cv.ell(imp.x, imp.y, imp.size * 2.2, imp.size * 0.6)
    else:
        mask = cv.ell(imp.x, imp.y, imp.size, imp.size * 0.8)
    cv.metal[mask] = np.maximum(cv.metal[mask], imp.density)
    cv.hu[mask] = 3071.0


def landmark_positions(p: Patient, z_vertex: float) -> dict[str, float]:
    return {k: float(z_vertex - v * p.scale) for k, v in LANDMARKS.items()}
