"""agent/workers.py: the slice analysis in worker processes (``analysis.workers``), with real processes, the
tiny real ONNX model and real DICOM peers.

- the pool analyses a series exactly as the pipeline's own thread does (the reports equal, timestamps aside),
  synthetic and on the real Philips chest;
- a worker killed with SIGKILL mid-series is replaced, and every slice is analysed exactly once;
- a poison slice (``MEDQC_FAULT_POINT=worker-crash:<uid>`` kills each worker that analyses it) becomes
  ``input.undecodable`` for that slice alone in a real agent, which keeps its spool file and analyses the rest;
- ``analysis.workers`` is validated at load;
- SIGTERM stops an agent with workers cleanly, leaving no process behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import missing_real_ct, need_tool, run_ok

from medqc.config import ConfigError, load_config


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    """A synthetic chest with metal on some slices (findings to compare, not only scores)."""
    out = tmp_path_factory.mktemp("workers-study") / "chest"
    run_ok([sys.executable, "-m", "medqc", "synth", "--region", "chest", "--slices", "24", "--matrix", "256",
            "--seed", "11", "--artifact", "metal:0.8@8-12", "--no-progress", str(out)], timeout=600)
    return sorted(out.glob("*.dcm"))


def _cfg(workers, **more):
    return load_config(None, {"analysis.workers": workers, "sinks.stdout.enabled": False, **more})


def _without_times(x):
    """A report without its clock readings (received_at, analysed_at, completed_at, ...)."""
    if isinstance(x, dict):
        return {k: _without_times(v) for k, v in x.items() if not k.endswith("_at")}
    if isinstance(x, list):
        return [_without_times(v) for v in x]
    return x


def _reports(paths, bundle, caplog) -> tuple[dict, dict]:
    """``medqc analyze``'s report with the analysis on the main thread and in two worker processes (``bundle``
    None: the bundled model)."""
    import logging

    from medqc.agent.analyze import analyze

    bundle = str(bundle) if bundle is not None else None
    inline = analyze([str(p) for p in paths], _cfg(0), bundle, "onnxruntime")
    with caplog.at_level(logging.INFO, logger="medqc.agent.workers"):
        pooled = analyze([str(p) for p in paths], _cfg(2), bundle, "onnxruntime")
    ready = [r for r in caplog.records if "ready" in r.getMessage() and r.name == "medqc.agent.workers"]
    assert len(ready) == 2, "the pool did not start its two workers"
    return inline, pooled


def test_pool_analyses_a_series_as_the_pipeline_thread_does(series, tiny_bundle, caplog):
    inline, pooled = _reports(series, tiny_bundle, caplog)
    [s] = inline["series"]
    assert s["slices"] == len(series) and all(row["scores"] for row in s["per_slice"])
    assert any(f["check"] == "artifact.metal" for f in s["findings"]), s["findings"]
    assert _without_times(pooled) == _without_times(inline)


def test_pool_analyses_the_real_chest_as_the_pipeline_thread_does(caplog):
    root = os.environ.get("MEDQC_REAL_CT")
    chest = Path(root or Path(__file__).resolve().parents[2] / "shared" / "real-ct") / "philips-bigbore-chest-patient"
    if not chest.is_dir():
        missing_real_ct(f"the real Philips chest is not at {chest} (set MEDQC_REAL_CT)")
    files = sorted(p for p in chest.rglob("*") if p.is_file() and not p.name.startswith(("LICENSE", "README")))
    inline, pooled = _reports(files, None, caplog)  # the bundled model on real CT
    assert sum(s["slices"] for s in inline["series"]) == 141
    assert _without_times(pooled) == _without_times(inline)


def test_medqc_analyze_command_with_workers(tmp_path, series, tiny_bundle):
    """The installed ``medqc`` command (a console script: the workers are spawned from its main module) with
    ``analysis.workers = 2`` prints the report it prints with 0."""
    medqc = Path(sys.executable).parent / "medqc"
    assert medqc.is_file(), "the medqc command is not installed beside this interpreter"
    reports = []
    for w in (0, 2):
        cfg = tmp_path / f"w{w}.toml"
        cfg.write_text(f"[analysis]\nworkers = {w}\n")
        r = subprocess.run([str(medqc), "analyze", *map(str, series), "--json", "--no-progress", "--config", str(cfg),
                            "--bundle", str(tiny_bundle), "--backend", "onnxruntime"], capture_output=True, text=True, timeout=300)
        assert r.returncode in (0, 1), r.stderr[-2000:]
        assert ("analysis process" in r.stderr) == (w > 0), r.stderr[-2000:]
        reports.append(_without_times(json.loads(r.stdout)))
    assert reports[0] == reports[1] and reports[0]["series"][0]["slices"] == len(series)


class Recorder:
    name = "recorder"
    spool_waits = True
    blocking = True

    def __init__(self):
        self.slices = []
        self.first = threading.Event()

    def on_slice(self, event):
        self.slices.append(event.result)
        self.first.set()

    def on_finding(self, finding):
        pass

    def on_series(self, series):
        pass

    def close(self):
        pass


def _pipeline(cfg, bundle, workers, sinks=()):
    from medqc.agent.pipeline import Pipeline, build_analysis

    inferer, tracker = build_analysis(cfg, str(bundle), "onnxruntime", workers=workers)
    return Pipeline(cfg, inferer, tracker, sinks=list(sinks))


def test_a_worker_killed_mid_series_is_replaced_and_no_slice_is_lost_or_duplicated(series, tiny_bundle):
    cfg = _cfg(2)
    rec = Recorder()
    pipe = _pipeline(cfg, tiny_bundle, 2, [rec])
    pool = pipe.pool
    pool.warm_up()
    first = pool.pids()
    assert len(first) == 2 and all(Path(f"/proc/{p}").exists() for p in first)
    pipe.start()
    try:
        # the files reach the workers as soon as they are queued: kill the first worker while it holds some
        for f in series:
            pipe.submit(f)
        deadline = time.time() + 10
        while not any(w.tasks for w in list(pool._workers)) and time.time() < deadline:  # noqa: SLF001
            time.sleep(0.001)
        victim = next(w for w in list(pool._workers) if w.tasks)  # noqa: SLF001
        held = sum(len(t.items) for t in victim.tasks.values())
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.time() + 120
        while not pipe.idle() and time.time() < deadline:
            time.sleep(0.05)
        assert pipe.idle(), "the series was not analysed after the kill"
        pipe.flush_sinks(10)
        assert pool.replaced == 1 and victim.pid not in pool.pids() and len(pool.pids()) == 2
        sops = [r.info.sop_instance_uid for r in rec.slices]
        want = sorted(str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in series)
        assert sorted(sops) == want, f"lost or duplicated slices ({held} were held by the killed worker)"
        assert not [r.error for r in rec.slices if r.error]
        assert held >= 1
    finally:
        pipe.stop(5.0)
    assert not [p for p in first if _alive(p)]  # the killed one and the one closed with the pool


def _alive(pid: int) -> bool:
    """A process that runs (not gone, not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_that_cannot_start_stop_the_agent_and_lose_nothing(tmp_path, series, tiny_bundle):
    """The bundle removed under a running agent: the killed worker's replacements cannot load it; after three
    in a row the pipeline calls ``on_failed`` (the agent then exits 1 for systemd to restart it), and the
    files it was given are still waiting (in the spool, for the next start), none reported."""
    import shutil

    from medqc.agent.pipeline import Pipeline, build_analysis

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    cfg = _cfg(1)
    failed = threading.Event()
    rec = Recorder()
    inferer, tracker = build_analysis(cfg, str(bundle), "onnxruntime", workers=1)
    pipe = Pipeline(cfg, inferer, tracker, sinks=[rec], on_failed=failed.set)
    pipe.pool.warm_up()
    pipe.start()
    try:
        shutil.rmtree(bundle)
        os.kill(pipe.pool.pids()[0], signal.SIGKILL)
        for f in series[:4]:
            pipe.submit(f)
        assert failed.wait(120), "the pool did not give up"
        assert "die before they are ready" in pipe.pool.failed and not pipe.idle()
        pipe.flush_sinks(5)
        assert rec.slices == []  # nothing analysed, nothing reported undecodable: all still to do
    finally:
        pipe.stop(1.0)


def test_the_pool_keeps_slice_order_per_series(series, tiny_bundle):
    """Outcomes are applied in submission order whichever worker finishes first."""
    rec = Recorder()
    pipe = _pipeline(_cfg(2, **{"inference.max_batch": 1}), tiny_bundle, 2, [rec])
    pipe.inferer.warm_up()
    pipe.start()
    try:
        for f in series:
            pipe.submit(f)
        deadline = time.time() + 120
        while not pipe.idle() and time.time() < deadline:
            time.sleep(0.05)
        pipe.flush_sinks(10)
        got = [r.info.source for r in rec.slices]
        assert got == [str(f) for f in series]
    finally:
        pipe.stop(5.0)


def _agent(tmp, tiny_bundle, workers, env=None):
    from medqc.tools.bench.harness import AgentProcess

    a = AgentProcess(tmp, str(tiny_bundle), inference=True, workers=workers, env=env)
    why = a.start(90)
    assert not why, why
    return a


def _ready(a, timeout=90):
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(a.url + "/healthz", timeout=5) as r:
                return json.loads(r.read())
        except Exception:  # noqa: BLE001 - starting
            time.sleep(0.2)
    raise AssertionError(a.tail())


def test_a_poison_slice_is_undecodable_alone_and_the_rest_is_analysed(tmp_path, series, tiny_bundle):
    from medqc.tools.bench.harness import descendants, series_uid
    from medqc.tools.bench.ingest import storescu

    need_tool("storescu")
    poison = series[5]
    uid = str(pydicom.dcmread(str(poison), stop_before_pixels=True).SOPInstanceUID)
    a = _agent(tmp_path, tiny_bundle, 1, {"MEDQC_FAULT_POINT": f"worker-crash:{uid}"})
    try:
        assert _ready(a)["status"] == "ok"
        before = set(descendants(a.proc.pid))
        _, r = storescu(series, a.port, "MEDQC")
        assert r.returncode == 0, r.stderr[-1000:]
        times, verdict, _ = a.wait_series(series_uid(series), len(series), 120)
        assert verdict, a.tail(3000)
        rep = a.store().get_series(series_uid(series))
        rows = {row["sop_instance_uid"]: row for row in rep["per_slice"]}
        assert len(rows) == len(series)
        assert "analysis process died (signal 9) on this slice" in rows[uid]["error"]
        assert all(row["scores"] and not row.get("error") for u, row in rows.items() if u != uid)
        undecodable = [f for f in rep["findings"] if f["check"] == "input.undecodable"]
        assert len(undecodable) == 1 and "signal 9" in json.dumps(undecodable[0]), undecodable
        kept, deadline = [], time.time() + 20  # released once every sink has handled the verdict
        while not kept and time.time() < deadline:
            kept = list((a.work / "state" / "spool" / "kept").iterdir())
            time.sleep(0.05)
        assert len(kept) == 1 and str(pydicom.dcmread(str(kept[0]), stop_before_pixels=True).SOPInstanceUID) == uid
        # two workers died on it (once with its task, once alone), each replaced; the agent lives on
        import urllib.request

        with urllib.request.urlopen(a.url + "/metrics", timeout=10) as m:
            assert "medqc_worker_restarts_total 2" in m.read().decode()
        after = set(descendants(a.proc.pid))
        assert a.proc.poll() is None and len(before - after) == 1 and len(after - before) == 1
    finally:
        a.stop()
    assert a.proc.returncode == 0, a.tail(3000)


@pytest.mark.parametrize("value, needle", [
    (-1, "analysis.workers = -1"), (257, "up to 256"), ("all", "'all' is not allowed"), (1.5, "analysis.workers"),
    (True, "analysis.workers"),
])
def test_workers_setting_is_validated_at_load(value, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"analysis.workers": value})
    assert needle in str(e.value) and '"auto"' in str(e.value)


