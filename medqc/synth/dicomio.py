"""DICOM CT Image IOD writing for synthetic series (and the vendor tag habits we randomise)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

ROOT = "2.25."
IMPLEMENTATION_UID = ROOT + str(int.from_bytes(hashlib.sha256(b"medqc synth implementation").digest()[:16], "big"))


class UidMaker:
    """Deterministic, globally unique-looking UIDs (2.25 + a 128-bit hash of seed, series and role)."""

    def __init__(self, seed: int, series: int, salt: str = "medqc-synth"):
        self.seed, self.series_no, self.salt = int(seed), int(series), salt
        self.study = self.make("study", 0, series_independent=True)
        self.series = self.make("series", 0)
        self.frame = self.make("frame", 0, series_independent=True)

    def make(self, role: str, index: int, series_independent: bool = False) -> str:
        key = f"{self.salt}/{self.seed}/{'-' if series_independent else self.series_no}/{role}/{index}"
        return ROOT + str(int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big"))


@dataclass
class SeriesContext:
    opts: object
    vendor: dict
    uid: UidMaker
    region: str
    reg: dict
    patient: object
    kernel: str
    kvp: float
    fov: float
    spacing: float
    thickness: float
    n_images: int
    contrast: bool
    rng_seed: int
    base_sigma: float


def save(ds, path) -> None:
    """Write ``ds`` as a DICOM file in the encoding its file meta's transfer syntax names — the one its pixels
    were rewritten in (explicit VR little endian) even where it was read from a big-endian file (GE's older
    stores), which pydicom's ``save_as`` would refuse to convert."""
    ts = ds.file_meta.TransferSyntaxUID
    dcmwrite(str(path), ds, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)


def writes_scan_field(vendor: dict) -> bool:
    """Whether this vendor's headers carry DataCollectionDiameter (real Philips headers do not)."""
    return vendor["manufacturer"] != "Philips"


def _dates(seed: int) -> tuple[str, str, str]:
    d = _dt.date(2024, 1, 1) + _dt.timedelta(days=int(seed) % 700)
    t = 7 * 3600 + (int(seed) * 7919) % (12 * 3600)
    birth = _dt.date(1940, 1, 1) + _dt.timedelta(days=(int(seed) * 104729) % (60 * 365))
    return d.strftime("%Y%m%d"), f"{t // 3600:02d}{(t // 60) % 60:02d}{t % 60:02d}", birth.strftime("%Y%m%d")


def windows_for(region: str) -> list[tuple[float, float]]:
    if region == "head":
        return [(40.0, 80.0), (600.0, 2800.0)]
    if region == "neck":
        return [(50.0, 350.0), (600.0, 2800.0)]
    if region.startswith("chest"):
        return [(40.0, 400.0), (-600.0, 1500.0)]
    return [(40.0, 400.0), (300.0, 1500.0)]


def ctdivol_for(region: str, sigma: float, girth: float) -> float:
    """CTDIvol consistent with the simulated noise: dose ∝ 1/σ² at fixed size, more for a bigger patient.
    The quietest clean series sits just under the reference level (head 50, body 12 mGy)."""
    ref = 50.0 if region == "head" else 12.0
    sigma_lo = 0.25 * (5.0 if region == "head" else 14.0)  # the lowest clean noise the study writer draws
    return float(round(max(1.0, ref * 0.9 * (sigma_lo / max(sigma, 0.1)) ** 2 * girth), 2))


