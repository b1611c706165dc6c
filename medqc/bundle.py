"""Model bundles: a folder with model file(s) and ``manifest.json`` (schema ``medqc.bundle/1``).

The embedded default bundle lives in ``medqc/models/default`` (the ``models/`` folder of the source tree).
``medqc export`` writes bundles; the agent and ``medqc analyze`` load them. Manifest fields::

    schema       "medqc.bundle/1"
    name, version, created
    labels       artifact class names, in output order (medqc.ARTIFACTS)
    preprocess   PreprocessParams.to_dict()
    thresholds   {label: probability threshold}
    inputs       {"hu": [-1, -1, -1], "row_index": [S, -1], "row_weight": [S, -1], "col_index": [S, -1],
                  "col_weight": [S, -1], "row_valid": [S], "col_valid": [S]}: the model preprocesses HU
                 slices itself (``medqc.models.slice_input``); a bundle whose model takes preprocessed
                 images ({"image": [-1, C, S, S]}, older medqc) is refused by the runners
    outputs      {"artifact_logits": [-1, len(labels)], "position": [-1, 1]}
    position     {"scale": "medqc.body/1", "units": "reference mm below vertex"}
    files        {"onnx": {"path": "model.onnx", "sha256": ...},
                  "onnx_fp16": {...}?, "checkpoint": {...}?}
    engines      [{"path", "sha256", "tensorrt", "cuda", "gpu", "compute_capability", "fp16", "batch", ...}]
    metrics      free-form training/validation summary (model card figures)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from medqc.analysis.preprocess import PreprocessParams

SCHEMA = "medqc.bundle/1"


class BundleError(Exception):
    """A bundle is missing, unreadable or inconsistent (a user-facing error)."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def default_bundle_dir() -> Path:
    import medqc.models

    return Path(medqc.models.__file__).resolve().parent / "default"


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict = field(repr=False)

    @property
    def name(self) -> str:
        return self.manifest.get("name", "?")

    @property
    def version(self) -> str:
        return self.manifest.get("version", "?")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    @property
    def thresholds(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.manifest.get("thresholds", {}).items()}

    @property
    def network_off(self) -> tuple[str, ...]:
        """Labels the network ships switched off (too weak on validation: threshold >= NETWORK_OFF_AT, or
        listed under ``network_off``). The agent ignores their network scores; classical evidence alone
        decides them where there is any (``medqc.analysis.fusion.classical_probs``)."""
        listed = set(self.manifest.get("network_off", []))
        return tuple(k for k in self.labels if k in listed or self.thresholds.get(k, 0.0) >= NETWORK_OFF_AT)

    @property
    def max_slice_thickness_mm(self) -> float:
        """Thickest slice whose network artifact scores the agent uses (manifest ``domain``; default
        ``NETWORK_MAX_THICKNESS_MM``). Thicker slices average more anatomy along z than anything the
        network saw in training; their artifact scores are dropped (classical evidence and position stay)."""
        v = (self.manifest.get("domain") or {}).get("max_slice_thickness_mm")
        try:
            return float(v) if v is not None else NETWORK_MAX_THICKNESS_MM
        except (TypeError, ValueError):
            return NETWORK_MAX_THICKNESS_MM

    @property
    def check_thresholds(self) -> dict[str, float]:
        """Thresholds the series checks apply to fused scores: the manifest's, except that a class whose
        network is off and that classical evidence can see takes the classical threshold, and that motion,
        whose fused score mixes the network with the free air's evidence, takes the fusion's
        (``medqc.analysis.fusion.MOTION_THRESHOLD``, set on real CT)."""
        from medqc.analysis.fusion import CLASSICAL_CLASSES, CLASSICAL_THRESHOLD, MOTION_THRESHOLD

        th = self.thresholds
        for k in self.network_off:
            if k in CLASSICAL_CLASSES:
                th[k] = CLASSICAL_THRESHOLD
        if "motion" in th and "motion" not in self.network_off:
            th["motion"] = MOTION_THRESHOLD
        return th

    @property
    def preprocess(self) -> PreprocessParams:
        return PreprocessParams.from_dict(self.manifest["preprocess"])

    def file(self, key: str) -> Path | None:
        entry = self.manifest.get("files", {}).get(key)
        return (self.root / entry["path"]) if entry else None

    def verify(self, key: str) -> Path:
        """Path of file ``key`` after checking it exists and its sha256 matches the manifest."""
        entry = self.manifest.get("files", {}).get(key)
        if not entry:
            raise BundleError(f"bundle {self.root} has no '{key}' file (has: {sorted(self.manifest.get('files', {}))})")
        p = self.root / entry["path"]
        if not p.is_file():
            raise BundleError(f"bundle file missing: {p}")
        want = entry.get("sha256")
        if want and sha256_file(p) != want:
            raise BundleError(f"bundle file {p} does not match the sha256 in its manifest (corrupt or replaced)")
        return p

    @property
    def engines(self) -> list[dict]:
        return list(self.manifest.get("engines", []))


NETWORK_OFF_AT = 0.999  # a manifest threshold at or above this switches the class off in the network
# The qcnet generator trains on 0.625–5 mm slices; up to 10 mm the shipped network stays quiet on clean
# synthetic series (46 evaluation series, 2.5–9.4 mm), at 17–23 mm it read partial-volume blur as motion
# (0.74–0.80 on 5 of 6 clean series): artifact scores of thicker slices are not used.
TRAINED_SLICE_THICKNESS_MM = (0.625, 5.0)
NETWORK_MAX_THICKNESS_MM = 10.0


def load_bundle(path: str | Path | None = None) -> Bundle:
    root = Path(path) if path else default_bundle_dir()
    mf = root / "manifest.json" if root.is_dir() else root
    if root.is_file():
        root = root.parent
    if not mf.is_file():
        raise BundleError(f"no model bundle at {root}: manifest.json not found")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read bundle manifest {mf}: {e}") from e
    if manifest.get("schema") != SCHEMA:
        raise BundleError(f"{mf}: schema is {manifest.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("labels", "preprocess", "files"):
        if key not in manifest:
            raise BundleError(f"{mf}: manifest has no '{key}'")
    try:
        PreprocessParams.from_dict(manifest["preprocess"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{mf}: bad preprocess parameters: {e}") from e
    return Bundle(root=root, manifest=manifest)


def write_manifest(root: Path, manifest: dict) -> Path:
    manifest = dict(manifest)
    manifest.setdefault("schema", SCHEMA)
    p = Path(root) / "manifest.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(p)
    return p
