"""Mass balance kernels: gap filling, hypsometric averaging, scene combination, uncertainty,
regions; each checked against hand numbers or a slow, obviously-right numpy oracle."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbcube.binning import void_elevation
from mbcube.config import MassBalanceConfig
from mbcube.errors import MbcubeWarning
from mbcube.massbalance import (
    GlacierStats,
    balance,
    combine_scenes,
    fill_along_elevation,
    filled_profile,
    hypsometric_profile,
    select_scenes,
    sum_units,
    unit_results,
)
from mbcube.regions import RegionSet, from_attribute, from_ids, surge_free
from mbcube.uncertainty import (
    datum_sigma_m,
    months_from_february,
    n_eff,
    random_sigma_m_yr,
    spatial_variance_ratio,
    stable_moments,
    unit_uncertainty,
    unmeasured_sigma_m_yr,
)
from tests.test_uncertainty import oracle_random, random_scene_case

# ------------------------------------------------------------------ oracles (slow, per row / bin)


def oracle_fill(values: np.ndarray, valid: np.ndarray, z: np.ndarray) -> np.ndarray:
    """np.interp row by row (linear inside, nearest valid value beyond the ends)."""
    out = np.full(values.shape, np.nan)
    for idx in np.ndindex(values.shape[:-1]):
        row, ok = values[idx], valid[idx]
        if ok.any():
            out[idx] = np.interp(z, z[ok], row[ok])
    return out


def oracle_profile(sums: np.ndarray, count: np.ndarray, z: np.ndarray, min_px: int) -> np.ndarray:
    """Per glacier, per surface: measured bin means, interpolated; a surface without any measured
    bin takes the pooled (both surfaces) profile."""
    n_units, _, n_surf = sums.shape
    out = np.full(sums.shape, np.nan)
    for u in range(n_units):
        pooled_c = count[u].sum(axis=1)
        pooled_ok = pooled_c >= min_px
        pooled = None
        if pooled_ok.any():
            means = sums[u].sum(axis=1)[pooled_ok] / pooled_c[pooled_ok]
            pooled = np.interp(z, z[pooled_ok], means)
        for f in range(n_surf):
            ok = count[u, :, f] >= min_px
            if ok.any():
                out[u, :, f] = np.interp(z, z[ok], sums[u, ok, f] / count[u, ok, f])
            elif pooled is not None:
                out[u, :, f] = pooled
    return out


def stats_of(
    count: np.ndarray, rate_sum: np.ndarray, area: np.ndarray, n_scenes: int = 1
) -> GlacierStats:
    units = count.shape[0]
    return GlacierStats(
        count=count.astype(float),
        weight=count.astype(float),
        rate_sum=rate_sum,
        dh_sum=rate_sum * 10.0,
        area_m2=area,
        n_px=area / 900.0,
        measured_px=np.minimum(count, area / 900.0).sum(axis=(1, 2)),
        scene_px=np.tile(count.sum(axis=(1, 2)), (n_scenes, 1)) / n_scenes,
        scene_weight=np.full((n_scenes, units), 1.0 / n_scenes),
    )


# ------------------------------------------------------------------ gap filling


@settings(max_examples=60, deadline=None)
@given(
    n_bins=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    p_valid=st.floats(0.0, 1.0),
)
def test_fill_matches_interp_row_by_row(n_bins: int, seed: int, p_valid: float) -> None:
    rng = np.random.default_rng(seed)
    z = np.cumsum(rng.uniform(10, 100, n_bins)) + 3000.0
    values = rng.normal(0, 2, (3, 4, n_bins))
    valid = rng.random((3, 4, n_bins)) < p_valid
    values_with_holes = np.where(valid, values, np.nan)
    got = fill_along_elevation(values_with_holes, valid, z)
    np.testing.assert_allclose(got, oracle_fill(values, valid, z), rtol=1e-12, atol=1e-12)


def test_fill_by_hand() -> None:
    z = np.array([100.0, 150.0, 200.0, 250.0, 300.0])
    values = np.array([np.nan, -2.0, np.nan, 1.0, np.nan])
    got = fill_along_elevation(values, np.isfinite(values), z)
    np.testing.assert_allclose(got, [-2.0, -2.0, -0.5, 1.0, 1.0])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), min_px=st.integers(1, 8))
def test_profile_matches_oracle_bin_by_bin(seed: int, min_px: int) -> None:
    rng = np.random.default_rng(seed)
    units, bins = 4, 9
    z = 4000.0 + 50.0 * np.arange(bins) + 25.0
    count = rng.integers(0, 12, (units, bins, 2)) * (rng.random((units, bins, 2)) < 0.7)
    sums = count * rng.normal(-1, 1, (units, bins, 2))
    got, valid = filled_profile(sums, count.astype(float), z, min_px)
    want = oracle_profile(sums, count, z, min_px)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(valid, count >= min_px)


def test_balance_hypsometric_by_hand() -> None:
    """One glacier, clean ice only: bins 5000-5150, the 5050 bin unmeasured (filled halfway)."""
    bins = np.array([5000.0, 5050.0, 5100.0, 5150.0])
    count = np.zeros((1, 4, 2))
    count[0, :, 0] = [20, 3, 20, 20]  # 3 < min_px: filled
    rate = np.array([-2.0, 9.0, -1.0, 0.5])
    area = np.zeros((1, 4, 2))
    area[0, :, 0] = [1e6, 2e6, 3e6, 4e6]
    s = stats_of(count, (count[..., 0] * rate)[..., None] * [1, 0], area)
    out = balance(s, bins, 50.0, min_px_per_bin=10, density_kg_m3=850.0)
    filled = -1.5  # halfway between -2 and -1
    dhdt = (1 * -2.0 + 2 * filled + 3 * -1.0 + 4 * 0.5) / 10.0
    assert out["dhdt_m_yr"][0] == pytest.approx(dhdt)
    assert out["mb_mwe_yr"][0] == pytest.approx(dhdt * 0.85)
    assert out["filled_frac"][0] == pytest.approx(0.2)
    assert out["area_km2"][0] == pytest.approx(10.0)
    assert out["volume_km3_yr"][0] == pytest.approx(dhdt * 10e6 / 1e9)
    assert out["mass_gt_yr"][0] == pytest.approx(dhdt * 0.85 * 10e6 / 1e9)
    assert out["dh_m"][0] == pytest.approx(10 * dhdt)
    # coverage: measured pixels (min(count, n_px) per bin) over all pixels
    n_px = area[0, :, 0] / 900.0
    assert out["coverage_frac"][0] == pytest.approx(
        np.minimum(count[0, :, 0], n_px).sum() / n_px.sum()
    )


def test_balance_debris_without_data_uses_pooled_profile() -> None:
    bins = np.array([4000.0, 4050.0])
    count = np.zeros((1, 2, 2))
    count[0, :, 0] = [10, 10]  # clean ice measured, debris never
    rate = np.zeros((1, 2, 2))
    rate[0, :, 0] = [10 * -3.0, 10 * -1.0]
    area = np.full((1, 2, 2), 1e6)
    out = balance(stats_of(count, rate, area), bins, 50.0, 10, 850.0)
    assert out["dhdt_m_yr"][0] == pytest.approx(-2.0)
    assert out["filled_frac"][0] == pytest.approx(0.5)


def test_balance_unmeasured_glacier_is_nan() -> None:
    out = balance(
        stats_of(np.zeros((1, 3, 2)), np.zeros((1, 3, 2)), np.ones((1, 3, 2))),
        np.array([0.0, 50.0, 100.0]),
    )
    assert np.isnan(out["dhdt_m_yr"][0]) and np.isnan(out["mb_mwe_yr"][0])
    assert out["coverage_frac"][0] == 0.0


def test_bin_shift_changes_the_answer() -> None:
    """Hypsometry one bin off must not give the same mean (the test can fail)."""
    bins = 4000.0 + 50.0 * np.arange(4)
    count = np.full((1, 4, 1), 50.0)
    rate = count * np.array([-3.0, -2.0, -1.0, 0.0])[None, :, None]
    area = np.array([4.0, 3.0, 2.0, 1.0])[None, :, None] * 1e6
    right = balance(stats_of(count, rate, area), bins)["dhdt_m_yr"][0]
    shifted = balance(stats_of(count, rate, np.roll(area, 1, axis=1)), bins)["dhdt_m_yr"][0]
    assert right == pytest.approx((4 * -3 + 3 * -2 + 2 * -1 + 0) / 10.0)
    assert abs(right - shifted) > 0.5


# ------------------------------------------------------------------ scene combination


def two_scene_case() -> tuple[np.ndarray, ...]:
    """Glacier 0: both scenes cover all; glacier 1: the Jan scene covers a third of the area."""
    count = np.zeros((2, 2, 3, 1))
    count[0, 0] = 20  # scene 0 (October) on glacier 0, every bin
    count[1, 0] = 30  # scene 1 (January)
    count[0, 1] = 20
    count[1, 1, 0] = 30  # January scene only in the lowest bin of glacier 1
    years = np.array([12.0, 13.0])
    dh = np.array([-12.0, -26.0])  # rates -1 and -2 m/yr
    sums = count * dh[:, None, None, None]
    area = np.ones((2, 3, 1)) * 1e6
    return count, sums, years, area


def test_count_weighted_combination_by_hand() -> None:
    count, sums, years, area = two_scene_case()
    use = select_scenes(count, np.array([10, 1]), area, "count_weighted", 10)
    assert use.all()
    s = combine_scenes(count, sums, years, area, area / 900, use, 10)
    # glacier 0, each bin: (20 * -1 + 30 * -2) / 50
    np.testing.assert_allclose(s.rate_sum[0, :, 0] / s.count[0, :, 0], -80.0 / 50)
    np.testing.assert_allclose(s.scene_weight[:, 0], [0.4, 0.6])
    # glacier 1: lowest bin 20 and 30, others only scene 0
    np.testing.assert_allclose(s.scene_weight[:, 1], [(0.4 + 1 + 1) / 3, 0.6 / 3])
    np.testing.assert_allclose(s.scene_px[:, 1], [60, 30])
    out = balance(s, np.array([5000.0, 5050, 5100]))
    assert out["dhdt_m_yr"][0] == pytest.approx(-1.6)
    assert out["dhdt_m_yr"][1] == pytest.approx((-1.6 - 1 - 1) / 3)


def test_prefer_jan_mar() -> None:
    count, sums, years, area = two_scene_case()
    use = select_scenes(count, np.array([10, 1]), area, "prefer_jan_mar", 10)
    # glacier 0: the January scene covers all of it -> only it; glacier 1: a third -> both
    np.testing.assert_array_equal(use, [[False, True], [True, True]])
    s = combine_scenes(count, sums, years, area, area / 900, use, 10)
    out = balance(s, np.array([5000.0, 5050, 5100]))
    assert out["dhdt_m_yr"][0] == pytest.approx(-2.0)
    np.testing.assert_allclose(s.scene_weight[:, 0], [0.0, 1.0])
    with pytest.raises(ValueError, match="scene_rule"):
        select_scenes(count, np.array([10, 1]), area, "newest", 10)  # type: ignore[arg-type]


def test_scene_older_than_the_reference() -> None:
    """A scene 12 yr before the reference DEM: dh = scene - reference = -(change), years = -12,
    so dh / years is the same rate as a scene 12 yr after; a zero span is refused."""
    count, sums, years, area = two_scene_case()
    use = np.ones((2, 2), bool)
    later = combine_scenes(count, sums, years, area, area, use)
    earlier = combine_scenes(count, -sums, -years, area, area, use)
    np.testing.assert_allclose(earlier.rate_sum, later.rate_sum)
    bins = np.array([5000.0, 5050, 5100])
    np.testing.assert_allclose(
        balance(earlier, bins)["dhdt_m_yr"], balance(later, bins)["dhdt_m_yr"]
    )
    args = (np.array([-0.5]), np.ones((1, 1)), np.array([[5000.0]]), np.array([5000.0]))
    rest = (np.array([0.3]), np.array([-12.0]), np.array([10]), np.array([2.0]), np.array([0.2]))
    flipped = (np.array([0.3]), np.array([12.0]), np.array([10]), np.array([2.0]), np.array([0.2]))
    got = unit_uncertainty(*args, *rest, 30.0)
    want = unit_uncertainty(*args, *flipped, 30.0)
    for key, value in want.items():
        assert got[key][0] == pytest.approx(value[0]) and value[0] >= 0
    with pytest.raises(ValueError, match="scene_years"):
        combine_scenes(count, sums, np.array([12.0, 0.0]), area, area, use)


def test_sum_units_region_mean_weights_glaciers_by_area_not_by_count() -> None:
    """Region of both glaciers: per bin the area-weighted mean of the glaciers measured there
    (glacier 0 has 50 measurements per bin, glacier 1 only 20 in the upper bins)."""
    count, sums, years, area = two_scene_case()
    s = combine_scenes(count, sums, years, area, area / 900, np.ones((2, 2), bool), 10)
    region = sum_units(s, np.array([[1, 1], [0, 1]]), 10)
    bins = np.array([5000.0, 5050, 5100])
    np.testing.assert_allclose(region.count[0, :, 0], [100, 70, 70])
    profile, _ = filled_profile(region.rate_sum, region.count, bins + 25, 10, region.weight)
    np.testing.assert_allclose(profile[0, :, 0], [-1.6, -1.3, -1.3])  # count-weighted: -1.43
    out = balance(region, bins)
    glaciers = balance(s, bins)
    assert out["dhdt_m_yr"][0] == pytest.approx(-1.4)
    assert out["dhdt_m_yr"][0] == pytest.approx(glaciers["dhdt_m_yr"].mean())  # equal areas
    assert out["dhdt_m_yr"][1] == pytest.approx(glaciers["dhdt_m_yr"][1])
    np.testing.assert_allclose(region.scene_weight[:, 0], s.scene_weight.mean(axis=1))
    np.testing.assert_allclose(region.measured_px, [s.measured_px.sum(), s.measured_px[1]])
    np.testing.assert_allclose(s[np.array([1])].count, s.count[1:])


# ------------------------------------------------------------------ uncertainty


def test_months_and_neff() -> None:
    np.testing.assert_array_equal(
        months_from_february(np.array([2, 1, 3, 10, 8, 12, 4])), [0, 1, 1, 4, 6, 2, 2]
    )
    # 1000 px of 30 m = 0.9 km2, a disc of radius L = 535 m > a = 500 m: rho = a^2 / (5 L^2)
    radius = np.sqrt(0.9e6 / np.pi)
    want = 5 * radius**2 / 500.0**2  # ~5.7 independent samples (Bolch's N px res / 2a: 30)
    np.testing.assert_allclose(n_eff(np.array([1000, 1]), 30.0, 500.0), [want, 1.0])
    # 100 px = 0.09 km2, L = 169 m < a: rho = 1 - L/a + (L/a)^3 / 5
    r = np.sqrt(0.09e6 / np.pi) / 500.0
    np.testing.assert_allclose(n_eff(np.array([100]), 30.0, 500.0), [1 / (1 - r + r**3 / 5)])


def test_stable_moments_and_datum() -> None:
    rng = np.random.default_rng(3)
    dh = rng.normal(0.3, 2.0, 5000)
    mean, sd = stable_moments(np.array([dh.size]), np.array([dh.sum()]), np.array([(dh**2).sum()]))
    assert mean[0] == pytest.approx(dh.mean())
    assert sd[0] == pytest.approx(dh.std())
    got = datum_sigma_m(np.array([5000]), mean, sd, 30.0, 500.0)
    neff = 5 * (5000 * 900 / np.pi) / 500.0**2  # 4.5 km2: L = 1197 m > 500 m
    assert got[0] == pytest.approx(np.sqrt(dh.mean() ** 2 + dh.std() ** 2 / neff))


def rho_by_hand(area_m2: float, a_m: float) -> float:
    """Rolstad et al. (2009): variance ratio of the mean over a disc of area A."""
    r = np.sqrt(area_m2 / np.pi) / a_m
    return 1 - r + r**3 / 5 if r <= 1 else 1 / (5 * r**2)


def test_unit_uncertainty_by_hand() -> None:
    """Two scenes (Oct, Feb) with weights 0.25 / 0.75 on one glacier; stable spreads 3 and 2 m,
    so 2 m is taken as common to both (the reference DEM's) and sqrt(9 - 4) m as scene 0's own."""
    w = np.array([[0.25], [0.75]])
    px = np.array([[4000.0], [10000.0]])
    years = np.array([10.0, 12.0])
    terms = unit_uncertainty(
        np.array([-0.5]),
        w,
        px,
        np.array([12000.0]),
        np.array([0.8]),
        years,
        np.array([10, 2]),
        np.array([3.0, 2.0]),
        np.array([0.2, 0.1]),
        30.0,
        penetration_std_m=np.array([1.5]),
        unmeasured_m_yr=np.array([0.02]),
    )
    k = 0.85
    per_year = 0.25 / 10 + 0.75 / 12
    common = 2.0**2 * rho_by_hand(12000 * 900, 500.0) * per_year**2
    own = (0.25 / 10) ** 2 * (9.0 - 4.0) * rho_by_hand(4000 * 900, 500.0)
    random = np.sqrt(common + own)
    pen = np.sqrt(0.8**2 + 1.5**2 * rho_by_hand(12000 * 900, 2000.0)) * per_year
    datum = np.sqrt((0.25 * 0.2 / 10) ** 2 + (0.75 * 0.1 / 12) ** 2)
    seasonal = 0.25 * 0.15 * 4 / 10  # February: none
    density = 0.5 * 60 / 1000
    assert terms["sigma_random_mwe_yr"][0] == pytest.approx(random * k)
    assert terms["sigma_penetration_mwe_yr"][0] == pytest.approx(pen * k)
    assert terms["sigma_datum_mwe_yr"][0] == pytest.approx(datum * k)
    assert terms["sigma_seasonal_mwe_yr"][0] == pytest.approx(seasonal * k)
    assert terms["sigma_unmeasured_mwe_yr"][0] == pytest.approx(0.02 * k)
    assert terms["sigma_density_mwe_yr"][0] == pytest.approx(density)
    parts = (random, pen, datum, seasonal, 0.02)
    total = np.sqrt(sum((x * k) ** 2 for x in parts) + density**2)
    assert terms["mb_sigma_mwe_yr"][0] == pytest.approx(total)
    # a known reference error replaces the smallest stable spread as the common part
    known = unit_uncertainty(
        np.array([-0.5]),
        w,
        px,
        np.array([12000.0]),
        np.array([0.8]),
        years,
        np.array([10, 2]),
        np.array([3.0, 2.0]),
        np.array([0.2, 0.1]),
        30.0,
        reference_sigma_m=1.0,
    )
    common = 1.0 * rho_by_hand(12000 * 900, 500.0) * per_year**2
    own = sum(
        (wi / t) ** 2 * (s**2 - 1.0) * rho_by_hand(n * 900, 500.0)
        for wi, t, s, n in ((0.25, 10, 3.0, 4000), (0.75, 12, 2.0, 10000))
    )
    assert known["sigma_random_mwe_yr"][0] == pytest.approx(np.sqrt(common + own) * k)
    assert "sigma_unmeasured_mwe_yr" not in known


def test_common_reference_error_does_not_average_over_scenes() -> None:
    """Four scenes with the same stable spread over the same glacier: all of it may be the
    reference DEM's, so the random error is that of one scene, not halved."""
    one = random_sigma_m_yr(
        np.ones((1, 1)), np.array([[5000.0]]), np.array([5000.0]), np.array([12.0]),
        np.array([1.5]), 30.0,
    )  # fmt: skip
    four = random_sigma_m_yr(
        np.full((4, 1), 0.25), np.full((4, 1), 5000.0), np.array([5000.0]), np.full(4, 12.0),
        np.full(4, 1.5), 30.0,
    )  # fmt: skip
    assert four[0] == pytest.approx(one[0])
    assert one[0] == pytest.approx(1.5 * np.sqrt(rho_by_hand(5000 * 900, 500.0)) / 12.0)
    # with the reference known to be error-free the four scenes' errors are independent
    four_known = random_sigma_m_yr(
        np.full((4, 1), 0.25), np.full((4, 1), 5000.0), np.array([5000.0]), np.full(4, 12.0),
        np.full(4, 1.5), 30.0, reference_sigma_m=1e-9,
    )  # fmt: skip
    assert four_known[0] == pytest.approx(one[0] / 2)


def test_random_error_shrinks_for_a_region() -> None:
    """Random error averages down over a region's pixels; the datum error does not."""
    args = dict(
        scene_years=np.array([12.0]),
        scene_month=np.array([2]),
        stable_sigma_m=np.array([3.0]),
        scene_datum_sigma_m=np.array([0.3]),
        pixel_size_m=30.0,
    )
    glacier = unit_uncertainty(
        np.array([-0.5]),
        np.ones((1, 1)),
        np.array([[2000.0]]),
        np.array([2000.0]),
        np.array([0.5]),
        **args,  # type: ignore[arg-type]
    )
    region = unit_uncertainty(
        np.array([-0.5]),
        np.ones((1, 1)),
        np.array([[200000.0]]),
        np.array([200000.0]),
        np.array([0.5]),
        **args,  # type: ignore[arg-type]
    )
    assert region["sigma_random_mwe_yr"][0] == pytest.approx(glacier["sigma_random_mwe_yr"][0] / 10)
    assert region["sigma_datum_mwe_yr"][0] == pytest.approx(glacier["sigma_datum_mwe_yr"][0])


# ------------------------------------------------------------------ regions


def test_region_sets() -> None:
    basins = from_attribute(["Indus", "Tarim", None, "Indus"])
    assert basins.names == ["Indus", "Tarim"]
    np.testing.assert_array_equal(basins.region_of(), ["Indus", "Tarim", "", "Indus"])
    listed = from_ids({"pair": ["a", "c"]}, ["a", "b", "c", "d"])
    np.testing.assert_array_equal(listed.membership, [[True, False, True, False]])
    both = basins + RegionSet(["Indus"], np.ones((1, 4), bool))
    assert both.names == ["Indus", "Tarim", "Indus (2)"]
    assert both.with_all().names[0] == "all"
    np.testing.assert_array_equal(surge_free(np.array([1, 0, -1])), [False, True, True])
    with pytest.raises(ValueError, match="unknown glacier ids"):
        from_ids({"x": ["zz"]}, ["a"])


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_end_to_end_dem_study_recovers_the_truth(tiny_dem_study: Path, tmp_path: Path) -> None:
    """ingest -> correct -> bin -> aggregate on the tiny DEM study (12 glaciers, 3 scenes).

    Measured (seed 2): median |error| 0.025 m w.e./yr over the 10 glaciers with > 50 % coverage
    (the residual is the corrections', the aggregation itself matches the pixel oracle of
    test_aggregate exactly); 1 sigma covers all 10 and rms(error / sigma) is 0.55 (at 11a65da:
    the penetration term with the stored between-glacier spread dominates the sigma of these
    small glaciers; 9 of 10 without it); Western Pamir (5 glaciers, 99 % covered) within 0.008
    of the truth. With 10 glaciers one glacier moves the coverage by 0.1, so the stated sigma is
    checked by rms(error / sigma) too: neither far too small nor far too large."""
    from mbcube.aggregate import aggregate
    from mbcube.binning import bin_cube
    from mbcube.corrections.step import correct_cube
    from mbcube.ingest import ingest
    from mbcube.store import record_step, step_record

    store = tmp_path / "cube.zarr"
    ingest(tiny_dem_study, store)
    with warnings.catch_warnings():  # the tiny study lacks X-band pixels on debris in 2 regions
        warnings.simplefilter("ignore", MbcubeWarning)
        correct_cube(store)
    bin_cube(store)
    glaciers_csv, regions_csv = aggregate(store, tmp_path / "out")
    table = pd.read_csv(glaciers_csv).set_index("RGIId")
    truth = pd.read_csv(tiny_dem_study / "truth" / "glaciers.csv").set_index("RGIId")
    covered = table["coverage_frac"] > 0.5
    assert covered.sum() >= 8
    error = (table["mb_mwe_yr"] - truth["mb_mwe_yr"])[covered]
    assert error.abs().median() < 0.05
    sigma = table["mb_sigma_mwe_yr"][covered]
    assert (error.abs() <= sigma).mean() >= 0.4
    assert 0.3 <= np.sqrt(((error / sigma) ** 2).mean()) <= 1.5
    regions = pd.read_csv(regions_csv)
    truth_r = pd.read_csv(tiny_dem_study / "truth" / "regions.csv")
    west = regions[(regions["name"] == "Western Pamir") & (regions["glaciers"] == "all")]
    want = truth_r[(truth_r["name"] == "Western Pamir") & (truth_r["glaciers"] == "all")]
    assert abs(float(west["mb_mwe_yr"].iloc[0]) - float(want["mb_mwe_yr"].iloc[0])) < 0.02
    whole = regions[(regions["name"] == "all") & (regions["glaciers"] == "all")]
    assert float(whole["area_km2"].iloc[0]) == pytest.approx(table["area_km2"].sum())
    assert (table["sigma_penetration_mwe_yr"] > 0).all()  # the C/X table was used

    # the glacier-level statistics are cached in the store, keyed by the bin step's records:
    # with the scene statistics unreadable, the tables come from the cache alone ...
    for chunk in (store / "stats" / "count" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"locked: not a chunk")
    again, _ = aggregate(store, tmp_path / "again")
    pd.testing.assert_frame_equal(pd.read_csv(again), pd.read_csv(glaciers_csv))
    # ... until a scene is binned again (new record): then the statistics are read
    scene = str(pd.read_csv(tiny_dem_study / "scenes.csv")["scene_id"].iloc[0])
    record = step_record(store, "bin", scene)
    record.pop("token")
    record_step(store, "bin", scene, record)
    with pytest.raises(RuntimeError):
        aggregate(store, tmp_path / "stale")


# ------------------------------------------------------------------ property tests (oracles)


def oracle_variance_ratio(area_m2: float, a_m: float) -> float:
    """Mean over a disc of the spherical correlation from its centre, by the trapezoid rule on
    a fine radial grid: (2 / L^2) int_0^L C(h) h dh, C(h) = 1 - 1.5 h/a + 0.5 (h/a)^3 (h < a)."""
    radius = np.sqrt(area_m2 / np.pi)
    h = np.linspace(0.0, radius, 200_001)
    corr = np.where(h < a_m, 1 - 1.5 * h / a_m + 0.5 * (h / a_m) ** 3, 0.0)
    return float(2.0 / radius**2 * np.trapezoid(corr * h, h))


@settings(max_examples=40, deadline=None)
@given(area_km2=st.floats(0.01, 500.0), a_m=st.floats(50.0, 5000.0))
def test_variance_ratio_matches_integral(area_km2: float, a_m: float) -> None:
    got = spatial_variance_ratio(np.array([area_km2 * 1e6]), a_m)[0]
    assert got == pytest.approx(oracle_variance_ratio(area_km2 * 1e6, a_m), rel=1e-6, abs=1e-9)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_scenes=st.integers(1, 5), n_units=st.integers(1, 6))
