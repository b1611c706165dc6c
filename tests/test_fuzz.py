"""The decode path under fuzzing (tests/fuzz/fuzz_decode.py, atheris/libFuzzer): a bounded run from the
synthetic, pydicom and real seeds must end without a crash, a hang or running out of memory; and the inputs
earlier runs found crashing, rebuilt here from public files, are rejected as ``NotDicom``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from conftest import missing_peer  # noqa: E402

from medqc.agent.decode import NotDicom, decode_file

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_decode.py"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _synth(tmp_path) -> Path:
    out = tmp_path / "synth"
    subprocess.run([sys.executable, "-m", "medqc", "synth", "--region", "head", "--slices", "1", "--matrix", "64",
                    "--seed", "3", "--no-progress", str(out)], check=True, capture_output=True, timeout=300)
    return next(out.glob("*.dcm"))


def test_corrupt_deflate_stream_is_not_dicom(tmp_path):
    """Found by fuzzing: a deflated dataset whose stream is corrupt raised zlib.error out of decode_file."""
    data = bytearray((TEST_FILES / "image_dfl.dcm").read_bytes())
    ds = pydicom.dcmread(TEST_FILES / "image_dfl.dcm", stop_before_pixels=True)
    start = 132 + 12 + ds.file_meta.FileMetaInformationGroupLength  # the deflate stream follows the file meta
    data[start + 40:start + 80] = bytes(range(40))
    p = tmp_path / "x.dcm"
    p.write_bytes(bytes(data))
    with pytest.raises(NotDicom, match=r"unreadable DICOM \(error: Error -3 while decompressing"):
        decode_file(p)


def test_file_meta_length_of_the_wrong_size_is_not_dicom_and_quotes_no_bytes(tmp_path):
    """Found by fuzzing: File Meta Information Group Length read as UN with a length that is no multiple of 4
    raised pydicom's BytesLengthException, whose message quotes the element's bytes."""
    data = bytearray(_synth(tmp_path).read_bytes())
    assert data[128:132] == b"DICM" and data[136:138] == b"UL"
    data[136:138] = b"UN"  # its 2 length bytes become UN's reserved ones, and the value's first 4 its length:
    length = int.from_bytes(data[140:144], "little")
    if length % 4 == 0:
        data[140:144] = (length + 2).to_bytes(4, "little")  # a value of length 4k + 2, as the fuzzer's
    p = tmp_path / "x.dcm"
    p.write_bytes(bytes(data))
    with pytest.raises(NotDicom, match=r"unreadable DICOM \(BytesLengthException: ") as e:
        decode_file(p)
    assert "<bytes>" in str(e.value) and "b'" not in str(e.value) and "1.2.840" not in str(e.value)


def _atheris() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError:
        missing_peer("atheris is not installed (pip install -e '.[test]')")


def _fuzz(tmp_path, seconds: int, real_ct: Path | None = None) -> dict:
    _atheris()
    corpus = tmp_path / "corpus"
    cmd = [sys.executable, str(HARNESS), "--seeds", str(corpus)] + (["--real-ct", str(real_ct)] if real_ct else []) + [
        "--", str(corpus), f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=0", "-max_len=600000",
        f"-artifact_prefix={tmp_path}/", "-print_final_stats=1", "-seed=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 240, cwd=tmp_path,
                       env=dict(os.environ, MEDQC_FUZZ_TMP=str(tmp_path)))
    found = sorted(p.name for p in tmp_path.iterdir() if re.match(r"(crash|timeout|oom|leak)-", p.name))
    assert r.returncode == 0 and not found, (found, r.stderr[-4000:])
    runs = re.search(r"stat::number_of_executed_units:\s+(\d+)", r.stderr)
    seeds = re.search(r"(\d+) seed inputs", r.stderr)
    return {"runs": int(runs.group(1)), "seeds": int(seeds.group(1))}


def test_fuzz_decode_bounded_synthetic_seeds(tmp_path):
    got = _fuzz(tmp_path, 20)
    assert got["seeds"] >= 70 and got["runs"] > got["seeds"]  # past the seeds: it really mutated inputs


def test_fuzz_decode_bounded_real_seeds(tmp_path, real_ct):
    got = _fuzz(tmp_path, 20, real_ct.parent)
    assert got["seeds"] >= 80 and got["runs"] > got["seeds"]


def _with_unknown_vr(tmp_path, element: bytes):
    """A synthetic CT file whose ``element`` (tag and VR as written, explicit VR little endian) is rewritten
    with the VR 'U5', which no standard defines."""
    data = bytearray(_synth(tmp_path).read_bytes())
    at = data.find(element)
    assert at > 0
    data[at + 4:at + 6] = b"U5"
    p = tmp_path / "x.dcm"
    p.write_bytes(bytes(data))
    return p


def test_element_with_an_unknown_vr_is_an_error_record_not_an_exception(tmp_path):
    """Found by fuzzing: Study Instance UID written with an unknown VR raised NotImplementedError from the
    fallback that reads a broken header's UIDs. Now the instance is a record with the error, its other UIDs
    read."""
    (d,) = decode_file(_with_unknown_vr(tmp_path, b"\x20\x00\x0d\x00UI"))
    assert d.error.startswith("unreadable header (NotImplementedError: Unknown Value Representation"), d.error
    assert d.info.series_instance_uid and d.info.sop_instance_uid and d.info.study_instance_uid == ""


def test_bare_dataset_with_an_unreadable_sop_class_is_not_dicom(tmp_path):
    """Found by fuzzing: a dataset without file meta whose SOP Class UID has an unknown VR raised
    NotImplementedError while it was being recognised as a bare dataset."""
    data = _synth(tmp_path).read_bytes()
    meta_len = int.from_bytes(data[140:144], "little")
    bare = bytearray(data[132 + 12 + meta_len:])  # the dataset alone, explicit VR little endian
    assert bare[:6] == b"\x08\x00\x05\x00CS" or bare[:4] == b"\x08\x00\x08\x00", bytes(bare[:8])
    at = bare.find(b"\x08\x00\x16\x00UI")
    bare[at + 4:at + 6] = b"U\x00"
    p = tmp_path / "x.dcm"
    p.write_bytes(bytes(bare))
    with pytest.raises(NotDicom, match="not a DICOM file"):
        decode_file(p)


def test_damaged_element_read_after_the_header_facts_is_an_error_record(tmp_path):
    """Found by the long fuzzing run (after 133,347 inputs): an element read only when deciding whether the
    instance is analysed (Rescale Type there; Samples per Pixel here) with an unknown VR raised
    NotImplementedError out of decode_file. Now it is an error record on its series."""
    (d,) = decode_file(_with_unknown_vr(tmp_path, b"\x28\x00\x02\x00US"))
    assert d.error.startswith("unreadable header (NotImplementedError: Unknown Value Representation"), d.error
    assert d.info.series_instance_uid and d.info.sop_instance_uid and not d.ignored


_UNDER_AN_ADDRESS_SPACE_LIMIT = """
import resource, sys
from pathlib import Path
from medqc.agent.decode import NotDicom, decode_file
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[2]), int(sys.argv[2])))
try:
    out = decode_file(Path(sys.argv[1]))
    print("records", *[(d.error or d.ignored or "ok") for d in out], sep="|")
