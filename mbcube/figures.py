"""Figures of a study, in the style of Lin et al. (2017, Sci. Rep. 7:6712), as PNG files.

- `dhdt_map`: mean elevation change rate (m/yr) per pixel over the scenes, one map per region,
  with glacier outlines drawn from the `glacier_id` raster (Figs 2-6).
- `mass_balance_map`: glacier mass balance (m w.e./yr) as circles at the glacier centroids, sized
  by area, and the region means with their uncertainty as bars (Fig 1).
- `elevation_profile`: dh/dt per elevation bin (mean +- std of the pixel rates, from the stored
  statistics) for clean and debris-covered ice, with the hypsometry on a twin axis (Fig 7).
- `transect`: dh/dt of the accumulation area, the ablation area and the whole glacier along
  longitude (Fig 8).

Glaciers whose phase cycle is in doubt (glaciers.csv `unwrap_flag` 2, `mbcube.unwrap.profiles`)
are drawn in DOUBT_COLOUR: outlined on the dh/dt maps, ringed on the mass balance map and the
transect, and counted on the profiles of their region.

Every figure function takes a store path (or a `FigureInputs`, which caches what several figures
share) and returns a matplotlib Figure; `make_figures` writes them all. Maps are coarsened lazily
(block means) to at most `max_px` pixels before anything is read, so a large cube costs one pass
over the chunks of the mapped area. Missing inputs (no `dh_m` yet, no `stats` group, no tables)
skip a figure with a log message (`MissingInputError` when a figure function is called directly).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.axes import Axes
from matplotlib.colors import LightSource, ListedColormap, Normalize
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from mbcube.config import MassBalanceConfig, StudyConfig
from mbcube.errors import StoreError, is_damage
from mbcube.store import open_cube, read_state
from mbcube.unwrap.profiles import FLAG_DOUBT

__all__ = [
    "FigureInputs",
    "MissingInputError",
    "dhdt_map",
    "elevation_profile",
    "make_figures",
    "mass_balance_map",
    "transect",
]

log = logging.getLogger(__name__)

DPI = 150
#: Diverging colour map: red = thinning / mass loss, blue = thickening / mass gain.
CMAP = "RdBu"
VOID_COLOUR = "#e9dcc0"  # map background where the reference DEM has no data
DOUBT_COLOUR = "#f0a000"  # glaciers whose phase cycle is in doubt (the report's notes too)
DOUBT_LABEL = "phase cycle in doubt"
SURFACE_STYLE = {1: ("clean ice", "tab:blue"), 2: ("debris-covered", "tab:brown")}
ALL_GLACIERS = "all glaciers"
#: The files make_figures writes (and removes when a later run does not make them again).
#: The figures' names written by the last run (JSON list), in the figures folder: the only files
#: there that mbcube deletes.
FIGURES_RECORD = ".mbcube-figures.json"


class MissingInputError(StoreError):
    """A figure's input (a cube layer, a stored group or a table) is not there (yet)."""


# ---------------------------------------------------------------- inputs


