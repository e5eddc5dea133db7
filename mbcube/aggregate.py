"""Glacier and region tables from the stored statistics (`mbcube aggregate`); reads no pixel.

Reads the `stats` and `hypsometry` groups (and `penetration` when present), the scene coordinates
and the glacier table of the cube, never a (y, x) layer. Region polygons are read from the file
given, or from the region file recorded at ingest; a glacier attribute `basin` (when the outlines
have one) gives a second region set. The tables:

- glaciers.csv: one row per glacier (id column as in the outlines, `glacier_id_column`).
- regions.csv: a row `all` for the whole study and one per region / basin, each for all glaciers
  and without surge-type glaciers (column `glaciers`: all | no_surge). `mb_mwe_yr` is the
  hypsometric mean of the region's summed statistics (as the paper); `mb_mwe_yr_area_weighted`
  the area-weighted mean of its measured glaciers' values.

Both are also written as Parquet beside the CSV files.

The glacier-level combined statistics (scenes combined by `scene_rule`; no scene dimension) are
cached in the store's group `massbalance_cache`, keyed by the bin step's record of every scene
and by the combination parameters (scene_rule, min_px_per_bin): a new region file, density or
uncertainty parameter reuses them; a re-binned scene or another rule recomputes them. Statistics
written without bin step records are never cached.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from mbcube.config import MassBalanceConfig, StudyConfig
from mbcube.errors import MbcubeWarning, StoreError
from mbcube.massbalance import (
    GlacierStats,
    balance,
    combine_scenes,
    select_scenes,
    sum_units,
    with_void_area,
)
from mbcube.regions import (
    RegionSet,
    from_attribute,
    from_polygons,
    read_polygons,
    surge_free,
)
from mbcube.store import grid_of, open_cube, read_state, recorded_config, write_dataset
from mbcube.surge import effective_surge, surge_candidates
from mbcube.uncertainty import datum_sigma_m, quadrature, stable_moments, unit_uncertainty

__all__ = [
    "GLACIER_COLUMNS",
    "REGION_COLUMNS",
    "StoredStats",
    "aggregate",
    "glacier_table",
    "load_stats",
    "mass_balance_dataset",
    "region_sets",
    "region_table",
    "regions_dataset",
]

SIGMA_COLUMNS = [
    "sigma_random_mwe_yr",
    "sigma_penetration_mwe_yr",
    "sigma_datum_mwe_yr",
    "sigma_seasonal_mwe_yr",
    "sigma_density_mwe_yr",
]
GLACIER_COLUMNS = [
    "region",
    "surge",
    "surge_candidate",
    "area_km2",
    "coverage_frac",
    "dh_m",
    "dhdt_m_yr",
    "mb_mwe_yr",
    "mb_sigma_mwe_yr",
    *SIGMA_COLUMNS,
    "volume_km3_yr",
    "mass_gt_yr",
    "n_scenes",
    "period",
    "filled_frac",
]  # preceded by the id column
REGION_COLUMNS = [
    "name",
    "glaciers",
    "n_glaciers",
    "area_km2",
    "coverage_frac",
    "dhdt_m_yr",
    "mb_mwe_yr",
    "mb_sigma_mwe_yr",
    *SIGMA_COLUMNS,
    "mb_mwe_yr_area_weighted",
    "volume_km3_yr",
    "mass_gt_yr",
]
log = logging.getLogger(__name__)
#: Glacier attributes (outline columns) that define a region set of their own.
ATTRIBUTE_REGION_SETS = ("basin",)
#: Glaciers read per block (bounds memory: S x block x B x F float64 per variable).
GLACIER_BLOCK = 1024


@dataclass(frozen=True)
class StoredStats:
    """Everything the tables need, read from the store (glacier-level, small)."""

    glacier: np.ndarray  #: (G,) glacier index (1..N, as in the cube's glacier_id)
    ids: np.ndarray  #: (G,) glacier ids (the outlines' id column)
    surge: np.ndarray  #: (G,) int 0/1: the outlines' surge column where given, else the candidate
    surge_candidate: np.ndarray  #: (G,) bool: active-surge pattern in the dh profile (mbcube.surge)
    centroids_xy: np.ndarray  #: (G, 2) glacier centroids in the grid CRS (m)
    attributes: dict[str, np.ndarray]  #: other outline columns, by name
    stats: GlacierStats  #: scenes combined by the configured rule
    penetration_sigma_m: np.ndarray  #: (G,) penetration-table error, area-weighted (m)
    penetration_std_m: np.ndarray | None  #: (G,) penetration pixel spread (m), if stored
    bin_lower_m: np.ndarray  #: (B,) bin lower edges (m)
    scene_ids: np.ndarray  #: (S,)
    scene_dates: np.ndarray  #: (S,) datetime64
    scene_years: np.ndarray  #: (S,) years since the reference date
    scene_month: np.ndarray  #: (S,)
    stable_sigma_m: np.ndarray  #: (S,) standard deviation of dh on stable ground (m)
    datum_sigma_m: np.ndarray  #: (S,) datum error (m)
    pixel_size_m: float
    reference_date: dt.date
    crs: str
    ingest_regions: Path | None  #: the region file recorded at ingest, if it still exists
    regions_recorded: bool  #: the ingest recorded a region file (it may be gone since)
    outlines: Path | None  #: the outline file recorded at ingest, if it still exists
    id_column: str
    config: MassBalanceConfig


def _has_group(store: Path, group: str) -> bool:
    return (Path(store) / group / "zarr.json").exists()


def _recorded_file(state: dict[str, object], role: str) -> Path | None:
    inputs = state.get("static", {})
    record = inputs.get("inputs", {}).get(role) if isinstance(inputs, dict) else None
    if isinstance(record, dict) and Path(str(record.get("path", ""))).exists():
        return Path(str(record["path"]))
    return None


def load_stats(store: Path | str, config: MassBalanceConfig | None = None) -> StoredStats:
    """Read the statistics of the cube at `store` and combine each glacier's scenes."""
    store = Path(store)
    study: StudyConfig = recorded_config(store)
    config = config or study.massbalance
    state = read_state(store)
    if not _has_group(store, "stats") or not _has_group(store, "hypsometry"):
        raise StoreError(
            f"{store}: no binned statistics (groups 'stats' and 'hypsometry'). "
            f"Run `mbcube bin {store}` first."
        )
    cube = open_cube(store)
    stats = xr.open_zarr(str(store), group="stats", chunks=None)
    stats = stats.transpose("scene", "glacier", "bin", "surface", ...)
    hyps = xr.open_zarr(str(store), group="hypsometry", chunks=None)
    hyps = hyps.transpose("glacier", "bin", "surface", ...)
    # the cube's complete scenes that have statistics
    scene_ids = [str(s) for s in cube["scene"].values]
    binned = stats["binned"].values if "binned" in stats else np.ones(stats.sizes["scene"])
    have = {str(s) for s, b in zip(stats["scene"].values, binned, strict=True) if b == 1}
    scenes = [s for s in scene_ids if s in have]
    cube_scenes = cube[["scene_years", "scene_month", "scene_date"]].sel(scene=scenes)
    stats = stats.sel(scene=scenes)
    glacier = cube["glacier"].values
    stats = stats.reindex(glacier=glacier, fill_value=0)
    hyps = hyps.reindex(glacier=glacier, bin=stats["bin"], surface=stats["surface"], fill_value=0)
    years = cube_scenes["scene_years"].values.astype(float)
    months = cube_scenes["scene_month"].values.astype(int)

    key = _cache_key(store, state, scenes, config)
    combined = _read_cache(store, key, glacier, stats["bin"].values, len(scenes))
    if combined is None:
        combined = _combine(stats, hyps, years, months, config)
        if key is not None:
            _write_cache(store, key, combined, glacier, stats, scenes)

    stable_n = np.nan_to_num(stats["stable_count"].values.astype(float))
    stable_mean, stable_sigma = stable_moments(
        stable_n,
        np.nan_to_num(stats["stable_sum_dh_m"].values),
        np.nan_to_num(stats["stable_sumsq_dh_m2"].values),
    )
    if "stable_nmad_dh_m" in stats:  # robust to the heavy tails of stable-ground dh
        nmad = stats["stable_nmad_dh_m"].values.astype(float)
        stable_sigma = np.where(np.isfinite(nmad), nmad, stable_sigma)
    pixel_size = float(grid_of(state).res)
    datum = datum_sigma_m(
        stable_n,
        np.nan_to_num(stable_mean),
        np.nan_to_num(stable_sigma),
        pixel_size,
        config.autocorrelation_m,
    )

    table = cube[[v for v in cube.data_vars if cube[v].dims == ("glacier",)]]
    outline_surge = (
        table["glacier_surge"].values.astype(int)
        if "glacier_surge" in table
        else np.full(len(glacier), -1)
    )
    candidates = surge_candidates(
        combined,
        stats["bin"].values.astype(float),
        config.bin_width_m,
        config.min_px_per_bin,
    )
    surge = effective_surge(outline_surge, candidates)
    attributes = {
        str(name)[len("glacier_attr_") :]: _plain(table[name].values)
        for name in table.data_vars
        if str(name).startswith("glacier_attr_")
    }
    centroids = np.column_stack(
        [table["glacier_centroid_x_m"].values, table["glacier_centroid_y_m"].values]
    )
    grid = grid_of(state)
    ingest_regions = _recorded_file(state, "regions")
    pen_sigma = np.zeros(len(glacier))
    pen_std: np.ndarray | None = None
    if _has_group(store, "penetration"):
        region_index = np.zeros(len(glacier), dtype=int)
        if ingest_regions is not None:
            polygons = read_polygons(ingest_regions, grid.crs, study.region_name_column)
            found = from_polygons(
                polygons, study.region_name_column, centroids_xy=centroids, how="centroid"
            ).membership
            region_index = np.where(found.any(axis=0), found.argmax(axis=0) + 1, 0)
        table_ds = xr.open_zarr(str(store), group="penetration")
        pen_sigma = _penetration_sigma(
            table_ds["penetration_sigma_m"], combined, region_index, stats["bin"]
        )
        if "penetration_std_m" in table_ds:
            pen_std = _penetration_sigma(
                table_ds["penetration_std_m"], combined, region_index, stats["bin"]
            )
    return StoredStats(
        glacier=glacier,
        ids=np.array([str(v) for v in table["glacier_rgi_id"].values], dtype=object),
        surge=surge,
        surge_candidate=candidates,
        centroids_xy=centroids,
        attributes=attributes,
        stats=combined,
        penetration_sigma_m=pen_sigma,
        penetration_std_m=pen_std,
        bin_lower_m=stats["bin"].values.astype(float),
        scene_ids=np.asarray(scenes, dtype=object),
        scene_dates=cube_scenes["scene_date"].values,
        scene_years=years,
        scene_month=months,
        stable_sigma_m=stable_sigma,
        datum_sigma_m=datum,
        pixel_size_m=pixel_size,
        reference_date=study.reference_date,
        crs=grid.crs,
        ingest_regions=ingest_regions,
        regions_recorded="regions" in state.get("static", {}).get("inputs", {}),
        outlines=_recorded_file(state, "glaciers"),
        id_column=study.glacier_id_column,
        config=config,
    )


