"""One picture per series for ``medqc analyze --plot DIR``: what the checks saw, along the patient.

- a header: series number, body part, protocol rule, manufacturer, slice count, the verdict (coloured), and
  the findings that are not artifact runs (coverage, geometry, dose, noise index, centering);
- the coverage bar: the scanned range against the protocol's start and end landmarks, with what is
  missing (red) or scanned beyond the margin (orange);
- one strip per artifact class: the score of every slice against z, the class threshold, and the z range
  of each finding shaded (red critical, orange warning); for motion also the series' own level that a run
  must stand out from (``agent/checks/artifact.py``);
- the slices behind the findings (the highest-scoring slice of each artifact finding; otherwise the top,
  middle and bottom slices), as the console shows them.

The x axis is z in mm with the head to the left. No patient identifiers are drawn: the picture carries
the series number, the end of the series UID and header facts only.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medqc import ARTIFACTS

SEV_COLOUR = {"critical": "#c62828", "warning": "#ef6c00", "info": "#1565c0"}
VERDICT_COLOUR = {"pass": "#2e7d32", "warn": "#ef6c00", "fail": "#c62828"}
CLASS_COLOUR = {"metal": "#6a1b9a", "motion": "#1565c0", "ring": "#00838f", "noise": "#558b2f", "truncation": "#ad1457"}


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from medqc.errors import UsageError

        raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None
    return plt


def file_name(series: dict, index: int) -> str:
    uid = re.sub(r"[^0-9.]", "", str(series.get("series_instance_uid") or ""))[-12:] or f"{index}"
    num = series.get("series_number")
    return f"series-{num if num is not None else index:>03}-{uid}.png"


def _chosen_slices(series: dict, results_by_sop: dict) -> list[tuple[dict, str]]:
    """(per-slice row, caption) of the slices to show: the top-scoring slice of each artifact finding, else
    the top, middle and bottom slices."""
    rows = [r for r in series["per_slice"] if r.get("z") is not None and not r.get("error")]
    rows.sort(key=lambda r: -r["z"])
    out: list[tuple[dict, str]] = []
    for f in series["findings"]:
        if not f["check"].startswith("artifact.") or not f.get("z_range_mm"):
            continue
        cls = f["check"].split(".", 1)[1]
        lo, hi = sorted(f["z_range_mm"])
        inside = [r for r in rows if lo - 1e-3 <= r["z"] <= hi + 1e-3]
        if inside:
            best = max(inside, key=lambda r: r["scores"].get(cls, 0.0))
            out.append((best, f"{cls} {best['scores'].get(cls, 0.0):.2f}"))
    if not out and rows:
        picks = [rows[0], rows[len(rows) // 2], rows[-1]] if len(rows) >= 3 else rows
        out = [(r, label) for r, label in zip(picks, ("top", "middle", "bottom"))]
    seen, uniq = set(), []
    for r, cap in out:
        if r["sop_instance_uid"] not in seen and results_by_sop.get(r["sop_instance_uid"]) is not None:
            seen.add(r["sop_instance_uid"])
            uniq.append((r, cap))
    return uniq[:3]


def coverage_spans(f: dict, cov: dict) -> list[tuple[float, float, str]]:
    """z spans (low, high, label) to mark for a coverage finding: what is missing between the scan's edge and
    the landmark (top, bottom), or what was scanned beyond the landmark (overscan)."""
    top, bottom = cov.get("scan_top_z"), cov.get("scan_bottom_z")
    start, end = cov.get("start_z"), cov.get("end_z")
    d = f.get("details") or {}
    kind = f["check"].split(".", 1)[1]
    if kind == "top" and top is not None:
        if start is not None and start > top:
            return [(top, start, f"missing {start - top:.0f} mm")]
        return [(top, top, "top missing")]
    if kind == "bottom" and bottom is not None:
        if end is not None and end < bottom:
            return [(end, bottom, f"missing {bottom - end:.0f} mm")]
        return [(bottom, bottom, "bottom missing")]
    if kind == "overscan":
        out = []
        extra = d.get("extra_mm") or {}
        if top is not None and start is not None and extra.get("top", 0) > 0:
            out.append((start, top, f"+{extra['top']:.0f} mm"))
        if bottom is not None and end is not None and extra.get("bottom", 0) > 0:
            out.append((bottom, end, f"+{extra['bottom']:.0f} mm"))
        return out
    return []


def _thumb(png: bytes) -> np.ndarray | None:
    import cv2

    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    return img


def series_figure(series: dict, thresholds: dict[str, float], path: Path, thumbnails: dict | None = None,
                  motion_margin: float | None = None) -> Path:
    """Write the figure of one ``medqc.report/1`` series to ``path`` (PNG). ``thumbnails``: SOP Instance UID →
    PNG bytes of the slice (the console's thumbnails)."""
    plt = _matplotlib()
    from matplotlib.patches import Rectangle

    thumbnails = thumbnails or {}
    rows = sorted((r for r in series["per_slice"] if r.get("z") is not None), key=lambda r: -r["z"])
    zs = np.array([r["z"] for r in rows], float)
    picks = _chosen_slices(series, thumbnails)
    ncol = 2 if picks else 1
    other = [f for f in series["findings"] if not f["check"].startswith("artifact.")]
    n_lines = max(1, min(len(other), 5) + (len(other) > 5))
    fig = plt.figure(figsize=(13.5 if picks else 10.5, 7.6), dpi=100)
    gs = fig.add_gridspec(1 + len(ARTIFACTS), ncol, width_ratios=[3.2, 1][:ncol], height_ratios=[1.25] + [1] * len(ARTIFACTS),
                          left=0.09, right=0.98, top=0.885 - 0.025 * n_lines, bottom=0.08, hspace=0.28, wspace=0.06)
    verdict = str(series.get("verdict") or "open")
    title = (f"Series {series.get('series_number') if series.get('series_number') is not None else '?'}"
             f" (…{str(series.get('series_instance_uid'))[-12:]})  ·  {series.get('body_part') or '?'}  ·  rule "
             f"{series.get('protocol_rule') or '—'}  ·  {series.get('manufacturer') or 'unknown vendor'}  ·  {series['slices']} slices")
    fig.text(0.09, 0.955, title, fontsize=12, weight="bold")
    fig.text(0.98, 0.955, verdict.upper(), fontsize=15, weight="bold", ha="right", color=VERDICT_COLOUR.get(verdict, "#555"))
    y = 0.925
    for f in other[:5]:
        msg = f["message"] if len(f["message"]) <= 150 else f["message"][:147] + "…"
        fig.text(0.09, y, f"{f['severity']:>8}  {f['check']}: {msg}", fontsize=8.5, color=SEV_COLOUR.get(f["severity"], "#333"),
                 family="monospace")
        y -= 0.025
    if len(other) > 5:
        fig.text(0.09, y, f"… and {len(other) - 5} more finding(s) in the report", fontsize=8.5, color="#555")
    if not other and not series["findings"]:
        note = series.get("coverage_note") if series.get("series_kind") == "dynamic" else None
        fig.text(0.09, y, note or "no findings", fontsize=9, color="#555" if note else "#2e7d32")

    if len(zs):
        span = max(float(zs.max() - zs.min()), 10.0)
        pad = 0.04 * span
        cov = series.get("coverage") or {}
        cz = [v for v in (cov.get("start_z"), cov.get("end_z")) if v is not None]
        x_hi = max([float(zs.max())] + cz) + pad
        x_lo = min([float(zs.min())] + cz) - pad
    else:
        x_hi, x_lo = 1.0, -1.0

    # ---- coverage bar
    ax = fig.add_subplot(gs[0, 0])
    ax.set_xlim(x_hi, x_lo)  # head (larger z) on the left
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.set_ylabel("coverage", rotation=0, ha="right", va="center", fontsize=9)
    ax.tick_params(labelbottom=False)
    if len(zs):
        ax.add_patch(Rectangle((float(zs.min()), 0.3), float(zs.max() - zs.min()), 0.4, color="#9e9e9e", label="scanned"))
    cov = series.get("coverage") or {}
    if cov.get("start_z") is not None and cov.get("end_z") is not None:
        a, b = sorted((cov["start_z"], cov["end_z"]))
        ax.add_patch(Rectangle((a, 0.18), b - a, 0.64, fill=False, edgecolor="#2e7d32", lw=2, label="required by the protocol"))
        for key, zkey in (("start_landmark", "start_z"), ("end_landmark", "end_z")):
            ax.annotate(str(cov.get(key) or "").replace("_", " "), (cov[zkey], 0.9), ha="center", va="bottom", fontsize=8, color="#2e7d32",
                        annotation_clip=False)
    elif series.get("protocol_rule") is None:
        ax.text(0.5, 0.85, "no protocol rule matched: coverage not judged", transform=ax.transAxes, ha="center", fontsize=8, color="#555")
    for f in series["findings"]:
        if not f["check"].startswith("coverage.") or (f.get("details") or {}).get("resolved"):
            continue  # a streaming finding resolved by the complete series is listed above, not drawn
        colour = SEV_COLOUR.get(f["severity"], "#333")
        for a, b, label in coverage_spans(f, cov):
            ax.add_patch(Rectangle((a, 0.3), max(b - a, 0.8), 0.4, facecolor="none", hatch="///", edgecolor=colour, lw=1.2))
            ax.text((a + b) / 2, 0.04, label, ha="center", fontsize=8, color=colour)
    if len(zs):
        ax.legend(loc="upper right", fontsize=7, frameon=False, ncol=2, bbox_to_anchor=(1.0, 1.35))

    # ---- artifact strips
    art = {f["check"].split(".", 1)[1]: f for f in series["findings"] if f["check"].startswith("artifact.")}
    for k, cls in enumerate(ARTIFACTS):
        ax = fig.add_subplot(gs[1 + k, 0])
        ax.set_xlim(x_hi, x_lo)
        ax.set_ylim(-0.02, 1.05)
        ax.set_yticks([0, 0.5, 1])
        ax.tick_params(labelsize=7)
        ax.set_ylabel(cls, rotation=0, ha="right", va="center", fontsize=9, color=CLASS_COLOUR[cls])
        s = np.array([r["scores"].get(cls, np.nan) for r in rows], float)
        if len(zs):
            ax.plot(zs, s, "-", color=CLASS_COLOUR[cls], lw=1.0)
            ax.plot(zs, s, ".", color=CLASS_COLOUR[cls], ms=2.5)
        thr = thresholds.get(cls)
        if thr is not None:
            ax.axhline(thr, color="#424242", ls="--", lw=0.8)
            ax.text(x_lo, thr, f" threshold {thr:.2f}", fontsize=6.5, va="bottom", ha="right", color="#424242")
        if cls == "motion" and motion_margin is not None and np.isfinite(s).sum() >= 10:
            lvl = float(np.nanmedian(s)) + motion_margin
            ax.axhline(min(lvl, 1.0), color="#1565c0", ls=":", lw=0.8)
            ax.text(x_hi, min(lvl, 1.0), f"series median + {motion_margin:g}", fontsize=6.5, va="bottom", ha="left", color="#1565c0")
        if len(zs) and not np.isfinite(s).any():
            ax.text(0.5, 0.5, "not measured on these slices", transform=ax.transAxes, ha="center", va="center", fontsize=8, color="#757575")
        f = art.get(cls)
        if f is not None and not (f.get("details") or {}).get("resolved"):
            colour = SEV_COLOUR.get(f["severity"], "#333")
            for run in (f.get("details") or {}).get("runs") or [f.get("z_range_mm")]:
                if run:
                    a, b = sorted(run[:2])
                    ax.axvspan(a - 0.5, b + 0.5, color=colour, alpha=0.22, lw=0)
        if k < len(ARTIFACTS) - 1:
            ax.tick_params(labelbottom=False)
        else:
            ax.set_xlabel("z (mm), head ← → feet", fontsize=9)

    # ---- slices
    if picks:
        sub = gs[1:, 1].subgridspec(len(picks), 1, hspace=0.18)
        for i, (r, cap) in enumerate(picks):
            ax = fig.add_subplot(sub[i, 0])
            img = _thumb(thumbnails[r["sop_instance_uid"]])
            if img is not None:
                ax.imshow(img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            inst = r.get("instance_number")
            ax.set_title(f"{cap} · slice {inst if inst is not None else '?'} · z {r['z']:.0f}", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