def test_workers_setting_in_config_check_and_show(tmp_path):
    from medqc.config import AGENT_MIB, WORKER_MIB, cgroup_memory_limit, gpu_backend_expected, plan_workers, worker_count

    bad = tmp_path / "bad.toml"
    bad.write_text('[analysis]\nworkers = "many"\n')
    r = subprocess.run([sys.executable, "-m", "medqc", "config", "check", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "analysis.workers" in r.stderr + r.stdout
    r = run_ok([sys.executable, "-m", "medqc", "config", "show"], timeout=60)
    assert json.loads(r.stdout)["analysis"]["workers"] == "auto"
    cores = len(os.sched_getaffinity(0))
    limit = cgroup_memory_limit()  # this process's cgroup (the unit's MemoryHigh= under systemd), None here if unlimited
    fits = None if limit is None else (limit // (1 << 20) - AGENT_MIB) // WORKER_MIB
    if not gpu_backend_expected("auto"):  # a CPU box: ONNX Runtime workers
        assert worker_count(load_config()) == max(1, cores - 1 if fits is None else min(cores - 1, fits))
    assert worker_count(load_config()) == plan_workers(cores, limit, gpu_backend_expected("auto"))
    assert worker_count(load_config(None, {"analysis.workers": 0})) == 0
    assert worker_count(load_config(None, {"analysis.workers": 3})) == 3


def test_auto_plans_workers_by_cores_and_memory_limit_and_more_memory_on_a_gpu():
    from medqc.config import GPU_WORKER_MIB, gpu_backend_expected, plan_workers

    gib = 1 << 30
    # the unit's MemoryHigh=3G: 1 GiB for agent and receiver, then 320 MiB (ONNX Runtime, CPU) or 1 GiB (GPU) a worker
    assert plan_workers(16, 3 * gib, gpu=False) == 6
    assert plan_workers(16, 3 * gib, gpu=True) == 2 == (3 * 1024 - 1024) // GPU_WORKER_MIB
    assert plan_workers(16, 8 * gib, gpu=True) == 7 and plan_workers(4, 8 * gib, gpu=True) == 3
    assert plan_workers(16, None, gpu=True) == 15 and plan_workers(2, None, gpu=False) == 1
    assert plan_workers(1, None, gpu=False) == 1 and plan_workers(8, gib // 2, gpu=False) == 1  # never fewer than one
    for name in ("tensorrt", "onnxruntime-cuda", "torch-cuda"):
        assert gpu_backend_expected(name)
    for name in ("onnxruntime", "onnxruntime-int8", "torch"):
        assert not gpu_backend_expected(name)
    # "auto" on a machine without an NVIDIA driver never plans GPU workers, whatever is installed (torch is, here)
    if not any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/etc/nv_tegra_release")):
        assert not gpu_backend_expected("auto")


def test_analyze_auto_starts_workers_only_where_they_pay(tmp_path):
    from medqc.agent.analyze import FILES_PER_WORKER, offline_workers

    auto = load_config()
    cfg = dataclasses.replace(auto, analysis=dataclasses.replace(auto.analysis, workers=4))
    assert offline_workers(cfg, 1) == 4  # a number is taken as it is
    assert offline_workers(load_config(None, {"analysis.workers": 0}), 10_000) == 0
    n = offline_workers(auto, 10_000)
    cores = len(os.sched_getaffinity(0))
    assert n == (cores - 1 if cores >= 3 else 0)
    assert offline_workers(auto, 2 * FILES_PER_WORKER - 1) == 0


@pytest.mark.parametrize("workers", [2, 0])
def test_sigterm_stops_an_agent_with_workers_and_leaves_no_process(tmp_path, series, tiny_bundle, workers):
    """With two workers, and with none (the analysis in the agent's process, still supported)."""
    from medqc.tools.bench.harness import descendants, series_uid
    from medqc.tools.bench.ingest import storescu

    need_tool("storescu")
    a = _agent(tmp_path, tiny_bundle, workers)
    try:
        health = _ready(a)
        assert health["status"] == "ok" and health["backend"] == "onnxruntime"
        import urllib.request

        with urllib.request.urlopen(a.url + "/metrics", timeout=10) as m:  # ready only once every worker is
            assert f"medqc_analysis_workers {workers}" in m.read().decode()
        kids = descendants(a.proc.pid)
        assert len(kids) >= 1 + workers  # the receiver and the workers (and multiprocessing's resource tracker)
        _, r = storescu(series, a.port, "MEDQC")
        assert r.returncode == 0
        a.proc.send_signal(signal.SIGTERM)
        assert a.proc.wait(30) == 0, a.tail(3000)
    finally:
        a.stop()
    deadline = time.time() + 10
    alive = kids
    while alive and time.time() < deadline:
        alive = [p for p in kids if _alive(p)]
        time.sleep(0.1)
    assert not alive, [Path(f"/proc/{p}/cmdline").read_bytes()[:200] for p in alive]
    # what it received and did not analyse before the SIGTERM is in the spool or in the store, never lost
    from medqc.agent.sinks.store import Store

    store = Store(a.work / "state" / "medqc.sqlite")
    try:
        stored = len(store.slice_times(series_uid(series)))
    finally:
        store.close()
    spooled = len(list((a.work / "state" / "spool" / "incoming").iterdir()))
    assert stored + spooled >= len(series)
