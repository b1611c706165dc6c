"""Decode one spooled or dropped DICOM file: header → ``SliceInfo`` per frame; pixels → HU float32.

Outcomes, one per frame (``Decoded``):
* analysable: an axial CT image (orientation within 45° of axial, not a localizer) with geometry and HU;
* ``ignored``: a valid object the QC does not analyse (dose report, secondary capture, localizer,
  non-axial reformat, other modality) — recorded with the reason, never an error;
* ``error``: a CT image that should be analysed but cannot be (transfer syntax without a decoder, a file
  cut short in its pixel data or before them, missing geometry) — becomes an ``input.undecodable`` finding
  for its series.
A file that is not DICOM at all raises :class:`NotDicom` (the caller records it as rejected).

A file is opened and read once, keeping only the elements the decoding uses (``DECODE_KEYWORDS``): pydicom
still reads every element's header, but steps over the other values without storing them.
Uncompressed little-endian pixel data is read with ``np.frombuffer`` (≈7× faster than ``pixel_array``);
everything else goes through pydicom's decoder plugins.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom  # imported here, not lazily: a lazy import racing pynetdicom's in another thread fails
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException, InvalidDicomError

from medqc.agent.records import SliceInfo

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
CT_CLASSES = {CT_IMAGE, ENHANCED_CT, LEGACY_ENHANCED_CT}
UNCOMPRESSED_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
MAX_AXIAL_ANGLE_DEG = 45.0
PAD_HU = -3024.0  # padding / outside-FOV pixels become this (preprocess treats < -1500 HU as outside the FOV)


class NotDicom(Exception):
    """The file is not a DICOM Part-10 file (or not readable as one)."""


@dataclass
class Decoded:
    info: SliceInfo
    hu: np.ndarray | None = None  # (rows, cols) float32 HU, only when analysable
    error: str = ""
    ignored: str = ""
    # a frame of a large multi-frame object: its HU are made when asked for (``pixels``), not at decoding
    lazy: Callable[[], np.ndarray] | None = None

    @property
    def ok(self) -> bool:
        return (self.hu is not None or self.lazy is not None) and not self.error and not self.ignored

    def pixels(self) -> np.ndarray:
        """The frame's HU: ``hu``, or made now from the stored values (and not kept) for a lazy frame."""
        if self.hu is not None:
            return self.hu
        if self.lazy is None:
            raise ValueError("no pixels: the instance was not decoded for analysis")
        return self.lazy()


# multi-frame objects with more frames than this convert each frame to HU only when it is analysed: a
# 1,000-frame Enhanced CT object of 512² would otherwise hold 1 GB of float32 HU at once (4 MB per frame,
# next to its 2-byte stored values); single-frame objects and small ones are converted at decoding
LAZY_FRAMES = 16


def _f(v, default=None):
    try:
        if v is None or v == "":
            return default
        x = float(v)
        return x if math.isfinite(x) else default
    except (TypeError, ValueError):
        return default


def _i(v):
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _get(ds, keyword: str):
    """An element's value, or None where it cannot be read (pydicom converts elements when first read: a
    damaged one raises then, whatever its type)."""
    try:
        return ds.get(keyword)
    except Exception:  # noqa: BLE001
        return None


def _s(v) -> str:
    """A value as stripped text; '' for None and for a value that cannot be shown (a damaged sequence where a
    string belongs: pydicom converts its items' elements on ``str``, and an unknown VR raises there)."""
    if v is None:
        return ""
    try:
        return str(v).strip()
    except Exception:  # noqa: BLE001
        return ""


def _tuple(v, n):
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return t if len(t) == n and all(math.isfinite(x) for x in t) else None


def _seq_item(ds, keyword):
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _from_groups(frame_groups, shared, seq_kw, attr):
    for grp in (frame_groups, shared):
        if grp is None:
            continue
        item = _seq_item(grp, seq_kw)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def axial_angle_deg(orientation) -> float | None:
    """Angle between the slice normal and the patient z axis (0 = axial)."""
    if orientation is None:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(x * x for x in n))
    if norm < 1e-6:
        return None
    return math.degrees(math.acos(min(1.0, abs(n[2]) / norm)))


def _joined(v) -> str:
    """A possibly multi-valued string element as one backslash-joined string."""
    if v is None:
        return ""
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(_s(x) for x in v)
    return _s(v)


def recon_offset(target, collection, orientation) -> tuple[float, float] | None:
    """ReconstructionTargetCenterPatient − DataCollectionCenterPatient (both in patient coordinates, so their
    difference does not depend on where a vendor puts the origin) along the image's row and column
    directions: where the image centre lies from the isocentre. None unless both are written."""
    t, c = _tuple(target, 3), _tuple(collection, 3)
    if t is None or c is None or orientation is None:
        return None
    v = [a - b for a, b in zip(t, c)]
    r, col = orientation[:3], orientation[3:]
    return (sum(x * y for x, y in zip(v, r)), sum(x * y for x, y in zip(v, col)))


