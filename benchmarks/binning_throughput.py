"""Binning throughput: mbcube's map-reduce vs the single-pass numba kernel, flox and numpy bincount.

Synthetic arrays like a large cube: SCENES x SIZE^2 dh (float32, 10 % NaN), ~GLACIERS glaciers
(blobs of 64 x 64 px cells, about half of the area glacier), a smooth reference DEM spanning
~100 bins of 50 m, clean ice above / debris below 4500 m, stable ground off glacier. All engines
get the same arrays and the same threads; results are checked equal; Mpix/s = scene pixels / s.

    .venv/bin/python benchmarks/binning_throughput.py --size 4096 --scenes 16 --threads 2

Appends a section to benchmarks/RESULTS-binning.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import xarray as xr

from mbcube.binning import BinAxis, bin_axis, binned_statistics, stats_tile

RESULTS = Path(__file__).with_name("RESULTS-binning.md")


def make_static(size: int, n_glaciers: int, seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    cell = 64
    n_cells = -(-size // cell)
    labels = np.zeros(n_cells * n_cells, np.int32)
    on = rng.random(labels.size) < 0.5
    labels[on] = rng.integers(1, n_glaciers + 1, on.sum())
    gid = np.kron(labels.reshape(n_cells, n_cells), np.ones((cell, cell), np.int32))[:size, :size]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ref = (
        5500
        + 2400 * np.sin(2.1 * np.pi * x) * np.cos(1.7 * np.pi * y)
        + 200 * np.sin(40 * x + 13 * y)
    ).astype(np.float32)
    ref[rng.random((size, size)) < 0.002] = np.nan
    surface = np.where(gid > 0, np.where(ref > 4500, 1, 2), 0).astype(np.int8)
    stable = ((gid == 0) & np.isfinite(ref)).astype(np.uint8)
    return xr.Dataset(
        {
            "glacier_id": (("y", "x"), gid),
            "surface": (("y", "x"), surface),
            "ref_dem_m": (("y", "x"), ref),
            "stable": (("y", "x"), stable),
        },
        coords={"x": np.arange(size) * 30.0, "y": -np.arange(size) * 30.0},
    )


def make_dh(n_scenes: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dh = np.empty((n_scenes, size, size), np.float32)
    for i in range(n_scenes):
        dh[i] = rng.standard_normal((size, size), dtype=np.float32) * 3 - 1
        dh[i][rng.random((size, size)) < 0.1] = np.nan
    return dh


def timed(func, repeat: int = 2) -> tuple[float, float, object]:
    """Best wall time (s) and best process CPU time (s, all threads) of `repeat` runs."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = func()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu, out


def single_pass(static: xr.Dataset, dh: np.ndarray, axis: BinAxis, n_g: int, threads: int):
    arrays = [static[k].values for k in ("glacier_id", "surface", "ref_dem_m")]
    stable = static["stable"].values

    def one(i: int):
        return stats_tile(*arrays, dh[i], stable, axis, n_g)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(dh.shape[0])))


