"""``medqc agent``: the DICOM receiver, the drop folder and the streaming pipeline in the foreground.

startup (config → state dir → spool → store → model → pipeline → resume the spool → receiver → drop
folder → HTTP) → READY=1 → tick loop (WATCHDOG=1, gauges) → on SIGTERM/SIGINT: STOPPING=1, stop accepting,
finish in-flight work within ``STOP_GRACE_S`` (the spool keeps the rest for the next start); a second
SIGINT forces exit.

Integration points: ``medqc.agent.http.serve(cfg, agent) -> object with .close()`` when that module
exists (``agent.pipeline``, ``.store``, ``.metrics``, ``.tracker``, ``.cfg``); ``medqc.agent.notify.notify(message)`` when it exists (else a built-in sd_notify); an access
policy from ``medqc.agent.access.from_config(cfg)`` handed to the receiver; extra sinks from
``medqc.agent.sinks.<name>.from_config(cfg)`` (returns a Sink or None) for webhook and dicom_sr.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

from medqc.runners import CHOICES as BACKENDS

log = logging.getLogger("medqc.agent")
STOP_GRACE_S = 10.0
WRITE_ERROR_HOLD_S = 60.0  # a spool write failure counts as "refusing" this long, unless an instance is stored since
REFUSAL_REASONS = ("spool-disk-low", "spool-write-error")


def add_arguments(p) -> None:
    p.add_argument("--port", type=int, default=None, help="DICOM port (default 11112)")
    p.add_argument("--ae-title", default=None, help="our AE title (default MEDQC)")
    p.add_argument("--state-dir", default=None, help="results and spool (default $STATE_DIRECTORY or ./medqc-state)")
    p.add_argument("--config", default=None, metavar="FILE", help="agent configuration (TOML)")
    p.add_argument("--http", default=None, metavar="HOST:PORT", help="HTTP API / console address (default 127.0.0.1:8480)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="inference backend (default auto)")
    p.add_argument("--bundle", default=None, metavar="DIR", help="model bundle folder (default: the bundled model)")
    p.add_argument("--watch", action="append", default=None, metavar="DIR", help="drop folder to ingest (repeatable)")
    p.add_argument("--no-inference", action="store_true", help="receive and spool only (no analysis; for benchmarks)")


def _optional(modname: str):
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and modname.startswith(e.name) or e.name == modname:
            return None
        raise


def _sd_notify(msg: str) -> None:
    mod = _optional("medqc.agent.notify")
    if mod is not None and hasattr(mod, "notify"):
        try:
            mod.notify(msg)
        except Exception as e:  # noqa: BLE001
            log.debug("notify failed: %s", e)
        return
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError as e:
        log.debug("sd_notify failed: %s", e)


def state_dir(cfg, arg: str | None) -> Path:
    return Path(arg or cfg.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "medqc-state").resolve()


class StateDirError(OSError):
    """The state directory (spool, SQLite store) cannot be created or written."""


class Agent:
    """Everything ``medqc agent`` runs, started and stopped in order (also usable from tests)."""

    def __init__(self, cfg, state: Path, bundle: str | None = None, backend: str | None = None, inference: bool = True,
                 watch: list[str] | None = None):
        from medqc.agent.metrics import Metrics

        self.cfg = cfg
        self.state_dir = Path(state)
        self.bundle, self.backend, self.inference = bundle, backend, inference
        self.watch_dirs = list(watch or ()) + list(cfg.watch.dirs)
        self.metrics = Metrics()
        self.stopping = threading.Event()
        self.failed = False  # a part died (the receiver process): exit non-zero so that systemd restarts us
        self.receiver = self.watch = self.http = self.pipeline = self.store = self.spool = self.baselines = None
        self._refusal_lock = threading.Lock()
        self._refusing: dict[str, str] = {}
        self._write_errors = (0.0, 0.0, 0.0)  # (refusals counted, received count then, monotonic time)
        for r in REFUSAL_REASONS:
            self.metrics.set("medqc_refusing", 0.0, reason=r)

    # The HTTP API reads these
    @property
    def tracker(self):
        return self.pipeline.tracker if self.pipeline else None

    def start(self) -> "Agent":
        from medqc.agent.pipeline import compose
        from medqc.agent.receiver import Receiver
        from medqc.agent.sinks.baselines import BaselineSink
        from medqc.agent.sinks.stdout import StdoutSink
        from medqc.agent.spool import Spool
        from medqc.agent.store import Store
        from medqc.baselines import Baselines

        import pydicom  # noqa: F401 - fully imported before any worker thread starts (import races)
        import pynetdicom  # noqa: F401

        cfg = self.cfg
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.spool = Spool(cfg.spool.dir or self.state_dir / "spool", cfg.spool.min_free_mb, cfg.spool.retention,
                               fsync=getattr(cfg.spool, "fsync", True))
            self.store = Store(self.state_dir / "medqc.sqlite", cfg.privacy)
            # per-scanner baselines (medqc/baselines.py): judged against where enabled, learned from passes where learn is set
            if cfg.baselines.enabled or cfg.baselines.learn:
                self.baselines = Baselines.from_config(cfg, self.state_dir)
        except (OSError, sqlite3.Error) as e:
            raise StateDirError(f"cannot use the state directory {self.state_dir} (spool and results): {getattr(e, 'strerror', None) or e}"
                                f"{' — ' + str(e.filename) if getattr(e, 'filename', None) else ''}; "
                                "choose another with --state-dir or state_dir in the config") from None
        sinks = [self.store]
        if self.baselines is not None and cfg.baselines.learn:
            sinks.append(BaselineSink(self.baselines))
        if cfg.sinks.stdout.enabled:
            sinks.append(StdoutSink())
        for name in ("webhook", "dicom_sr"):
            mod = _optional(f"medqc.agent.sinks.{name}")
            if mod is not None and hasattr(mod, "from_config"):
                s = mod.from_config(cfg)
                if s is not None:
                    sinks.append(s)
        self.pipeline = compose(cfg, self.bundle, self.backend, self.metrics, sinks, self.spool, self.inference,
                                baselines=self.baselines if cfg.baselines.enabled else None)
        self.pipeline.store = self.store
        self.pipeline.agent = self
        log.info("model %s %s on %s", self.pipeline.inferer.describe().get("model"),
                 self.pipeline.inferer.describe().get("model_version"), self.pipeline.inferer.backend)
        if self.inference:
            took = self.pipeline.inferer.warm_up()  # before any slice: the first patient's slices pay no setup
            log.info("inference warmed up in %.2f s", took)
            self.pipeline.start()
        self.pipeline.resume() if self.inference else None
        access_mod = _optional("medqc.agent.access")
        # built here in both receiver modes: a configuration mistake (a TLS file missing) fails the start with
        # a usage error; the receiver process builds its own copy from the same config
        # rejected associations → medqc_associations_rejected_total
        access = access_mod.from_config(cfg, self.metrics) if access_mod is not None else None
        on_stored = self.pipeline.submit if self.inference else (lambda path, t: None)
        if getattr(cfg.dicom, "receiver_process", False):  # its own process: no interpreter lock shared with analysis
            from medqc.agent.receiver_proc import ReceiverProcess

            self.receiver = ReceiverProcess(cfg, self.spool, on_stored, self.pipeline.mpps_completed, self.metrics,
                                            on_died=self._receiver_died).start()
        else:
            self.receiver = Receiver(cfg, self.spool, on_stored, self.pipeline.mpps_completed, self.metrics, access).start()
        if self.watch_dirs:
            from medqc.agent.watch import DropFolder

            self.watch = DropFolder(self.watch_dirs, self.spool, on_stored, self.metrics).start()
        http_mod = _optional("medqc.agent.http")
        if http_mod is not None and cfg.http.enabled and hasattr(http_mod, "serve"):
            self.http = http_mod.serve(cfg, self)  # reads agent.pipeline / .store / .metrics / .tracker
        elif cfg.http.enabled:  # no HTTP API module in this install: the console (and /healthz) alone
            from medqc.agent.console import serve as serve_console

            self.http = serve_console(cfg, self)
        return self

    def _receiver_died(self) -> None:
        self.failed = True
        self.stopping.set()

    def refusing(self) -> dict[str, str]:
        """Why C-STOREs are refused now ({} while they are accepted), by reason: the spool's disk below
        ``spool.min_free_mb`` (read from the disk, so it clears as soon as space returns), or spool writes
        failing (a C-STORE refused for a write error, none stored since, within ``WRITE_ERROR_HOLD_S``).
        Sets ``medqc_refusing{reason}`` and logs each change; /healthz and the tick loop call it."""
        now: dict[str, str] = {}
        if self.spool is not None:
            try:
                msg = self.spool.refusal()
            except OSError as e:
                msg = f"spool disk unreadable: {e.strerror or e}"
            if msg:
                now["spool-disk-low"] = msg
        with self._refusal_lock:
            errors = self.metrics.get("medqc_stores_refused_total", reason="spool-write-error")
            received = self.metrics.get("medqc_slices_received_total", source="dicom")
            seen, received_then, at = self._write_errors
            if errors > seen:
                self._write_errors = seen, received_then, at = errors, received, time.monotonic()
            if at and received == received_then and time.monotonic() - at < WRITE_ERROR_HOLD_S:
                now["spool-write-error"] = (f"spool writes failing: {errors:.0f} C-STORE(s) refused for a write error, "
                                            "none stored since (the log says which error)")
            before, self._refusing = self._refusing, now
        for r in REFUSAL_REASONS:
            if (r in now) != (r in before):
                self.metrics.set("medqc_refusing", 1.0 if r in now else 0.0, reason=r)
                if r in now:
                    log.error("refusing C-STOREs (0xA700, the scanner keeps the images and retries): %s", now[r])
                else:
                    log.info("accepting C-STOREs again: %s no longer holds", r)
        return now

    def tick(self) -> None:
        try:
            self.metrics.set("medqc_spool_free_bytes", float(self.spool.free_bytes(5.0)))
        except OSError:
            pass
        self.refusing()

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        for part in (self.receiver, self.watch):
            if part is not None:
                try:
                    part.stop()
                except Exception:  # noqa: BLE001
                    log.exception("stopping %s failed", type(part).__name__)
        if self.pipeline is not None:
            self.pipeline.stop(grace)  # unfinished series stay in the spool: resumed at the next start
        if self.http is not None:
            try:
                self.http.close()
            except Exception:  # noqa: BLE001
                log.exception("stopping the HTTP server failed")


def run(args) -> int:
    from medqc.bundle import BundleError
    from medqc.config import ConfigError, load_config
    from medqc.errors import UsageError
    from medqc.runners import BackendUnavailable, RunnerError

    overrides = {"dicom.port": args.port, "dicom.ae_title": args.ae_title, "http.bind": args.http,
                 "inference.backend": args.backend, "inference.bundle": args.bundle}
    try:
        cfg = load_config(args.config, overrides)
        from medqc.agent import faults  # noqa: F401 - MEDQC_FAULT_POINT (a test facility) checked at start
    except (ConfigError, ValueError) as e:
        raise UsageError(str(e)) from None
    if logging.getLogger().level > logging.DEBUG:  # pynetdicom logs every C-STORE at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    agent = Agent(cfg, state_dir(cfg, args.state_dir), args.bundle, args.backend, not args.no_inference, args.watch)

    interrupts = []

    def on_signal(signum, frame):
        interrupts.append(signum)
        if len(interrupts) > 1 and signum == signal.SIGINT:
            log.warning("second interrupt: exiting now (the spool keeps unanalysed instances)")
            os._exit(130)
        agent.stopping.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            agent.start()
        except (BundleError, BackendUnavailable, RunnerError) as e:
            agent.stop(1.0)
            raise UsageError(str(e)) from None
        except StateDirError as e:
            agent.stop(1.0)
            raise UsageError(str(e)) from None
        except OSError as e:
            agent.stop(1.0)
            raise UsageError(f"cannot listen on port {cfg.dicom.port}: {e}") from None
        log.info("medqc agent ready: AE %s on port %d, state in %s", cfg.dicom.ae_title, agent.receiver.port, agent.state_dir)
        _sd_notify("READY=1\nSTATUS=receiving")
        while not agent.stopping.wait(1.0):
            agent.tick()
            _sd_notify("WATCHDOG=1")
        log.info("stopping (finishing in-flight work for up to %.0f s)", STOP_GRACE_S)
        _sd_notify("STOPPING=1")
        agent.stop()
        return 1 if agent.failed else 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
