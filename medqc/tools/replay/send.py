"""``medqc replay``: send recorded studies over DICOM the way a scanner does, and measure.

Each series goes over its own association (as a scanner sends a reconstruction), slices are paced at a
fixed rate, as fast as possible, or at the gaps recorded in the files (ContentTime / AcquisitionTime), and
several studies are sent at once (one sender thread per study, ``--associations`` at a time).

Every C-STORE round trip is timed. With ``--agent-url`` the agent's HTTP API is followed too (its
server-sent event stream and ``/api/series/{uid}``) to measure what a technologist experiences:
slice arrival → result latency, time to the first flag of a series, and last slice → series verdict.

Files travel as they are on disk (pynetdicom's chunked send: no decode, no re-encode) whenever the peer
accepts the file's own transfer syntax; otherwise the dataset is decoded and re-encoded in the transfer
syntax the peer accepted — a compressed file (JPEG, JPEG-LS, JPEG 2000, RLE: archives often hold them) is
decompressed, keeping its SOP Instance UID, for a peer that takes uncompressed data only, as DCMTK's
storescp does by default. The sender sets TCP_NODELAY on its socket: without it every C-STORE waits for a
delayed ACK (about 20 slices/s on loopback).

Works against any storage SCP (DCMTK storescp, Orthanc, medqc agent) for the transport figures.
Exit status: 0 all sent; 1 something failed or was skipped (the summary says what); 2 usage error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medqc.errors import UsageError

log = logging.getLogger("medqc.replay")

SCHEMA = "medqc.replay/1"
DEFAULT_RATE = 60.0  # slices/s per association: a typical CT reconstruction output rate
_UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still seen)
)
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"


def _ts_name(uid: str) -> str:
    """A transfer syntax's name (its UID when pydicom does not know it)."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


# --------------------------------------------------------------------------------------------- inputs
@dataclass
class Instance:
    path: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str  # "" when the file has no file meta information
    instance_number: int | None = None
    z: float | None = None
    recorded_s: float | None = None  # recorded content/acquisition time, seconds since an arbitrary epoch
    series_number: int | None = None


@dataclass
class SeriesPlan:
    study_uid: str
    series_uid: str
    instances: list[Instance]
    offsets: list[float]  # send time of each instance, seconds after the series' start
    gap_before_s: float = 0.0  # pause before this series (after the previous one of the study)

    @property
    def duration_s(self) -> float:
        return self.offsets[-1] if self.offsets else 0.0


@dataclass
class StudyPlan:
    study_uid: str
    series: list[SeriesPlan]


def _tm_seconds(date: str, tm: str) -> float | None:
    """DICOM DA + TM → seconds (date optional). None when absent or malformed."""
    tm = (tm or "").strip().replace(":", "")
    if len(tm) < 2 or not tm[:2].isdigit():
        return None
    try:
        hh = int(tm[0:2])
        mm = int(tm[2:4]) if len(tm) >= 4 else 0
        ss = float(tm[4:]) if len(tm) > 4 else 0.0
    except ValueError:
        return None
    secs = hh * 3600 + mm * 60 + ss
    date = (date or "").strip()
    if len(date) == 8 and date.isdigit():
        try:
            secs += (_dt.date(int(date[:4]), int(date[4:6]), int(date[6:8])) - _dt.date(1970, 1, 1)).days * 86400.0
        except ValueError:
            pass
    return secs


def read_instance(path: Path) -> Instance:
    """Header facts needed to send ``path`` (no pixel data read). Raises ValueError with a plain reason."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    tags = [
        "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "InstanceNumber",
        "SeriesNumber", "ImagePositionPatient", "ContentDate", "ContentTime", "AcquisitionDate",
        "AcquisitionTime", "AcquisitionDateTime",
    ]
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags)
    except InvalidDicomError:
        try:  # files without the 128-byte preamble / file meta: accept if they parse as a dataset
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=tags, force=True)
        except Exception as e:
            raise ValueError(f"not a DICOM file ({type(e).__name__})") from None
        if "SOPInstanceUID" not in ds:
            raise ValueError("not a DICOM file (no DICM prefix, no SOP Instance UID)")
    except (OSError, Exception) as e:  # truncated, unreadable
        raise ValueError(f"unreadable: {type(e).__name__}: {e}") from None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    if sop_class == _MEDIA_DIRECTORY or (meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY):
        raise ValueError("a DICOMDIR media directory, not an instance a scanner sends")
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise ValueError(f"DICOM without {', '.join(missing)}: cannot be stored")
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    z = None
    ipp = ds.get("ImagePositionPatient")
    if ipp is not None and len(ipp) == 3:
        try:
            z = float(ipp[2])
        except (TypeError, ValueError):
            z = None
    rec = None
    adt = str(ds.get("AcquisitionDateTime", "") or "")
    if ds.get("ContentTime"):
        rec = _tm_seconds(str(ds.get("ContentDate", "")), str(ds.ContentTime))
    if rec is None and ds.get("AcquisitionTime"):
        rec = _tm_seconds(str(ds.get("AcquisitionDate", "")), str(ds.AcquisitionTime))
    if rec is None and len(adt) >= 10:
        rec = _tm_seconds(adt[:8], adt[8:])

    def _int(v):
        try:
            return int(v) if v not in (None, "") else None
        except (TypeError, ValueError):
            return None

    return Instance(
        path=str(path),
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=ts,
        instance_number=_int(ds.get("InstanceNumber")),
        z=z,
        recorded_s=rec,
        series_number=_int(ds.get("SeriesNumber")),
    )


def scan(paths: list[str | Path], progress: bool = False) -> tuple[list[Instance], list[dict]]:
    """Every file under ``paths`` → (instances, skipped [{path, reason}]). Duplicated SOP instances are skipped."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"no such file or folder: {p}")
    instances: list[Instance] = []
    skipped: list[dict] = []
    seen: set[str] = set()
    for f in _progress(files, "reading headers", "file", progress):
        try:
            inst = read_instance(f)
        except ValueError as e:
            skipped.append({"path": str(f), "reason": str(e)})
            continue
        if inst.sop_instance_uid in seen:
            skipped.append({"path": str(f), "reason": f"duplicate SOP Instance UID {inst.sop_instance_uid}"})
            continue
        seen.add(inst.sop_instance_uid)
        instances.append(inst)
    return instances, skipped


