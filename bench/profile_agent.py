#!/usr/bin/env python3
"""Where does the agent's time go? Sample a running ``medqc agent`` with py-spy while DCMTK storescu sends
a study to it, and print the hottest frames (self time, and the medqc/pynetdicom function each sits in).

    .venv/bin/python bench/profile_agent.py STUDY_DIR [--bundle DIR] [--no-inference] [--out prof.txt]

Needs py-spy (pip install py-spy) and DCMTK. ``--idle`` samples are included: on this path waiting
(sleep/poll loops) is as important as CPU.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


_WAITS = ("threading.py", "selectors.py")


def summarise(raw: Path, top: int = 12) -> str:
    """Per thread: share of its samples spent in each innermost medqc / pynetdicom / onnxruntime frame."""
    per: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        try:
            n = int(n)
        except ValueError:
            continue
        frames = stack.split(";")
        key = next((f for f in reversed(frames[1:]) if any(m in f for m in ("medqc/", "agent/", "pynetdicom/", "onnxruntime/"))),
                   frames[-1])
        if any(w in frames[-1] for w in _WAITS):
            key = f"(waiting) {key}"
        per[frames[0]][key] += n
    out = []
    busy = sorted(per.items(), key=lambda kv: -sum(v for k, v in kv[1].items() if not k.startswith("(waiting)")))
    for thread, c in busy[:5]:
        total = sum(c.values())
        out.append(f"{thread}: {total} samples")
        out += [f"  {100 * v / total:5.1f}%  {k[:120]}" for k, v in c.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study")
    ap.add_argument("--bundle")
    ap.add_argument("--no-inference", action="store_true")
    ap.add_argument("--out", default=None, help="keep the raw py-spy samples here")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    from medqc.tools.bench.harness import AgentProcess, series_uid
    from medqc.tools.bench.ingest import storescu
    from medqc.tools.bench.study import is_dicom

    files = sorted(p for p in Path(args.study).rglob("*") if p.is_file() and is_dicom(p))
    work = Path(tempfile.mkdtemp(prefix="medqc-profile-"))
    agent = AgentProcess(work, args.bundle, inference=not args.no_inference)
    why = agent.start()
    if why:
        print(why, file=sys.stderr)
        return 1
    raw = Path(args.out) if args.out else work / "prof.txt"
    spy_proc = subprocess.Popen([spy, "record", "--pid", str(agent.proc.pid), "--idle", "--threads", "-r", str(args.rate),
                                 "-f", "raw", "-o", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)
    try:
        wall, r = storescu(files, agent.port, "MEDQC")
        print(f"storescu: {len(files)} files in {wall:.2f} s = {len(files) / wall:.1f} slices/s (exit {r.returncode})")
        if not args.no_inference:
            t0 = time.time()
            times, verdict, _ = agent.wait_series(series_uid(files), len(files), 120)
            done = [a for _, _, a in times if a > 0]
            if done:
                print(f"analysed {len(done)} slices; last analysed {max(done) - (t0 - wall):.2f} s after the first send; verdict {verdict}")
    finally:
        spy_proc.send_signal(2)
        try:
            spy_proc.wait(30)
        except subprocess.TimeoutExpired:
            spy_proc.kill()
        agent.stop()
    if not raw.is_file():
        print(f"py-spy wrote nothing: {spy_proc.stderr.read().decode()[-500:]}", file=sys.stderr)
        return 1
    print(summarise(raw))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
