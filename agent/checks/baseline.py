"""Per-scanner baselines in the checks: the judgement of ``medqc.baselines`` turned into findings.

Where a usable baseline exists for the series' scanner key (``medqc/baselines.py``):

* noise — the series' median σ at 2 mm over ``noise_factor`` times its scanner's median raises
  ``noise.index`` (warning; it replaces the generic one, against the protocol's reference), whatever the
  generic level said. A series within its scanner's normal range does not keep a noise finding of the
  generic level: ``noise.index`` from the protocol's reference, and ``artifact.noise`` where the classical
  evidence alone raised it and its slices' median σ is within the normal slices (the 95th percentile of the
  baseline series' 90th percentiles) — a noisier run than any normal series holds stays raised;
* ring — a series whose 90th percentile ring contrast is over its scanner's normal plus the margin keeps its
  ``artifact.ring`` (``details.baseline`` says the baseline supports it) or, where the generic level raised
  none, gets one on the slices over that limit. An ``artifact.ring`` raised by the classical evidence alone on
  slices within the limit is this scanner's normal and is withdrawn.

A finding the baseline overrules stays in the series as ``info`` with ``details.resolved`` (and
``details.baseline_normal``), its message naming the baseline. The same run test applies while slices arrive
(``run_normal``), so a scanner whose normal is over a generic level raises nothing during the scan.
Dynamic series are not judged against a baseline. Every report names the baseline used, or says there is
none (``state.baseline``, ``medqc.baselines.describe``).
"""

from __future__ import annotations

import statistics
import time

from medqc import baselines
from medqc.analysis import fusion
from medqc.agent.checks.artifact import ADVICE, NAMES, consecutive
from medqc.agent.checks.common import finding, finite
from medqc.agent.checks.registry import Check, explained_noise
from medqc.agent.records import Finding

CLASSES = ("noise", "ring")
MEASURE = {"noise": "noise_sd_2mm", "ring": "ring_contrast_hu"}


def _classical_alone(cls: str, members) -> bool:
    """Every slice's score of ``cls`` is no more than its classical evidence: the generic level raised it."""
    for _, r in members:
        c = fusion.classical_probs({k: v for k, v in (r.measures or {}).items() if v is not None}).get(cls)
        if c is None or r.scores.get(cls, 0.0) > c + 1e-6:
            return False
    return True


def _median_measure(cls: str, members) -> float | None:
    v = [float(r.measures[MEASURE[cls]]) for _, r in members if finite(r.measures.get(MEASURE[cls]))]
    return statistics.median(v) if v else None


def _slice_limit(cls: str, base: baselines.Baseline) -> float | None:
    """The most a run's median may read and still be this scanner's normal."""
    if cls == "noise":
        return base.noise_slice_max_hu if base.noise_usable else None
    return base.ring_limit_hu


def _within(cls: str, members, base: baselines.Baseline) -> tuple[bool, float | None, float | None]:
    lim = _slice_limit(cls, base)
    med = _median_measure(cls, members)
    ok = lim is not None and med is not None and med <= lim and _classical_alone(cls, members)
    return ok, med, lim


def run_normal(state, cls: str, run, store) -> bool:
    """While slices arrive: whether a qualifying run of ``cls`` (``[(z, result)]``) is within its scanner's
    normal slices and raised by the classical evidence alone — then it is not raised."""
    if store is None or cls not in CLASSES:
        return False
    n = len(state._order)
    cached = state.scanner.get("streaming")  # (slices when looked up, baseline): again once the series grew by a quarter
    if cached is None or n >= 1.25 * cached[0]:
        cached = (n, store.lookup(baselines.scanner_key(state.first, [r for _, r in state.ordered()])))
        state.scanner["streaming"] = cached
    base = cached[1]
    return base is not None and _within(cls, run, base)[0]


def _members(ordered, f: Finding):
    spans = [(min(a, b), max(a, b)) for a, b, _ in f.details.get("runs", [])]
    return [(z, r) for z, r in ordered if any(lo - 0.01 <= z <= hi + 0.01 for lo, hi in spans)]


def _withdrawn(f: Finding, why: str, base: baselines.Baseline) -> Finding:
    return Finding(**{**f.__dict__, "severity": "info",
                      "message": f"Withdrawn: {why} — baseline {base.key}, {base.series} passed series "
                                 f"(the generic level raised: {f.message})",
                      "details": {**f.details, "resolved": True, "baseline_normal": True, "baseline": base.key},
                      "raised_at": time.time()})


def _open(findings, check: str) -> Finding | None:
    return next((f for f in findings if f.check == check and not f.details.get("resolved")), None)


