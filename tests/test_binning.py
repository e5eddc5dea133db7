"""Binned statistics and hypsometry: kernels and map-reduce against a slow pure-Python oracle,
laziness, graph size, the `bin` step on a DEM-kind cube, and the synthetic truth."""

from __future__ import annotations

import math
import shutil
from collections import defaultdict
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbcube.binning import (
    STABLE_HIST_HALF_RANGE_M,
    STABLE_HIST_WIDTH_M,
    BinAxis,
    BinningError,
    bin_axis,
    bin_cube,
    binned_statistics,
    hypsometry,
    hypsometry_tile,
    merge_partials,
    nmad_from_histogram,
    stats_tile,
)
from mbcube.cluster import quiet
from mbcube.config import MassBalanceConfig
from mbcube.corrections.step import correct_cube
from mbcube.errors import MbcubeWarning, StoreError
from mbcube.ingest import ingest
from mbcube.massbalance import filled_profile
from mbcube.store import (
    invalidate,
    open_cube,
    record_step,
    scene_index,
    step_records,
    write_scene_region,
)
from mbcube.synth import generate_study
from mbcube.voids import fill_voids, void_filled
from tests.conftest import raise_if_dask_computes

# ------------------------------------------------------------------ the oracle (slow, obvious)


def oracle_stats(gid, surf, ref, dh, stable, axis: BinAxis, n_glaciers: int):
    """Pixel by pixel in plain Python: dict (g, bin index, surface) -> [n, sum, sumsq], stable."""
    cells: dict[tuple[int, int, int], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    stable_vals = []
    for g, s, z, v, sb in zip(
        gid.ravel().tolist(),
        surf.ravel().tolist(),
        ref.ravel().tolist(),
        dh.ravel().tolist(),
        stable.ravel().tolist(),
        strict=True,
    ):
        if not math.isfinite(v):
            continue
        if sb == 1:
            stable_vals.append(v)
        if not (1 <= g <= n_glaciers) or s not in (1, 2) or not math.isfinite(z):
            continue
        b = math.floor(z / axis.bin_width_m) - axis.first_bin
        if not 0 <= b < axis.n_bins:
            continue
        cell = cells[(g, b, s)]
        cell[0] += 1
        cell[1] += v
        cell[2] += v * v
    return cells, stable_vals


def oracle_blocks(dh, stable, block_px: int, chunks: tuple[int, int] | None = None):
    """Stable-ground blocks in plain Python: the block_px squares of each tile (tiles of
    `chunks`, default one tile) counted from its first row and column, kept when at least half
    their pixels are valid stable ground: (count, [sum m, sum m^2, sum 1/n, sum n], means)."""
    ny, nx = dh.shape
    ty, tx = chunks or (ny, nx)
    means, inv, px = [], 0.0, 0
    if block_px >= 2:
        for r0 in range(0, ny, ty):
            for c0 in range(0, nx, tx):
                h, w = min(ty, ny - r0), min(tx, nx - c0)
                for bi in range(h // block_px):
                    for bj in range(w // block_px):
                        vals = [
                            float(dh[r0 + bi * block_px + a, c0 + bj * block_px + b])
                            for a in range(block_px)
                            for b in range(block_px)
                            if stable[r0 + bi * block_px + a, c0 + bj * block_px + b] == 1
                            and math.isfinite(dh[r0 + bi * block_px + a, c0 + bj * block_px + b])
                        ]
                        if 2 * len(vals) >= block_px * block_px:
                            means.append(sum(vals) / len(vals))
                            inv += 1.0 / len(vals)
                            px += len(vals)
    sums = [sum(means), sum(m * m for m in means), inv, float(px)]
    return len(means), sums, means


def dense_oracle(cells, axis: BinAxis, n_glaciers: int):
    out = np.zeros((3, n_glaciers, axis.n_bins, 2))
    for (g, b, s), (n, s1, s2) in cells.items():
        out[:, g - 1, b, s - 1] = (n, s1, s2)
    return out


def nmad(values) -> float:
    values = np.asarray(values)
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


# ------------------------------------------------------------------ random pixels


@st.composite
def pixels(draw):
    ny = draw(st.integers(1, 14))
    nx = draw(st.integers(1, 14))
    n_glaciers = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    size = (ny, nx)
    gid = rng.integers(-2, n_glaciers + 3, size=size).astype(np.int32)  # incl. 0 and out of range
    surf = rng.integers(-1, 4, size=size).astype(np.int8)  # incl. 0 and values not 1|2
    ref = rng.uniform(-120.0, 480.0, size=size).astype(np.float32)
    ref[rng.random(size) < 0.15] = np.nan
    dh = rng.normal(0.0, 30.0, size=size).astype(np.float32)
    dh[rng.random(size) < 0.2] = np.nan
    stable = (rng.random(size) < 0.8).astype(np.uint8)
    width = draw(st.sampled_from([25.0, 50.0, 100.0]))
    lo = draw(st.floats(-150.0, 100.0))  # axis may cut off some pixels: they must be ignored
    hi = draw(st.floats(200.0, 520.0))
    axis = bin_axis(lo, hi, width)
    return gid, surf, ref, dh, stable, axis, n_glaciers


def dense_from_partial(part, n_glaciers):
    out = np.zeros((len(part.per_glacier), n_glaciers, *part.per_glacier[0].shape[1:]))
    for k, arr in enumerate(part.per_glacier):
        out[k, part.glacier - 1] = arr
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixels(), st.integers(0, 5))
def test_stats_kernel_matches_oracle_bin_by_bin(case, block_px):
    gid, surf, ref, dh, stable, axis, n_glaciers = case
    part = stats_tile(gid, surf, ref, dh, stable, axis, n_glaciers, block_px)
    cells, stable_vals = oracle_stats(gid, surf, ref, dh, stable, axis, n_glaciers)
    np.testing.assert_allclose(
        dense_from_partial(part, n_glaciers),
        dense_oracle(cells, axis, n_glaciers),
        rtol=1e-12,
        atol=1e-9,
    )
    assert part.per_glacier[0].dtype == np.int64
    assert sorted(part.glacier.tolist()) == sorted({g for g, _, _ in cells})
    st_n, st_sums, hist, blk_n, blk_sums, blk_hist = part.totals
    assert st_n[0] == len(stable_vals) == hist.sum()
    assert st_sums[0] == pytest.approx(sum(stable_vals), abs=1e-9)
    assert st_sums[1] == pytest.approx(sum(v * v for v in stable_vals), abs=1e-7)
    n_blocks, sums, means = oracle_blocks(dh, stable, block_px)
    assert blk_n[0] == n_blocks == blk_hist.sum()
    np.testing.assert_allclose(blk_sums, sums, rtol=1e-12, atol=1e-9)
    lo = -STABLE_HIST_HALF_RANGE_M
    slots = np.clip(np.floor((np.array(means) - lo) / STABLE_HIST_WIDTH_M), 0, blk_hist.size - 1)
    np.testing.assert_array_equal(blk_hist, np.bincount(slots.astype(int), minlength=blk_hist.size))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixels(), st.integers(1, 6), st.integers(1, 6), st.integers(2, 4), st.integers(0, 3))
def test_map_reduce_over_tiles_matches_oracle(case, ty, tx, split_every, block_px):
    """Any tiling and tree fan-in gives the oracle's numbers (a merge bug would shift rows)."""
    gid, surf, ref, dh, stable, axis, n_glaciers = case
    chunks = (ty, tx)
    static = xr.Dataset(
        {
            "glacier_id": (("y", "x"), da.from_array(gid, chunks=chunks)),
            "surface": (("y", "x"), da.from_array(surf, chunks=chunks)),
            "ref_dem_m": (("y", "x"), da.from_array(ref, chunks=chunks)),
            "stable": (("y", "x"), da.from_array(stable, chunks=chunks)),
        }
    )
    dh_da = xr.DataArray(da.from_array(dh, chunks=chunks), dims=("y", "x"))
    out = binned_statistics(
        dh_da,
        static,
        axis=axis,
        n_glaciers=n_glaciers,
        split_every=split_every,
        block_px=block_px,
    ).compute(scheduler="sync")
    cells, stable_vals = oracle_stats(gid, surf, ref, dh, stable, axis, n_glaciers)
    expect = dense_oracle(cells, axis, n_glaciers)
    np.testing.assert_array_equal(out["count"].values, expect[0])
    np.testing.assert_allclose(out["sum_dh_m"].values, expect[1], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out["sumsq_dh_m2"].values, expect[2], rtol=1e-12, atol=1e-7)
    np.testing.assert_array_equal(out["bin"].values, axis.lower_edges_m)
    assert int(out["stable_count"]) == len(stable_vals)
    assert float(out["stable_sum_dh_m"]) == pytest.approx(sum(stable_vals), abs=1e-9)
    n_blocks, sums, means = oracle_blocks(dh, stable, block_px, chunks)
    assert int(out["stable_block_count"]) == n_blocks == int(out["stable_block_hist"].sum())
    got = [
        float(out[k])
        for k in (
            "stable_block_sum_dh_m",
            "stable_block_sumsq_dh_m2",
            "stable_block_inv_px_sum",
            "stable_block_px_sum",
        )
    ]
    np.testing.assert_allclose(got, sums, rtol=1e-12, atol=1e-9)
    # the merged histogram of block means is the oracle's (NMAD by the same rule)
    lo = -STABLE_HIST_HALF_RANGE_M
    n_hist = out.sizes["stable_dh_bin"]
    slots = np.clip(np.floor((np.array(means) - lo) / STABLE_HIST_WIDTH_M), 0, n_hist - 1)
    hist = np.bincount(slots.astype(int), minlength=n_hist)
    np.testing.assert_array_equal(out["stable_block_hist"].values, hist)
    np.testing.assert_equal(float(out["stable_block_nmad_dh_m"]), nmad_from_histogram(hist)[1])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pixels(), st.booleans(), st.integers(0, 2**31))
