"""Checks: coverage (network fit + classical lungs), geometry, dose, centering, noise index, protocol rules,
and the whole series path on the real Philips study (tilted series)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from medqc.agent.checks.protocols import load_rules, match_rule
from medqc.agent.records import SliceInfo, SliceResult
from medqc.agent.series import SeriesTracker
from medqc.analysis.anatomy import LANDMARKS
from medqc.config import ConfigError, load_config

CT = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
VERTEX_Z, SCALE = 1000.0, 1.1


def z_of(landmark: str) -> float:
    return VERTEX_Z - LANDMARKS[landmark] * SCALE


def body_stack(z_top, z_bottom, spacing=2.5, feet_first=False, seed=0, sigma=8.0, outliers=0.1, bias=0.0,
               lung=None, series="1.2.3.50", reverse_anatomy=False, **kw) -> list[SliceResult]:
    """Slices from z_top down to z_bottom (arrival order head→feet unless feet_first) with network
    positions from the body scale (+ noise, outliers, bias) and optional classical lung areas."""
    rng = np.random.default_rng(seed)
    n = int(round((z_top - z_bottom) / spacing)) + 1
    zs = [z_top - i * spacing for i in range(n)]
    if feet_first:
        zs = zs[::-1]
    out = []
    base = dict(orientation=AXIAL, pixel_spacing=(0.7, 0.7), rows=512, cols=512, modality="CT", ctdivol=8.0,
                patient_position="FFS" if feet_first else "HFS", body_part="CHEST")
    base.update(kw)
    for i, z in enumerate(zs):
        info = SliceInfo(f"{series}.{i + 1}", series, "1.2.3", CT, instance_number=i + 1, position=(-180.0, -180.0, z), **base)
        ref = (VERTEX_Z - z) / SCALE
        if reverse_anatomy:
            ref = (z - (VERTEX_Z - 1100)) / SCALE
        ref += rng.normal(0, sigma) + bias
        if rng.random() < outliers:
            ref += rng.choice([-1, 1]) * rng.uniform(100, 300)
        measures = {}
        if lung is not None:
            measures["lung_area_mm2"] = 9000.0 if lung[0] >= z >= lung[1] else 0.0
        out.append(SliceResult(info=info, scores={}, position_ref_mm=ref, measures=measures))
    return out


def run(results, cfg=None, **over):
    cfg = cfg or load_config(overrides=over or None)
    tr = SeriesTracker(cfg, {})
    streamed = []
    for r in results:
        streamed += tr.add(r)
    st, _ = tr.complete(results[0].info.series_instance_uid, "idle")
    return st, streamed


def by_check(st, check):
    fs = [f for f in st.findings.values() if f.check == check and not f.details.get("resolved")]
    return fs[0] if fs else None


# ---------------------------------------------------------------------------------------------- coverage

def test_chest_missing_apex_is_raised_early_with_mm():
    res = body_stack(z_of("lung_apex") - 30, z_of("lung_base") - 20)
    st, streamed = run(res)
    assert st.protocol_rule == "chest"
    early = [f for f in streamed if f.check == "coverage.top"]
    assert early and early[0].details["early"]  # raised while the scan was still running
    f = by_check(st, "coverage.top")
    assert f.details["missing_mm"] == pytest.approx(30, abs=7)
    assert "Lung apices not covered" in f.message and "mm below" in f.message
    assert by_check(st, "coverage.bottom") is None and by_check(st, "coverage.overscan") is None
    assert st.coverage["fit"]["scale"] == pytest.approx(SCALE, abs=0.08)


def test_feet_first_missing_bases_raised_early():
    res = body_stack(z_of("lung_apex") + 15, z_of("lung_base") + 45, feet_first=True)
    st, streamed = run(res)
    assert any(f.check == "coverage.bottom" for f in streamed)
    f = by_check(st, "coverage.bottom")
    assert f.details["missing_mm"] == pytest.approx(45, abs=8)
    assert by_check(st, "coverage.top") is None


def test_overscan_reports_mm_and_extra_dlp():
    res = body_stack(z_of("lung_apex") + 90, z_of("lung_base") - 60, ctdivol=8.0)
    st, _ = run(res)
    assert by_check(st, "coverage.top") is None and by_check(st, "coverage.bottom") is None
    f = by_check(st, "coverage.overscan")
    assert f.details["extra_total_mm"] == pytest.approx(150, abs=12)
    assert f.details["extra_dlp_mgycm"] == pytest.approx(8.0 * f.details["extra_total_mm"] / 10, rel=1e-3)
    assert "mGy·cm extra DLP" in f.message


def test_within_tolerance_and_margin_is_clean():
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15)
    st, _ = run(res)
    assert not [f for f in st.findings.values() if f.check.startswith("coverage")]
    assert st.verdict == "pass"


def test_a_landmark_estimated_by_the_network_can_get_a_margin():
    """A landmark the slices do not show is only an estimate from the network's body scale (p90 error 22 mm
    on the synthetic evaluation against 9 mm for lungs, skull and iliac wings): a site can add
    checks.coverage.estimate_margin_mm to the tolerance for such landmarks (default 0)."""
    res = body_stack(z_of("lung_apex") - 18, z_of("lung_base") - 20, outliers=0.0, sigma=3.0)
    st, _ = run(res)
    assert st.coverage["start_source"] == "network"
    f = by_check(st, "coverage.top")  # ~18 mm short against the 10 mm tolerance
    assert f is not None and f.details["tolerance_mm"] == 10.0 and f.details["missing_mm"] == pytest.approx(18, abs=5)
    over = {"checks.coverage.estimate_margin_mm": 15.0}
    st, _ = run(body_stack(z_of("lung_apex") - 18, z_of("lung_base") - 20, outliers=0.0, sigma=3.0, series="1.2.3.53"), **over)
    assert by_check(st, "coverage.top") is None  # within 10 + 15 mm for an estimate
    # 40 mm short on an estimate: raised, a warning (critical from 30 + 15 mm)
    st, _ = run(body_stack(z_of("lung_apex") - 40, z_of("lung_base") - 20, outliers=0.0, sigma=3.0, series="1.2.3.54"), **over)
    f = by_check(st, "coverage.top")
    assert f is not None and f.severity == "warning" and f.details["tolerance_mm"] == 25.0


def test_classical_lungs_override_network():
    # the network is biased (claims the apex is 60 mm above the scan) but the lungs start 30 mm below the
    # first slice: the apex is covered
    top = z_of("lung_apex") + 30
    res = body_stack(top, z_of("lung_base") - 20, bias=-60.0, lung=(top - 30, z_of("lung_base")))
    st, _ = run(res)
    assert by_check(st, "coverage.top") is None
    assert st.coverage["start_source"] == "lungs"
    # and the other way: the network says covered, but the very first slices are full of lung
    top = z_of("lung_apex") + 20
    res = body_stack(top, z_of("lung_base") - 20, bias=+80.0, lung=(top + 50, z_of("lung_base")), series="1.2.3.51")
    st, _ = run(res)
    f = by_check(st, "coverage.top")
    assert f is not None and f.severity == "critical" and "lung" in f.message


def test_anatomy_against_coordinates_is_an_orientation_finding():
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, reverse_anatomy=True, outliers=0.0)
    st, _ = run(res)
    f = by_check(st, "geometry.orientation")
    assert f is not None and f.details["reason"] == "anatomy-direction"


def test_site_protocol_file(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('[[rule]]\nname = "thorax-short"\nmatch = [\'\\bCHEST\\b\']\nstart = "carina"\nend = "lung_base"\n'
                    'tolerance_mm = 5\nctdivol_ref_mgy = 5\n')
    cfg = load_config(overrides={"checks.coverage.protocols": str(site)})
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15)  # starts far above the carina
    st, _ = run(res, cfg=cfg)
    assert st.protocol_rule == "thorax-short"
    f = by_check(st, "coverage.overscan")
    assert f is not None and f.details["extra_mm"]["top"] == pytest.approx((LANDMARKS["carina"] - LANDMARKS["lung_apex"]) * SCALE + 20, abs=10)
    assert by_check(st, "dose.ctdivol").severity == "info" and by_check(st, "dose.ctdivol").details["reference_mgy"] == 5


@pytest.mark.parametrize("text,rule", [
    ("CHEST", "chest"), ("THORAX", "chest"), ("TORSO", "chest-abdomen-pelvis"), ("CAP", "chest-abdomen-pelvis"),
    ("Thorax_Abdomen_Becken", "chest-abdomen-pelvis"), ("ABD PEL", "abdomen-pelvis"), ("HEAD", "head"),
    ("BRAIN", "head"), ("SCHAEDEL", "head"), ("1F STEREOTAXIS /Head", "head"), ("Neck", "neck"),
    ("Abdomen^Routine", "abdomen"), ("PELVIS", "pelvis"), ("Knee", None), ("", None),
    ("LOW DOSE CHEST", "chest-low-dose"), ("Thorax LD", "chest-low-dose"), ("LDCT", "chest-low-dose"),
    ("Lung Cancer Screening", "chest-low-dose"), ("LungScreen", "chest-low-dose"), ("CHEST ROUTINE", "chest")])
def test_shipped_rules_match_vendor_spellings(text, rule):
    rules = load_rules()
    for fld in ("protocol_name", "body_part", "study_description"):
        r, where = match_rule(SliceInfo("1", "2", "3", CT, **{fld: text}), rules)
        assert (r.name if r else None) == rule
        if r:
            assert where == fld


def test_protocol_names_field_precedence():
    info = SliceInfo("1", "2", "3", CT, protocol_name="CAP venous", body_part="CHEST", study_description="CT HEAD")
    assert match_rule(info, load_rules())[0].name == "chest-abdomen-pelvis"


@pytest.mark.parametrize("body,err", [
    ('[[rule]]\nname="x"\nmatch=["A"]\nstart="nose"\nend="lung_base"\n', "allowed: vertex"),
    ('[[rule]]\nname="x"\nmatch=["A"]\nstart="lung_base"\nend="lung_apex"\n', "must lie above"),
    ('[[rule]]\nname="x"\nmatch=["("]\nstart="vertex"\nend="lung_base"\n', "bad pattern"),
    ('[[rule]]\nname="x"\nmatch=["A"]\nstart="vertex"\nend="lung_base"\ncolour=1\n', "allowed: ctdivol_ref_mgy"),
])
def test_bad_site_rules_are_clear_errors(tmp_path, body, err):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=err):
        load_rules(p)
    with pytest.raises(ConfigError, match="not found"):
        load_rules(tmp_path / "missing.toml")


# ---------------------------------------------------------------------------------------------- geometry

def stack(n=30, spacing=2.5, drop=(), dup=(), odd=None, shear_deg=0.0, tilt=0.0, orientation=AXIAL, pp="HFS",
          mixed_at=None, series="1.2.3.60"):
    res = []
    z = 0.0
    for i in range(n):
        if odd is not None and i == odd:
            z -= 0.8  # one step of 3.3 mm instead of 2.5
        o = orientation
        if mixed_at is not None and i >= mixed_at:
            o = (1.0, 0.0, 0.0, 0.0, math.cos(0.2), -math.sin(0.2))
        if i not in drop:
            y = -180.0 + z * math.tan(math.radians(shear_deg))
            info = SliceInfo(f"{series}.{i + 1}", series, "1.2.3", CT, instance_number=i + 1, position=(-180.0, y, z),
                             orientation=o, gantry_tilt=tilt, patient_position=pp, rows=512, cols=512)
            res.append(SliceResult(info=info))
            if i in dup:
                info2 = SliceInfo(f"{series}.{i + 1}.9", series, "1.2.3", CT, instance_number=100 + i,
                                  position=(-180.0, y, z), orientation=o, gantry_tilt=tilt, patient_position=pp)
                res.append(SliceResult(info=info2))
        z -= spacing
    return res


def test_clean_stack_passes():
    st, _ = run(stack())
    assert st.verdict == "pass" and not st.findings


def test_gap_duplicate_spacing():
    st, _ = run(stack(drop=(10, 11, 12)))
    f = by_check(st, "geometry.gap")
    assert f.severity == "critical" and f.details["missing_estimate"] == 3
    assert (f.first_instance, f.last_instance) == (10, 14)
    assert st.verdict == "fail"
    st, _ = run(stack(dup=(7,)))
    f = by_check(st, "geometry.duplicate")
    assert f is not None and 8 in f.details["instances"] and by_check(st, "geometry.gap") is None
    st, _ = run(stack(odd=15))
    f = by_check(st, "geometry.spacing")
    assert f is not None and f.details["worst_mm"] == pytest.approx(3.3, abs=0.01)
    assert by_check(st, "geometry.gap") is None


def _two_thickness_head(drop=(), series="1.2.3.65"):
    """12 slices of 2.5 mm through the posterior fossa, then 12 of 5 mm above them, in one series (and
    arriving top to bottom or not: the order does not matter)."""
    res, z = [], 0.0
    for i in range(24):
        t = 2.5 if i < 12 else 5.0
        if i == 12:
            z += (2.5 + 5.0) / 2 - 2.5  # centre to centre across the change: (2.5 + 5) / 2
        if i not in drop:
            info = SliceInfo(f"{series}.{i + 1}", series, "1.2.3", CT, instance_number=i + 1, position=(-120.0, -120.0, z),
                             orientation=AXIAL, slice_thickness=t, rows=512, cols=512)
            res.append(SliceResult(info=info))
        z += t
    return res


def test_a_deliberate_change_of_slice_thickness_is_neither_a_gap_nor_odd_spacing():
    st, _ = run(_two_thickness_head())
    assert by_check(st, "geometry.gap") is None and by_check(st, "geometry.spacing") is None, st.findings
    st, _ = run(_two_thickness_head(drop=(5,), series="1.2.3.66"))  # a slice lost in the 2.5 mm part
    f = by_check(st, "geometry.gap")
    assert f is not None and f.details["missing_estimate"] == 1
    st, _ = run(_two_thickness_head(drop=(18,), series="1.2.3.67"))  # and one in the 5 mm part
    assert by_check(st, "geometry.gap") is not None


def test_dynamic_series_is_not_judged_as_a_stack():
    """Bolus-tracking monitoring scans (one table position, repeated) and perfusion (a few positions, each
    many times) are not stacks along the patient: no coverage, duplicate or artifact-run findings, and a
    pass unless the dose says otherwise; the report says why. A stack with one repeated slice is still one."""
    from medqc.agent.report import series_report
    from medqc.config import load_config as _lc

    apex = z_of("lung_apex")
    res = []
    for t in range(12):
        r = body_stack(apex - 150, apex - 150, series="1.2.3.81", seed=t)[0]
        r.info.sop_instance_uid = f"1.2.3.81.{t + 1}"
        r.info.instance_number = t + 1
        r.scores = {"noise": 0.95, "motion": 0.2}  # low-dose monitoring images are noisy on purpose
        res.append(r)
    st, streamed = run(res)
    assert st.dynamic and not streamed
    assert [f.check for f in st.findings.values()] == [] and st.verdict == "pass"
    rep = series_report(st, _lc().privacy)
    assert rep["series_kind"] == "dynamic" and "bolus tracking" in rep["coverage_note"]
    # perfusion: 4 positions × 6 time points
    res = []
    for t in range(6):
        for k, r in enumerate(body_stack(apex - 100, apex - 130, spacing=10.0, series="1.2.3.82", seed=t)):
            r.info.sop_instance_uid = f"1.2.3.82.{t}.{k}"
            res.append(r)
    st, streamed = run(res)
    assert st.dynamic and by_check(st, "geometry.duplicate") is None and by_check(st, "coverage.top") is None
    assert not [f for f in streamed if f.check.startswith("coverage.")]  # not even while it looked like a stack
    # a stack with a repeated slice is not dynamic
    st, _ = run(stack(dup=(7,)))
    assert not st.dynamic and by_check(st, "geometry.duplicate") is not None


def test_tilt_from_header_and_from_sheared_positions():
    st, streamed = run(stack(tilt=12.0, shear_deg=12.0))
    assert [f.check for f in streamed] == ["geometry.tilt"]  # from the first slice's header
    assert by_check(st, "geometry.tilt").details["shear_deg"] == pytest.approx(12.0, abs=0.1)
    assert by_check(st, "geometry.tilt").severity == "warning"  # no protocol rule: not known to be routine
    st, _ = run(stack(shear_deg=8.0))  # sheared, but the header says no tilt
    f = by_check(st, "geometry.tilt")
    assert f.details["source"] == "positions" and f.details["shear_deg"] == pytest.approx(8.0, abs=0.1)
    # a tilted gantry is the routine technique of head (and neck) CT: info; on a chest it is a warning
    for protocol, sev in (("HEAD ROUTINE", "info"), ("NECK", "info"), ("CHEST", "warning")):
        res = stack(tilt=15.0, shear_deg=15.0, series=f"1.2.3.7{len(protocol)}")
        for r in res:
            r.info.protocol_name = protocol
        st, _ = run(res)
        assert by_check(st, "geometry.tilt").severity == sev, protocol
        assert st.verdict == ("pass" if sev == "info" else "warn"), (protocol, st.findings)


def test_orientation_checks():
    sag = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    st, streamed = run(stack(orientation=sag, series="1.2.3.61"))
    assert by_check(st, "geometry.orientation").details["reason"] == "non-axial"
    assert "sagittal" in by_check(st, "geometry.orientation").message
    st, _ = run(stack(mixed_at=12))
    f = by_check(st, "geometry.orientation")
    assert f.severity == "critical" and f.details["reason"] == "mixed"
    st, _ = run(stack(orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), pp="HFS"))  # prone axes, supine entered
    assert by_check(st, "geometry.orientation").details["reason"] == "position"
    st, _ = run(stack(orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), pp="HFP"))
    assert by_check(st, "geometry.orientation") is None


# ------------------------------------------------------------------------------- dose, centring, noise

@pytest.mark.parametrize("ctdi,sev,over", [(10.0, None, None), (12.05, "info", "(0.4% over)"),
                                           (14.0, "info", "(17% over)"), (24.0, "info", "(100% over)"),
                                           (30.0, "warning", "(150% over)"), (90.0, "warning", "(650% over)")])
def test_ctdivol_against_protocol_reference(ctdi, sev, over):
    """Above the reference (diagnostic reference) level: info — a large patient's exam exceeds it by design
    and nothing here calls for a repeat; above twice it a warning (check the protocol before the next
    patient); never critical, so dose alone never fails a series."""
    st, _ = run(body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, ctdivol=ctdi))
    f = by_check(st, "dose.ctdivol")
    assert (f.severity if f else None) == sev
    if f:
        assert "12 mGy" in f.message and over in f.message, f.message
        assert st.verdict == ("warn" if sev == "warning" else "pass")


def test_size_specific_dose_estimate_from_the_water_equivalent_diameter():
    """AAPM Reports 204 / 220: SSDE = CTDIvol × a·exp(−b·Dw) with Dw in cm; for a 30 cm body the 32 cm
    phantom's factor is 1.23 (Report 204's table). The dose finding names it; the report carries it; slices
    whose displayed field cuts the trunk (Dw too small there) are not used, and without enough others the
    size is not given at all."""
    from medqc.agent.checks.dose import SSDE_FIT

    a, b = SSDE_FIT[32]
    assert a * math.exp(-b * 30.0) == pytest.approx(1.23, abs=0.005)
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, ctdivol=14.0)
    for r in res:
        r.measures.update(water_eq_diameter_mm=300.0, display_touch=0.0)
    res[0].measures.update(water_eq_diameter_mm=150.0, display_touch=0.4)  # cropped: not used
    st, _ = run(res)
    assert st.size["water_eq_diameter_mm"] == 300.0 and st.size["slices"] == len(res) - 1
    assert st.size["ssde_mgy"] == pytest.approx(14.0 * a * math.exp(-b * 30.0), abs=0.01)
    assert st.size["ctdi_phantom_cm"] == 32 and st.size["ctdi_phantom_from"] == "assumed from the protocol rule"
    f = by_check(st, "dose.ctdivol")
    assert "size-specific dose estimate 17.2 mGy for a water-equivalent diameter of 30.0 cm" in f.message, f.message
    assert f.details["ssde_mgy"] == st.size["ssde_mgy"]
    from medqc.agent.report import series_report

    assert series_report(st, None)["size"]["ssde_mgy"] == st.size["ssde_mgy"]
    # the phantom written in the header wins; a head rule assumes the 16 cm phantom
    head = body_stack(z_of("vertex") - 10, z_of("skull_base") - 10, ctdivol=50.0, body_part="HEAD", ctdi_phantom_cm=32)
    for r in head:
        r.measures.update(water_eq_diameter_mm=160.0)
    st, _ = run(head)
    assert st.size["ctdi_phantom_cm"] == 32 and st.size["ctdi_phantom_from"] == "header"
    for r in head:
        r.info.ctdi_phantom_cm = None
    st, _ = run(head)
    a16, b16 = SSDE_FIT[16]
    assert st.size["ctdi_phantom_cm"] == 16 and st.size["ssde_mgy"] == pytest.approx(50.0 * a16 * math.exp(-b16 * 16.0), abs=0.01)
    # mostly cropped (a targeted field): no size, and the dose finding says nothing of it
    for r in res:
        r.measures.update(display_touch=0.5)
    st, _ = run(res)
    assert st.size is None and "size-specific" not in by_check(st, "dose.ctdivol").message


def test_noise_index_leaves_out_what_an_artifact_explains():
    """Motion streaks raise σ in soft tissue (a real head phantom with motion injected in every rotation read
    26 HU against 2.8 clean). A patient who moved all through the series gets artifact.motion, not also a
    noise.index warning telling the technologist to raise the mAs; the same σ without motion is noise."""
    for air, expect in ((4.0, False), (1.0, True)):
        res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, series=f"1.2.3.8{int(air)}")
        for r in res:
            r.scores = {"motion": 0.5}
            r.measures.update(noise_sd=30.0, air_dark_hu=air)
        st, _ = run(res)
        assert (by_check(st, "artifact.motion") is not None) is not expect
        assert (by_check(st, "noise.index") is not None) is expect


def test_centering_and_noise_index():
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15)
    for r in res:
        r.measures.update(body_center_offset_x_mm=4.0, body_center_offset_y_mm=45.0, noise_sd=30.0)
    st, _ = run(res)
    f = by_check(st, "centering.offset")
    assert f is not None and "45 mm too low" in f.message and f.details["offset_y_mm"] == 45.0
    n = by_check(st, "noise.index")
    assert n is not None and n.details["noise_sd_hu"] == 30.0 and n.details["reference_hu"] == 18.0
    # a reconstruction centred 45 mm below the isocentre on purpose (ReconstructionTargetCenterPatient −
    # DataCollectionCenterPatient): the patient is centred, nothing to say
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, recon_offset_mm=(0.0, -45.0), series="1.2.3.61")
    for r in res:
        r.measures.update(body_center_offset_x_mm=4.0, body_center_offset_y_mm=45.0)
    st, _ = run(res)
    assert by_check(st, "centering.offset") is None
    # the same reconstruction offset with the body off in the image: measured from the isocentre
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, recon_offset_mm=(0.0, 20.0), series="1.2.3.62")
    for r in res:
        r.measures.update(body_center_offset_x_mm=0.0, body_center_offset_y_mm=25.0)
    st, _ = run(res)
    f = by_check(st, "centering.offset")
    assert f is not None and "45 mm too low" in f.message and f.details["reference"].startswith("isocentre")
    # a targeted field that cuts the trunk all round, without the two centres: the body centre is not
    # measurable there
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, series="1.2.3.63")
    for r in res:
        r.measures.update(body_center_offset_x_mm=40.0, body_center_offset_y_mm=45.0, display_touch=0.9)
    st, _ = run(res)
    assert by_check(st, "centering.offset") is None
    # ... nor with them: the two centres place the isocentre, but the picture still holds only part of the trunk
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, recon_offset_mm=(0.0, 20.0), series="1.2.3.65")
    for r in res:
        r.measures.update(body_center_offset_x_mm=0.0, body_center_offset_y_mm=25.0, display_touch=0.9)
    st, _ = run(res)
    assert by_check(st, "centering.offset") is None
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, series="1.2.3.64")
    for r in res:  # a targeted field inside the trunk, the scan field not stated
        r.measures.update(body_center_offset_x_mm=40.0, body_center_offset_y_mm=45.0, display_touch=0.0, field_inside_body=1.0)
    st, _ = run(res)
    assert by_check(st, "centering.offset") is None
    # a sharp kernel's noise is high by design: no noise.index (GE, Siemens lung family, Philips lung and
    # sharp letters, Canon bone) — a standard kernel of each vendor is still judged
    for i, (kernel, judged) in enumerate((("BONEPLUS", False), ("Bl57d", False), ("L", False), ("YB", False),
                                          ("FC30", False), ("B", True), ("Br40d", True), ("FC13", True))):
        res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, convolution_kernel=kernel, series=f"1.2.3.7{i}")
        for r in res:
            r.measures.update(noise_sd=30.0)
        st, _ = run(res)
        assert (by_check(st, "noise.index") is not None) is judged, kernel


def test_motion_is_not_judged_without_air_round_the_patient_or_inside_it():
    """Motion's streaks are read in air: the free air round the patient (``air_dark_hu``) or the trunk's own
    lungs and gas (``lung_dark_mm2``). A series whose slices show neither (a targeted field inside the
    abdomen's soft tissue) says motion was not judged, and why; one whose lungs are read, though no free air
    shows round it (a chest shown to its walls), is judged."""
    nan = float("nan")
    for series, lung, judged in (("1.2.3.91", nan, False), ("1.2.3.92", 0.0, True)):
        res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, series=series)
        for r in res:
            r.scores = {"motion": 0.3}
            r.measures.update(air_dark_hu=nan, lung_dark_mm2=lung)
        st, _ = run(res)
        why = st.not_judged.get("artifact.motion")
        assert (why is None) is judged, why
        if why:
            n = len(res)
            assert why.startswith(f"no free air round the patient and no lungs or gas inside it on {n} of {n}"), why


# ------------------------------------------------------------------------------- the real Philips study

def _real_results(folder):
    import pydicom

    from medqc.analysis import fusion, measures

    out = []
    for p in sorted(folder.glob("I*")):
        ds = pydicom.dcmread(p)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        info = SliceInfo(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPClassUID,
                         instance_number=int(ds.InstanceNumber), rows=ds.Rows, cols=ds.Columns,
                         pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
                         position=tuple(float(v) for v in ds.ImagePositionPatient),
                         orientation=tuple(float(v) for v in ds.ImageOrientationPatient),
                         gantry_tilt=float(ds.GantryDetectorTilt), ctdivol=float(ds.CTDIvol),
                         patient_position=str(ds.PatientPosition), body_part=str(ds.get("BodyPartExamined", "")),
                         protocol_name=str(ds.get("ProtocolName", "")), convolution_kernel=str(ds.get("ConvolutionKernel", "")))
        m = measures.measure(hu, info)
        out.append(SliceResult(info=info, measures=m, scores=fusion.fuse({c: 0.02 for c in ("metal", "motion", "ring", "noise", "truncation")}, m)))
    return out


@pytest.mark.parametrize("folder,tilt", [("S2010", -18.5), ("S3010", 16.5)])
def test_real_tilted_philips_series(real_ct, folder, tilt):
    res = _real_results(real_ct / folder)
    st, streamed = run(res)
    assert st.protocol_rule == "head"
    assert streamed[0].check == "geometry.tilt"  # from the first slice
    f = by_check(st, "geometry.tilt")
    assert f.details["gantry_tilt_deg"] == tilt
    assert f.details["shear_deg"] == pytest.approx(abs(tilt), abs=0.3)  # IPP shear matches the tilt tag
    assert f.severity == "info" and f.details["routine"]  # a tilted head scan is the routine technique
    found = {f.check for f in st.findings.values()}
    for clean in ("geometry.gap", "geometry.duplicate", "geometry.spacing", "geometry.orientation",
                  "artifact.metal", "artifact.truncation", "artifact.noise", "noise.index", "dose.ctdivol"):
        assert clean not in found, (clean, st.findings)
    sev = {x.severity for x in st.findings.values()}
    assert st.verdict == ("fail" if "critical" in sev else "warn" if "warning" in sev else "pass")


def test_noise_index_is_compared_at_5mm_slices():
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, slice_thickness=1.25, series="1.2.3.71")
    for r in res:
        r.measures.update(noise_sd=30.0)  # 30 HU at 1.25 mm ≈ 15 HU at 5 mm: below the chest reference
    st, _ = run(res)
    assert by_check(st, "noise.index") is None
    for r in res:
        r.measures.update(noise_sd=44.0)  # ≈ 22 HU at 5 mm
    st, _ = run(res)
    assert by_check(st, "noise.index").details["noise_sd_hu"] == pytest.approx(22.0, abs=0.1)


def test_localizer_inside_an_axial_series_is_not_analysed():
    res = stack(series="1.2.3.62")
    scout = SliceInfo("1.2.3.62.999", "1.2.3.62", "1.2.3", CT, instance_number=999, position=(-250.0, 0.0, 100.0),
                      orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    st, _ = run([res[0], SliceResult(info=scout)] + res[1:])
    assert st.verdict == "pass" and not st.findings and len(st.results) == len(res) + 1
    st, _ = run([SliceResult(info=scout)] + res)  # the scout arrives first
    assert st.verdict == "pass" and not st.findings and st.first.sop_instance_uid == res[0].info.sop_instance_uid


def test_bowel_gas_is_not_lung():
    """A gas-filled colon below the lungs (separate run) or a thin rim of lung at the edge is no proof."""
    top, bottom = z_of("lung_apex") + 20, z_of("lung_base") - 40
    res = body_stack(top, bottom, outliers=0.0)
    base = z_of("lung_base")
    for r in res:
        z = r.info.z
        a = 9000.0 if z_of("lung_apex") >= z >= base else 0.0
        if base - 15 >= z >= base - 35:
            a = 2500.0  # colon gas and stool, separated from the lungs by gas-free slices
        r.measures["lung_area_mm2"] = a
    st, _ = run(res)
    assert st.coverage["end_source"] == "lungs" and st.coverage["end_z"] == pytest.approx(base, abs=3)
    assert by_check(st, "coverage.bottom") is None
    # the scan ends 5 mm above the base where only a thin rim of lung is left: the network decides
    res = body_stack(top, base + 5, outliers=0.0, series="1.2.3.52")
    for r in res:
        r.measures["lung_area_mm2"] = 9000.0 if r.info.z >= base + 30 else 2000.0
    st, _ = run(res)
    assert st.coverage["end_source"] == "network"
    assert by_check(st, "coverage.bottom") is None  # 5 mm short is within the 10 mm tolerance


def test_lungs_anchor_the_network_fit_for_far_landmarks():
    """CAP: the network reads 60 mm too low everywhere; the lungs (seen whole) re-anchor the fit, so the
    pubic symphysis — far from any lung — is placed right and no overscan is invented."""
    top, bottom = z_of("lung_apex") + 20, z_of("pubic_symphysis") - 10
    res = body_stack(top, bottom, body_part="CAP", bias=60.0, lung=(z_of("lung_apex"), z_of("lung_base")))
    st, _ = run(res)
    assert st.protocol_rule == "chest-abdomen-pelvis"
    assert st.coverage["fit"]["anchored_on_anatomy"] == pytest.approx(-60, abs=8)
    assert st.coverage["end_z"] == pytest.approx(z_of("pubic_symphysis"), abs=10)
    assert not [f for f in st.findings.values() if f.check.startswith("coverage")]
    # the same series without classical lungs: the bias shows as a bottom overscan (the network alone)
    res = body_stack(top, bottom, body_part="CAP", bias=60.0, series="1.2.3.53")
    st, _ = run(res)
    assert by_check(st, "coverage.overscan") is not None


def test_iliac_crest_needs_one_clear_transition():
    from medqc.agent.checks.coverage import iliac_crest

    def series(pattern):
        return [(float(-i * 10), SliceResult(info=SliceInfo(str(i), "s", "t", CT), measures={"lateral_bone_mm2": v}))
                for i, v in enumerate(pattern)][::-1]  # ascending z

    ribs, gap, wings = 900.0, 20.0, 1500.0
    assert iliac_crest(series([ribs, ribs, gap, gap, gap, wings, wings, wings])) == {"iliac_crest_z": -45.0}
    assert iliac_crest(series([gap, gap, wings, wings, gap, gap, wings, wings])) == {}  # ambiguous
    assert iliac_crest(series([ribs, ribs, ribs, wings, wings])) == {}  # no lumbar gap: no proof
    # a scan that starts in the lumbar gap: its top slice is the only one above the crest
    assert iliac_crest(series([gap, wings, wings, wings])) == {"iliac_crest_z": -5.0}
    assert iliac_crest(series([gap, wings])) == {}  # one slice of wings is not the wings
    assert iliac_crest(series([ribs, gap, wings, wings])) == {}  # one gap slice below ribs: not the lumbar gap
    tips = 300.0  # a slice through the crests' tips: some bone, not yet the wings
    assert iliac_crest(series([gap, gap, gap, tips, wings, wings])) == {"iliac_crest_z": -25.0}
    assert iliac_crest(series([gap, gap, tips, tips, wings, wings])) == {}  # two of them: not a crest's tips
    def with_lungs(pattern, lung):
        return [(z, SliceResult(info=r.info, measures=dict(r.measures, lung_area_mm2=lung))) for z, r in series(pattern)]

    assert iliac_crest(with_lungs([gap, wings, wings, wings], 5000.0)) == {}  # lungs there: not the pelvis


def test_small_air_spaces_are_not_lungs():
    """Sinus/mastoid-sized 'lung' areas are not lungs: a 'chest' series showing nothing larger has no chest in
    it (coverage.absent, critical), whatever the network's body scale says."""
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 15, outliers=0.0, series="1.2.3.54")
    for r in res:
        r.measures["lung_area_mm2"] = 2500.0 if r.info.z > z_of("carina") else 0.0
    st, _ = run(res)
    f = by_check(st, "coverage.absent")
    assert f is not None and f.severity == "critical" and "no slice shows lung" in f.message
    assert by_check(st, "coverage.top") is None and by_check(st, "coverage.bottom") is None