def _ring(state, ordered, out: list, base: baselines.Baseline, j: baselines.Judgement) -> list:
    f = _open(out, "artifact.ring")
    if j.ring == "high":
        if f is not None:
            f.details["baseline"] = {"supports": True, "ring_p90_hu": round(j.ring_p90_hu, 3), "limit_hu": round(base.ring_limit_hu, 3),
                                     "key": base.key, "series": base.series}
            return out
        lim = base.ring_limit_hu
        over = consecutive(ordered, lambda r: not r.error and finite(r.measures.get("ring_contrast_hu"))
                           and r.measures["ring_contrast_hu"] > lim)
        members = [m for run in over for m in run]
        if not members:
            return out
        insts = [r.info.instance_number for _, r in members if r.info.instance_number is not None]
        zs = [z for z, _ in members]
        where = f"slices {min(insts)}–{max(insts)}, " if insts else ""
        n = len(members)
        msg = (f"{NAMES['ring']} on {n} slice{'s' if n > 1 else ''} ({where}z {min(zs):.0f} to {max(zs):.0f} mm): ring contrast "
               f"{j.ring_p90_hu:.1f} HU (90th percentile) over this scanner's normal of {base.ring_normal_max_hu:.2f} HU "
               f"({base.key}, {base.series} passed series): {ADVICE['ring']}")
        out.append(finding(state, "artifact.ring", "warning", msg,
                           first_instance=min(insts) if insts else None, last_instance=max(insts) if insts else None,
                           z_range_mm=(min(zs), max(zs)), score=round(max(r.scores.get("ring", 0.0) for _, r in members), 4),
                           details={"slices": n, "runs": [[round(run[0][0], 2), round(run[-1][0], 2), len(run)] for run in over],
                                    "ring_p90_hu": round(j.ring_p90_hu, 3), "raised_by": "baseline",
                                    "baseline": {"supports": True, "limit_hu": round(lim, 3), "key": base.key, "series": base.series}}))
        return out
    if j.ring == "normal" and f is not None:
        ok, med, lim = _within("ring", _members(ordered, f), base)
        if ok:
            out[out.index(f)] = _withdrawn(f, f"ring contrast {med:.2f} HU on these slices is within this scanner's normal "
                                              f"(up to {lim:.2f} HU)", base)
    return out


def _noise(state, ordered, out: list, base: baselines.Baseline, j: baselines.Judgement, n_slices: int) -> list:
    gen = _open(out, "noise.index")
    if j.noise == "high":
        if gen is not None:
            out.remove(gen)
        ratio = j.noise_ratio
        out.append(finding(state, "noise.index", "warning",
                           f"Image noise σ {j.noise_sd_2mm_hu:.1f} HU at 2 mm is {ratio:.1f}× this scanner's normal "
                           f"({base.noise_sd_2mm_hu:.1f} HU, the median of {base.noise_series} passed series of {base.key}), "
                           f"as at about {100.0 / ratio ** 2:.0f}% of its usual dose — check mAs / noise index, tube current "
                           f"modulation and patient size, or the reconstruction",
                           score=round(j.noise_sd_2mm_hu, 2),
                           details={"noise_sd_2mm_hu": round(j.noise_sd_2mm_hu, 2), "ratio": round(ratio, 3),
                                    "slices": n_slices, "raised_by": "baseline", "baseline": base.to_dict(),
                                    "kernel": state.first.convolution_kernel or ""}))
        return out
    if j.noise != "normal":
        return out
    within = (f"image noise σ {j.noise_sd_2mm_hu:.1f} HU at 2 mm is within this scanner's normal "
              f"(up to {base.noise_normal_max_hu:.1f} HU; {j.noise_ratio:.2f}× its median)")
    if gen is not None:
        out[out.index(gen)] = _withdrawn(gen, within, base)
    f = _open(out, "artifact.noise")
    if f is not None:
        ok, med, lim = _within("noise", _members(ordered, f), base)
        if ok:
            out[out.index(f)] = _withdrawn(f, f"{within}, and σ {med:.1f} HU on these slices within its normal slices "
                                              f"(up to {lim:.1f} HU)", base)
    return out


def judge_series(state, ordered, findings: list, store, explained) -> list:
    """The final judgement's baseline step: sets ``state.scanner`` (key and figures, for learning) and
    ``state.baseline`` (the report's entry) and returns ``findings`` adjusted by the baseline (see the
    module docstring). ``explained(ordered, findings)``: ids of the results whose σ is an artifact's."""
    results = [r for _, r in ordered]
    key = baselines.scanner_key(state.first, results)
    state.scanner = {"key": key, "stats": baselines.series_stats(results)}
    base = store.lookup(key) if store is not None else None
    if base is None:
        state.baseline = baselines.describe(key, None, store.count(key) if store is not None else None,
                                            store.min_series if store is not None else None)
        return findings
    out = list(findings)
    j = baselines.judge(state.scanner["stats"], base)
    out = _ring(state, ordered, out, base, j)
    # noise, on the slices whose σ is not a metal, motion or ring artifact's (as the noise index reads it)
    skip = explained(ordered, out)
    measured = [r for r in results if finite(r.measures.get("noise_sd_2mm"))]
    kept = [r for r in measured if id(r) not in skip]
    usable = len(kept) >= baselines.MIN_SLICES and 2 * len(kept) >= len(measured)
    j = baselines.judge(baselines.series_stats(results, kept if usable else []), base)
    out = _noise(state, ordered, out, base, j, len(kept))
    state.baseline = baselines.describe(key, base, None, None, j)
    return out


# ------------------------------------------------------------------------------------------ registered
def _judge(j) -> list:
    return judge_series(j.state, j.ordered, j.found, j.baselines, explained_noise)


# it raises no check of its own: it revises the noise and ring findings against the scanner's normal
CHECKS = (Check("baseline", (), judge=_judge, revises=True),)
