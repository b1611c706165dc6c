"""A replay's result as people read it: the summary on stdout and the plot (latency CDF, send timeline)."""

from __future__ import annotations

import sys
from pathlib import Path

from medqc.errors import UsageError
from medqc.tools.replay.send import SendRecord


def print_summary(result: dict, out=sys.stdout) -> None:
    t = result["transport"]
    w = out.write
    w(f"medqc replay → {result['to']} (called AE {result['called_aet']}, {t['pacing']['mode']}"
      f"{', %g slices/s per association' % t['pacing']['rate'] if t['pacing']['mode'] == 'rate' else ''})\n")
    w(f"  sent {t['sent']} of {t['instances_planned']} instances in {len(t['series'])} series, "
      f"{t['failed']} failed, {t['files_skipped']} file(s) skipped; wall {t['wall_s']:.2f} s"
      f"{'; %.1f slices/s' % t['throughput_slices_per_s'] if t['throughput_slices_per_s'] else ''}\n")

    def row(name, p, unit):
        if not p or not p.get("n"):
            w(f"  {name:<28} n/a\n")
            return
        w(f"  {name:<28} p50 {p['p50']:>9.2f}  p90 {p['p90']:>9.2f}  p99 {p['p99']:>9.2f}  max {p['max']:>9.2f} {unit}  (n={p['n']})\n")

    row("C-STORE round trip", t["c_store_rtt_ms"], "ms")
    if t["pacing"]["mode"] != "asap":
        row("late against schedule", t["schedule_lag_ms"], "ms")
    a = result.get("agent")
    if a:
        row("slice arrival → result", a["slice_to_result_ms"], "ms")
        row("send → result", a["send_to_result_ms"], "ms")
        row("time to first flag", a["time_to_first_flag_s"], "s")
        row("last slice → verdict", a["last_slice_to_verdict_s"], "s")
        if a.get("note"):
            w(f"  note: {a['note']}\n")
        if a.get("error"):
            w(f"  agent: {a['error']}\n")
    for msg, n in sorted(t["errors"].items(), key=lambda kv: -kv[1]):
        w(f"  FAILED x{n}: {msg}\n")
        files = [f for f in t.get("failures", []) if f["error"] == msg and f["file"]]
        for f in files[:3]:
            w(f"    {f['file']}" + (f" — {f['note']}" if f.get("note") else "") + "\n")
        if len(files) > 3:
            w(f"    … and {n - 3} more (all in the JSON report)\n")
    for msg, n in sorted(t.get("recovered", {}).items(), key=lambda kv: -kv[1]):
        w(f"  recovered x{n} (new association, C-STORE resent): {msg}\n")
    if result.get("responses_rescued"):
        w(f"  note: {result['responses_rescued']} C-STORE response(s) taken by pynetdicom's reactor were handed back to the sender\n")
    for s in t["skipped"][:10]:
        w(f"  skipped {s['path']}: {s['reason']}\n")
    if t["files_skipped"] > 10:
        w(f"  ... and {t['files_skipped'] - 10} more skipped file(s) (see --json)\n")
    out.flush()


def write_plot(result: dict, records: list[SendRecord], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rtt = sorted(r.rtt_ms for r in records if r.ok)
    if rtt:
        ax1.plot(rtt, [(i + 1) / len(rtt) for i in range(len(rtt))], label="C-STORE round trip")
    lat = result.get("agent", {}).get("_slice_ms") or []
    if lat:
        lat = sorted(lat)
        ax1.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label="slice arrival → result")
    ax1.set_xscale("log")
    ax1.set_xlabel("latency (ms)")
    ax1.set_ylabel("fraction ≤ x")
    ax1.set_title("latency CDF")
    ax1.grid(True, alpha=0.3)
    ax1.legend(loc="lower right")
    t0 = min((r.sent_at for r in records), default=0.0)
    series_ids = list(dict.fromkeys(r.series_uid for r in records))
    for k, uid in enumerate(series_ids):
        rs = [r for r in records if r.series_uid == uid]
        ax2.scatter([r.sent_at - t0 for r in rs if r.ok], [k] * sum(r.ok for r in rs), s=4, marker="|", color="tab:blue")
        bad = [r.sent_at - t0 for r in rs if not r.ok]
        if bad:
            ax2.scatter(bad, [k] * len(bad), s=12, marker="x", color="red")
    for s in result.get("agent", {}).get("series", []):
        if s.get("last_slice_to_verdict_s") is not None and s["series_instance_uid"] in series_ids:
            k = series_ids.index(s["series_instance_uid"])
            last = max(r.acked_at for r in records if r.series_uid == s["series_instance_uid"])
            ax2.scatter([last - t0 + s["last_slice_to_verdict_s"]], [k], marker="D", color="black", s=20)
    ax2.set_yticks(range(len(series_ids)))
    ax2.set_yticklabels([f"series {i + 1}" for i in range(len(series_ids))])
    ax2.set_xlabel("seconds since the first send")
    ax2.set_title("timeline (| sent, x failed, ◆ verdict)")
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
