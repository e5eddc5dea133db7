"""Ingest a study into the cube: reproject scenes and static layers onto the grid tile by tile.

Every layer is a Dask array with one task per tile that reads (and warps, when the source is on
another grid) only that tile's window. Writes go region by region; all-NaN / all-zero chunks are
not written. Scenes are appended with `scene_state` = 0 and flagged 1 once all their tiles are
written (see store.py), so an interrupted ingest is completed by running it again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rasterio.crs
import rasterio.transform
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.features import rasterize
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

import mbcube
from mbcube import store as st
from mbcube.cluster import SceneJob, compute_scenes
from mbcube.config import STATIC_KEYS, ChecksConfig
from mbcube.errors import StoreError, StudyError
from mbcube.fingerprints import changed_roles, fingerprints, identity
from mbcube.grid import Grid
from mbcube.store.location import store_problems
from mbcube.store.state import STATE_ATTR
from mbcube.study import SceneSpec, Study, h_amb_problem, load_study

log = logging.getLogger(__name__)

SURFACE_OFF, SURFACE_CLEAN, SURFACE_DEBRIS = 0, 1, 2
SCENE_VARS: dict[str, tuple[str, Any]] = {  # name: (dtype, fill value)
    "phase_rad": ("float32", np.nan),
    "coherence": ("float32", np.nan),
    "h_amb_m": ("float32", np.nan),
    "radar_mask": ("uint8", 0),
    "dem_m": ("float32", np.nan),
}
VAR_ATTRS: dict[str, dict[str, str]] = {
    "ref_dem_m": {"long_name": "reference DEM (C band)", "units": "m"},
    "ref_dem_x_m": {"long_name": "reference DEM (X band)", "units": "m"},
    "glacier_id": {"long_name": "glacier index (0 = off-glacier); see glacier_rgi_id"},
    "surface": {
        "long_name": "surface type",
        "flag_values": "0 1 2",
        "flag_meanings": "off_glacier clean_ice debris",
    },
    "region_id": {"long_name": "region index (0 = none); see region_name"},
    "stable": {
        "long_name": "stable ground: off-glacier with a valid reference DEM",
        "flag_values": "0 1",
    },
    "ref_void": {"long_name": "reference DEM void", "flag_values": "0 1"},
    "prior_dhdt_m_yr": {
        "long_name": "prior elevation-change rate (user), removed before unwrapping",
        "units": "m/yr",
    },
    "phase_rad": {"long_name": "wrapped differential phase", "units": "rad"},
    "coherence": {"long_name": "interferometric coherence", "units": "1"},
    "h_amb_m": {"long_name": "height of ambiguity", "units": "m"},
    "radar_mask": {"long_name": "layover / shadow / foreshortening", "flag_values": "0 1"},
    "dem_m": {"long_name": "scene DEM (DEM-kind scenes)", "units": "m"},
}


@dataclass
class IngestReport:
    """What an ingest did: scenes written for the first time, completed after an interrupted
    ingest, rewritten because their row or files changed, up to date, and removed (their row
    left scenes.csv)."""

    store: Path
    created: bool = False
    written: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    static_written: bool = False

    @property
    def recomputed(self) -> list[str]:
        return self.written + self.resumed + self.changed


# ---------------------------------------------------------------- reading tiles


def read_tile(
    path: Path, grid: Grid, rows: slice, cols: slice, resampling: Resampling
) -> np.ndarray:
    """One tile of a raster on the grid as float32, NaN where the raster has no data (nodata or
    outside). Reads the window directly when the raster is on the grid, else warps just the tile."""
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    tile_grid = Grid(
        grid.crs, grid.x0 + cols.start * grid.res, grid.y0 - rows.start * grid.res, grid.res, *shape
    )
    with rasterio.open(path) as src:
        left, bottom, right, top = transform_bounds(src.crs, grid.crs, *src.bounds)
        t_left, t_bottom, t_right, t_top = tile_grid.bounds
        if left >= t_right or right <= t_left or bottom >= t_top or top <= t_bottom:
            return np.full(shape, np.nan, dtype=np.float32)
        if _on_grid(src, grid):
            col_off = round((grid.x0 - src.transform.c) / grid.res) + cols.start
            row_off = round((src.transform.f - grid.y0) / grid.res) + rows.start
            return _read_window(src, row_off, col_off, shape)
        with WarpedVRT(
            src,
            crs=grid.crs,
            transform=tile_grid.transform,
            width=shape[1],
            height=shape[0],
            resampling=resampling,
            dtype="float32",
            nodata=np.nan,
            src_nodata=src.nodata,
            tolerance=1e-3,  # near-exact transformation (px): tiles match a whole-raster warp
        ) as vrt:
            return vrt.read(1).astype(np.float32)


def _on_grid(src: rasterio.DatasetReader, grid: Grid) -> bool:
    t = src.transform
    if src.crs is None or src.crs != rasterio.crs.CRS.from_user_input(grid.crs):
        return False
    if t.b != 0 or t.d != 0 or not np.isclose(t.a, grid.res) or not np.isclose(-t.e, grid.res):
        return False
    dx, dy = (t.c - grid.x0) / grid.res, (grid.y0 - t.f) / grid.res
    return bool(np.isclose(dx, round(dx), atol=1e-6) and np.isclose(dy, round(dy), atol=1e-6))


def _read_window(
    src: rasterio.DatasetReader, row_off: int, col_off: int, shape: tuple[int, int]
) -> np.ndarray:
    """Band 1 over the window at (`row_off`, `col_off`) of `shape` px as float32, NaN outside
    the raster and where it has no data. Only the part inside is read: a boundless masked read
    would also mask the values equal to its fill value (every 0 of a raster without nodata)."""
    out = np.full(shape, np.nan, dtype=np.float32)
    r0, c0 = max(row_off, 0), max(col_off, 0)
    r1, c1 = min(row_off + shape[0], src.height), min(col_off + shape[1], src.width)
    if r1 > r0 and c1 > c0:
        data = src.read(1, window=Window(c0, r0, c1 - c0, r1 - r0), masked=True)
        rows, cols = slice(r0 - row_off, r1 - row_off), slice(c0 - col_off, c1 - col_off)
        out[rows, cols] = np.ma.filled(data.astype(np.float32), np.nan)
    return out


def _tile_array(
    grid: Grid, func: Callable[[slice, slice], np.ndarray], dtype: str, name: str
) -> da.Array:
    """A dask array on the grid whose every block is func(rows, cols): one task per tile."""
    row_starts = np.cumsum((0, *grid.chunks[0]))
    col_starts = np.cumsum((0, *grid.chunks[1]))

    def block(block_id: tuple[int, int] | None = None) -> np.ndarray:
        if block_id is None:  # dask's meta probe
            return np.empty((0, 0), dtype=dtype)
        i, j = block_id
        rows = slice(int(row_starts[i]), int(row_starts[i + 1]))
        cols = slice(int(col_starts[j]), int(col_starts[j + 1]))
        return func(rows, cols).astype(dtype, copy=False)

    return da.map_blocks(
        block, chunks=grid.chunks, dtype=dtype, meta=np.empty((0, 0), dtype=dtype), name=name
    )


def raster_layer(path: Path, grid: Grid, resampling: Resampling, name: str) -> da.Array:
    """A raster file as a lazy float32 layer on the grid."""
    token = dask.base.tokenize(str(path), path.stat().st_mtime_ns, grid, resampling.name)
    return _tile_array(
        grid, lambda r, c: read_tile(path, grid, r, c, resampling), "float32", f"{name}-{token}"
    )


def vector_layer(
    shapes: gpd.GeoSeries, values: np.ndarray, grid: Grid, dtype: str, name: str
) -> da.Array:
    """Polygons burnt onto the grid (pixel centre inside; later rows win where they overlap)."""
    index = shapes.sindex
    token = dask.base.tokenize(shapes.to_wkb().tolist(), values.tolist(), grid)

    def burn(rows: slice, cols: slice) -> np.ndarray:
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        left = grid.x0 + cols.start * grid.res
        top = grid.y0 - rows.start * grid.res
        hits = np.sort(
            index.query(_box(left, top - shape[0] * grid.res, left + shape[1] * grid.res, top))
        )
        if len(hits) == 0:
            return np.zeros(shape, dtype=dtype)
        transform = rasterio.transform.from_origin(left, top, grid.res, grid.res)
        pairs = zip(shapes.iloc[hits], values[hits].tolist(), strict=True)
        # rasterio's own scratch dataset raises this (not our data; validation checks every CRS).
        # catch_warnings is not thread-safe under dask's threads, so the filter is set globally.
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        return rasterize(pairs, out_shape=shape, transform=transform, fill=0, dtype=dtype)

    return _tile_array(grid, burn, dtype, f"{name}-{token}")


def _box(left: float, bottom: float, right: float, top: float) -> Any:
    import shapely

    return shapely.box(left, bottom, right, top)


# ---------------------------------------------------------------- the static layers


def static_dataset(study: Study) -> xr.Dataset:
    """The static layers (lazy) and the glacier and region tables."""
    grid, cfg = study.grid, study.config
    # validated by load_study (mbcube.outlines): grid CRS, repaired, in file order
    outlines = study.outlines.reset_index(drop=True)
    regions = None if study.regions_frame is None else study.regions_frame.reset_index(drop=True)
    n = len(outlines)
    ref = raster_layer(study.ref_dem, grid, Resampling.bilinear, "ref_dem_m")
    glacier_id = vector_layer(outlines.geometry, np.arange(1, n + 1), grid, "int32", "glacier_id")
    on_glacier = glacier_id > 0
    if study.ndsi is not None:
        ndsi = raster_layer(study.ndsi, grid, Resampling.bilinear, "ndsi")
        clean = ~(ndsi <= cfg.ndsi_threshold)  # NaN NDSI on a glacier counts as clean ice
    elif study.clean_ice is not None:
        clean = raster_layer(study.clean_ice, grid, Resampling.nearest, "clean_ice") == 1
    else:
        clean = da.ones(grid.shape, chunks=grid.chunks, dtype=bool)
    surface = da.where(
        on_glacier, da.where(clean, SURFACE_CLEAN, SURFACE_DEBRIS), SURFACE_OFF
    ).astype("int8")
    void = ~da.isfinite(ref)
    layers: dict[str, da.Array] = {
        "ref_dem_m": ref,
        "glacier_id": glacier_id,
        "surface": surface,
        "stable": (~on_glacier & ~void).astype("uint8"),
        "ref_void": void.astype("uint8"),
    }
    if study.ref_dem_x is not None:
        layers["ref_dem_x_m"] = raster_layer(
            study.ref_dem_x, grid, Resampling.bilinear, "ref_dem_x_m"
        )
    prior = prior_rate(study, ref)
    if prior is not None:
        layers["prior_dhdt_m_yr"] = prior[0]
    if regions is not None:
        layers["region_id"] = vector_layer(
            regions.geometry, np.arange(1, len(regions) + 1), grid, "int16", "region_id"
        )
    else:
        layers["region_id"] = da.zeros(grid.shape, chunks=grid.chunks, dtype="int16")
    ds = xr.Dataset({k: (("y", "x"), v, VAR_ATTRS[k]) for k, v in layers.items()})
    if prior is not None:
        ds["prior_dhdt_m_yr"].attrs["source"] = prior[1]
    ds = ds.assign_coords(
        y=("y", grid.y_coords(), {"units": "m", "standard_name": "projection_y_coordinate"}),
        x=("x", grid.x_coords(), {"units": "m", "standard_name": "projection_x_coordinate"}),
    )
    ds = ds.merge(_glacier_table(outlines, cfg.glacier_id_column, cfg.surge_column))
    if regions is not None:
        ds = ds.merge(_region_table(regions, cfg.region_name_column))
    return ds


def prior_rate(study: Study, ref_dem_m: da.Array) -> tuple[da.Array, str] | None:
    """The user's prior elevation-change rate on the grid (m/yr, float32, NaN = unknown) and
    what it was made from (paths relative to the study folder): files.prior_dhdt, or
    (files.prior_dem - reference DEM) / years from reference_date to prior_dem_date, bilinear.
    None without a prior."""

    def relative(path: Path) -> str:
        return Path(os.path.relpath(path, study.root)).as_posix()

    if study.prior_dhdt is not None:
        rate = raster_layer(study.prior_dhdt, study.grid, Resampling.bilinear, "prior_dhdt_m_yr")
        return rate, f"study.yaml files.prior_dhdt: {relative(study.prior_dhdt)}"
    date = study.config.prior_dem_date
    if study.prior_dem is None or date is None:
        return None
    dem = raster_layer(study.prior_dem, study.grid, Resampling.bilinear, "prior_dem_m")
    years = years_since(study.config.reference_date, date)
    rate = ((dem - ref_dem_m) / np.float32(years)).astype("float32")
    source = (
        f"(study.yaml files.prior_dem: {relative(study.prior_dem)}, dated {date}, minus the "
        f"reference DEM) / {years:.3f} yr"
    )
    return rate, source


def _glacier_table(
    outlines: gpd.GeoDataFrame, id_column: str, surge_column: str | None
) -> xr.Dataset:
    """Per-glacier variables along dim `glacier` (1..N, the value in glacier_id)."""
    centroids = outlines.geometry.centroid
    table: dict[str, Any] = {
        "glacier_rgi_id": outlines[id_column].astype(str).to_numpy(dtype=object),
        "glacier_outline_area_km2": (outlines.geometry.area / 1e6).to_numpy(),
        "glacier_centroid_x_m": centroids.x.to_numpy(),
        "glacier_centroid_y_m": centroids.y.to_numpy(),
    }
    if surge_column and surge_column in outlines.columns:
        table["glacier_surge"] = (
            pd.to_numeric(outlines[surge_column], errors="coerce")
            .fillna(-1)
            .astype("int8")
            .to_numpy()
        )
    for column in outlines.columns:
        if column in ("geometry", id_column, surge_column):
            continue
        values = outlines[column]
        if pd.api.types.is_numeric_dtype(values):
            table[f"glacier_attr_{column}"] = values.to_numpy(dtype="float64")
        else:
            table[f"glacier_attr_{column}"] = values.astype(str).to_numpy(dtype=object)
    coords = {"glacier": np.arange(1, len(outlines) + 1, dtype="int32")}
    return xr.Dataset({k: ("glacier", v) for k, v in table.items()}, coords=coords)


def _region_table(regions: gpd.GeoDataFrame, name_column: str) -> xr.Dataset:
    coords = {"region": np.arange(1, len(regions) + 1, dtype="int16")}
    names = regions[name_column].astype(str).to_numpy(dtype=object)
    return xr.Dataset({"region_name": ("region", names)}, coords=coords)


# ---------------------------------------------------------------- the scenes


def scene_layers(study: Study, scene: SceneSpec) -> dict[str, da.Array]:
    """The per-scene layers of one scene, lazily, each checked per tile for impossible values."""
    grid = study.grid
    if scene.kind == "dem":
        if scene.dem is None:
            raise StudyError(f"scene {scene.scene_id}: no dem file")
        return {
            "dem_m": raster_layer(scene.dem, grid, Resampling.bilinear, f"dem-{scene.scene_id}")
        }
    if scene.phase is None or scene.coherence is None or scene.h_amb_m is None:
        raise StudyError(f"scene {scene.scene_id}: phase, coherence and h_amb are required")
    phase = raster_layer(scene.phase, grid, Resampling.nearest, f"phase-{scene.scene_id}")
    phase = da.map_blocks(
        _checked, phase, str(scene.phase), scene.scene_id, "phase", -np.pi, np.pi, dtype="float32"
    )
    coherence = raster_layer(scene.coherence, grid, Resampling.bilinear, f"coh-{scene.scene_id}")
    coherence = da.map_blocks(
        _checked,
        coherence,
        str(scene.coherence),
        scene.scene_id,
        "coherence",
        0.0,
        1.0,
        dtype="float32",
    )
    if isinstance(scene.h_amb_m, Path):
        h_amb = raster_layer(scene.h_amb_m, grid, Resampling.bilinear, f"hamb-{scene.scene_id}")
        h_amb = da.map_blocks(
            _checked_h_amb,
            h_amb,
            str(scene.h_amb_m),
            scene.scene_id,
            study.config.checks,
            dtype="float32",
        )
    else:
        h_amb = da.full(grid.shape, scene.h_amb_m, chunks=grid.chunks, dtype="float32")
    in_scene = da.isfinite(phase)
    layers = {
        "phase_rad": phase,
        "coherence": coherence,
        "h_amb_m": da.where(in_scene, h_amb, np.nan),
    }
    if scene.mask is not None:
        mask = raster_layer(scene.mask, grid, Resampling.nearest, f"mask-{scene.scene_id}")
        layers["radar_mask"] = (mask == 1).astype("uint8")
    return layers


def _checked(
    block: np.ndarray, path: str, scene_id: str, field: str, low: float, high: float
) -> np.ndarray:
    """Refuse values outside [low, high] (a tiny tolerance for float rounding)."""
    finite = block[np.isfinite(block)]
    tolerance = 1e-4 * max(abs(low), abs(high), 1.0)
    if finite.size and (finite.min() < low - tolerance or finite.max() > high + tolerance):
        raise StudyError(
            f"{path}: scene {scene_id}, field {field}: values in [{finite.min():.4g}, {finite.max():.4g}] "
            f"outside [{low:.4g}, {high:.4g}]. "
            + (
                "Give wrapped phase in radians."
                if field == "phase"
                else "Coherence must lie in [0, 1]."
            )
        )
    return block


def _checked_h_amb(block: np.ndarray, path: str, scene_id: str, checks: ChecksConfig) -> np.ndarray:
    """Refuse heights of ambiguity out of the study's limits (`mbcube.study.h_amb_problem`):
    the whole raster is checked tile by tile as it is ingested (the study check reads it
    decimated)."""
    finite = block[np.isfinite(block)]
    if finite.size:
        problem = h_amb_problem(float(finite.min()), float(finite.max()), checks)
        if problem:
            raise StudyError(
                f"{path}: scene {scene_id}, field h_amb: values {finite.min():.6g} to "
                f"{finite.max():.6g} m {problem}"
            )
    return block


def scene_coords(study: Study, scenes: list[SceneSpec]) -> dict[str, Any]:
    ref = study.config.reference_date
    dates = [s.date for s in scenes]
    h_amb = [s.h_amb_m if isinstance(s.h_amb_m, float) else np.nan for s in scenes]
    return {
        "scene": ("scene", np.array([s.scene_id for s in scenes], dtype=object)),
        "scene_date": ("scene", pd.to_datetime(dates).values.astype("datetime64[ns]")),
        "scene_month": ("scene", np.array([d.month for d in dates], dtype="int8")),
        "scene_years": ("scene", np.array([years_since(ref, d) for d in dates]), {"units": "yr"}),
        "scene_kind": ("scene", np.array([s.kind for s in scenes], dtype=object)),
        "scene_nlooks": (
            "scene",
            np.array([s.nlooks or study.config.unwrap.nlooks for s in scenes], "float32"),
        ),
        "scene_h_amb_m": ("scene", np.array(h_amb, dtype="float32"), {"units": "m"}),
    }


def years_since(start: dt.date, end: dt.date) -> float:
    """Time span (yr, days / 365.25)."""
    return (end - start).days / 365.25


def scene_placeholders(study: Study, scenes: list[SceneSpec]) -> xr.Dataset:
    """Metadata of new scenes: coordinates, scene_state = 0, and lazy empty layers (never computed)."""
    ds = empty_scene_layers(study.grid, len(scenes)).assign_coords(scene_coords(study, scenes))
    ds["scene_state"] = (
        "scene",
        np.full(len(scenes), st.SCENE_PENDING, dtype="int8"),
        {"flag_values": "0 1 2", "flag_meanings": "pending ingested removed"},
    )
    return ds


def empty_scene_layers(grid: Grid, n_scenes: int) -> xr.Dataset:
    """The scenes' input layers (SCENE_VARS) for `n_scenes` scenes as lazy fill values, one
    chunk per scene and tile (never computed: a template of their metadata)."""
    shape, chunks = (n_scenes, *grid.shape), ((1,) * n_scenes, *grid.chunks)
    return xr.Dataset(
        {
            name: (
                ("scene", "y", "x"),
                da.full(shape, fill, chunks=chunks, dtype=dtype),
                VAR_ATTRS[name],
            )
            for name, (dtype, fill) in SCENE_VARS.items()
        }
    )


def _with_grid_mapping(ds: xr.Dataset, grid: Grid) -> xr.Dataset:
    ds = ds.rio.write_crs(grid.crs).rio.write_transform(grid.transform)
    for name, var in ds.data_vars.items():
        if {"y", "x"} <= set(var.dims):
            ds[name].encoding["coordinates"] = "spatial_ref"
    return ds


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """NaN as the fill value of float layers, so unwritten (empty) chunks read as NaN. Integer
    layers keep zarr's fill value 0 without a _FillValue attribute, so they decode as integers."""
    return {
        str(name): {"_FillValue": np.nan}
        for name, var in ds.data_vars.items()
        if {"y", "x"} <= set(var.dims) and var.dtype.kind == "f"
    }


