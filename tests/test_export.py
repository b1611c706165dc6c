"""medqc export: ONNX bundles, parity gates (tolerances + task metrics), runner selection, clear errors.

Models are the real networks from medqc.models with random weights whose heads are rescaled so logits
spread around the thresholds and positions spread over the body scale (export correctness does not need
training, but a gate on logits that all sit at 0 would measure nothing). Parity batches are synthetic CT
preprocessed by the shared function. TensorRT paths that need a GPU are in tests/test_runners_gpu.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import need_module  # noqa: E402

torch = need_module("torch")
onnx = need_module("onnx")

from medqc import ARTIFACTS  # noqa: E402
from medqc.bundle import load_bundle  # noqa: E402
from medqc.cli import main  # noqa: E402
from medqc.analysis.preprocess import INPUT_NAMES, PreprocessParams  # noqa: E402

# Every model in medqc.models.model_names() must appear here (and so be exported by test_export_model).
EXPORT_TESTED = ("qcnet", "qcnet-small")
PP = PreprocessParams(size=128, pixel_mm=4.0)  # small inputs keep the tests fast on two cores


def _images(n: int, seed: int):
    """``n`` phantom slices of the validation source, preprocessed (torch), and the slices themselves."""
    from medqc.export.validation import validation_slices
    from medqc.models.slice_input import prepare

    slices, _ = validation_slices(PP, n, seed=seed, source="phantom")
    return prepare(slices, PP), slices


def _spread_heads(model, seed: int = 99) -> None:
    """Rescale the last layers so logits have std ~2 around 0 and positions vary by ~100 mm."""
    x, _ = _images(64, seed)
    with torch.no_grad():
        lin, pos = model.artifact_head[-1], model.position_head[-1]
        lg, ps = model(torch.from_numpy(x))
        mu, sd = lg.mean(0), lg.std(0).clamp_min(1e-9)
        lin.weight.mul_((2.0 / sd)[:, None])
        lin.bias.copy_((lin.bias - mu) * 2.0 / sd)
        s = float(ps.std() / 1000) or 1e-9
        pos.weight.mul_(0.1 / s)
        pos.bias.fill_(0.6 - float((ps.mean() / 1000 - pos.bias[0]) * 0.1 / s))


def make_checkpoint(path: Path, name: str = "qcnet", seed: int = 0) -> Path:
    from medqc.models import CHECKPOINT_FORMAT, build_model

    torch.manual_seed(seed)
    model = build_model(name).eval()
    _spread_heads(model)
    torch.save(
        {"format": CHECKPOINT_FORMAT, "model": name, "kwargs": {}, "state_dict": model.state_dict(), "preprocess": PP.to_dict(),
         "labels": list(ARTIFACTS), "thresholds": {a: 0.5 for a in ARTIFACTS}, "version": f"test-{name}", "metrics": {"note": "test"}},
        path,
    )
    return path


def trained_checkpoint() -> Path | None:
    p = Path(__file__).resolve().parents[1] / "models" / "default" / "checkpoint.pt"
    return p if p.is_file() else None


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("ckpt")
    return {n: make_checkpoint(d / f"{n}.pt", n) for n in EXPORT_TESTED}


@pytest.fixture(scope="module")
def qc_bundle(tmp_path_factory, checkpoints) -> Path:
    """The FP16 path on trained weights: the shipped default checkpoint. A random trunk behind rescaled
    heads (make_checkpoint) amplifies FP16 rounding far beyond what a trained network shows, so its FP16
    gate result says nothing about real exports."""
    out = tmp_path_factory.mktemp("b") / "qcnet"
    assert main(["export", "onnx", "--checkpoint", str(trained_checkpoint() or checkpoints["qcnet"]), "--out", str(out), "--fp16"]) == 0
    return out


def test_every_registered_model_has_an_export_spec_and_test():
    from medqc.export.specs import registered
    from medqc.models import model_names

    missing_spec = set(model_names()) - set(registered())
    missing_test = set(model_names()) - set(EXPORT_TESTED)
    assert not missing_spec, f"models without an export spec in medqc/export/specs.py: {sorted(missing_spec)}"
    assert not missing_test, f"models without an export test (add to EXPORT_TESTED): {sorted(missing_test)}"


@pytest.mark.parametrize("name", EXPORT_TESTED)
def test_export_model(name, checkpoints, tmp_path, capsys):
    out = tmp_path / name
    rc = main(["export", "onnx", "--model", name, "--checkpoint", str(checkpoints[name]), "--out", str(out), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert rc == 0 and summary["ok"] and summary["trained"]
    b = load_bundle(out)
    assert b.name == name and b.labels == ARTIFACTS and b.preprocess == PP
    assert b.manifest["inputs"] == {"hu": [-1, -1, -1], "row_index": [128, -1], "row_weight": [128, -1], "col_index": [128, -1],
                                    "col_weight": [128, -1], "row_valid": [128], "col_valid": [128]}
    assert b.manifest["export"]["parity"]["onnx"]["passed"]
    assert b.manifest["export"]["parity"]["onnx"]["borderline"] == 0  # the gate counted every decision
    b.verify("onnx"), b.verify("checkpoint")
    m = onnx.load(str(out / "model.onnx"))
    props = {p.key: p.value for p in m.metadata_props}
    assert props["medqc.name"] == name and json.loads(props["medqc.labels"]) == list(ARTIFACTS)
    assert PreprocessParams.from_dict(json.loads(props["medqc.preprocess"])) == PP
    assert props["medqc.checkpoint_sha256"] == b.manifest["files"]["checkpoint"]["sha256"]
    assert [i.name for i in m.graph.input] == list(INPUT_NAMES) and [o.name for o in m.graph.output] == ["artifact_logits", "position"]
    assert [d.dim_param for d in m.graph.input[0].type.tensor_type.shape.dim] == ["batch", "rows", "cols"]
    assert b.manifest["export"]["validation"]["geometries"] > 1  # the gate ran several matrices / spacings / flips
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "a partial bundle folder was left behind"


def test_bundle_runs_in_every_cpu_runner_and_matches_torch(qc_bundle):
    from medqc.export.validation import validation_batch
    from medqc.runners import make_runner

    b = load_bundle(qc_bundle)
    assert set(b.manifest["files"]) == {"onnx", "onnx_fp16", "checkpoint"}
    assert b.manifest["export"]["parity"]["onnx_fp16"]["passed"]
    from medqc.analysis.preprocess import geometry
    from medqc.export.compare import infer_batched
    from medqc.export.validation import phantom_slice

    x, _ = validation_batch(b.preprocess, 12, seed=7)  # 12 geometries: matrices, spacings, flips
    rng = np.random.default_rng(7)
    same = geometry(512, 512, (0.8, 0.8), b.preprocess, (-1, 0, 0, 0, 1, 0)).feeds(
        np.stack([phantom_slice(rng, 512, 410.0)[0] for _ in range(5)]))  # one geometry, a batch of 5
    with make_runner("torch", b) as tr:
        assert tr.describe()["precision"] == "fp32"
        ref = infer_batched(tr, x, 16)
        ref5 = tr.infer(same)
    with make_runner("onnxruntime", b) as r:
        out = infer_batched(r, x, 16)
        assert out["artifact_logits"].shape == (12, 5) and out["position"].shape == (12, 1)
        assert np.abs(out["artifact_logits"] - ref["artifact_logits"]).max() < 1e-3
        assert np.abs(out["position"] - ref["position"]).max() < 0.05
        for n in (1, 3, 5):  # dynamic batch
            o = r.infer({**same, "hu": same["hu"][:n]})
            assert o["artifact_logits"].shape == (n, 5) and o["position"].shape == (n, 1)
            assert np.abs(o["artifact_logits"] - ref5["artifact_logits"][:n]).max() < 1e-3
    assert np.ptp(ref["artifact_logits"], axis=0).min() > 1.0  # outputs respond to the CT content


def test_int8_variant_is_gated(checkpoints, tmp_path, capsys):
    """INT8 on a model whose heads amplify tiny feature differences ~1000x (random trunk + rescaled heads):
    quantisation noise flips decisions, and the gate refuses the whole bundle. On the plain untrained
    network the INT8 file is written, recorded and runs under the onnxruntime-int8 runner."""
    from medqc.runners import make_runner

    rc = main(["export", "onnx", "--checkpoint", str(checkpoints["qcnet"]), "--out", str(tmp_path / "bad"), "--int8"])
    err = capsys.readouterr().err
    assert rc == 1 and "onnx int8 vs torch fp32" in err and "no bundle written" in err
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "ok"
    assert main(["export", "onnx", "--model", "qcnet-small", "--allow-untrained", "--out", str(out), "--int8", "--validation-slices", "8"]) == 0
    b = load_bundle(out)
    assert b.manifest["files"]["onnx_int8"]["precision"] == "int8" and b.manifest["export"]["parity"]["onnx_int8"]["passed"]
    b.verify("onnx_int8")
    with make_runner("onnxruntime-int8", b) as r:
        from medqc.analysis.preprocess import geometry

        feeds = geometry(256, 256, (1.0, 1.0), b.preprocess).feeds(np.full((3, 256, 256), -1000.0, np.float32))
        assert r.infer(feeds)["position"].shape == (3, 1)


def test_auto_falls_back_from_unmatched_engine_to_onnxruntime(qc_bundle, tmp_path, caplog):
    """A bundle with an engine built elsewhere: auto never crashes, picks ONNX Runtime and says why."""
    import shutil

    from medqc.bundle import write_manifest
    from medqc.runners import available_backends, make_runner

    root = tmp_path / "b"
    shutil.copytree(qc_bundle, root)
    m = json.loads((root / "manifest.json").read_text())
    m["engines"] = [{"path": "engines/a100.plan", "tensorrt": "10.0.1", "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0", "fp16": True}]
    write_manifest(root, m)
    b = load_bundle(root)
    ok, why = available_backends(b)["tensorrt"]
    assert not ok and why
    with make_runner("auto", b) as r:
        assert r.name in ("onnxruntime", "onnxruntime-cuda")


def test_engine_selection_matches_version_gpu_and_onnx():
    from medqc.runners.tensorrt_runner import engine_mismatch, select_engine

    env = {"tensorrt": "10.3.0", "cuda": "12.4", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    good16 = {"path": "h100-16.plan", **env, "fp16": True, "onnx_sha256": "abc"}
    good32 = {"path": "h100-32.plan", **env, "fp16": False, "onnx_sha256": "abc"}
    other_trt = {**good16, "path": "old.plan", "tensorrt": "10.0.1"}
    other_gpu = {**good16, "path": "l4.plan", "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    stale = {**good16, "path": "stale.plan", "onnx_sha256": "old"}
    assert engine_mismatch(good16, env, "abc") == []
    assert "TensorRT version" in engine_mismatch(other_trt, env)[0]
    assert any("GPU" in r for r in engine_mismatch(other_gpu, env)) and any("compute capability" in r for r in engine_mismatch(other_gpu, env))
    assert "stale" in engine_mismatch(stale, env, "abc")[0]
    entry, reasons = select_engine([other_trt, other_gpu, stale, good16, good32], env, "abc")
    assert entry is good16 and len(reasons) == 3
    assert select_engine([good16, good32], env, "abc", precision="fp32")[0] is good32
    entry, reasons = select_engine([other_trt, other_gpu], env, "abc")
    assert entry is None and "10.0.1" in reasons[0] and "NVIDIA L4" in reasons[1]


def test_checkpoint_required_unless_allow_untrained(tmp_path, capsys):
    rc = main(["export", "onnx", "--model", "qcnet", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "--checkpoint is required" in err and "--allow-untrained" in err
    assert not (tmp_path / "x").exists()


def test_untrained_export_is_recorded(tmp_path, capsys):
    out = tmp_path / "u"
    assert main(["export", "onnx", "--model", "qcnet-small", "--allow-untrained", "--out", str(out), "--validation-slices", "8"]) == 0
    b = load_bundle(out)
    assert b.manifest["trained"] is False and "checkpoint" not in b.manifest["files"]
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props["medqc.trained"] == "false" and props["medqc.checkpoint_sha256"].startswith("none")
    assert "UNTRAINED" in capsys.readouterr().out


def test_unknown_model_and_missing_checkpoint_name_the_choices(tmp_path, checkpoints, capsys):
    assert main(["export", "onnx", "--model", "resnet9000", "--checkpoint", str(checkpoints["qcnet"]), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "resnet9000" in err and "qcnet" in err and "qcnet-small" in err
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "b")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["export", "onnx", "--model", "qcnet-small", "--checkpoint", str(checkpoints["qcnet"]), "--out", str(tmp_path / "c")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["export", "onnx", "--list"]) == 0
    from medqc.models import model_names

    assert capsys.readouterr().out.split() == list(model_names())


def test_existing_bundle_needs_force(qc_bundle, checkpoints, tmp_path, capsys):
    before = (qc_bundle / "manifest.json").read_text()
    assert main(["export", "onnx", "--checkpoint", str(checkpoints["qcnet"]), "--out", str(qc_bundle)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (qc_bundle / "manifest.json").read_text() == before
    out = tmp_path / "f"
    out.mkdir()
    (out / "stale.onnx").write_bytes(b"old")
    assert main(["export", "onnx", "--checkpoint", str(checkpoints["qcnet-small"]), "--out", str(out), "--force", "--validation-slices", "8"]) == 0
    assert not (out / "stale.onnx").exists() and load_bundle(out).name == "qcnet-small"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # no partial or old copies left beside it


class Branchy(torch.nn.Module):
    """Data-dependent Python control flow: tracing freezes one branch, so the ONNX graph is wrong for
    inputs that take the other one — the classic silent exporter failure the gate must catch."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, stride=4)
        self.head = torch.nn.Linear(8, 5)
        self.pos = torch.nn.Linear(8, 1)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean((2, 3))
        logits = self.head(f) * 50.0
        if float(x[:, 0].mean()) > -0.9:  # traced with mostly-air phantoms; body-filled slices differ
            logits = -logits
        return logits, self.pos(f) * 1000.0


