"""The real CT as other acquisitions show it (``medqc.synth.variants``: another matrix, a targeted field, thicker
slices, feet-first and prone layouts): what holds on the originals must hold on them. The real-CT collection
(``$MEDQC_REAL_CT`` or ../shared/real-ct) absent, these skip, and fail instead under MEDQC_REQUIRE_REAL_CT=1 or
with MEDQC_REAL_CT set. ``bench/evaluate_variants.py`` runs the whole studies; these are a few slices each."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("MEDQC_REAL_CT") or ROOT.parent / "shared" / "real-ct")
CHEST = REAL / "philips-bigbore-chest-patient"
# a Toshiba slice whose arms leave the scan field (a real truncation: KNOWN_REAL in bench/evaluate_real.py)
ARMS_OUT = REAL / "tcia-covid19-ny-sbu-slices" / "A067967" / "axial" / "19001231-270.dcm"
GE_RING_SLICE = REAL / "tcia-covid19-ny-sbu-slices" / "A056642" / "axial" / "19010107-111.dcm"
# 7 mid-chest slices, two of them with radiotherapy skin markers (metal, clipped at 2976 HU by the 12-bit store)
CHEST_SLICES = slice(55, 62)
CLEAN_VARIANTS = ("matrix-256", "matrix-768", "matrix-1024", "fov-0.7", "fov-0.5", "thick-2", "clip-2976", "feet-first",
                  "prone")


def need(path: Path) -> Path:
    if not path.exists():
        from conftest import missing_real_ct

        missing_real_ct(f"{path} is not available (set MEDQC_REAL_CT)")
    return path


def _series_uid(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(str(sorted(folder.glob("*.dcm"))[0]), stop_before_pixels=True).SeriesInstanceUID)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """Every case of this module built and analysed in one ``medqc analyze`` run: {case: series report}."""
    from conftest import analyze_json

    from medqc.synth import realcases
    from medqc.synth import variants as V

    tmp = tmp_path_factory.mktemp("variants")
    sl = realcases.read_series(need(CHEST))
    z = lambda d: float(d.ImagePositionPatient[2])  # noqa: E731
    folders = {"chest": realcases.write_case(sl[CHEST_SLICES], tmp, "chest")}
    for v in CLEAN_VARIANTS:
        folders[f"chest {v}"] = V.write_variant(sl[CHEST_SLICES], tmp / f"chest-{v}", v)
    arms = V.read_series_of([need(ARMS_OUT)])
    folders["arms out"] = realcases.write_case(arms, tmp, "arms")
    for v in ("matrix-256", "matrix-1024", "fov-0.5"):
        folders[f"arms out {v}"] = V.write_variant(arms, tmp / f"arms-{v}", v)
    # coverage: the lung bases alone (13 slices, 24 mm), an abdomen protocol
    bases = realcases.write_case([d for d in sl if z(d) < -140], tmp, "bases", "ABDOMEN")
    folders["bases matrix-256"] = V.write_variant(V.read_series_of(sorted(bases.glob("*.dcm"))), tmp / "bases-256",
                                                  "matrix-256")
    # a chest cut 50 mm below the apices, shown in a 250 mm field
    cut = realcases.write_case([d for d in sl if z(d) < 20], tmp, "cut", "CHEST ROUTINE")
    folders["cut fov-0.5"] = V.write_variant(V.read_series_of(sorted(cut.glob("*.dcm"))), tmp / "cut-fov", "fov-0.5")
    # the complete chest (every second slice), stored feet first and prone
    whole = folders["whole"] = realcases.write_case(sl[::2], tmp, "whole", "CHEST ROUTINE")
    for v in ("feet-first", "prone", "fov-0.5"):
        folders[f"whole {v}"] = V.write_variant(V.read_series_of(sorted(whole.glob("*.dcm"))), tmp / f"whole-{v}", v)
    # metal injected into the mid-chest slices (the middle one), then stored as a store clipping at 2,976 HU does
    from medqc.synth.inject import inject_series

    inject_series(folders["chest"], tmp / "chest-metal", "metal", 0.7, seed=3, progress=False)
    folders["chest metal clip-2976"] = V.write_variant(V.read_series_of(sorted((tmp / "chest-metal").glob("*.dcm"))),
                                                       tmp / "chest-metal-clip", "clip-2976")
    rep = analyze_json(*folders.values())
    by_uid = {s["series_instance_uid"]: s for s in rep["series"]}
    return {name: by_uid[_series_uid(f)] for name, f in folders.items()}


def _checks(s: dict, prefix: str) -> list[str]:
    return sorted(f["check"] for f in s["findings"] if f["check"].startswith(prefix)
                  and not (f.get("details") or {}).get("resolved"))


def _measure(s: dict, key: str) -> list[float]:
    return [p["measures"].get(key) for p in sorted(s["per_slice"], key=lambda p: -p["z"])]


@pytest.mark.parametrize("variant", CLEAN_VARIANTS)
def test_clean_chest_variant_raises_no_artifact(analysed, variant):
    """The real chest at 256², 768², 1024² (the store's clipping at 2976 HU kept: its skin markers stay under the
    metal level, as on the original), in a 350 and a 250 mm targeted field, averaged to 4 mm, clipped at
    2,976 HU (as it is), feet first and prone: no artifact finding, and no slice reaches the scan field's edge."""
    s = analysed[f"chest {variant}"]
    assert s["slices"] == (3 if variant == "thick-2" else 7)
    assert _checks(s, "artifact.") == [], s["findings"]
    assert max(_measure(s, "body_touches_fov")) == 0.0


