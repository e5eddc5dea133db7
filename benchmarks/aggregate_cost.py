"""Cost of region tables from stored statistics against recomputing them from pixels.

Three measurements (`python benchmarks/aggregate_cost.py pixels|memory|stats`):

pixels: a cube that really holds ~10,000 glaciers (`make_pixel_cube`: a 100 x 100 lattice of
    elliptic glaciers, 80 px apart (`--spacing-px`), ~2,750 px = 2.5 km2 each, so ~43 % of the
    cube is glacier: denser than real mountain ranges, i.e. FEWER pixels per glacier than a real
    cube holds; 160 px apart: 11 %, 4x the pixels), with
    the cube's schema (static layers, per-scene dh_m (m) = rate x years + N(0, 1 m) noise, glacier
    table, scene coordinates, state and a `correct` record per scene), written tile by tile.
    (a) recomputing from pixels: `mbcube.binning.bin_cube(force=True)` (reads dh_m of every
        scene from Zarr, per-tile kernel, hypsometry, writes `stats`) then `aggregate` into a new
        region file (combines the scene statistics, glacier and region tables);
    (b) from stored statistics: `aggregate(store, out, regions=NEW)` into the same folder, whose
        glacier tables are current: the region tables from the cache alone (best of REPEATS,
        each time another region file; median and best, and the median of each stage), and the
        `mbcube aggregate` command in a child process
        (wall time with Python start and imports; its own time printed by the command).
    Both give the same region table (checked), and the ratio (a) / (b) is written down.
memory: a statistics-only store of N glaciers x 100 bins x 2 surfaces x S scenes (`make_store`,
    written scene by scene, chunked as the bin step writes them: one chunk per scene), then in a
    child process: the first aggregate (scene statistics combined, cached) and then a new
    region set; peak RSS (MiB) and times of each.
stats: the same store, in process: first aggregate, new region set (tables current), reading +
    combining the scene statistics without cache.

    .venv/bin/python benchmarks/aggregate_cost.py pixels --side 100 --scenes 16
    .venv/bin/python benchmarks/aggregate_cost.py memory --glaciers 100000 --scenes 16
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import itertools
import json
import operator
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
import xarray as xr

from mbcube.aggregate import CACHE_GROUP, aggregate, load_stats, region_sets, region_table
from mbcube.config import MassBalanceConfig, StudyConfig
from mbcube.errors import MbcubeWarning
from mbcube.grid import Grid
from mbcube.store import SCHEMA_VERSION, record_step, write_dataset, write_state

RESULTS = Path(__file__).with_name("RESULTS-aggregate.md")
CRS = "EPSG:32643"
RES_M = 30.0
X0, Y0 = 500_000.0, 4_200_000.0
REF_DATE = dt.date(2000, 2, 16)
#: Glacier lattice: one glacier per CELL_PX x CELL_PX cell, an ellipse of these semi-axes (px).
CELL_PX, A_PX, B_PX = 80, 35, 25
#: Elevation gain per pixel northwards on a glacier (m): ~13 bins of 50 m per glacier.
SLOPE_M_PX = 12.0


def _dates(n_scenes: int) -> list[dt.date]:
    return [dt.date(2011, 10, 1) + dt.timedelta(days=45 * i) for i in range(n_scenes)]


def _years(n_scenes: int) -> np.ndarray:
    return np.array([(d - REF_DATE).days / 365.25 for d in _dates(n_scenes)])


def _root(grid: Grid, n_glaciers: int, cx: np.ndarray, cy: np.ndarray, n_scenes: int) -> xr.Dataset:
    """The glacier table and scene coordinates as ingest writes them."""
    rng = np.random.default_rng(0)
    glacier = np.arange(1, n_glaciers + 1, dtype=np.int32)
    dates = _dates(n_scenes)
    return xr.Dataset(
        {
            "glacier_rgi_id": ("glacier", np.array([f"G{i:06d}" for i in glacier], dtype=object)),
            "glacier_centroid_x_m": ("glacier", cx),
            "glacier_centroid_y_m": ("glacier", cy),
            "glacier_surge": ("glacier", (rng.random(n_glaciers) < 0.05).astype(np.int8)),
            "glacier_attr_basin": (
                "glacier",
                np.where(cx < grid.x0 + grid.nx * grid.res / 2, "Indus", "Tarim").astype(object),
            ),
            "scene_state": ("scene", np.ones(n_scenes, np.int8)),
        },
        coords={
            "glacier": glacier,
            "scene": np.array([f"S{i:02d}" for i in range(n_scenes)], dtype=object),
            "scene_date": ("scene", pd.to_datetime(dates).values.astype("datetime64[ns]")),
            "scene_month": ("scene", np.array([d.month for d in dates], np.int8)),
            "scene_years": ("scene", _years(n_scenes)),
            "scene_kind": ("scene", np.array(["dem"] * n_scenes, dtype=object)),
        },
    )


def _record(path: Path, grid: Grid, root: xr.Dataset, step: str) -> None:
    """The store state, and a record of `step` for every scene."""
    write_state(
        path,
        {
            "schema_version": SCHEMA_VERSION,
            "grid": grid.to_attrs(),
            "study": {"root": "", "config": StudyConfig().model_dump(mode="json")},
            "static_inputs": {},
            "static_files": {},
            "created": True,
        },
    )
    for scene in root["scene"].values:
        record_step(path, step, str(scene), {"benchmark": True})


# ------------------------------------------------------------------------------ the pixel cube


def _lattice(
    rows: np.ndarray, cols: np.ndarray, side: int, cell_px: int = CELL_PX
) -> dict[str, np.ndarray]:
    """Static layers at global pixel rows (h, 1) and cols (1, w) of the glacier lattice (one
    glacier per cell_px x cell_px cell)."""
    ci, cj = rows // cell_px, cols // cell_px
    dy = (rows % cell_px) - cell_px / 2 + 0.5
    dx = (cols % cell_px) - cell_px / 2 + 0.5
    inside = ((dx / A_PX) ** 2 + (dy / B_PX) ** 2 <= 1.0) & (ci < side) & (cj < side)
    gid = np.where(inside, ci * side + cj + 1, 0).astype(np.int32)
    base = 3000.0 + (gid.astype(np.int64) * 7919 % 2000)
    ref = np.where(inside, base + (B_PX - dy) * SLOPE_M_PX, 2500.0 + 0.1 * (rows + cols))
    surface = np.where(inside, np.where(dy > B_PX / 3, 2, 1), 0).astype(np.int8)
    return {"glacier_id": gid, "ref_dem_m": ref.astype(np.float32), "surface": surface}


def _rate(gid: np.ndarray) -> np.ndarray:
    """True dh/dt (m/yr) of each glacier number (0 off glacier)."""
    return np.where(gid > 0, -1.0 + (gid.astype(np.int64) * 104729 % 1000) / 1000.0, 0.0)


def _static_block(name: str, side: int, cell_px: int, block_info: Any = None) -> np.ndarray:
    (r0, r1), (c0, c1) = block_info[None]["array-location"]
    layers = _lattice(np.arange(r0, r1)[:, None], np.arange(c0, c1)[None, :], side, cell_px)
    if name == "stable":
        return (layers["glacier_id"] == 0).astype(np.uint8)
    return layers[name]


def _dh_block(side: int, cell_px: int, years: np.ndarray, block_info: Any = None) -> np.ndarray:
    (s0, _), (r0, r1), (c0, c1) = block_info[None]["array-location"]
    rows, cols = np.arange(r0, r1)[:, None], np.arange(c0, c1)[None, :]
    gid = _lattice(rows, cols, side, cell_px)["glacier_id"]
    rng = np.random.default_rng((s0, r0, c0))
    noise = rng.standard_normal((r1 - r0, c1 - c0), dtype=np.float32)
    return (_rate(gid) * years[s0] + noise).astype(np.float32)[None]


def make_pixel_cube(
    path: Path, side: int, n_scenes: int, tile: int = 1024, cell_px: int = CELL_PX
) -> Path:
    """A cube of side x side glaciers (side * cell_px px per grid side) with dh_m per scene."""
    size = side * cell_px
    grid = Grid(CRS, X0, Y0, RES_M, size, size, tile)
    n = side * side
    cell = np.arange(n)
    cx = X0 + ((cell % side) * cell_px + cell_px / 2) * RES_M
    cy = Y0 - ((cell // side) * cell_px + cell_px / 2) * RES_M
    root = _root(grid, n, cx, cy, n_scenes)
    chunks = (tile, tile)
    static = {
        name: da.map_blocks(
            _static_block,
            name,
            side,
            cell_px,
            dtype=dtype,
            chunks=da.core.normalize_chunks(chunks, (size, size)),
        )
        for name, dtype in (
            ("glacier_id", np.int32),
            ("ref_dem_m", np.float32),
            ("surface", np.int8),
            ("stable", np.uint8),
        )
    }
    years = _years(n_scenes)
    dh = da.map_blocks(
        _dh_block,
        side,
        cell_px,
        years,
        dtype=np.float32,
        chunks=da.core.normalize_chunks((1, tile, tile), (n_scenes, size, size)),
    )
    ds = root.assign({k: (("y", "x"), v) for k, v in static.items()})
    ds["region_id"] = (("y", "x"), da.zeros((size, size), np.int16, chunks=chunks))
    ds["ref_void"] = (("y", "x"), da.zeros((size, size), np.uint8, chunks=chunks))
    ds["dh_m"] = (("scene", "y", "x"), dh)
    ds = ds.assign_coords(
        y=("y", Y0 - (np.arange(size) + 0.5) * RES_M), x=("x", X0 + (np.arange(size) + 0.5) * RES_M)
    )
    encoding = {"dh_m": {"_FillValue": np.nan}, "ref_dem_m": {"_FillValue": np.nan}}
    write_dataset(ds, path, mode="w", encoding=encoding)
    _record(path, grid, root, "correct")
    return path


def strips_file(path: Path, n: int, x0: float, y0: float, span: float, vertical: bool) -> Path:
    """n strips over the square [x0, x0 + span] x [y0 - span, y0] (a region set never seen)."""
    edges = np.linspace(0.0, span, n + 1)
    boxes = [
        shapely.box(x0 + a, y0 - span, x0 + b, y0)
        if vertical
        else shapely.box(x0, y0 - b, x0 + span, y0 - a)
        for a, b in itertools.pairwise(edges)
    ]
    frame = gpd.GeoDataFrame(
        {"name": [f"strip {i:02d}" for i in range(n)]}, geometry=boxes, crs=CRS
    )
    frame.to_file(path, driver="GPKG")
    return path


def timed(func: Callable[[], object]) -> tuple[float, float]:
    """(wall s, process CPU s, all threads) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    func()
    return time.perf_counter() - start, time.process_time() - cpu


