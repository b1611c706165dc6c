"""The agent's HTTP API (stdlib ``ThreadingHTTPServer``), bound to 127.0.0.1:8480 by default.

Routes (a small table; the console adds its own with ``console.register(routes, console)``):

- ``GET /healthz``               liveness + readiness (always open): 200 {"status": "ok", "backend": ...}; 503
                                 {"status": "starting"} before the receiver listens, 503 {"status": "refusing",
                                 "reason": ..., "reasons": {...}} while C-STOREs are refused (spool disk below
                                 its reserve, spool writes failing) — 200 again by itself once they are not
- ``GET /metrics``               Prometheus text format (bearer token when ``http.token`` is set)
- ``GET /api/series``            open and recent series, newest update first, as summaries
                                 (``medqc.series-list/1``: header facts, verdict, findings without details;
                                 no per-slice rows): ``?limit=N`` (default 100, at most 1000), ``&offset=K``
                                 (the response's ``next_offset``), ``&since=T`` (only series updated after T,
                                 seconds since the epoch; the response's ``now`` is the next call's T)
- ``GET /api/series/{uid}``      one ``medqc.report/1`` series, per-slice rows included
- ``GET /api/findings/stream``   server-sent events: ``finding`` events with their ``kind`` (raised,
                                 escalated, withdrawn, final: as on stdout), a ``series`` event per verdict,
                                 ``: keep-alive`` comments every 15 s

Findings reach the stream through a sink of their own (a bounded queue per client; a client that does not
read is dropped, never the pipeline). Nothing here carries patient identifiers: UIDs only.
"""

from __future__ import annotations

import hmac
import json
import logging
import queue
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from medqc.agent.sinks.base import Sink, announced

log = logging.getLogger("medqc.agent.web.http")

KEEPALIVE_S = 15.0
MAX_BODY = 1 << 20  # request bodies (an acknowledgement's JSON) above this are refused with 413, unread
# after refusing a body, what the connection still takes in and throws away before it closes, so that the client,
# still sending, reads the answer: a socket closed with unread data resets the connection, and the client
# sees a broken pipe instead of the 413
DISCARD_MAX_BYTES = 8 * MAX_BODY
DISCARD_S = 2.0
CLIENT_QUEUE = 256
FINDING_KEYS = ("kind", "finding_id", "check", "severity", "message", "series_instance_uid", "study_instance_uid",
                "first_instance", "last_instance", "z_range_mm", "score", "raised_at")


class Request:
    def __init__(self, method: str, path: str, query: dict, headers, body: bytes):
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body


def _json(status: int, obj) -> tuple:
    return status, {"Content-Type": "application/json", "Cache-Control": "no-cache"}, json.dumps(obj, default=str).encode()


def finding_event(finding) -> dict:
    """The public form of a finding (no free-form details: they never carry identifiers this way)."""
    d = finding.to_dict()
    return {k: d.get(k) for k in FINDING_KEYS}


class Broadcaster(Sink):
    """A pipeline sink that fans findings and verdicts out to SSE clients, each with a bounded queue."""

    name = "http-stream"

    def __init__(self, maxsize: int = CLIENT_QUEUE):
        self.maxsize = maxsize
        self._clients: list[queue.Queue] = []
        self._lock = threading.Lock()

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(self.maxsize)
        with self._lock:
            self._clients.append(q)
        return q

    def unsubscribe(self, q) -> None:
        with self._lock:
            if q in self._clients:
                self._clients.remove(q)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def publish(self, event: str, data: dict) -> None:
        with self._lock:
            clients = list(self._clients)
        for q in clients:
            try:
                q.put_nowait((event, data))
            except queue.Full:  # a client that stopped reading: drop it, it reconnects and re-reads /api
                log.warning("SSE client not reading; disconnecting it")
                self.unsubscribe(q)
                try:  # make room for the end marker: its stream closes, the client reconnects
                    while True:
                        q.get_nowait()
                except queue.Empty:
                    pass
                try:
                    q.put_nowait(None)
                except queue.Full:  # a concurrent publish refilled it; the reader still ends at the next drop
                    pass

    # Sink interface (called from the pipeline's sink thread)
    def on_finding(self, finding) -> None:
        if announced(finding):
            self.publish("finding", finding_event(finding))

    def on_series(self, series) -> None:  # a SeriesEvent
        self.publish("series", {"series_instance_uid": series.uid, "study_instance_uid": series.study_uid,
                                "verdict": series.verdict, "slices": len(series.results),
                                "findings": len(series.findings), "completed_reason": series.completed_reason})

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for q in clients:
            try:
                q.put_nowait(None)
            except queue.Full:
                pass


