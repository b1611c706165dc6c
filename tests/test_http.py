"""The HTTP API of a real agent (tiny ONNX bundle) fed by DCMTK storescu: /healthz open, bearer token on
/metrics and /api, Prometheus text, medqc.report/1 series, findings over server-sent events as raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import free_port, missing_peer, run_ok  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("http-study") / "head"
    run_ok([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "12", "--matrix", "128",
          "--artifact", "metal:0.9@5-8", "--short-top", "40", "--seed", "11", "--no-progress", str(out)], timeout=300)
    return out


@pytest.fixture
def agent(tiny_bundle, tmp_path):
    from medqc.agent.daemon import Agent
    from medqc.config import load_config

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.bind": f"127.0.0.1:{free_port()}",
                             "http.token": "t0ken", "series.idle_timeout_s": 1.0, "sinks.stdout.enabled": False})
    a = Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()
    try:
        yield cfg, a
    finally:
        a.stop(5.0)


def _get(url, token=None, timeout=10):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def send(study, port, aet="CT_TEST"):
    storescu = dcmtk("storescu")
    if not storescu:
        missing_peer("storescu (dcmtk) is not installed (.ci/run installs it)")
    files = sorted(str(p) for p in study.glob("*.dcm"))
    return subprocess.run([storescu, "-aet", aet, "-aec", "MEDQC", "127.0.0.1", str(port), *files],
                          env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=120)


def test_http_api_end_to_end(agent, study):
    from medqc.agent.metrics import METRICS

    cfg, a = agent
    assert a.http.httpd.server_address[0] == "127.0.0.1"
    base = f"http://{cfg.http.bind}"
    status, _, body = _get(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok" and json.loads(body)["backend"] == "onnxruntime"
    for path in ("/metrics", "/api/series", "/api/findings/stream"):
        status, headers, _ = _get(base + path)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", path
        assert _get(base + path.replace("/stream", "/nope"), "wrong")[0] in (401, 404)
    assert _get(base + "/api/series/1.2.3", "t0ken")[0] == 404

    # SSE client connected before the study arrives
    events, lines = [], []

    def listen():
        req = urllib.request.Request(base + "/api/findings/stream", headers={"Authorization": "Bearer t0ken"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            event = None
            for raw in r:
                line = raw.decode().rstrip("\n")
                lines.append(line)
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    events.append((event, json.loads(line[6:]), time.monotonic()))
                    if event == "series":
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while a.http.broadcaster.clients == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    t_send = time.monotonic()
    r = send(study, cfg.dicom.port)
    assert r.returncode == 0, r.stderr
    t.join(60)
    assert not t.is_alive(), lines
    kinds = [e[0] for e in events]
    assert kinds[-1] == "series" and "finding" in kinds, lines
    checks = {e[1]["check"] for e in events if e[0] == "finding"}
    assert "artifact.metal" in checks, checks
    first = min(e[2] for e in events if e[0] == "finding")
    print(f"first finding on the SSE stream {first - t_send:.2f} s after storescu started; checks {sorted(checks)}")
    uid = events[-1][1]["series_instance_uid"]

    status, _, body = _get(base + "/api/series", "t0ken")
    rep = json.loads(body)
    assert status == 200 and rep["schema"] == "medqc.series-list/1"
    s = next(s for s in rep["series"] if s["series_instance_uid"] == uid)  # a summary: per-slice data is on its own URL
    assert s["slices"] == 12 and s["verdict"] in ("warn", "fail") and "per_slice" not in s and s["url"] == f"/api/series/{uid}"
    assert "artifact.metal" in {f["check"] for f in s["findings"]} and not any("details" in f for f in s["findings"])
    status, _, body = _get(base + f"/api/series/{uid}", "t0ken")
    one = json.loads(body)
    assert status == 200 and one["series_instance_uid"] == uid and len(one["per_slice"]) == 12
    assert {f["check"] for f in one["findings"]} >= {"artifact.metal"}

    status, headers, body = _get(base + "/metrics", "t0ken")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    vals = {}
    for ln in text.splitlines():
        if ln and not ln.startswith("#"):
            k, v = ln.rsplit(" ", 1)
            vals[k] = float(v)
    assert vals['medqc_slices_received_total{source="dicom"}'] == 12
    assert vals["medqc_slices_analysed_total"] == 12 if "medqc_slices_analysed_total" in vals else True
    assert any(k.startswith("medqc_findings_total{") and "artifact.metal" in k for k in vals), text
    assert vals['medqc_backend_info{backend="onnxruntime"}'] == 1
    assert any(k.startswith("medqc_stage_seconds_bucket{") for k in vals)
    for name in METRICS:
        assert f"# TYPE {name} " in text


def test_http_route_table_405_and_open_without_token(tiny_bundle, tmp_path):
    from medqc.agent.daemon import Agent
    from medqc.config import load_config

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.bind": f"127.0.0.1:{free_port()}",
                             "sinks.stdout.enabled": False})
    a = Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()
    try:
        base = f"http://{cfg.http.bind}"
        assert _get(base + "/metrics")[0] == 200  # no token configured: open (bound to localhost)
        req = urllib.request.Request(base + "/api/series", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 405
        # the console's routes are mounted on the same server
        assert _get(base + "/")[0] == 200
        # another module can add a route to the table
        import re

        a.http.routes.append(("GET", re.compile(r"/api/ping$"), lambda req: (200, {}, b"pong"), False, "plain"))
        assert _get(base + "/api/ping")[2] == b"pong"
    finally:
        a.stop(5.0)


def test_sse_keepalive_and_slow_client_dropped(monkeypatch):
    import medqc.agent.http as http
    from medqc.agent.records import Finding

    monkeypatch.setattr(http, "KEEPALIVE_S", 0.05)
    b = http.Broadcaster(maxsize=3)
    api = http.Api(None, None, b)
    out, stop = [], threading.Event()
    t = threading.Thread(target=api.findings_stream, args=(None, out.append, stop), daemon=True)
    t.start()
    time.sleep(0.2)
    assert b": keep-alive\n\n" in out  # comments keep proxies and browsers from timing out
    f = Finding("artifact.ring", "warning", "rings", "1.2.3", "1.2", 4, 9, details={"x": 1}, finding_id="r1")
    b.on_finding(f, None)
    time.sleep(0.2)
    ev = [o for o in out if o.startswith(b"event: finding")]
    assert ev and json.loads(ev[0].split(b"data: ")[1]) == {**{k: None for k in http.FINDING_KEYS},
                                                             **{"kind": "raised", "finding_id": "r1", "check": "artifact.ring",
                                                                "severity": "warning", "message": "rings",
                                                                "series_instance_uid": "1.2.3", "study_instance_uid": "1.2",
                                                                "first_instance": 4, "last_instance": 9, "raised_at": 0.0}}
    stop.set()
    t.join(2)
    assert not t.is_alive() and b.clients == 0
    # a client that does not read is dropped once its bounded queue is full; publishing never blocks
    q = b.subscribe()
    t0 = time.perf_counter()
    for _ in range(10):
        b.on_finding(f, None)
    assert time.perf_counter() - t0 < 0.1 and b.clients == 0
    assert q.qsize() == 1 and q.get_nowait() is None  # its stream ends; the client reconnects


def test_series_list_is_summaries_with_paging_and_since(tiny_bundle, tmp_path, real_ct):
    """/api/series lists summaries (no per-slice rows), newest update first, pages with limit/offset and
    filters with since; the per-slice data is on /api/series/{uid}. After a restart the same list comes from
    the SQLite store."""
    from medqc.agent.daemon import Agent
    from medqc.config import load_config
    from test_agent_dicom import storescu

    cfg = load_config(None, {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.bind": f"127.0.0.1:{free_port()}",
                             "series.idle_timeout_s": 1.0, "sinks.stdout.enabled": False})
    base = f"http://{cfg.http.bind}"

    def get(path):
        status, _, body = _get(base + path)
        assert status == 200, (path, body)
        return json.loads(body), len(body)

    a = Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()
    try:
        r = storescu(cfg.dicom.port, real_ct)  # the real phantom study: two axial series (54 and 58 slices)
        assert r.returncode == 0, r.stderr[-2000:]
        deadline = time.time() + 60
        while time.time() < deadline:
            doc, _ = get("/api/series")
            if len(doc["series"]) == 2 and all(s["verdict"] for s in doc["series"]):
                break
            time.sleep(0.3)
        assert doc["schema"] == "medqc.series-list/1" and sorted(s["slices"] for s in doc["series"]) == [54, 58], doc
        full = sum(get(s["url"])[1] for s in doc["series"])  # each series' own document, per-slice rows included
        assert len(json.dumps(doc["series"])) * 10 < full, (len(json.dumps(doc["series"])), full)
        assert all("per_slice" not in s and s["url"] == f"/api/series/{s['series_instance_uid']}" for s in doc["series"])
        assert doc["next_offset"] is None and doc["rejected"]  # the localizer, the secondary captures, ...
        newest, older = doc["series"]
        assert newest["updated_at"] >= older["updated_at"]
        page1, _ = get("/api/series?limit=1")
        page2, _ = get(f"/api/series?limit=1&offset={page1['next_offset']}")
        assert [s["series_instance_uid"] for s in page1["series"] + page2["series"]] == [newest["series_instance_uid"],
                                                                                         older["series_instance_uid"]]
        assert page1["next_offset"] == 1 and page2["next_offset"] is None and "rejected" not in page2
        assert get(f"/api/series?since={doc['now']}")[0]["series"] == []
        since = get(f"/api/series?since={older['updated_at']}")[0]["series"]
        assert [s["series_instance_uid"] for s in since] == [newest["series_instance_uid"]]
        one, _ = get(newest["url"])
        assert len(one["per_slice"]) == newest["slices"] and one["verdict"] == newest["verdict"]
        assert _get(base + "/api/series?limit=x")[0] == 400
    finally:
        a.stop(5.0)
    b = Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime").start()  # a restart: the store answers
    try:
        again, _ = get("/api/series")
        assert [(s["series_instance_uid"], s["verdict"], s["slices"]) for s in again["series"]] == [
            (s["series_instance_uid"], s["verdict"], s["slices"]) for s in doc["series"]]
        assert all("per_slice" not in s for s in again["series"])
        assert [s["series_instance_uid"] for s in get("/api/series?limit=1&offset=1")[0]["series"]] == [older["series_instance_uid"]]
        assert len(get(older["url"])[0]["per_slice"]) == older["slices"]
    finally:
        b.stop(5.0)