def plan(instances: list[Instance], mode: str, rate: float = DEFAULT_RATE, max_gap_s: float = 5.0) -> list[StudyPlan]:
    """Group into studies → series (send order) and give each instance its send offset.

    mode: ``rate`` (1/rate apart), ``asap`` (all at 0) or ``recorded`` (the recorded time differences,
    each gap capped at ``max_gap_s``; a series without usable times falls back to ``rate``)."""
    by_study: dict[str, dict[str, list[Instance]]] = {}
    for inst in instances:
        by_study.setdefault(inst.study_uid, {}).setdefault(inst.series_uid, []).append(inst)
    studies = []
    for study_uid, series in by_study.items():
        plans = []
        for series_uid, insts in series.items():
            timed = mode == "recorded" and all(i.recorded_s is not None for i in insts)
            if timed:
                insts.sort(key=lambda i: (i.recorded_s, i.instance_number if i.instance_number is not None else 1 << 30, i.path))
                offsets = [0.0]
                for a, b in zip(insts, insts[1:]):
                    offsets.append(offsets[-1] + min(max(0.0, b.recorded_s - a.recorded_s), max_gap_s))
            else:
                insts.sort(key=lambda i: (i.instance_number if i.instance_number is not None else 1 << 30, i.z if i.z is not None else 0.0, i.path))
                if mode == "asap":
                    offsets = [0.0] * len(insts)
                else:
                    offsets = [k / rate for k in range(len(insts))]
            plans.append(SeriesPlan(study_uid, series_uid, insts, offsets))
        # series in the order the scanner made them: recorded time, else series number
        def skey(sp: SeriesPlan):
            rec = [i.recorded_s for i in sp.instances if i.recorded_s is not None]
            sn = sp.instances[0].series_number
            return (min(rec) if (mode == "recorded" and rec) else 0.0, sn if sn is not None else 1 << 30, sp.series_uid)

        plans.sort(key=skey)
        if mode == "recorded":
            for prev_sp, sp in zip(plans, plans[1:]):
                a = [i.recorded_s for i in prev_sp.instances if i.recorded_s is not None]
                b = [i.recorded_s for i in sp.instances if i.recorded_s is not None]
                if a and b:
                    sp.gap_before_s = min(max(0.0, min(b) - max(a)), max_gap_s)
        studies.append(StudyPlan(study_uid, plans))
    return studies


# --------------------------------------------------------------------------------------------- sending
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")


def valid_uid(uid) -> bool:
    """PS3.5 9.1: components of digits (no leading zero) separated by dots, at most 64 characters."""
    return bool(uid) and len(str(uid)) <= 64 and bool(_UID.match(str(uid)))


def status_text(code: int, status=None) -> str:
    """A failed C-STORE status as people read it: the code, its meaning in the Storage Service Class
    (PS3.4 B.2.3) or among the general DIMSE statuses (pynetdicom's tables) and the peer's ErrorComment when
    it sent one."""
    from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    text = f"C-STORE status 0x{code:04X}" + (f" ({meaning[0]}: {meaning[1]})" if meaning else "")
    comment = status.get("ErrorComment") if status is not None else None
    if comment:
        text += f"; the peer says: {str(comment).strip()[:200]}"
    return text


@dataclass
class SendRecord:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    instance_number: int | None
    scheduled_at: float  # wall-clock time it was due
    sent_at: float  # wall-clock time the C-STORE started
    acked_at: float  # wall-clock time the response arrived (or the failure was seen)
    rtt_ms: float
    status: int | None
    ok: bool
    error: str = ""
    raw: bool = True  # sent as the file's bytes (no re-encode)
    path: str = ""  # the file it came from


@dataclass
class SeriesRun:
    study_uid: str
    series_uid: str
    n_planned: int
    started_at: float = 0.0
    first_sent_at: float | None = None
    last_acked_at: float | None = None
    associations: int = 0
    errors: list[str] = field(default_factory=list)


def _make_ae(calling_aet: str, timeouts: dict, poll_s: float = 0.0005):
    from pynetdicom import AE

    class NoDelayAE(AE):
        """An AE whose association sockets send without Nagle's delay (see the module docstring)."""

        def _create_socket(self, assoc, address, tls_args):
            sock = super()._create_socket(assoc, address, tls_args)
            # pynetdicom's reactor sleeps 1 ms whenever it is idle, which adds up to 1 ms to every round
            # trip; a shorter poll costs a little CPU and measures the peer, not our own sleep (the agent's
            # event-driven waits, agent/dulwait.py, are not used here: with them DCMTK's refuse-and-close
            # raced its A-ASSOCIATE-RJ more often, and the sender's CPU did not measurably change)
            if hasattr(assoc, "dul") and hasattr(assoc.dul, "_run_loop_delay"):
                assoc.dul._run_loop_delay = poll_s
            try:
                sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError) as e:  # pragma: no cover - exotic platforms
                log.warning("cannot set TCP_NODELAY on the sending socket: %s", e)
            return sock

    ae = NoDelayAE(ae_title=calling_aet)
    ae.acse_timeout = timeouts["acse"]
    ae.dimse_timeout = timeouts["dimse"]
    ae.network_timeout = timeouts["network"]
    ae.connection_timeout = timeouts["connect"]
    return ae