# DICOM's codes for the CTDI phantom (CID 4052): 113690 / 113691, the IEC head / body dosimetry phantom
_PHANTOM_CODES = {"113690": 16, "113691": 32}


def _ctdi_phantom(seq) -> int | None:
    """16 or 32 (cm) from CTDIPhantomTypeCodeSequence, by code or by its meaning; None when not written."""
    try:
        item = seq[0]
    except (TypeError, IndexError, KeyError):
        return None
    cm = _PHANTOM_CODES.get(_s(item.get("CodeValue")))
    if cm is None:
        meaning = _s(item.get("CodeMeaning")).upper()
        cm = 16 if "HEAD" in meaning else 32 if "BODY" in meaning else None
    return cm


# Header facts that tell one study, and one series within it, from another where a de-identification blanked
# their UIDs (a public abdomen series ships so): when and where it was scanned, never who (no patient element)
_STUDY_FACTS = ("StudyDate", "StudyTime", "StudyID", "StationName", "DeviceSerialNumber", "FrameOfReferenceUID")
_SERIES_FACTS = ("SeriesNumber", "SeriesDate", "SeriesTime", "SeriesDescription", "Modality", "FrameOfReferenceUID")


def _stand_in_uid(ds, facts: tuple[str, ...], within: str) -> str:
    """A UID (2.25 form) derived from ``facts`` of the header (and ``within``: the study's UID for a series), the
    same for every instance that shares them."""
    key = "\x1f".join([within] + [_s(ds.get(k)) for k in facts])
    return "2.25." + str(int.from_bytes(hashlib.sha256(key.encode("utf-8", "replace")).digest()[:16], "big"))


def _study_series_uids(ds) -> tuple[str, str, str]:
    """(study, series, the names of those derived): a blank StudyInstanceUID or SeriesInstanceUID stands in
    from the header facts that tell studies and series apart (``_STUDY_FACTS``, ``_SERIES_FACTS``), so that a
    series whose UIDs a de-identification blanked is analysed as the series it is instead of rejected."""
    study, series, derived = _s(ds.get("StudyInstanceUID")), _s(ds.get("SeriesInstanceUID")), []
    if not study:
        study = _stand_in_uid(ds, _STUDY_FACTS, "study")
        derived.append("StudyInstanceUID")
    if not series:
        series = _stand_in_uid(ds, _SERIES_FACTS, study)
        derived.append("SeriesInstanceUID")
    return study, series, ", ".join(derived)