def test_hypsometry_kernel_matches_oracle(case, with_x, seed):
    """Bin by bin against the oracle: pixels binned by ref_dem_m, voids by ref_dem_x_m where it
    has a value (void_binned_px), the rest void_px."""
    gid, surf, ref, _, _, axis, n_glaciers = case
    rng = np.random.default_rng(seed)
    # SRTM-X: C plus a few m where C has a value, its own values (and voids) in C's voids
    ref_x = (ref + rng.uniform(-3.0, 3.0, ref.shape)).astype(np.float32)
    in_void = ~np.isfinite(ref)
    ref_x[in_void] = rng.uniform(-120.0, 480.0, int(in_void.sum()))
    ref_x[rng.random(ref.shape) < 0.3] = np.nan
    half = gid.shape[0] // 2
    parts = [slice(None, half), slice(half, None)]
    part = merge_partials(
        *(
            hypsometry_tile(gid[p], surf[p], ref[p], axis, n_glaciers, ref_x[p] if with_x else None)
            for p in parts
        )
    )
    n_px = np.zeros((n_glaciers, axis.n_bins, 2), np.int64)
    void = np.zeros(n_glaciers, np.int64)
    outside = np.zeros(n_glaciers, np.int64)
    void_binned = np.zeros(n_glaciers, np.int64)
    for g, s, z, zx in zip(
        gid.ravel().tolist(),
        surf.ravel().tolist(),
        ref.ravel().tolist(),
        ref_x.ravel().tolist(),
        strict=True,
    ):
        if not (1 <= g <= n_glaciers) or s not in (1, 2):
            continue
        if not math.isfinite(z):
            if not (with_x and math.isfinite(zx)):
                void[g - 1] += 1
                continue
            void_binned[g - 1] += 1
            z = zx
        b = math.floor(z / axis.bin_width_m) - axis.first_bin
        if 0 <= b < axis.n_bins:
            n_px[g - 1, b, s - 1] += 1
        else:
            outside[g - 1] += 1
    got = [np.zeros_like(n_px), *(np.zeros_like(void) for _ in range(3))]
    for out, arr in zip(got, part.per_glacier, strict=True):
        out[part.glacier - 1] = arr
    np.testing.assert_array_equal(got[0], n_px)
    np.testing.assert_array_equal(got[1], void)
    np.testing.assert_array_equal(got[2], outside)
    np.testing.assert_array_equal(got[3], void_binned)
    if not with_x:
        assert not void_binned.any()