# ---------------------------------------------------------------- the ingest

STEP = "ingest"


def study_inputs(study: Study) -> list[Path]:
    """Every input file of the study (static and per scene)."""
    files = list(study.static_inputs().values())
    for scene in study.scenes:
        files += list(scene.input_files().values())
    return files


def ingest(
    study_dir: Path | str | Study,
    store: Path | str,
    progress: Callable[[str], None] | None = None,
    overrides: dict[str, Any] | None = None,
) -> IngestReport:
    """Ingest the study at `study_dir` (a folder, or a Study already loaded) into the cube at
    `store`: create it, append new scenes, complete interrupted ones, rewrite scenes whose row
    or files changed and remove the scenes whose row left scenes.csv.

    `overrides`: parameters merged over the study's study.yaml. Parameters of later steps
    (unwrap, corrections, massbalance) may change between runs: the recorded ones are updated
    and those steps recompute what depends on them. Parameters the static layers are made from
    (STATIC_KEYS) and the static input files may not: that needs a new store. A cube is only
    created in a new or empty folder, outside the study's folders (`store.location`); the
    store's writer lock is held throughout."""
    study = study_dir if isinstance(study_dir, Study) else load_study(study_dir, overrides)
    store = Path(store)
    problems = store_problems(store, study.root, study_inputs(study))
    if problems:
        raise StoreError("\n".join(problems))
    with st.writer_lock(store):
        return _ingest(study, store, progress or log.info)


