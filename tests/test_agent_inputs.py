"""Bad and unusual inputs sent by DCMTK storescu into a running ``medqc agent``: compressed syntaxes
(JPEG lossless, JPEG-LS, RLE), an undecodable JPEG 2000 payload, truncated pixel data, missing geometry,
a dose report. Every C-STORE succeeds; nothing crashes; the series gets an ``input.undecodable`` finding."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, generate_uid

sys.path.insert(0, str(Path(__file__).parent))
from test_agent_dicom import AgentProc, need_tool, storescu  # noqa: E402


def _build_inputs(real_ct: Path, out: Path) -> str:
    src = real_ct / "S3010"
    out.mkdir()
    env = dict(os.environ)
    for tool, args, name in (("dcmcjpeg", ["--encode-lossless-sv1"], "I10"), ("dcmcjpls", [], "I20"), ("dcmcrle", [], "I30")):
        exe = need_tool(tool)
        subprocess.run([exe, *args, str(src / name), str(out / f"{tool}.dcm")], check=True, env=env, capture_output=True)
    j2k = pydicom.dcmread(src / "I40")
    j2k.file_meta.TransferSyntaxUID = JPEG2000Lossless
    j2k.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream at all"])
    j2k["PixelData"].VR = "OB"
    j2k.save_as(out / "j2k-garbage.dcm", enforce_file_format=True)
    short = pydicom.dcmread(src / "I50")
    short.PixelData = short.PixelData[:1000]
    short.save_as(out / "truncated.dcm", enforce_file_format=True)
    nogeo = pydicom.dcmread(src / "I60")
    del nogeo.ImagePositionPatient
    del nogeo.PixelSpacing
    nogeo.save_as(out / "no-geometry.dcm", enforce_file_format=True)
    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-ray dose SR
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.Modality = j2k.StudyInstanceUID, generate_uid(), "SR"
    sr.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    sr.save_as(out / "dose.dcm", enforce_file_format=True)
    return str(j2k.SeriesInstanceUID)


def test_bad_and_compressed_inputs_over_dicom(tmp_path, port, tiny_bundle, real_ct):
    series_uid = _build_inputs(real_ct, tmp_path / "in")
    a = AgentProc(tmp_path, port, tiny_bundle).start()
    try:
        opts = {"dcmcjpeg.dcm": "-xs", "dcmcjpls.dcm": "-xt", "dcmcrle.dcm": "-xr", "j2k-garbage.dcm": "-xv"}
        for f in sorted((tmp_path / "in").iterdir()):  # each file with its own transfer syntax proposed
            r = storescu(port, f, *([opts[f.name]] if f.name in opts else []))
            assert r.returncode == 0 and "Failed" not in r.stderr, (f.name, r.stderr[-2000:])
        series = a.wait_series(1)
    finally:
        rc = a.stop()
    assert rc == 0
    s = next(x for x in series if x["series_instance_uid"] == series_uid)
    assert s["slices"] == 6  # 3 compressed slices analysed + 3 that could not be
    und = [f for f in a.events("finding") if f["check"] == "input.undecodable"]
    assert und and und[-1]["series_instance_uid"] == series_uid
    db = sqlite3.connect(a.state / "medqc.sqlite")
    rows = [json.loads(b) for (b,) in db.execute("SELECT body FROM slices WHERE series_uid = ?", (series_uid,))]
    ok = [x for x in rows if not x["error"]]
    errs = sorted(x["error"] for x in rows if x["error"])
    assert len(ok) == 3 and all(x["scores"] for x in ok)
    assert len(errs) == 3 and any("cannot be decoded" in e and JPEG2000Lossless in e for e in errs)
    assert any("truncated" in e for e in errs) and any("PixelSpacing" in e for e in errs)
    assert any("no image pixels" in r_ for (r_,) in db.execute("SELECT reason FROM rejected"))
    kept = list((a.state / "spool" / "kept").iterdir())
    assert len(kept) == 3  # undecodable inputs are kept for inspection, the rest deleted after the verdict
    assert list((a.state / "spool" / "incoming").iterdir()) == []
