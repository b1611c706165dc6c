"""Reading only the elements the decoding uses (``DECODE_KEYWORDS``) decodes every file exactly as reading all
of them: the same ``SliceInfo``, the same outcome and reason, the same HU, the same rejection. An element
read in agent/decode.py but missing from the list would read as absent and silently change a finding.

Every file of the real-CT collection (``$MEDQC_REAL_CT``: four scanners, implicit and explicit VR, 12-bit
stored values, localizers, secondary captures, reformats, files without File Meta, non-DICOM files), the same
files cut short at points inside their headers and pixel data (where the truncation verdict depends on
elements the selective reading steps over), and the files stored as bare datasets."""

from __future__ import annotations

import dataclasses
import re
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import REAL_CT, missing_real_ct, need_module

from medqc.agent import decode
from medqc.agent.decode import DECODE_KEYWORDS, NotDicom, decode_file, read_dataset

COLLECTION = REAL_CT.parent


def _files() -> list[Path]:
    if not COLLECTION.is_dir() or not (COLLECTION / "philips-bigbore-chest-patient").is_dir():
        missing_real_ct(f"real-CT collection not present at {COLLECTION} (set MEDQC_REAL_CT)")
    return sorted(p for p in COLLECTION.rglob("*") if p.is_file())


def _outcome(path: Path, all_elements: bool):
    try:
        out = decode_file(path, received_at=1.0, identifiers=True, all_elements=all_elements)
    except NotDicom as e:
        return ("NotDicom", str(e))
    return [(dataclasses.asdict(d.info), d.error, d.ignored, d.ok, d.pixels() if d.ok else None) for d in out]


def _same(path: Path) -> str:
    """Decode ``path`` both ways and assert identical results; the kind of outcome, for the coverage checks."""
    full, fast = _outcome(path, True), _outcome(path, False)
    if isinstance(full, tuple) or isinstance(fast, tuple):
        assert fast == full, path
        return "not-dicom"
    assert len(fast) == len(full), path
    for (fi, fe, fg, fo, fp), (gi, ge, gg, go, gp) in zip(full, fast):
        assert gi == fi, (path, {k: (fi[k], gi[k]) for k in fi if fi[k] != gi[k]})
        assert (ge, gg, go) == (fe, fg, fo), path
        if fp is None:
            assert gp is None, path
        else:
            assert gp.dtype == fp.dtype and np.array_equal(gp, fp), path
    d = full[0]
    return "analysed" if d[3] else "error" if d[1] else "ignored"


def test_every_keyword_decode_reads_is_kept():
    src = Path(decode.__file__).read_text()
    named = {k for k in re.findall(r'"([A-Z][A-Za-z0-9]+)"', src) if pydicom.datadict.tag_for_keyword(k) is not None}
    file_meta = {k for k in named if pydicom.datadict.tag_for_keyword(k) >> 16 == 0x0002}
    assert {"Rows", "PixelData", "PerFrameFunctionalGroupsSequence", "RescaleIntercept"} <= named
    assert named - file_meta - set(DECODE_KEYWORDS) == set()
    # and pydicom's pixel decoders find what they read (Image Pixel module, extended offset table)
    from pydicom.pixels.utils import _DEFAULT_TAGS

    assert set(_DEFAULT_TAGS) <= set(decode.DECODE_TAGS)


def test_real_ct_decodes_the_same_reading_only_the_decoded_elements():
    kinds: dict[str, int] = {}
    for p in _files():
        k = _same(p)
        kinds[k] = kinds.get(k, 0) + 1
    # the collection exercises every outcome: 141 + 88 chest and Catphan slices, the phantom's series, its
    # localizer and secondary captures (ignored), reformats, the licences and directory files (not DICOM)
    assert kinds.get("analysed", 0) > 300 and kinds.get("ignored", 0) >= 10 and kinds.get("not-dicom", 0) >= 3, kinds


def _samples() -> list[Path]:
    """One analysed slice of each scanner in the collection."""
    picks = []
    for folder in ("philips-bigbore-chest-patient", "philips-ingenuity-head-phantom", "varian-cbct-catphan604",
                   "tcia-covid19-ny-sbu-slices"):
        for p in sorted(p for p in (COLLECTION / folder).rglob("*") if p.is_file()):
            try:
                if any(d.ok for d in decode_file(p)):
                    picks.append(p)
                    break
            except NotDicom:
                continue
    return picks


