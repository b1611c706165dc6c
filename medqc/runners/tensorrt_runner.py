"""TensorRT runner (TensorRT 10 API): runs a serialized engine listed in the bundle's ``engines``.

Engines are not portable: each one is built on the target box by ``medqc export engine`` and carries the
TensorRT version, GPU name and compute capability it was built for, and the sha256 of the ONNX model it
came from. This runner only loads an engine whose record matches the running TensorRT and GPU and the
bundle's current ONNX file; otherwise it raises :class:`BackendUnavailable` naming the mismatch, so
``make_runner("auto")`` warns and falls back to ONNX Runtime — or, with ``rebuild=True``, it builds a
fresh engine for this GPU first. Device buffers and the stream come from PyTorch (CUDA build).

Inputs: ``hu`` (N, H, W) and the geometry arrays (``medqc.analysis.preprocess.Geometry``); the engine
preprocesses on the GPU. Inference: ``set_input_shape`` → ``set_tensor_address`` for every I/O tensor →
``execute_async_v3`` on a CUDA stream; batches larger than the engine's optimisation-profile maximum are
split, smaller than its minimum are padded; the geometry arrays stay on the GPU while batches of one
geometry follow each other.
"""

from __future__ import annotations

import logging

import numpy as np

from medqc.runners.base import BackendUnavailable, Runner

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install tensorrt (NVIDIA GPU with a CUDA driver required), plus a CUDA build of torch for device buffers"


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"TensorRT is not installed ({e}); {INSTALL_HINT}") from e
    return trt


def runtime_environment() -> dict:
    """What an engine must match here: {"tensorrt", "cuda", "gpu", "compute_capability"}.

    Raises BackendUnavailable (with what to install) when TensorRT, torch+CUDA or a GPU is missing."""
    trt = _import_trt()
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailable(f"torch is not installed; {INSTALL_HINT}") from e
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA GPU is visible (torch.cuda.is_available() is False): TensorRT needs an NVIDIA GPU and driver")
    major, minor = torch.cuda.get_device_capability(0)
    return {
        "tensorrt": str(trt.__version__),
        "cuda": str(torch.version.cuda),
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }


def engine_mismatch(entry: dict, env: dict, onnx_sha256: str | None = None) -> list[str]:
    """Reasons an engine record cannot run in ``env`` (empty list = it matches)."""
    reasons = []
    for key, label in (("tensorrt", "TensorRT version"), ("gpu", "GPU"), ("compute_capability", "compute capability")):
        have, want = str(env.get(key)), str(entry.get(key))
        if have != want:
            reasons.append(f"{label}: engine built for {want!r}, running {have!r}")
    if onnx_sha256 and entry.get("onnx_sha256") and entry["onnx_sha256"] != onnx_sha256:
        reasons.append("stale: built from a different model.onnx than the bundle now holds")
    return reasons


def select_engine(engines: list, env: dict, onnx_sha256: str | None = None, precision: str | None = None) -> tuple[dict | None, list[str]]:
    """First engine record matching ``env`` (preferring ``precision`` = "fp16"/"fp32" when given).

    Returns (entry or None, reasons per rejected engine)."""
    reasons, matches = [], []
    for e in engines:
        why = engine_mismatch(e, env, onnx_sha256)
        if why:
            reasons.append(f"{e.get('path', '?')}: " + "; ".join(why))
        else:
            matches.append(e)
    if precision is not None:
        matches.sort(key=lambda e: (("fp16" if e.get("fp16") else "fp32") != precision))
    return (matches[0] if matches else None), reasons


_TORCH_DTYPES = {}


def _torch_dtype(trt, torch, dt):
    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT32: torch.int32,
                              trt.DataType.INT64: torch.int64,
                              trt.DataType.INT8: torch.int8, trt.DataType.BOOL: torch.bool})
    try:
        return _TORCH_DTYPES[dt]
    except KeyError:
        raise BackendUnavailable(f"tensorrt: engine tensor type {dt} is not supported by this runner") from None


