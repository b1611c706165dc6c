"""``bench/evaluate_real.py`` on a tiny real case: two TCIA slices (GE, Toshiba) and the Philips patient chest
(a block of 6 of its 141 slices injected), ring and noise injected at severity 1.0 with the projection-domain
injector, analysed through the pipeline ``medqc analyze`` runs.

The real CT comes from ``$MEDQC_REAL_CT`` (default ``../shared/real-ct`` beside the checkout). Without it the
test skips, except under ``MEDQC_REQUIRE_REAL_CT=1`` or with ``MEDQC_REAL_CT`` set, where its absence is a failure
(``conftest.missing_real_ct``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from conftest import missing_real_ct, need_module

ROOT = Path(__file__).resolve().parents[1]
TCIA = "tcia-covid19-ny-sbu-slices"
CHEST = "philips-bigbore-chest-patient"
SLICES = ("A027284/axial/19001231-131.dcm", "A098752/axial/19001231-32.dcm")  # GE LightSpeed VCT, Toshiba Aquilion ONE


def real_ct_root() -> Path:
    root = Path(os.environ.get("MEDQC_REAL_CT") or ROOT.parent / "shared" / "real-ct")
    missing = [p for p in [root / CHEST, *(root / TCIA / s for s in SLICES)] if not p.exists()]
    if missing:
        missing_real_ct(f"real CT missing under {root} ({missing[0]}); set MEDQC_REAL_CT")
    return root


def two_tcia_slices(root: Path, tmp: Path) -> Path:
    """A study folder under ``tmp`` holding the two TCIA slices of ``SLICES``, at their relative paths."""
    tcia = tmp / TCIA
    for rel in SLICES:
        (tcia / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / TCIA / rel, tcia / rel)
    return tcia


def harness():
    spec = importlib.util.spec_from_file_location("evaluate_real", ROOT / "bench" / "evaluate_real.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_real_evaluation_on_two_tcia_slices_and_a_chest_block(tmp_path):
    root = real_ct_root()
    ev = harness()
    tcia = two_tcia_slices(root, tmp_path)
    args = dict(kinds=["ring", "noise"], severities=[1.0], block=6, every=0, cache=tmp_path / "cache", workers=2,
                progress=False)
    res = ev.evaluate([tcia, root / CHEST], **args)
    paths = ev.write_outputs(res, tmp_path / "out", "real-eval")

    # what was analysed and injected: 2 + 141 clean slices; 3 units (two single slices, one block of 6) × 2 kinds
    assert res["slices"] == {"clean": 143, "injected": 16, "cone_beam": 0}
    assert res["jobs"]["total"] == 6 and res["jobs"]["cached"] == 0 and res["jobs"]["injected_slices"] == 16
    assert {s["study"]: s["slices_analysed"] for s in res["studies"]} == {TCIA: 2, CHEST: 141}
    assert set(res["per_scanner"]) == {"GE LightSpeed VCT", "Toshiba Aquilion ONE", "Philips Brilliance Big Bore"}
    thr = res["thresholds"]
    for c in ("ring", "noise"):
        m = res["classes"][c]
        assert m["threshold"] == thr[c]
        assert m["n_pos"] == 8 and m["n_neg"] == 143 + 8  # every clean slice + the other kind's injected slices
        assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["sens_at_thr"] <= 1.0 and 0.0 <= m["spec_at_thr"] <= 1.0
    for c in ("metal", "motion", "truncation"):  # nothing injected: no AUROC, specificity only
        assert res["classes"][c]["n_pos"] == 0 and res["classes"][c]["auroc"] is None
    assert res["series_clean_summary"]["series"] == 3
    inj = res["series_injected"]
    assert len(inj) == 6 and sorted(r["unit_kind"] for r in inj) == ["block"] * 2 + ["single"] * 4
    assert all(r["expected"] and r["positive_slices"] == r["slices"] for r in inj)

    # injected noise at severity 1.0 scores higher than its clean source slice, on every injected slice
    clean = {r["sop"]: r for r in res["records"] if r["variant"] == "clean"}
    noisy = [r for r in res["records"] if r["variant"] == "noise"]
    assert len(noisy) == 8 and all(r["mean_abs_hu"] > 5 for r in noisy)
    for r in noisy:
        assert r["scores"].get("noise", 0.0) > clean[r["sop"]]["scores"].get("noise", 0.0), (r["file"], r["scores"])

    # the report: JSON without the per-slice records, a table per class, a figure
    doc = json.loads(paths["json"].read_text())
    assert doc["schema"] == "medqc.real-eval/1" and "records" not in doc and doc["classes"]["noise"]["n_pos"] == 8
    md = paths["md"].read_text()
    assert "## Per slice, pooled over the diagnostic scanners" in md and "\n| noise | " in md and "\n| ring | " in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(paths["records"].read_text())) == 143 + 16

    # a rerun takes the injected studies from the cache and scores them the same
    again = ev.evaluate([tcia, root / CHEST], **args)
    assert again["jobs"]["cached"] == 6
    key = lambda r: (r["variant"], r["sop"])  # noqa: E731
    assert {key(r): r["scores"] for r in again["records"]} == {key(r): r["scores"] for r in res["records"]}


def test_pydicom_real_slices_join_the_default_studies(tmp_path, monkeypatch):
    """The real scanner slices among pydicom's test data (Siemens, Hitachi and two unrecorded scanners) are
    copied into the cache once, from the installed packages, and evaluated beside the scanner studies; a
    targeted view of a study keeps its files' relative paths."""
    need_module("data_store", "pydicom-data (a test dependency) holds three of the slices")
    er = harness()
    out = er.pydicom_slices(tmp_path)
    assert out == tmp_path / "pydicom-data-ct"
    assert sorted(p.name for p in out.iterdir()) == sorted(er.PYDICOM_SLICES)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert er.pydicom_slices(tmp_path) == out and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    monkeypatch.setenv("MEDQC_REAL_CT", str(real_ct_root()))
    monkeypatch.setenv("MEDQC_REGISTRY_CT", "0")  # the registries' CT has tests of its own (test_registry_ct)
    assert out in er.default_studies(tmp_path)
    import pydicom

    makers = {str(pydicom.dcmread(p, stop_before_pixels=True).get("ManufacturerModelName", "")) for p in out.iterdir()}
    assert {"SOMATOM Definition AS+", "Supria"} <= makers
    tight = er.targeted_studies([out], 0.7, tmp_path)[0]
    assert sorted(p.name for p in tight.glob("*.dcm")) == sorted(er.PYDICOM_SLICES)
    ds = pydicom.dcmread(tight / "explicit_VR-UN.dcm", stop_before_pixels=True)
    src = pydicom.dcmread(out / "explicit_VR-UN.dcm", stop_before_pixels=True)
    assert float(ds.PixelSpacing[0]) < float(src.PixelSpacing[0]) and ds.Rows == src.Rows


