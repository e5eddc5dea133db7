"""penetration='xband_glacier': each glacier's own X-band pixels refine the C/X table by an
empirical-Bayes weighted offset. Checked against a slow per-pixel oracle, a Monte Carlo of the
error model behind the weight, the synthetic study's truth (true penetration and the SRTM-C
error the generator added), and in the corrected dh."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as stn

from mbcube.cluster import quiet
from mbcube.config import CorrectionsConfig
from mbcube.corrections import penetration, penetration_table, read_table
from mbcube.corrections.bins import n_bins
from mbcube.corrections.step import SceneInputs, scene_graph, table_digest
from mbcube.ingest import ingest
from mbcube.store import open_cube
from mbcube.synth.world import reference_noise_m

WIDTH = 50.0
RES = 30.0
SX = penetration.X_NOISE_VARIANCE_SHARE


def _white_curve(sigma_m: float) -> penetration.NoiseCurve:
    area = RES * RES * 2.0 ** np.arange(16)
    return penetration.NoiseCurve(area, sigma_m**2 / 2.0 ** np.arange(16), np.full(16, 100), True)


@settings(max_examples=12, deadline=None)
@given(seed=stn.integers(0, 10_000), min_share=stn.sampled_from([0.0, 0.5, 0.9]))
def test_adjustment_matches_per_pixel_oracle(seed: int, min_share: float) -> None:
    rng = np.random.default_rng(seed)
    ny, nx, n_region, n_glaciers = 60, 50, 2, 7
    ref = rng.uniform(4400.0, 4900.0, (ny, nx))
    glacier = rng.integers(0, n_glaciers + 1, (ny, nx)).astype(np.int32)
    surface = np.where(glacier > 0, rng.integers(1, 3, (ny, nx)), 0).astype(np.int8)
    region = rng.integers(0, n_region + 1, (ny, nx)).astype(np.int16)
    diff = 0.2 + 0.002 * (ref - 4400.0) + rng.normal(0, 0.8, (ny, nx))
    # X band missing on a random share of each glacier
    miss = rng.random(n_glaciers + 1)[glacier]
    diff[rng.random((ny, nx)) < miss] = np.nan
    diff[glacier == n_glaciers] = np.nan  # one glacier without any X-band pixel
    offset = 0.2
    sums = penetration.sums_block(diff, region, surface, ref, n_region, WIDTH)
    table = penetration.finish_table(sums, offset, WIDTH, 5, RES)
    moments = penetration.glacier_moments_block(
        diff, glacier, region, surface, ref, n_region, WIDTH
    )
    curve = _white_curve(0.8)
    spread = penetration.Spread(
        np.zeros_like(table.penetration_m),
        rng.uniform(0.05, 0.4, (n_region + 1, 2)),
        np.zeros((n_region + 1, 2), dtype=np.int64),
        np.ones((n_region + 1, 2), dtype=bool),
    )
    adj = penetration.glacier_adjustment(
        moments, table, offset, spread, curve, RES, n_glaciers, min_share, 10
    )
    t_px = penetration.lookup(table.penetration_m, table.bin_lo_m, WIDTH, region, surface, ref)
    for g in range(1, n_glaciers + 1):
        for s in (1, 2):
            on = (glacier == g) & (surface == s)
            xs = on & np.isfinite(diff)
            n_x, n_ref = int(xs.sum()), int(on.sum())
            assert adj.n_x_px[g, s - 1] == n_x
            share = n_x / n_ref if n_ref else 0.0
            assert adj.x_share[g, s - 1] == pytest.approx(share, abs=1e-12)
            if n_x == 0:
                assert adj.weight[g, s - 1] == 0 and adj.offset_m[g, s - 1] == 0
                if n_ref:  # its error: the spread prior and its whole reference error
                    tau_all = np.mean(spread.kappa[region[on], s - 1] * np.abs(t_px[on]))
                    var = tau_all**2 + (1 - SX) * curve.variance(n_ref * RES * RES)
                    assert adj.sigma_table_m[g, s - 1] == pytest.approx(np.sqrt(var), rel=1e-9)
                    assert adj.sigma_m[g, s - 1] == adj.sigma_table_m[g, s - 1]
                continue
            raw = np.mean(diff[xs] - offset - t_px[xs])
            tau = np.mean(spread.kappa[region[xs], s - 1] * np.abs(t_px[xs]))
            v = curve.variance(n_x * RES * RES)
            k = (tau**2 + share * (1 - SX) * v) / (tau**2 + v)
            if n_x < 10 or share < min_share:
                k = 0.0
            assert adj.raw_m[g, s - 1] == pytest.approx(raw, abs=1e-9)
            assert adj.prior_sigma_m[g, s - 1] == pytest.approx(tau, abs=1e-9)
            assert adj.weight[g, s - 1] == pytest.approx(k, abs=1e-9)
            assert adj.offset_m[g, s - 1] == pytest.approx(k * raw, abs=1e-9)
    assert np.all(adj.offset_m[0] == 0) and np.all((adj.weight >= 0) & (adj.weight <= 1))
    # the per-pixel lookup of the offsets
    got = penetration.glacier_lookup(adj.offset_m, glacier, surface)
    expect = np.where(surface > 0, adj.offset_m[glacier, np.clip(surface - 1, 0, 1)], 0.0)
    np.testing.assert_array_equal(got, expect)


def test_weight_minimises_the_simulated_error_and_sigma_is_calibrated() -> None:
    """Monte Carlo of 20000 glaciers: true deviation from the table delta ~ N(0, tau), SRTM-C
    and SRTM-X errors of the glacier means eC, eX with the variance shares (1 - s, s) of the
    measured X - C noise v, full X cover. dh carries E0 = delta - eC with the table alone and
    E0 - k raw with the offset, raw = delta + eX - eC. The weight's error is the smallest of
    k in {0, naive tau^2 / (tau^2 + v), ours, 1}, and sigma_table_m / sigma_m match the
    simulated rms within 3 %."""
    rng = np.random.default_rng(11)
    n_glaciers, n_px, tab_value, kappa, pix_sigma = 20_000, 400, 2.0, 0.15, 6.0
    curve = _white_curve(pix_sigma)
    v = float(curve.variance(n_px * RES * RES))  # 0.09 m^2
    tau = kappa * tab_value
    delta = rng.normal(0, tau, n_glaciers)
    e_c = rng.normal(0, np.sqrt((1 - SX) * v), n_glaciers)
    e_x = rng.normal(0, np.sqrt(SX * v), n_glaciers)
    raw = delta + e_x - e_c
    bins = n_bins(WIDTH)
    b = int((4600.0 + 500.0) / WIDTH)
    g = np.arange(1, n_glaciers + 1)
    keys = penetration.encode_cells(
        g, np.ones_like(g), np.zeros_like(g), np.full_like(g, b), 1, bins
    )
    values = np.stack(
        [
            np.full(n_glaciers, n_px),
            n_px * (tab_value + raw),
            np.zeros(n_glaciers),
            np.full(n_glaciers, n_px),
        ]
    ).astype(np.float64)
    moments = penetration.GlacierMoments(keys, values, 1, bins)
    table = penetration.Table(
        np.array([4600.0]),
        np.full((2, 2, 1), tab_value),
        np.zeros((2, 2, 1)),
        np.ones((2, 2, 1), dtype=np.int64),
        np.zeros((2, 2, 1), dtype=bool),
        WIDTH,
    )
    spread = penetration.Spread(
        np.zeros((2, 2, 1)), np.full((2, 2), kappa), np.zeros((2, 2), int), np.ones((2, 2), bool)
    )
    adj = penetration.glacier_adjustment(
        moments, table, 0.0, spread, curve, RES, n_glaciers, 0.5, 100
    )
    np.testing.assert_allclose(adj.raw_m[1:, 0], raw, atol=1e-9)
    k = float(adj.weight[1, 0])
    assert np.all(adj.weight[1:, 0] == k)
    e0 = delta - e_c

    def rms(k_: float) -> float:
        return float(np.sqrt(np.mean((e0 - k_ * raw) ** 2)))

    naive = tau**2 / (tau**2 + v)
    assert rms(k) < min(rms(0.0), rms(naive), rms(1.0))
    assert rms(k) < 0.75 * rms(0.0)
    assert float(adj.sigma_table_m[1, 0]) == pytest.approx(rms(0.0), rel=0.03)
    assert float(adj.sigma_m[1, 0]) == pytest.approx(rms(k), rel=0.03)


# ------------------------------------------------------------------- on the synthetic study


@pytest.fixture(scope="module")
def glacier_store(tiny_dem_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("pen_glacier") / "cube.zarr"
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ingest(tiny_dem_study, store)
        penetration_table(store, CorrectionsConfig(penetration="xband_glacier"))
    return store


def _glacier_errors(store: Path, study: Path) -> dict[str, np.ndarray]:
    """Per glacier (clean ice), the mean of what dh carries from the reference and the
    penetration correction: true C - X penetration - applied penetration - SRTM-C error, with
    the table alone (e_table) and with the glacier's offset (e_adj)."""
    ds = open_cube(store)
    table = read_table(store)
    assert table.glacier_offset_m is not None
    with rasterio.open(study / "truth/penetration_m.tif") as f:
        true_pen = f.read(1).astype(np.float64)
    x, y = np.meshgrid(ds.x.values, ds.y.values)
    e_c = reference_noise_m(x, y, 2 + 101, 1.0)  # tiny_dem_study: seed 2, reference sigma 1 m
    ref, glacier = ds.ref_dem_m.values, ds.glacier_id.values
    surface, region = ds.surface.values, ds.region_id.values
    t_px = penetration.lookup(table.penetration_m, table.bin_lo_m, WIDTH, region, surface, ref)
    adj = penetration.glacier_lookup(table.glacier_offset_m, glacier, surface)
    tab = xr.open_zarr(str(store), group="penetration")
    pooled = tab.penetration_pooled_m.values.astype(np.float64)
    p_px = penetration.lookup(pooled, table.bin_lo_m, WIDTH, region, surface, ref)
    names = ("e_table", "e_adj", "e_pooled", "k", "share", "sigma")
    out: dict[str, list[float]] = {k: [] for k in names}
    for g in np.unique(glacier[glacier > 0]):
        on = (glacier == g) & (surface == 1) & np.isfinite(ref)
        if on.sum() < 100:
            continue
        base = true_pen[on] - t_px[on] - e_c[on]
        out["e_table"].append(float(np.mean(base)))
        out["e_adj"].append(float(np.mean(base - adj[on])))
        out["e_pooled"].append(float(np.mean(true_pen[on] - p_px[on] - e_c[on])))
        sel = {"glacier": int(g), "surface": 1}
        out["k"].append(float(tab.glacier_penetration_weight.sel(sel)))
        out["share"].append(float(tab.glacier_penetration_x_share.sel(sel)))
        out["sigma"].append(float(tab.glacier_penetration_sigma_m.sel(sel)))
    return {k: np.asarray(v) for k, v in out.items()}


