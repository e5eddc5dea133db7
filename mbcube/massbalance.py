"""Glacier mass balance from the binned statistics (pure numpy on small tables; reads no pixel).

The statistics are sums per scene x glacier x elevation bin x surface (count, sum of dh), so every
step here is a sum or a ratio of sums, and region results are glacier results summed first:

1. **Scene selection** (`select_scenes`, the rule `scene_rule`), per glacier:

   - ``count_weighted``: every scene covering the glacier is used; each measurement counts once,
     so a scene weighs by how many pixels it measured. Uses all the data; mixes seasons.
   - ``prefer_jan_mar``: when the January-March scenes alone measure bins holding at least
     `PREFERRED_MIN_COVERAGE` of the glacier's area (bins with >= min_px_per_bin measurements),
     only they are used (their surface is closest to the February reference: smallest seasonal
     error); otherwise every scene is used, count-weighted. Trades data for smaller seasonal bias.

2. **Scene combination** (`combine_scenes`): each scene's own time span (years since the reference
   date; negative for a scene older than the reference DEM, whose dh = scene - reference is then
   minus the change, so dh / years is the rate either way) turns its dh into a rate, then rates
   are averaged over the measurements of the used scenes:
   ``rate_sum = sum_s sum_dh_s / years_s``, ``count = sum_s count_s`` per (glacier, bin, surface).
   The result (`GlacierStats`) is small and additive over glaciers. Partly measured bins
   (`representative_cells`): a (bin, surface) cell whose best-covering scene measured less than
   `min_frac` (MassBalanceConfig.min_measured_frac_per_bin, default 0.2) of its pixels loses its
   measurements and is filled in step 3 (a measured sliver is one side or the margin of the bin).
   Each kept cell records the pixels its best scene measured (`measured_bin_px`).

3. **Hypsometric mean** (`balance`): per bin and surface the mean rate, where at least
   min_px_per_bin measurements; other bins are filled by linear interpolation along the bin
   elevation (nearest measured bin beyond the ends) within the same surface type, or, where a
   surface has no measured bin, from the profile of both surfaces together; the filled area is
   recorded (`filled_frac`). The bin values are weighted by the full hypsometry (area of ALL the
   glacier's pixels per bin and surface). Rate (m/yr) x density / 1000 = mass balance (m w.e./yr);
   volume change (km3/yr) = rate x area; mass change (Gt/yr) = mass balance x area x 1000 kg/m3.
   Glacier pixels void in the reference DEM are binned by the X-band reference where it has a
   value (`mbcube.binning.hypsometry`), so they are in their bin's area and take its rate (a
   cell's unmeasured part); those void in both (no elevation, so no bin) count in the area and
   take the glacier's mean. `hypsometric_profile` gives the filled profile and each cell's
   measured share; `unit_results` adds every error term (`mbcube.uncertainty`), including the
   unmeasured-area term from that profile (filled cells, unmeasured parts of cells, voids).

4. **Regions** (`sum_units`): region-level hypsometric averaging over the summed statistics of the
   member glaciers, with each glacier's bin mean weighted by its area in that bin (not by its
   measurement count, so glaciers seen by several overlapping scenes do not dominate); bins no
   member measured are filled along the region's profile; void areas take their glacier's mean
   (`with_void_area`). A fully measured region equals the area-weighted mean of its glaciers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import sparse

from mbcube.config import MassBalanceConfig
from mbcube.unit_sums import Units

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "MIN_MEASURED_FRAC",
    "PREFERRED_MIN_COVERAGE",
    "GlacierStats",
    "Profile",
    "balance",
    "combine_scenes",
    "fill_along_elevation",
    "filled_profile",
    "filled_profiles",
    "hypsometric_profile",
    "mass_balance_dataset",
    "representative_cells",
    "select_scenes",
    "sum_units",
    "unit_results",
    "with_void_area",
]

#: prefer_jan_mar uses only the Jan-Mar scenes of a glacier when they measure at least this
#: fraction of its area (bins with enough measurements); otherwise all its scenes.
PREFERRED_MIN_COVERAGE = 0.5
PREFERRED_MONTHS = (1, 2, 3)
#: Default of MassBalanceConfig.min_measured_frac_per_bin (see `representative_cells`).
MIN_MEASURED_FRAC: float = MassBalanceConfig.model_fields["min_measured_frac_per_bin"].default

SceneRule = Literal["count_weighted", "prefer_jan_mar"]


@dataclass(frozen=True)
class GlacierStats:
    """Statistics of units (glaciers, or regions = sums of glaciers) after scene combination.

    Shapes: U units, B bins, F surface types, S scenes.
    """

    count: np.ndarray  #: (U, B, F) measurements used
    weight: np.ndarray  #: (U, B, F) weight of the sums: count (glaciers) or area (m2, regions)
    rate_sum: np.ndarray  #: (U, B, F) weighted sum of dh / years (m/yr x weight)
    dh_sum: np.ndarray  #: (U, B, F) weighted sum of dh (m x weight)
    area_m2: np.ndarray  #: (U, B, F) hypsometry: area of all pixels (m2)
    n_px: np.ndarray  #: (U, B, F) hypsometry: number of pixels
    measured_px: np.ndarray  #: (U,) pixels measured (per bin the best-covering scene, <= n_px)
    scene_px: np.ndarray  #: (S, U) measurements of each used scene
    scene_weight: np.ndarray  #: (S, U) weight of each scene in the unit's mean (sums to 1)
    void_area_m2: np.ndarray | None = None  #: (U,) glacier area without a reference DEM (m2)
    void_px: np.ndarray | None = None  #: (U,) its pixels
    #: (U, B, F) pixels of each cell the unit's mean stands for: glaciers, the pixels of a
    #: measured cell the best-covering scene measured (<= n_px; 0 in unmeasured cells); regions,
    #: their glaciers' sum. None: min(count, n_px) of the measured cells (overlapping scenes then
    #: count twice, so it can overstate what was measured).
    measured_bin_px: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.count.shape[0]
        if self.measured_bin_px is None:
            measured = np.where(self.count > 0, np.minimum(self.count, self.n_px), 0.0)
            object.__setattr__(self, "measured_bin_px", measured)
        if self.void_area_m2 is None:
            object.__setattr__(self, "void_area_m2", np.zeros(n))
        if self.void_px is None:
            object.__setattr__(self, "void_px", np.zeros(n))

    def __getitem__(self, index: slice | np.ndarray) -> GlacierStats:
        """The units at `index` (a slice or integer/boolean array)."""
        values: dict[str, Any] = {}
        for f in fields(self):
            arr = getattr(self, f.name)
            if arr is None:
                values[f.name] = None
            else:
                values[f.name] = arr[:, index] if f.name.startswith("scene_") else arr[index]
        return GlacierStats(**values)

    @property
    def measured_bin_px_or_zero(self) -> np.ndarray:
        """(U, B, F) measured pixels per cell (see `measured_bin_px`)."""
        if self.measured_bin_px is None:  # set in __post_init__; for the type checker
            return np.zeros(self.count.shape)
        return self.measured_bin_px

    @property
    def void_area(self) -> np.ndarray:
        """(U,) void area (m2), zeros when unknown."""
        return np.zeros(self.count.shape[0]) if self.void_area_m2 is None else self.void_area_m2

    @property
    def void_pixels(self) -> np.ndarray:
        """(U,) void pixels, zeros when unknown."""
        return np.zeros(self.count.shape[0]) if self.void_px is None else self.void_px


def _cell_coverage(count: np.ndarray, area_m2: np.ndarray, min_px: int) -> np.ndarray:
    """Fraction of the area (over bins and surfaces, last two axes) in cells with >= min_px."""
    total = area_m2.sum(axis=(-2, -1))
    covered = np.where(count >= min_px, area_m2, 0.0).sum(axis=(-2, -1))
    return np.divide(covered, total, out=np.zeros_like(total, dtype=float), where=total > 0)


def mass_balance_dataset(store: Path | str, config: MassBalanceConfig | None = None) -> xr.Dataset:
    """Glacier results of the cube at `store` along `glacier` (see `mbcube.aggregate`, which
    reads the store; this module computes only)."""
    from mbcube.aggregate import mass_balance_dataset as from_store

    return from_store(store, config)


def select_scenes(
    count: np.ndarray,
    scene_month: np.ndarray,
    area_m2: np.ndarray,
    rule: SceneRule = "count_weighted",
    min_px_per_bin: int = 10,
) -> np.ndarray:
    """Which scenes each glacier uses: (S, G) bool.

    count (S, G, B, F) measurements; scene_month (S,) 1-12; area_m2 (G, B, F) hypsometry.
    """
    if rule not in ("count_weighted", "prefer_jan_mar"):
        raise ValueError(f"scene_rule must be 'count_weighted' or 'prefer_jan_mar', got {rule!r}")
    covers = count.sum(axis=(2, 3)) > 0  # (S, G)
    if rule == "count_weighted":
        return covers
    preferred = np.isin(np.asarray(scene_month), PREFERRED_MONTHS)  # (S,)
    preferred_count = np.where(preferred[:, None, None, None], count, 0).sum(axis=0)
    enough = _cell_coverage(preferred_count, area_m2, min_px_per_bin) >= PREFERRED_MIN_COVERAGE
    only_preferred = covers & preferred[:, None]
    return np.where(enough[None, :], only_preferred, covers)


def _cell_rates(
    count: np.ndarray,
    sum_dh_m: np.ndarray,
    scene_years: np.ndarray,
    use: np.ndarray,
    h_amb_m: np.ndarray,
    min_px_per_bin: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per scene and cell: measured enough (used, >= min_px_per_bin pixels), the mean rate
    (m/yr; (S, G, B, F)), and per scene and glacier one cycle as a rate, h_amb / T (m/yr, (S, G);
    NaN for DEM scenes)."""
    ok = use[:, :, None, None] & (count >= min_px_per_bin)
    years = np.asarray(scene_years, dtype=float)
    rate = sum_dh_m / np.where(count > 0, count, 1.0) / years[:, None, None, None]
    return ok, rate, np.asarray(h_amb_m, dtype=float) / years[:, None]


