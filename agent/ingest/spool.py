"""The durable spool: every received instance is on disk (temp file named with its length, fsync, atomic
rename) before the scanner hears "success"; the agent resumes whatever is in it after a restart.

Layout under the spool directory:
  incoming/<sop_uid>.<arrival>.dcm     received, not yet part of a series verdict (resumed on start)
  kept/<sop_uid>.dcm          inputs kept for inspection (undecodable ones; everything with retention=keep)
  quarantine/<name>           files found in incoming/ at start that are not readable DICOM or end before
                              naming their series (damaged on disk after they were stored): set aside once
  .tmp/                       writes in progress (complete ones recovered on start, partial ones removed)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

log = logging.getLogger("medqc.agent")
_SAFE = re.compile(r"[^0-9A-Za-z._-]")
FULL_BYTES = 1024 * 1024  # less free than this is a full disk, whatever the reserve (a CT slice is ~0.5 MB)


class SpoolFull(Exception):
    """Free space is below the low-watermark: refuse new data rather than lose it."""


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(str(d), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: str | Path, min_free_mb: int = 512, retention: str = "delete", fsync: bool = True):
        if retention not in ("delete", "keep"):
            raise ValueError(f"spool retention {retention!r}: allowed values are delete, keep")
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.kept = self.root / "kept"
        self.quarantine_dir = self.root / "quarantine"
        self.tmp = self.root / ".tmp"
        for d in (self.incoming, self.kept, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._recover()
        self.min_free = int(min_free_mb) * 1024 * 1024
        self.retention = retention
        self.fsync = fsync
        self._free_checked = 0.0
        self._free = None
        self._lock = threading.Lock()

    def _recover(self) -> None:
        """After a crash: a temp file that reached its full length was fsynced (and possibly acknowledged)
        before its rename was made durable → it goes to incoming/; a shorter one was never acknowledged."""
        for p in self.tmp.iterdir():
            parts = p.name.split(".")
            try:
                want = int(parts[-2]) if p.name.endswith(".part") and len(parts) >= 4 else -1
                if want >= 0 and p.stat().st_size == want:
                    os.replace(p, self.incoming / (".".join(parts[:-2]) + ".dcm"))
                    continue
            except (OSError, ValueError):
                pass
            p.unlink(missing_ok=True)
        _fsync_dir(self.incoming)

    # ------------------------------------------------------------------------------------------ space
    def free_bytes(self, max_age_s: float = 0.5) -> int:
        now = time.monotonic()
        with self._lock:
            if self._free is None or now - self._free_checked > max_age_s:
                self._free = shutil.disk_usage(self.root).free
                self._free_checked = now
            return self._free

    def has_room(self, size: int = 0) -> bool:
        """Room for ``size`` more bytes above the reserve. A refusal is never made on a cached reading: when
        the cached free space says no, the disk is read again (space freed a moment ago is used at once; the
        health endpoint, which reads the disk in the agent's process, may already say "ok")."""
        if self.free_bytes() - size >= self.min_free:
            return True
        return self.free_bytes(0.0) - size >= self.min_free

    def refusal(self, max_age_s: float = 0.5) -> str:
        """Why C-STOREs are refused now ('' while there is room): the spool's disk below its reserve
        (``min_free_mb``, and at least ``FULL_BYTES`` even where the reserve is 0: a disk that holds no CT
        image refuses every one). Read from the disk itself, not from the refusals, so it clears as soon as
        space returns."""
        free = self.free_bytes(max_age_s)
        reserve = max(self.min_free, FULL_BYTES)
        if free >= reserve:
            return ""
        mb = 1024 * 1024
        return f"spool disk below reserve: {free // mb} MB free < {reserve // mb} MB"

    # ------------------------------------------------------------------------------------------ write
    def put(self, data: bytes | memoryview, name: str) -> Path:
        """Durably store one instance; returns its path in incoming/. Raises SpoolFull below the watermark."""
        if not self.has_room(len(data)):
            mb = 1024 * 1024
            raise SpoolFull(f"spool disk below reserve: {self.free_bytes() // mb} MB free < {self.min_free // mb} MB "
                            f"(+ {len(data):,} bytes to store)")
        safe = _SAFE.sub("_", name)[:120] or "instance"
        # unique per arrival: two objects with one SOP Instance UID (a header-only copy, a resend) never
        # overwrite each other before analysis; the series state counts an instance once
        uniq = f"{time.time_ns():x}{uuid.uuid4().hex[:6]}"
        final = self.incoming / f"{safe}.{uniq}.dcm"
        tmp = self.tmp / f"{safe}.{uniq}.{len(data)}.part"  # the length lets recovery tell complete from partial
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)  # a partial write (no space left, an I/O error) holds no space meanwhile
            with self._lock:
                self._free = None  # re-read the free space at the next check
            raise
        # no directory fsync per instance (≈1 ms): if a power loss undoes the rename, _recover() finds the
        # complete, fsynced temp file at the next start
        os.replace(tmp, final)
        with self._lock:
            if self._free is not None:
                self._free -= len(data)
        return final

    # ---------------------------------------------------------------------------------------- resume
    def pending(self) -> list[Path]:
        """Files received but not yet released, oldest first (resumed on start)."""
        files = []
        for p in self.incoming.iterdir():
            try:
                files.append((p.stat().st_mtime, p.name, p))
            except OSError:
                continue
        return [p for _, _, p in sorted(files)]

    def quarantine(self, path: str | Path) -> Path:
        """Move a damaged spool file to quarantine/ (made on first use), out of the way of every later start."""
        p = Path(path)
        self.quarantine_dir.mkdir(exist_ok=True)
        dst = self.quarantine_dir / p.name
        os.replace(p, dst)
        _fsync_dir(self.quarantine_dir)
        return dst

    # ------------------------------------------------------------------------------------- retention
    def release(self, path: str | Path, keep: bool = False) -> None:
        """The instance's series has its verdict (or it was ignored): delete it, or keep it."""
        p = Path(path)
        if p.parent != self.incoming:
            return  # not a spool file (drop-folder input analysed in place)
        try:
            if keep or self.retention == "keep":
                os.replace(p, self.kept / p.name)
            else:
                p.unlink()
        except FileNotFoundError:
            pass


WRITE_ERROR_HOLD_S = 60.0  # a spool write failure counts as "refusing" this long, unless an instance is stored since
REFUSAL_REASONS = ("spool-disk-low", "spool-write-error")


class Refusals:
    """Why C-STOREs are refused now, by reason: the spool's disk below ``spool.min_free_mb`` (read from the
    disk, so it clears as soon as space returns), or spool writes failing (a C-STORE refused for a write
    error, none stored since, within ``WRITE_ERROR_HOLD_S``). Sets ``medqc_refusing{reason}`` and logs each
    change; /healthz, /metrics and the agent's tick read it."""

    def __init__(self, spool: Spool, metrics):
        self.spool, self.metrics = spool, metrics
        self._lock = threading.Lock()
        self._refusing: dict[str, str] = {}
        self._write_errors = (0.0, 0.0, 0.0)  # (refusals counted, received count then, monotonic time)
        for r in REFUSAL_REASONS:
            metrics.set("medqc_refusing", 0.0, reason=r)

    def current(self) -> dict[str, str]:
        """{reason: message} ({} while C-STOREs are accepted)."""
        now: dict[str, str] = {}
        try:
            msg = self.spool.refusal()
        except OSError as e:
            msg = f"spool disk unreadable: {e.strerror or e}"
        if msg:
            now["spool-disk-low"] = msg
        with self._lock:
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
        self.current()
