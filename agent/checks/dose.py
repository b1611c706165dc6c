"""dose.ctdivol, centering.offset and noise.index: series-level figures against the protocol/config.

* dose.ctdivol — mean CTDIvol over the series' slices above the rule's reference level: info, and a
  warning above ``DOSE_WARNING_FACTOR`` (2) times it; never critical. A reference (diagnostic reference)
  level judges the median dose of a department's standard-size patients, not one exam: with tube-current
  modulation a large patient's exam exceeds it by design. And nothing about this finding calls for a
  repeat while the patient is on the table (a repeat only adds dose): it is for the protocol review, and
  twice the level is worth a look before the next patient. Where the patient's size can be read (the water-equivalent
  diameter Dw of AAPM Report 220, on slices whose displayed field does not cut the trunk) the message and
  the report also give the size-specific dose estimate (SSDE, AAPM Report 204: CTDIvol × a·exp(−b·Dw),
  the 16 or 32 cm phantom's fit from CTDIPhantomTypeCodeSequence, else 16 cm for a head rule and 32 cm
  otherwise) — what the patient received, and whether their size explains a CTDIvol over the level;
* centering.offset — the median (over slices) body centre off the isocentre by more than
  ``checks.centering_tolerance_mm`` (the reconstruction centre stands in for the isocentre when the scanner
  does not write both centres; nothing is said when the displayed field cuts the body). Vertical
  mis-centring changes the bow-tie filtration and the tube-current modulation, so it is named first;
* noise.index — median soft-tissue σ over the series, scaled to 5 mm slices (σ·√(thickness/5)), above the
  rule's reference (warning). Sharp kernels
  (bone, lung, edge, detail …) are skipped: their noise is high by design.
"""

from __future__ import annotations

import math
import statistics

from dataclasses import field

from medqc.analysis import noise
from medqc.agent.checks.common import finding, finite
from medqc.agent.checks.registry import Check, bounded

REF_THICKNESS_MM = 5.0
DOSE_WARNING_FACTOR = 2.0  # dose.ctdivol: info above the reference level, a warning above this many times it
NOISE_INDEX_MIN_SLICES = 3  # noise.index needs this many slices with measurable soft tissue
CENTERING_MIN_SLICES = 3  # centering.offset needs the body centre on this many slices


# AAPM Report 204's fits of the size conversion factor, f = a·exp(−b·Dw[cm]), for CTDIvol measured in the
# 16 cm (head) and 32 cm (body) phantom; Dw (Report 220) stands in for the effective diameter
SSDE_FIT = {16: (1.874799, 0.03871313), 32: (3.704369, 0.03671937)}
SSDE_DW_CM = (8.0, 45.0)  # the fits' domain: no estimate outside it
SIZE_CROPPED = 0.02  # a slice whose trunk covers more of the displayed rim than this: its Dw reads too small


def _ctdivols(results) -> list[float]:
    """The CTDIvol of every analysed slice that states one."""
    return [r.info.ctdivol for r in results if not r.error and finite(r.info.ctdivol) and r.info.ctdivol > 0]


def size_specific(state, results, rule) -> dict | None:
    """The series' size: mean water-equivalent diameter (mm) over the slices whose displayed field does not
    cut the trunk (at least half of the measured ones), and with CTDIvol the size-specific dose estimate.
    None when the size cannot be read."""
    measured = [r for r in results if not r.error and finite(r.measures.get("water_eq_diameter_mm"))]
    whole = [r for r in measured if not r.measures.get("display_touch", 0.0) > SIZE_CROPPED
             and not r.measures.get("body_touches_fov", 0.0) > SIZE_CROPPED]
    if not whole or len(whole) < 0.5 * len(measured):
        return None
    dw = sum(r.measures["water_eq_diameter_mm"] for r in whole) / len(whole)
    out = {"water_eq_diameter_mm": round(dw, 1), "slices": len(whole)}
    ctdi = _ctdivols(results)
    if ctdi and SSDE_DW_CM[0] <= dw / 10.0 <= SSDE_DW_CM[1]:
        phantom = state.first.ctdi_phantom_cm
        source = "header"
        if phantom not in SSDE_FIT:
            phantom = 16 if rule is not None and "head" in rule.name else 32
            source = "assumed from the protocol rule" if rule is not None else "assumed (body)"
        a, b = SSDE_FIT[phantom]
        mean = sum(ctdi) / len(ctdi)
        out.update(ctdivol_mgy=round(mean, 2), ssde_mgy=round(mean * a * math.exp(-b * dw / 10.0), 2),
                   ctdi_phantom_cm=phantom, ctdi_phantom_from=source)
    return out