#: A scene's rate in a cell this far from the other scenes' median (in its own cycle h_amb / T)
#: means a cycle slip in one of them.
CROSS_SCENE_CYCLES = 0.6


def cross_scene_doubt(
    count: np.ndarray,
    sum_dh_m: np.ndarray,
    scene_years: np.ndarray,
    use: np.ndarray,
    h_amb_m: np.ndarray,
    min_px_per_bin: int,
) -> np.ndarray:
    """(S, G) pixels of each scene in cells (bin x surface) where its rate (m/yr) differs from
    the median rate of the other used scenes measuring the cell (>= min_px_per_bin pixels each)
    by more than CROSS_SCENE_CYCLES x h_amb / |T| of the scene: where scenes disagree by a
    cycle, one of them slipped, and which one cannot be told from two scenes, so each is in
    doubt. count, sum_dh_m: (S, G, B, F); scene_years (S,); use (S, G); h_amb_m (S, G), NaN for
    DEM scenes (compared against, never in doubt)."""
    n_scenes = count.shape[0]
    out = np.zeros(count.shape[:2])
    if n_scenes < 2:
        return out
    ok, rate, cycle = _cell_rates(count, sum_dh_m, scene_years, use, h_amb_m, min_px_per_bin)
    rate, cycle = np.where(ok, rate, np.nan), np.abs(cycle)
    for s in range(n_scenes):
        others = np.delete(rate, s, axis=0)
        seen = np.asarray(np.isfinite(others).any(axis=0))
        with np.errstate(invalid="ignore"):
            median = np.nanmedian(np.where(seen[None], others, 0.0), axis=0)
            bad = seen & (np.abs(rate[s] - median) > CROSS_SCENE_CYCLES * cycle[s][:, None, None])
        out[s] = np.where(bad, count[s], 0).sum(axis=(1, 2))
    return out


