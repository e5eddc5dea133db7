"""Outliers: per (glacier, surface, elevation bin) group on glaciers and per (region, surface,
elevation bin) group elsewhere, dh beyond `k` NMAD of the group's median.

Each pixel gets an int64 group key (`group_keys`); a block keeps only the keys present in it
(`block_groups`: a local code per pixel and the block's sorted keys). Two reductions over blocks,
both sparse (keyed by the groups present, merged by key), so memory follows the pixels of a block
and the groups of a scene, never the number of glaciers in the study:

1. count / sum / sum of squares of dh per group (`moments_block`, `merge_moments`) -> mean, std;
2. a histogram per group of the standardised residual z = (dh - mean) / std on [-Z_MAX, Z_MAX]
   with an underflow and an overflow bin, stored as (key * N_CODES + z bin, count) pairs of the
   non-empty bins (`zhist_block`, `merge_counts`); the median and NMAD are read off it
   (`thresholds`).

`keep` looks each pixel's group up in the thresholds (searchsorted on the sorted keys).
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
import pandas as pd

from mbcube.corrections.robust import NMAD_FACTOR

N_Z_BINS = 400
Z_MAX = 8.0
N_CODES = N_Z_BINS + 2  # z bins per group: underflow, N_Z_BINS, overflow
Z_WIDTH = 2.0 * Z_MAX / N_Z_BINS
N_SURFACE = 3  # 0 off-glacier, 1 clean ice, 2 debris
REGION_LIMIT = 32768  # region_id is int16: 0..32767
#: the groups, as recorded by the corrections step
GROUPING = "glacier,surface,bin on glaciers; region,surface,bin elsewhere"


class Moments(NamedTuple):
    """Sorted group keys and their count, sum (m) and sum of squares (m2) of finite dh."""

    keys: np.ndarray
    n: np.ndarray
    s: np.ndarray
    ss: np.ndarray


class GroupStats(NamedTuple):
    """Sorted group keys with their pixel count, mean and standard deviation of dh (m; std NaN
    where zero or undefined)."""

    keys: np.ndarray
    n: np.ndarray
    mean: np.ndarray
    std: np.ndarray


class SparseCounts(NamedTuple):
    """Sorted unique int64 codes and their counts (int64)."""

    codes: np.ndarray
    counts: np.ndarray


class Thresholds(NamedTuple):
    """Per group (sorted keys): finite-dh pixel count, lower and upper dh thresholds (m; NaN = the
    group is not filtered)."""

    keys: np.ndarray
    n: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


# ----------------------------------------------------------------------------------- group keys


def glacier_offset(bins: int) -> int:
    """First key of the glacier groups; keys below it are (region, surface, bin) groups."""
    return REGION_LIMIT * N_SURFACE * bins


def group_keys(
    glacier_id: np.ndarray,
    region_id: np.ndarray,
    surface: np.ndarray,
    bin_idx: np.ndarray,
    bins: int,
) -> np.ndarray:
    """int64 group key of each pixel, -1 where it has no group (bin -1, label out of range).

    Glacier pixels (glacier_id > 0 and surface 1 or 2) are grouped per (glacier, surface, bin):
    key = glacier_offset(bins) + ((glacier_id - 1) * 3 + surface) * bins + bin. Other pixels are
    grouped per (region, surface, bin): key = (region_id * 3 + surface) * bins + bin."""
    g, r, s = np.asarray(glacier_id), np.asarray(region_id), np.asarray(surface)
    b = np.asarray(bin_idx, dtype=np.int64)
    on_glacier = (g > 0) & (s > 0)
    # label: REGION_LIMIT + glacier_id - 1 on glaciers, region_id elsewhere
    label = np.where(on_glacier, g.astype(np.int64) + (REGION_LIMIT - 1), r.astype(np.int64))
    key = (label * N_SURFACE + s.astype(np.int64)) * bins + b
    bad = (b < 0) | (b >= bins) | (s < 0) | (s >= N_SURFACE)
    bad |= ~on_glacier & ((r < 0) | (r >= REGION_LIMIT))
    key[bad] = -1
    return key


def decode_keys(keys: np.ndarray, bins: int) -> dict[str, np.ndarray]:
    """The labels of group keys: glacier (0 for region groups), region (-1 for glacier groups),
    surface and bin index."""
    keys = np.asarray(keys, dtype=np.int64)
    off = glacier_offset(bins)
    is_glacier = keys >= off
    rest = np.where(is_glacier, keys - off, keys)
    b = rest % bins
    s = (rest // bins) % N_SURFACE
    label = rest // (bins * N_SURFACE)
    return {
        "glacier": np.where(is_glacier, label + 1, 0),
        "region": np.where(is_glacier, -1, label),
        "surface": s,
        "bin": b,
    }


def block_groups(dh_m: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, block_keys): the block's sorted keys of the groups with finite dh, and each pixel's
    int32 index into them (-1: no group or dh not finite)."""
    k = np.where(np.isfinite(dh_m), keys, -1).ravel()
    codes, uniq = pd.factorize(k, sort=True)
    uniq = np.asarray(uniq, dtype=np.int64)
    if uniq.size and uniq[0] == -1:
        codes = codes - 1
        uniq = uniq[1:]
    return codes.astype(np.int32).reshape(np.shape(dh_m)), uniq


