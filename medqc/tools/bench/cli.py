"""``medqc bench``'s options and its run: write the study, run the chosen sections, write the JSON, Markdown
and PNG under ``--out``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from medqc.errors import UsageError
from medqc.tools.bench.ingest import bench_agent_full, bench_agent_receive, bench_storescp
from medqc.tools.bench.micro import bench_inference, bench_naive, load_slices
from medqc.tools.bench.report import machine, markdown, print_table, skipped, table_rows, targets, write_plot
from medqc.tools.bench.study import is_dicom, make_study, reuid_copy

log = logging.getLogger("medqc.bench")

SCHEMA = "medqc.bench/1"


def run_bench(out: Path, quick: bool = False, bundle_path: str | None = None, slices: int | None = None,
              sections: tuple[str, ...] = ("a", "b", "c", "d", "e"), threads: int = 0, keep: bool = False,
              study_dir: str | None = None) -> dict:
    from medqc.bundle import BundleError, load_bundle

    n = slices or (24 if quick else 300)
    min_s = 0.5 if quick else 3.0
    res: dict = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": quick,
                 "machine": machine(), "sections": {}}
    bundle = None
    try:
        bundle = load_bundle(bundle_path)
        res["bundle"] = {"path": str(bundle.root), "name": bundle.name, "version": bundle.version,
                         "input": [bundle.preprocess.channels, bundle.preprocess.size, bundle.preprocess.size],
                         "files": sorted(bundle.manifest.get("files", {}))}
    except BundleError as e:
        res["bundle"] = {"error": str(e)}
    tmp = Path(tempfile.mkdtemp(prefix="medqc-bench-"))
    step = _Steps(len(sections) + 1)
    try:
        step("writing the study")
        study = tmp / "study"
        if study_dir:
            files = sorted(p for p in Path(study_dir).rglob("*") if p.is_file() and is_dicom(p))
            if slices:
                files = files[:slices]
            source = f"{study_dir} ({len(files)} files)"
            with contextlib.suppress(Exception):
                import pydicom as _pd

                if "medqc" in str(_pd.dcmread(str(files[0]), stop_before_pixels=True).get("Manufacturer", "")).lower() or \
                        any((p / "truth.json").is_file() for p in (Path(study_dir), *Path(study_dir).parents[:1])):
                    source = f"medqc synth series given with --study ({len(files)} files)"
            study = Path(study_dir)
        else:
            files, source = make_study(study, n, distinct=6 if quick else None)
        lat_files = reuid_copy(files[: 30 if quick else 120], tmp / "latency-study") if "c" in sections else []
        import pydicom

        size = int(pydicom.dcmread(str(files[0]), stop_before_pixels=True).Rows)
        res["study"] = {"slices": len(files), "size": size, "source": source,
                        "bytes_per_slice": int(sum(p.stat().st_size for p in files) / max(1, len(files)))}
        S = res["sections"]
        no_model = f"no model bundle: {res['bundle'].get('error')}" if bundle is None else ""
        if "a" in sections:
            step("(a) storescu → storescp")
            S["storescp"] = bench_storescp(files, tmp)
        if "b" in sections:
            step("(b) agent, receive only")
            S["agent_receive"] = bench_agent_receive(files, tmp, bundle_path)
        if "c" in sections:
            step("(c) agent, full pipeline + latency at 60/s")
            S["agent_full"] = skipped(no_model) if no_model else bench_agent_full(files, study, tmp, bundle_path, lat_files)
            # the same without fsync before each ACK (spool.fsync = false): what durability costs here
            S["agent_full_nofsync"] = skipped(no_model) if no_model else bench_agent_full(
                files, study, tmp, bundle_path, reuid_copy(lat_files, tmp / "latency-study-2") if lat_files else [], fsync=False)
        if "d" in sections or "e" in sections:
            x = None
            if bundle is not None:
                x, S["decode_preprocess"] = load_slices(files, bundle.preprocess)
        if "d" in sections:
            step("(d) inference per backend")
            batch = 16
            S["inference"] = {"all": skipped(no_model)} if no_model else bench_inference(bundle, x, batch, min_s, threads)
        if "e" in sections:
            step("(e) naive baseline")
            S["naive"] = skipped(no_model) if no_model else bench_naive(files[: min(len(files), 60)], bundle, min_s)
    finally:
        step.close()
        if keep:
            res["workdir"] = str(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    names = {"a": "storescp", "b": "agent_receive", "c": "agent_full", "d": "inference", "e": "naive"}
    if "c" not in sections:
        res["sections"].setdefault("agent_full_nofsync", skipped(f"not selected (--only {''.join(sections)})"))
    for letter, key in names.items():
        res["sections"].setdefault(key, skipped(f"not selected (--only {''.join(sections)})"))
    res["table"] = table_rows(res)
    res["targets"] = targets(res)
    out.mkdir(parents=True, exist_ok=True)
    stem = res["machine"]["label"] + ("-quick" if quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(res))
    try:
        write_plot(res, out / f"{stem}.png")
        res["plot"] = str(out / f"{stem}.png")
    except ImportError:
        res["plot"] = None
        log.warning("matplotlib is not installed: no PNG written")
    res["json"] = str(out / f"{stem}.json")
    return res


class _Steps:
    """A tqdm progress bar over the sections (to stderr), or log lines without tqdm."""

    def __init__(self, total: int):
        self.bar = None
        with contextlib.suppress(ImportError):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="medqc bench", unit="step", file=sys.stderr, leave=False)
        self.started = False

    def __call__(self, what: str):
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.bar.set_postfix_str(what)
        else:
            log.info("%s", what)
        self.started = True

    def close(self):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small study and short timings (CI: under 90 s on 2 cores)")
    p.add_argument("--out", default="bench/results", metavar="DIR", help="where the JSON, PNG and Markdown table go (default bench/results)")
    p.add_argument("--bundle", default=None, metavar="DIR", help="model bundle (default: the embedded default)")
    p.add_argument("--slices", type=int, default=None, metavar="N", help="slices in the study (default 300; 24 with --quick)")
    p.add_argument("--only", default="abcde", metavar="SECTIONS", help="run only these sections, e.g. 'ad' (default abcde)")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="ONNX Runtime intra-op threads for (d) (default: the runner's)")
    p.add_argument("--study", default=None, metavar="DIR", help="use this CT series (one series of uncompressed DICOM files) instead of a synthetic one")
    p.add_argument("--keep", action="store_true", help="keep the temporary study and agent state (path in the JSON)")
    p.add_argument("--soak", type=float, default=None, metavar="MINUTES", help="instead: a soak of a real agent under real senders (medqc/tools/bench/soak.py)")
    p.add_argument("--senders", type=int, default=4, metavar="N", help="--soak: DCMTK senders besides the one through Orthanc (default 4)")
    p.add_argument("--max-backlog", type=int, default=1000, metavar="SLICES", help="--soak: a sender starts its next series only below this backlog (default 1000)")
    p.add_argument("--no-router", action="store_true", help="--soak: no sender through Orthanc")
    p.add_argument("--keep-recent", type=int, default=20, metavar="N",
                   help="--soak: series the agent keeps in memory (default 20); at least N must complete within the warm-up")


def run(args) -> int:
    if args.soak is not None:
        from medqc.tools.bench.soak import run_cli

        return run_cli(args)
    only = tuple(dict.fromkeys(args.only.lower()))
    bad = [c for c in only if c not in "abcde"]
    if bad or not only:
        raise UsageError(f"--only {args.only!r}: use letters from a (storescp), b (agent receive), c (agent full), d (inference), e (naive)")
    if args.slices is not None and not 2 <= args.slices <= 5000:
        raise UsageError("--slices must be between 2 and 5000")
    if args.bundle and not Path(args.bundle).exists():
        raise UsageError(f"--bundle {args.bundle}: no such folder")
    if args.study:
        d = Path(args.study)
        if not d.is_dir() or not any(is_dicom(p) for p in d.rglob("*") if p.is_file()):
            raise UsageError(f"--study {args.study}: not a folder with DICOM files")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    res = run_bench(Path(args.out), args.quick, args.bundle, args.slices, only, args.threads, args.keep, args.study)
    print_table(res)
    print(f"results: {res['json']}" + (f", {res['plot']}" if res.get("plot") else ""))
    failed = [k for k, v in res["sections"].items() if isinstance(v, dict) and v.get("status") == "failed"]
    failed += [f"inference:{k}" for k, v in (res["sections"].get("inference") or {}).items() if isinstance(v, dict) and v.get("status") == "failed"]
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