@dataclass
class FigureInputs:
    """The cube and tables the figures read, opened once and shared (lazy where possible)."""

    store: Path
    tables: Path | None = None

    def __post_init__(self) -> None:
        self._groups: dict[str, xr.Dataset | None] = {}
        self.store = Path(self.store)
        self.tables = Path(self.tables) if self.tables is not None else None

    @functools.cached_property
    def cube(self) -> xr.Dataset:
        return open_cube(self.store)

    @functools.cached_property
    def state(self) -> dict:
        return read_state(self.store)

    @functools.cached_property
    def config(self) -> StudyConfig | None:
        raw = self.state.get("study", {}).get("config")
        return StudyConfig.model_validate(raw) if raw is not None else None

    @property
    def massbalance(self) -> MassBalanceConfig:
        return self.config.massbalance if self.config is not None else MassBalanceConfig()

    @property
    def res_m(self) -> float:
        x = self.cube["x"].values
        return float(abs(x[1] - x[0])) if x.size > 1 else float(self.state["grid"]["res"])

    @property
    def crs(self) -> str | None:
        return self.state.get("grid", {}).get("crs")

    def group(self, name: str) -> xr.Dataset | None:
        """A stored group ('stats', 'hypsometry', 'penetration') or None when absent (lazy,
        opened once)."""
        if name not in self._groups:
            path = self.store / name / "zarr.json"
            self._groups[name] = (
                xr.open_zarr(str(self.store), group=name, chunks={}) if path.exists() else None
            )
        return self._groups[name]

    def table(self, name: str) -> pd.DataFrame | None:
        """tables/<name>.csv or None when absent."""
        if self.tables is None or not (self.tables / f"{name}.csv").exists():
            return None
        return pd.read_csv(self.tables / f"{name}.csv")

    @functools.cached_property
    def glaciers(self) -> pd.DataFrame:
        """One row per cube glacier (index: glacier number 1..N): its outline id (glacier_key),
        centroid (m), region name, outline area (km2) and the columns of glaciers.csv (matched
        on the study's glacier id column)."""
        names = [
            "glacier_rgi_id",
            "glacier_centroid_x_m",
            "glacier_centroid_y_m",
            "glacier_outline_area_km2",
        ]
        (ds,) = dask.compute(self.cube[names])
        numbers = ds["glacier"].values.astype(int)
        out = pd.DataFrame(
            {
                "glacier_key": [str(v) for v in ds["glacier_rgi_id"].values],
                "x_m": np.asarray(ds["glacier_centroid_x_m"].values, dtype=float),
                "y_m": np.asarray(ds["glacier_centroid_y_m"].values, dtype=float),
                "outline_area_km2": np.asarray(ds["glacier_outline_area_km2"].values, dtype=float),
            },
            index=pd.Index(numbers, name="glacier"),
        )
        table = self.table("glaciers")
        key = self._id_column(table)
        if table is not None and key is not None:
            table = table.assign(**{key: table[key].astype(str)})
            table = table.drop_duplicates(key).set_index(key)
            extra = table.reindex(out["glacier_key"].to_numpy())
            extra.index = out.index
            out = out.join(extra)
        members = self.table("region_members")  # regions of a `--regions FILE` run
        if members is not None and key is not None and key in members.columns:
            by_id = members.assign(**{key: members[key].astype(str)}).set_index(key)["region"]
            out["region"] = by_id.reindex(out["glacier_key"].to_numpy()).to_numpy()
        if "region" not in out.columns or out["region"].isna().all():
            out["region"] = self._region_at_centroids(out)
        out["region"] = out["region"].astype(object).where(out["region"].notna(), None)
        return out

    @functools.cached_property
    def in_doubt(self) -> list[int]:
        """Numbers of the glaciers whose phase cycle is in doubt (glaciers.csv unwrap_flag;
        none without that column)."""
        if "unwrap_flag" not in self.glaciers.columns:
            return []
        return self.glaciers.index[self.glaciers["unwrap_flag"] == FLAG_DOUBT].tolist()

    def _id_column(self, table: pd.DataFrame | None) -> str | None:
        """The id column of glaciers.csv: the study's glacier_id_column, else RGIId."""
        if table is None:
            return None
        recorded = self.config.glacier_id_column if self.config is not None else "RGIId"
        for column in (recorded, "RGIId"):
            if column in table.columns:
                return column
        return None

    def _region_at_centroids(self, glaciers: pd.DataFrame) -> pd.Series:
        ds = self.cube
        if "region_name" not in ds or "region_id" not in ds:
            return pd.Series(ALL_GLACIERS, index=glaciers.index, dtype=object)
        x, y = ds["x"].values, ds["y"].values
        cols = np.clip(np.searchsorted(x, glaciers["x_m"].to_numpy()), 0, x.size - 1)
        rows = np.clip(np.searchsorted(-y, -glaciers["y_m"].to_numpy()), 0, y.size - 1)
        ids = ds["region_id"].isel(y=xr.DataArray(rows), x=xr.DataArray(cols)).values
        codes = ds["region"].values.tolist()
        names = dict(zip(codes, map(str, ds["region_name"].values), strict=True))
        return pd.Series([names.get(int(i)) for i in ids], index=glaciers.index, dtype=object)

    @functools.cached_property
    def regions(self) -> dict[str, list[int]]:
        """Region name -> its glacier numbers, in the order of regions.csv (else of the cube)."""
        named = self.glaciers["region"].dropna()
        named = named[named.astype(str).str.len() > 0]
        groups = {str(k): sorted(v.tolist()) for k, v in named.groupby(named).groups.items()}
        order: list[str] = []
        table = self.table("regions")
        if table is not None and "name" in table.columns:
            order = [str(n) for n in dict.fromkeys(table["name"].astype(str))]
        elif "region_name" in self.cube:
            order = [str(n) for n in self.cube["region_name"].values]
        names = [n for n in order if n in groups] + sorted(set(groups) - set(order))
        if not names:
            return {ALL_GLACIERS: self.glaciers.index.tolist()}
        return {n: groups[n] for n in names}

    @functools.cached_property
    def binned(self) -> xr.Dataset:
        """Per glacier x bin x surface, summed over scenes: n (pixels), s1 = sum of dh/years
        (m/yr), s2 = sum of (dh/years)^2 ((m/yr)^2), and area_m2 of the hypsometry. Computed."""
        stats = self.group("stats")
        if stats is None:
            raise MissingInputError(f"{self.store}: no 'stats' group (run `mbcube bin` first).")
        years = _scene_years(stats, self.cube)
        usable = np.isfinite(years) & (years != 0)
        years_da = xr.DataArray(np.where(usable, years, np.nan), dims="scene")
        weight = xr.DataArray(usable.astype(float), dims="scene")
        n = (stats["count"] * weight).sum("scene")
        s1 = (stats["sum_dh_m"].fillna(0) / years_da).fillna(0).sum("scene")
        s2 = (stats["sumsq_dh_m2"].fillna(0) / years_da**2).fillna(0).sum("scene")
        out = xr.Dataset({"n": n, "s1": s1, "s2": s2})
        hyps = self.group("hypsometry")
        if hyps is not None:
            area = hyps[["area_m2"]].drop_vars(
                [c for c in hyps.coords if c not in ("glacier", "bin", "surface")]
            )
            out, area = xr.align(out, area, join="outer", fill_value=0.0)
            out["area_m2"] = area["area_m2"]
        out = out.drop_vars([c for c in out.coords if c not in out.dims])
        (computed,) = dask.compute(out)
        return computed

    @property
    def bin_width_m(self) -> float:
        stats = self.group("stats")
        width = stats.attrs.get("bin_width_m") if stats is not None else None
        return float(width) if width else float(self.massbalance.bin_width_m)


def _inputs(source: Path | str | FigureInputs, tables: Path | str | None = None) -> FigureInputs:
    if isinstance(source, FigureInputs):
        return source
    return FigureInputs(Path(source), Path(tables) if tables is not None else None)


def _scene_years(stats: xr.Dataset, cube: xr.Dataset) -> np.ndarray:
    """Years since the reference date of each scene of `stats` (NaN when unknown)."""
    if "scene_years" in stats.coords or "scene_years" in stats:
        return np.asarray(stats["scene_years"].values, dtype=float)
    years = pd.Series(
        np.asarray(cube["scene_years"].values, dtype=float),
        index=[str(s) for s in cube["scene"].values],
    )
    return years.reindex([str(s) for s in stats["scene"].values]).to_numpy(dtype=float)


