"""Classical detectors on HU phantoms (known geometry, noise, metal, lungs) and on the real Philips study."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medqc.analysis import airstreaks
from medqc.analysis import fusion, image, measures, noise, ring
from medqc.agent.records import SliceInfo

PS = 0.7  # mm per pixel: a 358 mm field on 512²


def info(size=512, ps=PS, **kw) -> SliceInfo:
    return SliceInfo("1.2.3.4", "1.2.3", "1.2", "1.2.840.10008.5.1.4.1.1.2", rows=size, cols=size,
                     pixel_spacing=(ps, ps), **kw)


def phantom(size=512, ps=PS, rx_mm=150.0, ry_mm=110.0, cx_mm=0.0, cy_mm=0.0, sigma=10.0, pad=-3024.0,
            seed=0, lungs=False, metal_mm=0.0, metal_hu=3500.0, table=False) -> np.ndarray:
    """Soft-tissue ellipse (40 HU, Gaussian noise σ) in air, padding outside the inscribed FOV circle."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[0:size, 0:size] - (size - 1) / 2.0) * ps
    img = np.full((size, size), -1000.0, np.float32)
    body = ((xx - cx_mm) / rx_mm) ** 2 + ((yy - cy_mm) / ry_mm) ** 2 <= 1
    img[body] = 40.0
    if lungs:
        for sx in (-1, 1):
            lung = ((xx - cx_mm - sx * 60) / 45) ** 2 + ((yy - cy_mm) / 70) ** 2 <= 1
            img[lung] = -850.0
    if metal_mm:
        img[(xx - cx_mm) ** 2 + (yy - cy_mm - 30) ** 2 <= metal_mm ** 2] = metal_hu
    if table:  # carbon shell (thin, 200 HU) with a foam core (-900 HU) under the body
        top = cy_mm + ry_mm + 8
        shell = (np.abs(xx) <= 170) & (yy >= top) & (yy <= top + 30)
        img[shell] = 200.0
        img[(np.abs(xx) <= 166) & (yy >= top + 3) & (yy <= top + 27)] = -900.0
    img += rng.normal(0, sigma, img.shape).astype(np.float32) * (img > -1500)
    r = np.hypot(yy, xx)
    img[r > size * ps / 2] = pad
    return img


def test_clean_body_noise_centre_and_no_false_alarms():
    m = measures.measure(phantom(sigma=12.0), info())
    assert m["noise_sd"] == pytest.approx(12.0, rel=0.15)
    assert m["metal_area_mm2"] == 0.0
    assert m["body_touches_fov"] < 0.01
    assert abs(m["body_center_offset_x_mm"]) < 3 and abs(m["body_center_offset_y_mm"]) < 3
    assert m["body_area_mm2"] == pytest.approx(np.pi * 150 * 110, rel=0.05)
    assert m["lung_area_mm2"] < 100
    p = fusion.fuse({"metal": 0.1, "motion": 0.2, "ring": 0.3, "noise": 0.1, "truncation": 0.1}, m)
    assert p["metal"] == 0.0  # no metal-density pixel: the network's metal score is dropped
    assert p["truncation"] == pytest.approx(0.1)
    # flat air around the body: no motion evidence, so only the network's share of its motion score is left
    assert m["air_dark_hu"] < airstreaks.EVIDENCE_HU[0]
    assert p["motion"] == pytest.approx(fusion.MOTION_NETWORK_WEIGHT * 0.2) and p["ring"] == 0.3
    # clean: σ at 2 mm is a small fraction of the body level; below half the level the classical score is
    # 0.2 × ratio (it ranks slices but stays far under the checks' 0.5), combined by noisy-OR
    assert 0 < m["noise_ratio"] < 0.3
    assert p["noise"] == pytest.approx(1 - 0.9 * (1 - 0.2 * m["noise_ratio"]), abs=1e-6)
    assert p["noise"] < 0.2


def test_noise_score_rises_with_sigma_below_the_level_and_flags_from_it():
    ratios = [0.0, 0.2, 0.49, 0.5, 0.7, 0.99, 1.0, 1.5, 2.0, 3.0]
    scores = [fusion.classical_probs({"noise_ratio": r})["noise"] for r in ratios]
    assert all(a < b for a, b in zip(scores[:8], scores[1:8]))  # strictly rising up to the top of the ramp
    assert scores[0] == 0.0 and scores[3] == pytest.approx(0.1) and scores[6] == pytest.approx(0.5)
    assert scores[5] < fusion.CLASSICAL_THRESHOLD <= scores[6] and scores[-1] == scores[-2] == 0.95
    assert fusion.classical_probs({"noise_ratio": 0.65})["noise"] < 0.25  # under the console's amber mark


def test_water_equivalent_diameter():
    """Dw (AAPM Report 220) = 2·√((mean HU / 1000 + 1)·A / π): a 300 mm disk of water reads 300 mm; the
    phantom's 300 × 220 mm ellipse of 40 HU reads 2·√(1.04 · 150 · 110) = 262 mm, and so does the same
    ellipse with the couch below it (the couch is not the patient)."""
    n, ps = 512, PS
    yy, xx = (np.mgrid[0:n, 0:n] - (n - 1) / 2.0) * ps
    water = np.where(xx ** 2 + yy ** 2 <= 150.0 ** 2, 0.0, -1000.0).astype(np.float32)
    assert measures.measure(water, info())["water_eq_diameter_mm"] == pytest.approx(300.0, rel=0.01)
    assert measures.measure(phantom(sigma=5.0), info())["water_eq_diameter_mm"] == pytest.approx(262.0, rel=0.01)
    assert measures.measure(phantom(sigma=5.0, table=True), info())["water_eq_diameter_mm"] == pytest.approx(262.0, rel=0.01)


def test_heavy_noise_or_a_ring_explains_away_motion_evidence():
    """Both motion cues read heavy noise and rings as motion: on a slice whose noise or ring evidence is over
    the threshold the motion score is scaled down (the finding there is the noise or the ring)."""
    quiet = {"noise_ratio": 0.3, "ring_contrast_hu": 0.0}
    noisy = {"noise_ratio": 1.5, "ring_contrast_hu": 0.0}
    ringed = {"noise_ratio": 0.3, "ring_contrast_hu": 20.0}
    assert fusion.fuse({"motion": 0.8}, quiet)["motion"] == pytest.approx(0.8)
    assert fusion.fuse({"motion": 0.8}, noisy)["motion"] == pytest.approx(0.8 * fusion.MOTION_EXPLAINED)
    assert fusion.fuse({"motion": 0.8}, ringed)["motion"] == pytest.approx(0.8 * fusion.MOTION_EXPLAINED)
    T = fusion.MOTION_THRESHOLD
    assert fusion.fuse({"motion": 0.7}, noisy)["motion"] < T <= fusion.fuse({"motion": 0.75}, noisy)["motion"]  # strong motion still counts
    # on real pixels: a noisy trunk (60 HU at 2 mm against the 30 HU body level)
    m = measures.measure(phantom(sigma=180.0, seed=7), info(convolution_kernel="B30f", slice_thickness=5.0))
    assert fusion.classical_probs(m)["noise"] >= fusion.CLASSICAL_THRESHOLD
    assert fusion.fuse({"motion": 0.8}, m)["motion"] < 0.8


def test_air_streaked_beyond_what_noise_makes_is_not_explained_by_noise():
    """Noise darkens free air a little (3.9 HU at most on the real studies at severity 1); dark streaks of
    ``AIR_BEYOND_NOISE_HU`` or more are motion's, so a noisy slice with them keeps its whole motion score,
    and flags on the air alone. A ring or a cut patient still explains them."""
    w = fusion.MOTION_NETWORK_WEIGHT
    noisy = {"noise_ratio": 1.5, "noise_ratio_plain": 1.5, "ring_contrast_hu": 0.0}
    below = fusion.fuse({"motion": 0.5}, {**noisy, "air_dark_hu": 3.9})["motion"]
    air = airstreaks.evidence(3.9)
    assert below == pytest.approx((w * 0.5 + (1 - w) * air) * fusion.MOTION_EXPLAINED)
    beyond = fusion.fuse({"motion": 0.5}, {**noisy, "air_dark_hu": fusion.AIR_BEYOND_NOISE_HU})["motion"]
    assert beyond == pytest.approx(w * 0.5 + (1 - w) * 1.0) and beyond >= fusion.MOTION_THRESHOLD
    assert fusion.fuse({"motion": 0.0}, {**noisy, "air_dark_hu": 8.0})["motion"] >= fusion.MOTION_THRESHOLD  # the air alone flags
    ringed = {**noisy, "ring_contrast_hu": 20.0, "air_dark_hu": 8.0}
    assert fusion.fuse({"motion": 0.5}, ringed)["motion"] == pytest.approx((w * 0.5 + (1 - w)) * fusion.MOTION_EXPLAINED)