def test_random_term_matches_oracle(seed: int, n_scenes: int, n_units: int) -> None:
    w, px, measured, years, sigma = random_scene_case(
        np.random.default_rng(seed), n_scenes, n_units
    )
    got = random_sigma_m_yr(w, px, measured, years, sigma, 30.0, 500.0)
    want = oracle_random(w, px, measured, years, sigma, np.zeros(n_scenes), None)
    np.testing.assert_allclose(got, want, rtol=1e-10)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_unmeasured_term_matches_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    units, bins = 3, 6
    area = rng.uniform(0, 1e6, (units, bins, 2)) * (rng.random((units, bins, 2)) < 0.8)
    frac = np.where(rng.random(area.shape) < 0.3, 0.0, rng.random(area.shape))
    rate = rng.normal(-0.5, 1.0, area.shape)
    void = rng.uniform(0, 5e5, units) * (rng.random(units) < 0.5)
    got = unmeasured_sigma_m_yr(area, frac, rate, void)
    for u in range(units):
        cells = [(b, f) for b in range(bins) for f in range(2) if area[u, b, f] > 0]
        total = sum(area[u, b, f] for b, f in cells)
        mean = sum(area[u, b, f] * rate[u, b, f] for b, f in cells) / total
        spread = np.sqrt(sum(area[u, b, f] * (rate[u, b, f] - mean) ** 2 for b, f in cells) / total)
        gaps = [area[u, b, f] * (1 - frac[u, b, f]) for b, f in cells] + [void[u]]
        want = spread * np.sqrt(sum(g**2 for g in gaps)) / (total + void[u])
        assert got[u] == pytest.approx(want, rel=1e-10, abs=1e-12)


