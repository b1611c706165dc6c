"""Shared fixtures. Add fixtures here additively (append; do not rewrite others')."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from medqc.dcmtk import dcmtk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# the real-CT collection: $MEDQC_REAL_CT, else ../shared/real-ct beside the checkout
REAL_CT = Path(os.environ.get("MEDQC_REAL_CT") or ROOT.parent / "shared" / "real-ct") / "philips-ingenuity-head-phantom"


def missing_peer(what: str) -> None:
    """A real peer or data set a test needs is not here: skip, or fail where MEDQC_REQUIRE_PEERS=1 (CI)."""
    if os.environ.get("MEDQC_REQUIRE_PEERS") == "1":
        pytest.fail(f"{what} (MEDQC_REQUIRE_PEERS=1)")
    pytest.skip(what)


def missing_real_ct(what: str) -> None:
    """The real-CT collection (data shared beside the checkout, not a package any registry carries) is not
    here: skip, or fail where MEDQC_REQUIRE_REAL_CT=1 or MEDQC_REAL_CT names the folder (a machine that has it
    and must test on it). CI (.ci/run) runs on a clean clone without the collection, so MEDQC_REQUIRE_PEERS=1
    alone does not require it."""
    if os.environ.get("MEDQC_REQUIRE_REAL_CT") == "1":
        pytest.fail(f"{what} (MEDQC_REQUIRE_REAL_CT=1)")
    if os.environ.get("MEDQC_REAL_CT"):
        pytest.fail(f"{what} (MEDQC_REAL_CT={os.environ['MEDQC_REAL_CT']} is set, so the collection is expected there)")
    pytest.skip(what)


# test modules import shared helpers from here (``from conftest import free_port``): the tests folder must be
# importable under --import-mode=importlib
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    os.environ.setdefault("TCP_NODELAY", "1")  # DCMTK crawls on loopback without it


def run_ok(cmd, **kw):
    """Run ``cmd``; its exit status must be 0 (the end of its output is in the assertion)."""
    import subprocess

    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    return r


def analyze_json(*paths) -> dict:
    """``medqc analyze PATH... --json`` in a subprocess → the report (whatever the exit status: it follows the
    verdicts)."""
    import json
    import subprocess

    r = subprocess.run([sys.executable, "-m", "medqc", "analyze", *map(str, paths), "--json", "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.stdout, r.stderr[-2000:]
    return json.loads(r.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def real_ct() -> Path:
    if not REAL_CT.is_dir():
        missing_real_ct(f"real vendor study not present at {REAL_CT} (set MEDQC_REAL_CT)")
    return REAL_CT


def need_tool(name: str) -> str:
    path = dcmtk(name)
    if not path:
        missing_peer(f"{name} is not installed (.ci/run installs it)")
    return path


def build_tiny_onnx(path: Path, channels: int, size: int, labels: int = 5) -> None:
    """A tiny but real ONNX model with the bundle's interface: conv → ReLU → global pool → two Gemm heads.

    Its artifact logits respond to image content (mean of the first channel), so tests can tell that
    pixels really flowed through it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (4, channels, 3, 3)).astype(np.float32)
    w[0] = 0
    w[0, 0, 1, 1] = 1.0  # channel 0 of the features = first input channel, unchanged
    b = np.zeros(4, np.float32)
    wa = rng.normal(0, 0.5, (4, labels)).astype(np.float32)
    wa[0, :] = 4.0
    ba = np.zeros(labels, np.float32)
    wp = np.array([[500.0], [0], [0], [0]], np.float32)
    bp = np.array([500.0], np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[4, 4]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wa", "ba"], ["artifact_logits"]),
        helper.make_node("Gemm", ["f", "wp", "bp"], ["position"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in [(w, "w"), (b, "b"), (wa, "wa"), (ba, "ba"), (wp, "wp"), (bp, "bp")]]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", channels, size, size])],
        [
            helper.make_tensor_value_info("artifact_logits", TensorProto.FLOAT, ["batch", labels]),
            helper.make_tensor_value_info("position", TensorProto.FLOAT, ["batch", 1]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real model bundle (manifest + tiny ONNX) with the default preprocessing at 128² for speed."""
    from medqc import ARTIFACTS
    from medqc.bundle import sha256_file, write_manifest
    from medqc.analysis.preprocess import PreprocessParams

    root = tmp_path_factory.mktemp("tiny-bundle")
    pp = PreprocessParams(size=128, pixel_mm=4.0)
    build_tiny_onnx(root / "model.onnx", pp.channels, pp.size, len(ARTIFACTS))
    write_manifest(
        root,
        {
            "name": "tiny-test",
            "version": "0.0.1",
            "labels": list(ARTIFACTS),
            "preprocess": pp.to_dict(),
            "thresholds": {a: 0.5 for a in ARTIFACTS},
            "inputs": {"image": [-1, pp.channels, pp.size, pp.size]},
            "outputs": {"artifact_logits": [-1, len(ARTIFACTS)], "position": [-1, 1]},
            "files": {"onnx": {"path": "model.onnx", "sha256": sha256_file(root / "model.onnx")}},
        },
    )
    return root


def need_module(name: str, why: str = ""):
    """Import ``name`` (a dependency of ``make test``'s install: the train and test extras); where it is not
    installed, ``missing_peer`` (skip, or fail under MEDQC_REQUIRE_PEERS=1). Usable at module level."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("MEDQC_REQUIRE_PEERS") == "1":
            pytest.fail(f"{name} is not importable ({e}){': ' + why if why else ''} (MEDQC_REQUIRE_PEERS=1)",
                        pytrace=False)
        pytest.skip(f"{name} is not importable ({e}){': ' + why if why else ''}", allow_module_level=True)
