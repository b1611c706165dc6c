"""Scores of a model bundle on the real CT we can label honestly.

- ``pydicom``'s ``CT_small.dcm`` (a real GE axial slice, 128², no visible artifact): every artifact score
  should stay under its threshold.
- A real vendor head-phantom study (``/work/shared/real-ct/philips-ingenuity-head-phantom`` in the source
  tree's neighbourhood, or any folder given): only ORIGINAL/PRIMARY/AXIAL CT images are scored (localizers,
  secondary captures and non-DICOM files are skipped); the series are clean acquisitions, so the fraction of
  slices over threshold per class is the false-alarm rate. Position is not meaningful on a phantom and is
  reported only as a range.

Usage: ``python -m medqc.models.realct [BUNDLE] [STUDY_FOLDER ...]``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


DEFAULT_STUDY = Path(__file__).resolve().parents[2] / "shared" / "real-ct" / "philips-ingenuity-head-phantom"


def slice_hu(ds) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return arr * slope + inter


def slice_input(ds) -> tuple[np.ndarray, tuple[float, float], tuple | None]:
    """(HU, pixel spacing, orientation or None) of one slice: what ``slice_input.prepare`` takes."""
    iop = tuple(float(v) for v in ds.ImageOrientationPatient) if "ImageOrientationPatient" in ds else None
    return slice_hu(ds), tuple(float(v) for v in ds.PixelSpacing), iop


def is_axial_ct(ds) -> bool:
    it = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return ds.get("Modality") == "CT" and "LOCALIZER" not in it and "SECONDARY" not in it and "PixelData" in ds


def read_series(folder: Path) -> dict[str, list]:
    """{SeriesInstanceUID: [(z, hu, spacing, orientation)]} for axial CT images under ``folder``."""
    import pydicom

    out: dict[str, list] = {}
    for f in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except Exception:  # DIRFILEs, licences, anything not DICOM
            continue
        if not is_axial_ct(ds):
            continue
        z = float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else float(ds.get("InstanceNumber", 0))
        out.setdefault(str(ds.SeriesInstanceUID), []).append((z, *slice_input(ds)))
    for v in out.values():
        v.sort(key=lambda t: t[0])
    return out


def score(runner, bundle, items) -> tuple[np.ndarray, np.ndarray]:
    from medqc.runners.base import infer_slices

    out = infer_slices(runner, [(hu, ps, iop) for _, hu, ps, iop in items], bundle.preprocess)
    p = 1.0 / (1.0 + np.exp(-out["artifact_logits"].astype(np.float64)))
    return p, out["position"][:, 0]


def evaluate(bundle_dir=None, studies=None) -> list[dict]:
    from pydicom.data import get_testdata_file

    from medqc.bundle import load_bundle
    from medqc.runners import make_runner

    bundle = load_bundle(bundle_dir)
    labels = list(bundle.labels)
    thr = bundle.thresholds
    runner = make_runner("onnxruntime", bundle)
    results = []
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    p, pos = score(runner, bundle, [(0.0, *slice_input(ds))])
    fired = [a for k, a in enumerate(labels) if p[0, k] > thr.get(a, 0.5)]
    results.append({
        "name": "pydicom CT_small.dcm (real GE axial slice, clean)",
        "probabilities": {a: round(float(p[0, k]), 4) for k, a in enumerate(labels)},
        "fired": fired,
        "position_mm": round(float(pos[0]), 1),
        "summary": f"fired: {', '.join(fired) if fired else 'none'}; probabilities "
                   + ", ".join(f"{a} {p[0, k]:.3f}" for k, a in enumerate(labels)) + f"; position {pos[0]:.0f} mm",
    })
    for study in studies if studies is not None else ([DEFAULT_STUDY] if DEFAULT_STUDY.is_dir() else []):
        for uid, items in read_series(Path(study)).items():
            p, pos = score(runner, bundle, items)
            rate = {a: float((p[:, k] > thr.get(a, 0.5)).mean()) for k, a in enumerate(labels)}
            results.append({
                "name": f"{Path(study).name} series …{uid[-12:]} ({len(items)} axial slices, clean phantom)",
                "slices": len(items),
                "fire_rate": rate,
                "max_probability": {a: round(float(p[:, k].max()), 4) for k, a in enumerate(labels)},
                "position_range_mm": [round(float(pos.min()), 1), round(float(pos.max()), 1)],
                "summary": f"{len(items)} slices; fraction over threshold: "
                           + ", ".join(f"{a} {rate[a]:.2f}" for a in labels)
                           + f" (max p: " + ", ".join(f"{a} {p[:, k].max():.2f}" for k, a in enumerate(labels)) + ")",
            })
    runner.close()
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    res = evaluate(args[0] if args else None, [Path(a) for a in args[1:]] or None)
    print(json.dumps(res, indent=2))
