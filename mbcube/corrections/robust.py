"""Robust location and scale (median, NMAD) of values spread over many blocks.

Each block reduces its values to a fixed-edge histogram (fine bins around a centre, plus an
underflow and an overflow bin); the histograms add up over blocks, and the median and NMAD are read
off the summed histogram to within a small fraction of its bin width. No pixel is gathered.
"""

from __future__ import annotations

import numpy as np

NMAD_FACTOR = 1.4826
N_HIST_BINS = 4000


def block_quantiles(values: np.ndarray, max_sample: int = 65536) -> np.ndarray:
    """[count, q25, q50, q75] of the finite `values` of one block (NaN quantiles if none); the
    quantiles from at most `max_sample` evenly strided values (they only seed robust steps)."""
    v = values[np.isfinite(values)]
    if v.size == 0:
        return np.array([0.0, np.nan, np.nan, np.nan])
    step = max(1, v.size // max_sample)
    q = np.percentile(v[::step], [25.0, 50.0, 75.0])
    return np.array([float(v.size), *q])


def combine_quantiles(rows: list[np.ndarray]) -> tuple[float, float, int]:
    """A rough centre and scale from per-block quantiles: the count-weighted median of the block
    medians and of the block IQRs / 1.349. Returns (centre, scale, total count)."""
    arr = np.array([r for r in rows if r[0] > 0])
    if arr.size == 0:
        return np.nan, np.nan, 0
    order = np.argsort(arr[:, 2])
    w = np.cumsum(arr[order, 0])
    centre = float(arr[order, 2][np.searchsorted(w, 0.5 * w[-1])])
    iqr = arr[:, 3] - arr[:, 1]
    order = np.argsort(iqr)
    w = np.cumsum(arr[order, 0])
    scale = float(iqr[order][np.searchsorted(w, 0.5 * w[-1])] / 1.349)
    return centre, scale, int(arr[:, 0].sum())


def hist_range(centre: float, scale: float, min_half_m: float = 1.0) -> tuple[float, float]:
    """(lower edge, bin width) of the fine histogram around `centre`: +-max(12 scale, min_half_m)."""
    half = max(12.0 * scale, min_half_m) if np.isfinite(scale) else min_half_m
    return centre - half, 2.0 * half / N_HIST_BINS


def histogram(values: np.ndarray, lo: float, width: float) -> np.ndarray:
    """Counts (int64, N_HIST_BINS + 2) of the finite `values`: [under, bins..., over]."""
    v = values[np.isfinite(values)]
    idx = np.floor((v - lo) / width)
    idx = np.clip(idx, -1, N_HIST_BINS).astype(np.int64) + 1
    return np.bincount(idx, minlength=N_HIST_BINS + 2)


def _cdf(counts: np.ndarray, lo: float, width: float, t: np.ndarray) -> np.ndarray:
    """Number of values <= t, linear within bins (underflow counted below lo)."""
    inner = counts[1:-1].astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(inner)]) + counts[0]
    edges = lo + width * np.arange(N_HIST_BINS + 1)
    return np.interp(t, edges, cum, left=counts[0], right=cum[-1])


def median_nmad(counts: np.ndarray, lo: float, width: float) -> tuple[float, float]:
    """Median and NMAD (1.4826 x median absolute deviation) from a summed histogram (m)."""
    n = float(counts.sum())
    if n == 0:
        return np.nan, np.nan
    inner = counts[1:-1].astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(inner)]) + counts[0]
    edges = lo + width * np.arange(N_HIST_BINS + 1)
    half = 0.5 * n
    if not cum[0] <= half <= cum[-1]:
        return np.nan, np.nan  # the median lies outside the histogram's range
    k = int(np.searchsorted(cum, half, side="left"))
    k = min(max(k, 1), N_HIST_BINS)
    c0, c1 = cum[k - 1], cum[k]
    med = edges[k - 1] + (width * (half - c0) / (c1 - c0) if c1 > c0 else 0.0)
    lo_t, hi_t = 0.0, float(N_HIST_BINS * width)
    for _ in range(60):  # bisection: half of the values within +-t of the median
        t = 0.5 * (lo_t + hi_t)
        inside = _cdf(counts, lo, width, np.array(med + t)) - _cdf(
            counts, lo, width, np.array(med - t)
        )
        if inside >= half:
            hi_t = t
        else:
            lo_t = t
    return float(med), float(NMAD_FACTOR * hi_t)


def clipped_sum(values: np.ndarray, centre: float, half_width: float) -> np.ndarray:
    """[count, sum] of the finite values within centre +- half_width."""
    v = values[np.isfinite(values)]
    v = v[np.abs(v - centre) <= half_width]
    return np.array([float(v.size), float(v.sum())])
