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
from medqc.analysis.anatomy import LANDMARKS
from medqc.analysis.noise import NOISE_REF_THICKNESS_MM
from medqc.synth import ct
from medqc.synth.phantom import BRAIN_BOTTOM_REF_MM, Patient, _Canvas, add_implant, random_patient, rasterize

GENERATOR_VERSION = "9"  # bump when the physics or the labels change (training caches key on it)
SIM_N = 256  # simulation grid (pixels); physical pixel = extent / SIM_N
TRAIN_VIEWS = 256  # = channels: slight view aliasing at the rim of the simulation circle only (table, arms)
TRAIN_RECON_MAX = 256  # training slices are reconstructed at most at 256² (≥ 2 mm network pixels) and interpolated to the display matrix
# Noise σ (HU) measured at 2 mm pixels (the network's view) at the body centre. Brain imaging needs far
# less noise than body imaging, so the head has its own scale: (clean at most, excessive from, gross at)
NOISE_LEVELS = {"head": (5.0, 8.0, 30.0), "body": (14.0, 20.0, 60.0)}
NOISE_CLEAN_MAX = NOISE_LEVELS["body"][0]
NOISE_ARTIFACT_MIN = NOISE_LEVELS["body"][1]
NOISE_GROSS = NOISE_LEVELS["body"][2]
NOISE_LABEL_MIN_BODY_MM2 = 2000.0  # slices with a smaller section of the patient carry no noise label
# slices through the brain are judged on the brain scale (the detector: a section with a skull under its
# scalp all round), the face and neck below the posterior fossa on the body scale
HEAD_NOISE_BELOW_REF_MM = BRAIN_BOTTOM_REF_MM
# These σ are the dose's noise: a standard kernel on a slice at least NOISE_REF_THICKNESS_MM thick (the
# thickness the detector normalises to). Thinner slices are noisier by design (σ ∝ 1/√t, fewer photons per
# slice), and so are sharp kernels; neither is a noise artifact.


def thin_slice_noise_factor(thickness_mm: float) -> float:
    """How much noisier a slice of this thickness is than one of NOISE_REF_THICKNESS_MM at the same dose
    (√(t_ref / t) below it, 1 from it on or when the thickness is unknown)."""
    t = thickness_mm
    return math.sqrt(NOISE_REF_THICKNESS_MM / t) if 0 < t < NOISE_REF_THICKNESS_MM else 1.0


def noise_scale(r: float) -> tuple[float, float, float]:
    return NOISE_LEVELS["head" if r < HEAD_NOISE_BELOW_REF_MM else "body"]


def noise_target(r: float, severity: float) -> float:
    """σ at 2 mm for a requested noise severity (0 = a clean dose)."""
    clean, art, gross = noise_scale(r)
    return art + 1.0 + (gross - art) * severity


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
    # the dose, as the noise σ (HU) it gives at 2 mm pixels at the body centre with a standard kernel and a
    # slice >= 3 mm thick; a sharper kernel or a thinner slice shows more (see ``simulate_slice``)
    noise_sigma: float = 6.0
    sfov_mm: float = 500.0
    padding: float | None = -1024.0  # value outside the reconstruction circle, None = no padding
    n_views: int = 256
    sim_n: int = SIM_N
    motion_mm: float = 0.0  # amplitude of patient motion during the rotation
    motion_kind: str = "shift"
    ring: float = 0.0  # ring severity 0..1
    metal: float = 0.0  # (already placed implants are in the patient)
    truncation_extended: bool = False  # show the extended (beyond SFOV) reconstruction instead of padding
    tilt_deg: float = 0.0  # gantry tilt: the slice plane is tilted about the x axis
    thickness_mm: float = 1.0  # slice thickness: sub-slices averaged across it (partial volume along z)


