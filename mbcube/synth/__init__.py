"""Synthetic studies with known truth (`mbcube synth`): the demo, the tests and the benchmarks.

The study folder follows the public contract (README.md); the truth goes to `truth/`, which the
pipeline never reads. Rasters are generated and written tile by tile, so memory is bounded by the
tile size whatever the study size.
"""

from __future__ import annotations

import datetime as dt
import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import shapely
import yaml
from pyproj import Transformer
from rasterio.io import DatasetWriter

from mbcube.grid import Grid
from mbcube.synth import scenes as sc
from mbcube.synth.noise import normal, value_noise
from mbcube.synth.world import MARGIN_TAPER_M, World, make_glaciers, reference_noise_m

__all__ = ["PRESETS", "SynthSpec", "generate_study"]

REFERENCE_DATE = dt.date(2000, 2, 16)
DENSITY_KG_M3 = 850.0


@dataclass(frozen=True)
class SynthSpec:
    """Size and make-up of a synthetic study."""

    size_px: int = 320
    res_m: float = 30.0
    tile_px: int = 128
    n_glaciers: int = 12
    n_scenes: int = 3
    kind: Literal["insar", "dem", "mixed"] = "insar"
    seed: int = 1
    crs: str = "EPSG:32643"
    x0: float = 500000.0
    y0: float = 4000000.0
    other_crs: str | None = "EPSG:32644"  # the last scene is delivered in this CRS
    reference_sigma_m: float = 1.0
    xband_coverage: float = 0.75  # SRTM-X covers this western fraction of the grid
    margin_taper_m: float = MARGIN_TAPER_M  # 0: tongues meet the ground with a step (unwrapping)
    surge_fraction: float = 0.06  # of glaciers above 2 km2
    gradient_scale: float = 1.0  # multiplies the glaciers' d(rate)/dz

    @property
    def grid(self) -> Grid:
        return Grid(
            self.crs, self.x0, self.y0, self.res_m, self.size_px, self.size_px, self.tile_px
        )


PRESETS: dict[str, SynthSpec] = {
    "tiny": SynthSpec(),
    "demo": SynthSpec(size_px=1024, tile_px=512, n_glaciers=60, n_scenes=5),
    # tongues and surge fronts meeting the ground with steps beyond h_amb / 2 (issue 14)
    "tongues": SynthSpec(
        size_px=512,
        tile_px=256,
        n_glaciers=10,
        margin_taper_m=0.0,
        surge_fraction=0.3,
        gradient_scale=2.5,
        other_crs=None,
    ),
    "large": SynthSpec(size_px=8000, tile_px=1024, n_glaciers=1500, n_scenes=20, other_crs=None),
}