#: Two scenes confirm each other's cycle only when one cycle more in both would change their
#: difference by at least this much (m/yr): |h_s / T_s - h_t / T_t|, well above the few cm/yr
#: scenes differ by otherwise (seasonal, datum, noise).
CONFIRM_MIN_M_YR = 0.5


def confirmed_cycles(
    count: np.ndarray,
    sum_dh_m: np.ndarray,
    scene_years: np.ndarray,
    use: np.ndarray,
    h_amb_m: np.ndarray,
    min_px_per_bin: int,
) -> np.ndarray:
    """(S, G) bool: scene s's whole cycle on glacier g is confirmed by another used insar scene t:
    on the cells both measured (>= min_px_per_bin pixels each), their mean rates differ by less
    than half of d = |h_s / T_s - h_t / T_t| (m/yr), with d >= CONFIRM_MIN_M_YR. A whole-cycle
    error in one or both (each of its own h_amb) would make them differ by d or more. Arrays as
    in `cross_scene_doubt`."""
    n_scenes = count.shape[0]
    out = np.zeros(count.shape[:2], bool)
    ok, rate, cycle = _cell_rates(count, sum_dh_m, scene_years, use, h_amb_m, min_px_per_bin)
    for s in range(n_scenes):
        for t in range(s + 1, n_scenes):
            both = ok[s] & ok[t]
            w = np.where(both, np.minimum(count[s], count[t]), 0.0)
            total = w.sum(axis=(1, 2))
            diff = np.divide(
                (w * (rate[s] - rate[t])).sum(axis=(1, 2)),
                total,
                out=np.full(total.shape, np.inf),
                where=total > 0,
            )
            d = np.abs(cycle[s] - cycle[t])  # NaN for DEM scenes: never confirms
            with np.errstate(invalid="ignore"):
                agree = (d >= CONFIRM_MIN_M_YR) & (np.abs(diff) < 0.5 * d)
            out[s] |= agree
            out[t] |= agree
    return out


