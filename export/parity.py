"""``medqc export check``: every runner available for a bundle on this machine, gated against the bundle's
FP32 ONNX model under ONNX Runtime CPU on the same synthetic CT batch (tolerances by precision). Every
runner takes the HU slices and their geometry and preprocesses inside its model."""

from __future__ import annotations

import time


from medqc.export.compare import Comparator, batch_size, infer_batched
from medqc.export.specs import FP16_TOL, FP32_TOL, INT8_TOL, MAX_POSITION_MM, SPECS
from medqc.export.validation import validation_batch


def tolerances_for(backend: str, runner=None) -> tuple[dict, float]:
    """(tolerances, max position delta mm) for a backend's precision."""
    desc = runner.describe() if runner is not None and hasattr(runner, "describe") else {}
    precision = desc.get("precision", "fp32")
    if backend == "onnxruntime-int8" or precision == "int8":
        return INT8_TOL, MAX_POSITION_MM["int8"]
    if precision == "fp16":
        return FP16_TOL, MAX_POSITION_MM["fp16"]
    return FP32_TOL, MAX_POSITION_MM["fp32"]


def check_bundle(bundle, n: int = 32, seed: int = 1234, backends=None) -> dict:
    from medqc.runners import BACKENDS, available_backends, make_runner

    spec = SPECS.get(bundle.name)
    min_agreement = spec.min_agreement if spec else 0.995
    batch, source = validation_batch(bundle.preprocess, n=n, seed=seed)
    with make_runner("onnxruntime", bundle) as ref:
        ref_out = infer_batched(ref, batch, 16)
    avail = available_backends(bundle)
    out = {"bundle": str(bundle.root), "validation": {"source": source, "n": n, "seed": seed}, "runners": {}, "ok": True}
    for name in backends or BACKENDS:
        ok, why = avail[name]
        if not ok:
            out["runners"][name] = {"status": "skipped", "reason": why}
            continue
        try:
            runner = make_runner(name, bundle)
        except Exception as e:  # an engine for another GPU, a broken install: reported, not fatal
            out["runners"][name] = {"status": "skipped", "reason": f"{type(e).__name__}: {e}"}
            continue
        with runner:
            tol, max_mm = tolerances_for(name, runner)
            cmp = Comparator(tol, bundle.labels, bundle.thresholds, min_agreement, max_mm)
            infer_batched(runner, batch[:2], 4)  # warm-up
            t0 = time.perf_counter()
            rep = cmp.compare(None, runner, batch, name=f"{name} vs onnxruntime fp32", reference_name="onnxruntime-fp32", ref_outputs=ref_out)
            ms = (time.perf_counter() - t0) * 1e3 / batch_size(batch)
            out["runners"][name] = {
                "status": "ran",
                "passed": rep.passed,
                "decision_agreement": rep.decision_agreement,
                "position_max_delta_mm": rep.position_max_delta_mm,
                "max_abs": {o.name: o.max_abs for o in rep.outputs},
                "ms_per_slice": ms,
                "describe": runner.describe(),
                "failures": rep.failures,
            }
            out["ok"] = out["ok"] and rep.passed
    if backends is None and bundle.file("onnx_fp16") is not None:
        # the FP16 file is meant for GPU runtimes; ONNX Runtime CPU can still check what it computes
        from medqc.export.onnx_export import OnnxFileRunner

        r16 = OnnxFileRunner(bundle.verify("onnx_fp16"), "onnx_fp16 (onnxruntime cpu)")
        cmp = Comparator(FP16_TOL, bundle.labels, bundle.thresholds, min_agreement, MAX_POSITION_MM["fp16"])
        t0 = time.perf_counter()
        rep = cmp.compare(None, r16, batch, name="onnx fp16 vs onnxruntime fp32", reference_name="onnxruntime-fp32", ref_outputs=ref_out)
        out["runners"][r16.name] = {
            "status": "ran", "passed": rep.passed, "decision_agreement": rep.decision_agreement,
            "position_max_delta_mm": rep.position_max_delta_mm, "max_abs": {o.name: o.max_abs for o in rep.outputs},
            "ms_per_slice": (time.perf_counter() - t0) * 1e3 / batch_size(batch), "failures": rep.failures,
        }
        out["ok"] = out["ok"] and rep.passed
    return out


__all__ = ["check_bundle", "tolerances_for"]
