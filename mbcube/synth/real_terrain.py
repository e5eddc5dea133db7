"""Synthetic InSAR studies on REAL terrain: the SRTM clips and outlines of oggm-sample (Karakoram).

The true surface at the reference date is the real SRTM (EPSG:4326, int16) warped onto a metric
UTM grid; the change is a known elevation-dependent rate on the real glacier outline; the scenes
are wrapped bistatic interferograms of that change (datum, ramp, seasonal offset, coherence
noise, layover/shadow from the real slopes), made with the same scene physics as `mbcube.synth`.

The study keeps the real-world traps on purpose:
- the reference DEM is the real SRTM clip in EPSG:4326 as int16 with nodata -32768, with SRTM-like
  voids injected (the pipeline must read them as voids, not as -32768 m);
- the outlines are the real shapefiles in EPSG:4326, read where they are (not copied);
- the voids are where SRTM's are, in high terrain, so on glaciers they sit where the true rate
  is highest: `truth/glaciers.csv` gives the rate over all in-grid glacier pixels (`dhdt_m_yr`)
  and over those with a valid reference (`dhdt_valid_ref_m_yr`), which no method can bin better;
- `crop_east_frac` cuts the grid so that the outline crosses the grid's eastern edge: the truth
  is then the glacier part inside the grid (`truth/glaciers.csv`: in-grid area and rate, and the
  full outline area for comparison);
- with `regions_dir`, the real region polygons of hma-regions (`mbcube.regions_io`) are written as
  regions.gpkg (the paper's sub-regions) and basins.gpkg (Upper Tarim / Upper Indus), and the
  outlines as glaciers.gpkg (still EPSG:4326) with a `basin` column, as the HMA study uses them.

No penetration is simulated (the study sets `corrections.penetration: none`).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import yaml
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.warp import reproject, transform_bounds

from mbcube.errors import StudyError
from mbcube.grid import Grid, utm_crs_for
from mbcube.synth import DENSITY_KG_M3, REFERENCE_DATE, _open, _region_truth
from mbcube.synth import scenes as sc
from mbcube.synth.noise import value_noise

__all__ = ["SITES", "RealTerrainSpec", "Site", "generate_real_terrain_study"]

SRTM_NODATA = -32768


@dataclass(frozen=True)
class Site:
    """A real SRTM clip and its outline(s), paths relative to the shared data folder."""

    dem: str
    outlines: str
    id_column: str


SITES: dict[str, Site] = {
    "baltoro": Site(
        "oggm-sample/test-files/baltoro_srtm_clip.tif",
        "oggm-sample/test-files/baltoro_wgs84.shp",
        "RGIID",
    ),
    "RGI60-14.03439": Site(
        "oggm-sample/test-files/RGI60-14.03439/RGI60-14.03439.tif",
        "oggm-sample/test-files/RGI60-14.03439/RGI60-14.03439.shp",
        "RGIId",
    ),
}


@dataclass(frozen=True)
class RealTerrainSpec:
    """What to build on which real site."""

    site: str = "RGI60-14.03439"
    res_m: float = 30.0
    tile_px: int = 128
    n_scenes: int = 2
    seed: int = 1
    crop_east_frac: float = 0.0  # cut this fraction of the grid's width off its eastern side
    void_fraction: float = 0.02  # about this fraction of the reference DEM becomes int16 nodata
    rate_mid_m_yr: float = -0.4  # true dh/dt at the glacier's median elevation (m/yr)
    rate_gradient_per_m: float = 0.002  # d(rate)/dz (1/yr)
    rate_variability_m_yr: float = 0.15  # smooth (2 km) spatial variability of the rate (m/yr)
    margin_taper_m: float = 450.0  # the rate goes to 0 at the outline over this distance (m)
    #: a WGMS elevation-band mass-balance profile (CSV: rows years, columns band elevations, mm
    #: w.e.; path relative to data_dir), mapped onto each glacier by normalised elevation, in
    #: place of the linear rate; None: the linear rate
    rate_profile: str | None = None
    h_amb_m: float | None = None  # every scene's height of ambiguity (m); None: drawn at random


def generate_real_terrain_study(
    out: Path | str,
    data_dir: Path | str,
    spec: RealTerrainSpec | str = "RGI60-14.03439",
    *,
    regions_dir: Path | str | None = None,
    **overrides: Any,
) -> Path:
    """Write a synthetic insar study on real terrain at `out` (study contract + truth/).

    data_dir: the shared data folder (holding oggm-sample/); spec: a RealTerrainSpec or a site
    name of SITES; regions_dir: the hma-regions folder, to add the real regions and basins."""
    if isinstance(spec, str):
        spec = RealTerrainSpec(site=spec)
    spec = replace(spec, **overrides)
    if spec.site not in SITES:
        raise StudyError(f"unknown site {spec.site!r}; choose one of {sorted(SITES)}.")
    if not 0.0 <= spec.crop_east_frac < 0.9:
        raise StudyError(f"crop_east_frac must lie in [0, 0.9), got {spec.crop_east_frac}.")
    site = SITES[spec.site]
    data_dir = Path(data_dir).resolve()
    dem_path, outline_path = data_dir / site.dem, data_dir / site.outlines
    for path in (dem_path, outline_path):
        if not path.exists():
            raise StudyError(f"{path}: not found; real-terrain studies need ../shared/data.")
    out = Path(out)
    for sub in ("scenes", "reference", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    grid = _grid(dem_path, spec)
    surface = _warp_to_grid(dem_path, grid)  # the true surface at the reference date (m)
    _write_reference_with_voids(dem_path, out / "reference" / "srtm_c.tif", spec.seed, spec)

    outlines = gpd.read_file(outline_path)
    if outlines.crs is None:
        raise StudyError(f"{outline_path}: no CRS.")
    outlines_grid = outlines.to_crs(grid.crs)
    glacier = rasterize(
        zip(outlines_grid.geometry, range(1, len(outlines) + 1), strict=True),
        out_shape=grid.shape,
        transform=grid.transform,
        fill=0,
        dtype="int32",
    )
    x, y = np.meshgrid(grid.x_coords(), grid.y_coords())
    profile = None if spec.rate_profile is None else band_profile(data_dir / spec.rate_profile)
    rate = _rate_field(glacier, surface, x, y, spec, grid.res, profile)
    _write_grid(out / "truth" / "dhdt_m_yr.tif", grid, rate.astype(np.float32), np.nan)

    rng = np.random.default_rng(spec.seed)
    span = grid.nx * grid.res
    centre = ((grid.bounds[0] + grid.bounds[2]) / 2, (grid.bounds[1] + grid.bounds[3]) / 2)
    scene_defs = [
        replace(  # each covers the grid
            s,
            swath_half_width_m=10.0 * span,
            swath_offset_m=0.0,
            h_amb_m=s.h_amb_m if spec.h_amb_m is None else spec.h_amb_m,
            h_amb_varies=s.h_amb_varies and spec.h_amb_m is None,
        )
        for s in sc.make_scenes(rng, spec.n_scenes, "insar", span, spec.seed, None)
    ]
    dz_dx = np.gradient(surface, grid.res, axis=1)
    iy, ix = np.indices(grid.shape)
    rows = []
    for scene in scene_defs:
        rows.append(
            _write_scene(out, grid, scene, surface, glacier, rate, dz_dx, x, y, ix, iy, centre)
        )
    pd.DataFrame(rows).to_csv(out / "scenes.csv", index=False)

    regions = None
    glaciers_file = outline_path  # the real outlines, read where they are
    if regions_dir is not None:
        from mbcube.regions_io import paper_basins, paper_subregions, tag_basins, write_regions

        regions = paper_subregions(regions_dir)
        write_regions(regions, out / "regions.gpkg")
        basins = paper_basins(regions_dir)
        write_regions(basins, out / "basins.gpkg")
        glaciers_file = out / "glaciers.gpkg"  # the same outlines (EPSG:4326) with a basin column
        tag_basins(outlines, basins).to_file(glaciers_file, driver="GPKG")

    config = {
        "name": f"real-terrain-{spec.site}-{spec.seed}",
        "reference_date": REFERENCE_DATE.isoformat(),
        "glacier_id_column": site.id_column,
        "surge_column": None,
        "grid": {
            "crs": grid.crs,
            "res_m": grid.res,
            "bounds": list(grid.bounds),
            "tile_px": spec.tile_px,
        },
        "files": {"glaciers": str(glaciers_file)},
        "corrections": {"penetration": "none"},
    }
    (out / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    ref_valid = np.isfinite(_warp_to_grid(out / "reference" / "srtm_c.tif", grid))
    _write_truth(
        out, spec, grid, outlines, outlines_grid, glacier, rate, ref_valid, scene_defs, regions
    )
    return out


# ---------------------------------------------------------------- grid and reference


def _grid(dem_path: Path, spec: RealTerrainSpec) -> Grid:
    """The UTM grid covering the DEM clip, cut on its eastern side by crop_east_frac."""
    with rasterio.open(dem_path) as src:
        bounds = src.bounds
        crs = src.crs
    lon, lat = (bounds.left + bounds.right) / 2, (bounds.bottom + bounds.top) / 2
    utm = utm_crs_for(lon, lat)
    left, bottom, right, top = transform_bounds(crs, utm, *bounds)
    right = left + (1.0 - spec.crop_east_frac) * (right - left)
    return Grid.covering(utm, (left, bottom, right, top), spec.res_m, spec.tile_px)


def _warp_to_grid(path: Path, grid: Grid) -> np.ndarray:
    """A raster warped (bilinear) onto the grid as float64, NaN for nodata and outside."""
    out = np.full(grid.shape, np.nan, dtype=np.float64)
    with rasterio.open(path) as src:
        reproject(
            rasterio.band(src, 1),
            out,
            src_nodata=src.nodata,
            dst_transform=grid.transform,
            dst_crs=grid.crs,
            dst_nodata=np.nan,
            resampling=Resampling.bilinear,
        )
    return out


def _write_reference_with_voids(src_path: Path, dst: Path, seed: int, spec: RealTerrainSpec) -> int:
    """Copy the SRTM clip (EPSG:4326, int16) with SRTM-like voids (nodata -32768) in high,
    steep terrain; return the number of void pixels."""
    with rasterio.open(src_path) as src:
        profile = src.profile
        z = src.read(1)
        transform = src.transform
        nodata = src.nodata if src.nodata is not None else SRTM_NODATA
    rows, cols = np.indices(z.shape)
    lon = transform.c + (cols + 0.5) * transform.a
    lat = transform.f + (rows + 0.5) * transform.e
    valid = z != nodata
    if spec.void_fraction > 0 and valid.any():
        score = value_noise(lon * 111e3, lat * 111e3, 600.0, seed + 404)
        high = z.astype(np.float64) >= np.percentile(z[valid], 60)
        threshold = np.quantile(score[valid & high], 1.0 - spec.void_fraction / 0.4)
        void = valid & high & (score > threshold)
        z = np.where(void, nodata, z).astype(z.dtype)
    profile.update(nodata=nodata, compress="deflate")
    with rasterio.open(dst, "w", **profile) as out:
        out.write(z, 1)
    return int((z == nodata).sum())


def band_profile(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A WGMS elevation-band profile: (band elevations (m), mean mass balance over its years (m
    w.e./yr)), bands without a value left out, by elevation."""
    table = pd.read_csv(path, index_col=0)
    mean = table.mean(axis=0, skipna=True)
    z = np.array([float(c) for c in mean.index])
    mb = mean.to_numpy(dtype=float) / 1000.0
    keep = np.isfinite(mb)
    order = np.argsort(z[keep])
    return z[keep][order], mb[keep][order]


