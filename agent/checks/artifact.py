"""artifact.<class>: runs of consecutive slices (by z) whose fused score is over the class threshold.

A run is reported when it has ``checks.artifact.min_run`` slices, or when one slice scores "very high"
(``1 - (1 - threshold) / 5``: 0.9 for a 0.5 threshold), or — for noise and truncation, once the series is
complete — when it is the whole of a series shorter than ``min_run`` (``whole_short_series``). For motion (the network fused with the
air-streak evidence where the air around the patient can be measured) and ring (a
detector fault, on every slice) a run of ``min_run`` slices must also span 25 mm of z or have a mean score of at least
``(threshold + 1) / 2``. One finding per class and series (id
``<series>/artifact.<class>``) covers every qualifying run and is updated as runs grow. Severity:
critical when ≥ 5 slices qualify and their mean score is at least the midpoint between threshold and 1,
else warning.

Metal is judged with the series too (``partial_metal``): a slice beside a metal slice whose densest pixel,
short of metal density, still reaches 2,000 HU where the metal lies is an implant's partial-volumed end,
raised to midway between the threshold and the metal's score, whichever of the two arrives first.

Motion is also judged against the series' own level (``RELATIVE`` classes): the motion network, trained on
synthetic CT, scores clean real slices anywhere from 0.3 to 0.76 depending on scanner and anatomy (see
docs/checks.md), while motion itself is transient — it corrupts the slices of the rotations during which the
patient moved, not a whole series. So a run of motion slices (below the "very high" single-slice level) must
stand out from the rest of the series: its mean must exceed the series median by ``RELATIVE_MARGIN``, and
the median is only trusted from ``RELATIVE_MIN_SLICES`` analysed slices on (before that, only a very high
slice raises motion).

That rule cannot see a patient who moved all through the series (an agitated patient, a child): the median
rises with the runs. Where the physics says so, motion is raised for the whole series anyway
(``streaked_series``): when the free air around the patient is streaked on most of the series — the median
``air_dark_hu`` over at least ``RELATIVE_MIN_SLICES`` judged slices whose streaks no other artifact explains
(no metal, truncation, noise or ring evidence over its threshold) reaches ``SERIES_STREAK_HU`` — the slices
streaked that much are reported; so is a band of such slices spanning ``NETWORK_ONLY_MIN_EXTENT_MM``, whatever
the network read on it. Clean series read 0.1-1.2 HU there (46 synthetic series, the real Philips
phantom's two series 0.85 and 1.20, 1.30 with noise injected), a real phantom series with motion injected
in every rotation 4.1 HU.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from medqc import ARTIFACTS
from medqc.analysis import fusion, noise
from medqc.agent.checks.common import finding, finite
from medqc.agent.checks.registry import Check, bounded
from medqc.analysis.measures import METAL_PARTIAL_HU

CRITICAL_SLICES = 5
# classes whose runs must also span z (see qualifying): motion, where the network decides (with the air-streak
# evidence where there is free air: medqc.analysis.airstreaks), and ring,
# whose cause (a detector channel) is on every slice, so a real ring is never confined to a few slices
NETWORK_ONLY = frozenset({"motion", "ring"})
NETWORK_ONLY_MIN_EXTENT_MM = 25.0  # z from the first to the last slice of a run (see qualifying)
RELATIVE = frozenset({"motion"})  # classes judged against the series' own median score too
SHORT = frozenset({"noise", "truncation"})  # classes a whole series shorter than min_run raises (whole_short_series)
RELATIVE_MARGIN = 0.2  # a run's mean must exceed the series median by this much
RELATIVE_MIN_SLICES = 10  # analysed slices before the series median is trusted
TEXTURE_MIN_SLICES = 10  # slices with a noise texture before the series' grain is read (kernel_normal_noise)
SERIES_STREAK_HU = 3.0  # median dark streaks in the free air (air_dark_hu) of a series that moved throughout
NAMES = {
    "metal": "Metal artifact",
    "motion": "Motion artifact",
    "ring": "Ring artifact",
    "noise": "Excess image noise",
    "truncation": "Truncation (patient outside the scan field)",
}
ADVICE = {
    "metal": "consider metal artifact reduction (MAR) reconstruction",
    "motion": "check patient motion / breath-hold; consider repeating the affected range",
    "ring": "ring artifacts point to a detector problem: consider calibration / service",
    "noise": "check dose settings and patient size; consider a smoother kernel or iterative reconstruction",
    "truncation": ("the patient extends beyond the scan field of view: centre the patient (arms up where the "
                   "protocol allows) or use the scanner's extended-FOV reconstruction; CT numbers near the edge "
                   "are unreliable"),
}


# Metal on or outside the skin (ECG electrodes and leads, clothing, jewellery: ``metal_inside`` under
# EXTERNAL_INSIDE on every slice of the finding that measured it) streaks little of the anatomy and is not
# scanned again for: the finding is information, with what to do next time.
EXTERNAL_INSIDE = 0.5
EXTERNAL_METAL = "External metal (on or outside the skin)"
EXTERNAL_ADVICE = ("ECG leads and electrodes, clothing or jewellery in the scan field streak the image near them: "
                   "move them out of the field where the protocol allows")


def external_metal(members) -> bool:
    """Whether the metal of a finding's slices (``[(z, result)]``) lies on or outside the skin on every slice
    that measured where it lies (and on one at least)."""
    inside = [r.measures.get("metal_inside") for _, r in members]
    inside = [v for v in inside if finite(v)]
    return bool(inside) and max(inside) < EXTERNAL_INSIDE


def high_threshold(thr: float) -> float:
    return 1.0 - (1.0 - thr) / 5.0


def consecutive(ordered: list[tuple[float, object]], keep) -> list[list[tuple[float, object]]]:
    """Maximal runs of consecutive (z-ordered) results for which ``keep(result)`` holds."""
    out, cur = [], []
    for z, r in ordered:
        if keep(r):
            cur.append((z, r))
        elif cur:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return out


def runs(ordered: list[tuple[float, object]], cls: str, thr: float) -> list[list[tuple[float, object]]]:
    """Maximal runs of consecutive (z-ordered) results with score ≥ thr."""
    return consecutive(ordered, lambda r: not r.error and r.scores.get(cls, 0.0) >= thr)


def _within_kernel(r) -> bool:
    """The slice is within the level with its sharp kernel's whole allowance (``noise_ratio_kernel`` under 1)."""
    return finite(r.measures.get("noise_ratio_kernel")) and r.measures["noise_ratio_kernel"] < 1.0