def test_adjustment_reduces_the_glacier_error_against_truth(
    glacier_store: Path, tiny_dem_study: Path
) -> None:
    """Glaciers SRTM-X covers (share >= 0.5) lose about half their reference + penetration
    error (rms e_adj < 0.8 rms e_table); the others take exactly the mean of their region's
    table drawn toward the pooled one (penetration_pooled_m; region pooling is on by default);
    the stated sigma is of the right size (rms of e_adj / sigma in [0.5, 2])."""
    e = _glacier_errors(glacier_store, tiny_dem_study)
    used = e["k"] > 0
    assert used.sum() >= 5 and (~used).sum() >= 2
    assert np.all(e["share"][used] >= 0.5) and np.all(e["k"][e["share"] < 0.5] == 0)
    np.testing.assert_allclose(e["e_adj"][~used], e["e_pooled"][~used], atol=1e-5)
    rms_table = np.sqrt(np.mean(e["e_table"][used] ** 2))
    rms_adj = np.sqrt(np.mean(e["e_adj"][used] ** 2))
    assert rms_adj < 0.8 * rms_table, (rms_adj, rms_table)
    z = np.sqrt(np.mean((e["e_adj"][used] / e["sigma"][used]) ** 2))
    assert 0.5 < z < 2.0, z
    assert np.all(e["sigma"][used] < 1.0)


