"""The fused numba kernels of the corrections step (mbcube.corrections.kernels) against the numpy
functions they replace in the step (coregister, masks, ramp, robust, penetration, outliers):
bitwise equal where the arithmetic is elementwise, equal to float rounding where sums are taken
in another order. Random tiles with NaN, voids, masks, several glaciers, regions and bins."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as stn

from mbcube.corrections import coregister, kernels, outliers, penetration, ramp, robust
from mbcube.corrections.bins import bin_index, n_bins
from mbcube.corrections.masks import validity

HALO = 8
RES = 30.0


def _tile(seed: int, ny: int, nx: int) -> dict[str, np.ndarray]:
    """A random tile with its haloed DEM and reference, masks and labels."""
    rng = np.random.default_rng(seed)
    shape_h = (ny + 2 * HALO, nx + 2 * HALO)
    ref_h = (3900.0 + np.cumsum(rng.normal(0, 8, shape_h), axis=1)).astype(np.float32)
    dem_h = (ref_h + rng.normal(0.5, 1.5, shape_h)).astype(np.float32)
    dem_h[rng.random(shape_h) < 0.05] = np.nan
    ref_h[rng.random(shape_h) < 0.01] = np.nan
    ref = ref_h[HALO:-HALO, HALO:-HALO]
    glacier = np.where(rng.random((ny, nx)) < 0.5, rng.integers(1, 9, (ny, nx)), 0)
    surface = np.where(glacier > 0, rng.integers(0, 3, (ny, nx)), 0)
    return {
        "dem_h": dem_h,
        "ref_h": ref_h,
        "ref": np.ascontiguousarray(ref),
        "void": (rng.random((ny, nx)) < 0.03).astype(np.uint8),
        "stable": (rng.random((ny, nx)) < 0.6).astype(np.uint8),
        "radar": (rng.random((ny, nx)) < 0.05).astype(np.uint8),
        "coh": np.where(rng.random((ny, nx)) < 0.02, np.nan, rng.random((ny, nx))).astype(
            np.float32
        ),
        "glacier": glacier.astype(np.int32),
        "surface": surface.astype(np.int8),
        "region": rng.integers(0, 4, (ny, nx)).astype(np.int16),
        "xk": np.linspace(-2.0, 2.5, nx),
        "yk": np.linspace(1.5, -2.0, ny),
    }


shapes = stn.tuples(stn.integers(3, 40), stn.integers(3, 40))
shifts = stn.tuples(stn.floats(-200.0, 200.0), stn.floats(-200.0, 200.0))


@settings(max_examples=30, deadline=None)
@given(seed=stn.integers(0, 10_000), shape=shapes, shift=shifts)
def test_dem_dh_and_coregistration_pass_match_numpy(
    seed: int, shape: tuple[int, int], shift: tuple[float, float]
) -> None:
    t = _tile(seed, *shape)
    shift_m = np.array(shift)
    sw = kernels.shift_weights(shift_m, RES, HALO)
    # numpy: resample, subtract, mask (the step's former _dh_block)
    dh = coregister.shifted(t["dem_h"], HALO, shift_m, RES) - t["ref"]
    dh = np.where(validity(dh, t["ref"], t["void"]), dh, np.nan)
    got, values = kernels.dem_dh(t["dem_h"], t["ref"], t["void"], t["stable"], HALO, sw)
    assert got.dtype == dh.dtype and np.array_equal(got, dh, equal_nan=True)
    expect_q = robust.block_quantiles(np.where(t["stable"] == 1, dh, np.nan))
    assert np.array_equal(kernels.quantile_row(values), expect_q, equal_nan=True)
    _, only = kernels.dem_dh(t["dem_h"], t["ref"], t["void"], t["stable"], HALO, sw, False)
    assert np.array_equal(only, values)
    gx, gy = coregister.gradient(t["ref_h"], RES)
    inner = (slice(HALO, -HALO), slice(HALO, -HALO))
    centre, clip = float(np.nanmedian(values)) if values.size else 0.0, 2.0
    ata, atb = coregister.normal_equations(dh, gx[inner], gy[inner], t["stable"] == 1, centre, clip)
    k_ata, k_atb, k_values = kernels.coreg_pass(
        t["dem_h"], t["ref_h"], t["void"], t["stable"], HALO, sw, RES, centre, clip
    )
    np.testing.assert_allclose(k_ata, ata, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(k_atb, atb, rtol=1e-10, atol=1e-9)
    assert np.array_equal(k_values, values)


def test_shift_beyond_the_halo_is_refused() -> None:
    with pytest.raises(coregister.ShiftTooLarge):
        kernels.shift_weights(np.array([8.0 * RES, 0.0]), RES, HALO)


@settings(max_examples=30, deadline=None)
@given(seed=stn.integers(0, 10_000), shape=shapes, cmin=stn.floats(0.0, 1.0))
def test_insar_dh_matches_numpy(seed: int, shape: tuple[int, int], cmin: float) -> None:
    t = _tile(seed, *shape)
    raw = (t["dem_h"][HALO:-HALO, HALO:-HALO] - t["ref"]).astype(np.float32)
    ok = validity(raw, t["ref"], t["void"], t["radar"], t["coh"], cmin)
    dh = np.where(ok, raw, np.nan)
    got, values = kernels.insar_dh(
        raw, t["ref"], t["void"], t["radar"], t["coh"], t["stable"], cmin
    )
    assert got.dtype == np.float32 and np.array_equal(got, dh, equal_nan=True)
    expect = dh[(t["stable"] == 1) & np.isfinite(dh)]
    assert np.array_equal(values, expect.astype(np.float64))


@settings(max_examples=30, deadline=None)
@given(
    seed=stn.integers(0, 10_000),
    shape=shapes,
    quadratic=stn.booleans(),
    kind=stn.sampled_from(["dem", "insar"]),
)
def test_ramp_passes_match_numpy(
    seed: int, shape: tuple[int, int], quadratic: bool, kind: str
) -> None:
    t = _tile(seed, *shape)
    rng = np.random.default_rng(seed)
    dh = t["dem_h"][HALO:-HALO, HALO:-HALO] - t["ref"]
    dh = dh.astype(np.float64 if kind == "dem" else np.float32)
    model = rng.normal(0, 0.3, 6)
    if not quadratic:
        model[4:] = 0.0
    stable = t["stable"]
    centre, clip = float(rng.normal(0.5, 0.2)), float(rng.uniform(0.5, 4.0))
    ata, atb = ramp.normal_equations(dh, stable == 1, t["xk"], t["yk"], model, centre, clip)
    k_ata, k_atb = kernels.ramp_normal_equations(dh, stable, t["xk"], t["yk"], model, centre, clip)
    np.testing.assert_allclose(k_ata, ata, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(k_atb, atb, rtol=1e-9, atol=1e-9)
    resid = np.where(stable == 1, dh, np.nan) - ramp.evaluate(model, t["xk"], t["yk"])
    lo, width = robust.hist_range(centre, 0.5)
    got = kernels.residual_histogram(
        dh, stable, t["xk"], t["yk"], model, lo, width, robust.N_HIST_BINS
    )
    assert np.array_equal(got, robust.histogram(resid, lo, width))
    np.testing.assert_allclose(
        kernels.residual_clipped_sum(dh, stable, t["xk"], t["yk"], model, centre, clip),
        robust.clipped_sum(resid, centre, clip),
        rtol=1e-12,
        atol=1e-9,
    )


def _corrected_numpy(
    t: dict[str, np.ndarray],
    dh: np.ndarray,
    tilt: np.ndarray,
    datum: float,
    table: penetration.Table,
    seasonal: float,
    width: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, outliers.Moments]:
    """The step's former numpy path: corrected tile, group codes, block keys, moments."""
    out = dh - datum - ramp.evaluate(tilt, t["xk"], t["yk"])
    pen = penetration.lookup(
        table.penetration_m, table.bin_lo_m, table.width_m, t["region"], t["surface"], t["ref"]
    )
    corr = (out - np.where(t["surface"] > 0, pen + seasonal, 0.0)).astype(np.float32)
    keys = outliers.group_keys(
        t["glacier"], t["region"], t["surface"], bin_index(t["ref"], width), n_bins(width)
    )
    codes, block_keys = outliers.block_groups(corr, keys)
    return corr, codes, block_keys, outliers.moments_block(corr, codes, block_keys)


