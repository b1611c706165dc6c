"""Classical detectors and classical coverage on physics-simulated slices (projection → noise/metal/
truncation → FBP → vendor display grid) from ``medqc.synth``: anatomy the detectors never saw in tuning."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_module  # noqa: E402

synth = need_module("medqc.synth.training", "medqc.synth needs its optional dependencies")

from medqc.analysis import fusion, measures, noise
from medqc.agent.records import SliceInfo, SliceResult  # noqa: E402
from medqc.agent.series import SeriesTracker  # noqa: E402
from medqc.analysis.anatomy import LANDMARKS  # noqa: E402
from medqc.config import load_config  # noqa: E402
from medqc.synth.phantom import add_implant, random_patient  # noqa: E402


@pytest.fixture(scope="module")
def patient():
    return random_patient(np.random.default_rng(3), contrast=False, arms="up")


def sim(p, r, seed=1, **kw):
    spec = synth.SliceSpec(r=r, **kw)
    hu, phys = synth.simulate_slice(p, spec, np.random.default_rng(seed))
    ps = spec.fov_mm / spec.matrix
    info = SliceInfo("1", "2", "3", "4", rows=spec.matrix, cols=spec.matrix, pixel_spacing=(ps, ps),
                     data_collection_diameter=spec.sfov_mm)
    return measures.measure(hu, info), phys


def test_lungs_skull_and_clean_body(patient):
    chest, _ = sim(patient, 380, fov_mm=400)
    neck, _ = sim(patient, 200, fov_mm=400)
    pelvis, _ = sim(patient, 700, fov_mm=450)
    head, _ = sim(patient, 40, fov_mm=240)
    assert chest["lung_area_mm2"] > 10000
    assert neck["lung_area_mm2"] < 1500 and pelvis["lung_area_mm2"] < 1500
    assert head["skull_ring"] >= 0.9 and head["lung_area_mm2"] < 1500
    for m in (chest, neck, pelvis, head):
        p = fusion.fuse({"metal": 0.0, "truncation": 0.0, "noise": 0.0}, m)
        assert p["metal"] < 0.5 and p["truncation"] < 0.5 and p["noise"] < 0.5, m


@pytest.mark.parametrize("r, scale", [(20.0, "head"), (60.0, "head"), (100.0, "head"), (165.0, "body"), (200.0, "body")])
def test_brain_scale_inside_the_skull_body_scale_in_the_neck(patient, r, scale):
    """The noise level follows the section: the brain's inside the skull (near the vertex too), the body's in
    the upper neck, where the mandible and the spine surround the centre but enclose no brain."""
    m, _ = sim(patient, r, fov_mm=240, noise_sigma=4.0)
    assert m["noise_ratio"] == pytest.approx(m["noise_sd_2mm"] / noise.NOISE_2MM_HU[scale], rel=1e-6)


def test_metal_truncation_and_noise_evidence():
    p = random_patient(np.random.default_rng(11), contrast=False, arms="up")
    add_implant(p, np.random.default_rng(5), 820.0, 0.9)  # hip prosthesis level
    m, phys = sim(p, 820.0, fov_mm=450)
    assert phys["metal_area_mm2"] > 0
    assert m["metal_area_mm2"] > 40 and fusion.fuse({"metal": 0.0}, m)["metal"] >= 0.9
    # the body is wider than a 260 mm scan field: the rim of the scan field (DataCollectionDiameter) is hit
    p2 = random_patient(np.random.default_rng(12), contrast=False, arms="up")
    t, phys = sim(p2, 600.0, fov_mm=500, sfov_mm=260.0)
    assert phys["truncation_fraction"] > 0.1
    assert fusion.fuse({"truncation": 0.0}, t)["truncation"] >= 0.5
    lo, _ = sim(p2, 600.0, fov_mm=400, noise_sigma=6.0)
    hi, _ = sim(p2, 600.0, fov_mm=400, noise_sigma=30.0)
    assert hi["noise_sd"] > 1.5 * lo["noise_sd"]


@pytest.mark.parametrize("kind", ["shift", "oscillate"])
def test_patient_motion_darkens_the_air_around_the_body(kind):
    """Motion simulated in the projections (a pose per view, then FBP): the free air around the body
    streaks; the same slice without motion leaves it flat."""
    from medqc.analysis import airstreaks

    p = random_patient(np.random.default_rng(12), contrast=False, arms="up")
    clean, _ = sim(p, 600.0, fov_mm=450)
    moved, _ = sim(p, 600.0, fov_mm=450, motion_mm=8.0, motion_kind=kind)
    assert clean["air_dark_hu"] < airstreaks.EVIDENCE_HU[0]
    assert airstreaks.evidence(moved["air_dark_hu"]) > 0.6
    assert fusion.fuse({"motion": 0.6}, moved)["motion"] > fusion.fuse({"motion": 0.6}, clean)["motion"] + 0.3


def test_metal_streaks_in_the_air_are_not_motion():
    """Dense metal at the level of the teeth (physics-simulated, FBP): its dark streaks and the shading
    beside it reach the air around the head, and the air measure read them as motion (3.2 HU, half the
    evidence). Streaks pointing at a metal object, and darkness within 60 mm of one, are the metal's: the
    clean slice reads as clean air; the same slice moved 8 mm still reads streaked."""
    from medqc.analysis import airstreaks

    p = random_patient(np.random.default_rng(13), contrast=False, arms="up")
    add_implant(p, np.random.default_rng(5), 60.0, 0.9)
    clean, _ = sim(p, 60.0, fov_mm=450)
    moved, _ = sim(p, 60.0, fov_mm=450, motion_mm=8.0, motion_kind="oscillate")
    assert clean["metal_area_mm2"] > 100
    assert clean["air_dark_hu"] < airstreaks.EVIDENCE_HU[0], clean["air_dark_hu"]
    assert moved["air_dark_hu"] > clean["air_dark_hu"] + 2.0, moved["air_dark_hu"]


def test_motion_streaks_clipped_at_the_storage_floor_still_count():
    """Thighs moved 9 mm (oscillating) and stored with a floor at -1024 HU, as most vendors store CT: the
    darkest streaks sit on the floor, and they were most of the near-air pixels in the band, so the air's
    level was taken on the floor itself and the measure read 1.2 HU. The floor is no air level: leaving it
    out, the streaks read 7.9 HU (full evidence); the same slice without motion stays clean."""
    from medqc.analysis import airstreaks

    p = random_patient(np.random.default_rng(12), contrast=False, arms="up")
    clean, _ = sim(p, 1000.0, fov_mm=350)
    moved, _ = sim(p, 1000.0, fov_mm=350, motion_mm=9.0, motion_kind="oscillate")
    assert clean["air_dark_hu"] < airstreaks.EVIDENCE_HU[0]
    assert airstreaks.evidence(moved["air_dark_hu"]) > 0.9, moved["air_dark_hu"]
    assert fusion.fuse({"motion": 0.3}, moved)["motion"] >= fusion.MOTION_THRESHOLD


def test_chest_series_lungs_give_apex_and_base(patient):
    """A chest series with no network positions at all: the classical lung extent alone decides coverage."""
    s = patient.scale
    z_vertex = 1500.0
    # reference positions 200..540 mm (apex 255, base 490) at 20 mm steps, as patient z
    refs = np.arange(200.0, 541.0, 20.0)
    tr = SeriesTracker(load_config(), {})
    for i, r in enumerate(refs):
        m, _ = sim(patient, float(r), seed=i, fov_mm=400, matrix=256)
        z = z_vertex - r * s
        info = SliceInfo(f"9.{i}", "9", "8", "1.2.840.10008.5.1.4.1.1.2", instance_number=i + 1, position=(-200.0, -200.0, z),
                         orientation=(1, 0, 0, 0, 1, 0), body_part="CHEST", pixel_spacing=(400 / 256,) * 2, ctdivol=6.0)
        tr.add(SliceResult(info=info, measures=m))
    st, _ = tr.complete("9", "idle")
    assert st.coverage["start_source"] == "lungs" and st.coverage["end_source"] == "lungs"
    apex_z = z_vertex - LANDMARKS["lung_apex"] * s
    base_z = z_vertex - LANDMARKS["lung_base"] * s
    assert st.coverage["start_z"] == pytest.approx(apex_z, abs=25 * s)  # within one 20 mm step
    assert st.coverage["end_z"] == pytest.approx(base_z, abs=25 * s + 30)  # posterior recesses reach lower
    assert not [f for f in st.findings.values() if f.check in ("coverage.top", "coverage.bottom")]


@pytest.mark.parametrize("r_top,cut", [(30.0, True), (-10.0, False)])
def test_head_series_vertex_from_the_skull(patient, r_top, cut):
    """Head protocol, no network positions: a top slice through the skull proves the vertex was missed;
    a top slice above the head proves nothing is missing (and raises nothing)."""
    s = patient.scale
    tr = SeriesTracker(load_config(), {})
    for i, r in enumerate(np.arange(r_top, r_top + 121.0, 30.0)):
        m, _ = sim(patient, float(r), seed=i, fov_mm=240, matrix=256)
        info = SliceInfo(f"7.{i}", "7", "8", "1.2.840.10008.5.1.4.1.1.2", instance_number=i + 1,
                         position=(-120.0, -120.0, 1500.0 - r * s), orientation=(1, 0, 0, 0, 1, 0), body_part="HEAD",
                         pixel_spacing=(240 / 256,) * 2)
        tr.add(SliceResult(info=info, measures=m))
    st, _ = tr.complete("7", "idle")
    top = [f for f in st.findings.values() if f.check == "coverage.top"]
    if cut:
        assert top and top[0].severity == "critical" and "skull" in top[0].message
    else:
        assert not top


def test_abdomen_series_iliac_crest_from_the_iliac_wings(patient):
    """Abdomen protocol (liver dome → iliac crests), no network positions: the iliac wings place the
    crest; the scan runs ~95 mm further down, which is reported as overscan."""
    s = patient.scale
    tr = SeriesTracker(load_config(), {})
    for i, r in enumerate(np.arange(520.0, 761.0, 20.0)):
        m, _ = sim(patient, float(r), seed=i, fov_mm=450, matrix=256)
        info = SliceInfo(f"6.{i}", "6", "8", "1.2.840.10008.5.1.4.1.1.2", instance_number=i + 1,
                         position=(-225.0, -225.0, 1500.0 - r * s), orientation=(1, 0, 0, 0, 1, 0),
                         body_part="ABDOMEN", pixel_spacing=(450 / 256,) * 2, ctdivol=10.0)
        tr.add(SliceResult(info=info, measures=m))
    st, _ = tr.complete("6", "idle")
    assert st.coverage["end_source"] == "iliac wings"
    assert st.coverage["end_z"] == pytest.approx(1500.0 - LANDMARKS["iliac_crest"] * s, abs=25 * s)
    over = [f for f in st.findings.values() if f.check == "coverage.overscan"]
    assert over and over[0].details["extra_mm"]["bottom"] == pytest.approx((760 - LANDMARKS["iliac_crest"]) * s, abs=25 * s)
    assert not [f for f in st.findings.values() if f.check == "coverage.bottom"]
