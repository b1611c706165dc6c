"""Acquisition variants of a real CT series: the same patient as another matrix, a targeted displayed field,
thicker slices, a feet-first or a prone storage layout would show it.

The real studies here cover few scanners and protocols. These variants derive what can honestly be derived from
a reconstructed image (``derive``):

* ``matrix-N`` — the slice on an N × N matrix over the same field (``resample_matrix``): area averaging to a
  coarser one, band-limited (Fourier) interpolation to a finer one, PixelSpacing and ImagePositionPatient to
  match. Resampling a reconstruction is not reconstructing on another matrix: a 1024² reconstruction of the
  same raw data holds noise above the 512² grid's Nyquist frequency that the interpolated one lacks, and a
  256² reconstruction samples the kernel's noise where area averaging smooths it (it would read more σ at
  2 mm than this variant). Noise is read at 2 mm, where the kernels and the grids differ least; what a matrix
  variant tests is that no measure depends on a count of pixels rather than millimetres.
* ``fov-F`` — a targeted displayed field: the square of F × the displayed field round the trunk's middle on
  the same matrix (``crop_to_field``: the slice brought to the finer pixel band-limited, then cut), padding
  outside its inscribed circle, with ReconstructionTargetCenterPatient and DataCollectionCenterPatient as
  Siemens and Canon write them (GE and Philips write neither: there the rotation axis of an offset field is not
  in the header). The data are all there: a field that cuts the body is a crop, never truncation.
* ``thick-K`` — K consecutive slices averaged into one (SliceThickness, positions and spacing to match): what a
  thicker reconstruction of the same helical data gives, to first order (partial volume over K slices; σ down
  by less than √K where neighbouring slices share data, as the real chest's do).
* ``clip-H`` — a store that keeps CT numbers only up to H HU: every pixel over it written as H, as the real
  Philips Big Bore chest here stores them (12-bit values up to 4000 over an intercept of −1024: 2,976 HU; GE
  clips at 3071). Metal then reads the store's ceiling, not its own density, and partial volume of metal next
  to it less still.
* ``feet-first`` — the patient entered feet first, stored as a scanner that reconstructs in the gantry's frame
  writes it: the patient's left on the image's left (columns mirrored, ImageOrientationPatient −1\\0\\0\\0\\1\\0),
  PatientPosition FFS, instances numbered from the feet. (GE re-orients feet-first images to the head-first
  layout and keeps 1\\0\\0\\0\\1\\0: the real GE slices here include such FFS files.)
* ``prone`` — the same layout rotated by 180° (ImageOrientationPatient −1\\0\\0\\0\\−1\\0), PatientPosition HFP.
  Only the storage is prone: the anatomy lies as it did (supine gravity, the couch now at the image's top).
  Both layouts are reached from whatever layout the source is stored in (an archive may hold a supine slice
  with its rows running posterior to anterior): the pixels are mirrored until the orientation is the one named.

A reconstruction kernel is not a variant: relabelling ConvolutionKernel changes no texture. Every variant is a
new series (new UIDs derived from the source and the variant), written as CT Image Storage, explicit VR little
endian; ``sources.json`` beside the files maps each new SOP Instance UID to its file and the source slices it
was made from (several for ``thick-K``). Used by ``bench/evaluate_variants.py`` and the tests.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from medqc.analysis.image import PAD_HU
from medqc.synth.dicomio import save
from medqc.synth.realcases import _uid

VARIANTS = ("matrix-256", "matrix-768", "matrix-1024", "fov-0.7", "fov-0.5", "thick-2", "thick-3", "clip-2976",
            "feet-first", "prone")


def hu_of(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0)


def set_hu(d, img: np.ndarray) -> None:
    """Store ``img`` (HU) as ``d``'s pixels with its own rescale and signedness, 16 bits, explicit VR little
    endian; Rows and Columns from the image. Private elements and the stored value range are dropped (their
    lengths and values may no longer hold)."""
    from pydicom.uid import ExplicitVRLittleEndian

    for t in [t for t in d.keys() if t.is_private]:
        del d[t]
    for kw in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue", "PixelPaddingRangeLimit"):
        if kw in d:
            delattr(d, kw)
    slope, inter = float(getattr(d, "RescaleSlope", 1) or 1), float(getattr(d, "RescaleIntercept", 0) or 0)
    signed = int(getattr(d, "PixelRepresentation", 0)) == 1
    lo, hi = (-32768, 32767) if signed else (0, 65535)
    d.PixelData = np.clip(np.rint((img - inter) / slope), lo, hi).astype("<i2" if signed else "<u2").tobytes()
    d.Rows, d.Columns = int(img.shape[0]), int(img.shape[1])
    d.BitsAllocated, d.BitsStored, d.HighBit = 16, 16, 15
    if getattr(d, "file_meta", None) is not None:
        d.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _dirs(d) -> tuple[np.ndarray, np.ndarray]:
    o = [float(v) for v in d.ImageOrientationPatient]
    return np.array(o[:3]), np.array(o[3:])


def _ipp(d) -> np.ndarray:
    return np.array([float(v) for v in d.ImagePositionPatient])


def _fmt(v) -> list[float]:
    return [round(float(x), 4) for x in v]


def _ds(v: float) -> float:
    """A value a DS element (16 characters at most) holds as written."""
    return float(f"{float(v):.10g}")


def trunk_centre(datasets: list) -> tuple[float, float]:
    """(row, col) of the trunk's middle over a series: the median of the per-slice boxes round > -400 HU."""
    centres = []
    for ds in datasets:
        ys, xs = np.nonzero(hu_of(ds) > -400)
        if ys.size:
            centres.append(((ys.min() + ys.max()) / 2.0, (xs.min() + xs.max()) / 2.0))
    if not centres:
        return (int(datasets[0].Rows) - 1) / 2.0, (int(datasets[0].Columns) - 1) / 2.0
    cy, cx = np.median(np.array(centres), axis=0)
    return float(cy), float(cx)


