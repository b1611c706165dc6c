"""``replay()``: scan, plan, send every study (``associations`` at a time, one sender thread per study), follow
the agent where asked, and gather the result (schema ``medqc.replay/1``). ``medqc bench`` calls it too."""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from pathlib import Path

from medqc.errors import UsageError
from medqc.tools.replay.plan import DEFAULT_RATE, plan, scan
from medqc.tools.replay.send import Sender, SendRecord
from medqc.tools.replay.stats import agent_figures, summarize
from medqc.tools.replay.watch import AgentWatcher

log = logging.getLogger("medqc.replay")

SCHEMA = "medqc.replay/1"


def replay(
    paths: list[str | Path],
    host: str,
    port: int,
    called_aet: str = "MEDQC",
    calling_aet: str = "MEDQC_REPLAY",
    mode: str = "rate",
    rate: float = DEFAULT_RATE,
    associations: int | None = None,
    agent_url: str = "",
    agent_token: str = "",
    agent_wait_s: float = 30.0,
    dimse_timeout: float = 10.0,
    max_gap_s: float = 5.0,
    progress: bool = False,
) -> tuple[dict, list[SendRecord]]:
    """Replay ``paths`` to ``host:port``. Returns (result dict in schema ``medqc.replay/1``, send records)."""
    from pynetdicom import _config

    if mode not in ("rate", "asap", "recorded"):
        raise UsageError(f"pacing {mode!r}: choose one of rate, asap, recorded")
    if mode == "rate" and not (rate > 0):
        raise UsageError(f"--rate must be > 0 slices/s, got {rate}")
    for aet, what in ((called_aet, "--called-aet"), (calling_aet, "--calling-aet")):
        if not (1 <= len(aet) <= 16) or aet != aet.strip() or "\\" in aet:
            raise UsageError(f"{what} {aet!r} must be 1-16 characters without surrounding spaces or backslashes")
    _config.STORE_SEND_CHUNKED_DATASET = True  # file bytes go out as they are (a Dataset is still encoded)

    instances, skipped = scan(paths, progress)
    studies = plan(instances, mode, rate, max_gap_s)
    n_assoc = associations or max(1, min(len(studies), 8))
    watcher = None
    agent_error = ""
    if agent_url:
        watcher = AgentWatcher(agent_url, agent_token)
        watcher.check()
        watcher.start_stream()
        if watcher.stream_error:
            agent_error = watcher.stream_error
    timeouts = {"acse": 10.0, "dimse": float(dimse_timeout), "network": 30.0, "connect": 5.0,
                "poll": 0.0002 if mode == "asap" else 0.0005}
    total = sum(len(sp.instances) for st in studies for sp in st.series)
    bar = None
    if progress and total:
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="C-STORE", unit="slice", file=sys.stderr, leave=False)
        except ImportError:
            bar = None
    lock = threading.Lock()

    def on_sent(rec):
        if bar is not None:
            with lock:
                bar.update(1)

    senders = [Sender(host, port, called_aet, calling_aet, timeouts, on_sent) for _ in studies]
    queue_ = list(zip(senders, studies))
    qlock = threading.Lock()

    def worker():
        while True:
            with qlock:
                if not queue_:
                    return
                sender, study = queue_.pop(0)
            try:
                sender.send_study(study)
            except Exception as e:  # a bug or an unexpected pynetdicom error: keep the other studies going
                log.exception("sending study %s failed", study.study_uid)
                sender.fatal = f"{type(e).__name__}: {e}"

    t_start = time.time()
    threads = [threading.Thread(target=worker, name=f"medqc-replay-{i}", daemon=True) for i in range(min(n_assoc, len(studies)))]
    for th in threads:
        th.start()
    try:
        for th in threads:
            while th.is_alive():
                th.join(0.2)
    except KeyboardInterrupt:
        for s in senders:
            s.stop()
        for th in threads:
            th.join(timeouts["dimse"] + 2)
    wall = time.time() - t_start
    if bar is not None:
        bar.close()
    records = [r for s in senders for r in s.records]
    runs = [r for s in senders for r in s.series_runs]
    mode_d = {"mode": mode, "rate": rate if mode == "rate" else None, "associations": n_assoc, "max_gap_s": max_gap_s if mode == "recorded" else None}
    result = {
        "schema": SCHEMA,
        "to": f"{host}:{port}",
        "called_aet": called_aet,
        "calling_aet": calling_aet,
        "inputs": [str(p) for p in paths],
        "started_at": t_start,
        "studies": len(studies),
        "transport": summarize(records, runs, skipped, wall, mode_d),
        "fatal": sorted({s.fatal for s in senders if s.fatal}),
        "responses_rescued": sum(s.rescued for s in senders),
    }
    if watcher is not None:
        uids = [r.series_uid for r in runs if any(x.ok for x in records if x.series_uid == r.series_uid)]
        verdicts = watcher.wait_verdicts(uids, time.time() + agent_wait_s)
        time.sleep(0.05)  # let the last stream events land
        events = watcher.snapshot()
        watcher.stop()
        fig = agent_figures(records, runs, events, verdicts)
        missing = [u for u in uids if u in verdicts and math.isnan(verdicts[u][0])]
        ignored = getattr(watcher, "unknown", [])
        if ignored:  # not an error: the agent rejected every instance of these (the reason is in its log/API)
            fig["series_not_analysed"] = ignored
            fig["note"] = (fig.get("note", "") + "; " if fig.get("note") else "") + \
                f"{len(ignored)} series unknown to the agent (all instances rejected, e.g. localizers or secondary captures)"
        if missing:
            agent_error = (agent_error + "; " if agent_error else "") + f"{len(missing)} series without a verdict within {agent_wait_s:g} s"
        if agent_error:
            fig["error"] = agent_error
        # raw latencies for the plot (not written to JSON)
        fig["_slice_ms"] = []
        for uid, (_, rep) in verdicts.items():
            for ps in (rep or {}).get("per_slice") or []:
                ra, aa = ps.get("received_at"), ps.get("analysed_at")
                if isinstance(ra, (int, float)) and isinstance(aa, (int, float)) and ra > 0 and aa > 0:
                    fig["_slice_ms"].append((aa - ra) * 1e3)
        result["agent"] = fig
    return result, records


def exit_code(result: dict, ignore_non_dicom: bool = False) -> int:
    t = result["transport"]
    bad = t["failed"] > 0 or bool(result.get("fatal")) or (t["files_skipped"] > 0 and not ignore_non_dicom) or t["sent"] == 0
    if result.get("agent", {}).get("error"):
        bad = True
    return 1 if bad else 0
