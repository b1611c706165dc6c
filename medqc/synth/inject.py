"""``medqc synth OUT --inject KIND[:SEV] --from DICOM_DIR``: add a physical artifact to a real CT series.

Each slice's HU image is turned into attenuation, forward projected (the clean sinogram ``p0``), perturbed
in the projection domain (``p1``) and the difference is reconstructed onto the slice's own pixel grid:

    new = original + FBP(p1) − FBP(p0) = original + FBP(p1 − p0)

so the scanner's own texture, kernel and noise stay as they were. The output is a new series (new series
and instance UIDs, the original tags otherwise) plus ``truth.json`` with per-slice severities derived
from the injected physics.

``--round-trip`` (``full=True``) reconstructs each slice in full instead, ``new = FBP(p1)``, and without
``--inject`` writes the clean control ``FBP(p0)``: every variant then carries the simulated scanner's texture
(its projection grid, at most ``SIM_MAX`` pixels across the field, and its standard kernel) and none the
original's, so that a detector cannot tell the injected slices from the clean ones by texture alone — the
protocol of an evaluation that passes every variant, the clean one included, through the same projection
round trip.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medqc import ARTIFACTS
from medqc.errors import UsageError

log = logging.getLogger("medqc.synth.inject")
SIM_MAX = 384  # simulation pixels across the original field of view


def _load_series(src: Path) -> list:
    import pydicom

    if not src.is_dir():
        raise UsageError(f"--from {src} is not a folder of DICOM files")
    found: dict[str, list] = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=False, force=False)
        except Exception:
            continue  # not DICOM (DIRFILE, README, ...)
        if getattr(ds, "Modality", None) != "CT" or "PixelData" not in ds:
            continue
        itype = [str(x).upper() for x in getattr(ds, "ImageType", [])]
        if "LOCALIZER" in itype or not hasattr(ds, "ImageOrientationPatient") or not hasattr(ds, "ImagePositionPatient"):
            continue
        o = [float(x) for x in ds.ImageOrientationPatient]
        nz = abs(o[0] * o[4] - o[1] * o[3])
        if nz < 0.8 or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            continue
        found.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
    if not found:
        raise UsageError(f"no axial CT image series found in {src}")
    uid, items = max(found.items(), key=lambda kv: len(kv[1]))
    if len(found) > 1:
        log.info("%d CT series in %s; injecting into the largest, %s (%d slices)", len(found), src, uid, len(items))

    def zpos(ds):
        o = [float(x) for x in ds.ImageOrientationPatient]
        n = np.cross(o[:3], o[3:])
        return float(np.dot(n, [float(x) for x in ds.ImagePositionPatient]))

    items.sort(key=lambda it: zpos(it[1]), reverse=True)  # head first
    return items


def _hu(ds) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float64)
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


CLEAN = "clean"  # the kind of the round trip's clean control (``full=True``): nothing added to the projections


def inject_series(src: Path, out_dir: Path, kind: str, severity: float, seed: int = 0, progress: bool = True,
                  full: bool = False) -> dict:
    """Inject ``kind`` at ``severity`` into the largest axial CT series under ``src``, writing ``out_dir``; with
    ``full``, reconstruct each slice in full from its projections (``kind`` ``CLEAN``: the control, nothing
    added). Returns the ``truth.json`` document."""
    from medqc.synth import ct
    from medqc.synth.dicomio import UidMaker
    from medqc.synth.training import (metal_severity, motion_amplitude, motion_severity, noise_severity,
                                      noise_target, ring_severity, ring_target, thin_slice_noise_factor,
                                      truncation_severity, truncation_sfov)

    control = kind == CLEAN
    if control and not full:
        raise UsageError("the clean control is the projection round trip: it needs --round-trip")
    if kind not in ARTIFACTS and not control:
        raise UsageError(f"unknown artifact {kind!r}; allowed: {', '.join(ARTIFACTS)}")
    # what the written series' description gains
    label = "round trip" if control else kind + (" round trip" if full else "")
    if control:
        severity = 0.0
    elif not 0.0 < severity <= 1.0:
        raise UsageError(f"severity must be in (0, 1], got {severity}")
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not an empty folder; choose a new OUT_DIR")
    items = _load_series(src)
    n_sl = len(items)
    # brain imaging has its own noise scale: judge head series on it (from the header's description)
    desc = " ".join(str(getattr(items[0][1], k, "") or "") for k in ("BodyPartExamined", "ProtocolName", "SeriesDescription", "StudyDescription")).upper()
    r_ref = 60.0 if any(w in desc for w in ("HEAD", "BRAIN", "SKULL", "CRAN", "NEURO", "KOPF", "SCHAEDEL")) else 500.0
    rng = np.random.default_rng([int(seed), 0x1A7EC7])
    # new UIDs, reproducible per (source series, artifact, severity, seed): two injections into one series
    # must not share them, or an agent receiving both would take the second for resends of the first
    uid = UidMaker(seed, 0, salt=f"medqc-inject/{kind}:{severity:g}{'/full' if full else ''}/{items[0][1].SeriesInstanceUID}")
    # metal sits in a run of slices in the middle; everything else affects the whole series
    if kind == "metal":
        w = max(1, int(round(0.2 * n_sl)))
        first = (n_sl - w) // 2
        metal_idx = set(range(first, first + w))
        metal_r = 2.0 + 10.0 * severity
        metal_dens = 4.0 + 10.0 * severity
        metal_xy = None
    ring_offsets = None
    sfov = None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_sl, desc="round trip" if control else f"injecting {kind}", unit="slice")
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the temp folder must sit beside OUT (atomic rename)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=str(out_dir.parent)))
    slices = []
    try:
        for idx, (f, ds) in enumerate(items):
            hu = _hu(ds)
            rows, cols = hu.shape
            ps = [float(x) for x in ds.PixelSpacing]
            dpx = float(ps[1])
            # what the scanner did not measure keeps its value: padding, and the fill a displayed circle leaves
            # in the corners (a Philips Big Bore writes -1024 beyond its circle, where its air reads -975)
            pad = (hu < -1500) | _displayed_fill(hu)
            img = np.where(pad, -1000.0, hu)
            # simulation grid: the image's field, embedded in a circle that holds its corners
            M = max(rows, cols)
            ms = min(M, SIM_MAX)
            spx = M * dpx / ms
            n = int(math.ceil(ms * 1.42 / 2) * 2)
            import cv2

            small = cv2.resize(img.astype(np.float32), (int(round(cols * dpx / spx)), int(round(rows * ps[0] / spx))), interpolation=cv2.INTER_AREA)
            canvas = np.full((n, n), -1000.0, np.float32)
            oy, ox = (n - small.shape[0]) // 2, (n - small.shape[1]) // 2
            canvas[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
            kvp = float(getattr(ds, "KVP", 120) or 120)
            mu_w = ct.mu_water(kvp)
            mu = np.maximum(mu_w * (1.0 + canvas / 1000.0), 0.0)
            geo = ct.Geometry(n, n, n)
            p0 = ct.project(mu, geo, spx)
            body = _patient_mask(canvas, spx)
            c = (np.arange(n) - (n - 1) / 2) * spx
            X, Y = np.meshgrid(c, c)
            sev = {k: 0.0 for k in ARTIFACTS}
            srng = np.random.default_rng([int(seed), idx, 0x1A7])
            kernel = "standard"
            if control:
                p1 = p0
            elif kind == "metal":
                if idx in metal_idx:
                    if metal_xy is None:
                        metal_xy = _metal_site(canvas, X, Y, metal_r, rng)
                    mx, my = metal_xy
                    m = ((X - mx) ** 2 + (Y - my) ** 2 <= metal_r**2).astype(np.float64) * metal_dens
                    pm = ct.beam_hardening(ct.project(m * mu_w, geo, spx), 0.035)
                    p1 = p0 + pm
                    i0 = 3.0e5 * spx
                    bt = ct.bowtie(n, spx)[None, :]
                    lam1 = i0 * bt * np.exp(-p1)
                    lam0 = i0 * bt * np.exp(-p0)
                    floor = 4.0
                    p1 = np.where(lam1 < floor, np.log(i0 * bt / floor), p1)
                    extra_var = np.clip(1.0 / np.maximum(lam1, floor) - 1.0 / np.maximum(lam0, floor), 0.0, None)
                    p1 = p1 + srng.standard_normal(p1.shape) * np.sqrt(extra_var)
                    sev["metal"] = metal_severity(float((m > 0).sum() * spx * spx), metal_dens)
                else:
                    p1 = p0
            elif kind == "motion":
                mm = motion_amplitude(severity)
                t = np.linspace(0, 1, geo.n_views)
                t0 = srng.uniform(0.25, 0.75)
                prof = 1.0 / (1.0 + np.exp(-(t - t0) / 0.03))
                ang = srng.uniform(0, 2 * math.pi)
                motion = np.stack([mm / spx * math.cos(ang) * prof, mm / spx * math.sin(ang) * prof, np.zeros_like(t)], 1)
                p1 = ct.project(mu, geo, spx, motion)
                sev["motion"] = motion_severity(mm)
            elif kind == "ring":
                if ring_offsets is None:
                    ring_offsets = ct.ring_gains(n, rng, int(rng.integers(2, 5)), 1.0)
                q_ring = ct.ramp_filter(np.broadcast_to(ring_offsets[None, :], p0.shape).copy(), spx, kernel)
                rad = ct.backproject_grid(q_ring, geo, 0.0, 0.0, 1.0, 1, int(n / 2 * 0.95)) / spx * (1000.0 / mu_w)
                f2 = max(1, int(round(2.0 / spx)))
                prof = rad[0][: (rad.shape[1] // f2) * f2].reshape(-1, f2).mean(1)
                unit = float(np.abs(prof).max())
                gain = ring_target(severity) / unit if unit > 0 else 0.0
                p1 = p0 + gain * ring_offsets[None, :]
                sev["ring"] = ring_severity(unit * gain)
            elif kind == "noise":
                # the target is the added dose's noise as a standard kernel on a slice >= 3 mm shows it (as in
                # medqc synth); a series thinner than 3 mm gets sqrt(3 mm / t) x more, as that dose gives it
                target = noise_target(r_ref, severity)
                i0 = 1.0e5 * spx
                nz = ct.gaussian_noise_sino(p0, i0, spx, srng)
                qn = ct.ramp_filter(nz, spx, "standard")
                f2 = max(1, int(round(2.0 / spx)))
                g = 32 * f2
                bx, by = (float(X[body].mean()), float(Y[body].mean())) if body.any() else (0.0, 0.0)
                patch = ct.backproject_grid(qn, geo, bx / spx - g / 2, by / spx - g / 2, 1.0, g, g) / spx * (1000.0 / mu_w)
                sig = float(patch.reshape(32, f2, 32, f2).mean((1, 3)).std())
                thin = thin_slice_noise_factor(float(getattr(ds, "SliceThickness", 0) or 0))
                k = target * thin / sig if sig > 0 else 1.0
                p1 = p0 + k * nz
                sev["noise"] = noise_severity(target, r_ref)
            else:  # truncation
                if sfov is None:
                    rr = np.sqrt(X**2 + Y**2)[body]
                    width = 2 * float(rr.max()) if rr.size else 200.0
                    sfov = max(120.0, truncation_sfov(width, severity))
                p1 = ct.truncate(p0, sfov / 2 / spx)
                frac = float((body & (X**2 + Y**2 > (sfov / 2) ** 2)).sum() / max(body.sum(), 1))
                sev["truncation"] = truncation_severity(frac)
            # reconstruct the difference (or, with ``full``, the whole slice) straight onto the original pixel grid
            if p1 is p0 and not full:
                new = hu
            else:
                q = ct.ramp_filter(p1 if full else p1 - p0, spx, kernel)
                x0 = (-(cols - 1) / 2 * dpx) / spx
                y0 = (-(rows - 1) / 2 * float(ps[0])) / spx
                rec = ct.backproject_grid(q, geo, x0, y0, dpx / spx, rows, cols) / spx * (1000.0 / mu_w)
                new = np.where(pad, hu, rec - 1000.0 if full else hu + rec)
                if kind == "truncation":
                    jj, ii = np.meshgrid((np.arange(cols) - (cols - 1) / 2) * dpx, (np.arange(rows) - (rows - 1) / 2) * float(ps[0]))
                    outside = jj**2 + ii**2 > (sfov / 2) ** 2
                    padv = float(hu[pad].min()) if pad.any() else -1024.0
                    new = np.where(outside, padv, new)
            sop = uid.make("sop", idx)
            name = f"IM{idx + 1:04d}.dcm"
            _write_like(ds, new, tmp / name, uid, sop, label)
            slices.append({"file": name, "sop_instance_uid": sop, "source_sop_instance_uid": str(ds.SOPInstanceUID),
                           "instance_number": int(getattr(ds, "InstanceNumber", idx + 1) or idx + 1),
                           "z": round(float(ds.ImagePositionPatient[2]), 3), "position_ref_mm": None,
                           "artifacts": {k: round(v, 4) for k, v in sev.items()}})
            if bar:
                bar.update(1)
        truth = {
            "schema": "medqc.truth/1",
            "source": "inject",
            "injected": {"kind": kind, "severity": severity, "seed": seed, "round_trip": bool(full)},
            "source_series_instance_uid": str(items[0][1].SeriesInstanceUID),
            "series_instance_uid": uid.series,
            "region": None,
            "protocol_name": str(getattr(items[0][1], "ProtocolName", "")),
            "body_part": str(getattr(items[0][1], "BodyPartExamined", "")),
            "landmarks": {},
            "scan_range": {"z_top": max(s["z"] for s in slices), "z_bottom": min(s["z"] for s in slices)},
            "required_range": None,
            "expected_findings": [f"artifact.{kind}"] if not control and any(s["artifacts"][kind] > 0 for s in slices) else [],
            "slices": slices,
        }
        (tmp / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar:
            bar.close()
    return truth


def _patient_mask(canvas: np.ndarray, spx: float) -> np.ndarray:
    """The patient, without the table or head holder: the patient's outline is closed (holes filled),
    the table's thin open shells do not survive an opening; the patient is the largest region left."""
    from scipy import ndimage

    m = ndimage.binary_fill_holes(canvas > -400)  # a closed outline (skin, skull) encloses the patient
    m = ndimage.binary_opening(m, iterations=max(1, int(round(3.0 / spx))))
    lab, k = ndimage.label(m)
    if k == 0:
        return m
    sizes = ndimage.sum(m, lab, index=np.arange(1, k + 1))
    return ndimage.binary_fill_holes(lab == (int(np.argmax(sizes)) + 1))