def test_corrected_dh_carries_the_glacier_offsets(glacier_store: Path) -> None:
    """One DEM scene corrected with the refined table and with the table alone: on pixels valid
    in both, dh differs by exactly minus the glacier's offset (the offset is applied before the
    datum, ramp and outlier steps, which use stable ground and per-bin spreads only)."""
    ds = open_cube(glacier_store)
    table = read_table(glacier_store)
    assert table.glacier_offset_m is not None and np.any(table.glacier_offset_m != 0)
    plain = dataclasses.replace(table, glacier_offset_m=None)
    assert table_digest(plain) != table_digest(table)
    scene = SceneInputs(str(ds.scene.values[0]), 0, "dem", int(ds.scene_month.values[0]))
    cfg = CorrectionsConfig(penetration="xband_glacier")
    with quiet():
        a = scene_graph(ds, scene, cfg, table).compute()
        b = scene_graph(ds, scene, cfg, plain).compute()
    dh_a, dh_b = a.dh_m.values[0], b.dh_m.values[0]
    both = np.isfinite(dh_a) & np.isfinite(dh_b)
    offsets = penetration.glacier_lookup(
        table.glacier_offset_m, ds.glacier_id.values, ds.surface.values
    )
    np.testing.assert_allclose(dh_a[both], dh_b[both] - offsets[both], atol=2e-4)
    assert np.abs(offsets[both]).max() > 0.05
    # stable ground (datum, ramp) is the same
    np.testing.assert_allclose(a.datum_offset_m.values, b.datum_offset_m.values, atol=1e-6)
