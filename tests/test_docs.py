"""What a new user copies from the README and docs: one apt line (the same packages .ci/run installs), how
to reach ``medqc``, and DCMTK's tools called by path (the venv's pynetdicom installs scripts of the same
names that shadow them)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DCMTK_NET_TOOLS = ("storescu", "storescp", "echoscu", "findscu", "movescu", "getscu")


def _apt_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if re.search(r"\bapt-get install\b", ln)]


def test_readme_has_one_apt_line_with_what_ci_installs():
    readme = (ROOT / "README.md").read_text()
    (line,) = _apt_lines(readme)
    assert "--no-install-recommends" in line, line
    pkgs = {w for w in line.split("install", 1)[1].split() if not w.startswith("-")}
    ci = (ROOT / ".ci" / "run").read_text()
    ci_pkgs = set(re.search(r"for pkg in ([^;]+);", ci).group(1).split())
    assert pkgs == ci_pkgs | {"python3-venv"}, (pkgs, ci_pkgs)
    assert "--no-install-recommends" in _apt_lines(ci)[0]


def test_every_apt_line_for_medqc_skips_recommends():
    """The lines that install medqc's own prerequisites (the NVIDIA packages follow NVIDIA's guides)."""
    for doc in DOCS:
        for line in _apt_lines(doc.read_text()):
            if re.search(r"\b(python3-venv|dcmtk|make)\b", line):
                assert "--no-install-recommends" in line, f"{doc.name}: {line}"


def test_readme_says_how_to_reach_medqc():
    readme = (ROOT / "README.md").read_text()
    assert ". .venv/bin/activate" in readme and ".venv/bin/medqc" in readme


def test_dcmtk_tools_are_called_by_path():
    """A command line in the docs never starts with a bare storescu / echoscu / ...: in an activated venv
    that runs pynetdicom's script of that name, which takes other options."""
    bare = re.compile(r"(?:^|`|\$ |&& |; )\s*(?:[A-Z_]+=\S+ )*(" + "|".join(DCMTK_NET_TOOLS) + r") [-+<\w]")
    for doc in DOCS:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            m = bare.search(line)
            assert m is None, f"{doc.name}:{n}: call DCMTK's {m.group(1)} by path (/usr/bin/{m.group(1)}): {line}"


def _documented(name: str, doc: str) -> bool:
    family, _, leaf = name.partition(".")
    # literally, or in a family list such as `geometry.gap|duplicate|spacing` or `artifact.metal`, `.motion`
    return name in doc or re.search(rf"{family}\.[a-z|]*\b{leaf}\b", doc) is not None


def test_every_registered_check_is_documented():
    """Every check name the registry declares is in docs/checks.md and in the README's findings table; every
    key a check adds to [checks] is in examples/medqc.toml."""
    from medqc.agent.checks.registry import checks, names

    assert len(names()) >= 18  # the registry loaded every check module
    checks_md = (ROOT / "docs" / "checks.md").read_text()
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Findings"):readme.index("**Per-scanner baselines**")]
    for name in names():
        assert _documented(name, checks_md), f"docs/checks.md does not describe {name}"
        assert f"`{name}`" in table or _documented(name, table), f"README's findings table lacks {name}"
    example = (ROOT / "examples" / "medqc.toml").read_text()
    section = example[example.index("[checks"):]
    for c in checks():
        for key, _typ, _field in c.config:
            assert re.search(rf"^#?\s*\[checks\.{key}\]|^#?\s*{key}\s*=", section, re.M), f"examples/medqc.toml lacks checks.{key}"