def best_of(func: Callable[[], object], repeats: int) -> tuple[float, float]:
    return min(timed(func) for _ in range(repeats))


def cli_wall(store: Path, regions: Path, out: Path) -> tuple[float, float]:
    """(wall s of `mbcube aggregate` in a child process, the command's own time printed)."""
    exe = Path(sys.executable).with_name("mbcube")
    start = time.perf_counter()
    done = subprocess.run(
        [str(exe), "aggregate", str(store), "--regions", str(regions), "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    own = [line for line in done.stdout.splitlines() if line.startswith("aggregate: ")]
    return wall, float(own[-1].split()[1]) if own else float("nan")


def run_pixels(
    side: int, n_scenes: int, repeats: int, keep: Path | None, cell_px: int = CELL_PX
) -> dict[str, Any]:
    from mbcube.binning import bin_cube
    from mbcube.cluster import quiet

    tmp = keep or Path(tempfile.mkdtemp(prefix="mbcube-aggpx-"))
    tmp.mkdir(parents=True, exist_ok=True)
    store = tmp / "cube.zarr"
    made = (
        timed(lambda: make_pixel_cube(store, side, n_scenes, cell_px=cell_px))
        if not store.exists()
        else (0, 0)
    )
    span = side * cell_px * RES_M
    files = [
        strips_file(tmp / f"strips{i}.gpkg", 10 + 5 * i, X0, Y0, span, vertical=i % 2 == 0)
        for i in range(repeats + 1)
    ]
    warnings.simplefilter("ignore", MbcubeWarning)
    shutil.rmtree(store / CACHE_GROUP, ignore_errors=True)
    out = tmp / "out"
    shutil.rmtree(out, ignore_errors=True)
    with quiet(True):
        binning = timed(lambda: bin_cube(store, force=True))
    first = timed(lambda: aggregate(store, out, regions=files[0]))
    pixels = (binning[0] + first[0], binning[1] + first[1])
    want = pd.read_csv(out / "regions.csv")
    fast = [timed(lambda f=f: aggregate(store, out, regions=f)) for f in files[1:]]
    # the same region file as (a): the same table from the cache alone
    aggregate(store, out, regions=files[0])
    pd.testing.assert_frame_equal(pd.read_csv(out / "regions.csv"), want)
    best = min(fast)
    median = (
        float(np.median([t[0] for t in fast])),
        float(np.median([t[1] for t in fast])),
    )
    stages = stage_costs(store, out, files[1:])
    # (c) the region arithmetic alone on the cached statistics already in memory
    data = load_stats(store)

    def regroup(path: Path) -> None:
        region_table(data, functools.reduce(operator.add, region_sets(data, path)))

    arithmetic = min(timed(lambda f=f: regroup(f)) for f in files[1:])
    command = cli_wall(store, files[1], out)
    n_px = side * cell_px * side * cell_px
    result = {
        "glaciers": side * side,
        "scenes": n_scenes,
        "mpix": n_px * n_scenes / 1e6,
        "make": made,
        "binning": binning,
        "first_aggregate": first,
        "pixels": pixels,
        "fast": best,
        "fast_median": median,
        "stages": stages,
        "arithmetic": arithmetic,
        "cli_wall": command[0],
        "cli_own": command[1],
        "ratio_wall": pixels[0] / median[0],
        "ratio_cpu": pixels[1] / median[1],
        "ratio_wall_best": pixels[0] / best[0],
        "ratio_arithmetic_cpu": pixels[1] / arithmetic[1],
    }
    if keep is None:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def stage_costs(store: Path, out: Path, files: list[Path]) -> dict[str, float]:
    """Median wall ms of each stage of `aggregate(store, out, regions=f)` (tables current) over
    `files`, the stages run one after another as `aggregate` runs them."""
    from mbcube.aggregate import (
        _joined,
        _polygon_set,
        _write_members,
        _write_parquet,
        region_sets_attributes,
    )

    names = (
        "reading the cache (load_stats)",
        "polygons read and assigned",
        "attribute regions",
        "region table",
        "regions.csv",
        "regions.parquet",
        "region_members.csv",
    )
    found: dict[str, list[float]] = {name: [] for name in (*names, "all stages")}
    for path in files:
        marks = [time.perf_counter()]
        data = load_stats(store)
        marks.append(time.perf_counter())
        given = _polygon_set(data, path)
        marks.append(time.perf_counter())
        sets = [given, *region_sets_attributes(data)]
        marks.append(time.perf_counter())
        table = region_table(data, _joined(data, sets))
        marks.append(time.perf_counter())
        table.to_csv(out / "regions.csv", index=False)
        marks.append(time.perf_counter())
        _write_parquet(table, out / "regions.parquet")
        marks.append(time.perf_counter())
        _write_members(out / "region_members.csv", data.id_column, data.ids, given.region_of())
        marks.append(time.perf_counter())
        for name, t0, t1 in zip(names, marks, marks[1:], strict=False):
            found[name].append(1e3 * (t1 - t0))
        found["all stages"].append(1e3 * (marks[-1] - marks[0]))
    return {name: float(np.median(times)) for name, times in found.items()}


# --------------------------------------------------------------------- the statistics-only store


def make_store(path: Path, n_glaciers: int, n_scenes: int, n_bins: int = 100) -> Path:
    """A store with the cube's glacier table, scene coordinates and statistics groups, written
    scene by scene (one chunk per scene and variable, as the bin step writes them)."""
    rng = np.random.default_rng(0)
    span = 120_000.0
    grid = Grid(CRS, X0, Y0, RES_M, int(span / RES_M), int(span / RES_M))
    cx = rng.uniform(X0, X0 + span, n_glaciers)
    cy = rng.uniform(Y0 - span, Y0, n_glaciers)
    root = _root(grid, n_glaciers, cx, cy, n_scenes)
    write_dataset(root, path, mode="w")
    _record(path, grid, root, "bin")
    # each glacier spans ~15 consecutive bins; each scene sees ~60 % of the glaciers
    bins = 3000.0 + 50.0 * np.arange(n_bins)
    low = rng.integers(0, n_bins - 16, n_glaciers)
    b = np.arange(n_bins)[None, :]
    span_bins = (b >= low[:, None]) & (b < low[:, None] + 15)
    n_px = (rng.integers(20, 400, (n_glaciers, n_bins, 2)) * span_bins[..., None]).astype(np.int64)
    glacier = root["glacier"].values
    coords = {"glacier": glacier, "bin": bins, "surface": np.array([1, 2], np.int8)}
    hyps = xr.Dataset(
        {
            "n_px": (("glacier", "bin", "surface"), n_px),
            "area_m2": (("glacier", "bin", "surface"), n_px * RES_M * RES_M),
        },
        coords=coords,
    )
    write_dataset(hyps, path, group="hypsometry", mode="w")
    years = root["scene_years"].values
    rate = rng.normal(-0.3, 0.3, (n_glaciers, 1, 1))
    dims = ("scene", "glacier", "bin", "surface")
    for s in range(n_scenes):
        seen = (rng.random(n_glaciers) < 0.6)[:, None, None]
        count = (n_px * rng.uniform(0.3, 1.0, (n_glaciers, 1, 1))).astype(np.int64) * seen
        sums = count * rate * years[s] + rng.normal(0, 1, count.shape) * np.sqrt(count)
        one = xr.Dataset(
            {
                "count": (dims, count[None]),
                "sum_dh_m": (dims, sums[None]),
                "sumsq_dh_m2": (dims, (sums**2 / np.maximum(count, 1) + count)[None]),
                "stable_count": ("scene", [2_000_000]),
                "stable_sum_dh_m": ("scene", rng.normal(0, 1000, 1)),
                "stable_sumsq_dh_m2": ("scene", [2_000_000 * 4.0]),
                "binned": ("scene", np.ones(1, np.uint8)),
            },
            coords={"scene": root["scene"].values[s : s + 1], **coords},
        )
        if s == 0:
            write_dataset(one, path, group="stats", mode="w")
        else:
            write_dataset(one, path, group="stats", mode="a", append_dim="scene")
        del count, sums, one
    return path


_CHILD = """
import json, sys, time, warnings
from pathlib import Path
from mbcube.aggregate import aggregate
from mbcube.errors import MbcubeWarning
warnings.simplefilter("ignore", MbcubeWarning)
store, out, regions = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
start, cpu = time.perf_counter(), time.process_time()
aggregate(store, out, regions=None if regions == "-" else Path(regions))
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"wall": wall, "cpu": cpu, "rss_mib": peak_rss_mib()}))
"""
#: Peak RSS of this process image (VmHWM). Not getrusage's ru_maxrss: Linux keeps that across
#: fork + exec, so a child would report its parent's peak (e.g. while making the store).
_PEAK = """
def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
"""


def _child(store: Path, out: Path, regions: Path | None) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _PEAK + _CHILD, str(store), str(out), str(regions or "-")],
        check=True,
        capture_output=True,
        text=True,
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _baseline_rss() -> float:
    code = _PEAK + "import mbcube.aggregate; print(peak_rss_mib())"
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip())


