"""PyTorch → ONNX bundle: export, check, optional simplification, FP16 and INT8 variants, parity gates.

The exported graph is the preprocessing followed by the network (``medqc.models.slice_input.SliceModel``):
inputs ``hu`` (N, rows, cols) and the slice geometry's arrays, outputs ``artifact_logits`` and
``position``. The gates compare ONNX Runtime against torch on synthetic CT of several matrices, pixel
spacings, paddings and orientations (``medqc.export.validation``).

The steps are small free functions (after optimum's ``export → validate_model_outputs``);
:func:`export_bundle` chains them and writes the bundle into a temporary folder beside the target, which
is renamed into place only after every gate passed — a failed export never leaves a half-written bundle.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from medqc import ARTIFACTS
from medqc.bundle import NETWORK_MAX_THICKNESS_MM, SCHEMA, TRAINED_SLICE_THICKNESS_MM, sha256_file, write_manifest
from medqc.export.compare import Comparator, ExportError, ParityReport, batch_size
from medqc.export.specs import ExportSpec
from medqc.export.validation import validation_batch
from medqc.analysis.preprocess import PreprocessParams

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- model sources


def model_source(name: str | None, checkpoint: str | Path | None, allow_untrained: bool = False):
    """Resolve ``--model``/``--checkpoint`` into ``(name, torch module, meta, checkpoint path or None)``.

    Raises UsageError (exit 2) for an unknown name (listing the valid ones), a missing checkpoint, or a
    name that disagrees with the checkpoint."""
    from medqc.errors import UsageError

    try:
        import medqc.models as models
    except ImportError as e:  # pragma: no cover - the package is part of medqc
        raise ExportError(f"cannot import medqc.models: {e}") from e
    names = tuple(models.model_names())
    if name is not None and name not in names:
        raise UsageError(f"unknown model {name!r}; valid names: {', '.join(names)}")
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise UsageError(f"checkpoint not found: {path} (train one with 'medqc train', or pass --allow-untrained for a test export)")
        try:
            ck_name, model, meta = models.load_checkpoint(path)
        except Exception as e:
            raise ExportError(f"cannot load checkpoint {path}: {type(e).__name__}: {e}") from e
        if name is not None and ck_name != name:
            raise UsageError(f"--model {name!r} does not match the checkpoint, which holds model {ck_name!r}")
        return ck_name, model, dict(meta or {}), path
    if not allow_untrained:
        raise UsageError(
            "--checkpoint is required: a bundle with randomly initialised weights would ship wrong answers; "
            "pass --allow-untrained only for tests of the export path"
        )
    if name is None:
        raise UsageError(f"--model is required without --checkpoint; valid names: {', '.join(names)}")
    model = models.build_model(name)
    meta = {"preprocess": PreprocessParams().to_dict(), "labels": list(ARTIFACTS), "thresholds": {a: 0.5 for a in ARTIFACTS}, "version": "untrained", "metrics": {}}
    return name, model, meta, None


def _params(meta: dict) -> PreprocessParams:
    pp = meta.get("preprocess")
    if isinstance(pp, PreprocessParams):
        return pp
    return PreprocessParams.from_dict(pp) if pp else PreprocessParams()


class TorchModuleRunner:
    """Reference runner for an in-memory torch module (FP32, CPU, no grad): the preprocessing
    (``SliceModel``) and the network, on the graph's named inputs."""

    name = "torch-fp32"

    def __init__(self, model, output_names=("artifact_logits", "position")):
        import torch

        self.torch = torch
        self.model = model.eval().float().cpu()
        self.output_names = output_names

    def infer(self, feeds: dict) -> dict:
        from medqc.models.slice_input import as_tensors

        with self.torch.inference_mode():
            out = self.model(*as_tensors(feeds))
        if isinstance(out, dict):
            return {k: out[k].float().numpy() for k in self.output_names}
        return {k: t.float().numpy() for k, t in zip(self.output_names, out)}


class OnnxFileRunner:
    """ONNX Runtime CPU session on one model file (used by the gates before the bundle exists)."""

    def __init__(self, path: Path, name: str, threads: int = 0):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.name = name
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"ONNX Runtime cannot load {path}: {e}") from e
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict) -> dict:
        return dict(zip(self.outputs, self.session.run(None, {k: np.ascontiguousarray(feeds[k]) for k in self.inputs})))


# ---------------------------------------------------------------- steps


def slice_model(model, params: PreprocessParams):
    """The graph that is exported: the preprocessing (``SliceInput``) in front of the network ``model``."""
    from medqc.models.slice_input import SliceModel

    return SliceModel(model.eval().float().cpu(), params).eval()