def _ingest(study: Study, store: Path, say: Callable[[str], None]) -> IngestReport:
    report = IngestReport(store)
    state = st.read_state(store) if st.store_exists(store) else {}
    if state and not state.get("created"):
        _wipe(store)  # a creation killed before it finished: nothing in it is recorded
        state = {}
    static_prints = fingerprints(study.static_inputs(), study.root, state.get("static_files"))
    if state:
        st.check_schema(store, state)
        if state.get("grid") != study.grid.to_attrs():
            raise StoreError(
                f"{store}: made on another grid {state.get('grid')}. Use a new store for this "
                "study."
            )
        changed = changed_roles(state["static_inputs"], identity(static_prints))
        if changed:
            raise StoreError(_static_change(store, changed, state["static_inputs"], static_prints))
        moved_from = state.get("study", {}).get("root")
        if moved_from and Path(moved_from) != study.root and Path(moved_from).is_dir():
            log.warning(
                "%s was last run from %s, which is still there; now from %s: scenes whose rows "
                "are not in this study's scenes.csv leave the cube",
                store,
                moved_from,
                study.root,
            )
        _update_recorded_state(store, state, study, static_prints)
    else:
        say(
            f"creating cube {store} on grid {study.grid.ny} x {study.grid.nx} px "
            f"({study.grid.n_tiles} tiles)"
        )
        _create(study, store, static_prints)
        report.created = True
    static_record = {"inputs": identity(static_prints)}
    if not st.is_current(store, STEP, st.records.STATIC_ITEM, static_record):
        if not report.created:
            say("writing the static layers again (their files were damaged or missing)")
        _write_static(study, store, static_record)
        report.static_written = True

    index = st.scene_index(store)
    new = [s for s in study.scenes if s.scene_id not in index]
    if new:
        placeholders = _with_grid_mapping(scene_placeholders(study, new), study.grid)
        st.write_dataset(placeholders, store, mode="a", append_dim="scene", compute=False)
    st.extend_scene_dim(store)  # layers of later steps: new scenes read as "not computed yet"
    index, states = st.scene_index(store), st.scene_states(store)
    _ensure_scene_layers(study, store, len(index))
    wanted = {s.scene_id for s in study.scenes}
    keep = study.config.keep_removed_scenes
    for scene_id, i in index.items():
        if scene_id not in wanted and _remove_scene(store, scene_id, i, int(states[i]), keep):
            report.removed.append(scene_id)
    jobs = []
    new_ids = {s.scene_id for s in new}
    for scene in study.scenes:
        i = index[scene.scene_id]
        done = st.step_record(store, STEP, scene.scene_id)
        prints = fingerprints(scene.input_files(), study.root, done.get("run", {}).get("files"))
        record = {"row": scene_row(study, scene), "inputs": identity(prints)}
        if states[i] == st.SCENE_INGESTED and st.is_current(store, STEP, scene.scene_id, record):
            report.skipped.append(scene.scene_id)
            continue
        if scene.scene_id in new_ids or report.created or states[i] == st.SCENE_REMOVED:
            report.written.append(scene.scene_id)
        elif done:
            report.changed.append(scene.scene_id)
        else:
            report.resumed.append(scene.scene_id)
        jobs.append(_scene_job(study, scene, store, i, record, prints, say))
    compute_scenes(jobs)
    return report


