"""The fixed craniocaudal body scale shared by synthesis, training, checks and the console.

Positions are millimetres below the vertex on a *reference* adult (175 cm). A patient of another size maps
onto this scale linearly: ``ref_mm = (z_vertex - z) / scale`` where ``scale`` is the patient's size factor
and ``z`` is the DICOM patient z (head-first supine: z grows towards the head).

The position head of the network predicts ``ref_mm`` for each axial slice; the series fits ``ref_mm``
against slice z robustly and reads each landmark's patient z from the fit.
"""

from __future__ import annotations

# Landmarks on the reference scale (mm below the vertex). Values follow adult anthropometry for a 175 cm
# body; they are anchors for coverage rules, not a segmentation.
LANDMARKS: dict[str, float] = {
    "vertex": 0.0,
    "orbit_roof": 75.0,
    "skull_base": 110.0,
    "c2": 150.0,
    "hyoid": 185.0,
    "thyroid": 220.0,
    "lung_apex": 255.0,
    "sternal_notch": 275.0,
    "carina": 345.0,
    "liver_dome": 430.0,
    "lung_base": 490.0,
    "kidney_top": 500.0,
    "renal_hilum": 560.0,
    "iliac_crest": 665.0,
    "acetabular_roof": 800.0,
    "femoral_head": 820.0,
    "pubic_symphysis": 860.0,
    "ischial_tuberosity": 900.0,
    "mid_thigh": 1080.0,
}

# Human-readable names for messages and the console.
LANDMARK_NAMES: dict[str, str] = {
    "vertex": "vertex",
    "orbit_roof": "orbital roof",
    "skull_base": "skull base",
    "c2": "C2",
    "hyoid": "hyoid",
    "thyroid": "thyroid",
    "lung_apex": "lung apices",
    "sternal_notch": "sternal notch",
    "carina": "carina",
    "liver_dome": "liver dome",
    "lung_base": "lung bases",
    "kidney_top": "upper pole of the kidneys",
    "renal_hilum": "renal hila",
    "iliac_crest": "iliac crests",
    "acetabular_roof": "acetabular roof",
    "femoral_head": "femoral heads",
    "pubic_symphysis": "pubic symphysis",
    "ischial_tuberosity": "ischial tuberosities",
    "mid_thigh": "mid-thigh",
}

BODY_SCALE_MIN = -20.0  # a little above the vertex
BODY_SCALE_MAX = 1100.0  # mid-thigh and a margin


def ordered_landmarks() -> list[tuple[str, float]]:
    return sorted(LANDMARKS.items(), key=lambda kv: kv[1])
