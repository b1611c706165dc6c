"""Coverage on real anatomy: cases cut from real CT (``medqc.synth.realcases``) through ``medqc analyze``.

The head cases are resampled from the real head CT that Debian's ``invesalius-examples`` installs (.ci/run
installs it; under MEDQC_REQUIRE_PEERS=1 its absence fails). The chest cases are sub-ranges of the real
Philips patient chest in the real-CT folder (``$MEDQC_REAL_CT``, or ``../shared/real-ct`` beside the
checkout); without that folder they are skipped, and fail instead under MEDQC_REQUIRE_REAL_CT=1 or with
MEDQC_REAL_CT set (``conftest.missing_real_ct``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from medqc.synth import realcases

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("MEDQC_REAL_CT", ROOT.parent / "shared" / "real-ct"))
CHEST = REAL / "philips-bigbore-chest-patient"


def analyze(folder: Path) -> dict:
    from conftest import analyze_json

    rep = analyze_json(folder)
    assert len(rep["series"]) == 1
    return rep["series"][0]


def coverage(series: dict) -> dict:
    """{check: finding} of the live coverage findings (not overscan, not withdrawn)."""
    return {f["check"]: f for f in series["findings"] if f["check"].startswith("coverage.")
            and f["check"] != "coverage.overscan" and not (f.get("details") or {}).get("resolved")}


@pytest.fixture(scope="module")
def chest():
    if not CHEST.is_dir():
        from conftest import missing_real_ct

        missing_real_ct(f"real chest not found at {CHEST} (set MEDQC_REAL_CT)")
    return realcases.read_series(CHEST)


@pytest.mark.parametrize("tilt", [0.0, 18.5, -18.5])
def test_complete_head_passes_coverage_with_and_without_tilt(cranium, tmp_path, tilt):
    sp = realcases.CRANIUM_SPACING
    zr = None if tilt == 0 else (20.0, 175.0)  # tilted planes stay inside the volume's lower end
    s = analyze(realcases.volume_series(cranium, sp, tmp_path, "head", "HEAD ROUTINE", tilt_deg=tilt, step_mm=3.0, z_range=zr))
    assert coverage(s) == {}, coverage(s)
    assert s["coverage"]["start_source"].startswith("skull")
    assert not [f for f in s["findings"] if f["severity"] == "critical"]


@pytest.mark.parametrize("tilt", [0.0, 18.5])
def test_head_cut_through_the_skull_is_critical_from_the_skull(cranium, tmp_path, tilt):
    sp = realcases.CRANIUM_SPACING
    zr = (0.0, 125.0) if tilt == 0 else (20.0, 120.0)  # the vertex lies at about 160 mm
    s = analyze(realcases.volume_series(cranium, sp, tmp_path, "head-cut", "HEAD ROUTINE", tilt_deg=tilt, step_mm=3.0, z_range=zr))
    cov = coverage(s)
    assert set(cov) == {"coverage.top"}
    assert cov["coverage.top"]["severity"] == "critical" and "skull" in cov["coverage.top"]["message"]


def test_chest_complete_head_first_and_feet_first(chest, tmp_path):
    for ff in (False, True):
        s = analyze(realcases.write_case(chest, tmp_path, f"chest-{ff}", "CHEST ROUTINE", feet_first=ff))
        assert coverage(s) == {}
        assert s["coverage"]["start_source"] == "lungs" and s["coverage"]["end_source"] == "lungs"


def test_chest_cut_at_either_end_is_critical_from_the_lungs(chest, tmp_path):
    z = lambda d: float(d.ImagePositionPatient[2])  # noqa: E731
    top = analyze(realcases.write_case([d for d in chest if z(d) < 20], tmp_path, "cut-top", "CHEST ROUTINE"))
    bottom = analyze(realcases.write_case([d for d in chest if z(d) > -90], tmp_path, "cut-bottom", "CHEST ROUTINE"))
    assert set(coverage(top)) == {"coverage.top"} and coverage(top)["coverage.top"]["severity"] == "critical"
    assert set(coverage(bottom)) == {"coverage.bottom"} and coverage(bottom)["coverage.bottom"]["severity"] == "critical"
    assert top["verdict"] == bottom["verdict"] == "fail"


def test_chest_without_lungs_fails(chest, tmp_path):
    """25 real slices above the lung apices sent as a routine chest: no lung anywhere, not a pass."""
    s = analyze(realcases.write_case([d for d in chest if float(d.ImagePositionPatient[2]) > 78], tmp_path, "no-lung", "CHEST ROUTINE"))
    cov = coverage(s)
    assert set(cov) == {"coverage.absent"} and cov["coverage.absent"]["severity"] == "critical"
    assert s["verdict"] == "fail"


def test_shoulders_the_network_takes_for_hips_place_no_landmark(chest, tmp_path):
    """The real chest's 19 slices above the lung apices (a large patient's shoulders and lower neck) sent as a
    neck: the network's body scale reads the shoulder joints as hips and put the scan 400 mm below the lung
    apices, which raised a 400 mm overscan and a skull base "533 mm" above. Nothing in the slices confirms a
    placement that far from the protocol's range: coverage says it was not judged, and why."""
    s = analyze(realcases.write_case([d for d in chest if float(d.ImagePositionPatient[2]) > 78], tmp_path, "neck", "NECK SOFT TISSUE"))
    assert [f["check"] for f in s["findings"] if f["check"].startswith("coverage.")] == []
    assert "mm from the protocol's range" in s["not_judged"]["coverage"], s["not_judged"]
    assert s["coverage"]["fit"]["implausible_gap_mm"] > 150


