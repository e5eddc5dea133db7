"""Glacier outlines and region polygons, read once and validated before any pixel work.

`read_outlines` (glaciers) and `read_regions` (region polygons) read a vector file (GeoPackage,
Shapefile, GeoJSON: whatever OGR reads; its first layer) and return it as a GeoDataFrame in the
grid CRS, every geometry a valid (Multi)Polygon:

- a file that cannot be read, has no CRS, lacks the id / name column or repeats an id is a problem;
- null or empty geometries, and geometries with no polygonal part (points, lines, zero-area rings),
  are dropped with one `MbcubeWarning` naming them;
- invalid geometries (self-intersecting rings, ...) are repaired with `shapely.make_valid` in the
  grid CRS, keeping only the polygonal part, with one `MbcubeWarning` naming each repaired feature
  on the grid and its area before -> after (km2, in the grid CRS: the area GEOS gives the invalid
  ring, e.g. |lobe A - lobe B| for a bow-tie, and that of the repaired shape), largest change
  first. Repairs that leave the area unchanged (to REPAIR_AREA_RTOL), such as the self-touching
  rings common in RGI files, are silent; repairs of outlines off the grid are only counted;
- outlines that miss the grid entirely are named in a warning (first 10 and the count); when ALL of
  them miss (or all regions do) it is a problem: their CRS tag is most likely wrong.

Warnings are grouped by kind: 5,000 repaired outlines give one warning with the count and the first
few ids, not 5,000 warnings.

Problems (errors) are appended to `problems` when a list is given, so that `mbcube.study.load_study`
can list them with every other problem of the study in one StudyError; without a list they are
raised here as one StudyError.

Row order: the returned frame holds the file's features in file order, less the dropped ones; its
index is the feature's 0-based position in the file (index name "feature"). Glacier ids 1..N burnt
in the returned order are therefore in file order.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from pyproj import CRS

from mbcube.errors import MbcubeWarning, StudyError
from mbcube.grid import Grid

__all__ = ["polygonal_part", "read_outlines", "read_regions"]

#: How many ids a grouped warning names before "... (first k of n)".
SHOW_REPAIRED = 5
SHOW_IDS = 10
#: A repair that changes the area by no more than this (relative, + 1e-3 m2) is silent: the
#: self-touching rings common in RGI files are "invalid" for GEOS, and repairing them changes
#: nothing but the ring's encoding.
REPAIR_AREA_RTOL = 1e-9
_POLYGONAL = ("Polygon", "MultiPolygon")


def read_outlines(
    path: Path | str, grid: Grid, id_column: str, *, problems: list[str] | None = None
) -> gpd.GeoDataFrame | None:
    """Glacier outlines of `path` in the grid CRS, valid (Multi)Polygons, in file order.

    id_column: the unique glacier id (study.yaml glacier_id_column), used to name outlines in
    warnings and problems. problems: a list to append problem lines to (then None is returned
    when the file cannot be used); None: raise them as one StudyError. Warnings (MbcubeWarning):
    dropped, repaired, and outside-the-grid outlines. All outlines outside the grid is a problem."""
    return _read_polygons(
        Path(path), grid, id_column, "glacier outline", "id column", True, problems
    )


def read_regions(
    path: Path | str, grid: Grid, name_column: str, *, problems: list[str] | None = None
) -> gpd.GeoDataFrame | None:
    """Region polygons of `path` in the grid CRS, valid (Multi)Polygons, in file order.

    As `read_outlines`, named by `name_column` (study.yaml region_name_column), except that
    regions missing the grid are expected (a region set is often wider than a study) and only
    named as a problem when none overlaps it."""
    return _read_polygons(
        Path(path), grid, name_column, "region polygon", "region name column", False, problems
    )


def polygonal_part(geometry: shapely.Geometry) -> shapely.Geometry:
    """The polygonal part of `geometry` (points and lines of a collection dropped): a Polygon or
    MultiPolygon, or an empty Polygon when there is none."""
    if geometry.geom_type in _POLYGONAL:
        return geometry
    parts = np.array([geometry])
    while True:
        multi = np.isin(shapely.get_type_id(parts), (4, 5, 6, 7))  # Multi*, GeometryCollection
        if not multi.any():
            break
        parts = np.concatenate([parts[~multi], shapely.get_parts(parts[multi])])
    polygons = parts[shapely.get_type_id(parts) == 3]
    polygons = polygons[~shapely.is_empty(polygons)]
    if len(polygons) == 0:
        return shapely.Polygon()
    if len(polygons) == 1:
        return polygons[0]
    return shapely.union_all(polygons)


def _read_polygons(
    path: Path,
    grid: Grid,
    column: str,
    noun: str,
    column_role: str,
    warn_outside: bool,
    problems: list[str] | None,
) -> gpd.GeoDataFrame | None:
    found: list[str] = []
    frame = _read_checked(path, column, column_role, found)
    if frame is not None:
        frame = _validated(frame, path, grid, column, noun, warn_outside, found)
    if problems is None:
        if found:
            raise StudyError("\n  - ".join([f"{path}: {len(found)} problem(s):", *found]))
        if frame is None:  # unreachable: a frame is None only with a problem listed
            raise StudyError(f"{path}: unreadable.")
        return frame
    problems.extend(found)
    return None if found else frame


def _read_checked(
    path: Path, column: str, column_role: str, problems: list[str]
) -> gpd.GeoDataFrame | None:
    """The file as read (file order), or None when it cannot be used (problems listed)."""
    import pyogrio  # geospatial vector I/O (geopandas' own engine)

    try:
        frame = pyogrio.read_dataframe(path, use_arrow=True)
    except Exception as err:  # pyogrio raises several error types for unreadable files
        problems.append(f"{path}: not a vector file OGR can read ({err}).")
        return None
    usable = True
    if frame.crs is None:
        problems.append(f"{path}: no CRS. Save the file with its CRS (e.g. ogr2ogr -a_srs).")
        usable = False
    if column not in frame.columns:
        fields = [str(c) for c in frame.columns if c != frame.geometry.name]
        problems.append(
            f"{path}: {column_role} '{column}' not found (columns: {', '.join(fields)}). "
            "Set it in study.yaml (glacier_id_column / region_name_column)."
        )
    else:
        values = frame[column]
        dupes = values[values.duplicated()].astype(str).unique()[:5]
        if len(dupes):
            problems.append(
                f"{path}: column '{column}' has duplicate values {list(dupes)}; ids must be unique."
            )
    frame.index = frame.index.rename("feature")
    return frame if usable else None


def _validated(
    frame: gpd.GeoDataFrame,
    path: Path,
    grid: Grid,
    column: str,
    noun: str,
    warn_outside: bool,
    problems: list[str],
) -> gpd.GeoDataFrame:
    """`frame` in the grid CRS with null/empty/non-polygonal features dropped and invalid ones
    repaired (warnings), outlines outside the grid named."""
    labels = (
        frame[column].astype(str)
        if column in frame.columns
        else pd.Series([f"feature {i + 1}" for i in range(len(frame))], index=frame.index)
    )
    geoms = frame.geometry.to_numpy()
    missing = shapely.is_missing(geoms) | shapely.is_empty(geoms)
    if missing.any():
        _warn(
            f"{path}: {_count(missing.sum(), noun)} without geometry (null or empty) dropped: "
            f"{_first(labels[missing])}. Remove them or give them their outline."
        )
        frame, labels = frame[~missing], labels[~missing]
    target = CRS.from_user_input(grid.crs)
    source = CRS.from_user_input(frame.crs)
    if not source.equals(target):
        frame = frame.to_crs(target)
    geoms = frame.geometry.to_numpy()
    finite = np.isfinite(shapely.bounds(geoms)).all(axis=1)  # inf: CRS tag unfit for the numbers
    invalid = finite & ~shapely.is_valid(geoms)
    fixed = geoms.copy()
    if invalid.any():
        fixed[invalid] = shapely.make_valid(geoms[invalid])
    redo = finite & ~np.isin(shapely.get_type_id(fixed), (3, 6))  # not (Multi)Polygon
    fixed[redo] = [polygonal_part(g) for g in fixed[redo]]
    lost = finite & shapely.is_empty(fixed)
    if lost.any():
        _warn(
            f"{path}: {_count(lost.sum(), noun)} with no polygonal area (points, lines or "
            f"zero-area rings) dropped: {_first(labels[lost])}. Give them a polygon outline."
        )
    keep = ~lost
    frame = frame[keep].set_geometry(
        gpd.GeoSeries(fixed[keep], index=frame.index[keep], crs=target)
    )
    geoms, fixed, labels = geoms[keep], fixed[keep], labels[keep]
    invalid, finite = invalid[keep], finite[keep]
    if len(frame) == 0:
        problems.append(f"{path}: no {noun} with a polygon geometry. Check the file.")
        return frame
    inside = _overlaps(fixed, finite, grid)
    area_m2 = np.zeros((2, len(geoms)))
    area_m2[:, invalid] = shapely.area(geoms[invalid]), shapely.area(fixed[invalid])
    moved = np.abs(area_m2[1] - area_m2[0]) > REPAIR_AREA_RTOL * area_m2.max(axis=0) + 1e-3
    repaired = invalid & inside & moved
    if repaired.any():
        before, after = area_m2[:, repaired] / 1e6
        order = np.argsort(-np.abs(after - before), kind="stable")
        changes = [
            f"{labels[repaired].iloc[i]} {before[i]:.3f} -> {after[i]:.3f} km2" for i in order
        ]
        n_out = int((invalid & moved & ~inside).sum())
        also = f" ({n_out} more outside the grid)" if n_out else ""
        _warn(
            f"{path}: {_count(repaired.sum(), 'invalid ' + noun)} on the grid (e.g. "
            f"self-intersecting) repaired by make_valid, the polygonal part kept{also}; area in "
            f"{grid.crs}, largest change first: {_first(changes, SHOW_REPAIRED)}. "
            "Fix them in the file."
        )
    where = f"the grid {tuple(round(b, 1) for b in grid.bounds)} in {grid.crs}"
    if not inside.any():
        problems.append(
            f"{path}: none of the {_count(len(frame), noun)} overlaps {where} (file CRS "
            f"{_crs_label(source)}): check the CRS tag of the file and the grid "
            "(study.yaml grid)."
        )
    elif warn_outside and not inside.all():
        _warn(
            f"{path}: {_count((~inside).sum(), noun)} outside {where}, not measured: "
            f"{_first(labels[~inside])}."
        )
    return frame


def _overlaps(geoms: np.ndarray, finite: np.ndarray, grid: Grid) -> np.ndarray:
    """Which geometries share area with the grid (touching its edge only does not count)."""
    left, bottom, right, top = grid.bounds
    bounds = shapely.bounds(geoms)
    near = (
        finite
        & (bounds[:, 0] < right)
        & (bounds[:, 2] > left)
        & (bounds[:, 1] < top)
        & (bounds[:, 3] > bottom)
    )
    box = shapely.box(left, bottom, right, top)
    shapely.prepare(box)
    inside = np.zeros(len(geoms), dtype=bool)
    inside[near] = shapely.intersects(box, geoms[near]) & ~shapely.touches(box, geoms[near])
    return inside


def _crs_label(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.name


def _count(n: int | np.integer, noun: str) -> str:
    return f"{int(n)} {noun}{'' if n == 1 else 's'}"


def _first(items: Sequence[str] | pd.Series, k: int = SHOW_IDS) -> str:
    items = list(items)
    shown = ", ".join(items[:k])
    return shown if len(items) <= k else f"{shown}, ... (first {k} of {len(items)})"


def _warn(message: str) -> None:
    warnings.warn(message, MbcubeWarning, stacklevel=2)