def _combine(
    stats: xr.Dataset,
    hyps: xr.Dataset,
    years: np.ndarray,
    months: np.ndarray,
    config: MassBalanceConfig,
) -> GlacierStats:
    """Scene selection and combination, GLACIER_BLOCK glaciers at a time (bounded memory)."""
    blocks = []
    for start in range(0, stats.sizes["glacier"], GLACIER_BLOCK):
        part = slice(start, start + GLACIER_BLOCK)
        count = np.nan_to_num(stats["count"].isel(glacier=part).values).astype(float)
        sums = np.nan_to_num(stats["sum_dh_m"].isel(glacier=part).values)
        area = np.nan_to_num(hyps["area_m2"].isel(glacier=part).values.astype(float))
        n_px = np.nan_to_num(hyps["n_px"].isel(glacier=part).values.astype(float))
        use = select_scenes(count, months, area, config.scene_rule, config.min_px_per_bin)
        void = {
            name: np.nan_to_num(hyps[name].isel(glacier=part).values.astype(float))
            for name in ("void_area_m2", "void_px")
            if name in hyps
        }
        blocks.append(
            combine_scenes(count, sums, years, area, n_px, use, config.min_px_per_bin, **void)
        )
    return _concat(blocks, len(years), stats.sizes["bin"], stats.sizes["surface"])