def combine_scenes(
    count: np.ndarray,
    sum_dh_m: np.ndarray,
    scene_years: np.ndarray,
    area_m2: np.ndarray,
    n_px: np.ndarray,
    use: np.ndarray,
    min_px_per_bin: int = 10,
    void_area_m2: np.ndarray | None = None,
    void_px: np.ndarray | None = None,
    min_frac: float = MIN_MEASURED_FRAC,
) -> GlacierStats:
    """Combine the used scenes of each glacier into one set of statistics.

    count, sum_dh_m: (S, G, B, F); scene_years (S,) years since the reference date; area_m2,
    n_px: (G, B, F) hypsometry; use: (S, G) bool from `select_scenes`; void_area_m2, void_px
    (G,): glacier area without a reference DEM (no bin; it takes the glacier's mean rate).
    Cells that are not `representative_cells` (too few measurements, or measured on less than
    `min_frac` of their pixels by every scene) are dropped here, so they are filled along
    elevation by `balance` and a region (`sum_units`) never uses them.
    """
    years = np.asarray(scene_years, dtype=float)
    if np.any(~np.isfinite(years) | (years == 0)):
        raise ValueError(
            f"scene_years must be finite and non-zero (a scene on the reference date measures no "
            f"change), got {years}"
        )
    used = use[:, :, None, None]
    count_s = np.where(used, count, 0).astype(float)
    n_px = np.asarray(n_px, dtype=float)
    best = count_s.max(axis=0) if len(years) else np.zeros(count_s.shape[1:])
    measured_bin = np.minimum(best, n_px)
    measured_px = measured_bin.sum(axis=(1, 2))
    keep = representative_cells(count_s.sum(axis=0), measured_bin, n_px, min_px_per_bin, min_frac)
    count_s = np.where(keep[None], count_s, 0.0)
    sum_s = np.where(used & (count > 0) & keep[None], sum_dh_m, 0.0)
    total = count_s.sum(axis=0)
    rate_sum = np.einsum("s,sgbf->gbf", 1.0 / years, sum_s)
    dh_sum = sum_s.sum(axis=0)
    scene_px = count_s.sum(axis=(2, 3))
    # each scene's share of the unit's hypsometric mean: over measured cells, area x its share
    valid = total >= min_px_per_bin
    area_per_count = np.divide(area_m2, total, out=np.zeros(total.shape), where=valid & (total > 0))
    scene_weight = np.einsum("sgbf,gbf->sg", count_s, area_per_count)
    norm = scene_weight.sum(axis=0)
    # units whose measured cells hold no area: fall back to the measurement counts
    fallback = np.divide(
        scene_px, scene_px.sum(axis=0), out=np.zeros_like(scene_px), where=scene_px.sum(axis=0) > 0
    )
    scene_weight = np.where(
        norm > 0,
        np.divide(scene_weight, norm, out=np.zeros_like(scene_weight), where=norm > 0),
        fallback,
    )
    return GlacierStats(
        count=total,
        weight=total,
        rate_sum=rate_sum,
        dh_sum=dh_sum,
        area_m2=np.asarray(area_m2, dtype=float),
        n_px=n_px,
        measured_px=measured_px,
        scene_px=scene_px,
        scene_weight=scene_weight,
        void_area_m2=None if void_area_m2 is None else np.asarray(void_area_m2, dtype=float),
        void_px=None if void_px is None else np.asarray(void_px, dtype=float),
        measured_bin_px=np.where(valid, measured_bin, 0.0),
    )