def grain_only(run) -> bool:
    """A run of noise over the threshold only by its coarse grain: every slice of it within the level with its
    sharp kernel's whole allowance (``medqc.analysis.noise``). Such a run is not raised while slices arrive —
    the complete series decides (``kernel_normal_noise``), and its first slices are often a chest's shoulders
    — nor on a complete series where fewer than ``TEXTURE_MIN_SLICES`` slices read a texture (too few to tell
    the series' grain from one region's)."""
    return all(_within_kernel(r) for _, r in run)


def _grain(results) -> tuple[int, float | None]:
    """(slices that read a noise texture, their median texture)."""
    tex = sorted(r.measures["noise_texture"] for r in results
                 if not r.error and finite(r.measures.get("noise_texture")))
    return len(tex), (tex[len(tex) // 2] if tex else None)


def kernel_normal_noise(ordered) -> int:
    """The complete series shows its noise's grain to be its sharp kernel's (at least ``TEXTURE_MIN_SLICES``
    slices read a texture, their median at least ``NOISE_TEXTURE_KERNEL[1]``): a slice whose coarser grain took
    part of the kernel's allowance away but whose σ is within the level with all of it (``noise_ratio_kernel``
    under 1) is that kernel's normal — the real Philips L chest's shoulders, where photon-starved lateral paths
    streak coarsely (1.05-1.5 against 1.7-2.2 over its mid chest). It is scored as with the kernel's whole
    allowance (``fusion.noise_score_with``; the network's share kept) and marked ``noise_kernel_normal``, once.
    Returns how many slices read a texture."""
    n, median = _grain(r for _, r in ordered)
    if n < TEXTURE_MIN_SLICES or median < noise.NOISE_TEXTURE_KERNEL[1]:
        return n
    for _, r in ordered:
        m = r.measures
        if (not r.error and not m.get("noise_kernel_normal") and _within_kernel(r) and "noise" in r.scores
                and finite(m.get("noise_ratio")) and m["noise_ratio"] > m["noise_ratio_kernel"]):
            r.scores["noise"] = round(fusion.noise_score_with(r.scores["noise"], m, m["noise_ratio_kernel"]), 4)
            m["noise_kernel_normal"] = 1.0
    return n


def strong_threshold(thr: float) -> float:
    """Mean score a run of a network-only class needs: the midpoint between threshold and 1."""
    return (thr + 1.0) / 2.0


def sorted_median(vals: list[float]) -> float | None:
    """Median of already sorted scores (None below RELATIVE_MIN_SLICES)."""
    n = len(vals)
    if n < RELATIVE_MIN_SLICES:
        return None
    return vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])


