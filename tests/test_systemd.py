"""systemd citizenship: the shipped unit passes ``systemd-analyze verify`` and is hardened; ``medqc agent``
run with NOTIFY_SOCKET (abstract and path sockets) sends READY=1, WATCHDOG=1 and STOPPING=1; a real
SIGTERM in the middle of a series loses no acknowledged instance (analysed, or kept and resumed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import free_port, missing_peer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "medqc-agent.service"


def _unit_settings() -> dict:
    out: dict = {}
    for ln in UNIT.read_text().splitlines():
        if ln and not ln.startswith(("#", "[")) and "=" in ln:
            k, v = ln.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_unit_is_hardened():
    s = _unit_settings()
    for key, value in {"Type": "notify", "NotifyAccess": "main", "DynamicUser": "yes", "StateDirectory": "medqc",
                       "ProtectSystem": "strict", "NoNewPrivileges": "yes", "Restart": "on-failure",
                       "WatchdogSec": "30"}.items():
        assert s.get(key) == [value], key
    assert "TimeoutStopSec" in s
    assert s["ExecStart"][0].endswith("medqc agent --config /etc/medqc/medqc.toml")
    assert "AmbientCapabilities" not in s  # only when binding port 104 (commented out)


def test_unit_verifies(tmp_path):
    exe = shutil.which("systemd-analyze")
    if not exe:
        missing_peer("systemd-analyze is not installed (.ci/run installs systemd)")
    medqc = Path(sys.executable).with_name("medqc")
    if not medqc.exists():
        missing_peer("the medqc console script is not installed in this environment (pip install -e .)")
    unit = tmp_path / "medqc-agent.service"
    unit.write_text(UNIT.read_text().replace("ExecStart=/usr/bin/env medqc", f"ExecStart={medqc}"))
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "medqc-agent.service" not in r.stderr, r.stderr


def test_notify_module(tmp_path):
    from medqc.agent.notify import notify, watchdog_interval_s

    assert notify("READY=1", env={}) is False  # outside systemd: a no-op
    name = f"@medqc-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name[1:])
        assert notify("READY=1\nSTATUS=x", env={"NOTIFY_SOCKET": name})
        assert s.recv(100) == b"READY=1\nSTATUS=x"
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    out = tmp_path_factory.mktemp("systemd-study") / "chest"
    r = subprocess.run([sys.executable, "-m", "medqc", "synth", "--region", "chest", "--slices", "60", "--matrix", "64",
                        "--seed", "5", "--no-progress", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def _recv_until(sock, wanted: str, timeout: float, seen: list) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            break
        seen.append(msg)
        if wanted in msg:
            return
    raise AssertionError(f"no {wanted} within {timeout} s; got {seen}")


def _agent_cmd(tiny_bundle, state, port):
    return [sys.executable, "-m", "medqc", "agent", "--port", str(port), "--state-dir", str(state),
            "--http", f"127.0.0.1:{free_port()}", "--backend", "onnxruntime", "--bundle", str(tiny_bundle)]


def test_notify_and_sigterm_mid_series_loses_nothing(tiny_bundle, tmp_path, series):
    storescu = dcmtk("storescu")
    if not storescu:
        missing_peer("storescu (dcmtk) is not installed (.ci/run installs it)")
    state, port = tmp_path / "state", free_port()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "TCP_NODELAY": "1"}
    agent = subprocess.Popen(_agent_cmd(tiny_bundle, state, port), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    seen: list = []
    try:
        _recv_until(sock, "READY=1", 120, seen)
        _recv_until(sock, "WATCHDOG=1", 5, seen)
        files = sorted(str(p) for p in series.glob("*.dcm"))
        acked = 0
        for i, f in enumerate(files):  # one association per slice, like a slow scanner
            if i == 20:
                agent.send_signal(signal.SIGTERM)  # mid-series, while slices are still being analysed
            r = subprocess.run([storescu, "-aet", "CT_TEST", "-aec", "MEDQC", "127.0.0.1", str(port), f], env=env,
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                break
            acked += 1
        _recv_until(sock, "STOPPING=1", 15, seen)
        out, err = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
        sock.close()
    assert agent.returncode == 0, err[-2000:]
    assert 20 <= acked < len(files)
    print(f"SIGTERM after {acked}/{len(files)} acknowledged slices")

    # restart: whatever was acknowledged but not analysed is resumed from the spool
    agent2 = subprocess.Popen(_agent_cmd(tiny_bundle, state, port), env={**os.environ}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        db = state / "medqc.sqlite"
        deadline, n = time.monotonic() + 90, -1
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                with sqlite3.connect(db, timeout=5) as c:
                    n = c.execute("SELECT COUNT(DISTINCT sop_uid) FROM slices").fetchone()[0]
            except sqlite3.Error:
                continue
            if n >= acked:
                break
    finally:
        agent2.send_signal(signal.SIGTERM)
        agent2.communicate(timeout=60)
    assert n >= acked, (n, acked)


def _bytes(v: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(v[:-1]) * units[v[-1]]) if v[-1] in units else int(v)


def test_unit_limits_leave_headroom_over_the_soak():
    """MemoryHigh/MemoryMax/TasksMax are set, ordered, and leave headroom over what the committed 4-sender soak
    (bench/results/soak-cpu-2core.json) measured for the agent and its receiver process."""
    import json

    s = _unit_settings()
    high, top, tasks = _bytes(s["MemoryHigh"][0]), _bytes(s["MemoryMax"][0]), int(s["TasksMax"][0])
    soak = json.loads((ROOT / "bench" / "results" / "soak-cpu-2core.json").read_text())
    peak_rss = soak["agent"]["rss_mib"]["peak"] * (1 << 20)
    assert peak_rss * 1.5 <= high < top
    assert tasks >= 4 * soak["agent"]["threads"]["peak"]