def test_short_head_stack_uses_average_size_not_its_slope():
    """A 130 mm head stack: the network's positions are compressed (slope 0.6 of the truth, as the shipped
    network reads heads near the vertex); the fitted slope would put the skull base ~40 mm below the scan.
    Below 180 mm of span the size factor is 1 and only the offset is fitted: no false coverage finding."""
    top, bottom = z_of("vertex") + 8, z_of("skull_base") - 15
    assert top - bottom < 180
    res = body_stack(top, bottom, spacing=3.0, sigma=4.0, outliers=0.05, series="1.2.3.56", body_part="HEAD")
    refs = [r.position_ref_mm for r in res]
    mid = float(np.median(refs))
    for r in res:
        r.position_ref_mm = mid + 0.6 * (r.position_ref_mm - mid)
    st, _ = run(res)
    assert st.protocol_rule == "head"
    fit = st.coverage["fit"]
    assert fit["scale"] == 1.0 and fit["short_span_scale"] > 1.5
    assert abs(st.coverage["end_z"] - z_of("skull_base")) < 12
    assert by_check(st, "coverage.bottom") is None and by_check(st, "coverage.top") is None
    # a long stack still fits its size factor from the slope
    res = body_stack(z_of("lung_apex") + 20, z_of("lung_base") - 20, series="1.2.3.57")
    st, _ = run(res)
    assert st.coverage["fit"]["scale"] == pytest.approx(SCALE, abs=0.1) and "short_span_scale" not in st.coverage["fit"]