def _metal_site(canvas, X, Y, radius, rng):
    from scipy.ndimage import binary_erosion

    px = float(X[0, 1] - X[0, 0])
    tissue = (canvas > -200) & (canvas < 300) & _patient_mask(canvas, px)
    core = binary_erosion(tissue, iterations=max(1, int(radius / px) + 2))
    cand = np.argwhere(core if core.any() else tissue)
    if cand.size == 0:
        return 0.0, 0.0
    # prefer a site near the body centre (surgical clips, spine hardware, hip ... are inside)
    cy, cx = cand.mean(0)
    d = np.hypot(cand[:, 0] - cy, cand[:, 1] - cx)
    near = cand[d <= np.percentile(d, 40)]
    y, x = near[int(rng.integers(len(near)))]
    return float(X[y, x]), float(Y[y, x])


def _displayed_fill(hu: np.ndarray) -> np.ndarray:
    """The pixels outside the displayed circle that hold the corners' fill value, where the corners are fill
    (``medqc.analysis.ring.corners_filled``); none where they hold measured data."""
    from medqc.analysis.ring import corners_filled

    h, w = hu.shape
    if not corners_filled(hu):
        return np.zeros(hu.shape, bool)
    yy, xx = np.mgrid[:h, :w]
    beyond = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0) >= min(h, w) / 2.0 - 1.0
    return beyond & (hu == hu[0, 0])