# ----------------------------------------------------------------------------- the reductions


def moments_block(dh_m: np.ndarray, codes: np.ndarray, block_keys: np.ndarray) -> Moments:
    """Count, sum and sum of squares of finite dh per group present in the block."""
    sel = (codes >= 0) & np.isfinite(dh_m)
    c, v = codes[sel], dh_m[sel].astype(np.float64)
    m = block_keys.size
    return Moments(
        block_keys,
        np.bincount(c, minlength=m).astype(np.int64),
        np.bincount(c, weights=v, minlength=m),
        np.bincount(c, weights=v * v, minlength=m),
    )


def merge_moments(*parts: Moments) -> Moments:
    """The moments of several blocks, summed per key."""
    keys = np.concatenate([p.keys for p in parts])
    uniq, inv = np.unique(keys, return_inverse=True)
    m = uniq.size

    def add(field: str) -> np.ndarray:
        return np.bincount(
            inv, weights=np.concatenate([getattr(p, field) for p in parts]), minlength=m
        )

    return Moments(uniq, add("n").round().astype(np.int64), add("s"), add("ss"))


def mean_std(moments: Moments) -> GroupStats:
    """Mean and standard deviation (m) per group from summed moments (std NaN if not > 0)."""
    n = moments.n.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = moments.s / n
        std = np.sqrt(np.maximum(moments.ss / n - mean**2, 0.0))
    return GroupStats(moments.keys, moments.n, mean, np.where(std > 0, std, np.nan))


def _lookup(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index, found) of `keys` in `sorted_keys`."""
    if sorted_keys.size == 0:
        return np.zeros(keys.size, dtype=np.int64), np.zeros(keys.size, dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.size - 1)
    return idx, sorted_keys[idx] == keys


def per_group(sorted_keys: np.ndarray, values: np.ndarray, block_keys: np.ndarray) -> np.ndarray:
    """values[k] for each block key found in sorted_keys, NaN for the others."""
    idx, found = _lookup(sorted_keys, block_keys)
    out = np.full(block_keys.size, np.nan)
    out[found] = values[idx[found]]
    return out


def zhist_block(
    dh_m: np.ndarray, codes: np.ndarray, block_keys: np.ndarray, stats: GroupStats
) -> SparseCounts:
    """Histogram of z = (dh - mean) / std per group present in the block, as counts of the
    non-empty (key * N_CODES + z bin) codes; z bin 0 is the underflow (z < -Z_MAX), N_CODES - 1
    the overflow. Groups without a finite std are left out."""
    mean = per_group(stats.keys, stats.mean, block_keys)
    std = per_group(stats.keys, stats.std, block_keys)
    sel = (codes >= 0) & np.isfinite(dh_m)
    c = codes[sel]
    sd = std[c]
    ok = np.isfinite(sd)
    c = c[ok]
    z = (dh_m[sel][ok] - mean[c]) / sd[ok]
    zb = np.clip(np.floor((z + Z_MAX) / Z_WIDTH), -1, N_Z_BINS).astype(np.int64) + 1
    local = c.astype(np.int64) * N_CODES + zb
    return count_codes(local, block_keys)


def count_codes(local: np.ndarray, block_keys: np.ndarray) -> SparseCounts:
    """SparseCounts of local codes (local group index * N_CODES + z bin) as (key * N_CODES + z
    bin, count) pairs of the non-empty ones, sorted."""
    if block_keys.size * N_CODES <= 4 * local.size:  # dense counts are cheaper than a sort
        counts = np.bincount(local)
        nz = np.flatnonzero(counts)
        counts = counts[nz]
    else:
        nz, counts = np.unique(local, return_counts=True)
    return SparseCounts(block_keys[nz // N_CODES] * N_CODES + nz % N_CODES, counts.astype(np.int64))


@numba.njit(nogil=True, cache=True)
def _merge_sorted(
    a: np.ndarray, ca: np.ndarray, b: np.ndarray, cb: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Union of two strictly increasing code arrays, their counts summed (one linear pass)."""
    out = np.empty(a.size + b.size, np.int64)
    cnt = np.empty(a.size + b.size, np.int64)
    i = j = n = 0
    while i < a.size or j < b.size:
        if j == b.size or (i < a.size and a[i] < b[j]):
            out[n], cnt[n] = a[i], ca[i]
            i += 1
        elif i == a.size or b[j] < a[i]:
            out[n], cnt[n] = b[j], cb[j]
            j += 1
        else:
            out[n], cnt[n] = a[i], ca[i] + cb[j]
            i += 1
            j += 1
        n += 1
    return out[:n], cnt[:n]


