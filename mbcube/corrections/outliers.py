"""Outliers: per (region, surface, elevation bin) group, dh beyond `k` NMAD of the group's median.

Two reductions over blocks: count / sum / sum of squares per group (mean and std), then a
histogram per group of the standardised residual (dh - mean) / std, from which the median and
NMAD are read. The thresholds (m) are recorded per scene and group.
"""

from __future__ import annotations

import numpy as np

from mbcube.corrections.robust import NMAD_FACTOR

N_Z_BINS = 400
Z_MAX = 8.0


def moments_block(dh_m: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """(3, n_groups) count, sum, sum of squares of finite dh per group (group -1 ignored)."""
    sel = np.isfinite(dh_m) & (groups >= 0)
    g, v = groups[sel], dh_m[sel].astype(np.float64)
    return np.stack(
        [
            np.bincount(g, minlength=n_groups).astype(np.float64),
            np.bincount(g, weights=v, minlength=n_groups),
            np.bincount(g, weights=v * v, minlength=n_groups),
        ]
    )


def mean_std(moments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (m) per group from summed moments (NaN for empty groups)."""
    n, s, ss = moments
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = s / n
        std = np.sqrt(np.maximum(ss / n - mean**2, 0.0))
    return mean, np.where(std > 0, std, np.nan)


def zhist_block(
    dh_m: np.ndarray, groups: np.ndarray, mean: np.ndarray, std: np.ndarray
) -> np.ndarray:
    """(n_groups, N_Z_BINS + 2) int32 histogram per group of (dh - mean) / std on
    [-Z_MAX, Z_MAX] with an underflow and an overflow bin."""
    n_groups = mean.size
    sel = np.isfinite(dh_m) & (groups >= 0)
    g = groups[sel]
    sel_std = std[g]
    ok = np.isfinite(sel_std)
    g = g[ok]
    z = (dh_m[sel][ok] - mean[g]) / sel_std[ok]
    width = 2.0 * Z_MAX / N_Z_BINS
    k = np.clip(np.floor((z + Z_MAX) / width), -1, N_Z_BINS).astype(np.int64) + 1
    flat = np.bincount(g * (N_Z_BINS + 2) + k, minlength=n_groups * (N_Z_BINS + 2))
    return flat.reshape(n_groups, N_Z_BINS + 2).astype(np.int32)


def thresholds(
    hist: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    k_nmad: float,
    min_px: int = 20,
) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper dh thresholds (m) per group: median -+ k_nmad * NMAD, NaN (no filtering)
    for groups with fewer than `min_px` values."""
    width = 2.0 * Z_MAX / N_Z_BINS
    edges = -Z_MAX + width * np.arange(N_Z_BINS + 1)
    lower = np.full(mean.size, np.nan)
    upper = np.full(mean.size, np.nan)
    for g in np.flatnonzero(hist.sum(axis=1) >= min_px):
        h = hist[g].astype(np.float64)
        cum = np.concatenate([[0.0], np.cumsum(h[1:-1])]) + h[0]
        half = 0.5 * h.sum()
        med = float(np.interp(half, cum, edges))
        # median absolute deviation: smallest t with half the values inside med +- t
        ts = np.linspace(0.0, 2.0 * Z_MAX, 4 * N_Z_BINS + 1)
        inside = np.interp(med + ts, edges, cum, left=h[0], right=cum[-1]) - np.interp(
            med - ts, edges, cum, left=h[0], right=cum[-1]
        )
        mad = float(ts[min(int(np.searchsorted(inside, half)), ts.size - 1)])
        nmad = max(NMAD_FACTOR * mad, width)
        lower[g] = mean[g] + std[g] * (med - k_nmad * nmad)
        upper[g] = mean[g] + std[g] * (med + k_nmad * nmad)
    return lower, upper


def keep(dh_m: np.ndarray, groups: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """True where dh lies within its group's thresholds (or the group has none)."""
    g = np.where(groups >= 0, groups, 0)
    lo, hi = lower[g], upper[g]
    with np.errstate(invalid="ignore"):
        out = ~((dh_m < lo) | (dh_m > hi))
    return out & np.isfinite(dh_m)
