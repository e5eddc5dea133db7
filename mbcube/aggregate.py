"""Glacier and region tables from the stored statistics (`mbcube aggregate`); reads no pixel.

Reads the `stats` and `hypsometry` groups (and `penetration` when present), the scene coordinates
and the glacier table of the cube, never a (y, x) layer. Region polygons are read from the file
given, or from the region file recorded at ingest; a glacier attribute `basin` (when the outlines
have one) gives a second region set. The tables:

- glaciers.csv: one row per glacier (id column as in the outlines, `glacier_id_column`); its
  `region` column names the glacier's region in the study's own region polygons (the file
  recorded at ingest), whatever region file `aggregate` is given, so the glacier tables do not
  change with the region set. Also glaciers.parquet, and glaciers.gpkg: the outlines recorded at
  ingest (their CRS, their id column) joined with the table's columns, written when the outline
  file is still there and unchanged (a warning says why it is not written otherwise).
- regions.csv: a row `all` for the whole study and one per region / basin, each for all glaciers
  and without surge-type glaciers (column `glaciers`: all | no_surge). `mb_mwe_yr` is the
  hypsometric mean of the region's summed statistics (as the paper); `mb_mwe_yr_area_weighted`
  the area-weighted mean of its measured glaciers' values. With a region file given, also
  region_members.csv: each glacier's region in that file's polygons.

Both tables are also written as Parquet beside the CSV files.

Cost. The glacier-level statistics (scenes combined by `scene_rule`; no scene dimension) and the
glacier results are cached in the store's group `massbalance_cache`: the statistics keyed by the
bin step's record of every scene and the combination parameters (scene_rule, min_px_per_bin,
min_measured_frac_per_bin), the results also by every mass-balance parameter and the ingest's
static inputs. The statistics are
kept per non-empty (glacier, bin, surface) cell (`CellStats`: a glacier covers a few of the
study's bins), chunked along cells, so the cache is small and read in bounded memory; it is three
uncompressed zarr arrays, read straight from their chunk files (`_read_plain`: a one-chunk array
is its file mapped read-only; zarr reads any other layout), and the facts its keys are read from
(scenes ingested and binned, the stored reference bound) are kept with it and read again only
when their arrays' files change (FACT_ARRAYS). Then:

- a new region file (`aggregate --regions`) with the cache current and the glacier tables in the
  output folder current (their record `.mbcube-tables.json` matches the cache): only the region
  tables are computed and written: region sums of the cached cells over atoms of glaciers with
  the same regions (`mbcube.unit_sums`), no glacier balance, no scene statistics, no pixel;
- another density / uncertainty parameter: glacier results from the cached cells;
- a re-binned scene or another scene rule: the scene statistics are combined again, read one
  stored chunk (scene x glacier slab) at a time and kept per cell, then blocks of glaciers
  (~256 MB of dense scene statistics) are combined: memory bounded by the non-empty cells and one
  stored chunk, not by scenes x glaciers x bins (the bin step stores one chunk per scene today).

Statistics written without bin step records are never cached.

Errors. Glacier and region results, every error term included, come from
`mbcube.massbalance.unit_results` (the error model of `mbcube.uncertainty`): each term is a
column (SIGMA_COLUMNS, m w.e./yr), `mb_sigma_mwe_yr` their quadrature sum. The unmeasured-area
term needs each cell's measured pixels (`measured_bin_px`, the pixels its best-covering scene
measured), which the cells keep and a region sums over its glaciers' measured cells. Per scene,
the stable-ground spread (stats: stable_nmad_dh_m) is split into a white and a correlated part
with the stored block statistic (stats: stable_block_*, `white_correlated_split`); the bound of
the reference DEM's error is the `penetration` group's scalar reference_sigma_m when stored
(MassBalanceConfig.reference_sigma_m, when set, wins); the between-glacier penetration spread
is its penetration_std_m (region x surface x bin, area-weighted per glacier) when stored. When
the group's attribute glacier_adjustment_applied is 1 (per-glacier offsets applied:
corrections.penetration 'xband_glacier', or the region pooling's moves of glaciers without X
band, which have k = 0), a glacier with a surface of weight k > 0 (glacier_penetration_weight) is
"adjusted": its reference and spread errors are replaced by glacier_penetration_sigma_m
area-weighted over its surfaces (in sigma_penetration_mwe_yr; `mbcube.uncertainty`), and the
table error of each cell is scaled by (1 - k) of its glacier and surface; a region sums its
adjusted glaciers' errors as independent beyond autocorrelation_penetration_m
(`mbcube.uncertainty.adjusted_units`, by glacier centroids), its other glaciers as before.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import json
import logging
import mmap
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from mbcube.config import MassBalanceConfig, StudyConfig
from mbcube.errors import MbcubeWarning, StoreDamaged, StoreError, StoreLocked
from mbcube.fingerprints import fingerprint, same_input
from mbcube.massbalance import (
    GlacierStats,
    combine_scenes,
    confirmed_cycles,
    cross_scene_doubt,
    select_scenes,
    unit_results,
    with_void_area,
)
from mbcube.regions import (
    RegionSet,
    assign,
    from_attribute,
    from_polygons,
    read_polygon_arrays,
    read_polygons,
    surge_free,
)
from mbcube.store import (
    SCHEMA_VERSION,
    damaged_outputs,
    grid_of,
    holds_lock,
    list_outputs,
    open_cube,
    read_state,
    step_record,
    step_records,
    write_dataset,
    writer_lock,
)
from mbcube.store.location import RESULTS_MARKER, out_problems, recorded_study
from mbcube.store.lock import writer_lock_if_writable
from mbcube.surge import effective_surge, surge_candidates
from mbcube.uncertainty import (
    adjusted_units,
    datum_sigma_m,
    quadrature,
    stable_moments,
    unwrap_sigma_m_yr,
    white_correlated_split,
)
from mbcube.unit_sums import UNIT_FIELDS, Units

__all__ = [
    "GLACIER_COLUMNS",
    "REGION_COLUMNS",
    "CellStats",
    "StoredStats",
    "aggregate",
    "glacier_table",
    "load_stats",
    "mass_balance_dataset",
    "region_sets",
    "region_table",
    "regions_dataset",
    "sum_cells",
]

SIGMA_COLUMNS = [
    "sigma_random_mwe_yr",
    "sigma_penetration_mwe_yr",
    "sigma_datum_mwe_yr",
    "sigma_seasonal_mwe_yr",
    "sigma_unmeasured_mwe_yr",
    "sigma_density_mwe_yr",
    "sigma_unwrap_mwe_yr",
]
#: Flag of a glacier whose cycle is in doubt (`mbcube.unwrap.profiles.FLAG_DOUBT`).
FLAG_DOUBT = 2
#: Per glacier: what the unwrapping found (`mbcube.unwrap.profiles`), over the used scenes.
UNWRAP_COLUMNS = [
    "unwrap_flag",
    "unwrap_prior",
    "unwrap_repaired_area_km2",
    "unwrap_doubt_area_km2",
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
    *UNWRAP_COLUMNS,
]  # preceded by the id column
#: Glacier results computed from the statistics (cached with them).
RESULT_COLUMNS = [
    "area_km2",
    "coverage_frac",
    "dh_m",
    "dhdt_m_yr",
    "mb_mwe_yr",
    "mb_sigma_mwe_yr",
    *SIGMA_COLUMNS,
    "volume_km3_yr",
    "mass_gt_yr",
    "filled_frac",
    *UNWRAP_COLUMNS,
]
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
#: Glaciers balanced per block (glacier results, surge candidates): block x B x F float64 arrays.
GLACIER_BLOCK = 4096
#: The store group caching the glacier-level statistics and results.
CACHE_GROUP = "massbalance_cache"
#: Layout version of the cache (a cache of another layout is recomputed).
CACHE_VERSION = 13
#: Cells per chunk of the cache (8 bytes x 2^18 = 2 MiB per field and chunk).
CELL_CHUNK = 1 << 18
#: The output folder's record of the glacier tables it holds.
TABLES_RECORD = RESULTS_MARKER
_CELL_FIELDS = ("count", "weight", "rate_sum", "dh_sum", "area_m2", "n_px", "measured_bin_px")


# ----------------------------------------------------------------- statistics per non-empty cell


@dataclass(frozen=True)
class CellStats:
    """`GlacierStats` of G glaciers kept per non-empty (glacier, bin, surface) cell.

    glacier (C,) glacier position 0..G-1 (non-decreasing), cell (C,) bin x n_surfaces + surface
    position; values: the per-cell fields of GlacierStats (count, weight, rate_sum (m/yr x
    weight), dh_sum (m x weight), area_m2 (m2), n_px, measured_bin_px (pixels the best-covering
    scene measured; 0 in unmeasured cells)) as (C,) float64; per glacier (G,)
    measured_px, void_area_m2 (m2), void_px; per scene and glacier (S, G) scene_px, scene_weight.
    """

    glacier: np.ndarray
    cell: np.ndarray
    values: dict[str, np.ndarray]
    measured_px: np.ndarray
    void_area_m2: np.ndarray
    void_px: np.ndarray
    scene_px: np.ndarray
    scene_weight: np.ndarray
    n_bins: int
    n_surfaces: int
    #: (S, G) pixels of each scene in cells where it disagrees with the other scenes by a
    #: cycle (`mbcube.massbalance.cross_scene_doubt`); None: not compared
    scene_doubt_px: np.ndarray | None = None
    #: (S, G) 1 where another scene confirms the scene's whole cycle on the glacier
    #: (`mbcube.massbalance.confirmed_cycles`); None: not compared
    scene_confirmed: np.ndarray | None = None

    @property
    def n_glaciers(self) -> int:
        return len(self.measured_px)

    @classmethod
    def from_dense(cls, stats: GlacierStats) -> CellStats:
        """The non-empty cells of `stats` (a cell is kept when any field is non-zero)."""
        n, n_bins, n_surf = stats.count.shape
        flat = {k: _cell_field(stats, k).reshape(n, -1) for k in _CELL_FIELDS}
        keep = np.zeros(flat["count"].shape, dtype=bool)
        for v in flat.values():
            keep |= v != 0
        g, c = np.nonzero(keep)
        return cls(
            glacier=g.astype(np.int64),
            cell=c.astype(np.int64),
            values={k: v[g, c] for k, v in flat.items()},
            measured_px=np.asarray(stats.measured_px, dtype=float),
            void_area_m2=np.asarray(stats.void_area, dtype=float),
            void_px=np.asarray(stats.void_pixels, dtype=float),
            scene_px=np.asarray(stats.scene_px, dtype=float),
            scene_weight=np.asarray(stats.scene_weight, dtype=float),
            n_bins=n_bins,
            n_surfaces=n_surf,
        )

    @classmethod
    def concat(cls, parts: list[CellStats], n_scenes: int, n_bins: int, n_surf: int) -> CellStats:
        """Glacier blocks in order into one (glacier positions shifted)."""
        offsets = np.cumsum([0, *[p.n_glaciers for p in parts]])
        cat = functools.partial(np.concatenate, axis=0)
        return cls(
            glacier=cat([p.glacier + o for p, o in zip(parts, offsets, strict=False)])
            if parts
            else np.zeros(0, np.int64),
            cell=cat([p.cell for p in parts]) if parts else np.zeros(0, np.int64),
            values={
                k: cat([p.values[k] for p in parts]) if parts else np.zeros(0) for k in _CELL_FIELDS
            },
            measured_px=cat([p.measured_px for p in parts]) if parts else np.zeros(0),
            void_area_m2=cat([p.void_area_m2 for p in parts]) if parts else np.zeros(0),
            void_px=cat([p.void_px for p in parts]) if parts else np.zeros(0),
            scene_px=np.concatenate([p.scene_px for p in parts], axis=1)
            if parts
            else np.zeros((n_scenes, 0)),
            scene_weight=np.concatenate([p.scene_weight for p in parts], axis=1)
            if parts
            else np.zeros((n_scenes, 0)),
            n_bins=n_bins,
            n_surfaces=n_surf,
            scene_doubt_px=np.concatenate([p.scene_doubt_px for p in parts], axis=1)
            if parts and all(p.scene_doubt_px is not None for p in parts)
            else None,
            scene_confirmed=np.concatenate([p.scene_confirmed for p in parts], axis=1)
            if parts and all(p.scene_confirmed is not None for p in parts)
            else None,
        )

    def dense(self, start: int = 0, stop: int | None = None) -> GlacierStats:
        """Glaciers start..stop as dense GlacierStats ((stop - start) x bins x surfaces)."""
        stop = self.n_glaciers if stop is None else min(stop, self.n_glaciers)
        lo, hi = np.searchsorted(self.glacier, [start, stop])
        n, width = stop - start, self.n_bins * self.n_surfaces
        rows, cols = self.glacier[lo:hi] - start, self.cell[lo:hi]
        fields: dict[str, Any] = {}
        for k in _CELL_FIELDS:
            arr = np.zeros((n, width))
            arr[rows, cols] = self.values[k][lo:hi]
            fields[k] = arr.reshape(n, self.n_bins, self.n_surfaces)
        return GlacierStats(
            **fields,
            measured_px=self.measured_px[start:stop],
            scene_px=self.scene_px[:, start:stop],
            scene_weight=self.scene_weight[:, start:stop],
            void_area_m2=self.void_area_m2[start:stop],
            void_px=self.void_px[start:stop],
        )

    def blocks(self, size: int = GLACIER_BLOCK) -> Iterator[tuple[slice, GlacierStats]]:
        """(glacier slice, dense statistics of those glaciers), `size` glaciers at a time."""
        for start in range(0, self.n_glaciers, size):
            stop = min(start + size, self.n_glaciers)
            yield slice(start, stop), self.dense(start, stop)

    def glacier_sum(self, field: str) -> np.ndarray:
        """(G,) sum of a cell field over each glacier's bins and surfaces."""
        return np.bincount(self.glacier, self.values[field], minlength=self.n_glaciers)

    @functools.cached_property
    def glacier_area_m2(self) -> np.ndarray:
        """(G,) each glacier's binned area (m2): its cells' area_m2 summed."""
        return self.glacier_sum("area_m2")