def _strictly_increasing(codes: np.ndarray) -> bool:
    return bool(codes.size < 2 or np.all(codes[1:] > codes[:-1]))


def merge_counts(*parts: SparseCounts) -> SparseCounts:
    """Sparse counts of several blocks, summed per code (sorted merges when each part's codes
    are sorted and unique, as every producer here makes them; a sort otherwise)."""
    if all(_strictly_increasing(p.codes) for p in parts):
        codes = np.asarray(parts[0].codes, dtype=np.int64)
        counts = np.asarray(parts[0].counts, dtype=np.int64)
        for p in parts[1:]:
            codes, counts = _merge_sorted(
                codes, counts, np.asarray(p.codes, np.int64), np.asarray(p.counts, np.int64)
            )
        return SparseCounts(codes, counts)
    codes = np.concatenate([p.codes for p in parts])
    uniq, inv = np.unique(codes, return_inverse=True)
    total = np.bincount(inv, weights=np.concatenate([p.counts for p in parts]), minlength=uniq.size)
    return SparseCounts(uniq, total.round().astype(np.int64))


# ----------------------------------------------- per-group robust statistics (numba kernel)


@numba.njit(nogil=True, cache=True)
def _cdf_at(under: float, cum: np.ndarray, c: np.ndarray, z: float) -> float:
    """Values below z of a z histogram (underflow counted, overflow not, linear within bins)."""
    zc = min(max(z, -Z_MAX), Z_MAX)
    pos = (zc + Z_MAX) / Z_WIDTH
    k = min(int(np.floor(pos)), N_Z_BINS - 1)
    return under + cum[k] + (pos - k) * c[k]


