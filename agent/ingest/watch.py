"""Drop-folder ingest: watchdog on each folder; a file written and closed (``on_closed``) or renamed into
place (``on_moved``) is copied into the spool (durable) and queued, then removed from the drop folder.
Files already there at start are taken too. Names starting with '.' or ending in .part/.tmp are skipped
until they are renamed."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from medqc.agent.metrics import NULL

log = logging.getLogger("medqc.agent.ingest.watch")
SKIP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


def _skip(p: Path) -> bool:
    return p.name.startswith(".") or p.name.lower().endswith(SKIP_SUFFIXES)


class DropFolder:
    def __init__(self, dirs, spool, on_stored, metrics=NULL, settle_s: float = 0.0):
        self.dirs = [Path(d) for d in dirs]
        self.spool = spool
        self.on_stored = on_stored
        self.metrics = metrics
        self.settle_s = settle_s
        self._observer = None
        self._lock = threading.Lock()

    def ingest(self, path: Path) -> bool:
        path = Path(path)
        if _skip(path) or not path.is_file():
            return False
        from medqc.agent.ingest.spool import SpoolFull

        with self._lock:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return False  # already taken
            try:
                dst = self.spool.put(data, f"drop-{path.name}-{time.time_ns()}")
            except SpoolFull as e:
                log.error("drop folder: %s left in place: %s", path.name, e)
                return False
            try:
                path.unlink()
            except OSError:
                pass
        self.metrics.inc("medqc_slices_received_total", source="folder")
        self.on_stored(dst, time.time())
        return True

    def scan(self) -> int:
        n = 0
        for d in self.dirs:
            for p in sorted(d.rglob("*")):
                n += bool(self.ingest(p))
        return n

    def start(self) -> "DropFolder":
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        outer = self

        class Handler(FileSystemEventHandler):
            def on_closed(self, event):
                if not event.is_directory:
                    outer.ingest(Path(event.src_path))

            def on_moved(self, event):
                if not event.is_directory:
                    outer.ingest(Path(event.dest_path))

        self._observer = Observer()
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)
            self._observer.schedule(Handler(), str(d), recursive=True)
        self._observer.start()
        n = self.scan()
        log.info("watching %s (%d file(s) already there)", ", ".join(map(str, self.dirs)), n)
        return self

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None
