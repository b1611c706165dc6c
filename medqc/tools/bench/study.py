"""The study every section uses: ``medqc synth`` at 512² (cached), or a water-phantom series where the synth
module is not installed; and copies of it as new series (more slices, fresh UIDs)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("medqc.bench")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medqc" / "bench"


def make_study(folder: Path, n: int, size: int = 512, distinct: int | None = None) -> tuple[list[Path], str]:
    """``n`` axial CT slices at ``size``² in ``folder`` → (files, how they were made).

    ``medqc synth`` simulates ``distinct`` slices (default ``n``; the physics costs about a second per
    slice on 2 cores, so ``--quick`` simulates a few) and, when fewer than ``n``, the series is extended by
    repeating them with fresh SOP instance UIDs and continuing table positions. Simulated series are
    cached under ~/.cache/medqc/bench (same seed → same files)."""
    folder.mkdir(parents=True, exist_ok=True)
    k = min(n, distinct or n)
    src, how = None, ""
    try:
        from medqc.synth import cli as _synth_cli  # noqa: F401

        import hashlib

        import medqc.synth as _synth

        h = hashlib.sha256()  # the simulator's source: a changed simulator is a new study
        for f in sorted(Path(_synth.__file__).parent.glob("*.py")):
            h.update(f.read_bytes())
        cached = _cache_dir() / f"synth-chest-{k}x{size}-seed0-{h.hexdigest()[:10]}"
        if not (cached / ".complete").is_file():
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([sys.executable, "-m", "medqc", "synth", str(tmp), "--slices", str(k), "--matrix", str(size),
                                "--seed", "0", "--no-progress", "--workers", "2"],
                               capture_output=True, text=True, timeout=1800, env=dict(os.environ, MEDQC_LOG_LEVEL="WARNING"))
            if r.returncode == 0 and any(is_dicom(p) for p in tmp.iterdir()):
                (tmp / ".complete").write_text("ok\n")
                shutil.rmtree(cached, ignore_errors=True)
                tmp.rename(cached)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning("medqc synth failed (exit %s): %s; using a water phantom", r.returncode, r.stderr.strip()[-300:])
        if (cached / ".complete").is_file():
            src = sorted(p for p in cached.iterdir() if p.is_file() and is_dicom(p))
            how = "medqc synth (chest, seed 0)" + (f", {k} simulated slices repeated to {n}" if k < n else "")
    except ImportError:
        pass
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("medqc synth failed: %s; using a water phantom", e)
    if not src:
        return write_phantom_series(folder, n, size), "water phantom (medqc synth not available)"
    return extend_series(src, folder, n), how


def extend_series(src: list[Path], folder: Path, n: int) -> list[Path]:
    """Copy ``src`` into ``folder`` as one series of ``n`` slices: repeated in order when ``n`` is larger,
    each copy with a fresh SOP instance UID, its InstanceNumber and a table position continuing the scan."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    dss = [pydicom.dcmread(str(p)) for p in src]
    dss.sort(key=lambda d: int(getattr(d, "InstanceNumber", 0) or 0))
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    step = (z[-1] - z[0]) / (len(z) - 1) if len(z) > 1 else -float(getattr(dss[0], "SliceThickness", 5.0) or 5.0)
    out = []
    for j in range(n):
        ds = dss[j % len(dss)]
        if n != len(dss) or j >= len(dss):
            ds = ds.copy()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = j + 1
            ipp = list(ds.ImagePositionPatient)
            ipp[2] = round(z[0] + j * step, 3)
            ds.ImagePositionPatient = ipp
            if "SliceLocation" in ds:
                ds.SliceLocation = ipp[2]
            if "ImagesInAcquisition" in ds:
                ds.ImagesInAcquisition = n
        q = folder / f"IM{j + 1:04d}.dcm"
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out


def is_dicom(p: Path) -> bool:
    with contextlib.suppress(OSError):
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    return False


def write_phantom_series(folder: Path, n: int, size: int = 512) -> list[Path]:
    """A 20 cm water cylinder in air with Gaussian noise, 0.7 mm pixels, 2.5 mm slices, count known."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    px = 350.0 / size
    r = np.hypot((yy - size / 2) * px, (xx - size / 2) * px)
    body = np.where(r < 100, 0.0, -1000.0)
    body = np.where(r > 175, -3024.0, body)  # outside the reconstructed field
    files = []
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        p = folder / f"CT{i + 1:04d}.dcm"
        ds = FileDataset(str(p), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.BodyPartExamined = "CT", "medqc bench", "ABDOMEN"
        ds.PatientName, ds.PatientID = "Bench^Phantom", "BENCH"
        ds.SeriesNumber, ds.InstanceNumber, ds.ImagesInAcquisition = 2, i + 1, n
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-175.0, -175.0, -2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [px, px]
        ds.SliceThickness = 2.5
        ds.KVP, ds.CTDIvol, ds.ReconstructionDiameter = 120, 10.0, 350.0
        ds.PatientPosition = "HFS"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        hu = body + np.where(body > -2000, rng.normal(0, 12, body.shape), 0)
        ds.PixelData = np.clip(hu + 1024, -32768, 32767).astype(np.int16).tobytes()
        ds.save_as(p, enforce_file_format=True)
        files.append(p)
    return files


def reuid_copy(files: list[Path], folder: Path) -> list[Path]:
    """The same slices as a new study/series (fresh UIDs), so the agent sees a series it has not seen."""
    import pydicom
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    new: dict[str, str] = {}
    out = []
    for i, p in enumerate(files):
        ds = pydicom.dcmread(str(p))
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            if kw in ds:
                ds[kw].value = new.setdefault(str(ds[kw].value), generate_uid())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "ImagesInAcquisition" in ds:
            ds.ImagesInAcquisition = len(files)
        q = folder / f"L{i + 1:04d}.dcm"
        ds.save_as(q, enforce_file_format=True)
        out.append(q)
    return out
