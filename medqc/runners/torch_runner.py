"""PyTorch runner: the bundle's checkpoint (``files.checkpoint``) loaded with ``medqc.models.load_checkpoint``.

On a CUDA machine it runs on the GPU with autocast FP16 (``amp=False`` for FP32); otherwise FP32 on the CPU.
It is the reference the export gates compare against, and a fallback where neither ONNX Runtime nor
TensorRT is wanted. torch is imported only when the runner is built or asked whether it is available.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from medqc.runners.base import BackendUnavailable, Runner


class TorchRunner(Runner):
    name = "torch"

    @classmethod
    def is_available(cls, bundle=None) -> tuple[bool, str]:
        try:
            import torch  # noqa: F401
        except ImportError:
            return False, "PyTorch is not installed (pip install torch, or medqc[train])"
        if bundle is not None and bundle.file("checkpoint") is None:
            return False, "bundle has no 'checkpoint' file (export with --checkpoint to include one)"
        return True, "ok"

    def __init__(self, bundle, device: str | None = None, amp: bool | None = None, **opts):
        super().__init__(bundle)
        import torch

        try:
            from medqc.models import load_checkpoint
        except ImportError as e:
            raise BackendUnavailable(f"torch: medqc.models cannot load checkpoints here: {e}") from e
        self.torch = torch
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable("torch: CUDA requested but torch.cuda.is_available() is False (install a CUDA build of torch)")
        self.device = torch.device(device)
        self.amp = bool(self.device.type == "cuda") if amp is None else bool(amp)
        if self.amp and self.device.type != "cuda":
            raise BackendUnavailable("torch: FP16 autocast needs a CUDA device")
        if self.device.type == "cuda" and not self.amp:
            # FP32 means FP32: cuDNN/cuBLAS would otherwise use TF32 (10-bit mantissa) on Ampere and later,
            # which alone moves the position output by ~0.5 mm. Process-wide setting, as torch offers no other.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        path = bundle.verify("checkpoint")
        try:
            name, model, meta = load_checkpoint(path)
        except Exception as e:
            raise BackendUnavailable(f"torch: cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
        if bundle.manifest.get("name") not in (None, name):
            raise BackendUnavailable(f"torch: checkpoint holds model {name!r} but the bundle is {bundle.name!r}")
        from medqc.models.slice_input import SliceInput

        self.model = model.eval().float().to(self.device)
        # the model's own preprocessing runs in FP32 (HU and resampling weights), on the same device
        self.pre = SliceInput(bundle.preprocess).to(self.device)
        self.model_name = name

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from medqc.models.slice_input import as_tensors

        torch = self.torch
        args = [t.to(self.device, non_blocking=True) for t in as_tensors(feeds)]
        with torch.inference_mode():
            x = self.pre(*args)
            with torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.amp):
                logits, position = self.model(x)
        return {"artifact_logits": logits.float().cpu().numpy(), "position": position.float().cpu().numpy()}

    def describe(self) -> dict:
        d = {"backend": self.name, "device": str(self.device), "precision": "fp16" if self.amp else "fp32", "model": self.model_name}
        if self.device.type == "cuda":
            d["gpu"] = self.torch.cuda.get_device_name(self.device)
        return d


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver on this machine (checked without importing torch: on a CPU box ``auto`` must
    not pay torch's import time and memory only to learn there is no GPU)."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


class TorchCudaRunner(TorchRunner):
    """The torch runner on the GPU (FP16 autocast): ``auto``'s choice on a CUDA machine that has a CUDA build
    of torch but neither TensorRT nor onnxruntime-gpu (its decisions match ONNX Runtime CPU's on 100 % of
    the parity slices, ``scripts/gpu-check``), ahead of ONNX Runtime on the CPU, whose cores the classical
    detectors and the receiver need."""

    name = "torch-cuda"

    @classmethod
    def is_available(cls, bundle=None) -> tuple[bool, str]:
        if not nvidia_driver_present():
            return False, "no NVIDIA driver on this machine"
        ok, why = super().is_available(bundle)
        if not ok:
            return ok, why
        import torch

        if not torch.cuda.is_available():
            return False, f"torch {torch.__version__} sees no CUDA device (a CPU build, or no usable GPU)"
        return True, "ok"

    def __init__(self, bundle, device: str | None = None, amp: bool | None = None, **opts):
        super().__init__(bundle, device=device or "cuda", amp=amp, **opts)
