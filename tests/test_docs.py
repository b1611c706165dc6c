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


# a path named in the docs: a token that starts with one of the repository's own top-level entries (so
# commands' arguments such as /etc/medqc or ../shared/real-ct, and generated folders, are not read as files)
TOP = sorted({p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci"} - {".venv", ".git"})
PATH_DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
_TOKEN = re.compile(r"`([^`\s]+)`|\]\(([^)\s]+)\)|(?<![\w./-])((?:" + "|".join(map(re.escape, TOP)) + r")/[\w./*{},<>\[\]|…-]*\w)")


def _as_glob(token: str) -> list[str]:
    """Patterns for a named path: placeholders (<machine>, …), wildcards and alternations become globs;
    ``a.{md,json}`` and ``a.md|json`` name each file."""
    token = token.split("#", 1)[0].rstrip(".,;:)")
    token = re.sub(r"(\.\w+):[^/]*$", r"\1", token)  # file.py:123, file.py:compose(cfg)
    m = re.match(r"^(.*)\{([^}]*)\}(.*)$", token)
    if m:
        return [p for alt in m.group(2).split(",") for p in _as_glob(m.group(1) + alt + m.group(3))]
    m = re.match(r"^(.*\.)(\w+(?:\|\w+)+)$", token)
    if m:
        return [p for alt in m.group(2).split("|") for p in _as_glob(m.group(1) + alt)]
    token = re.sub(r"\[[^\]]*\]", "*", token)
    token = re.sub(r"<[^>]*>|…", "*", token)
    return [re.sub(r"\*+", "*", token)]


def named_paths(doc: Path) -> list[tuple[int, str]]:
    out = []
    for n, line in enumerate(doc.read_text().splitlines(), 1):
        for m in _TOKEN.finditer(line):
            tok = next(g for g in m.groups() if g)
            if "://" in tok or tok.startswith(("#", "mailto:")):
                continue
            link = m.group(2) is not None
            first = tok.split("/", 1)[0]
            if link or (first in TOP and "/" in tok) or tok in TOP:
                out.append((n, tok))
    return out


def missing_paths(doc: Path) -> list[str]:
    bad = []
    for n, tok in named_paths(doc):
        for pattern in _as_glob(tok):
            if not pattern:
                continue
            bases = [doc.parent, ROOT]  # a link is relative to its document; a path in backticks to the repository
            if "." not in pattern.rsplit("/", 1)[-1]:  # an output prefix (--out bench/results/slice-eval): its files
                pattern = pattern + "*"
            if not any(list(b.glob(pattern)) if "*" in pattern else (b / pattern).exists() for b in bases):
                bad.append(f"{doc.name}:{n}: {tok}")
                break
    return bad


def test_paths_named_in_docs_exist():
    bad = [b for doc in PATH_DOCS for b in missing_paths(doc)]
    assert not bad, "paths named in the docs that do not exist:\n" + "\n".join(bad)


def test_path_check_sees_a_missing_file(tmp_path):
    """The check above can fail: a document naming a file that is not there is reported, one naming files
    that are (a link beside it, a pattern, a placeholder) is not."""
    (tmp_path / "real.md").write_text("x")
    doc = tmp_path / "doc.md"
    doc.write_text("See `bench/no_such_script.py` and [the checks](real.md#motion), `docs/*.md`,\n"
                   "`bench/results/slice-eval.{md,json}`, `bench/results/<machine>.json`, `medqc/cli.py:main(argv)` and\n"
                   "medqc/nothing_here.py.\n")
    bad = missing_paths(doc)
    assert [b.split(": ", 1)[1] for b in bad] == ["bench/no_such_script.py", "medqc/nothing_here.py"], bad
