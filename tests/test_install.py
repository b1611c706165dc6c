"""``make install`` (what ``make run`` installs) from a copy of the source tree into a new virtual environment:
no setuptools warnings on the way, and the commands that need the ``train`` extra say so instead of
failing with an import error."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", "build", "dist", "*.egg-info", "medqc-state",
                                "runs", "data", ".pytest_cache")


@pytest.mark.slow
def test_runtime_install_is_quiet_and_names_the_extra(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    venv = tmp_path / "venv"
    r = subprocess.run(["make", "install", f"VENV={venv}", f"PY={sys.executable}"], cwd=src, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    noise = [ln for ln in out.splitlines()
             if "setuptools" in ln or "BuildBackendWarning" in ln or "SetuptoolsDeprecationWarning" in ln or "!!" in ln]
    assert noise == [], "\n".join(noise[:40])
    medqc = venv / "bin" / "medqc"
    assert subprocess.run([str(medqc), "--help"], capture_output=True, timeout=60).returncode == 0
    # SciPy, numba and PyTorch come with the 'train' extra only: the commands that need them say which extra
    for cmd in (["synth", str(tmp_path / "syn"), "--slices", "4"], ["train", "--out", str(tmp_path / "run")],
                ["export", "onnx", "--checkpoint", str(ROOT / "models" / "default" / "checkpoint.pt"), "--out", str(tmp_path / "b")]):
        r = subprocess.run([str(medqc), *cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (cmd, r.stderr)
        assert "'train' extra" in r.stderr and "pip install 'medqc[train]'" in r.stderr and "make install-dev" in r.stderr, r.stderr
        assert "internal error" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "syn").exists() and not (tmp_path / "b").exists()