def test_a_posterior_fossa_series_is_not_judged_for_coverage():
    """A sequential head split into a posterior-fossa series (skull base to tentorium) and a supratentorial
    one: the first alone misses the vertex by design. Named so in SeriesDescription, it is not judged for
    coverage (the report says why); the same stack without that name raises coverage.top."""
    from medqc.agent.report import series_report
    from medqc.config import load_config as _cfg

    top, bottom = z_of("skull_base") + 45, z_of("skull_base") - 10
    for desc, raised in (("Post Fossa 2.5mm", False), ("HEAD_P-FOSSA", False), ("Supratentorial 5mm", False),
                         ("Head 2.5mm", True)):
        res = body_stack(top, bottom, spacing=2.5, sigma=4.0, outliers=0.0, series="1.2.3.70", body_part="HEAD",
                         series_description=desc)
        st, streamed = run(res)
        assert st.protocol_rule == "head"
        assert (by_check(st, "coverage.top") is not None) is raised, desc
        if not raised:
            assert not [f for f in streamed if f.check.startswith("coverage.")]
            assert "split over series" in series_report(st, _cfg().privacy)["coverage_note"]


def _head_measures(res, vertex_z, holder_mm2=1500.0):
    """Skull-cap anatomy on a head stack: head cross-section of a sphere (R 80 mm) below the vertex, skull
    bone on every slice through the head, a head holder (no skull-density bone) on every slice."""
    for r in res:
        d = vertex_z - r.info.position[2]
        head = 0.0 if d <= 0 else math.pi * (2 * 80.0 * min(d, 80.0) - min(d, 80.0) ** 2)
        r.measures.update(body_area_mm2=head + holder_mm2, skull_ring=1.0 if d > 0 else 0.0,
                          bone_area_mm2=500.0 + (0.3 * head if d > 0 else 0.0))