def test_noise_near_its_level_and_metal_streaks_explain_part_of_the_motion_score():
    """Noise raises both motion cues before it reaches its own threshold: from half the level (noise evidence
    0.1) the motion score is scaled down continuously to ``MOTION_EXPLAINED`` at the threshold. Metal
    streaks that read as noise-level σ explain motion too, although the noise evidence there is halved."""
    def motion(noise_ratio, **m):
        return fusion.fuse({"motion": 0.8}, {"noise_ratio": noise_ratio, "ring_contrast_hu": 0.0, **m})["motion"]

    assert motion(0.5) == pytest.approx(0.8)  # noise evidence 0.1: nothing yet
    assert motion(0.75) == pytest.approx(0.8 * (1 - (1 - fusion.MOTION_EXPLAINED) * (0.3 - 0.1) / 0.4))  # evidence 0.3: halfway down
    assert motion(0.999) == pytest.approx(0.8 * fusion.MOTION_EXPLAINED, abs=1e-3) == motion(1.0)  # continuous at the threshold
    ratios = [0.4, 0.5, 0.6, 0.8, 0.95, 1.0, 2.0]
    vals = [motion(r) for r in ratios]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    metal = {"metal_area_mm2": 60.0, "metal_max_hu": 3071.0}
    assert fusion.fuse({}, {"noise_ratio": 2.5, **metal})["noise"] < fusion.CLASSICAL_THRESHOLD  # the noise check stays quiet
    assert motion(2.5, **metal) == pytest.approx(0.8 * fusion.MOTION_EXPLAINED)  # but the streaks explain the motion cues


def test_a_sharp_kernels_noise_confounds_motion_although_it_is_no_noise_artifact():
    """A lung or bone kernel is judged for gross noise only (2 × the level in a trunk), but the σ it shows confounds the
    motion cues as any σ does: the motion factor reads σ against the plain level (``noise_ratio_plain``)."""
    sharp = info(convolution_kernel="B70f", slice_thickness=5.0)
    soft = info(convolution_kernel="B30f", slice_thickness=5.0)
    body = noise.NOISE_2MM_HU["body"]
    assert noise.noise_ratio(60.0, sharp, head=False) == pytest.approx(60.0 / (body * noise.SHARP_NOISE_FACTOR))
    assert noise.noise_ratio(60.0, sharp, head=False, kernel_allowance=False) == pytest.approx(60.0 / body)
    assert noise.noise_ratio(60.0, soft, head=False, kernel_allowance=False) == noise.noise_ratio(60.0, soft, head=False)
    m = measures.measure(phantom(sigma=120.0, seed=7), sharp)
    assert m["noise_ratio_plain"] == pytest.approx(m["noise_ratio"] * noise.SHARP_NOISE_FACTOR)
    assert fusion.classical_probs(m)["noise"] < fusion.CLASSICAL_THRESHOLD <= fusion.classical_probs({"noise_ratio": m["noise_ratio_plain"]})["noise"]
    assert fusion.fuse({}, m)["noise"] < fusion.CLASSICAL_THRESHOLD  # no noise finding on a sharp kernel's routine σ
    unscaled = fusion.fuse({"motion": 0.8}, {**m, "noise_ratio": 0.0, "noise_ratio_plain": 0.0})["motion"]
    assert fusion.fuse({"motion": 0.8}, m)["motion"] == pytest.approx(unscaled * fusion.MOTION_EXPLAINED)
    # without the plain reading (results stored before it existed) the judged one stands in
    old = {k: v for k, v in m.items() if k != "noise_ratio_plain"}
    judged = fusion.motion_explained(fusion.classical_probs(m)["noise"], 0.0)
    assert judged > fusion.MOTION_EXPLAINED + 0.1
    assert fusion.fuse({"motion": 0.8}, old)["motion"] == pytest.approx(unscaled * judged)


def test_metal_or_a_ring_explains_away_noise_evidence():
    """Metal streaks and a ring's circles raise the measured σ: where the ring detector is over its threshold, or
    dense material covers ``NOISE_METAL_AREA_MM2``, the noise evidence is halved (below the threshold whatever σ
    reads)."""
    noisy = {"noise_ratio": 2.5}
    with_metal = {**noisy, "metal_area_mm2": 60.0, "metal_max_hu": 3071.0}
    with_ring = {**noisy, "ring_contrast_hu": 20.0}
    assert fusion.fuse({}, noisy)["noise"] >= 0.9
    assert fusion.fuse({}, with_metal)["noise"] == pytest.approx(fusion.fuse({}, noisy)["noise"] * fusion.NOISE_EXPLAINED)
    assert fusion.fuse({}, with_ring)["noise"] < fusion.CLASSICAL_THRESHOLD
    # a few pixels over 2,500 HU (noise on bone) explain nothing; a dense object short of the metal level
    # (dental work in a store that saturates below 3,000 HU) streaks the slice: half the noise evidence
    assert fusion.fuse({}, {**noisy, "metal_area_mm2": 2.0, "metal_max_hu": 2600.0})["noise"] >= 0.9
    assert fusion.fuse({}, {**noisy, "metal_area_mm2": 60.0, "metal_max_hu": 2800.0})["noise"] < fusion.CLASSICAL_THRESHOLD
    # a small object at metal density (an ECG electrode or lead, a clip) streaks only the rays through it: the σ
    # read at the trunk's centre is the dose's, and the noise evidence stands
    electrode = {**noisy, "metal_area_mm2": 0.5 * fusion.NOISE_METAL_AREA_MM2, "metal_max_hu": 3071.0}
    assert fusion.classical_probs(electrode)["metal"] >= fusion.CLASSICAL_THRESHOLD  # the metal check still sees it
    assert fusion.fuse({}, electrode)["noise"] == pytest.approx(fusion.fuse({}, noisy)["noise"])
    # metal streaks read as heavy noise are streaks all the same: they explain part of a motion score
    # (until 27 Nov they did not; on the evaluation slices the change took motion AUROC 0.967 -> 0.969)
    assert fusion.fuse({"motion": 0.8}, with_metal)["motion"] == pytest.approx(0.8 * fusion.MOTION_EXPLAINED)
    # on real pixels: a steel ball in a noisy trunk
    m = measures.measure(phantom(sigma=180.0, seed=7, metal_mm=6.0, metal_hu=3071.0), info(convolution_kernel="B30f", slice_thickness=5.0))
    assert fusion.classical_probs(m)["metal"] >= fusion.CLASSICAL_THRESHOLD and fusion.classical_probs(m)["noise"] >= fusion.CLASSICAL_THRESHOLD
    assert fusion.fuse({}, m)["noise"] < fusion.CLASSICAL_THRESHOLD


def test_noise_tracks_sigma_and_fuses_as_noisy_or():
    low = measures.measure(phantom(sigma=5.0, seed=1), info())["noise_sd"]
    high = measures.measure(phantom(sigma=80.0, seed=2), info())
    assert low == pytest.approx(5.0, rel=0.2)
    # with σ=80 few blocks stay inside the soft-tissue window: the estimate saturates high or is absent
    assert not np.isfinite(high["noise_sd"]) or high["noise_sd"] > 40
    # at 2 mm (3×3 pixels of 0.7 mm) white noise of σ reads σ/3; 135 HU → 45 HU at 2 mm: 1.5 × the body level
    mid = measures.measure(phantom(sigma=135.0, seed=3), info(convolution_kernel="B30f", slice_thickness=5.0))
    assert mid["noise_sd_2mm"] == pytest.approx(45.0, rel=0.15)
    assert mid["noise_ratio"] == pytest.approx(45.0 / noise.NOISE_2MM_HU["body"], rel=0.15)
    p = fusion.fuse({"noise": 0.3}, mid)["noise"]
    assert p > 0.3 + 0.2  # classical evidence raised it (noisy-OR)
    assert fusion.classical_probs(mid)["noise"] > fusion.CLASSICAL_THRESHOLD