def test_parity_gate_stops_a_wrong_export_and_writes_nothing(tmp_path):
    from medqc.export.compare import ParityError
    from medqc.export.onnx_export import export_bundle
    from medqc.export.specs import ExportSpec
    from medqc.export.validation import validation_batch

    from medqc.analysis.preprocess import geometry

    torch.manual_seed(1)
    model = Branchy().eval()
    x, slices = _images(48, 1234)  # what the gate's phantom batch holds
    means = x[:, 0].mean(axis=(1, 2))
    assert (means > -0.9).any() and (means <= -0.9).any(), "the batch must exercise both branches"
    meta = {"preprocess": PP.to_dict(), "labels": list(ARTIFACTS), "thresholds": {a: 0.5 for a in ARTIFACTS}, "version": "t"}
    hu, ps, ori = slices[int(np.argmin(means))]
    spec = ExportSpec(model="branchy", sample_input=lambda p, n: geometry(*hu.shape, ps, p, ori).feeds(hu))  # traced on the most air-heavy
    with pytest.raises(ParityError) as ei:
        export_bundle(model, name="branchy", meta=meta, out_dir=tmp_path / "out", spec=spec, validation_source="phantom", progress=False)
    rep = ei.value.report
    assert not rep.passed and rep.decision_agreement < 0.995 and rep.decision_flips
    assert "artifact_logits" in rep.text() and json.loads(rep.to_json())["passed"] is False
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor a partial folder


