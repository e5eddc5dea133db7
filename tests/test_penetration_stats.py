"""X-band statistics stored with the penetration table: per-glacier moments, the stable-ground
noise curve, the between-glacier spread (penetration_std_m) and reference_sigma_m, against slow
numpy oracles, simulations with a known spread, and the synthetic study's truth."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as stn

from mbcube.cluster import quiet
from mbcube.config import CorrectionsConfig
from mbcube.corrections import penetration, penetration_table, read_table
from mbcube.corrections.bins import ELEV_MIN_M, bin_index, n_bins
from mbcube.ingest import ingest
from mbcube.store import open_cube

WIDTH = 50.0


def _random_block(rng: np.random.Generator, ny: int, nx: int, n_region: int) -> dict:
    ref = rng.uniform(4400.0, 4800.0, (ny, nx)).astype(np.float32)
    ref[rng.random((ny, nx)) < 0.05] = np.nan
    diff = rng.normal(1.0, 0.7, (ny, nx))
    diff[rng.random((ny, nx)) < 0.3] = np.nan
    glacier = rng.integers(0, 6, (ny, nx)).astype(np.int32)
    surface = np.where(glacier > 0, rng.integers(1, 3, (ny, nx)), 0).astype(np.int8)
    region = rng.integers(0, n_region + 2, (ny, nx)).astype(np.int16)  # n_region + 1: unknown
    stable = ((glacier == 0) & (rng.random((ny, nx)) < 0.8)).astype(np.uint8)
    return dict(diff=diff, ref=ref, glacier=glacier, surface=surface, region=region, stable=stable)


def _moments_oracle(t: dict, n_region: int) -> dict[tuple[int, int, int, int], list[float]]:
    """Per (glacier, region, surface index, bin): n_x, sum, sumsq, n_ref by a loop over pixels."""
    out: dict[tuple[int, int, int, int], list[float]] = {}
    b = bin_index(t["ref"], WIDTH)
    for (i, j), g in np.ndenumerate(t["glacier"]):
        s = int(t["surface"][i, j])
        if g <= 0 or s not in (1, 2) or b[i, j] < 0:
            continue
        r = int(t["region"][i, j])
        r = r if 0 <= r <= n_region else 0
        cell = out.setdefault((int(g), r, s - 1, int(b[i, j])), [0.0, 0.0, 0.0, 0.0])
        d = float(t["diff"][i, j])
        if np.isfinite(d):
            cell[0] += 1
            cell[1] += d
            cell[2] += d * d
        cell[3] += 1
    return out


@settings(max_examples=15, deadline=None)
@given(seed=stn.integers(0, 10_000), cut=stn.integers(1, 30))
def test_glacier_moments_match_pixel_oracle_and_merge(seed: int, cut: int) -> None:
    rng = np.random.default_rng(seed)
    t = _random_block(rng, 32, 24, n_region=2)
    parts = [
        penetration.glacier_moments_block(
            t["diff"][rows],
            t["glacier"][rows],
            t["region"][rows],
            t["surface"][rows],
            t["ref"][rows],
            2,
            WIDTH,
        )
        for rows in (slice(0, cut), slice(cut, None))
    ]
    merged = penetration.merge_glacier_moments(*parts)
    oracle = _moments_oracle(t, 2)
    g, r, s, b = merged.cells()
    got = {(int(g[k]), int(r[k]), int(s[k]), int(b[k])): merged.values[:, k] for k in range(g.size)}
    assert set(got) == set(oracle)
    for key, expect in oracle.items():
        np.testing.assert_allclose(got[key], expect, rtol=1e-12, atol=1e-9)
    keys = penetration.encode_cells(g, r, s, b, 2, n_bins(WIDTH))
    assert np.array_equal(keys, merged.keys)


@settings(max_examples=15, deadline=None)
@given(seed=stn.integers(0, 10_000), ny=stn.integers(5, 70), nx=stn.integers(5, 70))
def test_block_moments_match_loop_oracle(seed: int, ny: int, nx: int) -> None:
    rng = np.random.default_rng(seed)
    diff = rng.normal(0.0, 1.0, (ny, nx))
    diff[rng.random((ny, nx)) < 0.1] = np.nan
    stable = (rng.random((ny, nx)) < 0.7).astype(np.uint8)
    got = penetration.block_moments(diff, stable, (1, 3, 8))
    for i, k in enumerate((1, 3, 8)):
        n = s = ss = px = 0.0
        for r0 in range(0, ny - k + 1, k):
            for c0 in range(0, nx - k + 1, k):
                blk = diff[r0 : r0 + k, c0 : c0 + k]
                ok = (stable[r0 : r0 + k, c0 : c0 + k] == 1) & np.isfinite(blk)
                if ok.sum() >= 0.5 * k * k:
                    m = blk[ok].mean()
                    n, s, ss, px = n + 1, s + m, ss + m * m, px + ok.sum()
        np.testing.assert_allclose(got[i], [n, s, ss, px], rtol=1e-10, atol=1e-9)


def test_noise_curve_of_white_noise_falls_as_one_over_area() -> None:
    """White noise of sigma 0.8 m: the variance of k x k block means is 0.64 / k^2."""
    rng = np.random.default_rng(5)
    diff = rng.normal(0.3, 0.8, (512, 512))
    stable = np.ones(diff.shape, dtype=np.uint8)
    tiles = [diff[i : i + 128, j : j + 128] for i in range(0, 512, 128) for j in range(0, 512, 128)]
    blocks = sum(penetration.block_moments(t, stable[:128, :128]) for t in tiles)
    curve = penetration.noise_curve(blocks, 30.0, 0.8, 500.0)
    assert curve.measured
    k = np.sqrt(curve.area_m2 / 900.0)
    expect = 0.64 / k**2
    # relative error of a variance from n blocks ~ sqrt(2 / n)
    tol = 4 * np.sqrt(2.0 / curve.n_blocks)
    assert np.all(np.abs(curve.var_m2 / expect - 1) < tol), (curve.var_m2, expect)
    # interpolated in between, decaying as 1 / area beyond the largest block
    np.testing.assert_allclose(curve.variance(curve.area_m2), curve.var_m2, rtol=1e-9)
    far = curve.variance(curve.area_m2[-1] * 10)
    assert curve.var_m2[-1] / 10 * 0.3 <= far <= curve.var_m2[-1]
    # too little ground: the Rolstad curve of the fallback sigma and correlation
    few = penetration.noise_curve(blocks[:1] * 0 + 1, 30.0, 0.8, 500.0)
    assert not few.measured
    np.testing.assert_allclose(few.variance(900.0), 0.64, rtol=1e-9)
    # L = 1000 m = 2 a: a^2 / (5 L^2) = 1 / 20 (a power law: log-log interpolation is exact)
    np.testing.assert_allclose(few.variance(np.pi * 1000.0**2), 0.64 / 20.0, rtol=1e-9)


def _simulated_moments(
    rng: np.random.Generator, kappa: float, n_glaciers: int, noise_sigma: float
) -> tuple[penetration.GlacierMoments, penetration.Table, penetration.NoiseCurve]:
    """Glaciers with factors N(1, kappa) on a law rising with elevation, white pixel noise; one
    region, clean ice only; every glacier spans the same 8 bins with 40-200 px per bin."""
    bins = n_bins(WIDTH)
    first = int((4500.0 + 500.0) / WIDTH)
    law = 1.0 + 0.4 * np.arange(8)
    keys, values = [], []
    sums = np.zeros((3, 2, 2, bins))
    for g in range(1, n_glaciers + 1):
        f = rng.normal(1.0, kappa)
        for k in range(8):
            n = int(rng.integers(40, 200))
            x = f * law[k] + rng.normal(0.0, noise_sigma, n)
            b = first + k
            keys.append(penetration.encode_cells(np.array([g]), np.array([1]), 0, b, 1, bins)[0])
            values.append([n, x.sum(), (x * x).sum(), n])
            for r in (0, 1):
                sums[:, r, 0, b] += [n, x.sum(), (x * x).sum()]
    sums[:, :, 1] = sums[:, :, 0]  # debris: a copy, unused
    moments = penetration.GlacierMoments(np.array(keys), np.array(values).T, 1, bins)
    table = penetration.finish_table(sums, 0.0, WIDTH, 10, 30.0, 500.0)
    # white noise: the variance of a mean over n pixels is sigma^2 / n
    area = 900.0 * 2.0 ** np.arange(12)
    curve = penetration.NoiseCurve(
        area, noise_sigma**2 / 2.0 ** np.arange(12), np.full(12, 100), True
    )
    return moments, table, curve


def _spread_oracle(
    moments: penetration.GlacierMoments, table: penetration.Table, curve: penetration.NoiseCurve
) -> float:
    """kappa of region 1, clean ice, by an explicit loop over cells and glaciers."""
    _, r, s, b = moments.cells()
    first = round((table.bin_lo_m[0] + 500.0) / WIDTH)
    num = den = 0.0
    for cell in np.unique(b):
        at = (b == cell) & (r == 1) & (s == 0)
        n = moments.values[0, at]
        m = moments.values[1, at] / n
        big = n.sum()
        mean = (n * m).sum() / big
        v = curve.variance(n * 900.0)
        num += (n * (m - mean) ** 2).sum() - (n * v * (1 - n / big)).sum()
        den += (big - (n * n).sum() / big) * table.penetration_m[1, 0, cell - first] ** 2
    return float(np.sqrt(max(num, 0.0) / den))


@pytest.mark.parametrize(("kappa", "n_glaciers"), [(0.15, 60), (0.0, 40), (0.3, 30)])
def test_between_glacier_spread_recovers_simulated_kappa(kappa: float, n_glaciers: int) -> None:
    """The spread of glacier factors is recovered from noisy per-glacier cell means: within
    3 standard errors of the simulated kappa (0 stays below 0.03), and equal to the loop oracle."""
    rng = np.random.default_rng(int(kappa * 100) + n_glaciers)
    moments, table, curve = _simulated_moments(rng, kappa, n_glaciers, noise_sigma=1.2)
    spread = penetration.between_glacier_spread(moments, table, 0.0, curve, 30.0)
    assert spread.own[1, 0] and spread.n_glaciers[1, 0] == n_glaciers
    np.testing.assert_allclose(spread.kappa[1, 0], _spread_oracle(moments, table, curve), rtol=1e-9)
    # sample standard deviation of n draws: relative error ~ 1 / sqrt(2 n)
    assert abs(spread.kappa[1, 0] - kappa) <= 3 * max(kappa, 0.01) / np.sqrt(2 * n_glaciers) + 0.02
    np.testing.assert_allclose(
        spread.std_m[1, 0], spread.kappa[1, 0] * np.abs(table.penetration_m[1, 0]), rtol=1e-12
    )


def test_region_with_few_glaciers_takes_the_pooled_spread() -> None:
    rng = np.random.default_rng(9)
    moments, table, curve = _simulated_moments(rng, 0.2, 2, noise_sigma=1.0)
    spread = penetration.between_glacier_spread(moments, table, 0.0, curve, 30.0, min_glaciers=3)
    assert not spread.own[1, 0]
    assert spread.kappa[1, 0] == spread.kappa[0, 0]
    assert 0.0 <= spread.kappa[0, 0] <= penetration.MAX_KAPPA


def _regional_moments(
    rng: np.random.Generator, region_factors: list[float], per_region: int, kappa: float
) -> tuple[penetration.GlacierMoments, penetration.Table, np.ndarray]:
    """Regions whose glaciers follow the law 1 + 0.4 k (m, bins k = 0..7) times the region's
    factor times the glacier's N(1, kappa), with 0.5 m white pixel noise; clean ice only.
    Returns the moments, the table (pooled index 0 first) and the true law of each region."""
    bins = n_bins(WIDTH)
    first = int((4500.0 + 500.0) / WIDTH)
    law = 1.0 + 0.4 * np.arange(8)
    n_region = len(region_factors)
    keys, values = [], []
    sums = np.zeros((3, n_region + 1, 2, bins))
    g = 0
    for r, rho in enumerate(region_factors, start=1):
        for _ in range(per_region):
            g += 1
            f = rho * rng.normal(1.0, kappa)
            for k in range(8):
                n = int(rng.integers(40, 200))
                x = f * law[k] + rng.normal(0.0, 0.5, n)
                b = first + k
                key = penetration.encode_cells(np.array([g]), np.array([r]), 0, b, n_region, bins)
                keys.append(key[0])
                values.append([n, x.sum(), (x * x).sum(), n])
                for idx in (0, r):
                    sums[:, idx, 0, b] += [n, x.sum(), (x * x).sum()]
    sums[:, :, 1] = sums[:, :, 0]  # debris: a copy
    moments = penetration.GlacierMoments(np.array(keys), np.array(values).T, n_region, bins)
    table = penetration.finish_table(sums, 0.0, WIDTH, 10, 30.0, 500.0)
    truth = np.array(region_factors)[:, None] * law
    return moments, table, truth


def _pooling_oracle(
    moments: penetration.GlacierMoments, table: penetration.Table, kappa: float, r: int
) -> tuple[float, float]:
    """(rho, its sampling sd) of region r, clean ice, by a loop over the glaciers' cells."""
    glacier, region, s, b = moments.cells()
    first = round((table.bin_lo_m[0] + 500.0) / WIDTH)
    num = den = 0.0
    per_glacier: dict[int, float] = {}
    for i in np.flatnonzero((region == r) & (s == 0)):
        k = b[i] - first
        n, t0, tr = moments.values[0, i], table.penetration_m[0, 0, k], table.penetration_m[r, 0, k]
        num += n * tr * t0
        den += n * t0 * t0
        per_glacier[glacier[i]] = per_glacier.get(glacier[i], 0.0) + n * t0 * t0
    shares = np.array(list(per_glacier.values())) / den
    return num / den, kappa * float(np.sqrt(np.sum(shares**2)))