@pytest.mark.parametrize("sigma_2mm", [4.0, 12.0, 25.0])
def test_noise_at_2mm_reads_sigma_on_a_routine_body(sigma_2mm):
    m = measures.measure(phantom(sigma=3 * sigma_2mm, seed=int(sigma_2mm)), info(convolution_kernel="STANDARD", slice_thickness=5.0))
    assert m["noise_sd_2mm"] == pytest.approx(sigma_2mm, rel=0.15)
    assert fusion.classical_probs(m).get("noise", 0.0) < fusion.CLASSICAL_THRESHOLD  # below the body level: no evidence


def test_trunk_noise_is_read_at_the_body_centre():
    """A wide trunk is noisiest at its centre (the longest paths): its noise is read there, where a reader
    and a scanner's noise index judge it, not as the median over the whole section, which the quieter
    periphery dominates."""
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    rel = np.hypot(xx / 165.0, yy / 105.0)  # the body's own elliptical radius (0 centre .. 1 skin)
    img = phantom(rx_mm=165.0, ry_mm=105.0, sigma=0.0)
    sigma = 3.0 * (8.0 + 22.0 * np.clip(1.0 - rel, 0.0, 1.0) ** 2)  # 30 HU at 2 mm in the centre, 8 at the skin
    img = img + (np.random.default_rng(4).normal(0.0, 1.0, img.shape) * sigma * (rel < 1)).astype(np.float32)
    whole = noise.noise_2mm(img, PS, PS)
    centre = noise.noise_2mm(img, PS, PS, central=True)
    assert 16.0 < centre < 30.0  # σ at 2 mm is 30 HU at the centre, 16 at 0.4 of the radius
    assert centre > 1.3 * whole
    m = measures.measure(img, info(convolution_kernel="STANDARD", slice_thickness=5.0))
    assert m["noise_sd_2mm"] == pytest.approx(centre)  # a trunk (no skull): the centre's reading


def test_a_neck_is_judged_for_noise():
    """A neck (about 12 × 10 cm with the airway and a vertebra) keeps 20–30 cm² of soft tissue 10 mm inside
    its skin: enough to judge its noise (a phantom's few inserts in air are not)."""
    img = phantom(rx_mm=60.0, ry_mm=50.0, sigma=60.0, seed=3)  # 20 HU at 2 mm
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    img[((xx / 9) ** 2 + ((yy + 15) / 7) ** 2) <= 1] = -1000.0  # the airway
    img[((xx / 12) ** 2 + ((yy - 22) / 11) ** 2) <= 1] = 700.0  # a vertebral body
    m = measures.measure(img, info(convolution_kernel="B30f", slice_thickness=3.0))
    assert m["noise_sd_2mm"] == pytest.approx(20.0, rel=0.2)


def _head_or_neck(kind: str, sigma_2mm: float, seed: int = 7, brain_mm: float = 70.0) -> np.ndarray:
    """A head (brain in a 6 mm skull under a 4 mm scalp) or a neck (a vertebra behind the airway, its lamina
    2.5 cm deep, a mandible's U in front) with white noise of ``sigma_2mm`` at 2 mm (3 × at 0.7 mm pixels)."""
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    img = np.full((512, 512), -1000.0, np.float32)
    if kind == "head":
        a, b = brain_mm + 10.0, brain_mm * 1.25 + 10.0
        img[(xx / a) ** 2 + (yy / b) ** 2 <= 1] = 20.0  # scalp
        img[(xx / (a - 4)) ** 2 + (yy / (b - 4)) ** 2 <= 1] = 1200.0  # skull
        img[(xx / (a - 10)) ** 2 + (yy / (b - 10)) ** 2 <= 1] = 35.0  # brain
    else:
        img[(xx / 62) ** 2 + (yy / 60) ** 2 <= 1] = 40.0
        img[((xx / 9) ** 2 + ((yy + 8) / 7) ** 2) <= 1] = -1000.0  # airway
        img[((xx / 13) ** 2 + ((yy - 12) / 11) ** 2) <= 1] = 900.0  # vertebral body, ~5 cm deep
        img[((xx / 16) ** 2 + ((yy - 30) / 5) ** 2) <= 1] = 900.0  # lamina, ~2.5 cm deep
        u = ((xx / 52) ** 2 + ((yy + 12) / 42) ** 2 <= 1) & ((xx / 46) ** 2 + ((yy + 12) / 36) ** 2 > 1) & (yy < -12)
        img[u] = 1200.0  # mandible: a U open behind
    noise = np.random.default_rng(seed).normal(0.0, 3.0 * sigma_2mm, img.shape).astype(np.float32)
    return img + noise * (img > -1000)


def test_a_brain_is_judged_on_the_brain_scale_and_a_neck_on_the_body_scale():
    """Inside a skull the brain's level (12 HU at 2 mm) applies; a neck, whose spine and mandible surround
    its centre in nearly every direction but lie deep or only in front, keeps the body's (30 HU)."""
    head = measures.measure(_head_or_neck("head", 15.0), info(convolution_kernel="H31s", slice_thickness=5.0))
    neck = measures.measure(_head_or_neck("neck", 15.0), info(convolution_kernel="B31s", slice_thickness=5.0))
    assert head["skull_ring"] >= measures.SKULL_SECTORS and neck["skull_ring"] >= measures.SKULL_SECTORS
    assert head["noise_ratio"] == pytest.approx(head["noise_sd_2mm"] / noise.NOISE_2MM_HU["head"])
    assert neck["noise_ratio"] == pytest.approx(neck["noise_sd_2mm"] / noise.NOISE_2MM_HU["body"])
    assert fusion.classical_probs(head)["noise"] >= fusion.CLASSICAL_THRESHOLD  # 15 HU: too noisy for a brain
    assert fusion.classical_probs(neck)["noise"] < fusion.CLASSICAL_THRESHOLD  # routine for a neck


def test_a_small_brain_near_the_vertex_is_judged():
    """Near the vertex the brain inside the skull holds only 5–20 cm² of tissue 10 mm from the skin: the
    brain's section is homogeneous, so 5 cm² are enough there (a trunk needs 20)."""
    m = measures.measure(_head_or_neck("head", 15.0, brain_mm=24.0), info(convolution_kernel="H31s", slice_thickness=5.0))
    assert m["noise_sd_2mm"] == pytest.approx(15.0, rel=0.25)
    assert m["noise_ratio"] == pytest.approx(m["noise_sd_2mm"] / noise.NOISE_2MM_HU["head"])


def test_sharp_kernels_are_judged_for_gross_noise_only_and_thin_slices_are_scaled():
    img = phantom(sigma=150.0, seed=5)  # 50 HU at 2 mm: an artifact on a standard kernel
    std = measures.measure(img, info(convolution_kernel="B30f"))
    assert fusion.classical_probs(std)["noise"] >= fusion.CLASSICAL_THRESHOLD
    for kernel in ("B70f", "BONE", "LUNG", "Br64d", "Br64d\\3", "FC52", "FC30", "FL04", "YC", "Bl57"):
        m = measures.measure(img, info(convolution_kernel=kernel))
        assert m["noise_ratio"] == pytest.approx(std["noise_ratio"] / noise.SHARP_NOISE_FACTOR, rel=1e-6), kernel
        assert fusion.classical_probs(m)["noise"] < fusion.CLASSICAL_THRESHOLD, kernel  # a sharp kernel's routine noise
    gross = measures.measure(phantom(sigma=330.0, seed=6), info(convolution_kernel="B70f"))  # 110 HU at 2 mm
    assert gross["noise_sd_2mm"] == pytest.approx(110.0, rel=0.15)
    assert fusion.classical_probs(gross)["noise"] >= fusion.CLASSICAL_THRESHOLD
    thick = measures.measure(img, info(convolution_kernel="B30f", slice_thickness=5.0))["noise_ratio"]
    thin = measures.measure(img, info(convolution_kernel="B30f", slice_thickness=0.75))["noise_ratio"]
    assert thin == pytest.approx(thick * (0.75 / 3.0) ** 0.5, rel=1e-6)


