"""Findings and verdicts as JSON lines on stdout (one object per line; UIDs only, no patient identifiers).

One line per finding event: ``{"event": "finding", "kind": "raised" | "escalated" | "withdrawn" | "final", ...}``
— a finding is raised once, a line more when its severity rises while slices arrive, and at the verdict its
final judgement (or its withdrawal); then one ``{"event": "series", ...}`` line with the verdict."""

from __future__ import annotations

import json
import sys
import threading
import time

from medqc.agent.sinks.base import Sink, announced


class StdoutSink(Sink):
    name = "stdout"

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self._lock = threading.Lock()

    def _emit(self, obj: dict) -> None:
        line = json.dumps(obj, default=str, separators=(",", ":"))
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def on_finding(self, finding) -> None:
        if not announced(finding):
            return
        d = finding.to_dict()
        d.pop("details", None)
        kind = d.pop("kind")
        self._emit({"event": "finding", "kind": kind, "time": time.time(), **d})

    def on_series(self, series) -> None:  # a SeriesEvent
        counts: dict[str, int] = {}
        for f in series.findings.values():
            counts[f.severity] = counts.get(f.severity, 0) + 1
        self._emit({"event": "series", "time": time.time(), "series_instance_uid": series.uid,
                    "study_instance_uid": series.study_uid, "verdict": series.verdict, "slices": len(series.results),
                    "protocol_rule": series.protocol_rule, "completed_reason": series.completed_reason,
                    "findings": counts})