class Api:
    """The core routes, reading the parts the composition root hands it: the pipeline (its series tracker,
    inputs not analysed, backend), the store, the metrics, the findings' broadcaster, the refusal state and
    the readiness flag (set once the receiver listens)."""

    def __init__(self, cfg, pipeline, store, metrics, broadcaster: Broadcaster, refusals=None, ready=None):
        self.cfg, self.pipeline, self.store, self.metrics = cfg, pipeline, store, metrics
        self.tracker = pipeline.tracker if pipeline is not None else None
        self.broadcaster, self.refusals, self.ready = broadcaster, refusals, ready

    def healthz(self, req):
        backend = self.pipeline.inferer.backend
        if self.ready is not None and not self.ready.is_set():
            return _json(503, {"status": "starting", "backend": backend})
        refusing = self.refusals.current() if self.refusals is not None else {}
        if refusing:  # every C-STORE gets 0xA700 now: not healthy, though alive (it recovers on its own)
            return _json(503, {"status": "refusing", "reason": "; ".join(refusing.values()), "reasons": refusing,
                               "backend": backend})
        return _json(200, {"status": "ok", "backend": backend})

    def metrics_text(self, req):
        if self.refusals is not None:
            self.refusals.current()  # medqc_refusing as of this scrape, not of the last tick
        return 200, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}, self.metrics.render().encode()

    def _privacy(self):
        return self.cfg.privacy

    def series_list(self, req):
        from medqc.agent.report import LIST_SCHEMA, REJECTED_KEYS, series_report, series_summary

        now = time.time()  # before reading anything: a poller passing it as the next since misses no update
        try:
            limit = max(1, min(1000, int((req.query.get("limit") or ["100"])[0])))
            offset = max(0, int((req.query.get("offset") or ["0"])[0]))
            since = float((req.query.get("since") or ["0"])[0])
        except ValueError:
            return _json(400, {"error": "limit and offset are integers; since is a time in seconds since the epoch"})
        tracker = self.tracker
        live = []
        if tracker is not None:
            with tracker.lock:
                for st in tracker.all():
                    updated = max([st.last_seen, st.completed_at or 0.0, *(f.raised_at for f in st.findings.values())])
                    if updated > since:
                        live.append(series_summary(series_report(st, self._privacy(), per_slice_rows=False), updated))
        store = self.store
        stored = []
        if store is not None:  # series the tracker no longer holds (older ones, or from before a restart)
            held = frozenset(st.uid for st in tracker.all()) if tracker is not None else frozenset()
            stored = store.series_summaries(offset + limit + 1, since, held)
        merged = sorted(live + stored, key=lambda s: -(s["updated_at"] or 0.0))
        body = {"schema": LIST_SCHEMA, "now": now, "offset": offset, "limit": limit,
                "next_offset": offset + limit if len(merged) > offset + limit else None,
                "series": merged[offset:offset + limit]}
        if offset == 0:  # the inputs recently not analysed, with the first page
            rejected = self.pipeline.recent_rejected(limit)
            body["rejected"] = [{k: r[k] for k in REJECTED_KEYS if k in r} for r in rejected]
        return _json(200, body)

    def series_one(self, req, uid: str):
        from medqc.agent.report import SCHEMA, series_report

        uid = unquote(uid)
        tracker = self.tracker
        if tracker is not None:
            with tracker.lock:  # the pipeline thread changes a live series: read it whole, under the lock
                st = tracker.get(uid)
                rep = series_report(st, self._privacy()) if st is not None else None
            if rep is not None:
                return _json(200, {"schema": SCHEMA, **rep})
        store = self.store
        rep = store.get_series(uid) if store is not None else None
        if rep is None:
            return _json(404, {"error": f"no series {uid}"})
        return _json(200, {"schema": SCHEMA, **rep})

    def findings_stream(self, req, write, stop: threading.Event) -> None:
        q = self.broadcaster.subscribe()
        try:
            write(b"retry: 2000\n: connected\n\n")
            while not stop.is_set():
                try:
                    item = q.get(timeout=KEEPALIVE_S)
                except queue.Empty:
                    write(b": keep-alive\n\n")
                    continue
                if item is None:
                    return
                event, data = item
                write(f"event: {event}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n".encode())
        finally:
            self.broadcaster.unsubscribe(q)