def test_vertex_from_the_skull_not_the_network():
    """Head scans: the vertex comes from skull-density bone where the scan shows the top of the head (only
    air and the head holder above it), whatever the network says (here 30 mm off); a small skull-cap section
    on the top slice puts the vertex just above it; a large section through the skull is a missed vertex."""
    vz = z_of("vertex")
    res = body_stack(vz + 15, z_of("skull_base") - 15, spacing=3.0, sigma=4.0, outliers=0.0, bias=30.0,
                     series="1.2.3.60", body_part="HEAD", slice_thickness=3.0)
    _head_measures(res, vz)
    st, _ = run(res)
    assert st.coverage["start_source"] == "skull (top of the head in the scan)"
    assert abs(st.coverage["start_z"] - vz) <= 3.0
    assert by_check(st, "coverage.top") is None
    # the skull's vertex also re-anchors the network fit (30 mm off here): the skull base lands right
    assert st.coverage["fit"]["anchored_on_anatomy"] == pytest.approx(-30.0, abs=6.0)
    # (within the head-size effect: a short stack is read at size factor 1, this patient is 1.1)
    assert abs(st.coverage["end_z"] - z_of("skull_base")) <= 12.0 and by_check(st, "coverage.bottom") is None
    # the scan starts 5 mm below the vertex: a cap of ~2,400 mm² on the top slice, the vertex ~5 mm above it
    res = body_stack(vz - 5, z_of("skull_base") - 15, spacing=3.0, sigma=4.0, outliers=0.0, bias=30.0,
                     series="1.2.3.61", body_part="HEAD", slice_thickness=3.0)
    _head_measures(res, vz, holder_mm2=0.0)
    st, _ = run(res)
    assert st.coverage["start_source"] == "skull cap (top slice)"
    assert abs(st.coverage["start_z"] - vz) <= 1.0 and by_check(st, "coverage.top") is None
    # 25 mm below the vertex: the top slice cuts the skull (≥ 6,000 mm²): vertex missed
    res = body_stack(vz - 25, z_of("skull_base") - 15, spacing=3.0, sigma=4.0, outliers=0.0, bias=30.0,
                     series="1.2.3.62", body_part="HEAD", slice_thickness=3.0)
    _head_measures(res, vz)
    st, _ = run(res)
    f = by_check(st, "coverage.top")
    assert f is not None and "Vertex not covered" in f.message


