"""Alert sinks against real peers on loopback: a stdlib HTTP server that fails the first attempts (webhook
retries, HMAC signature), DCMTK ``storescp`` receiving the SR / KOS (validated with ``dciodvfy``)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import missing_peer  # noqa: E402

CT = "1.2.840.10008.5.1.4.1.1.2"


def _state(n=10, findings=None):
    from medqc.agent.records import Finding, SliceInfo, SliceResult
    from medqc.agent.series import SeriesState

    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    infos = [SliceInfo(f"{series}.{i}", series, study, CT, instance_number=i, position=(0.0, 0.0, -5.0 * i))
             for i in range(1, n + 1)]
    st = SeriesState(series, study, infos[0], results=[SliceResult(i, scores={"metal": 0.9}) for i in infos])
    for f in findings or [Finding("artifact.metal", "critical", "metal artifact on slices 3-6", series, study, 3, 6,
                                  (-30.0, -15.0), 0.93, finding_id="f1"),
                          Finding("coverage.top", "warning", "scan starts 40 mm below the vertex", series, study,
                                  finding_id="f2")]:
        st.findings[f.finding_id] = f
    st.verdict = "fail"
    st.completed_reason = "count"
    return st


class _Hook(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        srv = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        srv.attempts.append((time.monotonic(), body, self.headers.get("X-Medqc-Signature")))
        code = 503 if len(srv.attempts) <= srv.fail_first else 200
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def hook():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    srv.attempts, srv.fail_first = [], 2
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_webhook_retries_with_backoff_and_signs(hook):
    from medqc.agent.sinks.webhook import WebhookSink

    sink = WebhookSink(f"http://127.0.0.1:{hook.server_address[1]}/qc", secret="s3cret", retries=4, backoff_s=0.1)
    st = _state()
    sink.on_finding(st.findings["f1"], st)
    assert len(hook.attempts) == 3  # two 503s, then delivered
    gaps = [b[0] - a[0] for a, b in zip(hook.attempts, hook.attempts[1:])]
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19, gaps  # exponential: 0.1 s, 0.2 s
    body, sig = hook.attempts[-1][1], hook.attempts[-1][2]
    assert sig == "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    ev = json.loads(body)
    assert ev["event"] == "finding" and ev["check"] == "artifact.metal" and ev["first_instance"] == 3
    sink.on_series(st)
    assert json.loads(hook.attempts[-1][1])["verdict"] == "fail"


def test_webhook_gives_up_and_is_isolated(hook):
    from medqc.agent.metrics import Metrics
    from medqc.agent.sinks.base import SinkThread
    from medqc.agent.sinks.webhook import WebhookError, WebhookSink

    hook.fail_first = 100
    sink = WebhookSink(f"http://127.0.0.1:{hook.server_address[1]}/", retries=1, backoff_s=0.01)
    st = _state()
    with pytest.raises(WebhookError):
        sink.on_finding(st.findings["f1"], st)
    # inside the pipeline's sink thread a failure is counted, not raised; a dead URL is the same
    m = Metrics()
    dead = WebhookSink("http://127.0.0.1:9/", retries=1, backoff_s=0.01, timeout_s=1.0)
    t = SinkThread(dead, m)
    t0 = time.perf_counter()
    t.submit("on_finding", st.findings["f1"], st)
    assert time.perf_counter() - t0 < 0.05  # never blocks the caller
    t.flush(10)
    t.close()
    assert m.get("medqc_sink_errors_total", sink="webhook") == 1


def test_webhook_url_validated():
    from medqc.agent.sinks.webhook import WebhookSink

    with pytest.raises(ValueError, match="http://"):
        WebhookSink("ftp://example/")


def _storescp(tmp_path, port):
    exe = dcmtk("storescp")
    if not exe:
        missing_peer("storescp (dcmtk) is not installed (.ci/run installs it)")
    out = tmp_path / "pacs"
    out.mkdir()
    p = subprocess.Popen([exe, "-aet", "PACS", "-od", str(out), "+xa", str(port)], env={**os.environ, "TCP_NODELAY": "1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return p, out


def _dciodvfy(path: Path) -> str:
    exe = shutil.which("dciodvfy")
    if not exe:
        missing_peer("dciodvfy (dicom3tools) is not installed (.ci/run installs it)")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


@pytest.mark.parametrize("kind", ["sr", "ko"])
def test_dicom_document_to_storescp_is_valid(tmp_path, port, kind):
    import pydicom

    from medqc.agent.sinks.dicom_sr import BASIC_TEXT_SR, KEY_OBJECT_SELECTION, DicomSrSink

    proc, out = _storescp(tmp_path, port)
    try:
        sink = DicomSrSink("127.0.0.1", port, "PACS", "MEDQC", kind=kind, min_severity="warning")
        st = _state()
        sink.on_series(st)
        for _ in range(50):
            files = list(out.iterdir())
            if files:
                break
            time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    assert len(files) == 1, files
    ds = pydicom.dcmread(files[0])
    assert ds.SOPInstanceUID == sink.sent[0]
    assert ds.SOPClassUID == (BASIC_TEXT_SR if kind == "sr" else KEY_OBJECT_SELECTION)
    assert ds.StudyInstanceUID == st.study_uid and ds.PatientName == ""
    ev = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ev.SeriesInstanceUID == st.uid
    assert sorted(r.ReferencedSOPInstanceUID for r in ev.ReferencedSOPSequence) == [f"{st.uid}.{i}" for i in range(3, 7)]
    text = " ".join(str(i.get("TextValue", "")) for i in ds.ContentSequence)
    assert "artifact.metal" in text and "coverage.top" in text
    report = _dciodvfy(files[0])
    errors = [ln for ln in report.splitlines() if ln.startswith("Error")]
    assert not errors, report


def test_dicom_sink_below_min_severity_sends_nothing_and_reports_failures(port):
    from medqc.agent.records import Finding
    from medqc.agent.sinks.dicom_sr import DicomSrSink

    st = _state(findings=[Finding("noise.index", "info", "noise slightly high", finding_id="n")])
    sink = DicomSrSink("127.0.0.1", port, min_severity="warning")  # nobody listens on port: must not be tried
    sink.on_series(st)
    assert sink.sent == []
    with pytest.raises(ConnectionError):
        DicomSrSink("127.0.0.1", port, min_severity="info", timeout_s=2).on_series(st)


def test_webhook_from_config():
    from medqc.agent.sinks.webhook import from_config
    from medqc.config import load_config

    assert from_config(load_config(None)) is None  # off by default
    s = from_config(load_config(None, {"sinks.webhook.url": "https://hooks.example/qc", "sinks.webhook.backoff_s": 0.5,
                                       "sinks.webhook.retries": 2, "sinks.webhook.secret": "k"}))
    assert (s.url, s.backoff_s, s.retries, s.secret) == ("https://hooks.example/qc", 0.5, 2, "k")
