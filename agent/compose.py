"""The composition root: the whole agent built from the config, in one place, in dependency order.

``compose(cfg, state_dir, ...)`` gives ``medqc agent`` every part; ``compose(cfg, offline=True)`` gives
``medqc analyze`` (and ``calibrate``) the analysis alone: no ingest, spool, store, sinks or HTTP. Nothing
here starts a thread or opens a port (``Agent.start`` does that, in order) and nothing is patched in
afterwards: each part is handed what it uses when it is made.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

log = logging.getLogger("medqc.agent")
STOP_GRACE_S = 10.0


class StateDirError(OSError):
    """The state directory (spool, SQLite store) cannot be created or written."""


def compose(cfg, state_dir: str | Path | None = None, bundle: str | None = None, backend: str | None = None, *,
            inference: bool = True, watch=(), offline: bool = False, baselines=None, plot: bool = False,
            workers: int | None = None) -> "Agent":
    """``baselines`` (offline only): the per-scanner baselines to judge against; the agent opens its own.
    ``plot`` (offline only): keep a thumbnail of every slice for ``medqc analyze --plot``. ``workers``: analysis
    worker processes (default: ``analysis.workers`` for the agent, 0 offline; ``medqc analyze`` chooses)."""
    from medqc.agent.metrics import NULL, Metrics
    from medqc.agent.pipeline import Pipeline, build_analysis
    from medqc.config import worker_count

    metrics = NULL if offline else Metrics()
    if offline:  # medqc analyze: the series judged once each, complete
        inferer, tracker = build_analysis(cfg, bundle, backend, inference, metrics, baselines, streaming=False,
                                          workers=workers or 0)
        thumbs = _thumbnails(0.0, cfg) if plot else None
        return Agent(cfg, metrics, Pipeline(cfg, inferer, tracker, sinks=[thumbs] if thumbs else [], metrics=metrics),
                     thumbnails=thumbs)

    from medqc.agent.ingest.spool import Refusals

    state = Path(state_dir)
    spool, store, learned = _state(cfg, state)  # state: spool, SQLite store, per-scanner baselines
    inferer, tracker = build_analysis(cfg, bundle, backend, inference, metrics,
                                      learned if cfg.baselines.enabled else None, streaming=True,
                                      workers=worker_count(cfg) if workers is None else workers)
    stream = thumbs = None  # the web side's sinks: server-sent events, the console's thumbnails
    if cfg.http.enabled:
        from medqc.agent.web.http import Broadcaster

        stream, thumbs = Broadcaster(), _thumbnails(None, cfg)
    lifecycle = Lifecycle()  # ready / stopping / failed, shared by the receiver process, the workers and /healthz
    pipeline = Pipeline(cfg, inferer, tracker, spool, _sinks(cfg, store, learned, stream, thumbs), metrics,
                        on_failed=lifecycle.fail)
    receiver, drop = _ingest(cfg, spool, pipeline, metrics, lifecycle, inference, [*(watch or ()), *cfg.watch.dirs])
    refusals = Refusals(spool, metrics)
    http = None
    if cfg.http.enabled:
        from medqc.agent.web.console import Console
        from medqc.agent.web.http import Api, HttpServer

        api = Api(cfg, pipeline, store, metrics, stream, refusals, lifecycle.ready)
        http = HttpServer(cfg, api, Console(cfg, tracker, store, thumbs))
    return Agent(cfg, metrics, pipeline, state_dir=state, spool=spool, store=store, baselines=learned,
                 receiver=receiver, watch=drop, http=http, refusals=refusals, lifecycle=lifecycle, inference=inference,
                 thumbnails=thumbs)


# ------------------------------------------------------------------------------------------ the parts
def _state(cfg, state: Path):
    """The spool, the SQLite store and the per-scanner baselines (``[baselines]``) under the state directory."""
    from medqc.agent.ingest.spool import Spool
    from medqc.agent.sinks.store import Store
    from medqc.baselines import Baselines

    try:
        state.mkdir(parents=True, exist_ok=True)
        spool = Spool(cfg.spool.dir or state / "spool", cfg.spool.min_free_mb, cfg.spool.retention, fsync=cfg.spool.fsync)
        store = Store(state / "medqc.sqlite", cfg.privacy)
        learned = Baselines.from_config(cfg, state) if cfg.baselines.enabled or cfg.baselines.learn else None
    except (OSError, sqlite3.Error) as e:
        raise StateDirError(f"cannot use the state directory {state} (spool and results): {getattr(e, 'strerror', None) or e}"
                            f"{' — ' + str(e.filename) if getattr(e, 'filename', None) else ''}; "
                            "choose another with --state-dir or state_dir in the config") from None
    return spool, store, learned


def _thumbnails(min_score, cfg):
    """The console's thumbnails, kept for as many series as the tracker keeps."""
    from medqc.agent.web.console import ThumbnailSink

    return ThumbnailSink(min_score, keep=cfg.series.keep_recent)