def test_bin_axis_edges():
    axis = bin_axis(4012.3, 4100.0, 50.0)
    assert (axis.first_bin, axis.n_bins) == (80, 3)  # 4000, 4050, 4100 (max on an edge)
    np.testing.assert_array_equal(axis.lower_edges_m, [4000.0, 4050.0, 4100.0])
    assert bin_axis(-60.0, -0.5, 50.0).lower_edges_m.tolist() == [-100.0, -50.0]
    with pytest.raises(ValueError, match="not finite"):
        bin_axis(np.inf, -np.inf)


@pytest.mark.parametrize("sigma", [0.3, 1.5, 6.0])
def test_nmad_from_histogram_matches_numpy(sigma):
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.normal(0.4, sigma, 20000), rng.normal(0, 200, 50)])  # tails
    dh = values.astype(np.float32).reshape(50, -1)
    part = stats_tile(
        np.zeros(dh.shape, np.int32),
        np.zeros(dh.shape, np.int8),
        np.zeros(dh.shape, np.float32),
        dh,
        np.ones(dh.shape, np.uint8),
        bin_axis(0, 1),
        1,
    )
    median, spread = nmad_from_histogram(part.totals[2])
    assert median == pytest.approx(float(np.median(dh)), abs=STABLE_HIST_WIDTH_M)
    assert spread == pytest.approx(nmad(dh), abs=1.5 * STABLE_HIST_WIDTH_M)
    assert nmad_from_histogram(np.zeros(10)) != nmad_from_histogram(np.zeros(10))  # nan


def _static(n: int, tile: int, n_glaciers: int = 40) -> tuple[xr.Dataset, xr.DataArray]:
    rng = np.random.default_rng(0)
    gid = da.from_array(rng.integers(0, n_glaciers + 1, (n, n)).astype(np.int32), chunks=tile)
    static = xr.Dataset(
        {
            "glacier_id": (("y", "x"), gid),
            "surface": (("y", "x"), da.where(gid > 0, 1, 0).astype(np.int8)),
            "ref_dem_m": (("y", "x"), da.random.uniform(3000, 5000, (n, n), chunks=tile)),
            "stable": (("y", "x"), (gid == 0).astype(np.uint8)),
        },
        coords={"x": np.arange(n) * 30.0, "y": -np.arange(n) * 30.0},
    )
    dh = xr.DataArray(
        da.random.normal(0, 1, (2, n, n), chunks=(1, tile, tile)), dims=("scene", "y", "x")
    )
    return static, dh