def test_comparator_task_metrics():
    from medqc.export.compare import compare_outputs
    from medqc.export.specs import FP16_TOL

    rng = np.random.default_rng(0)
    ref = {"artifact_logits": rng.normal(0, 2, (200, 5)).astype(np.float32), "position": rng.uniform(0, 1800, (200, 1)).astype(np.float32)}
    kw = dict(tolerances=FP16_TOL, labels=ARTIFACTS, thresholds={a: 0.5 for a in ARTIFACTS})
    assert compare_outputs(ref, {k: v.copy() for k, v in ref.items()}, **kw).passed
    # positions 2 mm off pass a loose atol but fail the task metric
    moved = {"artifact_logits": ref["artifact_logits"], "position": ref["position"] + 2.0}
    rep = compare_outputs(ref, moved, **{**kw, "tolerances": {**FP16_TOL, "position": type(FP16_TOL["position"])(5.0, 0.0)}})
    assert not rep.passed and rep.position_max_delta_mm == pytest.approx(2.0, abs=1e-3)
    # flipping 1% of decisions just across the threshold: within atol, below 99.5 % agreement
    lg = ref["artifact_logits"].copy()
    idx = np.argsort(np.abs(lg).ravel())[:10]
    flat = lg.ravel()
    flat[idx] = -np.sign(flat[idx]) * 1e-3 + 0 * flat[idx]
    rep = compare_outputs(ref, {"artifact_logits": lg, "position": ref["position"]}, **kw)
    assert rep.outputs[0].passed and not rep.passed and rep.decision_agreement == pytest.approx(0.99)
    bad = {"artifact_logits": np.full_like(lg, np.nan), "position": ref["position"]}
    assert any("NaN" in f for f in compare_outputs(ref, bad, **kw).failures)