def write_slice(path: Path, hu: np.ndarray, ctx: SeriesContext, spec, z: float, instance: int, sop_uid: str, index: int) -> None:
    opts, v = ctx.opts, ctx.vendor
    date, time_, birth = _dates(ctx.rng_seed)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time_
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time_
    ds.AccessionNumber = f"SYN{ctx.rng_seed % 10**8:08d}"
    ds.Modality = "CT"
    ds.Manufacturer = v["manufacturer"]
    ds.InstitutionName = "MEDQC SYNTHETIC"
    ds.ReferringPhysicianName = ""
    ds.StationName = "SYNTH01"
    ds.StudyDescription = f"CT {ctx.reg['body_part']}"
    ds.SeriesDescription = f"{ctx.reg['protocol']} {spec.kernel.upper()} {round(ctx.thickness, 1):g}mm"
    ds.ManufacturerModelName = v["model"]
    ds.PatientName = opts.patient_name if opts.patient_name is not None else f"SYNTHETIC^PATIENT{ctx.rng_seed}"
    ds.PatientID = f"SYN{ctx.rng_seed:06d}"
    ds.PatientBirthDate = birth
    ds.PatientSex = "F" if ctx.patient.female else "M"
    ds.PatientSize = f"{ctx.patient.height_cm / 100:.2f}"
    ds.PatientWeight = f"{75 * ctx.patient.girth_lr * ctx.patient.girth_ap * ctx.patient.scale:.1f}"
    if ctx.contrast:
        ds.ContrastBolusAgent = "IOPAMIDOL 370"
        ds.ContrastBolusRoute = "IV"
    ds.BodyPartExamined = ctx.reg["body_part"]
    step_and_shoot = ctx.region == "head" and abs(opts.tilt) >= 1e-6  # tilted heads: axial (sequential) scanning
    ds.ScanOptions = "AXIAL MODE" if step_and_shoot else "HELICAL MODE"
    # one acquisition per table position in step-and-shoot scanning: ~40 mm of detector per rotation
    per_rotation = max(1, int(round(40.0 / max(ctx.spacing, 0.5))))
    ds.SliceThickness = f"{ctx.thickness:.3g}"
    ds.KVP = f"{ctx.kvp:g}"
    if v["manufacturer"] != "GE MEDICAL SYSTEMS":
        ds.SpacingBetweenSlices = f"{ctx.spacing:.4g}"
    if writes_scan_field(v):
        ds.DataCollectionDiameter = f"{min(500.0, spec.sfov_mm):.1f}"
    ds.ReconstructionDiameter = f"{spec.fov_mm:.2f}"
    ds.GantryDetectorTilt = f"{opts.tilt:g}"
    ds.TableHeight = "150.0"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ctdi = ctdivol_for(ctx.region, spec.noise_sigma, ctx.patient.girth_lr)
    ds.XRayTubeCurrent = str(int(max(10, min(800, ctdi * 12))))
    ds.Exposure = str(int(max(5, min(800, ctdi * 6))))
    ds.FilterType = "BODY FILTER" if ctx.region != "head" else "HEAD FILTER"
    ds.ConvolutionKernel = v["kernels"][spec.kernel]
    ds.PatientPosition = "HFS"
    ds.CTDIvol = ctdi
    phantom = Dataset()
    head = ctx.region == "head"
    phantom.CodeValue = "113690" if head else "113691"
    phantom.CodingSchemeDesignator = "DCM"
    phantom.CodeMeaning = "IEC Head Dosimetry Phantom" if head else "IEC Body Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom]
    ds.ProtocolName = ctx.reg["protocol"]
    ds.StudyInstanceUID = ctx.uid.study
    ds.SeriesInstanceUID = ctx.uid.series
    ds.StudyID = "1"
    ds.SeriesNumber = str(opts.series)
    ds.AcquisitionNumber = str(1 + (instance - 1) // per_rotation) if step_and_shoot else "1"
    ds.InstanceNumber = str(instance)
    # geometry: rows run along the column direction (0, cos t, sin t); the table moves along z only
    M = hu.shape[0]
    dpx = spec.fov_mm / M
    t = math.radians(opts.tilt)
    cx, cy = spec.center
    y0 = cy - (M - 1) / 2 * dpx
    ipp = (cx - (M - 1) / 2 * dpx, y0 * math.cos(t), z + y0 * math.sin(t))
    ds.ImagePositionPatient = [f"{a:.6g}" if abs(a) >= 1e-9 else "0" for a in ipp]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", f"{math.cos(t):.7g}", f"{math.sin(t):.7g}" if abs(t) > 0 else "0"]
    if v["manufacturer"] == "SIEMENS":  # both centres, in patient coordinates (the isocentre is x = y = 0 here)
        ds.DataCollectionCenterPatient = [0.0, 0.0, round(float(z), 4)]  # FD values
        ds.ReconstructionTargetCenterPatient = [round(float(a), 4) for a in (cx, cy * math.cos(t), z + cy * math.sin(t))]
    ds.FrameOfReferenceUID = ctx.uid.frame
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{z:.3f}"
    if v["manufacturer"] in ("SIEMENS", "TOSHIBA", "Canon Medical Systems") or ctx.rng_seed % 3 == 0:
        # per acquisition: the whole series in helical scanning, one rotation's images in step-and-shoot
        ds.ImagesInAcquisition = str(min(per_rotation, ctx.n_images) if step_and_shoot else ctx.n_images)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = M
    ds.Columns = hu.shape[1]
    ds.PixelSpacing = [f"{dpx:.6g}", f"{dpx:.6g}"]
    intercept = v["intercept"]
    signed = v["signed"]
    bits_stored = 12 if (not signed and intercept == -1024.0) else 16
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    wins = windows_for(ctx.region)
    if ctx.rng_seed % 2 == 0:
        ds.WindowCenter = [f"{w[0]:g}" for w in wins]
        ds.WindowWidth = [f"{w[1]:g}" for w in wins]
    else:
        ds.WindowCenter = f"{wins[0][0]:g}"
        ds.WindowWidth = f"{wins[0][1]:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    stored = np.rint(hu.astype(np.float64) - intercept)
    if signed:
        lo, hi, dt = -32768, 32767, "<i2"
    else:
        lo, hi, dt = 0, (1 << bits_stored) - 1, "<u2"
    arr = np.clip(stored, lo, hi).astype(dt)
    if spec.padding is not None and signed and v["manufacturer"] == "GE MEDICAL SYSTEMS":
        ds.add_new(0x00280120, "SS", int(np.clip(spec.padding - intercept, lo, hi)))  # PixelPaddingValue
    ds.PixelData = arr.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDQC_SYNTH_1"
    ds.file_meta = meta
    ds.save_as(str(path), enforce_file_format=True)
