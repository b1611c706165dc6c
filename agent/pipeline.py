"""The agent's one path, wired in :func:`compose`:

    ingest (receiver.py: C-STORE, watch.py: drop folder)
      → spool.py (durable, then ACK)  → queue of spool paths (pixels stay on disk: RAM stays bounded)
      → workers.py: decode.py (header → SliceInfo; pixels → HU) → infer.py (preprocess → runner → sigmoid →
        fusion with medqc.analysis.fusion), in worker processes (``analysis.workers``) or on this thread
      → series.py (per-series state, streaming checks, completion, verdict)  → sinks (one thread each)

``Pipeline`` runs on one thread. With ``analysis.workers = 0`` it decodes and infers there itself, in
micro-batches (batch.py: max batch / max wait). With workers it hands the queued paths to the pool
(workers.AnalysisPool), a few per task, and applies the outcomes in the order the files were submitted (a
reorder buffer keyed by that sequence), so the series state, checks and sinks see each series' slices in
arrival order whichever worker finished first. Either way it checks for due series after every batch and
at least every 50 ms.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from pathlib import Path

from medqc.agent import faults
from medqc.agent.batch import MicroBatcher
from medqc.agent.metrics import NULL
from medqc.agent.records import SliceEvent, SliceResult
from medqc.agent.sinks.base import SinkThread
from medqc.agent.workers import AnalysisPool, Outcome, Timings, analyse_files, chunk_size

log = logging.getLogger("medqc.agent.pipeline")
TICK_S = 0.05


def _kind(msg: str) -> str:
    """A reading error (NotDicom's message) without the library's message (which may quote a value read from
    the file)."""
    return msg.split(" (", 1)[0] + (f" ({msg.split(' (', 1)[1].split(':')[0].rstrip(')')})" if " (" in msg else "")


MPPS_DRAIN_S = 30.0  # longest an MPPS-completed series waits for the queue to drain before its verdict


class Pipeline:
    def __init__(self, cfg, inferer, tracker, spool=None, sinks=(), metrics=NULL, max_rejected: int = 10000,
                 on_failed=None):
        """``inferer``: an ``Inferer`` (the analysis on the pipeline's thread) or an ``AnalysisPool`` (in worker
        processes); ``on_failed``: called when the pool cannot run (its workers die before they are ready)."""
        self.cfg = cfg
        self.inferer = inferer
        self.pool = inferer if isinstance(inferer, AnalysisPool) else None
        self.on_failed = on_failed
        self.tracker = tracker
        self.spool = spool
        self.metrics = metrics
        self.q: queue.Queue = queue.Queue()
        self.batcher = MicroBatcher(self.q, cfg.inference.max_batch, cfg.inference.max_wait_ms)
        self.sinks = [SinkThread(s, metrics) for s in sinks]
        self.rejected: deque = deque(maxlen=max_rejected)
        self._files: dict[str, set] = {}  # series uid → spool files waiting for its verdict
        self._keep: set = set()  # files kept after the verdict (undecodable inputs)
        self._resumed: set = set()  # spool files found at start, not decoded yet (damaged ones: quarantined)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = 0
        self._mpps_at = 0.0
        self._lock = threading.Lock()
        self.identifiers = bool(cfg.privacy.show_patient_identifiers)
        self._seq = 0  # submission order of the files handed to the pool
        self._applied = 0  # outcomes applied so far (the next one to apply has this seq)
        self._waiting: dict[int, Outcome] = {}  # finished early: waiting for those submitted before

    # ------------------------------------------------------------------------------------------ intake
    def submit(self, path: str | Path, received_at: float | None = None) -> None:
        with self._lock:
            self._busy += 1
        self.q.put((str(path), time.time() if received_at is None else received_at))
        self._metric("set", "medqc_queue_depth", self.q.qsize())
        if self.pool is not None:
            self.pool.wake()

    def resume(self) -> int:
        """Queue whatever the spool holds from before a restart."""
        if self.spool is None:
            return 0
        files = self.spool.pending()
        for p in files:
            try:
                received_at = p.stat().st_mtime
            except OSError:
                continue
            with self._lock:
                self._resumed.add(str(p))
            self.submit(p, received_at)
        if files:
            log.info("resuming %d spooled instance(s)", len(files))
        return len(files)

    def mpps_completed(self, series_uids: list[str]) -> None:
        """MPPS COMPLETED names the series; their last slices may still be queued behind it (the N-SET
        arrives right after the last C-STORE), so the verdict waits until the queue has drained — at most
        ``MPPS_DRAIN_S`` (a slice later still re-opens the series)."""
        with self._lock:
            self._mpps_at = time.monotonic()
        self.tracker.mpps_completed(series_uids)

    # ------------------------------------------------------------------------------------------ helpers
    def _metric(self, kind: str, name: str, value=1.0, **labels) -> None:
        try:
            getattr(self.metrics, kind)(name, value, **labels)
        except Exception:  # noqa: BLE001 - counting never stops the analysis
            pass

    def _emit(self, method: str, *args) -> None:
        for s in self.sinks:
            s.submit(method, *args)

    def _reject(self, path: str, reason: str, sop_uid: str = "", series_uid: str = "") -> None:
        rec = {"path": path, "reason": reason}
        if sop_uid:
            rec["sop_instance_uid"] = sop_uid
        if series_uid:
            rec["series_instance_uid"] = series_uid
        with self._lock:  # the HTTP API lists them from its own threads (recent_rejected)
            self.rejected.append(rec)
        self._metric("inc", "medqc_slices_rejected_total", reason=reason.split(" (")[0].split(":")[0][:40])
        for s in self.sinks:
            if hasattr(s.sink, "on_rejected"):
                s.submit("on_rejected", dict(rec))

    def recent_rejected(self, n: int) -> list[dict]:
        """The last ``n`` inputs not analysed (copies; safe from any thread)."""
        with self._lock:
            return [dict(r) for r in list(self.rejected)[-n:]]

    def _quarantine(self, path: str, reason: str) -> None:
        """A spool file found at start that cannot be read as DICOM or ends before naming its series: it was
        complete when stored (the spool renames only complete files), so the disk damaged it since. It goes
        to spool/quarantine/ for inspection — not deleted, and never tried again at a later start. The log
        line names the file (SOP Instance UID and arrival) and the reason's kind, never its contents."""
        try:
            dst = self.spool.quarantine(path)
        except OSError as e:
            log.error("spool file %s is damaged (%s) and cannot be moved to quarantine: %s", Path(path).name, reason,
                      e.strerror or e)
            return
        log.warning("spool file %s quarantined in %s: found at start, %s", dst.name, dst.parent, reason)
        self._reject(str(dst), f"quarantined: {reason}")

    def _release(self, path: str, keep: bool = False) -> None:
        if self.spool is not None:
            self.spool.release(path, keep=keep)

    # ---------------------------------------------------------------------------------------- one batch
    def process(self, items: list[tuple[str, float]]) -> None:
        """Analyse a batch on this thread (``analysis.workers = 0``) and apply it."""
        outs, tm = analyse_files(self.inferer, [(p, t, 0) for p, t in items], self.identifiers, self.cfg.inference.max_batch)
        self._timings(tm)
        if tm.batches:
            faults.reached("analysis")
        for o in outs:
            self._apply(o)

    def _timings(self, tm: Timings | None) -> None:
        if tm is None:
            return
        self._metric("observe", "medqc_stage_seconds", tm.decode_s, stage="decode")
        for s, n in zip(tm.infer_s, tm.batches):
            self._metric("observe", "medqc_stage_seconds", s, stage="infer")
            self._metric("observe", "medqc_batch_size", n)

    def _apply(self, o: Outcome) -> None:
        """One file's outcome into the series state (and the rejected, quarantined and kept inputs)."""
        path = o.path
        with self._lock:
            resumed = path in self._resumed and self.spool is not None
            self._resumed.discard(path)
        if o.missing:
            return
        if o.not_dicom:
            if resumed:
                self._quarantine(path, _kind(o.not_dicom))
                return
            self._reject(path, o.not_dicom)
            self._release(path)
            return
        if o.internal:
            self._reject(path, f"internal decode error: {o.internal}")
            self._release(path, keep=True)
            return
        if resumed and o.frames and all(f.ignored and not f.series_instance_uid for f in o.frames):
            # every stored instance names its series (a C-STORE's dataset, a drop-folder file that decoded):
            # one that does not now is cut short, or no DICOM object at all
            why = o.frames[0].ignored
            self._quarantine(path, why if why.startswith("truncated file") else f"names no series ({why})")
            return
        used = False
        for f in o.frames:
            if f.ignored:
                self._reject(path, f.ignored, f.sop_instance_uid, f.series_instance_uid)
                continue
            used = True
            r = f.result
            self._files.setdefault(r.info.series_instance_uid, set()).add(path)
            if f.keep:
                self._keep.add(path)
            if f.decode_error:
                log.warning("instance %s (series %s) not analysable: %s", r.info.sop_instance_uid,
                            r.info.series_instance_uid, r.error)
            self._add(r)
        if not used:
            self._release(path)

    # -------------------------------------------------------------------------------- the worker pool
    def _dispatch(self) -> None:
        """Hand queued files to the pool while it has room, a few per task (the queue shared among the
        workers, at most ``inference.max_batch``; a lone file at once)."""
        while self.pool.capacity() > 0:
            n = chunk_size(self.q.qsize(), self.pool.n, self.cfg.inference.max_batch)
            items = []
            for _ in range(n):
                try:
                    path, received_at = self.q.get_nowait()
                except queue.Empty:
                    break
                items.append((path, received_at, self._seq))
                self._seq += 1
            if not items:
                return
            self.pool.submit(items)

    def _collect(self, timeout: float) -> int:
        """Apply what the pool finished, in submission order; returns the files applied."""
        n = 0
        for outs, tm in self.pool.collect(timeout):
            self._timings(tm)
            if tm is not None and tm.batches:
                faults.reached("analysis")
            for o in outs:
                self._waiting[o.seq] = o
        while self._applied in self._waiting:
            o = self._waiting.pop(self._applied)
            self._applied += 1
            try:
                self._apply(o)
            except Exception:  # noqa: BLE001
                log.exception("applying the analysis of %s failed", o.path)
            n += 1
        if n:
            with self._lock:
                self._busy -= n
                waiting = self._busy  # queued, in a worker, or finished ahead of an earlier file
            self._metric("set", "medqc_queue_depth", waiting)
        return n

    def _pool_step(self, timeout: float) -> int:
        self._dispatch()
        n = self._collect(timeout)
        self._dispatch()
        if self.pool.failed and self.on_failed is not None:
            callback, self.on_failed = self.on_failed, None
            callback()
        return n

    def _add(self, result: SliceResult) -> None:
        t0 = time.perf_counter()
        try:
            changed = self.tracker.add(result)  # frozen events, made under the tracker's lock
        except Exception:  # noqa: BLE001
            log.exception("series checks failed on %s", result.info.sop_instance_uid)
            changed = []
        self._metric("observe", "medqc_stage_seconds", time.perf_counter() - t0, stage="checks")
        if result.error:
            self._metric("inc", "medqc_slices_rejected_total", reason="undecodable")
        else:
            self._metric("inc", "medqc_slices_analysed_total")
            if result.info.received_at:
                self._metric("observe", "medqc_stage_seconds", max(0.0, result.analysed_at - result.info.received_at),
                             stage="end_to_end")
        if self.tracker.get(result.info.series_instance_uid) is None:
            return
        self._emit("on_slice", SliceEvent(result))
        self._findings(changed)

    def _findings(self, changed) -> None:
        """Every change of a finding goes to the sinks with its kind (records.KINDS; the event feeds drop
        "updated"); ``medqc_findings_total`` counts each finding once, when it is first reported."""
        from medqc.agent.series import first_report

        for f in changed:
            if first_report(f):
                self._metric("inc", "medqc_findings_total", check=f.check, severity=f.severity)
            self._emit("on_finding", f)

    def _gauges(self) -> None:
        """Open series and the findings standing on them (not withdrawn), by severity."""
        from medqc.agent.records import SEVERITIES

        counts, series = dict.fromkeys(SEVERITIES, 0), 0
        with self.tracker.lock:
            for st in self.tracker.all():
                if st.verdict is None:
                    series += 1
                    for f in st.findings.values():
                        if not f.details.get("resolved") and f.severity in counts:
                            counts[f.severity] += 1
        self._metric("set", "medqc_series_open", series)
        for sev, n in counts.items():
            self._metric("set", "medqc_findings_open", n, severity=sev)

    # -------------------------------------------------------------------------------------- completion
    def complete_due(self, now: float | None = None) -> int:
        n = 0
        with self._lock:
            draining = self._busy > 0 and time.monotonic() - self._mpps_at < MPPS_DRAIN_S
        for uid, reason in self.tracker.due(time.time() if now is None else now):
            if reason == "mpps" and draining:
                continue  # slices received before the N-SET are still queued: finish them first
            self.complete(uid, reason)
            n += 1
        return n

    def complete(self, uid: str, reason: str) -> None:
        try:
            series, changed = self.tracker.finish(uid, reason, self.cfg.privacy)  # frozen, under the tracker's lock
        except Exception:  # noqa: BLE001
            log.exception("completing series %s failed", uid)
            return
        self._findings(changed)
        self._metric("inc", "medqc_series_completed_total", verdict=series.verdict)
        log.info("series %s: verdict %s (%s, %d slices, %d findings)", uid, series.verdict, reason,
                 len(series.results), len(series.findings))
        self._emit("on_series", series)
        release = []
        for path in self._files.pop(uid, ()):  # retention: after the series verdict
            if not any(path in s for s in self._files.values()):
                release.append((path, path in self._keep))
                self._keep.discard(path)
        self._release_after_sinks(release)

    def _release_after_sinks(self, files: list[tuple[str, bool]]) -> None:
        """Release a series' spool files once every sink has handled what was queued before (the verdict
        committed to the store, the report sent or its failure logged): until then the spool is the only
        durable copy of the series, and a kill finds the files at the next start, which analyses the series
        again. A sink whose queue is full cannot take the marker: the files stay until the next start. Sinks
        that record nothing (``Sink.spool_waits`` false: the console's thumbnails) are not waited for."""
        if not files:
            return

        def release() -> None:
            for path, keep in files:
                self._release(path, keep=keep)

        sinks = [s for s in self.sinks if getattr(s.sink, "spool_waits", True)]
        if not sinks:
            release()
            return
        left, lock = [len(sinks)], threading.Lock()

        def one_done() -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                release()

        for s in sinks:
            s.submit(one_done)  # a marker: called once the sink handled everything queued before it

    def complete_all(self, reason: str = "end-of-input") -> None:
        for st in self.tracker.all():
            if st.verdict is None:
                self.complete(st.uid, reason)

    # ------------------------------------------------------------------------------------------ running
    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.pool is not None:
                try:
                    self._pool_step(TICK_S)
                except Exception:  # noqa: BLE001
                    log.exception("pipeline step failed")
                self._tick()
                continue
            items = self.batcher.next(TICK_S)
            if items:
                try:
                    self.process(items)
                except Exception:  # noqa: BLE001
                    log.exception("pipeline batch failed")
                finally:
                    with self._lock:
                        self._busy -= len(items)
                self._metric("set", "medqc_queue_depth", self.q.qsize())
            self._tick()

    def _tick(self) -> None:
        try:
            self.complete_due()
            self._gauges()
        except Exception:  # noqa: BLE001
            log.exception("series completion failed")

    def start(self) -> "Pipeline":
        self._thread = threading.Thread(target=self._loop, name="pipeline", daemon=True)
        self._thread.start()
        return self

    def idle(self) -> bool:
        with self._lock:
            return self._busy == 0

    def run_until_idle(self, progress=None) -> None:
        """Offline use (``medqc analyze``): process the queue in this thread until it is empty."""
        if self.pool is not None:
            if not self.pool.started:
                self.pool.warm_up()
            while not self.idle():
                if self.pool.failed:
                    from medqc.agent.workers import PoolFailed

                    raise PoolFailed(self.pool.failed)
                n = self._pool_step(1.0)
                if progress is not None and n:
                    progress.update(n)
            return
        while True:
            items = self.batcher.next(0)
            if not items:
                break
            self.process(items)
            with self._lock:
                self._busy -= len(items)
            if progress is not None:
                progress.update(len(items))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued within ``timeout`` (the spool keeps the rest), then stop sinks."""
        deadline = time.monotonic() + timeout
        while not self.idle() and time.monotonic() < deadline and self._thread is not None and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
        for s in self.sinks:
            s.close(timeout=max(0.5, deadline - time.monotonic()))
        self.inferer.close()

    def flush_sinks(self, timeout: float = 5.0) -> None:
        for s in self.sinks:
            s.flush(timeout)


def _opencv_single_threaded() -> None:
    """OpenCV's own thread pool splits each small resize/blur/median across the cores; the agent already
    keeps them busy with its own threads (receiver, pipeline, detectors, ONNX Runtime), so the split only
    adds work: on the 2-core box the detectors and preprocessing cost 10.7–11.2 ms of CPU per slice with it
    and 8.4–9.1 without, for 0.3 ms less wall time on an idle machine."""
    try:
        import cv2
    except ImportError:
        return
    try:
        cv2.setNumThreads(1)
    except Exception:  # noqa: BLE001 - tuning only
        pass


def build_analysis(cfg, bundle_dir: str | None = None, backend: str | None = None, inference: bool = True,
                   metrics=NULL, baselines=None, streaming: bool = True, workers: int = 0):
    """The analysis the composition root (``medqc.agent.compose``) puts in the pipeline: bundle → runner →
    inferer (``workers = 0``: on the pipeline's thread) or a pool of ``workers`` processes that each build
    their own (``medqc.agent.workers``), and the series tracker with the bundle's per-class thresholds.
    ``baselines``: the per-scanner baselines the checks judge against (``medqc.baselines.Baselines``);
    ``streaming=False``: offline, every series judged once, complete."""
    _opencv_single_threaded()
    from medqc.agent.infer import Inferer
    from medqc.agent.series import SeriesTracker
    from medqc.agent.workers import WorkerSpec
    from medqc.bundle import BundleError, load_bundle

    backend = (backend or cfg.inference.backend) if inference else "none"
    try:
        bundle = load_bundle(bundle_dir or cfg.inference.bundle or None)
    except BundleError as e:
        explicit = bool(bundle_dir or cfg.inference.bundle)
        if backend != "none" and (explicit or backend != "auto"):
            raise
        if backend != "none":  # zero configuration without the bundled model: still useful, and says so
            log.warning("%s: running the classical detectors only (pass --bundle DIR for the network)", e)
            backend = "none"
        bundle = None  # classical detectors only: no model needed
    if workers > 0:
        # each worker its own runner; one ONNX Runtime intra-op thread each unless inference.threads says
        spec = WorkerSpec(str(bundle.root) if bundle is not None and backend != "none" else None, backend,
                          cfg.inference.threads or 1, cfg.inference.rebuild_engine,
                          bool(cfg.privacy.show_patient_identifiers), cfg.inference.max_batch)
        inferer = AnalysisPool(spec, workers, metrics)
    else:
        inferer = Inferer(bundle, backend, cfg.inference.threads, rebuild_engine=cfg.inference.rebuild_engine)
    tracker = SeriesTracker(cfg, bundle.check_thresholds if bundle is not None else {}, baselines=baselines,
                            streaming=streaming)
    return inferer, tracker