def test_cut_and_bare_files_decode_the_same(tmp_path):
    _files()
    samples = _samples()
    assert len(samples) == 4
    kinds: dict[str, int] = {}
    for n, src in enumerate(samples):
        data = src.read_bytes()
        # where the header ends: the pixel data element's value
        ds = pydicom.dcmread(src, force=True)
        px = ds.get_item("PixelData").value_tell
        cuts = sorted({c for c in (133, 300, 600, 900, 1200, 1700, 2300, 3000, 4000, px // 2, px - 13, px - 9, px - 5,
                                   px - 1, px + 100, px + (len(data) - px) // 2, len(data) - 1) if 0 < c < len(data)})
        for c in cuts:
            p = tmp_path / f"{n}-cut{c}"
            p.write_bytes(data[:c])
            kind = _same(p)
            kinds[kind] = kinds.get(kind, 0) + 1
        # the same dataset without preamble and File Meta (its group length says where the meta ends)
        if data[128:132] == b"DICM":
            meta_len = int.from_bytes(data[140:144], "little")
            p = tmp_path / f"{n}-bare"
            p.write_bytes(data[144 + meta_len:])
            assert _same(p) == "analysed", src
    # cut files are errors (truncated) or ignored (cut before naming the series): never analysed
    assert kinds.get("analysed", 0) == 0 and kinds.get("error", 0) >= 20, kinds


def test_trailing_elements_after_the_pixel_data_whole_and_cut(tmp_path):
    """Elements after the pixel data (private groups above 7FE0, trailing padding) are stepped over: a file
    cut inside one is truncated all the same, a whole one is not."""
    _files()
    src = COLLECTION / "philips-bigbore-chest-patient" / "00-slice000.dcm"
    data = src.read_bytes()
    assert pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
    creator = b"MEDQC TEST"
    trailer = (struct.pack("<HHI", 0x7FE1, 0x0010, len(creator)) + creator
               + struct.pack("<HHI", 0x7FE1, 0x1010, 1000) + bytes(1000))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.write_bytes(data + trailer)
    cut.write_bytes(data + trailer[:-900])
    assert _same(whole) == "analysed"
    assert _same(cut) == "error"
    assert decode_file(cut)[0].error.startswith("truncated file: ") and "(7FE1,1010)" in decode_file(cut)[0].error


def _outcome_or_raise(path, all_elements):
    try:
        return _outcome(path, all_elements)
    except Exception as e:  # noqa: BLE001 - an internal error must be the same both ways too
        return (type(e).__name__, str(e))


def test_pydicom_test_files_decode_the_same():
    """pydicom's own test files, as installed (pydicom's and pydicom-data's folders; none fetched): big
    endian, deflated, JPEG baseline/lossless/LS, JPEG 2000, RLE, Enhanced multi-frame, implicit VR, files
    without File Meta, broken and odd files."""
    need_module("data_store", "pydicom-data is in the test extra")
    import data_store
    import pydicom.data

    paths = sorted(p for d in (Path(pydicom.data.__file__).parent / "test_files", Path(data_store.__file__).parent / "data")
                   for p in d.rglob("*.dcm") if p.stat().st_size < 20_000_000)
    assert len(paths) > 100
    kinds: dict[str, int] = {}
    for p in paths:
        full, fast = _outcome_or_raise(p, True), _outcome_or_raise(p, False)
        if isinstance(full, tuple):
            assert fast == full, p
            kinds[full[0]] = kinds.get(full[0], 0) + 1
            continue
        k = _same(p)
        kinds[k] = kinds.get(k, 0) + 1
        # the pixels of every object, analysed or not: pydicom's decoders find all they read among the kept
        try:
            want = read_dataset(p, all_elements=True).pixel_array
        except Exception as e:  # noqa: BLE001 - no pixels, or no decoder for them
            with pytest.raises(type(e)):
                read_dataset(p).pixel_array
            continue
        got = read_dataset(p).pixel_array
        assert got.dtype == want.dtype and np.array_equal(got, want), p
        kinds["pixels"] = kinds.get("pixels", 0) + 1
    assert kinds.get("analysed", 0) >= 5 and kinds.get("ignored", 0) >= 30 and kinds.get("pixels", 0) >= 80, kinds
