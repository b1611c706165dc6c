"""Inference runners: one interface for every backend, each imported lazily.

>>> from medqc.runners import make_runner, available_backends
>>> runner = make_runner("auto", bundle)      # best: tensorrt > onnxruntime-cuda > torch-cuda > onnxruntime
>>> out = runner.infer(batch)                 # {"artifact_logits": (N, 5), "position": (N, 1)}

Backends are registered by name with an import string; importing this package imports none of them, so
``import medqc.agent`` works on a CPU box with neither torch nor tensorrt.
"""

from __future__ import annotations

import importlib

from medqc.runners.base import BackendUnavailable, Runner, RunnerError

# name → "module:Class". Order of preference for "auto".
BACKENDS: dict[str, str] = {
    "tensorrt": "medqc.runners.tensorrt_runner:TensorRTRunner",
    "onnxruntime-cuda": "medqc.runners.ort_runner:OrtCudaRunner",
    "onnxruntime": "medqc.runners.ort_runner:OrtRunner",
    "onnxruntime-int8": "medqc.runners.ort_runner:OrtInt8Runner",
    "torch": "medqc.runners.torch_runner:TorchRunner",
    "torch-cuda": "medqc.runners.torch_runner:TorchCudaRunner",
}
AUTO_ORDER = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime")
CHOICES = ("auto", *BACKENDS)  # what a user may name: the config's inference.backend, --backend


def backend_class(name: str) -> type[Runner]:
    if name not in BACKENDS:
        raise RunnerError(f"unknown backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    mod, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def available_backends(bundle=None) -> dict[str, tuple[bool, str]]:
    """{name: (available, reason)} for every backend, for this machine (and bundle, when given)."""
    out = {}
    for name in BACKENDS:
        try:
            out[name] = backend_class(name).is_available(bundle)
        except Exception as e:  # a broken backend install must not hide the others
            out[name] = (False, f"{type(e).__name__}: {e}")
    return out


def make_runner(name: str, bundle, **opts) -> Runner:
    """Build a runner; ``auto`` picks the first available of AUTO_ORDER. Unavailable → BackendUnavailable."""
    if name == "auto":
        reasons = []
        for cand in AUTO_ORDER:
            ok, why = backend_class(cand).is_available(bundle)
            if ok:
                try:
                    return backend_class(cand)(bundle, **opts)
                except BackendUnavailable as e:  # e.g. an engine whose manifest does not match this GPU
                    reasons.append(f"{cand}: {e}")
                    continue
            reasons.append(f"{cand}: {why}")
        raise BackendUnavailable("no inference backend available:\n  " + "\n  ".join(reasons))
    cls = backend_class(name)
    ok, why = cls.is_available(bundle)
    if not ok:
        raise BackendUnavailable(f"backend {name!r} is not available: {why}")
    return cls(bundle, **opts)


__all__ = ["BACKENDS", "CHOICES", "BackendUnavailable", "Runner", "RunnerError", "available_backends", "backend_class", "make_runner"]
