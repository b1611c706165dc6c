"""Finding events end to end. A real agent process (tiny ONNX bundle, classical detectors) receives a synthetic
head study with metal on slices 8-19 and a short range from DCMTK storescu. Its stdout (journald), a webhook
receiver and a server-sent-events client all see each finding's events with their kind: raised once,
escalated when its severity rises while slices arrive, final (or withdrawn) at the verdict, and no line for
a finding that merely grew. ``medqc_findings_total`` counts each finding once; ``medqc_findings_open`` gauges
the findings standing on series without a verdict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port, need_tool  # noqa: E402

RANK = {"info": 0, "warning": 1, "critical": 2}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("events-study") / "head"
    r = subprocess.run([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "24", "--matrix", "128",
                        "--artifact", "metal:0.9@8-19", "--short-top", "40", "--seed", "7", "--no-progress", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


class _Hook(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        self.server.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _sse(url: str, events: list, stop: threading.Event) -> None:
    with urllib.request.urlopen(url, timeout=60) as r:
        name = None
        for raw in r:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name == "series" or stop.is_set():
                    return


def _metrics(url: str) -> dict[str, float]:
    vals = {}
    for ln in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if ln and not ln.startswith("#"):
            k, v = ln.rsplit(" ", 1)
            vals[k] = float(v)
    return vals


def test_finding_events_once_per_raise_or_severity_change(study, tmp_path, tiny_bundle):
    storescu = need_tool("storescu")
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    hook.bodies = []
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    dport, hport = free_port(), free_port()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[dicom]\nbind = "127.0.0.1"\n[series]\nidle_timeout_s = 1.0\n[spool]\nmin_free_mb = 0\n'
                   f'[http]\nbind = "127.0.0.1:{hport}"\n'
                   f'[sinks.webhook]\nurl = "http://127.0.0.1:{hook.server_address[1]}/qc"\nretries = 0\n')
    out = tmp_path / "stdout.jsonl"
    agent = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--config", str(cfg), "--port", str(dport),
                              "--state-dir", str(tmp_path / "state"), "--bundle", str(tiny_bundle), "--backend", "onnxruntime"],
                             stdout=open(out, "w"), stderr=open(tmp_path / "agent.log", "w"),
                             env=dict(os.environ, MEDQC_LOG_LEVEL="INFO", TCP_NODELAY="1"))
    base = f"http://127.0.0.1:{hport}"
    sse, stop = [], threading.Event()
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if json.load(urllib.request.urlopen(base + "/healthz", timeout=2))["status"] == "ok":
                    break
            except OSError:
                pass
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
            time.sleep(0.2)
        listener = threading.Thread(target=_sse, args=(base + "/api/findings/stream", sse, stop), daemon=True)
        listener.start()
        time.sleep(0.5)
        files = sorted(str(p) for p in study.glob("*.dcm"))
        r = subprocess.run([storescu, "-aet", "CT_TEST", "-aec", "MEDQC", "127.0.0.1", str(dport), *files],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, TCP_NODELAY="1"))
        assert r.returncode == 0, r.stderr[-2000:]
        listener.join(60)
        assert not listener.is_alive(), sse
        deadline = time.time() + 30
        while time.time() < deadline and not any(b.get("event") == "series" for b in hook.bodies):
            time.sleep(0.1)
        metrics = _metrics(base + "/metrics")
    finally:
        stop.set()
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(30)
        except subprocess.TimeoutExpired:
            agent.kill()
        hook.shutdown()
        hook.server_close()

    lines = [json.loads(ln) for ln in out.read_text().splitlines() if ln.startswith("{")]
    stdout = [(d["finding_id"], d["kind"], d["severity"]) for d in lines if d["event"] == "finding"]
    assert [d["event"] for d in lines][-1] == "series"
    by_id: dict[str, list] = {}
    for fid, kind, sev in stdout:
        by_id.setdefault(fid, []).append((kind, sev))
    for fid, evs in by_id.items():
        kinds = [k for k, _ in evs]
        assert "updated" not in kinds, (fid, evs)
        assert kinds[0] in ("raised", "final") and kinds[-1] in ("final", "withdrawn") and kinds.count(kinds[-1]) == 1, (fid, evs)
        assert kinds.count("raised") <= 1, (fid, evs)
        for (k0, s0), (k1, s1) in zip(evs, evs[1:]):  # an escalation is a rise in severity
            if k1 == "escalated":
                assert RANK[s1] > RANK[s0], (fid, evs)
    metal = next(evs for fid, evs in by_id.items() if fid.endswith("/artifact.metal"))
    assert [k for k, _ in metal] in (["raised", "final"], ["raised", "escalated", "final"]), metal
    assert metal[-1][1] == "critical"  # 12 slices of metal
    cov = [evs for fid, evs in by_id.items() if "/coverage.top" in fid]
    assert cov and [k for k, _ in cov[0]][0] == "raised", by_id  # raised while slices arrived, once

    # the webhook and the server-sent events carry the same events, with their kind
    hooked = [(b["finding_id"], b["kind"], b["severity"]) for b in hook.bodies if b["event"] == "finding"]
    streamed = [(d["finding_id"], d["kind"], d["severity"]) for e, d in sse if e == "finding"]
    assert hooked == stdout and streamed == stdout, (hooked, streamed, stdout)

    # metrics: each finding counted once, when first reported; no finding open once the verdict is in
    total = {k: v for k, v in metrics.items() if k.startswith("medqc_findings_total{")}
    assert sum(total.values()) == len(by_id), (total, by_id)
    assert sum(v for k, v in total.items() if 'check="artifact.metal"' in k) == 1, total
    opened = {k: v for k, v in metrics.items() if k.startswith("medqc_findings_open{")}
    assert sorted(opened) == [f'medqc_findings_open{{severity="{s}"}}' for s in ("critical", "info", "warning")], opened
    assert sum(opened.values()) == 0, opened


def test_updates_stay_off_the_feeds(tmp_path):
    """A change that is only an update (the run grew) reaches the store, not stdout, the webhook or SSE."""
    import io

    from medqc.agent.web.http import Broadcaster
    from medqc.agent.records import Finding
    from medqc.agent.sinks.stdout import StdoutSink

    buf, b = io.StringIO(), Broadcaster()
    q = b.subscribe()
    sink = StdoutSink(buf)
    for kind in ("raised", "updated", "escalated", "updated", "final"):
        f = Finding("artifact.metal", "warning", "metal", "1.2.3", "1.2", 4, 9, finding_id="1.2.3/artifact.metal", kind=kind)
        sink.on_finding(f)
        b.on_finding(f)
    assert [json.loads(ln)["kind"] for ln in buf.getvalue().splitlines()] == ["raised", "escalated", "final"]
    assert [q.get_nowait()[1]["kind"] for _ in range(q.qsize())] == ["raised", "escalated", "final"]