def series_median(ordered, cls: str) -> float | None:
    """Median score of ``cls`` over the analysed slices of a series (None below RELATIVE_MIN_SLICES)."""
    return sorted_median(sorted(r.scores.get(cls, 0.0) for _, r in ordered if not r.error))


def _air_streaks(r) -> float | None:
    """The slice's ``air_dark_hu`` where it was judged and no other artifact explains its streaks, else None."""
    m = r.measures or {}
    v = m.get("air_dark_hu")
    if r.error or v is None or not math.isfinite(v) or "motion" not in (r.scores or {}):
        return None  # not judged, or no motion score at all (slices over 10 mm, no network): no motion
    cls = fusion.classical_probs({k: x for k, x in m.items() if x is not None})
    if max(cls.get(c, 0.0) for c in fusion.CLASSICAL_CLASSES) >= fusion.CLASSICAL_THRESHOLD:
        return None
    return v


def lung_streaked(r) -> bool:
    """The slice's air spaces (lungs, gas) read darker than air over at least the start of their motion evidence
    (``lungstreaks.EVIDENCE_MM2``) where no other artifact explains it (``fusion.lung_evidence``)."""
    m = {k: x for k, x in (r.measures or {}).items() if x is not None}
    if r.error or not finite(m.get("lung_dark_mm2")):
        return False
    cls = fusion.classical_probs(m)
    return fusion.lung_evidence(m, cls, fusion.confounding_noise(m, cls)) > 0.0


def air_streaks(results, cache: dict) -> dict:
    """{id(result): ``_air_streaks(result)``} for ``results``, each worked out once: ``cache`` keeps the values
    (a streaming series keeps one for its life; a final judgement shares one between its steps)."""
    air = {}
    for r in results:
        k = id(r)
        if k not in cache:
            cache[k] = _air_streaks(r)
        air[k] = cache[k]
    return air


def streaked_series(ordered, cache: dict | None = None) -> list[list[tuple[float, object]]]:
    """Runs (z order) of the slices streaked at ``SERIES_STREAK_HU`` or more: all of them when the series as a
    whole is streaked (the median over its judged, unexplained slices, at least ``RELATIVE_MIN_SLICES``,
    reaches it), else those spanning ``NETWORK_ONLY_MIN_EXTENT_MM`` (a band that moved, whatever the network
    read on it). ``cache``: see ``air_streaks``."""
    air = air_streaks((r for _, r in ordered), {} if cache is None else cache)
    med = sorted_median(sorted(v for v in air.values() if v is not None))
    whole = med is not None and med >= SERIES_STREAK_HU
    out = consecutive(ordered, lambda r: air[id(r)] is not None and air[id(r)] >= SERIES_STREAK_HU)
    return out if whole else [run for run in out if abs(run[-1][0] - run[0][0]) >= NETWORK_ONLY_MIN_EXTENT_MM]


