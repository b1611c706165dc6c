"""The figures of a replay: transport (C-STORE round trips, lateness against the schedule, failures by
reason) and, where the agent was followed, what a technologist experiences (slice arrival → result, time to
the first flag of a series, last slice → series verdict)."""

from __future__ import annotations

import math

from medqc.tools.replay.send import SendRecord, SeriesRun, valid_uid
from medqc.tools.replay.watch import stream_first_finding


def percentiles(values, qs=(50, 90, 95, 99)) -> dict:
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return {"n": 0}
    out = {"n": len(vals)}
    for q in qs:
        # linear interpolation between closest ranks (numpy's default)
        pos = (len(vals) - 1) * q / 100.0
        lo = int(math.floor(pos))
        hi = min(lo + 1, len(vals) - 1)
        out[f"p{q}"] = round(vals[lo] + (vals[hi] - vals[lo]) * (pos - lo), 3)
    out["max"] = round(vals[-1], 3)
    out["mean"] = round(sum(vals) / len(vals), 3)
    return out


def agent_figures(records: list[SendRecord], runs: list[SeriesRun], events, verdicts: dict) -> dict:
    """Latencies from the agent's API: per-slice received→analysed, first flag, last slice → verdict."""
    slice_ms, slice_send_ms, missing_ts = [], [], 0
    sent_at = {r.sop_instance_uid: r for r in records if r.ok}
    first_flag, verdict_s, series_out = [], [], []
    for run in runs:
        seen = verdicts.get(run.series_uid)
        rep = seen[1] if seen else None
        per_slice = (rep or {}).get("per_slice") or []
        n_analysed = 0
        for ps in per_slice:
            ra, aa = ps.get("received_at"), ps.get("analysed_at")
            if isinstance(ra, (int, float)) and isinstance(aa, (int, float)) and ra > 0 and aa > 0:
                slice_ms.append((aa - ra) * 1e3)
                n_analysed += 1
                rec = sent_at.get(ps.get("sop_instance_uid", ""))
                if rec is not None:  # same clock only when the agent runs on this host
                    slice_send_ms.append((aa - rec.sent_at) * 1e3)
            else:
                missing_ts += 1
        ff = stream_first_finding(events, run.series_uid)
        ttff = None
        if ff is not None and run.first_sent_at:
            ttff = ff[0] - run.first_sent_at
            first_flag.append(ttff)
        elif rep and rep.get("findings") and run.first_sent_at:
            raised = [f.get("raised_at") for f in rep["findings"] if isinstance(f.get("raised_at"), (int, float)) and f.get("raised_at") > 0]
            if raised:
                ttff = min(raised) - run.first_sent_at
                first_flag.append(ttff)
        vs = None
        if seen and not math.isnan(seen[0]) and run.last_acked_at:
            vs = seen[0] - run.last_acked_at
            verdict_s.append(vs)
        series_out.append({
            "series_instance_uid": run.series_uid,
            "verdict": (rep or {}).get("verdict"),
            "slices_reported": len(per_slice),
            "slices_timed": n_analysed,
            "findings": [f.get("check") for f in (rep or {}).get("findings", [])],
            "time_to_first_flag_s": None if ttff is None else round(ttff, 4),
            "last_slice_to_verdict_s": None if vs is None else round(vs, 4),
        })
    out = {
        "slice_to_result_ms": percentiles(slice_ms),
        "send_to_result_ms": percentiles(slice_send_ms),
        "time_to_first_flag_s": percentiles(first_flag),
        "last_slice_to_verdict_s": percentiles(verdict_s),
        "series": series_out,
        "stream_events": len(events),
    }
    if missing_ts:
        out["note"] = f"{missing_ts} per-slice entries carry no received_at/analysed_at timestamps"
    return out


def summarize(records: list[SendRecord], runs: list[SeriesRun], skipped: list[dict], wall_s: float, mode: dict) -> dict:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    lag = [max(0.0, r.sent_at - r.scheduled_at) * 1e3 for r in ok]
    series = []
    for run in runs:
        rs = [r for r in records if r.series_uid == run.series_uid and r.ok]
        span = (rs[-1].acked_at - rs[0].sent_at) if len(rs) > 1 else 0.0
        series.append({
            "study_instance_uid": run.study_uid,
            "series_instance_uid": run.series_uid,
            "planned": run.n_planned,
            "sent": len(rs),
            "failed": sum(1 for r in records if r.series_uid == run.series_uid and not r.ok),
            "associations": run.associations,
            "duration_s": round(span, 4),
            "rate_slices_per_s": round((len(rs) - 1) / span, 2) if span > 0 else None,
            "errors": run.errors[:5],
        })
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    recovered: dict[str, int] = {}
    for run in runs:
        for e in run.errors:
            if e not in errors:
                recovered[e] = recovered.get(e, 0) + 1
    first = min((r.sent_at for r in ok), default=0.0)
    last = max((r.acked_at for r in ok), default=0.0)
    return {
        "pacing": mode,
        "files_skipped": len(skipped),
        "skipped": skipped[:200],
        "instances_planned": len(records),
        "sent": len(ok),
        "failed": len(failed),
        "raw_sends": sum(1 for r in ok if r.raw),
        "errors": errors,
        "failures": [{"file": r.path, "sop_instance_uid": r.sop_instance_uid, "instance_number": r.instance_number, "error": r.error,
                      **({} if valid_uid(r.sop_instance_uid) and valid_uid(r.series_uid) and valid_uid(r.study_uid) else
                         {"note": "its UIDs are not valid DICOM UIDs (digits and dots, at most 64 characters): strict peers refuse such files"})}
                     for r in failed[:50]],
        "recovered": recovered,
        "wall_s": round(wall_s, 4),
        "throughput_slices_per_s": round(len(ok) / (last - first), 2) if len(ok) > 1 and last > first else None,
        "c_store_rtt_ms": percentiles([r.rtt_ms for r in ok]),
        "schedule_lag_ms": percentiles(lag),
        "series": series,
    }
