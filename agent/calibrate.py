"""``medqc calibrate SITE_EXPORT_DIR...``: learn each scanner's normal noise and ring level from a site export.

The export goes through the same pipeline as ``medqc analyze`` (judged against the baselines already stored,
as the agent would judge it); every series that passes with no finding (``medqc.baselines.learnable``) is
stored under its scanner key in the baselines file of the state directory (``[baselines] path``, default
``<state_dir>/baselines.sqlite``). Prints what it learned — per key: series stored, whether the baseline is
usable, its median noise, the top of its normal range and its ring level — and what it skipped and why.

    medqc calibrate EXPORT/ [--json]        learn from an export
    medqc calibrate --show [--json]         every stored key and its baseline
    medqc calibrate --reset [--key KEY]     forget every series, or those of one key (exact, or station *)

Exit 0 when it ran, 2 usage or configuration error, 1 internal.
"""

from __future__ import annotations

import json
import sys

from medqc.agent.analyze import BACKENDS


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="*", metavar="SITE_EXPORT_DIR", help="DICOM files or folders (searched recursively)")
    p.add_argument("--show", action="store_true", help="print the stored baselines and exit")
    p.add_argument("--reset", action="store_true", help="forget the stored series (all, or those of --key) and exit")
    p.add_argument("--key", metavar="KEY", default=None,
                   help="with --reset or --show: one scanner key as --show prints it (MANUFACTURER|MODEL|STATION|KERNEL|"
                        "THICKNESS|REGION; * as the station: that model at every station)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--config", metavar="FILE", default=None, help="agent configuration (TOML): [baselines], state_dir")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="state directory holding baselines.sqlite (default: the config's state_dir, $STATE_DIRECTORY or ./medqc-state)")
    p.add_argument("--backend", choices=BACKENDS, default=None, help="inference backend (as medqc analyze)")
    p.add_argument("--bundle", metavar="DIR", default=None, help="model bundle folder (default: the bundled model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _fmt(v, nd=1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def table(entries: list[dict], min_series: int) -> list[str]:
    """The baselines as a table: key → series, usable, median noise, normal range, ring level."""
    if not entries:
        return ["  (none stored)"]
    w = max(len("key"), *(len(e["key"]) for e in entries))
    lines = [f"  {'key':<{w}}  series  usable     noise σ 2 mm (HU)  normal ≤  noisy >  spread  ring p90 (HU)  ring >"]
    for e in entries:
        usable = "yes" if e["usable"] else f"no ({e['series']}/{min_series})"
        lines.append(f"  {e['key']:<{w}}  {e['series']:>6}  {usable:<9}  {_fmt(e['noise_sd_2mm_hu']):>17}  "
                     f"{_fmt(e['noise_normal_max_hu']):>8}  {_fmt(e['noise_high_above_hu']):>7}  {_fmt(e['noise_spread'], 2):>6}  "
                     f"{_fmt(e['ring_p90_hu'], 2):>13}  {_fmt(e['ring_limit_hu'], 2):>6}")
    return lines


def learn(paths: list[str], cfg, store, bundle=None, backend=None, progress=False) -> dict:
    """Run the export through the pipeline (judged against ``store``'s baselines where enabled) and store its
    learnable series. Returns what was learned and skipped, and the baselines of the keys it touched."""
    from medqc import baselines
    from medqc.agent.analyze import analyse_states

    report, states = analyse_states(paths, cfg, bundle, backend, progress, None,
                                    store if cfg.baselines.enabled else None)
    learned, skipped, keys = [], [], []
    for st in states:
        ok, why = baselines.learnable(st)
        row = {"series_instance_uid": st.uid, "series_number": st.first.series_number, "slices": len(st.results)}
        if not ok:
            skipped.append({**row, "reason": why})
            continue
        key, stats = st.scanner["key"], st.scanner["stats"]
        new = store.learn(key, st.uid, stats)
        learned.append({**row, "key": key.exact, "new": new, "stats": stats.to_dict()})
        for k in (key.exact, key.coarse):
            if k not in keys:
                keys.append(k)
    shown = [e for e in store.summary() if e["key"] in keys]
    return {"schema": "medqc.calibrate/1", "store": str(store.path), "min_series": store.min_series,
            "learned": learned, "skipped": skipped, "baselines": shown, "rejected": len(report.get("rejected", []))}


def human(result: dict) -> str:
    lines = [f"learned {len(result['learned'])} series ({sum(1 for x in result['learned'] if x['new'])} new) into "
             f"{result['store']} (a baseline is used from {result['min_series']} series):"]
    lines += table(result["baselines"], result["min_series"])
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])} series:")
        for s in result["skipped"]:
            num = f"#{s['series_number']}" if s["series_number"] is not None else "#?"
            lines.append(f"  {s['series_instance_uid']}  {num:>5}  {s['slices']:>4} slices  {s['reason']}")
    if result.get("rejected"):
        lines.append(f"not analysed: {result['rejected']} input(s) (not axial CT images; medqc analyze lists why)")
    return "\n".join(lines)


def run(args) -> int:
    from medqc.baselines import Baselines
    from medqc.bundle import BundleError
    from medqc.config import ConfigError, load_config
    from medqc.errors import UsageError
    from medqc.runners import BackendUnavailable, RunnerError

    if args.show and args.reset:
        raise UsageError("--show and --reset exclude each other")
    if (args.show or args.reset) and args.paths:
        raise UsageError("--show and --reset take no SITE_EXPORT_DIR")
    if not (args.show or args.reset or args.paths):
        raise UsageError("give SITE_EXPORT_DIR..., --show or --reset")
    if args.key is not None and not (args.show or args.reset):
        raise UsageError("--key goes with --show or --reset")
    try:
        cfg = load_config(args.config, {"state_dir": args.state_dir})
    except ConfigError as e:
        raise UsageError(str(e)) from None
    try:
        store = Baselines.from_config(cfg)
    except Exception as e:  # noqa: BLE001 - sqlite3 / OS errors: say which file
        raise UsageError(f"cannot open the baselines file under {cfg.baselines.path or cfg.state_path}: {e}") from None
    try:
        if args.reset:
            n = store.reset(args.key)
            if args.key is not None and n == 0:
                keys = sorted({e["key"] for e in store.summary()})
                raise UsageError(f"no series stored under {args.key!r}; stored keys: {', '.join(keys) or '(none)'}")
            out = {"schema": "medqc.calibrate/1", "store": str(store.path), "reset": args.key or "all", "removed": n}
            print(json.dumps(out) if args.json else f"removed {n} series ({args.key or 'every key'}) from {store.path}")
            return 0
        if args.show:
            entries = [e for e in store.summary() if args.key is None or e["key"] == args.key]
            out = {"schema": "medqc.calibrate/1", "store": str(store.path), "min_series": store.min_series, "baselines": entries}
            if args.json:
                print(json.dumps(out, indent=2))
            else:
                print(f"baselines in {store.path} (a baseline is used from {store.min_series} series):")
                print("\n".join(table(entries, store.min_series)))
            return 0
        try:
            result = learn(args.paths, cfg, store, args.bundle, args.backend,
                           progress=not args.no_progress and sys.stderr.isatty())
        except (BundleError, BackendUnavailable, RunnerError) as e:
            raise UsageError(str(e)) from None
        if args.json:
            json.dump(result, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            print(human(result))
        return 0
    finally:
        store.close()
