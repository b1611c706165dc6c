"""ONNX Runtime runners: CPU (fp32), CUDA/TensorRT execution providers, and INT8 (quantised model)."""

from __future__ import annotations

import os

import numpy as np

from medqc.runners.base import BackendUnavailable, Runner


def _ort():
    import onnxruntime

    return onnxruntime


class OrtRunner(Runner):
    name = "onnxruntime"
    providers = ("CPUExecutionProvider",)
    file_key = "onnx"

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
        self.input_name = self.session.get_inputs()[0].name

    def _infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        res = self.session.run(None, {self.input_name: batch})
        return dict(zip(names, res))

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.session.get_providers()}


class OrtCudaRunner(OrtRunner):
    name = "onnxruntime-cuda"
    providers = ("CUDAExecutionProvider", "CPUExecutionProvider")


class OrtInt8Runner(OrtRunner):
    name = "onnxruntime-int8"
    file_key = "onnx_int8"