def test_regions_that_differ_only_by_their_few_glaciers_share_the_pooled_table() -> None:
    """Four regions of 4 glaciers on one law (glacier factors N(1, 0.15)): their tables differ
    only by which glaciers were measured, so they are drawn toward the pooled table, which is
    closer to the law than their own (rms error over regions and bins), and the factors and
    their sampling sd equal the loop oracle."""
    rng = np.random.default_rng(5)
    moments, table, truth = _regional_moments(rng, [1.0, 1.0, 1.0, 1.0], 4, 0.15)
    kappa = np.array([0.15, 0.15])
    how = penetration.pool_regions(table, moments, kappa)
    for r in range(1, 5):
        rho, sd = _pooling_oracle(moments, table, 0.15, r)
        np.testing.assert_allclose(how.factor[r, 0], rho, rtol=1e-12)
        np.testing.assert_allclose(how.factor_sigma[r, 0], sd, rtol=1e-12)
    assert how.weight[0, 0] == 1.0 and np.all(how.weight[1:, 0] < 0.5), how.weight
    own_err = np.sqrt(np.mean((table.penetration_m[1:, 0] - truth) ** 2))
    pooled_err = np.sqrt(np.mean((how.penetration_m[1:, 0] - truth) ** 2))
    assert pooled_err < 0.75 * own_err, (pooled_err, own_err)
    np.testing.assert_array_equal(how.penetration_m[0], table.penetration_m[0])