def _ensure_scene_layers(study: Study, store: Path, n_scenes: int) -> None:
    """Create the scenes' input layers the store lacks (metadata only: `mbcube verify --repair`
    deletes a layer whose metadata is damaged, and the ingest of its scenes writes it again)."""
    st.ensure_variables(store, empty_scene_layers(study.grid, n_scenes))


def scene_row(study: Study, scene: SceneSpec) -> dict[str, Any]:
    """What a scene's results depend on in its row of scenes.csv besides its files' content:
    date, kind, numeric h_amb (m) and number of looks (its own, or the study's default)."""
    return {
        "date": scene.date.isoformat(),
        "kind": scene.kind,
        "h_amb_m": scene.h_amb_m if isinstance(scene.h_amb_m, float) else None,
        "nlooks": scene.nlooks or study.config.unwrap.nlooks,
    }


def _scene_job(
    study: Study,
    scene: SceneSpec,
    store: Path,
    index: int,
    record: dict[str, Any],
    prints: dict[str, Any],
    say: Callable[[str], None],
) -> SceneJob:
    """Ingesting one scene: its state set pending, the records of every step and every chunk it
    had forgotten first (all of it came from an earlier version of its row or an interrupted
    ingest), then its coordinates and tiles written with its coverage counted in the same pass
    (tiles read once); then its record, and last its state flag (from then on it counts)."""

    def build() -> list[Any]:
        say(f"ingesting scene {scene.scene_id} ({scene.kind}, {scene.date})")
        _set_scene_state(store, index, st.SCENE_PENDING)
        for step in st.steps_recorded(store):  # all it had is obsolete: made again downstream
            st.invalidate(store, step, scene.scene_id)
        if st.delete_scene_chunks(store, scene.scene_id, index):
            st.consolidate(store)
        layers = scene_layers(study, scene)
        coords = xr.Dataset({k: v for k, v in scene_coords(study, [scene]).items() if k != "scene"})
        st.write_dataset(coords, store, region={"scene": slice(index, index + 1)})
        ds = xr.Dataset({name: (("scene", "y", "x"), arr[None]) for name, arr in layers.items()})
        region = {"scene": slice(index, index + 1), "y": slice(None), "x": slice(None)}
        writing = st.write_dataset(ds, store, region=region, compute=False)
        covered = da.isfinite(layers["dem_m" if scene.kind == "dem" else "phase_rad"])
        on_glacier = xr.open_zarr(str(store))["glacier_id"].data > 0
        return [
            writing,
            covered.sum(),
            (covered & on_glacier).sum(),
            on_glacier.sum(),
            covered.size,
        ]

    def finish(values: list[Any]) -> None:
        _, covered_px, glacier_px, total_glacier_px, size = values
        run = {
            "files": prints,
            "row": scene.row,
            "coverage_frac": float(covered_px) / size,
            "glacier_coverage_frac": float(glacier_px) / max(int(total_glacier_px), 1),
        }
        outputs = st.scene_outputs(list(SCENE_VARS), index)
        st.record_step(store, STEP, scene.scene_id, record, outputs=outputs, run=run)
        _set_scene_state(store, index, st.SCENE_INGESTED)

    return SceneJob(scene.scene_id, f"ingest scene {scene.scene_id}", build, finish)


