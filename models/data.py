"""Training data: synthetic CT slices from ``medqc.synth.training``, preprocessed by the model's own
preprocessing module (``medqc.models.slice_input``, the graph every runner executes) and cached as a
float16 memmap (``/work/main/data/`` by default; ignored by git).

A cache is a folder: ``x.f16`` (N, C, S, S), ``y.npy`` (N, K) artifact severities 0..1, ``pos.npy`` (N,)
reference mm below the vertex (NaN where the slice has no meaningful position), ``meta.json`` (one dict
per slice, the generator's own description) and ``done.json`` written last (a cache without it is
incomplete and is rebuilt). Slices are generated in chunks by worker processes; chunk ``i`` uses seed
``hash(seed, i)`` so the result does not depend on the number of workers. The workers return HU slices and
the parent preprocesses them (torch, ~2 ms a slice against the generator's ~250 ms); the workers start from a
fork server, not from the parent, whose torch and OpenMP threads do not survive a fork.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medqc import ARTIFACTS
from medqc.errors import MedqcError
from medqc.analysis.preprocess import PreprocessParams

log = logging.getLogger(__name__)

CHUNK = 16


def _sampler():
    try:
        from medqc.synth.training import sample_training_slices
    except ImportError as e:
        raise MedqcError(f"the synthetic training generator is not available (medqc.synth.training): {e}") from None
    return sample_training_slices


def chunk_seed(seed: int, i: int) -> int:
    h = hashlib.sha256(f"medqc-train:{seed}:{i}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def _jsonable(v):
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in list(v)]
    return str(v)


def _position(ts) -> float:
    p = getattr(ts, "position_ref_mm", None)
    try:
        p = float(p)
    except (TypeError, ValueError):
        return float("nan")
    return p if math.isfinite(p) else float("nan")


def make_chunk(args) -> tuple[int, list, np.ndarray, np.ndarray, list]:
    """Worker: generate one chunk. ``args`` = (index, n, seed, params dict). Returns the slices as
    (hu float32, pixel spacing, None) for :func:`medqc.models.slice_input.prepare`, labels, positions, metas."""
    i, n, seed, pdict = args
    sample = _sampler()
    slices = sample(n, seed)
    x = [(np.asarray(ts.hu, np.float32), tuple(float(v) for v in ts.pixel_spacing), None) for ts in slices]
    y = np.zeros((len(slices), len(ARTIFACTS)), np.float32)
    pos = np.full(len(slices), np.nan, np.float32)
    metas = []
    for j, ts in enumerate(slices):
        arts = dict(getattr(ts, "artifacts", {}) or {})
        for k, a in enumerate(ARTIFACTS):
            y[j, k] = float(arts.get(a, 0.0) or 0.0)
        pos[j] = _position(ts)
        m = _jsonable(dict(getattr(ts, "meta", {}) or {}))
        m["pixel_spacing"] = [float(ts.pixel_spacing[0]), float(ts.pixel_spacing[1])]
        m["matrix"] = list(np.asarray(ts.hu).shape)
        metas.append(m)
    return i, x, y, pos, metas


@dataclass
class Cache:
    root: Path
    x: np.ndarray  # memmap float16 (N, C, S, S)
    y: np.ndarray  # (N, K) severities
    pos: np.ndarray  # (N,) reference mm or NaN
    meta: list

    def __len__(self) -> int:
        return len(self.y)


def generator_fingerprint() -> str:
    try:
        import medqc.synth.training as tr

        f = getattr(tr, "__file__", None)
        return hashlib.sha256(Path(f).read_bytes()).hexdigest()[:12] if f else ""
    except (ImportError, OSError):
        return ""


def generator_version() -> str:
    try:
        import medqc.synth.training as tr

        return str(getattr(tr, "__version__", None) or getattr(tr, "GENERATOR_VERSION", None) or "")
    except ImportError:
        return ""


def cache_key(n: int, seed: int, params: PreprocessParams, version: str | None = None) -> str:
    """Folder name for a cache: count, seed, preprocessing and the generator's declared version (if any).

    The generator's source fingerprint is stored in ``done.json``; a cache made by other generator source
    is still reused (generation is the expensive part) but with a warning — delete it to regenerate."""
    ver = generator_version() if version is None else version
    h = hashlib.sha256(json.dumps([n, seed, params.to_dict(), str(ver)], sort_keys=True).encode()).hexdigest()
    return f"n{n}-s{seed}-{h[:12]}"


def open_cache(root: Path) -> Cache | None:
    root = Path(root)
    done = root / "done.json"
    if not done.is_file():
        return None
    info = json.loads(done.read_text())
    x = np.memmap(root / "x.f16", dtype=np.float16, mode="r", shape=tuple(info["x_shape"]))
    return Cache(root, x, np.load(root / "y.npy"), np.load(root / "pos.npy"), json.loads((root / "meta.json").read_text()))


def build_cache(root: Path, n: int, seed: int, params: PreprocessParams, workers: int = 2, progress: bool = True, desc: str = "synth") -> Cache:
    """Generate ``n`` slices (or reuse a complete cache at ``root``)."""
    from tqdm import tqdm

    root = Path(root)
    got = open_cache(root)
    if got is not None and len(got) == n:
        fp = json.loads((root / "done.json").read_text()).get("generator", "")
        if fp and fp != generator_fingerprint():
            log.warning("cache %s was made by another version of the generator; delete it to regenerate", root)
        log.info("reusing cache %s (%d slices)", root, n)
        return got
    _sampler()  # fail early with a clear message
    root.mkdir(parents=True, exist_ok=True)
    (root / "done.json").unlink(missing_ok=True)
    shape = (n, params.channels, params.size, params.size)
    x = np.memmap(root / "x.f16", dtype=np.float16, mode="w+", shape=shape)
    y = np.zeros((n, len(ARTIFACTS)), np.float32)
    pos = np.full(n, np.nan, np.float32)
    metas: list = [None] * n
    nchunks = (n + CHUNK - 1) // CHUNK
    jobs = [(i, min(CHUNK, n - i * CHUNK), chunk_seed(seed, i), params.to_dict()) for i in range(nchunks)]
    bar = tqdm(total=n, desc=desc, unit="slice", file=sys.stderr, disable=not progress, dynamic_ncols=True)

    from medqc.models.slice_input import prepare

    def put(res):
        i, xs, ys, ps, ms = res
        a = i * CHUNK
        if len(ys) != min(CHUNK, n - a):
            raise MedqcError(f"generator returned {len(ys)} slices for a chunk of {min(CHUNK, n - a)}")
        x[a : a + len(ys)] = prepare(xs, params, np.float16)
        y[a : a + len(ys)] = ys
        pos[a : a + len(ys)] = ps
        metas[a : a + len(ys)] = ms
        bar.update(len(ys))

    try:
        if workers <= 1:
            for j in jobs:
                put(make_chunk(j))
        else:
            import multiprocessing as mp

            # never a plain fork: the parent has run torch (the preprocessing of earlier chunks and caches),
            # and a worker forked from a process whose OpenMP pool is up can hang (it did in the tests)
            ctx = mp.get_context("spawn" if sys.platform == "darwin" else "forkserver")
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for res in pool.imap_unordered(make_chunk, jobs):
                    put(res)
    finally:
        bar.close()
    x.flush()
    np.save(root / "y.npy", y)
    np.save(root / "pos.npy", pos)
    (root / "meta.json").write_text(json.dumps(metas))
    (root / "done.json").write_text(json.dumps({"n": n, "seed": seed, "x_shape": list(shape), "preprocess": params.to_dict(),
                                              "generator": generator_fingerprint()}))
    del x
    return open_cache(root)


def _worker_init():
    try:  # keep generator workers from oversubscribing the cores
        os.nice(5)
    except OSError:
        pass
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:
        pass



def real_negatives(folders, params: PreprocessParams) -> tuple[np.ndarray, list[str]]:
    """Axial CT images under ``folders`` (real, artifact-free scans), preprocessed: ((N, C, S, S) float16,
    one description per series)."""
    from medqc.models.realct import read_series
    from medqc.models.slice_input import prepare

    xs, names = [], []
    for folder in folders:
        for uid, items in read_series(Path(folder)).items():
            xs.extend(prepare([(hu, ps, iop) for _, hu, ps, iop in items], params, np.float16))
            names.append(f"{Path(folder).name} series …{uid[-12:]} ({len(items)} slices)")
    if not xs:
        raise MedqcError(f"no axial CT images found under {', '.join(str(f) for f in folders)}")
    return np.stack(xs), names


def real_injected(folders, params: PreprocessParams) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Real CT with artifacts injected (``medqc synth --inject`` output: every folder under ``folders`` that
    holds a ``truth.json`` written by the injector), preprocessed: ((N, C, S, S) float16, (N, K) the
    injector's per-slice severities in ``ARTIFACTS`` order, one description per source series)."""
    import pydicom

    from medqc.models.realct import slice_input
    from medqc.models.slice_input import prepare

    xs, ys, per_series = [], [], {}
    for folder in folders:
        for truth in sorted(Path(folder).rglob("truth.json")):
            t = json.loads(truth.read_text())
            if t.get("source") != "inject":
                continue
            items = []
            for s in t.get("slices") or []:
                items.append(slice_input(pydicom.dcmread(str(truth.parent / s["file"]))))
                ys.append([float((s.get("artifacts") or {}).get(a, 0.0)) for a in ARTIFACTS])
            xs.extend(prepare(items, params, np.float16))
            key = str(t.get("source_series_instance_uid", ""))[-12:]
            per_series[key] = per_series.get(key, 0) + len(items)
    if not xs:
        raise MedqcError(f"no injected real CT (truth.json from medqc synth --inject) under {', '.join(str(f) for f in folders)}")
    names = [f"series …{k} ({n} injected slices)" for k, n in sorted(per_series.items())]
    return np.stack(xs), np.asarray(ys, np.float32), names