def export_onnx(model, spec: ExportSpec, params: PreprocessParams, path: Path, opset: int | None = None) -> Path:
    """Trace ``model`` (a :func:`slice_model`) to ONNX with named inputs/outputs and dynamic batch, rows,
    columns and tap counts."""
    import torch

    from medqc.models.slice_input import as_tensors

    sample = tuple(as_tensors(spec.sample_input(params, 2)))
    model = model.eval().float().cpu()
    with torch.inference_mode():
        out = model(*sample)
    if isinstance(out, dict):
        raise ExportError(f"model {spec.model!r} returns a dict; the ONNX interface needs a tuple {spec.output_names}")
    if len(out) != len(spec.output_names):
        raise ExportError(f"model {spec.model!r} returns {len(out)} outputs, the spec names {len(spec.output_names)}: {spec.output_names}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-exporter deprecation notice; errors still raise
        try:
            torch.onnx.export(
                model,
                sample,
                str(path),
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes,
                opset_version=int(opset or spec.opset),
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as e:
            raise ExportError(f"torch.onnx.export failed for model {spec.model!r}: {type(e).__name__}: {e}") from e
    return path


def check_onnx(path: Path) -> dict:
    """``onnx.checker`` (full) and strict shape inference; returns the inferred output shapes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except Exception as e:
        raise ExportError(f"ONNX check failed for {path.name}: {type(e).__name__}: {e}") from e

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return {o.name: dims(o) for o in inferred.graph.output}


def set_metadata(path: Path, props: dict) -> None:
    """Write ``medqc.*`` metadata into the model (strings; lists/dicts as JSON)."""
    import onnx

    m = onnx.load(str(path))
    del m.metadata_props[:]
    for k, v in props.items():
        e = m.metadata_props.add()
        e.key = f"medqc.{k}"
        e.value = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    m.producer_name = "medqc"
    onnx.save(m, str(path))


def simplify_onnx(path: Path, out: Path) -> str:
    """Graph simplification: onnx-simplifier when installed, else ONNX Runtime's basic (constant-folding,
    redundant-node) optimiser written back as an ONNX file. Failure is an error, never swallowed."""
    try:
        import onnx
        import onnxsim  # type: ignore
    except ImportError:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        try:
            ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ExportError(f"graph simplification failed: {e}") from e
        return "onnxruntime-basic"
    model, ok = onnxsim.simplify(onnx.load(str(path)))
    if not ok:
        raise ExportError("onnx-simplifier could not validate the simplified model")
    onnx.save(model, str(out))
    return "onnxsim"


HEAD_STOP_OPS = ("Conv", "ConvTranspose")


def head_nodes(graph) -> list:
    """Names of the nodes between the last convolutions and the outputs (pooling, heads, scaling).

    They cost almost nothing and hold the numbers that matter: the position output is ~100–1800 mm,
    where FP16's spacing is 0.5–1 mm, so FP16 there alone would eat the 1 mm position budget."""
    producers = {o: n for n in graph.node for o in n.output}
    seen, stack, names = set(), [o.name for o in graph.output], []
    while stack:
        t = stack.pop()
        n = producers.get(t)
        if n is None or id(n) in seen or n.op_type in HEAD_STOP_OPS:
            continue
        seen.add(id(n))
        names.append(n.name)
        stack.extend(n.input)
    return names


def preprocessing_nodes(graph) -> list:
    """Names of the nodes upstream of the first convolution (the preprocessing: HU up to 3071, resampling
    weights and sums), which stay FP32 in the FP16 graph."""
    producers = {o: n for n in graph.node for o in n.output}
    first = next((n for n in graph.node if n.op_type in HEAD_STOP_OPS), None)
    if first is None:
        return []
    seen, stack, names = set(), list(first.input[:1]), []
    while stack:
        n = producers.get(stack.pop())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        names.append(n.name)
        stack.extend(n.input)
    return names


def convert_fp16(path: Path, out: Path) -> Path:
    """FP16 trunk; FP32 inputs/outputs, preprocessing and heads (see :func:`preprocessing_nodes`,
    :func:`head_nodes`)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m16 = convert_float_to_float16(model, keep_io_types=True,
                                       node_block_list=head_nodes(model.graph) + preprocessing_nodes(model.graph))
    _dedupe_casts(m16.graph)
    _toposort(m16.graph)  # the converter appends its input Casts at the end of the node list
    onnx.save(m16, str(out))
    return out


def _dedupe_casts(graph) -> None:
    """Drop repeated Casts (in place). ONNX Runtime's FP16 converter before 1.32 adds one Cast per kept
    FP32 node that reads an FP16 tensor and names each ``<input>_cast_to_fp32``: a tensor feeding two
    kept nodes (here the trunk's last ReLU feeds ReduceMean and ReduceMax) is then produced twice, and
    ``onnx.checker`` rejects the graph (not in SSA form). Identical Casts (same input, same target type,
    same output name) are one node; repeated value_info entries go with them. A no-op on newer converters."""
    producer: dict[str, object] = {}
    keep = []
    for n in graph.node:
        first = producer.get(n.output[0]) if len(n.output) == 1 else None
        if first is not None and n.op_type == "Cast" and first.op_type == "Cast" and list(first.input) == list(n.input) \
                and list(first.attribute) == list(n.attribute):
            continue
        for o in n.output:
            producer.setdefault(o, n)
        keep.append(n)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    seen_vi: set[str] = set()
    vis = []
    for v in graph.value_info:
        if v.name not in seen_vi:
            seen_vi.add(v.name)
            vis.append(v)
    if len(vis) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(vis)


def _toposort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (in place)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(i in known for i in node.input):
                ordered.append(node)
                known.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ExportError(f"graph has a cycle or dangling input at node {rest[0].name!r} ({list(rest[0].input)})")
        pending = rest
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def quantize_int8(path: Path, out: Path, calib: list) -> Path:
    """ONNX Runtime static INT8 quantisation (QDQ, per-channel weights) of the network's convolutions and
    matrix products, calibrated on synthetic CT (``calib``: feed groups); the preprocessing stays FP32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{**g, "hu": g["hu"][i : i + 4]} for g in calib for i in range(0, len(g["hu"]), 4)])

        def get_next(self):
            return next(self.it, None)

    with tempfile.TemporaryDirectory(prefix="medqc-int8-") as td:
        prep = Path(td) / "prep.onnx"
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(path), str(prep), skip_symbolic_shape=True)
            src = prep
        except Exception as e:  # pre-processing is an optimisation; quantise the plain model instead
            log.info("INT8 pre-processing skipped: %s", e)
            src = path
        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantiser logs every copied bias at INFO on the root logger
        try:
            keep = preprocessing_nodes(onnx.load(str(src)).graph)
            quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep)
        except Exception as e:
            raise ExportError(f"INT8 quantisation failed: {type(e).__name__}: {e}") from e
        finally:
            root.setLevel(level)
    return out


