"""Shared core: preprocessing, bundle loading, runner interface, config validation."""

from __future__ import annotations

import numpy as np
import pytest

from medqc.bundle import BundleError, load_bundle
from medqc.config import ConfigError, load_config
from medqc.analysis.preprocess import PreprocessParams, preprocess
from medqc.runners import available_backends, make_runner


def test_preprocess_is_physical_size_invariant():
    pp = PreprocessParams()
    # a 200 mm disc of water in a 500 mm FOV at 512² and in a 400 mm FOV at 256²
    def disc(n, fov):
        y, x = (np.mgrid[:n, :n] - (n - 1) / 2) * (fov / n)
        return np.where(x**2 + y**2 < 100**2, 0.0, -1000.0).astype(np.float32), (fov / n, fov / n)

    a = preprocess(*disc(512, 500.0), pp)
    b = preprocess(*disc(256, 400.0), pp)
    assert a.shape == b.shape == (pp.channels, pp.size, pp.size)
    area_a = (a[0] > -0.5).sum() * pp.pixel_mm**2
    area_b = (b[0] > -0.5).sum() * pp.pixel_mm**2
    assert abs(area_a - np.pi * 100**2) / (np.pi * 100**2) < 0.05
    assert abs(area_a - area_b) / area_a < 0.05


def test_preprocess_marks_padding_outside_fov():
    hu = np.full((512, 512), -3024.0, np.float32)  # GE-style outside-circle padding
    yy, xx = np.mgrid[:512, :512] - 255.5
    hu[xx**2 + yy**2 < 250**2] = 40.0
    x = preprocess(hu, (0.9, 0.9), PreprocessParams())
    assert x[-1].max() == pytest.approx(1.0) and x[-1].min() == 0.0
    assert x[0].min() >= -1.0 and x[0].max() <= 1.0
    with pytest.raises(ValueError):
        preprocess(hu, (0.0, 0.9), PreprocessParams())


def test_preprocess_mask_cache_gives_what_the_resize_gives(monkeypatch):
    """The FOV-mask channel is kept per exact padding mask: a series' repeated padding reuses it, a
    different padding (another field, a shifted field, a mirrored slice) does not, and every result equals
    the uncached computation."""
    from medqc.analysis import preprocess as pp_mod

    pp = PreprocessParams()
    yy, xx = np.mgrid[:512, :512] - 255.5
    masks = [xx**2 + yy**2 < 250**2, xx**2 + yy**2 < 200**2, (xx + 40) ** 2 + yy**2 < 210**2]
    cases = [(np.where(m, 40.0, -3024.0).astype(np.float32), ori)
             for m in masks for ori in (None, (-1, 0, 0, 0, 1, 0))]
    pp_mod._MASK_CACHE.clear()
    cached = [preprocess(hu, (0.9, 0.9), pp, ori) for hu, ori in cases + cases]  # second round: from the cache
    assert len(pp_mod._MASK_CACHE) == 4  # two centred fields (mirroring leaves them as they are), a shifted one and its mirror
    monkeypatch.setattr(pp_mod, "_resized_mask", lambda inside, h, w: pp_mod._area_resize(inside.astype(np.float32), h, w))
    direct = [preprocess(hu, (0.9, 0.9), pp, ori) for hu, ori in cases + cases]
    for a, b in zip(cached, direct):
        assert np.array_equal(a, b)
    assert not np.array_equal(cached[0][-1], cached[2][-1])  # different fields, different masks