def oracle_glacier_balance(
    count: np.ndarray,
    sums: np.ndarray,
    years: np.ndarray,
    area: np.ndarray,
    n_px: np.ndarray,
    z: np.ndarray,
    min_px: int,
    min_frac: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Glacier by glacier, cell by cell: a cell keeps its measurements when one scene measured
    >= min_frac of its pixels (a glacier without such a cell of >= min_px measurements keeps
    all); kept cells with >= min_px measurements are measured and hold the pixel-weighted mean
    of dh / years; the others are interpolated in elevation (np.interp) within their surface,
    or, for a surface without a measured cell, from both surfaces' kept cells pooled per bin;
    dh/dt is the area-weighted mean. Returns (dhdt (G,), filled profile)."""
    n_s, n_g, n_b, n_f = count.shape
    profile = np.full((n_g, n_b, n_f), np.nan)
    dhdt = np.full(n_g, np.nan)
    for g in range(n_g):
        enough = count[:, g].sum(axis=0) >= min_px
        share = np.minimum(count[:, g].max(axis=0), n_px[g]) >= min_frac * n_px[g]
        kept = share if (share & enough).any() else np.ones_like(share)
        ok = kept & enough
        rate_sum = np.zeros((n_b, n_f))  # sum of dh / years over the kept cells' measurements
        for b in range(n_b):
            for f in range(n_f):
                if kept[b, f]:
                    rate_sum[b, f] = sum(sums[s, g, b, f] / years[s] for s in range(n_s))
        rate = np.divide(rate_sum, count[:, g].sum(axis=0), out=np.zeros((n_b, n_f)), where=ok)
        pooled = None
        pooled_n = [
            sum(count[:, g, b, f].sum() for f in range(n_f) if kept[b, f]) for b in range(n_b)
        ]
        pooled_ok = [b for b in range(n_b) if pooled_n[b] >= min_px]
        if pooled_ok:
            means = [rate_sum[b][kept[b]].sum() / pooled_n[b] for b in pooled_ok]
            pooled = np.interp(z, z[pooled_ok], means)
        for f in range(n_f):
            good = ok[:, f]
            if good.any():
                profile[g, :, f] = np.interp(z, z[good], rate[good, f])
            elif pooled is not None:
                profile[g, :, f] = pooled
        if ok.any():
            dhdt[g] = (profile[g] * area[g]).sum() / area[g].sum()
    return dhdt, profile


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    min_frac=st.sampled_from([0.0, 0.2, 0.5, 0.8]),
    min_px=st.integers(1, 6),
)
def test_combination_and_fill_match_oracle_bin_by_bin(
    seed: int, min_frac: float, min_px: int
) -> None:
    rng = np.random.default_rng(seed)
    n_s, n_g, n_b = 3, 4, 7
    z = 4000.0 + 50.0 * np.arange(n_b) + 25.0
    n_px = rng.integers(1, 40, (n_g, n_b, 2)).astype(float)
    seen = rng.random((n_s, n_g, n_b, 2)) < 0.6
    count = np.floor(n_px[None] * rng.random((n_s, n_g, n_b, 2)) * seen)
    years = np.array([11.0, -3.0, 14.0])
    sums = count * rng.normal(-1.0, 2.0, count.shape) * years[:, None, None, None]
    area = n_px * 900.0
    use = np.ones((n_s, n_g), bool)
    stats = combine_scenes(count, sums, years, area, n_px, use, min_px, min_frac=min_frac)
    bins = z - 25.0
    profile = hypsometric_profile(stats, bins, 50.0, min_px)
    got = balance(stats, bins, 50.0, min_px, profile=profile)["dhdt_m_yr"]
    want, want_profile = oracle_glacier_balance(count, sums, years, area, n_px, z, min_px, min_frac)
    np.testing.assert_allclose(profile.rate_m_yr, want_profile, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_partly_measured_bin_is_filled_and_recorded() -> None:
    """Bin 5050 measured on 20 of its 100 pixels (by one scene) is filled from its neighbours
    when min_frac = 0.5, and its unmeasured part (all of it) enters the unmeasured term."""
    count = np.zeros((1, 1, 3, 1))
    count[0, 0, :, 0] = [100, 20, 100]
    rate = np.array([-2.0, 5.0, 0.0])
    sums = count * (rate * 10.0)[None, None, :, None]
    n_px = np.full((1, 3, 1), 100.0)
    area = n_px * 900.0
    bins = np.array([5000.0, 5050.0, 5100.0])
    use = np.ones((1, 1), bool)
    kept = combine_scenes(count, sums, np.array([10.0]), area, n_px, use, 10, min_frac=0.0)
    dropped = combine_scenes(count, sums, np.array([10.0]), area, n_px, use, 10, min_frac=0.5)
    assert balance(kept, bins)["dhdt_m_yr"][0] == pytest.approx(1.0)
    out = balance(dropped, bins)
    assert out["dhdt_m_yr"][0] == pytest.approx(-1.0)  # (-2 + -1 + 0) / 3
    assert out["filled_frac"][0] == pytest.approx(1 / 3)
    assert out["coverage_frac"][0] == pytest.approx(220 / 300)  # what was measured
    results = unit_results(
        dropped, bins, np.array([10.0]), np.array([2]), np.array([1.0]), np.array([0.0]),
        30.0, np.array([0.0]),
    )  # fmt: skip
    spread = np.sqrt(np.mean((np.array([-2.0, -1.0, 0.0]) + 1.0) ** 2))
    assert results["sigma_unmeasured_mwe_yr"][0] == pytest.approx(0.85 * spread / 3)
    profile = hypsometric_profile(kept, bins)
    np.testing.assert_allclose(profile.measured_frac[0, :, 0], [1.0, 0.2, 1.0])
    kept_results = unit_results(
        kept, bins, np.array([10.0]), np.array([2]), np.array([1.0]), np.array([0.0]),
        30.0, np.array([0.0]),
    )  # fmt: skip
    spread_kept = np.sqrt(np.mean((rate - 1.0) ** 2))
    assert kept_results["sigma_unmeasured_mwe_yr"][0] == pytest.approx(0.85 * spread_kept * 0.8 / 3)
    with pytest.raises(ValueError, match="min_frac"):
        combine_scenes(count, sums, np.array([10.0]), area, n_px, use, 10, min_frac=1.5)


@pytest.mark.slow
def test_end_to_end_glacier_offsets_state_the_stored_error(
    tiny_dem_study: Path, tmp_path: Path
) -> None:
    """ingest -> correct (penetration 'xband_glacier') -> bin -> aggregate on the tiny DEM study:
    the stated penetration term of every adjusted glacier (a surface with weight k > 0) is
    sqrt(((1 - k) sigma_table)^2 + sigma_adj^2) x sum_s w_s / T_s x 0.85, with sigma_adj the
    stored glacier_penetration_sigma_m weighted by the surfaces' binned areas (hypsometry
    group) and sigma_table the table's sigma looked up pixel by pixel (surface and bin, in the
    region of the glacier's centroid, as aggregate takes it); its random term has no part
    common to the scenes; the total is the quadrature of the columns.

    Measured (seed 2, at this commit): 9 of 12 glaciers adjusted; over the 10 with > 50 %
    coverage median |error| 0.013 m w.e./yr, rms(error / sigma) 1.04 (1 sigma covers 7 of 10)."""
    import xarray as xr

    from mbcube.aggregate import aggregate, glacier_table, load_stats
    from mbcube.binning import bin_cube
    from mbcube.corrections import penetration
    from mbcube.corrections.step import correct_cube, read_table
    from mbcube.ingest import ingest
    from mbcube.store import open_cube, recorded_config

    store = tmp_path / "cube.zarr"
    ingest(tiny_dem_study, store)
    config = recorded_config(store).corrections.model_copy(update={"penetration": "xband_glacier"})
    with warnings.catch_warnings():  # the tiny study lacks X-band pixels on debris in 2 regions
        warnings.simplefilter("ignore", MbcubeWarning)
        correct_cube(store, config)
    bin_cube(store)
    glaciers_csv, _ = aggregate(store, tmp_path / "out")
    table = pd.read_csv(glaciers_csv)

    group = xr.open_zarr(str(store), group="penetration", chunks=None)
    assert int(group.attrs["glacier_adjustment_applied"]) == 1
    k = group["glacier_penetration_weight"].transpose("glacier", "surface").values
    sigma_adj = group["glacier_penetration_sigma_m"].transpose("glacier", "surface").values
    hyps = xr.open_zarr(str(store), group="hypsometry", chunks=None)
    area = hyps["area_m2"].transpose("glacier", "bin", "surface").values.sum(axis=1)
    adjusted = ((k > 0) & (area > 0)).any(axis=1)
    assert adjusted.sum() >= 6
    want_adj = (area * sigma_adj).sum(axis=1) / area.sum(axis=1)
    # the table's sigma pixel by pixel, (1 - k) of the pixel's glacier and surface
    cube = open_cube(store)
    gid = cube["glacier_id"].values
    surface = cube["surface"].values
    elevation = cube["ref_dem_m"].values
    # C-band voids are binned by the X-band reference, then by interpolation (tested in
    # test_binning): the hypsometry's elevations
    fill_px = round(MassBalanceConfig().void_fill_distance_m / float(cube["x"][1] - cube["x"][0]))
    substitute = void_elevation(cube, fill_px)
    if substitute is not None:
        elevation = np.where(np.isfinite(elevation), elevation, substitute.compute())
    on = (gid > 0) & np.isfinite(elevation)
    n_g = len(k)
    # a glacier's table is its centroid's region's (aggregate: the centroid in the region
    # polygons; here the region raster at the centroid's pixel)
    col = np.abs(cube["x"].values[None, :] - cube["glacier_centroid_x_m"].values[:, None])
    row = np.abs(cube["y"].values[None, :] - cube["glacier_centroid_y_m"].values[:, None])
    at_centroid = cube["region_id"].values[row.argmin(axis=1), col.argmin(axis=1)]
    region = np.where(gid > 0, at_centroid[np.maximum(gid, 1) - 1], 0)
    tab = read_table(store)
    px_sigma = penetration.lookup(tab.sigma_m, tab.bin_lo_m, tab.width_m, region, surface,
                                  elevation)  # fmt: skip
    keep = 1.0 - k[gid[on] - 1, surface[on] - 1]
    want_table = np.bincount(gid[on] - 1, px_sigma[on] * keep, n_g) / np.bincount(
        gid[on] - 1, minlength=n_g
    )
    data = load_stats(store)
    per_year = (data.cells.scene_weight / np.abs(data.scene_years)[:, None]).sum(axis=0)
    want_pen = np.sqrt(want_table**2 + want_adj**2) * per_year * 0.85
    got = table["sigma_penetration_mwe_yr"].to_numpy()
    measured = np.isfinite(got)
    check = adjusted & measured
    assert check.sum() >= 6
    np.testing.assert_allclose(got[check], want_pen[check], rtol=1e-5)
    # the random term: the scenes' own parts only (no common reference part)
    no_offsets = load_stats(store)
    rows = glacier_table(no_offsets)
    own = random_sigma_m_yr(
        data.cells.scene_weight, data.cells.scene_px, data.cells.measured_px,
        data.scene_years, data.stable_sigma_m, data.pixel_size_m, 500.0,
        data.reference_sigma_m, data.stable_white_sigma_m, np.ones(n_g),
    ) * 0.85  # fmt: skip
    np.testing.assert_allclose(rows["sigma_random_mwe_yr"][check], own[check], rtol=1e-9)
    terms = [c for c in table.columns if c.startswith("sigma_")]
    np.testing.assert_allclose(
        table["mb_sigma_mwe_yr"], np.sqrt((table[terms] ** 2).sum(axis=1)), rtol=1e-9
    )
    # and the stated sigma is of the size of the errors
    truth = pd.read_csv(tiny_dem_study / "truth" / "glaciers.csv")
    covered = (table["coverage_frac"] > 0.5).to_numpy()
    error = (table["mb_mwe_yr"] - truth["mb_mwe_yr"]).to_numpy()[covered]
    assert np.median(np.abs(error)) < 0.03
    z = error / table["mb_sigma_mwe_yr"].to_numpy()[covered]
    assert 0.5 <= np.sqrt(np.mean(z**2)) <= 1.5


def test_unmeasured_term_counts_an_unreached_tongue_as_one_extrapolation() -> None:
    """One glacier, one surface, bins at 50 m: measured 5000-5150 m with a rate rising 0.5
    m/yr per bin (slope 0.01 /yr), the two bins below (4900, 4950 m) unmeasured and filled with
    the lowest measured value: each is off by slope x distance (1.0, 0.5 m/yr), added linearly."""
    z = np.array([4925.0, 4975.0, 5025.0, 5075.0, 5125.0, 5175.0])
    area = np.full((1, 6, 1), 1e6)
    frac = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).reshape(1, 6, 1)
    rate = np.array([-1.0, -1.0, -1.0, -0.5, 0.0, 0.5]).reshape(1, 6, 1)
    got = unmeasured_sigma_m_yr(area, frac, rate, None, z)[0]
    sigma_u = np.sqrt(np.mean((rate.ravel() - rate.mean()) ** 2))
    errors = np.maximum(sigma_u, [0.01 * 100.0, 0.01 * 50.0])
    assert got == pytest.approx(errors.sum() * 1e6 / 6e6, rel=1e-12)
    # without elevations: the two filled bins as independent parts of the glacier
    assert unmeasured_sigma_m_yr(area, frac, rate)[0] == pytest.approx(
        sigma_u * np.sqrt(2) / 6, rel=1e-12
    )
