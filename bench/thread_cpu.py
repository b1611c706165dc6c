#!/usr/bin/env python3
"""CPU time per thread of an agent while DCMTK storescu sends a study to it: where each slice's CPU goes.

    .venv/bin/python bench/thread_cpu.py STUDY_DIR [--no-inference] [--bundle DIR]

Runs the agent in this process (``medqc.agent.compose.compose``, default configuration on free loopback ports,
the receiver as a thread and the analysis on the pipeline thread so that their CPU is counted too, state in
a temporary folder), samples ``/proc/self/task/*/stat`` every 0.1 s (so threads that end, like
pynetdicom's per-association ones, are counted) and prints CPU ms per slice for each thread name. Threads
that are not Python threads (ONNX Runtime and OpenCV workers) are summed as ``native``. Unlike py-spy
samples this is CPU time, waiting excluded.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path


def _cpu_by_thread() -> dict[int, tuple[str, float]]:
    names = {t.native_id: t.name for t in threading.enumerate()}
    tck = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            f = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = re.sub(r"\d+", "#", names.get(int(tid), "native"))
        out[int(tid)] = (name, (int(f[11]) + int(f[12])) / tck)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--bundle")
    ap.add_argument("--no-inference", action="store_true")
    args = ap.parse_args()
    from medqc.agent.compose import compose
    from medqc.tools.bench.harness import series_uid
    from medqc.tools.bench.ingest import storescu
    from medqc.tools.bench.study import is_dicom
    from medqc.config import load_config

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    files = sorted(p for p in Path(args.study).rglob("*") if p.is_file() and is_dicom(p))
    # the receiver as a thread of this process (dicom.receiver_process = false) and the analysis on the
    # pipeline's thread (analysis.workers = 0), so that their CPU is counted per thread
    cfg = load_config(None, {"dicom.port": 0, "http.bind": "127.0.0.1:0", "sinks.stdout.enabled": False,
                             "dicom.receiver_process": False, "analysis.workers": 0})
    agent = compose(cfg, Path(tempfile.mkdtemp(prefix="medqc-thread-cpu-")), args.bundle, inference=not args.no_inference)
    agent.start()
    start, last = _cpu_by_thread(), {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            last.update(_cpu_by_thread())
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, name="sampler", daemon=True)
    sampler.start()
    try:
        t0 = time.time()
        wall, r = storescu(files, agent.receiver.port, "MEDQC")
        line = f"storescu: {len(files)} files, {len(files) / wall:.0f} slices/s received (exit {r.returncode})"
        if not args.no_inference:
            uid = series_uid(files)
            while (st := agent.tracker.get(uid)) is None or len(st.results) < len(files):
                time.sleep(0.02)
            line += f"; {len(files) / (max(x.analysed_at for x in st.results) - t0):.1f} slices/s analysed"
        done.set()
        sampler.join()
        last.update(_cpu_by_thread())
    finally:
        done.set()
        agent.stop()
    per: dict[str, float] = {}
    for tid, (name, cpu) in last.items():
        if name != "sampler":
            per[name] = per.get(name, 0.0) + cpu - start.get(tid, (name, 0.0))[1]
    print(line)
    print(f"CPU {1e3 * sum(per.values()) / len(files):.2f} ms per slice, by thread:")
    for name, cpu in sorted(per.items(), key=lambda kv: -kv[1]):
        if cpu > 0:
            print(f"  {1e3 * cpu / len(files):6.2f} ms  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