def test_validation_batch_is_ct_not_noise():
    from medqc.export.validation import validation_batch

    from medqc.export.compare import batch_size
    from medqc.models.slice_input import SliceInput, as_tensors

    ga, src = validation_batch(PP, 24, seed=5, source="phantom")
    gb, _ = validation_batch(PP, 24, seed=5, source="phantom")
    assert src == "phantom" and batch_size(ga) == 24 and len(ga) > 4  # several geometries
    assert all(np.array_equal(g[k], h[k]) for g, h in zip(ga, gb) for k in g)
    def flipped(g, axis):
        i = g[f"{axis}_index"][g[f"{axis}_valid"] > 0, 0]
        return bool(i[0] > i[-1])

    flips = {(flipped(g, "row"), flipped(g, "col")) for g in ga}
    assert len(flips) >= 3  # stored the usual way, upside down, and mirrored both ways
    with torch.inference_mode():
        a = np.concatenate([SliceInput(PP)(*as_tensors(g)).numpy() for g in ga])
    assert a.shape == (24, 4, 128, 128)
    assert a.min() >= -1 and a.max() <= 1
    fov = a[:, -1]
    assert (fov == 0).any() and (fov == 1).any()  # padding outside the field of view is marked
    bone = (a[:, 2] > -0.5).mean()
    assert 0.0 < bone < 0.2  # some bone / metal, mostly not
    air = (a[:, 1] < -0.95).mean()
    assert 0.2 < air < 0.9  # air around a body, not uniform noise
    with pytest.raises(ValueError):
        validation_batch(PP, 2, source="noise")


