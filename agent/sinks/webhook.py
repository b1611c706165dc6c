"""Findings and verdicts POSTed as JSON to a webhook (``[sinks.webhook] url``).

One POST per event: ``{"event": "finding", "kind": ..., ...}`` (the public finding fields, UIDs only; kind
``raised``, ``escalated``, ``withdrawn`` or ``final``, as on stdout) or ``{"event": "series", ...}`` (verdict). Failures (connection errors, 5xx, 408, 429) are retried with
exponential backoff (``backoff_s`` · 2^(attempt-1), at most 60 s) up to ``retries`` times on this sink's own
thread, so the pipeline never waits; other 4xx are not retried. With ``secret`` set, every request
carries ``X-Medqc-Signature: sha256=<hex HMAC-SHA256 of the body>`` so the receiver can verify it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request

from medqc.agent.sinks.base import Sink, announced

log = logging.getLogger("medqc.agent.sinks.webhook")

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0


class WebhookError(RuntimeError):
    pass


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSink(Sink):
    name = "webhook"

    def __init__(self, url: str, secret: str = "", retries: int = 5, timeout_s: float = 5.0, backoff_s: float = 1.0,
                 sleep=time.sleep):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"sinks.webhook.url must start with http:// or https://, got {url!r}")
        self.url, self.secret, self.retries, self.timeout_s, self.backoff_s = url, secret, retries, timeout_s, backoff_s
        self._sleep = sleep
        self.sent = 0

    def post(self, payload: dict) -> int:
        """POST one event, retrying; the final HTTP status. Raises ``WebhookError`` when it gives up."""
        body = json.dumps(payload, default=str, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "medqc-agent"}
        if self.secret:
            headers["X-Medqc-Signature"] = signature(self.secret, body)
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(min(MAX_BACKOFF_S, self.backoff_s * 2 ** (attempt - 1)))
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                    r.read()
                    self.sent += 1
                    return r.status
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUS:
                    raise WebhookError(f"webhook refused the event ({last}); not retried") from None
            except (urllib.error.URLError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            log.warning("webhook attempt %d/%d failed (%s)", attempt + 1, self.retries + 1, last)
        raise WebhookError(f"webhook gave up after {self.retries + 1} attempts ({last})")

    def on_finding(self, finding) -> None:
        if not announced(finding):
            return
        from medqc.agent.web.http import finding_event

        self.post({"event": "finding", **finding_event(finding)})

    def on_series(self, series) -> None:  # a SeriesEvent
        counts: dict[str, int] = {}
        for f in series.findings.values():
            counts[f.severity] = counts.get(f.severity, 0) + 1
        self.post({"event": "series", "series_instance_uid": series.uid, "study_instance_uid": series.study_uid,
                   "verdict": series.verdict, "slices": len(series.results), "protocol_rule": series.protocol_rule,
                   "completed_reason": series.completed_reason, "findings": counts})


def from_config(cfg):
    w = cfg.sinks.webhook
    if not w.url:
        return None
    return WebhookSink(w.url, w.secret, w.retries, w.timeout_s, w.backoff_s)