@pytest.mark.parametrize("variant", ["matrix-256", "matrix-768", "matrix-1024", "feet-first", "prone"])
def test_noise_and_lungs_read_in_millimetres(analysed, variant):
    """σ at 2 mm and the lung area are measures in millimetres: the same slice on another matrix or in another
    layout reads them within a few per cent (a finer matrix is made by band-limited interpolation, which keeps
    the noise the reconstruction holds)."""
    base, s = analysed["chest"], analysed[f"chest {variant}"]
    for key, tol in (("noise_sd_2mm", 0.1), ("lung_area_mm2", 0.05)):
        for a, b in zip(_measure(s, key), _measure(base, key)):
            assert a == pytest.approx(b, rel=tol), (key, _measure(s, key), _measure(base, key))


def test_metal_in_a_store_that_clips_below_the_metal_level(analysed):
    """Metal in a store that keeps nothing above 2,976 HU (as the real Philips Big Bore chest's does) is a plateau
    at that value: found (every pixel under the 3,000 HU level, it was found on none before), and only there."""
    s = analysed["chest metal clip-2976"]
    assert _checks(s, "artifact.") == ["artifact.metal"], s["findings"]
    tops = _measure(s, "metal_max_hu")
    assert max(tops) == 2976.0
    metal = [p["scores"]["metal"] for p in sorted(s["per_slice"], key=lambda p: -p["z"])]
    clipped = [p["measures"]["metal_clipped"] for p in sorted(s["per_slice"], key=lambda p: -p["z"])]
    assert clipped[3] == 1.0 and metal[3] >= 0.9
    assert max(metal[:2] + metal[5:]) < 0.14, metal


def test_targeted_field_is_a_crop_not_truncation(analysed):
    """A Toshiba slice whose arms leave the scan field raises truncation; shown at 256² and 1024² it still does
    (the field-edge masks are worked out on pixels of at most 2.5 mm: at 256² on a 3.8 mm subsampled grid its
    contact with the scan field's edge read half); shown in half its field, the arms are cropped away by the
    picture and nothing is raised."""
    assert _checks(analysed["arms out"], "artifact.") == ["artifact.truncation"]
    for v in ("matrix-256", "matrix-1024"):
        assert _checks(analysed[f"arms out {v}"], "artifact.") == ["artifact.truncation"], v
    s = analysed["arms out fov-0.5"]
    assert _checks(s, "artifact.") == []
    assert _measure(s, "body_touches_fov") == [0.0]


def test_short_stack_claims_no_orientation(analysed):
    """The lung bases alone (13 slices over 24 mm) at 256²: the network's slope over so short a span is noise;
    it once claimed head and feet swapped and left the iliac crests unjudged. The liver dome and the crests
    are both missed by this abdomen."""
    s = analysed["bases matrix-256"]
    assert _checks(s, "geometry.") == []
    assert _checks(s, "coverage.") == ["coverage.bottom", "coverage.top"]


