"""Real region and basin polygons of High Mountain Asia in the regions contract (column `name`).

Sources (the `hma-regions` folder of the shared data, from Shean et al. 2020's repository):
- HiMAP mountain regions (Bolch et al. 2019), column `himap_region`, EPSG:4326;
- Kaab et al. 2015 / Brun et al. 2017 regions, column `kaab_region`, EPSG:4326 (some invalid rings);
- HiMAT major basins, column `basin_name`, EPSG:4326;
- Shean et al. 2020 55-km hexagon aggregates, whose CRS tag ("Undefined geographic SRS") is wrong:
  the coordinates are metres in the custom Albers `HMA_ALBERS` (see `read_hexagons`).

Geographic (EPSG:4326) polygons are reprojected to a metric CRS before any area is taken: by
default the equal-area `HMA_ALBERS`, so `area_km2` is the true (ellipsoidal) area to < 0.1 %.

The paper's sub-regions (Lin et al. 2017) are not published as polygons; `PAPER_SUBREGIONS` builds
them from the HiMAP and Kaab/Brun polygons (documented choices, including two meridian splits that
users with the paper's own polygons should replace: pass their file to the study instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import geopandas as gpd
import pandas as pd
import shapely
from pyproj import CRS

from mbcube.errors import StudyError

__all__ = [
    "BASIN_FILE",
    "HEX_FILE",
    "HIMAP_FILE",
    "HMA_ALBERS",
    "KAAB_FILE",
    "PAPER_BASINS",
    "PAPER_SUBREGIONS",
    "RegionDef",
    "assign_points",
    "paper_basins",
    "paper_subregions",
    "read_hexagons",
    "read_polygons",
    "tag_basins",
    "to_metric",
    "write_regions",
]

#: Equal-area Albers of High Mountain Asia (Shean et al. 2020, data/mb/README.md), metres.
HMA_ALBERS = "+proj=aea +lat_1=25 +lat_2=47 +lat_0=36 +lon_0=85 +datum=WGS84 +units=m +no_defs"

HIMAP_FILE = Path("data/regions/boundary_mountain_regions_hma_v3_clean.gpkg")
KAAB_FILE = Path("data/regions/regions_from_kaab2015_merged_clean_20181111.gpkg")
BASIN_FILE = Path("data/basins/HiMAT_full_210_IDs_subset_merged_clip_names_update.gpkg")
HEX_FILE = Path("data/hex/hma_mb_20190215_0815_rmse_hex55agg.gpkg")

Source = Literal["himap", "kaab", "basin"]
_FILES: dict[Source, tuple[Path, str]] = {
    "himap": (HIMAP_FILE, "himap_region"),
    "kaab": (KAAB_FILE, "kaab_region"),
    "basin": (BASIN_FILE, "basin_name"),
}


@dataclass(frozen=True)
class RegionDef:
    """A named region made from one source polygon, optionally cut by meridians (degrees east).

    Regions of one set are made disjoint in order: each loses what earlier ones already cover."""

    name: str
    source: Source
    value: str
    lon_min_deg: float | None = None
    lon_max_deg: float | None = None
    note: str = ""


#: Meridian splitting the Karakoram into its western and eastern parts (deg E). Approximate.
KARAKORAM_SPLIT_DEG = 76.5
#: Meridian splitting HiMAP's Western Pamir into western and central parts (deg E). Approximate.
PAMIR_SPLIT_DEG = 72.0

#: Lin et al. (2017) sub-regions, in the order they are made disjoint.
PAPER_SUBREGIONS: tuple[RegionDef, ...] = (
    RegionDef("West Kunlun", "himap", "Western Kunlun Shan", note="HiMAP Western Kunlun Shan"),
    RegionDef("Eastern Pamir", "himap", "Eastern Pamir", note="HiMAP Eastern Pamir"),
    RegionDef(
        "Central Pamir",
        "himap",
        "Western Pamir",
        lon_min_deg=PAMIR_SPLIT_DEG,
        note=f"HiMAP Western Pamir east of {PAMIR_SPLIT_DEG} E (approximate split)",
    ),
    RegionDef(
        "Western Pamir",
        "himap",
        "Western Pamir",
        lon_max_deg=PAMIR_SPLIT_DEG,
        note=f"HiMAP Western Pamir west of {PAMIR_SPLIT_DEG} E (approximate split)",
    ),
    RegionDef(
        "Western Karakoram",
        "himap",
        "Karakoram",
        lon_max_deg=KARAKORAM_SPLIT_DEG,
        note=f"HiMAP Karakoram west of {KARAKORAM_SPLIT_DEG} E (approximate split)",
    ),
    RegionDef(
        "Eastern Karakoram",
        "himap",
        "Karakoram",
        lon_min_deg=KARAKORAM_SPLIT_DEG,
        note=f"HiMAP Karakoram east of {KARAKORAM_SPLIT_DEG} E (approximate split)",
    ),
    RegionDef("Hindu Kush", "kaab", "Hindu Kush", note="Kaab/Brun Hindu Kush"),
    RegionDef(
        "Extended West Kunlun",
        "kaab",
        "Kunlun",
        note="Kaab/Brun Kunlun outside all regions above (the zones around West Kunlun)",
    ),
)

#: The paper's basins (the glaciers of each basin are upstream, so the whole basin is used).
PAPER_BASINS: tuple[RegionDef, ...] = (
    RegionDef("Upper Tarim", "basin", "Tarim", note="HiMAT Tarim basin (endorheic)"),
    RegionDef("Upper Indus", "basin", "Indus", note="HiMAT Indus basin"),
)


def to_metric(frame: gpd.GeoDataFrame, crs: str | None = None) -> gpd.GeoDataFrame:
    """`frame` in a metric CRS with valid geometries and an `area_km2` column.

    crs: the target (must be projected, in metres); default: the frame's own CRS if it is
    projected, else the equal-area `HMA_ALBERS`."""
    if frame.crs is None:
        raise StudyError("polygons without a CRS: set one (geopandas .set_crs) before use.")
    if crs is None:
        crs = HMA_ALBERS if frame.crs.is_geographic else frame.crs.to_string()
    target = CRS.from_user_input(crs)
    if not target.is_projected or target.axis_info[0].unit_name not in ("metre", "meter"):
        raise StudyError(f"CRS {crs!r} is not a metric projected CRS; areas need one.")
    out = frame.copy()
    out["geometry"] = shapely.make_valid(out.geometry.to_numpy())
    out = out.to_crs(target)
    out["geometry"] = shapely.make_valid(out.geometry.to_numpy())
    out["area_km2"] = out.geometry.area / 1e6
    return out


def read_polygons(folder: Path | str, source: Source) -> gpd.GeoDataFrame:
    """One source's polygons (EPSG:4326, valid geometries), with its name column as `name`."""
    path, column = _FILES[source]
    full = Path(folder) / path
    if not full.exists():
        raise StudyError(f"{full}: not found. Pass the hma-regions folder (../shared/data/...).")
    frame = gpd.read_file(full)
    if frame.crs is None or not frame.crs.is_geographic:
        raise StudyError(f"{full}: expected lon/lat polygons (EPSG:4326), got CRS {frame.crs}.")
    frame = frame.rename(columns={column: "name"})
    frame["geometry"] = shapely.make_valid(frame.geometry.to_numpy())
    return frame[["name", "geometry"]]


