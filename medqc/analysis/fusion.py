"""Fusion: the network's per-class probabilities and the classical measures of the same slice → the scores
the checks decide on (``fuse``; the classical evidence alone: ``classical_probs``). The rules, and why,
are in ``fuse``'s docstring and in ``docs/checks.md``.
"""

from __future__ import annotations

import math

from medqc.analysis import airstreaks, lungstreaks
from medqc.analysis.measures import METAL_MIN_HU
from medqc.analysis.noise import NOISE_RATIO_HI


METAL_AREA_MM2 = (5.0, 40.0)  # classical metal evidence ramps from 0.5 to 0.95 over this area at >= 2500 HU
METAL_SUBLEVEL = 0.1  # the most metal evidence a slice whose densest pixel stays under METAL_MIN_HU gets
TRUNC_EDGE = (0.06, 0.25)  # fraction of the scan field's edge covered by the patient: evidence ramps from 0.5 to 0.95
CLASSICAL_THRESHOLD = 0.5  # the checks' threshold for a class the bundle's network does not score
MOTION_NETWORK_WEIGHT = 0.4  # the network's share of the fused motion score, the air evidence's the rest
# The checks' threshold for the fused motion score (``medqc.bundle.Bundle.check_thresholds``). A bundle's motion
# threshold is its network's alone (97 % specificity on synthetic validation); the fused score mixes the network
# with the free air's evidence, and its operating point is set on real CT: over the real-CT evaluation's patient
# slices whose free air is judged, 0.5 finds 90 % of the injected motion at 98.9 % specificity (98.6 % on the
# clean slices: the real head's vertex, whose hair and pads streak its air, and two GE chests at 0.50-0.52),
# where the network's own 0.58 would find 82 % at 99.8 %. Series with motion are raised from runs (the
# series rules in ``agent/checks/artifact.py``), which keep those clean slices from a finding.
MOTION_THRESHOLD = 0.5
# Where no free air is judged (a body filling the field, a targeted reconstruction) the air's evidence is
# unknown, not absent: a neutral value stands in for it, such that the network alone must read
# MOTION_NETWORK_ALONE to reach MOTION_THRESHOLD there (real clean anatomy reads up to ~0.8): 0.2667
MOTION_NETWORK_ALONE = 0.85
UNJUDGED_AIR_EVIDENCE = (MOTION_THRESHOLD - MOTION_NETWORK_WEIGHT * MOTION_NETWORK_ALONE) / (1.0 - MOTION_NETWORK_WEIGHT)
# motion score factor on a slice whose noise or ring evidence is over the threshold: motion still qualifies
# there when the unscaled score reaches MOTION_THRESHOLD / 0.7 (0.71)
MOTION_EXPLAINED = 0.7
MOTION_NOISE_FROM = 0.1  # ... and from 1 down to it as the noise evidence rises from this (half the level) to it
# Dark streaks in free air at or beyond the air's full evidence (5 HU) are not noise's doing: noise injected at
# severity 1 into the real studies darkened their free air to 3.9 HU at most (clean 4.2), while motion injected
# into them reads a median of 4–19 HU per study (up to 57). On such a slice noise explains no part of the
# motion score.
AIR_BEYOND_NOISE_HU = airstreaks.EVIDENCE_HU[1]
# The air spaces' darkness (``lungstreaks``) counts in full up to this classical noise evidence (σ at 0.75 of the
# level) and fades to nothing at the threshold: noise added to clean real trunk slices took their lungs and airways
# below air over up to 7 mm² at 0.7 of the level, 28-78 mm² at 1.3 times it
LUNG_NOISE_FROM = 0.25
NOISE_EXPLAINED = 0.5  # classical noise evidence factor on a slice whose ring evidence, or metal area, is over its level
# Dense material (>= METAL_HU) over this area streaks the trunk's centre, where noise is read: σ there is partly
# its streaks. A smaller object (an ECG electrode or lead, a clip: under ~8 mm across) starves only the few
# rays through it, thin lines that the median of local σ passes over: real slices with 5-46 mm² of it read σ at
# their dose's level (11-32 HU at 2 mm), while injected objects of 270 mm² and more raised it by up to 40 HU.
NOISE_METAL_AREA_MM2 = 50.0
CLASSICAL_CLASSES = ("metal", "truncation", "noise", "ring")  # classes with classical evidence (classical_probs)
RING_HU = (4.0, 15.0)  # ring contrast above its noise floors: evidence ramps from 0.5 to 0.95


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 below lo/2; 0.5 at lo; 0.95 at hi; capped at 0.95 (classical evidence is never certainty)."""
    if x is None or not math.isfinite(x) or x < lo * 0.5:
        return 0.0
    if x < lo:
        return 0.5 * (x - lo * 0.5) / (lo * 0.5)
    if x >= hi:
        return 0.95
    return 0.5 + 0.45 * (x - lo) / (hi - lo)


def classical_probs(measures: dict[str, float]) -> dict[str, float]:
    """Per-class probabilities from classical evidence alone (only for classes physics can see)."""
    m = measures or {}
    out: dict[str, float] = {}
    if math.isfinite(m.get("metal_area_mm2", float("nan"))):
        p = _ramp(m["metal_area_mm2"], *METAL_AREA_MM2)
        if m["metal_area_mm2"] < METAL_AREA_MM2[0]:
            # a speck under 5 mm² (a clip, a wire, an electrode — or a sharp kernel's overshoot where motion laid two
            # bone edges over each other: 3-4 mm² at 2,800-3,400 HU on a real lung-kernel chest with motion
            # injected, whose network reads no metal) flags only with the network: classical evidence alone stays
            # under the threshold
            p = min(p, METAL_SUBLEVEL)
        if not metal_density(m):
            # bone, enamel, contrast — or metal that partial volume kept under the level (the ends of a real hip
            # implant): never a metal flag on its own (the bundle's metal threshold is 0.14; the artifact check
            # raises such a slice beside metal), but more dense area ranks higher than none
            p *= METAL_SUBLEVEL / 0.95
        out["metal"] = p
    if math.isfinite(m.get("body_touches_fov", float("nan"))):
        out["truncation"] = _ramp(m["body_touches_fov"], *TRUNC_EDGE)
    if math.isfinite(m.get("ring_contrast_hu", float("nan"))):
        # from 0 (not from half the level, as the other ramps): the contrast is already above its noise
        # floors, so any reading ranks slices (the clean real head phantom reads 0.0–0.1 HU)
        x = max(0.0, m["ring_contrast_hu"])
        out["ring"] = 0.5 * x / RING_HU[0] if x < RING_HU[0] else _ramp(x, *RING_HU)
    if math.isfinite(m.get("noise_ratio", float("nan"))):
        out["noise"] = noise_evidence(m["noise_ratio"])
    return out


def noise_evidence(ratio: float) -> float:
    """0..0.95 noise evidence from a ``noise_ratio``. Below the artifact level the score keeps rising with σ
    instead of sitting at 0 (a slice at 0.4 of the level reads noisier than one at 0.2): 0 → 0.1 up to half
    the level, 0.1 → 0.5 from there to the level, where the flag starts (the checks' threshold) — the
    console's amber "near threshold" mark (half the threshold) still needs about 0.7 of the level."""
    r = max(0.0, ratio)
    return 0.2 * r if r < 0.5 else 0.1 + 0.8 * (r - 0.5) if r < 1.0 else _ramp(r, 1.0, NOISE_RATIO_HI)


def fuse(net_probs: dict[str, float], measures: dict[str, float]) -> dict[str, float]:
    """Final per-class probability.

    * metal, truncation: ``max(network, classical)`` — both are direct physical signals (dense pixels,
      tissue on the FOV edge) that a network trained on synthetic data must not be able to overrule;
    * noise: ``1 - (1 - net) * (1 - classical)`` (noisy-OR: either source can raise it, agreement raises
      it further) — σ alone cannot tell a sharp kernel from a low dose, so classical evidence ramps late;
    * ring: ``max(network, classical)`` — a thin ring centred on the reconstruction centre is physics too;
    * motion: ``MOTION_NETWORK_WEIGHT`` (0.4) × the network + 0.6 × the dark-streak evidence in the free air
      around the patient (``medqc.analysis.airstreaks``); where no air can be measured (a body filling the field, a
      targeted reconstruction, lung in the band) the air's evidence is unknown and
      ``UNJUDGED_AIR_EVIDENCE`` (0.27) stands in for it, so that the network must read 0.85 to reach the
      motion threshold (``MOTION_THRESHOLD``, 0.5) alone there (standing alone, it raises false motion flags
      on such slices). The
      network weighs less than the air: it is the weaker cue (AUROC 0.77-0.84 alone against 0.98-0.99 for
      the air where judged) and the one that misreads real clean anatomy as motion (0.3-0.8 on real patient
      slices); over most real clean air (evidence <= 0.46) it must read 0.56 to flag. Air streaks at
      full evidence (>= 5 HU; real clean CT here reads <= 4.2, a head's vertex streaked by its hair and
      pads) flag on their own. The weights 0.4 /
      0.6 rank the evaluation slices better than the plain mean (by 0.003-0.006 of AUROC on seeds 31337
      and 777); 0.3-0.35 for the network rank them alike. The air's evidence is the larger of the free air's
      and that of the trunk's own air spaces darker than air (``medqc.analysis.lungstreaks``, measure
      ``lung_dark_mm2``; ``lung_evidence``, which leaves out the darkness a ring, a cut edge, dense metal or
      noise explains): inside the body nothing is darker than air either, and that reads motion where the
      field leaves no free air (a chest shown to its walls), or where the free air reads little of it.
    On a slice whose classical noise or ring evidence is over the threshold, the motion score is scaled by
    ``MOTION_EXPLAINED`` (0.7): both motion cues are confounded by them (the network reads heavy noise and
    rings as motion, the air measure reads noisy air and a ring's arcs in the air as dark streaks; on the
    evaluation slices these were most of the top-scoring slices without motion), and the finding there is
    the noise or the ring; motion still qualifies when the unscaled score reaches about 0.71. Noise confounds
    them before it reaches its own threshold, so from ``MOTION_NOISE_FROM`` (noise evidence 0.1: σ at half
    the level) the factor ramps from 1 down to 0.7 at the threshold (:func:`motion_explained`) — except where
    the free air reads ``AIR_BEYOND_NOISE_HU`` (5 HU) of dark streaks or more, more than noise makes there
    (on the real studies noise at severity 1 reached 3.9 HU): such streaks flag on their own, noisy slice or
    not (rings and a patient outside the scan field still explain them: their arcs and cut edges streak the
    air too); and the
    noise evidence used here is the one before the metal's share is taken out — metal streaks that read as
    noise-level σ confound both cues all the same (the noise check itself still stays quiet there) — and
    without the sharp kernels' allowance (``noise_ratio_plain``): a lung or bone kernel's σ is no artifact
    for the noise check, but it confounds the motion cues as any σ does. With the metal streaks left out of
    the air measure (``airstreaks``, step 6) the fused motion score reaches a specificity of 0.99 at the
    threshold on the evaluation slices (``bench/results/slice-eval.md``).
    Likewise the classical noise evidence is scaled by ``NOISE_EXPLAINED`` (0.5, below the threshold
    whatever σ reads) where the metal or ring detector is over its threshold: metal streaks and a ring's
    circles raise the measured σ (47–98 HU on synthetic slices with metal at a routine dose), and the
    finding there is the metal or the ring; the series' other slices still judge its noise. On the
    evaluation slices this keeps metal and ring slices without noise from being flagged for noise, at the
    cost of a few noisy slices that also carry metal or a ring.
    Metal needs metal-density pixels (``metal_density``): a measured slice whose densest pixel stays below
    ``METAL_MIN_HU`` (3,000 HU; enamel and dense cortical bone stay below it, implants reconstruct far above
    it and saturate at the top of the CT number range), and whose store did not clip metal lower
    (``metal_clipped``), cannot show a metal artifact on its own, so there the network's metal score is
    dropped too: metal is the sub-threshold classical evidence (at most ``METAL_SUBLEVEL``) on such a slice.
    Missing network classes take the classical value; missing measures leave the network value.
    """
    out = {k: float(v) for k, v in (net_probs or {}).items()}
    m = measures or {}
    cls = classical_probs(m)
    # what confounds the motion cues: σ as it is (a sharp kernel's too), before the metal's or ring's share is
    # taken out (streaks all the same)
    noisy = confounding_noise(m, cls)
    if "noise" in cls:
        cls["noise"] = _explained_noise(cls, m)
    n = out.get("motion")
    if n is not None and math.isfinite(n):
        air_hu = m.get("air_dark_hu", float("nan"))
        if "air_dark_hu" in m:  # measured: streaked or flat air, or none to judge (a neutral value then)
            air = airstreaks.evidence(air_hu)
            w = MOTION_NETWORK_WEIGHT
            n = w * n + (1.0 - w) * max(air if math.isfinite(air) else UNJUDGED_AIR_EVIDENCE, lung_evidence(m, cls, noisy))
        beyond_noise = air_hu is not None and math.isfinite(air_hu) and air_hu >= AIR_BEYOND_NOISE_HU
        n *= motion_explained(0.0 if beyond_noise else noisy, max(cls.get("ring", 0.0), cls.get("truncation", 0.0)))
        out["motion"] = n
    for k, p in cls.items():
        n = out.get(k)
        if n is None or not math.isfinite(n):
            out[k] = p
        elif k == "noise":
            out[k] = 1.0 - (1.0 - n) * (1.0 - p)
        elif k == "metal" and no_metal_density(m):
            out[k] = p
        else:
            out[k] = max(n, p)
    return out


def confounding_noise(measures: dict[str, float], cls: dict[str, float]) -> float:
    """The classical noise evidence that confounds the motion cues: that of σ as it is, without a sharp kernel's
    allowance (``noise_ratio_plain``), else the noise class's (``cls``: ``classical_probs(measures)``)."""
    plain = (measures or {}).get("noise_ratio_plain", float("nan"))
    return noise_evidence(plain) if plain is not None and math.isfinite(plain) else cls.get("noise", 0.0)


def lung_evidence(measures: dict[str, float], cls: dict[str, float], noise: float) -> float:
    """The motion evidence of the slice's air spaces darker than air (``lungstreaks``; 0 where not judged), left
    out where another artifact explains that darkness: a ring's dark circles or a cut edge's streaks (ring or
    truncation evidence over the threshold), dense metal's streaks (``dense_streaks``), and noise, whose dips
    take airways and thin lung below air as it grows: the evidence counts in full up to ``LUNG_NOISE_FROM``
    of classical noise evidence (``noise``: σ as it is, before any allowance) and not at all from the
    threshold on."""
    e = lungstreaks.evidence((measures or {}).get("lung_dark_mm2", float("nan")))
    if not math.isfinite(e) or e <= 0.0:
        return 0.0
    if max(cls.get("ring", 0.0), cls.get("truncation", 0.0)) >= CLASSICAL_THRESHOLD or dense_streaks(measures):
        return 0.0
    fade = (CLASSICAL_THRESHOLD - noise) / (CLASSICAL_THRESHOLD - LUNG_NOISE_FROM)
    return e * min(1.0, max(0.0, fade))


def _explained_noise(cls: dict[str, float], m: dict[str, float]) -> float:
    """The classical noise evidence as ``fuse`` uses it: scaled by ``NOISE_EXPLAINED`` where the slice's ring
    evidence is over the threshold or dense material streaks it (the σ measured there is the metal's streaks or
    the ring's circles)."""
    p = cls["noise"]
    return p * NOISE_EXPLAINED if cls.get("ring", 0.0) >= CLASSICAL_THRESHOLD or dense_streaks(m) else p


def noise_score_with(score: float, measures: dict[str, float], ratio: float) -> float:
    """A slice's fused noise score (``fuse``'s ``score``) had its ``noise_ratio`` been ``ratio``: the classical
    part replaced, the network's kept (``fuse`` combines the two by a noisy-OR). The checks use it where the
    complete series shows a sharp kernel's coarse-grained region to be that kernel's normal (``medqc.agent.
    checks.artifact.kernel_normal_noise``)."""
    m = measures or {}
    old, new = (classical_probs(x) for x in (m, {**m, "noise_ratio": ratio}))
    if "noise" not in old or "noise" not in new:
        return score
    p_old, p_new = _explained_noise(old, m), _explained_noise(new, m)
    if p_old >= 1.0:
        return score
    net = max(0.0, 1.0 - (1.0 - score) / (1.0 - p_old))
    return 1.0 - (1.0 - net) * (1.0 - p_new)


def dense_streaks(measures: dict[str, float]) -> bool:
    """The slice holds enough very dense material (>= ``METAL_HU``, 2,500 HU, over ``NOISE_METAL_AREA_MM2``) to
    streak the trunk's centre — metal, also short of the metal check's ``METAL_MIN_HU`` (dental work in a store
    that saturates below it) — so that the σ measured there is partly streaks, not the dose."""
    a = (measures or {}).get("metal_area_mm2", float("nan"))
    return a is not None and math.isfinite(a) and a >= NOISE_METAL_AREA_MM2


def motion_explained(noise: float, ring: float) -> float:
    """The factor on the motion score of a slice with this much classical noise and ring (or truncation)
    evidence (see ``fuse``): ``MOTION_EXPLAINED`` from the threshold on, and for noise from
    ``MOTION_NOISE_FROM`` (half the noise level) a ramp from 1 down to it. A patient outside the scan field
    streaks the slice from the cut edge as a ring does with its circles: the finding there is the truncation."""
    if max(noise, ring) >= CLASSICAL_THRESHOLD:
        return MOTION_EXPLAINED
    if noise > MOTION_NOISE_FROM:
        return 1.0 - (1.0 - MOTION_EXPLAINED) * (noise - MOTION_NOISE_FROM) / (CLASSICAL_THRESHOLD - MOTION_NOISE_FROM)
    return 1.0


def metal_density(measures: dict[str, float]) -> bool:
    """The slice holds metal-density pixels: its densest reaches ``METAL_MIN_HU``, or its store clipped it
    below that (``metal_clipped``: its top value, over 2,500 HU, held by 10 mm² of pixels or more)."""
    m = measures or {}
    top = m.get("metal_max_hu")
    return (top is not None and top >= METAL_MIN_HU) or (m.get("metal_clipped") or 0.0) >= 1.0


def no_metal_density(measures: dict[str, float]) -> bool:
    """True when the slice was measured and holds no pixel at metal density (``metal_density``)."""
    hu = (measures or {}).get("metal_max_hu", float("nan"))
    return hu is not None and math.isfinite(hu) and not metal_density(measures)
