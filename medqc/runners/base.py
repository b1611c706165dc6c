"""The runner interface (after Polygraphy's BaseRunner): the base checks inputs and times calls; each
backend implements ``_infer_impl``."""

from __future__ import annotations

import time

import numpy as np


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
        pp = bundle.preprocess
        self.input_shape = (pp.channels, pp.size, pp.size)
        self.last_ms = 0.0
        self.calls = 0

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """batch: (N, C, S, S) float32 → {"artifact_logits": (N, K) float32, "position": (N, 1) float32}."""
        if batch.ndim != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise RunnerError(f"{self.name}: input shape {batch.shape}, expected (N, {', '.join(map(str, self.input_shape))})")
        if batch.shape[0] == 0:
            return {"artifact_logits": np.zeros((0, len(self.bundle.labels)), np.float32), "position": np.zeros((0, 1), np.float32)}
        t0 = time.perf_counter()
        out = self._infer_impl(np.ascontiguousarray(batch, dtype=np.float32))
        self.last_ms = (time.perf_counter() - t0) * 1e3
        self.calls += 1
        return {k: np.asarray(out[k], dtype=np.float32) for k in self.outputs}

    def _infer_impl(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict:
        return {"backend": self.name}
