"""``medqc train``: option errors, and a tiny real training run on synthetic slices."""

from __future__ import annotations

import json

import pytest
from conftest import need_module  # noqa: E402

from medqc import ARTIFACTS
from medqc.cli import main


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--model", "resnet18"], "choose one of: qcnet"),
        (["--n-train", "3"], "--n-train must be >= 8"),
        (["--lr", "-1"], "--lr must be in"),
        (["--device", "tpu"], "auto, cpu, cuda"),
        (["--holdout", "patient_scale"], "bad --holdout rule"),
        (["--specificity", "1.5"], "--specificity"),
    ],
)
def test_bad_options_exit_2(argv, msg, capsys, tmp_path):
    rc = main(["train", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err
    assert "Traceback" not in err
    assert not (tmp_path / "c").exists()  # nothing generated before the options were checked


def test_cuda_requested_without_gpu(capsys, tmp_path):
    torch = need_module("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    rc = main(["train", "--device", "cuda", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--n-train", "8", "--n-val", "8"])
    assert rc == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_holdout_rules():
    from medqc.models.train import heldout_mask, parse_rule

    rules = [parse_rule("patient.scale>1.1"), parse_rule("kernel=BONE")]
    metas = [{"patient": {"scale": 1.2}}, {"patient": {"scale": 1.0}, "kernel": "bone"}, {"patient": {"scale": 1.0}, "kernel": "soft"}, {}]
    assert heldout_mask(metas, rules).tolist() == [True, True, False, False]


def test_tiny_training_run(tmp_path, capsys):
    need_module("medqc.synth.training", "the synthetic generator is part of this repository")
    from medqc.models import load_checkpoint

    out, cache, card = tmp_path / "run", tmp_path / "cache", tmp_path / "cards" / "tiny.md"
    argv = ["train", "--model", "qcnet-small", "--out", str(out), "--cache", str(cache), "--card", str(card),
            "--n-train", "32", "--n-val", "16", "--epochs", "8", "--batch-size", "8", "--lr", "3e-3",
            "--workers", "1", "--seed", "3", "--no-progress", "--holdout", "no_such_parameter>0"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(ARTIFACTS) <= set(summary["summary"])
    name, model, meta = load_checkpoint(out / "qcnet.pt")
    assert name == "qcnet-small" and meta["seed"] == 3 and meta["labels"] == list(ARTIFACTS)
    assert set(meta["thresholds"]) == set(ARTIFACTS) and all(0 <= v <= 1 for v in meta["thresholds"].values())
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = [h for h in metrics["history"] if "epoch" in h]
    assert len(epochs) == 8
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"], [e["train_loss"] for e in epochs]
    assert metrics["params"] > 1000 and metrics["flops_per_slice"] > 1e6
    assert metrics["ort_cpu"]["ms_per_slice"] > 0
    for part in ("all",):
        for a in ARTIFACTS:
            assert "auroc" in metrics["validation"][part]["artifacts"][a]
    text = card.read_text()
    for needle in ("## Training data", "Randomised variations", "AUROC", "ms/slice", "## Limitations", "## Chosen thresholds"):
        assert needle in text
    assert (out / "card.md").read_text() == text
    # the same seed reproduces the run: the cache is reused and the losses repeat
    out2 = tmp_path / "run2"
    argv2 = [a if a != str(out) else str(out2) for a in argv]
    argv2[argv2.index("--card") + 1] = str(tmp_path / "c2.md")
    assert main(argv2) == 0
    m2 = json.loads((out2 / "metrics.json").read_text())
    e2 = [h for h in m2["history"] if "epoch" in h]
    assert m2["data_seconds"] < max(1.0, metrics["data_seconds"])
    for a, b in zip(epochs, e2):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-3 * abs(a["train_loss"]) + 1e-6


def test_real_negatives_options(tmp_path, capsys):
    rc = main(["train", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--real-negatives", str(tmp_path / "nope")])
    assert rc == 2 and "--real-negatives" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no DICOM here")
    rc = main(["train", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c"), "--real-negatives", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and "no axial CT images" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()  # checked before any data was generated
    assert main(["train", "--out", str(tmp_path / "o"), "--real-fraction", "0.7"]) == 2


def _tiny_run(tmp_path, out, epochs: int, *extra: str) -> list[str]:
    """``medqc train`` argv for a seconds-long run of the small network on 16 synthetic slices."""
    return ["train", "--model", "qcnet-small", "--out", str(out), "--cache", str(tmp_path / "cache"),
            "--n-train", "16", "--n-val", "8", "--epochs", str(epochs), "--batch-size", "8", "--workers", "1", "--seed", "5",
            "--no-progress", "--holdout", "no_such_parameter>0", *extra]


def _real_slice(folder):
    """``folder`` holding one real CT slice (pydicom's GE ``CT_small.dcm``), for runs that train on real CT."""
    need_module("medqc.synth.training", "the synthetic generator is part of this repository")
    data = need_module("pydicom.data")
    import shutil

    folder.mkdir()
    shutil.copy(data.get_testdata_file("CT_small.dcm"), folder / "ct1.dcm")
    return folder


def test_training_with_real_negatives_and_epoch_checkpoints(tmp_path, capsys):
    """Real CT (pydicom-data's GE slice) is mixed into the batches; every epoch's checkpoint is kept."""
    real = _real_slice(tmp_path / "real")
    out = tmp_path / "run"
    assert main(_tiny_run(tmp_path, out, 2, "--real-negatives", str(real), "--real-fraction", "0.25", "--keep-epochs")) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["real_negatives"]["slices"] == 1 and metrics["real_negatives"]["batch_fraction"] == 0.25
    assert metrics["augment"]["texture"]["labels_not_trained_when_applied"] == ["noise", "ring"]
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-01.pt", "epoch-02.pt"]
    assert "Real clean CT mixed into training" in (out / "card.md").read_text()


def test_training_with_real_injected_slices(tmp_path, capsys):
    """A real slice with an artifact injected by ``medqc synth --inject`` trains with the injector's labels:
    read back with its truth.json severities, counted in the metrics; a folder without injected CT is a usage
    error before any data is generated."""
    from medqc.analysis.preprocess import PreprocessParams
    from medqc.models.data import real_injected

    src = _real_slice(tmp_path / "src")
    inj = tmp_path / "inj"
    assert main(["synth", "--inject", "ring:0.8", "--from", str(src), "--workers", "1", "--no-progress",
                 str(inj / "ring")]) == 0
    truth = json.loads((inj / "ring" / "truth.json").read_text())
    x, sev, names = real_injected([inj], PreprocessParams())
    assert x.shape[0] == 1 and len(names) == 1
    assert sev[0].tolist() == pytest.approx([truth["slices"][0]["artifacts"][a] for a in ARTIFACTS])
    assert sev[0][ARTIFACTS.index("ring")] > 0
    capsys.readouterr()
    rc = main(["train", "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c0"), "--real-injected", str(src)])
    assert rc == 2 and "no injected real CT" in capsys.readouterr().err and not (tmp_path / "c0").exists()
    out = tmp_path / "run"
    assert main(_tiny_run(tmp_path, out, 1, "--real-injected", str(inj), "--real-fraction", "0.4")) == 0
    capsys.readouterr()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["real_injected"]["slices"] == 1 and metrics["real_negatives"]["slices"] == 0
    assert metrics["real_negatives"]["batch_fraction"] == 0.4
    assert "Real CT with artifacts injected" in (out / "card.md").read_text()
