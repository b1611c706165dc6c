"""``medqc export engine``: build a TensorRT engine from a bundle's ONNX model on the box that will run it.

TensorRT 10 Python API: ``Builder`` → ``create_network(0)`` (explicit batch) → ``OnnxParser.parse_from_file``
→ builder config (workspace pool limit, FP16 flag, one optimisation profile: MIN:OPT:MAX on the batch
axis, slices of 256 to 1024 rows and columns, 1 to 32 resampling taps per output row or column — see
:func:`profile_shapes` — and a timing cache) → ``build_serialized_network``. The engine is written to ``engines/`` in the bundle with a
sidecar JSON (TensorRT and CUDA versions, GPU name, compute capability, builder flags, sha256 of the ONNX
model and of the engine), then gated on this GPU against the FP32 ONNX model under ONNX Runtime CPU, on
synthetic CT; only a passing engine is added to the bundle manifest.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from medqc.bundle import load_bundle, sha256_file, write_manifest
from medqc.errors import MedqcError
from medqc.export.compare import Comparator, ExportError, ParityError, infer_batched
from medqc.export.specs import FP16_TOL, FP32_TOL, MAX_POSITION_MM, SPECS
from medqc.export.validation import validation_batch
from medqc.runners.base import BackendUnavailable

log = logging.getLogger(__name__)


def require_tensorrt() -> dict:
    """The running environment, or a MedqcError naming what to install (never a silent skip)."""
    from medqc.runners.tensorrt_runner import runtime_environment

    try:
        return runtime_environment()
    except BackendUnavailable as e:
        raise MedqcError(f"cannot build a TensorRT engine here: {e}") from e


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _progress_monitor(trt, bar):
    """A TensorRT IProgressMonitor that shows builder phases on a tqdm bar (None when unsupported)."""
    if not hasattr(trt, "IProgressMonitor") or bar is None:
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                bar.set_postfix_str(str(phase_name)[:40])

        def step_complete(self, phase_name, step):
            return True  # never cancel

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _pin_heads_fp32(trt, network) -> int:
    """Ask for FP32 in every layer after the last convolution (pooling, heads, position scaling), as the
    FP16 ONNX variant does: the position output needs finer steps than FP16 has near 1000 mm; and in every
    layer before the first (the preprocessing: HU up to 3071 and the resampling sums need FP32's steps)."""
    conv_types = {trt.LayerType.CONVOLUTION}
    if hasattr(trt.LayerType, "DECONVOLUTION"):
        conv_types.add(trt.LayerType.DECONVOLUTION)
    convs = [i for i in range(network.num_layers) if network.get_layer(i).type in conv_types]
    first, last = (convs[0], convs[-1]) if convs else (network.num_layers, -1)
    skip = {trt.LayerType.CONSTANT, trt.LayerType.SHUFFLE, trt.LayerType.SHAPE}
    n = 0
    for i in [*range(0, first), *range(last + 1, network.num_layers)]:
        layer = network.get_layer(i)
        if layer.type in skip:
            continue
        try:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
            n += 1
        except Exception as e:  # a layer kind that takes no precision: leave it to the builder
            log.debug("cannot pin %s to fp32: %s", layer.name, e)
    return n


# The engine's range of slice matrices (rows and columns: min, opt, max) and of resampling taps per output
# row or column (1 where the slice is already at the network's pixel size; ~ceil(shrink factor) + 1 for
# area averaging: 3 for 512 slices at 0.7-1 mm, 7 for 1024 slices at 0.35 mm, 32 down to 0.065 mm pixels).
MATRIX_RANGE = (256, 512, 1024)
TAPS_RANGE = (1, 3, 32)


def profile_shapes(size: int, batch: tuple, matrix: tuple = MATRIX_RANGE, taps: tuple = TAPS_RANGE) -> dict[str, tuple]:
    """{input name: (min shape, opt shape, max shape)} of the optimisation profile."""
    from medqc.analysis.preprocess import GEOMETRY_INPUTS

    out = {"hu": tuple((b, m, m) for b, m in zip(batch, matrix))}
    for k in GEOMETRY_INPUTS:
        out[k] = tuple(((size,) if k.endswith("_valid") else (size, t)) for t in taps)
    return out


def build_engine(onnx_path: Path, profile_shapes: dict, *, fp16: bool, workspace_mb: int,
                 timing_cache: str | Path | None = None, progress: bool = True, fp16_onnx_path: Path | None = None):
    """Build and return (serialized engine bytes, builder flags list, build seconds).

    TensorRT releases without the weakly-typed FP16 builder flag build strongly typed networks only; there
    an FP16 engine is built from the bundle's ``model.fp16.onnx`` (FP16 trunk, FP32 heads) instead."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = fp16 and not hasattr(trt.BuilderFlag, "FP16")
    if strongly_typed:
        if fp16_onnx_path is None:
            raise ExportError(f"TensorRT {trt.__version__} has no FP16 builder flag (strongly typed networks only) and the "
                              "bundle has no model.fp16.onnx: re-export with 'medqc export onnx --fp16'")
        onnx_path = fp16_onnx_path
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    else:
        network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    flags = []
    if strongly_typed:
        flags.append(f"STRONGLY_TYPED:{Path(onnx_path).name}")
    elif fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in later TensorRT 10 releases
            log.warning("this GPU has no fast FP16; building with the FP16 flag anyway")
        config.set_flag(trt.BuilderFlag.FP16)
        flags.append("FP16")
        pinned = _pin_heads_fp32(trt, network)
        if pinned and hasattr(trt.BuilderFlag, "PREFER_PRECISION_CONSTRAINTS"):
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            flags.append(f"heads-fp32:{pinned}-layers")
    elif hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # an "FP32" engine computes in FP32, not TF32
        flags.append("no-TF32")
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = b""
    if timing_cache and Path(timing_cache).is_file():
        cache_bytes = Path(timing_cache).read_bytes()
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    flags.append(f"timing-cache:{'loaded' if cache_bytes else 'new'}")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=None, desc="TensorRT build", bar_format="{desc}: {elapsed} {postfix}", leave=False)
    monitor = _progress_monitor(trt, bar)
    if monitor is not None:
        config.progress_monitor = monitor
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            if bar is not None:
                bar.refresh()

    t = threading.Thread(target=tick, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        stop.set()
        if bar is not None:
            bar.close()
    build_s = time.perf_counter() - t0
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (see the TensorRT messages above)")
    if timing_cache:
        tmp = Path(str(timing_cache) + ".tmp")
        tmp.write_bytes(memoryview(config.get_timing_cache().serialize()))
        os.replace(tmp, timing_cache)
    return bytes(memoryview(serialized)), flags, build_s


def build_engine_into_bundle(bundle, *, fp16: bool = True, batch: tuple = (1, 8, 32), workspace_mb: int = 1024,
                             timing_cache: str | None = None, validation_n: int = 48, seed: int = 1234, progress: bool = True) -> dict:
    """Build, gate and register an engine for this GPU in ``bundle``. Returns the JSON-able summary."""
    from medqc.runners.ort_runner import OrtRunner
    from medqc.runners.tensorrt_runner import TensorRTRunner

    env = require_tensorrt()
    if not os.access(bundle.root, os.W_OK):
        raise MedqcError(f"cannot write an engine into {bundle.root} (read-only); copy the bundle to a writable folder "
                         "and point [inference] bundle at it")
    onnx_path = bundle.verify("onnx")
    fp16_onnx = bundle.verify("onnx_fp16") if bundle.file("onnx_fp16") is not None else None
    onnx_sha = bundle.manifest["files"]["onnx"].get("sha256") or sha256_file(onnx_path)
    from medqc.runners.base import require_slice_inputs

    require_slice_inputs(bundle)
    pp = bundle.preprocess
    data, flags, build_s = build_engine(onnx_path, profile_shapes(pp.size, batch), fp16=fp16,
                                        workspace_mb=workspace_mb, timing_cache=timing_cache, progress=progress,
                                        fp16_onnx_path=fp16_onnx)
    precision = "fp16" if fp16 else "fp32"
    rel = Path("engines") / f"{_slug(env['gpu'])}-sm{env['compute_capability'].replace('.', '')}-trt{env['tensorrt']}-{precision}.plan"
    path = bundle.root / rel
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_suffix(".plan.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    entry = {
        "path": str(rel),
        "sha256": sha256_file(path),
        **env,
        "fp16": bool(fp16),
        "batch": list(batch),
        "matrix": list(MATRIX_RANGE),
        "taps": list(TAPS_RANGE),
        "workspace_mb": int(workspace_mb),
        "builder_flags": flags,
        "onnx": bundle.manifest["files"]["onnx"]["path"],
        "onnx_sha256": onnx_sha,
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "build_s": round(build_s, 2),
    }
    # gate: the new engine (alone) against FP32 ONNX Runtime on the CPU
    probe = type(bundle)(root=bundle.root, manifest={**bundle.manifest, "engines": [entry]})
    spec = SPECS.get(bundle.name)
    cmp = Comparator(FP16_TOL if fp16 else FP32_TOL, bundle.labels, bundle.thresholds,
                     spec.min_agreement if spec else 0.995,
                     spec.max_position("fp16" if fp16 else "fp32") if spec else MAX_POSITION_MM["fp16" if fp16 else "fp32"])
    batch_arr, source = validation_batch(pp, n=validation_n, seed=seed)
    try:
        with OrtRunner(bundle) as ref:
            ref_out = infer_batched(ref, batch_arr, 16)
        with TensorRTRunner(probe) as trt_runner:
            rep = cmp.gate(None, trt_runner, batch_arr, name=f"tensorrt {precision} vs onnxruntime fp32",
                           reference_name="onnxruntime-fp32", candidate_name=f"tensorrt-{precision}", ref_outputs=ref_out)
    except ParityError:
        path.unlink(missing_ok=True)
        raise
    entry["parity"] = {"passed": True, "decision_agreement": rep.decision_agreement, "position_max_delta_mm": rep.position_max_delta_mm,
                       "max_abs": {o.name: o.max_abs for o in rep.outputs}, "validation": {"source": source, "n": validation_n}}
    path.with_suffix(".json").write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    fresh = load_bundle(bundle.root)  # re-read: keep engines other runs added meanwhile
    manifest = dict(fresh.manifest)
    manifest["engines"] = [e for e in fresh.engines if e.get("path") != entry["path"]] + [entry]
    write_manifest(bundle.root, manifest)
    return {"bundle": str(bundle.root), "engine": entry, "build_s": build_s, "parity": entry["parity"]}
