"""Training sampler: independent synthetic CT slices with physics-derived artifact labels.

Every slice is simulated, not pasted: a random patient is rasterised at a random craniocaudal position
(uniform from the vertex to mid-thigh), forward projected, corrupted in the projection domain (metal,
motion, ring, noise, truncation), reconstructed by filtered back-projection with a randomly chosen kernel
and resampled onto a random display matrix and field of view with a vendor padding habit. Labels come
from the physics that was injected (metal area × density, motion amplitude, ring contrast, measured noise,
fraction of the body outside the scan field).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medqc import ARTIFACTS
from medqc.anatomy import BODY_SCALE_MAX, LANDMARKS
from medqc.synth import ct
from medqc.synth.phantom import Patient, add_implant, random_patient, rasterize

SIM_N = 256  # simulation grid (pixels); physical pixel = extent / SIM_N
NOISE_CLEAN_MAX = 14.0  # HU σ at 2 mm (the network's view) below which noise is not an artifact
NOISE_ARTIFACT_MIN = 20.0  # σ at 2 mm from which noise is labelled excessive
NOISE_GROSS = 60.0


@dataclass
class TrainingSlice:
    hu: np.ndarray  # (H, W) float32 reconstructed HU, vendor padding outside the FOV circle if any
    pixel_spacing: tuple  # (row, col) mm
    artifacts: dict  # every name in medqc.ARTIFACTS → severity in [0, 1]; 0 = absent
    position_ref_mm: float
    meta: dict = field(default_factory=dict)


@dataclass
class SliceSpec:
    """Everything that defines one simulated slice (the study writer fills these per slice)."""

    r: float  # reference position (mm below vertex)
    matrix: int = 512
    fov_mm: float = 400.0
    center: tuple = (0.0, 0.0)  # display centre (x, y) mm
    kernel: str = "standard"
    kvp: float = 120.0
    noise_sigma: float = 6.0  # target noise σ (HU) at 2 mm pixels in the body
    sfov_mm: float = 500.0
    padding: float | None = -1024.0  # value outside the reconstruction circle, None = no padding
    n_views: int = 256
    sim_n: int = SIM_N
    motion_mm: float = 0.0  # amplitude of patient motion during the rotation
    motion_kind: str = "shift"
    ring: float = 0.0  # ring severity 0..1
    metal: float = 0.0  # (already placed implants are in the patient)
    truncation_extended: bool = False  # show the extended (beyond SFOV) reconstruction instead of padding


def simulate_slice(p: Patient, spec: SliceSpec, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Simulate one slice. Returns (HU on the display grid, measured physics dict)."""
    # simulation extent: must hold the whole object (table included) and the display field
    extent = max(spec.fov_mm * (1.42 if spec.padding is None else 1.0) + 2 * max(abs(spec.center[0]), abs(spec.center[1])), 300.0 if spec.r < 240 else 540.0)
    n = spec.sim_n
    px = extent / n
    c = (np.arange(n) - (n - 1) / 2) * px
    X, Y = np.meshgrid(c, c)
    cv = rasterize(p, spec.r, X, Y)
    inside = X**2 + Y**2 < (extent / 2 - px) ** 2
    hu = np.where(inside, cv.hu, -1000.0)
    mu_w = ct.mu_water(spec.kvp)
    mu = np.maximum(mu_w * (1.0 + hu / 1000.0), 0.0)
    metal = cv.metal * inside
    if metal.any():
        mu = np.where(metal > 0, 0.0, mu)
    geo = ct.Geometry(n, spec.n_views, n)
    motion = None
    if spec.motion_mm > 0:
        t = np.linspace(0.0, 1.0, spec.n_views)
        amp = spec.motion_mm / px
        if spec.motion_kind == "shift":  # a jerk: the patient moves part-way through the rotation
            t0 = rng.uniform(0.2, 0.7)
            w = rng.uniform(0.05, 0.25)
            prof = 1.0 / (1.0 + np.exp(-(t - t0) / (w / 6)))
            ang = rng.uniform(0, 2 * math.pi)
            motion = np.stack([amp * math.cos(ang) * prof, amp * math.sin(ang) * prof, np.zeros_like(t)], 1)
        else:  # breathing / tremor: smooth oscillation, mostly antero-posterior, plus a little rotation
            f = rng.uniform(0.5, 2.0)
            ph = rng.uniform(0, 2 * math.pi)
            osc = np.sin(2 * math.pi * f * t + ph)
            motion = np.stack([0.3 * amp * osc, amp * osc, np.radians(spec.motion_mm * 0.2) * osc], 1)
    sino = ct.project(mu, geo, px, motion)
    pm = None
    if metal.any():
        pm_lin = ct.project(metal * mu_w, geo, px, motion)
        pm = ct.beam_hardening(pm_lin, 0.035)
        sino = sino + pm
    # dose: choose I0 so that the noise σ at 2 mm in water-like tissue meets the target (calibrated
    # below by measuring the reconstructed noise); photon starvation uses the resulting I0
    i0_guess = 2.0e5 * (8.0 / max(spec.noise_sigma, 0.5)) ** 2
    bt = ct.bowtie(n, px)[None, :]
    if pm is not None:  # photon starvation: counts clipped at the electronic noise floor → biased, noisy rays
        lam = i0_guess * bt * np.exp(-sino)
        floor = 6.0
        starved = lam < floor
        sino = np.where(starved, -np.log(np.maximum(lam, 0) * 0 + floor / (i0_guess * bt)), sino)
    noise = ct.gaussian_noise_sino(sino, i0_guess, px, rng)
    ring_sino = np.zeros_like(sino)
    if spec.ring > 0:
        amp = 0.004 + 0.05 * spec.ring**1.5
        ring_sino = np.broadcast_to(ct.ring_gains(n, rng, int(rng.integers(1, 5)), amp)[None, :], sino.shape).copy()
    trunc_frac = 0.0
    sfov_r = spec.sfov_mm / 2 / px
    body = (cv.hu > -500) & ~cv.table & inside
    if sfov_r < n / 2 - 1:
        rr = np.sqrt(X**2 + Y**2)
        outside = body & (rr > spec.sfov_mm / 2)
        trunc_frac = float(outside.sum() / max(body.sum(), 1))
        sino = ct.truncate(sino, sfov_r)
        noise = np.where(np.abs(np.arange(n) - (n - 1) / 2)[None, :] <= sfov_r, noise, 0.0)
        ring_sino = np.where(np.abs(np.arange(n) - (n - 1) / 2)[None, :] <= sfov_r, ring_sino, 0.0)
    q = np.stack([ct.ramp_filter(x, px, spec.kernel) for x in (sino, noise, ring_sino)])
    rec = ct.backproject(q, geo) / px
    to_hu = 1000.0 / mu_w
    img = (rec[0] - mu_w) * to_hu
    noise_img = rec[1] * to_hu
    ring_img = rec[2] * to_hu
    # measure noise σ at 2 mm (area average) inside soft tissue and scale to the target
    sig = _sigma_2mm(noise_img, body & (np.abs(cv.hu) < 200), px)
    k = spec.noise_sigma / sig if sig > 0 else 1.0
    img = img + k * noise_img + ring_img
    ring_amp = float(np.percentile(np.abs(ring_img[body]), 99.5)) if (spec.ring > 0 and body.any()) else 0.0
    # display grid
    out = _resample(img, px, spec)
    M = spec.matrix
    dpx = spec.fov_mm / M
    dc = (np.arange(M) - (M - 1) / 2) * dpx
    DX, DY = np.meshgrid(dc + spec.center[0], dc + spec.center[1])
    recon_r = min(spec.fov_mm / 2, spec.sfov_mm / 2 if not spec.truncation_extended else 1e9)
    circle = (DX - spec.center[0]) ** 2 + (DY - spec.center[1]) ** 2 <= recon_r**2
    outside_sim = DX**2 + DY**2 > (extent / 2 - px) ** 2
    out = np.where(outside_sim, -1000.0 + rng.normal(0, 3, out.shape), out)
    if spec.padding is not None:
        out = np.where(circle, out, spec.padding)
    elif spec.sfov_mm / 2 < spec.fov_mm / 2 * 1.42 and not spec.truncation_extended:
        out = np.where(DX**2 + DY**2 <= (spec.sfov_mm / 2) ** 2, out, -1000.0)
    out = np.clip(out, -1024.0 if spec.padding is None else min(-1024.0, spec.padding), 3071.0).astype(np.float32)
    metal_area = float((metal > 0).sum() * px * px)
    metal_dens = float(metal[metal > 0].mean()) if metal_area else 0.0
    phys = {
        "sim_pixel_mm": px,
        "noise_sigma_2mm": float(sig * k),
        "i0": float(i0_guess / k**2),
        "ring_amplitude_hu": ring_amp,
        "truncation_fraction": trunc_frac,
        "metal_area_mm2": metal_area,
        "metal_density": metal_dens,
    }
    return out, phys


