"""medqc: real-time CT quality control beside the scanner."""

__version__ = "0.1.0"

ARTIFACTS = ("metal", "motion", "ring", "noise", "truncation")
"""Artifact classes, in the order of the networks' artifact output."""
