"""Compare two runners on the same batch (after Polygraphy's Comparator): per-output tolerances **and** task
metrics — artifact decisions (probability >= the bundle's threshold, per label) must agree on at least
``min_agreement`` of all slice × label decisions, and the position output (reference mm below the vertex)
may move by at most ``max_position_mm``. A raw atol/rtol pass alone is not enough: FP16 can keep logits
"close" while flipping decisions that sit near a threshold; and a task-metric pass alone hides drift.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from medqc.errors import MedqcError


class ExportError(MedqcError):
    """Export failed for a reason the user can act on (exit 1)."""


class ParityError(ExportError):
    """A parity gate failed; ``.report`` holds the full comparison."""

    def __init__(self, report: "ParityReport"):
        self.report = report
        super().__init__(f"parity gate failed: {report.name}\n{report.text()}")


class ShapeError(ExportError):
    """Two runners returned outputs of different shapes or names."""


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def check(self, ref: np.ndarray, test: np.ndarray) -> np.ndarray:
        """Elementwise pass mask, numpy.isclose semantics: |test - ref| <= atol + rtol * |ref|."""
        return np.abs(test - ref) <= self.atol + self.rtol * np.abs(ref)


@dataclass
class OutputReport:
    name: str
    shape: list
    atol: float
    rtol: float
    max_abs: float
    mean_abs: float
    max_rel: float
    fail_fraction: float
    passed: bool


@dataclass
class ParityReport:
    name: str
    reference: str
    candidate: str
    n: int
    outputs: list = field(default_factory=list)
    decision_agreement: float = 1.0
    decision_flips: list = field(default_factory=list)  # [(slice index, label)] that disagree, first 20
    borderline: int = 0  # decisions whose reference logit sits within decision_margin of the threshold
    decision_margin: float = 1e-4
    min_agreement: float = 0.995
    position_max_delta_mm: float = 0.0
    max_position_mm: float = 1.0
    passed: bool = False
    failures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decision_flips"] = [list(x) for x in self.decision_flips]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def text(self) -> str:
        lines = [f"{self.name}: {self.candidate} vs {self.reference} on {self.n} synthetic CT slices -> {'PASS' if self.passed else 'FAIL'}"]
        for o in self.outputs:
            lines.append(
                f"  {o.name:16s} max|d|={o.max_abs:.3g} mean|d|={o.mean_abs:.3g} max rel={o.max_rel:.3g} "
                f"(atol {o.atol:g}, rtol {o.rtol:g}; {100 * o.fail_fraction:.2f}% outside) {'ok' if o.passed else 'FAIL'}"
            )
        lines.append(
            f"  decisions agree  {100 * self.decision_agreement:.2f}% (need >= {100 * self.min_agreement:.2f}%)"
            + (f"; flips: {self.decision_flips[:5]}" if self.decision_flips else "")
            + (f"; {self.borderline} borderline decision(s) within {self.decision_margin:g} logit of the threshold not counted" if self.borderline else "")
        )
        lines.append(f"  position delta   {self.position_max_delta_mm:.3f} mm (need <= {self.max_position_mm:g} mm)")
        for f in self.failures:
            lines.append(f"  FAILED: {f}")
        return "\n".join(lines)

    __str__ = text


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x.astype(np.float64), -60, 60)))


def compare_outputs(
    ref: dict,
    test: dict,
    *,
    tolerances: dict,
    labels: tuple,
    thresholds: dict,
    name: str = "parity",
    reference: str = "reference",
    candidate: str = "candidate",
    min_agreement: float = 0.995,
    max_position_mm: float = 1.0,
    decision_margin: float = 1e-4,
) -> ParityReport:
    """Compare two output dicts ({"artifact_logits": (N, K), "position": (N, 1)}) and return the report.

    Decision agreement counts every slice × label whose reference logit is further than
    ``decision_margin`` from the threshold's logit; closer than that, a flip is float rounding that any two
    FP32 implementations show (untrained heads put every logit there) — those are reported, not counted."""
    if set(ref) != set(test):
        raise ShapeError(f"{name}: outputs differ: {sorted(ref)} vs {sorted(test)}")
    n = int(next(iter(ref.values())).shape[0])
    rep = ParityReport(name=name, reference=reference, candidate=candidate, n=n, min_agreement=min_agreement, max_position_mm=max_position_mm)
    for key in sorted(ref):
        a = np.asarray(ref[key], np.float64)
        b = np.asarray(test[key], np.float64)
        if a.shape != b.shape:
            raise ShapeError(f"{name}: output {key!r} has shape {b.shape} from {candidate}, {a.shape} from {reference}")
        tol = tolerances.get(key)
        if tol is None:
            raise ExportError(f"{name}: no tolerance for output {key!r} (have {sorted(tolerances)})")
        finite = np.isfinite(b).all()
        d = np.abs(a - b)
        ok = tol.check(a, b) & np.isfinite(b)
        o = OutputReport(
            name=key,
            shape=list(a.shape),
            atol=tol.atol,
            rtol=tol.rtol,
            max_abs=float(d.max()) if d.size else 0.0,
            mean_abs=float(d.mean()) if d.size else 0.0,
            max_rel=float((d / np.maximum(np.abs(a), 1e-12)).max()) if d.size else 0.0,
            fail_fraction=float(1.0 - ok.mean()) if ok.size else 0.0,
            passed=bool(ok.all()) and bool(finite),
        )
        rep.outputs.append(o)
        if not finite:
            rep.failures.append(f"{key}: {candidate} produced NaN/Inf")
        elif not o.passed:
            rep.failures.append(f"{key}: {100 * o.fail_fraction:.2f}% of values outside atol {tol.atol:g} + rtol {tol.rtol:g} (max |d| {o.max_abs:.3g})")
    if "artifact_logits" in ref:
        thr = np.array([float(thresholds.get(lab, 0.5)) for lab in labels], np.float64)
        thr_logit = np.log(np.clip(thr, 1e-12, 1 - 1e-12) / np.clip(1 - thr, 1e-12, 1.0))
        la = np.asarray(ref["artifact_logits"], np.float64)
        da = _sigmoid(la) >= thr
        db = _sigmoid(np.asarray(test["artifact_logits"])) >= thr
        counted = np.abs(la - thr_logit) > decision_margin
        agree = (da == db) | ~counted
        rep.decision_margin = decision_margin
        rep.borderline = int((~counted).sum())
        rep.decision_agreement = float(agree[counted].mean()) if counted.any() else 1.0
        rep.decision_flips = [(int(i), labels[int(j)]) for i, j in zip(*np.nonzero(~agree))][:20]
        if rep.decision_agreement < min_agreement:
            rep.failures.append(f"artifact decisions agree on {100 * rep.decision_agreement:.2f}% < {100 * min_agreement:.2f}%")
    if "position" in ref:
        pd = np.abs(np.asarray(ref["position"], np.float64) - np.asarray(test["position"], np.float64))
        rep.position_max_delta_mm = float(np.nan_to_num(pd, nan=np.inf).max()) if pd.size else 0.0
        if rep.position_max_delta_mm > max_position_mm:
            rep.failures.append(f"position moved {rep.position_max_delta_mm:.3f} mm > {max_position_mm:g} mm")
    rep.passed = not rep.failures
    return rep


def infer_batched(runner, batch, chunk: int) -> dict:
    """Outputs for ``batch``, a list of feed groups (the model's inputs by name, one geometry each:
    ``medqc.export.validation.validation_batch``), at most ``chunk`` slices a call, concatenated in order."""
    fn = runner.infer if hasattr(runner, "infer") else runner
    parts = []
    for feeds in batch:
        hu = feeds["hu"]
        parts.extend(fn({**feeds, "hu": hu[i : i + chunk]}) for i in range(0, len(hu), chunk))
    return {k: np.concatenate([np.asarray(p[k], np.float32) for p in parts]) for k in parts[0]}


def batch_size(batch) -> int:
    """Slices in a list of feed groups."""
    return int(sum(len(feeds["hu"]) for feeds in batch))


class Comparator:
    """Run a reference and a candidate on the same batch and compare them.

    Runners are anything with ``infer(batch) -> dict`` (``medqc.runners.Runner``) or a plain callable."""

    def __init__(self, tolerances: dict, labels: tuple, thresholds: dict, min_agreement: float = 0.995, max_position_mm: float = 1.0, chunk: int = 16):
        self.tolerances = tolerances
        self.labels = tuple(labels)
        self.thresholds = dict(thresholds)
        self.min_agreement = min_agreement
        self.max_position_mm = max_position_mm
        self.chunk = chunk

    def compare(self, reference, candidate, batch: np.ndarray, *, name: str, reference_name: str = "", candidate_name: str = "", ref_outputs: dict | None = None) -> ParityReport:
        ref = ref_outputs if ref_outputs is not None else infer_batched(reference, batch, self.chunk)
        test = infer_batched(candidate, batch, self.chunk)
        return compare_outputs(
            ref,
            test,
            tolerances=self.tolerances,
            labels=self.labels,
            thresholds=self.thresholds,
            name=name,
            reference=reference_name or getattr(reference, "name", "reference"),
            candidate=candidate_name or getattr(candidate, "name", "candidate"),
            min_agreement=self.min_agreement,
            max_position_mm=self.max_position_mm,
        )

    def gate(self, *args, **kw) -> ParityReport:
        """``compare`` and raise :class:`ParityError` when it fails."""
        rep = self.compare(*args, **kw)
        if not rep.passed:
            raise ParityError(rep)
        return rep
