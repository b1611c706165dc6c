"""The technologist console: a page at ``/`` on the agent's HTTP port that shows, live, the series
arriving now and the recent ones.

Per series: a craniocaudal strip (one mark per slice as it arrives, placed head to feet by the slice's
position along the stack normal, ``z``; coloured by its worst artifact score), a coverage bar (scanned range against the protocol's required anatomy on the fixed body scale of
``medqc.analysis.anatomy``), the findings with severity, slice range and message, a windowed thumbnail of the most
affected slice per artifact finding, and an acknowledgement button (who/when, stored in the SQLite
store). Everything is served by the agent (``agent/web/static``; no CDN), updates arrive over Server-Sent
Events.

Routes (``ROUTES``; the agent's one HTTP server, ``agent/web/http.py``, mounts them with :func:`register`):

- ``GET /`` and ``GET /static/<file>``: the page and its assets;
- ``GET /api/console/state``: JSON snapshot of the recent series (console view, privacy applied);
- ``GET /api/console/stream``: SSE, event ``series`` with each changed series (slices appended
  incrementally), ``hello`` first and a comment heartbeat;
- ``GET /api/series/{uid}/thumbnail/{sop}``: PNG of that slice, kept only for the most affected slices;
- ``POST /api/findings/{id}/ack`` with JSON ``{"who": "...", "note": "..."}``: record an acknowledgement.

The console reads the live series tracker (under its lock) rather than a sink queue, so it also sees
series that were open before a browser connected; each SSE client polls it every ``POLL_S``.

No patient identifiers by default: series are named by description, time and a shortened UID; a site
may opt in (``privacy.show_patient_identifiers``) to show the patient name.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from medqc import ARTIFACTS
from medqc.agent.sinks.base import Sink

log = logging.getLogger("medqc.agent.web.console")

STATIC = Path(__file__).resolve().parent / "static"
POLL_S = 0.25
HEARTBEAT_S = 15.0
THUMB_SIZE = 192
THUMB_MIN_SCORE = 0.2  # slices below this for every class get no thumbnail (nothing to show)
WINDOWS = {"head": (40.0, 120.0), "body": (40.0, 400.0)}  # (level, width) HU


# ---------------------------------------------------------------------------------------- thumbnails
def _region(info) -> str:
    text = " ".join(str(getattr(info, k, "") or "") for k in ("body_part", "protocol_name", "series_description")).upper()
    return "head" if re.search(r"HEAD|BRAIN|SKULL|CRAN|KOPF|SCHAEDEL|SCHÄDEL", text) else "body"


def window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    lo = level - width / 2.0
    img = (np.asarray(hu, np.float32) - lo) * (255.0 / width)
    return np.clip(img, 0, 255).astype(np.uint8)


def thumbnail_png(hu: np.ndarray, info=None, size: int = THUMB_SIZE) -> bytes:
    """A small windowed PNG of one slice (brain window for heads, soft tissue otherwise)."""
    import cv2

    level, width = WINDOWS[_region(info) if info is not None else "body"]
    hu = np.asarray(hu, np.float32)
    h, w = hu.shape[:2]
    scale = size / max(h, w)
    if scale < 1:  # shrink first (area average in HU), then window: ~4x less work than the other way round
        hu = cv2.resize(hu, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    img = window(hu, level, width)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


class ThumbnailSink(Sink):
    """A sink that renders the thumbnails, on its own thread: a small PNG of each slice with a notable
    artifact score (``min_score``, default THUMB_MIN_SCORE; 0: every slice, for ``medqc analyze --plot``).
    It reads the pixels of the slices it ``wants`` from their file (``info.source``: the spool file, kept
    until the series' verdict, or the input file offline), decoding it again (~2 ms a 512² slice; a few
    slices live, every slice for --plot), so that the analysis, in worker processes or not, never ships
    pixels. It keeps the thumbnails of the series the tracker holds (``keep`` series, oldest dropped first)."""

    name = "thumbnails"
    # the live console drops a thumbnail rather than wait, --plot (every slice's) waits for room
    queue_size = 1000
    # it reads the spool files: a series' files are released once it has rendered what it wants of them
    spool_waits = True

    def __init__(self, min_score: float | None = None, keep: int = 1000):
        self.min_score = THUMB_MIN_SCORE if min_score is None else min_score
        self.blocking = self.min_score <= 0  # every slice wanted (medqc analyze --plot): none may be dropped
        self.keep = keep
        self._by_series: dict[str, dict[str, bytes]] = {}
        self._lock = threading.Lock()
        self._last: tuple[str, list] | None = None  # the last multi-frame object decoded (its frames come in turn)

    def wants(self, result) -> bool:
        if result.error:
            return False
        return self.min_score <= 0 or bool(result.scores) and max(result.scores.get(k, 0.0) for k in ARTIFACTS) >= self.min_score

    def _pixels(self, info):
        """The slice's HU, decoded from its file."""
        from medqc.agent.decode import decode_file

        if self._last is not None and self._last[0] == info.source:
            decoded = self._last[1]
        else:
            self._last = None
            decoded = decode_file(info.source)
            if len(decoded) > 1:  # a multi-frame object: its next frames are likely wanted next
                self._last = (info.source, decoded)
        for d in decoded:
            if d.info.sop_instance_uid == info.sop_instance_uid and d.info.frame == info.frame and d.ok:
                return d.pixels()
        return None

    def on_slice(self, event) -> None:
        result = event.result
        if not self.wants(result):
            return
        try:
            hu = self._pixels(result.info)
            if hu is None:
                return
            png = thumbnail_png(hu, result.info)
        except Exception as e:  # noqa: BLE001 - the console is never worth a lost result
            log.debug("thumbnail of %s failed: %s", result.info.sop_instance_uid, e)
            return
        uid = result.info.series_instance_uid
        with self._lock:
            if uid not in self._by_series and len(self._by_series) >= self.keep:
                self._by_series.pop(next(iter(self._by_series)))
            self._by_series.setdefault(uid, {})[result.info.sop_instance_uid] = png

    def get(self, series_uid: str, sop_uid: str) -> bytes | None:
        with self._lock:
            return self._by_series.get(series_uid, {}).get(sop_uid)

    def of_series(self, series_uid: str) -> dict[str, bytes]:
        """SOP Instance UID → PNG of the series' slices rendered so far."""
        with self._lock:
            return dict(self._by_series.get(series_uid, {}))


