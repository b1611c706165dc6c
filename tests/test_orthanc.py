"""Orthanc, the open-source PACS many departments route through, as a real peer on loopback:

- ``medqc replay`` sends studies into Orthanc (a storage SCP that is not DCMTK and not ourselves), compressed
  real CT included, and every instance arrives intact;
- Orthanc, as the SCU (its C-STORE to a configured modality, as a PACS router forwards a study), sends a
  study to a running ``medqc agent``, which analyses every slice and gives the series its verdict.

``.ci/run`` installs Orthanc from Debian; without it the tests are skipped, except under MEDQC_REQUIRE_PEERS=1
(as ``.ci/run`` sets), where its absence fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from conftest import missing_peer, need_module  # noqa: E402

PY = sys.executable


def Orthanc(tmp: Path, modalities: dict | None = None):
    """A started Orthanc (``medqc.tools.orthanc``) that checks the called AE title and lets a study settle
    after 1 s."""
    from medqc.tools.orthanc import OrthancProcess, executable

    if executable() is None:
        missing_peer("Orthanc is not installed (.ci/run installs it)")
    return OrthancProcess(tmp / "orthanc", "medqc-test", modalities, StableAge=1, DicomScuTimeout=30).start(30)


def _medqc(*args, timeout=180):
    env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING")
    return subprocess.run([PY, "-m", "medqc", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_replay_into_orthanc_real_and_synthetic(tmp_path):
    """A synthetic series (uncompressed) and two real JPEG 2000 CT slices (pydicom-data) replayed into
    Orthanc: every instance stored, pixel data unchanged, transfer syntax kept. A real file whose UIDs are
    not valid (an anonymiser wrote hex digests) is refused by Orthanc (0xA900): replay names the file, says
    why, and exits 1 while the rest is stored."""
    import pydicom

    from medqc.tools.bench.study import write_phantom_series

    files = write_phantom_series(tmp_path / "study" / "synthetic", 12, size=128)
    data = need_module("pydicom.data")
    real = tmp_path / "study" / "real"
    real.mkdir()
    for name in ("693_J2KR.dcm", "J2K_pixelrep_mismatch.dcm", "bad_sequence.dcm"):
        shutil.copy(data.get_testdata_file(name), real / name)
    pacs = Orthanc(tmp_path)
    try:
        out = tmp_path / "r.json"
        r = _medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{pacs.port}", "--called-aet", "ORTHANC",
                   "--asap", "--json", str(out))
        assert r.returncode == 1, r.stdout + r.stderr
        doc = json.loads(out.read_text())
        assert doc["transport"]["sent"] == 14 and doc["transport"]["failed"] == 1
        (bad,) = doc["transport"]["failures"]
        assert bad["file"].endswith("bad_sequence.dcm") and "0xA900" in bad["error"] and "not valid DICOM UIDs" in bad["note"]
        assert "bad_sequence.dcm — its UIDs are not valid" in r.stdout
        stats = pacs.get("/statistics")
        assert stats["CountInstances"] == 14, stats
        # what Orthanc stored is what was sent: same SOP instances, same transfer syntax, same pixels
        by_uid = {}
        for iid in pacs.get("/instances"):
            tags = pacs.get(f"/instances/{iid}/simplified-tags")
            by_uid[tags["SOPInstanceUID"]] = iid
        for f in [*files, real / "693_J2KR.dcm", real / "J2K_pixelrep_mismatch.dcm"]:
            ds = pydicom.dcmread(f)
            iid = by_uid[str(ds.SOPInstanceUID)]
            meta = pacs.get(f"/instances/{iid}/metadata?expand")
            assert meta["TransferSyntax"] == str(ds.file_meta.TransferSyntaxUID)
            with urllib.request.urlopen(f"{pacs.url}/instances/{iid}/file", timeout=10) as resp:
                stored = pydicom.dcmread(__import__("io").BytesIO(resp.read()))
            assert stored.PixelData == ds.PixelData
    finally:
        pacs.stop()


def test_orthanc_routes_a_study_to_the_agent(tmp_path):
    """Orthanc as the sending peer: a study uploaded to it is forwarded by its own C-STORE SCU to a running
    agent (embedded model), which analyses every slice and closes the series with a verdict."""
    from medqc.tools.bench.harness import AgentProcess

    study = tmp_path / "study"
    r = _medqc("synth", str(study), "--region", "chest", "--slices", "16", "--matrix", "256", "--seed", "4",
               "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(study.glob("*.dcm"))
    assert len(files) == 16
    agent = AgentProcess(tmp_path / "agent", None, inference=True)
    why = agent.start()
    assert not why, f"the agent did not start: {why}"
    pacs = None
    try:
        pacs = Orthanc(tmp_path, {"medqc": ["MEDQC", "127.0.0.1", agent.port]})
        ids = [pacs.post("/instances", f.read_bytes())["ID"] for f in files]
        job = pacs.post("/modalities/medqc/store", json.dumps({"Resources": ids, "Synchronous": True}).encode())
        assert job.get("FailedInstancesCount", 0) == 0 and job.get("InstancesCount") == 16, job
        import pydicom

        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        times, verdict, _ = agent.wait_series(uid, 16, timeout=90)
        assert len(times) == 16 and verdict in ("pass", "warn", "fail"), (len(times), verdict, agent.tail())
        assert [s["series_instance_uid"] for s in agent.store().series_summaries(10)] == [uid]
    finally:
        if pacs is not None:
            pacs.stop()
        agent.stop()