def test_the_skulls_vertex_anchors_the_fit_even_when_the_network_is_close():
    """The vertex from the skull lies 0-4 mm from the truth, the network's fitted offset often 10-15 mm:
    with the vertex in the scan the fit is always re-anchored on it (other single anchors, lungs or crest,
    only past 15 mm). A network 12 mm high left the skull base 12 mm low, and a scan ending 5 mm below the
    skull base read 'not covered' on the evaluation series."""
    vz = z_of("vertex")
    res = body_stack(vz + 15, z_of("skull_base") - 5, spacing=3.0, sigma=2.0, outliers=0.0, bias=-8.0,
                     series="1.2.3.63", body_part="HEAD", slice_thickness=3.0)
    _head_measures(res, vz)
    st, _ = run(res)
    assert st.coverage["start_source"] == "skull (top of the head in the scan)"
    delta = st.coverage["fit"].get("anchored_on_anatomy")
    assert delta is not None and 0 < delta <= 15.0  # under the 15 mm that other single anchors need
    # what is left is the head-size effect (a short stack is read at size factor 1, this patient is 1.1)
    assert abs(st.coverage["end_z"] - z_of("skull_base")) <= 12.0
    assert by_check(st, "coverage.bottom") is None


def test_head_scan_from_above_the_vertex_waits_for_the_skull():
    """Scanning down from 33 mm above the head: the first slices hold only air and the head holder, and a
    network reading 60 mm low would put the vertex above the scan. The early top check waits for skull."""
    vz = z_of("vertex")
    res = body_stack(vz + 33, z_of("skull_base") - 15, spacing=3.0, sigma=2.0, outliers=0.0, bias=60.0,
                     series="1.2.3.63", body_part="HEAD", slice_thickness=3.0)
    _head_measures(res, vz)
    st, streamed = run(res)
    assert not [f for f in streamed if f.check == "coverage.top"]
    assert by_check(st, "coverage.top") is None and abs(st.coverage["start_z"] - vz) <= 3.0


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, -1, 0), (-1, 0, 0, 0, 1, 0), (-1, 0, 0, 0, -1, 0)])
def test_flipped_axes_keep_the_top_of_the_scan_at_the_top(orientation):
    """Rows stored posterior→anterior or columns left→right turn the slice normal (row × column) towards the
    feet; z is taken along the normal towards the head, so the top of the scan stays the top: the same
    coverage as the usual layout, and no 'anatomy against the coordinates'."""
    ref = body_stack(z_of("lung_apex") - 30, z_of("lung_base") - 20, series="1.2.3.80")
    st0, _ = run(ref)
    res = body_stack(z_of("lung_apex") - 30, z_of("lung_base") - 20, series="1.2.3.81", orientation=orientation,
                     patient_position="HFP" if orientation[4] < 0 else "FFS")
    assert res[0].info.z == pytest.approx(z_of("lung_apex") - 30)
    st, _ = run(res)
    assert by_check(st, "geometry.orientation") is None
    assert st.coverage["start_z"] == pytest.approx(st0.coverage["start_z"])
    assert by_check(st, "coverage.top").details["missing_mm"] == by_check(st0, "coverage.top").details["missing_mm"]


