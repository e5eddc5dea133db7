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
from mbcube.uncertainty import spatial_variance_ratio

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
    #: (glacier index 0..G, surface) added to the table on each glacier (penetration
    #: 'xband_glacier', `GlacierAdjustment.offset_m`); None: the table alone
    glacier_offset_m: np.ndarray | None = None


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


# --------------------------------------------------------------- per-glacier statistics


#: Share of the variance of X minus C noise that is SRTM-X's own: the SRTM mission's relative
#: height accuracies (90 %) are 10 m for C band and 6 m for X band, 6^2 / (10^2 + 6^2) = 0.26.
X_NOISE_VARIANCE_SHARE = 0.26

#: Largest relative between-glacier spread: where a surface's table is near 0 (debris) the
#: factor is ill-determined and its estimate unbounded; beyond +-100 % is not physical.
MAX_KAPPA = 1.0

#: Fewest glaciers with X-band pixels in a (region, surface) to estimate its own between-glacier
#: spread; fewer: the pooled table's (region 0) spread is used.
MIN_GLACIERS_FOR_SPREAD = 3


@dataclass(frozen=True)
class GlacierMoments:
    """Moments of ref_dem_x_m - ref_dem_m (m) per (glacier, region, surface, bin) cell, sparse:
    `keys` encode the cell (see `encode_cells`); `values` (4, K) hold the count of pixels with
    both references (n_x), their sum and sum of squares (m, m^2), and the count of the cell's
    pixels with a C-band reference (n_ref, with or without X)."""

    keys: np.ndarray
    values: np.ndarray
    n_region: int
    bins: int

    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(glacier, region, surface index 0..1, bin) of each key."""
        return decode_cells(self.keys, self.n_region, self.bins)


def encode_cells(
    glacier: np.ndarray,
    region: np.ndarray,
    surface_idx: np.ndarray,
    b: np.ndarray,
    n_region: int,
    bins: int,
) -> np.ndarray:
    """Flat int64 key of (glacier, region 0..n_region, surface index 0..1, bin 0..bins - 1)."""
    g = glacier.astype(np.int64)
    return ((g * (n_region + 1) + region.astype(np.int64)) * 2 + surface_idx) * bins + b


def decode_cells(
    keys: np.ndarray, n_region: int, bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(glacier, region, surface index, bin) of `encode_cells` keys."""
    b = keys % bins
    rest = keys // bins
    s = rest % 2
    rest = rest // 2
    return rest // (n_region + 1), rest % (n_region + 1), s, b


def glacier_moments_block(
    diff_m: np.ndarray,
    glacier_id: np.ndarray,
    region_id: np.ndarray,
    surface: np.ndarray,
    ref_dem_m: np.ndarray,
    n_region: int,
    width_m: float,
) -> GlacierMoments:
    """`GlacierMoments` of one block: glacier pixels (glacier_id > 0, surface 1 or 2) with a
    finite reference elevation; `diff_m` is ref_dem_x_m - ref_dem_m (NaN without X band or on a
    void). Regions outside 0..n_region count as 0."""
    bins = n_bins(width_m)
    b = bin_index(ref_dem_m, width_m)
    on = (glacier_id > 0) & (surface > 0) & (surface <= 2) & (b >= 0)
    region = region_id.astype(np.int64)
    region = np.where((region >= 0) & (region <= n_region), region, 0)
    surface_idx = surface[on].astype(np.int64) - 1
    keys = encode_cells(glacier_id[on], region[on], surface_idx, b[on], n_region, bins)
    d = diff_m[on].astype(np.float64)
    has_x = np.isfinite(d)
    uniq, inv = np.unique(keys, return_inverse=True)
    values = np.zeros((4, uniq.size))
    values[0] = np.bincount(inv, weights=has_x.astype(np.float64), minlength=uniq.size)
    dz = np.where(has_x, d, 0.0)
    values[1] = np.bincount(inv, weights=dz, minlength=uniq.size)
    values[2] = np.bincount(inv, weights=dz * dz, minlength=uniq.size)
    values[3] = np.bincount(inv, minlength=uniq.size)
    return GlacierMoments(uniq, values, n_region, bins)


