"""Per-model export specs, registered by model name (after optimum's OnnxConfig): input/output names,
dynamic axes, a sample-input generator and per-output tolerances for each precision.

Every model in ``medqc.models.model_names()`` must have a spec here; ``tests/test_export.py`` fails when a
registered model has no spec or no export test. Models that keep the standard interface
(``forward(image) -> (artifact_logits (N, K), position (N, 1))``) register with :func:`register` and the
defaults; a model with different needs overrides the fields. The exported graph is the preprocessing
(``medqc.models.slice_input.SliceModel``) followed by the network: its inputs are the HU slices and their
geometry (``medqc.analysis.preprocess.INPUT_NAMES``), with dynamic batch, rows, columns and tap counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from medqc.export.compare import ExportError, Tolerance
from medqc.analysis.preprocess import INPUT_NAMES, PreprocessParams

# Position is in reference mm below the vertex (0 … ~1800): tolerances are absolute mm plus a relative part.
FP32_TOL = {"artifact_logits": Tolerance(atol=1e-3, rtol=1e-3), "position": Tolerance(atol=0.05, rtol=1e-4)}
FP16_TOL = {"artifact_logits": Tolerance(atol=5e-2, rtol=2e-2), "position": Tolerance(atol=1.0, rtol=2e-3)}
# largest position move (mm) a precision may cause; see ExportSpec.fp16_max_position_mm for FP16's 2 mm
MAX_POSITION_MM = {"fp32": 1.0, "fp16": 2.0, "int8": 5.0}
INT8_TOL = {"artifact_logits": Tolerance(atol=0.5, rtol=0.1), "position": Tolerance(atol=10.0, rtol=0.02)}


def ct_sample_input(params: PreprocessParams, batch: int = 2, seed: int = 0) -> dict:
    """Tracing input: ``batch`` CT-like phantom slices (not noise) of one geometry, as the graph takes them,
    so every branch sees real ranges."""
    from medqc.analysis.preprocess import geometry
    from medqc.export.validation import phantom_slice

    rng = np.random.default_rng(seed)
    hu = np.stack([phantom_slice(rng, matrix=384, fov_mm=400.0)[0] for _ in range(batch)])
    return geometry(384, 384, (400.0 / 384, 400.0 / 384), params).feeds(hu)


def _dynamic_axes() -> dict:
    axes = {"hu": {0: "batch", 1: "rows", 2: "cols"}, "row_index": {1: "row_taps"}, "row_weight": {1: "row_taps"},
            "col_index": {1: "col_taps"}, "col_weight": {1: "col_taps"}}
    axes.update({"artifact_logits": {0: "batch"}, "position": {0: "batch"}})
    return axes


@dataclass(frozen=True)
class ExportSpec:
    model: str
    input_names: tuple = INPUT_NAMES
    output_names: tuple = ("artifact_logits", "position")
    dynamic_axes: dict = field(default_factory=_dynamic_axes)
    sample_input: object = ct_sample_input
    opset: int = 17
    tolerances: dict = field(default_factory=lambda: {"fp32": FP32_TOL, "fp16": FP16_TOL, "int8": INT8_TOL})
    min_agreement: float = 0.995
    max_position_mm: float = MAX_POSITION_MM["fp32"]
    # FP16 holds 1024..2048 with a spacing of 1 mm, so an FP16 graph cannot reproduce a position of
    # ~1500 mm (mid-pelvis) to better than +-0.5 mm from rounding alone; FP16 gets 2 mm (the network's own
    # error is ~15 mm). FP32 runtimes keep the 1 mm gate.
    fp16_max_position_mm: float = MAX_POSITION_MM["fp16"]
    # INT8 is a lossy quantisation: decisions and position are gated, the raw logits more loosely.
    int8_max_position_mm: float = MAX_POSITION_MM["int8"]

    def max_position(self, precision: str) -> float:
        return {"fp16": self.fp16_max_position_mm, "int8": self.int8_max_position_mm}.get(precision, self.max_position_mm)

    def tol(self, precision: str) -> dict:
        if precision not in self.tolerances:
            raise ExportError(f"spec {self.model!r} has no tolerances for {precision!r} (has {sorted(self.tolerances)})")
        return self.tolerances[precision]


SPECS: dict[str, ExportSpec] = {}


def register(name: str, **overrides) -> ExportSpec:
    spec = replace(ExportSpec(model=name), **overrides)
    SPECS[name] = spec
    return spec


def registered() -> tuple[str, ...]:
    return tuple(sorted(SPECS))


def get_spec(name: str) -> ExportSpec:
    if name not in SPECS:
        raise ExportError(
            f"model {name!r} has no export spec (registered: {', '.join(registered()) or 'none'}); "
            "add one to medqc/export/specs.py with its export test"
        )
    return SPECS[name]


# The networks in medqc.models, all with the standard interface and the default tolerances. A model added
# there needs a line here and a case in tests/test_export.py (the registry test fails otherwise).
register("qcnet")
register("qcnet-small")