def test_iliac_crest_pattern_in_a_head_is_not_used():
    """Bone leaving and returning to the lateral thirds also happens in a skull; where a coherent network
    fit sees a head (> 200 reference mm from the crest), that 'crest' re-anchors nothing (it moved a clean
    synthetic head's fit by 678 mm and raised coverage.top 650 mm)."""
    top, bottom = z_of("vertex") + 8, z_of("skull_base") - 15
    res = body_stack(top, bottom, spacing=3.0, sigma=4.0, outliers=0.0, series="1.2.3.58", body_part="HEAD")
    n = len(res)
    for i, r in enumerate(res):  # top → bottom: lateral bone, a gap of 4 slices, bone again
        r.measures["lateral_bone_mm2"] = 100.0 if n // 3 <= i < n // 3 + 4 else 900.0
    st, _ = run(res)
    assert "iliac_crest_z" not in st.coverage and "iliac_crest_rejected" in st.coverage
    assert "anchored_on_anatomy" not in st.coverage["fit"]
    assert not [f for f in st.findings.values() if f.check.startswith("coverage") and not f.details.get("resolved")]


def test_neck_scan_ending_in_the_entering_lungs_covers_the_apices():
    """A neck scan ends 13 mm below the apices: lung enters its last slices (too little to count as lungs
    seen), while the network reads those slices 40 mm too high up the body. The entering lung is the apex."""
    top, bottom = z_of("skull_base") + 15, z_of("lung_apex") - 13
    res = body_stack(top, bottom, spacing=3.0, sigma=4.0, outliers=0.0, bias=-40.0, series="1.2.3.59",
                     body_part="NECK")
    apex = z_of("lung_apex")
    for r in res:
        below = apex - r.info.position[2]
        r.measures["lung_area_mm2"] = 0.0 if below < 0 else 400.0 * below  # grows downwards, < 6,000 mm²
    st, _ = run(res)
    assert st.protocol_rule == "neck"
    assert st.coverage["end_source"].startswith("lungs (apices entering")
    assert abs(st.coverage["end_z"] - apex) <= 6
    assert by_check(st, "coverage.bottom") is None
    # a neck scan reaching well into the chest (lungs seen whole-section): the top of the lungs is the apex
    for r in res:
        below = apex - r.info.position[2]
        r.measures["lung_area_mm2"] = 0.0 if below < 0 else 9000.0
    st, _ = run([SliceResult(info=r.info, scores={}, position_ref_mm=r.position_ref_mm, measures=r.measures) for r in res])
    assert st.coverage["end_source"] == "lungs" and abs(st.coverage["end_z"] - apex) <= 6
    assert by_check(st, "coverage.bottom") is None
    # without the entering lung the network (40 mm off) decides, and calls the apices missed
    for r in res:
        r.measures["lung_area_mm2"] = 0.0
    st, _ = run([SliceResult(info=r.info, scores={}, position_ref_mm=r.position_ref_mm, measures=r.measures) for r in res])
    assert by_check(st, "coverage.bottom") is not None