def crop_to_field(ds, centre: tuple[float, float], fov_mm: float, axis_tags: bool = False):
    """A copy of ``ds`` showing the square of about ``fov_mm`` round ``centre`` (row, col in pixels) on the same
    matrix, outside its inscribed circle padding (-2000 HU where the store can hold it); PixelSpacing,
    ImagePositionPatient and ReconstructionDiameter to match. The whole slice is brought to the finer grid as
    ``resample_matrix`` does (band-limited: a reconstruction on a smaller field has finer pixels, not a
    smoothed picture; linear interpolation read a thin ring at a tenth of its contrast) and the field cut from
    it, to the nearest pixel of that grid. ``axis_tags``: also write where the new field's centre and the
    isocentre lie (ReconstructionTargetCenterPatient, DataCollectionCenterPatient, as Siemens and Canon
    scanners write them; the source field is taken as centred on the isocentre unless its header says
    otherwise)."""
    d = copy.deepcopy(ds)
    ps = float(d.PixelSpacing[0])
    rows, cols = int(d.Rows), int(d.Columns)
    hu = hu_of(d)
    pad_v = float(hu.min())
    n_big = max(cols, int(round(cols * cols * ps / fov_mm)))  # the whole slice on the new pixel size
    big = _resample_hu(hu, n_big)
    sb = cols / n_big  # source pixels per new pixel; new pixel i's centre lies at source (i + 0.5)·sb - 0.5
    cy, cx = centre
    i0 = int(round((cy + 0.5) / sb - rows / 2.0))  # the crop's centre on ``centre``
    j0 = int(round((cx + 0.5) / sb - cols / 2.0))
    img = np.full((rows, cols), pad_v, np.float32)
    ys, xs = slice(max(0, i0), min(n_big, i0 + rows)), slice(max(0, j0), min(n_big, j0 + cols))
    img[ys.start - i0:ys.stop - i0, xs.start - j0:xs.stop - j0] = big[ys, xs]
    yy, xx = np.mgrid[0:rows, 0:cols]
    img[np.hypot(yy - (rows - 1) / 2, xx - (cols - 1) / 2) > min(rows, cols) / 2] = min(pad_v, -2000.0)
    y0, x0 = (i0 + 0.5) * sb - 0.5, (j0 + 0.5) * sb - 0.5  # source coordinates of the new first pixel
    ro, co = _dirs(d)
    if axis_tags:  # the isocentre: where the header puts it, else the source field's centre (not offset)
        if "DataCollectionCenterPatient" not in d:
            d.DataCollectionCenterPatient = _fmt(_ipp(d) + (cols - 1) / 2.0 * ps * ro + (rows - 1) / 2.0 * ps * co)
        d.ReconstructionTargetCenterPatient = _fmt(_ipp(d) + (x0 + (cols - 1) / 2.0 * sb) * ps * ro
                                                   + (y0 + (rows - 1) / 2.0 * sb) * ps * co)
    d.ImagePositionPatient = _fmt(_ipp(d) + x0 * ps * ro + y0 * ps * co)
    d.PixelSpacing = [_ds(ps * sb), _ds(ps * sb)]
    d.ReconstructionDiameter = round(cols * ps * sb, 3)
    set_hu(d, img)
    return d