# ------------------------------------------------------------------------------------------ the view
def short_uid(uid: str, n: int = 8) -> str:
    return "…" + uid[-n:] if len(uid) > n else uid


def _hhmm(dicom_time: str, fallback: float) -> str:
    t = (dicom_time or "").strip()
    if len(t) >= 4 and t[:4].isdigit():
        return f"{t[:2]}:{t[2:4]}" + (f":{t[4:6]}" if len(t) >= 6 and t[4:6].isdigit() else "")
    return time.strftime("%H:%M:%S", time.localtime(fallback)) if fallback else ""


def coverage_view(state, positions: list[float]) -> dict | None:
    """Scanned range against the protocol's required range on the reference body scale (mm below the
    vertex), with the landmarks named and the missing / excess millimetres at each end."""
    from medqc.analysis.anatomy import LANDMARKS

    rule = getattr(state, "rule", None)
    if rule is None or rule.start not in LANDMARKS or rule.end not in LANDMARKS:
        return None
    req = (LANDMARKS[rule.start], LANDMARKS[rule.end])
    out = {"rule": rule.name, "start": rule.start, "end": rule.end, "required_mm": list(req), "scanned_mm": None,
           "source": "network"}
    # once the coverage check has located the protocol's landmarks in patient z (the series verdict, or an
    # early coverage finding), the picture follows them, so its millimetres are the findings' millimetres;
    # before that, the network's raw per-slice positions
    located = _positions_from_summary(getattr(state, "coverage", None) or {}, rule, LANDMARKS)
    if located:
        positions = located
        out["source"] = "landmarks"
    elif not positions:
        out["source"] = None
    if positions:
        top, bottom = min(positions), max(positions)
        out["scanned_mm"] = [round(top, 1), round(bottom, 1)]
        out["missing_top_mm"] = round(max(0.0, top - req[0]), 1)
        out["missing_bottom_mm"] = round(max(0.0, req[1] - bottom), 1)
        out["excess_top_mm"] = round(max(0.0, req[0] - top), 1)
        out["excess_bottom_mm"] = round(max(0.0, bottom - req[1]), 1)
        lo, hi = min(top, req[0]), max(bottom, req[1])
    else:
        lo, hi = req
    pad = max(20.0, 0.08 * (hi - lo))
    out["scale_mm"] = [round(lo - pad, 1), round(hi + pad, 1)]
    out["landmarks"] = [[k, v] for k, v in sorted(LANDMARKS.items(), key=lambda kv: kv[1]) if lo - pad <= v <= hi + pad]
    return out


