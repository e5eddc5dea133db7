"""Figures (mbcube.figures) on a tiny DEM study with results built here by a numpy oracle."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from matplotlib.collections import PathCollection

from mbcube import figures
from mbcube.ingest import ingest
from mbcube.store import open_cube, write_dataset, write_scene_region
from tests.conftest import raise_if_dask_computes

BIN_M = 50.0


@dataclass
class Results:
    """A cube with dh_m, stats, hypsometry and penetration groups, the two tables, and the
    numpy arrays they were made from (the oracle's inputs)."""

    store: Path
    tables: Path
    dh_m: np.ndarray  # (scene, y, x)
    years: np.ndarray  # (scene,)
    ref_m: np.ndarray
    gid: np.ndarray
    surface: np.ndarray
    glaciers: pd.DataFrame
    regions: pd.DataFrame


def build_results(study: Path, root: Path, *, groups: bool = True) -> Results:
    """Ingest `study`, write dh_m = dem - ref (and per-scene parameters), the stats, hypsometry
    and penetration groups (numpy sums) and glaciers.csv / regions.csv (from the truth)."""
    store, tables = root / "cube.zarr", root / "tables"
    tables.mkdir(parents=True)
    ingest(study, store)
    ds = open_cube(store)
    dem = ds["dem_m"].values.astype(np.float64)
    ref = ds["ref_dem_m"].values.astype(np.float64)
    dh = (dem - ref[None]).astype(np.float32)
    years = ds["scene_years"].values.astype(float)
    chunks = (1, *ds["dem_m"].data.chunksize[1:])
    n_scenes = dh.shape[0]
    for i in range(n_scenes):
        layer = xr.Dataset(
            {
                "dh_m": (("scene", "y", "x"), da.from_array(dh[i : i + 1], chunks=chunks)),
                "valid": (
                    ("scene", "y", "x"),
                    da.from_array(np.isfinite(dh[i : i + 1]).astype("uint8"), chunks=chunks),
                ),
                "datum_offset_m": ("scene", np.array([0.1 * (i + 1)])),
                "ramp_coef": (("scene", "coef"), np.array([[0.01 * i, -0.002, 0.003, 1e-5]])),
                "coreg_shift_m": (("scene", "axis"), np.array([[1.5 * i, -2.25]])),
                "seasonal_offset_applied_m": ("scene", np.array([-0.07 * i])),
                "unwrap_unwrapped_frac": ("scene", np.array([0.9 - 0.1 * i])),
            }
        )
        write_scene_region(store, layer, i)
    gid = ds["glacier_id"].values
    surface = ds["surface"].values
    if groups:
        _write_groups(store, ds, dh, ref, gid, surface)
    truth = pd.read_csv(study / "truth" / "glaciers.csv")
    glaciers = truth.assign(
        coverage_frac=0.8,
        dh_m=truth["dhdt_m_yr"] * 12,
        mb_sigma_mwe_yr=0.05 + 0.01 * np.arange(len(truth)),
        n_scenes=n_scenes,
        period="2011-2013",
    )
    regions = pd.read_csv(study / "truth" / "regions.csv")
    regions = regions.assign(
        mb_sigma_mwe_yr=0.041 + 0.002 * np.arange(len(regions)),
        volume_km3_yr=regions["dhdt_m_yr"] * regions["area_km2"] / 1e3,
    )
    glaciers.to_csv(tables / "glaciers.csv", index=False)
    regions.to_csv(tables / "regions.csv", index=False)
    return Results(store, tables, dh, years, ref, gid, surface, glaciers, regions)


def _write_groups(
    store: Path,
    ds: xr.Dataset,
    dh: np.ndarray,
    ref: np.ndarray,
    gid: np.ndarray,
    surface: np.ndarray,
) -> None:
    n_glaciers = int(ds.sizes["glacier"])
    on = (gid > 0) & np.isfinite(ref)
    bin_of = np.floor(ref / BIN_M) * BIN_M
    bins = np.unique(bin_of[on])
    b_idx = np.searchsorted(bins, np.where(on, bin_of, bins[0]))
    shape = (dh.shape[0], n_glaciers, bins.size, 2)
    count, total, squares = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for s in range(dh.shape[0]):
        ok = on & np.isfinite(dh[s])
        where = (s, gid[ok] - 1, b_idx[ok], surface[ok] - 1)
        np.add.at(count, where, 1)
        np.add.at(total, where, dh[s][ok])
        np.add.at(squares, where, dh[s][ok].astype(np.float64) ** 2)
    coords = {
        "scene": ds["scene"].values,
        "glacier": np.arange(1, n_glaciers + 1),
        "bin": bins,
        "surface": np.array([1, 2]),
    }
    dims = ("scene", "glacier", "bin", "surface")
    stats = xr.Dataset(
        {"count": (dims, count), "sum_dh_m": (dims, total), "sumsq_dh_m2": (dims, squares)},
        coords=coords,
    )
    write_dataset(stats, store, group="stats", mode="w")
    n_px = np.zeros(shape[1:])
    np.add.at(n_px, (gid[on] - 1, b_idx[on], surface[on] - 1), 1)
    hyps = xr.Dataset(
        {"area_m2": (dims[1:], n_px * 900.0), "n_px": (dims[1:], n_px)},
        coords={k: coords[k] for k in dims[1:]},
    )
    write_dataset(hyps, store, group="hypsometry", mode="w")
    pen = xr.Dataset(
        {
            "penetration_m": (("region", "surface", "bin"), np.full((3, 2, bins.size), 1.25)),
            "penetration_sigma_m": (("region", "surface", "bin"), np.full((3, 2, bins.size), 0.5)),
            "penetration_n_px": (("region", "surface", "bin"), np.full((3, 2, bins.size), 120)),
        },
        coords={"region": [1, 2, 3], "surface": [1, 2], "bin": bins},
    )
    write_dataset(pen, store, group="penetration", mode="w")


@pytest.fixture(scope="module")
def results(tiny_dem_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Results:
    return build_results(tiny_dem_study, tmp_path_factory.mktemp("figures"))


def oracle_rate(r: Results) -> np.ndarray:
    """Mean over scenes of dh / years per pixel, glacier pixels only (slow, obvious numpy)."""
    out = np.full(r.gid.shape, np.nan)
    for i in range(r.gid.shape[0]):
        for j in range(r.gid.shape[1]):
            values = [r.dh_m[s, i, j] / r.years[s] for s in range(len(r.years))]
            values = [v for v in values if np.isfinite(v)]
            if values and r.gid[i, j] > 0:
                out[i, j] = np.mean(values)
    return out


def _image(fig: figures.Figure, gid: str) -> np.ma.MaskedArray:
    for ax in fig.axes:
        for image in ax.get_images():
            if image.get_gid() == gid:
                return image.get_array()
    raise AssertionError(f"no image {gid}")


def test_dhdt_map_matches_oracle_block_means(results: Results) -> None:
    fig = figures.dhdt_map(results.store, max_px=80)  # 320 px -> blocks of 4
    shown = _image(fig, "dhdt")
    assert shown.shape == (80, 80)
    rate = oracle_rate(results)
    blocks = rate.reshape(80, 4, 80, 4)
    n = np.isfinite(blocks).sum(axis=(1, 3))
    with np.errstate(invalid="ignore"):
        expected = np.where(n > 0, np.nansum(blocks, axis=(1, 3)) / n, np.nan)
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), ~np.isfinite(expected))
    np.testing.assert_allclose(shown.filled(np.nan), expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    # colours centred on 0; outlines are the boundaries of the sampled glacier_id raster
    image = next(i for i in fig.axes[0].get_images() if i.get_gid() == "dhdt")
    assert image.norm.vmin == -image.norm.vmax > -10
    sampled = results.gid[2::4, 2::4]
    edges = figures.label_boundaries(sampled) & (sampled > 0)
    outline = _image(fig, "outlines")
    assert int((~np.ma.getmaskarray(outline)).sum()) == int(edges.sum()) > 50
    assert any("m/yr" in ax.get_ylabel() for ax in fig.axes)  # the colour bar's label


def test_coarsening_is_lazy_and_matches_numpy(results: Results) -> None:
    ds = open_cube(results.store)
    with raise_if_dask_computes():
        rate = figures.block_mean(figures.mean_rate(ds), 3)
        ids = figures.block_sample(ds["glacier_id"], 3)
    assert rate.shape == ids.shape == (106, 106)
    rates = results.dh_m / results.years[:, None, None]
    counts = np.isfinite(rates).sum(axis=0)
    pixel = np.where(counts > 0, np.nansum(rates, axis=0) / np.maximum(counts, 1), np.nan)
    blocks = pixel[:318, :318].reshape(106, 3, 106, 3)
    n = np.isfinite(blocks).sum(axis=(1, 3))
    expected = np.where(n > 0, np.nansum(blocks, axis=(1, 3)) / np.maximum(n, 1), np.nan)
    np.testing.assert_allclose(rate.values, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(ids.values, results.gid[1:318:3, 1:318:3])


def test_regions_of_a_regions_file_run_come_from_region_members(
    results: Results, tmp_path: Path
) -> None:
    """`aggregate --regions FILE` writes region_members.csv: the figures group by it."""
    tables = tmp_path / "tables"
    shutil.copytree(results.tables, tables)
    ids = results.glaciers["RGIId"].astype(str)
    halves = np.where(np.arange(len(ids)) % 2 == 0, "Even", "Odd")
    pd.DataFrame({"RGIId": ids, "region": halves}).to_csv(
        tables / "region_members.csv", index=False
    )
    inp = figures.FigureInputs(results.store, tables)
    assert set(inp.regions) == {"Even", "Odd"}
    numbers = {str(k): int(n) for n, k in inp.glaciers["glacier_key"].items()}
    assert inp.regions["Odd"] == sorted(numbers[i] for i in ids[halves == "Odd"])


def test_region_map_crops_to_its_glaciers(results: Results) -> None:
    inp = figures.FigureInputs(results.store, results.tables)
    region = results.regions["name"].iloc[0]
    members = inp.regions[region]
    expected = sorted(int(i) + 1 for i in np.flatnonzero(results.glaciers["region"] == region))
    assert members == expected
    fig = figures.dhdt_map(inp, region)
    shown = _image(fig, "dhdt")
    rows, cols = figures._region_window(inp, members, 1500)
    assert shown.shape == (rows.stop - rows.start, cols.stop - cols.start)
    assert shown.shape[0] < 320 or shown.shape[1] < 320
    window_ids = set(np.unique(results.gid[rows, cols])) - {0}
    assert set(members) <= window_ids
    assert region in fig.axes[0].get_title()


def test_mass_balance_map_points_and_bars(results: Results) -> None:
    fig = figures.mass_balance_map(results.store, results.tables)
    ax_map, ax_bars = fig.axes[0], fig.axes[2]
    points = next(c for c in ax_map.collections if c.get_gid() == "glaciers")
    assert isinstance(points, PathCollection)
    finite = results.glaciers["mb_mwe_yr"].notna()
    np.testing.assert_allclose(
        points.get_array(), results.glaciers.loc[finite, "mb_mwe_yr"].to_numpy()
    )
    assert len(points.get_offsets()) == int(finite.sum())
    sizes = points.get_sizes()
    areas = results.glaciers.loc[finite, "area_km2"].to_numpy()
    assert np.argmax(sizes) == np.argmax(areas)
    bars = [p for p in ax_bars.patches if str(p.get_gid()).startswith("regions_")]
    widths = sorted(round(p.get_width(), 9) for p in bars)
    assert widths == sorted(round(v, 9) for v in results.regions["mb_mwe_yr"])
    assert "m w.e./yr" in ax_bars.get_xlabel()


def oracle_profile(r: Results, members: list[int], surface: int) -> tuple:
    """Per 50 m bin: mean and std of dh/years over all scenes' pixels of these glaciers."""
    rates = [r.dh_m[s] / r.years[s] for s in range(len(r.years))]
    means, stds, centres = [], [], []
    bin_of = np.floor(r.ref_m / BIN_M) * BIN_M
    on = np.isin(r.gid, members) & (r.surface == surface)
    for b in np.unique(bin_of[(r.gid > 0) & np.isfinite(r.ref_m)]):
        pick = on & (bin_of == b)
        values = np.concatenate([x[pick & np.isfinite(x)] for x in rates])
        centres.append(b + BIN_M / 2)
        means.append(values.mean() if values.size >= 10 else np.nan)
        stds.append(values.std(ddof=1) if values.size >= 10 else np.nan)
    return np.array(centres), np.array(means), np.array(stds)


def test_elevation_profile_matches_pixel_oracle(results: Results) -> None:
    inp = figures.FigureInputs(results.store, results.tables)
    region = results.regions["name"].iloc[1]
    members = inp.regions[region]
    fig = figures.elevation_profile(inp, region)
    ax = fig.axes[0]
    line = next(ln for ln in ax.get_lines() if ln.get_gid() == "dhdt_1")
    centres, mean, std = oracle_profile(results, members, 1)
    np.testing.assert_allclose(line.get_xdata(), centres)
    np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-6, atol=1e-7, equal_nan=True)
    assert np.isfinite(mean).sum() >= 3
    prof = figures.region_profiles(inp, members)[1]
    np.testing.assert_allclose(prof.std_m_yr, std, rtol=1e-6, atol=1e-7, equal_nan=True)
    # hypsometry bars: pixel area (900 m2) of these glaciers' clean ice per bin, in km2
    bars = [p for p in fig.axes[1].patches if p.get_gid() == "area_1"]
    bin_of = np.floor(results.ref_m / BIN_M) * BIN_M
    pick = np.isin(results.gid, members) & (results.surface == 1)
    expected = [(pick & (bin_of == c - BIN_M / 2)).sum() * 900 / 1e6 for c in centres]
    np.testing.assert_allclose([p.get_height() for p in bars], expected)
    assert "m/yr" in ax.get_ylabel() and "km²" in fig.axes[1].get_ylabel()


def test_transect_lines_are_area_weighted_glacier_parts(results: Results) -> None:
    inp = figures.FigureInputs(results.store, results.tables)
    parts = figures.glacier_parts(inp)
    # a glacier's total is the area-weighted mean of its (gap-filled) bin rates: with every
    # bin measured it equals the pixel-count-weighted mean rate of the bins
    g = int(parts["area_km2"].idxmax())
    centres, mean, _ = oracle_profile(results, [g], 1)
    _, mean2, _ = oracle_profile(results, [g], 2)
    bin_of = np.floor(results.ref_m / BIN_M) * BIN_M
    area = np.array([((results.gid == g) & (bin_of == c - BIN_M / 2)).sum() for c in centres])
    rates = []
    for c in centres:
        pick = (results.gid == g) & (bin_of == c - BIN_M / 2)
        vals = np.concatenate(
            [(results.dh_m[s] / results.years[s])[pick] for s in range(len(results.years))]
        )
        vals = vals[np.isfinite(vals)]
        rates.append(vals.mean() if vals.size >= 10 else np.nan)
    rates_arr = np.array(rates)
    has = area > 0
    measured = np.isfinite(rates_arr)
    filled = np.interp(centres, centres[measured], rates_arr[measured])
    expected = (filled[has] * area[has]).sum() / area[has].sum()
    assert parts.loc[g, "total"] == pytest.approx(expected, rel=1e-6)
    assert np.isfinite(mean).any() or np.isfinite(mean2).any()
    fig = figures.transect(inp, n_bins=4)
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
    assert set(lines) == {"transect_accumulation", "transect_ablation", "transect_total"}
    assert all(len(ln.get_xdata()) == 4 for ln in lines.values())
    totals = lines["transect_total"].get_ydata()
    ok = parts[np.isfinite(parts["total"])]
    overall = (ok["total"] * ok["area_km2"]).sum() / ok["area_km2"].sum()
    assert np.nanmin(totals) <= overall <= np.nanmax(totals)
    assert "longitude" in ax.get_xlabel() and "m/yr" in ax.get_ylabel()


def test_make_figures_writes_pngs(results: Results, tmp_path: Path) -> None:
    paths = figures.make_figures(results.store, results.tables, tmp_path / "figures", dpi=60)
    names = {p.name for p in paths}
    n_regions = results.regions["name"].nunique()
    assert len(paths) == 2 * n_regions + 2
    assert {"mass_balance_map.png", "transect.png"} <= names
    for path in paths:
        image = mpimg.imread(path)
        # at 60 dpi: every figure is at least 5 x 3.5 inches
        assert image.shape[0] >= 3.5 * 60 and image.shape[1] >= 5 * 60, (path.name, image.shape)
        assert image[..., :3].std() > 0.05  # not blank


def test_missing_groups_and_tables_skip_figures(results: Results, tmp_path: Path) -> None:
    store = Path(shutil.copytree(results.store, tmp_path / "cube.zarr"))
    for group in ("stats", "hypsometry", "penetration"):
        shutil.rmtree(store / group)
    (tmp_path / "figures").mkdir()
    stale = tmp_path / "figures" / "profile_old_region.png"  # an earlier run's figure
    stale.write_bytes(b"")
    (tmp_path / "figures" / figures.FIGURES_RECORD).write_text('["profile_old_region.png"]')
    keep = tmp_path / "figures" / "my_own.png"
    keep.write_bytes(b"")
    mine = tmp_path / "figures" / "profile_my_own_glacier.png"  # named like a figure: not ours
    mine.write_bytes(b"")
    paths = figures.make_figures(store, tmp_path / "no_tables", tmp_path / "figures", dpi=40)
    assert not stale.exists() and keep.exists() and mine.exists()
    # no tables: regions come from the cube (region at each glacier's centroid); maps only
    assert paths and all(p.name.startswith("dhdt_map_") for p in paths)
    with pytest.raises(figures.MissingInputError):
        figures.elevation_profile(store)
