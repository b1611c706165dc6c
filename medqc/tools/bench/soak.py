"""``medqc bench --soak MINUTES --senders N``: a real ``medqc agent`` under sustained load from real peers.

N DCMTK senders (``/usr/bin/storescu``, TCP_NODELAY=1, 128 KiB PDUs) send one CT series after another,
each series flat out; one more sender goes through a real Orthanc acting as a router (its Lua
``OnStoredInstance`` forwards every instance to the agent with ``SendToModality``, then deletes it). Every
series a sender sends is the payload with fresh Study/Series/Frame of Reference/SOP Instance UIDs (a
byte-level substitution of fixed-length placeholder UIDs written once into a template), so nothing is
deduplicated. The payload is a real CT series (``--study``, else the Philips chest in
``$MEDQC_REAL_CT``), else ``medqc synth``.

Backlog bound: receiving outpaces analysis on a small CPU (about 250 against 100 slices/s on 2 cores), so
senders running flat out for minutes would fill the spool's disk and leave a drain longer than the soak. A
sender therefore starts its next series only while the agent's backlog (instances received, not yet
analysed or rejected) is below ``--max-backlog``; each series itself is sent flat out. Time spent waiting at
that gate is reported per sender.

Sampled every ``interval`` seconds: C-STOREs attempted/ACKed/failed (parsed from each storescu's
``Sending file`` / ``Received Store Response`` lines and its exit status), the agent's counters from
/metrics (received, analysed, rejected, queue depth, series completed), and the RSS, open descriptors and
threads of the agent process and its child processes — the receiver and the analysis workers (/proc;
``receiver_*`` in the samples sums all the children). After the run the senders stop, the queue
drains, and the checks are:

- no failed C-STORE (on either hop: a storescu response other than Success, or an instance Orthanc could
  not forward, which it keeps instead of deleting);
- nothing lost: every SOP Instance UID that was ACKed has a row in the agent's SQLite store, and the agent
  analysed exactly as many slices as were ACKed (none twice);
- RSS growth after the warm-up at most ``RSS_GROWTH_MAX`` (the median of the last tenth of the sending
  phase against the median of the tenth after the warm-up). The agent keeps its ``series.keep_recent``
  most recent series in memory; the soak sets that to ``--keep-recent`` (``KEEP_RECENT`` by default), and
  the warm-up lasts until that window is full as well (what grows after it is a leak, not the window
  filling; with the agent's default 200 it fills only after ~100 minutes on 2 cores, so a one-minute soak
  needs a window of a few series). The check fails when the window never fills while sending;
- open descriptors bounded: once drained, at most ``FD_SLACK`` more than at the end of the warm-up.

Results: ``soak-<name>.json``, ``.png`` and ``.md`` in ``--out``; the exit status is 1 when a check fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from medqc.tools.bench.harness import agent_stats, free_port, terminate, wait_port
from medqc.tools.orthanc import ORTHANC, ROUTE_LUA, OrthancProcess

log = logging.getLogger("medqc.soak")

STORESCU = "/usr/bin/storescu"
RSS_GROWTH_MAX = 0.10
# series.keep_recent of the soaked agent: the series it keeps in memory for the API and console (per-slice
# results and thumbnails, about 2.4 MiB for a 141-slice chest) fill this window during the warm-up, so the
# growth measured after it is a leak, not the window filling (the default window, 200, takes ~100 min here)
KEEP_RECENT = 20
FD_SLACK = 16
UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; every UID here has the same length (byte substitution)
_DIGITS = 30

def _uid() -> str:
    return f"{UID_ROOT}1{secrets.randbelow(10 ** _DIGITS):0{_DIGITS}d}"



# ------------------------------------------------------------------------------------------------ payload
def payload_files(study: str | None, work: Path) -> tuple[list[Path], str]:
    """The series to send: ``study``, else the real Philips chest, else a synthetic chest series."""
    import pydicom

    cands = []
    if study:
        cands.append(Path(study))
    real = os.environ.get("MEDQC_REAL_CT")
    if real:
        cands.append(Path(real) / "philips-bigbore-chest-patient")
    for d in cands:
        if not d.is_dir():
            continue
        by_series: dict[str, list[Path]] = {}
        for p in sorted(d.rglob("*")):
            if not p.is_file():
                continue
            try:
                ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality"])
            except Exception:  # noqa: BLE001 - licences, directory files
                continue
            if str(ds.get("Modality", "")) == "CT" and ds.get("SeriesInstanceUID"):
                by_series.setdefault(str(ds.SeriesInstanceUID), []).append(p)
        if by_series:
            files = max(by_series.values(), key=len)
            return files, f"{d.name} ({len(files)} slices)"
    out = work / "synth-chest"
    subprocess.run([sys.executable, "-m", "medqc", "synth", "--region", "chest", "--slices", "120", "--matrix", "512",
                    "--seed", "0", "--no-progress", str(out)], check=True, capture_output=True, timeout=900)
    files = sorted(p for p in out.rglob("*.dcm"))
    return files, f"medqc synth chest ({len(files)} slices)"


class Template:
    """The payload once, with placeholder UIDs of a fixed length; ``copy(folder)`` writes a copy with fresh
    UIDs (bytes.replace per file) and returns its files and SOP Instance UIDs."""

    def __init__(self, files: list[Path]):
        import io

        import pydicom

        self.study, self.series, self.frame = _uid(), _uid(), _uid()
        self.items: list[tuple[str, bytes]] = []
        for p in files:
            ds = pydicom.dcmread(str(p))
            sop = _uid()
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = self.study, self.series, sop
            if "FrameOfReferenceUID" in ds:
                ds.FrameOfReferenceUID = self.frame
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.items.append((sop, buf.getvalue()))

    def __len__(self) -> int:
        return len(self.items)

    def copy(self, folder: Path) -> tuple[list[Path], dict[str, str]]:
        folder.mkdir(parents=True, exist_ok=True)
        common = [(self.study.encode(), _uid().encode()), (self.series.encode(), _uid().encode()),
                  (self.frame.encode(), _uid().encode())]
        files, uids = [], {}
        for i, (ph, data) in enumerate(self.items):
            new = _uid()
            for a, b in common:
                data = data.replace(a, b)
            data = data.replace(ph.encode(), new.encode())
            p = folder / f"{i:04d}.dcm"
            p.write_bytes(data)
            files.append(p)
            uids[str(p)] = new
        return files, uids


# -------------------------------------------------------------------------------------------------- peers
class AgentProc:
    """``medqc agent`` as a subprocess with its own config, state dir, DICOM and HTTP ports."""

    def __init__(self, work: Path, bundle: str | None, idle_timeout_s: float = 2.0, keep_recent: int = 20):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        self.state = work / "state"
        lines = [f'state_dir = "{self.state}"', 'log_level = "warning"',
                 "[dicom]", 'ae_title = "MEDQC"', 'bind = "127.0.0.1"', f"port = {self.port}",
                 "[http]", f'bind = "127.0.0.1:{self.http_port}"',
                 "[series]", f"idle_timeout_s = {idle_timeout_s}", f"keep_recent = {keep_recent}",
                 "[sinks.stdout]", "enabled = false", "[inference]"]
        if bundle:
            lines.append(f'bundle = "{bundle}"')
        self.config = work / "medqc.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.log = work / "agent.log"
        self.proc = None

    def start(self, timeout: float = 120.0) -> None:
        env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--config", str(self.config)], env=env,
                                     stdout=self._logf, stderr=subprocess.STDOUT)
        if not wait_port(self.port, timeout, self.proc):
            self.stop()
            raise RuntimeError(f"the agent did not start: {self.log.read_text()[-1500:]}")
        wait_port(self.http_port, 10.0, self.proc)

    def metrics(self) -> dict[str, float]:
        """Counters and gauges from /metrics, summed over labels ({} when unreachable)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            m = re.match(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", line)
            if m and not m.group(1).endswith(("_bucket", "_sum", "_count")):
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out

    def stored_uids(self) -> tuple[set[str], int]:
        """SOP Instance UIDs with a row in the agent's store, and the number of rows (read through the agent's
        own ``Store``; WAL lets this reader never block the agent's writer)."""
        from medqc.agent.sinks.store import Store

        store = Store(self.state / "medqc.sqlite")
        try:
            rows = store.slice_instances()
        finally:
            store.close()
        return set(rows), len(rows)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        code = terminate(self.proc, 60, 10)
        self._logf.close()
        return code


# ------------------------------------------------------------------------------------------------ senders
_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)")