def test_the_whole_chest_under_other_protocols(chest, tmp_path):
    """The complete real chest sent as a chest-abdomen-pelvis and as a head. The shoulders above the lungs
    (clavicles and manubrium in front, the shoulder joints beside) once read as the pubic bones: "254 mm below
    the pubic symphysis", an overscan where the pelvis was missing. Now the symphysis is sought below the lungs
    only, and placed from the lungs seen whole (apices to bases: their distance is the body's scale), far
    below the scan. As a head, the shoulder bone once read as a skull cap ("vertex 80 mm above", critical):
    no head-sized section holds a skull and the slices show lungs, so the head is absent."""
    cap = analyze(realcases.write_case(chest, tmp_path, "cap", "CHEST ABD PELVIS"))
    cov = coverage(cap)
    assert set(cov) == {"coverage.bottom"}, cov
    assert cov["coverage.bottom"]["details"]["missing_mm"] > 250
    assert "lung bases seen in the slices" in cov["coverage.bottom"]["message"]
    head = analyze(realcases.write_case(chest, tmp_path, "head", "HEAD ROUTINE"))
    assert set(coverage(head)) == {"coverage.absent"}
    assert "the slices show the chest" in coverage(head)["coverage.absent"]["message"]


def test_too_few_slices_say_coverage_was_not_judged(chest, tmp_path):
    s = analyze(realcases.write_case(chest[60:62], tmp_path, "two", "CHEST ROUTINE"))
    assert coverage(s) == {} and "not judged" in s["coverage_note"]
    # every check that could not judge says why: coverage, motion against the series' own level, a ring run
    assert {"coverage", "artifact.motion", "artifact.ring", "centering.offset"} <= set(s["not_judged"])
    assert "2 analysed slices" in s["not_judged"]["coverage"]
    whole = analyze(realcases.write_case(chest, tmp_path, "whole", "CHEST ROUTINE"))
    assert not set(whole.get("not_judged", {})) & {"coverage", "artifact.motion", "artifact.ring", "noise.index"}


@pytest.mark.parametrize("tilt", [18.5, -18.5])
def test_tilted_head_whose_top_slice_is_on_the_skull_cap_is_covered(cranium, tmp_path, tilt):
    """5 mm slices at a gantry tilt of 18.5°, the top one through the skull cap 3-5 mm below the vertex: a tilted
    plane cuts a long cap section (8,200 mm² here against 2,300 axially), which is not a cut through the skull."""
    sp = realcases.CRANIUM_SPACING
    s = analyze(realcases.volume_series(cranium, sp, tmp_path, "head-cap", "HEAD ROUTINE", tilt_deg=tilt, step_mm=5.0,
                                        thickness_mm=5.0, z_range=(22.0, 157.0)))
    assert coverage(s) == {}, coverage(s)
    assert s["coverage"]["start_source"].startswith("skull")


def test_liver_dome_from_the_lungs(chest, tmp_path):
    """An abdomen rule starts at the liver dome: the lung section shrinking over it places it (a scan from the
    mid chest covers it); a scan starting in the bases' recesses is short of it (warning); one with no lung at
    all starts below the bases (critical)."""
    z = lambda d: float(d.ImagePositionPatient[2])  # noqa: E731
    from_chest = analyze(realcases.write_case([d for d in chest if z(d) < -60], tmp_path, "a1", "ABDOMEN"))
    assert "coverage.top" not in coverage(from_chest) and from_chest["coverage"]["start_source"].startswith("lungs")
    bases = analyze(realcases.write_case([d for d in chest if z(d) < -140], tmp_path, "a2", "ABDOMEN"))
    assert coverage(bases)["coverage.top"]["severity"] == "warning" and "lung bases" in coverage(bases)["coverage.top"]["message"]
    below = analyze(realcases.write_case([d for d in chest if z(d) < -158], tmp_path, "a3", "ABDOMEN"))
    assert coverage(below)["coverage.top"]["severity"] == "critical"


