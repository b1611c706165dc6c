"""``medqc export``: ``onnx`` (PyTorch → ONNX bundle with parity gates) and ``engine`` (TensorRT engine
built on the target box, gated against FP32 on its GPU).

    medqc export onnx --model qcnet --checkpoint runs/qcnet.pt --out bundles/qcnet [--fp16] [--int8]
    medqc export engine --bundle bundles/qcnet --fp16 --batch 1:8:32
    medqc export check --bundle bundles/qcnet          # runners available here, and their parity
"""

from __future__ import annotations

import argparse
import json
import sys

from medqc.errors import UsageError


def _batch_range(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.split(":"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
        raise argparse.ArgumentTypeError(f"--batch wants MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, e.g. 1:8:32 (got {text!r})")
    return parts  # type: ignore[return-value]


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_command", metavar="{onnx,engine,check}")
    cls = type(parser)

    p = sub.add_parser("onnx", help="export a PyTorch model to an ONNX bundle (parity-gated)")
    p.add_argument("--model", help="model name (see 'medqc export onnx --list'); taken from the checkpoint when omitted")
    p.add_argument("--checkpoint", help="trained checkpoint (medqc.checkpoint/1); required unless --allow-untrained")
    p.add_argument("--out", help="bundle folder to write (written whole, then renamed into place)")
    p.add_argument("--opset", type=_positive, default=None, help="ONNX opset (default: the model's export spec, 17)")
    p.add_argument("--fp16", action="store_true", help="also write an FP16 ONNX variant for GPU runtimes (gated against FP32)")
    p.add_argument("--int8", action="store_true", help="also write an INT8 (static, calibrated on synthetic CT) variant for CPUs")
    p.add_argument("--simplify", action="store_true", help="simplify the graph (onnx-simplifier if installed, else ONNX Runtime's basic optimiser)")
    p.add_argument("--allow-untrained", action="store_true", help="export random initial weights (tests only; recorded in the manifest)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument("--validation-slices", type=_positive, default=48, help="synthetic CT slices in the parity batch (default 48)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the parity batch")
    p.add_argument("--list", action="store_true", help="list the model names and exit")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(_export=_run_onnx)

    e = sub.add_parser("engine", help="build a TensorRT engine for this GPU into a bundle (parity-gated on the GPU)")
    e.add_argument("--bundle", required=True, help="bundle folder written by 'medqc export onnx'")
    e.add_argument("--fp16", action="store_true", help="allow FP16 kernels (gated against FP32 with FP16 tolerances)")
    e.add_argument("--batch", type=_batch_range, default=(1, 8, 32), metavar="MIN:OPT:MAX", help="optimisation profile (default 1:8:32)")
    e.add_argument("--workspace", type=_positive, default=1024, metavar="MB", help="builder workspace limit in MiB (default 1024)")
    e.add_argument("--timing-cache", metavar="PATH", help="timing cache file: read when present, written after the build")
    e.add_argument("--validation-slices", type=_positive, default=48, help="synthetic CT slices in the GPU parity batch (default 48)")
    e.add_argument("--seed", type=int, default=1234, help="seed of the parity batch")
    e.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    e.set_defaults(_export=_run_engine)

    c = sub.add_parser("check", help="list the runners available for a bundle here and gate each against FP32 ONNX Runtime")
    c.add_argument("--bundle", help="bundle folder (default: the embedded default bundle)")
    c.add_argument("--validation-slices", type=_positive, default=32, help="synthetic CT slices in the parity batch (default 32)")
    c.add_argument("--seed", type=int, default=1234, help="seed of the parity batch")
    c.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    c.set_defaults(_export=_run_check)


def run(args) -> int:
    fn = getattr(args, "_export", None)
    if fn is None:
        raise UsageError("choose a subcommand: onnx, engine or check (see 'medqc export --help')")
    return fn(args)


def _emit(args, summary: dict, text: str) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(text)


def _run_onnx(args) -> int:
    from medqc.export.compare import ParityError
    from medqc.export.onnx_export import export_bundle, model_source
    from medqc.export.specs import get_spec

    if args.list:
        import medqc.models as models

        print("\n".join(models.model_names()))
        return 0
    if not args.out:
        raise UsageError("--out BUNDLE_DIR is required")
    if args.model is None and args.checkpoint is None:
        import medqc.models as models

        raise UsageError(f"pass --checkpoint (and/or --model); valid model names: {', '.join(models.model_names())}")
    name, model, meta, ck = model_source(args.model, args.checkpoint, args.allow_untrained)
    spec = get_spec(name)
    try:
        summary = export_bundle(
            model, name=name, meta=meta, out_dir=args.out, spec=spec, checkpoint=ck, opset=args.opset, fp16=args.fp16,
            int8=args.int8, simplify=args.simplify, force=args.force, validation_n=args.validation_slices, seed=args.seed,
            progress=sys.stderr.isatty() or not args.json,
        )
    except ParityError as e:
        if args.json:
            print(json.dumps({"ok": False, "error": "parity", "report": e.report.to_dict()}, indent=2))
        print(f"medqc export onnx: {e.report.text()}\nno bundle written.", file=sys.stderr)
        return 1
    summary["ok"] = True
    lines = [f"wrote bundle {summary['bundle']} ({name} {summary['version']}{'' if ck else ', UNTRAINED'})"]
    for k, g in summary["parity"].items():
        note = f" ({g['borderline']} of {g['decisions']} at the threshold, not counted)" if g["borderline"] else ""
        lines.append(f"  parity {k:10s} PASS decisions {100 * g['decision_agreement']:.2f}%{note}  position Δ {g['position_max_delta_mm']:.3f} mm")
    lines.append(f"  time {sum(summary['timings_s'].values()):.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in summary['timings_s'].items())})")
    _emit(args, summary, "\n".join(lines))
    return 0


def _run_engine(args) -> int:
    from medqc.bundle import BundleError, load_bundle
    from medqc.export.compare import ParityError
    from medqc.export.engine import build_engine_into_bundle, require_tensorrt
    from medqc.errors import MedqcError

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        raise UsageError(str(e)) from e
    require_tensorrt()  # a clear "pip install tensorrt" / "no CUDA GPU" error, before any work
    try:
        summary = build_engine_into_bundle(
            bundle, fp16=args.fp16, batch=args.batch, workspace_mb=args.workspace, timing_cache=args.timing_cache,
            validation_n=args.validation_slices, seed=args.seed, progress=True,
        )
    except ParityError as e:
        if args.json:
            print(json.dumps({"ok": False, "error": "parity", "report": e.report.to_dict()}, indent=2))
        print(f"medqc export engine: {e.report.text()}\nengine not added to the bundle.", file=sys.stderr)
        return 1
    except MedqcError:
        raise
    summary["ok"] = True
    g = summary["parity"]
    text = (
        f"engine {summary['engine']['path']} for {summary['engine']['gpu']} (sm {summary['engine']['compute_capability']}, "
        f"TensorRT {summary['engine']['tensorrt']}) built in {summary['build_s']:.1f} s; parity PASS "
        f"(decisions {100 * g['decision_agreement']:.2f}%, position Δ {g['position_max_delta_mm']:.3f} mm)"
    )
    _emit(args, summary, text)
    return 0


def _run_check(args) -> int:
    from medqc.bundle import BundleError, load_bundle
    from medqc.export.parity import check_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        raise UsageError(str(e)) from e
    summary = check_bundle(bundle, n=args.validation_slices, seed=args.seed)
    lines = [f"bundle {bundle.root} ({bundle.name} {bundle.version})"]
    for name, r in summary["runners"].items():
        if r["status"] == "ran":
            lines.append(f"  {name:18s} {'PASS' if r['passed'] else 'FAIL'}  decisions {100 * r['decision_agreement']:.2f}%  "
                         f"position Δ {r['position_max_delta_mm']:.3f} mm  {r['ms_per_slice']:.2f} ms/slice")
        else:
            lines.append(f"  {name:18s} {r['status']}: {r['reason']}")
    _emit(args, summary, "\n".join(lines))
    return 0 if summary["ok"] else 1