def _contexts(series: SeriesPlan):
    from pynetdicom import build_context

    by_class: dict[str, list[str]] = {}
    for inst in series.instances:
        ts_list = by_class.setdefault(inst.sop_class_uid, [])
        ts = inst.transfer_syntax or "1.2.840.10008.1.2"
        if ts not in ts_list:
            ts_list.append(ts)
    ctxs = []
    for sop_class, ts_list in by_class.items():
        # the file's own syntax first (sent raw), uncompressed fallbacks after (re-encoded; a compressed file
        # is decompressed for a peer that accepts only uncompressed data, as DCMTK's storescp does by default)
        for ts in ts_list:
            ctxs.append(build_context(sop_class, [ts]))
        extra = [t for t in _UNCOMPRESSED[:2] if t not in ts_list]
        if extra:
            ctxs.append(build_context(sop_class, extra))
    if len(ctxs) > 128:
        raise UsageError(f"series {series.series_uid} needs {len(ctxs)} presentation contexts (DICOM allows 128)")
    return ctxs


def _assoc_failure(assoc, host: str, port: int, called: str) -> str:
    if assoc.is_rejected:
        reason = ""
        try:
            prim = assoc.acceptor.primitive
            reason = f" (result {prim.result_str}, source {prim.source_str}, reason {prim.reason_str})"
        except Exception:
            pass
        return f"association rejected by {host}:{port} for called AE title {called!r}{reason}"
    try:  # tell "nothing there" from "something there that does not speak DICOM"
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as e:
        return f"cannot connect to {host}:{port}: {e.strerror or e}"
    if assoc.is_aborted:
        return f"association with {host}:{port} aborted by the peer or timed out"
    return f"cannot connect to {host}:{port} (nothing listening, unreachable, or no DICOM answer)"


class Sender:
    """Sends one study: its series one after another, each on its own association."""

    def __init__(self, host: str, port: int, called_aet: str, calling_aet: str, timeouts: dict, on_sent=None):
        self.host, self.port, self.called, self.calling = host, port, called_aet, calling_aet
        self.timeouts = timeouts
        self.records: list[SendRecord] = []
        self.series_runs: list[SeriesRun] = []
        self.fatal: str = ""
        self.rescued = 0  # C-STORE responses saved from pynetdicom's reactor race (see _guard_reactor)
        self.on_sent = on_sent or (lambda rec: None)
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def send_study(self, study: StudyPlan) -> None:
        for sp in study.series:
            if self._stop.is_set():
                return
            if sp.gap_before_s > 0:
                self._stop.wait(sp.gap_before_s)
            self.send_series(sp)
            if self.fatal:
                return

    def _associate(self, ae, sp: SeriesPlan, run: SeriesRun):
        assoc = ae.associate(self.host, self.port, contexts=_contexts(sp), ae_title=self.called)
        run.associations += 1
        if not assoc.is_established and assoc.is_aborted and not assoc.is_rejected and not self._stop.is_set():
            # a peer that refuses and closes at once (DCMTK storescp) can have its connection close seen
            # before its A-ASSOCIATE-RJ: one more request, a moment later, tells a refusal from an abort
            self._stop.wait(0.2)
            assoc = ae.associate(self.host, self.port, contexts=_contexts(sp), ae_title=self.called)
            run.associations += 1
        if not assoc.is_established:
            return None, _assoc_failure(assoc, self.host, self.port, self.called)
        self._guard_reactor(assoc)
        return assoc, ""

    def _guard_reactor(self, assoc) -> None:
        """Work around a pynetdicom 3.0 race: the association's reactor can pass its pause checkpoint just
        as ``send_c_store`` starts, take the C-STORE *response* off the DIMSE queue, log "Received
        unexpected C-STORE service message" and drop it; the sender then waits out the DIMSE timeout (seen
        about once per 1,000 back-to-back sends on 2 cores). A response the reactor takes goes back on
        the queue for the waiting sender instead."""
        serve = getattr(assoc, "_serve_request", None)
        dimse_queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
        if serve is None or dimse_queue is None:  # another pynetdicom: leave it alone
            return

        def guarded(msg, context_id, _serve=serve, _q=dimse_queue):
            if msg is not None and not getattr(msg, "is_valid_request", True):
                self.rescued += 1
                _q.put((context_id, msg))
                return
            _serve(msg, context_id)

        assoc._serve_request = guarded

    def send_series(self, sp: SeriesPlan) -> SeriesRun:
        from pydicom import dcmread

        run = SeriesRun(sp.study_uid, sp.series_uid, len(sp.instances))
        self.series_runs.append(run)
        ae = _make_ae(self.calling, self.timeouts, self.timeouts.get("poll", 0.0005))
        assoc, err = self._associate(ae, sp, run)
        if assoc is None:
            run.errors.append(err)
            self.fatal = err  # the peer refuses us: the next series would fare no better
            now = time.time()
            for inst in sp.instances:
                self._record(SendRecord(sp.study_uid, sp.series_uid, inst.sop_instance_uid, inst.instance_number, now, now, now, 0.0, None, False, err), inst.path)
            return run
        reassociations = 0
        msg_id = 0
        t0 = time.time()
        run.started_at = t0
        try:
            for k, inst in enumerate(sp.instances):
                if self._stop.is_set():
                    break
                due = t0 + sp.offsets[k]
                delay = due - time.time()
                if delay > 0:
                    self._stop.wait(delay)
                for attempt in (0, 1):
                    msg_id = (msg_id % 65535) + 1
                    rec = self._send_one(assoc, sp, inst, due, dcmread, msg_id)
                    if rec.ok or assoc.is_established or attempt == 1 or reassociations >= 3:
                        break
                    # the association died under us (peer abort, DIMSE timeout): one fresh association, one retry
                    log.warning("series %s: %s; opening a new association and retrying", sp.series_uid, rec.error)
                    run.errors.append(rec.error)
                    reassociations += 1
                    assoc, err = self._associate(ae, sp, run)
                    if assoc is None:
                        run.errors.append(err)
                        break
                self._record(rec, inst.path)
                if run.first_sent_at is None:
                    run.first_sent_at = rec.sent_at
                run.last_acked_at = rec.acked_at
                if assoc is None:
                    now = time.time()
                    for rest in sp.instances[k + 1:]:
                        self._record(SendRecord(sp.study_uid, sp.series_uid, rest.sop_instance_uid, rest.instance_number, now, now, now, 0.0, None, False, "not sent: association lost"), rest.path)
                    break
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()
        return run

    def _send_one(self, assoc, sp: SeriesPlan, inst: Instance, due: float, dcmread, msg_id: int = 1) -> SendRecord:
        raw = True
        try:
            accepted = [c for c in assoc.accepted_contexts if c.abstract_syntax == inst.sop_class_uid]
            if not accepted:
                t = time.time()
                return SendRecord(sp.study_uid, sp.series_uid, inst.sop_instance_uid, inst.instance_number, due, t, t, 0.0, None, False,
                                  f"peer accepted no presentation context for SOP class {inst.sop_class_uid}", raw)
            if inst.transfer_syntax and any(c.transfer_syntax[0] == inst.transfer_syntax for c in accepted):
                payload = Path(inst.path)  # chunked send of the file's own bytes
            else:
                raw = False
                payload = dcmread(inst.path, force=True)
                if not inst.transfer_syntax:  # no file meta: state what the bytes are
                    from pydicom.dataset import FileMetaDataset
                    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

                    payload.file_meta = getattr(payload, "file_meta", None) or FileMetaDataset()
                    payload.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if payload.original_encoding[0] else ExplicitVRLittleEndian
                elif inst.transfer_syntax not in _UNCOMPRESSED:  # compressed; the peer takes uncompressed only
                    try:
                        payload.decompress(generate_instance_uid=False)  # the same instance, not a new one
                    except Exception as e:  # noqa: BLE001 - no decoder for this syntax here
                        t = time.time()
                        return SendRecord(sp.study_uid, sp.series_uid, inst.sop_instance_uid, inst.instance_number, due, t, t, 0.0,
                                          None, False, f"the peer accepts no {_ts_name(inst.transfer_syntax)} data and it could not be "
                                          f"decompressed here: {type(e).__name__}: {e}", raw)
            t_send = time.time()
            p0 = time.perf_counter()
            status = assoc.send_c_store(payload, msg_id=msg_id)
            rtt = (time.perf_counter() - p0) * 1e3
            t_ack = time.time()
        except Exception as e:  # encoding failure, socket error, pynetdicom state error
            t = time.time()
            return SendRecord(sp.study_uid, sp.series_uid, inst.sop_instance_uid, inst.instance_number, due, t, t, 0.0, None, False,
                              f"{type(e).__name__}: {e}", raw)
        code = int(status.Status) if status is not None and "Status" in status else None
        if code is None:
            err = (f"no C-STORE response within {self.timeouts['dimse']:g} s (association aborted)"
                   if not assoc.is_established else "invalid or missing C-STORE response")
            return SendRecord(sp.study_uid, sp.series_uid, inst.sop_instance_uid, inst.instance_number, due, t_send, t_ack, rtt, None, False, err, raw)
        ok = code == 0x0000 or (code & 0xF000) == 0xB000  # success or warning
        err = "" if ok else status_text(code, status)
        return SendRecord(sp.study_uid, sp.series_uid, inst.sop_instance_uid, inst.instance_number, due, t_send, t_ack, rtt, code, ok, err, raw)

    def _record(self, rec: SendRecord, path=None) -> None:
        if path is not None:
            rec.path = str(path)
        self.records.append(rec)
        self.on_sent(rec)