def _write_like(src, hu: np.ndarray, path: Path, uid, sop: str, label: str) -> None:
    import copy

    from pydicom.uid import ExplicitVRLittleEndian

    from medqc.synth.dicomio import save

    ds = copy.deepcopy(src)
    _private_as_found(ds)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    signed = int(getattr(ds, "PixelRepresentation", 0)) == 1
    bits = int(getattr(ds, "BitsStored", 16))
    stored = np.rint((hu - inter) / slope)
    if signed:
        lo, hi, dt = -(1 << (bits - 1)), (1 << (bits - 1)) - 1, "<i2"
    else:
        lo, hi, dt = 0, (1 << bits) - 1, "<u2"
    ds.PixelData = np.clip(stored, lo, hi).astype(dt).tobytes()
    ds.BitsAllocated = 16
    ds.SeriesInstanceUID = uid.series
    ds.SOPInstanceUID = sop
    desc = str(getattr(ds, "SeriesDescription", "") or "")
    ds.SeriesDescription = (desc + f" +{label}")[-64:].strip()
    for tag in ("LossyImageCompression",):
        if tag in ds:
            del ds[tag]
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    save(ds, path)  # little endian whatever the source's encoding (GE's older stores write big endian)


def _private_as_found(ds) -> None:
    """Private elements whose bytes do not fit the VR pydicom's dictionary gives their tag (the Philips Big
    Bore writes (01F1,1026) as the text '0.15' where the dictionary says FD) are kept byte for byte as UN;
    converting them on writing would fail the whole series."""
    from pydicom.dataelem import DataElement

    for tag in list(ds.keys()):
        if not tag.is_private:
            continue
        try:
            ds[tag]
        except Exception:  # noqa: BLE001 - any conversion failure: keep the element's bytes as they are
            ds[tag] = DataElement(tag, "UN", ds.get_item(tag).value)