def representative_cells(
    count: np.ndarray,
    measured_bin_px: np.ndarray,
    n_px: np.ndarray,
    min_px_per_bin: int = 10,
    min_frac: float = MIN_MEASURED_FRAC,
) -> np.ndarray:
    """Which (unit, bin, surface) cells keep their measurements: (U, B, F) bool.

    A cell is kept when its best-covering scene measured at least `min_frac` of its pixels
    (``measured_bin_px >= min_frac * n_px``): a bin seen on a small part of its area is not a
    sample of the bin (the part seen is one side of the glacier, or its margin), so it is filled
    along elevation instead. A unit none of whose cells has both that share and >= min_px_per_bin
    measurements keeps every cell (its best available data). Kept cells with >= min_px_per_bin
    measurements count as measured (`balance`).
    """
    if not 0.0 <= min_frac <= 1.0:
        raise ValueError(f"min_frac must be within [0, 1], got {min_frac}")
    share_ok = measured_bin_px >= min_frac * n_px
    usable = share_ok & (count >= min_px_per_bin)
    return np.where(usable.any(axis=(1, 2), keepdims=True), share_ok, True)


def sum_units(
    stats: GlacierStats, membership: np.ndarray, min_px_per_bin: int = 10
) -> GlacierStats:
    """Statistics of units made of glaciers: membership (U, G) 0/1 (glacier g belongs to unit u).

    Region-level hypsometric averaging: in each (bin, surface) the unit's mean is the mean of its
    glaciers' means there, weighted by their areas, over the glaciers measured in that bin (>=
    min_px_per_bin); so a glacier seen by three overlapping scenes does not outweigh one seen once.
    Bins no glacier measured are filled along the unit's own profile (`balance`). Pixel sums
    (counts, measured pixels, hypsometry) are summed; scene weights are area-weighted means."""
    m = sparse.csr_array(np.asarray(membership, dtype=float))  # no BLAS threads: tiny products
    n_units = m.shape[0]
    shape = stats.count.shape[1:]

    def summed(arr: np.ndarray) -> np.ndarray:
        return np.asarray(m @ arr.reshape(arr.shape[0], -1)).reshape(n_units, *shape)

    valid = stats.count >= min_px_per_bin
    area = np.where(valid, stats.area_m2, 0.0)

    def area_weighted(sums: np.ndarray) -> np.ndarray:
        mean = np.divide(sums, stats.weight, out=np.zeros(sums.shape), where=valid)
        return summed(area * mean)

    area_g = stats.area_m2.sum(axis=(1, 2))
    area_u = m @ area_g
    weighted = np.asarray(m @ (stats.scene_weight * area_g[None, :]).T).T
    scene_weight = np.divide(
        weighted, area_u[None, :], out=np.zeros_like(weighted), where=area_u[None, :] > 0
    )
    return GlacierStats(
        count=summed(np.where(valid, stats.count, 0.0)),
        weight=summed(area),
        rate_sum=area_weighted(stats.rate_sum),
        dh_sum=area_weighted(stats.dh_sum),
        area_m2=summed(stats.area_m2),
        n_px=summed(stats.n_px),
        measured_px=m @ stats.measured_px,
        scene_px=np.asarray(m @ stats.scene_px.T).T,
        scene_weight=scene_weight,
        void_area_m2=m @ stats.void_area,
        void_px=m @ stats.void_pixels,
        measured_bin_px=summed(np.where(valid, stats.measured_bin_px_or_zero, 0.0)),
    )