# --------------------------------------------------------------------------------------------- agent API
class AgentWatcher:
    """Follows the agent's HTTP API: the SSE stream (findings, verdicts) and per-series reports."""

    def __init__(self, url: str, token: str = "", timeout: float = 5.0):
        from urllib.parse import urlsplit

        u = urlsplit(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"--agent-url {url!r} must look like http://HOST:PORT")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port or (443 if u.scheme == "https" else 80)
        self.base = u.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.events: list[tuple[float, str, dict]] = []  # (local time, event name, data)
        self._lock = threading.Lock()
        self._conn = None
        self._thread = None
        self.stream_error = ""

    def _connection(self, timeout):
        import http.client

        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _headers(self, accept="application/json"):
        h = {"Accept": accept}
        if self.token:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def get_json(self, path: str):
        conn = self._connection(self.timeout)
        try:
            conn.request("GET", self.base + path, headers=self._headers())
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise OSError(f"GET {path}: HTTP {resp.status}")
            return json.loads(body)
        finally:
            conn.close()

    def check(self) -> None:
        """Fail early (with a clear message) when the agent's API does not answer."""
        try:
            self.get_json("/api/series?limit=1")
        except (OSError, ValueError) as e:
            raise OSError(f"the agent's HTTP API at {self.scheme}://{self.host}:{self.port}{self.base} does not answer: {e}") from None

    def start_stream(self) -> None:
        ready = threading.Event()

        def loop():
            try:
                conn = self._connection(None)
                self._conn = conn
                conn.request("GET", self.base + "/api/findings/stream", headers=self._headers("text/event-stream"))
                resp = conn.getresponse()
                if resp.status != 200:
                    self.stream_error = f"/api/findings/stream: HTTP {resp.status}"
                    return
                ready.set()
                name, data = "message", []
                while True:
                    line = resp.fp.readline()
                    if not line:
                        return
                    line = line.decode("utf-8", "replace").rstrip("\r\n")
                    if not line:
                        if data:
                            try:
                                payload = json.loads("\n".join(data))
                            except ValueError:
                                payload = {"text": "\n".join(data)}
                            with self._lock:
                                self.events.append((time.time(), name, payload if isinstance(payload, dict) else {"value": payload}))
                        name, data = "message", []
                    elif line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip())
            except Exception as e:  # closed by stop() or the agent went away
                if not self.stream_error and self._thread is not None and not getattr(self, "_stopping", False):
                    self.stream_error = f"{type(e).__name__}: {e}"
            finally:
                ready.set()

        self._thread = threading.Thread(target=loop, name="medqc-replay-sse", daemon=True)
        self._thread.start()
        ready.wait(self.timeout)

    def stop(self) -> None:
        self._stopping = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def snapshot(self) -> list[tuple[float, str, dict]]:
        with self._lock:
            return list(self.events)

    def wait_verdicts(self, series_uids: list[str], deadline: float, poll_s: float = 0.02) -> dict[str, tuple[float, dict]]:
        """Poll /api/series/{uid} until each series has a verdict (or the deadline). → {uid: (seen_at, report)}."""
        pending = set(series_uids)
        seen: dict[str, tuple[float, dict]] = {}
        unknown: set[str] = set()
        last_progress = time.time()
        while pending and time.time() < deadline:
            # series the agent has no record of (every instance rejected: localizers, secondary captures)
            # never get a verdict: stop waiting for them once the others are done and nothing moved for 5 s
            if pending <= unknown and time.time() - last_progress > 5.0:
                break
            for uid in list(pending):
                # a verdict event on the stream counts as soon as it arrived
                ev = _stream_verdict(self.snapshot(), uid)
                try:
                    rep = self.get_json(f"/api/series/{uid}")
                except (OSError, ValueError):
                    rep = None
                if rep is not None and isinstance(rep, dict) and "series" in rep and isinstance(rep["series"], list):
                    rep = next((s for s in rep["series"] if s.get("series_instance_uid") == uid), None)
                if rep is None:
                    unknown.add(uid)
                else:
                    unknown.discard(uid)
                if rep and rep.get("verdict"):
                    t = time.time()
                    seen[uid] = (min(t, ev) if ev else t, rep)
                    pending.discard(uid)
                    last_progress = t
            if pending:
                time.sleep(poll_s)
        for uid in pending:  # no verdict in time: keep what the agent has
            try:
                rep = self.get_json(f"/api/series/{uid}")
            except (OSError, ValueError):
                rep = None
            if rep:
                seen[uid] = (float("nan"), rep)
        self.unknown = sorted(u for u in pending if u not in seen)
        return seen