def test_scattered_network_positions_decide_nothing():
    """Positions that do not follow the body (a phantom, a broken model) raise no coverage finding."""
    res = body_stack(z_of("lung_apex") - 60, z_of("lung_base") + 60, sigma=250.0, outliers=0.0, series="1.2.3.55")
    st, _ = run(res)
    assert st.coverage["fit"]["unreliable"] is True
    assert not [f for f in st.findings.values() if f.check.startswith("coverage") or f.check == "geometry.orientation"]


def _lung_kernel_stack(series: str, n: int, coarse: range, texture: float, ratio_kernel: float, rest_texture: float = 1.9):
    """A lung-kernel chest whose slices in ``coarse`` read that noise texture and kernel-level ratio, over the
    body level once the grain took the kernel's allowance away (2 × the kernel-level ratio: texture under 1.4),
    the others the kernel's own grain at 0.3 of its level; scores fused as the pipeline fuses them."""
    from medqc.analysis import fusion

    res = stack(n=n, series=series)
    for i, r in enumerate(res):
        r.info = dataclasses.replace(r.info, convolution_kernel="LUNG")
        inside = i in coarse
        r.measures = {"noise_texture": texture if inside else rest_texture,
                      "noise_ratio_kernel": ratio_kernel if inside else 0.3,
                      "noise_ratio": 2 * ratio_kernel if inside else 0.3}
        r.scores = fusion.fuse({"noise": 0.05}, r.measures)
    return res