except NotDicom as e:
    print("NotDicom", e, sep="|")
"""


def _decode_with_little_memory(p: Path, limit: int = 1536 << 20) -> list[str]:
    """decode_file on ``p`` in a fresh interpreter whose address space is capped at ``limit`` bytes, as on a
    box that does not overcommit memory; its outcome as printed fields."""
    r = subprocess.run([sys.executable, "-c", _UNDER_AN_ADDRESS_SPACE_LIMIT, str(p), str(limit)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().split("|")


def test_element_stating_more_bytes_than_the_file_holds_allocates_none_of_them(tmp_path):
    """Found by fuzzing in CI: an element of the file meta whose header stated ~4 GiB was read with
    read(length), which allocates the stated length first: MemoryError on a box without overcommit. The
    reading is bounded by the file now. Pixel data stating 4 GiB: the file is found cut short."""
    original = _synth(tmp_path).read_bytes()
    data = bytearray(original)
    at = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    assert at > 0
    data[at + 8:at + 12] = (0xFFFFFFF0).to_bytes(4, "little")
    p = tmp_path / "x.dcm"
    p.write_bytes(bytes(data))
    got = _decode_with_little_memory(p)
    assert got[0] == "records" and got[1].startswith("truncated file: ") and "would end at byte 4,294,96" in got[1], got
    # the file meta's group length stating 4 GiB (a UL read as UN, as the fuzzer wrote it): the rest of the file
    # is that value, and what remains is a dataset without an image
    data = bytearray(original)
    data[136:138] = b"UN"
    data[140:144] = (0xFFFFFFF0).to_bytes(4, "little")
    p.write_bytes(bytes(data))
    got = _decode_with_little_memory(p)
    assert got == ["records", "no image pixels (SOP class unknown)"], got


def test_deflated_dataset_that_inflates_far_beyond_its_size_is_not_read(tmp_path):
    """A deflated dataset inflates in memory before it is read; one built to inflate 1000:1 (200 MB of a
    private value from 200 kB) is refused before that, and an ordinary deflated CT still decodes."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    src = _synth(tmp_path)
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ok = tmp_path / "ok.dcm"
    ds.save_as(ok, enforce_file_format=True)
    ((d,),) = [decode_file(ok)]
    assert d.hu is not None and not d.error and not d.ignored
    ds.add_new(0x00091010, "LO", "MEDQC TEST")  # private creator, then its 200 MB value of zeros
    ds.add_new(0x00091011, "OB", bytes(200 << 20))
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    del ds
    assert bomb.stat().st_size < 1 << 20
    got = _decode_with_little_memory(bomb)
    assert got[0] == "NotDicom" and "inflates to more than 64 MiB" in got[1], got


def test_uid_written_as_a_sequence_with_a_damaged_item_is_a_record_not_an_exception(tmp_path):
    """Found by fuzzing: SOP Instance UID written as a sequence whose item holds an element of unknown VR. The
    fallback that reads a broken header's UIDs showed the value as text, and pydicom converts a sequence's
    items on ``str``: NotImplementedError out of decode_file. Such a value reads as no UID."""
    data = bytearray(_with_unknown_vr(tmp_path, b"\x20\x00\x0d\x00UI").read_bytes())  # the header facts fail
    at = data.find(b"\x08\x00\x18\x00UI")
    assert at > 0
    n = int.from_bytes(data[at + 6:at + 8], "little")
    item = b"\x42\x42\x42\x42BB\x02\x00xx"  # (4242,4242), VR 'BB', 2 bytes
    seq = (b"\x08\x00\x18\x00SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0" + len(item).to_bytes(4, "little") + item
           + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    data[at:at + 8 + n] = seq
    p = tmp_path / "x.dcm"
    p.write_bytes(bytes(data))
    (d,) = decode_file(p)
    assert d.error.startswith("unreadable header (NotImplementedError: Unknown Value Representation"), d.error
    assert d.info.sop_instance_uid == "" and d.info.series_instance_uid