def _rate_field(
    glacier: np.ndarray,
    surface: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    spec: RealTerrainSpec,
    res_m: float,
    profile: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """True dh/dt (m/yr), plus smooth variability, 0 off-glacier: linear in elevation about each
    glacier's median, or the band `profile` (elevations m, m w.e./yr) mapped onto the glacier's
    elevation range (normalised elevation) and converted to ice at DENSITY_KG_M3. Tapered to 0
    at the outline over margin_taper_m when > 0 (thin ice at the margins changes little; without
    it a tongue meets the ground with a step that can exceed half a height of ambiguity)."""
    from scipy.ndimage import distance_transform_edt

    rate = np.zeros(glacier.shape)
    wiggle = spec.rate_variability_m_yr * value_noise(x, y, 2000.0, spec.seed + 303)
    if spec.margin_taper_m > 0:
        inside_m = distance_transform_edt(glacier > 0) * res_m  # to the nearest off-glacier px
        taper = np.clip((inside_m - 0.5 * res_m) / spec.margin_taper_m, 0.0, 1.0)
    else:
        taper = np.ones(glacier.shape)
    for index in np.unique(glacier[glacier > 0]):
        on = glacier == index
        z = surface[on]
        if profile is not None:
            z_lo, z_hi = float(np.nanmin(z)), float(np.nanmax(z))
            bands, mb = profile
            where = bands[0] + (z - z_lo) / max(z_hi - z_lo, 1.0) * (bands[-1] - bands[0])
            r = np.interp(where, bands, mb) * 1000.0 / DENSITY_KG_M3 + wiggle[on]
            rate[on] = np.nan_to_num(r, nan=0.0)
            continue
        z_mid = float(np.nanmedian(z))
        r = spec.rate_mid_m_yr + spec.rate_gradient_per_m * (z - z_mid) + wiggle[on]
        rate[on] = np.clip(np.nan_to_num(r, nan=spec.rate_mid_m_yr), -4.0, 1.5)
    return rate * taper


# ---------------------------------------------------------------- scenes


def _write_grid(path: Path, grid: Grid, data: np.ndarray, nodata: float | None) -> None:
    from contextlib import ExitStack

    with ExitStack() as stack:
        _open(stack, path, grid, str(data.dtype), nodata, grid.tile).write(data, 1)


def _coherence(
    scene: sc.SceneDef, glacier: np.ndarray, surface: np.ndarray, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Coherence: high on rock, lower on glaciers and higher up (dry snow), low where masked."""
    base = np.where(glacier > 0, 0.75 - 0.0001 * np.nan_to_num(surface - 5000.0), 0.86)
    gamma = base + 0.06 * value_noise(x, y, 400.0, scene.seed + 21)
    return np.clip(gamma, 0.05, 0.97)


def _write_scene(
    out: Path,
    grid: Grid,
    scene: sc.SceneDef,
    surface: np.ndarray,
    glacier: np.ndarray,
    rate: np.ndarray,
    dz_dx: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    ix: np.ndarray,
    iy: np.ndarray,
    centre: tuple[float, float],
) -> dict[str, Any]:
    """Write one insar scene on the grid; return its scenes.csv row."""
    years = sc.years_between(REFERENCE_DATE, scene.date)
    on_glacier = glacier > 0
    dh = np.where(on_glacier, rate * years + scene.seasonal_offset_m(), 0.0)
    dh = dh + sc.orbit_error_m(scene, x, y, centre)
    mask = sc.radar_mask(scene, np.nan_to_num(dz_dx))
    gamma = np.where(mask == 1, 0.15, _coherence(scene, glacier, surface, x, y))
    h_amb = sc.h_amb_field(scene, x, centre, 0.5 * grid.nx * grid.res)
    phase = sc.wrapped_phase(scene, dh, gamma, h_amb, ix, iy)
    inside = np.isfinite(surface)
    base = f"scenes/{scene.scene_id}"
    _write_grid(
        out / f"{base}_phase.tif", grid, np.where(inside, phase, np.nan).astype("f4"), np.nan
    )
    _write_grid(out / f"{base}_coh.tif", grid, np.where(inside, gamma, np.nan).astype("f4"), np.nan)
    _write_grid(out / f"{base}_mask.tif", grid, np.where(inside, mask, 255).astype("u1"), 255)
    row = {
        "scene_id": scene.scene_id,
        "date": scene.date.isoformat(),
        "kind": "insar",
        "phase": f"{base}_phase.tif",
        "coherence": f"{base}_coh.tif",
        "h_amb": f"{scene.h_amb_m:.3f}",
        "mask": f"{base}_mask.tif",
        "nlooks": scene.nlooks,
    }
    if scene.h_amb_varies:
        field = np.broadcast_to(np.asarray(h_amb, dtype=np.float32), grid.shape).copy()
        _write_grid(out / f"{base}_hamb.tif", grid, field, None)
        row["h_amb"] = f"{base}_hamb.tif"
    return row


# ---------------------------------------------------------------- truth


def _write_truth(
    out: Path,
    spec: RealTerrainSpec,
    grid: Grid,
    outlines: gpd.GeoDataFrame,
    outlines_grid: gpd.GeoDataFrame,
    glacier: np.ndarray,
    rate: np.ndarray,
    ref_valid: np.ndarray,
    scene_defs: list[sc.SceneDef],
    regions: gpd.GeoDataFrame | None,
) -> None:
    site = SITES[spec.site]
    n = len(outlines) + 1
    count = np.bincount(glacier.ravel(), minlength=n)[1:]
    rate_sum = np.bincount(glacier.ravel(), weights=rate.ravel(), minlength=n)[1:]
    with_ref = np.where(ref_valid, glacier, 0).ravel()
    count_ref = np.bincount(with_ref, minlength=n)[1:]
    rate_sum_ref = np.bincount(with_ref, weights=rate.ravel(), minlength=n)[1:]
    centroids = outlines_grid.geometry.centroid
    region_of = np.full(len(outlines), "", dtype=object)
    if regions is not None:
        regions_grid = regions.to_crs(grid.crs)
        for name, poly in zip(regions_grid["name"], regions_grid.geometry, strict=True):
            region_of[centroids.within(poly).to_numpy()] = name
    glaciers = pd.DataFrame(
        {
            "RGIId": outlines[site.id_column].astype(str).to_numpy(),
            "area_km2": count * grid.pixel_area_m2 / 1e6,
            "outline_area_km2": (outlines_grid.geometry.area / 1e6).to_numpy(),
            "n_px": count.astype(int),
            "dhdt_m_yr": np.where(count > 0, rate_sum / np.maximum(count, 1), np.nan),
            # over the glacier pixels with a valid reference DEM (the injected voids excluded)
            "dhdt_valid_ref_m_yr": np.where(
                count_ref > 0, rate_sum_ref / np.maximum(count_ref, 1), np.nan
            ),
            "ref_void_frac": 1.0 - count_ref / np.maximum(count, 1),
            "surge": 0,
            "region": region_of,
        }
    )
    glaciers["in_grid_frac"] = glaciers["area_km2"] / glaciers["outline_area_km2"]
    glaciers["mb_mwe_yr"] = glaciers["dhdt_m_yr"] * DENSITY_KG_M3 / 1000.0
    glaciers.to_csv(out / "truth" / "glaciers.csv", index=False)
    _region_truth(glaciers[glaciers["region"] != ""]).to_csv(
        out / "truth" / "regions.csv", index=False
    )
    scene_truth = pd.DataFrame(
        [
            {
                "scene_id": s.scene_id,
                "years": sc.years_between(REFERENCE_DATE, s.date),
                "datum_m": s.datum_m,
                "ramp_b_m_per_km": s.ramp_m_per_km[0],
                "ramp_c_m_per_km": s.ramp_m_per_km[1],
                "ramp_d_m_per_km2": s.ramp_m_per_km[2],
                "seasonal_offset_m": s.seasonal_offset_m(),
                "seasonal_table_m": sc.snow_surface_m(s.month),
                "h_amb_m": s.h_amb_m,
            }
            for s in scene_defs
        ]
    )
    scene_truth.to_csv(out / "truth" / "scenes.csv", index=False)
    meta = {
        "spec": asdict(spec),
        "site": asdict(site),
        "grid": grid.to_attrs(),
        "reference_date": REFERENCE_DATE.isoformat(),
        "density_kg_m3": DENSITY_KG_M3,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "notes": "reference/srtm_c.tif is the real SRTM (int16, EPSG:4326) with injected voids "
        "(-32768); the true surface is the void-free SRTM; no penetration is simulated.",
    }
    (out / "truth" / "meta.json").write_text(json.dumps(meta, indent=2))
