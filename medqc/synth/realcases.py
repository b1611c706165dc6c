"""Coverage cases cut from real CT: sub-ranges of a real series, and series resampled from a real volume.

Real anatomy is what coverage must be right on, and a real study covers one range only. These functions
make the other cases from it without touching a pixel's value: a sub-range of the slices (a scan cut at the
top or the bottom, one that missed the target anatomy altogether), a new protocol name, the instance order
of a feet-first acquisition, and, from a real volume, slices resampled on planes tilted as a gantry tilts.
Each case is a new series (new UIDs, derived from the source and the case) written as CT Image Storage.

Used by the tests (real anatomy regressions), ``bench/coverage_cases.py`` and ``bench/evaluate_variants.py``
(acquisition variants of whole studies: ``medqc.synth.variants``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import tarfile
from pathlib import Path

import numpy as np

ROOT_UID = "2.25."


def _uid(*parts) -> str:
    key = "/".join(str(p) for p in ("medqc-realcase",) + parts)
    return ROOT_UID + str(int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big"))


def read_series(folder: Path) -> list:
    """The largest axial CT series in ``folder`` as pydicom datasets, head first: the series the injector
    (``medqc synth --inject``) picks."""
    from medqc.synth.inject import _load_series

    return [ds for _, ds in _load_series(Path(folder))]


def write_case(datasets: list, out: Path, name: str, protocol: str | None = None, feet_first: bool = False,
               body_part: str | None = None) -> Path:
    """Write ``datasets`` (head first) as a new series ``name`` under ``out``; pixels untouched."""
    out = Path(out) / name
    out.mkdir(parents=True, exist_ok=True)
    src = str(datasets[0].SeriesInstanceUID)
    series_uid = _uid(src, name, "series")
    n = len(datasets)
    for i, ds in enumerate(datasets):
        d = copy.deepcopy(ds)
        d.SeriesInstanceUID = series_uid
        d.SOPInstanceUID = _uid(src, name, i)
        d.InstanceNumber = (n - i) if feet_first else (i + 1)
        if feet_first:
            d.PatientPosition = "FFS"
        if protocol is not None:
            d.ProtocolName = protocol
            d.SeriesDescription = protocol
        if body_part is not None:
            d.BodyPartExamined = body_part
        if getattr(d, "file_meta", None) is not None:
            d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        d.save_as(str(out / f"IM{i + 1:04d}.dcm"))
    return out


def tight_field_case(datasets: list, out: Path, name: str, protocol: str, fov_mm: float) -> Path:
    """The same slices reconstructed as a scanner shows a smaller displayed field: the square of ``fov_mm``
    round the middle of the trunk (the same for every slice), resampled to the original matrix, padding
    outside its inscribed circle, PixelSpacing, ImagePositionPatient and ReconstructionDiameter to match
    (``medqc.synth.variants.crop_to_field``). The data are all there (no truncation): only the picture is
    cropped, which opens lungs and bowel to the field's edge. Private elements are dropped (their lengths may
    no longer hold)."""
    from medqc.synth.variants import crop_to_field, trunk_centre

    out = Path(out) / name
    out.mkdir(parents=True, exist_ok=True)
    src = str(datasets[0].SeriesInstanceUID)
    series_uid = _uid(src, name, fov_mm, "series")
    centre = trunk_centre(datasets)
    for i, ds in enumerate(datasets):
        d = crop_to_field(ds, centre, fov_mm)
        d.SeriesInstanceUID = series_uid
        d.SOPInstanceUID = _uid(src, name, fov_mm, i)
        d.ProtocolName = protocol
        d.SeriesDescription = f"{protocol} FOV {fov_mm:.0f}"
        if getattr(d, "file_meta", None) is not None:
            d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        d.save_as(str(out / f"IM{i + 1:04d}.dcm"), enforce_file_format=True)
    return out


# ------------------------------------------------------------------------------------------------
# a real head volume (Debian's invesalius-examples: Cranium.inv3, int16 HU, z × y × x = 108 × 256 × 256,
# 0.957 × 0.957 × 1.5 mm, the first plane the lowest)

CRANIUM = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
CRANIUM_SHAPE = (108, 256, 256)
CRANIUM_SPACING = (1.5, 0.957, 0.957)


def load_cranium(path: Path = CRANIUM) -> np.ndarray:
    """The volume (z ascending towards the vertex, rows anterior → posterior) in HU."""
    with tarfile.open(path) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("matrix.dat"))
        raw = tf.extractfile(member).read()
    return np.frombuffer(raw, "<i2").reshape(CRANIUM_SHAPE)


def volume_series(vol: np.ndarray, spacing: tuple[float, float, float], out: Path, name: str, protocol: str,
                  tilt_deg: float = 0.0, step_mm: float | None = None, z_range: tuple[float, float] | None = None,
                  thickness_mm: float | None = None, manufacturer: tuple[str, str] | None = None,
                  original: bool = False) -> Path:
    """Axial slices of ``vol`` (z ascending to the head) written as a CT series, on planes tilted by
    ``tilt_deg`` about the patient's left-right axis as a tilted gantry acquires them (the ImageOrientation
    carries the tilt, ImagePositionPatient moves along the table). ``z_range`` (mm from the volume's
    lowest plane, table positions of the slice centres) cuts the range; ``step_mm`` is the table increment.
    ``manufacturer`` (maker, model) names where the volume came from (default: a resampled real volume);
    ``original``: the slices are the volume's own planes, untilted and at its own spacing (ImageType
    ORIGINAL\\PRIMARY\\AXIAL, as the scanner wrote them), not a reformat (DERIVED\\SECONDARY\\AXIAL)."""
    from scipy import ndimage

    from medqc.synth.dicomio import IMPLEMENTATION_UID
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    dz, dy, dx = spacing
    nz, ny, nx = vol.shape
    step = step_mm or dz
    if original and (tilt_deg or abs(step - dz) > 1e-6):
        raise ValueError("original=True: the volume's own planes only (no tilt, its own spacing)")
    z0, z1 = z_range if z_range else (0.0, (nz - 1) * dz)
    centres = np.arange(z1, z0 - 1e-6, -step)  # head first
    t = math.radians(tilt_deg)
    rows, cols = ny, nx
    yy, xx = np.meshgrid((np.arange(rows) - (rows - 1) / 2) * dy, (np.arange(cols) - (cols - 1) / 2) * dx, indexing="ij")
    out = Path(out) / name
    out.mkdir(parents=True, exist_ok=True)
    series_uid = _uid("volume", name, tilt_deg, step, z0, z1, "series")
    study_uid = _uid("volume", "study")
    for i, zc in enumerate(centres):
        # the plane through (0, 0, zc) whose column direction is tilted: a point at row offset y lies at
        # patient y·cos t, z zc + y·sin t (the gantry tilted about the left-right axis)
        py = yy * math.cos(t)
        pz = zc + yy * math.sin(t)
        coords = np.stack([pz / dz, py / dy + (ny - 1) / 2, xx / dx + (nx - 1) / 2])
        # where a tilted plane leaves the volume's z range it repeats the nearest plane (a cut to air there would
        # be an edge no scanner makes)
        img = ndimage.map_coordinates(vol.astype(np.float32), coords, order=1, mode="nearest")
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = _uid("volume", name, tilt_deg, step, z0, z1, i)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_UID
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = _uid("volume", "frame")
        ds.Modality = "CT"
        ds.Manufacturer, ds.ManufacturerModelName = manufacturer or ("real volume (resampled)", "")
        ds.PatientName = "ANON"
        ds.PatientID = "ANON"
        ds.PatientPosition = "HFS"
        ds.ProtocolName = protocol
        ds.SeriesDescription = protocol
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if original else ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SeriesNumber = 1
        ds.InstanceNumber = i + 1
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, round(math.cos(t), 6), round(math.sin(t), 6)]
        # top-left pixel: row 0 lies at y offset -(rows-1)/2·dy along the tilted column direction
        y_first = -(rows - 1) / 2 * dy
        ds.ImagePositionPatient = [-(cols - 1) / 2 * dx, round(y_first * math.cos(t), 4), round(zc + y_first * math.sin(t), 4)]
        ds.SliceLocation = round(float(zc), 4)
        ds.GantryDetectorTilt = float(tilt_deg)
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = float(thickness_mm or step)
        ds.KVP = 120
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.PixelData = np.clip(np.rint(img), -1024, 3071).astype("<i2").tobytes()
        ds.save_as(str(out / f"IM{i + 1:04d}.dcm"), enforce_file_format=True)
    return out
