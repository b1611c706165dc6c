"""Write one synthetic CT study: a DICOM CT series (``IM0001.dcm`` …) plus ``truth.json``.

The series is simulated slice by slice through :func:`medqc.synth.training.simulate_slice` (forward
projection, projection-domain artifacts, FBP), so clean and artifact slices share one physical texture.
Everything is drawn from one seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medqc import ARTIFACTS
from medqc.analysis.anatomy import LANDMARKS
from medqc.errors import UsageError

REGIONS: dict[str, dict] = {
    # required anatomy (start, end) — the same landmarks as the agent's protocol rules
    "head": {"start": "vertex", "end": "skull_base", "body_part": "HEAD", "protocol": "HEAD ROUTINE", "fov": (200, 250), "margin_end": 25.0},
    "neck": {"start": "skull_base", "end": "lung_apex", "body_part": "NECK", "protocol": "NECK SOFT TISSUE", "fov": (200, 260)},
    "chest": {"start": "lung_apex", "end": "lung_base", "body_part": "CHEST", "protocol": "CHEST ROUTINE", "fov": (320, 420)},
    "abdomen": {"start": "liver_dome", "end": "iliac_crest", "body_part": "ABDOMEN", "protocol": "ABDOMEN ROUTINE", "fov": (320, 420)},
    "pelvis": {"start": "iliac_crest", "end": "ischial_tuberosity", "body_part": "PELVIS", "protocol": "PELVIS ROUTINE", "fov": (320, 420)},
    "abdomen-pelvis": {"start": "liver_dome", "end": "pubic_symphysis", "body_part": "ABDOMENPELVIS", "protocol": "ABD PELVIS", "fov": (320, 420)},
    "chest-abdomen-pelvis": {"start": "lung_apex", "end": "pubic_symphysis", "body_part": "CHESTABDPELVIS", "protocol": "CHEST ABD PELVIS", "fov": (340, 450)},
}
COVERAGE_TOLERANCE_MM = 10.0  # the agent's default coverage tolerance
OVERSCAN_MARGIN_MM = {"head": 30.0}  # the agent's per-protocol overscan margins (default 40)
DEFAULT_OVERSCAN_MARGIN = 40.0
SPACING_TOLERANCE = 0.2
TILT_TOLERANCE_DEG = 0.5

VENDORS = [
    {"manufacturer": "GE MEDICAL SYSTEMS", "model": "Revolution CT", "kernels": {"soft": "SOFT", "standard": "STANDARD", "detail": "DETAIL", "lung": "LUNG", "bone": "BONE"}, "padding": -3024.0, "intercept": -1024.0, "signed": True},
    {"manufacturer": "SIEMENS", "model": "SOMATOM Definition AS+", "kernels": {"soft": "B30f", "standard": "B40f", "detail": "B50f", "lung": "B70f", "bone": "B60s"}, "padding": -2048.0, "intercept": -1024.0, "signed": False},
    {"manufacturer": "SIEMENS", "model": "SOMATOM Force", "kernels": {"soft": "Br36d", "standard": "Br40d", "detail": "Br44d", "lung": "Bl57d", "bone": "Br64d"}, "padding": -3024.0, "intercept": -8192.0, "signed": False},
    {"manufacturer": "Philips", "model": "Ingenuity CT", "kernels": {"soft": "A", "standard": "B", "detail": "C", "lung": "L", "bone": "D"}, "padding": -1024.0, "intercept": -1024.0, "signed": False},
    {"manufacturer": "TOSHIBA", "model": "Aquilion ONE", "kernels": {"soft": "FC08", "standard": "FC13", "detail": "FC18", "lung": "FC52", "bone": "FC30"}, "padding": -2000.0, "intercept": -1024.0, "signed": True},
    {"manufacturer": "Canon Medical Systems", "model": "Aquilion Prime SP", "kernels": {"soft": "FC07", "standard": "FC18", "detail": "FC26", "lung": "FC56", "bone": "FC35"}, "padding": None, "intercept": -1024.0, "signed": True},
]
WINDOWS = {
    "head": [(40, 80), (600, 2800)],
    "neck": [(50, 350), (600, 2800)],
    "chest": [(40, 400), (-600, 1500)],
}


@dataclass
class ArtifactSpec:
    kind: str
    severity: float = 0.6
    first: int | None = None  # 1-based planned slice numbers (inclusive)
    last: int | None = None


@dataclass
class StudyOptions:
    region: str = "chest"
    seed: int = 0
    slices: int | None = None
    thickness: float | None = None
    spacing: float | None = None
    matrix: int = 512
    fov: float | None = None
    artifacts: list = field(default_factory=list)  # list[ArtifactSpec]
    short_top: float = 0.0
    short_bottom: float = 0.0
    overscan: float = 0.0
    missing: list = field(default_factory=list)  # 1-based planned slice numbers
    duplicate: int | None = None
    tilt: float = 0.0
    variable_spacing: bool = False
    patient_name: str | None = None
    series: int = 1
    progress: bool = True
    workers: int | None = None
    n_views: int | None = None


def parse_artifact(text: str) -> ArtifactSpec:
    """``KIND[:SEVERITY][@FIRST-LAST]``."""
    rest, rng_part = (text.split("@", 1) + [None])[:2] if "@" in text else (text, None)
    kind, sev = (rest.split(":", 1) + [None])[:2] if ":" in rest else (rest, None)
    kind = kind.strip().lower()
    if kind not in ARTIFACTS:
        raise UsageError(f"unknown artifact {kind!r}; allowed: {', '.join(ARTIFACTS)}")
    spec = ArtifactSpec(kind)
    if sev is not None:
        try:
            spec.severity = float(sev)
        except ValueError:
            raise UsageError(f"artifact severity must be a number in (0, 1], got {sev!r}") from None
        if not 0.0 < spec.severity <= 1.0:
            raise UsageError(f"artifact severity must be in (0, 1], got {spec.severity}")
    if rng_part is not None:
        try:
            a, b = rng_part.split("-", 1) if "-" in rng_part else (rng_part, rng_part)
            spec.first, spec.last = int(a), int(b)
        except ValueError:
            raise UsageError(f"artifact slice range must be FIRST-LAST (1-based slice numbers), got {rng_part!r}") from None
        if spec.first < 1 or spec.last < spec.first:
            raise UsageError(f"artifact slice range {rng_part!r} is impossible: need 1 <= FIRST <= LAST")
    return spec


def validate(opts: StudyOptions) -> None:
    if opts.region not in REGIONS:
        raise UsageError(f"unknown region {opts.region!r}; allowed: {', '.join(REGIONS)}")
    if not 64 <= opts.matrix <= 1024:
        raise UsageError(f"matrix must be 64..1024 pixels, got {opts.matrix}")
    if opts.fov is not None and not 100.0 <= opts.fov <= 700.0:
        raise UsageError(f"fov must be 100..700 mm, got {opts.fov}")
    if opts.slices is not None and not 1 <= opts.slices <= 2000:
        raise UsageError(f"slices must be 1..2000, got {opts.slices}")
    for name in ("thickness", "spacing"):
        v = getattr(opts, name)
        if v is not None and not 0.1 <= v <= 20.0:
            raise UsageError(f"{name} must be 0.1..20 mm, got {v}")
    for name in ("short_top", "short_bottom", "overscan"):
        v = getattr(opts, name)
        if not 0.0 <= v <= 400.0:
            raise UsageError(f"{name.replace('_', '-')} must be 0..400 mm, got {v}")
    if not -30.0 <= opts.tilt <= 30.0:
        raise UsageError(f"tilt must be -30..30 degrees, got {opts.tilt}")
    if not 1 <= opts.series <= 99999:
        raise UsageError(f"series number must be 1..99999, got {opts.series}")
    for a in opts.artifacts:
        if a.kind not in ARTIFACTS:
            raise UsageError(f"unknown artifact {a.kind!r}; allowed: {', '.join(ARTIFACTS)}")


# ------------------------------------------------------------------------------------------ planning
def plan(opts: StudyOptions, rng: np.random.Generator, patient) -> dict:
    reg = REGIONS[opts.region]
    s = patient.scale
    z_vertex = float(np.round(rng.uniform(-150.0, 150.0), 1))
    lm = {k: z_vertex - v * s for k, v in LANDMARKS.items()}
    req_top, req_bottom = lm[reg["start"]], lm[reg["end"]]
    m_top = float(rng.uniform(10.0, 20.0)) if reg["start"] != "vertex" else float(rng.uniform(5.0, 12.0))
    m_bot = float(rng.uniform(10.0, 20.0))
    top = req_top + m_top - opts.short_top + opts.overscan
    bottom = req_bottom - m_bot + opts.short_bottom - opts.overscan
    if top - bottom < 5.0:
        raise UsageError(
            f"impossible scan range: short-top {opts.short_top} mm and short-bottom {opts.short_bottom} mm leave "
            f"{top - bottom:.0f} mm of the {req_top - req_bottom:.0f} mm {opts.region} range")
    length = top - bottom
    if opts.slices is not None:
        n = opts.slices
        spacing = length / max(n - 1, 1) if opts.spacing is None else opts.spacing
        if opts.spacing is not None:
            top = bottom + spacing * (n - 1)  # honour both: adjust the range from the bottom
        thickness = opts.thickness or spacing
    else:
        spacing = opts.spacing or opts.thickness or (5.0 if opts.region != "head" else 5.0)
        thickness = opts.thickness or spacing
        n = int(math.floor(length / spacing + 1e-6)) + 1
    if n > 2000:
        raise UsageError(f"{n} slices is too many (max 2000): increase --spacing")
    zs = top - spacing * np.arange(n)
    if opts.variable_spacing and n > 4:
        steps = np.full(n - 1, spacing)
        k = max(2, (n - 1) // 6)
        idx = rng.choice(np.arange(1, n - 1), size=min(k, n - 2), replace=False)
        steps[idx] *= rng.choice([0.55, 0.65, 1.3, 1.4], size=idx.size)
        zs = top - np.concatenate([[0.0], np.cumsum(steps)])
    for m in opts.missing:
        if not 1 <= m <= n:
            raise UsageError(f"--missing slice {m} is outside 1..{n}")
        if m in (1, n):
            raise UsageError(f"--missing slice {m} is an end slice: a gap needs slices on both sides (2..{n - 1})")
    if opts.duplicate is not None and not 1 <= opts.duplicate <= n:
        raise UsageError(f"--duplicate slice {opts.duplicate} is outside 1..{n}")
    for a in opts.artifacts:
        if a.first is not None and a.last > n:
            raise UsageError(f"artifact {a.kind} slice range {a.first}-{a.last} is outside the {n} planned slices")
    return {"z_vertex": z_vertex, "landmarks": lm, "required": (req_top, req_bottom), "margins": (m_top, m_bot),
            "zs": [float(z) for z in zs], "spacing": float(spacing), "thickness": float(thickness), "n": n}


def _default_span(kind: str, n: int, rng: np.random.Generator) -> tuple[int, int]:
    if kind in ("ring", "noise", "truncation"):
        return 1, n
    w = max(1, int(round(n * (0.2 if kind == "metal" else 0.3))))
    a = int(rng.integers(1, max(2, n - w + 2)))
    return a, min(n, a + w - 1)


# ------------------------------------------------------------------------------------------ the writer
def write_study(out_dir: Path, opts: StudyOptions) -> dict:
    """Simulate and write the series into ``out_dir`` (created atomically). Returns the truth dict."""
    from medqc.synth import dicomio
    from medqc.synth.phantom import add_implant, random_patient
    from medqc.synth.training import (SliceSpec, metal_severity, motion_amplitude, motion_severity, noise_scale,
                                      noise_severity, noise_target, ring_severity, truncation_severity,
                                      truncation_sfov)
    from medqc.synth import ct

    validate(opts)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not an empty folder; choose a new OUT_DIR")
    rng = np.random.default_rng([int(opts.seed), 0xC7])
    vendor = VENDORS[int(rng.integers(len(VENDORS)))]
    contrast = bool(rng.random() < (0.2 if opts.region in ("head",) else 0.6))
    patient = random_patient(rng, contrast=contrast)
    if opts.region in ("head", "neck") and rng.random() < 0.9:
        patient.arms = "down"
    pl = plan(opts, rng, patient)
    n = pl["n"]
    reg = REGIONS[opts.region]
    fov = float(opts.fov) if opts.fov else float(rng.uniform(*reg["fov"]) * (patient.girth_lr if opts.region not in ("head",) else 1.0))
    fov = min(fov, 500.0) if not opts.fov else fov
    kernel = "standard" if rng.random() < 0.7 else ("soft" if opts.region != "head" else "standard")
    kvp = float(rng.choice([100.0, 120.0, 120.0, 120.0])) if opts.region != "head" else 120.0
    base_sigma = float(rng.uniform(0.25, 0.45))  # fraction of the clean-noise ceiling: a routine dose
    padding = vendor["padding"]
    if not vendor["signed"] and vendor["intercept"] == -1024.0:
        padding = -1024.0 if padding is not None else None
    center = (float(rng.normal(0, 5)), float(rng.normal(0, 10)))
    # artifacts per planned slice
    arts = []
    for a in opts.artifacts:
        first, last = (a.first, a.last) if a.first is not None else _default_span(a.kind, n, rng)
        arts.append(ArtifactSpec(a.kind, a.severity, first, last))
    per_slice = [{} for _ in range(n)]
    for a in arts:
        for i in range(a.first - 1, a.last):
            per_slice[i][a.kind] = max(per_slice[i].get(a.kind, 0.0), a.severity)
    # metal: one implant per metal span, covering exactly those slices
    zs = pl["zs"]
    z_v = pl["z_vertex"]
    for a in arts:
        if a.kind == "metal":
            r_lo = (z_v - zs[a.first - 1]) / patient.scale
            r_hi = (z_v - zs[a.last - 1]) / patient.scale
            half = 0.45 * pl["spacing"] / patient.scale
            imp = add_implant(patient, rng, 0.5 * (r_lo + r_hi), a.severity)
            imp.r_top, imp.r_bottom = min(r_lo, r_hi) - half, max(r_lo, r_hi) + half
            _place_inside(patient, imp, rng, fov, center)
    ring_offsets = None
    ring_sev = max([a.severity for a in arts if a.kind == "ring"], default=0.0)
    # simulation grid: about the display matrix (at least 256, at most 512 channels)
    sim_n = int(min(512, max(256, 32 * round(opts.matrix / 32))))
    # views = channels: view aliasing (streaks off high-contrast edges) stays at the rim of the circle
    n_views = opts.n_views or sim_n
    if ring_sev > 0:
        ring_offsets = ct.ring_gains(sim_n, np.random.default_rng([opts.seed, 0xA1]), int(rng.integers(2, 5)), 1.0)
    sfov_trunc = None
    if any(a.kind == "truncation" for a in arts):
        sev = max(a.severity for a in arts if a.kind == "truncation")
        from medqc.synth.training import _body_width
        widths = [_body_width(patient, (z_v - z) / patient.scale) for z in zs]
        sfov_trunc = float(max(150.0, truncation_sfov(float(np.median(widths)), sev)))
        if not dicomio.writes_scan_field(vendor) and 1.0 < 500.0 / sfov_trunc <= 1.5:
            # a header without the scan field's diameter: the scanner's is the usual 500 mm (what a reader
            # of such a header has to assume), and the patient is widened to be truncated by it as asked
            patient.girth_lr *= 500.0 / sfov_trunc
            sfov_trunc = 500.0
        # a scanner's scan field is at most 500 mm: a patient wider than that is truncated whatever the
        # severity asked for
        sfov_trunc = min(500.0, sfov_trunc)

    specs = []
    for i, z in enumerate(zs):
        want = per_slice[i]
        r = (z_v - z) / patient.scale
        sp = SliceSpec(r=r, matrix=opts.matrix, fov_mm=fov, center=center, kernel=kernel, kvp=kvp,
                       noise_sigma=noise_scale(r)[0] * base_sigma * float(rng.uniform(0.95, 1.05)), sfov_mm=500.0, padding=padding,
                       n_views=n_views, sim_n=sim_n)
        if "noise" in want:
            sp.noise_sigma = noise_target(r, want["noise"])
        if "motion" in want:
            sp.motion_mm = motion_amplitude(want["motion"])
            sp.motion_kind = "shift" if rng.random() < 0.5 else "oscillate"
        if "ring" in want:
            sp.ring = want["ring"]
        if "truncation" in want and sfov_trunc is not None:
            # the displayed field is the whole scan field (what a site reconstructs for a patient this
            # large), so the cut is in the picture; a smaller displayed field would crop it away
            sp.sfov_mm = sfov_trunc
            sp.fov_mm = sfov_trunc
        sp.tilt_deg = float(opts.tilt)
        sp.thickness_mm = float(pl["thickness"])
        specs.append(sp)
    # simulate (in parallel processes when there is work enough); every slice has its own seeded rng
    jobs = [(patient, sp, (int(opts.seed), i, ring_offsets)) for i, sp in enumerate(specs)]
    results = _run_jobs(jobs, opts)
    # slice labels from the physics
    slices_truth = []
    uid = dicomio.UidMaker(opts.seed, opts.series)
    order = list(range(n))
    keep = [i for i in order if (i + 1) not in set(opts.missing)]
    files = []
    for i in keep:
        img, phys = results[i]
        sev = {k: 0.0 for k in ARTIFACTS}
        sev["metal"] = metal_severity(phys["metal_area_mm2"], phys["metal_density"])
        sev["noise"] = noise_severity(phys["noise_sigma_ref"], specs[i].r)
        sev["ring"] = ring_severity(phys["ring_amplitude_hu"])
        sev["truncation"] = truncation_severity(phys["truncation_fraction"])
        sev["motion"] = motion_severity(specs[i].motion_mm)
        files.append((i, img, sev, phys))
    if opts.duplicate is not None:
        d = opts.duplicate - 1
        if d in keep:
            files.append((d, results[d][0], files[keep.index(d)][2], results[d][1]))
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the temp folder must sit beside OUT (atomic rename)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=str(out_dir.parent)))
    try:
        ctx = dicomio.SeriesContext(opts=opts, vendor=vendor, uid=uid, region=opts.region, reg=reg, patient=patient,
                                    kernel=kernel, kvp=kvp, fov=fov, spacing=pl["spacing"], thickness=pl["thickness"],
                                    n_images=len(files), contrast=contrast, rng_seed=opts.seed, base_sigma=base_sigma)
        for k, (i, img, sev, phys) in enumerate(files):
            inst = (i + 1) if k < len(keep) else n + 1  # planned numbering: missing slices leave gaps
            sop = uid.make("sop", k)
            sp = specs[i]
            dicomio.write_slice(tmp / f"IM{k + 1:04d}.dcm", img, ctx, sp, z=zs[i], instance=inst, sop_uid=sop, index=k)
            slices_truth.append({
                "file": f"IM{k + 1:04d}.dcm",
                "sop_instance_uid": sop,
                "instance_number": inst,
                "z": round(zs[i], 3),
                "position_ref_mm": round(sp.r, 2),
                "artifacts": {kk: round(v, 4) for kk, v in sev.items()},
                "fov_mm": round(sp.fov_mm, 2),
                "sfov_mm": round(sp.sfov_mm, 1),
                "noise_sigma_2mm": round(phys["noise_sigma_2mm"], 2),
                "noise_sigma_ref": round(phys["noise_sigma_ref"], 2),
            })
        truth = _truth(opts, reg, pl, patient, vendor, slices_truth, uid, kernel, kvp, fov, contrast, arts)
        (tmp / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=False) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return truth


def _place_inside(patient, imp, rng, fov_mm: float | None = None, center=(0.0, 0.0)) -> None:
    """Move an implant whose default place is not inside soft tissue or bone of the trunk at its level, or
    not inside the displayed field (``fov_mm`` around ``center``): metal in an arm outside the image would be
    labelled without being seen."""
    from medqc.synth.phantom import rasterize

    r = 0.5 * (imp.r_top + imp.r_bottom)
    n = 128
    c = (np.arange(n) - (n - 1) / 2) * 4.0
    X, Y = np.meshgrid(c, c)
    saved = patient.implants
    patient.implants = []
    cv = rasterize(patient, r, X, Y)
    patient.implants = saved
    from scipy.ndimage import binary_erosion, label

    tissue = (cv.hu > -200) & ~cv.table
    lab, nlab = label(tissue)
    if nlab > 1:  # the trunk: the largest connected part (arms beside the body are separate)
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        tissue = lab == int(sizes.argmax())
    if fov_mm:
        half = 0.8 * fov_mm / 2.0 - imp.size
        tissue &= (np.abs(X - center[0]) < half) & (np.abs(Y - center[1]) < half)
    iy, ix = int(round(imp.y / 4.0 + (n - 1) / 2)), int(round(imp.x / 4.0 + (n - 1) / 2))
    ok = 0 <= iy < n and 0 <= ix < n and tissue[max(0, iy - 2):iy + 3, max(0, ix - 2):ix + 3].all()
    if ok:
        return
    core = binary_erosion(tissue, iterations=max(1, int(imp.size * 2 / 4.0) + 1))
    cand = np.argwhere(core if core.any() else tissue)
    if cand.size == 0:
        return
    yy, xx = cand[int(rng.integers(len(cand)))]
    imp.x, imp.y = float(X[yy, xx]), float(Y[yy, xx])
    if imp.kind in ("dental", "spine_screws", "hip"):
        imp.kind = "clip"


def _sim_job(job):
    from medqc.synth.training import simulate_slice

    patient, spec, (seed, i, ring_offsets) = job
    rng = np.random.default_rng([seed, i, 0x511CE])
    return simulate_slice(patient, spec, rng, ring_offsets=ring_offsets)


def _run_jobs(jobs, opts: StudyOptions):
    workers = opts.workers
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 4)
    workers = max(1, min(workers, len(jobs)))
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="simulating", unit="slice", file=None)
    out = []
    try:
        if workers == 1 or len(jobs) < 4:
            for j in jobs:
                out.append(_sim_job(j))
                if bar:
                    bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for res in pool.imap(_sim_job, jobs, chunksize=1):
                    out.append(res)
                    if bar:
                        bar.update(1)
    finally:
        if bar:
            bar.close()
    return out


def _worker_init():
    try:
        import torch

        torch.set_num_threads(1)
    except Exception:  # pragma: no cover
        pass


def _truth(opts, reg, pl, patient, vendor, slices, uid, kernel, kvp, fov, contrast, arts) -> dict:
    req_top, req_bottom = pl["required"]
    zs_written = [s["z"] for s in slices]
    z_top, z_bottom = max(zs_written), min(zs_written)
    findings = []
    for k in ARTIFACTS:
        if any(s["artifacts"][k] > 0 for s in slices):
            findings.append(f"artifact.{k}")
    tol = COVERAGE_TOLERANCE_MM
    margin = OVERSCAN_MARGIN_MM.get(opts.region, DEFAULT_OVERSCAN_MARGIN)
    missing_top = req_top - z_top
    missing_bottom = z_bottom - req_bottom
    if missing_top > tol:
        findings.append("coverage.top")
    if missing_bottom > tol:
        findings.append("coverage.bottom")
    extra_top, extra_bottom = z_top - req_top, req_bottom - z_bottom
    if max(extra_top, extra_bottom) > margin:
        findings.append("coverage.overscan")
    if opts.missing:
        findings.append("geometry.gap")
    if opts.duplicate is not None:
        findings.append("geometry.duplicate")
    if opts.variable_spacing:
        findings.append("geometry.spacing")
    if abs(opts.tilt) > TILT_TOLERANCE_DEG:
        findings.append("geometry.tilt")
    lm = pl["landmarks"]
    return {
        "schema": "medqc.truth/1",
        "seed": opts.seed,
        "region": opts.region,
        "protocol_name": reg["protocol"],
        "body_part": reg["body_part"],
        "study_instance_uid": uid.study,
        "series_instance_uid": uid.series,
        "series_number": opts.series,
        "manufacturer": vendor["manufacturer"],
        "kernel": vendor["kernels"][kernel],
        "kvp": kvp,
        "matrix": opts.matrix,
        "fov_mm": round(fov, 2),
        "slice_thickness_mm": round(pl["thickness"], 3),
        "slice_spacing_mm": round(pl["spacing"], 3),
        "gantry_tilt_deg": opts.tilt,
        "contrast": contrast,
        "patient": patient.to_dict(),
        "z_vertex": pl["z_vertex"],
        "landmarks": {k: round(v, 2) for k, v in lm.items()},
        "landmarks_ref_mm": dict(LANDMARKS),
        "scan_range": {"z_top": round(z_top, 2), "z_bottom": round(z_bottom, 2)},
        "required_range": {"start": reg["start"], "end": reg["end"], "z_top": round(req_top, 2), "z_bottom": round(req_bottom, 2)},
        "coverage": {"missing_top_mm": round(max(0.0, missing_top), 2), "missing_bottom_mm": round(max(0.0, missing_bottom), 2),
                     "extra_top_mm": round(max(0.0, extra_top), 2), "extra_bottom_mm": round(max(0.0, extra_bottom), 2),
                     "tolerance_mm": tol, "overscan_margin_mm": margin},
        "geometry": {"missing": list(opts.missing), "duplicate": opts.duplicate, "variable_spacing": opts.variable_spacing,
                     "tilt_deg": opts.tilt},
        "requested_artifacts": [{"kind": a.kind, "severity": a.severity, "first": a.first, "last": a.last} for a in arts],
        "expected_findings": findings,
        "slices": slices,
    }
