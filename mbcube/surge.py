"""Surge-type glacier candidates from the pattern of elevation change along the glacier.

An active surge moves ice down: the tongue thickens while the reservoir above thins, the reverse
of a glacier losing mass in the usual way (thinning most at the tongue). As in Lin et al. (2017),
a glacier is a candidate when its lower reaches thicken and its upper reaches thin:

    rate(lower third of the area) > +min_lower_m_yr  and
    rate(lower third) - rate(upper third) > min_contrast_m_yr

with each third's rate the area-weighted mean of the glacier's filled elevation profile (m/yr).
Quiescent surge glaciers (tongue thinning, reservoir thickening) look like ordinary glaciers with
a steep balance gradient and are not flagged. The outlines' surge column, where given (0/1),
overrides the candidate flag (`effective_surge`).
"""

from __future__ import annotations

import numpy as np

from mbcube.massbalance import GlacierStats, filled_profile

#: A candidate's lower third thickens by more than this (m/yr).
MIN_LOWER_M_YR = 0.2
#: ... and by this much more than its upper third (m/yr).
MIN_CONTRAST_M_YR = 0.5


def reach_rates(
    stats: GlacierStats, bin_lower_m: np.ndarray, bin_width_m: float, min_px_per_bin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Area-weighted mean dh/dt (m/yr) of each glacier's lowest and highest third of area,
    from its filled elevation profile (both surfaces together); NaN without measurements."""
    z_m = np.asarray(bin_lower_m, dtype=float) + 0.5 * bin_width_m
    count = stats.count.sum(axis=2, keepdims=True)
    rate, _ = filled_profile(
        stats.rate_sum.sum(axis=2, keepdims=True),
        count,
        z_m,
        min_px_per_bin,
        stats.weight.sum(axis=2, keepdims=True),
    )
    rate = rate[..., 0]  # (G, B)
    area = stats.area_m2.sum(axis=2)  # (G, B)
    total = area.sum(axis=1, keepdims=True)
    below = np.cumsum(area, axis=1) - 0.5 * area  # area below each bin's middle
    share = np.divide(below, total, out=np.full(area.shape, np.nan), where=total > 0)

    def reach(in_reach: np.ndarray) -> np.ndarray:
        weight = np.where(in_reach & np.isfinite(rate), area, 0.0)
        summed = (np.nan_to_num(rate) * weight).sum(axis=1)
        sum_weight = weight.sum(axis=1)
        return np.divide(summed, sum_weight, out=np.full(len(summed), np.nan), where=sum_weight > 0)

    return reach(share <= 1 / 3), reach(share >= 2 / 3)


def surge_candidates(
    stats: GlacierStats,
    bin_lower_m: np.ndarray,
    bin_width_m: float = 50.0,
    min_px_per_bin: int = 10,
    min_lower_m_yr: float = MIN_LOWER_M_YR,
    min_contrast_m_yr: float = MIN_CONTRAST_M_YR,
) -> np.ndarray:
    """(G,) bool: glaciers whose lower third thickens and upper third thins (active surge)."""
    lower, upper = reach_rates(stats, bin_lower_m, bin_width_m, min_px_per_bin)
    with np.errstate(invalid="ignore"):
        return (lower > min_lower_m_yr) & (lower - upper > min_contrast_m_yr)


def effective_surge(outline_surge: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """(G,) int 0/1: the outlines' surge value where given (0 or 1), else the candidate flag."""
    given = np.isin(outline_surge, (0, 1))
    return np.where(given, outline_surge, candidates.astype(int)).astype(int)