def _sigma_2mm(noise_img: np.ndarray, mask: np.ndarray, px: float) -> float:
    f = max(1, int(round(2.0 / px)))
    if f > 1:
        h = (noise_img.shape[0] // f) * f
        a = noise_img[:h, :h].reshape(h // f, f, h // f, f).mean((1, 3))
        m = mask[:h, :h].reshape(h // f, f, h // f, f).all((1, 3))
    else:
        a, m = noise_img, mask
    if m.sum() < 20:
        m = np.ones_like(m)
    return float(a[m].std())


def _resample(img: np.ndarray, px: float, spec: SliceSpec) -> np.ndarray:
    import cv2

    n = img.shape[0]
    M = spec.matrix
    dpx = spec.fov_mm / M
    # display pixel (j, i) → sim pixel coordinates
    sx = dpx / px
    ox = ((-(M - 1) / 2) * dpx + spec.center[0]) / px + (n - 1) / 2
    oy = ((-(M - 1) / 2) * dpx + spec.center[1]) / px + (n - 1) / 2
    A = np.array([[sx, 0, ox], [0, sx, oy]], np.float64)
    return cv2.warpAffine(img.astype(np.float32), A, (M, M), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=-1000.0)


# ------------------------------------------------------------------------------------------ severities
def metal_severity(area_mm2: float, density: float) -> float:
    if area_mm2 <= 0:
        return 0.0
    x = area_mm2 * max(density - 1.0, 0.5)
    return float(np.clip((math.log10(x) - 1.3) / 2.6, 0.05, 1.0))


def noise_severity(sigma_2mm: float) -> float:
    if sigma_2mm < NOISE_ARTIFACT_MIN:
        return 0.0
    return float(np.clip(0.1 + 0.9 * (sigma_2mm - NOISE_ARTIFACT_MIN) / (NOISE_GROSS - NOISE_ARTIFACT_MIN), 0.1, 1.0))


def ring_severity(amp_hu: float) -> float:
    if amp_hu < 8.0:
        return 0.0
    return float(np.clip((amp_hu - 8.0) / 150.0, 0.05, 1.0))


def truncation_severity(frac: float) -> float:
    if frac < 0.002:
        return 0.0
    return float(np.clip(frac / 0.15, 0.05, 1.0))


def motion_severity(mm: float) -> float:
    if mm < 1.0:
        return 0.0
    return float(np.clip((mm - 1.0) / 19.0, 0.05, 1.0))


# ------------------------------------------------------------------------------------------ the sampler
PADDINGS = (-1024.0, -2000.0, -2048.0, -3024.0, None)
MATRICES = (256, 384, 512, 512, 512, 512, 512, 768)


def _random_spec(rng: np.random.Generator, r: float, p: Patient) -> SliceSpec:
    head = r < LANDMARKS["lung_apex"] - 20 and rng.random() < 0.85
    if head:
        fov = float(rng.uniform(180, 280))
        kernel = str(rng.choice(["soft", "standard", "standard", "detail", "bone"]))
    else:
        fov = float(np.clip(rng.normal(360, 60) * (p.girth_lr ** 0.8), 250, 500))
        if rng.random() < 0.12:
            fov = float(rng.uniform(180, 260))  # targeted (zoomed) reconstruction
        lungish = LANDMARKS["lung_apex"] < r < LANDMARKS["lung_base"]
        kernel = str(rng.choice(["soft", "standard", "standard", "detail", "lung" if lungish else "bone", "bone"]))
    return SliceSpec(
        r=r,
        matrix=int(rng.choice(MATRICES)),
        fov_mm=fov,
        center=(float(rng.normal(0, 8)), float(rng.normal(0, 12) if not head else rng.normal(0, 8))),
        kernel=kernel,
        kvp=float(rng.choice([80.0, 100.0, 120.0, 120.0, 120.0, 140.0])),
        noise_sigma=float(np.exp(rng.uniform(math.log(2.0), math.log(NOISE_CLEAN_MAX)))),
        sfov_mm=500.0,
        padding=PADDINGS[int(rng.integers(len(PADDINGS)))],
        n_views=256,
    )


def sample_training_slices(n: int, seed: int, *, artifact_rate: float = 0.5) -> list[TrainingSlice]:
    """``n`` independent slices, deterministic for ``seed``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if not 0.0 <= artifact_rate <= 1.0:
        raise ValueError("artifact_rate must be in [0, 1]")
    out: list[TrainingSlice] = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), i, 0x5EED])
        out.append(_one(rng, artifact_rate, seed, i))
    return out


def _one(rng: np.random.Generator, artifact_rate: float, seed: int, index: int) -> TrainingSlice:
    p = random_patient(rng)
    r = float(rng.uniform(-15.0, LANDMARKS["mid_thigh"]))
    spec = _random_spec(rng, r, p)
    chosen: dict[str, float] = {}
    if rng.random() < artifact_rate:
        kinds = [str(rng.choice(ARTIFACTS))]
        if rng.random() < 0.15:
            kinds.append(str(rng.choice(ARTIFACTS)))
        for k in kinds:
            chosen[k] = float(rng.uniform(0.05, 1.0) ** 0.8)
    if "metal" in chosen:
        add_implant(p, rng, r, chosen["metal"])
    if "motion" in chosen:
        spec.motion_mm = 1.5 + 18.0 * chosen["motion"]
        spec.motion_kind = "shift" if rng.random() < 0.6 else "oscillate"
    if "ring" in chosen:
        spec.ring = chosen["ring"]
    if "noise" in chosen:
        spec.noise_sigma = NOISE_ARTIFACT_MIN + 2 + (NOISE_GROSS - NOISE_ARTIFACT_MIN) * chosen["noise"]
    if "truncation" in chosen:
        # the patient is larger than the scan field: a small SFOV (head mode) or a big patient
        width = _body_width(p, r)
        spec.sfov_mm = float(max(150.0, width * (1.0 - 0.04 - 0.3 * chosen["truncation"])))
        spec.fov_mm = float(min(spec.fov_mm, spec.sfov_mm) if rng.random() < 0.6 else max(spec.fov_mm, spec.sfov_mm))
        spec.truncation_extended = bool(rng.random() < 0.5)
    hu, phys = simulate_slice(p, spec, rng)
    arts = {k: 0.0 for k in ARTIFACTS}
    arts["metal"] = metal_severity(phys["metal_area_mm2"], phys["metal_density"])
    arts["noise"] = noise_severity(phys["noise_sigma_2mm"])
    arts["ring"] = ring_severity(phys["ring_amplitude_hu"])
    arts["truncation"] = truncation_severity(phys["truncation_fraction"])
    arts["motion"] = motion_severity(spec.motion_mm)
    dpx = spec.fov_mm / spec.matrix
    meta = {
        "seed": seed,
        "index": index,
        "region_ref_mm": r,
        "matrix": spec.matrix,
        "fov_mm": round(spec.fov_mm, 2),
        "center_mm": [round(c, 2) for c in spec.center],
        "kernel": spec.kernel,
        "kvp": spec.kvp,
        "padding": spec.padding,
        "sfov_mm": round(spec.sfov_mm, 1),
        "motion_mm": round(spec.motion_mm, 2),
        "motion_kind": spec.motion_kind if spec.motion_mm else None,
        "requested": chosen,
        "physics": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in phys.items()},
        "patient": p.to_dict(),
    }
    return TrainingSlice(hu=hu, pixel_spacing=(dpx, dpx), artifacts=arts, position_ref_mm=r, meta=meta)


def _body_width(p: Patient, r: float) -> float:
    n = 200
    c = (np.arange(n) - (n - 1) / 2) * 3.2
    X, Y = np.meshgrid(c, c)
    cv = rasterize(p, r, X, Y)
    body = (cv.hu > -500) & ~cv.table
    rr = np.sqrt(X**2 + Y**2)[body]
    return float(2 * rr.max()) if rr.size else 0.0