def _event_series(data: dict) -> str:
    for key in ("series_instance_uid", "series_uid", "uid"):
        if isinstance(data.get(key), str):
            return data[key]
    for sub in ("finding", "series", "state"):
        if isinstance(data.get(sub), dict):
            s = _event_series(data[sub])
            if s:
                return s
    return ""


def _stream_verdict(events, uid: str) -> float | None:
    for t, name, data in events:
        if _event_series(data) != uid:
            continue
        d = data.get("series") if isinstance(data.get("series"), dict) else data
        if name in ("series", "verdict") or (d.get("verdict") and "check" not in d):
            return t
    return None


def _stream_first_finding(events, uid: str) -> tuple[float, dict] | None:
    for t, name, data in events:
        d = data.get("finding") if isinstance(data.get("finding"), dict) else data
        if "check" in d and _event_series(data) == uid:
            return t, d
    return None


# --------------------------------------------------------------------------------------------- statistics
def percentiles(values, qs=(50, 90, 95, 99)) -> dict:
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return {"n": 0}
    out = {"n": len(vals)}
    for q in qs:
        # linear interpolation between closest ranks (numpy's default)
        pos = (len(vals) - 1) * q / 100.0
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(vals) - 1)
        out[f"p{q}"] = round(vals[lo] + (vals[hi] - vals[lo]) * (pos - lo), 3)
    out["max"] = round(vals[-1], 3)
    out["mean"] = round(sum(vals) / len(vals), 3)
    return out


def agent_figures(records: list[SendRecord], runs: list[SeriesRun], events, verdicts: dict) -> dict:
    """Latencies from the agent's API: per-slice received→analysed, first flag, last slice → verdict."""
    slice_ms, slice_send_ms, missing_ts = [], [], 0
    sent_at = {r.sop_instance_uid: r for r in records if r.ok}
    first_flag, verdict_s, series_out = [], [], []
    for run in runs:
        seen = verdicts.get(run.series_uid)
        rep = seen[1] if seen else None
        per_slice = (rep or {}).get("per_slice") or []
        n_analysed = 0
        for ps in per_slice:
            ra, aa = ps.get("received_at"), ps.get("analysed_at")
            if isinstance(ra, (int, float)) and isinstance(aa, (int, float)) and ra > 0 and aa > 0:
                slice_ms.append((aa - ra) * 1e3)
                n_analysed += 1
                rec = sent_at.get(ps.get("sop_instance_uid", ""))
                if rec is not None:  # same clock only when the agent runs on this host
                    slice_send_ms.append((aa - rec.sent_at) * 1e3)
            else:
                missing_ts += 1
        ff = _stream_first_finding(events, run.series_uid)
        ttff = None
        if ff is not None and run.first_sent_at:
            ttff = ff[0] - run.first_sent_at
            first_flag.append(ttff)
        elif rep and rep.get("findings") and run.first_sent_at:
            raised = [f.get("raised_at") for f in rep["findings"] if isinstance(f.get("raised_at"), (int, float)) and f.get("raised_at") > 0]
            if raised:
                ttff = min(raised) - run.first_sent_at
                first_flag.append(ttff)
        vs = None
        if seen and not math.isnan(seen[0]) and run.last_acked_at:
            vs = seen[0] - run.last_acked_at
            verdict_s.append(vs)
        series_out.append({
            "series_instance_uid": run.series_uid,
            "verdict": (rep or {}).get("verdict"),
            "slices_reported": len(per_slice),
            "slices_timed": n_analysed,
            "findings": [f.get("check") for f in (rep or {}).get("findings", [])],
            "time_to_first_flag_s": None if ttff is None else round(ttff, 4),
            "last_slice_to_verdict_s": None if vs is None else round(vs, 4),
        })
    out = {
        "slice_to_result_ms": percentiles(slice_ms),
        "send_to_result_ms": percentiles(slice_send_ms),
        "time_to_first_flag_s": percentiles(first_flag),
        "last_slice_to_verdict_s": percentiles(verdict_s),
        "series": series_out,
        "stream_events": len(events),
    }
    if missing_ts:
        out["note"] = f"{missing_ts} per-slice entries carry no received_at/analysed_at timestamps"
    return out


