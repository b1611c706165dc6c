"""Training augmentation (models/augment.py): HU recovered from the windowed channels and windowed again
must equal what the shared preprocessing gives for the perturbed slice; labels a perturbation invalidates
are masked."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_module  # noqa: E402

torch = need_module("torch")

from medqc import ARTIFACTS  # noqa: E402
from medqc.models.augment import DomainAugment, to_hu, window  # noqa: E402
from medqc.analysis.preprocess import PreprocessParams  # noqa: E402
from medqc.models.slice_input import prepare  # noqa: E402

PP = PreprocessParams()


def phantom(offset_hu: float = 0.0) -> np.ndarray:
    """A 512² slice (0.8 mm): air, a 300 mm water ellipse with a fat rim, a bone ring and a lung-like hole."""
    y, x = np.mgrid[:512, :512].astype(np.float32)
    r = np.hypot((x - 256) / 190, (y - 256) / 150)
    hu = np.full((512, 512), -1000.0, np.float32)
    hu[r < 1.0] = -90.0
    hu[r < 0.9] = 40.0 + offset_hu
    hu[(r > 0.5) & (r < 0.55)] = 1200.0 + offset_hu
    hu[np.hypot(x - 200, y - 256) < 30] = -850.0
    return hu


def batch(*slices):
    return torch.from_numpy(prepare([(s, (0.8, 0.8), None) for s in slices], PP))


def test_hu_round_trip_is_exact_within_window_precision():
    x = batch(phantom())
    hu = to_hu(x, PP.windows)
    assert float(hu[0, 128, 128]) == pytest.approx(40.0, abs=0.5)  # soft-tissue window
    assert float(hu[0, 5, 5]) == pytest.approx(-1000.0, abs=1.0)  # air: only the wide window holds it
    assert float(window(hu, PP.windows).sub(x[:, :3]).abs().max()) < 1e-4


def test_no_perturbation_is_identity():
    x = batch(phantom(), phantom())
    out, keep = DomainAugment(PP, 0.0, 0.0, 0.0)(x.clone(), np.random.default_rng(0))
    assert float((out - x).abs().max()) < 1e-4
    assert bool((keep == 1).all())


def test_calibration_moves_water_not_air():
    x = batch(phantom())
    aug = DomainAugment(PP, p_geometry=0.0, p_calibration=1.0, p_texture=0.0)
    out, keep = aug(x.clone(), np.random.default_rng(3))
    hu0, hu1 = to_hu(x, PP.windows), to_hu(out, PP.windows)
    shift = float(hu1[0, 128, 128] - hu0[0, 128, 128])
    assert 0.05 < abs(shift) <= 20.0 + 0.03 * 1040 + 0.5
    assert abs(float(hu1[0, 5, 5] - hu0[0, 5, 5])) < 1.0
    assert bool((keep == 1).all())


def test_texture_adds_noise_and_masks_noise_and_ring_labels():
    x = batch(*(phantom() for _ in range(8)))
    aug = DomainAugment(PP, p_geometry=0.0, p_calibration=0.0, p_texture=0.5)
    out, keep = aug(x.clone(), np.random.default_rng(11))
    hu = to_hu(out, PP.windows)
    water = hu[:, 118:138, 125:145].flatten(1).std(1)
    textured = keep[:, ARTIFACTS.index("noise")] == 0
    assert 0 < int(textured.sum()) < 8
    assert bool((keep[textured][:, ARTIFACTS.index("ring")] == 0).all())
    assert bool((keep[:, ARTIFACTS.index("motion")] == 1).all()) and bool((keep[:, ARTIFACTS.index("metal")] == 1).all())
    assert float(water[~textured].max()) < 0.5 < float(water[textured].min())


def test_geometry_moves_the_field_mask_with_the_image_and_is_reproducible():
    x = batch(phantom())
    aug = DomainAugment(PP, p_geometry=1.0, p_calibration=0.0, p_texture=0.0)
    a, _ = aug(x.clone(), np.random.default_rng(7))
    b, _ = aug(x.clone(), np.random.default_rng(7))
    assert torch.equal(a, b)
    assert float((a - x).abs().max()) > 0.5  # the anatomy moved
    body = to_hu(a, PP.windows)[0] > -500
    assert float(a[0, -1][body].min()) > 0.99  # the body stays inside the (moved) field
    assert 0.9 * float((to_hu(x, PP.windows)[0] > -500).sum()) / 1.14 ** 2 < float(body.sum())
