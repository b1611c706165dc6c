"""A real ``medqc agent`` killed with SIGKILL at every step an instance goes through, then restarted on the
same state directory: nothing ACKed is lost, nothing is counted or reported twice.

The agent is armed with ``MEDQC_FAULT_POINT`` (agent/faults.py: it SIGKILLs its own processes when the
point is reached). DCMTK storescu sends a synthetic head series; a real DCMTK storescp is the destination of
the agent's DICOM SR. After the kill, the agent is started again without the fault, and storescu sends the
instances it had not had a Success for (as a scanner retries). Then, against an uninterrupted reference run
of the same series:

- every instance is in the store exactly once, the series has its verdict and counts each slice once;
- the findings are those of the reference run (none duplicated, none missing);
- the SR destination holds one report, the same SOP Instance UID as the reference run's;
- the spool is empty: nothing left in incoming/, .tmp/, kept/ or quarantine/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port, need_tool, run_ok  # noqa: E402

POINTS = {  # point (with the arrival that fires it) → what the sender sees at the kill
    "spool-written:3": "two instances ACKed, the third spooled and never answered",
    "acked:4": "four instances ACKed, the fifth arriving",
    "analysis": "every instance ACKed, the first batch inferred, not added to the series",
    "store-commit": "the verdict's transaction open in SQLite",
    "sr-send": "the SR association open, the report not sent",
}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    out = tmp_path_factory.mktemp("restart-study") / "head"
    run_ok([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "12", "--matrix", "128",
            "--seed", "5", "--short-bottom", "40", "--no-progress", str(out)], timeout=300)
    return sorted(out.glob("*.dcm"))


class SrDestination:
    """DCMTK storescp writing every report it receives (one file per SOP Instance UID) and logging each
    C-STORE request (every delivery, a repeated one included)."""

    def __init__(self, tmp: Path):
        self.dir = tmp / "sr-dest"
        self.dir.mkdir()
        self.port = free_port()
        self.log = tmp / "storescp.log"
        self.proc = subprocess.Popen([need_tool("storescp"), "-v", "-od", str(self.dir), "-aet", "PACS", str(self.port)],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=dict(os.environ, TCP_NODELAY="1"))

    def deliveries(self) -> int:
        return len(re.findall(r"Received Store Request", self.log.read_text()))

    def reports(self) -> list[str]:
        """SOP Instance UIDs of the reports held."""
        import pydicom

        return sorted(str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID) for p in self.dir.iterdir())

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


class AgentProcess:
    def __init__(self, tmp: Path, bundle: Path, sr_port: int):
        self.port, self.http = free_port(), free_port()
        self.state = tmp / "state"
        self.cfg = tmp / "medqc.toml"
        self.cfg.write_text(f'[series]\nidle_timeout_s = 4.0\n[http]\nbind = "127.0.0.1:{self.http}"\n'
                            f'[sinks.stdout]\nenabled = false\n'
                            f'[sinks.dicom]\nhost = "127.0.0.1"\nport = {sr_port}\ncalled_aet = "PACS"\n')
        self.tmp, self.bundle, self.runs = tmp, bundle, 0

    def start(self, fault: str = ""):
        self.runs += 1
        self.err = self.tmp / f"agent-{self.runs}.log"
        env = dict(os.environ, MEDQC_LOG_LEVEL="INFO", TCP_NODELAY="1")
        env.pop("MEDQC_FAULT_POINT", None)
        if fault:
            env["MEDQC_FAULT_POINT"] = fault
        self.proc = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--port", str(self.port), "--state-dir",
                                      str(self.state), "--config", str(self.cfg), "--bundle", str(self.bundle),
                                      "--backend", "onnxruntime"],
                                     stdout=subprocess.DEVNULL, stderr=open(self.err, "w"), env=env)
        end = time.time() + 90
        while time.time() < end:
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            if "medqc agent ready" in self.err.read_text():
                return self
            time.sleep(0.2)
        raise AssertionError("agent did not start: " + self.err.read_text()[-3000:])

    def analysed(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/metrics", timeout=10) as r:
            m = re.search(r"^medqc_slices_analysed_total (\S+)$", r.read().decode(), re.M)
        return float(m.group(1))

    def query(self, sql: str, args=()) -> list:
        con = sqlite3.connect(f"file:{self.state / 'medqc.sqlite'}?mode=ro", uri=True, timeout=30)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def wait_verdict(self, uid: str, n: int, timeout: float = 120) -> None:
        end = time.time() + timeout
        spool = self.state / "spool" / "incoming"
        while time.time() < end:
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            rows = self.query("SELECT verdict, slices FROM series WHERE uid = ?", (uid,))
            if rows and rows[0][0] and rows[0][1] == n and not any(spool.iterdir()):
                return
            time.sleep(0.2)
        raise AssertionError(f"no verdict for {n} slices: {rows} {list(spool.iterdir())[:3]} "
                             + self.err.read_text()[-2000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode


def _send(port: int, files: list[Path]) -> tuple[int, list[Path]]:
    """storescu (-v): its exit status and the files it had a Success response for."""
    r = subprocess.run([need_tool("storescu"), "-v", "-nh", "-aec", "MEDQC", "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, TCP_NODELAY="1"))
    acked, current = [], None
    for line in r.stderr.splitlines():
        if line.startswith("I: Sending file: "):
            current = line[len("I: Sending file: "):]
        elif line.startswith("I: Received Store Response (Success)") and current:
            acked.append(Path(current))
            current = None
    return r.returncode, acked


def _sop(p: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID)


def _findings(agent: AgentProcess, uid: str) -> list[tuple]:
    rows = agent.query("SELECT check_name, severity, body FROM findings WHERE series_uid = ?", (uid,))
    return sorted((c, s, json.loads(b).get("first_instance"), json.loads(b).get("last_instance")) for c, s, b in rows)


def _series_uid(files) -> str:
    import pydicom

    return str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bundle, series):
    """The same series through an agent that is never killed."""
    tmp = tmp_path_factory.mktemp("restart-ref")
    dest = SrDestination(tmp)
    agent = AgentProcess(tmp, tiny_bundle, dest.port).start()
    try:
        rc, acked = _send(agent.port, series)
        assert rc == 0 and len(acked) == len(series)
        uid = _series_uid(series)
        agent.wait_verdict(uid, len(series))
        time.sleep(1.0)  # the SR sink's thread
        findings = _findings(agent, uid)
        reports = dest.reports()
    finally:
        agent.stop()
        dest.stop()
    assert findings, "the reference series must raise a finding (else no SR is sent and sr-send is never reached)"
    assert len(reports) == 1
    return {"uid": uid, "findings": findings, "report": reports[0]}


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_at_each_step_then_restart_loses_and_duplicates_nothing(tmp_path, tiny_bundle, series, reference, point):
    dest = SrDestination(tmp_path)
    agent = AgentProcess(tmp_path, tiny_bundle, dest.port).start(fault=point)
    try:
        rc, acked = _send(agent.port, series)
        try:
            agent.proc.wait(60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{point} was never reached: " + agent.err.read_text()[-2000:]) from None
        assert agent.proc.returncode == -signal.SIGKILL, agent.err.read_text()[-2000:]
        name = point.split(":")[0]
        if name == "spool-written":
            assert rc != 0 and len(acked) == 2, (rc, len(acked))
            assert len(list((agent.state / "spool" / "incoming").iterdir())) == 3  # the third: spooled, not ACKed
        elif name == "acked":
            assert rc != 0 and len(acked) == 4, (rc, len(acked))
        else:
            assert rc == 0 and len(acked) == len(series), (rc, len(acked))
        if name in ("analysis", "store-commit", "sr-send"):
            assert dest.deliveries() == 0 or name == "store-commit"

        agent.start()  # same state dir, no fault
        rest = [f for f in series if f not in acked]
        if rest:  # the sender retries what it had no Success for
            rc2, acked2 = _send(agent.port, rest)
            assert rc2 == 0 and len(acked2) == len(rest)
        uid = reference["uid"]
        agent.wait_verdict(uid, len(series))
        time.sleep(1.0)  # the SR sink's thread

        sops = [r[0] for r in agent.query("SELECT sop_uid FROM slices WHERE series_uid = ?", (uid,))]
        assert sorted(sops) == sorted(_sop(f) for f in series)  # every instance, each once
        # the restarted agent analysed the series once; after spool-written the third instance is there twice
        # (spooled before the kill, and resent as the sender never had its response): one more analysis,
        # still one slice in the series and in the store
        assert agent.analysed() == len(series) + (name == "spool-written"), agent.analysed()
        assert _findings(agent, uid) == reference["findings"]
        assert dest.reports() == [reference["report"]]
        # a report that left before the kill (the SR sink runs beside the store's commit) is sent again,
        # as the same instance; otherwise it is delivered once
        assert dest.deliveries() == 1 or (name == "store-commit" and dest.deliveries() == 2), dest.deliveries()
        spool = agent.state / "spool"
        left = [p for d in ("incoming", ".tmp", "kept", "quarantine") if (spool / d).is_dir() for p in (spool / d).iterdir()]
        assert not left, left
        assert agent.stop() == 0
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
        dest.stop()