#: The store group caching the glacier-level combined statistics (tiny: no scene x bin cells).
CACHE_GROUP = "massbalance_cache"
_CACHE_FIELDS = ("count", "weight", "rate_sum", "dh_sum", "area_m2", "n_px")


def _cache_key(
    store: Path, state: dict[str, Any], scenes: list[str], config: MassBalanceConfig
) -> str | None:
    """What the combined statistics depend on: each used scene's binning record (its token
    changes whenever the bin step rewrites it) and the combination parameters. None (no caching)
    when a scene has no binning record (statistics written by other means)."""
    records = state.get("steps", {}).get("bin", {})
    tokens = [records.get(s, {}).get("token") for s in scenes]
    if not scenes or any(t is None for t in tokens):
        return None
    key = {
        "scenes": scenes,
        "tokens": tokens,
        "scene_rule": config.scene_rule,
        "min_px_per_bin": config.min_px_per_bin,
    }
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_cache(
    store: Path, key: str | None, glacier: np.ndarray, bins: np.ndarray, n_scenes: int
) -> GlacierStats | None:
    if key is None or not _has_group(store, CACHE_GROUP):
        return None
    cache = xr.open_zarr(str(store), group=CACHE_GROUP, chunks=None)
    if (
        cache.attrs.get("key") != key
        or not np.array_equal(cache["glacier"].values, glacier)
        or not np.array_equal(cache["bin"].values, bins)
        or cache.sizes.get("scene", 0) != n_scenes
    ):
        return None
    values = {name: cache[name].values.astype(float) for name in _CACHE_FIELDS}
    return GlacierStats(
        **values,
        measured_px=cache["measured_px"].values.astype(float),
        scene_px=cache["scene_px"].values.astype(float),
        scene_weight=cache["scene_weight"].values.astype(float),
        void_area_m2=cache["void_area_m2"].values.astype(float),
        void_px=cache["void_px"].values.astype(float),
    )