def _fill_plan(valid: np.ndarray, z_m: np.ndarray) -> tuple[np.ndarray, ...]:
    """Where each entry along the last axis takes its value from: the nearest valid bins below
    (p) and above (q), the interpolation weight t, and which of them exist."""
    n = valid.shape[-1]
    idx = np.arange(n)
    prev = np.maximum.accumulate(np.where(valid, idx, -1), axis=-1)
    nxt = np.flip(np.minimum.accumulate(np.flip(np.where(valid, idx, n), -1), axis=-1), -1)
    has_prev, has_next = prev >= 0, nxt < n
    p, q = np.clip(prev, 0, n - 1), np.clip(nxt, 0, n - 1)
    zp, zq = z_m[p], z_m[q]
    gap = zq - zp
    t = np.divide(z_m - zp, gap, out=np.zeros(gap.shape), where=gap > 0)
    return p, q, t, has_prev, has_next


def _fill(values: np.ndarray, valid: np.ndarray, plan: tuple[np.ndarray, ...]) -> np.ndarray:
    p, q, t, has_prev, has_next = plan
    vp, vq = np.take_along_axis(values, p, -1), np.take_along_axis(values, q, -1)
    filled = np.where(
        has_prev & has_next,
        vp + t * (vq - vp),
        np.where(has_prev, vp, np.where(has_next, vq, np.nan)),
    )
    return np.where(valid, values, filled)


def fill_along_elevation(values: np.ndarray, valid: np.ndarray, z_m: np.ndarray) -> np.ndarray:
    """Fill invalid entries along the last axis (bins at elevations z_m, increasing) by linear
    interpolation between the nearest valid bins, and with the nearest valid value beyond the
    ends. Rows without a valid bin stay NaN. Valid entries are returned unchanged."""
    return _fill(values, valid, _fill_plan(valid, z_m))