def parse_storescu(stderr: str, files: list[Path]) -> tuple[list[str], list[str]]:
    """storescu -v output → (files ACKed with Success, files not) among ``files``."""
    acked, current = [], None
    for line in stderr.splitlines():
        m = _SENDING.match(line)
        if m:
            current = m.group(1)
            continue
        m = _RESPONSE.match(line)
        if m and current is not None:
            if m.group(1) == "Success":
                acked.append(current)
            current = None
    done = set(acked)
    return acked, [str(f) for f in files if str(f) not in done]


class Sender(threading.Thread):
    """One storescu after another, each a fresh copy of the payload, until ``stop`` is set."""

    def __init__(self, name: str, template: Template, work: Path, port: int, aet: str, gate, stop: threading.Event):
        super().__init__(name=name, daemon=True)
        self.template, self.work, self.port, self.aet, self.gate, self._stop_evt = template, work, port, aet, gate, stop
        self.attempted = self.acked = self.failed = self.series = 0
        self.gate_wait_s = 0.0
        self.acked_uids: list[str] = []
        self.failures: list[str] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        n = 0
        while not self._stop_evt.is_set():
            t0 = time.monotonic()
            while not self._stop_evt.is_set() and not self.gate():
                time.sleep(0.2)
            self.gate_wait_s += time.monotonic() - t0
            if self._stop_evt.is_set():
                break
            folder = self.work / f"s{n:05d}"
            files, uids = self.template.copy(folder)
            try:
                r = subprocess.run([STORESCU, "-v", "-nh", "--max-pdu", "131072", "-aec", self.aet, "127.0.0.1",
                                    str(self.port), *map(str, files)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True, env=dict(os.environ, TCP_NODELAY="1"), timeout=900)
                stderr, rc = r.stderr, r.returncode
            except subprocess.TimeoutExpired as e:
                stderr, rc = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""), -1
            acked, missed = parse_storescu(stderr, files)
            with self.lock:
                self.attempted += len(files)
                self.acked += len(acked)
                self.failed += len(missed)
                self.series += 1
                self.acked_uids.extend(uids[a] for a in acked)
                if missed or rc != 0:
                    tail = [ln for ln in stderr.splitlines() if ln[:2] in ("E:", "F:", "W:")][-3:]
                    self.failures.append(f"series {n}: storescu exit {rc}, {len(missed)} not ACKed: {' | '.join(tail)}"[:400])
            shutil.rmtree(folder, ignore_errors=True)
            n += 1

    def counts(self) -> dict:
        with self.lock:
            return {"attempted": self.attempted, "acked": self.acked, "failed": self.failed, "series": self.series}


