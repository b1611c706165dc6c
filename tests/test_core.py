"""Shared core: preprocessing, bundle loading, runner interface, config validation."""

from __future__ import annotations

import numpy as np
import pytest

from medqc.bundle import BundleError, load_bundle
from medqc.config import ConfigError, load_config
from medqc.analysis.preprocess import geometry
from medqc.runners import RunnerError, available_backends, make_runner


def test_bundle_and_onnxruntime_runner(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert available_backends(b)["onnxruntime"][0]
    r = make_runner("onnxruntime", b)
    hu = np.full((3, 300, 300), -1000.0, np.float32)
    hu[1, 100:200, 100:200] = 40.0  # slice 1 has tissue: its first window channel differs
    out = r.infer(geometry(300, 300, (1.2, 1.2), b.preprocess).feeds(hu))
    assert out["artifact_logits"].shape == (3, 5) and out["position"].shape == (3, 1)
    assert out["artifact_logits"][1, 0] != out["artifact_logits"][0, 0]
    assert np.array_equal(out["artifact_logits"][0], out["artifact_logits"][2])
    with pytest.raises(RunnerError, match="missing input"):
        r.infer({"hu": hu})
    with pytest.raises(RunnerError, match="row_index reads outside"):
        r.infer(geometry(400, 300, (1.2, 1.2), b.preprocess).feeds(np.zeros((1, 400, 300), np.float32)) | {"hu": hu})


def test_bundle_of_preprocessed_input_is_refused_with_the_fix(tiny_bundle, tmp_path):
    """A bundle written before the preprocessing moved into the model (input ``image``, N×C×S×S) cannot
    run: every backend says so and how to re-export it."""
    import json
    import shutil

    from medqc.runners import BackendUnavailable

    d = tmp_path / "old"
    shutil.copytree(tiny_bundle, d)
    m = json.loads((d / "manifest.json").read_text())
    m["inputs"] = {"image": [-1, 4, 128, 128]}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BackendUnavailable, match="preprocessed images.*re-export.*medqc export onnx --checkpoint"):
        make_runner("onnxruntime", load_bundle(d))


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
