"""Example figure of synthetic slices: ``python -m medqc.synth.figure docs/synth-examples.png``.

One patient, one physics path: clean slices at several levels, then the same kind of slice with each
artifact injected in the projection domain."""

from __future__ import annotations

import copy
import sys

import numpy as np

from medqc.analysis.anatomy import LANDMARKS
from medqc.synth.phantom import Implant, random_patient
from medqc.synth.training import SliceSpec, motion_amplitude, noise_target, simulate_slice


def panels(seed: int = 7) -> list[tuple[str, np.ndarray, tuple[float, float]]]:
    p = random_patient(np.random.default_rng(seed), contrast=True, arms="down")
    L = LANDMARKS
    out = []

    def sim(title, r, window, fov=380.0, change=None, patient=p, **kw):
        spec = SliceSpec(r=r, matrix=320, fov_mm=fov, sim_n=384, n_views=384, noise_sigma=kw.pop("sigma", 6.0), padding=-1024.0, **kw)
        pp = copy.deepcopy(patient)
        if change:
            change(pp, spec)
        img, _ = simulate_slice(pp, spec, np.random.default_rng(seed))
        out.append((title, img, window))

    soft, lung, brain = (40, 400), (-600, 1500), (40, 80)
    sim("head (brain window)", 60.0, brain, fov=240.0, sigma=3.0)
    sim("skull base (bone)", L["skull_base"] + 5, (500, 2500), fov=240.0, sigma=3.0, kernel="bone")
    sim("chest (lung window)", L["carina"] + 30, lung, kernel="lung")
    sim("upper abdomen, IV contrast", L["kidney_top"] + 30, soft)

    def hip(pp, s):
        pp.implants = [Implant("hip", L["femoral_head"] - 40, L["femoral_head"] + 40, 95.0 * pp.girth_lr, -5.0, 16.0, 10.0)]

    sim("metal: hip prosthesis", L["femoral_head"] - 20, soft, change=hip)

    def move(pp, s):
        s.motion_mm = motion_amplitude(0.6)

    sim("motion (6 mm jerk)", L["carina"] + 60, soft, change=move)

    def ring(pp, s):
        s.ring = 0.5

    sim("ring (detector channels)", L["renal_hilum"], soft, change=ring)

    def noisy(pp, s):
        s.noise_sigma = noise_target(L["renal_hilum"], 0.6)

    sim("noise (low dose)", L["renal_hilum"], soft, change=noisy)

    def trunc(pp, s):
        s.sfov_mm = 300.0
        s.truncation_extended = True

    sim("truncation (SFOV 300 mm)", L["iliac_crest"] + 20, soft, change=trunc, fov=420.0)
    return out


def main(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = panels()
    cols = 3
    rows = int(np.ceil(len(ps) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.75))
    for ax, (title, img, (wl, ww)) in zip(axes.flat, ps):
        ax.imshow(img, cmap="gray", vmin=wl - ww / 2, vmax=wl + ww / 2, interpolation="nearest")
        ax.set_title(title, fontsize=7.5)
        ax.axis("off")
    for ax in list(axes.flat)[len(ps):]:
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, dpi=90, format="png")
    buf.seek(0)
    Image.open(buf).convert("L").save(path, optimize=True)  # grayscale keeps the file small


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "synth-examples.png")