def _remove_scene(store: Path, scene_id: str, index: int, state: int, keep: bool) -> bool:
    """Take a scene whose row left scenes.csv out of the results: flagged removed (hidden from
    every step and table), its records forgotten, and unless `keep` its chunks deleted (again
    on every run, so a removal killed half-way or `keep` turned off is completed). Returns
    whether it was in the results until now."""
    was_in = state != st.SCENE_REMOVED
    if was_in:
        log.warning(
            "scene %s: its row left scenes.csv: removed from the results%s",
            scene_id,
            " (its pixels are kept: keep_removed_scenes)" if keep else " and from the cube",
        )
        _set_scene_state(store, index, st.SCENE_REMOVED)
        for step in st.steps_recorded(store):
            st.invalidate(store, step, scene_id)
    if not keep and st.delete_scene_chunks(store, scene_id, index):
        st.consolidate(store)
    return was_in


def _create(study: Study, store: Path, static_prints: dict[str, Any]) -> None:
    """The cube's metadata: every static layer and the study's scenes as placeholders (nothing
    computed), the store state (marked created once all metadata is written) and the records
    group."""
    static = static_dataset(study)
    template = xr.merge([static, scene_placeholders(study, list(study.scenes))])
    template = _with_grid_mapping(template, study.grid)
    state: dict[str, Any] = {
        "schema_version": st.SCHEMA_VERSION,
        "mbcube_version": mbcube.__version__,
        "grid": study.grid.to_attrs(),
        "study": {"root": str(study.root), "config": study.config.model_dump(mode="json")},
        "static_inputs": identity(static_prints),
        "static_files": static_prints,
        "created": False,
    }
    # the root group first, with the state (not yet created): from its first byte on, the
    # folder is a cube mbcube made, which a later ingest completes (mode "a": the folder may
    # hold the writer's lock file; the location checks refused any other content)
    zarr.open_group(
        str(store),
        mode="a",
        zarr_format=3,
        attributes={
            "title": "mbcube datacube",
            "Conventions": "CF-1.10",
            "source": f"mbcube {mbcube.__version__}",
            STATE_ATTR: json.dumps(state, sort_keys=True),
        },
    )
    st.write_dataset(template, store, mode="a", compute=False, encoding=_encoding(template))
    zarr.open_group(str(store / st.records.RECORDS_GROUP), mode="a", zarr_format=3)
    st.write_state(store, state | {"created": True})