def _write_cache(
    store: Path,
    key: str,
    combined: GlacierStats,
    glacier: np.ndarray,
    stats: xr.Dataset,
    scenes: list[str],
) -> None:
    dims3 = ("glacier", "bin", "surface")
    data: dict[str, Any] = {name: (dims3, getattr(combined, name)) for name in _CACHE_FIELDS}
    data |= {
        "measured_px": ("glacier", combined.measured_px),
        "void_area_m2": ("glacier", combined.void_area),
        "void_px": ("glacier", combined.void_pixels),
        "scene_px": (("scene", "glacier"), combined.scene_px),
        "scene_weight": (("scene", "glacier"), combined.scene_weight),
    }
    cache = xr.Dataset(
        data,
        coords={
            "glacier": glacier,
            "bin": stats["bin"].values,
            "surface": stats["surface"].values,
            "scene": np.array(scenes, dtype=object),
        },
        attrs={"key": key, "about": "mbcube aggregate: glacier statistics, scenes combined"},
    )
    try:
        write_dataset(cache, store, group=CACHE_GROUP, mode="w")
    except OSError as err:  # a read-only store: aggregate without the cache
        log.info("could not cache the combined statistics in %s: %s", store, err)


def _plain(values: np.ndarray) -> np.ndarray:
    """Text arrays (zarr's StringDType) as object arrays of str; numbers unchanged."""
    if values.dtype.kind in "biuf":
        return values
    return np.array([str(v) for v in values], dtype=object)


def _concat(blocks: list[GlacierStats], n_scenes: int, n_bins: int, n_surf: int) -> GlacierStats:
    if not blocks:
        empty = np.zeros((0, n_bins, n_surf))
        return GlacierStats(
            count=empty,
            weight=empty,
            rate_sum=empty,
            dh_sum=empty,
            area_m2=empty,
            n_px=empty,
            measured_px=np.zeros(0),
            scene_px=np.zeros((n_scenes, 0)),
            scene_weight=np.zeros((n_scenes, 0)),
        )
    fields = GlacierStats.__dataclass_fields__
    values = {
        name: np.concatenate(
            [getattr(b, name) for b in blocks], axis=1 if name.startswith("scene_") else 0
        )
        for name in fields
    }
    return GlacierStats(**values)


