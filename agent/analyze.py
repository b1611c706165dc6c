"""``medqc analyze PATH... [--json] [--backend NAME] [--bundle DIR]``: the agent's pipeline, offline.

Files and folders (recursively) go through the same decode → batch → infer → series checks as the agent;
each series completes at the end of the input. Prints a human summary, or with ``--json`` one
``medqc.report/1`` document.

Exit status, for scripts (``EXIT``): 0 every series passed (below ``--fail-on``); 1 a series' verdict is at or
above ``--fail-on`` (``fail`` by default, ``warn`` to stop on warnings too); 3 nothing analysable (no axial
CT slice among the inputs, or none that could be decoded); 2 usage; 4 the analysis could not complete.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from medqc.runners import CHOICES

BACKENDS = (*CHOICES, "none")
EXIT = {"pass": 0, "fail_on": 1, "usage": 2, "nothing": 3, "failed": 4}
RANK = {"pass": 0, "warn": 1, "fail": 2}


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="print one medqc.report/1 JSON document")
    p.add_argument("--backend", choices=BACKENDS, default=None,
                   help="inference backend (default: the config's, 'auto'); 'none' = classical detectors only")
    p.add_argument("--bundle", metavar="DIR", default=None, help="model bundle folder (default: the bundled model)")
    p.add_argument("--config", metavar="FILE", default=None, help="agent configuration (TOML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--fail-on", choices=("warn", "fail"), default="fail",
                   help="exit 1 when a series' verdict is this or worse (default fail); 0 otherwise, 3 when nothing "
                        "could be analysed, 2 usage, 4 the analysis could not complete")
    p.add_argument("--plot", metavar="DIR", default=None,
                   help="also write one PNG per series into DIR: coverage against the protocol, per-slice artifact scores "
                        "against their thresholds, the slices behind the findings (needs matplotlib)")


def collect(paths: list[str]) -> list[Path]:
    from medqc.errors import UsageError

    out = []
    for s in paths:
        p = Path(s)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise UsageError(f"{s}: no such file or folder")
    return out


def human(report: dict) -> str:
    lines = []
    for s in report["series"]:
        lines.append(f"series {s['series_instance_uid']}  {s.get('body_part') or '?'}  rule={s.get('protocol_rule') or '-'}  "
                     f"slices={s['slices']}  verdict={str(s['verdict']).upper()}")
        for f in s["findings"]:
            lines.append(f"  [{f['severity']:9}] {f['check']:22} {f['message']}")
        if s.get("series_kind") == "dynamic":
            lines.append(f"  {s['coverage_note']}")
        elif s.get("baseline"):
            lines.append(f"  {s['baseline']['text']}")
        for check, why in (s.get("not_judged") or {}).items():
            lines.append(f"  [not judged] {check:22} {why}")
    if len(report["series"]) > 1:
        import collections

        verdicts = collections.Counter(str(s["verdict"]) for s in report["series"])
        found = collections.Counter((f["check"], f["severity"]) for s in report["series"] for f in s["findings"]
                                    if f["severity"] != "info")
        lines.append(f"{len(report['series'])} series: " + ", ".join(f"{verdicts[v]} {v}" for v in ("pass", "warn", "fail") if verdicts[v])
                     + ("; findings: " + ", ".join(f"{c} ×{n} ({sev})" for (c, sev), n in sorted(found.items())) if found else ""))
    if report.get("rejected"):
        lines.append(f"not analysed: {len(report['rejected'])} input(s)")
        named: dict[str, list[str]] = {}  # reason → the files (their first three are named)
        for r in report["rejected"]:
            named.setdefault(r["reason"], []).append(r.get("path") or r.get("sop_instance_uid") or "?")
        for why, files in sorted(named.items(), key=lambda x: -len(x[1])):
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            lines.append(f"  {len(files):5d} × {why}: {shown}")
    if not report["series"]:
        lines.append("no axial CT series found")
    return "\n".join(lines)


def analyze(paths: list[str], cfg, bundle: str | None = None, backend: str | None = None, progress: bool = False,
            plot_dir: str | None = None) -> dict:
    """The report of ``paths``; noise and rings judged against the learned per-scanner baselines of the state
    directory where its file exists (``[baselines]``; analyze never learns)."""
    from medqc.baselines import Baselines

    store = Baselines.from_config(cfg, create=False) if cfg.baselines.enabled else None
    try:
        return analyse_states(paths, cfg, bundle, backend, progress, plot_dir, store)[0]
    finally:
        if store is not None:
            store.close()


def analyse_states(paths: list[str], cfg, bundle: str | None = None, backend: str | None = None, progress: bool = False,
                   plot_dir: str | None = None, baselines=None) -> tuple[dict, list]:
    """``analyze`` with the baselines given (``medqc.baselines.Baselines`` or None): (report, series states)."""
    from medqc.agent.compose import compose
    from medqc.agent.report import build_report

    files = collect(paths)
    if plot_dir is not None:
        from medqc.agent.web.figure import _matplotlib
        from medqc.errors import UsageError

        _matplotlib()  # a clear usage error before any work when matplotlib is missing
        try:  # and one for a folder that cannot be written
            Path(plot_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--plot {plot_dir}: cannot create the folder ({e.strerror or e})") from None
    # the agent keeps the last series.keep_recent completed series in memory; the offline report must hold
    # every series of the input (each file adds at most one)
    if len(files) > cfg.series.keep_recent:
        import dataclasses

        cfg = dataclasses.replace(cfg, series=dataclasses.replace(cfg.series, keep_recent=len(files)))
    agent = compose(cfg, bundle=bundle, backend=backend, inference=backend != "none", offline=True, baselines=baselines,
                    plot=plot_dir is not None, workers=offline_workers(cfg, len(files)))
    pipe = agent.pipeline
    try:
        for f in files:
            pipe.submit(f)
        bar = None
        if progress and files:
            from tqdm import tqdm

            bar = tqdm(total=len(files), unit="file", file=sys.stderr, desc="analyse")
        pipe.run_until_idle(bar)
        if bar is not None:
            bar.close()
        pipe.complete_all("end-of-input")
        states = pipe.tracker.all()
        report = build_report(states, list(pipe.rejected), cfg.privacy)
        if plot_dir is not None:
            pipe.flush_sinks(60.0)  # the thumbnails are rendered on their sink's thread
            report["figures"] = write_figures(report, agent.thumbnails, pipe.tracker.thresholds, Path(plot_dir))
        return report, states
    finally:
        pipe.stop(0.0)


FILES_PER_WORKER = 32  # offline, "auto" starts a worker per this many input files at most


def offline_workers(cfg, files: int) -> int:
    """Analysis worker processes for ``medqc analyze`` on ``files`` inputs: ``analysis.workers`` where it is a
    number (0: on the main thread); for "auto" the cores less one, but no more than one per FILES_PER_WORKER
    files, and none unless that makes two or more: a worker takes about a second to start (imports, model,
    warm-up) and one alone only moves the work the main thread's analysis already overlaps (its detectors
    run beside the network) into another process."""
    from medqc.config import worker_count

    n = worker_count(cfg)
    if cfg.analysis.workers != "auto":
        return n
    n = min(n, files // FILES_PER_WORKER)
    return n if n >= 2 else 0


def write_figures(report: dict, thumbnails, thresholds: dict, out: Path) -> list[str]:
    """One PNG per series (``medqc.agent.web.figure``), with the slices' thumbnails (``console.ThumbnailSink``);
    returns the paths written."""
    from medqc.agent.checks.artifact import RELATIVE_MARGIN
    from medqc.agent.web.figure import file_name, series_figure

    paths = []
    for i, s in enumerate(report["series"], 1):
        thumbs = thumbnails.of_series(s["series_instance_uid"]) if thumbnails is not None else {}
        p = series_figure(s, thresholds, out / file_name(s, i), thumbs, motion_margin=RELATIVE_MARGIN)
        paths.append(str(p))
    return paths


def exit_status(report: dict, fail_on: str = "fail") -> int:
    """The exit status for a report (``EXIT``): nothing analysable beats every verdict."""
    analysed = [s for s in report["series"] if any(not row.get("error") for row in s.get("per_slice", []))]
    if not analysed:
        return EXIT["nothing"]
    worst = max(RANK.get(str(s["verdict"]), 0) for s in report["series"])
    return EXIT["fail_on"] if worst >= RANK[fail_on] else EXIT["pass"]


def run(args) -> int:
    from medqc.bundle import BundleError
    from medqc.config import ConfigError, load_config
    from medqc.errors import UsageError
    from medqc.runners import BackendUnavailable, RunnerError

    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    try:
        report = analyze(args.paths, cfg, args.bundle, args.backend, progress=not args.no_progress and sys.stderr.isatty(),
                         plot_dir=args.plot)
    except (BundleError, BackendUnavailable, RunnerError) as e:
        raise UsageError(str(e)) from None
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print(human(report))
        for p in report.get("figures", []):
            print(f"figure: {p}")
    sys.stdout.flush()  # a report that could not be written is a failure (4), not a verdict
    return exit_status(report, args.fail_on)