def dose_findings(state, results, rule, size: dict | None = None) -> list:
    vals = _ctdivols(results)
    if rule is None or rule.ctdivol_ref_mgy is None or not vals:
        return []
    mean = sum(vals) / len(vals)
    ref = rule.ctdivol_ref_mgy
    if mean <= ref:
        return []
    sev = "warning" if mean > DOSE_WARNING_FACTOR * ref else "info"
    over = (mean / ref - 1) * 100  # a series just over the level reads "0.4% over", not "0% over"
    details = {"ctdivol_mgy": round(mean, 2), "reference_mgy": ref, "slices": len(vals)}
    size_text = ""
    if size and "ssde_mgy" in size:
        size_text = (f"; size-specific dose estimate {size['ssde_mgy']:.1f} mGy for a water-equivalent diameter of "
                     f"{size['water_eq_diameter_mm'] / 10.0:.1f} cm")
        details.update(ssde_mgy=size["ssde_mgy"], water_eq_diameter_mm=size["water_eq_diameter_mm"])
    return [finding(state, "dose.ctdivol", sev,
                    f"CTDIvol {mean:.1f} mGy is above the {rule.name} reference level of {ref:.0f} mGy "
                    f"({over:.{0 if over >= 10 else 1}f}% over){size_text} — check the protocol and patient size settings",
                    score=round(mean, 2), details=details)]


CUT_SLICE_TOUCH = 0.25  # trunk along this share of the displayed field's rim: the field cuts the body there


def centering_findings(state, results, tol: float) -> list:
    """Body centre against the isocentre. The image centre is the reconstruction centre; where the scanner
    writes ReconstructionTargetCenterPatient and DataCollectionCenterPatient their difference moves the
    reference to the isocentre (a reconstruction deliberately centred off it — cardiac, one kidney — is not
    the patient's position). Where the field cuts the trunk (along ``CUT_SLICE_TOUCH`` of its rim, or a field
    inside the body: targeted reconstructions) the body centre is not measured, with the two centres or
    without: the centre of what the picture shows of the trunk is not the trunk's (the real chest, 25 mm
    high in its 500 mm field, read 31 mm low against the isocentre in a 250 mm field round its middle, where
    the field cut the trunk along 43-67 % of its rim). Fewer than ``CENTERING_MIN_SLICES`` slices left: nothing
    is said."""
    ok = [r for r in results if not r.error]
    pts, iso = [], 0
    for r in ok:
        x, y = r.measures.get("body_center_offset_x_mm"), r.measures.get("body_center_offset_y_mm")
        if not (finite(x) and finite(y)):
            continue
        touch = r.measures.get("display_touch")
        if r.measures.get("field_inside_body") == 1.0 or (finite(touch) and touch >= CUT_SLICE_TOUCH):
            continue  # the field cuts the trunk on this slice: the centre of what it shows is not the trunk's
        off = r.info.recon_offset_mm
        if off is not None and all(finite(v) for v in off):
            x, y = x + off[0], y + off[1]
            iso += 1
        pts.append((x, y))
    if len(pts) < CENTERING_MIN_SLICES:
        return []
    from_iso = iso >= len(pts) / 2
    mx = statistics.median(p[0] for p in pts)
    my = statistics.median(p[1] for p in pts)
    if abs(mx) <= tol and abs(my) <= tol:
        return []
    parts = []
    if abs(my) > tol:
        parts.append(f"{abs(my):.0f} mm too {'low' if my > 0 else 'high'}")
    if abs(mx) > tol:
        parts.append(f"{abs(mx):.0f} mm to the image {'right' if mx > 0 else 'left'}")
    sev = "warning"
    return [finding(state, "centering.offset", sev,
                    f"Patient off isocentre: body centre {' and '.join(parts)} — adjust table height / centring "
                    f"(vertical mis-centring changes dose and noise)",
                    score=round(max(abs(mx), abs(my)), 1),
                    details={"offset_x_mm": round(mx, 1), "offset_y_mm": round(my, 1), "tolerance_mm": tol, "slices": len(pts),
                             "reference": "isocentre (DataCollectionCenterPatient)" if from_iso else "reconstruction centre"})]


