"""Elevation bins of the reference DEM and the (region, surface, bin) groups built on them."""

from __future__ import annotations

import numpy as np

#: Fixed elevation range of the bins (m): covers every land surface on Earth.
ELEV_MIN_M = -500.0
ELEV_MAX_M = 9000.0


def n_bins(width_m: float) -> int:
    return int(np.ceil((ELEV_MAX_M - ELEV_MIN_M) / width_m))


def bin_index(ref_dem_m: np.ndarray, width_m: float) -> np.ndarray:
    """Index of each pixel's elevation bin (lower edge ELEV_MIN_M + i * width_m), clipped to the
    range; -1 where the reference is NaN."""
    with np.errstate(invalid="ignore"):
        idx = np.floor((ref_dem_m - ELEV_MIN_M) / width_m)
    out = np.clip(np.nan_to_num(idx, nan=-1.0), -1, n_bins(width_m) - 1).astype(np.int64)
    out[~np.isfinite(ref_dem_m)] = -1
    return out


def group_index(
    region_id: np.ndarray,
    surface: np.ndarray,
    bin_idx: np.ndarray,
    n_region: int,
    n_surface: int,
    bins: int,
) -> np.ndarray:
    """Flat index of (region, surface, bin) groups, -1 where the bin is -1 or a label is out of
    range. Regions 0..n_region-1, surfaces 0..n_surface-1."""
    r = region_id.astype(np.int64)
    s = surface.astype(np.int64)
    ok = (bin_idx >= 0) & (r >= 0) & (r < n_region) & (s >= 0) & (s < n_surface)
    return np.where(ok, (r * n_surface + s) * bins + bin_idx, -1)