# ---------------------------------------------------------------------------------------------------- run
def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def run_soak(minutes: float, senders: int, out: Path, study: str | None = None, bundle: str | None = None,
             max_backlog: int = 1000, interval: float | None = None, name: str | None = None,
             router: bool = True, drain_s: float | None = None, keep_recent: int = KEEP_RECENT, progress=print) -> dict:
    if not Path(STORESCU).exists():
        raise RuntimeError(f"{STORESCU} (DCMTK) is needed for the soak")
    if router and not Path(ORTHANC).exists():
        raise RuntimeError(f"{ORTHANC} is needed for the router sender (or run without it)")
    duration = minutes * 60.0
    interval = interval or (1.0 if duration <= 120 else 2.0)
    warmup = max(15.0, 0.25 * duration)
    name = name or f"soak-cpu-{os.cpu_count()}core"
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="medqc-soak-"))
    agent = orth = None
    stop = threading.Event()
    samples: list[dict] = []
    res: dict = {"name": name, "minutes": minutes, "senders": senders, "router": router, "max_backlog": max_backlog,
                 "interval_s": interval, "warmup_s": warmup, "keep_recent": keep_recent,
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_at_start": os.getloadavg(),
                 "cpus": os.cpu_count()}
    try:
        files, what = payload_files(study, work)
        template = Template(files)
        res["payload"] = what
        progress(f"payload: {what}; agent starting")
        agent = AgentProc(work / "agent", bundle, keep_recent=keep_recent)
        agent.start()
        if router:
            orth = OrthancProcess(work / "orthanc", "medqc-soak-router", {"medqc": ["MEDQC", "127.0.0.1", agent.port]},
                                  lua=ROUTE_LUA, check_called_aet=False, DicomScuTimeout=60, SaveJobs=False,
                                  StableAge=3600, OverwriteInstances=True).start()
        last = {"m": {}}

        def backlog(m: dict) -> float:
            return (m.get("medqc_slices_received_total", 0.0) - m.get("medqc_slices_analysed_total", 0.0)
                    - m.get("medqc_slices_rejected_total", 0.0))

        def gate() -> bool:
            m = last["m"]
            return not m or backlog(m) < max_backlog

        threads = [Sender(f"direct-{i + 1}", template, work / f"direct-{i + 1}", agent.port, "MEDQC", gate, stop)
                   for i in range(senders)]
        if orth is not None:
            threads.append(Sender("via-orthanc", template, work / "via-orthanc", orth.port, "ORTHANC", gate, stop))
        t0 = time.monotonic()

        def sample(phase: str) -> dict:
            m = agent.metrics()
            if m:
                last["m"] = m
            s = {"t": round(time.monotonic() - t0, 2), "phase": phase}
            c = {k: sum(th.counts()[k] for th in threads) for k in ("attempted", "acked", "failed", "series")}
            s.update({f"cstore_{k}": v for k, v in c.items()})
            s.update({"received": m.get("medqc_slices_received_total"), "analysed": m.get("medqc_slices_analysed_total"),
                      "rejected": m.get("medqc_slices_rejected_total"), "queue_depth": m.get("medqc_queue_depth"),
                      "series_completed": m.get("medqc_series_completed_total"),
                      "backlog": backlog(m) if m else None})
            if orth is not None:
                try:
                    s["orthanc_held"] = orth.held()
                except OSError:
                    s["orthanc_held"] = None
            st = agent_stats(agent.proc.pid)
            s.update({"rss_mib": st["total"]["rss_mib"], "fds": st["total"]["fds"], "threads": st["total"]["threads"],
                      "agent_rss_mib": st["agent"].get("rss_mib"), "agent_fds": st["agent"].get("fds"),
                      "receiver_rss_mib": sum(k["rss_mib"] for k in st["children"]),
                      "receiver_fds": sum(k["fds"] for k in st["children"])})
            samples.append(s)
            return s

        sample("start")
        for th in threads:
            th.start()
        next_report = 60.0
        while time.monotonic() - t0 < duration:
            time.sleep(interval)
            s = sample("send")
            if s["t"] >= next_report:
                progress(f"{s['t']:.0f} s: {s['cstore_acked']} ACKed, {s['cstore_failed']} failed, "
                         f"{s['analysed'] or 0:.0f} analysed, backlog {s['backlog'] or 0:.0f}, RSS {s['rss_mib']:.0f} MiB, "
                         f"{s['fds']} fds")
                next_report += 60.0
            if agent.proc.poll() is not None:
                break
        stop.set()
        for th in threads:
            while th.is_alive():
                th.join(interval)
                sample("finish")
        send_end = time.monotonic() - t0
        acked_uids: set[str] = set()
        for th in threads:
            acked_uids.update(th.acked_uids)
        n_acked_total = sum(th.acked for th in threads)
        # drain: everything ACKed analysed (the via-Orthanc copies reach the agent after their ACK to storescu)
        drain_s = drain_s or max(300.0, duration)
        deadline = time.monotonic() + drain_s
        stored: set[str] = set()
        rows = 0
        while time.monotonic() < deadline and agent.proc.poll() is None:
            time.sleep(interval)
            s = sample("drain")
            if (s["backlog"] or 0) <= 0 and (orth is None or not s.get("orthanc_held")):
                stored, rows = agent.stored_uids()
                if acked_uids <= stored:
                    break
        time.sleep(max(interval, 3.0))  # the store's sink thread commits the last rows; descriptors settle
        final = sample("drained")
        stored, rows = agent.stored_uids()
        drained_at = time.monotonic() - t0
        orthanc_held = orth.held() if orth is not None else 0
        orthanc_errors = orth.errors() if orth is not None else []
        agent_alive = agent.proc.poll() is None
        agent_log_errors = [ln for ln in agent.log.read_text(errors="replace").splitlines()
                            if " ERROR " in ln or "Traceback" in ln][-20:]
        rc = agent.stop()
        agent = None if rc is not None else agent

        # ---------------------------------------------------------------------------------- checks
        send = [s for s in samples if s["phase"] == "send"]
        # the warm-up ends at ``warmup`` seconds or when the window of recent series is full, whichever is
        # later: before that, memory grows with the window filling, not with a leak
        after = [s for s in send if s["t"] >= warmup and (s.get("series_completed") or 0) >= keep_recent]
        if after:
            res["warmup_s"] = after[0]["t"]
        tenth = max(1, len(after) // 10)
        rss_warm = _median([s["rss_mib"] for s in after[:tenth]])
        rss_end = _median([s["rss_mib"] for s in after[-tenth:]])
        rss_warm, rss_end = (round(x, 1) if x is not None else None for x in (rss_warm, rss_end))
        fds_warm = after[tenth - 1]["fds"] if after else None
        growth = (rss_end / rss_warm - 1.0) if rss_warm and rss_end else None
        filled = max((s.get("series_completed") or 0) for s in send) if send else 0
        failed = sum(th.failed for th in threads)
        lost = sorted(acked_uids - stored)
        analysed = final.get("analysed") or 0.0
        checks = {
            "no_failed_cstore": {"ok": failed == 0 and orthanc_held == 0,
                                 "value": {"storescu_failed": failed, "orthanc_not_forwarded": orthanc_held}},
            "nothing_lost": {"ok": not lost and bool(acked_uids), "value": {"acked": len(acked_uids), "lost": len(lost)}},
            "analysed_once": {"ok": int(analysed) == len(acked_uids) and rows == len(stored),
                              "value": {"analysed": analysed, "acked": len(acked_uids), "store_rows": rows}},
            "rss_growth": {"ok": growth is not None and growth <= RSS_GROWTH_MAX,
                           "value": None if growth is None else round(growth, 4), "limit": RSS_GROWTH_MAX,
                           "warmup_end_s": res["warmup_s"] if after else None, "window": keep_recent,
                           **({} if after else
                              {"why": f"only {filled:g} series completed while sending, fewer than the {keep_recent} "
                                      "kept in memory: run longer or with a smaller --keep-recent"})},
            "fds_bounded": {"ok": fds_warm is not None and final["fds"] <= fds_warm + FD_SLACK,
                            "value": {"after_warmup": fds_warm, "drained": final["fds"],
                                      "peak": max(s["fds"] for s in samples)}, "slack": FD_SLACK},
            "agent_survived": {"ok": agent_alive, "value": rc},
        }
        res.update({
            "send_s": round(send_end, 1), "drain_s": round(drained_at - send_end, 1),
            "cstores": {"attempted": sum(th.attempted for th in threads), "acked": n_acked_total, "failed": failed,
                        "series": sum(th.series for th in threads), "distinct_acked_uids": len(acked_uids)},
            "per_sender": {th.name: {**th.counts(), "gate_wait_s": round(th.gate_wait_s, 1), "failures": th.failures[:5]}
                           for th in threads},
            "agent": {"analysed": analysed, "received": final.get("received"), "rejected": final.get("rejected"),
                      "series_completed": final.get("series_completed"), "store_rows": rows, "exit_status": rc,
                      "log_errors": agent_log_errors,
                      "rss_mib": {"start": samples[0]["rss_mib"], "after_warmup": rss_warm, "end_of_sending": rss_end,
                                  "peak": max(s["rss_mib"] for s in samples), "drained": final["rss_mib"]},
                      "fds": {"start": samples[0]["fds"], "after_warmup": fds_warm, "peak": max(s["fds"] for s in samples),
                              "drained": final["fds"]},
                      "threads": {"start": samples[0]["threads"], "peak": max(s["threads"] for s in samples)},
                      "rates": {"acked_per_s": round(n_acked_total / send_end, 1) if send_end else None,
                                "analysed_per_s": round(analysed / drained_at, 1) if drained_at else None}},
            "orthanc": {"held_at_end": orthanc_held, "errors": orthanc_errors[-10:]} if router else None,
            "checks": checks, "ok": all(c["ok"] for c in checks.values()), "lost_examples": lost[:5],
            "samples": samples,
        })
    finally:
        stop.set()
        if agent is not None:
            agent.stop()
        if orth is not None:
            orth.stop()
        shutil.rmtree(work, ignore_errors=True)
    res["json"] = str(out / f"{name}.json")
    Path(res["json"]).write_text(json.dumps(res, indent=1, default=str) + "\n")
    try:
        write_plot(res, out / f"{name}.png")
        res["plot"] = str(out / f"{name}.png")
    except ImportError as e:
        res["plot"] = None
        progress(f"no plot: {e}")
    (out / f"{name}.md").write_text(markdown(res))
    return res


# ------------------------------------------------------------------------------------------------ reports
def write_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["samples"]
    t = [x["t"] / 60 for x in s]
    fig, ax = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    ax[0].plot(t, [x["cstore_acked"] for x in s], label="C-STOREs ACKed (storescu)")
    ax[0].plot(t, [x["analysed"] or 0 for x in s], label="slices analysed (agent)")
    ax[0].plot(t, [x["cstore_failed"] for x in s], label="C-STOREs failed", color="red")
    ax[0].set_ylabel("instances")
    ax[0].legend(loc="upper left", fontsize=8)
    ax[1].plot(t, [x["backlog"] or 0 for x in s], label="backlog (received − analysed − rejected)")
    ax[1].plot(t, [x["queue_depth"] or 0 for x in s], label="medqc_queue_depth", alpha=0.7)
    if res.get("router"):
        ax[1].plot(t, [x.get("orthanc_held") or 0 for x in s], label="held in Orthanc", alpha=0.7)
    ax[1].set_ylabel("slices")
    ax[1].legend(loc="upper left", fontsize=8)
    ax[2].plot(t, [x["rss_mib"] for x in s], label="agent + child processes")
    ax[2].plot(t, [x["agent_rss_mib"] or 0 for x in s], label="agent")
    ax[2].plot(t, [x["receiver_rss_mib"] or 0 for x in s], label="receiver + analysis workers")
    ax[2].set_ylabel("RSS (MiB)")
    ax[2].legend(loc="upper left", fontsize=8)
    ax[3].plot(t, [x["fds"] for x in s], label="open descriptors")
    ax[3].plot(t, [x["threads"] for x in s], label="threads")
    ax[3].set_ylabel("count")
    ax[3].set_xlabel("minutes")
    ax[3].legend(loc="upper left", fontsize=8)
    for a in ax:
        a.axvline(res["warmup_s"] / 60, color="grey", ls=":", lw=1)
        a.axvline(res["send_s"] / 60, color="grey", ls="--", lw=1)
    fig.suptitle(f"{res['name']}: {res['senders']} storescu + {'1 via Orthanc' if res.get('router') else 'no router'}, "
                 f"{res['minutes']:g} min, {res['payload']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(res: dict) -> str:
    a, c = res["agent"], res["cstores"]
    lines = [f"### {res['name']}: {res['senders']} DCMTK senders + "
             f"{'1 through an Orthanc router' if res.get('router') else 'no router'}, {res['minutes']:g} min",
             "",
             f"Payload {res['payload']}, fresh UIDs per series; {res['cpus']} CPUs, load average at start "
             f"{', '.join(f'{x:.2f}' for x in res['load_at_start'])}; started {res['started']}; backlog bound "
             f"{res['max_backlog']} slices; series.keep_recent = {res['keep_recent']}.",
             "",
             "| | value |", "|---|---:|",
             f"| C-STOREs attempted / ACKed / failed | {c['attempted']:,} / {c['acked']:,} / {c['failed']:,} |",
             f"| series sent | {c['series']:,} |",
             f"| slices analysed (agent) / rows in the store | {a['analysed']:,.0f} / {a['store_rows']:,} |",
             f"| ACKed per s while sending / analysed per s to the drained end | {a['rates']['acked_per_s']} / {a['rates']['analysed_per_s']} |",
             f"| sending / drain after it | {res['send_s']:.0f} s / {res['drain_s']:.0f} s |",
             f"| RSS start / after warm-up / end of sending / peak / drained (MiB) | {a['rss_mib']['start']} / "
             f"{a['rss_mib']['after_warmup']} / {a['rss_mib']['end_of_sending']} / {a['rss_mib']['peak']} / {a['rss_mib']['drained']} |",
             f"| open descriptors start / after warm-up / peak / drained | {a['fds']['start']} / {a['fds']['after_warmup']} / "
             f"{a['fds']['peak']} / {a['fds']['drained']} |",
             f"| threads start / peak | {a['threads']['start']} / {a['threads']['peak']} |",
             "", "| sender | series | ACKed | failed | waited at the backlog bound |", "|---|---:|---:|---:|---:|"]
    for k, v in res["per_sender"].items():
        lines.append(f"| {k} | {v['series']} | {v['acked']:,} | {v['failed']} | {v['gate_wait_s']} s |")
    lines += ["", "| check | result | value |", "|---|---|---|"]
    for k, v in res["checks"].items():
        lines.append(f"| {k} | {'pass' if v['ok'] else '**FAIL**'} | {json.dumps(v['value'])} |")
    lines.append("")
    return "\n".join(lines)


def run_cli(args) -> int:
    """The ``medqc bench --soak`` entry point."""
    from medqc.errors import UsageError

    if not 0 < args.soak <= 24 * 60:
        raise UsageError("--soak MINUTES must be between 0 and 1440")
    if not 1 <= args.senders <= 64:
        raise UsageError("--senders must be between 1 and 64")
    if not 1 <= args.keep_recent <= 100000:
        raise UsageError("--keep-recent must be between 1 and 100000")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        res = run_soak(args.soak, args.senders, Path(args.out), args.study, args.bundle, args.max_backlog,
                       router=not args.no_router, keep_recent=args.keep_recent,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    print(markdown(res))
    print(f"results: {res['json']}" + (f", {res['plot']}" if res.get("plot") else ""))
    bad = [k for k, v in res["checks"].items() if not v["ok"]]
    if bad:
        print(f"soak checks failed: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
