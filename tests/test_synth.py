"""medqc synth: anatomy, physics of each artifact, DICOM validity, determinism, bad input."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medqc import ARTIFACTS
from medqc.analysis.anatomy import LANDMARKS, ordered_landmarks
from medqc.cli import main as medqc_main
from medqc.synth.phantom import Implant, random_patient, rasterize
from medqc.synth.study import ArtifactSpec, StudyOptions, write_study
from medqc.synth.training import SliceSpec, noise_severity, sample_training_slices, simulate_slice
from medqc.dcmtk import dcmtk  # noqa: E402
from conftest import missing_peer  # noqa: E402

DEFINED_BODY_PARTS = {"HEAD", "NECK", "CHEST", "ABDOMEN", "PELVIS", "ABDOMENPELVIS", "CHESTABDPELVIS"}


def _need(tool: str) -> str:
    path = dcmtk(tool)
    if not path:
        missing_peer(f"{tool} is not installed (.ci/run installs it)")
    return path


def _hu(ds) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _series(folder: Path) -> list:
    return [pydicom.dcmread(str(f)) for f in sorted(folder.glob("IM*.dcm"))]


def _grid(n=200, extent=500.0):
    c = (np.arange(n) - (n - 1) / 2) * (extent / n)
    return np.meshgrid(c, c)


def _pair(r, change, *, seed=3, matrix=192, **kw):
    """Simulate one slice twice with the same noise draw: as is, and with ``change`` applied."""
    p = random_patient(np.random.default_rng(seed), arms="up")
    base = SliceSpec(r=r, matrix=matrix, fov_mm=kw.pop("fov", 420.0), sim_n=256, n_views=256, noise_sigma=kw.pop("sigma", 4.0),
                     padding=-1024.0, **kw)
    a, pa = simulate_slice(p, base, np.random.default_rng(11))
    p2, s2 = copy.deepcopy(p), copy.deepcopy(base)
    change(p2, s2)
    b, pb = simulate_slice(p2, s2, np.random.default_rng(11))
    return p, a, pa, b, pb


# ------------------------------------------------------------------------------------------ anatomy
def test_phantom_anatomy_tissues_and_landmark_order():
    names = [k for k, _ in ordered_landmarks()]
    assert names[0] == "vertex" and names[-1] == "mid_thigh"
    X, Y = _grid()
    for seed in range(3):
        p = random_patient(np.random.default_rng(seed))
        # lungs: aerated between apex and base, none in the upper abdomen below the bases
        def lung(r):
            cv = rasterize(p, r, X, Y)
            return int(((cv.hu < -700) & (cv.hu > -950) & ~cv.table).sum())

        assert lung(LANDMARKS["carina"]) > 200
        assert lung(LANDMARKS["lung_base"] + 40) == 0
        assert lung(LANDMARKS["skull_base"]) == 0
        head = rasterize(p, 60.0, X, Y).hu
        assert ((head > 20) & (head < 45)).sum() > 300, "brain"
        assert (head > 900).sum() > 50, "skull"
        pelvis = rasterize(p, LANDMARKS["femoral_head"], X, Y).hu
        assert (pelvis > 900).sum() > 40, "femoral heads / pelvic bone"
        abdomen = rasterize(p, LANDMARKS["renal_hilum"], X, Y).hu
        assert ((abdomen > -130) & (abdomen < -70)).sum() > 200, "fat"
        assert ((abdomen > 25) & (abdomen < 260)).sum() > 500, "soft tissue / organs"


def test_reconstructed_hu_match_tissues():
    """After projection + FBP the tissues read at their CT numbers (air, fat, muscle, lung, bone)."""
    p = random_patient(np.random.default_rng(4), contrast=False)
    r = LANDMARKS["carina"] + 40
    spec = SliceSpec(r=r, matrix=256, fov_mm=450.0, sim_n=256, n_views=256, noise_sigma=3.0, padding=-3024.0)
    img, phys = simulate_slice(p, spec, np.random.default_rng(0))
    dpx = spec.fov_mm / spec.matrix
    c = (np.arange(256) - 127.5) * dpx
    X, Y = np.meshgrid(c, c)
    from scipy.ndimage import binary_erosion

    truth = rasterize(p, r, X, Y).hu

    def med(lo, hi, it=2):
        m = binary_erosion((truth >= lo) & (truth <= hi), iterations=it)
        assert m.sum() > 30, (lo, hi)
        return float(np.median(img[m]))

    assert abs(med(-1000, -990, it=3) - (-1000)) < 25  # air around the patient
    assert abs(med(-130, -60) - np.median(truth[(truth >= -130) & (truth <= -60)])) < 25  # fat ≈ -100
    assert abs(med(-950, -700) - (-850)) < 80  # lung
    assert abs(med(30, 70) - 50) < 20  # muscle / blood
    bone = binary_erosion((truth >= 200) & (truth <= 1600), iterations=1)  # away from the partial-volume rim
    assert bone.sum() > 30
    assert 150 < np.median(img[bone]) < 1500 and np.percentile(img[bone], 95) > 500  # cancellous .. cortical
    assert img.min() == -3024.0  # the vendor padding outside the reconstruction circle
    assert phys["noise_sigma_ref"] == pytest.approx(3.0, rel=0.02)  # the dose asked for
    # a 1 mm slice (the spec's default) shows √(3 mm / 1 mm) × the dose's noise
    assert phys["noise_sigma_2mm"] == pytest.approx(3.0 * 3 ** 0.5, rel=0.02)


# ------------------------------------------------------------------------------------------ artifacts
def _ring_energy(img, centre, rmax):
    """Ring contrast in the polar domain: the fine residual (image minus its 9×9 median, which removes
    anatomy but keeps one-pixel rings and noise), and its median over the angle at each radius, in soft
    tissue. Noise and the odd organ edge do not survive a median around the circle; a ring does. Returns
    the largest |median| (HU)."""
    from scipy import ndimage

    res = img - ndimage.median_filter(img, 9)
    yy, xx = np.indices(img.shape)
    rr = np.hypot(yy - centre[0], xx - centre[1])
    rbin = rr.astype(int)
    ok = (rr < rmax) & (rr > 3) & ndimage.binary_erosion((img > -300) & (img < 400), iterations=2)
    counts = np.bincount(rbin[ok], minlength=int(rmax) + 1)
    idx = np.nonzero(counts > 100)[0]
    med = ndimage.median(res[ok], labels=rbin[ok], index=idx)
    return float(np.abs(np.asarray(med)).max())


def test_ring_artifact_in_polar_domain():
    def ring(p, s):
        s.ring = 0.7

    _, a, _, b, pb = _pair(LANDMARKS["renal_hilum"], ring)
    c = ((b.shape[0] - 1) / 2, (b.shape[1] - 1) / 2)
    e_clean, e_ring = _ring_energy(a, c, 80), _ring_energy(b, c, 80)
    assert e_ring > 4 * e_clean and e_ring > 20, (e_clean, e_ring)
    assert pb["ring_amplitude_hu"] == pytest.approx(10 + 140 * 0.7, rel=1e-3)


def test_noise_artifact_sigma():
    def noisy(p, s):
        s.noise_sigma = 45.0

    _, a, pa, b, pb = _pair(LANDMARKS["renal_hilum"], noisy, thickness_mm=3.0)
    assert abs(pa["noise_sigma_2mm"] - 4.0) < 0.5 and abs(pb["noise_sigma_2mm"] - 45.0) < 2
    assert pa["noise_sigma_ref"] == pytest.approx(pa["noise_sigma_2mm"]) and pb["noise_sigma_ref"] == pytest.approx(pb["noise_sigma_2mm"])
    # measured on the images: the difference of the two (same anatomy) is the extra noise
    soft = (a > -150) & (a < 150)
    assert np.std((b - a)[soft]) > 5 * np.std(a[soft] - np.median(a[soft])) * 0 + 25


def test_noise_follows_the_dose_kernel_and_thickness():
    """One dose, as a scanner gives it: a bone kernel or a thin slice shows more noise than a standard
    kernel on a 3 mm slice, a soft kernel less, and the label (the dose's noise) is the same for all."""
    p = random_patient(np.random.default_rng(3), arms="up")
    got = {}
    for name, kernel, t in (("standard", "standard", 3.0), ("bone", "bone", 3.0), ("soft", "soft", 3.0), ("thin", "standard", 0.75)):
        spec = SliceSpec(r=60.0, matrix=256, fov_mm=240.0, sim_n=384, n_views=384, noise_sigma=10.0, padding=-1024.0,
                         kernel=kernel, thickness_mm=t)
        img, phys = simulate_slice(p, spec, np.random.default_rng(11))
        assert phys["sim_pixel_mm"] < 1.6  # fine enough a grid for the kernels to differ at 2 mm
        assert phys["noise_sigma_ref"] == pytest.approx(10.0, rel=0.02), name
        got[name] = (img, phys["noise_sigma_2mm"])
    std = got["standard"][1]
    assert std == pytest.approx(10.0, rel=0.02)
    assert 1.15 < got["bone"][1] / std < 2.0  # a bone kernel's noise at 2 mm
    assert got["soft"][1] / std < 0.9
    assert got["thin"][1] / std == pytest.approx(2.0, rel=0.03)  # √(3 mm / 0.75 mm)
    assert noise_severity(10.0, 60.0) > 0 and noise_severity(10.0) == 0.0  # brain vs body scale, from the dose
    # on the images: the same anatomy, so the difference is noise, and the thin slice's is the larger
    soft = (got["standard"][0] > -150) & (got["standard"][0] < 150)
    assert np.std((got["thin"][0] - got["standard"][0])[soft]) > np.std((got["soft"][0] - got["standard"][0])[soft])


@pytest.mark.parametrize("implant", [False, True])
def test_a_thick_section_at_a_low_dose_carries_its_labelled_noise(implant):
    """Thighs side by side at a low dose: many lateral rays reach the detector with a few photons, where
    electronic noise dominates and does not scale with the dose. The image still carries (at least) the
    noise its label gives, with and without metal; before generator 9 a slice with metal there came out
    nearly noise-free (3 HU at 2 mm for a label of 33)."""
    from medqc.analysis import measures
    from medqc.agent.records import SliceInfo
    from medqc.synth.phantom import add_implant

    p = random_patient(np.random.default_rng(12), contrast=False, arms="down")
    p.height_cm, p.girth_lr, p.girth_ap, p.fat_mm = 187.6, 1.107, 1.216, 16.6  # a tall, broad patient
    if implant:
        add_implant(p, np.random.default_rng(5), 890.0, 0.9)
    spec = SliceSpec(r=890.0, fov_mm=400.0, noise_sigma=33.0, kvp=80.0)
    hu, phys = simulate_slice(p, spec, np.random.default_rng(1))
    assert (phys["metal_area_mm2"] > 0) is implant
    ps = spec.fov_mm / spec.matrix
    m = measures.measure(hu, SliceInfo("1", "2", "3", "4", rows=spec.matrix, cols=spec.matrix, pixel_spacing=(ps, ps)))
    # σ at 2 mm is read at the lower quartile of the soft tissue's local σ, which photon-starvation noise along
    # the lateral paths covers only in part: it reads 0.43 of the label here without metal (0.6 at the median)
    assert m["noise_sd_2mm"] > 0.4 * phys["noise_sigma_2mm"], (m["noise_sd_2mm"], phys["noise_sigma_2mm"])


def test_metal_streaks_beyond_the_metal():
    def metal(p, s):  # the ball of a hip prosthesis (CoCr)
        p.implants = [Implant("hip", LANDMARKS["femoral_head"] - 40, LANDMARKS["femoral_head"] + 40, 95.0, -5.0, 18.0, 10.0)]

    _, a, pa, b, pb = _pair(LANDMARKS["femoral_head"] - 20, metal)
    assert pb["metal_area_mm2"] > 300
    dpx = 420.0 / 192
    yy, xx = np.indices(b.shape)
    X = (xx - 95.5) * dpx
    Y = (yy - 95.5) * dpx
    far = np.hypot(X - 95.0, Y + 5.0) > 60  # well away from the implant
    soft = far & (a > -150) & (a < 150)
    streak = np.std((b - a)[soft])
    assert streak > 40 and streak > 8 * pa["noise_sigma_2mm"], streak  # streaks cross the whole pelvis
    assert (b > 3000).sum() > 20 and (a > 3000).sum() == 0


def test_motion_blurs_and_doubles_edges():
    def move(p, s):
        s.motion_mm = 10.0
        s.motion_kind = "shift"

    _, a, _, b, pb = _pair(LANDMARKS["carina"] + 30, move)
    body = a > -500
    assert np.sqrt(np.mean((b - a)[body] ** 2)) > 40
    _, a2, _, b2, _ = _pair(LANDMARKS["carina"] + 30, lambda p, s: None)
    assert np.array_equal(a2, b2)  # same seed, no change: identical


def test_truncation_outside_scan_field():
    def trunc(p, s):
        s.sfov_mm = 260.0

    _, a, pa, b, pb = _pair(LANDMARKS["renal_hilum"], trunc, fov=420.0)
    assert pa["truncation_fraction"] == 0 and pb["truncation_fraction"] > 0.05
    dpx = 420.0 / 192
    yy, xx = np.indices(b.shape)
    rr = np.hypot(yy - 95.5, xx - 95.5) * dpx
    assert (b[rr > 135] == -1024).all()  # nothing reconstructed beyond the scan field
    rim = (rr > 115) & (rr < 128) & (a > -200)
    assert np.mean(b[rim] - a[rim]) > 40  # the bright rim of truncation


# ------------------------------------------------------------------------------------------ studies
def _write(tmp_path, name="s", **kw):
    opts = StudyOptions(**{"region": "chest", "seed": 7, "slices": 12, "matrix": 128, "progress": False, "workers": 1, **kw})
    out = tmp_path / name
    return out, write_study(out, opts)


def test_study_artifacts_in_their_slices_only(tmp_path):
    arts = [ArtifactSpec("metal", 0.8, 3, 4), ArtifactSpec("noise", 0.8, 7, 8), ArtifactSpec("motion", 0.8, 10, 11)]
    out, truth = _write(tmp_path, artifacts=arts)
    ds = _series(out)
    assert len(ds) == len(truth["slices"]) == 12
    for i, (d, s) in enumerate(zip(ds, truth["slices"])):
        n = i + 1
        hu = _hu(d)
        assert (s["artifacts"]["metal"] > 0) == (n in (3, 4))
        assert ((hu >= 3000).sum() > 0) == (n in (3, 4)), n
        assert (s["artifacts"]["noise"] > 0) == (n in (7, 8))
        assert (s["artifacts"]["motion"] > 0) == (n in (10, 11))
        assert s["artifacts"]["ring"] == 0 and set(s["artifacts"]) == set(ARTIFACTS)
    # noise measured on the pixels: local σ in soft tissue (high-pass) is far higher in 7-8
    def local_sigma(hu):
        from scipy.ndimage import binary_erosion, uniform_filter

        soft = binary_erosion((hu > -150) & (hu < 200), iterations=2)
        hp = hu - uniform_filter(hu, 3)
        return float(np.median(np.abs(hp[soft])))

    sig = [local_sigma(_hu(d)) for d in ds]
    assert min(sig[6], sig[7]) > 1.5 * max(sig[5], sig[8])  # against the neighbouring (similar) anatomy
    assert set(truth["expected_findings"]) >= {"artifact.metal", "artifact.noise", "artifact.motion"}
    assert "artifact.ring" not in truth["expected_findings"]


def test_truth_landmarks_and_coverage(tmp_path):
    out, truth = _write(tmp_path, region="abdomen", short_top=40.0)
    lm = truth["landmarks"]
    order = [k for k, _ in ordered_landmarks()]
    zs = [lm[k] for k in order]
    assert all(a > b for a, b in zip(zs, zs[1:])), "patient z falls from vertex to thigh (HFS)"
    scale = truth["patient"]["scale"]
    for s in truth["slices"]:
        assert s["position_ref_mm"] == pytest.approx((truth["z_vertex"] - s["z"]) / scale, abs=0.1)
    req = truth["required_range"]
    assert (req["start"], req["end"]) == ("liver_dome", "iliac_crest")
    assert req["z_top"] == pytest.approx(lm["liver_dome"], abs=0.01)
    assert truth["scan_range"]["z_top"] < req["z_top"] - 10
    assert "coverage.top" in truth["expected_findings"] and "coverage.bottom" not in truth["expected_findings"]
    assert truth["body_part"] == "ABDOMEN"


def test_dicom_conformance_and_round_trip(tmp_path):
    dciodvfy = _need("dciodvfy")
    out, truth = _write(tmp_path, region="head", slices=6, patient_name="DOE^JANE", series=4)
    ds = _series(out)
    uids = {d.SOPInstanceUID for d in ds}
    assert len(uids) == len(ds) == 6
    for d, s in zip(ds, truth["slices"]):
        assert d.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and d.Modality == "CT"
        assert d.SOPInstanceUID == s["sop_instance_uid"] and int(d.InstanceNumber) == s["instance_number"]
        assert float(d.SliceLocation) == pytest.approx(s["z"], abs=1e-3)
        assert [float(x) for x in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert d.PatientPosition == "HFS" and d.BodyPartExamined in DEFINED_BODY_PARTS
        assert d.Rows == d.Columns == 128 and float(d.PixelSpacing[0]) > 0
        assert float(d.SliceThickness) > 0 and float(d.KVP) > 0 and float(d.CTDIvol) > 0
        assert d.ProtocolName and d.ConvolutionKernel and "WindowCenter" in d
        assert str(d.PatientName) == "DOE^JANE" and int(d.SeriesNumber) == 4
        assert d.SeriesInstanceUID == truth["series_instance_uid"]
        hu = _hu(d)
        assert hu.max() <= 3071 and hu.min() >= -3024
    res = subprocess.run([dciodvfy, str(out / "IM0001.dcm")], capture_output=True, text=True, timeout=60)
    report = res.stdout + res.stderr
    assert "CTImage" in report
    errors = [ln for ln in report.splitlines() if ln.startswith("Error")]
    assert not errors, report
    zs = [float(d.ImagePositionPatient[2]) for d in ds]
    assert all(a > b for a, b in zip(zs, zs[1:]))


def test_geometry_faults(tmp_path):
    out, truth = _write(tmp_path, missing=[4], duplicate=6, tilt=15.0)
    ds = _series(out)
    assert len(ds) == 12  # 12 planned - 1 missing + 1 duplicate
    z = [float(d.ImagePositionPatient[2]) for d in ds]
    steps = np.diff(sorted(set(np.round(z, 3)), reverse=True))
    assert abs(steps.min()) > 1.8 * abs(np.median(steps)) or abs(steps).max() > 1.8 * abs(np.median(steps))
    pos = [tuple(np.round([float(x) for x in d.ImagePositionPatient], 3)) for d in ds]
    assert len(pos) - len(set(pos)) == 1  # one duplicated position, distinct SOP instances
    assert len({d.SOPInstanceUID for d in ds}) == len(ds)
    o = [float(x) for x in ds[0].ImageOrientationPatient]
    assert o[4] == pytest.approx(math.cos(math.radians(15)), abs=1e-6) and o[5] == pytest.approx(math.sin(math.radians(15)), abs=1e-6)
    assert float(ds[0].GantryDetectorTilt) == 15.0
    assert {"geometry.gap", "geometry.duplicate", "geometry.tilt"} <= set(truth["expected_findings"])


def test_same_seed_byte_identical(tmp_path):
    kw = dict(slices=4, artifacts=[ArtifactSpec("ring", 0.5, 2, 3)])
    a, _ = _write(tmp_path, "a", **kw)
    b, _ = _write(tmp_path, "b", workers=2, **kw)
    c, _ = _write(tmp_path, "c", **{**kw, "seed": 8})

    def digest(folder):
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}

    assert digest(a) == digest(b)
    assert digest(a)["IM0001.dcm"] != digest(c)["IM0001.dcm"]


# ------------------------------------------------------------------------------------------ sampler
def test_training_sampler_contract():
    s1 = sample_training_slices(5, seed=21, artifact_rate=1.0)
    s2 = sample_training_slices(5, seed=21, artifact_rate=1.0)
    for a, b in zip(s1, s2):
        assert np.array_equal(a.hu, b.hu) and a.artifacts == b.artifacts
    other = sample_training_slices(1, seed=22)[0]
    assert not np.array_equal(other.hu, s1[0].hu) if other.hu.shape == s1[0].hu.shape else True
    n_art = 0
    for s in s1:
        assert s.hu.dtype == np.float32 and s.hu.ndim == 2 and 256 <= s.hu.shape[0] <= 768
        assert set(s.artifacts) == set(ARTIFACTS) and all(0.0 <= v <= 1.0 for v in s.artifacts.values())
        assert -20 <= s.position_ref_mm <= LANDMARKS["mid_thigh"]
        assert s.pixel_spacing[0] * s.hu.shape[0] == pytest.approx(s.meta["fov_mm"], rel=1e-3)
        json.dumps(s.meta)
        n_art += any(v > 0 for v in s.artifacts.values())
    assert n_art >= 4
    clean = sample_training_slices(6, seed=5, artifact_rate=0.0)
    for s in clean:
        assert s.artifacts["metal"] == s.artifacts["motion"] == s.artifacts["ring"] == s.artifacts["noise"] == 0.0


def test_noise_label_needs_a_section_of_the_patient():
    """A slice above the vertex (the skull cap, or air) shows no patient to judge noise in: it carries no
    noise label whatever its dose; a slice through the brain at the same dose does."""
    from medqc.synth import training

    p = random_patient(np.random.default_rng(2), contrast=False, arms="down")  # raised arms lie beside the head
    for r, labelled in ((-12.0, False), (60.0, True)):
        spec = training._random_spec(np.random.default_rng(3), r, p)
        spec.noise_sigma = training.noise_target(r, 1.0)
        _, phys = simulate_slice(p, spec, np.random.default_rng(4))
        assert (phys["body_area_mm2"] >= training.NOISE_LABEL_MIN_BODY_MM2) is labelled, r


def test_the_mandible_is_open_behind():
    """Below the skull the mandible is a U open towards the spine, never a closed ring of bone."""
    import cv2

    X, Y = _grid()
    for seed in range(4):
        p = random_patient(np.random.default_rng(seed))
        for r in (140.0, 155.0, 170.0):
            bone = (rasterize(p, r, X, Y).hu > 600).astype(np.uint8)
            n, lab = cv2.connectedComponents(1 - bone, connectivity=4)
            enclosed = [k for k in range(1, n) if not (np.any(lab[0] == k) or np.any(lab[-1] == k)
                                                       or np.any(lab[:, 0] == k) or np.any(lab[:, -1] == k))]
            sizes = [int((lab == k).sum()) for k in enclosed]
            px = float(X[0, 1] - X[0, 0])
            assert max(sizes, default=0) * px * px < 600.0, (seed, r)  # the spinal canal only (~2–4 cm²)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("argv, needle", [
    (["--region", "knee"], "allowed: head, neck, chest"),
    (["--artifact", "blur"], "allowed: metal, motion, ring, noise, truncation"),
    (["--artifact", "metal:2"], "severity"),
    (["--artifact", "ring@5-2"], "impossible"),
    (["--region", "head", "--short-top", "200", "--short-bottom", "200"], "impossible scan range"),
    (["--slices", "10", "--missing", "40"], "outside"),
    (["--inject", "metal"], "--from"),
    (["--inject", "blur", "--from", "."], "allowed: metal, motion, ring, noise, truncation"),
    (["--matrix", "5000"], "matrix must be"),
])
def test_bad_input_exit_2_nothing_written(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    base = ["--matrix", "128"] if "--matrix" not in argv else []
    rc = medqc_main(["synth", str(out), "--no-progress", *base, *argv])
    assert rc == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir()], "no temporary folder left behind"


