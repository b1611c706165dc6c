"""Inference stage: slice geometry → runner (the model preprocesses the HU slices itself) → sigmoid →
fusion with the classical detectors. One ``SliceResult`` per input slice; a slice that fails (bad pixels,
a geometry that cannot be resampled) gets its own error record and never fails the batch; a runner failure
on a batch is retried slice by slice.

Slices of different matrices cannot share one tensor: a batch is split by geometry (rows, columns, pixel
spacing, orientation flips) into one runner call per geometry — a series has one, so its slices stay
together. The host computes only each geometry's resampling arrays (``medqc.analysis.preprocess``, cached);
the pixel work runs in the model, in ONNX Runtime's threads or on the GPU.

The classical detectors of a batch are queued first, on one helper thread, and run while the pipeline
thread runs the network: they are OpenCV/numpy work that mostly releases the GIL, so on two cores they
overlap instead of adding up (results and their order are unchanged).
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from medqc.analysis import fusion
from medqc.analysis.measures import measure
from medqc.agent.records import SliceInfo, SliceResult
from medqc.analysis.preprocess import geometry, geometry_key

log = logging.getLogger("medqc.agent.infer")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


class Inferer:
    """Wraps one runner (``medqc.runners.make_runner``) for the agent. ``runner=None`` → classical only."""

    def __init__(self, bundle, backend: str = "auto", threads: int = 0, runner=None, classical: bool = True, rebuild_engine: bool = False):
        self.bundle = bundle
        self.params = bundle.preprocess if bundle is not None else None
        self.labels = tuple(bundle.labels) if bundle is not None else ()
        # classes the bundle ships switched off in the network: their scores are not used (classical only)
        self.network_off = frozenset(bundle.network_off) if bundle is not None else frozenset()
        # slices thicker than the network's domain: its artifact scores are not used (position is)
        self.max_thickness = bundle.max_slice_thickness_mm if bundle is not None else math.inf
        self.classical = classical
        self._detectors = ThreadPoolExecutor(1, thread_name_prefix="detectors") if classical else None
        if runner is None and bundle is not None and backend != "none":
            from medqc.runners import make_runner

            opts = {}
            if rebuild_engine:  # a TensorRT engine built for another GPU/TensorRT is rebuilt instead of skipped
                opts["rebuild"] = True
            if threads:
                opts["threads"] = threads
            try:
                runner = make_runner(backend, bundle, **opts)
            except TypeError:  # a backend without a threads option
                runner = make_runner(backend, bundle)
        self.runner = runner
        self.backend = getattr(runner, "name", "none") if runner is not None else "none"

    def describe(self) -> dict:
        d = {"backend": self.backend}
        if self.bundle is not None:
            d.update(model=self.bundle.name, model_version=self.bundle.version)
        return d

    def _measure(self, hu, info) -> dict:
        if not self.classical:
            return {}
        try:
            return measure(hu, info)
        except Exception as e:  # noqa: BLE001 - evidence is optional; the network result still stands
            log.warning("classical detectors failed on %s: %s", info.sop_instance_uid, e)
            return {}

    def run(self, items: list) -> list[SliceResult]:
        """items: [(SliceInfo, hu float32)] → [SliceResult] in the same order."""
        results: list[SliceResult | None] = [None] * len(items)
        idx, measured = [], {}
        if self._detectors is not None:  # queued first: they run while the slices are preprocessed and inferred
            for k, (info, hu) in enumerate(items):
                measured[k] = self._detectors.submit(self._measure, hu, info)
        groups: dict[tuple, tuple] = {}  # geometry key → (Geometry, [item index])
        for k, (info, hu) in enumerate(items):
            if self.runner is None:
                idx.append(k)
                continue
            try:
                if np.ndim(hu) != 2:
                    raise ValueError(f"expected a 2-D slice, got shape {np.shape(hu)}")
                key = geometry_key(np.shape(hu), info.pixel_spacing, info.orientation)
                g = groups.get(key)
                if g is None:
                    g = groups[key] = (geometry(*np.shape(hu), info.pixel_spacing, self.params, info.orientation), [])
                g[1].append(k)
                idx.append(k)
            except Exception as e:  # noqa: BLE001
                results[k] = SliceResult(info=info, error=f"preprocessing failed: {e}", analysed_at=time.time())
                if k in measured:
                    measured.pop(k).cancel()
        outs = {}
        for geom, ks in groups.values():
            try:
                o = self.runner.infer(geom.feeds(np.stack([items[k][1] for k in ks])))
                outs.update({k: (o["artifact_logits"][j], o["position"][j]) for j, k in enumerate(ks)})
            except Exception as e:  # noqa: BLE001 - retry one by one so one bad slice cannot fail the batch
                log.warning("batch of %d failed on %s (%s); retrying slice by slice", len(ks), self.backend, e)
                for k in ks:
                    try:
                        o = self.runner.infer(geom.feeds(items[k][1]))
                        outs[k] = (o["artifact_logits"][0], o["position"][0])
                    except Exception as e2:  # noqa: BLE001
                        results[k] = SliceResult(info=items[k][0], error=f"inference failed ({self.backend}): {e2}",
                                                 analysed_at=time.time())
        for k in idx:
            if results[k] is not None:
                continue
            info, hu = items[k]
            net, pos = {}, None
            if k in outs:
                logits, p = outs[k]
                probs = _sigmoid(np.asarray(logits, np.float64))
                t = info.slice_thickness
                if t is not None and math.isfinite(t) and t > self.max_thickness:
                    net = {}
                else:
                    net = {lab: float(probs[i]) for i, lab in enumerate(self.labels) if lab not in self.network_off}
                pv = float(np.asarray(p).reshape(-1)[0])
                pos = pv if math.isfinite(pv) else None
            measures = measured[k].result() if k in measured else self._measure(hu, info)
            try:
                scores = fusion.fuse(net, measures) if self.classical else net
            except Exception as e:  # noqa: BLE001
                log.warning("fusion failed on %s: %s", info.sop_instance_uid, e)
                scores = net
            results[k] = SliceResult(info=info, scores=scores, position_ref_mm=pos, measures=measures,
                                     analysed_at=time.time())
        return results  # type: ignore[return-value]

    def warm_up(self) -> float:
        """Run two synthetic slices (a soft-tissue ellipse in air, 512² at 0.7 mm) through the whole path —
        preprocessing, the runner, the detectors, fusion — and discard the results, so that the first
        patient's first slices do not pay for first-call setup (ONNX Runtime's memory arena and kernels,
        OpenCV and NumPy code paths, lazy imports): in a fresh process the first slice took ~30 ms against
        ~7 ms after, and on a replay into a fresh agent the first series' first dozen slices came 20–80 ms
        late. Returns the seconds it took; never raises (a failure here is logged and left to the real
        slices to report)."""
        t0 = time.perf_counter()
        n, px = 512, 0.7
        yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2.0) * px
        rng = np.random.default_rng(0)
        hu = np.where((xx / 150.0) ** 2 + (yy / 110.0) ** 2 <= 1.0, 40.0, -1000.0) + rng.normal(0.0, 10.0, (n, n))
        hu = hu.astype(np.float32)
        items = []
        for k in range(2):
            info = SliceInfo(f"2.25.{k + 1}", "2.25.9", "2.25.8", "1.2.840.10008.5.1.4.1.1.2", modality="CT", rows=n, cols=n,
                             pixel_spacing=(px, px), orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                             position=(-(n - 1) / 2.0 * px, -(n - 1) / 2.0 * px, -5.0 * k), slice_thickness=5.0)
            items.append((info, hu))
        try:
            self.run(items[:1])
            self.run(items)
        except Exception as e:  # noqa: BLE001 - the real slices will report what is wrong
            log.warning("warm-up failed: %s", e)
        return time.perf_counter() - t0

    def close(self) -> None:
        if self._detectors is not None:
            self._detectors.shutdown(wait=True)
        if self.runner is not None:
            try:
                self.runner.close()
            except Exception:  # noqa: BLE001
                pass
