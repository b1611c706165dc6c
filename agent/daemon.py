"""``medqc agent``: the DICOM receiver, the drop folder and the streaming pipeline in the foreground.

The agent is built by ``medqc.agent.compose.compose`` (the one composition root); this module runs it:
start (the analysis workers, each warmed up, or the model's warm-up in-process → pipeline → resume the spool →
receiver → drop folder → HTTP) → READY=1 → tick loop
(WATCHDOG=1, gauges) → on SIGTERM/SIGINT: STOPPING=1, stop accepting, finish in-flight work within
``STOP_GRACE_S`` (the spool keeps the rest for the next start); a second SIGINT forces exit.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from medqc.agent.compose import STOP_GRACE_S
from medqc.runners import CHOICES as BACKENDS

log = logging.getLogger("medqc.agent")


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


def _sd_notify(msg: str) -> None:
    from medqc.agent.notify import notify

    try:
        notify(msg)
    except Exception as e:  # noqa: BLE001
        log.debug("notify failed: %s", e)


def state_dir(cfg, arg: str | None) -> Path:
    return Path(arg or cfg.state_dir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "medqc-state").resolve()


def run(args) -> int:
    from medqc.agent.compose import StateDirError, compose
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
    try:
        agent = compose(cfg, state_dir(cfg, args.state_dir), args.bundle, args.backend, inference=not args.no_inference,
                        watch=args.watch)
    except (BundleError, BackendUnavailable, RunnerError, StateDirError) as e:
        raise UsageError(str(e)) from None

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