@numba.njit(nogil=True, cache=True)
def _group_stats(
    hcodes: np.ndarray,
    hcounts: np.ndarray,
    gkeys: np.ndarray,
    first: np.ndarray,
    last: np.ndarray,
    probs: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    n_groups, n_probs = gkeys.size, probs.size
    quant = np.empty((n_groups, n_probs))
    mad = np.empty(n_groups)
    c = np.zeros(N_Z_BINS)
    cum = np.zeros(N_Z_BINS + 1)
    edges = -Z_MAX + Z_WIDTH * np.arange(N_Z_BINS + 1)
    ts = np.empty(2 * N_Z_BINS + 4)
    for g in range(n_groups):
        c[:] = 0.0
        under = 0.0
        total = 0.0
        base = gkeys[g] * N_CODES
        for p in range(first[g], last[g]):
            k = hcodes[p] - base
            v = np.float64(hcounts[p])
            total += v
            if k == 0:
                under += v
            elif k <= N_Z_BINS:
                c[k - 1] += v
        for k in range(N_Z_BINS):
            cum[k + 1] = cum[k] + c[k]
        # quantiles: the smallest z in [-Z_MAX, Z_MAX] with cdf(z) >= p * total
        for q in range(n_probs):
            target = probs[q] * total
            z = Z_MAX
            if under >= target:
                z = -Z_MAX
            else:
                for k in range(N_Z_BINS):
                    below = under + cum[k]
                    if below + c[k] >= target:
                        z = edges[k] + Z_WIDTH * (target - below) / c[k]
                        break
            quant[g, q] = z
        # MAD about the median (probs[0] must be 0.5): the smallest t in [0, 2 Z_MAX] with
        # cdf(med + t) - cdf(med - t) >= total / 2; piecewise linear between the distances of
        # the bin edges from the median, merged in increasing order
        med, half = quant[g, 0], 0.5 * total
        m = 0
        ts[m] = 0.0
        m += 1
        right = 0
        while right <= N_Z_BINS and edges[right] < med:
            right += 1
        left = right - 1
        while left >= 0 or right <= N_Z_BINS:
            dl = med - edges[left] if left >= 0 else np.inf
            dr = edges[right] - med if right <= N_Z_BINS else np.inf
            if dl <= dr:
                ts[m] = dl
                left -= 1
            else:
                ts[m] = dr
                right += 1
            m += 1
        ts[m] = 2.0 * Z_MAX
        m += 1
        # (the cdf at a bin edge carries float rounding: a tolerance keeps exact ties exact)
        tol = 1e-9 * max(total, 1.0)
        t_prev, g_prev = 0.0, 0.0
        t_star = 2.0 * Z_MAX
        for k in range(m):
            t = min(ts[k], 2.0 * Z_MAX)
            gt = _cdf_at(under, cum, c, med + t) - _cdf_at(under, cum, c, med - t)
            if gt >= half - tol:
                if k == 0 or gt - g_prev <= tol:
                    t_star = t
                else:
                    frac = min(max((half - g_prev) / (gt - g_prev), 0.0), 1.0)
                    t_star = t_prev + (t - t_prev) * frac
                break
            t_prev, g_prev = t, gt
        mad[g] = t_star
    return quant, mad


def group_z_stats(
    hist_codes: np.ndarray,
    hist_counts: np.ndarray,
    group_keys: np.ndarray,
    probs: tuple[float, ...] = (0.5,),
) -> tuple[np.ndarray, np.ndarray]:
    """Per group key, from the sparse z histograms (outliers.SparseCounts: codes key * N_CODES +
    z bin, sorted): the z quantiles at `probs` (probs[0] = 0.5, the median) and the median
    absolute deviation of z about the median, both read exactly off the piecewise-linear cdf
    that outliers.thresholds bisects (underflow below -Z_MAX, overflow above Z_MAX, values
    uniform within a bin). Returns (quantiles (groups, probs), mad (groups))."""
    if probs[0] != 0.5:
        raise ValueError("probs[0] must be 0.5 (the median, about which the MAD is taken)")
    keys = np.asarray(group_keys, dtype=np.int64)
    first = np.searchsorted(hist_codes, keys * N_CODES)
    last = np.searchsorted(hist_codes, (keys + 1) * N_CODES)
    return _group_stats(
        np.asarray(hist_codes, dtype=np.int64),
        np.asarray(hist_counts, dtype=np.int64),
        keys,
        first,
        last,
        np.asarray(probs, dtype=np.float64),
    )


def thresholds(
    hist: SparseCounts,
    stats: GroupStats,
    k_nmad: float,
    min_px: int = 20,
    band_quantile: float = 0.5,
    holds_zero: bool = False,
) -> Thresholds:
    """Lower and upper dh thresholds (m) per group: q(p) - k_nmad * NMAD and q(1 - p) + k_nmad *
    NMAD, q the group's quantiles at p = band_quantile (0.5: median -+ k_nmad * NMAD) and NMAD
    about the median (at least one z bin); with holds_zero, the band widened to hold 0 (lower <=
    0 <= upper). NaN (not filtered) for groups with fewer than `min_px` values or no spread. All
    read off the group's z histogram (group_z_stats)."""
    if not 0.0 <= band_quantile <= 0.5:
        raise ValueError(f"band_quantile must be within [0, 0.5], got {band_quantile}")
    lower = np.full(stats.keys.size, np.nan)
    upper = np.full(stats.keys.size, np.nan)
    use = np.flatnonzero((stats.n >= min_px) & np.isfinite(stats.std))
    if use.size and hist.codes.size:
        p = float(band_quantile)
        quant, mad = group_z_stats(hist.codes, hist.counts, stats.keys[use], (0.5, p, 1.0 - p))
        nmad = np.maximum(NMAD_FACTOR * mad, Z_WIDTH)
        mean, std = stats.mean[use], stats.std[use]
        lower[use] = mean + std * (quant[:, 1] - k_nmad * nmad)
        upper[use] = mean + std * (quant[:, 2] + k_nmad * nmad)
        if holds_zero:
            lower[use] = np.minimum(lower[use], 0.0)
            upper[use] = np.maximum(upper[use], 0.0)
    return Thresholds(stats.keys, stats.n, lower, upper)


def keep(dh_m: np.ndarray, codes: np.ndarray, block_keys: np.ndarray, th: Thresholds) -> np.ndarray:
    """True where dh is finite and within its group's thresholds (or its group has none)."""
    lo = per_group(th.keys, th.lower, block_keys)
    hi = per_group(th.keys, th.upper, block_keys)
    out = np.isfinite(dh_m)
    has = codes >= 0
    c = codes[has]
    v = dh_m[has]
    with np.errstate(invalid="ignore"):
        out[has] &= ~((v < lo[c]) | (v > hi[c]))
    return out


def rejected_block(ok: np.ndarray, codes: np.ndarray, block_keys: np.ndarray) -> SparseCounts:
    """Number of pixels with a group that `keep` rejected, per group key of the block (only the
    groups with rejections)."""
    c = codes[(codes >= 0) & ~ok]
    counts = np.bincount(c, minlength=block_keys.size)
    nz = np.flatnonzero(counts)
    return SparseCounts(block_keys[nz], counts[nz].astype(np.int64))
