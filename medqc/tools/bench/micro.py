"""Sections (d) and (e), no network: decode + geometry per slice; (d) each available inference backend alone
on the decoded slices, the model's preprocessing included (ONNX Runtime fp32, INT8 when the bundle has it,
torch eager, and the GPU backends ``medqc.runners`` offers here); (e) the naive baseline, one slice at a
time through pydicom, then the preprocessing and network in torch eager at batch 1."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from medqc.tools.bench.report import failed, skipped


def _hu(ds) -> "object":
    """HU float32 of an uncompressed CT slice straight from PixelData (pixel_array is ~7x slower)."""
    import numpy as np

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and not ts.is_compressed and int(ds.BitsAllocated) == 16 and int(getattr(ds, "SamplesPerPixel", 1)) == 1:
        dt = np.dtype("<i2" if int(ds.PixelRepresentation) else "<u2")
        if not ts.is_little_endian:
            dt = dt.newbyteorder(">")
        px = np.frombuffer(ds.PixelData, dtype=dt, count=int(ds.Rows) * int(ds.Columns)).reshape(int(ds.Rows), int(ds.Columns))
    else:
        px = ds.pixel_array
    return px.astype(np.float32) * np.float32(float(getattr(ds, "RescaleSlope", 1) or 1)) + np.float32(float(getattr(ds, "RescaleIntercept", 0) or 0))


def load_slices(files: list[Path], params) -> tuple[dict, dict]:
    """Decode every file once, one at a time, and look up its geometry (the agent's per-slice host work,
    timed separately from inference; the pixel preprocessing runs in the model) → the model's inputs for
    the slices of the first slice's geometry (the bench study has one), timing section."""
    import numpy as np
    import pydicom

    from medqc.analysis.preprocess import geometry, geometry_key

    out, dec_ms, geo_ms, key0, geom0 = [], [], [], None, None
    for p in files:
        t0 = time.perf_counter()
        ds = pydicom.dcmread(str(p))
        hu = _hu(ds)
        t1 = time.perf_counter()
        ps = tuple(float(v) for v in ds.PixelSpacing)
        iop = tuple(float(v) for v in ds.ImageOrientationPatient) if "ImageOrientationPatient" in ds else None
        g = geometry(*hu.shape, ps, params, iop)
        t2 = time.perf_counter()
        key = geometry_key(hu.shape, ps, iop)
        if key0 is None:
            key0, geom0 = key, g
        if key == key0:
            out.append(hu)
        dec_ms.append((t1 - t0) * 1e3)
        geo_ms.append((t2 - t1) * 1e3)
    total = sum(dec_ms) + sum(geo_ms)
    sec = {"status": "ran", "slices": len(files), "wall_s": round(total / 1e3, 3), "slices_per_s": round(len(files) / (total / 1e3), 1),
           "decode_ms_p50": round(float(np.median(dec_ms)), 3), "geometry_ms_p50": round(float(np.median(geo_ms)), 4),
           "what": "pydicom dcmread + HU from PixelData + the slice geometry's resampling arrays (medqc.analysis.preprocess, "
                   "cached per geometry), one slice at a time; the pixel preprocessing runs in the model (section d)"}
    return geom0.feeds(np.stack(out)), sec


def _take(x: dict, i: int, j: int) -> dict:
    return {**x, "hu": x["hu"][i:j]}


def _time_runner(runner, x, batch: int, min_s: float) -> dict:
    import numpy as np

    n = x["hu"].shape[0]
    for _ in range(2):  # warm-up (allocations, lazy init, engine tactics)
        runner.infer(_take(x, 0, batch))
    done, t0, calls = 0, time.perf_counter(), []
    while True:
        for i in range(0, n, batch):
            c0 = time.perf_counter()
            runner.infer(_take(x, i, i + batch))
            calls.append((time.perf_counter() - c0) * 1e3 / max(1, min(batch, n - i)))
            done += min(batch, n - i)
        el = time.perf_counter() - t0
        if el >= min_s:
            break
    return {"status": "ran", "batch": batch, "slices": done, "wall_s": round(el, 3), "slices_per_s": round(done / el, 1),
            "ms_per_slice_p50": round(float(np.median(calls)), 3)}


def bench_inference(bundle, x, batch: int, min_s: float, threads: int = 0) -> dict:
    from medqc.runners import available_backends, make_runner

    out = {}
    for name, (ok, why) in available_backends(bundle).items():
        if not ok:
            out[name] = skipped(why)
            continue
        if name == "torch-cuda" and (out.get("torch") or {}).get("describe", {}).get("device", "cpu") != "cpu":
            out[name] = skipped("the same runner as torch on this CUDA machine (row above)")
            continue
        opts = {"threads": threads} if (threads and name.startswith("onnxruntime")) else {}
        try:
            with make_runner(name, bundle, **opts) as runner:
                res = _time_runner(runner, x, batch, min_s)
                res["describe"] = runner.describe()
                if name == "torch" and res["describe"].get("device", "cpu") == "cpu":
                    res = _best_torch_threads(runner, x, batch, min_s, res)
        except Exception as e:
            res = failed(f"{type(e).__name__}: {e}")
        out[name] = res
        if name == "torch" and res.get("status") == "ran" and res["describe"].get("device", "cpu") != "cpu":
            # a CUDA machine: torch on the CPU too, the eager reference for the ratio
            with contextlib.suppress(Exception), make_runner("torch", bundle, device="cpu", amp=False) as r2:
                res2 = _time_runner(r2, x, batch, min_s)
                res2["describe"] = r2.describe()
                out["torch-cpu"] = res2
        if name == "torch" and res.get("status") == "ran" and res["describe"].get("device", "cpu") != "cpu":
            out["torch-cuda-graph"] = _bench_cuda_graph(bundle, x, batch, min_s)
    return out