class TensorRTRunner(Runner):
    name = "tensorrt"

    @classmethod
    def is_available(cls, bundle=None) -> tuple[bool, str]:
        """TensorRT, torch+CUDA and a GPU are here. Whether one of the bundle's engines fits this machine is
        decided when the runner is built (so ``rebuild=True`` can act on a mismatch): a mismatch raises
        BackendUnavailable there, and ``make_runner("auto")`` falls back to ONNX Runtime with the reason."""
        try:
            env = runtime_environment()
        except BackendUnavailable as e:
            return False, str(e)
        if bundle is not None and bundle.file("onnx") is None and not bundle.engines:
            return False, "bundle has neither a TensorRT engine nor an ONNX model to build one from"
        return True, f"TensorRT {env['tensorrt']} on {env['gpu']} (sm {env['compute_capability']})"

    def __init__(self, bundle, rebuild: bool = False, precision: str | None = None, **opts):
        super().__init__(bundle)
        trt = _import_trt()
        import torch

        env = runtime_environment()
        entry, reasons = select_engine(bundle.engines, env, _onnx_sha(bundle), precision)
        if entry is None and rebuild:
            from medqc.bundle import load_bundle

            log.warning("no TensorRT engine in %s fits this machine (%s); building one for %s (%s), this takes minutes",
                        bundle.root, " | ".join(reasons) or "none built yet", env["gpu"], "fp32" if precision == "fp32" else "fp16")
            try:
                from medqc.export.engine import build_engine_into_bundle

                build_engine_into_bundle(bundle, fp16=(precision != "fp32"), progress=False)
            except Exception as e:  # read-only bundle, parser/builder failure, parity gate: fall back, loudly
                raise BackendUnavailable(f"tensorrt: rebuilding the engine failed: {type(e).__name__}: {e}") from e
            bundle = load_bundle(bundle.root)
            self.bundle = bundle
            entry, reasons = select_engine(bundle.engines, env, _onnx_sha(bundle), precision)
        if entry is None:
            why = " | ".join(reasons) or "the bundle has none (build one on this box: medqc export engine --bundle DIR)"
            log.warning("TensorRT engine not usable here, falling back: %s", why)
            raise BackendUnavailable("no TensorRT engine in the bundle matches this machine: " + why)
        self.entry = entry
        self.trt, self.torch = trt, torch
        path = bundle.root / entry["path"]
        if not path.is_file():
            raise BackendUnavailable(f"tensorrt: engine file missing: {path}")
        if entry.get("sha256"):
            from medqc.bundle import sha256_file

            if sha256_file(path) != entry["sha256"]:
                raise BackendUnavailable(f"tensorrt: engine {path} does not match its recorded sha256 (corrupt or replaced)")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        try:
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        except Exception as e:  # some TensorRT releases raise instead of returning None
            raise BackendUnavailable(f"tensorrt: cannot deserialize {path}: {e}") from e
        if self.engine is None:
            raise BackendUnavailable(f"tensorrt: cannot deserialize {path} (built for another TensorRT/GPU?)")
        self.context = self.engine.create_execution_context()
        self.inputs, self.output_names = [], []
        for i in range(self.engine.num_io_tensors):
            n = self.engine.get_tensor_name(i)
            (self.inputs if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else self.output_names).append(n)
        from medqc.analysis.preprocess import INPUT_NAMES

        if sorted(self.inputs) != sorted(INPUT_NAMES):
            raise BackendUnavailable(f"tensorrt: engine inputs {self.inputs}, expected {list(INPUT_NAMES)} (rebuild it from this bundle)")
        lo, _, hi = self.engine.get_tensor_profile_shape("hu", 0)
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self.device = torch.device("cuda", 0)
        self.stream = torch.cuda.Stream(device=self.device)
        self._geometry: tuple = (None, None)  # (the last geometry's arrays, their copies on the GPU)

    def _device_geometry(self, feeds: dict) -> dict:
        """The geometry arrays on the GPU; a batch of the same geometry as the last one reuses them."""
        from medqc.analysis.preprocess import GEOMETRY_INPUTS

        host, dev = self._geometry
        if host is None or any(not np.array_equal(host[k], feeds[k]) for k in GEOMETRY_INPUTS):
            torch, trt = self.torch, self.trt
            host = {k: np.array(feeds[k]) for k in GEOMETRY_INPUTS}
            dev = {k: torch.from_numpy(host[k]).to(self.device).to(_torch_dtype(trt, torch, self.engine.get_tensor_dtype(k))).contiguous()
                   for k in GEOMETRY_INPUTS}
            self._geometry = (host, dev)
        return dev

    def _run_chunk(self, feeds: dict) -> dict:
        torch, trt = self.torch, self.trt
        hu = feeds["hu"]
        n = hu.shape[0]
        if n < self.min_batch:  # pad up to the profile minimum; padded rows are dropped below
            hu = np.concatenate([hu, np.repeat(hu[-1:], self.min_batch - n, axis=0)])
        with torch.cuda.stream(self.stream):
            tensors = dict(self._device_geometry(feeds))
            in_dtype = _torch_dtype(trt, torch, self.engine.get_tensor_dtype("hu"))
            tensors["hu"] = torch.from_numpy(hu).to(self.device, non_blocking=True).to(in_dtype).contiguous()
            for name, t in tensors.items():
                if not self.context.set_input_shape(name, tuple(t.shape)):
                    raise BackendUnavailable(f"tensorrt: input {name} of shape {tuple(t.shape)} is outside the engine's profile "
                                             f"({profile_text(self.engine, name)})")
                self.context.set_tensor_address(name, t.data_ptr())
            outs = {}
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                t = torch.empty(shape, dtype=_torch_dtype(trt, torch, self.engine.get_tensor_dtype(name)), device=self.device)
                self.context.set_tensor_address(name, t.data_ptr())
                outs[name] = t
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("tensorrt: execute_async_v3 failed")
        self.stream.synchronize()
        return {k: v[:n].float().cpu().numpy() for k, v in outs.items()}

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hu = feeds["hu"]
        parts = [self._run_chunk({**feeds, "hu": hu[i : i + self.max_batch]}) for i in range(0, hu.shape[0], self.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        for attr in ("context", "engine", "runtime"):
            if hasattr(self, attr):
                delattr(self, attr)

    def describe(self) -> dict:
        e = self.entry
        return {"backend": self.name, "engine": e.get("path"), "precision": "fp16" if e.get("fp16") else "fp32",
                "tensorrt": e.get("tensorrt"), "gpu": e.get("gpu"), "batch": e.get("batch")}


def profile_text(engine, name: str) -> str:
    try:
        lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
        return f"min {tuple(lo)}, opt {tuple(opt)}, max {tuple(hi)}"
    except Exception:  # noqa: BLE001 - only for the message
        return "profile unknown"


def _onnx_sha(bundle) -> str | None:
    entry = bundle.manifest.get("files", {}).get("onnx")
    return entry.get("sha256") if entry else None