def run_memory(n_glaciers: int, n_scenes: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mbcube-aggmem-"))
    try:
        store = tmp / "cube.zarr"
        made = timed(lambda: make_store(store, n_glaciers, n_scenes))
        strips = strips_file(tmp / "strips.gpkg", 20, X0, Y0, 120_000.0, vertical=True)
        cells = n_glaciers * 100 * 2 * n_scenes
        first = _child(store, tmp / "out", None)
        new_set = _child(store, tmp / "out", strips)
        stats_bytes = sum(f.stat().st_size for f in (store / "stats").rglob("*") if f.is_file())
        cache_bytes = sum(f.stat().st_size for f in (store / CACHE_GROUP).rglob("*") if f.is_file())
        return {
            "glaciers": n_glaciers,
            "scenes": n_scenes,
            "cells": cells,
            "dense_gib": cells * 8 / 2**30,
            "make": made,
            "first": first,
            "new_set": new_set,
            "baseline_rss_mib": _baseline_rss(),
            "stats_disk_mib": stats_bytes / 2**20,
            "cache_disk_mib": cache_bytes / 2**20,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_stats(n_glaciers: int, n_scenes: int, repeats: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="mbcube-agg-"))
    try:
        store = make_store(tmp / "cube.zarr", n_glaciers, n_scenes)
        files = [
            strips_file(tmp / f"s{i}.gpkg", 10 + i, X0, Y0, 120_000.0, vertical=True)
            for i in range(repeats)
        ]
        warnings.simplefilter("ignore", MbcubeWarning)
        first = timed(lambda: aggregate(store, tmp / "out"))
        it = iter(files)
        new_set = best_of(lambda: aggregate(store, tmp / "out", regions=next(it)), repeats)
        others = iter(MassBalanceConfig(min_px_per_bin=11 + i) for i in range(repeats))
        load = best_of(lambda: load_stats(store, next(others)), repeats)
        return {
            "glaciers": n_glaciers,
            "scenes": n_scenes,
            "first": first,
            "new_set": new_set,
            "load": load,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------- the report


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent
    )
    return done.stdout.strip() or "?"


def _t(timing: tuple[float, float]) -> str:
    return f"{timing[0]:.3f} / {timing[1]:.3f}"


def _append(section: str) -> None:
    with RESULTS.open("a") as f:
        f.write(section)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("what", choices=["pixels", "memory", "stats"])
    parser.add_argument("--side", type=int, default=100, help="pixels: glaciers per grid side")
    parser.add_argument(
        "--spacing-px",
        type=int,
        default=CELL_PX,
        help="pixels: glacier spacing (px); 80: 43 %% of the cube is glacier, 160: 11 %%",
    )
    parser.add_argument("--glaciers", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="pixels: keep the cube here")
    parser.add_argument("--no-write", action="store_true", help="Do not append to RESULTS.")
    args = parser.parse_args()
    stamp = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, commit {_commit()}"
    if args.what == "pixels":
        r = run_pixels(args.side, args.scenes, args.repeats, args.keep, args.spacing_px)
        share = np.pi * A_PX * B_PX / args.spacing_px**2
        load = os.getloadavg()[0]
        text = (
            f"\n## {stamp}: new region set, {r['glaciers']} glaciers, from pixels vs from stored "
            f"statistics (load average {load:.1f}, 2 cores)\n\n"
            f"Cube: {r['scenes']} scenes x {args.side * args.spacing_px}^2 px ({r['mpix']:.0f} "
            f"Mpix of dh; glaciers {args.spacing_px} px apart, {share:.0%} of the pixels on "
            f"glacier), made in {r['make'][0]:.0f} s. Wall s / process CPU s:\n\n"
            "| path | wall s | CPU s |\n|---|---:|---:|\n"
            f"| (a) bin_cube from the Zarr cube (all scenes) | {r['binning'][0]:.2f} | "
            f"{r['binning'][1]:.2f} |\n"
            f"| (a) then aggregate into the region file (combine, glacier + region tables) | "
            f"{r['first_aggregate'][0]:.2f} | {r['first_aggregate'][1]:.2f} |\n"
            f"| (a) recomputing from pixels, total | {r['pixels'][0]:.2f} | {r['pixels'][1]:.2f} |\n"
            f"| (b) aggregate --regions NEW from the stored statistics (median of "
            f"{args.repeats} region files, in process) | {r['fast_median'][0]:.4f} | "
            f"{r['fast_median'][1]:.4f} |\n"
            f"| (b) the same, best of {args.repeats} | {r['fast'][0]:.4f} | {r['fast'][1]:.4f} |\n"
            f"| (c) the region arithmetic alone, cache already in memory (polygons read and "
            f"assigned, region table) | {r['arithmetic'][0]:.3f} | {r['arithmetic'][1]:.3f} |\n"
            f"| (b) `mbcube aggregate` command: own time printed / child wall incl. Python "
            f"start and imports | {r['cli_own']:.3f} / {r['cli_wall']:.2f} | |\n\n"
            f"Ratio (a) / (b) median: {r['ratio_wall']:.0f}x wall, {r['ratio_cpu']:.0f}x CPU "
            f"(best (b): {r['ratio_wall_best']:.0f}x wall); "
            f"(a) / (c): {r['ratio_arithmetic_cpu']:.0f}x CPU. "
            "(b)'s region table equals (a)'s for the same region file (checked).\n\n"
            "Stages of (b), median wall ms over the region files: "
            + ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
            + ".\n"
        )
    elif args.what == "memory":
        rows = [run_memory(n, args.scenes) for n in args.glaciers]
        load = os.getloadavg()[0]
        text = (
            f"\n## {stamp}: peak memory, statistics-only stores (load average {load:.1f})\n\n"
            "Child process per call; RSS includes the imports "
            f"(~{rows[0]['baseline_rss_mib']:.0f} MiB for `import mbcube.aggregate`). Dense = "
            "scenes x glaciers x 100 bins x 2 surfaces x 8 bytes, one such array per variable.\n\n"
            "| glaciers | scenes | dense array GiB | stats on disk MiB | cache on disk MiB | first "
            "aggregate wall / CPU s | peak RSS MiB | new region set wall / CPU s | peak RSS MiB |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        for r in rows:
            f, n = r["first"], r["new_set"]
            text += (
                f"| {r['glaciers']} | {r['scenes']} | {r['dense_gib']:.2f} | "
                f"{r['stats_disk_mib']:.0f} | {r['cache_disk_mib']:.0f} | "
                f"{f['wall']:.2f} / {f['cpu']:.2f} | {f['rss_mib']:.0f} | "
                f"{n['wall']:.3f} / {n['cpu']:.3f} | {n['rss_mib']:.0f} |\n"
            )
    else:
        rows = [run_stats(n, args.scenes, args.repeats) for n in args.glaciers]
        load = os.getloadavg()[0]
        text = (
            f"\n## {stamp}: statistics-only stores, in process (load average {load:.1f})\n\n"
            "| glaciers | scenes | first aggregate | new region set (tables current) | read + "
            "combine scene stats (no cache) |\n|---:|---:|---:|---:|---:|\n"
        )
        for r in rows:
            text += (
                f"| {r['glaciers']} | {r['scenes']} | {_t(r['first'])} | {_t(r['new_set'])} | "
                f"{_t(r['load'])} |\n"
            )
    print(text)
    if not args.no_write:
        _append(text)


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