def test_existing_output_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert medqc_main(["synth", str(out), "--no-progress", "--slices", "2", "--matrix", "128"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------------------ injection
def test_inject_ring_into_existing_series(tmp_path, capsys):
    src, _ = _write(tmp_path, "src", region="abdomen", slices=3, seed=2, matrix=256)
    out = tmp_path / "new" / "folders" / "inj"  # missing parents are created (the temp folder sits beside OUT)
    rc = medqc_main(["synth", str(out), "--inject", "ring:0.8", "--from", str(src), "--no-progress", "--seed", "1"])
    assert rc == 0, capsys.readouterr().err
    truth = json.loads((out / "truth.json").read_text())
    assert truth["expected_findings"] == ["artifact.ring"]
    a, b = _series(src), _series(out)
    assert len(a) == len(b) == 3
    assert b[0].SeriesInstanceUID != a[0].SeriesInstanceUID and b[0].StudyInstanceUID == a[0].StudyInstanceUID
    # another artifact (or severity) injected into the same series gets UIDs of its own, the same one again
    # the same UIDs: an agent receiving both must not take one for resends of the other
    uids = {}
    for name, what in (("again", "ring:0.8"), ("other", "noise:0.8"), ("milder", "ring:0.4")):
        assert medqc_main(["synth", str(tmp_path / name), "--inject", what, "--from", str(src), "--no-progress",
                           "--seed", "1"]) == 0
        uids[name] = [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in _series(tmp_path / name)]
    mine = [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in b]
    assert uids["again"] == mine
    assert not {u for pair in uids["other"] + uids["milder"] for u in pair} & {u for pair in mine for u in pair}
    from scipy import ndimage

    for x, y in zip(a, b):
        ha, hb = _hu(x), _hu(y)
        d = hb - ha
        yy, xx = np.indices(d.shape)
        rbin = np.hypot(yy - (d.shape[0] - 1) / 2, xx - (d.shape[1] - 1) / 2).astype(int)
        inside = rbin < d.shape[0] // 2
        idx = np.arange(4, d.shape[0] // 2)
        med = np.asarray(ndimage.median(d[inside], labels=rbin[inside], index=idx))
        # the injected component is concentric (polar domain: whole circles share one offset) ...
        assert np.abs(med).max() > 40
        assert (np.abs(med) > 10).sum() < 0.15 * idx.size  # ... and confined to a few thin rings
        # the original texture stays: away from the rings, the images agree
        assert np.median(np.abs(d)) < 5


def test_inject_metal_into_real_vendor_slices(tmp_path, real_ct):
    src = tmp_path / "real"
    src.mkdir()
    files = sorted((real_ct / "S2010").glob("I*"), key=lambda p: int(p.name[1:]))[20:23]
    for f in files:
        shutil.copy(f, src / f.name)
    out = tmp_path / "inj"
    rc = medqc_main(["synth", str(out), "--inject", "metal:0.8", "--from", str(src), "--no-progress"])
    assert rc == 0
    truth = json.loads((out / "truth.json").read_text())
    sev = [s["artifacts"]["metal"] for s in truth["slices"]]
    assert sum(v > 0 for v in sev) >= 1 and truth["expected_findings"] == ["artifact.metal"]
    for s, f in zip(truth["slices"], sorted(out.glob("IM*.dcm"))):
        d = pydicom.dcmread(str(f))
        assert d.Manufacturer == "Philips" and float(d.GantryDetectorTilt) == -18.5  # original tags kept
        assert ((_hu(d) >= 3000).sum() > 0) == (s["artifacts"]["metal"] > 0)


def test_inject_keeps_a_private_element_the_dictionary_misreads(tmp_path):
    """The Philips Big Bore writes (01F1,1026) as the text '0.15' where pydicom's private dictionary says FD;
    the injected series keeps the element byte for byte (as UN) instead of failing to write."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import ImplicitVRLittleEndian

    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.private_block(0x01F1, "ELSCINT1", create=True).add_new(0x26, "UN", b"0.15")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(src / "a.dcm", enforce_file_format=True)
    out = tmp_path / "inj"
    assert medqc_main(["synth", str(out), "--inject", "noise:0.5", "--from", str(src), "--no-progress"]) == 0
    d = pydicom.dcmread(str(next(out.glob("IM*.dcm"))))
    assert d.get_item(0x01F11026).value == b"0.15" and d.get_item(0x01F10010).value.strip() == b"ELSCINT1"


def test_a_variant_of_a_big_endian_slice_is_written_little_endian(tmp_path):
    """GE's older stores write explicit VR big endian (a real Discovery CT750 HD head slice on npm does):
    a variant rewrites the pixels little endian and says so, where pydicom's save_as refused to convert."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

    from medqc.synth import variants as V

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = V.hu_of(src)
    src.PixelData = src.pixel_array.astype(src.pixel_array.dtype.newbyteorder(">")).tobytes()
    src.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    pydicom.dcmwrite(str(tmp_path / "be.dcm"), src, enforce_file_format=True, implicit_vr=False, little_endian=False)
    be = pydicom.dcmread(str(tmp_path / "be.dcm"))
    assert np.array_equal(V.hu_of(be), hu)
    out = V.write_variant([be], tmp_path / "v", "prone")
    (f,) = sorted(out.glob("*.dcm"))
    d = pydicom.dcmread(str(f))
    assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert np.array_equal(V.hu_of(d), hu[::-1, ::-1])


def test_inject_into_a_big_endian_series_writes_it_little_endian(tmp_path):
    """GE's older stores write explicit VR big endian (a real Discovery CT750 HD head slice on npm does):
    ``medqc synth --inject`` rewrites the pixels little endian and says so, where pydicom's save_as refused
    to convert and the injection failed."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

    from medqc.synth import variants as V

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = V.hu_of(ds)
    ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder(">")).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    src = tmp_path / "be"
    src.mkdir()
    pydicom.dcmwrite(str(src / "be.dcm"), ds, enforce_file_format=True, implicit_vr=False, little_endian=False)
    out = tmp_path / "inj"
    assert medqc_main(["synth", str(out), "--inject", "ring:0.8", "--from", str(src), "--no-progress"]) == 0
    (f,) = sorted(out.glob("IM*.dcm"))
    d = pydicom.dcmread(str(f))
    assert d.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    diff = V.hu_of(d) - hu
    assert np.abs(diff).max() > 10 and np.median(np.abs(diff)) < 5  # the ring added, the slice otherwise kept


def test_inject_keeps_the_fill_beyond_a_displayed_circle(tmp_path, real_ct):
    """The Philips Big Bore writes a constant -1024 HU outside its displayed circle, where nothing was
    measured (its air reads about -975 inside it). An injection adds its artifact to the measured pixels only:
    the fill stays exactly as the scanner wrote it, as it does on every real scan, however noisy."""
    src = tmp_path / "real"
    src.mkdir()
    f = real_ct.parent / "philips-bigbore-chest-patient" / "00-slice070.dcm"
    shutil.copy(f, src / f.name)
    out = tmp_path / "inj"
    assert medqc_main(["synth", str(out), "--inject", "noise:1", "--from", str(src), "--no-progress"]) == 0
    a, (b,) = _hu(pydicom.dcmread(str(f))), _series(out)
    hb = _hu(b)
    h, w = a.shape
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
    beyond = r >= h / 2.0
    assert (a[beyond] == -1024).all()  # the scanner's fill
    assert np.array_equal(hb[beyond], a[beyond])
    inside = (r < h / 2.0 - 2) & (a > -900) & (a < 200)
    assert np.std((hb - a)[inside]) > 20  # the noise is there, in the measured pixels


def test_round_trip_reconstructs_the_whole_slice_and_its_control_adds_nothing(tmp_path, real_ct):
    """``--round-trip`` reconstructs every slice in full from its projections: the clean control (no
    ``--inject``) keeps the real chest's CT numbers (its body, its air) on the injector's grid, and keeps the
    fill the scanner wrote beyond its displayed circle; a ring injected the same way adds its circles to that
    same reconstruction, so the two differ by the ring alone. A clean control without the round trip would be
    a copy: it is refused."""
    src = tmp_path / "real"
    src.mkdir()
    f = real_ct.parent / "philips-bigbore-chest-patient" / "00-slice070.dcm"
    shutil.copy(f, src / f.name)
    ctl, ring = tmp_path / "ctl", tmp_path / "ring"
    assert medqc_main(["synth", str(ctl), "--round-trip", "--from", str(src), "--no-progress"]) == 0
    assert medqc_main(["synth", str(ring), "--round-trip", "--inject", "ring:1", "--from", str(src), "--no-progress"]) == 0
    truth = json.loads((ctl / "truth.json").read_text())
    assert truth["injected"] == {"kind": "clean", "severity": 0.0, "seed": 0, "round_trip": True}
    assert truth["expected_findings"] == [] and truth["slices"][0]["artifacts"] == {k: 0.0 for k in ARTIFACTS}
    assert json.loads((ring / "truth.json").read_text())["expected_findings"] == ["artifact.ring"]
    a = _hu(pydicom.dcmread(str(f)))
    (c,), (r,) = _series(ctl), _series(ring)
    assert c.SeriesDescription.endswith("+round trip") and r.SeriesDescription.endswith("+ring round trip")
    hc, hr = _hu(c), _hu(r)
    h, w = a.shape
    yy, xx = np.mgrid[:h, :w]
    rad = np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)
    beyond = rad >= h / 2.0
    assert np.array_equal(hc[beyond], a[beyond])  # the scanner's fill, not reconstructed
    import cv2

    # soft tissue 3 mm from any edge (the injector's coarser grid blurs edges), and air
    soft = (rad < h / 2.0 - 8) & (a > -100) & (a < 100)
    soft = cv2.erode(soft.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
    air = (rad < h / 2.0 - 8) & (a < -950)
    assert soft.sum() > 5000 and air.sum() > 5000
    assert abs(float(np.mean(hc[soft] - a[soft]))) < 2 and abs(float(np.mean(hc[air] - a[air]))) < 5
    assert 2.0 < float(np.mean(np.abs(hc - a)[soft])) < 30  # reconstructed anew: not a copy, the same anatomy
    d = hr - hc  # the ring alone: concentric
    inside = rad < h / 2.0 - 2
    rbin = rad.astype(int)
    prof = np.bincount(rbin[inside], d[inside]) / np.maximum(np.bincount(rbin[inside]), 1)
    assert np.abs(prof).max() > 20
    resid = d[inside] - prof[rbin[inside]]
    assert float(np.std(resid)) < 0.25 * float(np.abs(prof).max())
    from medqc.errors import UsageError
    from medqc.synth.inject import CLEAN, inject_series

    with pytest.raises(UsageError, match="needs --round-trip"):
        inject_series(src, tmp_path / "x", CLEAN, 0.0, progress=False)
    assert not (tmp_path / "x").exists()
