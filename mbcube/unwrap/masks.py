"""Which pixels are unwrapped, input checks, and the connected regions of the valid mask."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mbcube.unwrap.errors import UnwrapInputError

#: Slack on the [-pi, pi] and [0, 1] ranges for values rounded by resampling or float32 (rad, 1).
PHASE_TOLERANCE_RAD = 1e-3
COHERENCE_TOLERANCE = 1e-3

#: 4-connectivity: the neighbours the engine's network links (no diagonals).
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def check_inputs(phase_rad: np.ndarray, coherence: np.ndarray, h_amb_m: np.ndarray) -> None:
    """Raise UnwrapInputError for wrapped phase outside [-pi, pi] (rad), coherence outside
    [0, 1], or a block with phase but no usable height of ambiguity (m) anywhere.

    NaN phase (outside the scene) and NaN coherence or h_amb at single pixels are allowed: those
    pixels are simply not unwrapped (see `valid_mask`)."""
    finite = np.isfinite(phase_rad)
    if not finite.any():
        return
    worst = float(np.max(np.abs(phase_rad[finite])))
    if worst > np.pi + PHASE_TOLERANCE_RAD:
        n_bad = int(np.count_nonzero(np.abs(phase_rad[finite]) > np.pi + PHASE_TOLERANCE_RAD))
        raise UnwrapInputError(
            f"wrapped phase must lie in [-pi, pi] rad; {n_bad} pixel(s) outside, up to "
            f"|phase| = {worst:.4g} rad. Is the layer already unwrapped, or in degrees? "
            "Give the wrapped phase in radians."
        )
    coh = coherence[np.isfinite(coherence)]
    if coh.size and (coh.min() < -COHERENCE_TOLERANCE or coh.max() > 1 + COHERENCE_TOLERANCE):
        raise UnwrapInputError(
            f"coherence must lie in [0, 1]; found values in [{coh.min():.4g}, {coh.max():.4g}]. "
            "Give the coherence magnitude (not in percent or dB)."
        )
    h_ok = np.isfinite(h_amb_m) & (h_amb_m != 0)
    if not (h_ok & finite).any():
        raise UnwrapInputError(
            "no height of ambiguity (h_amb_m) where the scene has phase: the layer is missing, "
            "NaN or zero here. Give h_amb in scenes.csv (a number or a raster)."
        )


def valid_mask(
    phase_rad: np.ndarray,
    coherence: np.ndarray,
    h_amb_m: np.ndarray,
    radar_mask: np.ndarray | None = None,
    ref_void: np.ndarray | None = None,
    coherence_min: float = 0.3,
) -> np.ndarray:
    """Pixels to unwrap (bool): finite phase, coherence >= coherence_min, a finite non-zero
    h_amb (m), not layover/shadow (radar_mask == 1) and not a reference-DEM void (ref_void == 1).
    """
    ok = np.isfinite(phase_rad) & np.isfinite(h_amb_m) & (h_amb_m != 0)
    with np.errstate(invalid="ignore"):
        ok &= coherence >= coherence_min  # NaN coherence compares False
    if radar_mask is not None:
        ok &= radar_mask != 1
    if ref_void is not None:
        ok &= ref_void != 1
    return ok


def region_labels(valid: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected regions (4-connected) of the valid mask: labels int32 (0 = not valid, 1..n)
    and n. These regions, not the engine's own component labels, are the stitching nodes: a
    glacier's low-coherence pixels carry no engine label but are still valid pixels here."""
    labels, n = ndimage.label(valid, structure=FOUR_CONNECTED)
    return labels.astype(np.int32, copy=False), int(n)