def sum_cells(cells: CellStats, units: Units, min_px_per_bin: int = 10) -> GlacierStats:
    """`mbcube.massbalance.sum_units` on per-cell statistics: the statistics of `units` (regions)
    made of glaciers. Region-level hypsometric averaging: per (bin, surface) the area-weighted
    mean of the member glaciers' means over the glaciers measured there (>= min_px_per_bin);
    pixel sums summed (measured_bin_px over those measured cells); scene weights area-weighted
    means. Only the non-empty cells are touched, summed per atom of glaciers with the same units
    (`mbcube.unit_sums`), not glaciers x bins."""
    shape = (cells.n_bins, cells.n_surfaces)
    summed = units.cell_sums(
        cells.glacier, cells.cell, cells.values, cells.n_bins * cells.n_surfaces, min_px_per_bin
    )
    summed = summed.reshape(units.n_units, len(UNIT_FIELDS), *shape)
    area_g = cells.glacier_area_m2
    area_u = units.sum(area_g)
    weighted = units.sum(cells.scene_weight, factor=area_g)
    scene_weight = np.divide(
        weighted, area_u[None, :], out=np.zeros_like(weighted), where=area_u[None, :] > 0
    )
    per_glacier = units.sum(np.stack([cells.measured_px, cells.void_area_m2, cells.void_px]))
    return GlacierStats(
        count=summed[:, 0],
        weight=summed[:, 1],
        rate_sum=summed[:, 2],
        dh_sum=summed[:, 3],
        area_m2=summed[:, 4],
        n_px=summed[:, 5],
        measured_px=per_glacier[0],
        scene_px=units.sum(cells.scene_px),
        scene_weight=scene_weight,
        void_area_m2=per_glacier[1],
        void_px=per_glacier[2],
        measured_bin_px=summed[:, 6],
    )


def _cell_field(stats: GlacierStats, name: str) -> np.ndarray:
    """A per-cell field of `stats` as float64 (measured_bin_px: set by GlacierStats itself)."""
    if name == "measured_bin_px":
        return np.asarray(stats.measured_bin_px_or_zero, dtype=float)
    return np.asarray(getattr(stats, name), dtype=float)


# ---------------------------------------------------------------------------- stored statistics


@dataclass(frozen=True)
class StoredStats:
    """Everything the tables need, read from the store (glacier-level, small)."""

    glacier: np.ndarray  #: (G,) glacier index (1..N, as in the cube's glacier_id)
    ids: np.ndarray  #: (G,) glacier ids (the outlines' id column)
    surge: np.ndarray  #: (G,) int 0/1: the outlines' surge column where given, else the candidate
    surge_candidate: np.ndarray  #: (G,) bool: active-surge pattern in the dh profile (mbcube.surge)
    centroids_xy: np.ndarray  #: (G, 2) glacier centroids in the grid CRS (m)
    attributes: dict[str, np.ndarray]  #: other outline columns, by name
    cells: CellStats  #: scenes combined by the configured rule, per non-empty cell
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
    outlines: Path | None  #: the outline file recorded at ingest, if it still exists unchanged
    id_column: str
    config: MassBalanceConfig
    #: (G,) glacier results by column (RESULT_COLUMNS), as cached; None: computed on demand
    results: dict[str, np.ndarray] | None = None
    #: what the results depend on (statistics, parameters, static inputs); None: not cacheable
    results_key: str | None = None
    #: the ingest recorded an outline file (`outlines` is None when it is gone or changed)
    outlines_recorded: bool = False
    #: (S,) white part of stable_sigma_m (m; `mbcube.uncertainty.white_correlated_split` of the
    #: stored block statistic); None: all of it correlated
    stable_white_sigma_m: np.ndarray | None = None
    #: bound (m) of the reference DEM's error stored with the penetration table (the stable
    #: NMAD of SRTM-X minus SRTM-C); None: not stored
    reference_sigma_m: float | None = None
    #: (G,) error (m) of the reference surface of glaciers with their own X-band offset
    #: (glacier_penetration_sigma_m area-weighted over surfaces; NaN: no offset on the glacier);
    #: None: the store applies no offsets (`mbcube.uncertainty`)
    adjusted_sigma_m: np.ndarray | None = None
    #: (S, G) per scene and glacier: the unwrap step's `mbcube.unwrap.repair.GLACIER_VARIABLES`
    #: of the used scenes; None: no insar scene was unwrapped
    unwrap: dict[str, np.ndarray] | None = None

    @functools.cached_property
    def stats(self) -> GlacierStats:
        """All glaciers' statistics, dense (G x bins x surfaces; `cells` is the compact form)."""
        return self.cells.dense()

    def glacier_results(self) -> dict[str, np.ndarray]:
        """(G,) glacier results by column: the cached ones, else computed per glacier block."""
        if self.results is not None:
            return self.results
        parts = []
        std = self.penetration_std_m
        adj = self.adjusted_sigma_m
        for part, block in self.cells.blocks():
            parts.append(
                _results(
                    self,
                    block,
                    self.penetration_sigma_m[part],
                    None if std is None else std[part],
                    None
                    if adj is None
                    else (np.isfinite(adj[part]).astype(float), np.nan_to_num(adj[part])),
                )
            )
        results = {
            k: np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)
            for k in RESULT_COLUMNS
            if k not in UNWRAP_COLUMNS and k != "sigma_unwrap_mwe_yr"
        }
        return _with_unwrap(self, results)


def _has_group(store: Path, group: str) -> bool:
    return (Path(store) / group / "zarr.json").exists()


def _recorded_file(state: dict[str, Any], role: str, unchanged: bool = False) -> Path | None:
    """The static input file of `role` recorded at ingest, in the study folder where the last
    ingest found it, if it is still there (and, with unchanged, still has the recorded content:
    its size and mtime as recorded, else its digest; `mbcube.fingerprints`)."""
    recorded = state.get("static_files", {}).get(role)
    root = state.get("study", {}).get("root")
    if not isinstance(recorded, dict) or not root:
        return None
    path = Path(root) / str(recorded.get("path", ""))
    if not path.is_file():
        return None
    if unchanged and not same_input(fingerprint(path, Path(root), recorded), recorded):
        return None
    return path


def _text(values: Any) -> np.ndarray:
    return np.array([str(v) for v in np.asarray(values)], dtype=object)


@dataclass(frozen=True)
class _Keys:
    """The scenes with statistics and the cache keys of a store (read without xarray);
    `facts`: what was read from the store's arrays, with their FACT_ARRAYS fingerprint."""

    scenes: list[str]
    stats_key: str | None
    results_key: str | None
    facts: dict[str, Any]


