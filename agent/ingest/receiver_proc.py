"""The DICOM receiver in its own process, so that its Python (pynetdicom's PDU handling, the C-STORE
handler) does not share an interpreter lock with the analysis.

On two cores the agent's threads (receiver, pipeline, detectors) serialise on one interpreter lock: the
analysis alone runs at ~125 slices/s, beside the receiver at ~75. Here the receiver (``receiver.Receiver``,
unchanged: same spool, same durability, same access policy) runs in a child process started with
``spawn``, and talks to the agent over a pipe: each stored instance (its spool path and arrival time),
each MPPS completion and each metric update is one message; a reader thread in the agent hands them to the
pipeline, the MPPS handling and the metrics exactly as the in-process receiver's callbacks would.

Lifecycle: :meth:`ReceiverProcess.start` returns once the child listens (or raises ``OSError`` with the
child's reason: a port in use, a TLS file missing). :meth:`stop` asks the child to stop (it finishes the
association in progress) and waits. The child ignores SIGINT/SIGTERM (the agent decides when it stops) and
exits when the agent's end of the pipe closes — the agent stopped or was killed — so a killed agent never
leaves a child holding the port. If the child dies on its own the agent logs it and calls ``on_died``
(the daemon then exits non-zero so that systemd restarts it); nothing acknowledged is lost either way: the
spool holds it.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from pathlib import Path

from medqc.agent.metrics import NULL

log = logging.getLogger("medqc.agent.ingest.receiver")

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class _MetricsProxy:
    """What the receiver and access policy call on ``metrics``, sent to the agent's registry."""

    def __init__(self, send):
        self._send = send

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        self._send(("metric", "inc", name, value, labels))

    def set(self, name: str, value: float, **labels) -> None:
        self._send(("metric", "set", name, value, labels))

    def observe(self, name: str, value: float, **labels) -> None:
        self._send(("metric", "observe", name, value, labels))


class _PipeLogHandler(logging.Handler):
    """Log records of the child, sent to the agent, which emits them through its own handlers (one log
    stream, the agent's format and destinations)."""

    def __init__(self, send):
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            d = dict(record.__dict__)
            d["msg"] = record.getMessage()
            d["args"] = None
            if record.exc_info:
                d["exc_text"] = logging.Formatter().formatException(record.exc_info)
            d["exc_info"] = None
            d.pop("message", None)
            self._send(("log", d))
        except Exception:  # noqa: BLE001 - logging must never break the receiver
            pass


def _child_main(cfg, spool_args: dict, log_level: int, conn) -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when the receiver stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lock = threading.Lock()

    def send(msg) -> None:
        with lock:
            try:
                conn.send(msg)
            except (OSError, EOFError, BrokenPipeError):
                pass  # the agent is gone: the spool keeps what was stored

    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(send)]
    root.setLevel(log_level)
    if log_level > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    from medqc.agent.ingest.access import from_config
    from medqc.agent.ingest.receiver import Receiver
    from medqc.agent.ingest.spool import Spool

    metrics = _MetricsProxy(send)
    try:
        spool = Spool(**spool_args)
        access = from_config(cfg, metrics)  # rejected associations → the agent's counters
        rx = Receiver(cfg, spool, lambda path, t: send(("stored", str(path), t)), lambda uids: send(("mpps", list(uids))),
                      metrics, access).start()
    except OSError as e:
        send(("error", e.errno or 0, e.strerror or str(e)))
        return
    except Exception as e:  # noqa: BLE001 - reported to the agent, which fails its start with it
        send(("error", 0, f"{type(e).__name__}: {e}"))
        return
    send(("ready", rx.port))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the agent stopped or was killed
                break
            if msg and msg[0] == "stop":
                break
    finally:
        rx.stop()
        send(("stopped",))


class ReceiverProcess:
    """``Receiver``'s interface (``start``, ``stop``, ``port``) with the receiver in a child process."""

    def __init__(self, cfg, spool, on_stored, on_mpps=None, metrics=NULL, on_died=None):
        self.cfg = cfg
        self.spool = spool
        self.on_stored = on_stored
        self.on_mpps = on_mpps
        self.metrics = metrics
        self.on_died = on_died
        self.port = cfg.dicom.port
        self.proc = None
        self._conn = None
        self._reader = None
        self._stopping = threading.Event()

    def start(self) -> "ReceiverProcess":
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        spool_args = {"root": str(self.spool.root), "min_free_mb": self.spool.min_free // (1024 * 1024),
                      "retention": self.spool.retention, "fsync": self.spool.fsync}
        level = logging.getLogger().getEffectiveLevel()
        self.proc = ctx.Process(target=_child_main, args=(self.cfg, spool_args, level, child), name="medqc-receiver",
                                daemon=True)
        self.proc.start()
        child.close()
        self._conn = parent
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # its log lines come first, then "ready" or "error"
            if not parent.poll(max(0.0, deadline - time.monotonic())):
                self._kill()
                raise OSError(0, f"the receiver process did not start within {START_TIMEOUT_S:g} s")
            try:
                msg = parent.recv()
            except EOFError:
                self._kill()
                raise OSError(0, f"the receiver process exited at start (exit code {self.proc.exitcode})") from None
            if msg[0] == "ready":
                break
            if msg[0] == "error":
                self._kill()
                raise OSError(msg[1], msg[2])
            self._handle(msg)
        self.port = int(msg[1])
        self._reader = threading.Thread(target=self._read, name="receiver-pipe", daemon=True)
        self._reader.start()
        log.info("DICOM receiver running in process %d", self.proc.pid)
        return self

    def _read(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "stopped":
                break
            self._handle(msg)
        if not self._stopping.is_set():
            log.error("the receiver process ended unexpectedly (exit code %s); stopping the agent so that it is "
                      "restarted (received instances are safe in the spool)", self.proc.exitcode if self.proc else None)
            if self.on_died is not None:
                self.on_died()

    def _handle(self, msg) -> None:
        kind = msg[0]
        try:
            if kind == "stored":
                self.on_stored(Path(msg[1]), msg[2])
            elif kind == "metric":
                getattr(self.metrics, msg[1])(msg[2], msg[3], **msg[4])
            elif kind == "log":
                rec = logging.makeLogRecord(msg[1])
                logging.getLogger(rec.name).handle(rec)
            elif kind == "mpps":
                if self.on_mpps is not None:
                    self.on_mpps(msg[1])
        except Exception:  # noqa: BLE001 - the instance is in the spool; resumed at the next start
            log.exception("handling %s from the receiver process failed", kind)

    def _kill(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)

    def stop(self) -> None:
        self._stopping.set()
        if self._conn is not None:
            try:
                self._conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        if self.proc is not None:
            self.proc.join(STOP_TIMEOUT_S)
            if self.proc.is_alive():
                log.warning("the receiver process did not stop within %.0f s: killing it", STOP_TIMEOUT_S)
                self._kill()
        if self._reader is not None:
            self._reader.join(2.0)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