def qualifying(run, cls: str, thr: float, min_run: int, median: float | None = None) -> bool:
    """Whether a run raises its class. ``median``: the series' median score of ``cls`` (``series_median``),
    needed for RELATIVE classes (None: the series is too short to judge, only a very high slice counts)."""
    scores = [r.scores.get(cls, 0.0) for _, r in run]
    if max(scores) >= high_threshold(thr):
        return True
    if len(run) < min_run:
        return False
    if cls in RELATIVE and (median is None or sum(scores) / len(scores) < median + RELATIVE_MARGIN):
        return False
    if cls not in NETWORK_ONLY:
        return True
    # a class that only the network sees (no classical evidence can confirm it) needs more than min_run
    # slices just over a threshold chosen per slice: neighbouring slices share anatomy, so one confusing
    # region (shoulders, a liver dome) puts a few adjacent slices over it together. Physical motion
    # corrupts every slice reconstructed from the affected rotations — at least one rotation's table feed
    # (collimation × pitch, ≥ ~25 mm on current scanners) — and a detector ring is on every slice, so the
    # run must span NETWORK_ONLY_MIN_EXTENT_MM, or be strong (mean ≥ the midpoint of threshold and 1).
    zs = [z for z, _ in run]
    return max(zs) - min(zs) >= NETWORK_ONLY_MIN_EXTENT_MM or sum(scores) / len(scores) >= strong_threshold(thr)


def whole_short_series(run, cls: str, analysed: int, min_run: int) -> bool:
    """A complete series of fewer than ``min_run`` analysed slices (a single slice sent on its own) can hold no
    run of ``min_run``: where every slice of it is over the threshold, noise and truncation qualify (``SHORT``:
    each rests on a physical measure, σ against the dose's level and tissue on the scan field's edge) and a
    warning is raised, not a silent pass. Metal keeps the very-high rule there: its threshold is low and the
    ECG electrodes and skin markers on single real slices read 0.5-0.6 without a streak worth a repeat. Motion
    and ring still need their run's extent in z (``qualifying``), which one slice cannot show; the report says
    so (``checks.judged``). Judged when the series is complete, never while slices arrive (the next slice may
    end the run)."""
    return cls in SHORT and analysed < min_run and len(run) == analysed


def merge_runs(ordered, groups) -> list[list[tuple[float, object]]]:
    """The union of several lists of runs as runs of consecutive slices of ``ordered`` (z order)."""
    members = {id(r) for g in groups for _, r in g}
    return consecutive(ordered, lambda r: id(r) in members)


