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

from mbcube.errors import MbcubeWarning
from mbcube.massbalance import (
    GlacierStats,
    balance,
    combine_scenes,
    fill_along_elevation,
    filled_profile,
    select_scenes,
    sum_units,
)
from mbcube.regions import RegionSet, from_attribute, from_ids, surge_free
from mbcube.uncertainty import (
    datum_sigma_m,
    months_from_february,
    n_eff,
    stable_moments,
    unit_uncertainty,
)

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
    np.testing.assert_allclose(n_eff(np.array([1000, 1]), 30.0, 500.0), [30.0, 1.0])


def test_stable_moments_and_datum() -> None:
    rng = np.random.default_rng(3)
    dh = rng.normal(0.3, 2.0, 5000)
    mean, sd = stable_moments(np.array([dh.size]), np.array([dh.sum()]), np.array([(dh**2).sum()]))
    assert mean[0] == pytest.approx(dh.mean())
    assert sd[0] == pytest.approx(dh.std())
    got = datum_sigma_m(np.array([5000]), mean, sd, 30.0, 500.0)
    assert got[0] == pytest.approx(np.sqrt(dh.mean() ** 2 + dh.std() ** 2 / 150.0))


def test_unit_uncertainty_by_hand() -> None:
    """Two scenes (Oct, Feb) with weights 0.25 / 0.75 on one glacier."""
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
    )
    k = 0.85
    random = np.sqrt(
        (0.25 * 3 / 10) ** 2 / (4000 * 30 / 1000) + (0.75 * 2 / 12) ** 2 / (10000 * 30 / 1000)
    )
    pen = np.hypot(0.8, 1.5 / np.sqrt(12000 * 30 / 4000)) * (0.25 / 10 + 0.75 / 12)
    datum = np.sqrt((0.25 * 0.2 / 10) ** 2 + (0.75 * 0.1 / 12) ** 2)
    seasonal = 0.25 * 0.15 * 4 / 10  # February: none
    density = 0.5 * 60 / 1000
    assert terms["sigma_random_mwe_yr"][0] == pytest.approx(random * k)
    assert terms["sigma_penetration_mwe_yr"][0] == pytest.approx(pen * k)
    assert terms["sigma_datum_mwe_yr"][0] == pytest.approx(datum * k)
    assert terms["sigma_seasonal_mwe_yr"][0] == pytest.approx(seasonal * k)
    assert terms["sigma_density_mwe_yr"][0] == pytest.approx(density)
    total = np.sqrt(sum((x * k) ** 2 for x in (random, pen, datum, seasonal)) + density**2)
    assert terms["mb_sigma_mwe_yr"][0] == pytest.approx(total)


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

    Measured (seed 2): median |error| 0.039 m w.e./yr over the 10 glaciers with > 50 % coverage
    (the issue's target 0.03 is for larger studies; the residual is the corrections', the
    aggregation itself matches the pixel oracle of test_aggregate exactly); 1 sigma covers 6 of
    them; Western Pamir (5 glaciers, 99 % covered) within 0.008 of the truth."""
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
    within = (error.abs() <= table["mb_sigma_mwe_yr"][covered]).mean()
    assert 0.4 <= within <= 0.95
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