def _positions_from_summary(summary: dict, rule, landmarks: dict) -> list[float]:
    """Map the scanned z range to the reference scale through the protocol landmarks the coverage check
    located in patient z (two: their spacing sets the scale; one: 1 mm per mm, feet toward lower z)."""
    top, bottom = summary.get("scan_top_z"), summary.get("scan_bottom_z")
    pts = [(summary.get(f"{r}_z"), landmarks[getattr(rule, r)]) for r in ("start", "end")
           if summary.get(f"{r}_z") is not None and summary.get(f"{r}_landmark") == getattr(rule, r)]
    if top is None or bottom is None or not pts:
        return []
    slope = -1.0
    if len(pts) == 2 and abs(pts[1][0] - pts[0][0]) > 1.0:
        slope = (pts[1][1] - pts[0][1]) / (pts[1][0] - pts[0][0])
    z0, r0 = pts[0]
    return [r0 + slope * (float(top) - z0), r0 + slope * (float(bottom) - z0)]


def _worst(scores: dict) -> tuple[str | None, float]:
    best, p = None, 0.0
    for k in ARTIFACTS:
        v = float(scores.get(k, 0.0) or 0.0)
        if v > p:
            best, p = k, v
    return best, p


class Console:
    """The console's state and handlers (framework-free: each handler returns (status, headers, body))."""

    def __init__(self, cfg, tracker, store=None, thumbnails: ThumbnailSink | None = None):
        self.cfg = cfg
        self.tracker = tracker
        self.store = store
        self.thumbnails = thumbnails
        self._acks: dict[str, dict] = {}
        self._acks_loaded: set[str] = set()
        self._ack_version = 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------- series view
    def _tracker(self):
        return self.tracker

    def _thumbs(self, uid: str) -> dict[str, bytes]:
        return self.thumbnails.of_series(uid) if self.thumbnails is not None else {}

    def _states(self) -> list:
        tr = self._tracker()
        if tr is None:
            return []
        with tr.lock:
            states = list(tr.all())
        horizon = time.time() - 60.0 * float(self.cfg.console.recent_minutes)
        keep = [s for s in states if s.verdict is None or (s.completed_at or s.last_seen or s.opened_at) >= horizon]
        keep.sort(key=lambda s: s.opened_at, reverse=True)
        return keep

    def _load_acks(self, uid: str) -> None:
        if uid in self._acks_loaded:
            return
        self._acks_loaded.add(uid)
        store = self.store
        if store is None:
            return
        try:
            rep = store.get_series(uid) or {}
        except Exception as e:  # noqa: BLE001
            log.debug("loading acknowledgements of %s failed: %s", uid, e)
            return
        for a in rep.get("acknowledgements", []):
            self._acks[a["finding_id"]] = a

    def series_view(self, st, from_slice: int = 0) -> dict:
        """The console's view of a live series, read whole under the tracker's lock (the pipeline thread
        changes it: a late slice re-opens a series)."""
        self._load_acks(st.uid)
        tr = self._tracker()
        with tr.lock if tr is not None else nullcontext():
            return self._view(st, tr, from_slice)

    def _view(self, st, tr, from_slice: int) -> dict:
        results = list(st.results)
        findings = list(st.findings.values())
        verdict, rule_name = st.verdict, st.protocol_rule
        thumbs = self._thumbs(st.uid)
        first = st.first
        slices, positions, best = [], [], {}
        for k, r in enumerate(results):
            kind, p = _worst(r.scores) if not r.error else (None, 0.0)
            if r.position_ref_mm is not None and not r.error:
                positions.append(float(r.position_ref_mm))
            for a in ARTIFACTS:
                v = r.scores.get(a, 0.0) if r.info.sop_instance_uid in thumbs else -1.0
                if v > best.get(a, (-1.0, None))[0]:
                    best[a] = (v, r)
            if k >= from_slice:
                z = r.info.z
                slices.append({"k": k, "instance": r.info.instance_number, "z": None if z is None else round(z, 2),
                               "pos_mm": None if r.position_ref_mm is None else round(float(r.position_ref_mm), 1),
                               "worst": kind, "score": round(p, 3),
                               "scores": {a: round(float(r.scores.get(a, 0.0)), 3) for a in ARTIFACTS if a in r.scores},
                               "error": r.error or None})
        fviews = []
        for f in sorted(findings, key=lambda f: ({"critical": 0, "warning": 1, "info": 2}.get(f.severity, 3), f.raised_at)):
            thumb = None
            if f.check.startswith("artifact."):
                kind = f.check.split(".", 1)[1]
                cand = self._best_in_range(results, thumbs, kind, f.first_instance, f.last_instance) or best.get(kind, (0, None))[1]
                if cand is not None and cand.info.sop_instance_uid in thumbs:
                    thumb = {"sop": cand.info.sop_instance_uid, "instance": cand.info.instance_number,
                             "url": f"/api/series/{st.uid}/thumbnail/{cand.info.sop_instance_uid}"}
            fviews.append({"id": f.finding_id, "check": f.check, "severity": f.severity, "message": f.message,
                           "first_instance": f.first_instance, "last_instance": f.last_instance,
                           "z_range_mm": list(f.z_range_mm) if f.z_range_mm else None,
                           "score": None if f.score is None else round(float(f.score), 3),
                           "raised_at": f.raised_at, "thumbnail": thumb, "ack": self._acks.get(f.finding_id)})
        desc = first.series_description or first.protocol_name or first.study_description or "CT series"
        view = {
            "uid": st.uid, "short_uid": short_uid(st.uid), "description": desc,
            "series_number": first.series_number, "body_part": first.body_part,
            "time": _hhmm(first.acquisition_time or first.content_time, st.opened_at),
            "opened_at": st.opened_at, "completed_at": st.completed_at, "verdict": verdict,
            "protocol_rule": rule_name, "expected": st.expected, "n_slices": len(results),
            "slices_from": from_slice, "slices": slices, "findings": fviews,
            "coverage": coverage_view(st, positions),
            "size": dict(st.size) if getattr(st, "size", None) else None,  # patient size and SSDE, at the verdict
            "not_judged": dict(getattr(st, "not_judged", None) or {}),  # check -> why it could not judge, at the verdict
            "thresholds": dict(getattr(tr, "thresholds", {}) or {}),
        }
        if self.cfg.privacy.show_patient_identifiers and getattr(first, "patient_name", ""):
            view["patient_name"] = str(first.patient_name).replace("^", " ").strip()
        return view

    @staticmethod
    def _best_in_range(results, thumbs, kind, lo, hi):
        best, bv = None, -1.0
        for r in results:
            if r.info.sop_instance_uid not in thumbs or r.error:
                continue
            n = r.info.instance_number
            if lo is not None and hi is not None and n is not None and not (min(lo, hi) <= n <= max(lo, hi)):
                continue
            v = r.scores.get(kind, 0.0)
            if v > bv:
                best, bv = r, v
        return best

    def _signature(self, st) -> tuple:
        tr = self._tracker()
        with tr.lock if tr is not None else nullcontext():
            fs = tuple(sorted((f.finding_id, f.severity, f.first_instance, f.last_instance, f.message)
                              for f in st.findings.values()))
            sig = (len(st.results), fs, st.verdict, st.protocol_rule)
        return (*sig, self._ack_version, len(self._thumbs(st.uid)))

    def snapshot(self) -> dict:
        return {"schema": "medqc.console/1", "now": time.time(), "settings": self.settings(),
                "series": [self.series_view(s) for s in self._states()]}

    def settings(self) -> dict:
        return {"recent_minutes": self.cfg.console.recent_minutes, "sound": bool(self.cfg.console.sound),
                "show_patient": bool(self.cfg.privacy.show_patient_identifiers), "artifacts": list(ARTIFACTS)}

    # ------------------------------------------------------------------------------------- handlers
    def handle_index(self, req):
        return 200, {"Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache"}, (STATIC / "index.html").read_bytes()

    def handle_static(self, req, name: str):
        name = unquote(name)
        if "/" in name or name.startswith(".") or not (STATIC / name).is_file():
            return _json(404, {"error": f"no static file {name!r}"})
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype == "application/javascript":
            ctype += "; charset=utf-8"
        return 200, {"Content-Type": ctype, "Cache-Control": "no-cache"}, (STATIC / name).read_bytes()

    def handle_state(self, req):
        return _json(200, self.snapshot())

    def handle_thumbnail(self, req, uid: str, sop: str):
        tr = self._tracker()
        st = tr.get(unquote(uid)) if tr is not None else None
        if st is None:
            return _json(404, {"error": "unknown or expired series"})
        png = self.thumbnails.get(st.uid, unquote(sop)) if self.thumbnails is not None else None
        if png is not None:
            return 200, {"Content-Type": "image/png", "Cache-Control": "max-age=3600"}, png
        return _json(404, {"error": "no thumbnail kept for this slice"})

    def handle_ack(self, req, finding_id: str):
        finding_id = unquote(finding_id)
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            return _json(400, {"error": "body must be JSON: {\"who\": \"initials\", \"note\": \"optional\"}"})
        who = str(body.get("who", "")).strip()[:64]
        note = str(body.get("note", "")).strip()[:500]
        if not who:
            return _json(400, {"error": "'who' is required (the initials or name of the person acknowledging)"})
        store = self.store
        if store is None:
            return _json(503, {"error": "no store"})
        try:
            rec = store.acknowledge(finding_id, who, note)
        except KeyError:
            return _json(404, {"error": f"unknown finding {finding_id!r}"})
        with self._lock:
            self._acks[finding_id] = rec
            self._ack_version += 1
        log.info("finding %s acknowledged", finding_id)
        return _json(200, rec)

    def stream(self, write, stop: threading.Event | None = None) -> None:
        """Write SSE frames with ``write(bytes)`` until it raises (client gone) or ``stop`` is set."""
        stop = stop or threading.Event()
        sent: dict[str, tuple] = {}
        counts: dict[str, int] = {}
        write(_sse("hello", {"settings": self.settings(), "now": time.time()}))
        last = time.monotonic()
        while not stop.is_set():
            states = self._states()
            live = set()
            for st in reversed(states):  # oldest first, so the newest ends on top
                live.add(st.uid)
                sig = self._signature(st)
                if sent.get(st.uid) == sig:
                    continue
                n0 = counts.get(st.uid, 0)
                if n0 > len(st.results):
                    n0 = 0
                view = self.series_view(st, from_slice=n0)
                counts[st.uid] = view["n_slices"]
                sent[st.uid] = sig
                write(_sse("series", view))
                last = time.monotonic()
            for uid in list(sent):
                if uid not in live:
                    sent.pop(uid)
                    counts.pop(uid, None)
                    write(_sse("expired", {"uid": uid}))
            if time.monotonic() - last > HEARTBEAT_S:
                write(b": keep-alive\n\n")
                last = time.monotonic()
            stop.wait(POLL_S)