def summarize(records: list[SendRecord], runs: list[SeriesRun], skipped: list[dict], wall_s: float, mode: dict) -> dict:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    lag = [max(0.0, r.sent_at - r.scheduled_at) * 1e3 for r in ok]
    series = []
    for run in runs:
        rs = [r for r in records if r.series_uid == run.series_uid and r.ok]
        span = (rs[-1].acked_at - rs[0].sent_at) if len(rs) > 1 else 0.0
        series.append({
            "study_instance_uid": run.study_uid,
            "series_instance_uid": run.series_uid,
            "planned": run.n_planned,
            "sent": len(rs),
            "failed": sum(1 for r in records if r.series_uid == run.series_uid and not r.ok),
            "associations": run.associations,
            "duration_s": round(span, 4),
            "rate_slices_per_s": round((len(rs) - 1) / span, 2) if span > 0 else None,
            "errors": run.errors[:5],
        })
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    recovered: dict[str, int] = {}
    for run in runs:
        for e in run.errors:
            if e not in errors:
                recovered[e] = recovered.get(e, 0) + 1
    first = min((r.sent_at for r in ok), default=0.0)
    last = max((r.acked_at for r in ok), default=0.0)
    return {
        "pacing": mode,
        "files_skipped": len(skipped),
        "skipped": skipped[:200],
        "instances_planned": len(records),
        "sent": len(ok),
        "failed": len(failed),
        "raw_sends": sum(1 for r in ok if r.raw),
        "errors": errors,
        "failures": [{"file": r.path, "sop_instance_uid": r.sop_instance_uid, "instance_number": r.instance_number, "error": r.error,
                      **({} if valid_uid(r.sop_instance_uid) and valid_uid(r.series_uid) and valid_uid(r.study_uid) else
                         {"note": "its UIDs are not valid DICOM UIDs (digits and dots, at most 64 characters): strict peers refuse such files"})}
                     for r in failed[:50]],
        "recovered": recovered,
        "wall_s": round(wall_s, 4),
        "throughput_slices_per_s": round(len(ok) / (last - first), 2) if len(ok) > 1 and last > first else None,
        "c_store_rtt_ms": percentiles([r.rtt_ms for r in ok]),
        "schedule_lag_ms": percentiles(lag),
        "series": series,
    }


def print_summary(result: dict, out=sys.stdout) -> None:
    t = result["transport"]
    w = out.write
    w(f"medqc replay → {result['to']} (called AE {result['called_aet']}, {t['pacing']['mode']}"
      f"{', %g slices/s per association' % t['pacing']['rate'] if t['pacing']['mode'] == 'rate' else ''})\n")
    w(f"  sent {t['sent']} of {t['instances_planned']} instances in {len(t['series'])} series, "
      f"{t['failed']} failed, {t['files_skipped']} file(s) skipped; wall {t['wall_s']:.2f} s"
      f"{'; %.1f slices/s' % t['throughput_slices_per_s'] if t['throughput_slices_per_s'] else ''}\n")

    def row(name, p, unit):
        if not p or not p.get("n"):
            w(f"  {name:<28} n/a\n")
            return
        w(f"  {name:<28} p50 {p['p50']:>9.2f}  p90 {p['p90']:>9.2f}  p99 {p['p99']:>9.2f}  max {p['max']:>9.2f} {unit}  (n={p['n']})\n")

    row("C-STORE round trip", t["c_store_rtt_ms"], "ms")
    if t["pacing"]["mode"] != "asap":
        row("late against schedule", t["schedule_lag_ms"], "ms")
    a = result.get("agent")
    if a:
        row("slice arrival → result", a["slice_to_result_ms"], "ms")
        row("send → result", a["send_to_result_ms"], "ms")
        row("time to first flag", a["time_to_first_flag_s"], "s")
        row("last slice → verdict", a["last_slice_to_verdict_s"], "s")
        if a.get("note"):
            w(f"  note: {a['note']}\n")
        if a.get("error"):
            w(f"  agent: {a['error']}\n")
    for msg, n in sorted(t["errors"].items(), key=lambda kv: -kv[1]):
        w(f"  FAILED x{n}: {msg}\n")
        files = [f for f in t.get("failures", []) if f["error"] == msg and f["file"]]
        for f in files[:3]:
            w(f"    {f['file']}" + (f" — {f['note']}" if f.get("note") else "") + "\n")
        if len(files) > 3:
            w(f"    … and {n - 3} more (all in the JSON report)\n")
    for msg, n in sorted(t.get("recovered", {}).items(), key=lambda kv: -kv[1]):
        w(f"  recovered x{n} (new association, C-STORE resent): {msg}\n")
    if result.get("responses_rescued"):
        w(f"  note: {result['responses_rescued']} C-STORE response(s) taken by pynetdicom's reactor were handed back to the sender\n")
    for s in t["skipped"][:10]:
        w(f"  skipped {s['path']}: {s['reason']}\n")
    if t["files_skipped"] > 10:
        w(f"  ... and {t['files_skipped'] - 10} more skipped file(s) (see --json)\n")
    out.flush()


