"""MPPS SCP (Modality Performed Procedure Step): N-CREATE opens a step, N-SET with status COMPLETED names
the series the scanner finished, which then complete at once instead of waiting for the idle timeout."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("medqc.agent.ingest.mpps")


def performed_series(ds) -> list[str]:
    out = []
    for item in ds.get("PerformedSeriesSequence") or []:
        uid = item.get("SeriesInstanceUID")
        if uid:
            out.append(str(uid))
    return out


class MppsService:
    def __init__(self, on_completed=None, max_steps: int = 1000):
        self.on_completed = on_completed
        self.steps: dict[str, dict] = {}
        self.max_steps = max_steps
        self._lock = threading.Lock()

    def on_n_create(self, event):
        from pydicom.dataset import Dataset

        req = event.request
        uid = str(req.AffectedSOPInstanceUID or "")
        if not uid:
            return 0x0106, None  # invalid attribute value: the SCU must give the instance UID
        ds = event.attribute_list
        with self._lock:
            if uid in self.steps:
                return 0x0111, None  # duplicate SOP instance
            if len(self.steps) >= self.max_steps:
                self.steps.pop(next(iter(self.steps)))
            self.steps[uid] = {"status": str(ds.get("PerformedProcedureStepStatus", "IN PROGRESS")),
                               "series": performed_series(ds)}
        log.info("MPPS %s created (%s)", uid, self.steps[uid]["status"])
        out = Dataset()
        out.PerformedProcedureStepStatus = self.steps[uid]["status"]
        return 0x0000, out

    def on_n_set(self, event):
        from pydicom.dataset import Dataset

        uid = str(event.request.RequestedSOPInstanceUID or "")
        mods = event.modification_list
        with self._lock:
            step = self.steps.get(uid)
            if step is None:
                return 0x0112, None  # no such SOP instance
            if step["status"] in ("COMPLETED", "DISCONTINUED"):
                return 0x0110, None  # processing failure: the step is final
            series = performed_series(mods)
            if series:
                step["series"] = series
            if "PerformedProcedureStepStatus" in mods:
                step["status"] = str(mods.PerformedProcedureStepStatus)
            status, series = step["status"], list(step["series"])
        log.info("MPPS %s set to %s (%d series)", uid, status, len(series))
        if status == "COMPLETED" and series and self.on_completed is not None:
            try:
                self.on_completed(series)
            except Exception:  # noqa: BLE001
                log.exception("MPPS completion handler failed")
        out = Dataset()
        out.PerformedProcedureStepStatus = status
        return 0x0000, out
