"""geometry.*: the slice stack from headers alone (ImagePositionPatient, ImageOrientationPatient, tilt).

* geometry.duplicate — two instances at the same position along the slice normal (the same SOP instance
  received twice is ignored earlier, never counted twice);
* geometry.gap — a step > 1.5 × the median spacing (missing slices), critical;
* geometry.spacing — steps that differ from the median by more than ``checks.geometry.spacing_tolerance``
  (fraction) without being a gap;
* geometry.tilt — GantryDetectorTilt beyond ``checks.geometry.tilt_tolerance_deg`` (info on head and neck
  protocols, where tilting is the routine technique; warning elsewhere), or a sheared stack (positions
  drift in-plane as z changes, the header declaring no tilt: warning) with the angle measured from the
  positions;
* geometry.orientation — a non-axial series (slice normal > 37° from the patient z axis), mixed
  orientations within a series, or a PatientPosition (supine/prone) that contradicts the image axes.
"""

from __future__ import annotations

import math
import statistics

from dataclasses import dataclass, field

from medqc.agent.checks.common import finding
from medqc.agent.checks.registry import Check, bounded

AXIAL_MIN_NZ = 0.8  # |normal · z| below this (≈ 37°) is not an axial (or gantry-tilted axial) slice
MIXED_DEG = 1.0