def generate_study(out: Path | str, spec: SynthSpec | str = "tiny", **overrides: Any) -> Path:
    """Write a synthetic study folder at `out` (scenes, references, outlines, NDSI, regions, truth/)."""
    if isinstance(spec, str):
        spec = PRESETS[spec]
    spec = replace(spec, **overrides)
    out = Path(out)
    for sub in ("scenes", "reference", "truth"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    grid = spec.grid
    rng = np.random.default_rng(spec.seed)
    span = grid.nx * grid.res
    glaciers = make_glaciers(
        rng,
        grid.bounds,
        spec.n_glaciers,
        surge_fraction=spec.surge_fraction,
        margin_taper_m=spec.margin_taper_m,
        gradient_scale=spec.gradient_scale,
    )
    world = World(glaciers, seed=spec.seed)
    scene_defs = sc.make_scenes(rng, spec.n_scenes, spec.kind, span, spec.seed, spec.other_crs)
    centre = ((grid.bounds[0] + grid.bounds[2]) / 2, (grid.bounds[1] + grid.bounds[3]) / 2)

    sums = _write_grid_rasters(
        out, spec, grid, world, [s for s in scene_defs if s.crs is None], centre
    )
    for scene in scene_defs:
        if scene.crs is not None:
            _write_scene_other_crs(out, spec, grid, world, scene, centre)
    regions = _region_polygons(grid)
    _write_vectors(out, spec, world, regions)
    _write_tables(out, spec, grid, world, scene_defs, sums, regions)
    return out


def _profile(grid: Grid, dtype: str, nodata: float | None, tile: int) -> dict[str, Any]:
    block = 256 if tile >= 256 else 128
    return {
        "driver": "GTiff",
        "width": grid.nx,
        "height": grid.ny,
        "count": 1,
        "dtype": dtype,
        "crs": grid.crs,
        "transform": grid.transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "deflate",
        "BIGTIFF": "IF_SAFER",
    }


def _open(
    stack: ExitStack, path: Path, grid: Grid, dtype: str, nodata: float | None, tile: int
) -> DatasetWriter:
    return stack.enter_context(rasterio.open(path, "w", **_profile(grid, dtype, nodata, tile)))


def _scene_paths(scene: sc.SceneDef) -> dict[str, str]:
    base = f"scenes/{scene.scene_id}"
    if scene.kind == "dem":
        return {"dem": f"{base}_dem.tif"}
    paths = {
        "phase": f"{base}_phase.tif",
        "coherence": f"{base}_coh.tif",
        "mask": f"{base}_mask.tif",
    }
    if scene.h_amb_varies:
        paths["h_amb"] = f"{base}_hamb.tif"
    return paths


def _write_grid_rasters(
    out: Path,
    spec: SynthSpec,
    grid: Grid,
    world: World,
    scenes: list[sc.SceneDef],
    centre: tuple[float, float],
) -> dict[str, np.ndarray]:
    """Write all rasters on the study grid, tile by tile; return per-glacier sums for the truth."""
    n = len(world.glaciers) + 1
    sums = {"count": np.zeros(n), "rate": np.zeros(n)}
    x_cut = grid.bounds[0] + spec.xband_coverage * (grid.bounds[2] - grid.bounds[0])
    with ExitStack() as stack:
        f32 = {
            "srtm_c": _open(
                stack, out / "reference/srtm_c.tif", grid, "float32", np.nan, spec.tile_px
            ),
            "srtm_x": _open(
                stack, out / "reference/srtm_x.tif", grid, "float32", np.nan, spec.tile_px
            ),
            "ndsi": _open(stack, out / "ndsi.tif", grid, "float32", np.nan, spec.tile_px),
            "rate": _open(stack, out / "truth/dhdt_m_yr.tif", grid, "float32", None, spec.tile_px),
            "pen": _open(
                stack, out / "truth/penetration_m.tif", grid, "float32", None, spec.tile_px
            ),
        }
        files: dict[tuple[str, str], DatasetWriter] = {}
        for scene in scenes:
            for field, rel in _scene_paths(scene).items():
                dtype, nodata = ("uint8", 255) if field == "mask" else ("float32", np.nan)
                files[(scene.scene_id, field)] = _open(
                    stack, out / rel, grid, dtype, nodata, spec.tile_px
                )
        for tile in grid.tiles():
            window = rasterio.windows.Window(
                tile.cols.start, tile.rows.start, tile.shape[1], tile.shape[0]
            )
            x, y = np.meshgrid(grid.x_coords()[tile.cols], grid.y_coords()[tile.rows])
            f = world.fields(x, y)
            srtm_c_filled = (
                f.surface_2000_m
                - f.penetration_c_m
                + reference_noise_m(x, y, spec.seed + 101, spec.reference_sigma_m)
            )
            srtm_x = (
                f.surface_2000_m
                - f.penetration_x_m
                + reference_noise_m(x, y, spec.seed + 102, 0.5 * spec.reference_sigma_m)
            )
            f32["srtm_c"].write(
                np.where(f.void, np.nan, srtm_c_filled).astype(np.float32), 1, window=window
            )
            f32["srtm_x"].write(
                np.where(x <= x_cut, srtm_x, np.nan).astype(np.float32), 1, window=window
            )
            f32["ndsi"].write(f.ndsi, 1, window=window)
            f32["rate"].write(f.rate_m_yr.astype(np.float32), 1, window=window)
            f32["pen"].write(
                (f.penetration_c_m - f.penetration_x_m).astype(np.float32), 1, window=window
            )
            sums["count"] += np.bincount(f.glacier.ravel(), minlength=n)
            sums["rate"] += np.bincount(f.glacier.ravel(), weights=f.rate_m_yr.ravel(), minlength=n)
            dz_dx = world.slope_x(x, y) if scenes else np.zeros_like(x)
            iy, ix = np.meshgrid(
                np.arange(tile.rows.start, tile.rows.stop),
                np.arange(tile.cols.start, tile.cols.stop),
                indexing="ij",
            )
            for scene in scenes:
                layers = _scene_layers(
                    spec, world, scene, f, srtm_c_filled, dz_dx, x, y, ix, iy, centre, grid
                )
                for field, data in layers.items():
                    files[(scene.scene_id, field)].write(data, 1, window=window)
    return sums


def _scene_layers(
    spec: SynthSpec,
    world: World,
    scene: sc.SceneDef,
    f: Any,
    srtm_c_filled: np.ndarray,
    dz_dx: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    ix: np.ndarray,
    iy: np.ndarray,
    centre: tuple[float, float],
    grid: Grid,
) -> dict[str, np.ndarray]:
    """One scene's rasters at points x, y (grid CRS); ix, iy are the pixel indices of its own raster."""
    years = sc.years_between(REFERENCE_DATE, scene.date)
    inside = sc.in_footprint(scene, x, y, centre)
    dh = sc.measured_dh_m(scene, f, srtm_c_filled, years, x, y) + sc.orbit_error_m(
        scene, x, y, centre
    )
    if scene.kind == "dem":
        noise = scene.noise_m * (
            0.6 * world_noise(x, y, scene.seed) + 0.8 * normal(ix, iy, scene.seed + 41)
        )
        dem = srtm_c_filled + dh + noise
        return {"dem": np.where(inside, dem, np.nan).astype(np.float32)}
    mask = sc.radar_mask(scene, dz_dx)
    gamma = sc.coherence(scene, f, x, y, mask)
    h_amb = sc.h_amb_field(scene, x, centre, 0.5 * grid.nx * grid.res)
    phase = sc.wrapped_phase(scene, dh, gamma, h_amb, ix, iy)
    layers: dict[str, np.ndarray] = {
        "phase": np.where(inside, phase, np.nan).astype(np.float32),
        "coherence": np.where(inside, gamma, np.nan).astype(np.float32),
        "mask": np.where(inside, mask, 255).astype(np.uint8),
    }
    if scene.h_amb_varies:
        layers["h_amb"] = np.broadcast_to(np.asarray(h_amb, dtype=np.float32), x.shape).copy()
    return layers


def world_noise(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Correlated (~500 m) unit noise of a DEM scene."""
    return value_noise(x, y, 500.0, seed + 51)


def _write_scene_other_crs(
    out: Path,
    spec: SynthSpec,
    grid: Grid,
    world: World,
    scene: sc.SceneDef,
    centre: tuple[float, float],
) -> None:
    """A scene delivered on its own grid in another CRS (the world evaluated at its pixel centres)."""
    if scene.crs is None:
        raise ValueError(f"scene {scene.scene_id} has no CRS of its own")
    to_own = Transformer.from_crs(grid.crs, scene.crs, always_xy=True)
    to_grid = Transformer.from_crs(scene.crs, grid.crs, always_xy=True)
    left, bottom, right, top = to_own.transform_bounds(*grid.bounds)
    own = Grid.covering(scene.crs, (left, bottom, right, top), spec.res_m, spec.tile_px)
    with ExitStack() as stack:
        files = {}
        for field, rel in _scene_paths(scene).items():
            dtype, nodata = ("uint8", 255) if field == "mask" else ("float32", np.nan)
            files[field] = _open(stack, out / rel, own, dtype, nodata, spec.tile_px)
        for tile in own.tiles():
            window = rasterio.windows.Window(
                tile.cols.start, tile.rows.start, tile.shape[1], tile.shape[0]
            )
            xo, yo = np.meshgrid(own.x_coords()[tile.cols], own.y_coords()[tile.rows])
            x, y = to_grid.transform(xo, yo)
            f = world.fields(x, y)
            srtm_c_filled = (
                f.surface_2000_m
                - f.penetration_c_m
                + reference_noise_m(x, y, spec.seed + 101, spec.reference_sigma_m)
            )
            iy, ix = np.meshgrid(
                np.arange(tile.rows.start, tile.rows.stop),
                np.arange(tile.cols.start, tile.cols.stop),
                indexing="ij",
            )
            layers = _scene_layers(
                spec,
                world,
                scene,
                f,
                srtm_c_filled,
                world.slope_x(x, y),
                x,
                y,
                ix,
                iy,
                centre,
                grid,
            )
            for field, data in layers.items():
                files[field].write(data, 1, window=window)


def _region_polygons(grid: Grid) -> gpd.GeoDataFrame:
    """Three named sub-regions splitting the grid (west half; north-east; south-east)."""
    left, bottom, right, top = grid.bounds
    mx, my = (left + right) / 2, (bottom + top) / 2
    return gpd.GeoDataFrame(
        {"name": ["Western Pamir", "West Kunlun", "Eastern Pamir"]},
        geometry=[
            shapely.box(left, bottom, mx, top),
            shapely.box(mx, my, right, top),
            shapely.box(mx, bottom, right, my),
        ],
        crs=grid.crs,
    )


def _glacier_ids(world: World) -> list[str]:
    return [f"RGI60-99.{g.index:05d}" for g in world.glaciers]


def _write_vectors(out: Path, spec: SynthSpec, world: World, regions: gpd.GeoDataFrame) -> None:
    centroids_x = [p.centroid.x for p in world.outlines]
    mid = (spec.grid.bounds[0] + spec.grid.bounds[2]) / 2
    outlines = gpd.GeoDataFrame(
        {
            "RGIId": _glacier_ids(world),
            "surge": [int(g.surge) for g in world.glaciers],
            "basin": ["Upper Indus" if cx < mid else "Upper Tarim" for cx in centroids_x],
        },
        geometry=world.outlines,
        crs=spec.crs,
    )
    outlines.to_crs("EPSG:4326").to_file(out / "glaciers.gpkg", driver="GPKG")  # RGI style: lon/lat
    regions.to_file(out / "regions.gpkg", driver="GPKG")


def _write_tables(
    out: Path,
    spec: SynthSpec,
    grid: Grid,
    world: World,
    scene_defs: list[sc.SceneDef],
    sums: dict[str, np.ndarray],
    regions: gpd.GeoDataFrame,
) -> None:
    rows = []
    for scene in scene_defs:
        paths = _scene_paths(scene)
        h_amb = paths.pop("h_amb", None) or f"{scene.h_amb_m:.3f}"
        rows.append(
            {"scene_id": scene.scene_id, "date": scene.date.isoformat(), "kind": scene.kind}
            | ({"h_amb": h_amb, "nlooks": scene.nlooks} if scene.kind == "insar" else {})
            | paths
        )
    columns = ["scene_id", "date", "kind", "phase", "coherence", "h_amb", "mask", "dem", "nlooks"]
    pd.DataFrame(rows).reindex(columns=columns).to_csv(out / "scenes.csv", index=False)
    (out / "study.yaml").write_text(
        yaml.safe_dump(
            {"name": f"synthetic-{spec.seed}", "grid": {"tile_px": spec.tile_px}}, sort_keys=False
        )
    )

    count, rate_sum = sums["count"][1:], sums["rate"][1:]
    area_km2 = count * grid.pixel_area_m2 / 1e6
    centroids = shapely.centroid(np.asarray(world.outlines))
    region_of = np.full(len(world.glaciers), "", dtype=object)
    for name, poly in zip(regions["name"], regions.geometry, strict=True):
        region_of[shapely.contains(poly, centroids)] = name
    glaciers = pd.DataFrame(
        {
            "RGIId": _glacier_ids(world),
            "area_km2": area_km2,
            "n_px": count.astype(int),
            "dhdt_m_yr": np.where(count > 0, rate_sum / np.maximum(count, 1), np.nan),
            "surge": [int(g.surge) for g in world.glaciers],
            "region": region_of,
        }
    )
    glaciers["mb_mwe_yr"] = glaciers["dhdt_m_yr"] * DENSITY_KG_M3 / 1000.0
    glaciers.to_csv(out / "truth/glaciers.csv", index=False)
    _region_truth(glaciers).to_csv(out / "truth/regions.csv", index=False)
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
                "crs": s.crs or spec.crs,
            }
            for s in scene_defs
        ]
    )
    scene_truth.to_csv(out / "truth/scenes.csv", index=False)
    meta = {
        "spec": asdict(spec),
        "reference_date": REFERENCE_DATE.isoformat(),
        "density_kg_m3": DENSITY_KG_M3,
        "ramp_origin_m": [
            (grid.bounds[0] + grid.bounds[2]) / 2,
            (grid.bounds[1] + grid.bounds[3]) / 2,
        ],
        "notes": "ramp terms use x, y in km from ramp_origin_m; penetration_m.tif is C minus X penetration.",
    }
    (out / "truth/meta.json").write_text(json.dumps(meta, indent=2))


def _region_truth(glaciers: pd.DataFrame) -> pd.DataFrame:
    """Area-weighted true rates per region, with and without surge-type glaciers."""
    rows = []
    for name, group in glaciers[glaciers["area_km2"] > 0].groupby("region"):
        for label, part in (("all", group), ("no_surge", group[group["surge"] == 0])):
            weight = part["area_km2"]
            dhdt = (
                float((part["dhdt_m_yr"] * weight).sum() / weight.sum()) if weight.sum() else np.nan
            )
            rows.append(
                {
                    "name": name,
                    "glaciers": label,
                    "n_glaciers": len(part),
                    "area_km2": float(weight.sum()),
                    "dhdt_m_yr": dhdt,
                    "mb_mwe_yr": dhdt * DENSITY_KG_M3 / 1000.0,
                }
            )
    return pd.DataFrame(rows)
