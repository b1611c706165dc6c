"""A slice's analysis — decode → preprocess → detectors → network — as one function, :func:`analyse_files`, and
the pool of worker processes that runs it (``analysis.workers``).

``analyse_files(inferer, items)`` takes spool (or input) paths and gives one :class:`Outcome` per file: what
the decoding ignored, and a ``SliceResult`` per frame (scores, measures, position, or the error). Outcomes
hold no pixels, so they cross a pipe cheaply. The pipeline applies them, in the order the files were
submitted, to the series state, the checks and the sinks, which stay in the agent's process; with
``analysis.workers = 0`` it calls ``analyse_files`` on its own thread, otherwise :class:`AnalysisPool` does, in
worker processes that read each file themselves (a path goes over the pipe, not a megabyte of pixels).

The pool (all its methods are called from the pipeline's one thread):

- Workers are started with ``spawn`` (the agent has threads; a forked child would inherit their locks), each
  builds its own ``Inferer`` from the bundle folder and backend (ONNX Runtime with one intra-op thread unless
  ``inference.threads`` says otherwise), warms it up and reports ready; :meth:`AnalysisPool.warm_up` returns
  once all are, so the agent's readiness waits for them. The first starts alone: a TensorRT engine built on
  first start is built once, then found by the others.
- A worker holds at most two tasks (one analysed, the next waiting in its pipe). A task is a few files.
- A worker that dies (SIGKILL, a segfault in a decoder, the OOM killer) is replaced; the files it held are
  analysed again, each alone in a worker that holds nothing else. A file that kills a worker when analysed
  alone is not tried again: its frames become ``input.undecodable`` results ("analysis process died
  (signal 11) on this slice"), read from the header in the agent's process, and the spool keeps the file.
- Workers ignore SIGINT and SIGTERM (the agent decides when they stop: a terminal's Ctrl-C or systemd's
  SIGTERM to the whole control group reaches them too) and exit when their pipe closes: the agent stopped, or
  was killed, so no worker outlives it.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_ready

from medqc.agent.records import SliceResult
from medqc.runners import RunnerError

log = logging.getLogger("medqc.agent.workers")

START_TIMEOUT_S = 300.0  # a worker's start: imports, the runner's session (a TensorRT engine: built once)
STOP_TIMEOUT_S = 5.0
MAX_START_FAILURES = 3  # replacements in a row that die before they are ready: the analysis cannot run here
PER_WORKER = 2  # tasks a worker holds: one it analyses, the next waiting in its pipe


# ------------------------------------------------------------------------------------------ one file's outcome
@dataclass
class Frame:
    """One frame of a file: ignored (``ignored``: why; with its UIDs), or analysed (``result``; an error
    result when it could not be; ``keep``: the spool keeps the file for inspection)."""

    ignored: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    result: SliceResult | None = None
    keep: bool = False
    decode_error: bool = False  # the decoding's own error (logged by the pipeline as "not analysable")


@dataclass
class Outcome:
    """What analysing one file gave; exactly one of ``missing``, ``not_dicom``, ``internal``, ``frames``."""

    path: str
    received_at: float
    seq: int = 0  # submission order (the pipeline applies outcomes in this order)
    missing: bool = False  # the file was gone (released meanwhile)
    not_dicom: str = ""  # NotDicom's message
    internal: str = ""  # an unexpected decoding error (a bug, or a library's): reason
    frames: list[Frame] = field(default_factory=list)


@dataclass
class Timings:
    """Stage seconds and batch sizes of one call of :func:`analyse_files` (``medqc_stage_seconds``)."""

    decode_s: float = 0.0
    infer_s: list[float] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)


def analyse_files(inferer, items: list[tuple], identifiers: bool, max_batch: int) -> tuple[list[Outcome], Timings]:
    """items: [(path, received_at, seq)] → one Outcome per file, in order. Every file is decoded first (its
    header facts, what is ignored and why), then the analysable frames go through ``inferer.run`` in chunks of
    ``max_batch`` (each frame's HU made per chunk: a large multi-frame object's frames lazily)."""
    from medqc.agent.decode import NotDicom, decode_file

    tm = Timings()
    t0 = time.perf_counter()
    outs: list[Outcome] = []
    todo: list[tuple[Frame, object]] = []
    for path, received_at, seq in items:
        o = Outcome(str(path), received_at, seq)
        outs.append(o)
        try:
            decoded = decode_file(path, received_at, identifiers=identifiers)
        except NotDicom as e:
            o.not_dicom = str(e)
            continue
        except FileNotFoundError:
            o.missing = True
            continue
        except Exception as e:  # noqa: BLE001 - one bad file never stops the pipeline
            log.exception("decoding %s failed", path)
            o.internal = f"{type(e).__name__}: {e}"
            continue
        for d in decoded:
            if d.ignored:
                o.frames.append(Frame(ignored=d.ignored, sop_instance_uid=d.info.sop_instance_uid,
                                      series_instance_uid=d.info.series_instance_uid))
            elif d.error:
                o.frames.append(Frame(result=SliceResult(info=d.info, error=d.error, analysed_at=time.time()), keep=True,
                                      decode_error=True))
            else:
                f = Frame()
                o.frames.append(f)
                todo.append((f, d))
    tm.decode_s = time.perf_counter() - t0
    for k in range(0, len(todo), max_batch):
        t1 = time.perf_counter()
        chunk, frames = [], []
        for f, d in todo[k:k + max_batch]:
            try:
                chunk.append((d.info, d.pixels()))
                frames.append(f)
            except Exception as e:  # noqa: BLE001 - this frame's problem only
                f.result = SliceResult(info=d.info, error=f"pixel data cannot be converted to HU: {type(e).__name__}: {e}",
                                       analysed_at=time.time())
                f.keep = True
        if not chunk:
            continue
        for f, r in zip(frames, inferer.run(chunk)):
            f.result = r
        tm.infer_s.append(time.perf_counter() - t1)
        tm.batches.append(len(chunk))
    return outs, tm


def died_outcome(path: str, received_at: float, seq: int, why: str, identifiers: bool) -> Outcome:
    """The outcome of a file that killed a worker when analysed alone: its frames, read from the header here
    (pydicom's header parsing is Python; the pixel decoders are where native code crashes), each an error
    result with ``why``; the spool keeps the file."""
    from medqc.agent.decode import NotDicom, decode_dataset, read_dataset

    o = Outcome(path, received_at, seq)
    try:
        ds = read_dataset(path)
        decoded = decode_dataset(ds, path, received_at, pixels=False, identifiers=identifiers)
    except FileNotFoundError:
        o.missing = True
        return o
    except (NotDicom, Exception) as e:  # noqa: BLE001 - the header cannot be read either: a rejected input
        o.internal = f"{why}; its header cannot be read ({type(e).__name__})"
        return o
    for d in decoded:
        if d.ignored:
            o.frames.append(Frame(ignored=d.ignored, sop_instance_uid=d.info.sop_instance_uid,
                                  series_instance_uid=d.info.series_instance_uid))
        else:
            o.frames.append(Frame(result=SliceResult(info=d.info, error=why, analysed_at=time.time()), keep=True,
                                  decode_error=True))
    return o


# ------------------------------------------------------------------------------------------ the worker
@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its own Inferer and decode as the agent does (picklable)."""

    bundle_dir: str | None  # None: no model, classical detectors only
    backend: str
    threads: int
    rebuild_engine: bool
    identifiers: bool
    max_batch: int


def make_inferer(spec: WorkerSpec):
    from medqc.agent.infer import Inferer
    from medqc.bundle import load_bundle

    bundle = load_bundle(spec.bundle_dir) if spec.bundle_dir is not None else None
    return Inferer(bundle, spec.backend if bundle is not None else "none", spec.threads, rebuild_engine=spec.rebuild_engine)


def _worker_main(spec: WorkerSpec, conn, log_level: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the agent decides when its workers stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import threading

    from medqc.agent import faults
    from medqc.agent.ingest.receiver_proc import _PipeLogHandler
    from medqc.agent.pipeline import _opencv_single_threaded

    lock = threading.Lock()  # log records come from the detectors' thread too: one message at a time

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    def send_quietly(msg) -> None:
        with lock:
            _send_quietly(conn, msg)

    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(send_quietly)]
    root.setLevel(log_level)
    _opencv_single_threaded()
    try:
        inferer = make_inferer(spec)
        took = inferer.warm_up()
    except Exception as e:  # noqa: BLE001 - reported to the agent, which fails its start with it
        send_quietly(("error", type(e).__name__, str(e)))
        return
    send(("ready", os.getpid(), inferer.describe(), took))
    crash_on = faults.worker_crash_selector()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the agent stopped or was killed
            break
        if msg[0] != "task":
            break
        _, task_id, items = msg
        outs, tm = analyse_files(inferer, items, spec.identifiers, spec.max_batch)
        if crash_on and any(f.result is not None and f.result.info.sop_instance_uid == crash_on for o in outs for f in o.frames):
            faults.crash_worker()
        try:
            send(("done", task_id, outs, tm))
        except (EOFError, OSError, BrokenPipeError):
            break
    inferer.close()


def _send_quietly(conn, msg) -> None:
    try:
        conn.send(msg)
    except Exception:  # noqa: BLE001 - the agent is gone
        pass


class PoolFailed(RunnerError):
    """The analysis cannot run in worker processes here (they die before they are ready): a RunnerError, which
    ``medqc agent`` and ``medqc analyze`` report as such (exit 2, the reason), not a traceback."""


@dataclass
class _Task:
    id: int
    items: list  # [(path, received_at, seq)]
    alone: bool = False  # a retry: analysed alone, in a worker holding nothing else


class _Worker:
    def __init__(self, ctx, spec: WorkerSpec, log_level: int, n: int):
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(spec, child, log_level), name=f"medqc-analysis-{n}", daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        self.ready = False
        self.tasks: dict[int, _Task] = {}

    @property
    def pid(self) -> int | None:
        return self.proc.pid


class AnalysisPool:
    """``n`` worker processes running :func:`analyse_files`; Inferer's lifecycle (``warm_up``, ``describe``,
    ``backend``, ``close``) plus ``submit`` / ``collect`` for the pipeline."""

    def __init__(self, spec: WorkerSpec, n: int, metrics=None):
        self.spec = spec
        self.n = max(1, int(n))
        self.metrics = metrics
        self.backend = spec.backend if spec.bundle_dir is not None else "none"
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._retries: deque[_Task] = deque()
        self._next_task = 0
        self._started = 0
        self._start_failures = 0
        self._describe: dict = {"backend": self.backend}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.failed = ""
        self.replaced = 0  # workers that died and were replaced (tests, logs)

    # ----------------------------------------------------------------------------------------- lifecycle
    def _spawn(self) -> _Worker:
        self._started += 1
        w = _Worker(self._ctx, self.spec, logging.getLogger().getEffectiveLevel(), self._started)
        self._workers.append(w)
        return w

    def warm_up(self) -> float:
        """Start the workers and return once every one is ready (seconds taken); raises the worker's error
        (a missing backend, a broken bundle) as the agent would have raised it building its own Inferer."""
        t0 = time.perf_counter()
        first = self._spawn()
        self._wait_ready([first])
        rest = [self._spawn() for _ in range(self.n - 1)]
        self._wait_ready(rest)
        return time.perf_counter() - t0

    def _wait_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(w.ready for w in workers):
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise PoolFailed(f"an analysis process did not start within {START_TIMEOUT_S:g} s")
            for conn in wait_ready([w.conn for w in workers if not w.ready], left):
                w = next(x for x in workers if x.conn is conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self.close()
                    raise PoolFailed(f"an analysis process exited at start ({_how(w.proc)})") from None
                if msg[0] == "error":
                    self.close()
                    raise _error(msg[1], msg[2])
                self._handle(w, msg)

    @property
    def started(self) -> bool:
        return self._started > 0

    def describe(self) -> dict:
        return dict(self._describe)

    def close(self) -> None:
        """Close every worker's pipe (they exit when it closes), wait a little, then kill what is left."""
        for w in self._workers:
            _send_quietly(w.conn, ("stop",))
            w.conn.close()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                log.warning("analysis process %s did not stop: killing it", w.pid)
                w.proc.kill()
                w.proc.join(2.0)
        self._workers = []
        for s in (self._wake_r, self._wake_w):
            s.close()

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid]

    # ------------------------------------------------------------------------------------------- work
    def wake(self) -> None:
        """Called from any thread when new work is queued: ends :meth:`collect`'s wait."""
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already woken (the buffer is full) or closed

    def capacity(self) -> int:
        """Tasks the pool takes now (none while a dead worker's files wait to be analysed alone)."""
        if self._retries or self.failed:
            return 0
        return sum(PER_WORKER - len(w.tasks) for w in self._workers if w.ready and not _alone(w))

    def submit(self, items: list[tuple]) -> None:
        """items: [(path, received_at, seq)], given to the ready worker holding the fewest tasks."""
        w = min((w for w in self._workers if w.ready and not _alone(w) and len(w.tasks) < PER_WORKER),
                key=lambda w: len(w.tasks))
        self._send(w, _Task(self._task_id(), list(items)))

    def _task_id(self) -> int:
        self._next_task += 1
        return self._next_task

    def _send(self, w: _Worker, task: _Task) -> None:
        w.tasks[task.id] = task
        try:
            w.conn.send(("task", task.id, task.items))
        except (OSError, BrokenPipeError):
            pass  # it died: its sentinel says so, and the task is retried

    def collect(self, timeout: float) -> list[tuple[list[Outcome], Timings | None]]:
        """Wait up to ``timeout`` for finished tasks (or :meth:`wake`); returns their outcomes. A worker that
        died is replaced here and its files queued for analysis alone; a file that killed a worker when
        alone comes back as :func:`died_outcome`."""
        done: list = []
        waits = {w.conn: w for w in self._workers}
        sentinels = {w.proc.sentinel: w for w in self._workers}
        ready = wait_ready([*waits, *sentinels, self._wake_r], timeout)
        for obj in ready:
            if obj is self._wake_r:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif obj in waits:
                self._drain(waits[obj], done)
        for obj in ready:
            w = sentinels.get(obj)
            if w is not None and w in self._workers:
                self._died(w, done)
        self._start_retries()
        return done

    def _drain(self, w: _Worker, done: list) -> None:
        """Everything the worker sent so far (a result may be followed by its death)."""
        while True:
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                return
            self._handle(w, msg, done)

    def _handle(self, w: _Worker, msg, done: list | None = None) -> None:
        kind = msg[0]
        if kind == "done":
            task = w.tasks.pop(msg[1], None)
            if task is not None and done is not None:
                done.append((msg[2], msg[3]))
        elif kind == "log":
            rec = logging.makeLogRecord(msg[1])
            logging.getLogger(rec.name).handle(rec)
        elif kind == "ready":
            w.ready = True
            self._describe = dict(msg[2])
            self.backend = self._describe.get("backend", self.backend)
            self._start_failures = 0
            self._gauge()
            log.info("analysis process %d ready (%s, warmed up in %.2f s)", msg[1], self.backend, msg[3])
        elif kind == "error":
            log.error("an analysis process could not start: %s: %s", msg[1], msg[2])

    def _died(self, w: _Worker, done: list) -> None:
        """A worker ended on its own: replace it; retry its files one by one, each alone; a file that killed
        a worker when alone is reported (``died_outcome``)."""
        self._workers.remove(w)
        self._drain(w, done)  # what it finished before it died is not analysed again
        with _quiet():
            w.conn.close()
        w.proc.join(1.0)
        how = _how(w.proc)
        if not w.ready:
            self._start_failures += 1
        tasks = list(w.tasks.values())
        lone = [t for t in tasks if t.alone]
        if lone:
            path, received_at, seq = lone[0].items[0]
            log.error("analysis process %s died (%s) analysing %s alone: reported as undecodable, the file kept",
                      w.pid, how, os.path.basename(path))
            done.append(([died_outcome(path, received_at, seq, f"analysis process died ({how}) on this slice",
                                       self.spec.identifiers)], None))
        again = [it for t in tasks if not t.alone for it in t.items]
        if again or w.ready:
            log.error("analysis process %s died (%s) holding %d file(s): replaced; they are analysed again, each alone",
                      w.pid, how, len(again))
        for it in sorted(again, key=lambda x: x[2]):
            self._retries.append(_Task(self._task_id(), [it], alone=True))
        self._gauge()
        if self._start_failures >= MAX_START_FAILURES:
            self.failed = f"analysis processes die before they are ready ({how}, {self._start_failures} in a row)"
            log.error("%s: the agent stops so that it is restarted (the spool keeps what it held)", self.failed)
            return
        self.replaced += 1
        if self.metrics is not None:
            with _quiet():
                self.metrics.inc("medqc_worker_restarts_total")
        self._spawn()

    def _gauge(self) -> None:
        if self.metrics is not None:
            with _quiet():
                self.metrics.set("medqc_analysis_workers", sum(1 for w in self._workers if w.ready))

    def _start_retries(self) -> None:
        """Give each waiting retry to a ready worker that holds nothing."""
        while self._retries:
            idle = [w for w in self._workers if w.ready and not w.tasks]
            if not idle:
                return
            self._send(idle[0], self._retries.popleft())


def _alone(w: _Worker) -> bool:
    return any(t.alone for t in w.tasks.values())


def _how(proc) -> str:
    code = proc.exitcode
    if code is None:
        return "still running"
    if code < 0:
        return f"signal {-code}"
    return f"exit code {code}"


def _error(name: str, message: str) -> Exception:
    """A worker's start error as the agent raises it (BundleError, BackendUnavailable, RunnerError: usage
    errors, exit 2), else PoolFailed."""
    from medqc.bundle import BundleError
    from medqc.runners import BackendUnavailable, RunnerError

    for cls in (BundleError, BackendUnavailable, RunnerError):
        if cls.__name__ == name:
            return cls(message)
    return PoolFailed(f"an analysis process could not start: {name}: {message}")


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True


def chunk_size(queued: int, workers: int, max_batch: int) -> int:
    """Files per task: the queue shared among the workers, at most ``max_batch``; a lone file goes at once."""
    return max(1, min(max_batch, math.ceil(queued / max(1, workers))))