def merge_glacier_moments(*parts: GlacierMoments) -> GlacierMoments:
    """Sum of `GlacierMoments` (of the same n_region and bins) by cell."""
    if not parts:
        raise ValueError("no glacier moments to merge")
    keys = np.concatenate([p.keys for p in parts])
    values = np.concatenate([p.values for p in parts], axis=1)
    uniq, inv = np.unique(keys, return_inverse=True)
    out = np.zeros((4, uniq.size))
    for k in range(4):
        out[k] = np.bincount(inv, weights=values[k], minlength=uniq.size)
    return GlacierMoments(uniq, out, parts[0].n_region, parts[0].bins)


#: Block sizes (px) of the stable-ground noise curve (`block_moments`).
BLOCK_PX = (1, 2, 4, 8, 16, 32, 64)
#: A block counts when at least this share of its pixels are stable with both references.
MIN_BLOCK_FILL = 0.5
#: Fewest blocks of a size for its variance to enter the noise curve.
NOISE_MIN_BLOCKS = 10


def block_moments(
    diff_m: np.ndarray, stable: np.ndarray, block_px: tuple[int, ...] = BLOCK_PX
) -> np.ndarray:
    """(len(block_px), 4) per block size k: number of k x k blocks of the tile (aligned to its
    corner, partial blocks at the far edges left out) holding at least MIN_BLOCK_FILL x k^2
    stable pixels with a finite `diff_m` (X minus C, m); the sum of their means (m), of their
    squared means (m^2), and of their pixels."""
    ok = (stable == 1) & np.isfinite(diff_m)
    values = np.where(ok, diff_m, 0.0).astype(np.float64)
    out = np.zeros((len(block_px), 4))
    for i, k in enumerate(block_px):
        ny, nx = (diff_m.shape[0] // k) * k, (diff_m.shape[1] // k) * k
        if ny == 0 or nx == 0:
            continue
        cnt = ok[:ny, :nx].reshape(ny // k, k, nx // k, k).sum(axis=(1, 3))
        tot = values[:ny, :nx].reshape(ny // k, k, nx // k, k).sum(axis=(1, 3))
        use = cnt >= MIN_BLOCK_FILL * k * k
        mean = tot[use] / cnt[use]
        out[i] = (use.sum(), mean.sum(), (mean * mean).sum(), cnt[use].sum())
    return out


@dataclass(frozen=True)
class NoiseCurve:
    """Variance (m^2) of the mean of X minus C noise over an area (m^2), measured on stable
    ground from the spread of block means (the multi-scale approach of Hugonnet et al. 2022):
    it holds the white and the correlated parts at the scales that matter, with no assumed
    correlation length."""

    area_m2: np.ndarray  #: (K,) mean area of the blocks of each size, increasing
    var_m2: np.ndarray  #: (K,) variance of their means, non-increasing
    n_blocks: np.ndarray  #: (K,) blocks behind each variance
    measured: bool  #: False: a Rolstad curve from an assumed correlation (too little ground)

    def variance(self, area_m2: np.ndarray | float) -> np.ndarray:
        """Noise variance (m^2) of a mean over `area_m2`: log-log interpolation between the
        measured sizes; below the smallest, its variance; beyond the largest, the decay of the
        last two sizes (slope clipped to [-1, 0], -1 being uncorrelated blocks) continued."""
        a = np.maximum(np.asarray(area_m2, dtype=np.float64), self.area_m2[0])
        la, lv = np.log(self.area_m2), np.log(np.maximum(self.var_m2, 1e-12))
        inside = np.interp(np.log(a), la, lv)
        if la.size >= 2:
            slope = float(np.clip((lv[-1] - lv[-2]) / (la[-1] - la[-2]), -1.0, 0.0))
        else:
            slope = -1.0
        beyond = lv[-1] + slope * (np.log(a) - la[-1])
        return np.exp(np.where(a > self.area_m2[-1], beyond, inside))


def rolstad_curve(sigma_m: float, corr_m: float, res_m: float) -> NoiseCurve:
    """A `NoiseCurve` from a pixel spread and an assumed spherical correlation (Rolstad et al.
    2009, `uncertainty.spatial_variance_ratio`): the fallback where stable ground holds too few blocks."""
    area = res_m * res_m * 4.0 ** np.arange(12)
    var = sigma_m**2 * np.maximum(spatial_variance_ratio(area, corr_m), 1.0 / 4.0 ** np.arange(12))
    return NoiseCurve(area, var, np.zeros(area.size, dtype=np.int64), False)


def noise_curve(
    blocks: np.ndarray,
    res_m: float,
    fallback_sigma_m: float,
    fallback_corr_m: float,
    min_blocks: int = NOISE_MIN_BLOCKS,
) -> NoiseCurve:
    """The `NoiseCurve` from summed `block_moments`: per block size with at least `min_blocks`
    blocks, the variance of the block means about their mean (made non-increasing with size:
    a mean over more ground cannot be noisier). Fewer than two sizes: `rolstad_curve`."""
    n, total, total_sq, px = blocks.T
    keep = n >= min_blocks
    if keep.sum() < 2:
        return rolstad_curve(fallback_sigma_m, fallback_corr_m, res_m)
    n, total, total_sq, px = n[keep], total[keep], total_sq[keep], px[keep]
    var = np.maximum(total_sq / n - (total / n) ** 2, 0.0) * n / np.maximum(n - 1, 1)
    var = np.minimum.accumulate(var)
    area = px / n * res_m * res_m
    return NoiseCurve(area, var, n.astype(np.int64), True)


def _table_bin(table: Table, b: np.ndarray) -> np.ndarray:
    """Index into the table's bins of absolute bin indices (clamped to the table's range)."""
    first = round((float(table.bin_lo_m[0]) - ELEV_MIN_M) / table.width_m)
    return np.clip(b - first, 0, table.bin_lo_m.size - 1)


@dataclass(frozen=True)
class Spread:
    """Between-glacier spread of the penetration table (m) and how it was estimated."""

    std_m: np.ndarray  #: (region index 0..R, surface, bin): kappa x |table value|
    kappa: np.ndarray  #: (region index 0..R, surface): relative spread of glacier factors
    n_glaciers: np.ndarray  #: (region index 0..R, surface): glaciers with X band used
    own: np.ndarray  #: (region index 0..R, surface): kappa estimated from the region itself


def between_glacier_spread(
    moments: GlacierMoments,
    table: Table,
    offset_m: float,
    noise: NoiseCurve,
    res_m: float,
    min_glaciers: int = MIN_GLACIERS_FOR_SPREAD,
) -> Spread:
    """The spread between glaciers of their mean X minus C penetration in each table cell,
    without the part that is the DEMs' noise (a method-of-moments estimate, as in random-effects
    meta-analysis).

    In a cell (region, surface, bin) glacier g holds n_g pixels with mean m_g; N = sum n_g,
    M = sum n_g m_g / N. Q = sum n_g (m_g - M)^2 has the expectation
    tau^2 (N - sum n_g^2 / N) + sum n_g v_g (1 - n_g / N), with tau the spread of the glaciers'
    true means and v_g = noise.variance(n_g res^2) the noise variance of m_g (X minus C on
    stable ground, `NoiseCurve`). A cell holds a few glaciers, too few to estimate tau alone,
    so glaciers are taken to differ by a factor (tau = kappa |table value|: the same snow and
    firn penetrate in proportion on one glacier):
    kappa^2 = (sum Q - sum noise) / sum (N - sum n_g^2 / N) table^2 over the bins of a
    (region, surface), in [0, MAX_KAPPA]. Regions with fewer than `min_glaciers` glaciers with
    X band in a surface take the pooled estimate (region index 0)."""
    glacier, region, s_idx, b = moments.cells()
    n_x, total = moments.values[0], moments.values[1]
    n_reg = table.penetration_m.shape[0]
    kappa = np.zeros((n_reg, 2))
    n_glaciers = np.zeros((n_reg, 2), dtype=np.int64)
    own = np.zeros((n_reg, 2), dtype=bool)
    has = n_x > 0
    kt = _table_bin(table, b)
    stride = int(glacier.max(initial=0)) + 1
    for r in range(n_reg):
        for s in range(2):
            sel = has & (s_idx == s) & ((region == r) if r > 0 else True)
            if not sel.any():
                continue
            # one entry per (glacier, bin): pooled over regions for region index 0
            uniq, inv = np.unique(kt[sel] * stride + glacier[sel], return_inverse=True)
            n = np.bincount(inv, weights=n_x[sel])
            m = np.bincount(inv, weights=total[sel] - n_x[sel] * offset_m) / n
            g_of, k_of = uniq % stride, uniq // stride
            n_glaciers[r, s] = np.unique(g_of).size
            v = noise.variance(n * res_m * res_m)
            big_n = np.bincount(k_of, weights=n)
            mean = np.bincount(k_of, weights=n * m) / np.where(big_n > 0, big_n, 1)
            q = np.bincount(k_of, weights=n * (m - mean[k_of]) ** 2)
            noise_q = np.bincount(k_of, weights=n * v * (1.0 - n / big_n[k_of]))
            sum_n2 = np.bincount(k_of, weights=n * n)
            t = table.penetration_m[r, s, : big_n.size]
            with np.errstate(invalid="ignore", divide="ignore"):
                denom = np.where(big_n > 0, big_n - sum_n2 / big_n, 0.0) * t**2
            d = float(np.sum(denom))
            if d > 0:
                k2 = max(float(np.sum(q) - np.sum(noise_q)), 0.0) / d
                kappa[r, s] = min(np.sqrt(k2), MAX_KAPPA)
            own[r, s] = n_glaciers[r, s] >= min_glaciers
    for r in range(1, n_reg):
        for s in range(2):
            if not own[r, s]:
                kappa[r, s] = kappa[0, s]
    std = kappa[:, :, None] * np.abs(table.penetration_m)
    return Spread(std, kappa, n_glaciers, own)


@dataclass(frozen=True)
class RegionPooling:
    """How far each region's table was drawn toward the pooled table (`pool_regions`)."""

    penetration_m: np.ndarray  #: (region index 0..R, surface, bin): the drawn tables
    weight: np.ndarray  #: (region index 0..R, surface): share of its own deviation kept, [0, 1]
    factor: np.ndarray  #: (region index, surface): rho, its table over the pooled (NaN: none own)
    factor_sigma: np.ndarray  #: (region index, surface): sd of rho from its glaciers' spread
    between_sigma: np.ndarray  #: (surface,): omega, the spread of rho between regions


def pool_regions(table: Table, moments: GlacierMoments, kappa: np.ndarray) -> RegionPooling:
    """Each region's table drawn toward the pooled table by an empirical-Bayes weight.

    A region's table is measured on its few glaciers with X band, whose penetration differs
    from glacier to glacier by a factor of spread kappa (`between_glacier_spread`, the pooled
    estimate per surface). Region r's table over the pooled one, rho_r = sum n T_r T_0 /
    sum n T_0^2 over its X-band pixels in its own (not filled) bins, then errs by sampling
    alone with sd s_r = kappa sqrt(sum_g w_g^2), w_g the glaciers' shares of sum n T_0^2. The
    spread of the true factors between regions, omega^2 = mean_r((rho_r - 1)^2 - s_r^2) (>= 0;
    method of moments over the regions with own bins, at least two), sets the weight
    w_r = omega^2 / (omega^2 + s_r^2): the region keeps T_0 + w_r (T_r - T_0). Regions that
    differ by more than their glaciers explain keep their own table (w -> 1); where the
    regions differ by no more than that, they share the pooled table, measured on all
    glaciers (w -> 0). The drawn tables are for glaciers without X band of their own
    (`pooled_offsets`): a glacier with X band is part of its region's table."""
    glacier, region, s_idx, b = moments.cells()
    n_x = moments.values[0]
    kt = _table_bin(table, b)
    pen = table.penetration_m
    n_reg = pen.shape[0]
    weight = np.ones((n_reg, 2))
    factor = np.full((n_reg, 2), np.nan)
    factor_sigma = np.zeros((n_reg, 2))
    between = np.zeros(2)
    stride = int(glacier.max(initial=0)) + 1
    for s in range(2):
        t0 = pen[0, s, kt]
        measured = []
        for r in range(1, n_reg):
            sel = (region == r) & (s_idx == s) & (n_x > 0) & ~table.filled[r, s, kt]
            a = n_x[sel] * t0[sel] ** 2
            total = float(a.sum())
            if total <= 0.0:
                continue
            factor[r, s] = float(np.sum(n_x[sel] * pen[r, s, kt[sel]] * t0[sel])) / total
            w_g = np.bincount(glacier[sel], weights=a, minlength=stride) / total
            factor_sigma[r, s] = float(kappa[s]) * float(np.sqrt(np.sum(w_g**2)))
            measured.append(r)
        if len(measured) < 2:
            continue
        excess = (factor[measured, s] - 1.0) ** 2 - factor_sigma[measured, s] ** 2
        between[s] = np.sqrt(max(float(np.mean(excess)), 0.0))
        for r in measured:
            var = factor_sigma[r, s] ** 2
            weight[r, s] = between[s] ** 2 / (between[s] ** 2 + var) if var > 0 else 1.0
    pooled = pen[:1] + weight[:, :, None] * (pen - pen[:1])
    return RegionPooling(pooled, weight, factor, factor_sigma, between)


def pooled_offsets(
    moments: GlacierMoments, table: Table, pooled_m: np.ndarray, n_glaciers: int
) -> np.ndarray:
    """(glacier index 0..G, surface) the constant (m) that moves a glacier from `table` to the
    tables `pooled_m` (`RegionPooling.penetration_m`) on average over its pixels with a C-band
    reference: sum n_ref (pooled - table) / sum n_ref over its cells (0 for index 0 and
    glaciers without pixels). Added to `table`, it gives the glacier the mean of `pooled_m`
    over those pixels, hence (nearly) the balance the drawn table would give."""
    glacier, region, s_idx, b = moments.cells()
    n_ref = moments.values[3]
    kt = _table_bin(table, b)
    delta = pooled_m[region, s_idx, kt] - table.penetration_m[region, s_idx, kt]
    shape = (n_glaciers + 1, 2)
    flat = glacier * 2 + s_idx
    total = np.bincount(flat, weights=n_ref * delta, minlength=shape[0] * 2).reshape(shape)
    count = np.bincount(flat, weights=n_ref, minlength=shape[0] * 2).reshape(shape)
    out = np.divide(total, count, out=np.zeros(shape), where=count > 0)
    out[0] = 0.0
    return out


@dataclass(frozen=True)
class GlacierAdjustment:
    """Per (glacier index 0..G, surface 1..2) refinement of the table from the glacier's own
    X-band pixels (index 0: off glacier, all zero). Lengths in m."""

    offset_m: np.ndarray  #: weight x raw_m: added to the table's penetration on the glacier
    raw_m: np.ndarray  #: mean of (X - C - datum offset - table value) over its X-band pixels
    weight: np.ndarray  #: the empirical-Bayes weight k in [0, 1] (0: not covered well enough)
    own_x: np.ndarray  #: bool: covered well enough for an offset of its own (min_px, min_share)
    x_share: np.ndarray  #: share of its pixels with a C-band reference that have X band
    n_x_px: np.ndarray  #: its pixels with both references
    noise_sigma_m: np.ndarray  #: sqrt(v): noise of raw_m (X and C errors over its X pixels)
    prior_sigma_m: np.ndarray  #: tau: between-glacier spread of its mean penetration
    sigma_table_m: np.ndarray  #: reference + penetration error of its mean with the table alone
    sigma_m: np.ndarray  #: the same with the adjustment (what the error model should use)


def glacier_adjustment(
    moments: GlacierMoments,
    table: Table,
    offset_m: float,
    spread: Spread,
    noise: NoiseCurve,
    res_m: float,
    n_glaciers: int,
    min_share: float,
    min_px: int,
    x_variance_share: float = X_NOISE_VARIANCE_SHARE,
) -> GlacierAdjustment:
    """Per glacier and surface, how much its own X-band pixels move the table's penetration.

    A glacier's dh carries, besides its true change, e = (P - T) - eC: its true mean penetration
    P minus the table's T, and the C-band reference's error eC (both over the same pixels, both
    biasing dh the same way). Its X-band pixels measure raw = mean(X - C - offset - T) =
    (P - T) - eC_x + eX_x over the covered part (share c). Subtracting k raw leaves
    e_k = (1 - k)(P - T) - (c - k) eC_x - (1 - c) eC_u - k eX_x, of variance
    (1 - k)^2 tau^2 + [(c - k)^2 (1 - s) + k^2 s] v + (1 - c)^2 (1 - s) v_u,
    with tau^2 = (kappa T_mean)^2 the spread between glaciers (`between_glacier_spread`),
    v = noise.variance(A_x) the variance of the X minus C noise averaged over the covered area
    A_x (`NoiseCurve`), s = x_variance_share the share of that variance
    that is X band's own, v_u the same over the uncovered area. The k minimising it is the
    empirical-Bayes (best linear) weight k = (tau^2 + c (1 - s) v) / (tau^2 + v): unlike a
    shrinkage of P - T alone (tau^2 / (tau^2 + v)), it counts the C-band error that raw carries
    as signal, since the glacier's dh carries the same error; with full cover (c = 1) the
    glacier's reference error is replaced by the smaller X-band error. Glaciers (x surface) with
    fewer than `min_px` X-band pixels or a share below `min_share` keep the table (k = 0)."""
    glacier, region, s_idx, b = moments.cells()
    n_x, total, n_ref = moments.values[0], moments.values[1], moments.values[3]
    kt = _table_bin(table, b)
    t = table.penetration_m[region, s_idx, kt]
    shape = (n_glaciers + 1, 2)
    flat = glacier * 2 + s_idx
    size = shape[0] * shape[1]
    nx_g = np.bincount(flat, weights=n_x, minlength=size).reshape(shape)
    nref_g = np.bincount(flat, weights=n_ref, minlength=size).reshape(shape)
    dev_g = np.bincount(flat, weights=total - n_x * (offset_m + t), minlength=size).reshape(shape)
    tau_sum = np.bincount(
        flat, weights=n_x * spread.kappa[region, s_idx] * np.abs(t), minlength=size
    ).reshape(shape)
    # the spread prior over the glacier's pixels with a reference (the table is known there
    # without X band): a surface without X-band pixels keeps it in its error
    tau_ref_sum = np.bincount(
        flat, weights=n_ref * spread.kappa[region, s_idx] * np.abs(t), minlength=size
    ).reshape(shape)
    covered = nx_g > 0
    safe_nx = np.where(covered, nx_g, 1.0)
    raw = np.where(covered, dev_g / safe_nx, 0.0)
    tau = np.where(covered, tau_sum / safe_nx, 0.0)
    tau_all = np.divide(tau_ref_sum, nref_g, out=np.zeros(shape), where=nref_g > 0)
    share = np.divide(nx_g, nref_g, out=np.zeros(shape), where=nref_g > 0)
    px_area = res_m * res_m
    v = np.where(covered, noise.variance(np.maximum(nx_g, 1.0) * px_area), 0.0)
    v_u = noise.variance(np.maximum(nref_g - nx_g, 1.0) * px_area)
    v_u = np.where(nref_g > nx_g, v_u, 0.0)
    sx = x_variance_share
    use = covered & (nx_g >= min_px) & (share >= min_share)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = np.where(use, (tau**2 + share * (1.0 - sx) * v) / (tau**2 + v), 0.0)
    k = np.clip(np.nan_to_num(k), 0.0, 1.0)

    def error_var(weight: np.ndarray) -> np.ndarray:
        return (
            (1.0 - weight) ** 2 * tau**2
            + ((share - weight) ** 2 * (1.0 - sx) + weight**2 * sx) * v
            + (1.0 - share) ** 2 * (1.0 - sx) * v_u
        )

    # without X band on the glacier: the spread and its whole reference error (1 - s) v
    v_all = noise.variance(np.maximum(nref_g, 1.0) * px_area)
    base = np.where(covered, error_var(np.zeros(shape)), tau_all**2 + (1.0 - sx) * v_all)
    post = np.where(covered, error_var(k), base)
    zero_row = np.zeros(shape, dtype=bool)
    zero_row[0] = True
    return GlacierAdjustment(
        offset_m=np.where(zero_row, 0.0, k * raw),
        raw_m=np.where(zero_row, 0.0, raw),
        weight=np.where(zero_row, 0.0, k),
        own_x=use & ~zero_row,
        x_share=share,
        n_x_px=nx_g.astype(np.int64),
        noise_sigma_m=np.sqrt(v),
        prior_sigma_m=tau,
        sigma_table_m=np.sqrt(base),
        sigma_m=np.sqrt(post),
    )


def glacier_lookup(offset_m: np.ndarray, glacier_id: np.ndarray, surface: np.ndarray) -> np.ndarray:
    """Per-glacier penetration adjustment (m) of each pixel of a block: offset_m[glacier, surface]
    on glacier pixels (glacier_id 1..G, surface 1..2), 0 elsewhere."""
    g = glacier_id.astype(np.int64)
    s = surface.astype(np.int64)
    on = (g > 0) & (g < offset_m.shape[0]) & (s >= 1) & (s <= 2)
    return np.where(on, offset_m[np.where(on, g, 0), np.clip(s - 1, 0, 1)], 0.0)
