"""Cost of the glacier and region tables from stored statistics (no pixel is read).

A store holding only what `mbcube aggregate` reads is made with the cube's schema: the glacier
table and scene coordinates at the root (as ingest writes them), a `stats` group
(scene x glacier x bin x surface) and a `hypsometry` group, with N glaciers x 100 bins x 2
surfaces x S scenes of realistic counts and sums. Measured (wall, best of REPEATS):

- first `aggregate(store, out)`: read the statistics, combine scenes, both tables, CSV + Parquet,
  and cache the glacier-level combined statistics in the store (once);
- `aggregate(store, out, regions=FILE)` afterwards: into a new region set (20 polygons), from the
  cached glacier statistics (what `mbcube aggregate --regions` costs after the first run);
- `load_stats` without the cache (reading + combining all scene statistics, writing the cache);
- re-aggregation into a new region set from the glacier-level statistics already in memory
  (`region_sets` + `region_table`): the region arithmetic alone.

    .venv/bin/python benchmarks/aggregate_cost.py --glaciers 2000 --scenes 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import xarray as xr

from mbcube.aggregate import aggregate, glacier_table, load_stats, region_sets, region_table
from mbcube.config import MassBalanceConfig, StudyConfig
from mbcube.errors import MbcubeWarning
from mbcube.grid import Grid
from mbcube.regions import RegionSet
from mbcube.store import SCHEMA_VERSION, write_dataset, write_state

RESULTS = Path(__file__).with_name("RESULTS-aggregate.md")
CRS = "EPSG:32643"
RES_M = 30.0


def make_store(path: Path, n_glaciers: int, n_scenes: int, n_bins: int = 100) -> Path:
    """A store with the cube's glacier table, scene coordinates and statistics groups."""
    rng = np.random.default_rng(0)
    span = 120_000.0
    grid = Grid(CRS, 500_000.0, 4_000_000.0 + span, RES_M, int(span / RES_M), int(span / RES_M))
    dates = [dt.date(2011, 10, 1) + dt.timedelta(days=45 * i) for i in range(n_scenes)]
    ref = dt.date(2000, 2, 16)
    glacier = np.arange(1, n_glaciers + 1, dtype=np.int32)
    cx = rng.uniform(grid.x0, grid.x0 + span, n_glaciers)
    cy = rng.uniform(grid.y0 - span, grid.y0, n_glaciers)
    root = xr.Dataset(
        {
            "glacier_rgi_id": ("glacier", np.array([f"G{i:06d}" for i in glacier], dtype=object)),
            "glacier_centroid_x_m": ("glacier", cx),
            "glacier_centroid_y_m": ("glacier", cy),
            "glacier_surge": ("glacier", (rng.random(n_glaciers) < 0.05).astype(np.int8)),
            "glacier_attr_basin": (
                "glacier",
                np.where(cx < grid.x0 + span / 2, "Indus", "Tarim").astype(object),
            ),
            "scene_state": ("scene", np.ones(n_scenes, np.int8)),
        },
        coords={
            "glacier": glacier,
            "scene": np.array([f"S{i:02d}" for i in range(n_scenes)], dtype=object),
            "scene_date": ("scene", pd.to_datetime(dates).values.astype("datetime64[ns]")),
            "scene_month": ("scene", np.array([d.month for d in dates], np.int8)),
            "scene_years": ("scene", np.array([(d - ref).days / 365.25 for d in dates])),
        },
    )
    write_dataset(root, path, mode="w")
    write_state(
        path,
        {
            "schema_version": SCHEMA_VERSION,
            "grid": grid.to_attrs(),
            "study": {"root": "", "config": StudyConfig().model_dump(mode="json")},
            "static": {"complete": True, "inputs": {}},
            "scenes": {},
            # as the bin step records each scene (the key of aggregate's cache)
            "steps": {"bin": {str(sid): {"token": f"t{sid}"} for sid in root["scene"].values}},
        },
    )
    # each glacier spans ~15 consecutive bins; each scene sees ~60 % of the glaciers
    bins = 3000.0 + 50.0 * np.arange(n_bins)
    low = rng.integers(0, n_bins - 16, n_glaciers)
    span_bins = (np.arange(n_bins)[None, :] >= low[:, None]) & (
        np.arange(n_bins)[None, :] < low[:, None] + 15
    )
    n_px = (rng.integers(20, 400, (n_glaciers, n_bins, 2)) * span_bins[..., None]).astype(np.int64)
    seen = rng.random((n_scenes, n_glaciers)) < 0.6
    count = (n_px[None] * rng.uniform(0.3, 1.0, (n_scenes, n_glaciers, 1, 1))).astype(np.int64)
    count *= seen[:, :, None, None]
    years = root["scene_years"].values
    rate = rng.normal(-0.3, 0.3, (1, n_glaciers, 1, 1))
    sums = count * (rate * years[:, None, None, None]) + rng.normal(0, 1, count.shape) * np.sqrt(
        count
    )
    dims = ("scene", "glacier", "bin", "surface")
    coords = {
        "scene": root["scene"].values,
        "glacier": glacier,
        "bin": bins,
        "surface": np.array([1, 2], np.int8),
    }
    stats = xr.Dataset(
        {
            "count": (dims, count),
            "sum_dh_m": (dims, sums),
            "sumsq_dh_m2": (dims, sums**2 / np.maximum(count, 1) + count),
            "stable_count": ("scene", np.full(n_scenes, 2_000_000, np.int64)),
            "stable_sum_dh_m": ("scene", rng.normal(0, 1000, n_scenes)),
            "stable_sumsq_dh_m2": ("scene", np.full(n_scenes, 2_000_000 * 4.0)),
            "binned": ("scene", np.ones(n_scenes, np.uint8)),
        },
        coords=coords,
    ).chunk({"scene": 1})
    hyps = xr.Dataset(
        {"n_px": (dims[1:], n_px), "area_m2": (dims[1:], n_px * RES_M * RES_M)},
        coords={k: v for k, v in coords.items() if k != "scene"},
    )
    write_dataset(stats, path, group="stats", mode="w")
    write_dataset(hyps, path, group="hypsometry", mode="w")
    return path


