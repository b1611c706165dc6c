"""Who may talk DICOM to the agent: a calling-AE allowlist, a source-IP allowlist (addresses or CIDR
networks), optional DICOM TLS; the association and PDU limits are set on the AE by the receiver
(``dicom.max_associations``, ``dicom.max_pdu``).

Rejected associations get an A-ASSOCIATE-RJ with the standard reason (calling AE title not recognised /
no reason given for an unknown address), a warning in the log naming the reason, the calling AE and the
peer address, and ``medqc_associations_rejected_total{reason}``.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl

log = logging.getLogger("medqc.agent.ingest.access")

# A-ASSOCIATE-RJ: result 1 = rejected-permanent; source 1 = service-user; diagnostic 3 = calling AE not
# recognised, 1 = no reason given
_RJ_PERMANENT, _RJ_USER, _RJ_CALLING_AE, _RJ_NO_REASON = 0x01, 0x01, 0x03, 0x01


from medqc.errors import UsageError
from medqc.agent.metrics import NULL


class AccessError(UsageError):
    """A configuration mistake in the access settings (exit 2 with this message)."""


def parse_networks(items) -> tuple:
    nets = []
    for s in items:
        try:
            nets.append(ipaddress.ip_network(s.strip(), strict=False))
        except ValueError:
            raise AccessError(f"dicom.allowed_ips: {s!r} is not an IP address or CIDR network (e.g. 10.1.2.0/24)") from None
    return tuple(nets)


class AccessPolicy:
    def __init__(self, allowed_aets=(), allowed_ips=(), tls=None, metrics=NULL):
        self.allowed_aets = frozenset(a.strip() for a in allowed_aets)
        self.networks = parse_networks(allowed_ips)
        self.tls = tls
        self.metrics = metrics

    # ------------------------------------------------------------------------------------- decisions
    def check(self, calling_aet: str, address: str) -> tuple[bool, str]:
        """(allowed, reason) for one association request."""
        if self.networks:
            try:
                ip = ipaddress.ip_address(address.split("%")[0])
                if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                    ip = ip.ipv4_mapped
            except ValueError:
                return False, "source-ip"
            if not any(ip in n for n in self.networks):
                return False, "source-ip"
        if self.allowed_aets and calling_aet.strip() not in self.allowed_aets:
            return False, "calling-aet"
        return True, ""

    @staticmethod
    def calling_aet(event) -> str:
        req = event.assoc.requestor
        prim = getattr(req, "primitive", None)  # at EVT_REQUESTED the A-ASSOCIATE-RQ is not applied yet
        aet = getattr(prim, "calling_ae_title", None) or req.ae_title or ""
        return (aet if isinstance(aet, str) else aet.decode(errors="replace")).strip()

    def allow(self, event) -> tuple[bool, str]:
        return self.check(self.calling_aet(event), str(event.assoc.requestor.address or ""))

    def _on_requested(self, event) -> None:
        ok, reason = self.allow(event)
        if ok:
            return
        req = event.assoc.requestor
        log.warning("association rejected (%s): calling AE %r from %s:%s", reason, self.calling_aet(event),
                    req.address, req.port)
        self._count(reason)
        diag = _RJ_CALLING_AE if reason == "calling-aet" else _RJ_NO_REASON
        event.assoc.acse.send_reject(_RJ_PERMANENT, _RJ_USER, diag)
        event.assoc.kill()  # as pynetdicom does after its own rejections: the DUL sends the A-ASSOCIATE-RJ, then stops

    def _count(self, reason: str) -> None:
        try:
            self.metrics.inc("medqc_associations_rejected_total", reason=reason)
        except Exception:  # noqa: BLE001 - counting never stops a rejection
            pass

    def _on_rejected(self, event) -> None:
        """Rejections pynetdicom makes itself (dicom.max_associations reached, ...)."""
        prim = getattr(event.assoc.acceptor, "primitive", None)
        rsd = (getattr(prim, "result", None), getattr(prim, "result_source", None), getattr(prim, "diagnostic", None))
        reason = "max-associations" if rsd == (0x02, 0x03, 0x02) else "protocol"
        req = event.assoc.requestor
        log.warning("association rejected (%s): calling AE %r from %s:%s", reason, self.calling_aet(event), req.address,
                    req.port)
        self._count(reason)

    def handlers(self) -> list:
        from pynetdicom import evt

        return [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_REJECTED, self._on_rejected)]

    # ------------------------------------------------------------------------------------------ TLS
    def ssl_context(self):
        t = self.tls
        if t is None or not t.enabled:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(t.cert, t.key)
            if t.ca:
                ctx.load_verify_locations(cafile=t.ca)
                ctx.verify_mode = ssl.CERT_REQUIRED  # scanners must present a certificate signed by this CA
            else:
                ctx.verify_mode = ssl.CERT_NONE
        except (OSError, ssl.SSLError) as e:
            raise AccessError(f"dicom.tls: cannot load certificate/key/CA ({t.cert}, {t.key}, {t.ca or '-'}): {e}") from None
        return ctx


def from_config(cfg, metrics=NULL) -> AccessPolicy:
    d = cfg.dicom
    policy = AccessPolicy(d.allowed_calling_aets, d.allowed_ips, d.tls, metrics)
    policy.ssl_context()  # fail at start, naming the file, rather than at the first TLS association
    return policy
