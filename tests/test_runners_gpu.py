"""GPU paths of medqc export and the runners: torch CUDA + AMP parity, TensorRT engine build, parity,
batch splitting, manifest mismatch → fallback, and rebuild. Skipped with a reason without CUDA/TensorRT;
``scripts/gpu-check`` runs them on a CUDA machine."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import missing_peer, need_module

torch = need_module("torch", "the train extra")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch (torch.cuda.is_available() is False)", allow_module_level=True)


def _export_helpers():
    spec = importlib.util.spec_from_file_location("_medqc_test_export", Path(__file__).with_name("test_export.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def need_tensorrt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        missing_peer("TensorRT is not installed on this CUDA machine (pip install tensorrt)")


@pytest.fixture(scope="module")
def gpu_bundle(tmp_path_factory) -> Path:
    from medqc.cli import main

    h = _export_helpers()
    d = tmp_path_factory.mktemp("gpu")
    ck = h.trained_checkpoint() or h.make_checkpoint(d / "qcnet.pt", "qcnet")  # FP16 gates need trained weights
    out = d / "bundle"
    assert main(["export", "onnx", "--checkpoint", str(ck), "--out", str(out), "--fp16"]) == 0
    return out


def test_torch_cuda_amp_matches_onnxruntime_cpu(gpu_bundle):
    from medqc.bundle import load_bundle
    from medqc.export.compare import Comparator
    from medqc.export.specs import FP16_TOL, FP32_TOL
    from medqc.export.validation import validation_batch
    from medqc.runners import make_runner

    b = load_bundle(gpu_bundle)
    x, _ = validation_batch(b.preprocess, 48)
    with make_runner("onnxruntime", b) as ref, make_runner("torch", b, device="cuda", amp=False) as t32, \
            make_runner("torch", b, device="cuda", amp=True) as t16:
        assert t16.describe()["precision"] == "fp16" and t16.describe()["device"].startswith("cuda")
        c32 = Comparator({**FP32_TOL, "artifact_logits": type(FP32_TOL["artifact_logits"])(1e-2, 1e-2)}, b.labels, b.thresholds)
        rep = c32.compare(ref, t32, x, name="torch cuda fp32 vs ort cpu")  # cuDNN kernels differ from the CPU ones
        assert rep.passed, rep.text()
        rep = Comparator(FP16_TOL, b.labels, b.thresholds).compare(ref, t16, x, name="torch cuda amp vs ort cpu")
        assert rep.passed, rep.text()


def test_auto_picks_the_gpu_and_analyze_decides_as_on_the_cpu(tmp_path):
    """On a CUDA machine ``auto`` runs on the GPU (TensorRT, ONNX Runtime CUDA, else torch FP16), and
    ``medqc analyze`` with it reaches the same findings and per-slice decisions as ONNX Runtime on the CPU,
    on a synthetic series with metal."""
    import os
    import subprocess
    import sys

    from medqc.bundle import load_bundle
    from medqc.runners import make_runner

    with make_runner("auto", load_bundle(None)) as r:
        assert r.name in ("tensorrt", "onnxruntime-cuda", "torch-cuda"), r.name
        assert "cuda" in str(r.describe().get("device", "cuda")) or r.name == "tensorrt"
    env = dict(os.environ, MEDQC_LOG_LEVEL="WARNING")
    study = tmp_path / "syn"
    s = subprocess.run([sys.executable, "-m", "medqc", "synth", str(study), "--region", "chest", "--slices", "16",
                        "--matrix", "256", "--artifact", "metal@6-8", "--seed", "3", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert s.returncode == 0, s.stderr[-2000:]
    reps = {}
    for backend in ("auto", "onnxruntime"):
        a = subprocess.run([sys.executable, "-m", "medqc", "analyze", str(study), "--json", "--backend", backend],
                           capture_output=True, text=True, env=env, timeout=600)
        reps[backend] = json.loads(a.stdout)["series"][0]
        assert a.returncode == (1 if reps[backend]["verdict"] == "fail" else 0), a.stderr[-2000:]  # medqc analyze's exit status
    gpu, cpu = reps["auto"], reps["onnxruntime"]
    assert sorted(f["check"] for f in gpu["findings"]) == sorted(f["check"] for f in cpu["findings"])
    for g, c in zip(gpu["per_slice"], cpu["per_slice"]):  # FP16 on the GPU: scores within a few hundredths
        assert all(abs(g["scores"][k] - c["scores"][k]) <= 0.05 for k in c["scores"]), (g["scores"], c["scores"])
        assert abs(g["position_ref_mm"] - c["position_ref_mm"]) < 5.0


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_tensorrt_engine_build_parity_and_manifest(precision, gpu_bundle, tmp_path, capsys):
    need_tensorrt()
    from medqc.bundle import load_bundle
    from medqc.cli import main
    from medqc.export.validation import validation_batch
    from medqc.runners import make_runner

    root = tmp_path / "b"
    shutil.copytree(gpu_bundle, root)
    cache = tmp_path / "timing.cache"
    args = ["export", "engine", "--bundle", str(root), "--batch", "1:4:16", "--workspace", "512", "--timing-cache", str(cache), "--json"]
    if precision == "fp16":
        args.append("--fp16")
    assert main(args) == 0
    s = json.loads(capsys.readouterr().out)
    e = s["engine"]
    assert e["fp16"] == (precision == "fp16") and e["batch"] == [1, 4, 16] and e["parity"]["passed"]
    for key in ("tensorrt", "cuda", "gpu", "compute_capability", "sha256", "onnx_sha256", "builder_flags"):
        assert e[key], key
    assert cache.is_file() and cache.stat().st_size > 0
    assert (root / e["path"]).with_suffix(".json").is_file()
    b = load_bundle(root)
    assert [x["path"] for x in b.engines] == [e["path"]]
    from medqc.analysis.preprocess import geometry
    from medqc.export.compare import infer_batched
    from medqc.export.validation import phantom_slice

    rng = np.random.default_rng(0)
    x = geometry(512, 512, (0.8, 0.8), b.preprocess, (-1, 0, 0, 0, -1, 0)).feeds(
        np.stack([phantom_slice(rng, 512, 410.0)[0] for _ in range(40)]))
    mixed, _ = validation_batch(b.preprocess, 24)  # 256-768 matrices, 0.2-2 mm pixels, flips: the dynamic profile
    with make_runner("tensorrt", b) as trt, make_runner("onnxruntime", b) as ref:
        big = trt.infer(x)  # 40 > profile max 16: split
        one = trt.infer({**x, "hu": x["hu"][:1]})
        r = ref.infer(x)
        rm, tm = infer_batched(ref, mixed, 16), infer_batched(trt, mixed, 16)
    assert np.abs(tm["position"] - rm["position"]).max() < 2.0
    assert big["artifact_logits"].shape == (40, 5) and one["position"].shape == (1, 1)
    assert np.abs(big["position"] - r["position"]).max() < 1.0
    assert np.allclose(one["artifact_logits"], big["artifact_logits"][:1], atol=5e-2)


def test_mismatched_engine_falls_back_or_rebuilds(gpu_bundle, tmp_path, caplog):
    need_tensorrt()
    from medqc.bundle import load_bundle, write_manifest
    from medqc.runners import BackendUnavailable, make_runner
    from medqc.runners.tensorrt_runner import TensorRTRunner

    root = tmp_path / "b"
    shutil.copytree(gpu_bundle, root)
    m = json.loads((root / "manifest.json").read_text())
    m["engines"] = [{"path": "engines/other.plan", "tensorrt": "9.9.9", "gpu": "Some Other GPU", "compute_capability": "7.5", "fp16": True}]
    write_manifest(root, m)
    b = load_bundle(root)
    with pytest.raises(BackendUnavailable, match="9.9.9"):
        TensorRTRunner(b)
    with make_runner("auto", b) as r:
        assert r.name in ("onnxruntime-cuda", "torch-cuda", "onnxruntime")
    assert "falling back" in caplog.text
    with make_runner("tensorrt", b, rebuild=True) as r:
        assert r.describe()["gpu"] == torch.cuda.get_device_name(0)
    assert len(load_bundle(root).engines) == 2
