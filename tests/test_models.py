"""QC network, checkpoints and metrics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from medqc import ARTIFACTS


def test_import_does_not_load_torch():
    code = "import sys, medqc.models, medqc.models.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_model_names_and_unknown():
    from medqc.models import build_model, model_names

    assert "qcnet" in model_names()
    with pytest.raises(ValueError, match="choose one of: .*qcnet"):
        build_model("resnet50")


@pytest.mark.parametrize("name", ["qcnet", "qcnet-small"])
def test_build_model_shapes(name):
    import torch

    from medqc.models import build_model
    from medqc.models.qcnet import count_flops, count_params

    m = build_model(name).eval()
    x = torch.zeros((3, 4, 256, 256))
    with torch.no_grad():
        logits, pos = m(x)
    assert logits.shape == (3, len(ARTIFACTS)) and pos.shape == (3, 1)
    assert logits.dtype == torch.float32 and pos.dtype == torch.float32
    # position is in reference mm: the untrained net starts near the middle of the body scale, not near 0..1
    assert 100 < float(pos.mean()) < 1000
    # it also takes other input sizes (global pooling) and responds to content
    with torch.no_grad():
        l2, _ = m(torch.rand((2, 4, 128, 128)) * 2 - 1)
    assert l2.shape == (2, 5)
    assert not torch.allclose(l2[0], l2[1])
    flops = count_flops(m, (4, 256, 256))
    assert 1e7 < flops < 1e9, flops  # budget: well under a ResNet-18 (3.6 GFLOP at 224²)
    assert count_params(m) < 2_000_000


def _save_ckpt(path, **over):
    import torch

    from medqc.models import CHECKPOINT_FORMAT, build_model
    from medqc.analysis.preprocess import PreprocessParams

    m = build_model("qcnet-small")
    ck = {
        "format": CHECKPOINT_FORMAT,
        "model": "qcnet-small",
        "kwargs": {"in_channels": 4, "num_labels": 5, "width": 8},
        "state_dict": m.state_dict(),
        "preprocess": PreprocessParams().to_dict(),
        "labels": list(ARTIFACTS),
        "thresholds": {a: 0.5 for a in ARTIFACTS},
        "version": "test",
        "metrics": {},
        "seed": 0,
    }
    ck.update(over)
    torch.save(ck, path)
    return m


def test_load_checkpoint_roundtrip(tmp_path):
    import torch

    from medqc.models import load_checkpoint

    p = tmp_path / "ok.pt"
    m = _save_ckpt(p)
    name, model, meta = load_checkpoint(p)
    assert name == "qcnet-small" and not model.training
    assert "state_dict" not in meta and meta["labels"] == list(ARTIFACTS)
    x = torch.rand((2, 4, 64, 64))
    m.eval()
    with torch.no_grad():
        a, b = m(x), model(x)
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_load_checkpoint_errors(tmp_path):
    from medqc.errors import MedqcError
    from medqc.models import CheckpointError, build_model, load_checkpoint

    assert issubclass(CheckpointError, MedqcError)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(bad)
    good = tmp_path / "good.pt"
    _save_ckpt(good)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt|readable"):
        load_checkpoint(trunc)
    p = tmp_path / "fmt.pt"
    _save_ckpt(p, format="something/else")
    with pytest.raises(CheckpointError, match="format is 'something/else'"):
        load_checkpoint(p)
    _save_ckpt(p, labels=["metal", "motion", "ring", "noise"])
    with pytest.raises(CheckpointError, match="labels"):
        load_checkpoint(p)
    _save_ckpt(p, model="vgg")
    with pytest.raises(CheckpointError, match="unknown model 'vgg'"):
        load_checkpoint(p)
    _save_ckpt(p, state_dict=build_model("qcnet").state_dict())  # weights of the wider net
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_checkpoint(p)
    _save_ckpt(p, preprocess={"size": 256, "colour": True})
    with pytest.raises(CheckpointError, match="preprocessing"):
        load_checkpoint(p)


def test_metrics():
    from medqc.models.metrics import auroc, choose_thresholds, position_metrics, sensitivity_at, threshold_at_specificity

    y = np.array([0, 0, 0, 1, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])) == 1.0
    assert auroc(y, np.array([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])) == 0.0
    assert auroc(y, np.full(6, 0.5)) == 0.5
    assert np.isnan(auroc(np.zeros(4), np.arange(4.0)))
    rng = np.random.default_rng(0)
    yy = rng.random(2000) < 0.3
    s = rng.normal(size=2000) + yy * 1.0
    # AUROC of two unit normals 1 sd apart is Phi(1/sqrt 2) = 0.760
    assert abs(auroc(yy, s) - 0.760) < 0.03
    neg = np.arange(100) / 100.0
    thr = threshold_at_specificity(np.zeros(100, bool), neg, 0.95)
    assert (neg <= thr).mean() >= 0.95 and (neg <= thr - 1e-9).mean() < 0.95
    assert sensitivity_at(np.array([1, 1, 0]), np.array([0.9, 0.2, 0.1]), 0.5) == 0.5
    t = choose_thresholds(["a"], np.array([[0], [0], [1]]), np.array([[-3.0], [-2.0], [3.0]]), 0.5)
    assert 0 < t["a"] < 0.5
    pm = position_metrics(np.array([100.0, np.nan, 300.0]), np.array([110.0, 5.0, 280.0]))
    assert pm["n"] == 2 and pm["median_abs_mm"] == 15.0 and pm["bias_mm"] == -5.0