def test_a_sharp_kernels_allowance_follows_the_grain_of_its_noise():
    """A lung kernel is allowed 2 × the level for its own fine-grained noise, not for noise with a standard
    kernel's coarser grain: the same σ at 2 mm, fine (white at the pixel: σ at 1 mm about twice σ at 2 mm) or
    coarse (smoothed over ~1.5 mm: about equal), reads half the level in the first case and the whole in the
    second. Unmeasured texture (coarse pixels) keeps the kernel's allowance; a standard kernel has none."""
    import cv2

    fine = phantom(sigma=150.0, seed=5)
    rng = np.random.default_rng(7)
    coarse = phantom(sigma=0.0)
    body = coarse > -500
    grain = cv2.GaussianBlur(rng.normal(0, 1, coarse.shape).astype(np.float32), (0, 0), 1.5 / PS)
    lung = info(convolution_kernel="LUNG")
    f = measures.measure(fine, lung)
    unit = measures.measure(coarse + np.where(body, grain, 0).astype(np.float32), lung)["noise_sd_2mm"]
    coarse = coarse + np.where(body, grain * (f["noise_sd_2mm"] / unit), 0).astype(np.float32)
    c = measures.measure(coarse, lung)
    assert c["noise_sd_2mm"] == pytest.approx(f["noise_sd_2mm"], rel=0.05)
    assert f["noise_texture"] >= noise.NOISE_TEXTURE_KERNEL[1] and c["noise_texture"] <= noise.NOISE_TEXTURE_KERNEL[0], (f, c)
    assert f["noise_ratio"] == pytest.approx(f["noise_ratio_kernel"])  # the kernel's own grain: all its allowance
    assert c["noise_ratio"] == pytest.approx(c["noise_ratio_kernel"] * noise.SHARP_NOISE_FACTOR)  # none of it
    assert fusion.classical_probs(c)["noise"] >= fusion.CLASSICAL_THRESHOLD > fusion.classical_probs(c | {"noise_ratio": c["noise_ratio_kernel"]})["noise"]
    assert noise.kernel_noise_factor("LUNG") == noise.kernel_noise_factor("LUNG", texture=2.0) == noise.SHARP_NOISE_FACTOR
    assert noise.kernel_noise_factor("LUNG", texture=1.55) == pytest.approx(1.0 + (noise.SHARP_NOISE_FACTOR - 1.0) / 2)
    assert noise.kernel_noise_factor("LUNG", head=True, texture=1.0) == noise.SHARP_HEAD_NOISE_FACTOR
    std = measures.measure(coarse, info(convolution_kernel="STANDARD"))
    assert math.isnan(std["noise_texture"]) and std["noise_ratio"] == pytest.approx(c["noise_ratio"])


def test_vertical_miscentring_is_measured():
    m = measures.measure(phantom(cy_mm=50.0, ry_mm=100.0), info())
    assert m["body_center_offset_y_mm"] == pytest.approx(50.0, abs=3.0)
    assert abs(m["body_center_offset_x_mm"]) < 3.0


def test_table_is_not_lung_and_does_not_shift_centre():
    m = measures.measure(phantom(table=True), info())
    assert m["lung_area_mm2"] < 200
    assert abs(m["body_center_offset_y_mm"]) < 5.0


@pytest.mark.parametrize("metal_mm,hu,expect_area", [(6.0, 3500.0, np.pi * 36), (2.0, 3071.0, np.pi * 4)])
def test_metal_area_and_fusion(metal_mm, hu, expect_area):
    m = measures.measure(phantom(metal_mm=metal_mm, metal_hu=hu), info())
    assert m["metal_area_mm2"] == pytest.approx(expect_area, rel=0.25)
    assert m["metal_max_hu"] >= 3000
    p = fusion.fuse({"metal": 0.05}, m)["metal"]
    assert p >= (0.9 if expect_area > 40 else 0.5)


def test_a_metal_speck_flags_only_with_the_network():
    """Under 5 mm² at metal density (a clip, a wire, or a sharp kernel's bone edges laid over each other by motion:
    3-4 mm² at 2,800-3,400 HU on a real lung-kernel chest) the classical evidence stays under the threshold; the
    network can still flag it."""
    speck = measures.measure(phantom(metal_mm=1.1, metal_hu=3400.0), info())
    assert 1.0 < speck["metal_area_mm2"] < fusion.METAL_AREA_MM2[0] and fusion.metal_density(speck)
    assert fusion.fuse({"metal": 0.0}, speck)["metal"] <= fusion.METAL_SUBLEVEL < 0.14
    assert fusion.fuse({"metal": 0.6}, speck)["metal"] == pytest.approx(0.6)


def test_dense_bone_is_not_metal():
    m = measures.measure(phantom(metal_mm=8.0, metal_hu=1800.0), info())
    assert m["metal_area_mm2"] == 0.0
    assert fusion.fuse({"metal": 0.05}, m)["metal"] == 0.0
    assert m["bone_area_mm2"] == pytest.approx(np.pi * 64, rel=0.25)


def test_metal_a_store_clips_below_the_level_is_metal():
    """A store that keeps CT numbers only up to 2,976 HU (the real Philips Big Bore chest's) writes an implant
    as a plateau at that value: metal, though under the 3,000 HU level; a skin marker's few mm² there are
    judged by the level as before, and enamel (varying values) is not clipped."""
    implant = measures.measure(np.minimum(phantom(metal_mm=6.0, metal_hu=6000.0), 2976.0), info())
    assert implant["metal_max_hu"] == 2976.0 and implant["metal_clipped"] == 1.0
    assert fusion.metal_density(implant) and fusion.fuse({"metal": 0.05}, implant)["metal"] >= 0.9
    marker = measures.measure(np.minimum(phantom(metal_mm=1.5, metal_hu=6000.0), 2976.0), info())
    assert marker["metal_clipped"] == 0.0 and fusion.no_metal_density(marker)
    assert fusion.fuse({"metal": 0.9}, marker)["metal"] <= fusion.METAL_SUBLEVEL
    enamel = measures.measure(phantom(metal_mm=9.0, metal_hu=2650.0), info())
    assert enamel["metal_clipped"] == 0.0
    # a resampled slice repeats its top value on a few pixels (a filling's 2,986 HU on 768²): no ceiling
    few = phantom(metal_mm=6.0, metal_hu=2700.0)
    few[250:252, 250:253] = 2986.0  # 6 pixels, 3 mm²
    assert measures.measure(few, info())["metal_clipped"] == 0.0


def test_metal_inside_the_patient_or_on_the_skin():
    """Where the metal lies: an implant deep in the section reads metal_inside 1; an electrode on the skin and a
    connector beside the patient read 0 (external); a slice without metal has no value."""
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    base = phantom()
    deep = np.where(xx ** 2 + (yy - 30) ** 2 <= 36, 3500.0, base)  # 6 mm disc, 30 mm below the centre
    skin = np.where((xx - 150) ** 2 + yy ** 2 <= 9, 3071.0, base)  # on the right edge of the 150 mm ellipse
    beside = np.where((xx - 165) ** 2 + yy ** 2 <= 9, 3071.0, base)  # 15 mm beside it, in the air
    assert measures.measure(deep, info())["metal_inside"] == 1.0
    assert measures.measure(skin, info())["metal_inside"] < 0.5
    assert measures.measure(beside, info())["metal_inside"] == 0.0
    assert np.isnan(measures.measure(base, info())["metal_inside"])


def test_network_metal_needs_metal_density_pixels():
    # a confident network on a slice whose densest pixel is bone (2,200 HU) or enamel (2,650 HU, an area
    # over the classical metal ramp): no metal possible, whatever the network says
    bone = measures.measure(phantom(metal_mm=4.0, metal_hu=2200.0), info())
    assert bone["metal_max_hu"] < measures.METAL_HU and fusion.no_metal_density(bone)
    assert fusion.fuse({"metal": 0.85}, bone)["metal"] == 0.0
    enamel = measures.measure(phantom(metal_mm=9.0, metal_hu=2650.0), info())
    assert enamel["metal_area_mm2"] > 200 and fusion.no_metal_density(enamel)
    # dense area short of the metal level ranks above none (the ends of a real implant) but never flags
    assert fusion.fuse({"metal": 0.96}, enamel)["metal"] == pytest.approx(fusion.METAL_SUBLEVEL)
    assert fusion.METAL_SUBLEVEL < 0.14  # the shipped bundle's metal threshold
    # a small implant (area below the classical ramp) keeps the network's score
    clip = measures.measure(phantom(metal_mm=0.8, metal_hu=3071.0), info())
    assert clip["metal_max_hu"] >= measures.METAL_HU and not fusion.no_metal_density(clip)
    assert fusion.fuse({"metal": 0.85}, clip)["metal"] == pytest.approx(0.85)
    # unmeasured slices (no classical measures) keep the network's score
    assert fusion.fuse({"metal": 0.85}, {})["metal"] == pytest.approx(0.85)
    assert fusion.fuse({"metal": 0.85}, {"metal_max_hu": float("nan")})["metal"] == pytest.approx(0.85)


