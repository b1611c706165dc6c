"""Validation batches for the parity gates: synthetic CT slices as the model takes them (HU and geometry).

Parity measured on random noise says little about a CT model: noise drives every activation to the same
regime. The gates use CT-like slices instead — from ``medqc.synth.training`` when that module is present
(the physics-based generator the models train on), else from the small phantom below: a body ellipse with
fat, muscle, organs, bone and lungs or a skull, on the vendors' padding value outside a circular field of
view, with the artifacts the network must tell apart (metal streaks, rings, noise, truncation, motion
ghosting) mixed in. Deterministic for a given seed.

The slices are given the orientations a scanner writes (every fourth stored mirrored left-right and upside
down, every fourth of the rest upside down only), so the gates run the preprocessing's flips too; their
matrices, pixel spacings and padding come from the generator (256-1024 matrices, 0.4-2 mm pixels, vendor
padding values outside the field).
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from medqc.analysis.preprocess import PreprocessParams, group_by_geometry

ORIENTATIONS = ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                (1.0, 0.0, 0.0, 0.0, -1.0, 0.0))

log = logging.getLogger(__name__)


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    u, v = x * c + y * s, -x * s + y * c
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def phantom_slice(rng: np.random.Generator, matrix: int = 512, fov_mm: float = 400.0) -> tuple[np.ndarray, tuple[float, float]]:
    """One CT-like axial slice in HU (matrix², int16 range) and its pixel spacing (mm)."""
    n = matrix
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    c = n / 2.0
    img = np.full((n, n), -1000.0, np.float32)
    region = rng.choice(["head", "chest", "abdomen"])
    if region == "head":
        ry, rx = n * rng.uniform(0.26, 0.32), n * rng.uniform(0.21, 0.26)
        img[_ellipse(yy, xx, c, c, ry, rx)] = 900.0 + rng.normal(0, 60)  # skull
        img[_ellipse(yy, xx, c, c, ry * 0.9, rx * 0.88)] = 35.0  # brain
        img[_ellipse(yy, xx, c, c - rx * 0.05, ry * 0.15, rx * 0.08)] = 8.0  # ventricle
    else:
        ry, rx = n * rng.uniform(0.22, 0.3), n * rng.uniform(0.33, 0.44)
        img[_ellipse(yy, xx, c, c, ry, rx)] = -100.0  # subcutaneous fat
        img[_ellipse(yy, xx, c, c, ry * 0.9, rx * 0.92)] = 50.0  # muscle / organs
        if region == "chest":
            for side in (-1, 1):
                img[_ellipse(yy, xx, c - ry * 0.05, c + side * rx * 0.45, ry * 0.7, rx * 0.33)] = -850.0
            img[_ellipse(yy, xx, c, c - rx * 0.1, ry * 0.3, rx * 0.2)] = 40.0  # heart
        else:
            img[_ellipse(yy, xx, c - ry * 0.2, c - rx * 0.35, ry * 0.45, rx * 0.35)] = 60.0  # liver
            img[_ellipse(yy, xx, c, c + rx * 0.25, ry * 0.15, rx * 0.12)] = -400.0  # bowel gas
        img[_ellipse(yy, xx, c + ry * 0.65, c, ry * 0.14, rx * 0.1)] = 700.0  # vertebra
    truth = []
    kind = rng.choice(["clean", "metal", "ring", "noise", "truncation", "motion"], p=[0.3, 0.14, 0.14, 0.14, 0.14, 0.14])
    if kind == "metal":
        my, mx = c + rng.uniform(-0.1, 0.1) * n, c + rng.uniform(-0.15, 0.15) * n
        img[_ellipse(yy, xx, my, mx, n * 0.012, n * 0.012)] = 3071.0
        ang = np.arctan2(yy - my, xx - mx)
        streak = 400.0 * np.cos(8 * ang) * np.exp(-np.hypot(yy - my, xx - mx) / (0.25 * n))
        img += np.where(img > -900, streak, 0).astype(np.float32)
    elif kind == "ring":
        r = np.hypot(yy - c, xx - c)
        for r0 in rng.uniform(0.03, 0.3, 4) * n:
            img += np.where(np.abs(r - r0) < 1.2, rng.choice([-80.0, 80.0]), 0.0).astype(np.float32)
    elif kind == "motion":
        shift = int(rng.integers(4, 12))
        img = 0.6 * img + 0.4 * np.roll(img, shift, axis=int(rng.integers(0, 2)))
    sigma = rng.uniform(60, 120) if kind == "noise" else rng.uniform(5, 20)
    img += rng.normal(0, sigma, img.shape).astype(np.float32)
    # circular reconstruction field; truncation puts body outside it
    r_fov = n / 2.0 * (rng.uniform(0.6, 0.75) if kind == "truncation" else 1.0)
    img[np.hypot(yy - c, xx - c) > r_fov] = float(rng.choice([-2048.0, -3024.0, -1024.0]))
    img = np.clip(np.round(img), -3024, 3071).astype(np.float32)
    px = fov_mm / n
    return img, (px, px)


def _synth_slices(n: int, seed: int):
    """Slices from the synthetic-CT generator the models train on, or None when it is not installed."""
    try:
        from medqc.synth.training import sample_training_slices
    except ImportError:
        return None
    out = []
    for item in sample_training_slices(n, seed):
        hu, spacing = _hu_and_spacing(item)
        out.append((hu, spacing))
    return out


def _hu_and_spacing(item):
    if isinstance(item, dict):
        hu = item.get("hu", item.get("image"))
        spacing = item.get("pixel_spacing", item.get("spacing"))
    elif isinstance(item, (tuple, list)):
        hu, spacing = item[0], item[1]
    else:  # a record with attributes
        hu = getattr(item, "hu", None)
        if hu is None:
            hu = getattr(item, "image")
        spacing = getattr(item, "pixel_spacing", None) or getattr(item, "spacing")
    spacing = tuple(float(s) for s in np.atleast_1d(spacing))[:2]
    if len(spacing) == 1:
        spacing = (spacing[0], spacing[0])
    return np.asarray(hu, np.float32), spacing


def validation_batch(params: PreprocessParams, n: int = 48, seed: int = 1234, source: str = "auto") -> tuple[list[dict], str]:
    """``(feed groups, source name)``: ``n`` synthetic CT slices as the model's inputs, one dict per geometry
    (``hu`` (k, H, W) and the geometry arrays, ``medqc.analysis.preprocess.Geometry.feeds``), in slice order
    within each group. ``medqc.export.compare.infer_batched`` runs a runner over them.

    ``source``: "auto" (the training generator when present, else the phantom), "synth" or "phantom".
    The same arguments give the same batch; recent batches are kept (the gates of one export share one)."""
    if source not in ("auto", "synth", "phantom"):
        raise ValueError(f"unknown validation source {source!r}; choose auto, synth or phantom")
    groups, used = _cached_batch(params, int(n), int(seed), source)
    return [{k: v.copy() for k, v in g.items()} for g in groups], used


def validation_slices(params: PreprocessParams, n: int = 48, seed: int = 1234, source: str = "auto") -> tuple[list, str]:
    """``([(hu, pixel_spacing, orientation)], source name)``: the slices :func:`validation_batch` holds."""
    if source not in ("auto", "synth", "phantom"):
        raise ValueError(f"unknown validation source {source!r}; choose auto, synth or phantom")
    slices = None
    used = "phantom"
    if source in ("auto", "synth"):
        try:
            slices = _synth_slices(n, seed)
        except Exception as e:  # the generator is someone else's code: report, then use the phantom
            if source == "synth":
                raise
            log.warning("synthetic CT generator failed (%s: %s); using the built-in phantom", type(e).__name__, e)
            slices = None
        if slices is None and source == "synth":
            raise ImportError("medqc.synth.training is not available")
        if slices is not None:
            used = "medqc.synth.training"
    if slices is None:
        rng = np.random.default_rng(seed)
        slices = [phantom_slice(rng, matrix=int(rng.choice([256, 512])), fov_mm=float(rng.uniform(250, 480))) for _ in range(n)]
    return [(hu, sp, ORIENTATIONS[i % len(ORIENTATIONS)]) for i, (hu, sp) in enumerate(slices)], used


@functools.lru_cache(maxsize=4)
def _cached_batch(params: PreprocessParams, n: int, seed: int, source: str) -> tuple[list[dict], str]:
    slices, used = validation_slices(params, n, seed, source)
    groups = []
    for geom, idx in group_by_geometry([(hu.shape, sp, ori) for hu, sp, ori in slices], params):
        groups.append(geom.feeds(np.stack([slices[k][0] for k in idx]).astype(np.float32)))
    return groups, used
