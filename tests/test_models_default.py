"""The shipped default bundle (``models/default``): intact, loadable with zero configuration, and it
detects real things through the ONNX Runtime runner."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_module  # noqa: E402

from medqc import ARTIFACTS


@pytest.fixture(scope="module")
def bundle():
    from medqc.bundle import default_bundle_dir, load_bundle

    return load_bundle(default_bundle_dir())


@pytest.fixture(scope="module")
def runner(bundle):
    from medqc.runners import make_runner

    r = make_runner("onnxruntime", bundle, threads=2)
    yield r
    r.close()


def _probs(runner, bundle, slices):
    from medqc.runners.base import infer_slices

    out = infer_slices(runner, [(hu, ps, None) for hu, ps in slices], bundle.preprocess)
    return 1 / (1 + np.exp(-out["artifact_logits"].astype(np.float64))), out["position"][:, 0]


def test_default_bundle_is_intact(bundle):
    from medqc.analysis.preprocess import PreprocessParams

    assert bundle.root.name == "default"
    assert tuple(bundle.labels) == ARTIFACTS
    assert bundle.manifest.get("trained") is True
    assert bundle.preprocess == PreprocessParams()  # the defaults the agent and training share
    assert set(bundle.thresholds) == set(ARTIFACTS) and all(0 < v < 1 for v in bundle.thresholds.values())
    total = 0
    for key in bundle.manifest["files"]:
        total += bundle.verify(key).stat().st_size  # raises on a sha256 mismatch
    assert total <= 20 * 1024 * 1024
    assert bundle.manifest["export"]["parity"]["onnx"]["passed"]
    assert "hu" in bundle.manifest["inputs"]  # the preprocessing runs in the model (medqc.models.slice_input)


def test_checks_judge_the_fused_motion_score_at_the_fusions_threshold(bundle):
    """The manifest's motion threshold is the network's alone (synthetic validation); the checks judge the fused
    motion score (network and free air) at the fusion's, the other network classes at the manifest's."""
    from medqc.analysis import fusion

    th = bundle.check_thresholds
    assert bundle.thresholds["motion"] != fusion.MOTION_THRESHOLD
    assert th["motion"] == fusion.MOTION_THRESHOLD
    assert th["metal"] == bundle.thresholds["metal"]
    for k in bundle.network_off:
        assert th[k] == fusion.CLASSICAL_THRESHOLD


def test_default_checkpoint_loads(bundle):
    need_module("torch")
    from medqc.models import load_checkpoint

    name, model, meta = load_checkpoint(bundle.verify("checkpoint"))
    assert name in ("qcnet", "qcnet-small") and meta["labels"] == list(ARTIFACTS)
    assert meta["thresholds"] == pytest.approx(bundle.thresholds)


def _patient_slices():
    from medqc.synth.phantom import Implant, random_patient
    from medqc.synth.training import SliceSpec, simulate_slice

    rng = np.random.default_rng(11)
    p = random_patient(rng, contrast=False, arms="up")
    r = 830.0  # femoral heads
    spec = SliceSpec(r=r, matrix=512, fov_mm=420.0, kernel="standard", noise_sigma=6.0, padding=-1024.0)
    clean, _ = simulate_slice(p, spec, np.random.default_rng(1))
    p.implants.append(Implant("hip", r - 40, r + 40, 95.0 * p.girth_lr, -5.0, 20.0, 11.0))  # a gross hip prosthesis
    metal, phys = simulate_slice(p, spec, np.random.default_rng(1))
    assert phys["metal_area_mm2"] > 100
    ps = (420.0 / 512, 420.0 / 512)
    return [(clean, ps), (metal, ps)], r


def test_default_bundle_detects_metal(bundle, runner):
    need_module("medqc.synth.training")
    slices, r = _patient_slices()
    p, pos = _probs(runner, bundle, slices)
    thr = bundle.thresholds
    k = ARTIFACTS.index("metal")
    assert p[1, k] > thr["metal"], p
    assert p[0, k] < thr["metal"], p
    # a clean slice at the hips sits near the femoral heads on the body scale
    assert abs(pos[0] - r) < 120, pos
