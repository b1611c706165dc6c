"""Find DCMTK's command-line tools (storescu, storescp, echoscu, ...).

pynetdicom installs console scripts with the same names (``storescu``, ``echoscu``, ...) into the
environment's ``bin`` folder, which comes first on PATH in an activated virtual environment; their options
differ from DCMTK's. :func:`dcmtk` skips such Python scripts and returns the first real program.
"""

from __future__ import annotations

import os
import shutil


def _is_python_script(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    return head.startswith(b"#!") and b"python" in head.split(b"\n", 1)[0]


def dcmtk(name: str) -> str | None:
    """Full path of DCMTK's ``name`` on PATH, or None (a pynetdicom console script of that name is skipped)."""
    seen = set()
    for d in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = shutil.which(name, path=d or ".")
        if not path or path in seen:
            continue
        seen.add(path)
        if not _is_python_script(path):
            return path
    return None
