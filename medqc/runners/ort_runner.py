"""ONNX Runtime runners: CPU (fp32), CUDA/TensorRT execution providers, and INT8 (quantised model)."""

from __future__ import annotations

import os

import numpy as np

from medqc.runners.base import BackendUnavailable, Runner


def _ort():
    import onnxruntime

    return onnxruntime


class OrtRunner(Runner):
    """ONNX Runtime on the CPU. The graph's preprocessing expands each slice into its resampling taps
    (a 512² slice: two planes of 768 × 512 gathered rows); on the CPU a batch of 16 slices then works
    outside the caches and costs ~30 % more CPU per slice than the same slices one at a time (the network
    itself gains nothing from batching here), so a batch runs one slice per call (``chunk``). GPU
    providers take the batch whole."""

    name = "onnxruntime"
    providers = ("CPUExecutionProvider",)
    file_key = "onnx"
    chunk: int | None = 1

    @classmethod
    def is_available(cls, bundle=None) -> tuple[bool, str]:
        try:
            ort = _ort()
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime)"
        missing = [p for p in cls.providers if p not in ort.get_available_providers()]
        if missing:
            return False, f"onnxruntime has no {', '.join(missing)} (pip install onnxruntime-gpu on a CUDA box)"
        if bundle is not None and bundle.file(cls.file_key) is None:
            return False, f"bundle has no '{cls.file_key}' model"
        return True, "ok"

    def __init__(self, bundle, threads: int | None = None, **opts):
        super().__init__(bundle)
        ort = _ort()
        so = ort.SessionOptions()
        # Two cores are shared with the DICOM receiver: spinning threads steal its CPU (ARCHITECTURE.md).
        so.intra_op_num_threads = int(threads or os.environ.get("MEDQC_ORT_THREADS", 0) or 0)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        path = bundle.verify(self.file_key)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=list(self.providers))
        except Exception as e:  # corrupt model, provider failure
            raise BackendUnavailable(f"{self.name}: cannot load {path}: {e}") from e
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hu = feeds["hu"]
        step = self.chunk or len(hu)
        parts = [self.session.run(self.output_names, {**{k: feeds[k] for k in self.input_names}, "hu": hu[i:i + step]})
                 for i in range(0, len(hu), step)]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.output_names)}

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.session.get_providers()}


class OrtCudaRunner(OrtRunner):
    name = "onnxruntime-cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")
    chunk = None


class OrtInt8Runner(OrtRunner):
    name = "onnxruntime-int8"
    file_key = "onnx_int8"