def core_routes(api: Api) -> list:
    """(method, compiled regex, handler, needs_token, kind) — the same tuples the console registers."""
    table = [("GET", r"/healthz", api.healthz, False, "plain"),
             ("GET", r"/metrics", api.metrics_text, True, "plain"),
             ("GET", r"/api/series", api.series_list, True, "plain"),
             ("GET", r"/api/series/([^/]+)", api.series_one, True, "plain"),
             ("GET", r"/api/findings/stream", api.findings_stream, True, "sse")]
    return [(m, re.compile(p + r"$"), fn, auth, kind) for m, p, fn, auth, kind in table]


class HttpServer:
    """One HTTP server for the API and the console (bound at ``start``)."""

    def __init__(self, cfg, api: Api, console=None, bind: str | None = None):
        self.cfg = cfg
        self.token = cfg.http.token
        self._stop = threading.Event()
        self.api = api
        self.broadcaster = api.broadcaster
        self.routes: list = core_routes(api)
        if console is not None:
            from medqc.agent.web.console import register

            register(self.routes, console)
        self.bind = bind or cfg.http.bind
        self.httpd = None
        self.port = None

    def start(self) -> "HttpServer":
        host, _, port = self.bind.rpartition(":")
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "medqc"

            def log_message(self, fmt, *args):  # URLs carry UIDs only; keep access logs at debug
                log.debug("http: " + fmt, *args)

            def _dispatch(self, method):
                parts = urlsplit(self.path)
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:  # the body stays unread: this connection ends with the answer
                    self.close_connection = True
                    self._send(*_json(413 if length > MAX_BODY else 400,
                                      {"error": f"request body must be 0 to {MAX_BODY} bytes"}))
                    return self._discard_input(length if length > 0 else DISCARD_MAX_BYTES)
                body = self.rfile.read(length) if length else b""
                req = Request(method, parts.path, parse_qs(parts.query), self.headers, body)
                allowed = []
                for m, rx, fn, auth, kind in server.routes:
                    mt = rx.match(parts.path)
                    if not mt:
                        continue
                    if m != method:
                        allowed.append(m)
                        continue
                    if auth and not server.authorised(req):
                        return self._send(401, {"Content-Type": "application/json", "WWW-Authenticate": "Bearer"},
                                          b'{"error": "bearer token required"}')
                    if kind == "sse":
                        return self._sse(fn, req, mt.groups())
                    try:
                        return self._send(*fn(req, *mt.groups()))
                    except (BrokenPipeError, ConnectionResetError):
                        return None
                    except Exception as e:  # noqa: BLE001
                        log.exception("HTTP route %s failed", parts.path)
                        return self._send(*_json(500, {"error": type(e).__name__}))
                if allowed:
                    return self._send(*_json(405, {"error": f"use {', '.join(allowed)}"}))
                return self._send(*_json(404, {"error": "not found"}))

            def do_GET(self):
                self._dispatch("GET")

            def do_POST(self):
                self._dispatch("POST")

            def _send(self, status, headers, body):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _discard_input(self, length: int) -> None:
                """End the answer (write side shut), then take in and drop up to ``length`` bytes of what the client
                is still sending (at most ``DISCARD_MAX_BYTES``, for ``DISCARD_S``), so that closing does not reset the
                connection before the client has read the answer."""
                try:
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)
                    self.connection.settimeout(DISCARD_S)
                    left, until = min(length, DISCARD_MAX_BYTES), time.monotonic() + DISCARD_S
                    while left > 0 and time.monotonic() < until:
                        chunk = self.connection.recv(min(1 << 16, left))
                        if not chunk:
                            break
                        left -= len(chunk)
                except OSError:
                    pass

            def _sse(self, fn, req, groups):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

                def write(b: bytes):
                    self.wfile.write(b)
                    self.wfile.flush()

                try:
                    fn(req, write, server._stop, *groups)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

        self.httpd = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True).start()
        log.info("HTTP API on http://%s:%d/", self.httpd.server_address[0], self.port)
        return self

    def authorised(self, req) -> bool:
        if not self.token:
            return True
        auth = req.headers.get("Authorization") or ""
        got = auth[7:].strip() if auth.startswith("Bearer ") else (req.query.get("token") or [""])[0]
        return hmac.compare_digest(got.encode(), self.token.encode())

    def close(self) -> None:
        self._stop.set()
        self.broadcaster.close()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
