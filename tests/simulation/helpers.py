"""Helpers of the simulation tests: a tiny run and a tiny synthetic source to partition."""

from __future__ import annotations

from simulation.experiment import SourceSpec

TINY_RUN = {"teacher-name": "tiny-cnn", "image-size": 32, "num-rounds": 1, "batch-size": 16, "lr": 0.05}
"""Run settings small enough for a unit test (a tiny CNN at 32 px, one round)."""
SITES = (SourceSpec("synthetic", None, {"n-images": "90", "image-size": "32"}),)
"""90 synthetic images to partition into sites."""