def _penetration_sigma(
    table: xr.DataArray, stats: GlacierStats, region_index: np.ndarray, bins: xr.DataArray
) -> np.ndarray:
    """Area-weighted value (m) of a penetration-table variable (region, surface, bin) over each
    glacier's bins and surfaces, from the glacier's region (index 1..R by centroid in the ingest's
    region polygons; 0 is the table's pooled region, used for glaciers outside every region).
    Bins beyond the table's range take its end bins (as the correction's lookup does)."""
    values = table.transpose("region", "bin", "surface").sortby("bin")
    values = values.reindex(bin=bins.values, method="nearest")
    regions = [int(r) for r in values["region"].values]
    pooled = values.sel(region=0) if 0 in regions else values.mean("region")
    per_cell = np.empty(stats.area_m2.shape)
    for r in np.unique(region_index):
        own = values.sel(region=int(r)).fillna(pooled) if int(r) in regions else pooled
        per_cell[region_index == r] = np.nan_to_num(own.values)
    area = stats.area_m2
    total = area.sum(axis=(1, 2))
    return np.divide(
        (per_cell * area).sum(axis=(1, 2)), total, out=np.zeros_like(total), where=total > 0
    )


def _results(
    data: StoredStats, units: GlacierStats, pen_sigma: np.ndarray, pen_std: np.ndarray | None
) -> dict[str, np.ndarray]:
    c = data.config
    out = balance(units, data.bin_lower_m, c.bin_width_m, c.min_px_per_bin, c.density_kg_m3)
    errors = unit_uncertainty(
        out["dhdt_m_yr"],
        units.scene_weight,
        units.scene_px,
        units.measured_px,
        pen_sigma,
        data.scene_years,
        data.scene_month,
        data.stable_sigma_m,
        data.datum_sigma_m,
        data.pixel_size_m,
        penetration_std_m=pen_std,
        density_kg_m3=c.density_kg_m3,
        density_sigma_kg_m3=c.density_sigma_kg_m3,
        autocorrelation_m=c.autocorrelation_m,
        autocorrelation_penetration_m=c.autocorrelation_penetration_m,
        seasonal_sigma_m_per_month=c.seasonal_sigma_m_per_month,
    )
    return out | errors


def _periods(data: StoredStats) -> np.ndarray:
    """Per glacier 'start/end' in ISO dates, oldest first: the reference date and the scene date;
    'ref/first..last' when the glacier's scenes have several dates (reversed for scenes older
    than the reference)."""
    used = data.stats.scene_px > 0  # (S, G)
    dates = pd.to_datetime(data.scene_dates).strftime("%Y-%m-%d").to_numpy()
    ref = data.reference_date.isoformat()
    out = np.full(used.shape[1], "", dtype=object)
    for g in np.flatnonzero(used.any(axis=0)):
        own = sorted(set(dates[used[:, g]]))
        scenes = own[0] if len(own) == 1 else f"{own[0]}..{own[-1]}"
        out[g] = f"{ref}/{scenes}" if own[0] >= ref else f"{scenes}/{ref}"
    return out


def region_sets(data: StoredStats, regions: Path | None = None) -> list[RegionSet]:
    """The polygon regions (the file given, or the one recorded at ingest; first when present),
    then one set per glacier attribute of ATTRIBUTE_REGION_SETS."""
    how = data.config.region_assignment
    sets: list[RegionSet] = []
    source = regions or data.ingest_regions
    if source is not None:
        probe = read_polygons(source, data.crs, name_column=_name_column(source))
        outlines = None
        if how == "area_share":
            outlines = _outlines(data)
        sets.append(
            from_polygons(
                probe,
                _name_column(source),
                centroids_xy=data.centroids_xy,
                outlines=outlines,
                how=how,
            )
        )
    elif data.regions_recorded:
        warnings.warn(
            "the region file recorded at ingest is gone and no other was given: "
            "regions.csv holds the whole study and attribute regions only",
            MbcubeWarning,
            stacklevel=3,
        )
    for attribute in ATTRIBUTE_REGION_SETS:
        if attribute in data.attributes:
            sets.append(from_attribute(data.attributes[attribute]))
    return sets


def _joined(data: StoredStats, sets: list[RegionSet]) -> RegionSet:
    out = RegionSet([], np.zeros((0, len(data.glacier)), dtype=bool))
    for s in sets:
        out = out + s
    return out