def filled_profile(
    sums: np.ndarray,
    count: np.ndarray,
    z_m: np.ndarray,
    min_px: int,
    weight: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell mean (U, B, F) of `sums` / `weight` (default: `count`) where count >= min_px, the
    other cells filled along elevation z_m (bin centres, m) within their surface type, or from
    both surfaces pooled where a surface has no measured bin; and the measured cells (U, B, F)."""
    (out,), valid = filled_profiles((sums,), count, z_m, min_px, weight)
    return out, valid


def filled_profiles(
    sums: tuple[np.ndarray, ...],
    count: np.ndarray,
    z_m: np.ndarray,
    min_px: int,
    weight: np.ndarray | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """`filled_profile` of several sums sharing count and weight (the gaps are found once)."""
    weight = count if weight is None else weight
    valid = (count >= min_px) & (weight > 0)  # (U, B, F)
    valid_fb = np.moveaxis(valid, 1, -1)  # (U, F, B)
    pooled_weight = weight.sum(axis=2)
    pooled_valid = (count.sum(axis=2) >= min_px) & (pooled_weight > 0)
    plan, pooled_plan = _fill_plan(valid_fb, z_m), _fill_plan(pooled_valid, z_m)
    surface_has_data = valid_fb.any(axis=-1, keepdims=True)  # (U, F, 1)
    outs = []
    for values in sums:
        mean = np.divide(values, weight, out=np.full(values.shape, np.nan), where=valid)
        by_surface = _fill(np.moveaxis(mean, 1, -1), valid_fb, plan)
        pooled_mean = np.divide(
            values.sum(axis=2),
            pooled_weight,
            out=np.full(pooled_weight.shape, np.nan),
            where=pooled_valid,
        )
        pooled = _fill(pooled_mean, pooled_valid, pooled_plan)  # (U, B)
        out = np.where(surface_has_data, by_surface, pooled[:, None, :])
        outs.append(np.moveaxis(out, -1, 1))
    return outs, valid


@dataclass(frozen=True)
class Profile:
    """The hypsometric profile of U units (`hypsometric_profile`)."""

    rate_m_yr: np.ndarray  #: (U, B, F) per-cell rate, measured or filled (NaN: none)
    dh_m: np.ndarray  #: (U, B, F) per-cell dh over the scenes' spans (m)
    valid: np.ndarray  #: (U, B, F) measured cells (the others are filled)
    measured_frac: np.ndarray  #: (U, B, F) share of each cell's pixels measured (0 if filled)


def hypsometric_profile(
    stats: GlacierStats,
    bin_lower_m: np.ndarray,
    bin_width_m: float = 50.0,
    min_px_per_bin: int = 10,
) -> Profile:
    """Per-cell mean rate and dh of each unit, cells without >= min_px_per_bin measurements
    filled along elevation (`filled_profiles`), and the measured share of each cell."""
    z_m = np.asarray(bin_lower_m, dtype=float) + 0.5 * bin_width_m
    if z_m.size > 1 and np.any(np.diff(z_m) <= 0):
        raise ValueError("bins must be increasing elevations")
    (rate, dh), valid = filled_profiles(
        (stats.rate_sum, stats.dh_sum), stats.count, z_m, min_px_per_bin, stats.weight
    )
    n_px = stats.n_px
    measured = np.divide(
        stats.measured_bin_px_or_zero, n_px, out=np.zeros(n_px.shape), where=valid & (n_px > 0)
    )
    return Profile(rate, dh, valid, np.clip(measured, 0.0, 1.0))


def balance(
    stats: GlacierStats,
    bin_lower_m: np.ndarray,
    bin_width_m: float = 50.0,
    min_px_per_bin: int = 10,
    density_kg_m3: float = 850.0,
    profile: Profile | None = None,
) -> dict[str, np.ndarray]:
    """Hypsometric mass balance of each unit. Returns arrays (U,) keyed by table column:

    area_km2 (binned area + void area), coverage_frac (measured pixels / all pixels, voids
    included), filled_frac (share of the binned area in bins filled by interpolation),
    dh_m (mean elevation change over the scenes' spans, m), dhdt_m_yr, mb_mwe_yr,
    volume_km3_yr, mass_gt_yr. Units without any bin of >= min_px_per_bin measurements get NaN.
    `profile`: the units' `hypsometric_profile` when already computed.
    """
    if profile is None:
        profile = hypsometric_profile(stats, bin_lower_m, bin_width_m, min_px_per_bin)
    rate, dh, valid = profile.rate_m_yr, profile.dh_m, profile.valid
    area = stats.area_m2
    total = area.sum(axis=(1, 2))
    measured = valid.any(axis=(1, 2)) & (total > 0)

    def mean(values: np.ndarray) -> np.ndarray:
        weighted = np.where(area > 0, values * area, 0.0).sum(axis=(1, 2))
        return np.where(measured, weighted / np.where(total > 0, total, 1.0), np.nan)

    dhdt = mean(rate)
    filled_area = np.where(valid, 0.0, area).sum(axis=(1, 2))
    n_px = stats.n_px.sum(axis=(1, 2)) + stats.void_pixels
    glacier_area = total + stats.void_area
    mb = dhdt * density_kg_m3 / 1000.0
    return {
        "area_km2": glacier_area / 1e6,
        "coverage_frac": np.divide(
            stats.measured_px, n_px, out=np.zeros_like(total), where=n_px > 0
        ),
        "filled_frac": np.where(measured, filled_area / np.where(total > 0, total, 1.0), np.nan),
        "dh_m": mean(dh),
        "dhdt_m_yr": dhdt,
        "mb_mwe_yr": mb,
        "volume_km3_yr": dhdt * glacier_area / 1e9,
        "mass_gt_yr": mb * glacier_area / 1e9,
    }


def unit_results(
    stats: GlacierStats,
    bin_lower_m: np.ndarray,
    scene_years: np.ndarray,
    scene_month: np.ndarray,
    stable_sigma_m: np.ndarray,
    scene_datum_sigma_m: np.ndarray,
    pixel_size_m: float,
    penetration_sigma_m: np.ndarray,
    penetration_std_m: np.ndarray | None = None,
    config: MassBalanceConfig | None = None,
    reference_sigma_m: float | None = None,
    stable_white_sigma_m: np.ndarray | None = None,
    adjusted_share: np.ndarray | None = None,
    adjusted_sigma_m: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Mass balance (`balance`) and every error term (`mbcube.uncertainty.unit_uncertainty`,
    with the unmeasured-area term) of U units, keyed by table column; parameters from `config`
    (default: MassBalanceConfig()). Per scene (S,): scene_years, scene_month, stable_sigma_m
    (stable-ground spread, m), scene_datum_sigma_m (m), stable_white_sigma_m (the white part of
    stable_sigma_m, m, `mbcube.uncertainty.white_correlated_split`; None: all of it correlated);
    per unit (U,): penetration_sigma_m (table error, m), penetration_std_m (between-glacier
    spread, m; None: unknown). reference_sigma_m: a bound (m) of the reference DEM's error
    measured in the store (the stable-ground spread of SRTM-X minus SRTM-C, the `penetration`
    group's reference_sigma_m); the configured `reference_sigma_m`, when set, wins over it.
    With per-glacier X-band offsets (corrections.penetration 'xband_glacier'): penetration_sigma_m
    is the (1 - k)-weighted table error, penetration_std_m the spread of the glaciers without an
    offset, and adjusted_share, adjusted_sigma_m (U,) the share f of the measured pixels on
    glaciers with an offset and their reference-surface error sigma_adj (m)
    (`mbcube.uncertainty.adjusted_units`; None: no offsets); see `mbcube.uncertainty`."""
    from mbcube.uncertainty import unit_uncertainty, unmeasured_sigma_m_yr

    c = config or MassBalanceConfig()
    profile = hypsometric_profile(stats, bin_lower_m, c.bin_width_m, c.min_px_per_bin)
    out = balance(
        stats, bin_lower_m, c.bin_width_m, c.min_px_per_bin, c.density_kg_m3, profile=profile
    )
    unmeasured = unmeasured_sigma_m_yr(
        stats.area_m2,
        profile.measured_frac,
        profile.rate_m_yr,
        stats.void_area,
        np.asarray(bin_lower_m, dtype=float) + c.bin_width_m / 2,
    )
    errors = unit_uncertainty(
        out["dhdt_m_yr"],
        stats.scene_weight,
        stats.scene_px,
        stats.measured_px,
        penetration_sigma_m,
        scene_years,
        scene_month,
        stable_sigma_m,
        scene_datum_sigma_m,
        pixel_size_m,
        penetration_std_m=penetration_std_m,
        unmeasured_m_yr=unmeasured,
        density_kg_m3=c.density_kg_m3,
        density_sigma_kg_m3=c.density_sigma_kg_m3,
        autocorrelation_m=c.autocorrelation_m,
        autocorrelation_penetration_m=c.autocorrelation_penetration_m,
        seasonal_sigma_m_per_month=c.seasonal_sigma_m_per_month,
        reference_sigma_m=c.reference_sigma_m
        if c.reference_sigma_m is not None
        else reference_sigma_m,
        stable_white_sigma_m=stable_white_sigma_m,
        adjusted_share=adjusted_share,
        adjusted_sigma_m=adjusted_sigma_m,
    )
    return out | errors


def with_void_area(
    unit_value: np.ndarray,
    unit_binned_area_m2: np.ndarray,
    glacier_value: np.ndarray,
    void_area_m2: np.ndarray,
    units: Units,
) -> np.ndarray:
    """A region's mean over its whole area (U,), voids included: its hypsometric mean
    `unit_value` over the binned area, and over each member glacier's void area (no reference
    DEM, so no bin) that glacier's own mean (`glacier_value`, G), or the region's where the
    glacier has none. So a region of fully measured glaciers equals their area-weighted mean."""
    known = np.isfinite(glacier_value)
    void_all, void_known, void_sum = units.sum(
        np.stack(
            [
                void_area_m2,
                np.where(known, void_area_m2, 0.0),
                np.where(known, void_area_m2 * np.nan_to_num(glacier_value), 0.0),
            ]
        )
    )
    total = unit_binned_area_m2 + void_all
    value = unit_value * (unit_binned_area_m2 + void_all - void_known) + void_sum
    return np.divide(value, total, out=np.full(total.shape, np.nan), where=total > 0) + np.where(
        np.isfinite(unit_value), 0.0, np.nan
    )