def bincount(static: xr.Dataset, dh: np.ndarray, axis: BinAxis, n_g: int) -> np.ndarray:
    gid = static["glacier_id"].values.astype(np.int64)
    surf = static["surface"].values.astype(np.int64)
    b = np.floor(static["ref_dem_m"].values.astype(np.float64) / axis.bin_width_m)
    b = b - axis.first_bin
    base_ok = (gid >= 1) & (gid <= n_g) & (surf >= 1) & np.isfinite(b)
    key = np.where(
        base_ok, ((gid - 1) * axis.n_bins + np.nan_to_num(b).astype(np.int64)) * 2 + surf - 1, 0
    )
    n_keys = n_g * axis.n_bins * 2
    out = np.zeros((dh.shape[0], 3, n_keys))
    for i in range(dh.shape[0]):
        ok = base_ok & np.isfinite(dh[i])
        k, v = key[ok], dh[i][ok].astype(np.float64)
        out[i, 0] = np.bincount(k, minlength=n_keys)
        out[i, 1] = np.bincount(k, weights=v, minlength=n_keys)
        out[i, 2] = np.bincount(k, weights=v * v, minlength=n_keys)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--glaciers", type=int, default=2000)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slow-scenes", type=int, default=2, help="scenes for flox and bincount")
    parser.add_argument("--zarr", action="store_true", help="also end to end from a Zarr store")
    args = parser.parse_args()

    static = make_static(args.size, args.glaciers)
    dh = make_dh(args.scenes, args.size)
    gid, ref = static["glacier_id"].values, static["ref_dem_m"].values
    on = (gid > 0) & np.isfinite(ref)
    axis = bin_axis(float(ref[on].min()), float(ref[on].max()), 50.0)
    n_g = args.glaciers
    mpix = args.scenes * args.size**2 / 1e6
    rows: list[tuple[str, int, float, float, float, float]] = []

    def row(name: str, scenes: int, seconds: float, cpu: float) -> None:
        px = scenes * args.size**2 / 1e6
        rows.append((name, scenes, seconds, px / seconds, cpu, px / cpu))
        print(
            f"{name:60s} {scenes:3d} scenes {seconds:8.2f} s {px / seconds:8.1f} Mpix/s "
            f"(CPU {cpu:7.2f} s, {px / cpu:7.1f} Mpix per CPU-s)",
            flush=True,
        )

    print(
        f"{args.scenes} scenes x {args.size}^2 = {mpix:.0f} Mpix; {n_g} glaciers x {axis.n_bins} bins"
    )
    single_pass(static, dh[:1], axis, n_g, 1)  # compile / warm up
    t1, t1cpu, ref_parts = timed(lambda: single_pass(static, dh, axis, n_g, 1))
    row("single-pass numba kernel, 1 thread", args.scenes, t1, t1cpu)
    t2, t2cpu, _ = timed(lambda: single_pass(static, dh, axis, n_g, args.threads))
    row(
        f"single-pass numba kernel, {args.threads} threads (scenes in parallel)",
        args.scenes,
        t2,
        t2cpu,
    )

    chunks = (args.tile, args.tile)
    lazy_static = static.chunk({"y": args.tile, "x": args.tile})
    dh_lazy = xr.DataArray(
        da.from_array(dh, chunks=(1, *chunks)), dims=("scene", "y", "x")
    ).assign_coords(scene=[f"S{i:02d}" for i in range(args.scenes)])
    stats = binned_statistics(dh_lazy, lazy_static, axis=axis, n_glaciers=n_g)
    with dask.config.set(scheduler="threads", num_workers=args.threads):
        tm, tmcpu, out = timed(lambda: stats[["count", "sum_dh_m", "sumsq_dh_m2"]].compute())
    row(
        f"mbcube map-reduce (dask, in memory, tiles {args.tile}, {args.threads} threads)",
        args.scenes,
        tm,
        tmcpu,
    )
    # same numbers as the single pass
    first = ref_parts[0]
    dense = np.zeros((n_g, axis.n_bins, 2), np.int64)
    dense[first.glacier - 1] = first.per_glacier[0]
    np.testing.assert_array_equal(out["count"].values[0], dense)

    ns = min(args.slow_scenes, args.scenes)
    tb, tbcpu, counts = timed(lambda: bincount(static, dh[:ns], axis, n_g), repeat=1)
    row("numpy bincount on a combined key (1 thread)", ns, tb, tbcpu)
    np.testing.assert_array_equal(counts[0, 0].reshape(n_g, axis.n_bins, 2), dense)

    flox_stats = binned_statistics(
        dh_lazy.isel(scene=slice(0, ns)), lazy_static, axis=axis, n_glaciers=n_g, engine="flox"
    )
    with dask.config.set(scheduler="threads", num_workers=args.threads):
        tf, tfcpu, fout = timed(lambda: flox_stats[["count", "sum_dh_m"]].compute(), repeat=1)
    row(f"flox.groupby_reduce map-reduce, combined key ({args.threads} threads)", ns, tf, tfcpu)
    np.testing.assert_array_equal(fout["count"].values[0], dense)

    if args.zarr:
        tmp = Path(tempfile.mkdtemp(prefix="binbench-", dir=os.environ.get("TMPDIR")))
        try:
            store = tmp / "cube.zarr"
            cube = lazy_static.assign(dh_m=dh_lazy.drop_vars("scene"))
            cube.to_zarr(store, zarr_format=3, mode="w", consolidated=True)
            opened = xr.open_zarr(store)
            zstats = binned_statistics(
                opened["dh_m"].assign_coords(scene=dh_lazy["scene"].values),
                opened,
                axis=axis,
                n_glaciers=n_g,
            )
            with dask.config.set(scheduler="threads", num_workers=args.threads):
                tz, tzcpu, _ = timed(lambda: zstats[["count", "sum_dh_m", "sumsq_dh_m2"]].compute())
            row(
                f"mbcube map-reduce end to end from Zarr ({args.threads} threads)",
                args.scenes,
                tz,
                tzcpu,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    kernel, kernel_cpu = rows[1][3], rows[1][5]
    with RESULTS.open("a") as f:
        f.write(
            f"\n## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC: {args.scenes} scenes x {args.size}^2, "
            f"{n_g} glaciers x {axis.n_bins} bins, tiles {args.tile}, {args.threads} threads "
            f"({os.cpu_count()} cores, shared)\n\n"
            "| engine | scenes | wall s | Mpix/s | vs kernel (wall) | CPU s | Mpix per CPU-s "
            "| vs kernel (CPU) |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        for name, scenes, seconds, rate, cpu, rate_cpu in rows:
            f.write(
                f"| {name} | {scenes} | {seconds:.2f} | {rate:.0f} | {rate / kernel:.0%} "
                f"| {cpu:.2f} | {rate_cpu:.0f} | {rate_cpu / kernel_cpu:.0%} |\n"
            )


if __name__ == "__main__":
    main()
