"""What a series could not be judged on, and why: a check that cannot judge says so instead of passing.

``not_judged(state, ordered, rule, coverage_summary)`` → {check: reason} for the checks the final judgement
ran but could not apply to this series: too few slices, no protocol rule, no measurable tissue, a series too
short for a run to qualify. The report carries it as ``not_judged``; ``medqc analyze`` and the console
show it beside the findings.
"""

from __future__ import annotations

from medqc.analysis import noise
from medqc.agent.checks.artifact import NETWORK_ONLY_MIN_EXTENT_MM, RELATIVE_MIN_SLICES
from medqc.agent.checks.common import finite
from medqc.agent.checks.dose import CENTERING_MIN_SLICES, NOISE_INDEX_MIN_SLICES

MOTION_NO_AIR_SHARE = 0.5  # motion is "not judged" where more of the series' slices than this show no free air


def not_judged(state, ordered, rule, coverage: dict | None) -> dict[str, str]:
    usable = [(z, r) for z, r in ordered if not r.error]
    n = len(usable)
    out: dict[str, str] = {}
    if n == 0:
        return {"all": "no slice could be analysed"}
    zs = [z for z, _ in usable]
    span = max(zs) - min(zs)
    # coverage
    if rule is None:
        out["coverage"] = "no protocol rule matched BodyPartExamined / ProtocolName / StudyDescription"
    elif getattr(state, "split_range", False):
        out["coverage"] = "one part of a range split over series (posterior fossa / supratentorial)"
    elif coverage and coverage.get("note"):
        out["coverage"] = coverage["note"].removeprefix("coverage not judged: ")
    # noise against the protocol's reference
    if rule is None or rule.noise_ref_hu is None:
        out["noise.index"] = "no protocol rule with a noise reference matched"
    else:
        measured = sum(1 for _, r in usable if finite(r.measures.get("noise_sd")))
        if noise.sharp_kernel(state.first.convolution_kernel):
            out["noise.index"] = (f"sharp kernel {state.first.convolution_kernel}: its noise is the design "
                                  "(gross noise is judged per slice, artifact.noise)")
        elif measured < NOISE_INDEX_MIN_SLICES:
            out["noise.index"] = (f"{measured} slice{'s' if measured != 1 else ''} with measurable soft tissue "
                                  f"({NOISE_INDEX_MIN_SLICES} needed)")
    # motion is judged against the series' own level, and motion and ring runs must span z
    if n < RELATIVE_MIN_SLICES:
        out["artifact.motion"] = (f"{n} slice{'s' if n != 1 else ''}: the series' own motion level needs "
                                  f"{RELATIVE_MIN_SLICES}; only a very high slice raises motion")
    if span < NETWORK_ONLY_MIN_EXTENT_MM and "artifact.motion" not in out:
        out["artifact.motion"] = (f"the series spans {span:.0f} mm: a motion run needs {NETWORK_ONLY_MIN_EXTENT_MM:.0f} mm "
                                  "(only a very high or strong run counts)")
    if "artifact.motion" not in out:
        # motion's strongest cue is the dark streaks it leaves in the air, round the patient or in the trunk's
        # own air spaces (lungs, airways, gas); where a targeted field or a body filling it leaves neither, the
        # network alone must read very high to raise it
        read = [r.measures for _, r in usable if "air_dark_hu" in r.measures]
        no_air = sum(1 for m in read if not finite(m["air_dark_hu"]) and not finite(m.get("lung_dark_mm2")))
        if read and no_air > MOTION_NO_AIR_SHARE * len(read):
            out["artifact.motion"] = (f"no free air round the patient and no lungs or gas inside it on {no_air} of "
                                      f"{len(read)} slices (a targeted field, or a body filling it): the dark streaks "
                                      "motion leaves in air cannot be read, and the network alone raises motion only "
                                      "at a very high score")
    if span < NETWORK_ONLY_MIN_EXTENT_MM:
        out["artifact.ring"] = (f"the series spans {span:.0f} mm: a ring run needs {NETWORK_ONLY_MIN_EXTENT_MM:.0f} mm "
                                "(only a very high or strong run counts)")
    # centring needs the body centre on a few slices
    centred = sum(1 for _, r in usable if finite(r.measures.get("body_center_offset_y_mm")))
    if centred < CENTERING_MIN_SLICES:
        out["centering.offset"] = (f"the body centre is measurable on {centred} slice{'s' if centred != 1 else ''} "
                                   f"({CENTERING_MIN_SLICES} needed)")
    # dose
    if not any(finite(r.info.ctdivol) and r.info.ctdivol > 0 for _, r in usable):
        out["dose.ctdivol"] = "no CTDIvol in the headers"
    elif rule is None or rule.ctdivol_ref_mgy is None:
        out["dose.ctdivol"] = "no protocol rule with a dose reference matched"
    return out
