"""Which instances go, in which order, when: the headers of the recorded files (no pixel data read), grouped
into studies and series in the order the scanner made them, and each instance's send time.

Pacing: a fixed rate per association, as fast as possible, or the gaps recorded in the files (ContentTime /
AcquisitionTime), each capped."""

from __future__ import annotations

import datetime as _dt
import sys
from dataclasses import dataclass
from pathlib import Path

from medqc.errors import UsageError

DEFAULT_RATE = 60.0  # slices/s per association: a typical CT reconstruction output rate
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass
class Instance:
    path: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str  # "" when the file has no file meta information
    instance_number: int | None = None
    z: float | None = None
    recorded_s: float | None = None  # recorded content/acquisition time, seconds since an arbitrary epoch
    series_number: int | None = None


@dataclass
class SeriesPlan:
    study_uid: str
    series_uid: str
    instances: list[Instance]
    offsets: list[float]  # send time of each instance, seconds after the series' start
    gap_before_s: float = 0.0  # pause before this series (after the previous one of the study)

    @property
    def duration_s(self) -> float:
        return self.offsets[-1] if self.offsets else 0.0


@dataclass
class StudyPlan:
    study_uid: str
    series: list[SeriesPlan]


def _tm_seconds(date: str, tm: str) -> float | None:
    """DICOM DA + TM → seconds (date optional). None when absent or malformed."""
    tm = (tm or "").strip().replace(":", "")
    if len(tm) < 2 or not tm[:2].isdigit():
        return None
    try:
        hh = int(tm[0:2])
        mm = int(tm[2:4]) if len(tm) >= 4 else 0
        ss = float(tm[4:]) if len(tm) > 4 else 0.0
    except ValueError:
        return None
    secs = hh * 3600 + mm * 60 + ss
    date = (date or "").strip()
    if len(date) == 8 and date.isdigit():
        try:
            secs += (_dt.date(int(date[:4]), int(date[4:6]), int(date[6:8])) - _dt.date(1970, 1, 1)).days * 86400.0
        except ValueError:
            pass
    return secs


def read_instance(path: Path) -> Instance:
    """Header facts needed to send ``path`` (no pixel data read). Raises ValueError with a plain reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    tags = [
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber",
        "SeriesNumber", "ImagePositionPatient", "ContentDate", "ContentTime", "AcquisitionDate",
        "AcquisitionTime", "AcquisitionDateTime",
    ]
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        try:  # files without the 128-byte preamble / file meta: accept if they parse as a dataset
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags, force=True)
        except Exception as e:
            raise ValueError(f"not a DICOM file ({type(e).__name__})") from None
        if "SOPInstanceUID" not in ds:
            raise ValueError("not a DICOM file (no DICM prefix, no SOP Instance UID)")
    except (OSError, Exception) as e:  # truncated, unreadable
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == _MEDIA_DIRECTORY or (meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY):
        raise ValueError("a DICOMDIR media directory, not an instance a scanner sends")
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise ValueError(f"DICOM without {', '.join(missing)}: cannot be stored")
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    z = None
    ipp = ds.get("ImagePositionPatient")
    if ipp is not None and len(ipp) == 3:
        try:
            z = float(ipp[2])
        except (TypeError, ValueError):
            z = None
    rec = None
    adt = str(ds.get("AcquisitionDateTime", "") or "")
    if ds.get("ContentTime"):
        rec = _tm_seconds(str(ds.get("ContentDate", "")), str(ds.ContentTime))
    if rec is None and ds.get("AcquisitionTime"):
        rec = _tm_seconds(str(ds.get("AcquisitionDate", "")), str(ds.AcquisitionTime))
    if rec is None and len(adt) >= 10:
        rec = _tm_seconds(adt[:8], adt[8:])

    def _int(v):
        try:
            return int(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None

    return Instance(
        path=str(path),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=ts,
        instance_number=_int(ds.get("InstanceNumber")),
        z=z,
        recorded_s=rec,
        series_number=_int(ds.get("SeriesNumber")),
    )


def scan(paths: list[str | Path], progress: bool = False) -> tuple[list[Instance], list[dict]]:
    """Every file under ``paths`` → (instances, skipped [{path, reason}]). Duplicated SOP instances are skipped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"no such file or folder: {p}")
    instances: list[Instance] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for f in _progress(files, "reading headers", "file", progress):
        try:
            inst = read_instance(f)
        except ValueError as e:
            skipped.append({"path": str(f), "reason": str(e)})
            continue
        if inst.sop_instance_uid in seen:
            skipped.append({"path": str(f), "reason": f"duplicate SOP Instance UID {inst.sop_instance_uid}"})
            continue
        seen.add(inst.sop_instance_uid)
        instances.append(inst)
    return instances, skipped


def plan(instances: list[Instance], mode: str, rate: float = DEFAULT_RATE, max_gap_s: float = 5.0) -> list[StudyPlan]:
    """Group into studies → series (send order) and give each instance its send offset.

    mode: ``rate`` (1/rate apart), ``asap`` (all at 0) or ``recorded`` (the recorded time differences,
    each gap capped at ``max_gap_s``; a series without usable times falls back to ``rate``)."""
    by_study: dict[str, dict[str, list[Instance]]] = {}
    for inst in instances:
        by_study.setdefault(inst.study_uid, {}).setdefault(inst.series_uid, []).append(inst)
    studies = []
    for study_uid, series in by_study.items():
        plans = []
        for series_uid, insts in series.items():
            timed = mode == "recorded" and all(i.recorded_s is not None for i in insts)
            if timed:
                insts.sort(key=lambda i: (i.recorded_s, i.instance_number if i.instance_number is not None else 1 << 30, i.path))
                offsets = [0.0]
                for a, b in zip(insts, insts[1:]):
                    offsets.append(offsets[-1] + min(max(0.0, b.recorded_s - a.recorded_s), max_gap_s))
            else:
                insts.sort(key=lambda i: (i.instance_number if i.instance_number is not None else 1 << 30, i.z if i.z is not None else 0.0, i.path))
                if mode == "asap":
                    offsets = [0.0] * len(insts)
                else:
                    offsets = [k / rate for k in range(len(insts))]
            plans.append(SeriesPlan(study_uid, series_uid, insts, offsets))
        # series in the order the scanner made them: recorded time, else series number
        def skey(sp: SeriesPlan):
            rec = [i.recorded_s for i in sp.instances if i.recorded_s is not None]
            sn = sp.instances[0].series_number
            return (min(rec) if (mode == "recorded" and rec) else 0.0, sn if sn is not None else 1 << 30, sp.series_uid)

        plans.sort(key=skey)
        if mode == "recorded":
            for prev_sp, sp in zip(plans, plans[1:]):
                a = [i.recorded_s for i in prev_sp.instances if i.recorded_s is not None]
                b = [i.recorded_s for i in sp.instances if i.recorded_s is not None]
                if a and b:
                    sp.gap_before_s = min(max(0.0, min(b) - max(a)), max_gap_s)
        studies.append(StudyPlan(study_uid, plans))
    return studies


def _progress(items, desc: str, unit: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)
