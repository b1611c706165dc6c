"""The ``medqc.report/1`` document: one entry per series with its verdict, findings and per-slice scores.

Used by ``medqc analyze --json``, the SQLite store and the HTTP API. Patient identifiers appear only when
``privacy.show_patient_identifiers`` is set; everything else is UIDs, header facts and measurements.
"""

from __future__ import annotations

import math

SCHEMA = "medqc.report/1"
FINDING_KEYS = ("check", "severity", "first_instance", "last_instance", "z_range_mm", "score", "message",
                "finding_id", "raised_at", "details")
REJECTED_KEYS = ("path", "sop_instance_uid", "series_instance_uid", "reason")
_SEV_ORDER = {"critical": 0, "warning": 1, "info": 2}
NO_BASELINE = "no baseline for this scanner (generic levels)"


def _clean(v):
    """JSON-safe: NaN/inf → None, tuples → lists, floats rounded to 4 decimals."""
    if isinstance(v, float):
        return round(v, 4) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def finding_dict(f) -> dict:
    d = f.to_dict()
    return _clean({k: d.get(k) for k in FINDING_KEYS})


def series_report(state, privacy, per_slice_rows: bool = True) -> dict:
    """One series of ``medqc.report/1`` (``per_slice_rows=False``: without the per-slice rows, for a summary)."""
    info = state.first
    per_slice = []
    for r in sorted(state.results if per_slice_rows else (), key=lambda r: (r.info.instance_number is None,
                                                                            r.info.instance_number or 0, -(r.info.z or 0.0))):
        z = r.info.z
        row = {
            "sop_instance_uid": r.info.sop_instance_uid,
            "instance_number": r.info.instance_number,
            "z": None if z is None else round(z, 3),
            "scores": {k: round(float(v), 4) for k, v in r.scores.items()},
            "position_ref_mm": None if r.position_ref_mm is None else round(float(r.position_ref_mm), 1),
            "measures": _clean(dict(r.measures)),
            # timing (time.time() on the agent): instance acknowledged → result ready; used by medqc replay/bench
            "received_at": round(r.info.received_at, 4) if r.info.received_at else None,
            "analysed_at": round(r.analysed_at, 4) if r.analysed_at else None,
        }
        if r.error:
            row["error"] = r.error
        per_slice.append(row)
    findings = sorted(state.findings.values(), key=lambda f: (_SEV_ORDER.get(f.severity, 3), f.check, f.finding_id))
    out = {
        "series_instance_uid": state.uid,
        "study_instance_uid": state.study_uid,
        "series_number": info.series_number,
        "series_description": info.series_description,
        "modality": info.modality,
        "manufacturer": info.manufacturer,
        "body_part": info.body_part,
        "protocol_name": info.protocol_name,
        "protocol_rule": state.protocol_rule,
        "protocol_rule_matched_on": state.matched_field or None,
        "slices": len(state.results),
        "expected_slices": state.expected,
        "verdict": state.verdict,
        "completed_reason": state.completed_reason,
        "opened_at": state.opened_at,
        "completed_at": state.completed_at,
        "coverage": _clean(state.coverage) if state.coverage else None,
        "size": _clean(state.size) if getattr(state, "size", None) else None,
        # the scanner baseline the noise and ring were judged against (key, series, reference values), or why none
        "baseline": _clean(getattr(state, "baseline", None) or {"used": False, "text": NO_BASELINE}),
        "findings": [finding_dict(f) for f in findings],
        "per_slice": per_slice,
    }
    if getattr(state, "dynamic", False):
        out["series_kind"] = "dynamic"
        out["coverage_note"] = ("dynamic series (the same table positions repeated over time: bolus tracking, perfusion, CT "
                                "fluoroscopy): coverage, geometry and image-quality checks do not apply; dose is judged")
    elif getattr(state, "split_range", False):
        out["coverage_note"] = ("one part of a range split over series (SeriesDescription: posterior fossa / "
                                "supratentorial): coverage not judged on it; dose and image quality are")
    elif state.protocol_rule is None:
        out["coverage_note"] = "no protocol rule matched BodyPartExamined / ProtocolName / StudyDescription: coverage not judged"
    elif state.coverage and state.coverage.get("note"):
        out["coverage_note"] = state.coverage["note"]
    if getattr(state, "not_judged", None):
        out["not_judged"] = dict(state.not_judged)
    if getattr(privacy, "show_patient_identifiers", False):
        out["patient_name"] = info.patient_name
        out["patient_id"] = info.patient_id
    return out


def build_report(states, rejected, privacy) -> dict:
    return {
        "schema": SCHEMA,
        "series": [series_report(s, privacy) for s in states],
        "rejected": [{k: r[k] for k in REJECTED_KEYS if k in r} for r in (rejected or [])],
    }


LIST_SCHEMA = "medqc.series-list/1"
SUMMARY_DROP = ("per_slice", "coverage", "size", "findings", "schema", "acknowledgements")
SUMMARY_FINDING_KEYS = ("finding_id", "check", "severity", "first_instance", "last_instance", "message")


def series_summary(rep: dict, updated_at: float | None) -> dict:
    """A ``medqc.report/1`` series as one entry of the ``/api/series`` list: its header facts, verdict and
    findings (without their details), no per-slice rows, coverage or size; the series' own endpoint has them
    (``url``). ``updated_at``: its last slice, finding or verdict (seconds since the epoch)."""
    out = {k: v for k, v in rep.items() if k not in SUMMARY_DROP}
    findings = rep.get("findings") or []
    out["findings"] = [{k: f.get(k) for k in SUMMARY_FINDING_KEYS} for f in findings]
    out["findings_by_severity"] = {sev: sum(1 for f in findings if f.get("severity") == sev and
                                            not (f.get("details") or {}).get("resolved"))
                                   for sev in ("critical", "warning", "info")}
    out["updated_at"] = updated_at
    out["url"] = f"/api/series/{rep['series_instance_uid']}"
    return out


def series_event(state, privacy):
    """The frozen ``SeriesEvent`` of a series at its verdict; the caller holds the series tracker's lock."""
    from medqc.agent.records import FindingEvent, SeriesEvent

    return SeriesEvent(uid=state.uid, study_uid=state.study_uid, verdict=state.verdict,
                       completed_reason=state.completed_reason, completed_at=state.completed_at,
                       protocol_rule=state.protocol_rule, dynamic=bool(state.dynamic),
                       findings={k: FindingEvent.of(f) for k, f in state.findings.items()},
                       results=tuple(state.results), scanner=dict(state.scanner or {}),
                       report=series_report(state, privacy))
