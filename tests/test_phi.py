"""PHI hygiene: a study with a distinctive synthetic patient name, ID, birth date and accession number goes
through a real ``medqc agent`` (storescu in; stdout/journal log, SQLite store, HTTP API, metrics, SSE,
webhook and DICOM SR to storescp out) and none of the identifiers appears in any output."""

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
from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import free_port, missing_peer  # noqa: E402

NAME = "QUIXOTEVANS^ZEPHYRINA"
PID = "PIDQ7731X"
BIRTH = "19120317"
ACCESSION = "ACCQ99817"
NEEDLES = [b"QUIXOTEVANS", b"ZEPHYRINA", PID.encode(), BIRTH.encode(), b"1912-03-17", ACCESSION.encode()]


def _leaks(where: str, blob: bytes) -> list[str]:
    low = blob.lower()
    return [f"{n.decode()} in {where}" for n in NEEDLES if n.lower() in low]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    import pydicom

    out = tmp_path_factory.mktemp("phi-study") / "head"
    r = subprocess.run([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "10", "--matrix", "96",
                        "--artifact", "metal:0.9@4-7", "--short-top", "40", "--patient-name", NAME, "--seed", "9",
                        "--no-progress", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for p in sorted(out.glob("*.dcm")):
        ds = pydicom.dcmread(p)
        ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = PID, BIRTH, ACCESSION
        ds.save_as(p)
        assert _leaks("input", p.read_bytes())  # the identifiers really are in what we send
    return out


class _Hook(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        self.server.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()


def test_no_identifier_in_any_output(tiny_bundle, tmp_path, study):
    storescu, storescp = dcmtk("storescu"), dcmtk("storescp")
    if not (storescu and storescp):
        missing_peer("dcmtk is not installed (.ci/run installs it)")
    hook = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    hook.bodies = []
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    pacs_port, port, http = free_port(), free_port(), f"127.0.0.1:{free_port()}"
    pacs_dir = tmp_path / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen([storescp, "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conf = tmp_path / "medqc.toml"
    conf.write_text(f"""
[series]
idle_timeout_s = 1.0
[http]
token = "tok"
[sinks.webhook]
url = "http://127.0.0.1:{hook.server_address[1]}/hook"
secret = "k"
[sinks.dicom]
host = "127.0.0.1"
port = {pacs_port}
min_severity = "info"
""")
    state = tmp_path / "state"
    env = {**os.environ, "TCP_NODELAY": "1"}
    agent = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--config", str(conf), "--port", str(port),
                              "--state-dir", str(state), "--http", http, "--backend", "onnxruntime",
                              "--bundle", str(tiny_bundle)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sse, blobs = [], {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{http}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)

        def listen():
            req = urllib.request.Request(f"http://{http}/api/findings/stream", headers={"Authorization": "Bearer tok"})
            with urllib.request.urlopen(req, timeout=60) as r:
                for raw in r:
                    sse.append(raw)
                    if raw.startswith(b"event: series"):
                        sse.append(next(r))
                        return

        t = threading.Thread(target=listen, daemon=True)
        t.start()
        time.sleep(0.5)
        files = sorted(str(p) for p in study.glob("*.dcm"))
        r = subprocess.run([storescu, "-aet", "CT_TEST", "-aec", "MEDQC", "127.0.0.1", str(port), *files], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        t.join(60)
        assert not t.is_alive(), sse

        def get(path):
            req = urllib.request.Request(f"http://{http}{path}", headers={"Authorization": "Bearer tok"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.read()

        blobs["/api/series"] = get("/api/series")
        uid = json.loads(blobs["/api/series"])["series"][0]["series_instance_uid"]
        blobs["/api/series/{uid}"] = get(f"/api/series/{uid}")
        blobs["/metrics"] = get("/metrics")
        blobs["/api/console/state"] = get("/api/console/state")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(pacs_dir.iterdir()):
            time.sleep(0.2)
    finally:
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=60)
        pacs.terminate()
        pacs.wait(10)
        hook.shutdown()
    assert agent.returncode == 0, err[-2000:]
    blobs["stdout (journal)"] = out
    blobs["stderr (log)"] = err
    blobs["SSE"] = b"".join(sse)
    blobs["webhook"] = b"\n".join(hook.bodies)
    for p in state.rglob("*"):
        if p.is_file():
            blobs[f"state/{p.relative_to(state)}"] = p.read_bytes()
    sr = list(pacs_dir.iterdir())
    assert sr, "no SR reached the PACS"
    for p in sr:
        blobs[f"PACS/{p.name}"] = p.read_bytes()
    # every output really carried the study
    assert b"artifact.metal" in blobs["SSE"] and b"artifact.metal" in blobs["webhook"]
    assert b'"event":"finding"' in blobs["stdout (journal)"]
    assert uid.encode() in blobs["/api/series/{uid}"]
    leaks = [leak for where, blob in blobs.items() for leak in _leaks(where, blob)]
    assert not leaks, leaks