def _name_column(path: Path) -> str:
    import pyogrio

    columns = list(pyogrio.read_info(path)["fields"])
    return "name" if "name" in columns else (columns[0] if columns else "name")


def _outlines(data: StoredStats) -> object:
    import geopandas as gpd

    if data.outlines is None:
        raise StoreError(
            "region_assignment 'area_share' needs the glacier outlines recorded at ingest, "
            "which are gone; use 'centroid' or restore the outline file."
        )
    outlines = gpd.read_file(data.outlines).to_crs(data.crs)
    outlines = outlines[outlines.geometry.notna() & ~outlines.geometry.is_empty]
    return outlines.geometry.make_valid().reset_index(drop=True)


def glacier_table(data: StoredStats, regions: RegionSet | None = None) -> pd.DataFrame:
    """One row per glacier: the columns GLACIER_COLUMNS after the id column; `regions` names
    each glacier's region (column `region`, '' for none)."""
    values = _results(data, data.stats, data.penetration_sigma_m, data.penetration_std_m)
    region = (
        regions.region_of() if regions is not None and regions.names else np.full(len(data.ids), "")
    )
    table = pd.DataFrame(
        {
            data.id_column: data.ids,
            "region": region,
            "surge": data.surge,
            "surge_candidate": data.surge_candidate.astype(int),
        }
    )
    for name in GLACIER_COLUMNS:
        if name in values:
            table[name] = values[name]
    table["n_scenes"] = (data.stats.scene_px > 0).sum(axis=0)
    table["period"] = _periods(data)
    return table[[data.id_column, *GLACIER_COLUMNS]]