def test_preprocess_mirrors_slices_into_the_training_layout():
    """A slice stored with rows running posterior→anterior (prone habit, flipped archives) and/or columns
    running left→right reaches the network as a supine head-first slice would: the same array."""
    rng = np.random.default_rng(3)
    hu = np.full((256, 256), -1000.0, np.float32)
    hu[40:150, 60:220] = 40.0  # an asymmetric body: more tissue anterior and to the patient's left
    hu[150:200, 60:120] = 300.0
    hu += rng.normal(0, 5, hu.shape).astype(np.float32)
    pp = PreprocessParams(size=128)
    ref = preprocess(hu, (1.0, 1.0), pp, (1, 0, 0, 0, 1, 0))
    assert np.array_equal(ref, preprocess(hu, (1.0, 1.0), pp))  # no orientation given: stored layout
    for iop, stored in (((1, 0, 0, 0, -1, 0), hu[::-1]), ((-1, 0, 0, 0, 1, 0), hu[:, ::-1]),
                        ((-1, 0, 0, 0, -1, 0), hu[::-1, ::-1])):
        got = preprocess(np.ascontiguousarray(stored), (1.0, 1.0), pp, iop)
        assert np.array_equal(got, ref), iop
        assert not np.array_equal(preprocess(np.ascontiguousarray(stored), (1.0, 1.0), pp), ref)
    # tilted gantry (column direction 0, cos t, sin t) is still the training layout; a rotated in-plane
    # frame (x and y swapped) or a non-axial slice is left as stored
    assert np.array_equal(preprocess(hu, (1.0, 1.0), pp, (1, 0, 0, 0, 0.966, 0.259)), ref)
    assert np.array_equal(preprocess(hu, (1.0, 1.0), pp, (0, 1, 0, -1, 0, 0)), ref)
    assert np.array_equal(preprocess(hu, (1.0, 1.0), pp, (1, 0, 0, 0, 0, -1)), ref)


def test_numpy_fallback_matches_opencv():
    import medqc.analysis.preprocess as p

    rng = np.random.default_rng(1)
    hu = rng.normal(0, 50, (300, 300)).astype(np.float32)
    a = p.preprocess(hu, (0.8, 0.8), PreprocessParams(size=128))
    cv2, p.cv2 = p.cv2, None
    try:
        b = p.preprocess(hu, (0.8, 0.8), PreprocessParams(size=128))
    finally:
        p.cv2 = cv2
    assert np.abs(a - b).max() < 0.02


def test_bundle_and_onnxruntime_runner(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert available_backends(b)["onnxruntime"][0]
    r = make_runner("onnxruntime", b)
    x = np.zeros((3, *r.input_shape), np.float32)
    x[1, 0] = 1.0
    out = r.infer(x)
    assert out["artifact_logits"].shape == (3, 5) and out["position"].shape == (3, 1)
    assert out["artifact_logits"][1, 0] != out["artifact_logits"][0, 0]


def test_bundle_sha_mismatch_is_clear(tiny_bundle, tmp_path):
    import shutil

    d = tmp_path / "b"
    shutil.copytree(tiny_bundle, d)
    (d / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(d).verify("onnx")
    with pytest.raises(BundleError, match="manifest.json not found"):
        load_bundle(tmp_path / "nowhere")


def test_config_defaults_and_errors(tmp_path):
    cfg = load_config(None)
    assert cfg.dicom.port == 11112 and cfg.dicom.ae_title == "MEDQC" and cfg.http.bind == "127.0.0.1:8480"
    f = tmp_path / "c.toml"
    f.write_text("[dicom]\nprot = 104\n")
    with pytest.raises(ConfigError, match="prot"):
        load_config(f)
    f.write_text("[inference]\nbackend = 'cuda'\n")
    with pytest.raises(ConfigError, match="inference.backend.*choose one of"):
        load_config(f)
    f.write_text("[checks.artifact.thresholds]\nmetal = 1.5\n")
    with pytest.raises(ConfigError, match="metal"):
        load_config(f)
    assert load_config(None, {"dicom.port": 104}).dicom.port == 104


def test_auto_prefers_the_gpu_but_costs_a_cpu_box_no_torch_import():
    """``auto``: TensorRT, then ONNX Runtime CUDA, then torch on the GPU, then ONNX Runtime on the CPU. On a
    machine without an NVIDIA driver the torch-cuda candidate is ruled out before torch is imported (the agent
    must start as light as it can where torch happens to be installed), and ONNX Runtime is chosen."""
    import subprocess
    import sys

    from medqc.runners import AUTO_ORDER
    from medqc.runners.torch_runner import nvidia_driver_present

    assert AUTO_ORDER.index("torch-cuda") < AUTO_ORDER.index("onnxruntime")
    if nvidia_driver_present():
        pytest.skip("an NVIDIA driver is present: the GPU check (scripts/gpu-check) covers this machine")
    code = ("import sys; from medqc.bundle import load_bundle; from medqc.runners import make_runner, backend_class\n"
            "b = load_bundle(None)\n"
            "ok, why = backend_class('torch-cuda').is_available(b)\n"
            "r = make_runner('auto', b)\n"
            "print(r.name, ok, why, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[:2] == ["onnxruntime", "False"] and out.stdout.split()[-1] == "False", out.stdout
    assert "no NVIDIA driver" in out.stdout
