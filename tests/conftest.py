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


def build_tiny_onnx(path: Path, params, labels: int = 5) -> None:
    """A tiny but real bundle model with the bundle's interface: the preprocessing graph every bundle
    carries (``medqc.models.slice_input``), then conv → ReLU → global pool → two linear heads, exported by
    ``medqc export``'s own ``export_onnx``.

    Its artifact logits respond to image content (mean of the first channel), so tests can tell that
    pixels really flowed through it."""
    torch = need_module("torch", "the tiny test bundle is exported from torch (the train extra)")
    from torch import nn

    from medqc.export.onnx_export import export_onnx, slice_model
    from medqc.export.specs import ExportSpec

    channels = params.channels
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.2, (4, channels, 3, 3)).astype(np.float32)
    w[0] = 0
    w[0, 0, 1, 1] = 1.0  # channel 0 of the features = first input channel, unchanged
    wa = rng.normal(0, 0.5, (4, labels)).astype(np.float32)
    wa[0, :] = 4.0
    wp = np.array([[500.0], [0], [0], [0]], np.float32)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(channels, 4, 3, stride=4, padding=1)
            self.artifact = nn.Linear(4, labels)
            self.position = nn.Linear(4, 1)

        def forward(self, x):
            f = torch.relu(self.conv(x)).mean((2, 3))
            return self.artifact(f), self.position(f)

    net = Tiny()
    with torch.no_grad():
        net.conv.weight.copy_(torch.from_numpy(w))
        net.conv.bias.zero_()
        net.artifact.weight.copy_(torch.from_numpy(wa.T.copy()))
        net.artifact.bias.zero_()
        net.position.weight.copy_(torch.from_numpy(wp.T.copy()))
        net.position.bias.fill_(500.0)
    export_onnx(slice_model(net, params), ExportSpec(model="tiny-test"), params, path)


@pytest.fixture(scope="session")
def cranium():
    """The real head CT that Debian's invesalius-examples installs (a peer: .ci/run installs it), as a volume."""
    from medqc.synth import realcases

    if not realcases.CRANIUM.is_file():
        missing_peer(f"{realcases.CRANIUM} missing: apt-get install invesalius-examples (.ci/run does)")
    return realcases.load_cranium()


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real model bundle (manifest + tiny ONNX) with the default preprocessing at 128² for speed."""
    from medqc import ARTIFACTS
    from medqc.bundle import sha256_file, write_manifest
    from medqc.analysis.preprocess import PreprocessParams
    from medqc.export.onnx_export import graph_inputs

    root = tmp_path_factory.mktemp("tiny-bundle")
    pp = PreprocessParams(size=128, pixel_mm=4.0)
    build_tiny_onnx(root / "model.onnx", pp, len(ARTIFACTS))
    write_manifest(
        root,
        {
            "name": "tiny-test",
            "version": "0.0.1",
            "labels": list(ARTIFACTS),
            "preprocess": pp.to_dict(),
            "thresholds": {a: 0.5 for a in ARTIFACTS},
            "inputs": graph_inputs(pp),
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