def test_round_trip_evaluation_counts_its_clean_control(tmp_path):
    """``--round-trip``: every variant reconstructed in full from its projections, and per unit a clean control
    reconstructed the same way, which takes the clean originals' place among the per-slice negatives. Two real
    slices (GE, Toshiba) with a ring at severity 1: the ring is found on both, their controls raise nothing that
    the originals do not show."""
    root = real_ct_root()
    ev = harness()
    tcia = two_tcia_slices(root, tmp_path)
    res = ev.evaluate([tcia], kinds=["ring"], severities=[1.0], block=6, every=0, cache=tmp_path / "cache", workers=1,
                      progress=False, round_trip=True)
    assert res["round_trip"] and res["jobs"]["total"] == 4 and res["slices"] == {"clean": 2, "injected": 2, "cone_beam": 0}
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("rt-*")) == ["clean", "clean", "ring", "ring"]
    recs = res["records"]
    assert {r["variant"] for r in recs} == {"clean", "ring"} and all(r["changed"] for r in recs)
    m = res["classes"]["ring"]
    assert m["n_pos"] == 2 and m["n_neg"] == 2 and m["sens_at_thr"] == 1.0 and m["spec_at_thr"] == 1.0
    ctl = {r["sop"]: r for r in recs if r["variant"] == "clean"}
    for r in recs:
        if r["variant"] == "ring":
            assert r["scores"]["ring"] > ctl[r["sop"]]["scores"].get("ring", 0.0) + 0.3
    rc = res["round_trip_controls"]
    assert rc["units"] == 2 and rc["with_false_artifact_findings"] == 0
    md = ev.markdown(res)
    assert "**Projection round trip.**" in md and "| clean control (round trip) |" in md and "Round-trip clean controls" in md
