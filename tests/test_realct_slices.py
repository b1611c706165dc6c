"""Real CT slices from several sources, through the public interfaces: ``medqc analyze`` and a running ``medqc agent``.

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
from conftest import missing_peer, need_module  # noqa: E402

need_module("data_store", "pydicom-data is in the test extra")
from pydicom.data import get_testdata_file  # noqa: E402
from medqc.dcmtk import dcmtk  # noqa: E402

ARTIFACTS = ("metal", "motion", "ring", "noise", "truncation")


def analyze(*names: str) -> dict:
    paths = [get_testdata_file(n) for n in names]
    assert all(paths), names
    r = subprocess.run([sys.executable, "-m", "medqc", "analyze", *paths, "--json"], capture_output=True, text=True, timeout=300)
    rep = json.loads(r.stdout)
    # medqc analyze's exit status: 3 nothing analysable, 1 a series failed, else 0
    want = 3 if not rep["series"] else 1 if any(s["verdict"] == "fail" for s in rep["series"]) else 0
    assert r.returncode == want, r.stderr[-2000:]
    return rep


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



def test_targeted_spine_without_the_scan_field_in_its_header_is_not_truncation(tmp_path):
    """The same slice with DataCollectionDiameter removed (as Philips headers come): the 147 mm field lies
    inside the body, a targeted reconstruction, still not truncation."""
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("bad_sequence.dcm"))
    del ds.DataCollectionDiameter
    ds.save_as(tmp_path / "spine.dcm")
    r = subprocess.run([sys.executable, "-m", "medqc", "analyze", str(tmp_path / "spine.dcm"), "--json"],
                       capture_output=True, text=True, timeout=300)
    (s,) = json.loads(r.stdout)["series"]
    assert r.returncode == (1 if s["verdict"] == "fail" else 0), r.stderr[-2000:]
    p = s["per_slice"][0]
    assert p["measures"]["field_inside_body"] == 1.0 and p["scores"]["truncation"] < 0.5


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


def test_tilted_jpeg2000_head_with_signed_13_bit_pixels():
    """A real head slice (JPEG 2000, 13 bits stored as signed with -2000 outside the field, gantry tilted
    22°): read as HU with the padding masked, a skull around brain, no artifact, tilt reported as routine."""
    rep = analyze("J2K_pixelrep_mismatch.dcm")
    s = rep["series"][0]
    assert s["protocol_rule"] == "head" and s["verdict"] == "pass"
    assert [f["check"] for f in s["findings"]] == ["geometry.tilt"] and s["findings"][0]["severity"] == "info"
    p = slice_of(rep)
    assert p["measures"]["skull_ring"] >= 0.75 and p["measures"]["metal_area_mm2"] == 0
    assert 0 <= p["position_ref_mm"] <= 180, p["position_ref_mm"]
    for k in ("metal", "ring", "noise", "truncation"):
        assert p["scores"][k] < 0.5, (k, p["scores"])


def test_perfusion_map_is_recorded_not_analysed():
    rep = analyze("eCT_Supplemental.dcm")
    assert rep["series"] == []
    assert rep["rejected"] and all("not CT numbers" in r["reason"] for r in rep["rejected"])


def test_agent_receives_real_compressed_ct_from_dcmtk_and_pynetdicom(tmp_path, port):
    """The running agent (embedded model) receives the real slices over DICOM in their own transfer syntaxes
    — JPEG 2000 from DCMTK storescu, JPEG lossless (process 14) from storescu, the NIH slice and the
    perfusion map from a pynetdicom SCU — analyses the CT images and records the map as not CT numbers."""
    import os
    import signal
    import socket
    import sqlite3
    import time


    import pydicom
    from pynetdicom import AE
    from pynetdicom.presentation import build_context

    storescu = dcmtk("storescu")
    if not storescu:
        missing_peer("storescu (dcmtk) is not installed (.ci/run installs it)")
    state, out = tmp_path / "state", tmp_path / "out.jsonl"
    cfg = tmp_path / "medqc.toml"
    cfg.write_text("[series]\nidle_timeout_s = 1.0\n[spool]\nmin_free_mb = 0\n[http]\nenabled = false\n")
    env = dict(os.environ, TCP_NODELAY="1")
    proc = subprocess.Popen([sys.executable, "-m", "medqc", "agent", "--port", str(port), "--state-dir", str(state),
                             "--config", str(cfg), "--backend", "onnxruntime"],
                            stdout=open(out, "w"), stderr=open(tmp_path / "err.log", "w"), env=env)
    try:
        end = time.time() + 60
        while time.time() < end:
            assert proc.poll() is None, (tmp_path / "err.log").read_text()[-2000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        for name, propose in (("693_J2KR.dcm", "-xv"), ("bad_sequence.dcm", "-xs")):
            r = subprocess.run([storescu, propose, "-aec", "MEDQC", "127.0.0.1", str(port), get_testdata_file(name)],
                               capture_output=True, text=True, timeout=60, env=env)
            assert r.returncode == 0, r.stderr
        dss = [pydicom.dcmread(get_testdata_file(n)) for n in ("explicit_VR-UN.dcm", "eCT_Supplemental.dcm")]
        ae = AE(ae_title="PYNETDICOM")
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDQC",
                             contexts=[build_context(d.SOPClassUID, [d.file_meta.TransferSyntaxUID]) for d in dss])
        assert assoc.is_established
        assert [assoc.send_c_store(d).Status for d in dss] == [0, 0]
        assoc.release()
        end = time.time() + 60
        series = []
        while time.time() < end and len(series) < 3:
            series = [d for d in map(json.loads, out.read_text().splitlines()) if d.get("event") == "series"]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert sorted(s["protocol_rule"] or "-" for s in series) == ["-", "abdomen", "neck"]
    assert all(s["slices"] == 1 and s["verdict"] in ("pass", "warn") for s in series)
    findings = [d for d in map(json.loads, out.read_text().splitlines()) if d.get("event") == "finding"]
    assert not [f for f in findings if f["check"].startswith(("artifact.", "input."))], findings
    db = sqlite3.connect(state / "medqc.sqlite")
    reasons = [r[0] for r in db.execute("SELECT reason FROM rejected")]
    assert reasons and all("not CT numbers" in r for r in reasons), reasons
