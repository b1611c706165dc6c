"""The DICOM receiver: a pynetdicom SCP answering C-ECHO, C-STORE (every storage SOP class, every common
transfer syntax) and MPPS N-CREATE/N-SET.

C-STORE writes ``event.encoded_dataset()`` raw to the spool (fsync + atomic rename) and only then answers
success; it never waits for inference. Below the spool's free-space watermark it answers 0xA700 ("out of
resources") so the scanner keeps the image and retries. Tuning (ARCHITECTURE.md numbers): TCP_NODELAY on
each accepted socket, a 128 KiB maximum PDU, a connection dropped when its A-ASSOCIATE-RQ has not arrived
whole within ``ASSOCIATE_RQ_TIMEOUT_S``, and pynetdicom's two polling loops turned into waits that end
when there is work (``dulwait``: a C-STORE response leaves at once, and an idle association costs no CPU;
where that cannot be attached, a 0.1 ms DUL poll instead of 1 ms).

Access control hooks in through ``access``: an object with ``handlers() -> [(event, handler)]`` and/or
``allow(event) -> (bool, reason)``/``ssl_context()``; or append to ``Receiver.extra_handlers``.
"""

from __future__ import annotations

import logging
import socket
import time

from medqc.agent import dulwait, faults

log = logging.getLogger("medqc.agent.receiver")

DUL_LOOP_DELAY = 1e-4
# From the connection to the A-ASSOCIATE-RQ's last byte: a scanner sends its request at once, so a connection
# that sends nothing, or stops inside its request, is dropped after this (otherwise it would hold one of
# dicom.max_associations for pynetdicom's 60 s network timeout). Once accepted: that 60 s again.
ASSOCIATE_RQ_TIMEOUT_S = 10.0
MPPS_CLASS = "1.2.840.10008.3.1.2.3.3"