def _best_torch_threads(runner, x, batch: int, min_s: float, first: dict) -> dict:
    """torch on the CPU: also one thread (OpenMP busy-waiting on a shared 2-core box); keep the faster."""
    import torch

    default = torch.get_num_threads()
    first["torch_threads"] = default
    if default == 1:
        return first
    try:
        torch.set_num_threads(1)
        one = _time_runner(runner, x, batch, min_s)
    finally:
        torch.set_num_threads(default)
    one["torch_threads"] = 1
    one["describe"] = first["describe"]
    best = max((first, one), key=lambda d: d["slices_per_s"])
    best = dict(best)
    best["passes"] = [{k: d[k] for k in ("torch_threads", "slices_per_s", "ms_per_slice_p50")} for d in (first, one)]
    return best


def _bench_cuda_graph(bundle, x, batch: int, min_s: float) -> dict:
    """torch CUDA FP16 with the forward pass captured once in a CUDA graph (static batch)."""
    try:
        import torch

        from medqc.models import load_checkpoint
        from medqc.models.slice_input import SliceInput, as_tensors

        _, model, _ = load_checkpoint(bundle.verify("checkpoint"))
        model = model.eval().cuda().half()
        pre = SliceInput(bundle.preprocess).cuda()  # the preprocessing in FP32, the network in FP16
        args = [t.cuda() for t in as_tensors(_take(x, 0, 1))]
        static = torch.zeros((batch, *x["hu"].shape[1:]), device="cuda", dtype=torch.float32)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.inference_mode():
            for _ in range(3):
                model(pre(static, *args[1:]).half())
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(g):
            out = model(pre(static, *args[1:]).half())
        xs = torch.from_numpy(x["hu"])
        n = (x["hu"].shape[0] // batch) * batch or batch
        done, t0, calls = 0, time.perf_counter(), []
        while True:
            for i in range(0, n, batch):
                c0 = time.perf_counter()
                chunk = xs[i:i + batch]
                if chunk.shape[0] < batch:
                    chunk = torch.cat([chunk, xs[: batch - chunk.shape[0]]])
                static.copy_(chunk.cuda(non_blocking=True))
                g.replay()
                _ = out[0].float().cpu()
                calls.append((time.perf_counter() - c0) * 1e3 / batch)
                done += batch
            el = time.perf_counter() - t0
            if el >= min_s:
                break
        import statistics

        return {"status": "ran", "batch": batch, "slices": done, "wall_s": round(el, 3), "slices_per_s": round(done / el, 1),
                "ms_per_slice_p50": round(statistics.median(calls), 3), "describe": {"backend": "torch", "device": "cuda", "precision": "fp16", "cuda_graph": True}}
    except Exception as e:
        return failed(f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------------------------- (e) naive
def bench_naive(files: list[Path], bundle, min_s: float) -> dict:
    """One slice at a time: full pydicom decode (pixel_array), HU, the model's preprocessing and network in
    torch eager, batch 1."""
    import numpy as np
    import pydicom

    from medqc.analysis.preprocess import geometry
    from medqc.runners import backend_class

    try:
        ok, why = backend_class("torch").is_available(bundle)
    except Exception as e:
        ok, why = False, f"{type(e).__name__}: {e}"
    if not ok:
        return skipped(f"naive baseline needs torch: {why}")
    try:
        runner = backend_class("torch")(bundle, device="cpu", amp=False)
    except Exception as e:
        return skipped(f"naive baseline needs torch: {e}")
    params = bundle.preprocess
    import torch

    default_threads = torch.get_num_threads()
    passes = {}
    with runner:
        # torch's default (one OpenMP thread per core) and one thread: on a busy 2-core box OpenMP's
        # busy-waiting can make the default several times slower; the baseline gets the better of the two
        for threads in dict.fromkeys((default_threads, 1)):
            torch.set_num_threads(threads)
            runner.infer(geometry(512, 512, (0.7, 0.7), params).feeds(np.zeros((1, 512, 512), np.float32)))
            infer_ms, total_ms = [], []
            t0 = time.perf_counter()
            while True:
                for p in files:
                    c0 = time.perf_counter()
                    ds = pydicom.dcmread(str(p))
                    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                    feeds = geometry(*hu.shape, tuple(float(v) for v in ds.PixelSpacing), params,
                                     tuple(float(v) for v in ds.ImageOrientationPatient)).feeds(hu)
                    i0 = time.perf_counter()
                    runner.infer(feeds)
                    c1 = time.perf_counter()
                    infer_ms.append((c1 - i0) * 1e3)
                    total_ms.append((c1 - c0) * 1e3)
                el = time.perf_counter() - t0
                if el >= min_s:
                    break
            n = len(total_ms)
            passes[threads] = {"torch_threads": threads, "slices": n, "wall_s": round(el, 3), "slices_per_s": round(n / el, 1),
                               "ms_per_slice_p50": round(float(np.median(total_ms)), 3),
                               "inference_only_slices_per_s": round(1e3 / float(np.mean(infer_ms)), 1),
                               "inference_ms_p50": round(float(np.median(infer_ms)), 3)}
        torch.set_num_threads(default_threads)
    best = max(passes.values(), key=lambda d: d["slices_per_s"])
    return {"status": "ran", "batch": 1, **best, "passes": list(passes.values()), "describe": runner.describe(),
            "what": "per slice: pydicom dcmread + pixel_array + torch eager preprocessing and network (batch 1); the faster of torch's default threads and 1 thread"}