def _sinks(cfg, store, learned, stream, thumbs) -> list:
    """Where findings go: the store first, then the baselines learned from passes, stdout, webhook, DICOM SR,
    the server-sent events and the console's thumbnails."""
    from medqc.agent.sinks import dicom_sr, webhook
    from medqc.agent.sinks.baselines import BaselineSink
    from medqc.agent.sinks.stdout import StdoutSink

    sinks = [store]
    if learned is not None and cfg.baselines.learn:
        sinks.append(BaselineSink(learned))
    if cfg.sinks.stdout.enabled:
        sinks.append(StdoutSink())
    sinks += [s for s in (webhook.from_config(cfg), dicom_sr.from_config(cfg), stream, thumbs) if s is not None]
    return sinks


def _ingest(cfg, spool, pipeline, metrics, lifecycle, inference: bool, dirs: list):
    """The DICOM receiver (its own process unless ``dicom.receiver_process = false``) and the drop folders."""
    from medqc.agent.ingest import access

    import pydicom  # noqa: F401 - fully imported before any worker thread starts (import races)
    import pynetdicom  # noqa: F401

    on_stored = pipeline.submit if inference else (lambda path, t: None)
    # the access policy is built here in both receiver modes: a configuration mistake (a TLS file missing)
    # fails the start with a usage error; the receiver process builds its own copy from the same config
    policy = access.from_config(cfg, metrics)
    if cfg.dicom.receiver_process:  # its own process: no interpreter lock shared with the analysis
        from medqc.agent.ingest.receiver_proc import ReceiverProcess

        receiver = ReceiverProcess(cfg, spool, on_stored, pipeline.mpps_completed, metrics, on_died=lifecycle.fail)
    else:
        from medqc.agent.ingest.receiver import Receiver

        receiver = Receiver(cfg, spool, on_stored, pipeline.mpps_completed, metrics, policy)
    drop = None
    if dirs:
        from medqc.agent.ingest.watch import DropFolder

        drop = DropFolder(dirs, spool, on_stored, metrics)
    return receiver, drop


# ------------------------------------------------------------------------------------------ the agent
class Lifecycle:
    """Ready (the receiver listens), stopping (a signal, or a part died) and failed (exit non-zero)."""

    def __init__(self):
        self.ready = threading.Event()
        self.stopping = threading.Event()
        self.failed = False

    def fail(self) -> None:
        self.failed = True
        self.stopping.set()


class Agent:
    """The composed parts, started and stopped in order (``medqc agent``, tests, ``medqc analyze``)."""

    def __init__(self, cfg, metrics, pipeline, *, state_dir=None, spool=None, store=None, baselines=None, receiver=None,
                 watch=None, http=None, refusals=None, lifecycle=None, inference: bool = True, thumbnails=None):
        self.cfg, self.metrics, self.pipeline = cfg, metrics, pipeline
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.spool, self.store, self.baselines = spool, store, baselines
        self.receiver, self.watch, self.http, self.refusals = receiver, watch, http, refusals
        self.lifecycle = lifecycle or Lifecycle()
        self.inference = inference
        self.thumbnails = thumbnails

    @property
    def tracker(self):
        return self.pipeline.tracker

    @property
    def stopping(self) -> threading.Event:
        return self.lifecycle.stopping

    @property
    def failed(self) -> bool:
        return self.lifecycle.failed

    def refusing(self) -> dict[str, str]:
        return self.refusals.current() if self.refusals is not None else {}

    def start(self) -> "Agent":
        inferer = self.pipeline.inferer
        if self.inference:
            # before any slice: the first patient's slices pay no setup; with analysis workers, they are
            # started here and each warms up its own: the agent is ready once they all are
            took = inferer.warm_up()
            log.info("inference warmed up in %.2f s%s", took,
                     f" in {inferer.n} analysis process(es)" if self.pipeline.pool is not None else "")
        log.info("model %s %s on %s", inferer.describe().get("model"), inferer.describe().get("model_version"),
                 inferer.backend)
        self.metrics.set("medqc_backend_info", 1.0, backend=inferer.backend)
        if self.pipeline.pool is None:
            self.metrics.set("medqc_analysis_workers", 0.0)  # the analysis runs in this process
        if self.inference:
            self.pipeline.start()
            self.pipeline.resume()
        for part in (self.receiver, self.watch, self.http):
            if part is not None:
                part.start()
        if self.receiver is not None:
            self.lifecycle.ready.set()
        return self

    def tick(self) -> None:
        """Once a second in ``medqc agent``: the spool's free space and the refusal state as gauges."""
        if self.refusals is not None:
            self.refusals.tick()

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        for part in (self.receiver, self.watch):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # noqa: BLE001
                    log.exception("stopping %s failed", type(part).__name__)
        self.pipeline.stop(grace)  # unfinished series stay in the spool: resumed at the next start
        if self.http is not None:
            try:
                self.http.close()
            except Exception:  # noqa: BLE001
                log.exception("stopping the HTTP server failed")