def _build(
    folder: Path | str, defs: Sequence[RegionDef], crs: str | None, disjoint: bool
) -> gpd.GeoDataFrame:
    sources = {src: read_polygons(folder, src) for src in {d.source for d in defs}}
    shapes = []
    for d in defs:
        frame = sources[d.source]
        match = frame[frame["name"] == d.value]
        if match.empty:
            raise StudyError(
                f"region {d.name!r}: no polygon named {d.value!r} in the {d.source} file "
                f"(names: {', '.join(sorted(frame['name'].astype(str)))})."
            )
        shape = shapely.union_all(match.geometry.to_numpy())
        if d.lon_min_deg is not None or d.lon_max_deg is not None:
            west = -180.0 if d.lon_min_deg is None else d.lon_min_deg
            east = 180.0 if d.lon_max_deg is None else d.lon_max_deg
            shape = shapely.intersection(shape, shapely.box(west, -90.0, east, 90.0))
        shapes.append(shape)
    out = gpd.GeoDataFrame(
        {"name": [d.name for d in defs], "note": [d.note for d in defs]},
        geometry=shapes,
        crs="EPSG:4326",
    )
    out = to_metric(out, crs)
    if disjoint:
        taken = None
        geoms = []
        for geom in out.geometry:
            own = geom if taken is None else shapely.difference(geom, taken)
            geoms.append(shapely.make_valid(own))
            taken = geom if taken is None else shapely.union(taken, geom)
        out["geometry"] = geoms
        out["area_km2"] = out.geometry.area / 1e6
    empty = out.loc[out.geometry.is_empty | (out["area_km2"] <= 0), "name"].tolist()
    if empty:
        raise StudyError(f"regions {empty} are empty after cutting and overlap removal.")
    return out.reset_index(drop=True)


def paper_subregions(
    folder: Path | str, crs: str | None = None, defs: Sequence[RegionDef] = PAPER_SUBREGIONS
) -> gpd.GeoDataFrame:
    """The paper's sub-regions (columns name, note, area_km2, geometry), disjoint, in a metric CRS
    (default `HMA_ALBERS`). folder: the hma-regions data folder."""
    return _build(folder, defs, crs, disjoint=True)


def paper_basins(
    folder: Path | str, crs: str | None = None, defs: Sequence[RegionDef] = PAPER_BASINS
) -> gpd.GeoDataFrame:
    """The paper's basins (Upper Tarim, Upper Indus) in a metric CRS (default `HMA_ALBERS`)."""
    return _build(folder, defs, crs, disjoint=True)