def test_graph_building_computes_nothing_and_grows_with_tiles_only():
    axis = bin_axis(3000, 5000, 50.0)
    sizes = {}
    for n_tiles_side in (4, 8):
        static, dh = _static(64 * n_tiles_side, 64)
        with raise_if_dask_computes():
            stats = binned_statistics(dh, static, axis=axis, n_glaciers=40)
            hyps = hypsometry(static, axis=axis, n_glaciers=40)
        graph = dict(stats["count"].isel(scene=0).data.__dask_graph__())
        own = [k for k in graph if "stats_tile" in str(k) or "-merge" in str(k)]
        sizes[n_tiles_side**2] = len(own)
        assert hyps["n_px"].shape == (40, axis.n_bins, 2)
        assert stats["count"].dims == ("scene", "glacier", "bin", "surface")
    # 2 scenes x (tiles + tree merges, split_every 8): 16 -> 16 + 2 + 1, 64 -> 64 + 8 + 1
    assert sizes == {16: 2 * 19, 64: 2 * 73}


def test_flox_engine_agrees_with_numba():
    static, dh = _static(64, 32, n_glaciers=7)
    axis = bin_axis(3000, 5000, 100.0)
    a = binned_statistics(dh, static, axis=axis, n_glaciers=7).compute()
    b = binned_statistics(dh, static, axis=axis, n_glaciers=7, engine="flox").compute()
    np.testing.assert_array_equal(a["count"].values, b["count"].values)
    np.testing.assert_allclose(a["sum_dh_m"].values, b["sum_dh_m"].values, atol=1e-9)
    np.testing.assert_allclose(a["stable_sumsq_dh_m2"].values, b["stable_sumsq_dh_m2"].values)
    assert a["count"].values.sum() == 2 * (static["glacier_id"].values > 0).sum()  # 2 scenes


def test_bad_arguments_raise_named_errors():
    static, dh = _static(64, 32, n_glaciers=3)
    axis = bin_axis(0, 1)
    with pytest.raises(ValueError, match="dims"):
        binned_statistics(dh.rename(x="lon"), static, axis=axis, n_glaciers=3)
    with pytest.raises(ValueError, match="n_glaciers"):
        binned_statistics(dh, static, axis=axis, n_glaciers=0)
    with pytest.raises(ValueError, match="split_every"):
        binned_statistics(dh, static, axis=axis, n_glaciers=3, split_every=1)
    with pytest.raises(StoreError, match="stable"):
        binned_statistics(dh, static.drop_vars("stable"), axis=axis, n_glaciers=3)


def test_kernel_failure_names_scene_and_tile():
    static, dh = _static(64, 32, n_glaciers=3)
    static["ref_dem_m"] = static["ref_dem_m"].astype(np.complex64)  # numba cannot type this
    stats = binned_statistics(
        dh.assign_coords(scene=["A", "B"]), static, axis=bin_axis(0, 1), n_glaciers=3
    )
    with pytest.raises(BinningError, match=r"scene A, tile \(\d, \d\)"):
        stats["count"].isel(scene=0).compute(scheduler="sync")


# ------------------------------------------------------------------ the step on a DEM-kind cube


@pytest.fixture(scope="module")
def dem_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DEM-kind study whose scenes.csv lists its first 2 of 3 scenes (all 3 rows are kept
    in scenes_all.csv, for the test that appends a scene)."""
    study = generate_study(
        tmp_path_factory.mktemp("bin_study") / "study", "tiny", kind="dem", seed=2
    )
    rows = (study / "scenes.csv").read_text().splitlines(keepends=True)
    (study / "scenes_all.csv").write_text("".join(rows))
    (study / "scenes.csv").write_text("".join(rows[:3]))
    return study


def _add_dh(store: Path) -> None:
    """dh_m = dem_m - ref_dem_m and a 'correct' record for scenes that lack one, as the
    corrections step would leave them."""
    cube = open_cube(store)
    done = step_records(store, "correct")
    for scene_id, i in scene_index(store).items():
        if scene_id in done:
            continue
        dh = (cube["dem_m"].sel(scene=[scene_id]) - cube["ref_dem_m"]).astype(np.float32)
        ds = xr.Dataset({"dh_m": dh.transpose("scene", "y", "x")})
        dask.compute(write_scene_region(store, ds, i, compute=False))
        record_step(store, "correct", scene_id, {"test": "dh = dem - ref"})


@pytest.fixture(scope="module")
def raw_dem_cube(dem_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dem_study (2 scenes) ingested. Read-only: copy before writing."""
    store = tmp_path_factory.mktemp("bin_raw") / "cube.zarr"
    ingest(dem_study, store)
    return store


