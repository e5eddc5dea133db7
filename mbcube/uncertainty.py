"""Uncertainty of glacier and region mass balance (1 sigma), term by term, from small tables.

Every term is first an error of the elevation-change rate (m/yr), then converted with the
density rho (kg/m3) to m w.e./yr (x rho / 1000), and reported as its own column; the total
`mb_sigma_mwe_yr` is their quadrature sum (the terms are independent). A unit (a glacier, or a
region = its glaciers' summed statistics) uses scenes s with weights w_s (each scene's share of
the unit's mean, summing to 1, see `mbcube.massbalance`) and spans T_s (yr, absolute).

**Spatial averaging** (Rolstad et al. 2009; Hugonnet et al. 2022 sum such terms for variograms of
several ranges): an error field of standard deviation sigma (m), correlated with a spherical
variogram of range a (m), averaged over an area A (m2) taken as a disc of radius
L = sqrt(A / pi), keeps the variance sigma^2 * rho(A, a) with

    rho = 1 - L/a + L^3 / (5 a^3)     for L <= a,
    rho = a^2 / (5 L^2)               for L >  a,

so the area holds N_eff = 1 / rho independent samples (`n_eff`; at least 1, at most its number of
pixels). With a = 500 m a 1 km2 glacier holds N_eff ~ 6 (Bolch et al.'s N px x res / 2a counted 33).

**White and correlated parts** (two ranges, the simplest form of the multi-range variogram of
Hugonnet et al. 2022): a scene's stable-ground spread sigma_s (m, NMAD of its pixels' dh) is
split into white noise sigma_w,s (m, uncorrelated between pixels: phase noise, the DEMs' pixel
noise), whose mean over n pixels has variance sigma_w^2 / n, and a part sigma_k,s (m) correlated
over d = `autocorrelation_m` (500 m; the reference DEM's error, the scene DEM's correlated
error): sigma_s^2 = sigma_w,s^2 + sigma_k,s^2. The split comes from a second, coarse-scale
statistic binning stores per scene (`mbcube.binning`): the spread V_B (m2, NMAD^2) of the mean dh
of stable-ground blocks of side ~d, n_b pixels each (mean area A_B = mean n_b x res^2, h = mean
1 / n_b). A block mean keeps sigma_k^2 rho(A_B, d) + sigma_w^2 / n_b, so

    sigma_k^2 = (V_B - sigma_s^2 h) / (rho(A_B, d) - h),   clipped to [0, sigma_s^2]

(`white_correlated_split`). Without the block statistic (or with fewer than SPLIT_MIN_BLOCKS blocks)
sigma_k,s = sigma_s: every error counted as correlated (the conservative model).

**Terms** (A_u the unit's measured area = measured pixels x res^2; A_su what scene s measured,
n_su its pixels):

- random: the DEMs' elevation error. Part of the correlated error is the reference DEM's, the
  SAME field in every scene, which does not average out over scenes: that common part is at most
  sigma_c = min_s sigma_k,s over the unit's scenes (each scene's correlated error is the
  reference's plus its own), or `reference_sigma_m` (m) where that is smaller: a known bound of
  the reference DEM's error, the spread of SRTM-C minus SRTM-X on stable ground
  (sqrt(sigma_C^2 + sigma_X^2) >= sigma_C). Then

      sigma_random^2 = sigma_c^2 rho(A_u, d) (sum_s w_s / T_s)^2
                       + sum_s (w_s / T_s)^2 [(sigma_k,s^2 - sigma_c^2) rho(A_su, d)
                                              + sigma_w,s^2 / n_su]      (m2/yr2).

  With one scene and no white part this is the usual sigma_s sqrt(rho(A, d)) / T. A smaller
  common part (a tighter bound, a scene's white part) need not lower the term of every unit:
  the variance it leaves to the scenes' own parts averages over each scene's area only.
- penetration: the C/X penetration table's error sigma_table (m; the standard error of its
  (region, surface, bin) entries, area-weighted over the unit), the same for every glacier of a
  region and every scene, so it does not average down; and, where the table's between-glacier
  spread sigma_spread (m) is known, how far the unit's own penetration may differ from its
  region's table, an error correlated over d_pen = `autocorrelation_penetration_m` (2000 m):

      sigma_pen = sqrt(sigma_table^2 + sigma_spread^2 rho(A_u, d_pen)) * sum_s w_s / T_s.

- datum: per scene delta_s = sqrt(mean_s^2 + sigma_k,s^2 rho(A_stable_s, d) + sigma_w,s^2 /
  n_stable_s) (m), the bias left on stable ground plus the standard error of the offset fitted
  there; fully correlated over all glaciers of a scene, independent between scenes:
  sigma_datum^2 = sum_s (w_s delta_s / T_s)^2.
- seasonal: 0.15 m per month (`seasonal_sigma_m_per_month`) x months m_s between the scene's month
  and February, correlated within a scene: sigma_seasonal^2 = sum_s (w_s 0.15 m_s / T_s)^2.
- unmeasured: the area the unit's mean stands for without a measurement: cells (bin x surface)
  filled along elevation, the unmeasured part of partly measured cells (which includes the
  reference DEM's voids binned by the X-band reference's elevation: no scene measures them),
  and the glacier area void in both references (A_void, which takes the unit's mean). Such a
  part may differ from the
  value it is given by as much as the unit's rates differ among themselves, so its error is
  the spread sigma_u (m/yr, the area-weighted standard deviation of the unit's cell rates about
  its mean); independent between cells (different bins are different parts of the glacier):

      sigma_unmeasured = sigma_u sqrt(sum_c (A_c (1 - f_c))^2 + A_void^2) / (sum_c A_c + A_void)

  f_c the measured fraction of cell c (its best-covering scene's pixels / its pixels; 0 for a
  filled cell). A void in one piece is thus counted whole (linearly); on the synthetic studies
  its error is void share x (glacier mean - void's true mean), which this matches. Cells
  BEYOND the unit's measured elevation range take the nearest measured value: one
  extrapolation, off by about the profile's change over the distance, so their errors add
  linearly, each e_c = max(sigma_u, |g| dz_c) (g the measured profile's slope, dz_c the
  distance to the nearest measured bin):

      sigma_unmeasured = sqrt(sum_inside (A_c (1 - f_c) sigma_u)^2 + (sum_beyond A_c e_c)^2
                              + (A_void sigma_u)^2) / (sum_c A_c + A_void)

  (a tongue that no scene reached, below a steep profile: 0.096 before, error 0.76 m w.e./yr).
- density: |dh/dt| x density_sigma / 1000 (60 kg/m3; fully correlated everywhere).
- unwrapping (`unwrap_sigma_m_yr`): a glacier's pixels whose phase cycle is in doubt
  (`mbcube.unwrap.profiles`: slips no prior repaired, or a part of its profile whose cycle
  cannot be confirmed) may be off by a whole height of ambiguity h_s (m). Such an error is not
  random noise but one cycle on the whole doubtful area, so it is counted whole, once per scene
  and added over the scenes (not in quadrature): sigma_unwrap = sum_s w_s (D_s / N_s) h_s / T_s,
  D_s the pixels in doubt and N_s the glacier's unwrapped pixels in scene s. Different glaciers'
  cycles are found independently, so a region sums its glaciers' terms in quadrature, by area.

**Glaciers with their own X-band offset** (corrections.penetration 'xband_glacier', stored
attribute glacier_adjustment_applied = 1; `mbcube.corrections.penetration.glacier_adjustment`):
on a glacier x surface with weight k > 0 the table is shifted by k times the glacier's own mean
X - C deviation. That deviation carries the glacier's penetration deviation AND its SRTM-C
error over the same pixels, as dh does, so the offset takes out part of both, and what is left
of the two together is one error the penetration group stores per glacier and surface:
glacier_penetration_sigma_m (m, 1 sigma, the error of the glacier's mean reference surface
after the offset: (1 - k)^2 tau^2 + the C-band error over its pixels left by the offset + the
X-band error it brings in, over all its pixels with a reference; NOT the table's own
standard error). For such a glacier
("adjusted": any surface with k > 0 and pixels) with sigma_adj (m, glacier_penetration_sigma_m
area-weighted over its surfaces; a surface with k = 0 contributes its value with the table
alone):

- random: the part common to the scenes (sigma_c^2 rho(A_u, d), the reference DEM's error) is
  dropped; the scenes' own parts (correlated and white) stay, so `sigma_random_mwe_yr` is then
  the scenes' own error only;
- penetration: sigma_spread^2 rho(A_u, d_pen) is replaced by sigma_adj^2, and the table's error
  by (1 - k) sigma_table (the offset moves the table toward the glacier, so a table error is
  taken out in the share k: per cell with the k of its surface, area-weighted):

      sigma_pen = sqrt(((1 - k) sigma_table)^2 + sigma_adj^2) * sum_s w_s / T_s,

  so `sigma_penetration_mwe_yr` is then the error of the glacier's reference surface (SRTM-C
  corrected for penetration), reference DEM error included: the X-band pixels measure the sum
  of both, which cannot be told apart. Each column still holds one kind of error: the random
  column what differs between scenes (plus, where it is not in the penetration column, the
  reference DEM's error), the penetration column the reference surface's error that no scene
  averages out.

A unit that is a region holds adjusted glaciers J (measured ones) and others, with f the share
of its measured pixels on J (`adjusted_units`). The others keep the terms above over their part
(common reference part (1 - f)^2 sigma_c^2 rho((1 - f) A_u, d), spread (1 - f)^2
sigma_spread,rest^2 rho((1 - f) A_u, d_pen), sigma_spread,rest their area-weighted spread). The
adjusted glaciers add sigma_adj,u^2 = sum_g,h in J q_g q_h sigma_adj,g sigma_adj,h c(d_gh), q_g
the glacier's share of the unit's measured pixels and c the spherical correlation of the
distance between the glaciers' centroids with range d_pen: like the spread, a glacier's error
is independent of every glacier beyond 2000 m (a glacier's own error is already its mean's, so
a region of one glacier keeps it whole, and N equal glaciers far apart average it as
1 / N). A glacier is a unit with f = 0 or 1; a region's table error is the area-weighted
(1 - k) sigma_table of its glaciers' cells.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.spatial import cKDTree

__all__ = [
    "SPLIT_MIN_BLOCKS",
    "adjusted_units",
    "datum_sigma_m",
    "months_from_february",
    "n_eff",
    "quadrature",
    "random_sigma_m_yr",
    "spatial_variance_ratio",
    "spherical_correlation",
    "stable_moments",
    "unit_uncertainty",
    "unmeasured_sigma_m_yr",
    "unwrap_sigma_m_yr",
    "white_correlated_split",
]

#: Fewest stable-ground blocks for the white / correlated split (fewer: all correlated).
SPLIT_MIN_BLOCKS = 20


def months_from_february(month: np.ndarray) -> np.ndarray:
    """Months (0-6) between each month (1-12) and February, either way round the year."""
    m = np.asarray(month, dtype=int)
    return np.abs((m - 2 + 6) % 12 - 6)


def spatial_variance_ratio(area_m2: np.ndarray, range_m: float) -> np.ndarray:
    """rho(A, a): variance of the mean over an area A (m2) of an error field with a spherical
    variogram of range a (m), relative to the field's variance (Rolstad et al. 2009, area as a
    disc of radius L = sqrt(A / pi)): 1 - L/a + L^3 / (5 a^3) for L <= a, a^2 / (5 L^2) beyond.
    1 for A = 0."""
    if range_m <= 0:
        raise ValueError(f"the correlation range must be positive, got {range_m} m")
    r = np.sqrt(np.maximum(np.asarray(area_m2, dtype=float), 0.0) / np.pi) / range_m
    inside = 1.0 - r + r**3 / 5.0
    beyond = 1.0 / (5.0 * np.maximum(r, 1.0) ** 2)
    return np.where(r <= 1.0, inside, beyond)


def n_eff(n_px: np.ndarray, pixel_size_m: float, autocorrelation_m: float) -> np.ndarray:
    """Effective number of independent measurements among n_px pixels of pixel_size_m (m) with
    errors correlated over autocorrelation_m (m): 1 / rho(n_px res^2, a), within [1, n_px]."""
    n = np.asarray(n_px, dtype=float)
    rho = spatial_variance_ratio(n * pixel_size_m**2, autocorrelation_m)
    return np.clip(1.0 / rho, 1.0, np.maximum(n, 1.0))


def stable_moments(
    count: np.ndarray, sum_dh_m: np.ndarray, sumsq_dh_m2: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean (m) and standard deviation (m) of dh on stable ground per scene (NaN if no pixel)."""
    n = np.asarray(count, dtype=float)
    mean = np.divide(sum_dh_m, n, out=np.full(n.shape, np.nan), where=n > 0)
    var = np.divide(sumsq_dh_m2, n, out=np.full(n.shape, np.nan), where=n > 0) - mean**2
    return mean, np.sqrt(np.maximum(var, 0.0))