def noise_findings(state, results, rule, explained: frozenset = frozenset()) -> list:
    """``explained``: ids of the results inside an artifact finding whose streaks or circles raise σ (metal,
    motion, ring). Their σ is left out; where that leaves under half of the measured slices (a patient who
    moved all through the series, a ring on every slice), the series' own noise cannot be told apart from
    the artifact, which is reported by its own check, and nothing is said."""
    if rule is None or rule.noise_ref_hu is None:
        return []
    # a sharp kernel (``noise.SHARP_KERNEL``: GE BONE/LUNG/EDGE/DETAIL, Siemens ≥ 60 and the Bl lung family,
    # Philips D/E/L/Y*, Canon FC3x bone and FC5x-9x) has no soft-tissue reference: its noise is the design, and
    # the artifact check judges it per slice against its own level
    if noise.sharp_kernel(state.first.convolution_kernel):
        return []
    factor = noise.kernel_noise_factor(state.first.convolution_kernel)  # Philips C's 1.2, else 1
    sds, measured = [], 0
    for r in results:
        sd = r.measures.get("noise_sd")
        if r.error or not finite(sd):
            continue
        measured += 1
        if id(r) in explained:
            continue
        t = r.info.slice_thickness
        # σ falls with the square root of the slice thickness: compare at the reference 5 mm
        sd = sd * math.sqrt(t / REF_THICKNESS_MM) if finite(t) and t > 0 else sd
        # a patient larger than the reference is allowed the extra noise that size brings (as per slice)
        sds.append(sd * noise.size_allowance(noise.noise_size_mm(r.measures)))
    if len(sds) < NOISE_INDEX_MIN_SLICES or 2 * len(sds) < measured:
        return []
    med = statistics.median(sds)
    ref = rule.noise_ref_hu * factor
    if med <= ref:
        return []
    return [finding(state, "noise.index", "warning",
                    f"Image noise σ {med:.1f} HU in soft tissue (at 5 mm slices) is above the {rule.name} reference of {ref:.0f} HU "
                    f"— check mAs / noise index for this patient size, or use iterative reconstruction",
                    score=round(med, 2), details={"noise_sd_hu": round(med, 2), "reference_hu": ref, "slices": len(sds),
                                                  "kernel": state.first.convolution_kernel or "", "kernel_factor": factor})]


# ------------------------------------------------------------------------------------------ registered
def _judge_dose(j) -> list:
    st = j.state
    if st.dynamic:  # repeated positions over time: no section of the patient to size the dose by
        return dose_findings(st, j.valid, st.rule)
    st.size = size_specific(st, j.valid, st.rule)
    return dose_findings(st, j.valid, st.rule, st.size)


def _judge_centering(j) -> list:
    return centering_findings(j.state, j.valid, j.cfg.centering_tolerance_mm)


def _judge_noise(j) -> list:
    return noise_findings(j.state, j.valid, j.state.rule, j.explained_noise())


CHECKS = (
    # the dose figure means the same on a dynamic series (monitoring scans, perfusion) as on a stack
    Check("dose", ("dose.ctdivol",), judge=_judge_dose, dynamic=True, protocol_keys=("ctdivol_ref_mgy",)),
    Check("centering", ("centering.offset",), judge=_judge_centering,
          config=(("centering_tolerance_mm", float, field(default=30.0, metadata=bounded(0, 500))),)),
    Check("noise", ("noise.index",), judge=_judge_noise, protocol_keys=("noise_ref_hu",)),
)
