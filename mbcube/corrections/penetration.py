"""C/X penetration difference per (sub-region, surface, elevation bin), from the reference
C-band DEM (SRTM-C) and X-band DEM (SRTM-X): penetration_m = ref_dem_x_m - ref_dem_m, after
aligning their datums on stable ground. Blocks reduce to count / sum / sum of squares per group;
the table is finished (means, uncertainties, filled bins) on the small summed arrays.

Table layout: region index 0 is the pooled table of all pixels (used where region_id is 0 and to
fill regions without X-band data), 1..R the study's regions; surface 1 clean ice, 2 debris.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from mbcube.corrections.bins import ELEV_MIN_M, bin_index, group_index, n_bins
from mbcube.errors import MbcubeWarning

SURFACES = (1, 2)


def sums_block(
    diff_m: np.ndarray,
    region_id: np.ndarray,
    surface: np.ndarray,
    ref_dem_m: np.ndarray,
    n_region: int,
    width_m: float,
) -> np.ndarray:
    """(3, n_region + 1, 2, n_bins) count, sum, sum of squares of `diff_m` (ref_dem_x_m -
    ref_dem_m, m) on the
    glacier pixels of a block where it is finite; region 0 pools all regions."""
    bins = n_bins(width_m)
    on = np.isfinite(diff_m) & (surface > 0)
    b = bin_index(ref_dem_m, width_m)
    out = np.zeros((3, n_region + 1, 2, bins))
    for pooled in (True, False):
        reg = np.zeros_like(region_id) if pooled else region_id
        g = group_index(reg, surface.astype(np.int64) - 1, b, n_region + 1, 2, bins)
        sel = on & (g >= 0)
        if pooled is False:
            sel &= region_id > 0
        gs, v = g[sel], diff_m[sel].astype(np.float64)
        size = (n_region + 1) * 2 * bins
        out[0] += np.bincount(gs, minlength=size).reshape(n_region + 1, 2, bins)
        out[1] += np.bincount(gs, weights=v, minlength=size).reshape(n_region + 1, 2, bins)
        out[2] += np.bincount(gs, weights=v * v, minlength=size).reshape(n_region + 1, 2, bins)
    return out


@dataclass(frozen=True)
class Table:
    """Penetration (m) per (region index 0..R, surface 1..2, bin) with its 1-sigma uncertainty,
    pixel count, and whether each entry was filled from elsewhere."""

    bin_lo_m: np.ndarray  # lower edges of the kept bins
    penetration_m: np.ndarray
    sigma_m: np.ndarray
    n_px: np.ndarray
    filled: np.ndarray
    width_m: float


def sigma_of_mean_m(std_m: np.ndarray, n: np.ndarray, res_m: float, corr_m: float) -> np.ndarray:
    """Standard error of a bin mean with spatially correlated errors (Rolstad et al. 2009):
    std * sqrt(pi L^2 / (5 A)) for an area A = n res^2 larger than pi L^2, else std."""
    area = n * res_m * res_m
    factor = np.sqrt(np.pi * corr_m**2 / (5.0 * np.maximum(area, 1e-9)))
    return std_m * np.minimum(factor, 1.0)


#: Bins pooled on each side of a bin by the smoothing along elevation (1: a 3-bin window).
SMOOTH_HALF_WIDTH = 1


def window_sums(sums: np.ndarray, half: int = SMOOTH_HALF_WIDTH) -> np.ndarray:
    """Count, sum and sum of squares pooled over the bins k - half .. k + half (along the last
    axis, clipped at the ends): the moments of all pixels in each bin's elevation window."""
    out = np.zeros_like(sums)
    n = sums.shape[-1]
    for shift in range(-half, half + 1):
        lo, hi = max(0, -shift), min(n, n - shift)
        out[..., lo:hi] += sums[..., lo + shift : hi + shift]
    return out


