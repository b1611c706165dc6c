"""``medqc synth OUT_DIR``: write a synthetic CT series + truth.json, or inject artifacts into a real one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medqc import ARTIFACTS
from medqc.errors import UsageError

REGION_NAMES = ("head", "neck", "chest", "abdomen", "pelvis", "abdomen-pelvis", "chest-abdomen-pelvis")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected slice numbers separated by commas, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="new folder for the series (IM0001.dcm … and truth.json)")
    p.add_argument("--region", default="chest", metavar="R",
                   help=f"body region / protocol: {', '.join(REGION_NAMES)} (default chest)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes byte-identical files")
    p.add_argument("--slices", type=int, help="number of slices (spacing follows from the scan range)")
    p.add_argument("--thickness", type=float, metavar="MM", help="slice thickness (default = spacing)")
    p.add_argument("--spacing", type=float, metavar="MM", help="slice spacing (default 5 mm)")
    p.add_argument("--matrix", type=int, default=512, help="image matrix (default 512)")
    p.add_argument("--fov", type=float, metavar="MM", help="display field of view (default: by region and patient size)")
    p.add_argument("--artifact", action="append", default=[], metavar="KIND[:SEV][@FIRST-LAST]",
                   help=f"inject an artifact ({', '.join(ARTIFACTS)}), severity 0..1 (default 0.6), on 1-based slices")
    p.add_argument("--short-top", type=float, default=0.0, metavar="MM", help="start the scan MM inside the required range")
    p.add_argument("--short-bottom", type=float, default=0.0, metavar="MM", help="stop the scan MM short of the required end")
    p.add_argument("--overscan", type=float, default=0.0, metavar="MM", help="scan MM beyond the required range at both ends")
    p.add_argument("--missing", type=_int_list, default=[], metavar="N,N", help="drop these planned slices (a gap)")
    p.add_argument("--duplicate", type=int, metavar="N", help="write planned slice N twice (new SOP instance, same position)")
    p.add_argument("--tilt", type=float, default=0.0, metavar="DEG", help="gantry tilt in degrees")
    p.add_argument("--variable-spacing", action="store_true", help="uneven table increments between slices")
    p.add_argument("--patient-name", metavar="TEXT", help="PatientName to write (default: a synthetic name)")
    p.add_argument("--series", type=int, default=1, metavar="N", help="SeriesNumber (default 1)")
    p.add_argument("--workers", type=int, metavar="N", help="simulation processes (default: CPUs, at most 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--inject", metavar="KIND[:SEV]", help="inject this artifact into the series in --from instead")
    p.add_argument("--from", dest="from_dir", type=Path, metavar="DICOM_DIR", help="existing CT series for --inject")
    p.add_argument("--round-trip", action="store_true",
                   help="with --from: reconstruct every slice in full from its projections (the simulated scanner's "
                        "texture in every variant) instead of adding the artifact's difference to the original; "
                        "without --inject, the clean control (nothing added)")


def run(args: argparse.Namespace) -> int:
    from medqc.synth.study import StudyOptions, parse_artifact, validate, write_study

    if args.inject or args.from_dir or args.round_trip:
        if not args.from_dir or not (args.inject or args.round_trip):
            raise UsageError("--inject KIND[:SEVERITY] (or --round-trip) and --from DICOM_DIR go together")
        from medqc.synth.inject import CLEAN, inject_series

        if args.inject:
            spec = parse_artifact(args.inject)
            if spec.first is not None:
                raise UsageError("--inject takes KIND[:SEVERITY]; it affects every slice of the series")
            kind, severity = spec.kind, spec.severity
        else:
            kind, severity = CLEAN, 0.0
        truth = inject_series(args.from_dir, args.out_dir, kind, severity, seed=args.seed,
                              progress=not args.no_progress, full=args.round_trip)
        print(json.dumps({"out_dir": str(args.out_dir), "slices": len(truth["slices"]),
                          "expected_findings": truth["expected_findings"]}))
        return 0
    if args.region not in REGION_NAMES:
        raise UsageError(f"unknown region {args.region!r}; allowed: {', '.join(REGION_NAMES)}")
    opts = StudyOptions(
        region=args.region, seed=args.seed, slices=args.slices, thickness=args.thickness, spacing=args.spacing,
        matrix=args.matrix, fov=args.fov, artifacts=[parse_artifact(a) for a in args.artifact],
        short_top=args.short_top, short_bottom=args.short_bottom, overscan=args.overscan, missing=args.missing,
        duplicate=args.duplicate, tilt=args.tilt, variable_spacing=args.variable_spacing,
        patient_name=args.patient_name, series=args.series, progress=not args.no_progress, workers=args.workers,
    )
    validate(opts)
    truth = write_study(args.out_dir, opts)
    print(json.dumps({"out_dir": str(args.out_dir), "slices": len(truth["slices"]), "region": truth["region"],
                      "expected_findings": truth["expected_findings"]}), file=sys.stdout)
    return 0
