"""Sections (a)–(c) and (f): (a) DCMTK storescu → storescp, this machine's ingest ceiling; (b) storescu →
``medqc agent`` with inference off, what the agent's ingest costs; (c) storescu → the agent's full pipeline
(slices analysed per second, CPU per slice), then ``medqc replay`` at 60 and at 120 slices/s for the latency
a technologist sees; (f) the analysis alone with 0, 1, … N worker processes: the spool filled before the
agent starts, so that the receiver is idle while the agent resumes it."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from medqc.dcmtk import dcmtk as _tool
from medqc.tools.bench.harness import AgentProcess, free_port, series_uid, wait_port
from medqc.tools.bench.report import failed, skipped
from medqc.tools.replay.driver import replay
from medqc.tools.replay.stats import percentiles


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _nodelay_env() -> dict:
    return dict(os.environ, TCP_NODELAY="1")  # DCMTK leaves Nagle on without it (22 slices/s on loopback)


def storescu(files: list[Path], port: int, aet: str = "ANY-SCP", timeout: float = 600) -> tuple[float, subprocess.CompletedProcess]:
    cmd = [_tool("storescu"), "--max-pdu", "131072", "-aec", aet, "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_nodelay_env(), capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - t0, r


def bench_storescp(files: list[Path], work: Path) -> dict:
    storescp = _tool("storescp")
    if not (storescp and _tool("storescu")):
        return skipped("DCMTK storescp/storescu not installed (apt-get install dcmtk)")
    out = work / "storescp-out"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([storescp, "--fork", "--max-pdu", "131072", "-od", str(out), str(port)], env=_nodelay_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not wait_port(port, 10, proc):
            return failed("storescp did not start listening")
        wall, r = storescu(files, port)
    finally:
        _stop(proc)
    written = sum(1 for p in out.iterdir() if p.is_file())
    if r.returncode != 0 or written != len(files):
        return failed(f"storescu exit {r.returncode}, {written}/{len(files)} written: {r.stderr.strip()[-300:]}")
    return {"status": "ran", "slices": len(files), "wall_s": round(wall, 3), "slices_per_s": round(len(files) / wall, 1),
            "what": "storescu → storescp --fork, TCP_NODELAY, 128 KiB PDUs, files written"}


def bench_agent_receive(files: list[Path], work: Path, bundle: str | None) -> dict:
    if not _tool("storescu"):
        return skipped("DCMTK storescu not installed")
    agent = AgentProcess(work / "agent-receive", bundle, inference=False, workers=0)
    why = agent.start()
    if why:
        return skipped(why)
    try:
        wall, r = storescu(files, agent.port, "MEDQC")
    finally:
        agent.stop()
    if r.returncode != 0:
        return failed(f"storescu exit {r.returncode}: {r.stderr.strip()[-300:]}; agent: {agent.tail()}")
    return {"status": "ran", "slices": len(files), "wall_s": round(wall, 3), "slices_per_s": round(len(files) / wall, 1),
            "what": "storescu → medqc agent --no-inference (spooled and acknowledged)"}


def _config_has(dotted: str) -> bool:
    from medqc.config import load_config

    try:
        load_config(None, {dotted: False})
        return True
    except Exception:
        return False


def bench_agent_full(files: list[Path], study_dir: Path, work: Path, bundle: str | None, latency_slices: list[Path], wait_s: float = 180,
                     fsync: bool | None = None, latency_120: list[Path] | None = None, workers: int | str | None = None) -> dict:
    if not _tool("storescu"):
        return skipped("DCMTK storescu not installed")
    if fsync is not None and not _config_has("spool.fsync"):
        return skipped("this agent has no spool.fsync setting")
    agent = AgentProcess(work / ("agent-full" if fsync is None else f"agent-full-fsync-{fsync}"), bundle, inference=True, fsync=fsync,
                         workers=workers)
    why = agent.start()
    if why:
        return skipped(why)
    try:
        uid = series_uid(files)
        t0, cpu0 = time.time(), agent.cpu_seconds()
        wall, r = storescu(files, agent.port, "MEDQC")
        if r.returncode != 0:
            return failed(f"storescu exit {r.returncode}: {r.stderr.strip()[-300:]}; agent: {agent.tail()}")
        times, verdict, _ = agent.wait_series(uid, len(files), wait_s)
        cpu1 = agent.cpu_seconds()
        done = [a for _, _, a in times if a > 0]
        res = {"status": "ran", "slices": len(files), "ingest_wall_s": round(wall, 3), "ingest_slices_per_s": round(len(files) / wall, 1),
               "analysis_workers": _workers_label(workers), "backend": agent.backend(),
               "slices_analysed": len(times), "verdict": verdict,
               "what": "storescu → medqc agent (spool, decode, preprocess, batch, infer, checks, store); analysed_at from the agent's store"}
        if len(done) < len(files):
            res["status"] = "failed"
            res["reason"] = f"only {len(done)} of {len(files)} slices analysed within {wait_s:g} s; agent: {agent.tail()}"
            return res
        span = max(done) - t0
        res["wall_s"] = round(span, 3)
        res["slices_per_s"] = round(len(files) / span, 1)
        if cpu0 is not None and cpu1 is not None:  # the agent and its receiver process, receiving to verdict
            res["cpu_ms_per_slice"] = round((cpu1 - cpu0) * 1e3 / len(files), 2)
        lat = [(a - rcv) * 1e3 for _, rcv, a in times if a > 0 and rcv > 0]
        res["slice_to_result_ms_at_full_speed"] = percentiles(lat)
        # latency at scanner pace: a fresh series (new UIDs) through medqc replay at 60 slices/s, another at 120
        res["latency_at_60"] = _latency_at_rate(latency_slices, agent, 60.0)
        if latency_120 is not None:
            res["latency_at_120"] = _latency_at_rate(latency_120, agent, 120.0)
        # what the agent's processes hold after three series: what a unit's memory limits are sized from
        res["rss_mib"] = agent.rss_mib()
        return res
    finally:
        agent.stop()


def _workers_label(workers) -> str | int:
    """``analysis.workers`` as the agent ran with it: a number, or "auto (N)"."""
    if workers is not None and workers != "auto":
        return workers
    from medqc.config import load_config, worker_count

    return f"auto ({worker_count(load_config())})"


def _latency_at_rate(files: list[Path], agent: AgentProcess, rate: float, wait_s: float = 60.0) -> dict:
    if not files:
        return skipped("no latency study")
    try:
        result, records = replay([str(p) for p in files], "127.0.0.1", agent.port, "MEDQC", "MEDQC_BENCH", "rate", rate)
    except Exception as e:
        return failed(f"{type(e).__name__}: {e}")
    t = result["transport"]
    uid = series_uid(files)
    times, verdict, completed = agent.wait_series(uid, len(files), wait_s)
    sent = {r.sop_instance_uid: r for r in records if r.ok}
    s2r = [(a - rcv) * 1e3 for _, rcv, a in times if a > 0 and rcv > 0]
    send2r = [(a - sent[u].sent_at) * 1e3 for u, _, a in times if a > 0 and u in sent]
    last_ack = max((r.acked_at for r in records if r.ok), default=None)
    out = {
        "status": "ran" if (t["sent"] == len(files) and len(s2r) == len(files)) else "failed",
        "rate": rate,
        "slices": t["sent"],
        "achieved_rate_slices_per_s": (t["series"][0].get("rate_slices_per_s") if t["series"] else None),
        "c_store_rtt_ms": t["c_store_rtt_ms"],
        "slice_to_result_ms": percentiles(s2r),
        "send_to_result_ms": percentiles(send2r),
        "verdict": verdict,
        "last_slice_to_verdict_s": percentiles([completed - last_ack] if (completed and last_ack) else []),
        "how": "received_at → analysed_at of each slice and the series completed_at, read from the agent's store; "
               "last slice = the C-STORE response of the last instance",
    }
    if out["status"] != "ran":
        out["reason"] = f"{t['sent']} sent, {len(s2r)} analysed, verdict {verdict!r} within {wait_s:g} s; {t['errors']}"
    return out


def scaling_counts(cores: int) -> list[int]:
    """Worker counts for (f): 0 (the analysis on the agent's pipeline thread), 1, the powers of two below
    the cores, cores − 1 ("auto") and the cores."""
    counts = {0, 1, max(1, cores - 1), cores}
    k = 2
    while k < cores:
        counts.add(k)
        k *= 2
    return sorted(counts)


def bench_scaling(files: list[Path], work: Path, bundle: str | None, counts: list[int], wait_s: float = 300) -> dict:
    """(f): for each worker count, the study copied into a fresh state's spool (incoming/) before the agent
    starts; the agent resumes it at start with its receiver idle. Slices/s is the steady rate between the
    10th and the 90th percentile of the slices' ``analysed_at`` (read from the agent's store): the agent's
    start (imports, the workers' warm-up), the first batches and the last ones stay out of it."""
    uid = series_uid(files)
    rows = []
    for w in counts:
        agent = AgentProcess(work / f"scaling-{w}", bundle, inference=True, workers=w)
        incoming = agent.work / "state" / "spool" / "incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(files):
            shutil.copyfile(f, incoming / f"{i:06d}.dcm")
        why = agent.start()
        if why:
            return skipped(why)
        try:
            times, verdict, _ = agent.wait_series(uid, len(files), wait_s)
        finally:
            agent.stop()
        done = sorted(a for _, _, a in times if a > 0)
        if len(done) < len(files) or len(done) < 10:
            return failed(f"{w} worker(s): only {len(done)} of {len(files)} slices analysed within {wait_s:g} s; agent: {agent.tail()}")
        i0, i1 = len(done) // 10, len(done) - 1 - len(done) // 10
        span = done[i1] - done[i0]
        rows.append({"workers": w, "slices": len(files), "wall_s": round(done[-1] - done[0], 3),
                     "slices_per_s": round((i1 - i0) / span, 1) if span > 0 else None, "verdict": verdict})
    one = next((r["slices_per_s"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["x_one_worker"] = round(r["slices_per_s"] / one, 2) if (one and r["slices_per_s"]) else None
    best = max(rows, key=lambda r: r["slices_per_s"] or 0.0)
    return {"status": "ran", "rows": rows, "slices": len(files), "slices_per_s": best["slices_per_s"], "wall_s": best["wall_s"],
            "best_workers": best["workers"],
            "what": "the study in the spool before the agent starts (receiver idle), analysed at start; "
                    "analysis.workers = 0 is the analysis on the agent's pipeline thread"}