def _fourier_upsample(img: np.ndarray, n: int) -> np.ndarray:
    """``img`` (rows × cols) on an n × n grid by band-limited (Fourier) interpolation, pixel centres as
    ``resample_matrix`` places them: the spectrum the reconstruction holds, unchanged and zero beyond its own
    Nyquist frequency. Linear interpolation would also low-pass it (σ at 2 mm 0.8-0.9 × the source's on the real
    chest), which a finer reconstruction grid does not do."""
    rows, cols = img.shape
    f = np.fft.fftshift(np.fft.fft2(img.astype(np.float64)))
    big = np.zeros((n, n), complex)
    r0, c0 = (n - rows) // 2, (n - cols) // 2
    big[r0:r0 + rows, c0:c0 + cols] = f
    # new pixel i samples the source at (i + 0.5)·s - 0.5 (s = source pixels per new pixel); the zero-padded
    # inverse transform samples it at i·s: shift by d = 0.5 - 0.5 / s new pixels
    k = np.fft.fftshift(np.fft.fftfreq(n))
    dr, dc = 0.5 - 0.5 * n / rows, 0.5 - 0.5 * n / cols
    big *= np.exp(2j * np.pi * k[:, None] * dr) * np.exp(2j * np.pi * k[None, :] * dc)
    return (np.fft.ifft2(np.fft.ifftshift(big)).real * (n * n) / (rows * cols)).astype(np.float32)


CONSTANT_FILL_SHARE = 0.02  # a value held by this share of a slice's pixels is a fill, kept exact by resampling


def _resample_hu(hu: np.ndarray, n: int) -> np.ndarray:
    """``hu`` on an n × n grid over the same field: area averaging to a coarser grid, band-limited (Fourier)
    interpolation to a finer one, within the source's range (a store that clips keeps clipping: no ringing past
    its floor or ceiling) and exactly at the floor, the ceiling or a value that fills ``CONSTANT_FILL_SHARE`` of
    the slice where every source pixel around holds it (a constant fill stays constant: a scanner fills what
    lies beyond a small scan field with one value, which need not be the lowest where the reconstruction does
    not clip its streaks); padding stays padding (resampled as a mask, filled with air before, so that no pixel
    blends padding with the patient's air)."""
    import cv2

    rows, cols = hu.shape
    pad = hu < PAD_HU
    pad_v = float(hu[pad].min()) if pad.any() else None
    src = np.where(pad, np.float32(-1000.0), hu).astype(np.float32) if pad_v is not None else hu.astype(np.float32)
    if n < min(rows, cols):
        img = cv2.resize(np.ascontiguousarray(src), (n, n), interpolation=cv2.INTER_AREA)
    elif n == rows == cols:
        img = src.copy()
    else:
        lo, hi = float(src.min()), float(src.max())
        img = np.clip(_fourier_upsample(src, n), lo, hi)
        vals, counts = np.unique(src, return_counts=True)
        fills = {lo, hi} | {float(v) for v in vals[counts >= CONSTANT_FILL_SHARE * src.size]}
        for v in sorted(fills):
            at = cv2.resize((src == v).astype(np.float32), (n, n), interpolation=cv2.INTER_LINEAR)
            img[at >= 0.999] = v
    if pad_v is not None:
        m = cv2.resize(pad.astype(np.float32), (n, n), interpolation=cv2.INTER_LINEAR)
        img[m >= 0.5] = pad_v
    return img


def resample_matrix(ds, n: int):
    """A copy of ``ds`` resampled to ``n`` × ``n`` over the same displayed field (``_resample_hu``)."""
    d = copy.deepcopy(ds)
    hu = hu_of(d)
    rows, cols = hu.shape
    img = _resample_hu(hu, n)
    sr, sc = rows / n, cols / n  # source pixels per new pixel
    rps, cps = float(d.PixelSpacing[0]), float(d.PixelSpacing[1])
    ro, co = _dirs(d)
    # pixel centres: new (i, j) lies at source ((i + 0.5)·sr - 0.5, (j + 0.5)·sc - 0.5)
    d.ImagePositionPatient = _fmt(_ipp(d) + (0.5 * sc - 0.5) * cps * ro + (0.5 * sr - 0.5) * rps * co)
    d.PixelSpacing = [_ds(rps * sr), _ds(cps * sc)]
    set_hu(d, img)
    return d