#: The arrays the cache keys are read from (besides the state): the scene ids and ingest
#: flags, the binned scenes and flags, the bin step's records, the stored reference bound.
FACT_ARRAYS = (
    "scene",
    "scene_state",
    "stats/scene",
    "stats/binned",
    "records/bin",
    "penetration/reference_sigma_m",
)


def _fingerprint(store: Path) -> str:
    """A digest of the (path, size, mtime_ns) of every file of FACT_ARRAYS: zarr writes each
    chunk and metadata document as a new file, so any write to them changes it."""
    files = []
    for name in FACT_ARRAYS:
        for root, _, names in os.walk(store / name):
            for n in names:
                path = os.path.join(root, n)
                info = os.stat(path)
                files.append((os.path.relpath(path, store), info.st_size, info.st_mtime_ns))
    return _digest(sorted(files))


def _facts(store: Path, known: dict[str, Any]) -> dict[str, Any]:
    """The scenes ingested completely and binned, and the stored reference bound (m): from
    `known` (the cache's record) when the arrays' fingerprint is unchanged, else read."""
    stamp = _fingerprint(store)
    if known.get("fingerprint") == stamp and "tokens" in known:
        return known
    # arrays opened by path: opening a group through zarr parses all its members' metadata
    ids = _text(_read(store / "scene")) if _is_array(store / "scene") else np.zeros(0, object)
    state_path = store / "scene_state"
    done = _read(state_path) == 1 if _is_array(state_path) else np.ones(len(ids), bool)
    binned_ids = _text(_read(store / "stats" / "scene"))
    flags = store / "stats" / "binned"
    binned = _read(flags) if _is_array(flags) else np.ones(len(binned_ids))
    have = {s for s, b in zip(binned_ids, binned, strict=True) if b == 1}
    scenes = [str(s) for s, ok in zip(ids, done, strict=True) if ok and str(s) in have]
    records = step_records(store, "bin")
    return {
        "fingerprint": stamp,
        "scenes": scenes,
        "tokens": [records.get(s, {}).get("token") for s in scenes],
        "reference_sigma_m": _stored_reference_sigma(store),
    }


def _keys(
    store: Path, state: dict[str, Any], config: MassBalanceConfig, known: dict[str, Any]
) -> _Keys:
    """The cache keys; `known`: the facts recorded with the cache ({} when none)."""
    facts = _facts(store, known)
    scenes = list(facts["scenes"])
    tokens = list(facts["tokens"])
    if not scenes or any(t is None for t in tokens):
        return _Keys(scenes, None, None, facts)
    combination = {
        "version": CACHE_VERSION,
        "scenes": scenes,
        "tokens": tokens,
        "scene_rule": config.scene_rule,
        "min_px_per_bin": config.min_px_per_bin,
        "min_measured_frac_per_bin": config.min_measured_frac_per_bin,
    }
    stats_key = _digest(combination)
    results = {
        "stats": stats_key,
        "massbalance": config.model_dump(mode="json"),
        "study": state.get("study", {}).get("config"),
        "static": state.get("static_inputs"),
        "reference_sigma_m": facts["reference_sigma_m"],
        # the penetration table's record (its token changes whenever it is recomputed, e.g.
        # with its spread or reference bound): the results read its sigma and spread
        "penetration": step_record(store, *PENETRATION_RECORD).get("token"),
    }
    return _Keys(scenes, stats_key, _digest(results), facts)


#: (step, id) of the penetration table's record (mbcube.corrections.step.STEP, TABLE_ID; not
#: imported: aggregate's fast path does not load the corrections).
PENETRATION_RECORD = ("correct", "_penetration_table")


def _is_array(path: Path) -> bool:
    return (path / "zarr.json").is_file()


def _stored_reference_sigma(store: Path) -> float | None:
    """The `penetration` group's reference_sigma_m (m: NMAD of SRTM-X minus SRTM-C on stable
    ground, a bound of the reference DEM's error), None when not stored or not positive."""
    path = Path(store) / "penetration" / "reference_sigma_m"
    if not _is_array(path):
        return None
    value = float(np.asarray(_read(path), dtype=float).reshape(-1)[0])
    return value if np.isfinite(value) and value > 0 else None


def _read(path: Path) -> np.ndarray:
    """A whole zarr array, opened by its path (no group metadata parsed)."""
    found = zarr.open_array(str(path), mode="r")
    return np.asarray(found[...])


def _read_by_chunk(path: Path, axis: int = 0) -> np.ndarray:
    """A whole zarr array read one chunk along `axis` at a time into one array (peak memory:
    the array and one chunk, where a single read holds decoded chunks and the result at once)."""
    found = zarr.open_array(str(path), mode="r")
    if found.ndim == 0:
        return np.asarray(found[...])
    step = max(int(found.chunks[axis]), 1)
    if step >= found.shape[axis]:
        return np.asarray(found[...])
    out = np.empty(found.shape, dtype=found.dtype)
    for start in range(0, found.shape[axis], step):
        part = (slice(None),) * axis + (slice(start, start + step),)
        out[part] = found[part]
    return out


#: zarr v3 data types read by `_read_plain` (little-endian numpy types).
_PLAIN_TYPES = frozenset(
    {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}
    | {"float32", "float64"}
)