def _normal(o):
    r, c = o[:3], o[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    L = math.sqrt(sum(v * v for v in n)) or 1.0
    return tuple(v / L for v in n)


def _angle(a, b) -> float:
    d = max(-1.0, min(1.0, abs(sum(x * y for x, y in zip(a, b)))))
    return math.degrees(math.acos(d))


def _lo(*results):
    insts = [r.info.instance_number for r in results if r.info.instance_number is not None]
    return min(insts) if insts else None


def _hi(*results):
    insts = [r.info.instance_number for r in results if r.info.instance_number is not None]
    return max(insts) if insts else None


def is_localizer(info) -> bool:
    return any(t.upper() == "LOCALIZER" for t in (info.image_type or ()))


def stack(results):
    """Results with geometry (undecodable pixels included: their headers still place them), by ascending z."""
    geo = [r for r in results if r.info.position is not None and r.info.orientation is not None and not is_localizer(r.info)]
    return sorted(geo, key=lambda r: r.info.z)


# protocol ranges starting at these landmarks are head / neck scans, where a tilted gantry is the routine
# technique (the scan plane follows the skull base and keeps the eye lenses out of the beam)
TILT_ROUTINE_STARTS = frozenset({"vertex", "orbit_roof", "skull_base"})


def tilt_from_header(state, tol: float):
    """geometry.tilt from GantryDetectorTilt: a warning, or info where tilting is routine (head and neck)."""
    t = state.first.gantry_tilt or 0.0
    if abs(t) <= tol:
        return None
    routine = state.rule is not None and state.rule.start in TILT_ROUTINE_STARTS
    if routine:
        return finding(state, "geometry.tilt", "info",
                       f"Gantry tilt {t:+.1f}° (usual for {state.rule.name} CT: spares the eye lenses) — 3-D "
                       f"reformats and measurements need tilt correction", score=None,
                       details={"gantry_tilt_deg": t, "source": "header", "routine": True})
    return finding(state, "geometry.tilt", "warning",
                   f"Gantry tilt {t:+.1f}°: slices are not perpendicular to the table — 3-D reformats and "
                   f"measurements need tilt correction", score=None,
                   details={"gantry_tilt_deg": t, "source": "header"})


def orientation_first(state):
    """Non-axial or contradictory orientation, decidable from the first slice alone."""
    info = state.first
    if info.orientation is None:
        return None
    n = _normal(info.orientation)
    if abs(n[2]) < AXIAL_MIN_NZ:
        plane = "sagittal" if abs(n[0]) >= abs(n[1]) else "coronal"
        return finding(state, "geometry.orientation", "warning",
                       f"Series is {plane}, not axial (slice normal {math.degrees(math.acos(min(1.0, abs(n[2])))):.0f}° "
                       f"from the body axis): artifact and coverage checks assume axial slices",
                       details={"normal": [round(v, 4) for v in n], "reason": "non-axial"})
    pp = (info.patient_position or "").upper()
    col_y = info.orientation[4]
    supine, prone = pp.endswith("S"), pp.endswith("P") and not pp.endswith("DP")
    if (supine and col_y < -0.5) or (prone and col_y > 0.5):
        want = "prone" if supine else "supine"
        return finding(state, "geometry.orientation", "warning",
                       f"Patient position {pp} contradicts the image axes, which look {want}: check the "
                       f"position entered at the scanner (left/right and anterior/posterior may be wrong)",
                       details={"patient_position": pp, "column_direction_y": col_y, "reason": "position"})
    return None


def expected_steps(st, steps: list[float], med: float) -> tuple[list[float], list[float]]:
    """Per step, the (low, high) spacing expected there. One slice thickness in the series: the median step
    everywhere. Several (a head scanned 2.5 mm through the posterior fossa and 5 mm above, in one series):
    each run of equal thickness has its own median step, and a step between two runs may lie anywhere from
    the one to the other — a deliberate change of thickness is neither a gap nor inconsistent spacing."""
    n = len(steps)
    thick = [round(r.info.slice_thickness, 2) if r.info.slice_thickness else None for r in st]
    if len({t for t in thick if t is not None}) < 2:
        return [med] * n, [med] * n
    runs, start = [], 0
    for i in range(1, len(st) + 1):
        if i == len(st) or thick[i] != thick[start]:
            runs.append((start, i - 1))
            start = i
    run_of = {}
    run_med = []
    for k, (a, b) in enumerate(runs):
        inner = [steps[i] for i in range(a, b) if steps[i] > 1e-3]
        run_med.append(statistics.median(inner) if inner else (thick[a] or med))
        for i in range(a, b + 1):
            run_of[i] = k
    lo, hi = [], []
    for i in range(n):
        ka, kb = run_of[i], run_of[i + 1]
        if ka == kb:
            lo.append(run_med[ka])
            hi.append(run_med[ka])
        else:
            lo.append(min(run_med[ka], run_med[kb]))
            hi.append(max(run_med[ka], run_med[kb]))
    return lo, hi


def geometry_findings(state, results, spacing_tol: float, tilt_tol: float) -> list:
    out = []
    st = stack(results)
    f = tilt_from_header(state, tilt_tol)
    # mixed orientations
    normals = [_normal(r.info.orientation) for r in st]
    o = orientation_first(state)
    if normals:
        worst = max(range(len(normals)), key=lambda i: _angle(normals[0], normals[i]))
        ang = _angle(normals[0], normals[worst])
        if ang > MIXED_DEG:
            o = finding(state, "geometry.orientation", "critical",
                        f"Mixed slice orientations within one series (up to {ang:.0f}° apart, instance "
                        f"{st[worst].info.instance_number}): the stack cannot be read as one volume",
                        details={"max_angle_deg": round(ang, 2), "reason": "mixed"})
    if o is not None:
        out.append(o)
    if len(st) < 2:
        if f is not None:
            out.append(f)
        return out
    zs = [r.info.z for r in st]
    steps = [b - a for a, b in zip(zs, zs[1:])]
    nonzero = [s for s in steps if s > 1e-3]
    med = statistics.median(nonzero) if nonzero else 0.0
    dup_tol = max(0.01, 0.05 * med)
    dups = [(st[i], st[i + 1]) for i, s in enumerate(steps) if s <= dup_tol]
    if dups:
        insts = sorted({r.info.instance_number for pair in dups for r in pair if r.info.instance_number is not None})
        zr = (min(a.info.z for a, _ in dups), max(a.info.z for a, _ in dups))
        out.append(finding(state, "geometry.duplicate", "warning",
                           f"{len(dups)} duplicate slice position(s) (instances {', '.join(map(str, insts[:8]))}"
                           f"{'…' if len(insts) > 8 else ''}): two images at the same z — check for a repeated "
                           f"reconstruction mixed into the series",
                           first_instance=insts[0] if insts else None, last_instance=insts[-1] if insts else None,
                           z_range_mm=zr, details={"pairs": len(dups), "instances": insts}))
    lo_exp, hi_exp = expected_steps(st, steps, med)
    if med > 0:
        gaps = [(i, s) for i, s in enumerate(steps) if s > 1.5 * hi_exp[i]]
        if gaps:
            missing = sum(max(1, round(s / hi_exp[i]) - 1) for i, s in gaps)
            i0, s0 = max(gaps, key=lambda g: g[1])
            a, b = st[i0], st[i0 + 1]
            out.append(finding(state, "geometry.gap", "critical",
                               f"{missing} slice(s) missing: {len(gaps)} gap(s) in the stack, the largest "
                               f"{s0:.1f} mm between instances {a.info.instance_number} and {b.info.instance_number} "
                               f"(spacing {med:.2f} mm) — check the transfer or resend the series",
                               first_instance=_lo(a, b), last_instance=_hi(a, b),
                               z_range_mm=(a.info.z, b.info.z),
                               details={"gaps": [[round(st[i].info.z, 2), round(s, 2)] for i, s in gaps],
                                        "median_spacing_mm": round(med, 3), "missing_estimate": missing}))
        odd = [(i, s) for i, s in enumerate(steps) if s > dup_tol and s <= 1.5 * hi_exp[i]
               and (s < lo_exp[i] * (1 - spacing_tol) or s > hi_exp[i] * (1 + spacing_tol))]
        if odd:
            i0, s0 = max(odd, key=lambda g: abs(g[1] - med))
            out.append(finding(state, "geometry.spacing", "warning",
                               f"Inconsistent slice spacing: {len(odd)} step(s) differ from the median "
                               f"{med:.2f} mm by more than {spacing_tol * 100:.0f}% (worst {s0:.2f} mm near instance "
                               f"{st[i0].info.instance_number})",
                               first_instance=_lo(st[i0], st[i0 + 1]), last_instance=_hi(st[i0], st[i0 + 1]),
                               z_range_mm=(st[i0].info.z, st[i0 + 1].info.z),
                               details={"median_spacing_mm": round(med, 3), "odd_steps": len(odd), "worst_mm": round(s0, 3)}))
    # shear: in-plane drift of positions per mm along the normal
    a, b = st[0].info, st[-1].info
    n = _normal(a.orientation)
    d = [q - p for p, q in zip(a.position, b.position)]
    along = sum(x * y for x, y in zip(d, n))
    inplane = math.sqrt(max(0.0, sum(x * x for x in d) - along * along))
    shear = math.degrees(math.atan2(inplane, abs(along))) if abs(along) > 1e-6 else 0.0
    if f is not None:
        f.details["shear_deg"] = round(shear, 2)
        out.append(f)
    elif shear > max(tilt_tol, 0.5):
        out.append(finding(state, "geometry.tilt", "warning",
                           f"Sheared stack: slice positions drift {shear:.1f}° off the slice normal but the "
                           f"header declares no gantry tilt — 3-D reformats will be distorted",
                           details={"shear_deg": round(shear, 2), "gantry_tilt_deg": state.first.gantry_tilt or 0.0,
                                    "source": "positions"}))
    return out


# ------------------------------------------------------------------------------------------ registered
@dataclass(frozen=True)
class GeometryChecksConfig:
    spacing_tolerance: float = field(default=0.2, metadata=bounded(0, 10))
    tilt_tolerance_deg: float = field(default=0.5, metadata=bounded(0, 90))


def _stream(s) -> None:
    """The first slice of a series: gantry tilt and orientation from its header."""
    if len(s.state._order) == 1:
        cfg = s.tracker.cfg.checks.geometry
        for f in (tilt_from_header(s.state, cfg.tilt_tolerance_deg), orientation_first(s.state)):
            if f is not None:
                s.put(f)


def _judge(j) -> list:
    return geometry_findings(j.state, j.state.results, j.cfg.geometry.spacing_tolerance, j.cfg.geometry.tilt_tolerance_deg)


CHECKS = (Check("geometry", ("geometry.gap", "geometry.duplicate", "geometry.spacing", "geometry.tilt", "geometry.orientation"),
                judge=_judge, stream=_stream, withdrawable=True,
                config=(("geometry", GeometryChecksConfig, field(default_factory=GeometryChecksConfig)),)),)