@pytest.mark.parametrize("pad", [-1024.0, -2000.0, -3024.0])
def test_truncation_on_any_vendor_padding(pad):
    field = info(data_collection_diameter=358.0)  # the displayed circle is the scan field
    clean = measures.measure(phantom(pad=pad), field)
    assert clean["body_touches_fov"] < 0.02
    wide = measures.measure(phantom(rx_mm=200.0, ry_mm=120.0, pad=pad), field)  # wider than the 179 mm radius
    assert wide["body_touches_fov"] > 0.15
    assert fusion.fuse({"truncation": 0.1}, wide)["truncation"] >= 0.8
    assert fusion.fuse({"truncation": 0.1}, clean)["truncation"] == pytest.approx(0.1)


def test_padding_is_the_fill_value_not_every_pixel_below_its_level():
    """Padding is one fill value; dark streaks of an unclipped reconstruction that reach below -1500 HU vary,
    and are image content (read as padding they made a scan-field edge inside the circle: truncation)."""
    img = phantom(pad=-3024.0)
    outside = img == -3024.0
    assert np.array_equal(image.padding(img), outside)
    rng = np.random.default_rng(3)
    streaked = phantom(pad=-3024.0)
    streak = np.zeros(streaked.shape, bool)
    streak[100:104, 60:200] = True  # a streak in the air beside the body, -1550 .. -1850 HU
    streaked[streak] = rng.uniform(-1850.0, -1550.0, int(streak.sum())).astype(np.float32)
    assert np.array_equal(image.padding(streaked), outside)
    # no fill at all (a field without padding): the streak is content, nothing is padding
    nofill = phantom(pad=-1000.0)
    nofill[streak] = streaked[streak]
    assert not image.padding(nofill).any()
    m = measures.measure(nofill, info(data_collection_diameter=500.0))
    assert m["body_touches_fov"] < 0.02
    # a resampled field's soft rim (values between the fill and air, below the level) goes with the fill
    soft = phantom(pad=-3024.0)
    yy, xx = np.mgrid[0:512, 0:512] - 255.5
    r = np.hypot(yy, xx)
    corners = (np.abs(yy) > 100) & (np.abs(xx) > 100)  # where fill lies beyond the rim (not at the image's sides)
    rim = (r > 255.0) & (r <= 256.5) & corners & (soft == -3024.0)
    soft[rim] = -2000.0
    assert image.padding(soft)[rim].all()


def test_lungs_measured_inside_body_only():
    m = measures.measure(phantom(lungs=True), info())
    expect = 2 * np.pi * 45 * 70
    assert m["lung_area_mm2"] == pytest.approx(expect, rel=0.1)


def test_small_matrix_and_missing_spacing_still_work():
    img = phantom(size=256, ps=1.4)
    m = measures.measure(img, SliceInfo("1", "2", "3", "4", rows=256, cols=256, reconstruction_diameter=358.4))
    assert m["body_area_mm2"] == pytest.approx(np.pi * 150 * 110, rel=0.06)


def _load_real(path):
    import pydicom

    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return hu, SliceInfo(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.SOPClassUID,
                         instance_number=int(ds.InstanceNumber), rows=ds.Rows, cols=ds.Columns,
                         pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
                         position=tuple(float(v) for v in ds.ImagePositionPatient),
                         orientation=tuple(float(v) for v in ds.ImageOrientationPatient))


def test_real_philips_study_is_clean(real_ct):
    """Real vendor noise texture, a stereotactic frame cut by the FOV, 12-bit data: no metal, no truncation."""
    files = sorted(p for s in ("S2010", "S3010") for p in (real_ct / s).glob("I*"))
    assert len(files) > 100
    noise = []
    for p in files[::3]:
        hu, inf = _load_real(p)
        m = measures.measure(hu, inf)
        fused = fusion.fuse({"metal": 0.0, "truncation": 0.0, "noise": 0.0}, m)
        assert fused["metal"] < 0.5, (p.name, m)
        assert fused["truncation"] < 0.5, (p.name, m)
        assert fused["noise"] < 0.5, (p.name, m)
        # the foam and the holder around the head are brighter than air: no motion evidence
        assert not airstreaks.evidence(m["air_dark_hu"]) >= 0.5, (p.name, m["air_dark_hu"])
        if np.isfinite(m["noise_sd"]):
            noise.append(m["noise_sd"])
    assert len(noise) > 10 and 0.5 < np.median(noise) < 15


def test_arms_cut_by_the_displayed_field_are_not_truncation_but_outside_the_scan_field_are():
    img = phantom(rx_mm=120.0, ry_mm=100.0, pad=-1024.0)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    for sx in (-1, 1):  # arms beside the trunk, reaching past the 179 mm displayed radius
        arm = ((xx - sx * 165) / 30) ** 2 + (yy / 40) ** 2 <= 1
        img[arm & (np.hypot(xx, yy) <= 179)] = 50.0
    shown = measures.measure(img, info())
    assert shown["body_touches_fov"] < 0.02  # a displayed field that crops the arms is a choice
    scanned = measures.measure(img, info(data_collection_diameter=300.0))  # but a 300 mm scan field cuts them
    assert fusion.fuse({"truncation": 0.0}, scanned)["truncation"] >= 0.5


def test_targeted_reconstruction_is_not_truncation_but_a_scan_field_rim_is():
    """Truncation artifacts need anatomy outside the scan field (DataCollectionDiameter). A displayed field
    smaller than the scan field only crops the picture (cardiac, spine, targeted reconstructions): the data
    are complete, so no truncation evidence even with the trunk cut. When the displayed circle is the scan
    field, anything touching its rim (arms too) is outside it."""
    wide = phantom(rx_mm=200.0, ry_mm=120.0, pad=-3024.0)  # trunk wider than the 358 mm displayed field
    crop = measures.measure(wide, info(data_collection_diameter=500.0, reconstruction_diameter=358.4))
    assert crop["body_touches_fov"] == 0.0
    assert fusion.classical_probs(crop)["truncation"] == 0.0
    at_rim = measures.measure(wide, info(data_collection_diameter=358.0, reconstruction_diameter=358.4))
    assert at_rim["body_touches_fov"] > 0.15 and fusion.classical_probs(at_rim)["truncation"] >= 0.8
    img = phantom(rx_mm=120.0, ry_mm=100.0, pad=-1024.0)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    for sx in (-1, 1):  # arms down beside the trunk, past the rim of a displayed field that is the scan field
        arm = ((xx - sx * 165) / 30) ** 2 + (yy / 40) ** 2 <= 1
        img[arm & (np.hypot(xx, yy) <= 179)] = 50.0
    arms = measures.measure(img, info(data_collection_diameter=358.0))
    assert fusion.classical_probs(arms)["truncation"] >= 0.5


def test_without_the_scan_field_in_the_header_the_field_is_taken_as_500_mm():
    """No DataCollectionDiameter (Philips writes none): the scan field is taken as the 500 mm CT scanners
    have. A smaller displayed field that cuts the flanks is a crop (a neck field through the shoulders), not
    truncation, though its contact is measured for the centring check; a displayed field of about 500 mm is
    the scan field, and the flanks cut there are truncation. A field lying inside the trunk nearly all round
    is marked as a targeted reconstruction."""
    wide = phantom(rx_mm=200.0, ry_mm=120.0, pad=-3024.0)  # flanks past the 358 mm displayed field
    crop = measures.measure(wide, info(reconstruction_diameter=358.4))
    assert 0.1 < crop["display_touch"] < measures.TARGETED_RIM and crop["field_inside_body"] == 0.0
    assert crop["body_touches_fov"] == 0.0 and fusion.classical_probs(crop)["truncation"] == 0.0
    ps = 500.0 / 512  # the same patient, 1.4 × larger, on a 500 mm displayed field
    big = phantom(ps=ps, rx_mm=280.0, ry_mm=168.0, pad=-3024.0)
    cut = measures.measure(big, info(ps=ps, reconstruction_diameter=500.0))
    assert cut["body_touches_fov"] > 0.1 and fusion.classical_probs(cut)["truncation"] >= 0.5
    fits = measures.measure(phantom(ps=ps, rx_mm=200.0, ry_mm=120.0, pad=-3024.0), info(ps=ps, reconstruction_diameter=500.0))
    assert fits["body_touches_fov"] < 0.02
    inside = phantom(rx_mm=260.0, ry_mm=240.0, pad=-3024.0)  # the whole displayed field is body
    m = measures.measure(inside, info(reconstruction_diameter=358.4))
    assert m["field_inside_body"] == 1.0 and m["body_touches_fov"] == 0.0
    assert fusion.classical_probs(m)["truncation"] == 0.0


