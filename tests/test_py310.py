"""Python 3.10 compatibility (JetPack 6 ships 3.10): vermin checks syntax *and* stdlib use (modules,
members, keyword arguments) of every shipped package against 3.10. A 3.11-only import must sit behind a
``sys.version_info >= (3, 11)`` guard with a fallback (vermin understands those guards; it does not
understand ``try: import tomllib / except ImportError``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_module

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["medqc", "agent", "export", "models", "scripts", "bench"]
VERMIN = [sys.executable, "-c", "import sys; from vermin.main import main; sys.exit(main())", "-t=3.10-", "--no-tips", "--violations", "--eval-annotations", "--no-parse-comments"]


def _vermin(*paths) -> subprocess.CompletedProcess:
    need_module("vermin", "vermin is in the test extra: pip install -e '.[test]'")
    return subprocess.run([*VERMIN, *map(str, paths)], capture_output=True, text=True, timeout=120)


def test_shipped_code_runs_on_python_310():
    paths = [ROOT / p for p in PACKAGES if (ROOT / p).is_dir()]
    r = _vermin(*paths)
    assert r.returncode == 0, "3.11+ only code found (guard it with sys.version_info or use a backport):\n" + r.stdout[-4000:]
    assert "Analyzing" in r.stdout


@pytest.mark.parametrize("code, needle", [
    ("import tomllib\n", "tomllib"),
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", "except*"),
    ("from typing import Self\n", "typing.Self"),
    ("import datetime\nx = datetime.UTC\n", "datetime.UTC"),
    ("import asyncio\nasync def f():\n    async with asyncio.TaskGroup():\n        pass\n", "asyncio.TaskGroup"),
])
def test_the_rule_catches_311_only_code(tmp_path, code, needle):
    f = tmp_path / "m.py"
    f.write_text(code)
    r = _vermin(f)
    assert r.returncode != 0 and needle in r.stdout, r.stdout


def test_the_rule_accepts_a_guarded_fallback(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import sys\nif sys.version_info >= (3, 11):\n    import tomllib\nelse:\n    import tomli as tomllib\n")
    r = _vermin(f)
    assert r.returncode == 0, r.stdout


def test_vermin_is_in_the_test_extra():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(d.startswith("vermin") for d in extra), extra
