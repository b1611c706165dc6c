"""Reliability of a real ``medqc agent`` process (tiny ONNX bundle, receiver in its own process) when its
disk fills up: the spool on a real tmpfs of a known size, filled with ballast until below the reserve, and
made read-only; DCMTK storescu as the scanner. While C-STOREs are refused, /healthz answers 503 with the
reason and /metrics shows ``medqc_refusing{reason}`` and ``medqc_stores_refused_total{reason}``; once
space returns it accepts again by itself, without a restart."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, missing_peer, need_tool, run_ok  # noqa: E402

MB = 1024 * 1024


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel-study") / "head"
    run_ok([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "8", "--matrix", "128",
          "--seed", "5", "--no-progress", str(out)], timeout=300)
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """A real tmpfs of 40 MiB: a disk whose free space the test controls exactly (mounting needs root)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        missing_peer(f"cannot mount a tmpfs (root needed): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^{name}{{{re.escape(want)}}} (\S+)$" if want else rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class AgentProcess:
    """`medqc agent` as a real subprocess on loopback ports, with its spool where the test puts it."""

    def __init__(self, tmp: Path, bundle: Path, spool: Path, min_free_mb: int):
        self.port, self.http = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.http}"
        self.tmp, self.bundle = tmp, bundle
        self.cfg = tmp / "medqc.toml"
        self.cfg.write_text(f'[series]\nidle_timeout_s = 1.0\n[spool]\ndir = "{spool}"\nmin_free_mb = {min_free_mb}\n'
                            f'[http]\nbind = "127.0.0.1:{self.http}"\n')
        self.out, self.err = tmp / "agent.jsonl", tmp / "agent.log"

    def start(self):
        env = dict(os.environ, MEDQC_LOG_LEVEL="INFO", TCP_NODELAY="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--port", str(self.port), "--state-dir",
                                      str(self.tmp / "state"), "--config", str(self.cfg), "--bundle", str(self.bundle),
                                      "--backend", "onnxruntime"],
                                     stdout=open(self.out, "w"), stderr=open(self.err, "w"), env=env)
        end = time.time() + 60
        while time.time() < end:
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            try:
                status, _ = _get(self.base + "/healthz", timeout=2)
                if status in (200, 503) and self.receiver_up():
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("agent did not start: " + self.err.read_text()[-3000:])

    def receiver_up(self) -> bool:
        return "medqc agent ready" in self.err.read_text()

    def health(self) -> tuple[int, dict]:
        status, body = _get(self.base + "/healthz")
        return status, json.loads(body)

    def wait_health(self, status: int, timeout: float = 10.0) -> dict:
        end = time.time() + timeout
        while True:
            got, body = self.health()
            if got == status or time.time() > end:
                assert got == status, (got, body, self.err.read_text()[-2000:])
                return body
            time.sleep(0.1)

    def metrics(self) -> str:
        return _get(self.base + "/metrics")[1].decode()

    def series(self) -> list[dict]:
        return [d for d in map(json.loads, self.out.read_text().splitlines()) if d.get("event") == "series"]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess:
    exe = need_tool("storescu")
    return subprocess.run([exe, "-v", "-nh", "-aec", "MEDQC", "127.0.0.1", str(port), *map(str, files)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, TCP_NODELAY="1"))