def _rasterize_tilted(p: Patient, spec: SliceSpec, r: float, X: np.ndarray, Y: np.ndarray):
    t = math.radians(spec.tilt_deg)
    if abs(t) < 1e-6:
        return rasterize(p, r, X, Y)
    ys = Y[:, 0]
    dz = np.abs(ys * math.sin(t)) / p.scale
    n_bands = int(min(160, max(3, math.ceil(dz.max() / 0.75) * 2 + 1)))
    edges = np.linspace(ys.min(), ys.max() + 1e-6, n_bands + 1)
    cv = _Canvas(X, Y)
    for b in range(n_bands):
        rows = (ys >= edges[b]) & (ys < edges[b + 1])
        if not rows.any():
            continue
        yc = 0.5 * (edges[b] + edges[b + 1])
        rb = r - yc * math.sin(t) / p.scale
        part = rasterize(p, rb, X[rows], Y[rows] * math.cos(t))
        cv.hu[rows] = part.hu
        cv.metal[rows] = part.metal
        cv.table[rows] = part.table
    return cv


def rasterize_plane(p: Patient, spec: SliceSpec, X: np.ndarray, Y: np.ndarray):
    """Rasterise the slice: a tilted plane crosses the body obliquely (z varies along the rows, approximated
    by bands of rows a few millimetres apart in z); a thick slice averages sub-slices across its thickness
    (partial volume along z)."""
    k = int(min(4, max(1, round(spec.thickness_mm / 1.25))))
    if k == 1:
        return _rasterize_tilted(p, spec, spec.r, X, Y)
    offs = ((np.arange(k) + 0.5) / k - 0.5) * spec.thickness_mm / p.scale
    parts = [_rasterize_tilted(p, spec, spec.r + o, X, Y) for o in offs]
    cv = parts[0]
    cv.hu = np.mean([c.hu for c in parts], axis=0).astype(np.float32)
    cv.metal = np.mean([c.metal for c in parts], axis=0).astype(np.float32)
    cv.table = np.logical_or.reduce([c.table for c in parts])
    return cv


