"""The runner interface (after Polygraphy's BaseRunner): the base checks inputs and times calls; each
backend implements ``_infer_impl``.

A runner takes the exported model's inputs by name (``medqc.analysis.preprocess.INPUT_NAMES``): ``hu``
(N, H, W) float32, slices of one geometry, and that geometry's arrays
(``medqc.analysis.preprocess.Geometry.feeds``); the model preprocesses them itself."""

from __future__ import annotations

import time

import numpy as np

from medqc.analysis.preprocess import GEOMETRY_INPUTS, INPUT_NAMES


class RunnerError(Exception):
    """A user-facing inference error (bad backend name, bad input)."""


class BackendUnavailable(RunnerError):
    """The backend cannot run here; the message names what to install or change."""


class Runner:
    name = "base"
    outputs = ("artifact_logits", "position")

    @classmethod
    def is_available(cls, bundle=None) -> tuple[bool, str]:
        raise NotImplementedError

    def __init__(self, bundle, **opts):
        self.bundle = bundle
        require_slice_inputs(bundle)
        self.size = bundle.preprocess.size
        self.last_ms = 0.0
        self.calls = 0

    def check_feeds(self, feeds: dict) -> dict[str, np.ndarray]:
        """The inputs as contiguous arrays of the graph's types; RunnerError when one is missing or misshapen."""
        missing = [k for k in INPUT_NAMES if k not in feeds]
        if missing:
            raise RunnerError(f"{self.name}: missing input(s) {missing}; the model takes {list(INPUT_NAMES)}")
        hu = np.ascontiguousarray(feeds["hu"], dtype=np.float32)
        if hu.ndim != 3:
            raise RunnerError(f"{self.name}: hu has shape {hu.shape}, expected (N, rows, cols)")
        out = {"hu": hu}
        s = self.size
        for k in GEOMETRY_INPUTS:
            a = np.ascontiguousarray(feeds[k], dtype=np.int64 if k.endswith("_index") else np.float32)
            want = 1 if k.endswith("_valid") else 2
            if a.ndim != want or a.shape[0] != s:
                raise RunnerError(f"{self.name}: {k} has shape {a.shape}, expected ({s}{', K' if want == 2 else ''})")
            out[k] = a
        for axis, n in (("row", hu.shape[1]), ("col", hu.shape[2])):
            if out[f"{axis}_index"].shape != out[f"{axis}_weight"].shape:
                raise RunnerError(f"{self.name}: {axis}_index {out[f'{axis}_index'].shape} and {axis}_weight "
                                  f"{out[f'{axis}_weight'].shape} differ")
            if out[f"{axis}_index"].size and (out[f"{axis}_index"].min() < 0 or out[f"{axis}_index"].max() >= n):
                raise RunnerError(f"{self.name}: {axis}_index reads outside the slice's {n} {axis}s")
        return out

    def infer(self, feeds: dict) -> dict[str, np.ndarray]:
        """feeds: ``hu`` (N, H, W) float32 + the geometry arrays → {"artifact_logits": (N, K) float32,
        "position": (N, 1) float32}."""
        feeds = self.check_feeds(feeds)
        if feeds["hu"].shape[0] == 0:
            return {"artifact_logits": np.zeros((0, len(self.bundle.labels)), np.float32), "position": np.zeros((0, 1), np.float32)}
        t0 = time.perf_counter()
        out = self._infer_impl(feeds)
        self.last_ms = (time.perf_counter() - t0) * 1e3
        self.calls += 1
        return {k: np.asarray(out[k], dtype=np.float32) for k in self.outputs}

    def _infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        return {"backend": self.name}


def require_slice_inputs(bundle) -> None:
    """A bundle whose model takes preprocessed images (``inputs.image``: written by medqc before the
    preprocessing moved into the graph) cannot run here: BackendUnavailable saying how to re-export it."""
    inputs = dict(bundle.manifest.get("inputs") or {})
    if "hu" not in inputs:
        raise BackendUnavailable(
            f"bundle {bundle.root} holds a model that takes preprocessed images (inputs {sorted(inputs)}); this medqc "
            "runs the preprocessing inside the model (inputs hu + geometry): re-export it from its checkpoint with "
            "'medqc export onnx --checkpoint BUNDLE/checkpoint.pt --out NEW_BUNDLE'")


def infer_slices(runner, slices, params, chunk: int = 16) -> dict[str, np.ndarray]:
    """Run ``slices`` ([(hu (H, W), pixel_spacing, orientation or None)]) through ``runner``, one call per
    geometry and at most ``chunk`` slices a call; the outputs in the slices' order."""
    from medqc.analysis.preprocess import group_by_geometry

    slices = list(slices)
    out: dict[str, np.ndarray] = {}
    for geom, idx in group_by_geometry([(np.shape(hu), ps, ori) for hu, ps, ori in slices], params):
        for a in range(0, len(idx), chunk):
            part = idx[a:a + chunk]
            o = runner.infer(geom.feeds(np.stack([np.asarray(slices[k][0], np.float32) for k in part])))
            for name, v in o.items():
                if name not in out:
                    out[name] = np.zeros((len(slices), *np.shape(v)[1:]), np.float32)
                out[name][part] = v
    return out