def test_overscan_above_the_liver_dome_allows_for_where_the_lungs_place_it(chest, tmp_path):
    """The lungs place the dome where their section has shrunk by a fifth: on this chest 16 mm below the first
    slice showing the liver (z ≈ -100 mm), on the synthetic abdomens 31-38 mm below the true dome. An abdomen
    starting 40 mm above the first slice with liver is no overscan; one starting in the upper chest is, by at
    least the distance beyond that allowance."""
    from medqc.agent.checks.coverage import DOME_LOW_BY_MM

    z = lambda d: float(d.ImagePositionPatient[2])  # noqa: E731
    near = analyze(realcases.write_case([d for d in chest if z(d) < -60], tmp_path, "near", "ABDOMEN"))
    assert not [f for f in near["findings"] if f["check"] == "coverage.overscan"], near["findings"]
    high = analyze(realcases.write_case([d for d in chest if z(d) < 10], tmp_path, "high", "ABDOMEN"))
    (f,) = [f for f in high["findings"] if f["check"] == "coverage.overscan"]
    dome = high["coverage"]["start_z"]
    assert -125.0 < dome < -105.0, high["coverage"]
    top = high["coverage"]["scan_top_z"]
    assert f["details"]["extra_mm"]["top"] == pytest.approx(top - dome - DOME_LOW_BY_MM, abs=0.2), f
    assert "at least" in f["message"] and "above the liver dome" in f["message"], f["message"]


def test_a_tight_displayed_field_moves_no_landmark_and_raises_nothing(chest, tmp_path):
    """The real chest shown in a 260 mm field: the field cuts the lungs open to its edge and leaves no air round
    the patient but the gap over the couch. The lungs are still found where the uncut series has them, and
    neither motion (dark 'streaks' in the couch gap: 129 of 141 slices flagged before) nor noise (read on the
    mediastinum's edges where the field hides the trunk's centre) is raised."""
    whole = analyze(realcases.write_case(chest, tmp_path, "whole", "CHEST ROUTINE"))
    tight = analyze(realcases.tight_field_case(chest, tmp_path, "fov260", "CHEST ROUTINE", 260.0))
    for key in ("start_z", "end_z"):
        assert abs(tight["coverage"][key] - whole["coverage"][key]) <= 4.0, (key, tight["coverage"], whole["coverage"])
    assert tight["coverage"]["start_source"] == "lungs" and tight["coverage"]["end_source"] == "lungs"
    assert [f["check"] for f in tight["findings"] if f["severity"] != "info"] == []


def test_a_head_in_a_tight_field_keeps_the_brains_noise_scale(cranium, tmp_path):
    """The real head shown in a 171 mm field (0.7 × its own): the field cuts the scalp on much of the rim, but
    where the skin is in the picture the skull lies under it all round, so the vault's slices are still judged
    on the brain's noise scale (13 HU at 2 mm, not the body's 36), as in the whole field."""
    import pydicom

    from medqc.agent.decode import decode_file
    from medqc.analysis.measures import measure
    from medqc.analysis.noise import NOISE_2MM_HU, NOISE_REF_THICKNESS_MM

    whole = realcases.volume_series(cranium, realcases.CRANIUM_SPACING, tmp_path, "head", "HEAD ROUTINE",
                                    original=True)
    files = sorted(whole.glob("*.dcm"))
    tight = realcases.tight_field_case([pydicom.dcmread(str(f)) for f in files], tmp_path, "fov171",
                                       "HEAD ROUTINE", 171.0)
    for f in sorted(tight.glob("*.dcm"))[50:100:10]:  # the vault, above the orbits
        (d,) = decode_file(f)
        m = measure(d.pixels(), d.info)
        assert m["display_touch"] > 0.3, m["display_touch"]  # the field cuts the head
        thin = min(1.0, (d.info.slice_thickness / NOISE_REF_THICKNESS_MM) ** 0.5)
        assert m["noise_ratio"] == pytest.approx(m["noise_sd_2mm"] * thin / NOISE_2MM_HU["head"], rel=1e-6), f.name
