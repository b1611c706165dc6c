"""Findings to PACS as DICOM: when a series reaches its verdict with findings at or above
``[sinks.dicom] min_severity``, build a Basic Text SR (``kind = "sr"``) or a Key Object Selection
(``kind = "ko"``) in the scanned study that references the flagged images, and C-STORE it to
``host:port`` / ``called_aet`` (calling AE = ``dicom.ae_title``).

The document carries the study's UIDs only; Patient Name/ID are left empty (type 2) so nothing
identifying leaves the agent that did not come from the PACS' own study; the PACS files it by Study
Instance UID. Up to ``MAX_REFS`` images are referenced per finding (evenly spread over the flagged run).

The document's SOP Instance UID and its series' UID derive from the scanned series' UID, the kind and the
findings reported (ids and severities): a series analysed again after a restart (the agent was killed
after the report left and before the series' spool files were released) sends the same instance again,
which the destination files as the same object, not a second report.
"""

from __future__ import annotations

import datetime
import logging

from medqc.agent import faults
from medqc.agent.sinks.base import Sink

log = logging.getLogger("medqc.agent.sinks.dicom_sr")

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
MAX_REFS = 50


def _code(value: str, scheme: str, meaning: str):
    from pydicom.dataset import Dataset

    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _image_item(relationship: str, sop_class: str, sop_uid: str):
    from pydicom.dataset import Dataset

    it = Dataset()
    it.RelationshipType = relationship
    it.ValueType = "IMAGE"
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_uid
    it.ReferencedSOPSequence = [ref]
    return it


def flagged_images(finding, state) -> list[tuple[str, str]]:
    """(SOP class, SOP instance) of the slices a finding covers, at most MAX_REFS, in instance order."""
    lo, hi = finding.first_instance, finding.last_instance
    if lo is None and hi is None:
        return []
    lo = hi if lo is None else lo
    hi = lo if hi is None else hi
    rows = sorted({(r.info.instance_number, r.info.sop_class_uid, r.info.sop_instance_uid) for r in state.results
                   if r.info.instance_number is not None and lo <= r.info.instance_number <= hi and r.info.sop_class_uid})
    if len(rows) > MAX_REFS:
        step = len(rows) / MAX_REFS
        rows = [rows[int(i * step)] for i in range(MAX_REFS)]
    return [(c, u) for _, c, u in rows]