def header_infos(ds, source: str = "", received_at: float | None = None, identifiers: bool = False) -> list[SliceInfo]:
    """One ``SliceInfo`` per frame (one for single-frame objects)."""
    fm = getattr(ds, "file_meta", None)
    sop_class = _s(ds.get("SOPClassUID")) or _s(fm.get("MediaStorageSOPClassUID") if fm is not None else "")
    sop_uid = _s(ds.get("SOPInstanceUID")) or _s(fm.get("MediaStorageSOPInstanceUID") if fm is not None else "")
    # only a whole image object stands in for blank UIDs: a file cut before its pixels, or its meta alone, is
    # told apart by naming no series (decode_file, the spool's quarantine)
    whole = sop_uid and any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    study_uid, series_uid, stand_in = (_study_series_uids(ds) if whole else
                                       (_s(ds.get("StudyInstanceUID")), _s(ds.get("SeriesInstanceUID")), ""))
    ctdi = _f(ds.get("CTDIvol"))
    base = dict(
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        stand_in_uids=stand_in,
        sop_class_uid=sop_class,
        source=source,
        received_at=time.time() if received_at is None else received_at,
        instance_number=_i(ds.get("InstanceNumber")),
        modality=_s(ds.get("Modality")).upper(),
        image_type=tuple(_s(x).upper() for x in (ds.get("ImageType") or ())) if ds.get("ImageType") is not None else (),
        rows=_i(ds.get("Rows")) or 0,
        cols=_i(ds.get("Columns")) or 0,
        gantry_tilt=_f(ds.get("GantryDetectorTilt"), 0.0),
        kvp=_f(ds.get("KVP")),
        ctdivol=ctdi,
        ctdi_phantom_cm=_ctdi_phantom(ds.get("CTDIPhantomTypeCodeSequence")),
        exposure_mas=_f(ds.get("Exposure")),
        reconstruction_diameter=_f(ds.get("ReconstructionDiameter")),
        data_collection_diameter=_f(ds.get("DataCollectionDiameter")),
        table_height=_f(ds.get("TableHeight")),
        patient_position=_s(ds.get("PatientPosition")).upper(),
        body_part=_s(ds.get("BodyPartExamined")),
        protocol_name=_s(ds.get("ProtocolName")),
        study_description=_s(ds.get("StudyDescription")),
        series_description=_s(ds.get("SeriesDescription")),
        series_number=_i(ds.get("SeriesNumber")),
        images_in_acquisition=_i(ds.get("ImagesInAcquisition")),
        scan_options=_joined(ds.get("ScanOptions")).upper(),
        convolution_kernel=_joined(ds.get("ConvolutionKernel")),
        manufacturer=_s(ds.get("Manufacturer")),
        manufacturer_model=_s(ds.get("ManufacturerModelName")),
        station_name=_s(ds.get("StationName")),
        device_serial_number=_s(ds.get("DeviceSerialNumber")),
        acquisition_time=_s(ds.get("AcquisitionTime")),
        content_time=_s(ds.get("ContentTime")),
        patient_name=_s(ds.get("PatientName")) if identifiers else "",
        patient_id=_s(ds.get("PatientID")) if identifiers else "",
    )
    nframes = _i(ds.get("NumberOfFrames")) or 1
    pfg = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    if pfg is None and shared is None:  # classic single-frame image
        iop = _tuple(ds.get("ImageOrientationPatient"), 6)
        return [SliceInfo(**base, frame=0,
                          position=_tuple(ds.get("ImagePositionPatient"), 3),
                          orientation=iop,
                          pixel_spacing=_tuple(ds.get("PixelSpacing"), 2),
                          slice_thickness=_f(ds.get("SliceThickness")),
                          recon_offset_mm=recon_offset(ds.get("ReconstructionTargetCenterPatient"),
                                                       ds.get("DataCollectionCenterPatient"), iop))]
    out = []
    for k in range(nframes):
        fg = pfg[k] if pfg is not None and k < len(pfg) else None
        ft = _from_groups(fg, shared, "CTImageFrameTypeSequence", "FrameType")
        b = dict(base)
        if ft is not None:
            b["image_type"] = tuple(_s(x).upper() for x in ft)
        fr_ctdi = _f(_from_groups(fg, shared, "CTExposureSequence", "CTDIvol"))
        if fr_ctdi is not None:
            b["ctdivol"] = fr_ctdi
        iop = (_tuple(_from_groups(fg, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
               or _tuple(ds.get("ImageOrientationPatient"), 6))
        out.append(SliceInfo(
            **b, frame=k,
            position=_tuple(_from_groups(fg, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=iop,
            recon_offset_mm=recon_offset(_from_groups(fg, shared, "CTPositionSequence", "ReconstructionTargetCenterPatient"),
                                         _from_groups(fg, shared, "CTPositionSequence", "DataCollectionCenterPatient"), iop),
            pixel_spacing=_tuple(_from_groups(fg, shared, "PixelMeasuresSequence", "PixelSpacing"), 2),
            slice_thickness=_f(_from_groups(fg, shared, "PixelMeasuresSequence", "SliceThickness"))))
    return out


# ImageType / FrameType values of derived maps whose pixels are not CT numbers (perfusion parameters,
# dual-energy material maps): their "noise", "rings" and "metal" would be meaningless. Monoenergetic and
# virtual non-contrast images are in HU and stay analysed.
NOT_CT_NUMBER_TYPES = frozenset({"PERFUSION", "RCBF", "RCBV", "RBF", "RBV", "MTT", "TTP", "TMAX", "TTD",
                                 "IODINE", "ZEFF", "Z_EFFECTIVE", "EFFECTIVE_Z", "ELECTRON_DENSITY"})


def _rescale_type(ds, frame: int) -> str:
    """RescaleType of one frame (Enhanced CT: Pixel Value Transformation; classic: top level), upper-cased."""
    pfg = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    fg = pfg[frame] if pfg is not None and frame < len(pfg) else None
    v = _from_groups(fg, shared, "PixelValueTransformationSequence", "RescaleType")
    if v is None:
        v = ds.get("RescaleType")
    return _s(v).strip().upper()


# How scanners spell Hounsfield units in RescaleType: the standard's "HU", GE's "HOUNDSFIELD UNIT", and
# the spellings seen from other vendors and post-processing tools ("HOUNSFIELD UNITS", "HOUNSFIELD", "HUS")
_HU_SPELLING = re.compile(r"^(HU|HUS|HOUN[DS]*FIELD( ?UNITS?)?)$")


def hounsfield(rescale_type: str) -> bool:
    """True when a RescaleType value names Hounsfield units, in any spelling real scanners write."""
    return bool(_HU_SPELLING.match(re.sub(r"[\s_\-]+", " ", rescale_type.strip().upper())))


def _class_name(uid) -> str:
    """'X-Ray Radiation Dose SR Storage 1.2.840.10008.5.1.4.1.1.88.67' (the UID alone when pydicom does not
    know it)."""
    if not uid:
        return "unknown"
    from pydicom.uid import UID

    name = UID(str(uid)).name
    return f"{name} {uid}" if name and name != str(uid) else str(uid)


def _why_not_analysed(ds, info: SliceInfo) -> str:
    """Reason an object is ignored (valid, but not an axial CT image in CT numbers), or ''."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return f"no image pixels (SOP class {_class_name(info.sop_class_uid)})"
    if info.sop_class_uid not in CT_CLASSES:
        return f"not a CT image (SOP class {_class_name(info.sop_class_uid)}, modality {info.modality or 'unknown'})"
    if "LOCALIZER" in info.image_type:
        return "localizer (scout) image"
    maps = NOT_CT_NUMBER_TYPES.intersection(info.image_type)
    if maps:
        return f"derived map, not CT numbers (image type {'/'.join(sorted(maps))})"
    # a reformat is not analysed whatever else is true of it: say that first
    ang = axial_angle_deg(info.orientation)
    if ang is not None and ang > MAX_AXIAL_ANGLE_DEG:
        return f"not axial (slice normal {ang:.0f}° from the patient axis)"
    rt = _rescale_type(ds, info.frame)
    # a classic CT image only carries RescaleType when its unit is not HU, but "US" (unspecified) turns up
    # on HU images from post-processing tools: only a named other unit is believed there; Enhanced CT
    # always carries it (HU for CT numbers, US for derived values)
    enhanced = ds.get("PerFrameFunctionalGroupsSequence") is not None or ds.get("SharedFunctionalGroupsSequence") is not None
    if rt and not hounsfield(rt) and (enhanced or rt != "US"):
        return f"pixel values are not CT numbers (RescaleType {rt})"
    if _i(ds.get("SamplesPerPixel")) not in (None, 1):
        return "colour image"
    return ""


SCREEN_TYPES = ("SECONDARY", "DOSE INFO")  # besides any value naming a SCREEN (save) or a REPORT (CSA, dose)


def _screen_capture(info: SliceInfo) -> bool:
    """An image-type value of a screen save, report or other secondary picture (vendors store dose and
    protocol pages as CT images); only consulted when the slice geometry is missing."""
    return any(t in SCREEN_TYPES or "SCREEN" in t or "REPORT" in t for t in info.image_type[1:])


def _missing_geometry(info: SliceInfo) -> str:
    miss = [n for n, v in (("ImagePositionPatient", info.position), ("ImageOrientationPatient", info.orientation),
                           ("PixelSpacing", info.pixel_spacing)) if v is None]
    if info.pixel_spacing is not None and not all(x > 0 for x in info.pixel_spacing):
        miss.append("PixelSpacing > 0")
    if not info.rows or not info.cols:
        miss.append("Rows/Columns")
    return ("missing or invalid geometry: " + ", ".join(miss)) if miss else ""


def _stored_values(ds, nframes: int) -> np.ndarray:
    """(frames, rows, cols) stored values as a numeric array."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    ts = _s(ds.file_meta.get("TransferSyntaxUID")) if getattr(ds, "file_meta", None) is not None else ""
    bits = _i(ds.get("BitsAllocated")) or 16
    signed = (_i(ds.get("PixelRepresentation")) or 0) == 1
    if ts in UNCOMPRESSED_LE and bits in (8, 16, 32) and "PixelData" in ds:
        raw = ds.PixelData
        dt = np.dtype(("i" if signed else "u") + str(bits // 8)).newbyteorder("<")
        need = rows * cols * nframes * dt.itemsize
        if len(raw) < need:
            raise ValueError(f"truncated pixel data: {len(raw)} bytes, {need} expected for {nframes}×{rows}×{cols}×{bits}-bit")
        arr = np.frombuffer(raw, dtype=dt, count=rows * cols * nframes).reshape(nframes, rows, cols)
        stored = _i(ds.get("BitsStored")) or bits
        if stored < bits:  # bits above BitsStored may hold overlays/garbage: mask (unsigned) or sign-extend
            if signed:
                shift = bits - stored
                arr = ((arr.astype(np.int32) << shift).astype(dt) >> shift)
            else:
                arr = arr & ((1 << stored) - 1)
        return arr
    arr = ds.pixel_array  # compressed / big endian / float: pydicom's decoder plugins
    return arr.reshape(nframes, rows, cols)


def _rescale(ds, frame: int):
    pfg = ds.get("PerFrameFunctionalGroupsSequence")
    shared = _seq_item(ds, "SharedFunctionalGroupsSequence")
    fg = pfg[frame] if pfg is not None and frame < len(pfg) else None
    slope = _f(_from_groups(fg, shared, "PixelValueTransformationSequence", "RescaleSlope"))
    icpt = _f(_from_groups(fg, shared, "PixelValueTransformationSequence", "RescaleIntercept"))
    if slope is None:
        slope = _f(ds.get("RescaleSlope"), 1.0)
    if icpt is None:
        icpt = _f(ds.get("RescaleIntercept"), 0.0)
    return slope or 1.0, icpt


def to_hu(ds, stored: np.ndarray, frame: int) -> np.ndarray:
    slope, icpt = _rescale(ds, frame)
    hu = stored.astype(np.float32)  # in place from here: one float32 image, no temporaries
    if slope != 1.0:
        hu *= np.float32(slope)
    hu += np.float32(icpt)
    pad = _i(ds.get("PixelPaddingValue"))
    if pad is not None:
        lim = _i(ds.get("PixelPaddingRangeLimit"))
        if lim is None:
            mask = stored == pad
        else:
            lo, hi = min(pad, lim), max(pad, lim)
            mask = (stored >= lo) & (stored <= hi)
        hu[mask] = PAD_HU
    return hu


_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")

# The top-level elements the decoding reads (``header_infos``, ``_why_not_analysed``, ``_stored_values``,
# ``to_hu`` and pydicom's pixel decoders: the Image Pixel module and the extended offset table). Only these are
# kept when a file is read; every other element is stepped over without being stored (a CT slice carries 150+,
# many of them private). An element read in decode.py and missing here reads as absent:
# tests/test_decode_tags.py checks the list against this file and decodes the real CT both ways.
DECODE_KEYWORDS = (
    # identity and series
    "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality", "ImageType",
    "InstanceNumber", "SeriesNumber", "ImagesInAcquisition", "PatientName", "PatientID",
    # what a blank Study / Series Instance UID is derived from (_STUDY_FACTS, _SERIES_FACTS)
    "StudyDate", "StudyTime", "StudyID", "SeriesDate", "SeriesTime", "FrameOfReferenceUID",
    # acquisition, dose, device and protocol
    "KVP", "CTDIvol", "CTDIPhantomTypeCodeSequence", "Exposure", "ReconstructionDiameter", "DataCollectionDiameter",
    "TableHeight", "GantryDetectorTilt", "PatientPosition", "BodyPartExamined", "ProtocolName", "StudyDescription",
    "SeriesDescription", "ScanOptions", "ConvolutionKernel", "Manufacturer", "ManufacturerModelName", "StationName",
    "DeviceSerialNumber", "AcquisitionTime", "ContentTime",
    # geometry
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "ReconstructionTargetCenterPatient", "DataCollectionCenterPatient",
    # multi-frame (the functional groups are read whole, with everything nested in them)
    "NumberOfFrames", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    # pixels: Image Pixel module, rescale and padding, pixel data and its offset table
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "PixelPaddingValue", "PixelPaddingRangeLimit", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData",
    # read only inside the items of the sequences above; listed so that every keyword this file names is kept
    "FrameType", "CTImageFrameTypeSequence", "CTExposureSequence", "CTPositionSequence", "PixelMeasuresSequence",
    "PixelValueTransformationSequence", "PlaneOrientationSequence", "PlanePositionSequence", "CodeValue",
    "CodeMeaning",
)
DECODE_TAGS = [pydicom.datadict.tag_for_keyword(k) for k in DECODE_KEYWORDS]


class _LastElement:
    """pydicom's ``stop_when`` callback that never stops the reading: it sees each top-level element's header
    before the value is read or stepped over, and keeps the element with the highest tag — its tag, length and
    where its value starts — which ``truncation`` judges."""

    __slots__ = ("tell", "tag", "length", "at")

    def __init__(self, fp):
        self.tell = fp.tell
        self.tag = -1
        self.length = self.at = None

    def __call__(self, tag, vr, length) -> bool:
        t = tag.real  # a plain int: BaseTag's own comparisons are slow
        if t >= self.tag:
            self.tag, self.length, self.at = t, length, self.tell()
        return False


def _bare(ds):
    """``ds`` read without the 128-byte preamble and file meta (older archives and exports) if it is
    unmistakably a dataset — a valid SOP Class and SOP Instance UID — given the transfer syntax it was read
    with, so its pixels decode like any other; None otherwise."""
    cls, inst = _s(_get(ds, "SOPClassUID")), _s(_get(ds, "SOPInstanceUID"))
    if not (_UID.match(cls) and _UID.match(inst)):
        return None
    enc = getattr(ds, "original_encoding", None) or (True, True)
    implicit, little = bool(enc[0]), bool(enc[1])
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = cls, inst
        ds.file_meta = meta
    return ds


_NOT_DICOM = "not a DICOM file (no DICOM file header, and not a bare dataset with SOP Class and Instance UIDs)"
_READ_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError, NotImplementedError,
                OverflowError, RecursionError, zlib.error, struct.error, BytesLengthException)


def _read(fp, all_elements: bool):
    """(dataset, where the reading stopped) from an open file, read once, keeping only DECODE_TAGS unless
    ``all_elements``. A file without the 128-byte preamble and "DICM" is read as a bare dataset (``_bare``)."""
    try:
        head = fp.read(132)
        fp.seek(0)
    except OSError as e:
        raise NotDicom(f"unreadable DICOM ({_reading_error(e)})") from None
    part10 = len(head) == 132 and head[128:] == b"DICM"  # else pydicom's reading without force refuses it
    tags = None if all_elements else DECODE_TAGS
    if not part10:
        try:
            ds = pydicom.filereader.read_partial(fp, force=True, specific_tags=tags)
        except Exception:  # noqa: BLE001 - not a dataset at all
            ds = None
        ds = _bare(ds) if ds is not None else None
        if ds is None:
            raise NotDicom(_NOT_DICOM)
        return ds, fp.tell()
    try:
        _check_inflated_size(fp)
        return pydicom.filereader.read_partial(fp, specific_tags=tags), fp.tell()
    except InvalidDicomError:
        raise NotDicom(_NOT_DICOM) from None
    except _READ_ERRORS as e:
        # zlib: a deflated dataset whose stream is corrupt; BytesLengthException: an element whose length is no
        # multiple of its value size (its message quotes the element's bytes: not repeated, see _reading_error);
        # RecursionError: sequences nested deeper than the interpreter's stack
        raise NotDicom(f"unreadable DICOM ({_reading_error(e)})") from None


INFLATE_MIN_BYTES = 64 << 20
INFLATE_MAX_RATIO = 32


def _check_inflated_size(fp) -> None:
    """Refuse a deflated dataset (PS3.5 A.5) that inflates to more than ``INFLATE_MAX_RATIO`` × its
    compressed size (and at least ``INFLATE_MIN_BYTES``). pydicom inflates the whole dataset in memory before
    reading it, and deflate reaches ~1000:1 on repeated bytes: a 600 kB file could take 600 MB, a few of them
    in the spool the box's memory. CT pixel data deflate 2–5:1. Counted in 1 MiB steps, holding no more than
    that; the file is left where it was. Files with another transfer syntax cost one read of their file meta."""
    start = fp.tell()
    try:
        fp.seek(132)
        group = fp.read(12)
        if len(group) < 12 or group[:6] != b"\x02\x00\x00\x00UL":
            return  # no group length: pydicom's own reading decides
        length = int.from_bytes(group[8:12], "little")
        if length > 65536:
            return
        meta = fp.read(length)
        if DEFLATED.encode() not in meta:
            return
        size = os.fstat(fp.fileno()).st_size - fp.tell()
        cap = max(INFLATE_MIN_BYTES, INFLATE_MAX_RATIO * size)
        inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
        while True:
            chunk = inflate.unconsumed_tail or fp.read(1 << 20)
            if not chunk:
                return
            total += len(inflate.decompress(chunk, 1 << 20))
            if total > cap:
                raise NotDicom(f"unreadable DICOM (its deflated dataset inflates to more than {cap >> 20} MiB "
                               f"from {size:,} bytes)")
            if inflate.eof:
                return
    finally:
        fp.seek(start)


def read_dataset(path: str | Path, all_elements: bool = False):
    """The dataset of one file (see ``_read``); raises NotDicom when it is none."""
    return _open_and_read(path, all_elements)[0]


class _FileBoundReader(io.BufferedReader):
    """A file opened for reading whose ``read(n)`` never asks for more than the file holds from where it
    stands. pydicom reads an element's value with ``read(length)`` for the length its header states, and a
    buffered read allocates those bytes before it reads: a damaged or hostile header stating 4 GiB would
    allocate 4 GiB for a file of a few kB (a ``MemoryError`` on a box that does not overcommit). Bounded, the
    read returns what the file holds and the element is found cut short (``truncation``)."""

    def __init__(self, raw, size: int):
        super().__init__(raw)
        self._size = size

    def read(self, n: int | None = -1) -> bytes:
        if n is not None and n > 65536:  # the element headers' and short values' reads allocate little
            n = min(n, max(0, self._size - self.tell()))
        return super().read(n)


def _open(path) -> io.BufferedReader:
    raw = open(str(path), "rb", buffering=0)
    try:
        return _FileBoundReader(raw, os.fstat(raw.fileno()).st_size)
    except BaseException:
        raw.close()
        raise


def _open_and_read(path, all_elements: bool, cut: bool = False):
    """(dataset, ``truncation`` verdict or '', os.stat_result or None) of one file, opened and read once; the
    verdict only with ``cut`` and for a CT image."""
    try:
        fp = _open(path)
    except OSError as e:
        raise NotDicom(f"unreadable DICOM ({_reading_error(e)})") from None
    with fp:
        ds, end = _read(fp, all_elements)
        try:
            st = os.fstat(fp.fileno())
        except OSError:
            st = None
        verdict = ""
        meta = getattr(ds, "file_meta", None)
        deflated = meta is not None and _s(meta.get("TransferSyntaxUID")) == DEFLATED  # never judged (``truncation``)
        if cut and st is not None and not deflated:
            whole = all_elements or _whole(ds, st.st_size, end)  # before any element is converted
            if _s(_get(ds, "SOPClassUID")) in CT_CLASSES:
                try:
                    verdict = "" if whole and not all_elements else truncation(ds, st.st_size, _walk(fp, all_elements))
                except Exception:  # noqa: BLE001 - an element too damaged to tell where it ends
                    verdict = ""
    return ds, verdict, st


def _whole(ds, size: int, end: int) -> bool:
    """Whether ``truncation`` finds the file whole, told from the dataset read keeping only DECODE_TAGS and
    where that reading stopped (``end``), without reading the file again.

    pydicom reads the top-level elements in file order and stops at the first that the file cannot hold, so
    every element but the last one read ends inside the file; that last one ends past it either when it was
    stepped over (the reading stopped past the file's end: ``end``) or when it was kept (its own length says).
    Where neither happened and the pixel data are there, no element ends past the file and the file holds
    pixel data: whole. Otherwise (a cut file, or no pixel data) ``_walk`` reads the element headers again."""
    return "PixelData" in ds and end <= size and not any(
        isinstance(e, RawDataElement) and e.length != 0xFFFFFFFF and e.value_tell + e.length > size
        for e in ds._dict.values())


def _walk(fp, all_elements: bool) -> _LastElement | None:
    """The top-level element with the highest tag, from reading the file's element headers again keeping none
    of them (None where the dataset holds every element: ``truncation`` finds it there)."""
    if all_elements:
        return None
    fp.seek(0)
    last = _LastElement(fp)
    pydicom.filereader.read_partial(fp, last, force=True, specific_tags=[0x00080016])
    return last


_QUOTED_BYTES = re.compile(r"""b(['"]).*?(?<!\\)\1""", re.S)


def _reading_error(e: Exception) -> str:
    """The reading error for logs and the store: its type and message, without the bytes some messages quote
    (they may be a name or an ID read from the file), at most 200 characters."""
    msg = _QUOTED_BYTES.sub("<bytes>", str(e)).replace("\n", " ")
    return f"{type(e).__name__}: {msg[:200]}{'…' if len(msg) > 200 else ''}"


def decode_dataset(ds, source: str = "", received_at: float | None = None, pixels: bool = True,
                   identifiers: bool = False) -> list[Decoded]:
    try:
        infos = header_infos(ds, source, received_at, identifiers)
    except Exception as e:  # a header so broken that even its facts cannot be read
        info = SliceInfo(sop_instance_uid=_s(_get(ds, "SOPInstanceUID")), series_instance_uid=_s(_get(ds, "SeriesInstanceUID")),
                         study_instance_uid=_s(_get(ds, "StudyInstanceUID")), sop_class_uid=_s(_get(ds, "SOPClassUID")),
                         source=source)
        return [Decoded(info, error=f"unreadable header ({_reading_error(e)})")]
    out: list[Decoded] = []
    analyse = []
    for info in infos:
        try:
            why = _why_not_analysed(ds, info)
        except Exception as e:  # noqa: BLE001 - an element it reads is damaged (pydicom converts on first read)
            out.append(Decoded(info, error=f"unreadable header ({_reading_error(e)})"))
            continue
        if why:
            out.append(Decoded(info, ignored=why))
            continue
        if not info.series_instance_uid or not info.sop_instance_uid:
            out.append(Decoded(info, ignored="no SeriesInstanceUID/SOPInstanceUID"))
            continue
        geo = _missing_geometry(info)
        if geo and _screen_capture(info):
            # a screen save or report page stored as a CT image (dose pages, protocol pages): not a slice at all
            out.append(Decoded(info, ignored=f"secondary image without slice geometry (image type {'/'.join(info.image_type)})"))
            continue
        if geo:
            out.append(Decoded(info, error=geo))
            continue
        analyse.append(len(out))
        out.append(Decoded(info))
    if not analyse or not pixels:
        return out
    try:
        stored = _stored_values(ds, len(infos))
    except Exception as e:  # noqa: BLE001 - any decoder failure is this instance's problem only
        ts = _s(ds.file_meta.get("TransferSyntaxUID")) if getattr(ds, "file_meta", None) is not None else "?"
        msg = _QUOTED_BYTES.sub("<bytes>", str(e)).splitlines()[0][:300] if str(e) else type(e).__name__
        for i in analyse:
            out[i].error = f"pixel data cannot be decoded (transfer syntax {ts}): {msg}"
        return out
    lazy = len(infos) > LAZY_FRAMES
    for i in analyse:
        d = out[i]
        k = d.info.frame
        try:
            if lazy:  # checked on every 4th pixel now; the whole frame converted when it is analysed
                d.lazy = functools.partial(to_hu, ds, stored[k], k)
                probe = to_hu(ds, stored[k][::4, ::4], k)
            else:
                d.hu = probe = to_hu(ds, stored[k], k)
                probe = probe[::4, ::4]
        except Exception as e:  # noqa: BLE001
            d.error = f"pixel data cannot be converted to HU: {type(e).__name__}: {e}"
            d.lazy = None
            continue
        if "DERIVED" in d.info.image_type and not _has_low_attenuation(probe):
            d.ignored = ("derived image whose values are not CT numbers (no pixel below "
                         f"{LOW_ATTENUATION_HU:.0f} HU: no air, fat or lung; a material, iodine or Zeff map?)")
            d.hu = None
            d.lazy = None
    return out


LOW_ATTENUATION_HU = -50.0


def _has_low_attenuation(sub: np.ndarray) -> bool:
    """Whether a slice holds what every CT section in HU holds somewhere: air, lung or fat (below -50 HU)
    inside the reconstructed field. Vendors' material-density, iodine and effective-Z maps carry
    concentrations (0 and up) under image types no list can keep up with; a derived image without a single
    such pixel is one of them. ``sub``: the slice's HU on every 4th pixel in each direction (a 0.1 % share
    of 512²)."""
    inside = sub > -1500.0  # padding and outside-the-field pixels excluded
    return int(np.count_nonzero(inside & (sub < LOW_ATTENUATION_HU))) >= max(4, int(0.001 * sub.size))


DEFLATED = "1.2.840.10008.1.2.1.99"


def truncation(ds, size: int, last: _LastElement | None = None) -> str:
    """How a file of ``size`` bytes ends before its dataset does, or '': its last element needs more bytes than
    the file holds, or the file stops in the middle of an element's header before any pixel data (a transfer or
    copy cut short). Not judged where positions are not file offsets (deflated data) or the last element has
    no length (encapsulated pixel data: its decoder says). The last element is the top-level one with the
    highest tag: taken from ``last`` where the file was read keeping only some elements."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and _s(meta.get("TransferSyntaxUID")) == DEFLATED:
        return ""
    if last is not None and last.at is not None:
        tag, length, at = last.tag, last.length, last.at
    elif not len(ds):
        return ""
    else:
        tag = max(int(t) for t in ds.keys())
        elem = ds.get_item(tag, keep_deferred=True)  # as read: a value-less element would be converted, losing both
        length, at = getattr(elem, "length", None), getattr(elem, "value_tell", None)
    if length is None or at is None or length == 0xFFFFFFFF:
        return ""
    what = "its pixel data" if tag == 0x7FE00010 else f"element {pydicom.tag.Tag(tag)}"
    if at + length > size:
        return f"{size:,} bytes, {what} would end at byte {at + length:,}"
    if at + length < size and "PixelData" not in ds:
        return f"{size:,} bytes, cut after element {pydicom.tag.Tag(tag)}, before the pixel data"
    return ""


def decode_file(path: str | Path, received_at: float | None = None, identifiers: bool = False,
                all_elements: bool = False) -> list[Decoded]:
    """Decode one file; raises NotDicom for non-DICOM input. A CT image whose file is cut short (``truncation``)
    is an error on its series whether the cut falls in its pixel data or before them, or — when the file ends
    before it names its series — ignored with the same reason. The file is opened and read once, keeping only
    the elements in DECODE_KEYWORDS; ``all_elements`` keeps every element (what the selective reading is tested
    against: both decode every file the same)."""
    ds, cut, st = _open_and_read(path, all_elements, cut=True)
    if received_at is None:
        received_at = st.st_mtime if st is not None else time.time()
    out = decode_dataset(ds, str(path), received_at, pixels=not cut, identifiers=identifiers)
    no_pixels = "PixelData" not in ds  # ignored as "no image pixels" by decode_dataset
    for d in out if cut else ():
        if d.ignored and not no_pixels:
            continue  # not analysed in any case (a localizer, a reformat)
        if d.info.series_instance_uid and d.info.sop_instance_uid:
            d.error, d.ignored = f"truncated file: {cut}", ""
        else:
            d.ignored = f"truncated file: {cut}; it ends before naming its series"
    return out
