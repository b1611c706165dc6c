"""CPU time per DICOM file of ``medqc.agent.decode.decode_file``: the selective reading (only DECODE_KEYWORDS kept)
against reading every element (``all_elements=True``), and optionally against another decode.py (``--baseline
FILE``, e.g. one from ``git show REV:agent/decode.py``), in one process, in alternating rounds; the median
round of each. CPU time (``time.process_time``), not wall time, so that other load on the machine weighs less.

    .venv/bin/python bench/decode_speed.py /path/to/series [--rounds 9] [--baseline old_decode.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a series folder (every file in it is decoded)")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--baseline", type=Path, help="another decode.py to time beside this one")
    a = ap.parse_args(argv)

    from medqc.agent import decode

    files = []
    for p in sorted(p for p in a.folder.iterdir() if p.is_file()):
        try:
            decode.decode_file(p)
            files.append(p)
        except decode.NotDicom:
            pass  # a licence or directory file beside the slices
    if not files:
        ap.error(f"no DICOM file in {a.folder}")
    ways = {"selective": lambda p: decode.decode_file(p),
            "all_elements": lambda p: decode.decode_file(p, all_elements=True)}
    if a.baseline:
        spec = importlib.util.spec_from_file_location("decode_baseline", a.baseline)
        base = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = base  # dataclasses look their module up there
        spec.loader.exec_module(base)
        ways["baseline"] = lambda p: base.decode_file(p)

    def one_round(fn) -> float:
        t0 = time.process_time()
        for p in files:
            fn(p)
        return (time.process_time() - t0) / len(files) * 1e3

    for fn in ways.values():  # warm: imports, page cache, pydicom's dictionaries
        one_round(fn)
    rounds = {k: [] for k in ways}
    for r in range(a.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for k in order:
            rounds[k].append(one_round(ways[k]))
    out = {k: {"ms_per_slice_median": round(statistics.median(v), 3), "ms_per_slice_min": round(min(v), 3)}
           for k, v in rounds.items()}
    print(json.dumps({"dicom_files": len(files), "rounds": a.rounds, "cpu_time": "time.process_time", **out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