def thicken(group: list):
    """One slice averaging ``group`` (consecutive slices of a series): the middle slice's header, the mean
    position and SliceLocation, SliceThickness and SpacingBetweenSlices × len(group)."""
    k = len(group)
    d = copy.deepcopy(group[k // 2])
    img = np.mean([hu_of(g) for g in group], axis=0, dtype=np.float64).astype(np.float32)
    d.ImagePositionPatient = _fmt(np.mean([_ipp(g) for g in group], axis=0))
    if "SliceLocation" in d:
        d.SliceLocation = round(float(np.mean([float(g.SliceLocation) for g in group])), 4)
    if "SliceThickness" in d and d.SliceThickness not in (None, ""):
        d.SliceThickness = round(float(d.SliceThickness) * k, 4)
    if "SpacingBetweenSlices" in d and d.SpacingBetweenSlices not in (None, ""):
        d.SpacingBetweenSlices = round(float(d.SpacingBetweenSlices) * k, 4)
    set_hu(d, img)
    return d


def clip(ds, ceiling_hu: float):
    """``ds`` as a store that keeps CT numbers up to ``ceiling_hu`` writes it (see ``clip-H``)."""
    d = copy.deepcopy(ds)
    img = hu_of(d)
    if float(img.max()) > ceiling_hu:
        set_hu(d, np.minimum(img, np.float32(ceiling_hu)))
    return d


def _position(d, prone: bool) -> str:
    pp = str(getattr(d, "PatientPosition", "") or "HFS").upper()
    head = "FF" if pp.startswith("FF") else "HF"
    return head + ("P" if prone else "S")


def _stored_as(ds, row_x: float, col_y: float):
    """A copy of ``ds`` laid out as a scanner stores it for a position: its pixels mirrored (and
    ImagePositionPatient / ImageOrientationPatient to match) until its row direction's x and its column
    direction's y have the signs of ``row_x`` and ``col_y``, whatever layout the source was stored in (an
    archive may hold a supine slice with its rows running posterior to anterior); the anatomy stays where it
    was in patient coordinates."""
    d = copy.deepcopy(ds)
    hu = hu_of(d)
    ro, co = _dirs(d)
    rps, cps = float(d.PixelSpacing[0]), float(d.PixelSpacing[1])
    ipp = _ipp(d)
    if np.sign(ro[0]) != np.sign(row_x):  # mirror the columns
        ipp, ro, hu = ipp + (hu.shape[1] - 1) * cps * ro, -ro, hu[:, ::-1]
    if np.sign(co[1]) != np.sign(col_y):  # reverse the rows
        ipp, co, hu = ipp + (hu.shape[0] - 1) * rps * co, -co, hu[::-1, :]
    d.ImagePositionPatient = _fmt(ipp)
    d.ImageOrientationPatient = _fmt(list(ro) + list(co))
    set_hu(d, np.ascontiguousarray(hu))
    return d


def feet_first(ds):
    """``ds`` as the gantry-frame feet-first layout stores it: the row direction running to the patient's right
    (−x), the column direction posterior (+y); from the head-first supine layout, columns mirrored."""
    d = _stored_as(ds, -1.0, 1.0)
    pp = str(getattr(d, "PatientPosition", "") or "HFS").upper()
    d.PatientPosition = ("HF" if pp.startswith("FF") else "FF") + (pp[2:] or "S")
    return d


def prone(ds):
    """``ds`` as a prone layout stores it (ImageOrientationPatient −1\\0\\0\\0\\−1\\0: from the head-first
    supine layout, rotated by 180° in its plane), PatientPosition prone."""
    d = _stored_as(ds, -1.0, -1.0)
    d.PatientPosition = _position(d, prone=True)
    return d


def derive(datasets: list, variant: str, centre: tuple[float, float] | None = None) -> list[tuple[object, list[str]]]:
    """The slices of ``variant`` (one of ``VARIANTS``) of ``datasets`` (one series, head first) as
    (dataset, source SOP Instance UIDs) in the order the variant's scanner would number them; UIDs not yet
    changed (``write_variant`` does). ``centre``: the targeted field's centre (row, col; default the trunk's
    middle over ``datasets``): a copy of a series with an artifact added is cropped where the clean one is."""
    kind, _, arg = variant.partition("-")
    sop = lambda d: str(d.SOPInstanceUID)  # noqa: E731
    if kind == "matrix":
        return [(resample_matrix(d, int(arg)), [sop(d)]) for d in datasets]
    if kind == "fov":
        centre = centre or trunk_centre(datasets)
        out = []
        for d in datasets:
            fov = float(arg) * float(d.PixelSpacing[1]) * int(d.Columns)  # the displayed field
            out.append((crop_to_field(d, centre, fov, axis_tags=True), [sop(d)]))
        return out
    if kind == "thick":
        k = int(arg)  # a series shorter than K slices has no thicker variant
        groups = [datasets[i:i + k] for i in range(0, len(datasets) - k + 1, k)]
        return [(thicken(g), [sop(d) for d in g]) for g in groups]
    if kind == "clip":
        return [(clip(d, float(arg)), [sop(d)]) for d in datasets]
    if variant == "feet-first":
        return [(feet_first(d), [sop(d)]) for d in reversed(datasets)]
    if variant == "prone":
        return [(prone(d), [sop(d)]) for d in datasets]
    raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def write_variant(datasets: list, out: Path, variant: str, tag: str = "",
                  centre: tuple[float, float] | None = None) -> Path | None:
    """Write ``variant`` of ``datasets`` (one series, head first) as a new series in ``out`` (created), with
    ``sources.json``: {new SOP Instance UID: {"file": name, "sources": [source SOP Instance UIDs]}}; None
    (nothing written) where the variant does not exist for the series (``thick-K`` of fewer than K slices).
    ``tag`` keeps the UIDs of variants of different sources apart where the sources share a series UID;
    ``centre``: see ``derive``."""
    slices = derive(datasets, variant, centre)
    if not slices:
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = str(datasets[0].SeriesInstanceUID)
    series_uid = _uid(src, tag, variant, "series")
    sources = {}
    for i, (d, srcs) in enumerate(slices):
        d.SeriesInstanceUID = series_uid
        d.SOPInstanceUID = _uid(src, tag, variant, *srcs)
        d.InstanceNumber = i + 1
        desc = str(getattr(d, "SeriesDescription", "") or "")
        d.SeriesDescription = f"{desc} [{variant}]".strip()[:64]
        if getattr(d, "file_meta", None) is not None:
            d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
        save(d, out / f"IM{i + 1:04d}.dcm")
        sources[str(d.SOPInstanceUID)] = {"file": f"IM{i + 1:04d}.dcm", "sources": srcs}
    (out / "sources.json").write_text(json.dumps(sources, indent=0) + "\n")
    return out


def read_series_of(paths: list) -> list:
    """The files ``paths`` (one series) as datasets, head first."""
    import pydicom

    return sorted((pydicom.dcmread(str(p)) for p in paths), key=_z, reverse=True)


def _z(ds) -> float:
    """Position along the slice normal taken towards the head (as the pipeline reads it)."""
    ro, co = _dirs(ds)
    n = np.cross(ro, co)
    return float(np.dot(n if n[2] >= 0 else -n, _ipp(ds)))


def read_series_all(folder: Path) -> list[list]:
    """Every axial CT image series in ``folder`` (recursively) as lists of datasets, head first (the same
    selection ``medqc.synth.inject`` makes, for each series rather than the largest)."""
    import pydicom

    found: dict[str, list] = {}
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(f), force=False)
        except Exception:  # noqa: BLE001 - not DICOM
            continue
        if getattr(ds, "Modality", None) != "CT" or "PixelData" not in ds:
            continue
        itype = [str(x).upper() for x in getattr(ds, "ImageType", [])]
        if "LOCALIZER" in itype or "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
            continue
        o = [float(x) for x in ds.ImageOrientationPatient]
        if abs(o[0] * o[4] - o[1] * o[3]) < 0.8 or int(getattr(ds, "SamplesPerPixel", 1)) != 1:
            continue
        found.setdefault(str(ds.SeriesInstanceUID), []).append(ds)

    return [sorted(v, key=_z, reverse=True) for _, v in sorted(found.items())]
