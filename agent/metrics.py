"""Prometheus metrics without a dependency: counters, gauges and histograms with labels, rendered in the
text exposition format. One ``Metrics`` instance per agent, passed explicitly; thread-safe.

Names used by the pipeline (documented in README and the Grafana dashboard; a test checks the dashboard
only queries names that are really exported) are declared in ``METRICS`` so they appear at zero from start.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

# name → (type, help). Every metric the agent exports is declared here.
METRICS: dict[str, tuple[str, str]] = {
    "medqc_slices_received_total": ("counter", "DICOM instances received (C-STORE or drop folder)"),
    "medqc_slices_analysed_total": ("counter", "axial CT slices analysed"),
    "medqc_slices_rejected_total": ("counter", "instances not analysed, by reason"),
    "medqc_findings_total": ("counter", "findings raised, each counted once when first reported (while slices arrive, "
                                        "or at the verdict), by check and the severity it was reported with"),
    "medqc_series_completed_total": ("counter", "series that reached a verdict, by verdict"),
    "medqc_stores_refused_total": ("counter", "C-STOREs answered 0xA700 (out of resources), by reason: spool-full "
                                              "(the spool's disk below spool.min_free_mb), spool-write-error"),
    "medqc_associations_rejected_total": ("counter", "DICOM associations rejected, by reason"),
    "medqc_sink_errors_total": ("counter", "alert sink failures, by sink"),
    "medqc_worker_restarts_total": ("counter", "analysis worker processes that died (signal, OOM) and were replaced"),
    "medqc_queue_depth": ("gauge", "slices waiting for analysis (spooled, not yet analysed)"),
    "medqc_spool_free_bytes": ("gauge", "free bytes on the spool's file system"),
    "medqc_refusing": ("gauge", "1 while the agent refuses C-STOREs for this reason (spool-disk-low, spool-write-error), "
                                "else 0; /healthz answers 503 with the reason meanwhile"),
    "medqc_backend_info": ("gauge", "inference backend in use (value 1)"),
    "medqc_analysis_workers": ("gauge", "analysis worker processes running and ready (0: analysis in the agent's process)"),
    "medqc_series_open": ("gauge", "series receiving slices, no verdict yet"),
    "medqc_findings_open": ("gauge", "findings standing on series that have no verdict yet (not withdrawn), by severity"),
    "medqc_stage_seconds": ("histogram", "per-stage latency: spool, decode, infer, checks, end_to_end"),
    "medqc_batch_size": ("histogram", "slices per inference batch"),
}

DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels_key(labels: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in labels.items()))


def _fmt_labels(key: tuple, extra: tuple = ()) -> str:
    items = list(key) + list(extra)
    if not items:
        return ""
    esc = lambda v: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in items) + "}"


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple, float]] = {n: {} for n in METRICS}
        self._hist: dict[str, dict[tuple, list]] = {n: {} for n, (t, _) in METRICS.items() if t == "histogram"}

    def _check(self, name: str, kind: str) -> None:
        if name not in METRICS or METRICS[name][0] != kind:
            raise KeyError(f"{name} is not a declared {kind} (agent/metrics.py METRICS)")

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        self._check(name, "counter")
        k = _labels_key(labels)
        with self._lock:
            self._values[name][k] = self._values[name].get(k, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        self._check(name, "gauge")
        with self._lock:
            self._values[name][_labels_key(labels)] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        self._check(name, "histogram")
        buckets = BATCH_BUCKETS if name == "medqc_batch_size" else DEFAULT_BUCKETS
        k = _labels_key(labels)
        with self._lock:
            h = self._hist[name].get(k)
            if h is None:
                h = self._hist[name][k] = [[0] * (len(buckets) + 1), 0.0, 0, buckets]
            h[0][bisect_left(buckets, value)] += 1
            h[1] += value
            h[2] += 1

    def get(self, name: str, **labels) -> float:
        with self._lock:
            if name in self._hist:
                h = self._hist[name].get(_labels_key(labels))
                return float(h[2]) if h else 0.0
            return self._values[name].get(_labels_key(labels), 0.0)

    def render(self) -> str:
        out = []
        with self._lock:
            for name, (kind, help_) in METRICS.items():
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                if kind == "histogram":
                    for k, (counts, total, n, buckets) in sorted(self._hist[name].items()):
                        cum = 0
                        for b, c in zip(buckets, counts):
                            cum += c
                            out.append(f"{name}_bucket{_fmt_labels(k, (('le', repr(float(b))),))} {cum}")
                        out.append(f"{name}_bucket{_fmt_labels(k, (('le', '+Inf'),))} {n}")
                        out.append(f"{name}_sum{_fmt_labels(k)} {total}")
                        out.append(f"{name}_count{_fmt_labels(k)} {n}")
                else:
                    vals = self._values[name] or ({(): 0.0} if not name.endswith("_info") else {})
                    for k, v in sorted(vals.items()):
                        out.append(f"{name}{_fmt_labels(k)} {v:g}")
        return "\n".join(out) + "\n"


class NullMetrics:
    """``Metrics``' interface, recording nothing: what a part gets where nobody scrapes (``medqc analyze``,
    a part built alone in a test), so no part asks whether it has metrics."""

    def inc(self, name: str, value: float = 1.0, **labels) -> None: ...

    def set(self, name: str, value: float, **labels) -> None: ...

    def observe(self, name: str, value: float, **labels) -> None: ...

    def get(self, name: str, **labels) -> float:
        return 0.0

    def render(self) -> str:
        return ""


NULL = NullMetrics()