def read_hexagons(folder: Path | str) -> gpd.GeoDataFrame:
    """Shean et al. 2020 hexagon aggregates with the CRS tag fixed.

    The file says "Undefined geographic SRS" but its coordinates are metres in `HMA_ALBERS`
    (they reach +-1.6e6, impossible for degrees). A file whose coordinates fit degrees is refused
    rather than silently re-tagged."""
    full = Path(folder) / HEX_FILE
    if not full.exists():
        raise StudyError(f"{full}: not found. Pass the hma-regions folder (../shared/data/...).")
    frame = gpd.read_file(full)
    left, bottom, right, top = frame.total_bounds
    in_degrees = left >= -180 and right <= 180 and bottom >= -90 and top <= 90
    if frame.crs is not None and frame.crs.is_projected:
        return frame
    if in_degrees:
        raise StudyError(
            f"{full}: coordinates fit degrees ({frame.total_bounds}); the known wrong CRS tag "
            "(metres in the HMA Albers) does not apply. Check the file."
        )
    return frame.set_crs(HMA_ALBERS, allow_override=True)


def write_regions(frame: gpd.GeoDataFrame, path: Path | str) -> Path:
    """Write regions for a study (GeoPackage; the `name` column is the contract's)."""
    if "name" not in frame.columns:
        raise StudyError("regions need a `name` column.")
    if frame["name"].duplicated().any():
        dupes = frame.loc[frame["name"].duplicated(), "name"].tolist()
        raise StudyError(f"region names must be unique; repeated: {dupes}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_file(path, driver="GPKG")
    return path


def assign_points(points: gpd.GeoDataFrame, regions: gpd.GeoDataFrame) -> pd.Series:
    """The region `name` holding each point (NaN outside every region); CRSs are matched."""
    joined = gpd.sjoin(
        points[["geometry"]], regions[["name", "geometry"]].to_crs(points.crs), predicate="within"
    )
    joined = joined[~joined.index.duplicated(keep="first")]
    return joined["name"].reindex(points.index)


def tag_basins(
    outlines: gpd.GeoDataFrame, basins: gpd.GeoDataFrame, column: str = "basin"
) -> gpd.GeoDataFrame:
    """`outlines` (any CRS, kept) with a `column` naming the basin that holds each outline's
    centroid ('' outside every basin). Centroids are taken in the basins' metric CRS.

    mbcube aggregates glaciers by a `basin` outline attribute as a region set of its own, beside
    the study's region polygons (see `mbcube.aggregate.ATTRIBUTE_REGION_SETS`)."""
    if outlines.crs is None or basins.crs is None:
        raise StudyError("outlines and basins need a CRS to be matched.")
    metric = basins if basins.crs.is_projected else to_metric(basins)
    centroids = gpd.GeoDataFrame(
        geometry=outlines.to_crs(metric.crs).geometry.centroid, index=outlines.index
    )
    names = assign_points(centroids, metric)
    out = outlines.copy()
    out[column] = names.fillna("").astype(str).to_numpy()
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mbcube.regions_io HMA_REGIONS_DIR OUT_DIR [--crs CRS] [--glaciers RGI]`: write
    the paper's sub-regions and basins as OUT_DIR/subregions.gpkg and OUT_DIR/basins.gpkg, and
    the outlines RGI with a `basin` column as OUT_DIR/<RGI name>_basin.gpkg."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mbcube.regions_io", description=main.__doc__)
    parser.add_argument("folder", type=Path, help="the hma-regions folder (../shared/data/...)")
    parser.add_argument("out", type=Path, help="where to write subregions.gpkg and basins.gpkg")
    parser.add_argument("--crs", default=None, help=f"metric CRS (default: {HMA_ALBERS})")
    parser.add_argument(
        "--glaciers",
        type=Path,
        default=None,
        help="outlines to tag with a `basin` column, written as OUT/<name>_basin.gpkg",
    )
    args = parser.parse_args(argv)
    basins = paper_basins(args.folder, args.crs)
    for name, frame in (
        ("subregions.gpkg", paper_subregions(args.folder, args.crs)),
        ("basins.gpkg", basins),
    ):
        path = write_regions(frame, args.out / name)
        areas = ", ".join(
            f"{n} {a:,.0f} km2" for n, a in zip(frame["name"], frame["area_km2"], strict=True)
        )
        print(f"{path}: {areas}")
    if args.glaciers is not None:
        tagged = tag_basins(gpd.read_file(args.glaciers), basins)
        path = args.out / f"{args.glaciers.stem}_basin.gpkg"
        tagged.to_file(path, driver="GPKG")
        counts = tagged["basin"].replace("", "(none)").value_counts().to_dict()
        print(f"{path}: glaciers per basin {counts}")


if __name__ == "__main__":
    main()