def test_engine_without_tensorrt_names_what_to_install(qc_bundle, capsys):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here; the GPU test covers the engine path")
    except ImportError:
        pass
    rc = main(["export", "engine", "--bundle", str(qc_bundle), "--fp16"])
    err = capsys.readouterr().err
    assert rc == 1 and "pip install tensorrt" in err
    assert json.loads((qc_bundle / "manifest.json").read_text())["engines"] == []


@pytest.mark.parametrize("bad", ["8", "0:1:2", "4:2:8", "a:b:c"])
def test_engine_batch_range_is_validated(bad, qc_bundle, capsys):
    with pytest.raises(SystemExit) as ei:
        main(["export", "engine", "--bundle", str(qc_bundle), "--batch", bad])
    assert ei.value.code == 2 and "MIN:OPT:MAX" in capsys.readouterr().err


def test_engine_missing_bundle_is_a_usage_error(tmp_path, capsys):
    assert main(["export", "engine", "--bundle", str(tmp_path / "none")]) == 2
    assert "manifest.json" in capsys.readouterr().err


def test_export_check_reports_every_backend(qc_bundle, capsys):
    rc = main(["export", "check", "--bundle", str(qc_bundle), "--validation-slices", "12", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert rc == 0 and s["ok"]
    assert s["runners"]["onnxruntime-int8"]["status"] == "skipped"  # this bundle has no INT8 file
    for name in ("onnxruntime", "torch", "onnx_fp16 (onnxruntime cpu)"):
        assert s["runners"][name]["status"] == "ran" and s["runners"][name]["passed"], s["runners"][name]
    trt = s["runners"]["tensorrt"]
    assert trt["status"] in ("ran", "skipped") and (trt["status"] == "ran" or trt["reason"])


def test_runner_availability_answers_without_gpu(qc_bundle):
    from medqc.runners.tensorrt_runner import TensorRTRunner
    from medqc.runners.torch_runner import TorchRunner

    ok, why = TensorRTRunner.is_available(load_bundle(qc_bundle))
    if not ok:
        assert "tensorrt" in why.lower() or "cuda" in why.lower() or "engine" in why.lower()
    assert TorchRunner.is_available(load_bundle(qc_bundle)) == (True, "ok")


def test_export_subcommand_required(capsys):
    assert main(["export"]) == 2
    assert "onnx" in capsys.readouterr().err


def test_python310_compatible_sources():
    """No 3.11-only syntax or stdlib in the export code (the code must run on Python 3.10)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = list((root / "export").glob("*.py")) + [root / "medqc/runners/torch_runner.py", root / "medqc/runners/tensorrt_runner.py",
                                                    root / "scripts/gpu-check"]
    for f in files:
        src = f.read_text()
        ast.parse(src, feature_version=(3, 10))
        assert "import tomllib" not in src and "typing import Self" not in src, f


def test_simplify_keeps_parity(checkpoints, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["export", "onnx", "--checkpoint", str(checkpoints["qcnet-small"]), "--out", str(out), "--simplify", "--opset", "17",
                 "--validation-slices", "16", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    b = load_bundle(out)
    assert b.manifest["export"]["simplifier"] in ("onnxsim", "onnxruntime-basic") and s["parity"]["onnx"]["passed"]
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert {p.key for p in onnx.load(str(out / "model.onnx")).metadata_props} >= {"medqc.name", "medqc.preprocess", "medqc.thresholds"}


def test_runner_errors_name_the_fix(qc_bundle, monkeypatch):
    """Without torch (hidden module) the torch runner says what to install; AMP needs CUDA."""
    import sys

    from medqc.runners import BackendUnavailable, make_runner
    from medqc.runners.tensorrt_runner import TensorRTRunner, runtime_environment
    from medqc.runners.torch_runner import TorchRunner

    b = load_bundle(qc_bundle)
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            make_runner("torch", b, device="cpu", amp=True)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError
    ok, why = TorchRunner.is_available(b)
    assert not ok and "pip install torch" in why
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    ok, why = TensorRTRunner.is_available(b)
    assert not ok and "pip install tensorrt" in why
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        runtime_environment()


def test_fp16_duplicate_casts_are_merged():
    """ONNX Runtime's FP16 converter before 1.32 emits one Cast per FP32-kept consumer of an FP16 tensor, all
    with the same output name; the export merges them so ``onnx.checker`` accepts the graph (seen on a GPU
    machine with onnxruntime 1.30)."""
    onnx = need_module("onnx")
    from onnx import TensorProto, helper

    from medqc.export.onnx_export import _dedupe_casts, _toposort

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 1])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 1])
    nodes = [
        helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], name="c1", to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x_cast_to_fp32"], ["a"], name="mean", axes=[1]),
        helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], name="c2", to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["x_cast_to_fp32"], ["b"], name="max", axes=[1]),
    ]
    g = helper.make_graph(nodes, "dup", [x], [a, b])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)
    _dedupe_casts(m.graph)
    _toposort(m.graph)
    onnx.checker.check_model(m)
    assert [n.name for n in m.graph.node].count("c2") == 0 and len(m.graph.node) == 3


def test_tensorrt_profile_covers_the_geometries_slices_bring():
    """The engine's optimisation profile (built on a GPU box; its shapes are computed here): dynamic batch,
    256-1024 rows and columns, 1-32 resampling taps — room for every geometry of the parity batch and for
    the matrices and fields of view scanners write (a 100 mm field at 1024², 0.1 mm pixels, to 640 mm)."""
    from medqc.analysis.preprocess import geometry
    from medqc.export.engine import profile_shapes
    from medqc.export.validation import validation_batch

    pp = PreprocessParams()
    prof = profile_shapes(pp.size, (1, 8, 32))
    assert set(prof) == set(INPUT_NAMES)
    assert prof["hu"] == ((1, 256, 256), (8, 512, 512), (32, 1024, 1024))
    assert prof["row_index"] == ((256, 1), (256, 3), (256, 32)) and prof["col_valid"] == ((256,),) * 3
    lo, hi = prof["row_index"][0][1], prof["row_index"][2][1]
    groups, _ = validation_batch(pp, 24, seed=1234)
    geoms = [g for g in groups] + [geometry(n, n, (fov / n, fov / n), pp).feeds(np.zeros((1, n, n), np.float32))
                                    for n in (256, 512, 768, 1024) for fov in (100.0, 250.0, 500.0, 640.0)]
    for g in geoms:
        assert prof["hu"][0][1] <= g["hu"].shape[1] <= prof["hu"][2][1]
        for k in ("row_index", "row_weight", "col_index", "col_weight"):
            assert g[k].shape[0] == pp.size and lo <= g[k].shape[1] <= hi, (k, g[k].shape)