def _ballast(disk: Path, leave: int) -> Path:
    """Fill the tmpfs until ``leave`` bytes are free."""
    p = disk / "ballast"
    size = shutil.disk_usage(disk).free - leave
    with open(p, "wb") as f:
        for _ in range(size // MB):
            f.write(b"\0" * MB)
        f.write(b"\0" * (size % MB))
    return p


def test_full_disk_refuses_says_why_and_recovers(tmp_path, tmpfs, tiny_bundle, study):
    files = sorted(study.glob("*.dcm"))
    spool = tmpfs / "spool"
    a = AgentProcess(tmp_path, tiny_bundle, spool, min_free_mb=16).start()
    try:
        assert a.wait_health(200)["status"] == "ok"
        m = a.metrics()
        assert _metric(m, "medqc_refusing", reason="spool-disk-low") == 0
        ballast = _ballast(tmpfs, 8 * MB)  # 8 MiB free < the 16 MiB reserve
        body = a.wait_health(503, timeout=5)
        assert body["status"] == "refusing"
        free_mb = shutil.disk_usage(tmpfs).free // MB
        assert body["reason"] == f"spool disk below reserve: {free_mb} MB free < 16 MB", body
        assert set(body["reasons"]) == {"spool-disk-low"}
        r = _storescu(a.port, files)  # -nh: it goes on after a refusal, as a scanner's queue does
        assert r.stderr.count("Refused: OutOfResources") == len(files), r.stderr[-2000:]
        assert list((spool / "incoming").iterdir()) == []
        m = a.metrics()
        assert _metric(m, "medqc_refusing", reason="spool-disk-low") == 1
        assert _metric(m, "medqc_stores_refused_total", reason="spool-full") == len(files)
        assert _metric(m, "medqc_slices_received_total", source="dicom") == 0
        assert a.health()[0] == 503  # still refusing: nothing changed on the disk

        ballast.unlink()  # space returns: accepted again with no restart
        t0 = time.time()
        assert a.wait_health(200, timeout=5)["status"] == "ok"
        took = time.time() - t0
        print(f"healthy again {took:.2f} s after the space returned")
        m = a.metrics()
        assert _metric(m, "medqc_refusing", reason="spool-disk-low") == 0
        r = _storescu(a.port, files)
        assert r.returncode == 0 and "Refused" not in r.stderr, r.stderr[-2000:]
        end = time.time() + 60
        while not a.series() and time.time() < end:
            time.sleep(0.2)
        assert [s["slices"] for s in a.series()] == [len(files)]
        m = a.metrics()
        assert _metric(m, "medqc_slices_received_total", source="dicom") == len(files)
        assert _metric(m, "medqc_stores_refused_total", reason="spool-full") == len(files)  # no more refusals
    finally:
        rc = a.stop()
    assert rc == 0
    log = a.err.read_text()
    assert "refusing C-STOREs (0xA700" in log and "spool disk below reserve" in log, log[-3000:]
    assert "accepting C-STOREs again: spool-disk-low" in log
    assert took < 5


def test_spool_write_errors_refuse_then_recover(tmp_path, tmpfs, tiny_bundle, study):
    """The disk has room but writes fail (the file system went read-only): refused as a write error, and
    healthy again once an instance is stored."""
    files = sorted(study.glob("*.dcm"))
    spool = tmpfs / "spool"
    a = AgentProcess(tmp_path, tiny_bundle, spool, min_free_mb=1).start()
    try:
        a.wait_health(200)
        run_ok(["mount", "-o", "remount,ro", str(tmpfs)])
        try:
            r = _storescu(a.port, files[:2])
            assert r.stderr.count("Refused: OutOfResources") == 2, r.stderr[-2000:]
            body = a.wait_health(503, timeout=5)
            assert set(body["reasons"]) == {"spool-write-error"}, body
            assert body["reason"].startswith("spool writes failing: 2 C-STORE(s) refused"), body
            m = a.metrics()
            assert _metric(m, "medqc_refusing", reason="spool-write-error") == 1
            assert _metric(m, "medqc_stores_refused_total", reason="spool-write-error") == 2
        finally:
            run_ok(["mount", "-o", "remount,rw", str(tmpfs)])
        r = _storescu(a.port, files)
        assert r.returncode == 0 and "Refused" not in r.stderr, r.stderr[-2000:]
        assert a.wait_health(200, timeout=5)["status"] == "ok"
        assert _metric(a.metrics(), "medqc_refusing", reason="spool-write-error") == 0
    finally:
        a.stop()
    log = a.err.read_text()
    assert "spool write failed" in log and "Read-only file system" in log, log[-3000:]
    assert "accepting C-STOREs again: spool-write-error" in log


def test_damaged_spool_files_found_at_start_are_quarantined(tmp_path, tiny_bundle, study):
    """A real agent started on a spool holding a study and damaged files (empty, random bytes, zeros, cut in
    the file meta, cut before the series is named): the damaged ones go to spool/quarantine/ unchanged with
    one log line each naming the file and why, the study is analysed; a file cut in its pixel data names its
    series and is judged there as any truncated instance is (kept/). A second start finds nothing to do."""
    import pydicom

    files = sorted(study.glob("*.dcm"))
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copy(f, incoming / f"{f.stem}.{i:04x}.dcm")
    data = files[0].read_bytes()
    damaged = {"empty.1.dcm": b"", "random.2.dcm": os.urandom(20000), "zeros.3.dcm": b"\0" * len(data),
               "meta-only.4.dcm": data[:300], "before-series.5.dcm": data[:1000]}
    for name, b in damaged.items():
        (incoming / name).write_bytes(b)
    (incoming / "pixels-cut.6.dcm").write_bytes(data[:len(data) // 2])
    a = AgentProcess(tmp_path, tiny_bundle, tmp_path / "spool", min_free_mb=0).start()
    try:
        end = time.time() + 60
        while not a.series() and time.time() < end:
            time.sleep(0.2)
        m = a.metrics()
    finally:
        assert a.stop() == 0
    assert [s["slices"] for s in a.series()] == [len(files)]
    quarantine = tmp_path / "spool" / "quarantine"
    assert {p.name: p.read_bytes() for p in quarantine.iterdir()} == damaged  # moved, not altered
    assert list(incoming.iterdir()) == []
    assert [p.name for p in (tmp_path / "spool" / "kept").iterdir()] == ["pixels-cut.6.dcm"]
    assert _metric(m, "medqc_slices_rejected_total", reason="quarantined") == len(damaged)
    log = a.err.read_text()
    lines = [ln for ln in log.splitlines() if "quarantined in" in ln]
    assert len(lines) == len(damaged), log[-3000:]
    for name in damaged:
        (line,) = [ln for ln in lines if f"spool file {name} quarantined in {quarantine}: found at start, " in ln]
        want = "names no series" if name == "meta-only.4.dcm" else "truncated file" if name == "before-series.5.dcm" \
            else "not a DICOM file"
        assert want in line, line
    ds = pydicom.dcmread(files[0])
    for ident in (str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)):
        assert ident not in log + a.out.read_text()

    b = AgentProcess(tmp_path, tiny_bundle, tmp_path / "spool", min_free_mb=0)  # restart: quarantine is left alone
    b.out, b.err = tmp_path / "agent2.jsonl", tmp_path / "agent2.log"
    b.start()
    try:
        assert b.wait_health(200)["status"] == "ok"
        time.sleep(1.0)
    finally:
        assert b.stop() == 0
    assert "quarantined" not in b.err.read_text() and "resuming" not in b.err.read_text()
    assert len(list(quarantine.iterdir())) == len(damaged)


def test_malformed_associations_do_not_stop_a_scanner(tmp_path, tiny_bundle, study):
    """Raw sockets against a real agent: an A-ASSOCIATE-RQ cut short and left hanging, a PDU whose length
    field is smaller than what follows, one that announces 4 GiB, an unknown PDU type, a connection that
    never sends a byte, and a real association that never releases. Meanwhile DCMTK storescu sends a study:
    every C-STORE succeeds and the series gets its verdict; the agent stays healthy."""
    import socket

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    files = sorted(study.glob("*.dcm"))
    a = AgentProcess(tmp_path, tiny_bundle, tmp_path / "spool", min_free_mb=0).start()
    socks = []
    held = None
    try:
        a.wait_health(200)
        called = b"MEDQC".ljust(16)
        bad = {
            "cut-short associate": b"\x01\x00" + (200).to_bytes(4, "big") + b"\x00\x01\x00\x00" + called,
            "length smaller than its content": b"\x01\x00" + (4).to_bytes(4, "big") + b"\xff" * 300,
            "4 GiB announced": b"\x04\x00\xff\xff\xff\xff" + b"\x00" * 100,
            "unknown PDU type": b"\x99\x00" + (2).to_bytes(4, "big") + b"ab",
            "silent": b"",
        }
        for payload in bad.values():
            s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
            if payload:
                s.sendall(payload)
            socks.append(s)
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        held = ae.associate("127.0.0.1", a.port, ae_title="MEDQC")
        assert held.is_established
        assert held.send_c_echo().Status == 0x0000  # then it never releases
        t0 = time.time()
        r = _storescu(a.port, files)
        took = time.time() - t0
        assert r.returncode == 0 and r.stderr.count("Received Store Response (Success)") == len(files), r.stderr[-2000:]
        end = time.time() + 60
        while not a.series() and time.time() < end:
            time.sleep(0.2)
        assert [s["slices"] for s in a.series()] == [len(files)]
        assert held.is_established  # the idle association is still there: nothing was sacrificed for the scanner
        assert a.wait_health(200)["status"] == "ok"
        assert _metric(a.metrics(), "medqc_slices_received_total", source="dicom") == len(files)
        print(f"{len(files)} C-STOREs through in {took:.2f} s beside {len(bad) + 1} malformed or idle connections")
    finally:
        for s in socks:
            s.close()
        if held is not None:
            held.abort()
        assert a.stop() == 0
    assert a.proc.returncode == 0


def test_connections_that_never_finish_their_request_free_their_slot(tmp_path, tiny_bundle, study):
    """More connections than dicom.max_associations (16), each silent or stopped inside its A-ASSOCIATE-RQ:
    while they hold every slot a scanner is rejected (transient, it retries); each is dropped after
    ASSOCIATE_RQ_TIMEOUT_S, and the scanner's retry then gets all its C-STOREs through while the peers still
    hold their sockets open."""
    import socket

    from medqc.agent.ingest.receiver import ASSOCIATE_RQ_TIMEOUT_S

    files = sorted(study.glob("*.dcm"))
    a = AgentProcess(tmp_path, tiny_bundle, tmp_path / "spool", min_free_mb=0).start()
    socks = []
    try:
        a.wait_health(200)
        for i in range(20):
            s = socket.create_connection(("127.0.0.1", a.port), timeout=5)
            if i % 2:
                s.sendall(b"\x01\x00" + (200).to_bytes(4, "big") + b"\x00\x01\x00\x00")
            socks.append(s)
        time.sleep(0.5)
        r = _storescu(a.port, files)
        assert r.returncode != 0 and "Association Rejected" in r.stderr, r.stderr[-2000:]
        t0 = time.time()
        while True:
            time.sleep(0.5)
            r = _storescu(a.port, files)
            if r.returncode == 0 or time.time() - t0 > ASSOCIATE_RQ_TIMEOUT_S + 10:
                break
        waited = time.time() - t0
        assert r.returncode == 0 and r.stderr.count("Received Store Response (Success)") == len(files), r.stderr[-2000:]
        assert waited < ASSOCIATE_RQ_TIMEOUT_S + 5
        print(f"scanner through {waited:.1f} s after 20 stuck connections took every slot")
    finally:
        for s in socks:
            s.close()
        assert a.stop() == 0
    assert "association rejected (max-associations)" in a.err.read_text()