def _plain_layout(meta: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], str] | None:
    """(shape, chunk shape, chunk key separator) of a zarr v3 array stored plain: regular
    chunks, default chunk keys, the `bytes` codec (little-endian) followed by the `crc32c`
    checksum (how mbcube writes uncompressed arrays), no storage transformer, a fixed-size
    numeric type; None for any other array."""
    try:
        grid, keys = meta["chunk_grid"], meta["chunk_key_encoding"]
        codecs = meta["codecs"]
        shape = tuple(int(n) for n in meta["shape"])
        chunks = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        separator = str(keys.get("configuration", {}).get("separator", "/"))
        plain = (
            meta.get("zarr_format") == 3
            and meta.get("node_type") == "array"
            and meta.get("data_type") in _PLAIN_TYPES
            and grid.get("name") == "regular"
            and keys.get("name") == "default"
            and separator in ("/", ".")
            and not meta.get("storage_transformers")
            and [c.get("name") for c in codecs] == ["bytes", "crc32c"]
            and codecs[0].get("configuration", {}).get("endian", "little") == "little"
            and len(chunks) == len(shape)
            and all(c > 0 for c in chunks)
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return (shape, chunks, separator) if plain else None


def _read_plain(path: Path, axis: int = 0) -> np.ndarray:
    """A whole zarr array read straight from its chunk files when it is stored plain
    (`_plain_layout`: how `_write_cache` writes the cache) and every chunk is there: the
    bytes are the array's, C order, edge chunks padded to the chunk shape (zarr v3), each
    followed by its CRC-32C, which is checked. An array of one chunk is that file mapped
    read-only (`_mapped`: no copy, no fresh memory); several chunks are copied into one array.
    Any other array, or a chunk missing (zarr's fill value) or of another size, is read by zarr
    (`_read_by_chunk`, one chunk along `axis` at a time).

    The fast path reads ~15 MB of cache for 10,000 glaciers: zarr's read costs ~3x np.fromfile,
    and the fresh pages of a copy cost more than the copy on a virtual machine."""
    try:
        meta = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError):
        meta = None
    layout = _plain_layout(meta) if isinstance(meta, dict) else None
    if layout is None:
        return _read_by_chunk(path, axis)
    shape, chunks, separator = layout
    dtype = np.dtype(str(meta["data_type"])).newbyteorder("<")
    nbytes = int(np.prod(chunks)) * dtype.itemsize
    counts = [-(-n // c) for n, c in zip(shape, chunks, strict=True)]
    out: np.ndarray | None = None
    for index in itertools.product(*(range(n) for n in counts)):
        block = _mapped(path / separator.join(["c", *map(str, index)]), dtype, nbytes)
        if block is None:  # not stored (zarr gives its fill value) or not a plain chunk
            return _read_by_chunk(path, axis)
        block = block.reshape(chunks)
        if shape == chunks:
            return block
        if out is None:
            out = np.empty(shape, dtype=dtype)
        part = tuple(
            slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(index, chunks, shape, strict=True)
        )
        out[part] = block[tuple(slice(0, p.stop - p.start) for p in part)]
    return out if out is not None else np.empty(shape, dtype=dtype)


def _mapped(path: Path, dtype: np.dtype, nbytes: int) -> np.ndarray | None:
    """The file's first `nbytes` as a read-only 1-D array of `dtype` mapped from the file, once
    its CRC-32C (the file's last 4 bytes) is checked (None when the file is missing or not
    `nbytes` + 4 long; StoreDamaged when the checksum differs). Safe against the cache being
    rewritten while mapped: zarr replaces or deletes chunk files (`_write_cache` rewrites the
    whole group), it never truncates a file in place, and a mapping keeps the old file's
    pages."""
    import google_crc32c  # zarr's own CRC-32C implementation (a dependency of zarr)

    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != nbytes + 4:
                return None
            found = mmap.mmap(f.fileno(), nbytes + 4, access=mmap.ACCESS_READ)
    except OSError:
        return None
    data = np.frombuffer(found, dtype=np.uint8, count=nbytes)
    if google_crc32c.value(data) != int.from_bytes(found[nbytes:], "little"):
        raise StoreDamaged(f"{path}: the chunk does not match its checksum (damaged on disk)")
    return data.view(dtype)


def _group_attrs(path: Path) -> dict[str, Any]:
    """A zarr group's attributes, straight from its zarr.json."""
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}
    return attrs if isinstance(attrs, dict) else {}


def _digest(value: object) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def load_stats(
    store: Path | str, config: MassBalanceConfig | None = None, *, cache: bool = True
) -> StoredStats:
    """Read the statistics of the cube at `store` and combine each glacier's scenes.

    From the store's cache when it is current (no scene statistics read), else from the `stats`
    and `hypsometry` groups (then cached, unless `cache` is False: readers such as `ds.mb`
    never write the store)."""
    store = Path(store)
    if not (store / "zarr.json").exists():
        open_cube(store)  # raises the store's own error
    state = read_state(store)
    if state.get("schema_version") != SCHEMA_VERSION:
        open_cube(store)  # raises the store's own error (no cube, or another schema)
    study = StudyConfig.model_validate(state["study"]["config"])
    config = config or study.massbalance
    if not _has_group(store, "stats") or not _has_group(store, "hypsometry"):
        raise StoreError(
            f"{store}: no binned statistics (groups 'stats' and 'hypsometry'). "
            f"Run `mbcube bin {store}` first."
        )
    cache_attrs = _group_attrs(store / CACHE_GROUP)
    known = cache_attrs.get("facts") or {}
    keys = _keys(store, state, config, known)
    cells, cached = _read_cache(store, state, study, config, keys, cache_attrs)
    if cached is not None:
        if cache and keys.facts is not known:  # read again, same keys: keep them
            _with_lock(store, lambda: _remember_facts(store, keys.facts))
        return cached
    if cells is None:
        _check_stats(store, keys.scenes)
    data = _from_statistics(store, state, study, config, keys, cells)
    data = replace(data, results=data.glacier_results())
    if cache and keys.stats_key is not None:
        _with_lock(store, lambda: _write_cache(store, data, keys))
    return data


def cache_problems(store: Path | str) -> list[str]:
    """What is wrong with the store's cached statistics (CACHE_GROUP) when they claim to be
    current: files lost or not decodable, or combined statistics and glacier results that
    differ from those made again from the `stats` and `hypsometry` groups. [] when there is no
    current cache (it is made again when needed)."""
    store = Path(store)
    attrs = _group_attrs(store / CACHE_GROUP)
    if not attrs.get("key") or not _has_group(store, "stats"):
        return []  # no cache (it is made when needed), or nothing binned yet
    state = read_state(store)
    study = StudyConfig.model_validate(state["study"]["config"])
    config = study.massbalance
    keys = _keys(store, state, config, {})
    if keys.stats_key is None or attrs.get("key") != keys.stats_key:
        return []
    cells, cached = _read_cache(store, state, study, config, keys, attrs)
    if cells is None:
        return [f"{CACHE_GROUP}: damaged (files lost or not decodable)"]
    fresh = _from_statistics(store, state, study, config, keys, None)
    problems = [
        f"{CACHE_GROUP}: cell field {name} differs from the stored statistics"
        for name in _CELL_FIELDS
        if not np.array_equal(cells.values[name], fresh.cells.values[name], equal_nan=True)
    ]
    if not np.array_equal(cells.glacier, fresh.cells.glacier) or not np.array_equal(
        cells.cell, fresh.cells.cell
    ):
        problems.append(f"{CACHE_GROUP}: its cells are not those of the stored statistics")
    if cached is not None and cached.results is not None:
        results = fresh.glacier_results()
        problems += [
            f"{CACHE_GROUP}: glacier result {name} differs from the stored statistics"
            for name in RESULT_COLUMNS
            if not np.allclose(cached.results[name], results[name], rtol=1e-12, equal_nan=True)
        ]
    return problems


def _with_lock(store: Path, write: Callable[[], None]) -> None:
    """Run `write` (a cache write into the store) under the store's writer lock, or skip it
    when another process writes the store (the results are the same, only not cached)."""
    if holds_lock(store):
        write()
        return
    try:
        with writer_lock(store):
            write()
    except (StoreLocked, OSError) as err:  # another writer, or a read-only store
        log.info("%s: the statistics are not cached (%s)", store, err)


def _check_stats(store: Path, scenes: list[str]) -> None:
    """Refuse statistics that lost files since the bin step wrote them (a deleted chunk would
    read as zeros: silently other numbers)."""
    records = step_records(store, "bin")
    for scene_id in scenes:
        damaged = damaged_outputs(store, records.get(scene_id, {}).get("outputs", {}))
        if damaged:
            raise StoreDamaged(
                f"{store}: the statistics of scene {scene_id} lost {len(damaged)} file(s) "
                f"since they were written ({damaged[0]}, ...). Repair: `mbcube bin {store} "
                f"--scene {scene_id} --force` (or `mbcube verify {store} --repair`, then run)."
            )


def _from_statistics(
    store: Path,
    state: dict[str, Any],
    study: StudyConfig,
    config: MassBalanceConfig,
    keys: _Keys,
    cells: CellStats | None,
) -> StoredStats:
    """The statistics from the `stats` / `hypsometry` groups (cells: already combined ones)."""
    cube = open_cube(store)
    stats = xr.open_zarr(str(store), group="stats", chunks=None)
    stats = stats.transpose("scene", "glacier", "bin", "surface", ...)
    scenes = keys.scenes
    cube_scenes = cube[["scene_years", "scene_month", "scene_date"]].sel(scene=scenes)
    glacier = cube["glacier"].values
    years = cube_scenes["scene_years"].values.astype(float)
    months = cube_scenes["scene_month"].values.astype(int)
    bins = stats["bin"].values.astype(float)
    unwrap = _unwrap_arrays(cube, scenes)
    if cells is None:
        cells = _combine(
            store,
            stats,
            glacier,
            scenes,
            years,
            months,
            config,
            None if unwrap is None else unwrap["unwrap_h_amb_m"],
        )
    scene_stats = stats[[v for v in stats.data_vars if stats[v].dims[:1] == ("scene",)]]
    scene_stats = scene_stats[[v for v in scene_stats.data_vars if "glacier" not in stats[v].dims]]
    scene_stats = scene_stats.sel(scene=scenes)
    stable_n = np.nan_to_num(scene_stats["stable_count"].values.astype(float))
    stable_mean, stable_sigma = stable_moments(
        stable_n,
        np.nan_to_num(scene_stats["stable_sum_dh_m"].values),
        np.nan_to_num(scene_stats["stable_sumsq_dh_m2"].values),
    )
    if "stable_nmad_dh_m" in scene_stats:  # robust to the heavy tails of stable-ground dh
        nmad = scene_stats["stable_nmad_dh_m"].values.astype(float)
        stable_sigma = np.where(np.isfinite(nmad), nmad, stable_sigma)
    grid = grid_of(state)
    pixel_size = float(grid.res)
    white = _white_sigma(scene_stats, stable_sigma, pixel_size, config.autocorrelation_m)
    datum = datum_sigma_m(
        stable_n,
        np.nan_to_num(stable_mean),
        np.nan_to_num(stable_sigma),
        pixel_size,
        config.autocorrelation_m,
        white,
    )
    table = cube[[v for v in cube.data_vars if cube[v].dims == ("glacier",)]]
    outline_surge = (
        table["glacier_surge"].values.astype(int)
        if "glacier_surge" in table
        else np.full(len(glacier), -1)
    )
    candidates = np.zeros(len(glacier), dtype=bool)
    for part, block in cells.blocks():
        candidates[part] = surge_candidates(block, bins, config.bin_width_m, config.min_px_per_bin)
    attributes = {
        str(name)[len("glacier_attr_") :]: _plain(table[name].values)
        for name in table.data_vars
        if str(name).startswith("glacier_attr_")
    }
    centroids = np.column_stack(
        [table["glacier_centroid_x_m"].values, table["glacier_centroid_y_m"].values]
    )
    ingest_regions = _recorded_file(state, "regions")
    pen_sigma = np.zeros(len(glacier))
    pen_std: np.ndarray | None = None
    adjusted: np.ndarray | None = None
    if _has_group(store, "penetration") and _is_array(
        store / "penetration" / "penetration_sigma_m"
    ):
        region_index = np.zeros(len(glacier), dtype=int)
        if ingest_regions is not None:
            polygons = read_polygons(ingest_regions, grid.crs, study.region_name_column)
            found = from_polygons(
                polygons, study.region_name_column, centroids_xy=centroids, how="centroid"
            ).membership
            region_index = np.where(found.any(axis=0), found.argmax(axis=0) + 1, 0)
        table_ds = xr.open_zarr(str(store), group="penetration", chunks=None)
        keep_share = None
        if int(table_ds.attrs.get("glacier_adjustment_applied", 0)):
            weight, adjusted = _glacier_adjustment(
                table_ds, cells, glacier, stats["surface"].values
            )
            keep_share = 1.0 - weight
        pen_sigma = _penetration_sigma(
            table_ds["penetration_sigma_m"], cells, region_index, bins, keep_share
        )
        if "penetration_std_m" in table_ds:
            pen_std = _penetration_sigma(table_ds["penetration_std_m"], cells, region_index, bins)
    return StoredStats(
        glacier=glacier,
        ids=_text(table["glacier_rgi_id"].values),
        surge=effective_surge(outline_surge, candidates),
        surge_candidate=candidates,
        centroids_xy=centroids,
        attributes=attributes,
        cells=cells,
        penetration_sigma_m=pen_sigma,
        penetration_std_m=pen_std,
        bin_lower_m=bins,
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
        regions_recorded="regions" in state.get("static_inputs", {}),
        outlines=_recorded_file(state, "glaciers", unchanged=True),
        outlines_recorded="glaciers" in state.get("static_inputs", {}),
        id_column=study.glacier_id_column,
        config=config,
        results_key=keys.results_key,
        stable_white_sigma_m=white,
        reference_sigma_m=keys.facts["reference_sigma_m"],
        adjusted_sigma_m=adjusted,
        unwrap=unwrap,
    )


def _unwrap_arrays(cube: xr.Dataset, scenes: list[str]) -> dict[str, np.ndarray] | None:
    """The unwrap step's per scene and glacier variables of `scenes` ((S, G) numpy), or None."""
    from mbcube.unwrap.repair import GLACIER_VARIABLES  # not at the top: the fast path

    if not all(name in cube for name in GLACIER_VARIABLES):
        return None
    picked = cube[list(GLACIER_VARIABLES)].sel(scene=scenes)
    return {name: picked[name].values for name in GLACIER_VARIABLES}


def _with_unwrap(data: StoredStats, results: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`results` with the unwrapping columns (UNWRAP_COLUMNS, sigma_unwrap_mwe_yr, added to
    mb_sigma_mwe_yr in quadrature). Per glacier over its used scenes (weight > 0): the worst
    flag, the prior of the highest code, the largest areas; the term of
    `mbcube.uncertainty.unwrap_sigma_m_yr`. Pixels in doubt are the unwrap step's, those of
    cells where a scene disagrees with the others by a cycle, and a whole glacier in scenes
    whose top was a toss-up that no other scene settled (`_unsettled_toss_ups`)."""
    n = len(data.glacier)
    u = data.unwrap
    zeros = np.zeros(n)
    if u is None:
        sigma, flag, prior, repaired, doubt = zeros, zeros, zeros, zeros, zeros
    else:
        used = data.cells.scene_weight > 0
        across = data.cells.scene_doubt_px
        in_doubt = u["unwrap_doubt_px"] + (0 if across is None else across)
        unsettled = _unsettled_toss_ups(u, used, across, data.cells.scene_confirmed)
        in_doubt = np.minimum(in_doubt + unsettled, u["unwrap_glacier_px"])
        sigma = unwrap_sigma_m_yr(
            data.cells.scene_weight,
            in_doubt,
            u["unwrap_glacier_px"],
            u["unwrap_h_amb_m"],
            data.scene_years,
        )
        km2 = data.pixel_size_m**2 / 1e6

        def worst(values: np.ndarray) -> np.ndarray:
            return np.where(used, values, 0).max(axis=0).astype(float) if len(used) else zeros

        flag = worst(np.where(in_doubt > 0, FLAG_DOUBT, (u["unwrap_repaired_px"] > 0).astype(int)))
        prior = worst(u["unwrap_prior"])
        repaired = worst(u["unwrap_repaired_px"]) * km2
        doubt = worst(in_doubt) * km2
    term = sigma * data.config.density_kg_m3 / 1000.0
    out = dict(results)
    out["sigma_unwrap_mwe_yr"] = np.where(np.isfinite(results["mb_mwe_yr"]), term, np.nan)
    out["mb_sigma_mwe_yr"] = np.hypot(results["mb_sigma_mwe_yr"], np.nan_to_num(term))
    out.update(
        unwrap_flag=flag,
        unwrap_prior=prior,
        unwrap_repaired_area_km2=repaired,
        unwrap_doubt_area_km2=doubt,
    )
    return out


def _unsettled_toss_ups(
    u: dict[str, np.ndarray],
    used: np.ndarray,
    across: np.ndarray | None,
    confirmed: np.ndarray | None,
) -> np.ndarray:
    """(S, G) pixels in doubt because a scene's glacier top sat near half a cycle
    (`unwrap_toss_up`): all of the glacier's in that scene, unless another scene settles it:
    one whose top was clear measured the glacier and no scene disagreed with the others on it
    by a cycle (`mbcube.massbalance.cross_scene_doubt`), or another scene of another height of
    ambiguity confirms its cycle (`mbcube.massbalance.confirmed_cycles`)."""
    toss = (u["unwrap_toss_up"] > 0) & used
    clear = ~toss & used & (u["unwrap_glacier_px"] > 0)
    agree = np.ones(toss.shape[1], bool) if across is None else (across * used).sum(axis=0) == 0
    settled = (clear.any(axis=0) & agree)[None, :]
    if confirmed is not None:
        settled = settled | (confirmed > 0)
    return np.where(toss & ~settled, u["unwrap_glacier_px"], 0)


def _white_sigma(
    scene_stats: xr.Dataset, stable_sigma: np.ndarray, pixel_size_m: float, range_m: float
) -> np.ndarray:
    """(S,) white part (m) of each scene's stable spread from the stored block statistic
    (`white_correlated_split`; 0 where the statistic is missing: all correlated)."""
    names = ("stable_block_count", "stable_block_nmad_dh_m", "stable_block_px_sum")
    if not all(n in scene_stats for n in (*names, "stable_block_inv_px_sum")):
        return np.zeros(len(stable_sigma))
    count = np.nan_to_num(scene_stats["stable_block_count"].values.astype(float))
    n = np.maximum(count, 1.0)
    white, _ = white_correlated_split(
        stable_sigma,
        scene_stats["stable_block_nmad_dh_m"].values.astype(float),
        count,
        scene_stats["stable_block_px_sum"].values.astype(float) / n,
        scene_stats["stable_block_inv_px_sum"].values.astype(float) / n,
        pixel_size_m,
        range_m,
    )
    return white


def _combine(
    store: Path,
    stats: xr.Dataset,
    glacier: np.ndarray,
    scenes: list[str],
    years: np.ndarray,
    months: np.ndarray,
    config: MassBalanceConfig,
    h_amb_m: np.ndarray | None = None,
) -> CellStats:
    """Scene selection and combination in bounded memory; with h_amb_m ((S, G), NaN for DEM
    scenes) also each scene's cells that disagree with the other scenes by a cycle.

    The scene statistics are read one stored chunk (scene x slab of glaciers) at a time and kept
    as their non-empty cells; then blocks of glaciers are made dense (scenes x block x bins x
    surfaces), combined (`select_scenes`, `combine_scenes`) and kept as cells again."""
    n_g, n_b, n_f = len(glacier), stats.sizes["bin"], stats.sizes["surface"]
    width = n_b * n_f
    # the cube's glacier position of each glacier of the statistics (-1: not in the cube)
    order = np.argsort(glacier)
    found = np.searchsorted(glacier, stats["glacier"].values, sorter=order)
    found = np.clip(found, 0, max(n_g - 1, 0))
    to_cube = np.where(glacier[order][found] == stats["glacier"].values, order[found], -1)
    stat_scenes = [str(s) for s in stats["scene"].values]
    slab = _chunk_along(stats["count"], "glacier") or stats.sizes["glacier"]
    sparse_scenes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    key_type = np.int32 if n_g * width < 2**31 else np.int64
    for scene in scenes:
        s = stat_scenes.index(scene)
        flat, count, total = [], [], []
        for start in range(0, stats.sizes["glacier"], max(slab, 1)):
            part = slice(start, start + slab)
            # fresh arrays from the store: NaN replaced in place (no copies of the slab)
            c = np.nan_to_num(stats["count"].isel(scene=s, glacier=part).values, copy=False)
            d = np.nan_to_num(stats["sum_dh_m"].isel(scene=s, glacier=part).values, copy=False)
            c, d = c.reshape(-1, width), d.reshape(-1, width)
            rows, cols = np.nonzero((c != 0) & (to_cube[part][:, None] >= 0))
            flat.append((to_cube[part][rows] * width + cols).astype(key_type))
            # counts are whole numbers: exact in float32 below 2^24 (else kept as float64)
            found = c[rows, cols]
            exact = found.size == 0 or float(found.max()) < 2**24
            count.append(found.astype(np.float32 if exact else np.float64))
            total.append(d[rows, cols].astype(np.float64))
            del c, d, rows, cols
        keys = np.concatenate(flat) if flat else np.zeros(0, key_type)
        sort = np.argsort(keys, kind="stable")
        sparse_scenes.append((keys[sort], np.concatenate(count)[sort], np.concatenate(total)[sort]))
    hyps = xr.open_zarr(str(store), group="hypsometry", chunks=None)
    hyps = hyps.transpose("glacier", "bin", "surface", ...)
    hyps = hyps.reindex(glacier=glacier, bin=stats["bin"], surface=stats["surface"], fill_value=0)
    # dense blocks: S x block x B x F float64, about six such arrays inside the combination
    block = max(64, int(256e6 // max(1, 6 * 8 * max(len(scenes), 1) * width)))
    parts = []
    for start in range(0, n_g, block):
        stop = min(start + block, n_g)
        n = stop - start
        count_b = np.zeros((len(scenes), n, width))
        sum_b = np.zeros((len(scenes), n, width))
        for s, (keys, cnt, tot) in enumerate(sparse_scenes):
            lo, hi = np.searchsorted(keys, [start * width, stop * width])
            rows, cols = np.divmod(keys[lo:hi].astype(np.int64) - start * width, width)
            count_b[s, rows, cols] = cnt[lo:hi]
            sum_b[s, rows, cols] = tot[lo:hi]
        shape = (len(scenes), n, n_b, n_f)
        count_b, sum_b = count_b.reshape(shape), sum_b.reshape(shape)
        part = slice(start, stop)
        area = np.nan_to_num(hyps["area_m2"].isel(glacier=part).values.astype(float))
        n_px = np.nan_to_num(hyps["n_px"].isel(glacier=part).values.astype(float))
        use = select_scenes(count_b, months, area, config.scene_rule, config.min_px_per_bin)
        void = {
            name: np.nan_to_num(hyps[name].isel(glacier=part).values.astype(float))
            for name in ("void_area_m2", "void_px")
            if name in hyps
        }
        combined = combine_scenes(
            count_b,
            sum_b,
            years,
            area,
            n_px,
            use,
            config.min_px_per_bin,
            min_frac=config.min_measured_frac_per_bin,
            **void,
        )
        doubt, confirmed = None, None
        if h_amb_m is not None:
            compared = (count_b, sum_b, years, use, h_amb_m[:, part], config.min_px_per_bin)
            doubt = cross_scene_doubt(*compared)
            confirmed = confirmed_cycles(*compared).astype(float)
        parts.append(
            replace(CellStats.from_dense(combined), scene_doubt_px=doubt, scene_confirmed=confirmed)
        )
    return CellStats.concat(parts, len(scenes), n_b, n_f)


def _chunk_along(array: xr.DataArray, dim: str) -> int | None:
    """The stored chunk length of `array` along `dim` (None when unknown)."""
    chunks = array.encoding.get("preferred_chunks", {}).get(dim)
    if chunks is None and "chunks" in array.encoding:
        chunks = array.encoding["chunks"][array.dims.index(dim)]
    return int(chunks) if chunks else None


#: Columns of the cache's per-glacier table `glacier_values` (then f"result_{RESULT_COLUMNS}").
_GLACIER_VALUES = (
    "measured_px",
    "void_area_m2",
    "void_px",
    "surge",
    "surge_candidate",
    "centroid_x_m",
    "centroid_y_m",
    "penetration_sigma_m",
    "penetration_std_m",
    "adjusted_sigma_m",
)
#: The cache's per-scene values (in its `text`).
_SCENE_VALUES = (
    "date_days",
    "years",
    "month",
    "stable_sigma_m",
    "datum_sigma_m",
    "stable_white_sigma_m",
)


def _write_cache(store: Path, data: StoredStats, keys: _Keys) -> None:
    """The combined statistics and the glacier results in the store's CACHE_GROUP, packed in
    three arrays (the fast path reads three arrays): `cells` (glacier | cell index | the cell
    fields, by cell: each field contiguous), `glacier_values` (its position, _GLACIER_VALUES,
    results, then scene_px and scene_weight of each scene, by glacier) and `text` (the glacier
    ids, outline attributes and _SCENE_VALUES as UTF-8 JSON); bins, scene ids, column names and
    the keys with the facts they came from in the group's attributes."""
    c = data.cells
    results = data.glacier_results()
    pen_std = data.penetration_std_m
    adjusted = data.adjusted_sigma_m
    per_glacier = [
        data.glacier.astype(float),
        c.measured_px,
        c.void_area_m2,
        c.void_px,
        data.surge.astype(float),
        data.surge_candidate.astype(float),
        data.centroids_xy[:, 0],
        data.centroids_xy[:, 1],
        data.penetration_sigma_m,
        np.full(len(data.glacier), np.nan) if pen_std is None else pen_std,
        np.full(len(data.glacier), np.nan) if adjusted is None else adjusted,
        *(results[k] for k in RESULT_COLUMNS),
        *c.scene_px,
        *c.scene_weight,
        *(np.zeros_like(c.scene_px) if c.scene_doubt_px is None else c.scene_doubt_px),
        *(np.zeros_like(c.scene_px) if c.scene_confirmed is None else c.scene_confirmed),
    ]
    dates = np.asarray(data.scene_dates, dtype="datetime64[ns]").astype("datetime64[D]")
    per_scene = [
        dates.astype(np.int64).astype(float),
        data.scene_years,
        data.scene_month.astype(float),
        data.stable_sigma_m,
        data.datum_sigma_m,
        np.zeros(len(data.scene_years))
        if data.stable_white_sigma_m is None
        else data.stable_white_sigma_m,
    ]
    cells = np.stack(
        [c.glacier.astype(float), c.cell.astype(float), *(c.values[k] for k in _CELL_FIELDS)]
    )
    text = {
        "ids": [str(i) for i in data.ids],
        "attributes": {
            k: {"text": v.dtype.kind not in "biuf", "values": v.tolist()}
            for k, v in data.attributes.items()
        },
        "scene_values": dict(zip(_SCENE_VALUES, (v.tolist() for v in per_scene), strict=True)),
    }
    text_bytes = np.frombuffer(json.dumps(text).encode(), dtype=np.uint8)
    glacier_values = np.stack(per_glacier)
    cache = xr.Dataset(
        {
            "cells": (("cell_column", "cell"), cells.reshape(2 + len(_CELL_FIELDS), -1)),
            "glacier_values": (("glacier_column", "glacier"), glacier_values),
            "text": ("byte", text_bytes),
        },
        attrs={
            "n_surfaces": c.n_surfaces,
            "bin_lower_m": data.bin_lower_m.tolist(),
            "scene_ids": [str(i) for i in data.scene_ids],
            "penetration_std": pen_std is not None,
            "glacier_adjusted": adjusted is not None,
            "reference_sigma_m": data.reference_sigma_m,
            "cell_columns": ["glacier", "cell", *_CELL_FIELDS],
            "glacier_columns": [
                "glacier",
                *_GLACIER_VALUES,
                *(f"result_{k}" for k in RESULT_COLUMNS),
            ],
            "about": "mbcube aggregate: glacier statistics (scenes combined, per non-empty "
            "glacier x bin x surface cell) and glacier results; glacier_values ends with "
            "scene_px, scene_weight, scene_doubt_px then scene_confirmed of each scene; text: UTF-8 JSON of the ids, outline "
            "attributes and per-scene values",
        },
    )
    n_cells = max(1, min(CELL_CHUNK, len(c.glacier)))
    n_glaciers = max(1, min(CELL_CHUNK // 16, len(data.glacier)))
    # no compression: the cache is read on every aggregate, decoding would cost more than the
    # bytes (mostly incompressible float64; ~70 bytes per glacier cell)
    raw = {"compressors": None}
    encoding = {
        "cells": {"chunks": (cells.shape[0], n_cells)} | raw,
        "glacier_values": {"chunks": (glacier_values.shape[0], n_glaciers)} | raw,
        "text": {"chunks": (max(1, len(text_bytes)),)} | raw,
    }
    # the keys last, with the manifest of what was written: a cache killed half-written, or
    # that lost a file since, has no valid key and is made again from the statistics
    write_dataset(cache, store, group=CACHE_GROUP, mode="w", encoding=encoding)
    arrays = [f"{CACHE_GROUP}/{name}" for name in cache.data_vars]
    zarr.open_group(str(store / CACHE_GROUP), mode="r+").attrs.update(
        {
            "key": keys.stats_key,
            "results_key": keys.results_key,
            "facts": keys.facts,
            "outputs": list_outputs(store, arrays),
        }
    )


def _remember_facts(store: Path, facts: dict[str, Any]) -> None:
    """Store re-read key facts with the current cache (its group's attributes)."""
    zarr.open_group(str(store / CACHE_GROUP), mode="r+").attrs["facts"] = facts


def _read_cache(
    store: Path,
    state: dict[str, Any],
    study: StudyConfig,
    config: MassBalanceConfig,
    keys: _Keys,
    attrs: dict[str, Any],
) -> tuple[CellStats | None, StoredStats | None]:
    """(the cached combined statistics if current, the whole StoredStats if its results are
    current too); `attrs`: the cache group's attributes; read with zarr alone (no xarray
    decoding: this is the fast path)."""
    if keys.stats_key is None or attrs.get("key") != keys.stats_key:
        return None, None
    group = store / CACHE_GROUP
    damaged = damaged_outputs(store, attrs.get("outputs", {}))
    try:
        if damaged:
            raise StoreDamaged(f"{', '.join(damaged)} lost or changed size")
        per_cell = _read_plain(group / "cells", axis=1)
        per_glacier_table = _read_plain(group / "glacier_values", axis=1)
        text_bytes = _read_plain(group / "text").tobytes()
    except (StoreDamaged, ValueError) as err:  # ValueError: zarr's own checksum failure
        log.warning("%s: the cached statistics are damaged (%s): made again", store, err)
        return None, None
    columns = list(attrs["glacier_columns"])
    n_scenes = len(attrs["scene_ids"])
    per_glacier = dict(zip(columns, per_glacier_table[: len(columns)], strict=True))
    scene_glacier = per_glacier_table[len(columns) :]
    bins = np.asarray(attrs["bin_lower_m"], dtype=float)
    cells = CellStats(
        glacier=per_cell[0].astype(np.int64),
        cell=per_cell[1].astype(np.int64),
        values={k: per_cell[2 + i] for i, k in enumerate(_CELL_FIELDS)},  # views: no copy
        measured_px=per_glacier["measured_px"],
        void_area_m2=per_glacier["void_area_m2"],
        void_px=per_glacier["void_px"],
        scene_px=scene_glacier[:n_scenes],
        scene_weight=scene_glacier[n_scenes : 2 * n_scenes],
        scene_doubt_px=scene_glacier[2 * n_scenes : 3 * n_scenes],
        scene_confirmed=scene_glacier[3 * n_scenes : 4 * n_scenes],
        n_bins=len(bins),
        n_surfaces=int(attrs.get("n_surfaces", 2)),
    )
    if attrs.get("results_key") != keys.results_key:
        return cells, None
    text = json.loads(text_bytes)
    per_scene = {k: np.asarray(v, dtype=float) for k, v in text["scene_values"].items()}
    grid = grid_of(state)
    data = StoredStats(
        glacier=per_glacier["glacier"].astype(np.int64),
        ids=np.array(text["ids"], dtype=object),
        surge=per_glacier["surge"].astype(int),
        surge_candidate=per_glacier["surge_candidate"].astype(bool),
        centroids_xy=np.column_stack([per_glacier["centroid_x_m"], per_glacier["centroid_y_m"]]),
        attributes={
            k: np.array(v["values"], dtype=object if v["text"] else None)
            for k, v in sorted(text["attributes"].items())
        },
        cells=cells,
        penetration_sigma_m=per_glacier["penetration_sigma_m"],
        penetration_std_m=per_glacier["penetration_std_m"] if attrs["penetration_std"] else None,
        bin_lower_m=bins,
        scene_ids=np.array(attrs["scene_ids"], dtype=object),
        scene_dates=per_scene["date_days"].astype("int64").astype("datetime64[D]"),
        scene_years=per_scene["years"],
        scene_month=per_scene["month"].astype(int),
        stable_sigma_m=per_scene["stable_sigma_m"],
        datum_sigma_m=per_scene["datum_sigma_m"],
        pixel_size_m=float(grid.res),
        reference_date=study.reference_date,
        crs=grid.crs,
        ingest_regions=_recorded_file(state, "regions"),
        regions_recorded="regions" in state.get("static_inputs", {}),
        outlines=_recorded_file(state, "glaciers", unchanged=True),
        outlines_recorded="glaciers" in state.get("static_inputs", {}),
        id_column=study.glacier_id_column,
        config=config,
        results={k: per_glacier[f"result_{k}"] for k in RESULT_COLUMNS},
        results_key=keys.results_key,
        stable_white_sigma_m=per_scene["stable_white_sigma_m"],
        reference_sigma_m=attrs.get("reference_sigma_m"),
        adjusted_sigma_m=per_glacier["adjusted_sigma_m"] if attrs["glacier_adjusted"] else None,
    )
    return cells, data


def _plain(values: np.ndarray) -> np.ndarray:
    """Text arrays (zarr's StringDType) as object arrays of str; numbers unchanged."""
    if values.dtype.kind in "biuf":
        return values
    return np.array([str(v) for v in values], dtype=object)


def _penetration_sigma(
    table: xr.DataArray,
    cells: CellStats,
    region_index: np.ndarray,
    bins: np.ndarray,
    factor: np.ndarray | None = None,
) -> np.ndarray:
    """Area-weighted value (m) of a penetration-table variable (region, surface, bin) over each
    glacier's bins and surfaces, from the glacier's region (index 1..R by centroid in the ingest's
    region polygons; 0 is the table's pooled region, used for glaciers outside every region).
    Bins beyond the table's range take its end bins (as the correction's lookup does).
    `factor` (C,): each cell's value is multiplied by it first (None: 1)."""
    values = table.transpose("region", "bin", "surface").sortby("bin")
    values = values.reindex(bin=bins, method="nearest")
    regions = [int(r) for r in values["region"].values]
    pooled = values.sel(region=0) if 0 in regions else values.mean("region")
    lookup = {}  # region index -> (B * F,) values
    for r in np.unique(region_index):
        own = values.sel(region=int(r)).fillna(pooled) if int(r) in regions else pooled
        lookup[int(r)] = np.nan_to_num(own.values).reshape(-1)
    per_cell = np.empty(len(cells.glacier))
    cell_region = region_index[cells.glacier]
    for r, table_r in lookup.items():
        at = cell_region == r
        per_cell[at] = table_r[cells.cell[at]]
    if factor is not None:
        per_cell = per_cell * factor
    area = cells.values["area_m2"]
    total = cells.glacier_sum("area_m2")
    weighted = np.bincount(cells.glacier, per_cell * area, minlength=cells.n_glaciers)
    return np.divide(weighted, total, out=np.zeros_like(total), where=total > 0)


def _glacier_adjustment(
    table: xr.Dataset, cells: CellStats, glacier: np.ndarray, surfaces: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """From the `penetration` group's per-glacier refinement: (C,) each cell's weight k (of its
    glacier and surface; glacier_penetration_weight) and (G,) the adjusted error (m) of each
    glacier, glacier_penetration_sigma_m area-weighted over its surfaces (their binned areas),
    NaN where no surface with area has k > 0. `glacier` (G,): the cube's glacier indices (the
    group's `glacier` coordinate); `surfaces`: the statistics' surface values, in cell order."""
    where = {"glacier": glacier, "surface": surfaces}
    weight = table["glacier_penetration_weight"].reindex(where, fill_value=0.0)
    sigma = table["glacier_penetration_sigma_m"].reindex(where, fill_value=np.nan)
    k = np.clip(np.nan_to_num(weight.transpose("glacier", "surface").values.astype(float)), 0, 1)
    s = sigma.transpose("glacier", "surface").values.astype(float)
    n_s = cells.n_surfaces
    surface_pos = cells.cell % n_s
    flat = cells.glacier * n_s + surface_pos
    area = np.bincount(flat, cells.values["area_m2"], minlength=len(glacier) * n_s)
    area = area.reshape(len(glacier), n_s)
    adjusted = ((k > 0) & (area > 0)).any(axis=1)
    total = area.sum(axis=1)
    value = np.divide(
        (area * np.nan_to_num(s)).sum(axis=1), total, out=np.zeros(len(total)), where=total > 0
    )
    return k[cells.glacier, surface_pos], np.where(adjusted, value, np.nan)


def _results(
    data: StoredStats,
    units: GlacierStats,
    pen_sigma: np.ndarray,
    pen_std: np.ndarray | None,
    adjusted: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Balance and every error term of `units` (glaciers, or regions from `sum_cells`):
    `mbcube.massbalance.unit_results` with the store's scene statistics and the config;
    `adjusted`: (share f, sigma_adj (m)) of the units' glaciers with their own X-band offset
    (`mbcube.uncertainty.adjusted_units`; None: no offsets)."""
    share, sigma = (None, None) if adjusted is None else adjusted
    return unit_results(
        units,
        data.bin_lower_m,
        data.scene_years,
        data.scene_month,
        data.stable_sigma_m,
        data.datum_sigma_m,
        data.pixel_size_m,
        pen_sigma,
        pen_std,
        data.config,
        reference_sigma_m=data.reference_sigma_m,
        stable_white_sigma_m=data.stable_white_sigma_m,
        adjusted_share=share,
        adjusted_sigma_m=sigma,
    )


def _periods(data: StoredStats) -> np.ndarray:
    """Per glacier 'start/end' in ISO dates, oldest first: the reference date and the scene date;
    'ref/first..last' when the glacier's scenes have several dates (reversed for scenes older
    than the reference)."""
    used = data.cells.scene_px > 0  # (S, G)
    dates = pd.to_datetime(data.scene_dates).strftime("%Y-%m-%d").to_numpy()
    ref = data.reference_date.isoformat()
    out = np.full(used.shape[1], "", dtype=object)
    patterns: dict[bytes, str] = {}
    for g in np.flatnonzero(used.any(axis=0)):
        key = used[:, g].tobytes()
        if key not in patterns:
            own = sorted(set(dates[used[:, g]]))
            scenes = own[0] if len(own) == 1 else f"{own[0]}..{own[-1]}"
            patterns[key] = f"{ref}/{scenes}" if own[0] >= ref else f"{scenes}/{ref}"
        out[g] = patterns[key]
    return out


def region_sets(data: StoredStats, regions: Path | None = None) -> list[RegionSet]:
    """The polygon regions (the file given, or the one recorded at ingest; first when present),
    then one set per glacier attribute of ATTRIBUTE_REGION_SETS."""
    sets: list[RegionSet] = []
    source = regions or data.ingest_regions
    if source is not None:
        sets.append(_polygon_set(data, source))
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


def _polygon_set(data: StoredStats, source: Path) -> RegionSet:
    """Glaciers assigned to the polygons of `source` by the configured rule."""
    names, geoms = read_polygon_arrays(source, data.crs, name_column=None)
    outlines = _outlines(data) if data.config.region_assignment == "area_share" else None
    return assign(
        names,
        geoms,
        centroids_xy=data.centroids_xy,
        outlines=outlines,
        how=data.config.region_assignment,
    )


def _joined(data: StoredStats, sets: list[RegionSet]) -> RegionSet:
    """The sets' regions in one set (`RegionSet.__add__`'s names; one copy of the rows)."""
    return RegionSet.join(sets, len(data.glacier))


def _outlines(data: StoredStats) -> Any:
    """The cube's glacier outlines in its CRS, valid (polygonal part), in glacier order."""
    from mbcube.outlines import polygonal_part

    rows = _outline_rows(data)
    if rows is None:
        raise StoreError(
            "region_assignment 'area_share' needs the glacier outlines recorded at ingest, "
            "which are gone or changed; use 'centroid' or restore the outline file."
        )
    return rows.to_crs(data.crs).geometry.make_valid().map(polygonal_part).reset_index(drop=True)


def _outline_rows(data: StoredStats) -> Any:
    """The features of the recorded outline file, one per cube glacier in glacier order
    (matched by id: the ingest may have dropped features without polygon area), in the file's
    CRS; None when the file is gone, changed, or lacks some glacier's id."""
    import geopandas as gpd

    if data.outlines is None:
        return None
    outlines = gpd.read_file(data.outlines)
    if data.id_column not in outlines:
        return None
    outlines = outlines.set_index(outlines[data.id_column].astype(str), drop=False)
    ids = data.ids.astype(str)
    if outlines.index.has_duplicates or not set(ids) <= set(outlines.index):
        return None
    return outlines.loc[ids]


def glacier_table(data: StoredStats, regions: RegionSet | None = None) -> pd.DataFrame:
    """One row per glacier: the columns GLACIER_COLUMNS after the id column; `regions` names
    each glacier's region (column `region`, '' for none)."""
    values = data.glacier_results()
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
    table["n_scenes"] = (data.cells.scene_px > 0).sum(axis=0)
    table["period"] = _periods(data)
    table["unwrap_flag"] = table["unwrap_flag"].astype(int)
    table["unwrap_prior"] = _prior_names(table["unwrap_prior"].to_numpy())
    return table[[data.id_column, *GLACIER_COLUMNS]]


def _prior_names(codes: np.ndarray) -> np.ndarray:
    """Prior codes (`mbcube.unwrap.profiles.PRIOR_NAMES`) as names: none | data | user."""
    names = np.array(["none", "data", "user"], dtype=object)
    return names[np.clip(codes.astype(int), 0, len(names) - 1)]


def region_table(
    data: StoredStats, regions: RegionSet, glaciers: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Rows 'all' and one per region, each for all glaciers and without surge-type ones.

    From the glaciers' cached cells (`sum_cells`) and glacier results (or the columns dh_m,
    dhdt_m_yr, mb_mwe_yr of `glaciers` when given); no glacier balance is computed here."""
    per_glacier = (
        data.glacier_results()
        if glaciers is None
        else {
            k: glaciers[k].to_numpy(dtype=float)
            for k in ("dh_m", "dhdt_m_yr", "mb_mwe_yr", "sigma_unwrap_mwe_yr")
        }
    )
    keep = surge_free(data.surge)
    # 'all' and the regions, then the same without surge-type glaciers: one (2 (R + 1), G) array
    n_sets = len(regions.names) + 1
    membership = np.empty((2 * n_sets, regions.membership.shape[1]), dtype=bool)
    membership[0] = True
    membership[1:n_sets] = regions.membership
    np.logical_and(membership[:n_sets], keep[None, :], out=membership[n_sets:])
    regions = RegionSet(["all", *regions.names], membership[:n_sets])
    labels = ["all"] * n_sets + ["no_surge"] * n_sets
    names = regions.names * 2
    units = Units.of(membership)
    stats = sum_cells(data.cells, units, data.config.min_px_per_bin)
    area_g = data.cells.glacier_area_m2 + data.cells.void_area_m2
    area_u = units.sum(area_g)

    def area_weighted_mean(values: np.ndarray) -> np.ndarray:
        return np.divide(
            units.sum(values * area_g), area_u, out=np.zeros(len(names)), where=area_u > 0
        )

    pen_std = data.penetration_std_m
    spread = None if pen_std is None else area_weighted_mean(pen_std)
    adjusted = None
    if data.adjusted_sigma_m is not None:
        # glaciers with their own X-band offset (measured ones): their errors summed
        # (`adjusted_units`); the spread term is then the others', area-weighted over them
        adj = np.where(np.isfinite(per_glacier["mb_mwe_yr"]), data.adjusted_sigma_m, np.nan)
        adjusted = adjusted_units(
            adj,
            data.cells.measured_px,
            data.centroids_xy,
            membership,
            data.config.autocorrelation_penetration_m,
        )
        if pen_std is not None:
            rest_area, rest_spread = units.sum(
                np.stack([area_g, pen_std * area_g]) * ~np.isfinite(adj)
            )
            spread = np.divide(
                rest_spread, rest_area, out=np.zeros(len(names)), where=rest_area > 0
            )
    values = _results(data, stats, area_weighted_mean(data.penetration_sigma_m), spread, adjusted)
    mb_g = per_glacier["mb_mwe_yr"]
    measured_area = area_g * np.isfinite(mb_g)
    unwrap_g = np.nan_to_num(per_glacier["sigma_unwrap_mwe_yr"])
    total_w, weighted_mb, unwrap_var = units.sum(
        np.stack(
            [measured_area, measured_area * np.nan_to_num(mb_g), (measured_area * unwrap_g) ** 2]
        )
    )
    # glaciers' cycle errors are independent: in quadrature, by measured area
    unwrap = np.divide(np.sqrt(unwrap_var), total_w, out=np.zeros(len(names)), where=total_w > 0)
    values["sigma_unwrap_mwe_yr"] = np.where(np.isfinite(values["mb_mwe_yr"]), unwrap, np.nan)
    _void_areas_at_glacier_means(data, values, stats, per_glacier, units)
    area_weighted = np.divide(
        weighted_mb, total_w, out=np.full(len(names), np.nan), where=total_w > 0
    )
    columns = {
        "name": np.array(names, dtype=object),
        "glaciers": np.array(labels, dtype=object),
        "n_glaciers": units.count(),
        **{k: values[k] for k in REGION_COLUMNS[3:] if k != "mb_mwe_yr_area_weighted"},
        "mb_mwe_yr_area_weighted": area_weighted,
    }
    order = np.argsort(np.arange(len(names)) % len(regions.names), kind="stable")
    return pd.DataFrame({k: columns[k][order] for k in REGION_COLUMNS})


def _void_areas_at_glacier_means(
    data: StoredStats,
    values: dict[str, np.ndarray],
    stats: GlacierStats,
    per_glacier: dict[str, np.ndarray],
    units: Units,
) -> None:
    """Give each glacier's void area its own mean in the region values (in place)."""
    binned = stats.area_m2.sum(axis=(1, 2))
    for column in ("dh_m", "dhdt_m_yr"):
        values[column] = with_void_area(
            values[column],
            binned,
            np.asarray(per_glacier[column], dtype=float),
            data.cells.void_area_m2,
            units,
        )
    c = data.config
    dhdt, area_m2 = values["dhdt_m_yr"], values["area_km2"] * 1e6
    values["mb_mwe_yr"] = dhdt * c.density_kg_m3 / 1000.0
    values["volume_km3_yr"] = dhdt * area_m2 / 1e9
    values["mass_gt_yr"] = values["mb_mwe_yr"] * area_m2 / 1e9
    values["sigma_density_mwe_yr"] = np.abs(dhdt) * c.density_sigma_kg_m3 / 1000.0
    values["mb_sigma_mwe_yr"] = quadrature(*(values[k] for k in SIGMA_COLUMNS))


# ---------------------------------------------------------------------------------- the command


def aggregate(
    store: Path,
    out: Path,
    *,
    regions: Path | None = None,
    config: MassBalanceConfig | None = None,
) -> tuple[Path, Path]:
    """Write out/glaciers.csv and out/regions.csv (and .parquet; glaciers.gpkg) from the stored
    statistics. Reads no pixel.

    `regions`: polygons (column `name`) to aggregate into instead of the study's regions (then
    also out/region_members.csv). `config`: mass-balance parameters (default: those recorded in
    the store). The glacier tables are rewritten only when the statistics, parameters or
    static inputs changed since they were written (see TABLES_RECORD). Holds the store's
    writer lock (the statistics are read whole and the cache written), or none on a store it
    may not write (then nothing is cached); refuses to write tables without a single glacier
    result from binned scenes (StoreDamaged)."""
    with writer_lock_if_writable(store):
        return _aggregate(Path(store), Path(out), regions, config)


def _aggregate(
    store: Path, out: Path, regions: Path | None, config: MassBalanceConfig | None
) -> tuple[Path, Path]:
    problems = out_problems(out, store, *recorded_study(store))
    if problems:
        raise StoreError("\n".join(problems))
    data = load_stats(store, config)
    _refuse_empty(store, data)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / TABLES_RECORD).exists():  # first: the folder is mbcube's results from now on
        (out / TABLES_RECORD).write_text("{}")
    if not _tables_current(out, data):
        _write_glacier_tables(data, out)
    given = _polygon_set(data, Path(regions)) if regions is not None else None
    sets = region_sets(data) if given is None else [given, *region_sets_attributes(data)]
    table = region_table(data, _joined(data, sets))
    table.to_csv(out / "regions.csv", index=False)
    _write_parquet(table, out / "regions.parquet")
    members = out / "region_members.csv"
    if given is not None:
        _write_members(members, data.id_column, data.ids, given.region_of())
    elif members.exists():
        members.unlink()
    return out / "glaciers.csv", out / "regions.csv"


def _refuse_empty(store: Path, data: StoredStats) -> None:
    """No table is written when scenes were binned over glaciers yet no glacier has a result:
    the statistics or the cache are damaged (a missing chunk reads as zeros or NaN)."""
    measured = np.asarray(data.cells.measured_px, dtype=float)
    results = np.asarray(data.results.get("mb_mwe_yr", []), dtype=float) if data.results else None
    if results is None or not np.nansum(measured) > 0:
        return
    if not np.isfinite(results).any():
        raise StoreDamaged(
            f"{store}: {int(np.nansum(measured))} glacier pixels were binned but no glacier "
            f"has a mass balance: the stored statistics are damaged. Run `mbcube verify "
            f"{store}` to find what, and `mbcube verify {store} --repair` to redo it."
        )


def region_sets_attributes(data: StoredStats) -> list[RegionSet]:
    """The region sets from glacier attributes (ATTRIBUTE_REGION_SETS) alone."""
    return [
        from_attribute(data.attributes[a]) for a in ATTRIBUTE_REGION_SETS if a in data.attributes
    ]


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    """The table as Parquet, written by pyarrow from its columns, text as large_string as pandas
    writes it (no pandas metadata: half of `to_parquet`'s time for a small table; pandas reads
    back the same frame)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for name in table.columns:
        values = table[name].to_numpy()
        text = values.dtype.kind in "OUT"
        columns[str(name)] = pa.array(values, type=pa.large_string()) if text else values
    pq.write_table(pa.table(columns), path)


def _write_members(path: Path, id_column: str, ids: np.ndarray, region: np.ndarray) -> None:
    """region_members.csv: each glacier's region ('' for none); written by pyarrow (a third
    of the csv module's time for 10,000 rows; text quoted)."""
    import pyarrow as pa
    from pyarrow import csv as arrow_csv

    table = pa.table(
        {id_column: pa.array(ids, pa.string()), "region": pa.array(region, pa.string())}
    )
    arrow_csv.write_csv(table, path)


_GLACIER_FILES = ("glaciers.csv", "glaciers.parquet")


def _fingerprints(out: Path, names: list[str]) -> dict[str, list[int]]:
    found = {}
    for name in names:
        path = out / name
        if path.is_file():
            stat = path.stat()
            found[name] = [stat.st_size, stat.st_mtime_ns]
    return found


def tables_record(out: Path | str) -> dict[str, Any]:
    """What the glacier tables in `out` were made from ({} when unknown): results_key,
    files (name -> [size, mtime_ns]) and gpkg ('written' or why not)."""
    path = Path(out) / TABLES_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _tables_current(out: Path, data: StoredStats) -> bool:
    """The glacier tables in `out` were written from these statistics and parameters, and are
    unchanged since (sizes and mtimes as recorded); glaciers.gpkg is there iff it can be."""
    record = tables_record(out)
    if data.results_key is None or record.get("results_key") != data.results_key:
        return False
    names = [*_GLACIER_FILES, *(["glaciers.gpkg"] if record.get("gpkg") == "written" else [])]
    if (data.outlines is not None) != (record.get("gpkg") == "written"):
        return False
    return record.get("files") == _fingerprints(out, names) and len(record["files"]) == len(names)


def _write_glacier_tables(data: StoredStats, out: Path) -> None:
    polygons = None
    if data.ingest_regions is not None:
        polygons = _polygon_set(data, data.ingest_regions)
    glaciers = glacier_table(data, polygons)
    glaciers.to_csv(out / "glaciers.csv", index=False)
    glaciers.to_parquet(out / "glaciers.parquet", index=False)
    gpkg = _write_gpkg(data, glaciers, out / "glaciers.gpkg")
    names = [*_GLACIER_FILES, *(["glaciers.gpkg"] if gpkg == "written" else [])]
    record = {
        "results_key": data.results_key,
        "files": _fingerprints(out, names),
        "gpkg": gpkg,
    }
    (out / TABLES_RECORD).write_text(json.dumps(record, indent=1))


def _write_gpkg(data: StoredStats, glaciers: pd.DataFrame, path: Path) -> str:
    """glaciers.gpkg: the outlines recorded at ingest (file order, their CRS and id column)
    with the glacier table's columns. Returns 'written', or why it was not written."""
    import geopandas as gpd

    path.unlink(missing_ok=True)
    if data.outlines is None:
        if data.outlines_recorded:
            why = "not written: the glacier outline file recorded at ingest is gone or changed"
            warnings.warn(f"{path.name} {why}", MbcubeWarning, stacklevel=3)
        else:
            why = "not written: the ingest recorded no glacier outline file"
            log.warning("%s %s", path.name, why)
        return why
    outlines = _outline_rows(data)
    if outlines is None:
        why = f"not written: the outlines in {data.outlines} do not match the cube's glaciers"
        warnings.warn(f"{path.name} {why}", MbcubeWarning, stacklevel=3)
        return why
    id_column = data.id_column
    frame = gpd.GeoDataFrame(
        glaciers.assign(**{id_column: outlines[id_column].to_numpy()}),
        geometry=outlines.geometry.to_numpy(),
        crs=outlines.crs,
    )
    frame.to_file(path, driver="GPKG", layer="glaciers", engine="pyogrio")
    return "written"


def mass_balance_dataset(
    store: Path | str, config: MassBalanceConfig | None = None, *, cache: bool = True
) -> xr.Dataset:
    """The glacier table as a Dataset along `glacier` (the cube's glacier index), for `ds.mb`
    (`cache`: see `load_stats`)."""
    data = load_stats(Path(store), config, cache=cache)
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
    *,
    cache: bool = True,
) -> xr.Dataset:
    """The region table as a Dataset with dims (region, glaciers), glaciers = all | no_surge.

    `regions`: a polygon file, or a RegionSet (e.g. `mbcube.regions.from_ids`, glaciers in the
    cube's order); default: the study's regions and basins. Region 'all' is the whole study.
    `cache`: see `load_stats`."""
    data = load_stats(Path(store), config, cache=cache)
    if isinstance(regions, RegionSet):
        sets = [regions]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MbcubeWarning)
            sets = region_sets(data, None if regions is None else Path(regions))
    table = region_table(data, _joined(data, sets))
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