def test_regions_that_really_differ_keep_their_own_tables() -> None:
    """Regional factors 0.6-1.8 with 12 glaciers each: far beyond what their glaciers'
    spread explains, so every region keeps (nearly) its own table and the estimate of
    the between-region spread is of the size of the factors' spread."""
    rng = np.random.default_rng(6)
    moments, table, truth = _regional_moments(rng, [0.6, 1.0, 1.4, 1.8], 12, 0.15)
    how = penetration.pool_regions(table, moments, np.array([0.15, 0.15]))
    assert np.all(how.weight[1:, 0] > 0.95), how.weight
    assert 0.25 < how.between_sigma[0] < 0.7, how.between_sigma
    np.testing.assert_allclose(how.penetration_m[1:, 0], table.penetration_m[1:, 0], rtol=0.02)
    # and the own tables follow their region's law (ends of the 3-bin window excepted)
    np.testing.assert_allclose(table.penetration_m[1:, 0, 1:-1], truth[:, 1:-1], rtol=0.1)


def test_a_single_region_keeps_its_table() -> None:
    rng = np.random.default_rng(7)
    moments, table, _ = _regional_moments(rng, [1.0], 3, 0.15)
    how = penetration.pool_regions(table, moments, np.array([0.15, 0.15]))
    np.testing.assert_array_equal(how.penetration_m, table.penetration_m)
    assert np.all(how.weight == 1.0)