def build_document(state, findings, kind: str = "sr", ae_title: str = "MEDQC", now: datetime.datetime | None = None):
    """The SR / KOS dataset (with file meta) for ``findings`` of one completed series."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    import medqc

    now = now or datetime.datetime.now()
    sop_class = BASIC_TEXT_SR if kind == "sr" else KEY_OBJECT_SELECTION
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    basis = [state.uid, kind] + [f"{f.finding_id}={f.severity}" for f in findings]
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["medqc-report", *basis])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = generate_uid(entropy_srcs=["medqc"])
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    # Patient / General Study: the scanned study, no identifiers (type 2, empty)
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = state.study_uid
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = ""
    # SR Document Series / Key Object Document Series
    ds.Modality = "SR" if kind == "sr" else "KO"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["medqc-report-series", state.uid, kind])
    ds.SeriesNumber = 9901
    ds.SeriesDescription = "medqc CT quality control"
    ds.ReferencedPerformedProcedureStepSequence = []
    # General Equipment
    ds.Manufacturer = "medqc"
    ds.SoftwareVersions = str(getattr(medqc, "__version__", "0"))
    ds.StationName = ae_title[:16]
    # document
    ds.InstanceNumber = 1
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"

    refs: dict[str, str] = {}
    items = []
    if kind == "sr":
        ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        ds.PerformedProcedureCodeSequence = []  # SR Document General, type 2
        for f in findings:
            t = Dataset()
            t.RelationshipType = "CONTAINS"
            t.ValueType = "TEXT"
            t.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
            t.TextValue = f"[{f.severity}] {f.check}: {f.message}"[:1024]
            children = []
            for cls, uid in flagged_images(f, state):
                refs[uid] = cls
                children.append(_image_item("INFERRED FROM", cls, uid))
            if children:
                t.ContentSequence = children
            items.append(t)
    else:
        ds.ConceptNameCodeSequence = [_code("113000", "DCM", "Of Interest")]
        tmpl = Dataset()
        tmpl.MappingResource = "DCMR"
        tmpl.TemplateIdentifier = "2010"
        ds.ContentTemplateSequence = [tmpl]
        desc = Dataset()
        desc.RelationshipType = "CONTAINS"
        desc.ValueType = "TEXT"
        desc.ConceptNameCodeSequence = [_code("113012", "DCM", "Key Object Description")]
        desc.TextValue = "; ".join(f"[{f.severity}] {f.check}: {f.message}" for f in findings)[:1024]
        items.append(desc)
        for f in findings:
            for cls, uid in flagged_images(f, state):
                if uid not in refs:
                    refs[uid] = cls
                    items.append(_image_item("CONTAINS", cls, uid))
        if not refs:
            raise ValueError("a Key Object Selection needs at least one flagged image")
    ds.ContentSequence = items
    # evidence: every referenced image, by study and series
    if refs:
        series = Dataset()
        series.SeriesInstanceUID = state.uid
        sops = []
        for uid, cls in refs.items():
            r = Dataset()
            r.ReferencedSOPClassUID = cls
            r.ReferencedSOPInstanceUID = uid
            sops.append(r)
        series.ReferencedSOPSequence = sops
        study = Dataset()
        study.StudyInstanceUID = state.study_uid
        study.ReferencedSeriesSequence = [series]
        ds.CurrentRequestedProcedureEvidenceSequence = [study]
    return ds


class DicomSrSink(Sink):
    name = "dicom_sr"

    def __init__(self, host: str, port: int, called_aet: str = "PACS", calling_aet: str = "MEDQC", kind: str = "sr",
                 min_severity: str = "warning", timeout_s: float = 30.0):
        if kind not in ("sr", "ko"):
            raise ValueError(f"sinks.dicom.kind = {kind!r}; choose one of: sr, ko")
        self.host, self.port, self.called_aet, self.calling_aet = host, port, called_aet, calling_aet
        self.kind, self.min_rank, self.timeout_s = kind, SEVERITY_RANK[min_severity], timeout_s
        self.sent: list[str] = []  # SOP Instance UIDs stored

    def selected(self, state) -> list:
        fs = [f for f in state.findings.values() if SEVERITY_RANK.get(f.severity, 0) >= self.min_rank]
        return sorted(fs, key=lambda f: (-SEVERITY_RANK.get(f.severity, 0), f.check))

    def on_series(self, state) -> None:
        findings = self.selected(state)
        if not findings:
            return
        kind = self.kind
        if kind == "ko" and not any(flagged_images(f, state) for f in findings):
            kind = "sr"  # nothing to point at (e.g. coverage only): a text report instead
        ds = build_document(state, findings, kind, self.calling_aet)
        self.store(ds)
        log.info("%s %s for series %s stored to %s", ds.Modality, ds.SOPInstanceUID, state.uid, self.called_aet)

    def store(self, ds) -> None:
        from pynetdicom import AE
        from pynetdicom.sop_class import BasicTextSRStorage, KeyObjectSelectionDocumentStorage  # noqa: F401
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(self.host, self.port, ae_title=self.called_aet)
        if not assoc.is_established:
            raise ConnectionError(f"association with {self.called_aet} at {self.host}:{self.port} failed")
        faults.reached("sr-send")
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
            raise RuntimeError(f"C-STORE of the {ds.Modality} to {self.called_aet} failed (status {code!r})")
        self.sent.append(str(ds.SOPInstanceUID))


def from_config(cfg):
    d = cfg.sinks.dicom
    if not d.host:
        return None
    return DicomSrSink(d.host, d.port, d.called_aet, cfg.dicom.ae_title, d.kind, d.min_severity)