# ---------------------------------------------------------------- array helpers (numpy / lazy)


def coarsen_factor(shape: tuple[int, ...], max_px: int) -> int:
    """The integer block size that brings the larger side of `shape` to at most max_px."""
    return max(1, math.ceil(max(shape) / max_px))


def block_mean(arr: xr.DataArray, factor: int) -> xr.DataArray:
    """NaN-aware mean over factor x factor blocks (y, x), lazily; edges trimmed."""
    if factor == 1:
        return arr.astype("float32")
    total = arr.fillna(0).coarsen(y=factor, x=factor, boundary="trim").sum()
    count = arr.notnull().coarsen(y=factor, x=factor, boundary="trim").sum()
    return (total / count.where(count > 0)).astype("float32")


def block_sample(arr: xr.DataArray, factor: int) -> xr.DataArray:
    """The centre pixel of every factor x factor block (for labels: ids, masks), lazily."""
    if factor == 1:
        return arr
    ny, nx = (arr.sizes["y"] // factor) * factor, (arr.sizes["x"] // factor) * factor
    half = factor // 2
    return arr.isel(y=slice(half, ny, factor), x=slice(half, nx, factor))


def mean_rate(ds: xr.Dataset) -> xr.DataArray:
    """Mean over scenes of dh_m / scene_years per pixel (m/yr), valid pixels only, lazily."""
    if "dh_m" not in ds:
        raise MissingInputError("the cube has no dh_m layer yet (run `mbcube correct` first).")
    dh = ds["dh_m"]
    if "valid" in ds:
        dh = dh.where(ds["valid"] == 1)
    years = ds["scene_years"]
    rate = dh / years.where(years != 0)
    count = rate.notnull().sum("scene")
    return (rate.fillna(0).sum("scene") / count.where(count > 0)).rename("dhdt_m_yr")


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """True on pixels whose 4-neighbour has another label (outline pixels of every region)."""
    edge = np.zeros(labels.shape, dtype=bool)
    dy = labels[1:, :] != labels[:-1, :]
    dx = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge


def symmetric_limit(values: np.ndarray, percentile: float = 98.0, floor: float = 0.1) -> float:
    """A rounded colour limit v so that [-v, v] holds `percentile` % of |values|."""
    finite = np.abs(values[np.isfinite(values)])
    if finite.size == 0:
        return 1.0
    v = max(float(np.percentile(finite, percentile)), floor)
    step = 10 ** math.floor(math.log10(v)) / 2
    return float(math.ceil(v / step) * step)


def _extent_km(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    dx = float(abs(x[1] - x[0])) if x.size > 1 else 1.0
    dy = float(abs(y[1] - y[0])) if y.size > 1 else 1.0
    return (
        (x.min() - dx / 2) / 1e3,
        (x.max() + dx / 2) / 1e3,
        (y.min() - dy / 2) / 1e3,
        (y.max() + dy / 2) / 1e3,
    )


def _tag(bars: BarContainer, gid: str) -> None:
    """Name the patches of a bar container (for tests and SVG users)."""
    for patch in bars.patches:
        patch.set_gid(gid)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower() or "region"


# ---------------------------------------------------------------- Figs 2-6: dh/dt maps


def _region_window(inp: FigureInputs, glaciers: list[int], max_px: int) -> tuple[slice, slice]:
    """Pixel window (rows, cols) around a set of glaciers, found on a coarse glacier_id sample."""
    ds = inp.cube
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    factor = coarsen_factor((ny, nx), max_px)
    coarse = block_sample(ds["glacier_id"], factor).values
    rows, cols = np.nonzero(np.isin(coarse, glaciers))
    rows_px = list(rows * factor + factor // 2)
    cols_px = list(cols * factor + factor // 2)
    cents = inp.glaciers.loc[glaciers]
    x, y = ds["x"].values, ds["y"].values
    ok = cents["x_m"].notna() & cents["y_m"].notna()
    cols_px += list(np.searchsorted(x, cents.loc[ok, "x_m"].to_numpy()))
    rows_px += list(np.searchsorted(-y, -cents.loc[ok, "y_m"].to_numpy()))
    if not rows_px:
        return slice(0, ny), slice(0, nx)
    r0, r1, c0, c1 = min(rows_px), max(rows_px), min(cols_px), max(cols_px)
    pad = max(2 * factor, int(0.08 * max(r1 - r0, c1 - c0)))
    return (
        slice(max(0, r0 - pad), min(ny, r1 + pad + 1)),
        slice(max(0, c0 - pad), min(nx, c1 + pad + 1)),
    )


def dhdt_map(
    source: Path | str | FigureInputs,
    region: str | None = None,
    *,
    tables: Path | str | None = None,
    max_px: int = 1500,
    glacier_only: bool = True,
) -> Figure:
    """Map of the mean dh/dt (m/yr) over the scenes per pixel for one region (None: the whole
    cube), with glacier outlines, a hillshade of the reference DEM and a colour bar centred on 0.

    The area is cropped to the region's glaciers and block-averaged lazily to at most max_px
    pixels a side before it is read. glacier_only: colour glacier pixels only (else all pixels).
    """
    inp = _inputs(source, tables)
    ds = inp.cube
    if region is None:
        rows, cols = slice(0, ds.sizes["y"]), slice(0, ds.sizes["x"])
        title_name = ALL_GLACIERS
    else:
        if region not in inp.regions:
            raise KeyError(f"region {region!r} not found; regions: {list(inp.regions)}")
        rows, cols = _region_window(inp, inp.regions[region], max_px)
        title_name = region
    window = ds.isel(y=rows, x=cols)
    rate = mean_rate(window)
    if glacier_only:
        rate = rate.where(window["glacier_id"] > 0)
    factor = coarsen_factor((window.sizes["y"], window.sizes["x"]), max_px)
    layers = {
        "rate": block_mean(rate, factor),
        "dem": block_mean(window["ref_dem_m"], factor),
        "gid": block_sample(window["glacier_id"], factor),
    }
    region_code = _cube_region_code(ds, region)
    if region_code is not None:
        layers["rid"] = block_sample(window["region_id"], factor)
    (computed,) = dask.compute(layers)
    rate_px = np.asarray(computed["rate"].values, dtype=float)
    x, y = computed["rate"]["x"].values, computed["rate"]["y"].values
    extent = _extent_km(x, y)
    res = inp.res_m * factor

    height, width = rate_px.shape
    fig = Figure(figsize=map_size_in(height, width), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    dem = np.asarray(computed["dem"].values, dtype=float)
    if np.isfinite(dem).any():
        filled = np.where(np.isfinite(dem), dem, np.nanmean(dem))
        shade = LightSource(azdeg=315, altdeg=45).hillshade(filled, vert_exag=2, dx=res, dy=res)
        ax.imshow(
            np.ma.masked_where(~np.isfinite(dem), shade),
            cmap="gray",
            vmin=0,
            vmax=1.3,
            extent=extent,
            interpolation="nearest",
        )
    limit = symmetric_limit(rate_px)
    image = ax.imshow(
        np.ma.masked_invalid(rate_px),
        cmap=CMAP,
        norm=Normalize(vmin=-limit, vmax=limit),
        extent=extent,
        interpolation="nearest",
    )
    image.set_gid("dhdt")
    gid = np.asarray(computed["gid"].values)
    outline = label_boundaries(gid) & (gid > 0)
    lines = ax.imshow(
        np.ma.masked_where(~outline, np.ones(outline.shape)),
        cmap=ListedColormap(["black"]),
        extent=extent,
        interpolation="nearest",
    )
    lines.set_gid("outlines")
    lines.set_zorder(3)  # above the no-data hatching
    handles = []
    no_data = (gid > 0) & ~np.isfinite(rate_px)
    if no_data.any():  # glacier without a measurement: hatched, never mistaken for 0 m/yr
        ax.contourf(
            x / 1e3,
            y / 1e3,
            no_data.astype(float),
            levels=[0.5, 1.5],
            colors=["0.8"],
            hatches=["////"],
        )
        handles.append(
            Patch(facecolor="0.8", hatch="////", edgecolor="0.3", label="glacier, no data")
        )
    doubt = np.isin(gid, inp.in_doubt)
    if doubt.any():
        ax.contour(
            x / 1e3, y / 1e3, doubt.astype(float), levels=[0.5], colors=DOUBT_COLOUR, linewidths=2
        ).set_gid("outlines_in_doubt")
        handles.append(Patch(facecolor="none", edgecolor=DOUBT_COLOUR, lw=2, label=DOUBT_LABEL))
    ax.set_facecolor(VOID_COLOUR)
    if not np.isfinite(dem).all():
        handles.append(Patch(facecolor=VOID_COLOUR, edgecolor="0.3", label="no reference DEM"))
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.85)
    if region_code is not None:
        inside = (np.asarray(computed["rid"].values) == region_code).astype(float)
        if 0 < inside.sum() < inside.size:
            ax.contour(
                x / 1e3,
                y / 1e3,
                inside,
                levels=[0.5],
                colors="0.25",
                linestyles="--",
                linewidths=0.8,
            )
    bar = fig.colorbar(image, ax=ax, extend="both", shrink=0.85)
    bar.set_label("dh/dt (m/yr)")
    ax.set_xlabel("Easting (km)")
    ax.set_ylabel("Northing (km)")
    n_scenes = int(ds.sizes.get("scene", 0))
    period = _period(ds)
    ax.set_title(
        f"{title_name}: mean elevation change rate\n{_plural(n_scenes, 'scene')} {period}, "
        f"relative to the reference DEM" + (f" ({res:g} m pixels)" if factor > 1 else ""),
        fontsize=10,
    )
    _scale_bar(ax, extent)
    crs = inp.crs
    if crs:
        ax.text(
            0.99,
            0.01,
            crs,
            transform=ax.transAxes,
            ha="right",
            va="bottom",
            fontsize=7,
            color="0.3",
        )
    return fig


def map_size_in(height_px: int, width_px: int, long_side_in: float = 6.5) -> tuple[float, float]:
    """Figure size (in) for a map of this shape: the map's longer side long_side_in inches, plus
    room for the title, axis labels and the colour bar."""
    aspect = height_px / max(width_px, 1)
    ax_w = long_side_in if aspect <= 1 else long_side_in / aspect
    ax_h = ax_w * aspect
    return (max(ax_w + 2.4, 5.0), max(ax_h + 1.4, 3.5))


def _cube_region_code(ds: xr.Dataset, region: str | None) -> int | None:
    if region is None or "region_name" not in ds or "region_id" not in ds:
        return None
    names = [str(n) for n in ds["region_name"].values]
    return int(ds["region"].values[names.index(region)]) if region in names else None


def _period(ds: xr.Dataset) -> str:
    if "scene_date" not in ds.coords or ds.sizes.get("scene", 0) == 0:
        return ""
    dates = pd.to_datetime(ds["scene_date"].values)
    return f"({dates.min():%Y-%m} to {dates.max():%Y-%m})"


def _scale_bar(ax: Axes, extent: tuple[float, float, float, float]) -> None:
    """A black scale bar (km) in the lower-left corner."""
    span = extent[1] - extent[0]
    length = 10 ** math.floor(math.log10(max(span / 4, 1e-3)))
    for mult in (5, 2):
        if length * mult <= span / 4:
            length *= mult
            break
    x0 = extent[0] + 0.04 * span
    y0 = extent[2] + 0.05 * (extent[3] - extent[2])
    ax.plot([x0, x0 + length], [y0, y0], color="black", linewidth=3, solid_capstyle="butt")
    ax.text(
        x0 + length / 2,
        y0 + 0.01 * (extent[3] - extent[2]),
        f"{length:g} km",
        ha="center",
        va="bottom",
        fontsize=8,
        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
    )


# ---------------------------------------------------------------- Fig 1: mass balance map


def mass_balance_map(
    source: Path | str | FigureInputs, tables: Path | str | None = None, *, max_px: int = 600
) -> Figure:
    """Glacier mass balance (m w.e./yr): circles at the glacier centroids sized by area and
    coloured by mass balance over the glacier mask, and the region means +- 1 sigma as bars."""
    inp = _inputs(source, tables)
    glaciers = inp.glaciers
    if "mb_mwe_yr" not in glaciers.columns:
        raise MissingInputError("no glaciers.csv with mb_mwe_yr (run `mbcube aggregate` first).")
    shown = glaciers[np.isfinite(glaciers["mb_mwe_yr"].astype(float))]
    area = (
        shown["area_km2"].astype(float)
        if "area_km2" in shown.columns
        else shown["outline_area_km2"]
    ).fillna(shown["outline_area_km2"])
    regions = inp.table("regions")
    ds = inp.cube
    factor = coarsen_factor((ds.sizes["y"], ds.sizes["x"]), max_px)
    layers = {"gid": block_sample(ds["glacier_id"], factor)}
    if "region_id" in ds:
        layers["rid"] = block_sample(ds["region_id"], factor)
    (computed,) = dask.compute(layers)
    gx, gy = computed["gid"]["x"].values, computed["gid"]["y"].values
    extent = _extent_km(gx, gy)

    has_bars = regions is not None and "mb_mwe_yr" in regions.columns and len(regions) > 0
    fig = Figure(figsize=(12 if has_bars else 8, 6.5), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[2.2, 1] if has_bars else [1, 0.0001])
    ax = fig.add_subplot(grid[0, 0])
    mask = np.asarray(computed["gid"].values) > 0
    ax.imshow(
        np.ma.masked_where(~mask, np.ones(mask.shape)),
        cmap=ListedColormap(["#c9d6df"]),
        extent=extent,
        interpolation="nearest",
    )
    if "rid" in computed:
        rid = np.asarray(computed["rid"].values)
        if len(np.unique(rid)) > 1:
            ax.contour(
                gx / 1e3,
                gy / 1e3,
                rid,
                levels=np.unique(rid)[:-1] + 0.5,
                colors="0.4",
                linestyles="--",
                linewidths=0.8,
            )
            for code, name in zip(ds["region"].values, ds["region_name"].values, strict=False):
                r, c = np.nonzero(rid == code)
                if r.size:
                    ax.text(
                        gx[int(np.median(c))] / 1e3,
                        gy[int(np.median(r))] / 1e3,
                        str(name),
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="0.15",
                        style="italic",
                        zorder=4,
                        bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
                    )
    mb = shown["mb_mwe_yr"].astype(float).to_numpy()
    limit = symmetric_limit(mb, percentile=95.0, floor=0.05)
    size = _circle_size(area.to_numpy(), float(area.max()) if len(area) else 1.0)
    points = ax.scatter(
        shown["x_m"] / 1e3,
        shown["y_m"] / 1e3,
        s=size,
        c=mb,
        cmap=CMAP,
        norm=Normalize(-limit, limit),
        edgecolors="black",
        linewidths=0.4,
        zorder=3,
    )
    points.set_gid("glaciers")
    doubt = shown.index.isin(inp.in_doubt)
    if doubt.any():
        rings = ax.scatter(
            shown.loc[doubt, "x_m"] / 1e3,
            shown.loc[doubt, "y_m"] / 1e3,
            s=size[doubt] * 1.6 + 60,
            facecolors="none",
            edgecolors=DOUBT_COLOUR,
            linewidths=2.2,
            zorder=3,
        )
        rings.set_gid("glaciers_in_doubt")
        ring = Line2D([], [], ls="none", marker="o", ms=10, mfc="none", mec=DOUBT_COLOUR, mew=2)
        ax.add_artist(
            ax.legend([ring], [DOUBT_LABEL], loc="lower left", fontsize=8, framealpha=0.85)
        )
    bar = fig.colorbar(points, ax=ax, extend="both", shrink=0.8)
    bar.set_label("glacier mass balance (m w.e./yr)")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("Easting (km)")
    ax.set_ylabel("Northing (km)")
    ax.set_title(f"Glacier mass balance ({_plural(len(shown), 'glacier')})", fontsize=11)
    _size_legend(ax, float(area.max()) if len(area) else 1.0)
    if has_bars and regions is not None:
        _region_bars(fig.add_subplot(grid[0, 1]), regions)
    return fig


def _circle_size(area_km2: np.ndarray, max_area_km2: float) -> np.ndarray:
    """Marker area (pt^2) proportional to the glacier area; the largest glacier gets 400 pt^2."""
    return 12 + 400 * np.clip(area_km2, 0, None) / max(max_area_km2, 1e-9)


def _size_legend(ax: Axes, max_area_km2: float) -> None:
    refs = sorted({float(f"{max_area_km2 * f:.1g}") for f in (1.0, 0.3, 0.1) if max_area_km2 > 0})
    handles = [
        ax.scatter([], [], s=_circle_size(np.array([a]), max_area_km2), c="white", ec="black")
        for a in refs
    ]
    ax.legend(
        handles,
        [f"{a:g} km²" for a in refs],
        title="glacier area",
        loc="upper right",
        fontsize=7,
        title_fontsize=8,
        framealpha=0.8,
        labelspacing=1.2,
    )


def _region_bars(ax: Axes, regions: pd.DataFrame) -> None:
    """Horizontal bars of region mass balance (m w.e./yr) +- mb_sigma, all and no-surge."""
    table = regions.copy()
    if "glaciers" not in table.columns:
        table["glaciers"] = "all"
    names = list(dict.fromkeys(table["name"].astype(str)))
    kinds = [k for k in ("all", "no_surge") if k in set(table["glaciers"])] or ["all"]
    height = 0.8 / len(kinds)
    for k, kind in enumerate(kinds):
        part = table[table["glaciers"] == kind]
        part = part.set_index(part["name"].astype(str)).reindex(names)
        pos = np.arange(len(names)) + (k - (len(kinds) - 1) / 2) * height
        values = part["mb_mwe_yr"].astype(float).to_numpy()
        sigma = (
            part["mb_sigma_mwe_yr"].astype(float).to_numpy()
            if "mb_sigma_mwe_yr" in part.columns
            else None
        )
        bars = ax.barh(
            pos,
            values,
            height=height * 0.9,
            xerr=sigma,
            color=["tab:red" if v < 0 else "tab:blue" for v in np.nan_to_num(values)],
            alpha=1.0 if kind == "all" else 0.45,
            hatch=None if kind == "all" else "//",
            edgecolor="black",
            linewidth=0.5,
            error_kw={"elinewidth": 0.8, "capsize": 2},
            label="all glaciers" if kind == "all" else "without surge-type",
        )
        _tag(bars, f"regions_{kind}")
    ax.axvline(0, color="black", linewidth=0.8)
    shown = ["whole study" if n == "all" else n for n in names]
    ax.set_yticks(np.arange(len(names)), shown, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("mass balance (m w.e./yr)")
    ax.set_title("Region mean (± 1σ)", fontsize=11)
    if len(kinds) > 1:
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)


# ---------------------------------------------------------------- Fig 7: profiles


@dataclass
class Profile:
    """dh/dt per elevation bin of a set of glaciers, for one surface type or all (numpy)."""

    bin_centre_m: np.ndarray
    n: np.ndarray
    mean_m_yr: np.ndarray
    std_m_yr: np.ndarray
    area_km2: np.ndarray


def profile_from_sums(n: np.ndarray, s1: np.ndarray, s2: np.ndarray, min_n: int = 1) -> tuple:
    """Mean and sample std (m/yr) of pixel rates from count, sum and sum of squares per bin;
    NaN where fewer than min_n pixels (std needs 2)."""
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n >= max(min_n, 1), s1 / n, np.nan)
        var = np.clip(s2 / n - mean**2, 0, None) * n / (n - 1)
        std = np.where(n >= max(min_n, 2), np.sqrt(var), np.nan)
    return mean, std


def region_profiles(inp: FigureInputs, glaciers: Sequence[int]) -> dict[int | str, Profile]:
    """Profiles of a set of glaciers per surface code present (1 clean, 2 debris) and 'all'."""
    binned = inp.binned.sel(glacier=[g for g in glaciers if g in inp.binned["glacier"].values])
    summed = binned.sum("glacier")
    centres = np.asarray(summed["bin"].values, dtype=float) + inp.bin_width_m / 2
    min_n = inp.massbalance.min_px_per_bin
    out: dict[int | str, Profile] = {}
    surfaces = [int(s) for s in summed["surface"].values if int(s) in SURFACE_STYLE]
    keys: list[int | str] = [*surfaces, "all"]
    for key in keys:
        part = (
            summed.sel(surface=key)
            if key != "all"
            else summed.sel(surface=[s for s in summed["surface"].values if int(s) > 0]).sum(
                "surface"
            )
        )
        mean, std = profile_from_sums(part["n"].values, part["s1"].values, part["s2"].values, min_n)
        area = part["area_m2"].values / 1e6 if "area_m2" in part else np.zeros_like(mean)
        out[key] = Profile(centres, part["n"].values, mean, std, np.asarray(area, dtype=float))
    return out


def elevation_profile(
    source: Path | str | FigureInputs,
    region: str | None = None,
    *,
    tables: Path | str | None = None,
) -> Figure:
    """dh/dt per elevation bin (m/yr, mean +- 1 std of the pixel rates over all scenes) for clean
    and debris-covered ice of a region (None: all glaciers), with the hypsometry (km2) as bars."""
    inp = _inputs(source, tables)
    if region is None:
        glaciers, name = inp.glaciers.index.tolist(), ALL_GLACIERS
    else:
        if region not in inp.regions:
            raise KeyError(f"region {region!r} not found; regions: {list(inp.regions)}")
        glaciers, name = inp.regions[region], region
    profiles = region_profiles(inp, glaciers)
    width = inp.bin_width_m
    fig = Figure(figsize=(8, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    twin = ax.twinx()
    has_area = any(p.area_km2.sum() > 0 for p in profiles.values())
    bottom = np.zeros_like(profiles["all"].bin_centre_m)
    for code, (label, colour) in SURFACE_STYLE.items():
        if code not in profiles:
            continue
        p = profiles[code]
        if has_area:
            bars = twin.bar(
                p.bin_centre_m,
                p.area_km2,
                width=width * 0.9,
                bottom=bottom,
                color=colour,
                alpha=0.22,
                label=f"area, {label}",
            )
            _tag(bars, f"area_{code}")
            bottom = bottom + p.area_km2
        ok = np.isfinite(p.mean_m_yr)
        ax.fill_between(
            p.bin_centre_m,
            p.mean_m_yr - p.std_m_yr,
            p.mean_m_yr + p.std_m_yr,
            where=ok & np.isfinite(p.std_m_yr),
            color=colour,
            alpha=0.2,
            linewidth=0,
        )
        (line,) = ax.plot(
            p.bin_centre_m, p.mean_m_yr, "o-", color=colour, ms=3, lw=1.5, label=label
        )
        line.set_gid(f"dhdt_{code}")
    (total,) = ax.plot(
        profiles["all"].bin_centre_m,
        profiles["all"].mean_m_yr,
        "--",
        color="black",
        lw=1.2,
        label="all glacier ice",
    )
    total.set_gid("dhdt_all")
    ax.axhline(0, color="0.4", lw=0.7)
    ax.set_ylim(*_profile_limits(profiles))
    if has_area and bottom.max() > 0:
        twin.set_ylim(0, 1.15 * float(bottom.max()))
    ax.set_xlim(*_profile_span(profiles, width))
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_xlabel(f"elevation of the reference DEM (m a.s.l., {width:g} m bins)")
    ax.set_ylabel("dh/dt (m/yr), mean ± 1 std")
    twin.set_ylabel("glacier area per bin (km²)")
    if not has_area:
        twin.text(0.99, 0.98, "no hypsometry stored", transform=ax.transAxes, ha="right", va="top")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, fontsize=8, loc="best", framealpha=0.85)
    n_doubt = len(set(glaciers) & set(inp.in_doubt))
    if n_doubt:
        ax.text(
            0.01,
            0.01,
            f"includes {_plural(n_doubt, 'glacier')} whose phase cycle is in doubt",
            transform=ax.transAxes,
            fontsize=8,
            bbox={"facecolor": "white", "edgecolor": DOUBT_COLOUR, "lw": 1.5, "pad": 2},
        ).set_gid("in_doubt")
    n_px = int(profiles["all"].n.sum())
    ax.set_title(
        f"{name}: elevation change rate by altitude ({_plural(len(glaciers), 'glacier')}, "
        f"{n_px:,} pixel measurements)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    return fig


def _profile_span(profiles: dict[int | str, Profile], width: float) -> tuple[float, float]:
    """x limits (m): the bins with glacier area or measurements, half a bin either side."""
    p = profiles["all"]
    used = (p.area_km2 > 0) | np.isfinite(p.mean_m_yr)
    if not used.any():
        return float(p.bin_centre_m.min() - width), float(p.bin_centre_m.max() + width)
    return float(p.bin_centre_m[used].min() - width), float(p.bin_centre_m[used].max() + width)


def _profile_limits(profiles: dict[int | str, Profile]) -> tuple[float, float]:
    """y limits showing every mean and most of the spread (a few-pixel bin's huge std is cut)."""
    means = np.concatenate([p.mean_m_yr for p in profiles.values()])
    lows = np.concatenate([p.mean_m_yr - p.std_m_yr for p in profiles.values()])
    highs = np.concatenate([p.mean_m_yr + p.std_m_yr for p in profiles.values()])
    if not np.isfinite(means).any():
        return -1.0, 1.0
    lo = min(np.nanmin(means), np.nanpercentile(lows, 10) if np.isfinite(lows).any() else 0.0)
    hi = max(np.nanmax(means), np.nanpercentile(highs, 90) if np.isfinite(highs).any() else 0.0)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    pad = 0.08 * max(hi - lo, 0.1)
    return float(lo - pad), float(hi + pad)


# ---------------------------------------------------------------- Fig 8: transect


def glacier_parts(inp: FigureInputs) -> pd.DataFrame:
    """Per glacier: dh/dt (m/yr) of the accumulation area (bins at or above the glacier's median
    elevation), the ablation area (below) and the whole glacier, each the area-weighted mean of
    the bin rates, unmeasured bins filled by linear interpolation along elevation; area_km2."""
    binned = inp.binned
    surfaces = [s for s in binned["surface"].values if int(s) > 0]
    summed = binned.sel(surface=surfaces).sum("surface")
    centres = np.asarray(summed["bin"].values, dtype=float) + inp.bin_width_m / 2
    n, s1 = summed["n"].values, summed["s1"].values
    area = summed["area_m2"].values if "area_m2" in summed else (n > 0).astype(float)
    min_n = inp.massbalance.min_px_per_bin
    rows = []
    for i, glacier in enumerate(summed["glacier"].values):
        rows.append({"glacier": int(glacier), **_parts_of(centres, n[i], s1[i], area[i], min_n)})
    return pd.DataFrame(rows).set_index("glacier")


def _parts_of(
    centres: np.ndarray, n: np.ndarray, s1: np.ndarray, area: np.ndarray, min_n: int
) -> dict[str, float]:
    nan = {"accumulation": np.nan, "ablation": np.nan, "total": np.nan, "area_km2": np.nan}
    measured = n >= min_n
    has_area = area > 0
    if not measured.any() or not has_area.any():
        return nan | {"area_km2": float(area.sum() / 1e6)}
    rate = np.interp(centres, centres[measured], s1[measured] / n[measured])
    cumulative = np.cumsum(area) / area.sum()
    median = centres[int(np.searchsorted(cumulative, 0.5))]
    upper = has_area & (centres >= median)
    lower = has_area & (centres < median)

    def mean(sel: np.ndarray) -> float:
        return float((rate[sel] * area[sel]).sum() / area[sel].sum()) if area[sel].sum() else np.nan

    return {
        "accumulation": mean(upper),
        "ablation": mean(lower),
        "total": mean(has_area),
        "area_km2": float(area.sum() / 1e6),
    }


def _longitudes(inp: FigureInputs, x_m: np.ndarray, y_m: np.ndarray) -> tuple[np.ndarray, str]:
    if inp.crs:
        try:
            from pyproj import Transformer

            lon, _ = Transformer.from_crs(inp.crs, "EPSG:4326", always_xy=True).transform(x_m, y_m)
            return np.asarray(lon, dtype=float), "longitude (°E)"
        except Exception as err:  # an unusual CRS: fall back to eastings
            log.info("transect: no longitude for CRS %s (%s); using easting", inp.crs, err)
    return np.asarray(x_m, dtype=float) / 1e3, "easting (km)"


def transect(
    source: Path | str | FigureInputs,
    *,
    tables: Path | str | None = None,
    n_bins: int | None = None,
) -> Figure:
    """dh/dt (m/yr) of the accumulation area, ablation area and whole glaciers along longitude:
    glaciers grouped into n_bins equal longitude bins (default: about 4 glaciers a bin, 3-25 bins),
    area-weighted means per bin; the single glaciers' totals as grey dots."""
    inp = _inputs(source, tables)
    parts = glacier_parts(inp).join(inp.glaciers[["x_m", "y_m"]])
    parts = parts[np.isfinite(parts["total"])]
    if parts.empty:
        raise MissingInputError("no glacier has measured bins: nothing to draw on a transect.")
    lon, label = _longitudes(inp, parts["x_m"].to_numpy(), parts["y_m"].to_numpy())
    parts = parts.assign(lon=lon)
    n_bins = n_bins or int(np.clip(len(parts) // 4, 3, 25))
    lo, hi = float(parts["lon"].min()), float(parts["lon"].max())
    if hi - lo < 1e-9:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, n_bins + 1)
    parts["lon_bin"] = np.clip(np.digitize(parts["lon"], edges) - 1, 0, n_bins - 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig = Figure(figsize=(9, 4.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.scatter(parts["lon"], parts["total"], s=8, color="0.6", alpha=0.6, label="single glaciers")
    doubt = parts.index.isin(inp.in_doubt)
    if doubt.any():
        ax.scatter(
            parts.loc[doubt, "lon"],
            parts.loc[doubt, "total"],
            s=60,
            facecolors="none",
            edgecolors=DOUBT_COLOUR,
            linewidths=1.8,
            label=DOUBT_LABEL,
        ).set_gid("glaciers_in_doubt")
    styles = {
        "accumulation": ("tab:blue", "^-", "accumulation area"),
        "ablation": ("tab:red", "v-", "ablation area"),
        "total": ("black", "o-", "whole glacier"),
    }
    for part, (colour, fmt, text) in styles.items():
        values = _weighted_by_bin(parts, part, n_bins)
        (line,) = ax.plot(centres, values, fmt, color=colour, lw=1.6, ms=5, label=text)
        line.set_gid(f"transect_{part}")
    ax.axhline(0, color="0.4", lw=0.7)
    ax.set_xlabel(label)
    ax.set_ylabel("dh/dt (m/yr)")
    ax.set_title(
        f"Elevation change rate along {label.split(' ')[0]} ({_plural(len(parts), 'glacier')}, "
        f"{n_bins} bins; accumulation = above each glacier's median elevation)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def _weighted_by_bin(parts: pd.DataFrame, column: str, n_bins: int) -> np.ndarray:
    """Area-weighted mean of `column` per longitude bin (NaN for empty bins)."""
    out = np.full(n_bins, np.nan)
    for b in range(n_bins):
        group = parts[parts["lon_bin"] == b]
        ok = np.isfinite(group[column]) & (group["area_km2"] > 0)
        if ok.any():
            w = group.loc[ok, "area_km2"]
            out[b] = float((group.loc[ok, column] * w).sum() / w.sum())
    return out


# ---------------------------------------------------------------- all figures


def make_figures(
    store: Path, tables: Path, out: Path, *, max_px: int = 1500, dpi: int = DPI
) -> list[Path]:
    """Write every figure the inputs allow as PNG into `out`; return their paths.

    Files: dhdt_map_<region>.png, mass_balance_map.png, profile_<region>.png, transect.png.
    A figure whose input is missing is skipped with a log message; figures an earlier run left in
    `out` are removed (those listed in FIGURES_RECORD: never a file mbcube did not write), so
    `out` holds exactly this run's figures. A damaged store fails the call (`is_damage`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    inp = FigureInputs(Path(store), Path(tables))
    jobs: list[tuple[str, functools.partial[Figure]]] = []
    for name in inp.regions:
        region = None if name == ALL_GLACIERS else name
        jobs.append(
            (f"dhdt_map_{_slug(name)}", functools.partial(dhdt_map, inp, region, max_px=max_px))
        )
    jobs.append(("mass_balance_map", functools.partial(mass_balance_map, inp)))
    for name in inp.regions:
        region = None if name == ALL_GLACIERS else name
        jobs.append((f"profile_{_slug(name)}", functools.partial(elevation_profile, inp, region)))
    jobs.append(("transect", functools.partial(transect, inp)))
    written = []
    for stem, make in jobs:
        try:
            fig = make()
        except MissingInputError as err:
            log.warning("figure %s skipped: %s", stem, err)
            continue
        except Exception as err:  # one bad figure must not cost the others and the report...
            if is_damage(err):  # ...but a damaged store is said once, loudly
                raise
            log.exception("figure %s failed; the other figures are still made", stem)
            continue
        path = out / f"{stem}.png"
        fig.savefig(path, dpi=dpi)
        written.append(path)
    _forget_stale_figures(out, written)
    return written


def _forget_stale_figures(out: Path, written: list[Path]) -> None:
    """Delete the figures an earlier run made (listed in FIGURES_RECORD) that this run did not
    make, so that `out` holds exactly this run's figures; files mbcube did not write stay."""
    record = out / FIGURES_RECORD
    try:
        earlier = set(json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        earlier = set()
    for name in earlier - {p.name for p in written}:
        (out / Path(name).name).unlink(missing_ok=True)
    record.write_text(json.dumps(sorted(p.name for p in written)))
