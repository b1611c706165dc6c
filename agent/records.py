"""The records that flow along the agent's one path (shared by every stage; no logic here).

ingest → spool → decode (``SliceInfo`` + HU pixels) → batch → infer (``SliceResult``) → series state →
checks (``Finding``) → sinks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class SliceInfo:
    """Header facts of one received instance (no pixels, no patient identifiers)."""

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    source: str = ""  # spool path or input file
    received_at: float = 0.0  # time.time() when the instance was acknowledged / read
    instance_number: int | None = None
    frame: int = 0  # frame index for multi-frame objects
    modality: str = ""
    image_type: tuple[str, ...] = ()
    position: tuple[float, float, float] | None = None  # ImagePositionPatient (mm)
    orientation: tuple[float, float, float, float, float, float] | None = None  # ImageOrientationPatient
    pixel_spacing: tuple[float, float] | None = None  # (row, col) mm
    slice_thickness: float | None = None
    rows: int = 0
    cols: int = 0
    gantry_tilt: float = 0.0
    kvp: float | None = None
    ctdivol: float | None = None
    ctdi_phantom_cm: int | None = None  # CTDIPhantomTypeCodeSequence: 16 (IEC head) or 32 (IEC body), when written
    exposure_mas: float | None = None
    reconstruction_diameter: float | None = None
    data_collection_diameter: float | None = None
    table_height: float | None = None
    # where the reconstruction centre (the image centre) lies from the isocentre, along the image's row and
    # column directions (mm): ReconstructionTargetCenterPatient − DataCollectionCenterPatient, when written
    recon_offset_mm: tuple[float, float] | None = None
    patient_position: str = ""
    body_part: str = ""
    protocol_name: str = ""
    study_description: str = ""
    series_description: str = ""
    series_number: int | None = None
    images_in_acquisition: int | None = None
    scan_options: str = ""  # ScanOptions (0018,0022), upper-case: "HELICAL MODE", "AXIAL MODE", …
    convolution_kernel: str = ""
    manufacturer: str = ""
    # the scanner, for its baseline (medqc/baselines.py): ManufacturerModelName, StationName, DeviceSerialNumber
    manufacturer_model: str = ""
    station_name: str = ""
    device_serial_number: str = ""
    stand_in_uids: str = ""  # the UIDs the header left blank and decoding derived ("SeriesInstanceUID", ...)
    acquisition_time: str = ""
    content_time: str = ""
    # patient identifiers are only carried when the site opts in (privacy.show_patient_identifiers)
    patient_name: str = ""
    patient_id: str = ""

    @property
    def z(self) -> float | None:
        """Position along the slice normal (mm), the normal taken towards the head (+z): for axial slices this
        is patient z whatever way the rows and columns run (an image stored with its rows posterior→anterior
        or its columns left→right has a normal row × column pointing to the feet; used as it is, it would
        swap the top and the bottom of the scan)."""
        if self.position is None:
            return None
        if self.orientation is None:
            return self.position[2]
        r, c = self.orientation[:3], self.orientation[3:]
        n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
        if n[2] < 0:
            n = (-n[0], -n[1], -n[2])
        return sum(p * q for p, q in zip(self.position, n))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SliceResult:
    """What the analysis says about one slice."""

    info: SliceInfo
    scores: dict[str, float] = field(default_factory=dict)  # artifact class → probability (network, fused)
    position_ref_mm: float | None = None  # craniocaudal position on medqc.analysis.anatomy's reference scale
    measures: dict[str, float] = field(default_factory=dict)  # classical detectors: metal_area_mm2, noise_sd, ...
    error: str = ""  # non-empty: this slice could not be analysed (and why)
    analysed_at: float = 0.0
    thumbnail: bytes | None = field(default=None, repr=False)  # optional small PNG (console)


SEVERITIES = ("info", "warning", "critical")
# what one change of a finding is, as the series tracker reports it (``Finding.kind``):
#   raised     first reported while slices arrive (or again after it was withdrawn)
#   escalated  its severity rose above the one last reported, while slices arrive
#   updated    anything else changed while slices arrive (its extent grew, its score, ...): state, not news
#   withdrawn  the complete series does not show it (raised while slices arrived)
#   final      its judgement on the complete series, at the verdict (one per finding that stands)
# The event feeds (stdout, webhook, server-sent events) carry every kind but "updated"; the store and the
# console keep the latest state whatever the kind.
KINDS = ("raised", "escalated", "updated", "withdrawn", "final")
ANNOUNCED = ("raised", "escalated", "withdrawn", "final")


@dataclass
class Finding:
    """One QC finding. ``check`` names are part of the public interface (README)."""

    check: str  # e.g. "artifact.metal", "coverage.top", "geometry.gap", "input.undecodable"
    severity: str  # info | warning | critical
    message: str  # one plain-language line for the technologist
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    first_instance: int | None = None
    last_instance: int | None = None
    z_range_mm: tuple[float, float] | None = None
    score: float | None = None
    details: dict = field(default_factory=dict)
    raised_at: float = 0.0
    finding_id: str = ""  # stable per (series, check, key): re-raising updates, not duplicates
    kind: str = "raised"  # the change this version of the finding records (KINDS), set by the series tracker

    def to_dict(self) -> dict:
        return _finding_dict(self)


def _finding_dict(f) -> dict:
    """A finding (``Finding`` or ``FindingEvent``) as JSON-ready fields: the z range as a list."""
    d = asdict(f)
    if d["z_range_mm"] is not None:
        d["z_range_mm"] = list(d["z_range_mm"])
    return d


# ------------------------------------------------------------------------------------------- events
# What the sinks receive (each on its own thread): frozen snapshots made under the series tracker's lock, so
# a sink never reads the live series state that the pipeline thread goes on changing (a late slice re-opens
# a series). Slice results are not changed once the analysis made them; the events share them.


@dataclass(frozen=True)
class SliceEvent:
    """One analysed slice (no pixels: a sink that renders some reads them from ``result.info.source``, the
    spool file kept until the series' verdict)."""

    result: SliceResult


@dataclass(frozen=True)
class FindingEvent:
    """One change of a finding (``kind``, KINDS), as it stood when it changed: ``Finding``'s fields, the
    details deep-copied."""

    check: str
    severity: str
    message: str
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    first_instance: int | None = None
    last_instance: int | None = None
    z_range_mm: tuple[float, float] | None = None
    score: float | None = None
    details: dict = field(default_factory=dict)
    raised_at: float = 0.0
    finding_id: str = ""
    kind: str = "raised"

    @classmethod
    def of(cls, f: Finding) -> "FindingEvent":
        import copy

        values = {k.name: getattr(f, k.name) for k in fields(cls)}
        if values["z_range_mm"] is not None:
            values["z_range_mm"] = tuple(values["z_range_mm"])
        return cls(**{**values, "details": copy.deepcopy(f.details)})

    def to_dict(self) -> dict:
        return _finding_dict(self)


@dataclass(frozen=True)
class SeriesEvent:
    """A series at its verdict: what the sinks read of it (the names ``SeriesState`` gives them) and its
    ``medqc.report/1`` document (``report``), built when the verdict was reached."""

    uid: str
    study_uid: str
    verdict: str | None
    completed_reason: str | None
    completed_at: float | None
    protocol_rule: str | None
    dynamic: bool
    findings: dict  # finding id → FindingEvent
    results: tuple  # the slices' SliceResult, in arrival order
    scanner: dict  # its baseline key and figures (medqc.baselines), for learning
    report: dict = field(repr=False, default_factory=dict)