def test_scan_field_filled_with_constant_air_is_found_without_the_header():
    """Some reconstructions fill the area outside the scan field with one constant (−1024 HU) instead of
    padding, and DataCollectionDiameter may be absent or stale: the constant annulus is the scan field edge.
    Noisy air around a patient that merely clips at −1024 is not mistaken for it."""
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    cut = phantom(rx_mm=170.0, ry_mm=120.0, pad=-1024.0, seed=7)
    cut[np.hypot(yy, xx) > 150.0] = -1024.0  # a 300 mm scan field inside the 358 mm displayed circle
    m = measures.measure(cut, info(data_collection_diameter=500.0))  # a header that still says 500 mm
    assert m["body_touches_fov"] > 0.15 and fusion.classical_probs(m)["truncation"] >= 0.8
    air = phantom(pad=-1024.0, seed=8)
    air = np.where(air > -1500, np.maximum(air + np.random.default_rng(9).normal(0, 15, air.shape), -1024.0), air)
    clean = measures.measure(air.astype(np.float32), info())  # air clipped at -1024 about half the time
    assert clean["body_touches_fov"] < 0.02


def _ringed(amp: float, r_mm: float = 80.0, seed: int = 11) -> np.ndarray:
    img = phantom(sigma=12.0, seed=seed)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    img[np.abs(np.hypot(yy, xx) - r_mm) <= PS] += amp  # a detector channel's circle, ~2 px wide
    return img


def test_ring_centred_on_the_reconstruction_centre_is_found():
    clean = measures.measure(phantom(sigma=12.0, seed=11), info())
    assert clean["ring_contrast_hu"] < 1.0  # noise stays under its floors
    assert fusion.classical_probs(clean)["ring"] == 0.0
    faint = measures.measure(_ringed(5.0), info())
    assert 0.5 < faint["ring_contrast_hu"] < fusion.RING_HU[0]  # measured, but below the evidence level
    strong = measures.measure(_ringed(60.0), info())
    assert strong["ring_contrast_hu"] > fusion.RING_HU[1]
    assert fusion.classical_probs(strong)["ring"] >= 0.9
    assert fusion.fuse({"ring": 0.1}, strong)["ring"] >= 0.9  # max(network, classical)


def test_the_scan_fields_edge_is_not_a_ring():
    """A patient wider than the scan field leaves a bright rim on the field's edge, a circle around the
    rotation axis like a ring's: the ring measure stops short of that edge (a ring inside still counts)."""
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    r = np.hypot(yy, xx)
    img = phantom(rx_mm=200.0, ry_mm=165.0, sigma=12.0, seed=13)  # larger than a 300 mm scan field all round
    rim = np.abs(r - 150.0) <= 1.5 * PS
    img[rim & (img > -500)] += 60.0  # the bright rim where the cut body meets the field's edge
    img[r > 150.0] = np.where(img[r > 150.0] > -500, 40.0, img[r > 150.0])  # the extended reconstruction beyond
    field = dict(data_collection_diameter=300.0, reconstruction_diameter=512 * PS)
    m = measures.measure(img, info(**field))
    assert m["ring_contrast_hu"] < fusion.RING_HU[0]
    img[np.abs(r - 100.0) <= PS] += 60.0  # a detector channel's ring inside the field
    assert measures.measure(img, info(**field))["ring_contrast_hu"] > fusion.RING_HU[0]


def test_round_anatomy_is_not_a_ring():
    """Concentric organ boundaries (steps, not thin lines) and a thick bright shell (a skull) stay quiet."""
    img = phantom(sigma=12.0, seed=12)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    r = np.hypot(yy, xx)
    img[r <= 60] += 60.0  # a centred round organ: a 60 HU step
    img[(r >= 90) & (r <= 97)] = 1200.0  # a centred 7 mm bone shell
    m = measures.measure(img, info())
    assert m["ring_contrast_hu"] < fusion.RING_HU[0]


def test_measures_without_opencv_agree(monkeypatch):
    """The classical measures run (and agree closely) on numpy alone."""
    img = _ringed(60.0)
    with_cv = measures.measure(img, info(convolution_kernel="B30f", slice_thickness=5.0))
    for mod in (image, measures, noise, ring):  # measure() and its helpers; the air measure keeps OpenCV
        monkeypatch.setattr(mod, "cv2", None)
    plain = measures.measure(img, info(convolution_kernel="B30f", slice_thickness=5.0))
    assert plain["ring_contrast_hu"] > fusion.RING_HU[1]
    assert plain["noise_sd_2mm"] == pytest.approx(with_cv["noise_sd_2mm"], rel=0.15)
    assert plain["body_touches_fov"] == pytest.approx(with_cv["body_touches_fov"], abs=0.02)


def test_lateral_bone_is_the_trunks_not_the_arms():
    """Arms held down beside an abdomen carry humeri in (or beyond) the lateral thirds on every slice; they
    would hide the lumbar gap above the iliac wings. Only the trunk's bone counts; the iliac wings do."""
    img = phantom(rx_mm=120.0, ry_mm=100.0, pad=-1024.0)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    for sx in (-1, 1):  # separate arms with a cortical humerus each
        img[((xx - sx * 150) / 22) ** 2 + (yy / 30) ** 2 <= 1] = 50.0
        img[((xx - sx * 150) / 8) ** 2 + (yy / 8) ** 2 <= 1] = 1200.0
    gap = measures.measure(img, info())
    assert gap["lateral_bone_mm2"] < 150.0  # the lumbar gap stays a gap
    assert gap["bone_area_mm2"] > 300.0  # the humeri are still bone of the patient
    for sx in (-1, 1):  # iliac wings inside the trunk's lateral thirds
        img[((xx - sx * 85) / 25) ** 2 + (yy / 12) ** 2 <= 1] = 700.0
    wings = measures.measure(img, info())
    assert wings["lateral_bone_mm2"] > 600.0


def _streaked(amp_hu: float, seed: int = 3) -> np.ndarray:
    """The clean phantom with thin dark and bright streaks tangent to the skin running out into the air
    (what a patient who moved during the rotation leaves), clipped at the body."""
    img = phantom(sigma=10.0, seed=seed)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    body = (xx / 150.0) ** 2 + (yy / 110.0) ** 2 <= 1
    streaks = np.zeros_like(img)
    for k, ang in enumerate(np.radians([10, 55, 100, 145, 190, 235, 280, 325])):
        # the tangent line to the ellipse at this angle, 3 px wide, alternately dark and bright
        px, py = 150.0 * np.cos(ang), 110.0 * np.sin(ang)
        tx, ty = -150.0 * np.sin(ang), 110.0 * np.cos(ang)
        nrm = np.hypot(tx, ty)
        d = np.abs((xx - px) * ty / nrm - (yy - py) * tx / nrm)
        streaks += np.where(d < 2.0, -amp_hu if k % 2 == 0 else amp_hu, 0.0)
    inside = img > -1500
    return np.where(inside & ~body, img + streaks, img).astype(np.float32)


def test_dark_streaks_in_the_air_are_motion_evidence():
    clean = measures.measure(phantom(sigma=10.0, seed=3), info())
    moved = measures.measure(_streaked(150.0), info())
    assert clean["air_dark_hu"] < airstreaks.EVIDENCE_HU[0]
    assert moved["air_dark_hu"] > airstreaks.EVIDENCE_HU[1]
    # the fused score: the network alone cannot reach the motion threshold (0.5) over clean air; streaks this
    # dark (full evidence: 5.9 HU, against 0.5-2.3 HU at the median per scanner on the real clean CT we have)
    # reach it whatever the network reads; half as much evidence needs the network's support
    T = fusion.MOTION_THRESHOLD
    assert fusion.fuse({"motion": 0.9}, clean)["motion"] < T
    assert fusion.fuse({"motion": 0.1}, moved)["motion"] >= T
    assert fusion.fuse({"motion": 0.7}, moved)["motion"] > 0.8
    half = {**clean, "air_dark_hu": sum(airstreaks.EVIDENCE_HU) / 2}
    assert fusion.fuse({"motion": 0.3}, half)["motion"] < T <= fusion.fuse({"motion": 0.6}, half)["motion"]
    # no network score (thick slices): the air alone does not make one
    assert "motion" not in fusion.fuse({}, moved)


