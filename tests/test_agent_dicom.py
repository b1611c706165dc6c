"""``medqc agent`` with real DICOM peers on loopback: DCMTK echoscu/storescu, a pynetdicom SCU (spool-full
refusal, MPPS completion, two series interleaved), and kill -9 in the middle of a study."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import need_tool  # noqa: E402

from medqc.tools.bench.harness import wait_port


EXPECTED = {54, 58}  # axial slices of the two tilted series in the real Philips study


class AgentProc:
    def __init__(self, tmp: Path, port: int, bundle: Path, idle_s: float = 1.0, min_free_mb: int = 0):
        self.tmp, self.port, self.bundle = tmp, port, bundle
        self.state = tmp / "state"
        self.cfg = tmp / "medqc.toml"
        self.cfg.write_text(f"[series]\nidle_timeout_s = {idle_s}\n[spool]\nmin_free_mb = {min_free_mb}\n"
                            "[http]\nenabled = false\n")
        self.out = tmp / f"out-{time.time_ns()}.jsonl"
        self.err = self.out.with_suffix(".log")
        self.proc = None

    def start(self, **extra_env):
        env = dict(os.environ, MEDQC_LOG_LEVEL="INFO", TCP_NODELAY="1", **extra_env)
        self.proc = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--port", str(self.port), "--state-dir",
                                      str(self.state), "--config", str(self.cfg), "--bundle", str(self.bundle),
                                      "--backend", "onnxruntime"],
                                     stdout=open(self.out, "w"), stderr=open(self.err, "w"), env=env)
        assert wait_port(self.port, 30.0, self.proc), self.err.read_text()
        return self

    def events(self, kind: str) -> list[dict]:
        out = []
        for line in self.out.read_text().splitlines():
            d = json.loads(line)
            if d.get("event") == kind:
                out.append(d)
        return out

    def wait_series(self, n: int, timeout: float = 60.0) -> list[dict]:
        end = time.time() + timeout
        while time.time() < end:
            s = self.events("series")
            if len(s) >= n:
                return s
            time.sleep(0.1)
        raise AssertionError(f"{len(self.events('series'))} verdict(s) after {timeout} s; log:\n" + self.err.read_text()[-3000:])

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def storescu(port: int, path: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = need_tool("storescu")
    return subprocess.run([exe, "-aec", "MEDQC", "+sd", "+r", "-nh", *extra, "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, TCP_NODELAY="1"))


def test_storescu_real_study_verdicts_store_and_spool(tmp_path, port, tiny_bundle, real_ct):
    echoscu = need_tool("echoscu")
    a = AgentProc(tmp_path, port, tiny_bundle).start()
    try:
        r = subprocess.run([echoscu, "-aec", "MEDQC", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, TCP_NODELAY="1"))
        assert r.returncode == 0, r.stderr
        storescu(port, real_ct)
        series = a.wait_series(2)
    finally:
        rc = a.stop()
    assert rc == 0
    assert {s["slices"] for s in series} == EXPECTED
    assert all(s["verdict"] in ("pass", "warn", "fail") and s["completed_reason"] == "idle" for s in series)
    tilt = [f for f in a.events("finding") if f["check"] == "geometry.tilt"]
    assert {f["series_instance_uid"] for f in tilt} == {s["series_instance_uid"] for s in series}
    db = sqlite3.connect(a.state / "medqc.sqlite")
    rows = db.execute("SELECT verdict, slices, report FROM series").fetchall()
    assert sorted(r[1] for r in rows) == sorted(EXPECTED) and all(r[0] for r in rows)
    rep = json.loads(rows[0][2])
    assert rep["per_slice"] and "scores" in rep["per_slice"][0]
    reasons = [r[0] for r in db.execute("SELECT reason FROM rejected")]
    assert any("localizer" in x for x in reasons) and any("not a CT image" in x for x in reasons)
    assert list((a.state / "spool" / "incoming").iterdir()) == []  # default retention: deleted after the verdict
    log = a.err.read_text() + a.out.read_text()
    assert "Doe" not in log and "PatientName" not in log


def test_kill9_mid_study_then_restart_loses_nothing(tmp_path, port, tiny_bundle, real_ct):
    a = AgentProc(tmp_path, port, tiny_bundle, idle_s=120.0).start()  # no verdict before the kill
    try:
        r = storescu(port, real_ct)
        assert "Store Response" not in r.stderr or "Success" in r.stderr or r.returncode in (0, 1)
    finally:
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
    assert a.events("series") == []
    spooled = list((a.state / "spool" / "incoming").iterdir())
    assert len(spooled) >= sum(EXPECTED)  # every acknowledged axial slice is on disk (a header-only copy never overwrites one)
    a.cfg.write_text("[series]\nidle_timeout_s = 1.0\n[spool]\nmin_free_mb = 0\n[http]\nenabled = false\n")
    b = AgentProc(tmp_path, port, tiny_bundle)
    b.state, b.cfg = a.state, a.cfg
    b.start()
    try:
        series = b.wait_series(2)
    finally:
        b.stop()
    assert {s["slices"] for s in series} == EXPECTED


def _receiver_pid(a: "AgentProc", timeout: float = 10.0) -> int:
    end = time.time() + timeout
    while time.time() < end:
        m = re.search(r"DICOM receiver running in process (\d+)", a.err.read_text())
        if m:
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError("no receiver process in the log:\n" + a.err.read_text()[-2000:])


def _gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of a dead parent counts as gone once reaped by init
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_killed_agent_leaves_no_receiver_holding_the_port(tmp_path, port, tiny_bundle):
    """The receiver runs in its own process: when the agent is killed (-9, no cleanup), the receiver sees
    its pipe close and exits, so the port is free for the restarted agent."""
    a = AgentProc(tmp_path, port, tiny_bundle).start()
    child = _receiver_pid(a)
    assert child != a.proc.pid
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    assert _gone(child), "the receiver process outlived the killed agent"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))  # free again


def test_receiver_process_death_stops_the_agent_non_zero(tmp_path, port, tiny_bundle):
    """If the receiver process dies on its own, the agent does not go on deaf: it stops with exit code 1
    (systemd's Restart=on-failure brings it back) and says why."""
    a = AgentProc(tmp_path, port, tiny_bundle).start()
    child = _receiver_pid(a)
    os.kill(child, signal.SIGKILL)
    try:
        rc = a.proc.wait(30)
    except subprocess.TimeoutExpired:
        a.proc.kill()
        raise AssertionError("the agent kept running without its receiver")
    assert rc == 1
    assert "receiver process ended unexpectedly" in a.err.read_text()


def _scu(port: int, contexts):
    from pynetdicom import AE

    ae = AE(ae_title="SCANNER")
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDQC")
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return assoc


def _real_series(real_ct: Path):
    import pydicom

    by = {}
    for p in sorted(real_ct.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p)
        except Exception:  # noqa: BLE001
            continue
        if ds.get("SOPClassUID") == "1.2.840.10008.5.1.4.1.1.2" and "LOCALIZER" not in ds.get("ImageType", []):
            by.setdefault(ds.SeriesInstanceUID, []).append(ds)
    return list(by.values())


def test_pynetdicom_interleaved_series_and_mpps_completion(tmp_path, port, tiny_bundle, real_ct):
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep

    s1, s2 = _real_series(real_ct)
    s1, s2 = s1[:10], s2[:12]
    a = AgentProc(tmp_path, port, tiny_bundle, idle_s=120.0).start()  # only MPPS can complete these quickly
    try:
        assoc = _scu(port, [CTImageStorage, ModalityPerformedProcedureStep])
        for k in range(max(len(s1), len(s2))):  # two series interleaved on one association
            for s in (s1, s2):
                if k < len(s):
                    st = assoc.send_c_store(s[k])
                    assert st.Status == 0x0000
        mpps_uid = generate_uid()
        create = Dataset()
        create.PerformedProcedureStepStatus = "IN PROGRESS"
        st, _ = assoc.send_n_create(create, ModalityPerformedProcedureStep, mpps_uid)
        assert st.Status == 0x0000
        mods = Dataset()
        mods.PerformedProcedureStepStatus = "COMPLETED"
        items = []
        for s in (s1, s2):
            it = Dataset()
            it.SeriesInstanceUID = s[0].SeriesInstanceUID
            items.append(it)
        mods.PerformedSeriesSequence = items
        t0 = time.time()
        st, _ = assoc.send_n_set(mods, ModalityPerformedProcedureStep, mpps_uid)
        assert st.Status == 0x0000
        assoc.release()
        series = a.wait_series(2, timeout=20)
        assert time.time() - t0 < 10
    finally:
        a.stop()
    got = {s["series_instance_uid"]: s for s in series}
    assert got[s1[0].SeriesInstanceUID]["slices"] == 10 and got[s2[0].SeriesInstanceUID]["slices"] == 12
    assert all(s["completed_reason"] == "mpps" for s in series)


def test_spool_below_watermark_answers_out_of_resources(tmp_path, port, tiny_bundle, real_ct):
    from pynetdicom.sop_class import CTImageStorage

    ds = _real_series(real_ct)[0][0]
    a = AgentProc(tmp_path, port, tiny_bundle, min_free_mb=10**9).start()
    try:
        assoc = _scu(port, [CTImageStorage])
        st = assoc.send_c_store(ds)
        assoc.release()
    finally:
        a.stop()
    assert 0xA700 <= st.Status <= 0xA7FF
    assert list((a.state / "spool" / "incoming").iterdir()) == []


def test_sd_notify_ready_and_graceful_sigint(tmp_path, port, tiny_bundle):
    sock_path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(20)
    a = AgentProc(tmp_path, port, tiny_bundle)
    try:
        a.start(NOTIFY_SOCKET=str(sock_path))
        msgs = [srv.recv(4096).decode()]
        assert msgs[0].startswith("READY=1")  # sent once listening with the model loaded
        a.proc.send_signal(signal.SIGINT)
        a.proc.wait(20)
        srv.settimeout(0.5)
        try:
            while True:
                msgs.append(srv.recv(4096).decode())
        except socket.timeout:
            pass
    finally:
        a.stop()
        srv.close()
    assert a.proc.returncode == 0
    assert any(m.startswith("STOPPING=1") for m in msgs)


def test_start_errors_name_their_cause(tmp_path, port, tiny_bundle):
    """A busy port and an unusable state directory are usage errors (exit 2) that say which is which."""
    env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = subprocess.run([sys.executable, "-m", "medqc", "agent", "--port", str(port), "--state-dir", str(blocker / "state"),
                        "--bundle", str(tiny_bundle)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stderr
    assert "cannot use the state directory" in r.stderr and "cannot listen" not in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))
        s.listen(1)
        r = subprocess.run([sys.executable, "-m", "medqc", "agent", "--port", str(port), "--state-dir", str(tmp_path / "st"),
                            "--bundle", str(tiny_bundle)], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2 and f"cannot listen on port {port}" in r.stderr, r.stderr