def datum_sigma_m(
    stable_count: np.ndarray,
    stable_mean_m: np.ndarray,
    stable_sigma_m: np.ndarray,
    pixel_size_m: float,
    autocorrelation_m: float = 500.0,
    white_sigma_m: np.ndarray | None = None,
) -> np.ndarray:
    """Datum error per scene (m): residual stable-ground bias and the offset's standard error,
    sqrt(mean^2 + sigma_k^2 / N_eff + sigma_w^2 / n) with N_eff of the n stable pixels
    (`n_eff`), sigma_w the white part of the spread sigma (m; None: 0) and sigma_k^2 = sigma^2 -
    sigma_w^2 its correlated part."""
    neff = n_eff(stable_count, pixel_size_m, autocorrelation_m)
    sigma = np.asarray(stable_sigma_m, dtype=float)
    white = np.zeros_like(sigma) if white_sigma_m is None else np.asarray(white_sigma_m, float)
    white = np.minimum(np.nan_to_num(white), np.abs(sigma))
    n = np.maximum(np.asarray(stable_count, dtype=float), 1.0)
    return np.sqrt(stable_mean_m**2 + (sigma**2 - white**2) / neff + white**2 / n)


def white_correlated_split(
    stable_sigma_m: np.ndarray,
    block_sigma_m: np.ndarray,
    block_count: np.ndarray,
    block_px_mean: np.ndarray,
    block_inv_px_mean: np.ndarray,
    pixel_size_m: float,
    autocorrelation_m: float = 500.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(white, correlated) parts (m) of each scene's stable-ground spread (module docstring).

    stable_sigma_m: the pixels' spread sigma_s (m); block_sigma_m: the spread of the block means
    (m); block_count: number of blocks; block_px_mean, block_inv_px_mean: mean of n_b and of
    1 / n_b over the blocks. Scenes with fewer than SPLIT_MIN_BLOCKS blocks, or whose blocks are too
    small to tell the parts apart (rho(A_B) <= h), keep all their spread correlated. Shapes (S,).
    """
    sigma = np.asarray(stable_sigma_m, dtype=float)
    vb = np.asarray(block_sigma_m, dtype=float) ** 2
    h = np.asarray(block_inv_px_mean, dtype=float)
    area_b = np.nan_to_num(np.asarray(block_px_mean, dtype=float)) * pixel_size_m**2
    rho_b = spatial_variance_ratio(area_b, autocorrelation_m)
    ok = (
        (np.asarray(block_count, dtype=float) >= SPLIT_MIN_BLOCKS)
        & np.isfinite(vb)
        & np.isfinite(h)
        & np.isfinite(sigma)
        & (rho_b - np.nan_to_num(h) > 1e-6)
    )
    denom = np.where(ok, rho_b - np.nan_to_num(h), 1.0)
    corr2 = np.where(ok, (np.nan_to_num(vb) - sigma**2 * np.nan_to_num(h)) / denom, sigma**2)
    corr2 = np.clip(corr2, 0.0, np.where(np.isfinite(sigma), sigma**2, 0.0))
    white2 = np.where(np.isfinite(sigma), np.maximum(sigma**2 - corr2, 0.0), 0.0)
    return np.sqrt(white2), np.where(np.isfinite(sigma), np.sqrt(corr2), sigma)


def quadrature(*terms: np.ndarray) -> np.ndarray:
    """sqrt of the sum of squares."""
    return np.sqrt(sum(np.asarray(t, dtype=float) ** 2 for t in terms))


def _rest_share(adjusted_share: np.ndarray | None, n_units: int) -> np.ndarray:
    """1 - f (U,), f clipped to [0, 1] (None or NaN: 0)."""
    if adjusted_share is None:
        return np.ones(n_units)
    return 1.0 - np.clip(np.nan_to_num(np.asarray(adjusted_share, dtype=float)), 0.0, 1.0)


def spherical_correlation(distance_m: np.ndarray, range_m: float) -> np.ndarray:
    """Correlation of a spherical variogram of range a (m) at a distance d (m):
    1 - 1.5 d/a + 0.5 (d/a)^3 for d < a, 0 beyond."""
    if range_m <= 0:
        raise ValueError(f"the correlation range must be positive, got {range_m} m")
    q = np.minimum(np.abs(np.asarray(distance_m, dtype=float)) / range_m, 1.0)
    return 1.0 - 1.5 * q + 0.5 * q**3


def adjusted_units(
    adjusted_sigma_m: np.ndarray,
    measured_px: np.ndarray,
    centroids_xy_m: np.ndarray,
    membership: np.ndarray | sparse.sparray,
    range_m: float = 2000.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(f, sigma_adj) (U,) of units made of G glaciers (module docstring, "Glaciers with their
    own X-band offset"): f the share of the unit's measured pixels on adjusted glaciers, and
    sigma_adj (m) the error those glaciers' own reference-surface errors bring to the unit's
    mean, sqrt(sum_g,h q_g q_h s_g s_h c(d_gh)) with q_g = measured_px_g / the unit's measured
    pixels, s_g = adjusted_sigma_m, c = `spherical_correlation` of the centroid distance d_gh
    (m) with range `range_m` (independent beyond it).

    adjusted_sigma_m (G,): a glacier's stored error (m), NaN where the glacier is not adjusted
    (or not measured); measured_px (G,); centroids_xy_m (G, 2) (m, NaN: correlated with no other
    glacier); membership (U, G) 0/1, dense or sparse. Units without a measured pixel get 0, 0."""
    s = np.asarray(adjusted_sigma_m, dtype=float)
    px = np.maximum(np.nan_to_num(np.asarray(measured_px, dtype=float)), 0.0)
    m = sparse.csr_array(membership, dtype=float)
    total = m @ px
    adjusted = np.isfinite(s) & (px > 0)
    n_units = len(total)
    share = np.divide(
        m @ np.where(adjusted, px, 0.0), total, out=np.zeros(n_units), where=total > 0
    )
    idx = np.flatnonzero(adjusted)
    xy = np.asarray(centroids_xy_m, dtype=float)[idx]
    located = np.flatnonzero(np.isfinite(xy).all(axis=1))
    rows, cols, corr = [np.arange(idx.size)], [np.arange(idx.size)], [np.ones(idx.size)]
    if located.size > 1:
        pairs = cKDTree(xy[located]).query_pairs(range_m, output_type="ndarray")
        if len(pairs):
            i, j = located[pairs[:, 0]], located[pairs[:, 1]]
            c = spherical_correlation(np.hypot(*(xy[i] - xy[j]).T), range_m)
            rows += [i, j]
            cols += [j, i]
            corr += [c, c]
    correlation = sparse.csr_array(
        (np.concatenate(corr), (np.concatenate(rows), np.concatenate(cols))),
        shape=(idx.size, idx.size),
    )
    # (U, J): membership x the glacier's error x its measured pixels
    weighted = sparse.csr_array(m[:, idx] @ sparse.diags_array(s[idx] * px[idx]))
    var = np.asarray((weighted @ correlation).multiply(weighted).sum(axis=1)).reshape(-1)
    sigma = np.divide(np.sqrt(np.maximum(var, 0.0)), total, out=np.zeros(n_units), where=total > 0)
    return share, sigma


def random_sigma_m_yr(
    scene_weight: np.ndarray,
    scene_px: np.ndarray,
    measured_px: np.ndarray,
    scene_years: np.ndarray,
    stable_sigma_m: np.ndarray,
    pixel_size_m: float,
    autocorrelation_m: float = 500.0,
    reference_sigma_m: float | None = None,
    stable_white_sigma_m: np.ndarray | None = None,
    adjusted_share: np.ndarray | None = None,
) -> np.ndarray:
    """The random term (m/yr) of U units (module docstring): the correlated part common to all
    scenes (the reference DEM's error; sigma_c = the smallest correlated stable spread of the
    unit's scenes, or `reference_sigma_m` (m), an upper bound of the reference DEM's error, where
    smaller) averaged over the unit's measured area only, the rest of the correlated part scene
    by scene, and the white part (`stable_white_sigma_m`, m; None: none) over each scene's
    measured pixels as 1 / n. `adjusted_share` (U,): share f of the measured pixels on glaciers
    whose reference error is in the penetration term (`adjusted_units`; None: 0): the common
    part then covers the other (1 - f) only, (1 - f)^2 sigma_c^2 rho((1 - f) A_u, d).

    scene_weight, scene_px (S, U); measured_px (U,); scene_years, stable_sigma_m,
    stable_white_sigma_m (S,)."""
    w = np.asarray(scene_weight, dtype=float)
    per_year = w / np.abs(np.asarray(scene_years, dtype=float))[:, None]  # (S, U)
    total = np.asarray(stable_sigma_m, dtype=float)
    white = (
        np.zeros_like(total)
        if stable_white_sigma_m is None
        else np.minimum(np.nan_to_num(np.asarray(stable_white_sigma_m, dtype=float)), total)
    )
    white = np.where(np.isfinite(total), white, 0.0)
    corr = np.sqrt(np.maximum(total**2 - white**2, 0.0))  # NaN where the spread is unknown
    sigma = corr[:, None] * np.ones_like(w)
    used = (w > 0) & np.isfinite(sigma)
    common = np.where(used, sigma, np.inf).min(axis=0)
    if reference_sigma_m is not None:
        common = np.minimum(common, float(reference_sigma_m))
    common = np.where(np.isfinite(common), common, 0.0)
    own_var = np.where(used, np.maximum(np.nan_to_num(sigma) ** 2 - common**2, 0.0), 0.0)
    px_s = np.asarray(scene_px, dtype=float)
    rest = _rest_share(adjusted_share, w.shape[1])
    area_u = np.asarray(measured_px, dtype=float) * pixel_size_m**2
    area_s = px_s * pixel_size_m**2
    rho_u = spatial_variance_ratio(rest * area_u, autocorrelation_m)
    rho_s = spatial_variance_ratio(area_s, autocorrelation_m)
    common_var = (rest * common) ** 2 * rho_u * np.where(used, per_year, 0.0).sum(axis=0) ** 2
    white_var = np.where(used, white[:, None] ** 2 / np.maximum(px_s, 1.0), 0.0)
    return np.sqrt(common_var + (per_year**2 * (own_var * rho_s + white_var)).sum(axis=0))


def unmeasured_sigma_m_yr(
    area_m2: np.ndarray,
    measured_frac: np.ndarray,
    rate_m_yr: np.ndarray,
    void_area_m2: np.ndarray | None = None,
    bin_centre_m: np.ndarray | None = None,
) -> np.ndarray:
    """The unmeasured-area term (m/yr) of U units (module docstring):
    sigma_u sqrt(sum_c (A_c (1 - f_c))^2 + A_void^2) / (sum_c A_c + A_void), with sigma_u the
    area-weighted standard deviation of the unit's cell rates about its mean (its spread).

    With bin_centre_m (B,): cells beyond the unit's measured elevation range (filled with the
    nearest measured value) are one extrapolation, whose errors add up linearly: each is off by
    e_c = max(sigma_u, |g| dz_c), g the area-weighted slope of the measured cells' rates on
    elevation (1/yr) and dz_c the cell's distance from the nearest measured bin (m); the term is
    then sqrt(sum_inside (A_c (1 - f_c) sigma_u)^2 + (sum_beyond A_c e_c)^2 + (A_void sigma_u)^2)
    / (sum_c A_c + A_void). (A tongue left unmeasured below a steep profile: the nearest value
    is off by the profile's change over the distance; counted as independent bins this term
    was 0.096 where the error was 0.76 m w.e./yr.)

    area_m2, measured_frac (0 = filled), rate_m_yr (the filled profile) (U, B, F); void_area_m2
    (U,) area without a reference DEM (m2). Units without a profile get 0."""
    area = np.asarray(area_m2, dtype=float)
    rate = np.asarray(rate_m_yr, dtype=float)
    known = (area > 0) & np.isfinite(rate)
    weight = np.where(known, area, 0.0)
    total_w = weight.sum(axis=(1, 2))
    r = np.where(known, rate, 0.0)
    mean = np.divide(
        (weight * r).sum(axis=(1, 2)), total_w, out=np.zeros(len(area)), where=total_w > 0
    )
    var = np.divide(
        (weight * (r - mean[:, None, None]) ** 2).sum(axis=(1, 2)),
        total_w,
        out=np.zeros(len(area)),
        where=total_w > 0,
    )
    void = np.zeros(len(area)) if void_area_m2 is None else np.asarray(void_area_m2, dtype=float)
    frac = np.clip(np.asarray(measured_frac, dtype=float), 0.0, 1.0)
    unmeasured = area * (1.0 - frac)
    sigma_u = np.sqrt(var)
    total = area.sum(axis=(1, 2)) + void
    if bin_centre_m is None:
        spread_area = np.sqrt((unmeasured**2).sum(axis=(1, 2)) + void**2)
        return np.divide(spread_area, total, out=np.zeros(len(area)), where=total > 0) * sigma_u
    beyond, error = _extrapolated(area, frac, rate, known, np.asarray(bin_centre_m, float), sigma_u)
    inside = np.where(beyond, 0.0, unmeasured) * sigma_u[:, None, None]
    linear = (np.where(beyond, area, 0.0) * error).sum(axis=(1, 2))
    spread = np.sqrt((inside**2).sum(axis=(1, 2)) + linear**2 + (void * sigma_u) ** 2)
    return np.divide(spread, total, out=np.zeros(len(area)), where=total > 0)


def _extrapolated(
    area: np.ndarray,
    frac: np.ndarray,
    rate: np.ndarray,
    known: np.ndarray,
    z: np.ndarray,
    sigma_u: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(U, B, F): cells beyond their unit's measured elevation range, and the error of each
    (m/yr): max(sigma_u, |slope| x distance to the nearest measured bin)."""
    measured = known & (frac > 0)
    w = np.where(measured, area * frac, 0.0)
    zz = np.broadcast_to(z[None, :, None], area.shape)
    big = np.inf
    lo = np.where(measured, zz, big).min(axis=(1, 2))
    hi = np.where(measured, zz, -big).max(axis=(1, 2))
    wsum = w.sum(axis=(1, 2))
    safe = np.where(wsum > 0, wsum, 1.0)
    zm = (w * zz).sum(axis=(1, 2)) / safe
    rm = (w * np.where(measured, rate, 0.0)).sum(axis=(1, 2)) / safe
    dz = zz - zm[:, None, None]
    var_z = (w * dz**2).sum(axis=(1, 2))
    cov = (w * dz * (np.where(measured, rate, 0.0) - rm[:, None, None])).sum(axis=(1, 2))
    slope = np.divide(cov, var_z, out=np.zeros(len(area)), where=var_z > 0)
    has = np.isfinite(lo)[:, None, None]
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    beyond = has & (area > 0) & ((zz < lo[:, None, None]) | (zz > hi[:, None, None]))
    distance = np.where(zz < lo[:, None, None], lo[:, None, None] - zz, zz - hi[:, None, None])
    distance = np.where(beyond, distance, 0.0)
    error = np.maximum(sigma_u[:, None, None], np.abs(slope)[:, None, None] * distance)
    return beyond, np.where(beyond, error, 0.0)


def unwrap_sigma_m_yr(
    scene_weight: np.ndarray,
    doubt_px: np.ndarray,
    glacier_px: np.ndarray,
    h_amb_m: np.ndarray,
    scene_years: np.ndarray,
) -> np.ndarray:
    """The unwrapping term (m/yr) of G glaciers (module docstring). scene_weight, doubt_px,
    glacier_px (pixels unwrapped), h_amb_m (the glacier's mean height of ambiguity): (S, G);
    scene_years (S,). Scenes without pixels in doubt (DEM scenes among them) add 0."""
    share = np.divide(
        np.asarray(doubt_px, float),
        np.asarray(glacier_px, float),
        out=np.zeros(np.shape(doubt_px)),
        where=np.asarray(glacier_px) > 0,
    )
    cycle = np.where(share > 0, np.nan_to_num(np.asarray(h_amb_m, float)), 0.0)
    years = np.abs(np.asarray(scene_years, float))[:, None]
    return (np.asarray(scene_weight, float) * np.minimum(share, 1.0) * cycle / years).sum(axis=0)


def unit_uncertainty(
    dhdt_m_yr: np.ndarray,
    scene_weight: np.ndarray,
    scene_px: np.ndarray,
    measured_px: np.ndarray,
    penetration_sigma_m: np.ndarray,
    scene_years: np.ndarray,
    scene_month: np.ndarray,
    stable_sigma_m: np.ndarray,
    scene_datum_sigma_m: np.ndarray,
    pixel_size_m: float,
    *,
    penetration_std_m: np.ndarray | None = None,
    unmeasured_m_yr: np.ndarray | None = None,
    density_kg_m3: float = 850.0,
    density_sigma_kg_m3: float = 60.0,
    autocorrelation_m: float = 500.0,
    autocorrelation_penetration_m: float = 2000.0,
    seasonal_sigma_m_per_month: float = 0.15,
    reference_sigma_m: float | None = None,
    stable_white_sigma_m: np.ndarray | None = None,
    adjusted_share: np.ndarray | None = None,
    adjusted_sigma_m: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The error terms (m w.e./yr, 1 sigma) of U units; keys are the table's column names.

    dhdt_m_yr (U,); scene_weight, scene_px (S, U); measured_px (U,); penetration_sigma_m
    (sigma_table, m; with X-band offsets already (1 - k) sigma_table) and penetration_std_m
    (sigma_spread, m, of the unit's glaciers without an offset; None: unknown) (U,);
    scene_years, scene_month, stable_sigma_m, scene_datum_sigma_m (S,) per scene;
    stable_white_sigma_m (S,): the white part of stable_sigma_m (m, `white_correlated_split`;
    None: all correlated); unmeasured_m_yr (U,): the unmeasured-area term in m/yr
    (`unmeasured_sigma_m_yr`; None: no such column). adjusted_share, adjusted_sigma_m (U,): f
    and sigma_adj (m) of the glaciers with their own X-band offset (`adjusted_units`; for a
    glacier 1 and its stored error, or 0; None: none): their reference and spread errors are
    sigma_adj, in the penetration column (module docstring). Units without a measurement get
    NaN.
    """
    w = np.asarray(scene_weight, dtype=float)
    years = np.abs(np.asarray(scene_years, dtype=float))[:, None]  # spans (scenes may be older)
    to_mwe = density_kg_m3 / 1000.0
    datum = np.nan_to_num(np.asarray(scene_datum_sigma_m, dtype=float))[:, None]
    seasonal = seasonal_sigma_m_per_month * months_from_february(scene_month)[:, None]
    random = random_sigma_m_yr(
        w,
        scene_px,
        measured_px,
        scene_years,
        stable_sigma_m,
        pixel_size_m,
        autocorrelation_m,
        reference_sigma_m,
        stable_white_sigma_m,
        adjusted_share,
    )
    per_year = (w / years).sum(axis=0)
    rest = _rest_share(adjusted_share, w.shape[1])
    area_u = np.asarray(measured_px, dtype=float) * pixel_size_m**2
    spread = np.zeros_like(per_year) if penetration_std_m is None else penetration_std_m
    adjusted = np.zeros_like(per_year) if adjusted_sigma_m is None else adjusted_sigma_m
    rho_pen = spatial_variance_ratio(rest * area_u, autocorrelation_penetration_m)
    penetration = (
        np.sqrt(
            np.nan_to_num(penetration_sigma_m) ** 2
            + (rest * np.nan_to_num(spread)) ** 2 * rho_pen
            + np.nan_to_num(adjusted) ** 2
        )
        * per_year
    )
    datum_term = np.sqrt(((w * datum / years) ** 2).sum(axis=0))
    seasonal_term = np.sqrt(((w * seasonal / years) ** 2).sum(axis=0))
    measured = np.isfinite(dhdt_m_yr)
    terms = {
        "sigma_random_mwe_yr": random * to_mwe,
        "sigma_penetration_mwe_yr": penetration * to_mwe,
        "sigma_datum_mwe_yr": datum_term * to_mwe,
        "sigma_seasonal_mwe_yr": seasonal_term * to_mwe,
    }
    if unmeasured_m_yr is not None:
        terms["sigma_unmeasured_mwe_yr"] = np.asarray(unmeasured_m_yr, dtype=float) * to_mwe
    terms["sigma_density_mwe_yr"] = np.abs(dhdt_m_yr) * density_sigma_kg_m3 / 1000.0
    terms = {k: np.where(measured, v, np.nan) for k, v in terms.items()}
    return {"mb_sigma_mwe_yr": quadrature(*terms.values())} | terms