def _write_static(study: Study, store: Path, record: dict[str, Any]) -> None:
    """Write the static layers (region writes into the existing arrays), then record them."""
    st.invalidate(store, STEP, st.records.STATIC_ITEM)
    static = static_dataset(study)
    layers = static[[k for k, v in static.data_vars.items() if v.dims == ("y", "x")]]
    st.write_dataset(
        layers.drop_vars(["x", "y"]), store, region={"y": slice(None), "x": slice(None)}
    )
    outputs = [f"{name}/c" for name in st.static_arrays(store)]
    st.record_step(store, STEP, st.records.STATIC_ITEM, record, outputs=outputs)


def _wipe(store: Path) -> None:
    """Empty a store whose creation was killed (mbcube's own, nothing recorded in it)."""
    for entry in store.iterdir():
        if entry.name == st.lock.LOCK_NAME:
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _static_change(
    store: Path, changed: list[str], recorded: dict[str, Any], now: dict[str, Any]
) -> str:
    """The one-line refusal of a cube whose static input files (roles `changed`) were added,
    removed or edited since it was made."""
    how = {
        "added": [r for r in changed if r not in recorded],
        "removed": [r for r in changed if r not in now],
        "edited": [r for r in changed if r in recorded and r in now],
    }
    said = "; ".join(f"{k}: {', '.join(v)}" for k, v in how.items() if v)
    return (
        f"{store}: the static inputs {changed} changed since this cube was made ({said}). The "
        "static layers (reference DEMs, outlines, masks, prior) are made once: ingest into a "
        "new store, or restore the files and study.yaml's `files`."
    )