@pytest.fixture(scope="module")
def dem_cube(raw_dem_cube: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raw_dem_cube with dh_m = dem_m - ref_dem_m. Read-only: copy before writing."""
    store = Path(shutil.copytree(raw_dem_cube, tmp_path_factory.mktemp("bin_cube") / "cube.zarr"))
    _add_dh(store)
    return store


def _copy(store: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(store, tmp_path / "cube.zarr"))


def _pandas_stats(cube: xr.Dataset, scene_id: str, width: float) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "glacier": cube["glacier_id"].values.ravel(),
            "surface": cube["surface"].values.ravel(),
            "z": cube["ref_dem_m"].values.ravel().astype(np.float64),
            "dh": cube["dh_m"].sel(scene=scene_id).values.ravel().astype(np.float64),
        }
    )
    frame = frame[(frame.glacier > 0) & np.isfinite(frame.z) & np.isfinite(frame.dh)]
    frame["bin"] = np.floor(frame.z / width) * width
    frame["dh2"] = frame.dh**2
    return frame.groupby(["glacier", "bin", "surface"]).agg(
        count=("dh", "size"), sum_dh_m=("dh", "sum"), sumsq_dh_m2=("dh2", "sum")
    )


def test_bin_cube_matches_pandas_and_truth(dem_cube, dem_study, tmp_path):
    store = _copy(dem_cube, tmp_path)
    with quiet():
        done = bin_cube(store)
        assert bin_cube(store) == []  # up to date
    cube = open_cube(store)
    assert done == [str(s) for s in cube["scene"].values]
    stats = xr.open_zarr(store, group="stats").load()
    hyps = xr.open_zarr(store, group="hypsometry").load()
    assert stats["binned"].values.tolist() == [1, 1]
    assert stats["count"].dtype == np.int64 and stats["sum_dh_m"].dtype == np.float64
    # every cell, against pandas
    for scene_id in done:
        expect = _pandas_stats(cube, scene_id, 50.0)
        got = stats.sel(scene=scene_id)[["count", "sum_dh_m", "sumsq_dh_m2"]].to_dataframe()
        got = got[got["count"] > 0].drop(columns="scene", errors="ignore")
        got.index = got.index.set_levels(got.index.levels[2].astype(np.int64), level=2)
        expect = expect.reindex(got.index.union(expect.index))
        got = got.reindex(expect.index)
        np.testing.assert_array_equal(got["count"].values, expect["count"].values)
        np.testing.assert_allclose(got["sum_dh_m"].values, expect["sum_dh_m"].values, rtol=1e-9)
        np.testing.assert_allclose(
            got["sumsq_dh_m2"].values, expect["sumsq_dh_m2"].values, rtol=1e-9
        )
    # hypsometry: every glacier pixel counted exactly once (binned or void)
    gid = cube["glacier_id"].values
    per_glacier = np.bincount(gid.ravel(), minlength=gid.max() + 1)[1:]
    total = hyps["n_px"].sum(["bin", "surface"]).values + hyps["void_px"].values
    np.testing.assert_array_equal(total, per_glacier)
    np.testing.assert_allclose(hyps["area_m2"].values, hyps["n_px"].values * 900.0)
    assert (
        hyps["bin"].values[0]
        == np.floor(np.nanmin(np.where(gid > 0, cube["ref_dem_m"].values, np.nan)) / 50) * 50
    )
    np.testing.assert_array_equal(stats["bin"].values, hyps["bin"].values)
    # synthetic truth: glacier areas (outline rasterization vs the generator's own mask)
    truth = pd.read_csv(dem_study / "truth" / "glaciers.csv")
    area_km2 = (hyps["area_m2"].sum(["bin", "surface"]) + hyps["void_area_m2"]).values / 1e6
    big = truth["area_km2"].to_numpy() > 0.5
    np.testing.assert_allclose(area_km2[big], truth["area_km2"].to_numpy()[big], rtol=0.05)
    # stable ground: exact sums and a robust spread matching numpy's
    for scene_id in done:
        dh = cube["dh_m"].sel(scene=scene_id).values.astype(np.float64)
        on = (cube["stable"].values == 1) & np.isfinite(dh)
        s = stats.sel(scene=scene_id)
        assert int(s["stable_count"]) == on.sum() > 10000
        assert float(s["stable_sum_dh_m"]) == pytest.approx(dh[on].sum(), rel=1e-9)
        assert float(s["stable_sumsq_dh_m2"]) == pytest.approx((dh[on] ** 2).sum(), rel=1e-9)
        assert float(s["stable_median_dh_m"]) == pytest.approx(np.median(dh[on]), abs=0.02)
        assert float(s["stable_nmad_dh_m"]) == pytest.approx(nmad(dh[on]), abs=0.03)
        # stable-ground blocks of round(500 m / 30 m) = 17 px inside each 128 px tile
        side = zarr.open_group(str(store), path="stats").attrs["stable_block_side_px"]
        assert side == 17
        tile = cube["dh_m"].data.chunksize[-1]
        n_blocks, sums, means = oracle_blocks(dh, cube["stable"].values, side, (tile, tile))
        assert int(s["stable_block_count"]) == n_blocks > 100
        got = [
            float(s[k])
            for k in (
                "stable_block_sum_dh_m",
                "stable_block_sumsq_dh_m2",
                "stable_block_inv_px_sum",
                "stable_block_px_sum",
            )
        ]
        np.testing.assert_allclose(got, sums, rtol=1e-9)
        lo, width = -STABLE_HIST_HALF_RANGE_M, STABLE_HIST_WIDTH_M
        n_hist = stats.sizes["stable_dh_bin"]
        slots = np.clip(np.floor((np.array(means) - lo) / width), 0, n_hist - 1).astype(int)
        hist = np.bincount(slots, minlength=n_hist)
        np.testing.assert_array_equal(s["stable_block_hist"].values, hist)
        assert float(s["stable_block_nmad_dh_m"]) == nmad_from_histogram(hist)[1]
        # (numpy's NMAD of the same means differs by the histogram's bins and median rule)
        assert float(s["stable_block_nmad_dh_m"]) == pytest.approx(nmad(means), abs=0.05)


def _void_layers(cube: xr.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(glacier_id, surface as int64, ref_dem_m, ref_dem_x_m as float64) of a cube, in memory."""
    return (
        cube["glacier_id"].values.astype(np.int64),
        cube["surface"].values.astype(np.int64),
        cube["ref_dem_m"].values.astype(np.float64),
        cube["ref_dem_x_m"].values.astype(np.float64),
    )


def _expected_n_px(
    hyps: xr.Dataset, gid: np.ndarray, surf: np.ndarray, z: np.ndarray, keep: np.ndarray
) -> np.ndarray:
    """numpy's count of (glacier, floor(z / 50), surface) over the pixels `keep`."""
    n, first = hyps.sizes["glacier"], int(hyps.attrs["first_bin"])
    b = np.floor(z[keep] / 50.0).astype(np.int64) - first
    expect = np.zeros((n, hyps.sizes["bin"], 2), np.int64)
    np.add.at(expect, (gid[keep] - 1, b, surf[keep] - 1), 1)
    return expect


def _means_of_true_rate(
    hyps: xr.Dataset,
    gid: np.ndarray,
    surf: np.ndarray,
    on: np.ndarray,
    seen_z: np.ndarray,
    seen: np.ndarray,
    rate: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(new, old, truth) per glacier: the true rate per (glacier, bin, surface) over the pixels
    `seen` (binned by seen_z; cells holding none filled along elevation, as
    `mbcube.massbalance.balance` does) weighted by the hypsometry (new), or by those pixels only,
    every other pixel at the glacier's mean (old); truth: the mean over all glacier pixels."""
    n, first = hyps.sizes["glacier"], int(hyps.attrs["first_bin"])
    bs = np.floor(seen_z[seen] / 50.0).astype(np.int64) - first
    cell_n = np.zeros((n, hyps.sizes["bin"], 2))
    cell_sum = np.zeros_like(cell_n)
    np.add.at(cell_n, (gid[seen] - 1, bs, surf[seen] - 1), 1.0)
    np.add.at(cell_sum, (gid[seen] - 1, bs, surf[seen] - 1), rate[seen])
    cell_rate, _ = filled_profile(cell_sum, cell_n, hyps["bin"].values + 25.0, 1)
    area = hyps["n_px"].values.astype(float)
    new = np.nansum(area * cell_rate, axis=(1, 2)) / np.maximum(area.sum(axis=(1, 2)), 1)
    old = np.nansum(cell_n * cell_rate, axis=(1, 2)) / np.maximum(cell_n.sum(axis=(1, 2)), 1)
    truth = np.bincount(gid[on], weights=rate[on], minlength=n + 1)[1:] / np.maximum(
        np.bincount(gid[on], minlength=n + 1)[1:], 1
    )
    return new, old, truth


def test_voids_binned_by_srtm_x_take_their_bins_rate(dem_cube, dem_study, tmp_path):
    """Without interpolation (void_fill_distance_m 0), glacier pixels void in SRTM-C are binned
    by SRTM-X where it has a value (bin by bin as numpy does it), the rest stay void_px; and with each bin's true rate, the hypsometric mean
    of a void glacier is then closer to its true mean than with the void at the glacier's mean
    (the old rule, which the void_binned_px pixels let us rebuild)."""
    import rasterio

    store = _copy(dem_cube, tmp_path)
    with quiet():
        bin_cube(store, MassBalanceConfig(void_fill_distance_m=0.0))
    cube = open_cube(store)
    hyps = xr.open_zarr(store, group="hypsometry").load()
    assert hyps.attrs["void_elevation"] == "ref_dem_x_m"
    gid, surf, ref, ref_x = _void_layers(cube)
    on = (gid > 0) & (surf > 0)
    z = np.where(np.isfinite(ref), ref, ref_x)
    binned_x = on & ~np.isfinite(ref) & np.isfinite(ref_x)
    both = on & ~np.isfinite(z)
    n = hyps.sizes["glacier"]
    assert binned_x.sum() >= 50 and both.sum() >= 1  # the study has both kinds of void
    np.testing.assert_array_equal(
        hyps["void_binned_px"].values, np.bincount(gid[binned_x], minlength=n + 1)[1:]
    )
    np.testing.assert_array_equal(
        hyps["void_px"].values, np.bincount(gid[both], minlength=n + 1)[1:]
    )
    # bin by bin: numpy's count of (glacier, floor(z / 50), surface)
    keep = on & np.isfinite(z)
    b = np.floor(z[keep] / 50.0).astype(np.int64) - int(hyps.attrs["first_bin"])
    assert b.min() == 0 and b.max() == hyps.sizes["bin"] - 1  # the axis spans X's voids too
    np.testing.assert_array_equal(hyps["n_px"].values, _expected_n_px(hyps, gid, surf, z, keep))
    # the true rate over pixels with SRTM-C (what scenes measure): X voids in the hypsometry vs
    # every void at the glacier's mean
    with rasterio.open(dem_study / "truth" / "dhdt_m_yr.tif") as f:
        rate = f.read(1).astype(np.float64)
    seen = on & np.isfinite(ref)
    new, old, truth = _means_of_true_rate(hyps, gid, surf, on, ref, seen, rate)
    area = hyps["n_px"].values.astype(float)
    void_x = hyps["void_binned_px"].values.astype(float)
    void_all = void_x + hyps["void_px"].values
    share = void_x / np.maximum(area.sum(axis=(1, 2)) + hyps["void_px"].values, 1)
    voided = share > 0.1
    assert voided.sum() >= 1, share
    new_err = np.abs(new - truth)[voided]
    old_err = np.abs(old - truth)[voided]
    assert np.all(new_err < 0.7 * old_err), (new_err, old_err)  # 0.021 vs 0.037 m/yr
    assert void_all.sum() == (on & ~np.isfinite(ref)).sum()


def test_voids_void_in_both_references_are_binned_by_interpolation(dem_cube, dem_study, tmp_path):
    """With the default void_fill_distance_m, glacier pixels void in SRTM-C AND SRTM-X get an
    elevation interpolated from the reference around the void (`mbcube.voids`, tile by tile as
    numpy does it on the whole grid): they enter the hypsometry (void_binned_px) instead of
    void_px, and the voided glaciers' hypsometric means of the true rate come closer to the
    truth than with those pixels at the glacier's mean."""
    import rasterio

    store = _copy(dem_cube, tmp_path)
    with quiet():
        bin_cube(store)
    cube = open_cube(store)
    hyps = xr.open_zarr(store, group="hypsometry").load()
    fill_px = round(MassBalanceConfig().void_fill_distance_m / float(cube["x"][1] - cube["x"][0]))
    assert hyps.attrs["void_elevation"] == f"ref_dem_x_m, then interpolated within {fill_px} px"
    gid, surf, ref, ref_x = _void_layers(cube)
    on = (gid > 0) & (surf > 0)
    known = np.where(np.isfinite(ref), ref, ref_x)
    both = on & ~np.isfinite(known)
    assert both.sum() >= 20
    # the oracle interpolates on the same tiles (a triangulation differs with its points)
    chunks = cube["ref_dem_m"].data.chunks
    filled_z = void_filled(da.from_array(known, chunks=chunks), fill_px).compute()
    z = np.where(np.isfinite(known), known, filled_z)
    whole = fill_voids(known, fill_px)  # one triangulation: the same bins for almost all
    same = np.floor(whole[both] / 50.0) == np.floor(z[both] / 50.0)
    assert same.mean() > 0.9, same.mean()
    n = hyps.sizes["glacier"]
    np.testing.assert_array_equal(
        hyps["void_px"].values, np.bincount(gid[on & ~np.isfinite(z)], minlength=n + 1)[1:]
    )
    assert hyps["void_px"].sum() < 0.2 * both.sum()  # most are filled
    # bin by bin
    keep = on & np.isfinite(z)
    np.testing.assert_array_equal(hyps["n_px"].values, _expected_n_px(hyps, gid, surf, z, keep))
    # each filled pixel at the true rate of its bin vs at the glacier's mean (the old rule)
    with rasterio.open(dem_study / "truth" / "dhdt_m_yr.tif") as f:
        rate = f.read(1).astype(np.float64)
    seen = on & np.isfinite(known)
    new, old, truth = _means_of_true_rate(hyps, gid, surf, on, known, seen, rate)
    filled = np.bincount(gid[both & np.isfinite(z)], minlength=n + 1)[1:]
    voided = filled > 0.05 * np.bincount(gid[on], minlength=n + 1)[1:]
    assert voided.sum() >= 1
    new_err = np.abs(new - truth)[voided]
    old_err = np.abs(old - truth)[voided]
    assert np.all(new_err < 0.7 * old_err), (new_err, old_err)


def test_bin_cube_recomputes_only_what_changed(dem_cube, tmp_path):
    store = _copy(dem_cube, tmp_path)
    ids = list(scene_index(store))
    with quiet():
        assert bin_cube(store, scenes=ids[:1]) == ids[:1]
        first = xr.open_zarr(store, group="stats").load()
        assert first["binned"].values.tolist() == [1, 0]
        chunk = store / "stats" / "count" / "c" / "0" / "0" / "0" / "0"
        stamp = chunk.stat().st_mtime_ns
        # the other scene only; the first one's region is not rewritten
        assert bin_cube(store) == ids[1:]
        assert chunk.stat().st_mtime_ns == stamp
        after = xr.open_zarr(store, group="stats").load()
        assert after["binned"].values.tolist() == [1, 1]
        xr.testing.assert_identical(after.isel(scene=[0]), first.isel(scene=[0]))
        assert int(after["count"].isel(scene=1).sum()) > 1000
        assert bin_cube(store) == []
        # new corrected dh for one scene: only it is redone
        record_step(store, "correct", ids[1], {"test": "again"})
        assert bin_cube(store) == [ids[1]]
        # another bin width: new hypsometry and bin axis, every scene redone
        assert bin_cube(store, MassBalanceConfig(bin_width_m=100.0)) == ids
    stats = xr.open_zarr(store, group="stats")
    hyps = xr.open_zarr(store, group="hypsometry")
    assert np.all(np.diff(stats["bin"].values) == 100.0)
    np.testing.assert_array_equal(stats["bin"].values, hyps["bin"].values)
    assert int(stats["count"].sum()) == int(after["count"].sum())  # same pixels, wider bins
    np.testing.assert_allclose(
        stats["sum_dh_m"].sum(["glacier", "bin", "surface"]),
        after["sum_dh_m"].sum(["glacier", "bin", "surface"]),
    )
    assert zarr.open_group(str(store), path="stats").attrs["bin_width_m"] == 100.0


def test_scene_appended_to_the_cube_is_binned_alone(dem_cube, dem_study, tmp_path):
    store = _copy(dem_cube, tmp_path)
    ids = list(scene_index(store))
    with quiet():
        assert bin_cube(store) == ids
        before = xr.open_zarr(store, group="stats").load()
        short = (dem_study / "scenes.csv").read_text()
        try:
            (dem_study / "scenes.csv").write_text((dem_study / "scenes_all.csv").read_text())
            ingest(dem_study, store)
        finally:
            (dem_study / "scenes.csv").write_text(short)
        _add_dh(store)
        new = [s for s in scene_index(store) if s not in ids]
        assert bin_cube(store) == new
    after = xr.open_zarr(store, group="stats").load()
    assert after["binned"].values.tolist() == [1, 1, 1]
    xr.testing.assert_identical(after.isel(scene=[0, 1]), before)


def test_bin_cube_refuses_unknown_scenes_and_missing_dh(dem_cube, tmp_path):
    store = _copy(dem_cube, tmp_path)
    with pytest.raises(StoreError, match=r"not \(completely\) ingested"):
        bin_cube(store, scenes=["nope"])
    first = next(iter(scene_index(store)))
    invalidate(store, "correct", first)
    with pytest.raises(StoreError, match=rf"\['{first}'\] have no corrected dh"):
        bin_cube(store)


def test_bin_cube_after_corrections_matches_pixels_and_truth(raw_dem_cube, dem_study, tmp_path):
    """Through the real corrections step: stats equal pandas on the stored dh_m, and the
    per-glacier mean of corrected dh over the time span recovers the true rate."""
    store = _copy(raw_dem_cube, tmp_path)
    with quiet():
        with pytest.warns(MbcubeWarning):
            corrected = correct_cube(store)
        assert bin_cube(store) == corrected
        assert bin_cube(store) == []
    cube = open_cube(store)
    stats = xr.open_zarr(store, group="stats").load()
    for scene_id in corrected:
        expect = _pandas_stats(cube, scene_id, 50.0)
        got = stats.sel(scene=scene_id)["count"].to_series()
        got = got[got > 0]
        assert got.sum() == expect["count"].sum() > 1000
        by_glacier = expect.groupby("glacier")["sum_dh_m"].sum()
        np.testing.assert_allclose(
            stats.sel(scene=scene_id)["sum_dh_m"]
            .sum(["bin", "surface"])
            .values[by_glacier.index.to_numpy() - 1],
            by_glacier.to_numpy(),
            rtol=1e-9,
        )
    truth = pd.read_csv(dem_study / "truth" / "glaciers.csv")
    years = cube["scene_years"].values
    count = stats["count"].sum(["bin", "surface"]).values  # (scene, glacier)
    mean_dh = stats["sum_dh_m"].sum(["bin", "surface"]).values / np.maximum(count, 1)
    rate = (mean_dh / years[:, None])[count > 200]
    true = np.broadcast_to(truth["dhdt_m_yr"].to_numpy(), count.shape)[count > 200]
    assert rate.size >= 5
    assert np.median(np.abs(rate - true)) < 0.15  # m/yr, plain mean (no hypsometric weighting)
