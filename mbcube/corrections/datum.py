"""Stable-ground datum: the scene's robust offset (m) on off-glacier stable ground, where no
change is assumed, estimated after the ramp's varying terms are removed."""

from __future__ import annotations

from typing import Literal

import numpy as np

from mbcube.corrections.robust import median_nmad

DatumEstimator = Literal["median", "nmad_mean"]


def datum_from_histogram(
    counts: np.ndarray,
    lo_m: float,
    width_m: float,
    estimator: DatumEstimator,
    clipped: np.ndarray | None = None,
) -> float:
    """'median': the histogram's median. 'nmad_mean': the mean of the values within 3 NMAD of
    the median, given their summed [count, sum] in `clipped` (less robust, less noisy)."""
    med, _ = median_nmad(counts, lo_m, width_m)
    if estimator == "median":
        return med
    if clipped is None or clipped[0] == 0:
        return med
    return float(clipped[1] / clipped[0])