def _static_params(config: dict[str, Any]) -> dict[str, Any]:
    """The STATIC_KEYS of a study config (as recorded), unset (None) entries of a mapping left
    out: a key mbcube gained since a cube was made (e.g. files.prior_dhdt) reads as unset."""
    return {
        key: {k: v for k, v in value.items() if v is not None}
        if isinstance(value := config.get(key), dict)
        else value
        for key in STATIC_KEYS
    }


def _update_recorded_state(
    store: Path, state: dict[str, Any], study: Study, static_prints: dict[str, Any]
) -> None:
    """Record changed step parameters and the study's current place (a moved study folder);
    refuse changed parameters of the static layers."""
    new = study.config.model_dump(mode="json")
    old = state["study"]["config"]
    new_static, old_static = _static_params(new), _static_params(old)
    static_changed = [k for k in STATIC_KEYS if new_static[k] != old_static[k]]
    if static_changed:
        raise StoreError(
            f"{store}: study parameters {static_changed} changed since this cube was made "
            f"(was {[old.get(k) for k in static_changed]}). They shape the static layers: "
            "ingest into a new store, or restore the old values in study.yaml."
        )
    updated = state | {
        "study": {"root": str(study.root), "config": new},
        "static_files": static_prints,
    }
    if updated != state:
        st.write_state(store, updated)


def _set_scene_state(store: Path, index: int, value: int) -> None:
    flag = xr.Dataset({"scene_state": ("scene", np.array([value], dtype="int8"))})
    st.write_dataset(flag, store, region={"scene": slice(index, index + 1)})
