"""QC checks: plain functions from a series' slices (and config / protocol rules) to findings.

``artifact`` (artifact.*), ``coverage`` (coverage.*), ``geometry`` (geometry.*), ``dose`` (dose.ctdivol,
centering.offset, noise.index), ``protocols`` (the rules that say what a series must cover).
"""

CHECKS = (
    "artifact.metal", "artifact.motion", "artifact.ring", "artifact.noise", "artifact.truncation",
    "coverage.top", "coverage.bottom", "coverage.absent", "coverage.overscan",
    "geometry.gap", "geometry.duplicate", "geometry.spacing", "geometry.tilt", "geometry.orientation",
    "dose.ctdivol", "centering.offset", "noise.index", "input.undecodable",
)