def _json(status: int, obj) -> tuple:
    return status, {"Content-Type": "application/json", "Cache-Control": "no-cache"}, json.dumps(obj).encode()


def _sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# ---------------------------------------------------------------------------------------------- routes
# (method, regex, handler name, needs token)
ROUTES = [
    ("GET", r"/", "handle_index", False),
    ("GET", r"/static/([^/]+)", "handle_static", False),
    ("GET", r"/api/console/state", "handle_state", True),
    ("GET", r"/api/console/stream", "stream", True),
    ("GET", r"/api/series/([^/]+)/thumbnail/([^/]+)", "handle_thumbnail", True),
    ("POST", r"/api/findings/(.+)/ack", "handle_ack", True),
]


def register(routes: list, console: Console) -> Console:
    """Add the console's routes to an HTTP server's route table as ``(method, compiled regex, handler,
    needs_token, kind)`` tuples; ``kind`` is "sse" for the stream (handler(req, write, stop)) and "plain"
    otherwise (handler(req, *groups) -> (status, headers, body))."""
    for method, pattern, name, auth in ROUTES:
        if name == "stream":
            routes.append((method, re.compile(pattern + r"$"), lambda req, write, stop, c=console: c.stream(write, stop), auth, "sse"))
        else:
            routes.append((method, re.compile(pattern + r"$"), getattr(console, name), auth, "plain"))
    return console