def _streamed(events, check):
    return [e for e in events if e.check == check]


def test_a_lung_kernels_coarse_noise_is_judged_on_the_complete_series():
    """Noise over the threshold only because its grain is coarse (within the lung kernel's whole allowance):
    a run of it in a series whose own grain is the kernel's is that kernel's normal (its shoulders): no
    finding, and its slices are scored as with the kernel's allowance, the network's share kept. Where the
    whole series' grain is coarse it is noise, raised when the series is complete, not while its first slices
    (often those shoulders) arrive. A series of fewer than ten slices cannot show its grain: no finding, its
    scores as they were. Noise over the kernel's own level is raised as it arrives."""
    from medqc.analysis import fusion

    res = _lung_kernel_stack("1.2.3.90", 30, range(0, 8), 1.1, 0.8)
    assert all(r.scores["noise"] >= 0.5 for r in res[:8])
    st, streamed = run(res)
    assert by_check(st, "artifact.noise") is None and not _streamed(streamed, "artifact.noise")
    kept = fusion.fuse({"noise": 0.05}, {**res[0].measures, "noise_ratio": 0.8})["noise"]
    assert kept < 0.5
    assert all(r.scores["noise"] == pytest.approx(kept, abs=1e-4) and r.measures["noise_kernel_normal"] == 1.0
               for r in res[:8])
    st, streamed = run(_lung_kernel_stack("1.2.3.91", 30, range(0, 30), 1.2, 0.8))
    assert by_check(st, "artifact.noise") is not None and not _streamed(streamed, "artifact.noise")
    assert all(r.scores["noise"] >= 0.5 for r in st.results)
    st, _ = run(_lung_kernel_stack("1.2.3.92", 6, range(0, 6), 1.2, 0.8))
    assert by_check(st, "artifact.noise") is None and all(r.scores["noise"] >= 0.5 for r in st.results)
    st, streamed = run(_lung_kernel_stack("1.2.3.93", 30, range(0, 8), 1.1, 1.1))
    assert by_check(st, "artifact.noise") is not None and _streamed(streamed, "artifact.noise")


def test_a_noise_score_with_another_ratio_keeps_the_networks_share():
    """``fusion.noise_score_with`` replaces the classical part of a fused noise score and keeps the network's:
    the same as fusing the network's probability with the other ratio, also where metal halves the evidence."""
    from medqc.analysis import fusion

    for m in ({"noise_ratio": 1.4}, {"noise_ratio": 1.4, "metal_area_mm2": 400.0}, {"noise_ratio": 0.6}):
        for net in (0.0, 0.3, 0.9):
            score = fusion.fuse({"noise": net}, m)["noise"]
            want = fusion.fuse({"noise": net}, {**m, "noise_ratio": 0.7})["noise"]
            assert fusion.noise_score_with(score, m, 0.7) == pytest.approx(want, abs=1e-9)
    assert fusion.noise_score_with(0.42, {}, 0.7) == 0.42  # no noise measured: nothing to replace