@settings(max_examples=30, deadline=None)
@given(
    seed=stn.integers(0, 10_000),
    shape=shapes,
    kind=stn.sampled_from(["dem", "insar"]),
    width=stn.sampled_from([25.0, 50.0, 100.0]),
)
def test_corrected_groups_and_outlier_passes_match_numpy(
    seed: int, shape: tuple[int, int], kind: str, width: float
) -> None:
    """Corrected tile, group codes, keys, moments, z histogram and the final masked tile equal
    the numpy path bitwise (the moments are summed in the same pixel order)."""
    t = _tile(seed, *shape)
    rng = np.random.default_rng(seed + 1)
    t["ref"][0, : min(3, shape[1])] = [3950.0, 4000.0, 4049.9999][: min(3, shape[1])]
    dh = (t["dem_h"][HALO:-HALO, HALO:-HALO] - t["ref"]).astype(
        np.float64 if kind == "dem" else np.float32
    )
    tilt = np.concatenate([[0.0], rng.normal(0, 0.2, 3), [0.0, 0.0]])
    bins_lo = np.arange(3700.0, 4300.0, 50.0)
    shape_t = (4, 2, bins_lo.size)
    table = penetration.Table(
        bins_lo,
        rng.normal(1.0, 0.4, shape_t),
        np.zeros(shape_t),
        np.zeros(shape_t, dtype=np.int64),
        np.zeros(shape_t, dtype=bool),
        50.0,
    )
    datum, seasonal = float(rng.normal(0, 2)), -0.14
    corr, codes, block_keys, mom = _corrected_numpy(t, dh, tilt, datum, table, seasonal, width)
    ct = kernels.corrected_groups(
        dh,
        t["xk"],
        t["yk"],
        tilt,
        datum,
        table.penetration_m,
        table.bin_lo_m[0],
        table.width_m,
        seasonal,
        t["region"],
        t["surface"],
        t["ref"],
        t["glacier"],
        width,
        n_bins(width),
    )
    assert np.array_equal(ct.dh_m, corr, equal_nan=True)
    assert np.array_equal(ct.codes, codes) and np.array_equal(ct.keys, block_keys)
    assert np.array_equal(ct.n, mom.n)
    assert np.array_equal(ct.s, mom.s) and np.array_equal(ct.ss, mom.ss)
    stats = outliers.mean_std(mom)
    expect = outliers.zhist_block(corr, codes, block_keys, stats)
    got_codes, got_counts = kernels.z_histogram(ct.dh_m, ct.codes, ct.keys, stats.mean, stats.std)
    assert np.array_equal(got_codes, expect.codes) and np.array_equal(got_counts, expect.counts)
    th = outliers.thresholds(expect, stats, 1.5, min_px=3)
    ok = outliers.keep(corr, codes, block_keys, th)
    out, valid, rejected = kernels.keep_final(ct.dh_m, ct.codes, th.lower, th.upper)
    assert np.array_equal(valid == 1, ok)
    assert np.array_equal(out, np.where(ok, corr, np.nan).astype(np.float32), equal_nan=True)
    rej = outliers.rejected_block(ok, codes, block_keys)
    nz = np.flatnonzero(rejected)
    assert np.array_equal(ct.keys[nz], rej.codes) and np.array_equal(rejected[nz], rej.counts)