def test_lungs_cut_at_the_top_in_a_targeted_field(analysed):
    """A chest starting 50 mm below the apices, in a 250 mm field: the first slices hold lung over 40 cm², so the
    apices lie at least 20 mm above, whatever the network's fit says (it put them 3 mm above the scan)."""
    assert "coverage.top" in _checks(analysed["cut fov-0.5"], "coverage.")


@pytest.mark.parametrize("layout", ["feet-first", "prone"])
def test_complete_chest_feet_first_and_prone(analysed, layout):
    """The complete chest stored feet first (gantry frame: columns mirrored, IOP -1\\0\\0\\0\\1\\0, numbered from
    the feet) and prone (rotated 180°): covered, head at the top, no orientation finding, no artifact."""
    s, base = analysed[f"whole {layout}"], analysed["whole"]
    assert [c for c in _checks(s, "coverage.") if c != "coverage.overscan"] == []
    assert _checks(s, "coverage.") == _checks(base, "coverage.")  # the same range beyond the protocol's, if any
    assert _checks(s, "geometry.") == []
    assert _checks(s, "artifact.") == []


def test_ring_found_round_the_isocentre_of_a_targeted_field(tmp_path):
    """A faint ring (severity 0.15) injected into a real GE slice (0.72 mm pixels), then shown in a 0.7× field
    round the trunk (0.51 mm pixels; the rotation axis off the image centre, where ReconstructionTargetCenterPatient
    − DataCollectionCenterPatient puts it) and on a 1024² matrix (0.36 mm): read round that axis on pixels of
    about 0.9 mm it is flagged as on the original, with a margin (7.4 HU there, 5.7 and 6.1 HU here against the
    4 HU flag level; the clean slice reads 0)."""
    import shutil

    from conftest import analyze_json

    from medqc.analysis import fusion
    from medqc.synth import variants as V
    from medqc.synth.inject import inject_series

    src = need(GE_RING_SLICE)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(src, one / src.name)
    inject_series(one, tmp_path / "ring", "ring", 0.15, seed=1, progress=False)
    ringed = V.read_series_of(sorted((tmp_path / "ring").glob("*.dcm")))
    clean = V.read_series_of([src])
    pairs = [(V.write_variant(ringed, tmp_path / f"ring-{v}", v), V.write_variant(clean, tmp_path / f"clean-{v}", v))
             for v in ("fov-0.7", "matrix-1024")]
    rep = analyze_json(*[f for p in pairs for f in p])
    by = {s["series_instance_uid"]: s["per_slice"][0]["measures"]["ring_contrast_hu"] for s in rep["series"]}
    for a, b in pairs:
        ring, flat = by[_series_uid(a)], by[_series_uid(b)]
        assert flat < 2.0 and ring > fusion.RING_HU[0] + 1.0, (a.name, flat, ring)


