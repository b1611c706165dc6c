"""Real CT slices from several sources, through ``medqc analyze`` (the public offline interface).

The files come from ``pydicom-data`` (pydicom's public test data; a test dependency): a GE-style head slice
with a subdural haematoma stored uncompressed and as JPEG 2000 lossless, a Siemens targeted spine
reconstruction stored JPEG lossless (process 14), an NIH pancreas study slice (JPEG 2000, rows stored
posterior→anterior) and an Enhanced CT perfusion map. Labels come from looking at the images: all are clean
(no metal, motion, ring, noise or truncation artifact); the perfusion map is not CT numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("data_store", reason="pydicom-data (test dependency) is not installed")
from pydicom.data import get_testdata_file  # noqa: E402

ARTIFACTS = ("metal", "motion", "ring", "noise", "truncation")


def analyze(*names: str) -> dict:
    paths = [get_testdata_file(n) for n in names]
    assert all(paths), names
    r = subprocess.run([sys.executable, "-m", "medqc", "analyze", *paths, "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def slice_of(rep: dict, series_index: int = 0) -> dict:
    return rep["series"][series_index]["per_slice"][0]


def test_head_slice_same_result_uncompressed_and_jpeg2000():
    # the two files carry the same SOP instance: given together, the instance is analysed once
    assert len(analyze("693_UNCR.dcm", "693_J2KR.dcm")["series"][0]["per_slice"]) == 1
    a, b = slice_of(analyze("693_UNCR.dcm")), slice_of(analyze("693_J2KR.dcm"))
    assert a["scores"] == b["scores"] and a["position_ref_mm"] == b["position_ref_mm"]
    assert a["measures"]["skull_ring"] >= 0.75  # a skull around a brain-sized section
    assert 0 <= a["position_ref_mm"] <= 110  # above the skull base on the reference body
    assert all(a["scores"].get(k, 0.0) < 0.5 for k in ARTIFACTS), a["scores"]


def test_siemens_jpeg_lossless_targeted_spine_recon_is_not_truncation():
    """A 147 mm field centred on the spine cuts the body at every edge: a targeted reconstruction, not a
    patient outside the scan field."""
    rep = analyze("bad_sequence.dcm")
    s = rep["series"][0]
    assert s["manufacturer"] == "SIEMENS" and s["slices"] == 1
    p = slice_of(rep)
    assert p["scores"]["truncation"] < 0.5 and p["scores"]["metal"] < 0.5
    assert not [f for f in s["findings"] if f["check"].startswith("artifact.")]


def test_pancreas_slice_stored_upside_down_reads_as_upper_abdomen():
    """Rows run posterior→anterior (ImageOrientationPatient 1\\0\\0\\0\\-1\\0): mirrored into the training
    layout, the kidneys-and-pancreas slice sits between the liver dome and the iliac crests."""
    rep = analyze("explicit_VR-UN.dcm")
    s = rep["series"][0]
    assert s["protocol_rule"] == "abdomen"
    p = slice_of(rep)
    assert 430 <= p["position_ref_mm"] <= 665, p["position_ref_mm"]
    for k in ("metal", "ring", "noise", "truncation"):
        assert p["scores"][k] < 0.5, (k, p["scores"])
    assert p["measures"]["lung_area_mm2"] < 5000  # lung bases at most


def test_perfusion_map_is_recorded_not_analysed():
    rep = analyze("eCT_Supplemental.dcm")
    assert rep["series"] == []
    assert rep["rejected"] and all("not CT numbers" in r["reason"] for r in rep["rejected"])
