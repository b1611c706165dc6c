"""Validation metrics for the QC network: AUROC, sensitivity at a fixed specificity, thresholds, position error.

Plain numpy so the same code scores torch outputs in training and ONNX outputs of a shipped bundle.
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks for ties); NaN when a class is absent."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, dtype=np.float64)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ss = s[order]
    i = 0
    while i < len(ss):  # mid-ranks for ties
        j = i
        while j + 1 < len(ss) and ss[j + 1] == ss[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y].sum() - npos * (npos + 1) / 2.0) / (npos * nneg))


def threshold_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float) -> float:
    """Smallest probability threshold whose specificity on negatives is >= ``specificity`` (score > thr fires)."""
    y = np.asarray(y).astype(bool)
    neg = np.sort(np.asarray(p, dtype=np.float64)[~y])
    if len(neg) == 0:
        return 0.5
    k = int(math.ceil(specificity * len(neg))) - 1
    k = min(max(k, 0), len(neg) - 1)
    return float(neg[k])


def sensitivity_at(y: np.ndarray, p: np.ndarray, thr: float) -> float:
    y = np.asarray(y).astype(bool)
    if y.sum() == 0:
        return float("nan")
    return float((np.asarray(p)[y] > thr).mean())


def specificity_at(y: np.ndarray, p: np.ndarray, thr: float) -> float:
    y = np.asarray(y).astype(bool)
    if (~y).sum() == 0:
        return float("nan")
    return float((np.asarray(p)[~y] <= thr).mean())


def artifact_metrics(labels: list[str], y: np.ndarray, logits: np.ndarray, thresholds: dict | None = None, spec: float = 0.95) -> dict:
    """Per class: n_pos, n_neg, AUROC, sensitivity at ``spec`` specificity, and (when ``thresholds`` is given)
    sensitivity/specificity at those thresholds."""
    p = sigmoid(np.asarray(logits, dtype=np.float64))
    out = {}
    for k, name in enumerate(labels):
        ok = np.isfinite(y[:, k])  # NaN labels (faint, ambiguous severities) are not scored
        yk, pk = y[ok, k] > 0.5, p[ok, k]
        thr_spec = threshold_at_specificity(yk, pk, spec)
        d = {
            "n_pos": int(yk.sum()),
            "n_neg": int((~yk).sum()),
            "auroc": auroc(yk, pk),
            f"sens_at_{int(round(spec * 100))}spec": sensitivity_at(yk, pk, thr_spec),
        }
        if thresholds is not None and name in thresholds:
            t = float(thresholds[name])
            d["threshold"] = t
            d["sensitivity"] = sensitivity_at(yk, pk, t)
            d["specificity"] = specificity_at(yk, pk, t)
        out[name] = d
    return out


def choose_thresholds(labels: list[str], y: np.ndarray, logits: np.ndarray, specificity: float) -> dict[str, float]:
    p = sigmoid(np.asarray(logits, dtype=np.float64))
    out = {}
    for k, name in enumerate(labels):
        ok = np.isfinite(y[:, k])
        out[name] = round(threshold_at_specificity(y[ok, k] > 0.5, p[ok, k], specificity), 6)
    return out


def position_metrics(target_mm: np.ndarray, pred_mm: np.ndarray) -> dict:
    """Per-slice craniocaudal error on slices with a finite position label (reference mm)."""
    t = np.asarray(target_mm, dtype=np.float64).reshape(-1)
    q = np.asarray(pred_mm, dtype=np.float64).reshape(-1)
    ok = np.isfinite(t)
    if not ok.any():
        return {"n": 0}
    err = q[ok] - t[ok]
    a = np.abs(err)
    return {
        "n": int(ok.sum()),
        "median_abs_mm": float(np.median(a)),
        "mean_abs_mm": float(a.mean()),
        "p90_abs_mm": float(np.percentile(a, 90)),
        "bias_mm": float(err.mean()),
        "median_error_mm": float(np.median(err)),
    }