# ---------------------------------------------------------------- the whole export


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="medqc export", unit="step", disable=not enabled, file=None, leave=False)


def export_bundle(
    model,
    *,
    name: str,
    meta: dict,
    out_dir: str | Path,
    spec: ExportSpec,
    checkpoint: Path | None = None,
    opset: int | None = None,
    fp16: bool = False,
    int8: bool = False,
    simplify: bool = False,
    force: bool = False,
    validation_n: int = 48,
    seed: int = 1234,
    validation_source: str = "auto",
    progress: bool = True,
) -> dict:
    """Export ``model`` into a complete bundle at ``out_dir``. Returns the JSON-able summary.

    Raises :class:`~medqc.export.compare.ParityError` (bundle not written) when a gate fails."""
    from medqc.errors import UsageError

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file; give a folder for the bundle")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} exists and is not empty; pass --force to replace it")
    params = _params(meta)
    labels = tuple(meta.get("labels") or ARTIFACTS)
    thresholds = {k: float(v) for k, v in (meta.get("thresholds") or {a: 0.5 for a in labels}).items()}
    timings: dict[str, float] = {}
    gates: dict[str, ParityReport] = {}
    steps = 4 + int(simplify) + int(fp16) + int(int8)
    bar = _progress(steps, progress)

    def step(label: str):
        if bar is not None:
            bar.set_postfix_str(label)

    def done(label: str, t0: float):
        timings[label] = round(time.perf_counter() - t0, 3)
        if bar is not None:
            bar.update(1)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        step("export")
        onnx_path = export_onnx(slice_model(model, params), spec, params, tmp / "model.onnx", opset)
        done("export", t0)

        t0 = time.perf_counter()
        step("check")
        shapes = check_onnx(onnx_path)
        simplifier = None
        if simplify:
            step("simplify")
            simplifier = simplify_onnx(onnx_path, tmp / "model.simplified.onnx")
            os.replace(tmp / "model.simplified.onnx", onnx_path)
            shapes = check_onnx(onnx_path)
            done("simplify", t0)
            t0 = time.perf_counter()
        ck_sha = sha256_file(checkpoint) if checkpoint else None
        props = {
            "name": name,
            "version": str(meta.get("version", "?")),
            "labels": list(labels),
            "preprocess": params.to_dict(),
            "thresholds": thresholds,
            "checkpoint_sha256": ck_sha or "none (untrained)",
            "trained": "true" if checkpoint else "false",
            "position_units": "reference mm below vertex (medqc.body/1)",
        }
        set_metadata(onnx_path, props)
        check_onnx(onnx_path)
        done("check", t0)

        t0 = time.perf_counter()
        step("parity fp32")
        batch, source = validation_batch(params, n=validation_n, seed=seed, source=validation_source)
        ref_runner = TorchModuleRunner(slice_model(model, params), spec.output_names)
        from medqc.export.compare import infer_batched

        ref = infer_batched(ref_runner, batch, 16)
        cmp32 = Comparator(spec.tol("fp32"), labels, thresholds, spec.min_agreement, spec.max_position_mm)
        gates["onnx"] = cmp32.gate(None, OnnxFileRunner(onnx_path, "onnxruntime-fp32"), batch, name="onnx fp32 vs torch",
                                   reference_name="torch-fp32", ref_outputs=ref)
        done("parity fp32", t0)

        files = {"onnx": {"path": "model.onnx", "sha256": sha256_file(onnx_path), "precision": "fp32", "opset": int(opset or spec.opset)}}
        if fp16:
            t0 = time.perf_counter()
            step("fp16")
            p16 = convert_fp16(onnx_path, tmp / "model.fp16.onnx")
            check_onnx(p16)
            cmp16 = Comparator(spec.tol("fp16"), labels, thresholds, spec.min_agreement, spec.max_position("fp16"))
            gates["onnx_fp16"] = cmp16.gate(None, OnnxFileRunner(p16, "onnxruntime-fp16"), batch, name="onnx fp16 vs torch fp32",
                                            reference_name="torch-fp32", ref_outputs=ref)
            files["onnx_fp16"] = {"path": p16.name, "sha256": sha256_file(p16), "precision": "fp16"}
            done("fp16", t0)
        if int8:
            t0 = time.perf_counter()
            step("int8")
            calib, _ = validation_batch(params, n=32, seed=seed + 7919, source=validation_source)  # disjoint from the gate batch
            p8 = quantize_int8(onnx_path, tmp / "model.int8.onnx", calib)
            cmp8 = Comparator(spec.tol("int8"), labels, thresholds, spec.min_agreement, spec.int8_max_position_mm)
            gates["onnx_int8"] = cmp8.gate(None, OnnxFileRunner(p8, "onnxruntime-int8"), batch, name="onnx int8 vs torch fp32",
                                           reference_name="torch-fp32", ref_outputs=ref)
            files["onnx_int8"] = {"path": p8.name, "sha256": sha256_file(p8), "precision": "int8", "calibration": "synthetic CT, 32 slices"}
            done("int8", t0)

        t0 = time.perf_counter()
        step("write")
        if checkpoint:
            shutil.copy2(checkpoint, tmp / "checkpoint.pt")
            files["checkpoint"] = {"path": "checkpoint.pt", "sha256": ck_sha}
        manifest = {
            "schema": SCHEMA,
            "name": name,
            "version": str(meta.get("version", "?")),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "trained": bool(checkpoint),
            "labels": list(labels),
            "preprocess": params.to_dict(),
            "thresholds": thresholds,
            "inputs": graph_inputs(params),
            "outputs": {"artifact_logits": [-1, len(labels)], "position": [-1, 1]},
            "position": {"scale": "medqc.body/1", "units": "reference mm below vertex"},
            "domain": {"trained_slice_thickness_mm": list(TRAINED_SLICE_THICKNESS_MM),
                       "max_slice_thickness_mm": NETWORK_MAX_THICKNESS_MM},
            "files": files,
            "engines": [],
            "metrics": meta.get("metrics") or {},
            "export": {
                "tool": "medqc export onnx",
                "opset": int(opset or spec.opset),
                "simplifier": simplifier,
                "onnx_output_shapes": shapes,
                "checkpoint_sha256": ck_sha,
                "validation": {"source": source, "n": batch_size(batch), "geometries": len(batch), "seed": seed},
                "parity": {k: r.to_dict() for k, r in gates.items()},
            },
        }
        write_manifest(tmp, manifest)
        _replace_dir(tmp, out_dir)
        done("write", t0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return {
        "bundle": str(out_dir),
        "model": name,
        "version": str(meta.get("version", "?")),
        "trained": bool(checkpoint),
        "files": files,
        "validation": {"source": source, "n": batch_size(batch), "geometries": len(batch)},
        "parity": {k: {"passed": r.passed, "decision_agreement": r.decision_agreement, "borderline": r.borderline,
                       "decisions": r.n * len(labels), "position_max_delta_mm": r.position_max_delta_mm,
                       "max_abs": {o.name: o.max_abs for o in r.outputs}} for k, r in gates.items()},
        "timings_s": timings,
    }


def graph_inputs(params: PreprocessParams) -> dict:
    """The manifest's ``inputs``: each input's shape, -1 where it is dynamic (batch, rows, columns, taps)."""
    s = params.size
    return {"hu": [-1, -1, -1], "row_index": [s, -1], "row_weight": [s, -1], "col_index": [s, -1], "col_weight": [s, -1],
            "row_valid": [s], "col_valid": [s]}


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished bundle into place; an existing one is renamed aside first and removed last."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
