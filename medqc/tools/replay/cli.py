"""``medqc replay``'s options and its run: the replay, the summary, the plot and the JSON report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from medqc.errors import UsageError
from medqc.tools.replay.driver import exit_code, replay
from medqc.tools.replay.plan import DEFAULT_RATE
from medqc.tools.replay.report import print_summary, write_plot


def parse_target(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--to {text!r} must be HOST:PORT, for example 127.0.0.1:11112")
    return host.strip("[]"), int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("studies", nargs="+", metavar="STUDY_DIR", help="folders (searched recursively) or files of recorded studies")
    p.add_argument("--to", required=True, metavar="HOST:PORT", help="the storage SCP to send to (medqc agent, storescp, Orthanc, ...)")
    p.add_argument("--called-aet", default="MEDQC", help="called AE title (default: MEDQC)")
    p.add_argument("--calling-aet", default="MEDQC_REPLAY", help="our AE title (default: MEDQC_REPLAY)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, metavar="SLICES_PER_S", help=f"send each series at this rate (per association; default {DEFAULT_RATE:g})")
    pace.add_argument("--asap", action="store_true", help="send as fast as the peer acknowledges")
    pace.add_argument("--as-recorded", action="store_true", help="reproduce the gaps of the recorded ContentTime/AcquisitionTime (each gap capped by --max-gap)")
    p.add_argument("--max-gap", type=float, default=5.0, metavar="S", help="longest pause --as-recorded reproduces (default 5 s)")
    p.add_argument("--associations", type=int, metavar="N", help="studies sent at once, one association each (default: all studies, at most 8)")
    p.add_argument("--agent-url", default="", metavar="URL", help="the medqc agent's HTTP API (e.g. http://127.0.0.1:8480) for latency figures")
    p.add_argument("--agent-token", default=os.environ.get("MEDQC_HTTP_TOKEN", ""), help="bearer token for the agent's API (default: $MEDQC_HTTP_TOKEN)")
    p.add_argument("--agent-wait", type=float, default=30.0, metavar="S", help="how long to wait for series verdicts after the last slice (default 30 s)")
    p.add_argument("--dimse-timeout", type=float, default=10.0, metavar="S", help="give up on a C-STORE response after this long (default 10 s)")
    p.add_argument("--ignore-non-dicom", action="store_true", help="files that are not DICOM instances do not make the exit status non-zero")
    p.add_argument("--json", metavar="OUT", help="write the full result (schema medqc.replay/1)")
    p.add_argument("--plot", metavar="OUT.png", help="write a latency CDF and a send timeline")


def run(args) -> int:
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # one INFO line per C-STORE otherwise
    host, port = parse_target(args.to)
    mode = "asap" if args.asap else "recorded" if args.as_recorded else "rate"
    rate = args.rate if args.rate is not None else DEFAULT_RATE
    if args.associations is not None and args.associations < 1:
        raise UsageError("--associations must be at least 1")
    if args.dimse_timeout <= 0 or args.max_gap < 0 or args.agent_wait < 0:
        raise UsageError("--dimse-timeout must be > 0; --max-gap and --agent-wait must be >= 0")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot!r}: the plot is a PNG; name it OUT.png")
    try:
        result, records = replay(
            args.studies, host, port, args.called_aet, args.calling_aet, mode, rate, args.associations,
            args.agent_url, args.agent_token, args.agent_wait, args.dimse_timeout, args.max_gap, progress=True,
        )
    except OSError as e:  # the agent API does not answer
        print(f"medqc replay: {e}", file=sys.stderr)
        return 1
    print_summary(result)
    if args.plot:
        write_plot(result, records, Path(args.plot))
    if result.get("agent"):
        result["agent"].pop("_slice_ms", None)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = dict(result)
        doc["sends"] = [asdict(r) for r in records]
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return exit_code(result, args.ignore_non_dicom)
