"""``medqc analyze``: the agent's pipeline offline, on the real study and on a synthetic study with known truth."""

from __future__ import annotations

import json
from pathlib import Path
import os
import subprocess
import sys



def medqc(*args, timeout=300):
    env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING")
    return subprocess.run([sys.executable, "-m", "medqc", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def status_of(doc: dict) -> int:
    """The exit status ``medqc analyze`` must give for a report (default --fail-on fail)."""
    return 1 if any(s["verdict"] == "fail" for s in doc["series"]) else 0


def test_real_study_json_report(real_ct, tiny_bundle):
    r = medqc("analyze", real_ct, "--json", "--bundle", tiny_bundle, "--backend", "onnxruntime")
    doc = json.loads(r.stdout)
    assert r.returncode == status_of(doc), r.stderr
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
    assert human.returncode == status_of(doc) and "verdict=" in human.stdout and "localizer" in human.stdout


def test_synthetic_metal_found_where_injected(tmp_path):
    out = tmp_path / "syn"
    r = medqc("synth", out, "--region", "chest", "--slices", "16", "--matrix", "256", "--artifact", "metal@6-8",
              "--seed", "3", "--no-progress")
    assert r.returncode == 0, f"medqc synth failed: {r.stderr[-500:]}"
    truth = json.loads((out / "truth.json").read_text())
    r = medqc("analyze", out, "--json", "--backend", "none")  # classical detectors only: no model needed
    doc = json.loads(r.stdout)
    assert r.returncode == status_of(doc), r.stderr
    s = doc["series"][0]
    assert s["series_instance_uid"] == truth["series_instance_uid"] and s["slices"] == 16
    metal = [f for f in s["findings"] if f["check"] == "artifact.metal"]
    assert len(metal) == 1 and metal[0]["first_instance"] == 6 and metal[0]["last_instance"] == 8
    assert s["verdict"] in ("warn", "fail")


def test_plot_writes_a_figure_per_series(tmp_path):
    """--plot: one PNG per series (coverage bar, artifact strips, the slice behind the metal finding), named
    by series number and UID, listed in the JSON report; no patient identifiers in it."""
    import matplotlib  # noqa: F401  (in the train and test extras)
    import cv2

    out = tmp_path / "syn"
    r = medqc("synth", out, "--region", "chest", "--slices", "16", "--matrix", "256", "--artifact", "metal@6-8",
              "--seed", "3", "--no-progress", "--patient-name", "Plotted^Patient")
    assert r.returncode == 0, f"medqc synth failed: {r.stderr[-500:]}"
    figs = tmp_path / "figs"
    r = medqc("analyze", out, "--json", "--plot", figs)
    doc = json.loads(r.stdout)
    assert r.returncode == status_of(doc), r.stderr
    (path,) = doc["figures"]
    assert Path(path).parent == figs and Path(path).name.startswith("series-001-")
    img = cv2.imread(path)
    assert img is not None and img.shape[1] >= 1200 and img.shape[0] >= 700
    # the finding's slice is shown: the picture is far from blank, and the text never names the patient
    assert float(img.std()) > 20
    assert b"Plotted" not in Path(path).read_bytes()
    r = medqc("analyze", out, "--plot", figs / "again")
    assert r.returncode == status_of(doc) and "figure: " in r.stdout
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
    r = medqc("analyze", tmp_path, "--bundle", tiny_bundle, "--json")  # empty folder: ran, nothing to analyse
    assert r.returncode == 3 and json.loads(r.stdout)["series"] == []
    r = medqc("analyze", tmp_path, "--fail-on", "info")
    assert r.returncode == 2 and "--fail-on" in r.stderr and "'warn'" in r.stderr


def _phantom_series(real_ct: Path, out: Path) -> list[Path]:
    """The real head phantom's 58-slice axial series (it passes: only a routine gantry tilt, info)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    files = sorted((real_ct / "S3010").glob("I*"), key=lambda p: int(p.name[1:]))
    return [Path(shutil.copy(f, out / f.name)) for f in files]


def test_exit_status_for_scripts(tmp_path, real_ct):
    """0 every series passed, 1 a verdict at or above --fail-on (default fail), 3 nothing analysable, 4 the
    analysis could not complete (here: the report cannot be written)."""
    clean = tmp_path / "clean"
    _phantom_series(real_ct, clean)
    r = medqc("analyze", clean, "--backend", "none", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [s["verdict"] for s in json.loads(r.stdout)["series"]] == ["pass"]
    assert medqc("analyze", clean, "--backend", "none", "--fail-on", "warn").returncode == 0

    # the same series with one file cut short in its pixel data: the series warns (input.undecodable)
    warn = tmp_path / "warn"
    cut = _phantom_series(real_ct, warn)[20]
    cut.write_bytes(cut.read_bytes()[:300_000])
    r = medqc("analyze", warn, "--backend", "none", "--json")
    (s,) = json.loads(r.stdout)["series"]
    assert s["verdict"] == "warn" and r.returncode == 0, r.stderr[-2000:]
    r = medqc("analyze", warn, "--backend", "none", "--fail-on", "warn")
    assert r.returncode == 1 and "verdict=WARN" in r.stdout

    # a series that fails: metal on 7 slices (critical)
    syn = tmp_path / "syn"
    r = medqc("synth", syn, "--region", "chest", "--slices", "16", "--matrix", "256", "--artifact", "metal:0.9@5-11",
              "--seed", "3", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    r = medqc("analyze", syn, "--backend", "none", "--json")
    assert [s["verdict"] for s in json.loads(r.stdout)["series"]] == ["fail"] and r.returncode == 1, r.stderr[-2000:]
    # a failing series among passing ones still exits 1
    assert medqc("analyze", syn, clean, "--backend", "none").returncode == 1

    # nothing analysable: files that are not DICOM
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image\n")
    r = medqc("analyze", junk, "--backend", "none")
    assert r.returncode == 3 and "no axial CT series found" in r.stdout

    # the report cannot be written (a full disk): the analysis did not complete
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "medqc", "analyze", str(clean), "--backend", "none", "--json"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
                           env=dict(os.environ, MEDQC_LOG_LEVEL="WARNING"))
    assert r.returncode == 4 and "No space left" in r.stderr, r.stderr


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
        doc = json.loads(r.stdout)
        assert r.returncode == status_of(doc), r.stderr[-2000:]
        (s,) = doc["series"]
        found[name] = {f["check"] for f in s["findings"] if f["check"].startswith("artifact.")}
    assert found == {"clean": set(), "moved": {"artifact.motion"}}, found


def test_offline_report_holds_final_findings_only(tmp_path, real_ct):
    """Offline nothing arrives over time: each series is judged once, complete. The real phantom series with
    the bundled model (whose coverage, judged early on a part of the series, would be withdrawn once the
    rest is in) reports its final findings only, and the summary never speaks of slices arriving."""
    series = tmp_path / "s"
    _phantom_series(real_ct, series)
    r = medqc("analyze", series, "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == status_of(doc), r.stderr[-2000:]
    (s,) = doc["series"]
    assert [f["check"] for f in s["findings"] if (f.get("details") or {}).get("resolved")] == []
    assert not [f for f in s["findings"] if "first_raised_at" in (f.get("details") or {})]
    text = medqc("analyze", series).stdout
    assert "withdrawn" not in text.lower() and "slices arrived" not in text, text


def test_truncated_and_foreign_files_in_medqc_words(tmp_path, real_ct):
    """One rule for a file cut short, wherever the cut falls: a CT image cut inside its pixel data (300 KB of
    531 KB) and one cut before them (2,000 bytes, after its series is named) are both undecodable images of
    their series, 'truncated file'; one cut at 1,000 bytes, before its series is named, is listed as not
    analysed with the same words. A file that is not DICOM says so without pydicom's advice, and the text
    summary names the files."""
    d = tmp_path / "in"
    files = _phantom_series(real_ct, d)
    for f, n in ((files[10], 2000), (files[20], 300_000), (files[30], 1000)):
        f.write_bytes(f.read_bytes()[:n])
    (d / "notes.txt").write_text("not an image\n")
    r = medqc("analyze", d, "--backend", "none", "--json")
    doc = json.loads(r.stdout)
    (s,) = doc["series"]
    errs = {row["sop_instance_uid"]: row["error"] for row in s["per_slice"] if row.get("error")}
    assert len(errs) == 2 and all(e.startswith("truncated file: ") for e in errs.values()), errs
    assert any("2,000 bytes" in e and "before the pixel data" in e for e in errs.values()), errs
    assert any("300,000 bytes" in e and "pixel data" in e for e in errs.values()), errs
    (und,) = [f for f in s["findings"] if f["check"] == "input.undecodable"]
    assert und["details"]["count"] == 2 and "(truncated file)" in und["message"]
    rejected = {Path(x["path"]).name: x["reason"] for x in doc["rejected"]}
    assert rejected[files[30].name].startswith("truncated file: 1,000 bytes") and "series" in rejected[files[30].name]
    assert rejected["notes.txt"].startswith("not a DICOM file") and "force" not in rejected["notes.txt"]
    text = medqc("analyze", d, "--backend", "none").stdout
    line = next(ln for ln in text.splitlines() if "not a DICOM file" in ln)
    assert "notes.txt" in line and "force" not in line.lower(), text
    assert any(files[30].name in ln and "truncated file" in ln for ln in text.splitlines()), text
    # a series of truncated files only: nothing could be analysed
    only = tmp_path / "only"
    only.mkdir()
    (only / "cut").write_bytes(files[40].read_bytes()[:300_000])
    assert medqc("analyze", only, "--backend", "none").returncode == 3


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
    doc = json.loads(r.stdout)
    assert r.returncode == status_of(doc), r.stderr
    assert len(doc["series"]) == 3
