"""Turn a training run into the embedded default bundle and its model card.

``python -m medqc.models.ship --run runs/train [--bundle models/default] [--card models/cards/qcnet.md]``

1. ``medqc export onnx --checkpoint RUN/qcnet.pt --out BUNDLE`` (parity-gated ONNX, INT8 only when its
   gate passes);
2. scores the bundle on the real CT we can label (``medqc.models.realct``) and on the run's synthetic
   validation cache through ONNX Runtime, i.e. the shipped file rather than the torch model;
3. writes the model card with those figures next to the training metrics.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medqc.models import DEFAULT_BUNDLE


def export(checkpoint: Path, bundle: Path, int8: bool, fp16: bool = True) -> dict:
    from medqc.cli import main

    argv = ["export", "onnx", "--checkpoint", str(checkpoint), "--out", str(bundle), "--force", "--json"]
    if int8:
        argv.append("--int8")
    if fp16:  # the FP16 graph for GPU runtimes (ONNX Runtime CUDA, TensorRT builds from the FP32 file)
        argv.append("--fp16")
    rc = main(argv)
    return {"rc": rc}


def bench_file(path: Path, params=None, batch: int = 16, threads: int = 2, reps: int = 20) -> dict:
    """ONNX Runtime CPU timing of a bundle graph (preprocessing + network) on 512² slices at 0.7 mm
    (``threads`` threads, batch ``batch``)."""
    import time

    import numpy as np
    import onnxruntime as ort

    from medqc.analysis.preprocess import PreprocessParams, geometry

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the agent's runner
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    hu = np.random.default_rng(0).uniform(-1000, 1000, (batch, 512, 512)).astype(np.float32)
    feeds = geometry(512, 512, (0.7, 0.7), params or PreprocessParams()).feeds(hu)
    for _ in range(3):
        s.run(None, feeds)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    ms = float(np.median(times)) / batch * 1e3
    return {"ms_per_slice": round(ms, 3), "slices_per_s": round(1000 / ms, 1), "batch": batch, "threads": threads,
            "input": "512x512 HU at 0.7 mm, preprocessing in the graph"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medqc.models.ship")
    ap.add_argument("--run", required=True, help="training output folder (qcnet.pt, metrics.json)")
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    ap.add_argument("--card", default=str(Path(__file__).resolve().parent / "cards" / "qcnet.md"))
    ap.add_argument("--no-int8", action="store_true")
    ap.add_argument("--no-fp16", action="store_true", help="do not ship the FP16 ONNX graph for GPU runtimes")
    ap.add_argument("--min-auroc", type=float, default=0.8, help="classes below this validation AUROC ship switched off")
    ap.add_argument("--note", default="", help="a note on the training data for the card")
    args = ap.parse_args(argv)
    run = Path(args.run)
    ckpt = run / "qcnet.pt"
    metrics = json.loads((run / "metrics.json").read_text())
    bundle = Path(args.bundle)
    # a class whose validation AUROC is below --min-auroc would only add false alarms: it ships switched
    # off (threshold 0.9999) and the card says so
    val = metrics.get("validation", {}).get("all", {}).get("artifacts", {})
    weak = {k: v.get("auroc") for k, v in val.items() if v.get("auroc") is not None and v["auroc"] < args.min_auroc}
    if weak:
        import torch

        ck = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        ck["thresholds"] = {k: (0.9999 if k in weak else v) for k, v in ck["thresholds"].items()}
        ck["disabled_labels"] = weak
        ckpt = run / "qcnet.ship.pt"
        torch.save(ck, ckpt)
        metrics["disabled_labels"] = weak
        metrics["thresholds"] = ck["thresholds"]
    res = export(ckpt, bundle, int8=not args.no_int8, fp16=not args.no_fp16)
    if res["rc"] != 0 and not args.no_int8:
        print("INT8 export did not pass its gate; exporting FP32 only", file=sys.stderr)
        res = export(ckpt, bundle, int8=False, fp16=not args.no_fp16)
    if res["rc"] != 0:
        return res["rc"]
    from medqc.bundle import load_bundle
    from medqc.models import realct
    from medqc.models.card import write_card

    b = load_bundle(bundle)
    metrics["version"] = b.version
    if args.note:
        metrics["data_note"] = args.note
    if not metrics.get("generator_doc"):
        from medqc.models.train import _generator_doc

        metrics["generator_doc"] = _generator_doc()
    metrics["ort_cpu_shipped"] = {k: bench_file(bundle / v["path"], b.preprocess, batch=1) for k, v in b.manifest["files"].items() if k in ("onnx", "onnx_int8")}
    metrics["real_ct"] = realct.evaluate(bundle)
    metrics["bundle_files"] = {k: {kk: vv for kk, vv in v.items() if kk in ("path", "sha256", "precision")} for k, v in b.manifest["files"].items()}
    sizes = {k: (bundle / v["path"]).stat().st_size for k, v in b.manifest["files"].items()}
    metrics["bundle_bytes"] = sizes
    (run / "metrics.shipped.json").write_text(json.dumps(metrics, indent=2) + "\n")
    Path(args.card).parent.mkdir(parents=True, exist_ok=True)
    write_card(Path(args.card), metrics)
    print(json.dumps({"bundle": str(bundle), "card": args.card, "real_ct": [r["summary"] for r in metrics["real_ct"]], "bytes": sizes}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
