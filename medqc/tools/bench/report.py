"""What a bench run reports: each section's record (ran, or skipped / failed with the reason), the machine it
ran on, the table with ratios to (a) and (e), the targets, and the Markdown, stdout and PNG forms of it."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from medqc.dcmtk import dcmtk as _tool

TARGETS = {
    "full_pipeline_slices_per_s": (">=", 240.0),
    "cpu_ms_per_analysed_slice": ("<=", 8.0),
    "p95_slice_to_result_ms_at_60": ("<=", 50.0),
    "p95_slice_to_result_ms_at_120": ("<=", 50.0),  # the technologist's wait does not depend on the scanner's pace
    "last_slice_to_verdict_s": ("<=", 0.5),
    "onnxruntime_vs_naive_torch": (">=", 2.5),
}


def skipped(reason: str, **extra) -> dict:
    return {"status": "skipped", "reason": reason, **extra}


def failed(reason: str, **extra) -> dict:
    return {"status": "failed", "reason": reason, **extra}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine() -> dict:
    """What this was measured on."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {"python": platform.python_version()}
    for mod in ("numpy", "pydicom", "pynetdicom", "onnxruntime", "torch", "cv2", "tensorrt"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
    gpus = []
    smi = shutil.which("nvidia-smi")
    if smi:
        with contextlib.suppress(Exception):
            out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout
            gpus = [dict(zip(("name", "memory", "driver"), (x.strip() for x in line.split(",")))) for line in out.splitlines() if line.strip()]
    dcmtk = ""
    storescp = _tool("storescp")
    if storescp:
        with contextlib.suppress(Exception):
            dcmtk = subprocess.run([storescp, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    label = _slug(gpus[0]["name"]) if gpus else f"cpu-{cores}core"
    return {
        "label": label,
        "cpu": cpu,
        "cores": cores,
        "memory_gb": mem_gb,
        "os": f"{platform.system()} {platform.release()}",
        "gpus": gpus,
        "versions": versions,
        "dcmtk": dcmtk,
        "commit": commit,
        "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _rate(sec: dict | None) -> float | None:
    if sec and sec.get("status") == "ran" and isinstance(sec.get("slices_per_s"), (int, float)):
        return float(sec["slices_per_s"])
    return None


def table_rows(res: dict) -> list[dict]:
    s = res["sections"]
    ceiling, naive = _rate(s.get("storescp")), _rate(s.get("naive"))
    rows = []

    def add(key, label, sec):
        r = _rate(sec)
        rows.append({
            "key": key, "what": label, "status": (sec or {}).get("status", "skipped"),
            "slices_per_s": r,
            "ms_per_slice": round(1e3 / r, 3) if r else None,
            "x_storescp": round(r / ceiling, 2) if (r and ceiling) else None,
            "x_naive": round(r / naive, 2) if (r and naive) else None,
            "note": (sec or {}).get("reason", ""),
        })

    add("a", "DCMTK storescu → storescp (ingest ceiling)", s.get("storescp"))
    add("b", "agent, receive only", s.get("agent_receive"))
    add("c", "agent, full pipeline (analysed)", s.get("agent_full"))
    if s.get("agent_full_nofsync"):
        add("c", "agent, full pipeline, spool.fsync = false", s.get("agent_full_nofsync"))
    if s.get("decode_preprocess"):
        add("d", "decode + geometry (per slice, no inference)", s.get("decode_preprocess"))
    for name, sec in (s.get("inference") or {}).items():
        if isinstance(sec, dict) and "status" in sec:
            add("d", f"inference: {name}" + (f" (batch {sec['batch']})" if sec.get("batch") else ""), sec)
    add("e", "naive: pydicom + torch eager, batch 1", s.get("naive"))
    sc = s.get("scaling") or {}
    if sc.get("status") == "ran":
        for r in sc["rows"]:
            add("f", f"analysis only, {r['workers']} worker(s)" if r["workers"] else "analysis only, in the agent's process",
                {"status": "ran", "slices_per_s": r["slices_per_s"]})
    elif sc:
        add("f", "analysis only, with worker processes", sc)
    return rows


def targets(res: dict) -> dict:
    s = res["sections"]
    full = s.get("agent_full") or {}
    lat = full.get("latency_at_60") or {}
    lat120 = full.get("latency_at_120") or {}
    vals = {
        "full_pipeline_slices_per_s": _rate(full),
        "cpu_ms_per_analysed_slice": full.get("cpu_ms_per_slice") if full.get("status") == "ran" else None,
        "p95_slice_to_result_ms_at_60": ((lat.get("slice_to_result_ms") or {}).get("p95")),
        "p95_slice_to_result_ms_at_120": ((lat120.get("slice_to_result_ms") or {}).get("p95")),
        "last_slice_to_verdict_s": ((lat.get("last_slice_to_verdict_s") or {}).get("max")),
        "onnxruntime_vs_naive_torch": None,
    }
    ort = _rate((s.get("inference") or {}).get("onnxruntime"))
    naive = s.get("naive") or {}
    if ort and naive.get("status") == "ran":
        vals["onnxruntime_vs_naive_torch"] = round(ort / naive["inference_only_slices_per_s"], 2)
    out = {}
    for k, (op, goal) in TARGETS.items():
        v = vals[k]
        out[k] = {"value": v, "target": f"{op} {goal:g}", "met": None if v is None else (v >= goal if op == ">=" else v <= goal)}
    return out


def _rss_sentence(rss: dict | None) -> str:
    """The Markdown's sentence on the agent's resident memory at the end of (c); "" where it was not read."""
    if not rss:
        return ""
    kids = ", ".join(f"{r:g}" for r in rss.get("children") or []) or "none"
    return (f" Resident memory at its end: agent {rss['agent']:g} MiB, its child processes (receiver, analysis workers,"
            f" resource tracker) {kids} MiB, {rss['total']:g} MiB in all.")


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"### {m['label']} — {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB" + (f", {m['gpus'][0]['name']}" if m["gpus"] else ""),
        "",
        f"Study: {res['study']['slices']} slices at {res['study']['size']}² ({res['study']['source']}); "
        f"bundle: {res.get('bundle', {}).get('name', '—')}; commit {m['commit']}; {res['created']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in (m.get('load_avg_at_start') or []))}.",
        "",
        *([f"The agent in (c) ran with analysis.workers = {res['sections']['agent_full']['analysis_workers']}"
           + (f", inference backend {res['sections']['agent_full']['backend']}" if res["sections"]["agent_full"].get("backend") else "")
           + "." + _rss_sentence((res["sections"].get("agent_full") or {}).get("rss_mib")), ""]
          if (res["sections"].get("agent_full") or {}).get("analysis_workers") is not None else []),
        "| | what | slices/s | ms/slice | × (a) | × (e) | note |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in res["table"]:
        f = lambda v, d=1: "—" if v is None else (f"{v:,.{d}f}" if isinstance(v, float) else str(v))  # noqa: E731
        note = r["note"].replace("|", "/").replace("\n", " ")[:120] if r["status"] != "ran" else ""
        lines.append(f"| {r['key']} | {r['what']} | {f(r['slices_per_s'])} | {f(r['ms_per_slice'], 3)} | {f(r['x_storescp'], 2)} | {f(r['x_naive'], 2)} | {r['status'] if r['status'] != 'ran' else ''} {note} |")
    lines += ["", "| target | value | goal | met |", "|---|---:|---|---|"]
    for k, t in res["targets"].items():
        lines.append(f"| {k} | {'—' if t['value'] is None else t['value']} | {t['target']} | {'—' if t['met'] is None else ('yes' if t['met'] else '**no**')} |")
    for rate in (60, 120):
        lat = (res["sections"].get("agent_full") or {}).get(f"latency_at_{rate}") or {}
        if lat.get("status") == "ran":
            sr = lat.get("slice_to_result_ms") or {}
            vs = lat.get("last_slice_to_verdict_s") or {}
            if sr.get("n"):
                lines += ["", f"At {rate} slices/s offered ({lat.get('achieved_rate_slices_per_s')} achieved): slice arrival → result "
                              f"p50 {sr['p50']} ms, p95 {sr['p95']} ms, p99 {sr['p99']} ms, max {sr['max']} ms"
                          + (f"; last slice → verdict {vs.get('max')} s" if vs.get("n") else "") + "."]
    sc = res["sections"].get("scaling") or {}
    if sc.get("status") == "ran":
        lines += ["", f"(f) Analysis alone with worker processes ({sc['slices']} slices in the spool before the agent starts; "
                      "slices/s from the first result to the last; 0 = the analysis on the agent's pipeline thread):", "",
                  "| analysis.workers | slices/s | × 1 worker |", "|---:|---:|---:|"]
        for r in sc["rows"]:
            lines.append(f"| {r['workers']} | {r['slices_per_s']} | {'—' if r.get('x_one_worker') is None else r['x_one_worker']} |")
    return "\n".join(lines) + "\n"


def print_table(res: dict, out=sys.stdout) -> None:
    w = out.write
    m = res["machine"]
    w(f"medqc bench — {m['label']}: {m['cpu']}, {m['cores']} cores; study {res['study']['slices']} × {res['study']['size']}² ({res['study']['source']})\n")
    w(f"{'':2} {'what':<46} {'slices/s':>10} {'ms/slice':>9} {'×(a)':>7} {'×(e)':>7}\n")
    for r in res["table"]:
        f = lambda v, spec: format("—", ">" + spec.split(".")[0]) if v is None else format(v, spec)  # noqa: E731
        w(f"{r['key']:2} {r['what'][:46]:<46} {f(r['slices_per_s'], '10.1f')} {f(r['ms_per_slice'], '9.3f')} {f(r['x_storescp'], '7.2f')} {f(r['x_naive'], '7.2f')}")
        w(f"  [{r['status']}: {r['note'][:100]}]\n" if r["status"] != "ran" else "\n")
    w("targets:\n")
    for k, t in res["targets"].items():
        met = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        w(f"  {k:<32} {'—' if t['value'] is None else t['value']!s:>10}  ({t['target']})  {met}\n")
    out.flush()


def write_plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["table"] if r["slices_per_s"]]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [3, 2, 2]})
    names = [f"{r['key']}: {r['what']}" for r in rows]
    ax1.barh(range(len(rows)), [r["slices_per_s"] for r in rows], color=["C%d" % ("abcdef".index(r["key"])) for r in rows])
    ax1.set_yticks(range(len(rows)))
    ax1.set_yticklabels([n[:48] for n in names], fontsize=8)
    ax1.invert_yaxis()
    ax1.set_xscale("log")
    from matplotlib.ticker import NullFormatter

    ax1.xaxis.set_minor_formatter(NullFormatter())
    ax1.axvline(240, color="k", ls="--", lw=0.8)
    ax1.text(240, len(rows) - 0.5, " 240/s target", fontsize=7, va="bottom")
    ax1.set_xlabel("slices per second (log)")
    ax1.set_title(f"{res['machine']['label']}: throughput")
    ax1.grid(True, axis="x", alpha=0.3)
    full = res["sections"].get("agent_full") or {}
    qs = ["p50", "p90", "p95", "p99", "max"]
    drawn = False
    for rate in (60, 120):
        lat = full.get(f"latency_at_{rate}") or {}
        sr, rtt = lat.get("slice_to_result_ms") or {}, lat.get("c_store_rtt_ms") or {}
        for d, label in ((rtt, f"C-STORE round trip, {rate}/s"), (sr, f"slice arrival → result, {rate}/s")):
            if d.get("n"):
                ax2.plot(qs, [d.get(q) for q in qs], marker="o", ls="-" if rate == 60 else "--", label=label)
                drawn = True
    if drawn:
        ax2.axhline(50, color="k", ls=":", lw=0.8, label="50 ms target (p95)")
        ax2.set_ylabel("ms")
        ax2.set_title("latency at 60 and 120 slices/s")
        ax2.legend(fontsize=8)
        ax2.grid(True, alpha=0.3)
    else:
        ax2.text(0.5, 0.5, "latency not measured\n(agent section skipped)", ha="center", va="center")
        ax2.set_axis_off()
    sc = res["sections"].get("scaling") or {}
    if sc.get("status") == "ran":
        ws = [r["workers"] for r in sc["rows"]]
        ax3.plot(ws, [r["slices_per_s"] for r in sc["rows"]], marker="o")
        ax3.set_xticks(ws)
        ax3.set_xlabel("analysis.workers (0: in the agent's process)")
        ax3.set_ylabel("slices/s")
        ax3.set_title("analysis alone, receiver idle")
        ax3.grid(True, alpha=0.3)
    else:
        ax3.text(0.5, 0.5, "scaling not measured\n(section f skipped)", ha="center", va="center")
        ax3.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