def summarise(state, cls: str, thr: float, qual_runs, air_cache: dict | None = None) -> object | None:
    """One finding for all qualifying runs of ``cls`` (None if there are none). ``air_cache``: see
    ``air_streaks`` (motion names its air streaks)."""
    if not qual_runs:
        return None
    members = [(z, r) for run in qual_runs for z, r in run]
    scores = [r.scores.get(cls, 0.0) for _, r in members]
    zs = [z for z, _ in members]
    insts = [r.info.instance_number for _, r in members if r.info.instance_number is not None]
    mean = sum(scores) / len(scores)
    severe = len(members) >= CRITICAL_SLICES and mean >= strong_threshold(thr)
    zr = (min(zs), max(zs))
    n = len(members)
    where = f"slice{'s' if n > 1 else ''} {min(insts)}–{max(insts)}" if insts else f"{n} slice(s)"
    if insts and min(insts) == max(insts):
        where = f"slice {insts[0]}"
    evidence, details = "", {}
    external = cls == "metal" and external_metal(members)
    if external:  # on or outside the skin: it streaks what lies near it; the finding is to remove it next time
        details["external"] = True
    if cls == "motion":  # say what the technologist can check on the images
        air = air_streaks((r for _, r in members), {} if air_cache is None else air_cache)
        vals = sorted(v for v in air.values() if v is not None)
        upper_median = vals[len(vals) // 2] if vals else None
        if upper_median is not None and upper_median >= SERIES_STREAK_HU:
            details["air_streaks_median_hu"] = round(upper_median, 2)
            evidence = f"; dark streaks in the air around the patient, median {upper_median:.1f} HU"
        dark = sum(1 for _, r in members if lung_streaked(r))
        if dark:  # streaks that took the lungs (or gas) below air, which nothing inside a patient is
            details["lung_streaked_slices"] = dark
            evidence += f"; streaks darker than air in the lungs on {dark} of them"
    name, advice = (EXTERNAL_METAL, EXTERNAL_ADVICE) if external else (NAMES[cls], ADVICE[cls])
    msg = (f"{name} on {n} slice{'s' if n > 1 else ''} ({where}, z {zr[0]:.0f} to {zr[1]:.0f} mm, "
           f"peak score {max(scores):.2f}{evidence}): {advice}")
    return finding(
        state, f"artifact.{cls}", "info" if external else "critical" if severe else "warning", msg,
        first_instance=min(insts) if insts else None, last_instance=max(insts) if insts else None,
        z_range_mm=zr, score=round(max(scores), 4),
        details={"slices": n, "mean_score": round(mean, 4), "threshold": thr,
                 "runs": [[round(run[0][0], 2), round(run[-1][0], 2), len(run)] for run in qual_runs], **details},
    )


# An implant's end, partial-volumed within a slice, falls short of the metal density that the slice-level
# fusion requires (``fusion.metal_density``): the slice beside metal is metal all the same when its own densest
# pixel reaches METAL_PARTIAL_HU (cortical bone does not) near where the metal lies. Slices so placed score
# midway between the threshold and the metal's score.
METAL_PARTIAL_MM = 5.0  # z from the nearest slice with metal at full density (a run of such slices, outward) ...
METAL_NEXT_MM = 10.0  # ... and the slice next to it in any case, up to this far (thick slices)
METAL_PARTIAL_XY_MM = 30.0  # densest pixels this close in-plane (mm), the metal's and the partial slice's


def _metal_at(r) -> tuple[float, float] | None:
    m = r.measures
    y, x = m.get("metal_row_mm"), m.get("metal_col_mm")
    return (y, x) if finite(y) and finite(x) else None


def partial_metal(ordered: list[tuple[float, object]], thr: float, lo: int = 0, hi: int | None = None) -> list[int]:
    """Raise the metal score on slices beside metal (see ``METAL_PARTIAL_MM``): from every slice in positions
    ``lo..hi`` of ``ordered`` whose metal scores ``thr`` or more at metal density (``fusion.metal_density``),
    outward through consecutive slices within ``METAL_PARTIAL_MM`` of it (the next one within
    ``METAL_NEXT_MM``) whose densest pixel reads ``METAL_PARTIAL_HU`` or more, short of metal density or at it
    over a speck that scores under ``thr`` (an implant's tip: ``fusion`` leaves a speck under 5 mm² to the
    network), within ``METAL_PARTIAL_XY_MM`` of its own: their score becomes the midpoint between ``thr`` and
    the metal slice's. Returns the positions raised (the scores are changed in place and the slice's measures
    get ``metal_beside`` = 1: a raised slice is never a source)."""
    raised = []
    hi = len(ordered) - 1 if hi is None else hi
    for c in range(max(0, lo), min(hi, len(ordered) - 1) + 1):
        zc, rc = ordered[c]
        if (rc.error or rc.scores.get("metal", 0.0) < thr or not fusion.metal_density(rc.measures)
                or rc.measures.get("metal_beside")):
            continue
        at = _metal_at(rc)
        if at is None:
            continue
        for step in (-1, 1):
            j = c + step
            while 0 <= j < len(ordered) and abs(ordered[j][0] - zc) <= (METAL_NEXT_MM if j == c + step
                                                                      else METAL_PARTIAL_MM):
                r = ordered[j][1]
                top, here = r.measures.get("metal_max_hu") or 0.0, _metal_at(r)
                # short of metal density, or a speck of it under the classical area (an implant's tip)
                dense = (fusion.metal_density(r.measures) and r.scores.get("metal", 0.0) >= thr
                         and not r.measures.get("metal_beside"))
                if (r.error or not top >= METAL_PARTIAL_HU or dense or here is None
                        or math.hypot(here[0] - at[0], here[1] - at[1]) > METAL_PARTIAL_XY_MM):
                    break
                if r.scores.get("metal", 0.0) < thr:
                    r.scores["metal"] = 0.5 * (thr + rc.scores["metal"])
                    r.measures["metal_beside"] = 1.0  # raised for the metal beside it: never a source itself
                    raised.append(j)
                j += step
    return raised


def artifact_findings(state, ordered, thresholds: dict[str, float], min_run: int) -> list:
    """All artifact findings of a series from scratch (``ordered``: [(z, result)] sorted by z)."""
    out, air_cache = [], {}
    partial_metal(ordered, thresholds.get("metal", 0.5))
    analysed = sum(1 for _, r in ordered if not r.error)
    for cls in ARTIFACTS:
        thr = thresholds.get(cls, 0.5)
        if cls == "noise":
            textured = kernel_normal_noise(ordered)
        med = series_median(ordered, cls) if cls in RELATIVE else None
        q = [run for run in runs(ordered, cls, thr)
             if qualifying(run, cls, thr, min_run, med) or whole_short_series(run, cls, analysed, min_run)]
        if cls == "noise" and textured < TEXTURE_MIN_SLICES:
            q = [run for run in q if not grain_only(run)]
        if cls == "motion":
            q = merge_runs(ordered, q + streaked_series(ordered, air_cache))
        f = summarise(state, cls, thr, q, air_cache)
        if f is not None:
            out.append(f)
    return out


# ------------------------------------------------------------------------------------- while slices arrive
def stream(s) -> None:
    """A slice of a stack arrived: judge the runs it is part of (and, when the table just moved, the slices
    held back while it had not)."""
    st = s.state
    for cls in RELATIVE:  # the series' own level, kept sorted
        bisect.insort(st._rel.setdefault(cls, []), s.result.scores.get(cls, 0.0))
    if not s.stack:
        return
    if len(st._zcount) == 2 and st._zcount[s.zk] == 1:  # the table just moved: judge the slices held back
        for zz, sq in list(st._order):
            if sq != s.seq and not st.results[sq].error:
                _stream_slice(s, zz, sq, st.results[sq])
    _stream_slice(s, s.z, s.seq, s.result)
    # metal beside metal: the slices this one places (or the metal that places it) are judged again
    if (s.result.measures.get("metal_max_hu") or 0.0) >= METAL_PARTIAL_HU:
        order = st._order
        w0 = bisect.bisect_left(order, (s.z - 2 * METAL_NEXT_MM, -1))
        near = order[w0:bisect.bisect_right(order, (s.z + 2 * METAL_NEXT_MM, math.inf))]
        window = [(zz, st.results[sq]) for zz, sq in near]
        lo = bisect.bisect_left(near, (s.z - METAL_NEXT_MM, -1))
        hi = bisect.bisect_right(near, (s.z + METAL_NEXT_MM, math.inf)) - 1
        for j in partial_metal(window, s.tracker.thresholds["metal"], lo, hi):
            _stream_slice(s, near[j][0], near[j][1], window[j][1])


def _stream_slice(s, z: float, seq: int, result) -> None:
    from medqc.agent.checks import baseline as baseline_checks

    st, thresholds = s.state, s.tracker.thresholds
    min_run = s.tracker.cfg.checks.artifact.min_run
    order = st._order
    pos = bisect.bisect_left(order, (z, seq))
    if len(order) % RELATIVE_MIN_SLICES == 0:
        # every RELATIVE_MIN_SLICES slices (the first time: the series median becomes trusted), runs of the
        # relative classes are judged again against the median of the series so far: a run that did not
        # stand out from the first slices may stand out once more of the series is in
        ordered = [(zz, st.results[sq]) for zz, sq in order]
        for cls in RELATIVE:
            thr = thresholds[cls]
            med = sorted_median(st._rel.get(cls, []))
            i = 0
            for run in runs(ordered, cls, thr):
                while ordered[i][1] is not run[0][1]:
                    i += 1
                if qualifying(run, cls, thr, min_run, med):
                    _qualify(s, cls, thr, i, i + len(run) - 1)
        # a patient who moved all through the series: the air's streaks, not a run that stands out
        pos_of = {id(r): k for k, (_, r) in enumerate(ordered)}
        for run in streaked_series(ordered, st._air):
            _qualify(s, "motion", thresholds["motion"], pos_of[id(run[0][1])], pos_of[id(run[-1][1])])
    for cls in ARTIFACTS:
        thr = thresholds[cls]
        if result.scores.get(cls, 0.0) < thr:
            continue

        def flagged(i):
            r = st.results[order[i][1]]
            return not r.error and r.scores.get(cls, 0.0) >= thr

        lo = hi = pos
        while lo > 0 and flagged(lo - 1):
            lo -= 1
        while hi + 1 < len(order) and flagged(hi + 1):
            hi += 1
        run = [(order[i][0], st.results[order[i][1]]) for i in range(lo, hi + 1)]
        med = sorted_median(st._rel.get(cls, [])) if cls in RELATIVE else None
        if (qualifying(run, cls, thr, min_run, med)
                and not (cls == "noise" and grain_only(run))  # the complete series decides
                and not baseline_checks.run_normal(st, cls, run, s.tracker.baselines)):  # within its scanner's normal
            _qualify(s, cls, thr, lo, hi)


def _qualify(s, cls: str, thr: float, lo: int, hi: int) -> None:
    """Slices ``lo..hi`` (positions in z order) form a qualifying run of ``cls``: (re)summarise."""
    st = s.state
    order = st._order
    q = st._qual.setdefault(cls, {})
    before = len(q)
    for i in range(lo, hi + 1):
        q[order[i][1]] = (order[i][0], st.results[order[i][1]])
    if len(q) == before:
        return
    f = summarise(st, cls, thr, _group(st, q), st._air)
    if f is not None:
        s.put(f)


def _group(st, q: dict) -> list:
    idx = sorted(bisect.bisect_left(st._order, (z, seq)) for seq, (z, _) in q.items())
    out, cur, prev = [], [], None
    for i in idx:
        if prev is not None and i != prev + 1:
            out.append(cur)
            cur = []
        z, seq = st._order[i]
        cur.append((z, st.results[seq]))
        prev = i
    if cur:
        out.append(cur)
    return out


# ------------------------------------------------------------------------------------------ registered
@dataclass(frozen=True)
class ArtifactChecksConfig:
    min_run: int = field(default=2, metadata=bounded(1, 1000))
    thresholds: dict = field(default_factory=dict, metadata={"help": "per-class probability overrides"})


def _validate(cfg) -> None:
    from medqc.config import ConfigError

    for k, v in cfg.artifact.thresholds.items():
        if k not in ARTIFACTS:
            raise ConfigError(f"checks.artifact.thresholds.{k}: unknown artifact; allowed: {', '.join(ARTIFACTS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < v < 1.0:
            raise ConfigError(f"checks.artifact.thresholds.{k} = {v!r} must be a probability in (0, 1)")


def _judge(j) -> list:
    return artifact_findings(j.state, j.ordered, j.thresholds, j.cfg.artifact.min_run)


CHECKS = (Check("artifact", tuple(f"artifact.{c}" for c in ARTIFACTS), judge=_judge, stream=stream, withdrawable=True,
                # σ inside a metal, motion or ring run is the artifact's, not the dose's
                explains_noise=("artifact.metal", "artifact.motion", "artifact.ring"),
                config=(("artifact", ArtifactChecksConfig, field(default_factory=ArtifactChecksConfig)),),
                validate=_validate),)