def write_plot(result: dict, records: list[SendRecord], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rtt = sorted(r.rtt_ms for r in records if r.ok)
    if rtt:
        ax1.plot(rtt, [(i + 1) / len(rtt) for i in range(len(rtt))], label="C-STORE round trip")
    lat = result.get("agent", {}).get("_slice_ms") or []
    if lat:
        lat = sorted(lat)
        ax1.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label="slice arrival → result")
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("fraction ≤ x")
    ax1.set_title("latency CDF")
    ax1.grid(True, alpha=0.3)
    ax1.legend(loc="lower right")
    t0 = min((r.sent_at for r in records), default=0.0)
    series_ids = list(dict.fromkeys(r.series_uid for r in records))
    for k, uid in enumerate(series_ids):
        rs = [r for r in records if r.series_uid == uid]
        ax2.scatter([r.sent_at - t0 for r in rs if r.ok], [k] * sum(r.ok for r in rs), s=4, marker="|", color="tab:blue")
        bad = [r.sent_at - t0 for r in rs if not r.ok]
        if bad:
            ax2.scatter(bad, [k] * len(bad), s=12, marker="x", color="red")
    for s in result.get("agent", {}).get("series", []):
        if s.get("last_slice_to_verdict_s") is not None and s["series_instance_uid"] in series_ids:
            k = series_ids.index(s["series_instance_uid"])
            last = max(r.acked_at for r in records if r.series_uid == s["series_instance_uid"])
            ax2.scatter([last - t0 + s["last_slice_to_verdict_s"]], [k], marker="D", color="black", s=20)
    ax2.set_yticks(range(len(series_ids)))
    ax2.set_yticklabels([f"series {i + 1}" for i in range(len(series_ids))])
    ax2.set_xlabel("seconds since the first send")
    ax2.set_title("timeline (| sent, x failed, ◆ verdict)")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress(items, desc: str, unit: str, enabled: bool):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------------------------- driver
def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--to {text!r} must be HOST:PORT, for example 127.0.0.1:11112")
    return host.strip("[]"), int(port)


def replay(
    paths: list[str | Path],
    host: str,
    port: int,
    called_aet: str = "MEDQC",
    calling_aet: str = "MEDQC_REPLAY",
    mode: str = "rate",
    rate: float = DEFAULT_RATE,
    associations: int | None = None,
    agent_url: str = "",
    agent_token: str = "",
    agent_wait_s: float = 30.0,
    dimse_timeout: float = 10.0,
    max_gap_s: float = 5.0,
    progress: bool = False,
) -> tuple[dict, list[SendRecord]]:
    """Replay ``paths`` to ``host:port``. Returns (result dict in schema ``medqc.replay/1``, send records)."""
    from pynetdicom import _config

    if mode not in ("rate", "asap", "recorded"):
        raise UsageError(f"pacing {mode!r}: choose one of rate, asap, recorded")
    if mode == "rate" and not (rate > 0):
        raise UsageError(f"--rate must be > 0 slices/s, got {rate}")
    for aet, what in ((called_aet, "--called-aet"), (calling_aet, "--calling-aet")):
        if not (1 <= len(aet) <= 16) or aet != aet.strip() or "\\" in aet:
            raise UsageError(f"{what} {aet!r} must be 1-16 characters without surrounding spaces or backslashes")
    _config.STORE_SEND_CHUNKED_DATASET = True  # file bytes go out as they are (a Dataset is still encoded)

    instances, skipped = scan(paths, progress)
    studies = plan(instances, mode, rate, max_gap_s)
    n_assoc = associations or max(1, min(len(studies), 8))
    watcher = None
    agent_error = ""
    if agent_url:
        watcher = AgentWatcher(agent_url, agent_token)
        watcher.check()
        watcher.start_stream()
        if watcher.stream_error:
            agent_error = watcher.stream_error
    timeouts = {"acse": 10.0, "dimse": float(dimse_timeout), "network": 30.0, "connect": 5.0,
                "poll": 0.0002 if mode == "asap" else 0.0005}
    total = sum(len(sp.instances) for st in studies for sp in st.series)
    bar = None
    if progress and total:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="C-STORE", unit="slice", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    lock = threading.Lock()

    def on_sent(rec):
        if bar is not None:
            with lock:
                bar.update(1)

    senders = [Sender(host, port, called_aet, calling_aet, timeouts, on_sent) for _ in studies]
    queue_ = list(zip(senders, studies))
    qlock = threading.Lock()

    def worker():
        while True:
            with qlock:
                if not queue_:
                    return
                sender, study = queue_.pop(0)
            try:
                sender.send_study(study)
            except Exception as e:  # a bug or an unexpected pynetdicom error: keep the other studies going
                log.exception("sending study %s failed", study.study_uid)
                sender.fatal = f"{type(e).__name__}: {e}"

    t_start = time.time()
    threads = [threading.Thread(target=worker, name=f"medqc-replay-{i}", daemon=True) for i in range(min(n_assoc, len(studies)))]
    for th in threads:
        th.start()
    try:
        for th in threads:
            while th.is_alive():
                th.join(0.2)
    except KeyboardInterrupt:
        for s in senders:
            s.stop()
        for th in threads:
            th.join(timeouts["dimse"] + 2)
    wall = time.time() - t_start
    if bar is not None:
        bar.close()
    records = [r for s in senders for r in s.records]
    runs = [r for s in senders for r in s.series_runs]
    mode_d = {"mode": mode, "rate": rate if mode == "rate" else None, "associations": n_assoc, "max_gap_s": max_gap_s if mode == "recorded" else None}
    result = {
        "schema": SCHEMA,
        "to": f"{host}:{port}",
        "called_aet": called_aet,
        "calling_aet": calling_aet,
        "inputs": [str(p) for p in paths],
        "started_at": t_start,
        "studies": len(studies),
        "transport": summarize(records, runs, skipped, wall, mode_d),
        "fatal": sorted({s.fatal for s in senders if s.fatal}),
        "responses_rescued": sum(s.rescued for s in senders),
    }
    if watcher is not None:
        uids = [r.series_uid for r in runs if any(x.ok for x in records if x.series_uid == r.series_uid)]
        verdicts = watcher.wait_verdicts(uids, time.time() + agent_wait_s)
        time.sleep(0.05)  # let the last stream events land
        events = watcher.snapshot()
        watcher.stop()
        fig = agent_figures(records, runs, events, verdicts)
        missing = [u for u in uids if u in verdicts and math.isnan(verdicts[u][0])]
        ignored = getattr(watcher, "unknown", [])
        if ignored:  # not an error: the agent rejected every instance of these (the reason is in its log/API)
            fig["series_not_analysed"] = ignored
            fig["note"] = (fig.get("note", "") + "; " if fig.get("note") else "") + \
                f"{len(ignored)} series unknown to the agent (all instances rejected, e.g. localizers or secondary captures)"
        if missing:
            agent_error = (agent_error + "; " if agent_error else "") + f"{len(missing)} series without a verdict within {agent_wait_s:g} s"
        if agent_error:
            fig["error"] = agent_error
        # raw latencies for the plot (not written to JSON)
        fig["_slice_ms"] = []
        for uid, (_, rep) in verdicts.items():
            for ps in (rep or {}).get("per_slice") or []:
                ra, aa = ps.get("received_at"), ps.get("analysed_at")
                if isinstance(ra, (int, float)) and isinstance(aa, (int, float)) and ra > 0 and aa > 0:
                    fig["_slice_ms"].append((aa - ra) * 1e3)
        result["agent"] = fig
    return result, records