def simulate_slice(p: Patient, spec: SliceSpec, rng: np.random.Generator, ring_offsets: np.ndarray | None = None,
                   recon_max: int | None = None) -> tuple[np.ndarray, dict]:
    """Simulate one slice. Returns (HU on the display grid, measured physics dict).

    The object is rasterised on a simulation grid just large enough to hold it (table and arms included),
    projected with ``spec.n_views`` views onto a detector of the same pitch, corrupted in the projection
    domain and reconstructed by FBP directly onto the display grid (``recon_max`` caps the reconstructed
    matrix; a smaller reconstruction is then interpolated up to the display matrix).

    ``ring_offsets``: fixed per-channel log offsets (a detector fault shared by a series); else random."""
    n = spec.sim_n
    # 1. extent: the smallest centred circle that holds the object
    cn = 96
    cc = (np.arange(cn) - (cn - 1) / 2) * (700.0 / cn)
    CX, CY = np.meshgrid(cc, cc)
    coarse = rasterize_plane(p, spec, CX, CY)
    obj = coarse.hu > -950
    rmax = float(np.sqrt(CX[obj] ** 2 + CY[obj] ** 2).max()) + 700.0 / cn * 1.5 if obj.any() else 100.0
    extent = float(np.clip(2 * rmax + 16.0, 160.0, 700.0))
    px = extent / n
    c = (np.arange(n) - (n - 1) / 2) * px
    X, Y = np.meshgrid(c, c)
    cv = rasterize_plane(p, spec, X, Y)
    inside = X**2 + Y**2 < (extent / 2 - px) ** 2
    hu = np.where(inside, cv.hu, -1000.0)
    mu_w = ct.mu_water(spec.kvp)
    mu = np.maximum(mu_w * (1.0 + hu / 1000.0), 0.0)
    metal = cv.metal * inside
    has_metal = bool(metal.any())
    if has_metal:
        mu = np.where(metal > 0, 0.0, mu)
    # the rasterised phantom has hard, stair-stepped edges on the simulation grid; real objects do not and
    # the focal spot and detector aperture blur each ray by about a channel: band-limit before projecting
    # (otherwise the stair steps come back as streaky texture wherever the display grid is finer)
    from scipy.ndimage import gaussian_filter

    mu = gaussian_filter(mu, 0.7, mode="constant")
    if has_metal:
        metal = gaussian_filter(metal, 0.7, mode="constant")
    geo = ct.Geometry(n, spec.n_views, n)
    # 2. patient motion during the rotation (a pose per view)
    motion = None
    if spec.motion_mm > 0:
        t = np.linspace(0.0, 1.0, spec.n_views)
        amp = spec.motion_mm / px
        if spec.motion_kind == "shift":  # a jerk part-way through the rotation
            t0 = rng.uniform(0.25, 0.75)
            w = rng.uniform(0.05, 0.3)
            prof = 1.0 / (1.0 + np.exp(-(t - t0) / (w / 6)))
            ang = rng.uniform(0, 2 * math.pi)
            rot = np.radians(rng.uniform(-1.0, 1.0) * spec.motion_mm * 0.15)
            motion = np.stack([amp * math.cos(ang) * prof, amp * math.sin(ang) * prof, rot * prof], 1)
        else:  # breathing / cardiac / tremor: a smooth oscillation, mostly antero-posterior
            f = rng.uniform(0.4, 1.2)
            ph = rng.uniform(0, 2 * math.pi)
            osc = np.sin(2 * math.pi * f * t + ph)
            motion = np.stack([0.25 * amp * osc, amp * osc, np.radians(spec.motion_mm * 0.1) * osc], 1)
    sino = ct.project(mu, geo, px, motion)
    # 3. metal: beam hardening of the metal path and the non-linear partial volume at its edges (each
    #    channel integrates intensity over its aperture: two sub-rays ±¼ channel, averaged before the log)
    bt = ct.bowtie(n, px)[None, :]
    sino_tissue = sino
    if has_metal:
        th = geo.angles
        sub = []
        for off in (-0.25, 0.25):
            shift = np.stack([off * np.cos(th), off * np.sin(th), np.zeros_like(th)], 1)
            mm_ = shift if motion is None else motion + shift
            sub.append(ct.beam_hardening(ct.project(metal * mu_w, geo, px, mm_), 0.035))
        pm = -np.log(0.5 * (np.exp(-sub[0]) + np.exp(-sub[1])))
        sino = sino + pm
    # 4. dose: a reference I0, rescaled below so the measured noise meets the target
    #    (calibrated on the tissue alone: the metal's own streaks must not lower the dose)
    i0_guess = 4.0e5 * (6.0 / max(spec.noise_sigma, 0.5)) ** 2 * (px / 1.0)
    # angular tube-current modulation (every vendor's dose control): more photons through the long
    # (lateral) paths, fewer through the short ones, ∝ exp(p_max / 2) per view, mean 1
    pmax = sino_tissue.max(axis=1)
    aec = np.clip(np.exp(0.5 * (pmax - pmax.mean())), 0.3, 3.0)
    aec = (aec / aec.mean())[:, None]
    z_noise = rng.standard_normal(sino.shape)
    noise = z_noise * ct.log_noise_std(sino_tissue, i0_guess * aec, px)
    ring_sino = None
    if spec.ring > 0:  # pattern of miscalibrated channels; its strength is set below from the HU it makes
        offs = ring_offsets if ring_offsets is not None else ct.ring_gains(n, rng, int(rng.integers(1, 5)), 1.0)
        ring_sino = np.broadcast_to(offs[None, :], sino.shape)
    # 5. truncation: channels beyond the scan field are missing
    sfov_r = spec.sfov_mm / 2 / px
    body = (cv.hu > -500) & ~cv.table & inside
    in_view = (np.abs(X - spec.center[0]) <= spec.fov_mm / 2) & (np.abs(Y - spec.center[1]) <= spec.fov_mm / 2)
    body_shown_mm2 = float((body & in_view).sum() * px * px)
    trunc_frac = 0.0
    det_s = np.abs(np.arange(n) - (n - 1) / 2)[None, :]
    if sfov_r < n / 2 - 1:
        rr = np.sqrt(X**2 + Y**2)
        # the label is the truncation the picture shows: the patient outside the scan field *within the
        # displayed field* (10 mm margin, where the cut and its bright rim sit). Arms beyond a scan field
        # that a smaller displayed field crops away leave at most faint shading in the picture: no
        # image-based reader can see them, so they carry no label
        half = spec.fov_mm / 2 + 10.0
        shown = (np.abs(X - spec.center[0]) <= half) & (np.abs(Y - spec.center[1]) <= half)
        trunc_frac = float((body & (rr > spec.sfov_mm / 2) & shown).sum() / max(body.sum(), 1))
        sino = ct.truncate(sino, sfov_r)
        noise = np.where(det_s <= sfov_r, noise, 0.0)
        if ring_sino is not None:
            ring_sino = np.where(det_s <= sfov_r, ring_sino, 0.0)
    # 6. measure noise (σ at 2 mm: area-averaged, in a patch at the body centre) and ring contrast.
    #    The dose is set by ``spec.noise_sigma`` as a standard kernel on a slice >= 3 mm would show it; the
    #    image then carries what its own kernel and thickness make of that dose, as on a scanner: a bone or
    #    lung kernel about 1.4-1.6 x the noise at 2 mm, a slice thinner than 3 mm sqrt(3 mm / t) x (fewer
    #    photons per slice). Before generator 8 every kernel and thickness was given the same σ at 2 mm,
    #    i.e. sharp kernels and thin slices a higher dose than their smooth and thick neighbours.
    if body.any():
        bx, by = float(X[body].mean()), float(Y[body].mean())
    else:
        bx, by = 0.0, 0.0
    f2 = max(1, int(round(2.0 / px)))
    g = 32 * f2

    def sigma_2mm(kernel: str) -> float:
        qn = ct.ramp_filter(noise, px, kernel)
        patch = ct.backproject_grid(qn, geo, bx / px - g / 2, by / px - g / 2, 1.0, g, g) / px * (1000.0 / mu_w)
        return float(patch.reshape(32, f2, 32, f2).mean((1, 3)).std())

    def draw_noise(line_integrals: np.ndarray, i0: float) -> np.ndarray:
        """The noise of ``z_noise``'s draw at dose ``i0``, with no data beyond the scan field."""
        nz = z_noise * ct.log_noise_std(line_integrals, i0 * aec, px)
        return np.where(det_s <= sfov_r, nz, 0.0) if sfov_r < n / 2 - 1 else nz

    thin = thin_slice_noise_factor(spec.thickness_mm)
    target = spec.noise_sigma * thin
    sig_ref = sigma_2mm("standard")
    if sig_ref > 0:
        # electronic noise does not scale with the dose (variance 1/λ + σe²/λ²): where it dominated at the
        # first guess (a thick section at a low dose: both thighs side by side read 30 % of their rays so)
        # one rescale of the dose left far less noise than the target (an image at 3 HU labelled 33 HU).
        # So the noise is drawn again at the rescaled dose, where photon statistics dominate, and measured
        # again; the last small correction below is then linear.
        i0_guess *= (sig_ref / target) ** 2
        noise = draw_noise(sino_tissue, i0_guess)
        sig_ref = sigma_2mm("standard")
    sig = sig_ref if spec.kernel == "standard" else sigma_2mm(spec.kernel)
    k = target / sig_ref if sig_ref > 0 else 1.0
    i0_eff = i0_guess / k**2
    if has_metal:
        meas = sino + draw_noise(sino, i0_eff)
    else:
        meas = sino + k * noise
    if has_metal:
        # photon starvation behind the metal, with the photons of a real detector element and view
        # (about 0.6 mm and 1/1200 of a rotation): Poisson counts + electronic noise, clipped at one
        i0_star = i0_eff * aec * (0.6 / px) * (spec.n_views / 1200.0)
        lam = i0_star * bt * np.exp(-sino)
        low = lam < 40.0
        if low.any():
            counts = rng.poisson(lam[low]).astype(np.float64) + rng.normal(0.0, 2.0, int(low.sum()))
            meas[low] = -np.log(np.maximum(counts, 1.0) / np.broadcast_to(i0_star * bt, sino.shape)[low])
    ring_amp = 0.0
    dpx_r = spec.fov_mm / (spec.matrix if recon_max is None else min(spec.matrix, recon_max))
    q = ct.ramp_filter(meas, px, spec.kernel, dpx_r)
    if ring_sino is not None:
        q_ring = ct.ramp_filter(np.ascontiguousarray(ring_sino), px, spec.kernel, dpx_r)
        rad = ct.backproject_grid(q_ring, geo, 0.0, 0.0, 1.0, 1, int(n / 2 * 0.95)) / px * (1000.0 / mu_w)
        prof = rad[0]
        prof = prof[: (prof.size // f2) * f2].reshape(-1, f2).mean(1)
        unit_amp = float(np.abs(prof).max())
        gain = ring_target(spec.ring) / unit_amp if unit_amp > 0 else 0.0
        # the label is the ring as the image shows it: only rings whose whole circle lies inside the
        # displayed field (radius + display-centre offset <= half the field) count; a bad channel whose
        # ring falls outside a targeted field is not in the picture, so it carries no label
        r_vis = spec.fov_mm / 2.0 - math.hypot(spec.center[0], spec.center[1])
        n_vis = int(max(0.0, r_vis) // (f2 * px))  # 2 mm bins whose outer radius is inside
        ring_amp = float(np.abs(prof[:n_vis]).max()) * gain if n_vis > 0 else 0.0
        q = q + gain * q_ring
    # 6. FBP onto the display grid
    M = spec.matrix
    Mr = M if recon_max is None else min(M, recon_max)
    dpx_r = spec.fov_mm / Mr
    x0 = (spec.center[0] - (Mr - 1) / 2 * dpx_r) / px
    y0 = (spec.center[1] - (Mr - 1) / 2 * dpx_r) / px
    circle = None
    if spec.padding is not None:  # corners outside the reconstruction circle are padded: skip them
        circle = ((Mr - 1) / 2, (Mr - 1) / 2, spec.fov_mm / 2 / dpx_r + 2)
    rec = ct.backproject_grid(q, geo, x0, y0, dpx_r / px, Mr, Mr, circle) / px
    img = (rec - mu_w) * (1000.0 / mu_w)
    if Mr != M:
        import cv2

        img = cv2.resize(img.astype(np.float32), (M, M), interpolation=cv2.INTER_LINEAR)
    dpx = spec.fov_mm / M
    dc = (np.arange(M) - (M - 1) / 2) * dpx
    DX, DY = np.meshgrid(dc + spec.center[0], dc + spec.center[1])
    # beyond the detector the reconstruction has no data: air with a little noise, as scanners show
    outside_det = DX**2 + DY**2 > (n / 2 - 1) ** 2 * px * px
    if outside_det.any():
        img = np.where(outside_det, -1000.0 + rng.normal(0, max(2.0, spec.noise_sigma), img.shape), img)
    recon_r = spec.fov_mm / 2
    circle = (DX - spec.center[0]) ** 2 + (DY - spec.center[1]) ** 2 <= recon_r**2
    if not spec.truncation_extended:
        circle &= DX**2 + DY**2 <= (spec.sfov_mm / 2) ** 2
    if spec.padding is not None:
        img = np.where(circle, img, spec.padding)
        lo = min(-1024.0, spec.padding)
    else:
        img = np.where(circle | spec.truncation_extended, img, -1000.0 + rng.normal(0, 2.0, img.shape))
        lo = -1024.0
    img = np.clip(img, lo, 3071.0).astype(np.float32)
    metal_area = float((metal > 0).sum() * px * px)
    metal_dens = float(metal[metal > 0].mean()) if metal_area else 0.0
    phys = {
        "sim_pixel_mm": px,
        "sim_extent_mm": extent,
        "noise_sigma_2mm": float(sig * k),  # the image's noise (its kernel and thickness)
        "noise_sigma_ref": float(sig_ref * k / thin),  # the dose's: standard kernel, >= 3 mm (the label's)
        "i0": float(i0_eff),
        "ring_amplitude_hu": ring_amp,
        "truncation_fraction": trunc_frac,
        "body_area_mm2": body_shown_mm2,  # the patient's section in the displayed field (table excluded)
        "metal_area_mm2": metal_area,
        "metal_density": metal_dens,
    }
    return img, phys


# ------------------------------------------------------------------------------------------ severities
def metal_severity(area_mm2: float, density: float) -> float:
    if area_mm2 <= 0:
        return 0.0
    x = area_mm2 * max(density - 1.0, 0.5)
    return float(np.clip((math.log10(x) - 1.3) / 2.6, 0.05, 1.0))


def noise_severity(sigma_2mm: float, r: float = 500.0) -> float:
    _, art, gross = noise_scale(r)
    if sigma_2mm < art:
        return 0.0
    return float(np.clip(0.1 + 0.9 * (sigma_2mm - art) / (gross - art), 0.1, 1.0))


RING_HU = (10.0, 150.0)  # ring contrast (HU at 2 mm) for severity 0+ .. 1


def ring_target(severity: float) -> float:
    return RING_HU[0] + (RING_HU[1] - RING_HU[0]) * severity


def ring_severity(amp_hu: float) -> float:
    if amp_hu < 0.8 * RING_HU[0]:
        return 0.0
    return float(np.clip((amp_hu - RING_HU[0]) / (RING_HU[1] - RING_HU[0]), 0.05, 1.0))


def truncation_sfov(body_width_mm: float, severity: float) -> float:
    """A scan field a little smaller than the patient: subtle (2 % narrower) to gross (16 % narrower)."""
    return body_width_mm * (1.0 - 0.02 - 0.14 * severity)


def truncation_severity(frac: float) -> float:
    if frac < 0.002:
        return 0.0
    return float(np.clip(frac / 0.15, 0.05, 1.0))


MOTION_MM = (1.0, 10.0)  # amplitude for severity 0+ .. 1


def motion_amplitude(severity: float) -> float:
    return MOTION_MM[0] + (MOTION_MM[1] - MOTION_MM[0]) * severity


def motion_severity(mm: float) -> float:
    if mm < 0.75:
        return 0.0
    return float(np.clip((mm - MOTION_MM[0]) / (MOTION_MM[1] - MOTION_MM[0]), 0.05, 1.0))


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
        noise_sigma=float(np.exp(rng.uniform(math.log(noise_scale(r)[0] / 6.0), math.log(noise_scale(r)[0])))),
        sfov_mm=500.0,
        padding=PADDINGS[int(rng.integers(len(PADDINGS)))],
        n_views=TRAIN_VIEWS,
        thickness_mm=float(rng.choice([0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0])),
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
    if r < LANDMARKS["lung_apex"] - 20 and rng.random() < 0.85:
        p.arms = "down"  # head and neck scans are done with the arms down (arms up: whole-body scans)
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
        spec.motion_mm = motion_amplitude(chosen["motion"])
        spec.motion_kind = "shift" if rng.random() < 0.6 else "oscillate"
    if "ring" in chosen:
        spec.ring = chosen["ring"]
    if "noise" in chosen:
        spec.noise_sigma = noise_target(r, chosen["noise"])
    if "truncation" in chosen:
        # the patient is larger than the scan field: a small SFOV (head mode) or a big patient
        width = _body_width(p, r)
        spec.sfov_mm = float(max(150.0, truncation_sfov(width, chosen["truncation"])))
        spec.fov_mm = float(min(spec.fov_mm, spec.sfov_mm) if rng.random() < 0.6 else max(spec.fov_mm, spec.sfov_mm))
        spec.truncation_extended = bool(rng.random() < 0.5)
    hu, phys = simulate_slice(p, spec, rng, recon_max=TRAIN_RECON_MAX)
    arts = {k: 0.0 for k in ARTIFACTS}
    arts["metal"] = metal_severity(phys["metal_area_mm2"], phys["metal_density"])
    # a noise artifact is judged in the patient: a slice that holds almost none (above the vertex, the top
    # of the skull cap) carries no noise label, whatever its dose
    if phys["body_area_mm2"] >= NOISE_LABEL_MIN_BODY_MM2:
        arts["noise"] = noise_severity(phys["noise_sigma_ref"], r)
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
        "thickness_mm": spec.thickness_mm,
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
