"""Validity of dh pixels: inside the scene, valid reference, no layover/shadow, coherent enough."""

from __future__ import annotations

import numpy as np


def validity(
    dh_m: np.ndarray,
    ref_dem_m: np.ndarray,
    ref_void: np.ndarray,
    radar_mask: np.ndarray | None = None,
    coherence: np.ndarray | None = None,
    coherence_min: float = 0.3,
) -> np.ndarray:
    """Boolean validity of one block: finite dh (inside the scene) and reference, no reference
    void, and for insar scenes no layover/shadow/foreshortening and coherence >= coherence_min."""
    ok = np.isfinite(dh_m) & np.isfinite(ref_dem_m) & (ref_void == 0)
    if radar_mask is not None:
        ok &= radar_mask == 0
    if coherence is not None:
        with np.errstate(invalid="ignore"):
            ok &= coherence >= coherence_min
    return ok
