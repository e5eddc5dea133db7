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


def _per_group(sorted_keys: np.ndarray, values: np.ndarray, block_keys: np.ndarray) -> np.ndarray:
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
    mean = _per_group(stats.keys, stats.mean, block_keys)
    std = _per_group(stats.keys, stats.std, block_keys)
    sel = (codes >= 0) & np.isfinite(dh_m)
    c = codes[sel]
    sd = std[c]
    ok = np.isfinite(sd)
    c = c[ok]
    z = (dh_m[sel][ok] - mean[c]) / sd[ok]
    zb = np.clip(np.floor((z + Z_MAX) / Z_WIDTH), -1, N_Z_BINS).astype(np.int64) + 1
    local = c.astype(np.int64) * N_CODES + zb
    if block_keys.size * N_CODES <= 4 * local.size:  # dense counts are cheaper than a sort
        counts = np.bincount(local)
        nz = np.flatnonzero(counts)
        counts = counts[nz]
    else:
        nz, counts = np.unique(local, return_counts=True)
    return SparseCounts(block_keys[nz // N_CODES] * N_CODES + nz % N_CODES, counts.astype(np.int64))


def merge_counts(*parts: SparseCounts) -> SparseCounts:
    """Sparse counts of several blocks, summed per code."""
    codes = np.concatenate([p.codes for p in parts])
    uniq, inv = np.unique(codes, return_inverse=True)
    counts = np.bincount(
        inv, weights=np.concatenate([p.counts for p in parts]), minlength=uniq.size
    )
    return SparseCounts(uniq, counts.round().astype(np.int64))


def _cdf(
    hist: SparseCounts, cum: np.ndarray, first: np.ndarray, keys: np.ndarray, z: np.ndarray
) -> np.ndarray:
    """Number of values of each group (keys, first = index of its first code) below z (the
    underflow counted, the overflow not; linear within a z bin)."""
    zc = np.clip(z, -Z_MAX, Z_MAX)
    pos = (zc + Z_MAX) / Z_WIDTH
    k = np.minimum(np.floor(pos), N_Z_BINS - 1).astype(np.int64)
    frac = pos - k
    code = keys * N_CODES + k + 1
    p = np.searchsorted(hist.codes, code)
    below = cum[p] - cum[first]
    pc = np.minimum(p, hist.codes.size - 1)
    hit = hist.codes[pc] == code
    return below + np.where(hit, frac * hist.counts[pc], 0.0)


def thresholds(
    hist: SparseCounts, stats: GroupStats, k_nmad: float, min_px: int = 20
) -> Thresholds:
    """Lower and upper dh thresholds (m) per group: median -+ k_nmad * NMAD (NMAD at least one z
    bin), NaN (not filtered) for groups with fewer than `min_px` values or no spread."""
    lower = np.full(stats.keys.size, np.nan)
    upper = np.full(stats.keys.size, np.nan)
    use = np.flatnonzero((stats.n >= min_px) & np.isfinite(stats.std))
    if use.size and hist.codes.size:
        keys = stats.keys[use]
        first = np.searchsorted(hist.codes, keys * N_CODES)
        last = np.searchsorted(hist.codes, (keys + 1) * N_CODES)
        cum = np.concatenate([[0.0], np.cumsum(hist.counts, dtype=np.float64)])
        half = 0.5 * (cum[last] - cum[first])

        def cdf(z: np.ndarray) -> np.ndarray:
            return _cdf(hist, cum, first, keys, z)

        # median: smallest z with half the values below (bisection on the piecewise-linear cdf)
        lo, hi = np.full(keys.size, -Z_MAX), np.full(keys.size, Z_MAX)
        for _ in range(48):
            mid = 0.5 * (lo + hi)
            up = cdf(mid) >= half
            hi, lo = np.where(up, mid, hi), np.where(up, lo, mid)
        med = hi
        # median absolute deviation: smallest t with half the values within med +- t
        lo, hi = np.zeros(keys.size), np.full(keys.size, 2.0 * Z_MAX)
        for _ in range(48):
            t = 0.5 * (lo + hi)
            up = cdf(med + t) - cdf(med - t) >= half
            hi, lo = np.where(up, t, hi), np.where(up, lo, t)
        nmad = np.maximum(NMAD_FACTOR * hi, Z_WIDTH)
        mean, std = stats.mean[use], stats.std[use]
        lower[use] = mean + std * (med - k_nmad * nmad)
        upper[use] = mean + std * (med + k_nmad * nmad)
    return Thresholds(stats.keys, stats.n, lower, upper)


def keep(dh_m: np.ndarray, codes: np.ndarray, block_keys: np.ndarray, th: Thresholds) -> np.ndarray:
    """True where dh is finite and within its group's thresholds (or its group has none)."""
    lo = _per_group(th.keys, th.lower, block_keys)
    hi = _per_group(th.keys, th.upper, block_keys)
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
