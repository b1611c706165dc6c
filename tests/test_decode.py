"""agent/decode.py on the real Philips study and on constructed edge cases (syntaxes, padding, bits, geometry)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless,
                         generate_uid)

from medqc.agent.decode import PAD_HU, NotDicom, decode_dataset, decode_file


def ct_dataset(rows=64, cols=64, hu=None, z=-100.0, orientation=(1, 0, 0, 0, 1, 0), signed=True, bits_stored=16,
               intercept=-1024.0, ts=ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ts
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Doe^Jane", "PID-12345"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-100.0, -100.0, z]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.8, 0.8]
    ds.SliceThickness = 1.0
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    if hu is None:
        yy, xx = np.mgrid[:rows, :cols]
        hu = np.where((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (rows / 3) ** 2, 40.0, -1000.0)
    stored = np.round(np.asarray(hu) - intercept).astype(np.int16 if signed else np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


def test_real_study_classification(real_ct):
    counts = Counter()
    for p in sorted(real_ct.rglob("*")):
        if not p.is_file():
            continue
        try:
            out = decode_file(p)
        except NotDicom:
            counts["not-dicom"] += 1
            continue
        for d in out:
            if d.ok:
                counts["ok"] += 1
                assert d.hu.dtype == np.float32 and d.hu.shape == (d.info.rows, d.info.cols)
                assert d.info.pixel_spacing and d.info.position and abs(d.info.gantry_tilt) > 10  # tilted series
                assert -1100 < float(np.median(d.hu)) < 100  # air/water phantom in HU, not raw stored values
                assert d.info.patient_name == ""  # identifiers only when the site opts in
            elif "LOCALIZER" in d.info.image_type or "localizer" in d.ignored:
                counts["localizer"] += 1
            else:
                counts["other"] += 1
    assert counts["ok"] == 112 and counts["localizer"] == 1 and counts["not-dicom"] >= 1 and counts["other"] >= 5


def test_hu_rescale_padding_and_masking():
    hu = np.full((32, 32), 40.0)
    hu[:4] = -3000.0
    ds = ct_dataset(32, 32, hu=hu)
    ds.PixelPaddingValue = int(np.int16(-3000 + 1024))
    d = decode_dataset(ds)[0]
    assert d.ok and np.all(d.hu[:4] == PAD_HU) and np.allclose(d.hu[4:], 40.0)
    # unsigned 12-bit stored in 16 with garbage in the high bits (overlay habit): masked away
    ds = ct_dataset(32, 32, hu=np.full((32, 32), 100.0), signed=False, bits_stored=12)
    raw = np.frombuffer(ds.PixelData, np.uint16) | np.uint16(0xF000)
    ds.PixelData = raw.tobytes()
    assert np.allclose(decode_dataset(ds)[0].hu, 100.0)


def test_compressed_and_big_endian_match_uncompressed():
    base = ct_dataset(64, 64)
    want = decode_dataset(base)[0].hu
    rle = ct_dataset(64, 64)
    rle.compress(RLELossless)
    assert np.array_equal(decode_dataset(rle)[0].hu, want)
    be = ct_dataset(64, 64)
    be.PixelData = np.frombuffer(be.PixelData, np.int16).astype(">i2").tobytes()
    be.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    assert np.array_equal(decode_dataset(be)[0].hu, want)


def test_undecodable_truncated_and_missing_geometry_are_errors_not_crashes():
    bad = ct_dataset(32, 32)
    bad.file_meta.TransferSyntaxUID = JPEG2000Lossless
    from pydicom.encaps import encapsulate

    bad.PixelData = encapsulate([b"\xff\x4f\xff\x51 this is not a codestream"])
    d = decode_dataset(bad)[0]
    assert d.hu is None and "cannot be decoded" in d.error and JPEG2000Lossless in d.error
    short = ct_dataset(32, 32)
    short.PixelData = short.PixelData[:100]
    d = decode_dataset(short)[0]
    assert d.hu is None and "truncated" in d.error
    nogeo = ct_dataset(32, 32)
    del nogeo.ImagePositionPatient
    del nogeo.PixelSpacing
    d = decode_dataset(nogeo)[0]
    assert not d.ok and "ImagePositionPatient" in d.error and "PixelSpacing" in d.error


def test_non_axial_and_non_ct_are_ignored():
    sag = ct_dataset(32, 32, orientation=(0, 1, 0, 0, 0, -1))
    assert "not axial" in decode_dataset(sag)[0].ignored
    tilted = ct_dataset(32, 32, orientation=(1, 0, 0, 0, 0.94, -0.34))  # 20° gantry tilt stays axial
    assert decode_dataset(tilted)[0].ok
    sr = Dataset()
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # X-ray radiation dose SR
    sr.SOPInstanceUID, sr.SeriesInstanceUID, sr.StudyInstanceUID = generate_uid(), generate_uid(), generate_uid()
    sr.Modality = "SR"
    assert "no image pixels" in decode_dataset(sr)[0].ignored


def enhanced_ct(n: int, rows: int, frame_type=("ORIGINAL", "PRIMARY", "AXIAL", "NONE")):
    """An Enhanced CT object of ``n`` frames at 10 mm steps, frame k holding stored 1024 + 100 k (HU 100 k)."""
    ds = ct_dataset(rows, rows)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept"):
        delattr(ds, k)
    ds.NumberOfFrames = n
    shared = Dataset()
    po, pm, pvt = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pm.PixelSpacing, pm.SliceThickness = [0.7, 0.7], 1.5
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, -1024, "HU"
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [po], [pm]
    shared.PixelValueTransformationSequence = [pvt]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in range(n):
        fg, pp, ft = Dataset(), Dataset(), Dataset()
        pp.ImagePositionPatient = [0.0, 0.0, -10.0 * k]
        ft.FrameType = list(frame_type)
        fg.PlanePositionSequence, fg.CTImageFrameTypeSequence = [pp], [ft]
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = (np.arange(n, dtype=np.int16)[:, None, None] * 100 + np.zeros((n, rows, rows), np.int16) + 1024).tobytes()
    return ds, pvt


def test_enhanced_ct_multiframe_per_frame_geometry():
    n = 4
    ds, pvt = enhanced_ct(n, 32)
    out = decode_dataset(ds)
    assert [d.info.frame for d in out] == list(range(n)) and all(d.ok for d in out)
    assert [d.info.z for d in out] == [0.0, -10.0, -20.0, -30.0]
    assert out[0].info.pixel_spacing == (0.7, 0.7) and out[2].info.slice_thickness == 1.5
    assert [float(d.hu.mean()) for d in out] == [0.0, 100.0, 200.0, 300.0]
    pvt.RescaleType = "US"  # Enhanced CT says HU for CT numbers; anything else is a derived value
    assert all("RescaleType US" in d.ignored for d in decode_dataset(ds))


def test_a_large_multiframe_object_is_converted_to_hu_frame_by_frame():
    """A 1,000-frame Enhanced CT object of 512² would hold 1 GB of float32 HU at once if every frame were
    converted at decoding; past ``LAZY_FRAMES`` frames each one is converted when it is analysed instead.
    Same values; the derived-map test still runs at decoding (on every 4th pixel)."""
    import tracemalloc

    from medqc.agent.decode import LAZY_FRAMES

    n, rows = 200, 128
    assert n > LAZY_FRAMES
    ds, _ = enhanced_ct(n, rows)
    tracemalloc.start()
    out = decode_dataset(ds)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    one_frame = rows * rows * 4
    assert all(d.ok and d.hu is None for d in out)
    assert peak < 10 * one_frame, peak  # eager conversion held n × one_frame (13 MB) here
    assert [float(d.pixels()[0, 0]) for d in out[:3]] == [0.0, 100.0, 200.0]
    assert out[150].pixels().dtype == np.float32 and out[150].pixels().shape == (rows, rows)
    assert np.all(out[150].pixels() == 15000.0)
    small, _ = enhanced_ct(LAZY_FRAMES, rows)  # small objects as before: HU at decoding
    assert all(d.hu is not None for d in decode_dataset(small))
    # a derived map under a frame type no list names is still told apart at decoding (no pixel below -50 HU)
    maps, _ = enhanced_ct(40, rows, ("DERIVED", "PRIMARY", "AXIAL", "VENDOR_MAP_7"))
    assert all("no pixel below -50 HU" in d.ignored and d.lazy is None for d in decode_dataset(maps)[1:])


def test_ctdi_phantom_from_its_code():
    """CTDIPhantomTypeCodeSequence (CID 4052): 113690 the IEC head phantom (16 cm), 113691 the body one
    (32 cm); by the code's meaning where the value is another scheme's; absent, unknown."""
    ds = ct_dataset(16, 16)
    assert decode_dataset(ds)[0].info.ctdi_phantom_cm is None
    for value, meaning, cm in (("113690", "IEC Head Dosimetry Phantom", 16), ("113691", "IEC Body Dosimetry Phantom", 32),
                               ("X-1", "IEC Body Dosimetry Phantom", 32), ("X-2", "something else", None)):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        ds.CTDIPhantomTypeCodeSequence = [item]
        assert decode_dataset(ds)[0].info.ctdi_phantom_cm == cm, value


def test_maps_that_are_not_ct_numbers_are_ignored():
    """Perfusion and material maps (by image type) and pixels whose RescaleType is not HU are recorded as
    ignored with the reason; monoenergetic images and an explicit RescaleType HU stay analysed."""
    perf = ct_dataset(32, 32)
    perf.ImageType = ["DERIVED", "PRIMARY", "PERFUSION", "RCBF"]
    assert decode_dataset(perf)[0].ignored == "derived map, not CT numbers (image type PERFUSION/RCBF)"
    od = ct_dataset(32, 32)
    od.RescaleType = "MGML"  # a named unit other than HU (an iodine map)
    assert "not CT numbers (RescaleType MGML)" in decode_dataset(od)[0].ignored
    us = ct_dataset(32, 32)
    us.RescaleType = "US"  # unspecified on a classic CT image: seen on HU images from workstations, analysed
    assert decode_dataset(us)[0].ok
    hu = ct_dataset(32, 32)
    hu.RescaleType = "HU"
    hu.ImageType = ["DERIVED", "PRIMARY", "AXIAL", "MONOENERGETIC"]
    assert decode_dataset(hu)[0].ok
    # a vendor's material map under an image type no list names: a derived image with no air, lung or fat
    yy, xx = np.mgrid[:64, :64]
    body = (yy - 32) ** 2 + (xx - 32) ** 2 < 20 ** 2
    iodine = ct_dataset(64, 64, hu=np.where(body, 35.0, 0.0), intercept=0.0)
    iodine.ImageType = ["DERIVED", "PRIMARY", "AXIAL", "IODINE_NO_WATER"]
    d = decode_dataset(iodine)[0]
    assert "no pixel below -50 HU" in d.ignored and d.hu is None
    iodine.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]  # an original acquisition is always analysed
    assert decode_dataset(iodine)[0].ok
    # a targeted derived reconstruction inside the body still holds fat: analysed
    fat = ct_dataset(64, 64, hu=np.where(body, 40.0, -100.0))
    fat.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    assert decode_dataset(fat)[0].ok


def test_multi_valued_strings_are_joined_with_backslashes():
    """ConvolutionKernel "Br40d\\3" (Siemens) and ScanOptions read as DICOM writes them, not as a Python list."""
    ds = ct_dataset(8, 8)
    ds.ConvolutionKernel = ["Br40d", "3"]
    ds.ScanOptions = ["AXIAL MODE", "FOO"]
    info = decode_dataset(ds, pixels=False)[0].info
    assert info.convolution_kernel == "Br40d\\3" and info.scan_options == "AXIAL MODE\\FOO"


def test_screen_save_without_geometry_is_ignored_not_an_error():
    """Dose and protocol pages stored as CT images (DERIVED\\SECONDARY\\SCREEN SAVE, no position or orientation)
    are recorded as ignored; an axial-looking image without geometry stays an error (input.undecodable)."""
    page = ct_dataset(32, 32)
    page.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    del page.ImagePositionPatient
    del page.ImageOrientationPatient
    d = decode_dataset(page)[0]
    assert d.ignored.startswith("secondary image without slice geometry") and not d.error
    bare = ct_dataset(32, 32)
    del bare.ImagePositionPatient
    d = decode_dataset(bare)[0]
    assert "missing or invalid geometry" in d.error


def test_reconstruction_centre_against_isocentre():
    """ReconstructionTargetCenterPatient − DataCollectionCenterPatient along the image axes (whatever the
    origin of the patient coordinates), also for a feet-first/flipped orientation; absent tags: None."""
    ds = ct_dataset(32, 32)
    assert decode_dataset(ds, pixels=False)[0].info.recon_offset_mm is None
    ds.DataCollectionCenterPatient = [10.0, 150.0, -300.0]  # a vendor origin far from the isocentre
    ds.ReconstructionTargetCenterPatient = [40.0, 130.0, -300.0]
    assert decode_dataset(ds, pixels=False)[0].info.recon_offset_mm == (30.0, -20.0)
    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
    assert decode_dataset(ds, pixels=False)[0].info.recon_offset_mm == (-30.0, 20.0)


def test_not_dicom(tmp_path):
    p = tmp_path / "DIRFILE"
    p.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(NotDicom):
        decode_file(p)


@pytest.mark.parametrize("implicit", [True, False])
def test_dataset_without_preamble_and_file_meta_is_read(tmp_path, implicit):
    """Older archives store the bare dataset (no 128-byte preamble, no DICM, no file meta): read with the
    encoding it was written in; a file without valid SOP UIDs stays not-DICOM."""
    from pydicom import dcmwrite

    ds = ct_dataset(32, 32)
    del ds.file_meta
    p = tmp_path / "IM1"
    dcmwrite(p, ds, enforce_file_format=False, implicit_vr=implicit, little_endian=True)
    assert p.read_bytes()[128:132] != b"DICM"
    d = decode_file(p)[0]
    assert d.ok and d.info.sop_instance_uid == ds.SOPInstanceUID
    assert float(d.hu.max()) == 40.0 and float(d.hu.min()) == -1000.0
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x08\x00\x16\x00" + b"\x00" * 400)  # looks like a tag, holds no UIDs
    with pytest.raises(NotDicom):
        decode_file(junk)


def test_blank_series_and_study_uids_are_derived_from_when_and_where():
    """A de-identification that blanks SeriesInstanceUID and StudyInstanceUID: the slices of one series get one
    derived series UID (2.25 form) and are analysed; another SeriesNumber is another series of the same derived
    study; the derived UIDs are named. UIDs that are there are kept as they are."""
    def blank(series_number, instance):
        ds = ct_dataset(16, 16)
        ds.SeriesInstanceUID = ds.StudyInstanceUID = ""
        ds.SeriesNumber, ds.InstanceNumber = series_number, instance
        ds.SOPInstanceUID = f"1.2.3.4.{series_number}.{instance}"
        return decode_dataset(ds)[0]

    a, b, c = blank(3, 1), blank(3, 2), blank(4, 1)
    assert a.ok and a.info.series_instance_uid.startswith("2.25.") and a.info.study_instance_uid.startswith("2.25.")
    assert a.info.series_instance_uid == b.info.series_instance_uid != c.info.series_instance_uid
    assert a.info.study_instance_uid == c.info.study_instance_uid
    assert a.info.stand_in_uids == "StudyInstanceUID, SeriesInstanceUID"
    kept = decode_dataset(ct_dataset(16, 16))[0].info
    assert kept.stand_in_uids == "" and not kept.series_instance_uid.startswith("2.25.")
