"""Following the agent's HTTP API while a replay runs: its server-sent event stream (findings, verdicts) and
``/api/series/{uid}`` (per-slice times, the verdict)."""

from __future__ import annotations

import json
import socket
import threading
import time

from medqc.errors import UsageError


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


def stream_first_finding(events, uid: str) -> tuple[float, dict] | None:
    for t, name, data in events:
        d = data.get("finding") if isinstance(data.get("finding"), dict) else data
        if "check" in d and _event_series(data) == uid:
            return t, d
    return None