def test_bright_objects_in_the_air_are_not_motion_evidence():
    """Foam pads, blankets and holders are brighter than air: only air darker than its own level counts."""
    img = phantom(sigma=10.0, seed=4, table=True)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    for cx, cy in ((-120, -120), (110, -130), (0, -135)):  # blanket folds and pads near the skin
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= 14 ** 2] = -850.0 + 40.0 * np.sin(xx[(xx - cx) ** 2 + (yy - cy) ** 2 <= 14 ** 2])
    m = measures.measure(img, info())
    assert not m["air_dark_hu"] > airstreaks.EVIDENCE_HU[0], m["air_dark_hu"]


def _chest_filling_field(streak_hu: float = 0.0, seed: int = 5) -> np.ndarray:
    """A trunk wider than the displayed field (no free air round it) with two lungs; with ``streak_hu``, thin
    lines dark and bright in turn straight across it (what a patient who moved leaves inside the body too)."""
    img = phantom(sigma=10.0, rx_mm=260.0, ry_mm=200.0, lungs=True, seed=seed)
    if streak_hu:
        yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
        inside = img > -1500
        for k, (ang, off) in enumerate(((20, -30), (70, 10), (110, 40), (160, -50), (35, 60), (140, 0))):
            a = np.radians(ang)
            line = np.abs(xx * np.sin(a) - yy * np.cos(a) - off) < 1.5
            img = np.where(inside & line, img + (-streak_hu if k % 2 == 0 else streak_hu), img)
    return img.astype(np.float32)


def test_streaks_darker_than_air_in_the_lungs_are_motion_evidence():
    """Where no free air surrounds the patient, the lungs are read: nothing inside a patient is darker than air,
    so lung taken below it by streaks is motion evidence, enough without the network's support; a head is
    not read (its air cells lie beside the skull base's streaking bone)."""
    from medqc.analysis import lungstreaks

    clean = measures.measure(_chest_filling_field(), info())
    moved = measures.measure(_chest_filling_field(250.0), info())
    assert not np.isfinite(clean["air_dark_hu"]) and not np.isfinite(moved["air_dark_hu"])
    assert clean["lung_dark_mm2"] == 0.0
    assert moved["lung_dark_mm2"] > lungstreaks.EVIDENCE_MM2[1]
    T = fusion.MOTION_THRESHOLD
    assert fusion.fuse({"motion": 0.8}, clean)["motion"] < T  # the network alone, as without the lungs
    assert fusion.fuse({"motion": 0.2}, moved)["motion"] >= T
    # darkness another artifact explains is not motion's: a ring's circles, heavy noise (in full up to a
    # quarter of the noise evidence's range, none from its threshold)
    cls = fusion.classical_probs(moved)
    assert fusion.lung_evidence(moved, cls, 0.0) == 1.0
    assert fusion.lung_evidence(moved, cls, fusion.LUNG_NOISE_FROM) == 1.0
    assert fusion.lung_evidence(moved, cls, fusion.CLASSICAL_THRESHOLD) == 0.0
    ringed = {**moved, "ring_contrast_hu": 20.0}
    assert fusion.lung_evidence(ringed, fusion.classical_probs(ringed), 0.0) == 0.0
    head = measures.measure(_head_or_neck("head", 5.0), info())
    assert not np.isfinite(head["lung_dark_mm2"])


def test_no_free_air_is_not_judged():
    """A targeted field inside the body (or a body filling the field) has no air band: not judged, and the
    air's evidence is taken as unknown (a neutral value), so the network alone must read 0.85 to reach the
    motion threshold there: a clean anatomy it misreads at 0.8 is not flagged, gross motion still is."""
    img = phantom(sigma=10.0, rx_mm=300.0, ry_mm=300.0)
    m = measures.measure(img, info())
    assert not np.isfinite(m["air_dark_hu"])
    w = fusion.MOTION_NETWORK_WEIGHT
    assert fusion.fuse({"motion": 0.7}, m)["motion"] == pytest.approx(w * 0.7 + (1 - w) * fusion.UNJUDGED_AIR_EVIDENCE)
    T = fusion.MOTION_THRESHOLD
    assert fusion.fuse({"motion": 0.8}, m)["motion"] < T <= fusion.fuse({"motion": 0.85}, m)["motion"]
    assert fusion.fuse({"motion": 0.7}, {})["motion"] == pytest.approx(0.7)  # no measures at all: the network's


def _chest_cut_by_the_field(seed: int = 5) -> np.ndarray:
    """A chest wider than the displayed field (a 358 mm field on a 460 mm chest): the field cuts both chest
    walls, so the lungs (textured parenchyma, vessels) open onto the field's edge, and only slivers of air
    are left above and below the body."""
    img = phantom(rx_mm=230.0, ry_mm=160.0, sigma=10.0, seed=seed)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    rng = np.random.default_rng(seed)
    shown = img > -1500
    for sx in (-1, 1):
        lung = (((xx - sx * 125) / 75) ** 2 + (yy / 100) ** 2 <= 1) & shown
        img[lung] = (-860.0 + rng.normal(0, 25, img.shape))[lung]
        for _ in range(40):
            vx, vy = sx * 125 + rng.uniform(-60, 60), rng.uniform(-80, 80)
            img[lung & ((xx - vx) ** 2 + (yy - vy) ** 2 <= rng.uniform(2, 5) ** 2)] = 40.0
    return img.astype(np.float32)


def test_lungs_opened_by_the_displayed_field_are_not_free_air():
    """With hardly any air in the band round the patient, the band held lung and its level was the lung's:
    the air slivers then read as 26 HU of dark streaks (full motion evidence on a clean slice). Lung is no
    free air: the band is not judged."""
    m = measures.measure(_chest_cut_by_the_field(), info())
    assert not np.isfinite(m["air_dark_hu"]), m["air_dark_hu"]
    assert m["display_touch"] > 0


def test_a_small_sliver_of_arm_cut_by_the_scan_field_counts_but_the_couch_does_not():
    """An arm that a scan field cuts leaves only a sliver inside it (far under 5 % of the trunk, the size an
    arm needs to count as patient elsewhere); it is anatomy outside the field all the same. The couch below
    the patient, cut by the same rim, is not."""
    img = phantom(rx_mm=150.0, ry_mm=110.0, pad=-1024.0, table=True)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    r = np.hypot(xx, yy)
    for sx in (-1, 1):  # forearms beside the trunk, centred beyond the 179 mm field: slivers 14 mm wide
        arm = ((xx - sx * 190) / 25) ** 2 + (yy / 45) ** 2 <= 1
        img[arm & (r <= 179)] = 50.0
        assert np.count_nonzero(arm & (r <= 179)) < 0.05 * np.count_nonzero(img[np.abs(xx) < 150] > -500)
    cut = measures.measure(img, info(data_collection_diameter=358.0))
    assert fusion.classical_probs(cut)["truncation"] >= 0.5, cut["body_touches_fov"]
    couch_only = phantom(rx_mm=150.0, ry_mm=110.0, pad=-1024.0, table=True)
    couch_only[(np.abs(yy - 150) <= 3) & (r <= 179)] = 200.0  # a couch shell wide enough to meet the rim
    m = measures.measure(couch_only, info(data_collection_diameter=358.0))
    assert fusion.classical_probs(m)["truncation"] < 0.5, m["body_touches_fov"]


def test_streaks_darker_than_the_padding_value_are_not_a_scan_field_edge():
    """A scanner that does not clip at −1024 HU can leave metal or motion streaks below the padding level
    inside the picture; only padding connected to the image border marks a scan field."""
    img = phantom(rx_mm=150.0, ry_mm=110.0, pad=-3024.0)
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    for k in range(-3, 4):  # dark streaks across the body, below PAD_HU, ending inside the body
        img[(np.abs(yy - 8 * k) <= 1) & (np.abs(xx) <= 130)] = -2500.0
    m = measures.measure(img, info(data_collection_diameter=500.0))
    assert m["body_touches_fov"] < 0.02
    assert fusion.classical_probs(m)["truncation"] < 0.5


