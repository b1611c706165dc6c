"""Sending: one study per sender, its series one after another, each over its own association (as a scanner
sends a reconstruction), every C-STORE round trip timed.

Files travel as they are on disk (pynetdicom's chunked send: no decode, no re-encode) whenever the peer
accepts the file's own transfer syntax; otherwise the dataset is decoded and re-encoded in the transfer
syntax the peer accepted — a compressed file (JPEG, JPEG-LS, JPEG 2000, RLE: archives often hold them) is
decompressed, keeping its SOP Instance UID, for a peer that takes uncompressed data only, as DCMTK's
storescp does by default. The sender sets TCP_NODELAY on its socket: without it every C-STORE waits for a
delayed ACK (about 20 slices/s on loopback)."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from medqc.errors import UsageError
from medqc.tools.replay.plan import Instance, SeriesPlan, StudyPlan

log = logging.getLogger("medqc.replay")

_UNCOMPRESSED = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still seen)
)


def _ts_name(uid: str) -> str:
    """A transfer syntax's name (its UID when pydicom does not know it)."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


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
            # event-driven waits, agent/ingest/dulwait.py, are not used here: with them DCMTK's refuse-and-close
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
