"""Corrections: block kernels against slow numpy oracles, and the cube step against the synthetic
generator's truth (datum, ramp, penetration, seasonal offset, glacier dh)."""

from __future__ import annotations

import itertools
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as stn

from mbcube.cluster import quiet
from mbcube.config import CorrectionsConfig
from mbcube.corrections import (
    CorrectionsError,
    coregister,
    correct_cube,
    outliers,
    penetration,
    ramp,
    read_table,
    robust,
)
from mbcube.corrections.bins import ELEV_MIN_M, bin_index, group_index, n_bins
from mbcube.corrections.seasonal import seasonal_offset_m
from mbcube.corrections.step import SceneInputs, outlier_table, scene_graph
from mbcube.errors import MbcubeWarning
from mbcube.ingest import ingest
from mbcube.store import STATIC_ITEM, open_cube, step_record
from mbcube.synth.noise import value_noise
from tests.conftest import raise_if_dask_computes
from tests.storetools import rerecord

# ------------------------------------------------------------------------------ kernels


@settings(max_examples=30, deadline=None)
@given(
    seed=stn.integers(0, 10_000),
    n=stn.integers(50, 3000),
    loc=stn.floats(-50, 50),
    scale=stn.floats(0.05, 5),
)
def test_histogram_median_nmad_match_numpy(seed: int, n: int, loc: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    v = loc + scale * rng.standard_t(3, n)
    blocks = np.array_split(v, 5)
    centre, sc, total = robust.combine_quantiles([robust.block_quantiles(b) for b in blocks])
    assert total == n
    lo, width = robust.hist_range(centre, sc)
    counts = sum(robust.histogram(b, lo, width) for b in blocks)
    med, nmad = robust.median_nmad(counts, lo, width)
    # the histogram's median lies between the sample's middle order statistics (+- 2 bins)
    srt = np.sort(v)
    assert srt[(n - 1) // 2 - 1] - 2 * width <= med <= srt[n // 2 + 1] + 2 * width
    dev = np.sort(np.abs(v - np.median(v)))
    k = (n - 1) // 2
    slack = 3 * width + abs(med - np.median(v))
    assert 1.4826 * (dev[k - 2] - slack) <= nmad <= 1.4826 * (dev[k + 2] + slack)


def _ramp_oracle(
    dh: np.ndarray, use: np.ndarray, X: np.ndarray, Y: np.ndarray, k: float, iters: int
) -> np.ndarray:
    """Slow iterated sigma-clipped bilinear fit on the whole array."""
    coef = np.zeros(4)
    sel = use & np.isfinite(dh)
    v = dh[sel]
    med = np.median(v)
    q75, q25 = np.percentile(v, [75, 25])
    centre, clip = med, k * (q75 - q25) / 1.349
    for _ in range(iters):
        model = coef[0] + coef[1] * X + coef[2] * Y + coef[3] * X * Y
        s = sel & (np.abs(dh - model - centre) <= clip)
        A = np.stack([np.ones(s.sum()), X[s], Y[s], X[s] * Y[s]], axis=1)
        coef = np.linalg.lstsq(A, dh[s], rcond=None)[0]
        r = (dh - (coef[0] + coef[1] * X + coef[2] * Y + coef[3] * X * Y))[sel]
        centre = np.median(r)
        clip = k * 1.4826 * np.median(np.abs(r - centre))
    return coef


def test_ramp_blocks_match_oracle_and_truth() -> None:
    rng = np.random.default_rng(3)
    ny, nx = 96, 80
    xk = (np.arange(nx) - nx / 2) * 0.03
    yk = -(np.arange(ny) - ny / 2) * 0.03
    X, Y = np.meshgrid(xk, yk)
    truth = np.array([1.3, 0.4, -0.25, 0.08])
    dh = truth[0] + truth[1] * X + truth[2] * Y + truth[3] * X * Y + rng.normal(0, 0.3, X.shape)
    bad = rng.random(X.shape) < 0.05
    dh[bad] += rng.choice([-30.0, 40.0], bad.sum())  # outliers the clip must reject
    use = rng.random(X.shape) < 0.7
    # blocks: 3 x 2 tiles of uneven size, the same iterations as the step
    rows, cols = [0, 30, 70, 96], [0, 50, 80]
    tiles = [
        (slice(rows[i], rows[i + 1]), slice(cols[j], cols[j + 1]))
        for i in range(3)
        for j in range(2)
    ]
    q = [robust.block_quantiles(np.where(use[t], dh[t], np.nan)) for t in tiles]
    centre, scale, _ = robust.combine_quantiles(q)
    clip, model = 3.0 * scale, np.zeros(6)
    for _ in range(3):
        parts = [
            ramp.normal_equations(dh[t], use[t], xk[t[1]], yk[t[0]], model, centre, clip)
            for t in tiles
        ]
        model = ramp.solve(sum(p[0] for p in parts), sum(p[1] for p in parts), 1)
        lo, width = robust.hist_range(0.0, scale)
        counts = sum(
            robust.histogram(
                np.where(use[t], dh[t], np.nan) - ramp.evaluate(model, xk[t[1]], yk[t[0]]),
                lo,
                width,
            )
            for t in tiles
        )
        centre, nmad = robust.median_nmad(counts, lo, width)
        clip, scale = 3.0 * nmad, nmad
    oracle = _ramp_oracle(dh, use, X, Y, 3.0, 3)
    np.testing.assert_allclose(model[:4], oracle, atol=2e-3)
    np.testing.assert_allclose(model[:4], truth, atol=0.06)
    assert np.all(model[4:] == 0)


def test_coregistration_recovers_a_known_shift() -> None:
    res, shift = 30.0, np.array([17.0, -11.0])  # m east, north
    halo = 8
    ny = nx = 160 + 2 * halo
    x = (np.arange(nx) - halo) * res
    y = -(np.arange(ny) - halo) * res
    X, Y = np.meshgrid(x, y)

    def terrain(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        return 400.0 * value_noise(xx, yy, 1500.0, 5) + 150.0 * value_noise(xx, yy, 600.0, 6)

    ref_h = terrain(X, Y)
    dem_h = terrain(X - shift[0], Y - shift[1]) + 2.0  # the scene: displaced by `shift`, offset 2 m
    ref = ref_h[halo:-halo, halo:-halo]
    use = np.ones(ref.shape, dtype=bool)
    gx, gy = coregister.gradient(ref_h, res)
    total = np.zeros(2)
    for _ in range(4):
        dh = coregister.shifted(dem_h, halo, total, res) - ref
        ata, atb = coregister.normal_equations(
            dh, gx[halo:-halo, halo:-halo], gy[halo:-halo, halo:-halo], use, np.median(dh), 50.0
        )
        total = total + coregister.shift_update_m(ata, atb)
    np.testing.assert_allclose(total, shift, atol=0.5)
    with pytest.raises(coregister.ShiftTooLarge):
        coregister.shifted(dem_h, halo, np.array(300.0, ndmin=1).repeat(2), res)


def _outlier_pass(
    dh: np.ndarray, keys: np.ndarray, tiles: list[tuple[slice, slice]], k: float = 3.0
) -> tuple[outliers.Moments, outliers.SparseCounts, outliers.Thresholds, np.ndarray]:
    """The two sparse reductions over `tiles`, merged in a tree of unequal fan-in, then `keep`
    per tile (as the corrections step maps them)."""
    blocks = [(t, *outliers.block_groups(dh[t], keys[t])) for t in tiles]
    mom_parts = [outliers.moments_block(dh[t], c, bk) for t, c, bk in blocks]
    mom = outliers.merge_moments(outliers.merge_moments(*mom_parts[:2]), *mom_parts[2:])
    stats = outliers.mean_std(mom)
    hist_parts = [outliers.zhist_block(dh[t], c, bk, stats) for t, c, bk in blocks]
    hist = outliers.merge_counts(*hist_parts[::-1])
    th = outliers.thresholds(hist, stats, k, min_px=20)
    ok = np.zeros(dh.shape, dtype=bool)
    for t, c, bk in blocks:
        ok[t] = outliers.keep(dh[t], c, bk, th)
    return mom, hist, th, ok


def _oracle_thresholds(v: np.ndarray, mean: float, std: float, k: float) -> tuple[float, float]:
    """Slow oracle of `outliers.thresholds` for one group: the dense histogram of z = (v - mean)
    / std, its piecewise-linear cdf (underflow below, overflow left out), the median where the cdf
    reaches n / 2 and the MAD where the cdf's mass within med -+ t reaches n / 2, found exactly on
    the cdf's breakpoints."""
    w = 2 * outliers.Z_MAX / outliers.N_Z_BINS
    z = (v - mean) / std
    edges = -outliers.Z_MAX + w * np.arange(outliers.N_Z_BINS + 1)
    b = np.floor((z + outliers.Z_MAX) / w)
    sel = (z >= -outliers.Z_MAX) & (z < outliers.Z_MAX)
    inner = np.bincount(b[sel].astype(int), minlength=outliers.N_Z_BINS)[: outliers.N_Z_BINS]
    cum = (z < -outliers.Z_MAX).sum() + np.concatenate([[0], np.cumsum(inner)]).astype(float)
    half = 0.5 * v.size
    j = int(np.argmax(cum >= half))
    med = edges[0] if j == 0 else edges[j - 1] + w * (half - cum[j - 1]) / (cum[j] - cum[j - 1])

    def mass(t: np.ndarray) -> np.ndarray:
        return np.interp(med + t, edges, cum) - np.interp(med - t, edges, cum)

    ts = np.unique(np.concatenate([[0.0], np.abs(edges - med), [2 * outliers.Z_MAX]]))
    ts = ts[ts <= 2 * outliers.Z_MAX]
    g = mass(ts)
    # the mass at a breakpoint carries float rounding: where it reaches n / 2 exactly (a plateau
    # at half, e.g. an even group), the smallest t is that breakpoint, not the plateau's end
    j = int(np.argmax(g >= half - 1e-9 * v.size))
    mad = (
        ts[0] if j == 0 else ts[j - 1] + (ts[j] - ts[j - 1]) * (half - g[j - 1]) / (g[j] - g[j - 1])
    )
    nmad = max(1.4826 * mad, w)
    return mean + std * (med - k * nmad), mean + std * (med + k * nmad)


@settings(max_examples=25, deadline=None)
@given(seed=stn.integers(0, 10_000), n_glaciers=stn.integers(1, 6), n_tiles=stn.integers(1, 5))
def test_sparse_outlier_reductions_match_per_group_oracle(
    seed: int, n_glaciers: int, n_tiles: int
) -> None:
    """Moments and z histograms merged over tiles equal a slow per-group numpy loop exactly; the
    thresholds are the group's median -+ 3 NMAD (to the histogram's resolution); blunders of +80 m
    are all rejected."""
    rng = np.random.default_rng(seed)
    shape = (48, 40)
    on = rng.random(shape) < 0.5  # half the pixels off-glacier: groups of ~230 px
    glacier = np.where(on, rng.integers(1, n_glaciers + 1, shape), 0).astype(np.int32)
    surface = np.where(glacier > 0, rng.integers(1, 3, shape), 0).astype(np.int8)
    region = rng.integers(0, 2, shape).astype(np.int16)
    ref = rng.uniform(4000.0, 4099.0, shape)  # two 50 m bins
    bins = n_bins(50.0)
    keys = outliers.group_keys(glacier, region, surface, bin_index(ref, 50.0), bins)
    scale = rng.uniform(0.2, 3.0, n_glaciers + 1)[glacier]
    dh = rng.normal(-2.0 * glacier, scale).astype(np.float32)
    dh[rng.random(shape) < 0.05] = np.nan
    blunder = rng.random(shape) < 0.02
    dh[blunder] = 80.0
    edges = np.linspace(0, shape[0], n_tiles + 1).astype(int)
    tiles = [(slice(a, b), slice(None)) for a, b in itertools.pairwise(edges)]
    mom, hist, th, ok = _outlier_pass(dh, keys, tiles)
    stats = outliers.mean_std(mom)
    checked_exact = 0

    fin = np.isfinite(dh) & (keys >= 0)
    expect = np.unique(keys[fin])
    assert np.array_equal(mom.keys, expect) and np.array_equal(th.keys, expect)
    labels = outliers.decode_keys(expect, bins)
    for i, key in enumerate(expect):
        sel = fin & (keys == key)
        v = dh[sel].astype(np.float64)
        # the decoded labels are the pixels' own
        if labels["glacier"][i] > 0:
            assert np.all(glacier[sel] == labels["glacier"][i]) and np.all(surface[sel] > 0)
        else:
            assert np.all(region[sel] == labels["region"][i]) and np.all(surface[sel] == 0)
        assert np.all(surface[sel] == labels["surface"][i])
        assert np.all(bin_index(ref[sel], 50.0) == labels["bin"][i])
        assert mom.n[i] == v.size == th.n[i]
        assert mom.s[i] == pytest.approx(v.sum(), rel=1e-9, abs=1e-6)
        assert mom.ss[i] == pytest.approx((v * v).sum(), rel=1e-9, abs=1e-6)
        mean, std = v.mean(), v.std()
        mine = hist.codes // outliers.N_CODES == key
        dense = np.zeros(outliers.N_CODES, dtype=np.int64)
        dense[hist.codes[mine] % outliers.N_CODES] = hist.counts[mine]
        if std <= 1e-6 * max(1.0, abs(mean)):
            assert dense.sum() in (0, v.size)
            continue
        z = (v - mean) / std
        under, over = (z < -outliers.Z_MAX).sum(), (z >= outliers.Z_MAX).sum()
        inner = np.histogram(z, np.linspace(-outliers.Z_MAX, outliers.Z_MAX, outliers.N_Z_BINS + 1))
        # float rounding may move a value across a bin edge: compare within one count per edge
        assert dense[0] == under and dense[-1] == pytest.approx(over, abs=1)
        assert np.abs(dense[1:-1] - inner[0]).sum() <= 2 * max(1, v.size // 1000)
        if v.size < 20:
            assert np.isnan(th.lower[i]) and np.isnan(th.upper[i])
            continue
        lo, hi = _oracle_thresholds(v, float(stats.mean[i]), float(stats.std[i]), 3.0)
        assert th.lower[i] == pytest.approx(lo, abs=1e-6 * std)
        assert th.upper[i] == pytest.approx(hi, abs=1e-6 * std)
        if v.size >= 150:  # the sample's median -+ 3 NMAD, to the histogram's resolution
            med = np.median(v)
            nmad = 1.4826 * np.median(np.abs(v - med))
            width = 2 * outliers.Z_MAX / outliers.N_Z_BINS * std
            tol = 3 * width + 0.1 * nmad
            assert th.lower[i] == pytest.approx(med - 3 * max(nmad, width), abs=tol)
            assert th.upper[i] == pytest.approx(med + 3 * max(nmad, width), abs=tol)
            checked_exact += 1
    assert not ok[blunder].any()
    assert not ok[np.isnan(dh)].any()
    assert checked_exact >= 1
    # pixels without a group or in groups too small for thresholds are all kept
    small = np.isin(keys, expect[np.isnan(th.lower)]) | (keys < 0)
    assert ok[small & np.isfinite(dh)].all()
    # the same answer in one tile
    one = _outlier_pass(dh, keys, [(slice(None), slice(None))])
    assert np.array_equal(one[3], ok)
    np.testing.assert_allclose(one[2].lower, th.lower, rtol=1e-9, equal_nan=True)


def test_glacier_with_its_own_change_keeps_its_pixels() -> None:
    """Two glaciers in the same region, surface and 50 m bins, one thinning 6 m more than the
    other (and with a third of its pixels): grouped per glacier, every pixel of both is kept and a +80 m blunder
    inside a glacier bin is removed. Pooled per region (glacier ids zeroed), the filter would cut
    the thinning glacier."""
    rng = np.random.default_rng(3)
    shape = (60, 80)
    ref = np.tile(np.linspace(4000.0, 4290.0, shape[1]), (shape[0], 1))
    glacier = np.ones(shape, dtype=np.int32)
    glacier[:15] = 2  # a quarter of each bin
    surface = np.ones(shape, dtype=np.int8)
    region = np.ones(shape, dtype=np.int16)
    dh = rng.uniform(-2.0, 0.0, shape)  # bounded noise: within 3 NMAD of its median
    dh[glacier == 2] -= 6.0
    dh[40, 10] = 80.0
    bins = n_bins(50.0)
    tiles = [(slice(0, 30), slice(None)), (slice(30, 60), slice(None))]
    keys = outliers.group_keys(glacier, region, surface, bin_index(ref, 50.0), bins)
    _, _, th, ok = _outlier_pass(dh, keys, tiles)
    assert ok.sum() == ok.size - 1 and not ok[40, 10]
    assert np.isfinite(th.lower).all() and th.keys.size == 2 * 6
    # glacier 2's thresholds sit around its own -7 m, not the region's
    g2 = outliers.decode_keys(th.keys, bins)["glacier"] == 2
    assert np.all(np.abs(0.5 * (th.lower[g2] + th.upper[g2]) + 7.0) < 0.3)
    pooled = outliers.group_keys(
        np.zeros_like(glacier), region, surface, bin_index(ref, 50.0), bins
    )
    _, _, _, ok_pooled = _outlier_pass(dh, pooled, tiles)
    assert (~ok_pooled[glacier == 2]).mean() > 0.9


def test_group_keys_separate_glaciers_regions_and_bins() -> None:
    glacier = np.array([0, 0, 1, 1, 2, 2, 7, 0, 5])
    region = np.array([0, 3, 3, 4, 3, 3, 3, 32767, 1])
    surface = np.array([0, 0, 1, 1, 1, 2, 2, 1, 0])
    b = np.array([0, 5, 5, 5, 5, 5, 189, 3, -1])
    keys = outliers.group_keys(glacier, region, surface, b, 190)
    assert keys[-1] == -1  # no bin: no group
    assert keys[2] == keys[3]  # one glacier across two regions: one group
    assert np.unique(keys[:-1]).size == 7
    lab = outliers.decode_keys(keys[:-1], 190)
    assert lab["glacier"].tolist() == [0, 0, 1, 1, 2, 2, 7, 0]
    assert lab["region"].tolist() == [0, 3, -1, -1, -1, -1, -1, 32767]
    assert lab["surface"].tolist() == surface[:-1].tolist()
    assert lab["bin"].tolist() == b[:-1].tolist()
    # a tile without finite dh or without groups passes through every step
    dh = np.full((4, 5), np.nan)
    dh[0, :2] = 1.0
    none = np.full(dh.shape, -1)
    _, hist, th, ok = _outlier_pass(
        dh, none, [(slice(0, 2), slice(None)), (slice(2, 4), slice(None))]
    )
    assert th.keys.size == 0 and hist.codes.size == 0
    assert np.array_equal(ok, np.isfinite(dh))


def test_penetration_sums_and_lookup_match_oracle() -> None:
    rng = np.random.default_rng(1)
    shape = (40, 30)
    ref = rng.uniform(4000, 4400, shape)
    region = rng.integers(0, 3, shape).astype(np.int16)
    surface = rng.integers(0, 3, shape).astype(np.int8)
    diff = rng.normal(1.0, 0.5, shape)
    diff[rng.random(shape) < 0.1] = np.nan
    width = 50.0
    sums = penetration.sums_block(diff, region, surface, ref, 2, width)
    b = bin_index(ref, width)
    for r in range(3):
        for s in (1, 2):
            for k in np.unique(b):
                sel = (surface == s) & (b == k) & np.isfinite(diff)
                sel &= (region == r) if r > 0 else True
                assert sums[0, r, s - 1, k] == sel.sum()
                assert sums[1, r, s - 1, k] == pytest.approx(diff[sel].sum())
    table = penetration.finish_table(sums, 0.2, width, 1, 30.0)
    pen = penetration.lookup(table.penetration_m, table.bin_lo_m, width, region, surface, ref)
    for idx in [(0, 0), (5, 7), (39, 29)]:
        if surface[idx] == 0:
            assert pen[idx] == 0.0
            continue
        k = int((ref[idx] - table.bin_lo_m[0]) // width)
        # smoothed along elevation: the mean of all pixels in the bin's 3-bin window
        sel = (surface == surface[idx]) & (np.abs(b - b[idx]) <= 1) & np.isfinite(diff)
        sel &= (region == region[idx]) if region[idx] > 0 else True
        assert pen[idx] == pytest.approx(diff[sel].mean() - 0.2)
        assert table.bin_lo_m[k] == ELEV_MIN_M + width * b[idx]


def test_group_index_is_unique_per_label() -> None:
    r, s, b = np.meshgrid(np.arange(3), np.arange(3), np.arange(n_bins(50.0)), indexing="ij")
    g = group_index(r, s, b, 3, 3, n_bins(50.0))
    assert np.array_equal(np.sort(g.ravel()), np.arange(g.size))


def test_month_without_seasonal_value_is_refused() -> None:
    table = CorrectionsConfig().seasonal_offset_m
    assert seasonal_offset_m(10, table, "A") == -0.28
    with pytest.raises(CorrectionsError, match=r"scene S7.*month 7.*seasonal_offset_m\.7"):
        seasonal_offset_m(7, table, "S7")


# ------------------------------------------------------------------------- the cube step


@pytest.fixture(scope="module")
def corrected(tiny_dem_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("corr") / "cube.zarr"
    with quiet():
        ingest(tiny_dem_study, store)
        shutil.copytree(store, store.with_name("raw.zarr"))
        with pytest.warns(MbcubeWarning, match="pooled table"):
            done = correct_cube(store)
    assert len(done) == 3
    return store


def _grid_xy_km(ds: xr.Dataset, origin: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid((ds.x.values - origin[0]) / 1000.0, (ds.y.values - origin[1]) / 1000.0)


def test_datum_and_ramp_recover_truth(corrected: Path, tiny_dem_study: Path) -> None:
    """The estimates match the generator's datum and ramp plus what the correlated DEM noise on
    stable ground projects onto the same terms (the noise's own fit), within 0.1 m / 0.05 m/km (co-registration moves the scene a little);
    the truth alone within 0.5 m and 0.12 m/km."""
    ds = open_cube(corrected)
    truth = pd.read_csv(tiny_dem_study / "truth/scenes.csv").set_index("scene_id")
    origin = json.loads((tiny_dem_study / "truth/meta.json").read_text())["ramp_origin_m"]
    X, Y = _grid_xy_km(ds, origin)
    stable = (ds.stable.values == 1) & (ds.ref_void.values == 0)
    for k, sid in enumerate(ds.scene.values):
        t = truth.loc[str(sid)]
        true = np.array([t.datum_m, t.ramp_b_m_per_km, t.ramp_c_m_per_km, t.ramp_d_m_per_km2])
        model = true[0] + true[1] * X + true[2] * Y + true[3] * X * Y
        noise = ds.dem_m.values[k] - ds.ref_dem_m.values - model
        sel = stable & np.isfinite(noise) & (np.abs(noise - np.nanmedian(noise[stable])) < 5)
        A = np.stack([np.ones(sel.sum()), X[sel], Y[sel], X[sel] * Y[sel]], axis=1)
        noise_fit = np.linalg.lstsq(A, noise[sel], rcond=None)[0]
        noise_fit[0] = np.median(noise[sel] - A[:, 1:] @ noise_fit[1:])
        est = np.array([float(ds.datum_offset_m[k]), *ds.ramp_coef.values[k, 1:4]])
        assert ds.ramp_coef.values[k, 0] == 0.0
        if k < 2:  # the last scene was delivered in another CRS: its resampling adds noise
            err = np.abs(est - (true + noise_fit))
            assert np.all(err <= [0.1, 0.05, 0.05, 0.01]), (sid, est, true + noise_fit)
        assert np.all(np.abs(est - true) <= [0.5, 0.12, 0.12, 0.05]), (sid, est, true)
        # after correction, stable ground has median ~0 and no residual ramp
        dh = ds.dh_m.values[k]
        ok = stable & np.isfinite(dh)
        assert abs(np.median(dh[ok])) < 0.02
        A = np.stack([np.ones(ok.sum()), X[ok], Y[ok], X[ok] * Y[ok]], axis=1)
        resid = np.linalg.lstsq(A, dh[ok], rcond=None)[0]
        assert np.all(np.abs(resid[1:]) < 0.03)


def test_penetration_table_matches_truth(corrected: Path, tiny_dem_study: Path) -> None:
    """Per bin with enough pixels: |estimate - true mean C-X penetration| <= 3 sigma + 0.15 m."""
    ds = open_cube(corrected)
    table = read_table(corrected)
    with rasterio.open(tiny_dem_study / "truth/penetration_m.tif") as f:
        true_pen = f.read(1)
    diff = ds.ref_dem_x_m.values - ds.ref_dem_m.values
    surface, region = ds.surface.values, ds.region_id.values
    b = bin_index(ds.ref_dem_m.values, 50.0)
    checked = 0
    for r in range(table.penetration_m.shape[0]):
        for s in (1, 2):
            for k, lo in enumerate(table.bin_lo_m):
                if table.filled[r, s - 1, k] or table.n_px[r, s - 1, k] < 100:
                    continue
                sel = (surface == s) & (b == int((lo - ELEV_MIN_M) // 50)) & np.isfinite(diff)
                sel &= (ds.ref_void.values == 0) & ((region == r) if r else True)
                assert sel.sum() == table.n_px[r, s - 1, k]
                err = table.penetration_m[r, s - 1, k] - true_pen[sel].mean()
                assert abs(err) <= 3 * table.sigma_m[r, s - 1, k] + 0.15, (r, s, lo)
                checked += 1
    assert checked >= 10
    assert table.penetration_m[0, 0].mean() > 1.0  # clean ice: C penetrates deeper than X


def test_glacier_dh_matches_truth_and_seasonal_is_exact(
    corrected: Path, tiny_dem_study: Path
) -> None:
    """Glacier dh per 50 m bin (bins with > 1000 pixels, as the issue asks) within 0.3 m of the truth; the seasonal
    offset applied is exactly the configured table's value for the scene's month."""
    ds = open_cube(corrected)
    truth = pd.read_csv(tiny_dem_study / "truth/scenes.csv").set_index("scene_id")
    with rasterio.open(tiny_dem_study / "truth/dhdt_m_yr.tif") as f:
        rate = f.read(1)
    table = CorrectionsConfig().seasonal_offset_m
    glacier = ds.surface.values > 0
    b = bin_index(ds.ref_dem_m.values, 50.0)
    pen = read_table(corrected)
    checked = 0
    for k, sid in enumerate(ds.scene.values):
        month = int(ds.scene_month.values[k])
        assert float(ds.seasonal_offset_applied_m[k]) == table[month]
        t = truth.loc[str(sid)]
        true_dh = rate * float(ds.scene_years[k]) + (t.seasonal_offset_m - table[month])
        dh = ds.dh_m.values[k]
        for kb in np.unique(b[glacier]):
            sel = glacier & (b == kb) & np.isfinite(dh)
            if sel.sum() > 1000:
                # the penetration table's own uncertainty adds to the 0.3 m
                kt = int(kb - (pen.bin_lo_m[0] - ELEV_MIN_M) // 50)
                tol = 0.3 + 2 * float(pen.sigma_m[:, :, kt].max())
                assert abs(np.mean(dh[sel] - true_dh[sel])) < tol, (sid, kb)
                checked += 1
        assert np.array_equal(ds.valid.values[k] == 1, np.isfinite(dh))
        ok = glacier & np.isfinite(dh)
        # scene S02's correlated noise averages +0.2 m on its stable ground (see the datum test),
        # which the datum takes up: the whole-glacier bias is bounded by 0.4 m, not less
        if k < 2:  # not the scene resampled from another CRS
            assert abs(np.mean(dh[ok] - true_dh[ok])) < 0.4, sid
    assert checked >= 3


def test_outlier_tables_recorded_per_scene_and_group(corrected: Path) -> None:
    """Each scene's outlier table (group outliers/<scene>) counts, per (glacier, surface, bin) on
    glaciers and (region, surface, bin) elsewhere, the valid pixels plus the rejected ones; the
    rejected total is the scene's outlier_rejected_px; every filtered group has lower < upper."""
    ds = open_cube(corrected)
    b = bin_index(ds.ref_dem_m.values, 50.0)
    gid, surf, reg = ds.glacier_id.values, ds.surface.values, ds.region_id.values
    for k, sid in enumerate(ds.scene.values):
        tab = outlier_table(corrected, str(sid))
        assert tab.attrs["scene"] == str(sid) and tab.attrs["outlier_nmad"] == 3.0
        assert int(tab.n_rejected.sum()) == int(ds.outlier_rejected_px[k])
        filtered = np.isfinite(tab.lower_m.values)
        assert np.all(tab.lower_m.values[filtered] < tab.upper_m.values[filtered])
        assert tab.attrs["outlier_band_holds_zero"] == 1  # the default: every band holds 0
        assert np.all(tab.lower_m.values[filtered] <= 0) and np.all(tab.upper_m[filtered] >= 0)
        assert np.array_equal(filtered, tab.n_px.values >= 20)  # min_px
        assert np.all(tab.n_rejected.values[~filtered] == 0)
        valid = ds.valid.values[k] == 1
        glacier_rows = np.flatnonzero(tab.glacier.values > 0)
        region_rows = np.flatnonzero(tab.glacier.values == 0)
        assert glacier_rows.size > 10 and region_rows.size > 3
        for row in [*glacier_rows[:: max(1, glacier_rows.size // 8)], *region_rows[:3]]:
            g = int(tab.glacier[row])
            sel = (surf == int(tab.surface[row])) & (
                b == int((float(tab.bin_lower_m[row]) - ELEV_MIN_M) // 50.0)
            )
            sel &= (gid == g) if g > 0 else (reg == int(tab.region[row]))
            n_valid = int((sel & valid).sum())
            assert n_valid == int(tab.n_px[row]) - int(tab.n_rejected[row]), (sid, row)
        assert int(tab.n_px.sum()) - int(tab.n_rejected.sum()) == int(valid.sum())


def test_rerun_skips_and_laziness(corrected: Path) -> None:
    with quiet():
        assert correct_cube(corrected) == []
    ds = open_cube(corrected)
    cfg = CorrectionsConfig()
    with raise_if_dask_computes():
        out = scene_graph(
            ds, SceneInputs(str(ds.scene.values[0]), 0, "dem", 10), cfg, read_table(corrected)
        )
    assert out.dh_m.shape == (1, ds.sizes["y"], ds.sizes["x"])
    assert step_record(corrected, "correct", str(ds.scene.values[0]))["token"]


def test_scene_without_stable_ground_is_refused(corrected: Path, tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    shutil.copytree(corrected.with_name("raw.zarr"), store)
    import zarr

    stable = zarr.open_array(str(store / "stable"), mode="r+")
    stable[:] = 0
    rerecord(store, "ingest", STATIC_ITEM)
    with quiet(), pytest.raises(CorrectionsError, match=r"scene S01_\w+: only 0 valid pixels"):
        correct_cube(store, CorrectionsConfig(penetration="none"))
    ds = open_cube(store)
    assert "dh_m" not in ds or np.isnan(ds.dh_m.values).all()


def test_unknown_month_refused_before_writing(corrected: Path, tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    shutil.copytree(corrected.with_name("raw.zarr"), store)
    cfg = CorrectionsConfig(seasonal_offset_m={1: 0.0})
    with pytest.raises(CorrectionsError, match=r"corrections\.seasonal_offset_m"):
        correct_cube(store, cfg)
    assert "dh_m" not in open_cube(store)


@pytest.mark.slow
def test_insar_scenes_after_the_real_unwrap_step(tiny_cube: Path, tmp_path: Path) -> None:
    """The tiny insar study through the unwrap step (mbcube.unwrap) and then the corrections:
    datum within 0.15 m and ramp within 0.06 m/km (0.02 m/km2) of the generator's truth, no
    co-registration shift, and glacier dh within 0.5 m of the truth on average (the SRTM-C noise,
    shared by every scene, stays in insar dh: its glacier mean is a few tenths of a metre here)."""
    from mbcube.unwrap.step import unwrap_cube

    store = tmp_path / "cube.zarr"
    shutil.copytree(tiny_cube, store)
    with quiet():
        unwrap_cube(store)
        with pytest.warns(MbcubeWarning, match="pooled table"):
            assert len(correct_cube(store)) == 3
    ds = open_cube(store)
    root = Path(st_root(store))
    truth = pd.read_csv(root / "truth/scenes.csv").set_index("scene_id")
    with rasterio.open(root / "truth/dhdt_m_yr.tif") as f:
        rate = f.read(1)
    glacier = ds.surface.values > 0
    for k, sid in enumerate(ds.scene.values):
        t = truth.loc[str(sid)]
        assert abs(float(ds.datum_offset_m[k]) - t.datum_m) < 0.15, sid
        est = ds.ramp_coef.values[k, 1:4]
        true = np.array([t.ramp_b_m_per_km, t.ramp_c_m_per_km, t.ramp_d_m_per_km2])
        assert np.all(np.abs(est - true) <= [0.06, 0.06, 0.02]), (sid, est, true)
        assert np.all(ds.coreg_shift_m.values[k] == 0.0)
        applied = float(ds.seasonal_offset_applied_m[k])
        true_dh = rate * float(ds.scene_years[k]) + (t.seasonal_offset_m - applied)
        dh = ds.dh_m.values[k]
        ok = glacier & np.isfinite(dh)
        assert ok.sum() > 5000
        assert abs(np.mean(dh[ok] - true_dh[ok])) < 0.5, sid


def st_root(store: Path) -> str:
    """The study folder recorded in the store at ingest."""
    from mbcube.store import read_state

    return str(read_state(store)["study"]["root"])


def test_coregistration_iterations_stop_once_the_shift_stops_moving() -> None:
    from mbcube.corrections import step

    res = 30.0
    assert step._converged(np.array([3.0, -2.0]), np.array([3.0 + 0.2, -2.0]), res)  # 0.007 px
    assert not step._converged(np.array([3.0, -2.0]), np.array([3.6, -2.0]), res)  # 0.02 px
    shift = np.array([3.0, -2.0])
    ne = (np.eye(3), np.ones(3))
    assert step._add_shift(shift, ne, 8, res, "here", converged=True) is shift
    previous = (np.eye(3), np.zeros(3), np.zeros(5))
    block = np.full((20, 20), np.nan)  # would fail to give normal equations if it were used
    got = step._coreg_ne(
        block,
        block,
        block[4:-4, 4:-4],
        block[4:-4, 4:-4],
        shift,
        (0.0, 1.0, 1.0),
        4,
        res,
        True,
        previous,
    )
    assert got is previous


def test_corrections_parameters_live_in_the_config_with_defaults() -> None:
    """The former step options are CorrectionsConfig fields: a recorded config without them
    (made before they were fields) loads with the paper defaults; bad values fail naming the
    key; study.yaml may set them."""
    from pydantic import ValidationError

    from mbcube.config import StudyConfig

    old = CorrectionsConfig().model_dump(mode="json")
    for key in (
        "bin_width_m",
        "coreg_iterations",
        "coreg_halo_px",
        "min_stable_px",
        "outlier_min_px",
        "penetration_corr_m",
    ):
        old.pop(key)
    cfg = CorrectionsConfig.model_validate(old)
    assert (cfg.bin_width_m, cfg.coreg_iterations, cfg.coreg_halo_px) == (50.0, 3, 8)
    assert (cfg.min_stable_px, cfg.outlier_min_px, cfg.penetration_corr_m) == (100, 20, 500.0)
    with pytest.raises(ValidationError, match="coreg_halo_px"):
        CorrectionsConfig(coreg_halo_px=1)
    with pytest.raises(ValidationError, match="bin_widht_m"):
        CorrectionsConfig.model_validate({"bin_widht_m": 25.0})
    study = StudyConfig.model_validate({"corrections": {"bin_width_m": 25.0}})
    assert study.corrections.bin_width_m == 25.0


def test_outlier_bin_width_from_the_config(corrected: Path, tmp_path: Path) -> None:
    """corrections.bin_width_m sets the outlier groups' bins (recorded in the outlier table)."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(corrected.with_name("raw.zarr"), store)
    sid = str(open_cube(store).scene.values[0])
    with quiet(), pytest.warns(MbcubeWarning, match="pooled table"):
        correct_cube(store, CorrectionsConfig(bin_width_m=100.0), scenes=[sid])
    tab = outlier_table(store, sid)
    assert tab.attrs["bin_width_m"] == 100.0
    assert np.all(np.mod(tab.bin_lower_m.values - ELEV_MIN_M, 100.0) == 0)
    assert read_table(store).width_m == 100.0


def test_forcing_one_scene_leaves_the_others_current(corrected: Path, tmp_path: Path) -> None:
    """`correct --force --scene X` rebuilds the penetration table; the same table (same content
    digest) keeps the other scenes' records current, so the next run recomputes nothing. A
    table with other content makes every scene stale."""
    from mbcube.corrections.step import table_digest

    store = tmp_path / "cube.zarr"
    shutil.copytree(corrected, store)
    ids = [str(s) for s in open_cube(store).scene.values]
    digest = table_digest(read_table(store))
    with quiet(), pytest.warns(MbcubeWarning, match="pooled table"):
        assert correct_cube(store, scenes=[ids[0]], force=True) == [ids[0]]
    assert table_digest(read_table(store)) == digest
    with quiet():
        assert correct_cube(store) == []
    # another table (a constant instead of the X-band one): all scenes recompute
    with quiet():
        assert correct_cube(store, CorrectionsConfig(penetration="constant")) == ids


@settings(max_examples=25, deadline=None)
@given(seed=stn.integers(0, 10_000), min_px=stn.integers(5, 60))
def test_penetration_table_smoothing_and_filling_match_oracle(seed: int, min_px: int) -> None:
    """Each bin of the table against a slow per-bin oracle: where its 3-bin window (the bin
    and its neighbours, same region and surface) holds min_px pixels, the mean of the window's
    pixels minus the stable-ground offset, with the standard error of that mean (Rolstad);
    elsewhere a linear interpolation in elevation of those values; `filled` where the bin's own
    count is below min_px."""
    rng = np.random.default_rng(seed)
    shape = (30, 40)
    ref = rng.uniform(4000.0, 4000.0 + 50.0 * rng.integers(3, 9), shape)
    ref[rng.random(shape) < 0.3] += 400.0  # a gap in elevation: bins filled by interpolation
    region = rng.integers(0, 3, shape).astype(np.int16)
    surface = rng.integers(0, 3, shape).astype(np.int8)
    diff = 1.0 + 0.002 * (ref - 4000.0) + rng.normal(0, 0.5, shape)
    width, offset, res, corr = 50.0, 0.3, 30.0, 500.0
    sums = penetration.sums_block(diff, region, surface, ref, 2, width)
    with warnings.catch_warnings():  # regions without a good bin copy the pooled table
        warnings.simplefilter("ignore", MbcubeWarning)
        table = penetration.finish_table(sums, offset, width, min_px, res, corr)
    b = bin_index(ref, width)
    k0 = int((table.bin_lo_m[0] - ELEV_MIN_M) // width)
    centres = table.bin_lo_m + 0.5 * width
    for r in range(3):
        for s in (1, 2):
            here = (surface == s) & ((region == r) if r else True)
            if not here.any():
                continue
            value, sigma, ok = [], [], []
            for k in range(table.bin_lo_m.size):
                v = diff[here & (np.abs(b - (k0 + k)) <= 1)]
                ok.append(v.size >= min_px)
                value.append(v.mean() - offset if v.size else np.nan)
                sd = v.std(ddof=1) if v.size > 1 else 0.0
                sigma.append(penetration.sigma_of_mean_m(sd, np.array(v.size), res, corr))
                own = int((here & (b == k0 + k)).sum())
                assert table.n_px[r, s - 1, k] == own
                assert table.filled[r, s - 1, k] == (own < min_px)
            ok_a = np.array(ok)
            if not ok_a.any():
                continue  # copied from the pooled table (with a warning): not this oracle's
            value_a, sigma_a = np.array(value), np.array(sigma, dtype=float)
            expect = np.where(ok_a, value_a, np.interp(centres, centres[ok_a], value_a[ok_a]))
            expect_sigma = np.where(ok_a, sigma_a, np.interp(centres, centres[ok_a], sigma_a[ok_a]))
            np.testing.assert_allclose(table.penetration_m[r, s - 1], expect, atol=1e-9)
            np.testing.assert_allclose(table.sigma_m[r, s - 1], expect_sigma, atol=1e-9)


def test_outlier_band_keeps_a_second_mode_and_drops_blunders() -> None:
    """A glacier bin with two real modes (70 % at -1 m, 30 % at +30 m, like a surging tongue
    beside its margins) and 1 % blunders at +300 m: the median -+ 3 NMAD rule (band quantile
    0.5) drops the second mode; the band from the 20th to the 80th percentile widened by 3 NMAD
    keeps both modes and still drops every blunder."""
    rng = np.random.default_rng(4)
    n = 4000
    dh = np.where(rng.random(n) < 0.7, rng.normal(-1.0, 0.3, n), rng.normal(30.0, 0.3, n))
    blunder = rng.random(n) < 0.01
    dh[blunder] = 300.0
    dh = dh.reshape(40, 100)
    blunder = blunder.reshape(40, 100)
    keys = np.zeros(dh.shape, dtype=np.int64)  # one group
    codes, block_keys = outliers.block_groups(dh, keys)
    stats = outliers.mean_std(outliers.moments_block(dh, codes, block_keys))
    hist = outliers.zhist_block(dh, codes, block_keys, stats)
    second = (dh > 20) & ~blunder
    classic = outliers.keep(dh, codes, block_keys, outliers.thresholds(hist, stats, 3.0))
    assert not classic[second].any() and not classic[blunder].any()
    band = outliers.keep(
        dh, codes, block_keys, outliers.thresholds(hist, stats, 3.0, band_quantile=0.2)
    )
    assert band[~blunder].all() and not band[blunder].any()
    with pytest.raises(ValueError, match="band_quantile"):
        outliers.thresholds(hist, stats, 3.0, band_quantile=0.7)


def test_band_holding_zero_keeps_a_fading_margin_and_drops_blunders() -> None:
    """A thinning glacier bin: 80 % of its pixels at the full change (-40 m, spread 0.5 m), the
    margin fading linearly from -40 m to 0 towards the outline (20 %), 1 % blunders at +60 m
    and -150 m. Median -+ 3 NMAD keeps only the -40 m mode (a bin mean 4 m too negative); with
    the band holding 0 the whole margin stays, the mean is right, and the blunders still go."""
    rng = np.random.default_rng(7)
    n = 5000
    margin = rng.random(n) < 0.2
    dh = np.where(margin, -40.0 * rng.random(n), rng.normal(-40.0, 0.5, n))
    blunder = rng.random(n) < 0.01
    dh[blunder] = np.where(rng.random(blunder.sum()) < 0.5, 60.0, -150.0)
    dh, blunder, margin = (a.reshape(50, 100) for a in (dh, blunder, margin))
    codes, block_keys = outliers.block_groups(dh, np.zeros(dh.shape, dtype=np.int64))
    stats = outliers.mean_std(outliers.moments_block(dh, codes, block_keys))
    hist = outliers.zhist_block(dh, codes, block_keys, stats)
    classic = outliers.thresholds(hist, stats, 3.0)
    widened = outliers.thresholds(hist, stats, 3.0, holds_zero=True)
    assert classic.upper[0] < -35.0  # the narrow band around the main mode
    assert widened.lower[0] == classic.lower[0] and widened.upper[0] == 0.0
    truth = dh[~blunder].mean()
    kept_classic = outliers.keep(dh, codes, block_keys, classic)
    kept = outliers.keep(dh, codes, block_keys, widened)
    assert dh[kept_classic].mean() - truth < -3.0
    assert abs(dh[kept].mean() - truth) < 0.05
    assert kept[~blunder].all() and not kept[blunder].any()
