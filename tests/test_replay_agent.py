"""medqc replay against a running medqc agent: the latency figures come from the agent's HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _load(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_replay_measures_agent_latency(tmp_path, tiny_bundle):
    from medqc.tools.bench.harness import AgentProcess
    from medqc.tools.bench.study import write_phantom_series

    files = write_phantom_series(tmp_path / "study", 20)
    agent = AgentProcess(tmp_path / "agent", str(tiny_bundle), inference=True)
    why = agent.start()
    assert not why, f"the agent did not start: {why}"
    if not agent.http_up:
        agent.stop()
        pytest.fail(f"the agent serves no HTTP API (replay's --agent-url needs it): {agent.tail()}")
    try:
        out = tmp_path / "r.json"
        png = tmp_path / "r.png"
        env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING")
        r = subprocess.run([sys.executable, "-m", "medqc", "replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{agent.port}",
                            "--rate", "60", "--agent-url", agent.url, "--agent-wait", "20", "--json", str(out), "--plot", str(png)],
                           capture_output=True, text=True, timeout=120, env=env)
    finally:
        agent.stop()
    assert r.returncode == 0, r.stdout + r.stderr + agent.tail()
    doc = json.loads(out.read_text())
    assert doc["transport"]["sent"] == 20
    a = doc["agent"]
    s = a["series"][0]
    assert s["verdict"] in ("pass", "warn", "fail") and s["slices_reported"] == 20
    assert a["slice_to_result_ms"]["n"] == 20 and 0 < a["slice_to_result_ms"]["p50"] < 5000
    assert a["last_slice_to_verdict_s"]["n"] == 1 and 0 <= a["last_slice_to_verdict_s"]["max"] < 20
    assert "slice arrival → result" in r.stdout and "last slice → verdict" in r.stdout
    assert png.stat().st_size > 5000


def test_replay_real_vendor_study_into_agent(tmp_path, tiny_bundle, real_ct):
    """The Philips study: two tilted axial series get verdicts; the localizer and the secondary captures are
    rejected by the agent, noted by replay, and not waited for."""
    from medqc.tools.bench.harness import AgentProcess

    agent = AgentProcess(tmp_path / "agent", str(tiny_bundle), inference=True)
    why = agent.start()
    assert not why, f"the agent did not start: {why}"
    if not agent.http_up:
        agent.stop()
        pytest.fail(f"the agent serves no HTTP API (replay's --agent-url needs it): {agent.tail()}")
    try:
        out = tmp_path / "r.json"
        r = subprocess.run([sys.executable, "-m", "medqc", "replay", str(real_ct), "--to", f"127.0.0.1:{agent.port}", "--asap",
                            "--agent-url", agent.url, "--agent-wait", "30", "--ignore-non-dicom", "--json", str(out)],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, MEDQC_LOG_LEVEL="WARNING"))
    finally:
        agent.stop()
    assert r.returncode == 0, r.stdout + r.stderr + agent.tail()
    a = json.loads(out.read_text())["agent"]
    with_verdict = [s for s in a["series"] if s["verdict"]]
    assert len(with_verdict) == 2 and {s["slices_reported"] for s in with_verdict} == {54, 58}
    assert len(a["series_not_analysed"]) == 2
    assert a["slice_to_result_ms"]["n"] == 112
