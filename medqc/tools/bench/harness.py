"""``medqc agent`` as a subprocess on free loopback ports, configured by a TOML file, and its results (per-slice
received/analysed times, the series verdict) read through the agent's own store."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


class AgentProcess:
    """``medqc agent`` as a subprocess on loopback ports, configured by a TOML file."""

    def __init__(self, work: Path, bundle: str | None, inference: bool, threads: int = 0, fsync: bool | None = None,
                 workers: int | str | None = None, env: dict | None = None):
        """``workers``: ``analysis.workers`` (None: the agent's default); ``env``: added to its environment."""
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.inference = inference
        lines = [
            f'state_dir = "{work / "state"}"',
            'log_level = "warning"',
            "[dicom]", 'ae_title = "MEDQC"', 'bind = "127.0.0.1"', f"port = {self.port}",
            "[http]", f'bind = "127.0.0.1:{self.http_port}"',
            "[series]", "idle_timeout_s = 2.0",
            *(["[spool]", f"fsync = {'true' if fsync else 'false'}"] if fsync is not None else []),
            "[sinks.stdout]", "enabled = false",
            "[inference]",
        ]
        if bundle:
            lines.append(f'bundle = "{bundle}"')
        if threads:
            lines.append(f"threads = {threads}")
        if workers is not None:
            lines += ["[analysis]", f"workers = {workers!r}".replace("'", '"')]
        self.env = dict(env or {})
        self.config = work / "medqc.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc = None
        self.log = work / "agent.log"
        self._store = None

    def start(self, timeout: float = 60.0) -> str:
        """Start; '' when listening, else the reason."""
        try:
            from medqc.agent import daemon
        except ImportError as e:
            return f"'medqc agent' is not available in this install: {e}"
        parser = argparse.ArgumentParser()
        daemon.add_arguments(parser)
        opts = set(parser._option_string_actions)  # noqa: SLF001 - the options this agent build offers
        cmd = [sys.executable, "-m", "medqc", "agent"]
        if "--config" in opts:
            cmd += ["--config", str(self.config)]
        else:
            return "'medqc agent' has no --config option"
        if not self.inference:
            if "--no-inference" not in opts:
                return "'medqc agent' has no --no-inference option (receive-only mode)"
            cmd.append("--no-inference")
        env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", **self.env)
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._logf, stderr=subprocess.STDOUT)
        if not wait_port(self.port, timeout, self.proc):
            self.stop()
            return f"the agent did not start listening within {timeout:g} s: {self.tail()}"
        self.http_up = wait_port(self.http_port, 2.0, self.proc)  # optional: results are read from the store
        return ""

    def backend(self) -> str | None:
        """The inference backend the running agent reports (``/healthz``: its analysis workers' once they are
        ready, e.g. ``torch-cuda`` on a GPU box); None when its HTTP API does not answer."""
        import json
        import urllib.error
        import urllib.request

        if not self.http_up:
            return None
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as r:
                return json.loads(r.read()).get("backend")
        except urllib.error.HTTPError as e:  # 503 while starting: the body still names the backend
            with contextlib.suppress(ValueError):
                return json.loads(e.read()).get("backend")
        except (OSError, ValueError):
            pass
        return None

    def tail(self, n: int = 600) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text()[-n:].strip()
        return ""

    @property
    def db_path(self) -> Path:
        return self.work / "state" / "medqc.sqlite"

    def store(self):
        """The agent's own store (``medqc.agent.sinks.store.Store``) on its database, opened from this process once
        the agent has created it (None before): reading it here costs the agent nothing, where polling its
        HTTP API would take CPU and the interpreter lock from the pipeline being measured; WAL lets this
        reader never block the agent's writer."""
        if self._store is None and self.db_path.is_file():
            from medqc.agent.sinks.store import Store

            self._store = Store(self.db_path)
        return self._store

    def slice_times(self, uid: str) -> list[tuple[str, float, float]]:
        """(SOP instance UID, received_at, analysed_at) of each slice of ``uid`` the agent has stored."""
        store = self.store()
        if store is None:
            return []
        return [(r["sop_instance_uid"], r["received_at"] or 0.0, r["analysed_at"] or 0.0) for r in store.slice_times(uid)]

    def verdict(self, uid: str) -> tuple[str | None, float | None]:
        """(verdict, completed_at) of ``uid`` from its stored report; (None, None) while it has none."""
        store = self.store()
        rep = store.get_series(uid) if store is not None else None
        return (rep.get("verdict"), rep.get("completed_at")) if rep else (None, None)

    def wait_series(self, uid: str, n: int, timeout: float) -> tuple[list, str | None, float | None]:
        """Wait until ``n`` slices of ``uid`` are stored with a verdict (or the timeout). The report, with
        its verdict, is read only once the slices are all there: the per-slice times are the cheap poll."""
        deadline = time.time() + timeout
        while True:
            times = self.slice_times(uid)
            ended = time.time() > deadline or (self.proc is not None and self.proc.poll() is not None)
            if len(times) >= n or ended:
                verdict, completed = self.verdict(uid)
                if verdict or ended:
                    return times, verdict, completed
            time.sleep(0.05)

    def cpu_seconds(self) -> float | None:
        """CPU seconds (user + system) used so far by the agent and its live child processes (the receiver
        process, the analysis workers), from /proc; None where /proc is not there (not Linux) or the agent is
        not running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        return process_tree_cpu_s(self.proc.pid)

    def rss_mib(self) -> dict | None:
        """Resident memory (MiB) of the running agent and of each process under it, from ``agent_stats``:
        {"agent", "children" (largest first), "total"}; None when it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        st = agent_stats(self.proc.pid)
        if not st["agent"]:
            return None
        return {"agent": st["agent"]["rss_mib"], "children": sorted((c["rss_mib"] for c in st["children"]), reverse=True),
                "total": st["total"]["rss_mib"]}

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 20, 5)
            self._logf.close()
        if self._store is not None:
            self._store.close()
            self._store = None


