"""``medqc analyze``: the agent's pipeline offline, on the real study and on a synthetic study with known truth."""

from __future__ import annotations

import json
from pathlib import Path
import os
import subprocess
import sys

import pytest


def medqc(*args, timeout=300):
    env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING")
    return subprocess.run([sys.executable, "-m", "medqc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_real_study_json_report(real_ct, tiny_bundle):
    r = medqc("analyze", real_ct, "--json", "--bundle", tiny_bundle, "--backend", "onnxruntime")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "medqc.report/1"
    assert sorted(s["slices"] for s in doc["series"]) == [54, 58]
    for s in doc["series"]:
        assert s["verdict"] in ("pass", "warn", "fail") and s["body_part"] == "BRAIN"
        assert len(s["per_slice"]) == s["slices"]
        row = s["per_slice"][0]
        assert set(row) >= {"sop_instance_uid", "instance_number", "z", "scores", "position_ref_mm"}
        assert set(row["scores"]) == {"metal", "motion", "ring", "noise", "truncation"}
        assert any(f["check"] == "geometry.tilt" for f in s["findings"])
        for f in s["findings"]:
            assert set(f) >= {"check", "severity", "first_instance", "last_instance", "z_range_mm", "score", "message"}
    reasons = [x["reason"] for x in doc["rejected"]]
    assert any("localizer" in x for x in reasons) and any("not a DICOM file" in x for x in reasons)
    assert all("path" in x or "sop_instance_uid" in x for x in doc["rejected"])
    human = medqc("analyze", real_ct, "--bundle", tiny_bundle)
    assert human.returncode == 0 and "verdict=" in human.stdout and "localizer" in human.stdout


def test_synthetic_metal_found_where_injected(tmp_path):
    out = tmp_path / "syn"
    r = medqc("synth", out, "--region", "chest", "--slices", "16", "--matrix", "256", "--artifact", "metal@6-8",
              "--seed", "3", "--no-progress")
    if r.returncode != 0:
        pytest.skip(f"medqc synth unavailable: {r.stderr[-500:]}")
    truth = json.loads((out / "truth.json").read_text())
    r = medqc("analyze", out, "--json", "--backend", "none")  # classical detectors only: no model needed
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)["series"][0]
    assert s["series_instance_uid"] == truth["series_instance_uid"] and s["slices"] == 16
    metal = [f for f in s["findings"] if f["check"] == "artifact.metal"]
    assert len(metal) == 1 and metal[0]["first_instance"] == 6 and metal[0]["last_instance"] == 8
    assert s["verdict"] in ("warn", "fail")


def test_plot_writes_a_figure_per_series(tmp_path):
    """--plot: one PNG per series (coverage bar, artifact strips, the slice behind the metal finding), named
    by series number and UID, listed in the JSON report; no patient identifiers in it."""
    pytest.importorskip("matplotlib")
    import cv2

    out = tmp_path / "syn"
    r = medqc("synth", out, "--region", "chest", "--slices", "16", "--matrix", "256", "--artifact", "metal@6-8",
              "--seed", "3", "--no-progress", "--patient-name", "Plotted^Patient")
    if r.returncode != 0:
        pytest.skip(f"medqc synth unavailable: {r.stderr[-500:]}")
    figs = tmp_path / "figs"
    r = medqc("analyze", out, "--json", "--plot", figs)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (path,) = doc["figures"]
    assert Path(path).parent == figs and Path(path).name.startswith("series-001-")
    img = cv2.imread(path)
    assert img is not None and img.shape[1] >= 1200 and img.shape[0] >= 700
    # the finding's slice is shown: the picture is far from blank, and the text never names the patient
    assert float(img.std()) > 20
    assert b"Plotted" not in Path(path).read_bytes()
    r = medqc("analyze", out, "--plot", figs / "again")
    assert r.returncode == 0 and "figure: " in r.stdout
    (tmp_path / "a-file").write_text("x")
    r = medqc("analyze", out, "--plot", tmp_path / "a-file" / "figs")
    assert r.returncode == 2 and "--plot" in r.stderr and "Traceback" not in r.stderr


def test_usage_errors_exit_2(tmp_path, tiny_bundle):
    r = medqc("analyze", tmp_path / "nope")
    assert r.returncode == 2 and "no such file or folder" in r.stderr
    r = medqc("analyze", tmp_path, "--backend", "cuda-please")
    assert r.returncode == 2 and "onnxruntime" in r.stderr  # the message names the allowed values
    r = medqc("analyze", tmp_path, "--bundle", tmp_path)
    assert r.returncode == 2 and "manifest.json" in r.stderr
    r = medqc("analyze", tmp_path, "--bundle", tiny_bundle, "--json")  # empty folder: ran, nothing found
    assert r.returncode == 0 and json.loads(r.stdout)["series"] == []


def test_motion_injected_into_every_slice_of_a_real_series_is_found(tmp_path, real_ct):
    """A patient moving all through the series: motion injected (projection-domain physics) into every one of
    14 real vendor head slices. Each slice's score stays near the threshold and no run stands out from the
    series' own median, but the air around the head is streaked on most slices: artifact.motion is raised.
    The same slices without injection raise no artifact."""
    import shutil

    src = tmp_path / "real"
    src.mkdir()
    files = sorted((real_ct / "S3010").glob("I*"), key=lambda p: int(p.name[1:]))[:14]
    for f in files:
        shutil.copy(f, src / f.name)
    out = tmp_path / "moved"
    r = medqc("synth", out, "--inject", "motion:0.8", "--from", src, "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    found = {}
    for name, d in (("clean", src), ("moved", out)):
        r = medqc("analyze", d, "--json")
        assert r.returncode == 0, r.stderr[-2000:]
        (s,) = json.loads(r.stdout)["series"]
        found[name] = {f["check"] for f in s["findings"] if f["check"].startswith("artifact.")}
    assert found == {"clean": set(), "moved": {"artifact.motion"}}, found


def test_report_holds_every_series_beyond_the_agents_memory(tmp_path):
    """The agent keeps only ``series.keep_recent`` completed series in memory; ``medqc analyze`` reports every
    series of its input all the same (three single-slice series, keep_recent = 1)."""
    import pydicom
    from pydicom.data import get_testdata_file

    for i in range(3):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{i + 1}"
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}"
        ds.save_as(tmp_path / f"s{i}.dcm")
    cfg = tmp_path / "medqc.toml"
    cfg.write_text("[series]\nkeep_recent = 1\n")
    r = medqc("analyze", tmp_path, "--json", "--backend", "none", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["series"]) == 3