def finish_table(
    sums: np.ndarray,
    offset_m: float,
    width_m: float,
    min_px: int,
    res_m: float,
    corr_m: float = 500.0,
) -> Table:
    """The table from summed (count, sum, sumsq) of ref_dem_x_m - ref_dem_m, their datum offset
    (the same difference on stable ground, `offset_m`) removed.

    Smoothing along elevation: each bin's value is the mean of all pixels in its 3-bin window
    (the bin and its neighbours of the same region and surface), i.e. the count-weighted mean
    of the three bin means; its sigma is the standard error of that pooled mean (the pooled
    spread, which includes the spread between the bins, over the pooled area; Rolstad et al.
    2009). Filling: bins whose own count is below `min_px` are marked filled; they take the
    window's value when the window holds `min_px` pixels, else a linear interpolation in
    elevation of the other bins' values and sigmas within the same region and surface (the
    nearest value beyond the ends), or the pooled table when the region has no such bin (with
    a warning)."""
    count, total, total_sq = sums
    keep = np.flatnonzero(count[0].sum(axis=0) > 0)  # bins holding pooled glacier pixels
    if keep.size == 0:
        raise ValueError("no glacier pixel has both reference DEMs")
    sl = slice(keep[0], keep[-1] + 1)
    count = count[..., sl]
    w_count, w_total, w_sq = window_sums(np.stack([count, total[..., sl], total_sq[..., sl]]))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = w_total / w_count
        var = np.maximum(w_sq / w_count - mean**2, 0.0) * w_count / np.maximum(w_count - 1, 1)
    pen = mean - offset_m  # X surface above C surface: C penetrates deeper
    sigma = sigma_of_mean_m(np.sqrt(var), w_count, res_m, corr_m)
    bin_lo = ELEV_MIN_M + width_m * np.arange(keep[0], keep[-1] + 1)
    centres = bin_lo + 0.5 * width_m
    filled = count < min_px
    order = [0, *range(1, pen.shape[0])]  # the pooled table first: others may copy it
    for r in order:
        for s in range(pen.shape[1]):
            good = w_count[r, s] >= min_px
            if good.all():
                continue
            if good.any():
                bad = ~good
                pen[r, s, bad] = np.interp(centres[bad], centres[good], pen[r, s, good])
                sigma[r, s, bad] = np.interp(centres[bad], centres[good], sigma[r, s, good])
            elif r > 0 and (w_count[0, s] >= min_px).any():
                warnings.warn(
                    f"penetration: region index {r}, surface {SURFACES[s]} has no bin with "
                    f"{min_px} pixels of X-band reference; using the pooled table of all regions.",
                    MbcubeWarning,
                    stacklevel=2,
                )
                pen[r, s], sigma[r, s] = pen[0, s], sigma[0, s]
            else:
                other = pen[0, 1 - s] if (w_count[0, 1 - s] >= min_px).any() else None
                if other is None:
                    raise ValueError("too few glacier pixels with both reference DEMs")
                warnings.warn(
                    f"penetration: surface {SURFACES[s]} has no bin with {min_px} pixels of "
                    f"X-band reference anywhere; using surface {SURFACES[1 - s]}'s table.",
                    MbcubeWarning,
                    stacklevel=2,
                )
                pen[r, s], sigma[r, s] = other, sigma[0, 1 - s]
    return Table(bin_lo, pen, sigma, count.astype(np.int64), filled, width_m)


def constant_table(bin_lo_m: np.ndarray, n_region: int, value_m: float, width_m: float) -> Table:
    """A table holding one configured value everywhere (penetration='constant' or 'none')."""
    shape = (n_region + 1, 2, bin_lo_m.size)
    return Table(
        bin_lo_m,
        np.full(shape, value_m),
        np.zeros(shape),
        np.zeros(shape, dtype=np.int64),
        np.ones(shape, dtype=bool),
        width_m,
    )


def lookup(
    table_m: np.ndarray,
    bin_lo_m: np.ndarray,
    width_m: float,
    region_id: np.ndarray,
    surface: np.ndarray,
    ref_dem_m: np.ndarray,
) -> np.ndarray:
    """Penetration (m) of each glacier pixel of a block (0 off glacier): the table entry of its
    region (region 0 uses the pooled table), surface and elevation bin (clamped to the table's
    range)."""
    b = np.floor((ref_dem_m - bin_lo_m[0]) / width_m)
    b = np.clip(np.nan_to_num(b, nan=0.0), 0, bin_lo_m.size - 1).astype(np.int64)
    r = np.clip(region_id.astype(np.int64), 0, table_m.shape[0] - 1)
    s = np.clip(surface.astype(np.int64) - 1, 0, 1)
    return np.where(surface > 0, table_m[r, s, b], 0.0)