class Receiver:
    def __init__(self, cfg, spool, on_stored, on_mpps=None, metrics=None, access=None, ae_title: str | None = None,
                 port: int | None = None, bind: str | None = None):
        self.cfg = cfg
        self.spool = spool
        self.on_stored = on_stored  # callable(path, received_at)
        self.on_mpps = on_mpps  # callable(series_uids) on N-SET COMPLETED
        self.metrics = metrics
        self.access = access
        self.ae_title = ae_title or cfg.dicom.ae_title
        self.port = cfg.dicom.port if port is None else port
        self.bind = bind or cfg.dicom.bind
        self.extra_handlers: list = []
        self.server = None
        self.mpps = None

    def _metric(self, kind, name, value=1.0, **labels):
        if self.metrics is not None:
            try:
                getattr(self.metrics, kind)(name, value, **labels)
            except Exception:  # noqa: BLE001
                pass

    # ---------------------------------------------------------------------------------------- handlers
    def _on_open(self, event) -> None:
        try:
            dul = event.assoc.dul
            dul._run_loop_delay = DUL_LOOP_DELAY  # noqa: SLF001 - documented tuning knob, see module doc
            sock = dul.socket.socket if dul.socket is not None else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(ASSOCIATE_RQ_TIMEOUT_S)  # until accepted (_on_accepted)
            event.assoc.acse_timeout = ASSOCIATE_RQ_TIMEOUT_S  # the acceptor's wait for the request (and ARTIM)
        except Exception as e:  # noqa: BLE001 - tuning only
            log.debug("socket tuning failed: %s", e)
        try:
            if not dulwait.attach(event.assoc, DUL_LOOP_DELAY):
                log.debug("pynetdicom internals differ: its polling loops are left as they are")
        except Exception as e:  # noqa: BLE001 - tuning only
            log.debug("event-driven waits not attached: %s", e)

    def _on_accepted(self, event) -> None:
        try:
            event.assoc.acse_timeout = event.assoc.ae.acse_timeout
            sock = event.assoc.dul.socket.socket
            if sock is not None:
                sock.settimeout(event.assoc.network_timeout)
        except Exception as e:  # noqa: BLE001
            log.debug("restoring the network timeout failed: %s", e)

    def _on_close(self, event) -> None:
        dulwait.detach(event.assoc)

    def _on_echo(self, event) -> int:
        return 0x0000

    def _on_store(self, event) -> int:
        t0 = time.perf_counter()
        try:  # the association's C-STOREs come one at a time: from the second on, the previous one was answered
            n = getattr(event.assoc, "_medqc_stores", 0)
            event.assoc._medqc_stores = n + 1
        except AttributeError:
            n = 0
        if n:
            faults.reached("acked")
        try:
            sop_uid = str(event.request.AffectedSOPInstanceUID)
        except Exception:  # noqa: BLE001
            sop_uid = ""
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as e:  # noqa: BLE001
            log.error("C-STORE %s: cannot encode the received dataset: %s", sop_uid, e)
            return 0xC210
        from medqc.agent.spool import SpoolFull

        try:
            path = self.spool.put(data, sop_uid or f"instance-{time.time_ns()}")
        except SpoolFull as e:
            log.error("C-STORE %s refused: %s", sop_uid, e)
            self._metric("inc", "medqc_slices_rejected_total", reason="spool-full")
            self._metric("inc", "medqc_stores_refused_total", reason="spool-full")
            return 0xA700
        except OSError as e:
            log.error("C-STORE %s refused: spool write failed: %s", sop_uid, e)
            self._metric("inc", "medqc_stores_refused_total", reason="spool-write-error")
            return 0xA700
        faults.reached("spool-written")
        now = time.time()
        self._metric("inc", "medqc_slices_received_total", source="dicom")
        self._metric("observe", "medqc_stage_seconds", time.perf_counter() - t0, stage="spool")
        try:
            self.on_stored(path, now)
        except Exception:  # noqa: BLE001 - the instance is safe in the spool; resumed at the next start
            log.exception("queueing %s failed (kept in the spool)", sop_uid)
        return 0x0000

    # --------------------------------------------------------------------------------------- lifecycle
    def build_ae(self):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config
        from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

        _config.UNRESTRICTED_STORAGE_SERVICE = True  # any storage SOP class a scanner proposes is accepted
        _config.LOG_REQUEST_IDENTIFIERS = False  # no patient identifiers in logs
        _config.LOG_RESPONSE_IDENTIFIERS = False
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = int(self.cfg.dicom.max_pdu)
        ae.maximum_associations = int(self.cfg.dicom.max_associations)
        ae.require_called_aet = False
        ts = list(ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ts)
        ae.add_supported_context(Verification, ts)
        ae.add_supported_context(ModalityPerformedProcedureStep, ts)
        return ae

    def handlers(self) -> list:
        from pynetdicom import evt

        from medqc.agent.mpps import MppsService

        self.mpps = MppsService(self.on_mpps)
        hs = [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_CONN_CLOSE, self._on_close), (evt.EVT_ACCEPTED, self._on_accepted),
              (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_C_STORE, self._on_store),
              (evt.EVT_N_CREATE, self.mpps.on_n_create), (evt.EVT_N_SET, self.mpps.on_n_set)]
        if self.access is not None and hasattr(self.access, "handlers"):
            hs += list(self.access.handlers())
        return hs + list(self.extra_handlers)

    def start(self) -> "Receiver":
        ae = self.build_ae()
        kw = {}
        if self.access is not None and hasattr(self.access, "ssl_context"):
            ctx = self.access.ssl_context()
            if ctx is not None:
                kw["ssl_context"] = ctx
        self.server = ae.start_server((self.bind, self.port), block=False, evt_handlers=self.handlers(), **kw)
        self.port = self.server.server_address[1]
        log.info("DICOM receiver %s listening on %s:%d", self.ae_title, self.bind, self.port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