def _dciodvfy_errors(path: Path) -> set[str]:
    import shutil
    import subprocess

    from conftest import missing_peer

    exe = shutil.which("dciodvfy")
    if not exe:
        missing_peer("dciodvfy (dicom3tools) is not installed (.ci/run installs it)")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    return {line.strip() for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")}


@pytest.mark.parametrize("variant", ["matrix-256", "matrix-768", "fov-0.7", "feet-first", "prone"])
def test_variants_are_valid_ct_images(tmp_path, variant):
    """dciodvfy finds no error in a variant that its source does not have (the Toshiba source lacks Laterality
    and leaves a CodeMeaning empty; a resampled PixelSpacing must still fit a DS's 16 characters)."""
    from medqc.synth import variants as V

    src = need(ARMS_OUT)
    out = V.write_variant(V.read_series_of([src]), tmp_path / variant, variant)
    assert _dciodvfy_errors(sorted(out.glob("*.dcm"))[0]) <= _dciodvfy_errors(src)


def test_targeted_field_is_not_mis_centring(analysed):
    """The real chest in a 250 mm field round its middle, the isocentre written (DataCollectionCenterPatient):
    the field cuts the trunk, so the centre of what it shows is not the trunk's. It once read 31 mm low against
    the isocentre (the patient lies 25 mm high, within tolerance)."""
    assert _checks(analysed["whole"], "centering.") == []
    assert _checks(analysed["whole fov-0.5"], "centering.") == []


def test_motion_is_read_in_the_lungs_of_a_targeted_field(analysed):
    """The complete chest in a 250 mm targeted field: no slice shows the free air round the patient, but the
    lungs, opened to the field's edge, are read for the streaks motion takes below air (``lung_dark_mm2``) on
    most slices, none of them darker than air: motion is judged there, as in the full field."""
    import math

    from medqc.analysis import lungstreaks

    ps = [p["measures"] for p in analysed["whole fov-0.5"]["per_slice"]]
    assert not any(math.isfinite(m["air_dark_hu"]) for m in ps if m.get("air_dark_hu") is not None), ps
    lungs = [m["lung_dark_mm2"] for m in ps if m.get("lung_dark_mm2") is not None and math.isfinite(m["lung_dark_mm2"])]
    assert len(lungs) > len(ps) / 2, (len(lungs), len(ps))
    assert max(lungs) < lungstreaks.EVIDENCE_MM2[0], lungs
    assert "artifact.motion" not in (analysed["whole fov-0.5"].get("not_judged") or {})
    assert "artifact.motion" not in (analysed["whole"].get("not_judged") or {})


def test_a_constant_fill_that_is_not_the_lowest_value_stays_constant_on_a_finer_matrix():
    """A scan field narrowed inside the picture and filled with -1024 HU, in a reconstruction whose streaks run
    below that (unclipped, as the real head CT's): band-limited upsampling must keep the fill one value, as a
    real finer reconstruction would, or the field's edge is no longer found (the head's injected truncation
    read as none on every 768² and 1024² slice when only the lowest and highest values were kept)."""
    import numpy as np

    from medqc.synth import variants as V

    rng = np.random.default_rng(0)
    n = 128
    yy, xx = np.mgrid[0:n, 0:n] - (n - 1) / 2
    r = np.hypot(yy, xx)
    img = np.where(r < 30, 40.0, -1000.0) + rng.normal(0, 8, (n, n))
    img[(r > 32) & (r < 36) & (xx > 0)] = -1300.0  # a dark streak below the fill value
    img[r > 50] = -1024.0  # the fill beyond the narrowed scan field
    img = img.astype(np.float32)
    up = V._resample_hu(img, 3 * n)
    R = np.hypot(*(np.mgrid[0:3 * n, 0:3 * n] - (3 * n - 1) / 2)) / 3
    far = R > 52  # clear of the fill's edge
    assert (up[far] == -1024.0).all()
    assert up.min() < -1024.0  # the streak below the fill is still there


@pytest.mark.parametrize("layout,want", [("feet-first", "FFS"), ("prone", "HFP")])
def test_layouts_of_a_slice_stored_rows_posterior_to_anterior(tmp_path, layout, want):
    """A real supine abdomen (pydicom-data's pancreas slice) archived with its rows running posterior to
    anterior (ImageOrientationPatient 1\\0\\0\\0\\-1\\0) and no PatientPosition: the feet-first and prone variants
    store it as those positions' scanners do (row direction -x; column direction +y feet first, -y prone),
    so the position and the axes agree and no orientation finding is raised; the anatomy stays put."""
    from conftest import analyze_json, need_module
    from medqc.synth import variants as V

    need_module("data_store", "pydicom-data (a test dependency) holds the slice")
    import pydicom
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("explicit_VR-UN.dcm", download=False))
    ds = pydicom.dcmread(src)
    assert float(ds.ImageOrientationPatient[4]) == -1.0 and "PatientPosition" not in ds
    out = V.write_variant([ds], tmp_path / layout, layout)
    (f,) = sorted(out.glob("*.dcm"))
    v = pydicom.dcmread(f)
    iop = [float(x) for x in v.ImageOrientationPatient]
    assert (iop[0], iop[4]) == (-1.0, 1.0 if layout == "feet-first" else -1.0) and v.PatientPosition == want
    # the same anatomy at the same patient coordinates: the pixel at the source's first row and column
    hu_src, hu_v = V.hu_of(ds), V.hu_of(v)
    p0 = np.array([float(x) for x in ds.ImagePositionPatient])
    ro, co = np.array(iop[:3]), np.array(iop[3:])
    d = p0 - np.array([float(x) for x in v.ImagePositionPatient])
    r, c = int(round(d @ co / float(v.PixelSpacing[0]))), int(round(d @ ro / float(v.PixelSpacing[1])))
    assert hu_v[r, c] == hu_src[0, 0]
    rep = analyze_json(out)
    checks = [x["check"] for s in rep["series"] for x in s["findings"]]
    assert "geometry.orientation" not in checks, checks
