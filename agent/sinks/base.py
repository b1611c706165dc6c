"""The sink interface, and the thread that isolates each sink from the pipeline.

Every sink gets its own thread and a bounded queue: a slow or broken sink never blocks analysis; when its
queue is full the event is dropped for that sink only (logged, ``medqc_sink_errors_total``)."""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("medqc.agent.sinks")


def announced(finding) -> bool:
    """Whether an event feed (stdout, webhook, server-sent events) reports this change of a finding: raised,
    escalated, withdrawn and final do; "updated" (extent or score changed while slices arrive) does not."""
    from medqc.agent.records import ANNOUNCED

    return finding.kind in ANNOUNCED


class Sink:
    name = "base"

    def on_slice(self, result, state) -> None: ...

    def on_finding(self, finding, state) -> None: ...  # every change, ``finding.kind`` says which (records.KINDS)

    def on_series(self, state) -> None: ...  # verdict reached

    def close(self) -> None: ...


class SinkThread:
    """Runs one sink's calls in order on a dedicated thread."""

    def __init__(self, sink: Sink, metrics=None, maxsize: int = 10000):
        self.sink = sink
        self.metrics = metrics
        self.q: queue.Queue = queue.Queue(maxsize=maxsize)
        self.t = threading.Thread(target=self._loop, name=f"sink-{sink.name}", daemon=True)
        self.t.start()

    def _error(self, what: str) -> None:
        if self.metrics is not None:
            try:
                self.metrics.inc("medqc_sink_errors_total", sink=self.sink.name)
            except Exception:  # noqa: BLE001
                pass

    def submit(self, method: str, *args) -> None:
        try:
            self.q.put_nowait((method, args))
        except queue.Full:
            log.error("sink %s is not keeping up: %s dropped for it", self.sink.name, method)
            self._error("full")

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                break
            method, args = item
            if method == "_after":  # the pipeline's marker: this sink handled every event queued before it
                args[0]()
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
            self.q.put(("_flush_marker", (done,)), timeout=timeout)
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


def _flush_marker(self, done):  # bound onto every Sink so flush() works without the sink's help
    done.set()


Sink._flush_marker = _flush_marker  # type: ignore[attr-defined]