def region_file(path: Path, n: int = 20) -> Path:
    """n vertical strips over the study area (a region set the store has never seen)."""
    x0, span = 500_000.0, 120_000.0
    edges = np.linspace(x0, x0 + span, n + 1)
    strips = gpd.GeoDataFrame(
        {"name": [f"strip {i:02d}" for i in range(n)]},
        geometry=[
            shapely.box(a, 4_000_000.0, b, 4_000_000.0 + span) for a, b in itertools.pairwise(edges)
        ],
        crs=CRS,
    )
    strips.to_file(path, driver="GPKG")
    return path


def best_of(func: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(wall s, process CPU s) of the fastest of `repeats` calls. On a loaded machine the CPU
    time is the fairer number (wall includes waiting for a core)."""
    times = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        func()
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return min(times)


Timing = tuple[float, float]


def measure(n_glaciers: int, n_scenes: int, repeats: int) -> tuple[Timing, ...]:
    """(aggregate, aggregate into a new region file, read + combine, new region set in memory),
    each (wall s, CPU s), on a fresh store of n_glaciers."""
    tmp = Path(tempfile.mkdtemp(prefix="mbcube-agg-"))
    try:
        store = make_store(tmp / "cube.zarr", n_glaciers, n_scenes)
        strips = region_file(tmp / "strips.gpkg")
        with warnings.catch_warnings():  # this store has no region file of its own
            warnings.simplefilter("ignore", MbcubeWarning)
            full = best_of(lambda: aggregate(store, tmp / "out"), 1)  # writes the cache
        new_set = best_of(lambda: aggregate(store, tmp / "out2", regions=strips), repeats)
        # each time another cache key (min_px_per_bin): combines from the scene statistics
        others = iter(MassBalanceConfig(min_px_per_bin=11 + i) for i in range(repeats))
        load = best_of(lambda: load_stats(store, next(others)), repeats)
        data = load_stats(store)
        glaciers = glacier_table(data)

        def regroup() -> None:
            sets: list[RegionSet] = region_sets(data, strips)
            region_table(data, sets[0], glaciers)

        return full, new_set, load, best_of(regroup, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--glaciers", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="Do not append to RESULTS.")
    args = parser.parse_args()
    rows = []
    for n in args.glaciers:
        full, new_set, load, regroup = measure(n, args.scenes, args.repeats)
        cells = args.scenes * n * 100 * 2
        rows.append((n, args.scenes, cells, full, new_set, load, regroup))
        print(
            f"{n} glaciers x 100 bins x 2 surfaces x {args.scenes} scenes ({cells / 1e6:.1f} M "
            f"cells), wall / CPU s: first aggregate {_t(full)}, then into a new region file "
            f"{_t(new_set)} (cached glacier statistics); reading + combining the scene statistics "
            f"{_t(load)}; new region set from glacier statistics in memory {_t(regroup)}"
        )
    if not args.no_write:
        _write(rows)


def _t(timing: Timing) -> str:
    return f"{timing[0]:.2f} / {timing[1]:.2f}"


def _write(rows: list[tuple[int, int, int, Timing, Timing, Timing, Timing]]) -> None:
    header = (
        "| date | glaciers | scenes | stats cells | first aggregate | aggregate --regions new "
        "(cached) | read + combine scene stats | new region set in memory | load avg |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    if not RESULTS.exists():
        RESULTS.write_text("# Aggregation cost (benchmarks/aggregate_cost.py)\n\n" + header)
    load_avg = os.getloadavg()[0]
    with RESULTS.open("a") as f:
        for n, s, cells, full, new_set, load, regroup in rows:
            f.write(
                f"| {dt.date.today()} | {n} | {s} | {cells / 1e6:.1f} M | {_t(full)} | "
                f"{_t(new_set)} | {_t(load)} | {_t(regroup)} | {load_avg:.1f} (2 cores) |\n"
            )


if __name__ == "__main__":
    main()
