"""The sink interface, and the thread that isolates each sink from the pipeline.

Every sink gets its own thread and a bounded queue: a slow or broken sink never blocks analysis; when its
queue is full the event is dropped for that sink only (logged, ``medqc_sink_errors_total``)."""

from __future__ import annotations

import logging
import queue
import threading

from medqc.agent.metrics import NULL

log = logging.getLogger("medqc.agent.sinks")


def announced(finding) -> bool:
    """Whether an event feed (stdout, webhook, server-sent events) reports this change of a finding: raised,
    escalated, withdrawn and final do; "updated" (extent or score changed while slices arrive) does not."""
    from medqc.agent.records import ANNOUNCED

    return finding.kind in ANNOUNCED


class Sink:
    """Each method gets a frozen event (``medqc.agent.records``), never the live series state."""

    name = "base"
    queue_size = 10000  # events waiting for this sink; beyond that they are dropped for it (logged, counted)
    blocking = False  # True: the pipeline waits for room instead (a sink whose every event is needed, offline)
    spool_waits = True  # a series' spool files are released only once this sink handled its verdict

    def on_slice(self, event) -> None: ...  # SliceEvent: the result (no pixels)

    def on_finding(self, finding) -> None: ...  # FindingEvent: every change, ``finding.kind`` says which (KINDS)

    def on_series(self, series) -> None: ...  # SeriesEvent: verdict reached, with its report

    def close(self) -> None: ...


class SinkThread:
    """Runs one sink's calls in order on a dedicated thread."""

    def __init__(self, sink: Sink, metrics=NULL, maxsize: int | None = None):
        self.sink = sink
        self.metrics = metrics
        self.blocking = bool(getattr(sink, "blocking", False))
        self.q: queue.Queue = queue.Queue(maxsize=maxsize or getattr(sink, "queue_size", 10000))
        self.t = threading.Thread(target=self._loop, name=f"sink-{sink.name}", daemon=True)
        self.t.start()

    def _error(self, what: str) -> None:
        try:
            self.metrics.inc("medqc_sink_errors_total", sink=self.sink.name)
        except Exception:  # noqa: BLE001
            pass

    def submit(self, method, *args) -> None:  # a Sink method's name, or a marker callable (see _loop)
        try:
            self.q.put((method, args), block=self.blocking)
        except queue.Full:
            log.error("sink %s is not keeping up: %s dropped for it", self.sink.name, method)
            self._error("full")

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            method, args = item
            if callable(method):  # a marker (flush, the pipeline's release after sinks): all before it was handled
                method(*args)
                continue
            try:
                getattr(self.sink, method)(*args)
            except Exception as e:  # noqa: BLE001 - observers log and carry on
                log.error("sink %s failed in %s: %s: %s", self.sink.name, method, type(e).__name__, e)
                self._error(method)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far was handled (bounded)."""
        done = threading.Event()
        try:
            self.q.put((done.set, ()), timeout=timeout)
        except queue.Full:
            return
        done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.q.put(None, timeout=timeout)
        except queue.Full:
            pass
        self.t.join(timeout)
        try:
            self.sink.close()
        except Exception as e:  # noqa: BLE001
            log.error("sink %s failed to close: %s", self.sink.name, e)
