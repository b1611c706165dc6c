"""Domain randomisation applied to training batches (torch, on the training device).

The synthetic generator randomises anatomy, kernels, dose, FOV and vendor habits, but its images still
share one reconstruction (filtered back-projection of one simulator) and therefore one noise texture and
one calibration. A network trained long on them learns that texture: an earlier longer-trained candidate
called clean real CT "motion" (model card). This module perturbs what is *not* an artifact, so the network
cannot use it:

- **geometry**: rotation (±8°), scale (0.88–1.14: patient size and pixel-spacing rounding), shift
  (±24 mm); the FOV-mask channel moves with the image;
- **calibration**: water offset (±20 HU, air unchanged) and gain (±3 %), as scanners differ;
- **texture**: smoothing or sharpening (iterative reconstruction and vendor kernels) and added correlated
  noise of random grain (σ 2–15 HU at 2 mm).

The preprocessed channels are HU windows clipped to [-1, 1]; HU is recovered from the narrowest window
that is not clipped at each pixel, perturbed, and windowed again with the same parameters as
the preprocessing (:class:`medqc.models.slice_input.SliceInput`), so the augmented input is exactly what preprocessing would give for
the perturbed slice (up to float16 rounding of the cache, < 0.5 HU in the soft-tissue window).

Labels: the texture perturbation changes the noise level and can blur a faint ring, so on those slices the
``noise`` and ``ring`` labels are not trained (their weight is set to 0); metal, motion, truncation and
position are unchanged by all three.
"""

from __future__ import annotations

import math

import numpy as np

from medqc import ARTIFACTS

TEXTURE_MASKED = ("noise", "ring")


def to_hu(x, windows):
    """(B, C, S, S) windowed channels → (B, S, S) HU (pixels clipped in every window get the window's end)."""
    import torch

    order = sorted(range(len(windows)), key=lambda i: windows[i][1] - windows[i][0], reverse=True)
    lo_all = min(w[0] for w in windows)
    hi_all = max(w[1] for w in windows)
    top = max(range(len(windows)), key=lambda i: windows[i][1])
    hu = torch.where(x[:, top] >= 0.999, torch.full_like(x[:, 0], hi_all), torch.full_like(x[:, 0], lo_all))
    for i in order:  # widest first, so the narrowest window that is not clipped wins
        lo, hi = windows[i]
        v = x[:, i]
        est = lo + (v + 1.0) * 0.5 * (hi - lo)
        hu = torch.where(v.abs() < 0.999, est, hu)
    return hu


def window(hu, windows):
    import torch

    return torch.stack([((hu - lo) * (2.0 / (hi - lo)) - 1.0).clamp(-1.0, 1.0) for lo, hi in windows], 1)


def _gauss_kernel(sigma: float, device):
    import torch

    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blur(img, sigma: float):
    """Separable Gaussian blur of (B, S, S)."""
    import torch.nn.functional as F

    k = _gauss_kernel(sigma, img.device)
    r = (len(k) - 1) // 2
    x = img[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return x[:, 0]


class DomainAugment:
    """Callable: (x (B, C, S, S) float32 preprocessed, rng) → (x augmented, keep (B, K) float 0/1)."""

    def __init__(self, params, p_geometry: float = 0.7, p_calibration: float = 0.7, p_texture: float = 0.6):
        self.windows = [tuple(w) for w in params.windows]
        self.has_mask = bool(params.fov_mask)
        self.pixel_mm = float(params.pixel_mm)
        self.p_geometry, self.p_calibration, self.p_texture = p_geometry, p_calibration, p_texture
        self.masked = [ARTIFACTS.index(a) for a in TEXTURE_MASKED]

    def describe(self) -> dict:
        return {"geometry": {"p": self.p_geometry, "rotation_deg": 8, "scale": [0.88, 1.14], "shift_mm": 24},
                "calibration": {"p": self.p_calibration, "water_offset_hu": 20, "gain": 0.03},
                "texture": {"p": self.p_texture, "smooth_sigma_px": [0.5, 1.2], "blend": [-0.5, 1.0],
                            "noise_hu": [2, 15], "noise_grain_px": [0.4, 1.5],
                            "labels_not_trained_when_applied": list(TEXTURE_MASKED)}}

    def __call__(self, x, rng: np.random.Generator):
        import torch
        import torch.nn.functional as F

        b = x.shape[0]
        dev = x.device
        keep = torch.ones((b, len(ARTIFACTS)), device=dev)
        hu = to_hu(x, self.windows)
        mask = x[:, -1] if self.has_mask else torch.ones_like(hu)

        g = rng.random(b) < self.p_geometry
        if g.any():
            ang = np.where(g, rng.uniform(-8, 8, b), 0.0) * math.pi / 180
            scale = np.where(g, np.exp(rng.uniform(math.log(0.88), math.log(1.14), b)), 1.0)
            shift = np.where(g[:, None], rng.uniform(-1, 1, (b, 2)) * 24.0 / (self.pixel_mm * x.shape[-1] / 2), 0.0)
            c, s = np.cos(ang) / scale, np.sin(ang) / scale
            theta = torch.tensor(np.stack([np.stack([c, -s, shift[:, 0]], 1), np.stack([s, c, shift[:, 1]], 1)], 1),
                                 dtype=torch.float32, device=dev)
            grid = F.affine_grid(theta, (b, 2, *hu.shape[-2:]), align_corners=False)
            both = torch.stack([hu + 1000.0, mask], 1)  # air (-1000) and outside the field (0) pad as zeros
            both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            hu = both[:, 0] - 1000.0
            mask = both[:, 1]

        cal = rng.random(b) < self.p_calibration
        if cal.any():
            off = torch.tensor(np.where(cal, rng.uniform(-20, 20, b), 0.0), dtype=torch.float32, device=dev)[:, None, None]
            gain = torch.tensor(np.where(cal, rng.uniform(-0.03, 0.03, b), 0.0), dtype=torch.float32, device=dev)[:, None, None]
            hu = hu + off * ((hu + 1000.0) / 1000.0).clamp(0.0, 1.0)
            hu = (hu + 1000.0) * (1.0 + gain) - 1000.0

        tex = rng.random(b) < self.p_texture
        if tex.any():
            idx = np.flatnonzero(tex)
            sub = hu[idx]
            sm = blur(sub, float(rng.uniform(0.5, 1.2)))
            alpha = torch.tensor(rng.uniform(-0.5, 1.0, len(idx)), dtype=torch.float32, device=dev)[:, None, None]
            sub = sub + alpha * (sm - sub)
            n = blur(torch.randn(sub.shape, device=dev, generator=None), float(rng.uniform(0.4, 1.5)))
            n = n / n.flatten(1).std(1).clamp(min=1e-6)[:, None, None]
            sigma = torch.tensor(rng.uniform(2, 15, len(idx)), dtype=torch.float32, device=dev)[:, None, None]
            sub = sub + sigma * n * (mask[idx] > 0.5)
            hu = hu.index_copy(0, torch.from_numpy(idx).to(dev), sub)
            keep[torch.from_numpy(idx).to(dev)[:, None], torch.tensor(self.masked, device=dev)[None, :]] = 0.0

        out = window(hu, self.windows)
        if self.has_mask:
            out = torch.cat([out, mask.clamp(0.0, 1.0)[:, None]], 1)
        return out, keep