def terminate(proc: subprocess.Popen, grace_s: float, kill_wait_s: float) -> int | None:
    """SIGTERM, up to ``grace_s`` to finish, then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_wait_s)
    return proc.returncode


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ... (comm may hold spaces)


def process_tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` and every live descendant, at any depth (Linux /proc; fields 14 and
    15 of /proc/PID/stat, in clock ticks): the agent, its receiver process and its analysis workers. A child
    that has exited and been waited for is in its parent's cutime, which is not counted: the receiver and the
    workers live as long as the agent (a worker replaced after a crash takes its CPU with it)."""
    stats = {int(d.name): st for d in Path("/proc").iterdir() if d.name.isdigit() and (st := _stat(int(d.name)))}
    if pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for p, st in stats.items():
        children.setdefault(int(st[1]), []).append(p)
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0, [pid]
    while todo:
        st = stats[p := todo.pop()]
        total += int(st[11]) + int(st[12])
        todo += children.get(p, [])
    return total / tick


def descendants(pid: int) -> list[int]:
    """The live processes under ``pid`` (children, their children, ...), from /proc."""
    stats = {int(d.name): st for d in Path("/proc").iterdir() if d.name.isdigit() and (st := _stat(int(d.name)))}
    children: dict[int, list[int]] = {}
    for p, st in stats.items():
        children.setdefault(int(st[1]), []).append(p)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_stats(pid: int) -> dict:
    """RSS (MiB), open descriptors and threads of ``pid`` ({} once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    rss = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
    return {"rss_mib": round(rss, 1), "fds": fds, "threads": threads}


def agent_stats(pid: int) -> dict:
    """The agent and the processes under it (the receiver, the analysis workers — each with its own model
    session: on a GPU box, its own CUDA context — and multiprocessing's resource tracker): each, and the
    totals the unit's limits apply to."""
    main = proc_stats(pid)
    kids = [s for s in (proc_stats(c) for c in descendants(pid)) if s]
    tot = {k: round(main.get(k, 0) + sum(s[k] for s in kids), 1) for k in ("rss_mib", "fds", "threads")}
    return {"agent": main, "children": kids, "total": tot}


def series_uid(files: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(str(files[0]), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