# -------------------------------------------------------------------- the stored statistics


@pytest.fixture(scope="module")
def table_store(tiny_dem_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("pen_stats") / "cube.zarr"
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest(tiny_dem_study, store)
        penetration_table(store, CorrectionsConfig())
    return store


def test_reference_sigma_is_the_stable_nmad_of_x_minus_c(table_store: Path) -> None:
    """reference_sigma_m = NMAD of ref_dem_x_m - ref_dem_m on stable ground (numpy), which for
    the generator's SRTM-C (1 m) and SRTM-X (0.5 m) errors is near sqrt(1.25) = 1.12 m."""
    ds = open_cube(table_store)
    tab = xr.open_zarr(str(table_store), group="penetration")
    diff = (ds.ref_dem_x_m.values - ds.ref_dem_m.values).astype(np.float64)
    v = diff[(ds.stable.values == 1) & np.isfinite(diff) & (ds.ref_void.values == 0)]
    nmad = 1.4826 * np.median(np.abs(v - np.median(v)))
    got = float(tab.reference_sigma_m)
    assert tab.reference_sigma_m.attrs["units"] == "m"
    assert abs(got - nmad) < 0.01 * nmad
    assert 0.9 < got < 1.4


def test_penetration_std_is_stored_and_bounded(table_store: Path, tiny_dem_study: Path) -> None:
    """penetration_std_m (region, surface, bin) = kappa |penetration_m| with kappa in [0, 1];
    the generator's glacier factors are N(1, 0.15): the pooled clean-ice kappa is below 0.5,
    and the X minus C noise curve falls with area."""
    tab = xr.open_zarr(str(table_store), group="penetration")
    std = tab.penetration_std_m
    assert std.dims == ("region", "surface", "bin") and std.attrs["units"] == "m"
    kappa = tab.penetration_spread_kappa.values
    assert np.all((kappa >= 0) & (kappa <= penetration.MAX_KAPPA))
    np.testing.assert_allclose(
        std.values, kappa[:, :, None] * np.abs(tab.penetration_m.values), rtol=1e-6
    )
    assert kappa[0, 0] < 0.5
    var = tab.xc_noise_var_m2.values
    assert np.all(np.diff(var) <= 0) and tab.attrs["xc_noise_measured"] == 1
    # the pixel-scale variance is the spread of X - C (near 1.25 m^2)
    assert 0.8 < var[0] < 2.0
    # 'xband' refines no glacier by its own X band (weights 0): its offsets are the pooling's
    assert np.all(tab.glacier_penetration_weight.values == 0)


def test_glaciers_without_own_xband_move_to_the_pooled_table(table_store: Path) -> None:
    """With region pooling (the default), a glacier surface without enough X band of its own
    (share < 0.5 or < 100 pixels) is moved by the mean over its pixels with a C-band reference
    of (penetration_pooled_m - penetration_m) at their region, surface and bin (pixel loop
    oracle on the cube); one with its own X band keeps its region's table (offset 0)."""
    ds = open_cube(table_store).load()
    tab = xr.open_zarr(str(table_store), group="penetration").load()
    config = CorrectionsConfig()
    assert tab.attrs["glacier_adjustment_applied"] == 1
    offsets = read_table(table_store).glacier_offset_m
    assert offsets is not None
    np.testing.assert_array_equal(offsets[1:], tab.glacier_penetration_offset_m.values)
    delta = (tab.penetration_pooled_m - tab.penetration_m).values.astype(np.float64)
    first = round((float(tab.bin[0]) - ELEV_MIN_M) / WIDTH)
    regions = list(tab.region.values)
    ref, gid = ds.ref_dem_m.values, ds.glacier_id.values
    surface, region = ds.surface.values, ds.region_id.values
    checked = {True: 0, False: 0}
    for g in np.unique(gid[gid > 0]):
        for s in (1, 2):
            at = (gid == g) & (surface == s) & np.isfinite(ref)
            if not at.any():
                continue
            own = (tab.glacier_penetration_n_x_px.sel(glacier=g, surface=s) >= 100) & (
                tab.glacier_penetration_x_share.sel(glacier=g, surface=s)
                >= config.penetration_glacier_min_x_share
            )
            k = np.clip(bin_index(ref[at], WIDTH) - first, 0, delta.shape[2] - 1)
            r = np.array([regions.index(v) if v in regions else 0 for v in region[at]])
            expect = 0.0 if bool(own) else float(np.mean(delta[r, s - 1, k]))
            np.testing.assert_allclose(offsets[g, s - 1], expect, atol=1e-5)
            checked[bool(own)] += 1
    assert checked[True] > 0 and checked[False] > 0, checked


def test_table_without_xband_has_no_statistics(table_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    shutil.copytree(table_store, store)
    penetration_table(store, CorrectionsConfig(penetration="constant", penetration_constant_m=1.5))
    tab = xr.open_zarr(str(store), group="penetration")
    assert "penetration_std_m" not in tab and "reference_sigma_m" not in tab
    assert np.all(tab.penetration_m.values == 1.5)
