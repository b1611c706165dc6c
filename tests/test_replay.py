"""medqc replay against a real DCMTK storescp on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port, need_tool  # noqa: E402

PY = sys.executable


def write_ct_series(folder: Path, n: int, rows: int = 64, study_uid: str | None = None, content_step_s: float | None = None) -> list[Path]:
    """``n`` small but complete CT Image Storage files (explicit VR little endian), one series."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    rng = np.random.default_rng(n)
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{i:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.PatientName = "Replay^Test"
        ds.PatientID = "RT1"
        ds.SeriesNumber = 2
        ds.InstanceNumber = n - i  # written in reverse: replay must order by InstanceNumber
        ds.ImagePositionPatient = [0.0, 0.0, -2.5 * (n - i)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        if content_step_s is not None:
            t = 10 * 3600 + 5 * 60 + (n - i) * content_step_s
            ds.ContentDate = "20260101"
            ds.ContentTime = f"{int(t // 3600):02d}{int(t % 3600 // 60):02d}{t % 60:09.6f}"
        ds.Rows = ds.Columns = rows
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = (rng.normal(1024, 20, (rows, rows))).astype(np.int16).tobytes()
        p = folder / f"{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


class StoreSCP:
    def __init__(self, tmp: Path, *extra: str):
        exe = need_tool("storescp")
        self.port = free_port()
        self.dir = tmp / f"scp-{self.port}"
        self.dir.mkdir()
        env = dict(os.environ, TCP_NODELAY="1")
        # --fork: one process per association (several studies at once; the start-up probe below does not
        # hold the only association slot)
        self.proc = subprocess.Popen([exe, "--fork", *extra, "-od", str(self.dir), str(self.port)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        import socket

        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def files(self) -> list[Path]:
        return [p for p in self.dir.iterdir() if p.is_file()]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def scp(tmp_path):
    s = StoreSCP(tmp_path)
    yield s
    s.stop()


def medqc(*args, timeout=120):
    env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING")
    return subprocess.run([PY, "-m", "medqc", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_paced_replay_reaches_storescp_in_time(tmp_path, scp):
    write_ct_series(tmp_path / "study", 50)
    out = tmp_path / "r.json"
    png = tmp_path / "r.png"
    t0 = time.time()
    r = medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{scp.port}", "--rate", "50", "--json", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(scp.files()) == 50
    doc = json.loads(out.read_text())
    assert doc["schema"] == "medqc.replay/1"
    t = doc["transport"]
    assert t["sent"] == 50 and t["failed"] == 0 and t["raw_sends"] == 50
    # 50 slices at 50/s: the first at 0 s, the last at 0.98 s
    series = t["series"][0]
    assert 0.9 <= series["duration_s"] <= 1.4, series
    assert 40 <= series["rate_slices_per_s"] <= 52
    for key in ("p50", "p90", "p99", "max"):
        assert 0 < t["c_store_rtt_ms"][key] < 1000
    assert t["schedule_lag_ms"]["p90"] < 50
    # sends in InstanceNumber order (the files were written in reverse)
    numbers = [s["instance_number"] for s in doc["sends"]]
    assert numbers == sorted(numbers)
    assert "C-STORE round trip" in r.stdout and "p99" in r.stdout
    assert png.stat().st_size > 5000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert time.time() - t0 < 60


def test_several_studies_are_sent_at_once(tmp_path, scp):
    for k in range(3):
        write_ct_series(tmp_path / "in" / f"study{k}", 20)
    out = tmp_path / "r.json"
    r = medqc("replay", *(str(tmp_path / "in" / f"study{k}") for k in range(3)), "--to", f"127.0.0.1:{scp.port}", "--rate", "40",
              "--associations", "3", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(scp.files()) == 60
    doc = json.loads(out.read_text())
    assert doc["studies"] == 3 and len(doc["transport"]["series"]) == 3
    assert all(s["associations"] == 1 for s in doc["transport"]["series"])
    # the three studies (0.5 s each at 40 slices/s) overlapped in time
    spans = []
    for s in doc["transport"]["series"]:
        sends = [x for x in doc["sends"] if x["series_uid"] == s["series_instance_uid"]]
        spans.append((min(x["sent_at"] for x in sends), max(x["acked_at"] for x in sends)))
    assert max(a for a, _ in spans) < min(b for _, b in spans)


def test_as_recorded_follows_content_time(tmp_path, scp):
    write_ct_series(tmp_path / "study", 11, content_step_s=0.1)
    out = tmp_path / "r.json"
    r = medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{scp.port}", "--as-recorded", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    series = json.loads(out.read_text())["transport"]["series"][0]
    assert series["sent"] == 11
    assert 0.9 <= series["duration_s"] <= 1.4, series  # 10 gaps of 0.1 s


def test_unreachable_scp_fails_with_summary(tmp_path):
    write_ct_series(tmp_path / "study", 3)
    t0 = time.time()
    r = medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{free_port()}", "--asap")
    assert r.returncode == 1
    assert "cannot connect" in r.stdout and "sent 0 of 3" in r.stdout
    assert time.time() - t0 < 30


def test_rejected_association_fails_with_summary(tmp_path):
    s = StoreSCP(tmp_path, "--refuse")
    try:
        write_ct_series(tmp_path / "study", 3)
        r = medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{s.port}", "--called-aet", "NOBODY")
    finally:
        s.stop()
    assert r.returncode == 1
    assert "rejected" in r.stdout and "'NOBODY'" in r.stdout and "sent 0 of 3" in r.stdout


def test_non_dicom_files_are_reported_and_the_rest_sent(tmp_path, scp):
    write_ct_series(tmp_path / "study", 5)
    (tmp_path / "study" / "notes.txt").write_text("not an image\n")
    (tmp_path / "study" / "empty.dcm").write_bytes(b"")
    r = medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{scp.port}", "--asap")
    assert r.returncode == 1, r.stdout
    assert "notes.txt" in r.stdout and "empty.dcm" in r.stdout and "2 file(s) skipped" in r.stdout
    assert len(scp.files()) == 5
    r2 = medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{scp.port}", "--asap", "--ignore-non-dicom")
    assert r2.returncode == 0, r2.stdout


def test_compressed_study_is_decompressed_for_a_peer_that_takes_only_uncompressed(tmp_path, scp):
    """Archived studies are often compressed (here RLE and JPEG-LS lossless); DCMTK's storescp accepts only
    uncompressed data by default, so no context for the file's own syntax is accepted. The files are
    decompressed and sent uncompressed, pixel for pixel (before, every C-STORE failed)."""
    import pydicom
    from pydicom.uid import JPEGLSLossless, RLELossless

    src = write_ct_series(tmp_path / "plain", 4)
    study = tmp_path / "study"
    study.mkdir()
    pixels = {}
    for k, p in enumerate(src):
        ds = pydicom.dcmread(p)
        arr = ds.pixel_array.copy()
        try:
            ds.compress(RLELossless if k % 2 else JPEGLSLossless, generate_instance_uid=False)
        except Exception:  # noqa: BLE001 - no JPEG-LS encoder installed here: RLE (pydicom's own) then
            ds.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
        pixels[ds.SOPInstanceUID] = arr  # the peer must receive the same instance (UID) with the same pixels
        ds.save_as(study / p.name, enforce_file_format=True)
    assert all(pydicom.dcmread(p).file_meta.TransferSyntaxUID.is_compressed for p in study.iterdir())
    out = tmp_path / "r.json"
    r = medqc("replay", str(study), "--to", f"127.0.0.1:{scp.port}", "--asap", "--json", str(out))
    t = json.loads(out.read_text())["transport"]
    assert r.returncode == 0 and t["sent"] == 4 and t["failed"] == 0, (r.stdout, t["errors"])
    assert t["raw_sends"] == 0  # every one re-encoded
    got = [pydicom.dcmread(p) for p in scp.files()]
    assert len(got) == 4
    for ds in got:
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert np.array_equal(ds.pixel_array, pixels[ds.SOPInstanceUID])


def test_real_vendor_study(tmp_path, scp, real_ct):
    out = tmp_path / "r.json"
    r = medqc("replay", str(real_ct), "--to", f"127.0.0.1:{scp.port}", "--asap", "--json", str(out))
    doc = json.loads(out.read_text())
    t = doc["transport"]
    # localizer, two tilted axial series and the secondary captures go out; DIRFILEs and LICENSE do not
    assert t["sent"] == 118 and t["failed"] == 0, t["errors"]
    assert len(t["series"]) == 4
    assert len(scp.files()) == 118
    reasons = {Path(s["path"]).name: s["reason"] for s in t["skipped"]}
    assert set(reasons) == {"DIRFILE", "LICENSE"}
    assert r.returncode == 1  # skipped files are reported in the status unless --ignore-non-dicom


def test_usage_errors_exit_2(tmp_path):
    write_ct_series(tmp_path / "study", 1)
    for args in (["--to", "nohostport"], ["--to", "127.0.0.1:1", "--rate", "0"], ["--to", "127.0.0.1:1", "--asap", "--rate", "5"]):
        r = medqc("replay", str(tmp_path / "study"), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "error" in r.stderr
    r = medqc("replay", str(tmp_path / "missing"), "--to", "127.0.0.1:104")
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_plan_orders_and_paces():
    from medqc.tools.replay.plan import Instance, plan

    insts = [Instance(f"/x/{k}", "st", "se", "1.2", f"1.{k}", "1.2.840.10008.1.2.1", instance_number=k, recorded_s=100 + (10 - k) * 0.5) for k in (3, 1, 2)]
    (study,) = plan(list(insts), "rate", rate=4)
    sp = study.series[0]
    assert [i.instance_number for i in sp.instances] == [1, 2, 3]
    assert sp.offsets == [0.0, 0.25, 0.5]
    (study,) = plan(list(insts), "recorded", max_gap_s=0.3)
    assert [i.instance_number for i in study.series[0].instances] == [3, 2, 1]  # recorded time order
    assert study.series[0].offsets == [0.0, 0.3, 0.6]  # 0.5 s gaps capped at 0.3 s


def test_dimse_timeout_is_reported_and_recovered(tmp_path):
    """A peer that stalls on one C-STORE: replay gives up after --dimse-timeout, re-associates, resends."""
    import threading

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    received, stalled = [], threading.Event()

    def on_store(event):
        uid = event.request.AffectedSOPInstanceUID
        if len(received) == 1 and not stalled.is_set():
            stalled.set()
            time.sleep(2.0)  # longer than the sender's DIMSE timeout
            return 0xA700
        received.append(uid)
        return 0x0000

    ae = AE(ae_title="STALL")
    ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        write_ct_series(tmp_path / "study", 4)
        out = tmp_path / "r.json"
        t0 = time.time()
        r = medqc("replay", str(tmp_path / "study"), "--to", f"127.0.0.1:{port}", "--called-aet", "STALL", "--asap",
                  "--dimse-timeout", "0.5", "--json", str(out))
        took = time.time() - t0
    finally:
        server.shutdown()
    doc = json.loads(out.read_text())
    t = doc["transport"]
    assert r.returncode == 0, r.stdout + r.stderr
    assert t["sent"] == 4 and len(set(received)) == 4
    assert t["series"][0]["associations"] == 2
    assert any("no C-STORE response within 0.5 s" in k for k in t["recovered"]), t
    assert "recovered x1" in r.stdout
    assert took < 30