def exit_code(result: dict, ignore_non_dicom: bool = False) -> int:
    t = result["transport"]
    bad = t["failed"] > 0 or bool(result.get("fatal")) or (t["files_skipped"] > 0 and not ignore_non_dicom) or t["sent"] == 0
    if result.get("agent", {}).get("error"):
        bad = True
    return 1 if bad else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", nargs="+", metavar="STUDY_DIR", help="folders (searched recursively) or files of recorded studies")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the storage SCP to send to (medqc agent, storescp, Orthanc, ...)")
    p.add_argument("--called-aet", default="MEDQC", help="called AE title (default: MEDQC)")
    p.add_argument("--calling-aet", default="MEDQC_REPLAY", help="our AE title (default: MEDQC_REPLAY)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, metavar="SLICES_PER_S", help=f"send each series at this rate (per association; default {DEFAULT_RATE:g})")
    pace.add_argument("--asap", action="store_true", help="send as fast as the peer acknowledges")
    pace.add_argument("--as-recorded", action="store_true", help="reproduce the gaps of the recorded ContentTime/AcquisitionTime (each gap capped by --max-gap)")
    p.add_argument("--max-gap", type=float, default=5.0, metavar="S", help="longest pause --as-recorded reproduces (default 5 s)")
    p.add_argument("--associations", type=int, metavar="N", help="studies sent at once, one association each (default: all studies, at most 8)")
    p.add_argument("--agent-url", default="", metavar="URL", help="the medqc agent's HTTP API (e.g. http://127.0.0.1:8480) for latency figures")
    p.add_argument("--agent-token", default=os.environ.get("MEDQC_HTTP_TOKEN", ""), help="bearer token for the agent's API (default: $MEDQC_HTTP_TOKEN)")
    p.add_argument("--agent-wait", type=float, default=30.0, metavar="S", help="how long to wait for series verdicts after the last slice (default 30 s)")
    p.add_argument("--dimse-timeout", type=float, default=10.0, metavar="S", help="give up on a C-STORE response after this long (default 10 s)")
    p.add_argument("--ignore-non-dicom", action="store_true", help="files that are not DICOM instances do not make the exit status non-zero")
    p.add_argument("--json", metavar="OUT", help="write the full result (schema medqc.replay/1)")
    p.add_argument("--plot", metavar="OUT.png", help="write a latency CDF and a send timeline")


def run(args) -> int:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one INFO line per C-STORE otherwise
    host, port = parse_target(args.to)
    mode = "asap" if args.asap else "recorded" if args.as_recorded else "rate"
    rate = args.rate if args.rate is not None else DEFAULT_RATE
    if args.associations is not None and args.associations < 1:
        raise UsageError("--associations must be at least 1")
    if args.dimse_timeout <= 0 or args.max_gap < 0 or args.agent_wait < 0:
        raise UsageError("--dimse-timeout must be > 0; --max-gap and --agent-wait must be >= 0")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot!r}: the plot is a PNG; name it OUT.png")
    try:
        result, records = replay(
            args.studies, host, port, args.called_aet, args.calling_aet, mode, rate, args.associations,
            args.agent_url, args.agent_token, args.agent_wait, args.dimse_timeout, args.max_gap, progress=True,
        )
    except OSError as e:  # the agent API does not answer
        print(f"medqc replay: {e}", file=sys.stderr)
        return 1
    print_summary(result)
    if args.plot:
        write_plot(result, records, Path(args.plot))
    if result.get("agent"):
        result["agent"].pop("_slice_ms", None)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = dict(result)
        doc["sends"] = [asdict(r) for r in records]
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return exit_code(result, args.ignore_non_dicom)
