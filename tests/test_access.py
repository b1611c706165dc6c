"""Access control with DCMTK storescu against a real agent: an allowed calling AE stores, an unknown AE
and a foreign source address are rejected (logged with the reason, counted); DICOM TLS with a throwaway
CA made by openssl (mutual: the agent requires a client certificate signed by that CA)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import free_port, missing_peer  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("access-study") / "head"
    r = subprocess.run([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "3", "--matrix", "64",
                        "--seed", "3", "--no-progress", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _storescu(study, port, aet, *extra):
    exe = dcmtk("storescu")
    if not exe:
        missing_peer("storescu (dcmtk) is not installed (.ci/run installs it)")
    files = sorted(str(p) for p in study.glob("*.dcm"))
    return subprocess.run([exe, *extra, "-aet", aet, "-aec", "MEDQC", "127.0.0.1", str(port), *files],
                          env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=60)


def _agent(tiny_bundle, tmp_path, **over):
    from medqc.agent.daemon import Agent
    from medqc.config import load_config

    o = {"dicom.bind": "127.0.0.1", "dicom.port": free_port(), "http.enabled": False, "sinks.stdout.enabled": False}
    o.update(over)
    cfg = load_config(None, o)
    return cfg, Agent(cfg, tmp_path / "state", str(tiny_bundle), "onnxruntime", inference=False).start()


def _wait(cond, timeout: float = 5.0) -> None:
    end = time.time() + timeout
    while time.time() < end and not cond():
        time.sleep(0.02)


def test_policy_decisions():
    from medqc.agent.access import AccessError, AccessPolicy

    p = AccessPolicy(["CT1", "CT2"], ["10.1.2.0/24", "127.0.0.1", "::1"])
    assert p.check("CT1", "10.1.2.77") == (True, "")
    assert p.check("CT1", "10.1.3.1") == (False, "source-ip")
    assert p.check("ROGUE", "127.0.0.1") == (False, "calling-aet")
    assert p.check("CT2", "::ffff:127.0.0.1") == (True, "")
    assert AccessPolicy().check("ANY", "192.0.2.1") == (True, "")
    with pytest.raises(AccessError, match="allowed_ips"):
        AccessPolicy(allowed_ips=["10.1.2.300"])


def test_allowlist_with_storescu(tiny_bundle, tmp_path, study, caplog):
    cfg, a = _agent(tiny_bundle, tmp_path, **{"dicom.allowed_calling_aets": ["CT_OK"]})
    try:
        with caplog.at_level(logging.WARNING, logger="medqc.agent.access"):
            ok = _storescu(study, cfg.dicom.port, "CT_OK")
            assert ok.returncode == 0, ok.stderr
            bad = _storescu(study, cfg.dicom.port, "ROGUE")
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stderr or "rejected" in bad.stderr.lower(), bad.stderr
        # the receiver runs in its own process: its counters and log lines reach the agent over a pipe
        _wait(lambda: a.metrics.get("medqc_associations_rejected_total", reason="calling-aet") == 1)
        assert a.metrics.get("medqc_slices_received_total", source="dicom") == 3
        assert a.metrics.get("medqc_associations_rejected_total", reason="calling-aet") == 1
        _wait(lambda: any("calling-aet" in r.getMessage() and "ROGUE" in r.getMessage() for r in caplog.records))
        assert any("calling-aet" in r.getMessage() and "ROGUE" in r.getMessage() for r in caplog.records)
    finally:
        a.stop(2.0)
    cfg, a = _agent(tiny_bundle, tmp_path, **{"dicom.allowed_ips": ["192.0.2.0/24"]})
    try:
        r = _storescu(study, cfg.dicom.port, "CT_OK")
        assert r.returncode != 0
        _wait(lambda: a.metrics.get("medqc_associations_rejected_total", reason="source-ip") >= 1)
        assert a.metrics.get("medqc_associations_rejected_total", reason="source-ip") == 1
        assert a.metrics.get("medqc_slices_received_total", source="dicom") == 0
    finally:
        a.stop(2.0)


def _openssl(*args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not shutil.which("openssl"):
        missing_peer("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=medqc test CA", cwd=d)
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=127.0.0.1-{name}", cwd=d)
        (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return d


def test_tls_with_storescu(tiny_bundle, tmp_path, study, pki):
    cfg, a = _agent(tiny_bundle, tmp_path, **{"dicom.tls": {"enabled": True, "cert": str(pki / "server.pem"),
                                                            "key": str(pki / "server.key"), "ca": str(pki / "ca.pem")}})
    try:
        tls = ["+tls", str(pki / "client.key"), str(pki / "client.pem"), "+cf", str(pki / "ca.pem")]
        t0 = time.perf_counter()
        r = _storescu(study, cfg.dicom.port, "CT_TLS", *tls)
        assert r.returncode == 0, r.stderr
        print(f"3 slices over TLS in {time.perf_counter() - t0:.2f} s")
        _wait(lambda: a.metrics.get("medqc_slices_received_total", source="dicom") >= 3)
        assert a.metrics.get("medqc_slices_received_total", source="dicom") == 3
        plain = _storescu(study, cfg.dicom.port, "CT_PLAIN")  # no TLS against a TLS port: refused
        assert plain.returncode != 0
        anon = _storescu(study, cfg.dicom.port, "CT_ANON", "+tla", "+cf", str(pki / "ca.pem"))  # no client cert
        assert anon.returncode != 0
        assert a.metrics.get("medqc_slices_received_total", source="dicom") == 3
    finally:
        a.stop(2.0)


def test_tls_bad_files_are_a_usage_error(tmp_path):
    from medqc.agent.access import AccessError, from_config
    from medqc.config import load_config

    cfg = load_config(None, {"dicom.tls": {"enabled": True, "cert": str(tmp_path / "no.pem"), "key": str(tmp_path / "no.key")}})
    with pytest.raises(AccessError, match="dicom.tls"):
        from_config(cfg)


def test_max_associations_rejection_is_logged_and_counted(tiny_bundle, tmp_path, study, caplog):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    cfg, a = _agent(tiny_bundle, tmp_path, **{"dicom.max_associations": 1})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", cfg.dicom.port, ae_title="MEDQC")
    try:
        assert held.is_established
        with caplog.at_level(logging.WARNING, logger="medqc.agent.access"):
            r = _storescu(study, cfg.dicom.port, "CT_BUSY")
        assert r.returncode != 0
        # the receiver process reports the count over its pipe: it lands a moment after storescu returns
        _wait(lambda: a.metrics.get("medqc_associations_rejected_total", reason="max-associations") >= 1)
        assert a.metrics.get("medqc_associations_rejected_total", reason="max-associations") == 1
        _wait(lambda: any("max-associations" in rec.getMessage() and "CT_BUSY" in rec.getMessage() for rec in caplog.records))
    finally:
        held.release()
        a.stop(2.0)
    assert a.metrics.get("medqc_slices_received_total", source="dicom") == 0


def test_agent_with_unreadable_tls_files_exits_2(tiny_bundle, tmp_path):
    conf = tmp_path / "medqc.toml"
    conf.write_text(f'[dicom.tls]\nenabled = true\ncert = "{tmp_path}/no.pem"\nkey = "{tmp_path}/no.key"\n')
    r = subprocess.run([sys.executable, "-m", "medqc", "agent", "--config", str(conf), "--state-dir", str(tmp_path / "s"),
                        "--port", "0", "--http", "127.0.0.1:0", "--backend", "onnxruntime", "--bundle", str(tiny_bundle)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "dicom.tls: cannot load" in r.stderr and "no.pem" in r.stderr, r.stderr[-1000:]