def test_dense_and_sorted_z_histograms_agree() -> None:
    """Many groups on few pixels take the sorting path; its counts equal the dense path's."""
    rng = np.random.default_rng(5)
    corr = rng.normal(0, 1, (6, 7)).astype(np.float32)
    codes = rng.integers(-1, 30, (6, 7)).astype(np.int32)
    keys = np.sort(rng.choice(10_000, 30, replace=False)).astype(np.int64)
    mean, std = rng.normal(0, 0.3, 30), rng.uniform(0.5, 2.0, 30)
    std[3] = np.nan
    got = kernels.z_histogram(corr, codes, keys, mean, std)  # 30 * 402 > 4 * 42: sorted path
    dense = kernels._z_counts(corr, codes, mean, std)
    nz = np.flatnonzero(dense)
    assert np.array_equal(got[0], keys[nz // outliers.N_CODES] * outliers.N_CODES + nz % 402)
    assert np.array_equal(got[1], dense[nz])


@settings(max_examples=40, deadline=None)
@given(seed=stn.integers(0, 10_000), n_parts=stn.integers(1, 9))
def test_merge_counts_equals_a_dense_sum(seed: int, n_parts: int) -> None:
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(n_parts):
        codes = np.unique(rng.integers(0, 500, rng.integers(0, 60)))
        parts.append(outliers.SparseCounts(codes, rng.integers(1, 9, codes.size)))
    merged = outliers.merge_counts(*parts)
    dense = np.zeros(500, dtype=np.int64)
    for p in parts:
        dense[p.codes] += p.counts
    assert np.array_equal(merged.codes, np.flatnonzero(dense))
    assert np.array_equal(merged.counts, dense[dense > 0])
    shuffled = [outliers.SparseCounts(p.codes[::-1], p.counts[::-1]) for p in parts]
    again = outliers.merge_counts(*shuffled)  # unsorted parts: the sorting path
    assert np.array_equal(again.codes, merged.codes)
    assert np.array_equal(again.counts, merged.counts)


@settings(max_examples=30, deadline=None)
@given(
    seed=stn.integers(0, 10_000),
    shape=shapes,
    n_region=stn.integers(0, 4),
    width=stn.sampled_from([30.0, 50.0]),
)
def test_penetration_passes_match_numpy(
    seed: int, shape: tuple[int, int], n_region: int, width: float
) -> None:
    t = _tile(seed, *shape)
    rng = np.random.default_rng(seed)
    ref_x = (t["ref"] + rng.normal(1.0, 0.5, shape)).astype(np.float32)
    diff = kernels.xc_difference(t["ref"], ref_x, t["void"])
    expect = np.where(t["void"] == 0, ref_x.astype(np.float64) - t["ref"], np.nan)
    assert np.array_equal(diff, expect, equal_nan=True)
    surface = rng.integers(0, 4, shape).astype(np.int8)  # 3: not a glacier surface
    np.testing.assert_array_equal(
        kernels.penetration_sums(
            diff, t["region"], surface, t["ref"], n_region, width, n_bins(width)
        ),
        penetration.sums_block(diff, t["region"], surface, t["ref"], n_region, width),
    )
    values = kernels.stable_values(diff, t["stable"])
    assert np.array_equal(values, diff[(t["stable"] == 1) & np.isfinite(diff)])


@settings(max_examples=25, deadline=None)
@given(
    seed=stn.integers(0, 10_000),
    rows=stn.lists(stn.integers(8, 20), min_size=1, max_size=4),
    cols=stn.lists(stn.integers(8, 20), min_size=1, max_size=4),
    halo=stn.integers(1, 8),
)
def test_haloed_blocks_equal_dask_overlap(
    seed: int, rows: list[int], cols: list[int], halo: int
) -> None:
    """The step's halo builder (one task per tile from its 3 x 3 neighbours) equals
    dask.array.overlap with NaN beyond the grid, for tiles of uneven size."""
    import dask.array as da

    from mbcube.corrections.step import _haloed

    rng = np.random.default_rng(seed)
    full = rng.normal(0, 1, (sum(rows), sum(cols))).astype(np.float32)
    arr = da.from_array(full, chunks=(tuple(rows), tuple(cols)))
    expect = np.asarray(
        da.overlap.overlap(arr, {0: halo, 1: halo}, np.nan).to_delayed(), dtype=object
    )
    r0 = np.concatenate([[0], np.cumsum(rows)])
    c0 = np.concatenate([[0], np.cumsum(cols)])

    def block(i: int, j: int) -> np.ndarray | None:
        if 0 <= i < len(rows) and 0 <= j < len(cols):
            return full[r0[i] : r0[i + 1], c0[j] : c0[j + 1]][None]  # with a scene axis
        return None

    for i in range(len(rows)):
        for j in range(len(cols)):
            nine = [block(i + di, j + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
            got = _haloed(halo, *nine)
            assert np.array_equal(got, expect[i, j].compute(), equal_nan=True), (i, j)
