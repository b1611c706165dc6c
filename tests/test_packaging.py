"""Packaging: the three user folders import as medqc.* and every package is listed in pyproject."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    dirs = cfg["package-dir"]
    found = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            name = ".".join([pkg, *rel.parts]) if rel.parts else pkg
            if name.split(".")[1:2] and name.split(".")[1] in ("agent", "export", "models") and pkg == "medqc":
                continue  # medqc/agent etc. do not exist; the mapping covers them
            found.add(name)
    assert found - listed == set(), f"add these packages to pyproject.toml: {sorted(found - listed)}"


def test_bare_models_import_fails_and_namespace_works():
    code = "import importlib.util as u; import medqc.agent, medqc.export, medqc.models; print(u.find_spec('models') is None)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_agent_import_does_not_pull_torch():
    code = "import sys, medqc.agent, medqc.runners, medqc.analysis.preprocess; print('torch' in sys.modules, 'tensorrt' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_cli_help_is_light():
    code = "import sys; from medqc.cli import build_parser; build_parser(); print(sorted(m for m in ('torch','onnxruntime','tensorrt') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