def region_table(
    data: StoredStats, regions: RegionSet, glaciers: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Rows 'all' and one per region, each for all glaciers and without surge-type ones."""
    glaciers = glaciers if glaciers is not None else glacier_table(data, regions)
    regions = regions.with_all()
    keep = surge_free(data.surge)
    membership = np.vstack([regions.membership, regions.membership & keep[None, :]])
    labels = ["all"] * len(regions.names) + ["no_surge"] * len(regions.names)
    names = regions.names * 2
    units = sum_units(data.stats, membership, data.config.min_px_per_bin)
    area_g = data.stats.area_m2.sum(axis=(1, 2)) + data.stats.void_area

    def area_weighted_mean(per_glacier: np.ndarray) -> np.ndarray:
        return np.divide(
            membership @ (per_glacier * area_g),
            membership @ area_g,
            out=np.zeros(len(names)),
            where=membership @ area_g > 0,
        )

    pen_std = data.penetration_std_m
    values = _results(
        data,
        units,
        area_weighted_mean(data.penetration_sigma_m),
        None if pen_std is None else area_weighted_mean(pen_std),
    )
    _void_areas_at_glacier_means(data, values, units, glaciers, membership)
    mb_g = glaciers["mb_mwe_yr"].to_numpy()
    measured = np.isfinite(mb_g)
    weights = membership * (area_g * measured)[None, :]
    total_w = weights.sum(axis=1)
    area_weighted = np.divide(
        weights @ np.nan_to_num(mb_g), total_w, out=np.full(len(names), np.nan), where=total_w > 0
    )
    table = pd.DataFrame({"name": names, "glaciers": labels, "n_glaciers": membership.sum(axis=1)})
    for name in REGION_COLUMNS[3:]:
        table[name] = area_weighted if name == "mb_mwe_yr_area_weighted" else values[name]
    order = np.argsort(np.arange(len(names)) % len(regions.names), kind="stable")
    return table.iloc[order].reset_index(drop=True)[REGION_COLUMNS]


def _void_areas_at_glacier_means(
    data: StoredStats,
    values: dict[str, np.ndarray],
    units: GlacierStats,
    glaciers: pd.DataFrame,
    membership: np.ndarray,
) -> None:
    """Give each glacier's void area its own mean in the region values (in place)."""
    binned = units.area_m2.sum(axis=(1, 2))
    for column in ("dh_m", "dhdt_m_yr"):
        values[column] = with_void_area(
            values[column],
            binned,
            glaciers[column].to_numpy(dtype=float),
            data.stats.void_area,
            membership,
        )
    c = data.config
    dhdt, area_m2 = values["dhdt_m_yr"], values["area_km2"] * 1e6
    values["mb_mwe_yr"] = dhdt * c.density_kg_m3 / 1000.0
    values["volume_km3_yr"] = dhdt * area_m2 / 1e9
    values["mass_gt_yr"] = values["mb_mwe_yr"] * area_m2 / 1e9
    values["sigma_density_mwe_yr"] = np.abs(dhdt) * c.density_sigma_kg_m3 / 1000.0
    values["mb_sigma_mwe_yr"] = quadrature(*(values[k] for k in SIGMA_COLUMNS))


def aggregate(
    store: Path,
    out: Path,
    *,
    regions: Path | None = None,
    config: MassBalanceConfig | None = None,
) -> tuple[Path, Path]:
    """Write out/glaciers.csv and out/regions.csv (and .parquet) from the stored statistics.

    `regions`: polygons (column `name`) to aggregate into instead of the study's regions.
    `config`: mass-balance parameters (default: those recorded in the store). Reads no pixel.
    """
    data = load_stats(store, config)
    sets = region_sets(data, Path(regions) if regions is not None else None)
    polygons = sets[0] if sets and (regions is not None or data.ingest_regions) else None
    glaciers = glacier_table(data, polygons)
    table = region_table(data, _joined(data, sets), glaciers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    glaciers.to_csv(out / "glaciers.csv", index=False)
    table.to_csv(out / "regions.csv", index=False)
    glaciers.to_parquet(out / "glaciers.parquet", index=False)
    table.to_parquet(out / "regions.parquet", index=False)
    return out / "glaciers.csv", out / "regions.csv"


def mass_balance_dataset(store: Path | str, config: MassBalanceConfig | None = None) -> xr.Dataset:
    """The glacier table as a Dataset along `glacier` (the cube's glacier index), for `ds.mb`."""
    data = load_stats(Path(store), config)
    polygons = region_sets(data)[0] if data.ingest_regions is not None else None
    table = glacier_table(data, polygons)
    ds = xr.Dataset(
        {
            "glacier_rgi_id": ("glacier", data.ids.astype(object)),
            **{name: ("glacier", table[name].to_numpy()) for name in GLACIER_COLUMNS},
        },
        coords={"glacier": data.glacier},
    )
    ds["region"] = ds["region"].astype(object)
    ds["period"] = ds["period"].astype(object)
    units = {"area_km2": "km2", "dh_m": "m", "dhdt_m_yr": "m/yr", "volume_km3_yr": "km3/yr"}
    for name in ds.data_vars:
        key = str(name)
        if key.endswith("mwe_yr"):
            ds[key].attrs["units"] = "m w.e./yr"
        elif key in units:
            ds[key].attrs["units"] = units[key]
        elif key == "mass_gt_yr":
            ds[key].attrs["units"] = "Gt/yr"
    ds.attrs["scene_rule"] = data.config.scene_rule
    ds.attrs["density_kg_m3"] = data.config.density_kg_m3
    return ds


def regions_dataset(
    store: Path | str,
    config: MassBalanceConfig | None = None,
    regions: Path | RegionSet | None = None,
) -> xr.Dataset:
    """The region table as a Dataset with dims (region, glaciers), glaciers = all | no_surge.

    `regions`: a polygon file, or a RegionSet (e.g. `mbcube.regions.from_ids`, glaciers in the
    cube's order); default: the study's regions and basins. Region 'all' is the whole study."""
    data = load_stats(Path(store), config)
    if isinstance(regions, RegionSet):
        sets = [regions]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MbcubeWarning)
            sets = region_sets(data, None if regions is None else Path(regions))
    table = region_table(data, _joined(data, sets), glacier_table(data))
    names = list(dict.fromkeys(table["name"]))
    table = table.set_index(["name", "glaciers"])
    ds = xr.Dataset(
        {
            column: (
                ("region", "glaciers"),
                np.array([[table.loc[(n, g), column] for g in ("all", "no_surge")] for n in names]),
            )
            for column in REGION_COLUMNS[2:]
        },
        coords={"region": np.array(names, dtype=object), "glaciers": ["all", "no_surge"]},
    )
    ds.attrs["scene_rule"] = data.config.scene_rule
    ds.attrs["density_kg_m3"] = data.config.density_kg_m3
    return ds