def test_the_displayed_rim_is_measured_whatever_the_header_says_about_the_scan_field():
    """The centring check needs to know when the displayed field cuts the trunk (its body centre is then not
    the patient's). That is measured on every slice, with or without DataCollectionDiameter: a targeted
    field inside the trunk on a header that states a 500 mm scan field (GE, Siemens, Canon) is recognised
    as such, and is not truncation."""
    inside = phantom(rx_mm=260.0, ry_mm=240.0, pad=-3024.0)
    for dcd in (None, 500.0):
        m = measures.measure(inside, info(data_collection_diameter=dcd, reconstruction_diameter=358.4))
        assert m["field_inside_body"] == 1.0 and m["display_touch"] > 0.9, dcd
        assert fusion.classical_probs(m)["truncation"] == 0.0, dcd
    flanks = measures.measure(phantom(rx_mm=200.0, ry_mm=120.0, pad=-3024.0), info(data_collection_diameter=500.0))
    assert 0.1 < flanks["display_touch"] < measures.TARGETED_RIM and flanks["field_inside_body"] == 0.0


def test_noise_allowances_for_kernel_and_patient_size():
    """Philips C (a step sharper than standard) is allowed 1.2 × the level, a bone or lung kernel 2 × in a trunk and
    2.5 × inside a skull (where a sharp kernel is a bone kernel, the sharpest in routine use); a patient
    wider than the reference size is allowed the extra noise that size brings, a smaller one is not held to less."""
    std, c, lung = (info(convolution_kernel=k, slice_thickness=5.0) for k in ("STANDARD", "C", "LUNG"))
    assert noise.kernel_noise_factor("C") == noise.MEDIUM_NOISE_FACTOR and noise.kernel_noise_factor("B") == 1.0
    assert noise.noise_ratio(40.0, c, head=False) == pytest.approx(noise.noise_ratio(40.0, std, head=False) / noise.MEDIUM_NOISE_FACTOR)
    assert noise.noise_ratio(40.0, lung, head=False) == pytest.approx(noise.noise_ratio(40.0, std, head=False) / noise.SHARP_NOISE_FACTOR)
    assert noise.noise_ratio(20.0, lung, head=True) == pytest.approx(noise.noise_ratio(20.0, std, head=True) / noise.SHARP_HEAD_NOISE_FACTOR)
    assert noise.SHARP_NOISE_FACTOR < noise.SHARP_HEAD_NOISE_FACTOR
    assert noise.sharp_kernel("LUNG") and noise.sharp_kernel("Br64d\\3") and not noise.sharp_kernel("C") and not noise.sharp_kernel("")
    ref = noise.NOISE_SIZE_REF_MM
    assert noise.noise_ratio(40.0, std, head=False, dw_mm=2 * ref) == pytest.approx(noise.noise_ratio(40.0, std, head=False) / 2)
    assert noise.noise_ratio(40.0, std, head=False, dw_mm=ref / 2) == pytest.approx(noise.noise_ratio(40.0, std, head=False))
    assert noise.noise_ratio(10.0, std, head=True, dw_mm=2 * ref) == pytest.approx(10.0 / noise.NOISE_2MM_HU["head"])


def _ring_profile(r: np.ndarray, r0: float) -> np.ndarray:
    """A gain error reconstructed through a ramp filter: a bright core with dark side lobes, ~6 px across."""
    d = r - r0
    return 18.0 * np.exp(-0.5 * (d / 0.8) ** 2) - 34.0 * np.exp(-0.5 * ((d - 3.0) / 1.0) ** 2)


def test_a_wide_ring_in_noisy_lung_is_read_at_full_strength():
    """A ring with its side lobes spans ~6 px: the background it is read against is the median of 9 radii, not
    the 5 × 5 median that follows a third of it, and each radius's noise is the residual's median absolute
    deviation, which the ring's own offset does not inflate (on a real 1.25 mm chest such a ring read 0)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:512, 0:512] - 255.5
    r = np.hypot(yy, xx)
    img = phantom(sigma=0.0, lungs=True)
    img = img + rng.normal(0.0, 45.0, img.shape).astype(np.float32) * (img > -1500)
    ringed = img + (_ring_profile(r, 100.0) * (img > -1500)).astype(np.float32)
    clean_v = ring.ring_contrast(img, min_r_px=40)
    ring_v = ring.ring_contrast(ringed, min_r_px=40)
    assert clean_v < 2.0 and ring_v > 8.0, (clean_v, ring_v)


def test_bone_round_the_centre_is_no_ring():
    """The skull's tables and diploë make a ring round a head's centre over every angle: bone is not read."""
    yy, xx = np.mgrid[0:512, 0:512] - 255.5
    r = np.hypot(yy, xx) * PS
    img = np.full((512, 512), -1000.0, np.float32)
    img[r < 80] = 35.0  # brain
    img[(r >= 80) & (r < 87)] = 1400.0  # tables ...
    img[(r >= 82) & (r < 85)] = 600.0  # ... and diploë
    img[(r >= 87) & (r < 92)] = 20.0  # scalp
    img += np.random.default_rng(5).normal(0.0, 5.0, img.shape).astype(np.float32)
    assert ring.ring_contrast(img, min_r_px=30) < 2.0


def test_the_radial_median_keeps_edges_and_removes_thin_features():
    x = np.zeros((1, 40), np.float32)
    x[0, 20:] = 500.0  # an edge
    x[0, 8:11] = 60.0  # a 3-px ring
    out = ring._radial_median(x)[0]
    assert np.all(out[:8] == 0) and np.all(out[9:10] == 0) and np.all(out[22:] == 500.0)


def test_a_scan_field_edge_in_the_image_bounds_the_ring_search():
    """A patient cut by a scan field smaller than the displayed one leaves a bright rim at the field's edge and
    constant fill beyond it: a circle round the axis, but the truncation's, not a ring (rings are read up to
    12 mm inside the edge the image shows). Its streaks explain a motion score as a ring's do."""
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * PS
    r = np.hypot(yy, xx)
    img = phantom(rx_mm=160.0, ry_mm=110.0, sigma=8.0)
    sfov = 140.0  # mm radius: cuts the 160 mm half-width
    rim = (r > sfov - 4) & (r <= sfov) & (img > -500)
    img[rim] += 250.0
    img[r > sfov] = -3024.0  # the padding value, as scanners (and the injector) write beyond the scan field
    m = measures.measure(img, info(convolution_kernel="STANDARD", slice_thickness=5.0))
    assert fusion.classical_probs(m)["truncation"] >= fusion.CLASSICAL_THRESHOLD
    assert fusion.classical_probs(m)["ring"] < fusion.CLASSICAL_THRESHOLD, m["ring_contrast_hu"]
    quiet = {**m, "noise_ratio": 0.0, "noise_ratio_plain": 0.0, "ring_contrast_hu": 0.0}
    unscaled = fusion.fuse({"motion": 0.8}, {**quiet, "body_touches_fov": 0.0})["motion"]
    assert fusion.fuse({"motion": 0.8}, quiet)["motion"] == pytest.approx(unscaled * fusion.MOTION_EXPLAINED)


def test_air_clamped_to_one_value_is_no_scan_field_edge():
    """Cone-beam reconstructions clamp their air at exactly -1000 HU: the constant value runs up to the object
    all round, which is the air, not a field filled beyond its edge — no truncation (the real cone-beam Catphan
    read as truncated on 80 of its 88 slices). A real fill beyond a field edge, with noisy air inside it, still is."""
    yy, xx = (np.mgrid[0:512, 0:512] - 255.5) * 0.9
    r = np.hypot(yy, xx)
    rng = np.random.default_rng(2)
    img = np.full((512, 512), -1000.0, np.float32)
    obj = r < 100.0
    img[obj] = 50.0 + rng.normal(0.0, 10.0, obj.sum())
    m = measures.measure(img, info(ps=0.9, convolution_kernel="STANDARD", slice_thickness=2.0))
    assert fusion.classical_probs(m)["truncation"] == 0.0
    # noisy air inside a 300 mm field, constant fill beyond it, a body cut by it
    img2 = np.where(r < 150.0, -1000.0 + rng.normal(0.0, 15.0, r.shape), -1000.0).astype(np.float32)
    body = ((xx / 160.0) ** 2 + (yy / 90.0) ** 2 <= 1) & (r < 150.0)
    img2[body] = 40.0 + rng.normal(0.0, 10.0, body.sum())
    m2 = measures.measure(img2, info(ps=0.9, convolution_kernel="STANDARD", slice_thickness=2.0))
    assert fusion.classical_probs(m2)["truncation"] >= fusion.CLASSICAL_THRESHOLD
