"""Glacier outlines and region polygons, read once and validated before any pixel work.

`read_outlines` (glaciers) and `read_regions` (region polygons) read a vector file (GeoPackage,
Shapefile, GeoJSON: whatever OGR reads; its first layer) and return it as a GeoDataFrame in the
grid CRS, every geometry a valid (Multi)Polygon:

- a file that cannot be read, has no CRS, lacks the id / name column, repeats an id or leaves it
  empty or null (named by feature position) is a problem; so are values of the surge column
  (study.yaml surge_column, glaciers only) other than 0, 1 or empty (empty: unknown);
- null or empty geometries, and geometries with no polygonal part (points, lines, zero-area rings),
  are dropped with one `MbcubeWarning` naming them;
- invalid geometries (self-intersecting rings, ...) are repaired with `shapely.make_valid` in the
  grid CRS, keeping only the polygonal part, with one `MbcubeWarning` naming each repaired feature
  on the grid and its area before -> after (km2, in the grid CRS: the area GEOS gives the invalid
  ring, e.g. |lobe A - lobe B| for a bow-tie, and that of the repaired shape), largest change
  first. Repairs that leave the area unchanged (to REPAIR_AREA_RTOL), such as the self-touching
  rings common in RGI files, are silent; repairs of outlines off the grid are only counted;
- outlines that miss the grid entirely are named in a warning (first 10 and the count); when ALL of
  them miss (or all regions do) it is a problem: their CRS tag is most likely wrong;
- glacier outlines on the grid that overlap are named in a warning, pair by pair with the overlap
  area, when the overlap is more than OVERLAP_MIN_SHARE (1 %) of the smaller outline AND more than
  one grid pixel's area (res_m^2): ingest burns the outlines in file order, the later one taking
  the overlap, so the earlier glacier loses those pixels (all of them when it lies inside the
  later one: area 0 and a NaN mass balance). Smaller overlaps, such as the slivers between
  neighbours digitised separately, move at most about a pixel and are silent. Pairs are found
  with a spatial index (STRtree), then tested (DE-9IM relate) before their overlap is computed:
  about 1.2 s for 10,000 outlines of ~140 vertices sharing borders;
- glacier outlines on the grid smaller than one pixel (area < res_m^2) that hold no pixel centre
  get no pixel when ingest burns them: named in a warning saying their mass balance will be NaN.
  (A small outline that does hold a centre gets one pixel and a result: silent.)

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

__all__ = ["overlapping_pairs", "polygonal_part", "read_outlines", "read_regions"]

#: Overlapping glacier outlines are named when the overlap is more than this share of the
#: smaller outline and more than one grid pixel's area.
OVERLAP_MIN_SHARE = 0.01
#: Pixel centres searched at most for an outline smaller than a pixel (a long thin sliver).
PIXEL_SEARCH_MAX = 1_000_000
#: How many ids a grouped warning names before "... (first k of n)".
SHOW_REPAIRED = 5
SHOW_IDS = 10
#: A repair that changes the area by no more than this (relative, + 1e-3 m2) is silent: the
#: self-touching rings common in RGI files are "invalid" for GEOS, and repairing them changes
#: nothing but the ring's encoding.
REPAIR_AREA_RTOL = 1e-9
_POLYGONAL = ("Polygon", "MultiPolygon")


def read_outlines(
    path: Path | str,
    grid: Grid,
    id_column: str,
    *,
    surge_column: str | None = None,
    problems: list[str] | None = None,
) -> gpd.GeoDataFrame | None:
    """Glacier outlines of `path` in the grid CRS, valid (Multi)Polygons, in file order.

    id_column: the unique glacier id (study.yaml glacier_id_column), used to name outlines in
    warnings and problems; empty, null or repeated ids are a problem. surge_column: the optional
    surge-type column (study.yaml surge_column), whose values must be 0, 1 or empty when the file
    has it. problems: a list to append problem lines to (then None is returned when the file
    cannot be used); None: raise them as one StudyError. Warnings (MbcubeWarning): dropped,
    repaired, outside-the-grid, overlapping and smaller-than-a-pixel outlines. All outlines
    outside the grid is a problem."""
    return _read_polygons(
        Path(path), grid, id_column, "glacier outline", "id column", True, problems, surge_column
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
    glaciers: bool,
    problems: list[str] | None,
    surge_column: str | None = None,
) -> gpd.GeoDataFrame | None:
    """glaciers: the checks of glacier outlines (outlines outside the grid, overlapping or
    smaller than a pixel named; a surge column checked), else of region polygons."""
    found: list[str] = []
    frame = _read_checked(path, column, column_role, noun, surge_column, found)
    if frame is not None:
        frame = _validated(frame, path, grid, column, noun, glaciers, found)
    if problems is None:
        if found:
            raise StudyError("\n  - ".join([f"{path}: {len(found)} problem(s):", *found]))
        if frame is None:  # unreachable: a frame is None only with a problem listed
            raise StudyError(f"{path}: unreadable.")
        return frame
    problems.extend(found)
    return None if found else frame


def _read_checked(
    path: Path,
    column: str,
    column_role: str,
    noun: str,
    surge_column: str | None,
    problems: list[str],
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
        blank = _text(values) == ""
        if blank.any():
            positions = [str(i + 1) for i in np.flatnonzero(blank)]
            problems.append(
                f"{path}: {_count(int(blank.sum()), noun)} with an empty or null {column_role} "
                f"'{column}', at feature(s) {_first(positions)} (1-based, in file order). Give "
                f"every {noun} its {column_role.removesuffix(' column')}."
            )
        named = values[~blank]
        dupes = named[named.duplicated()].astype(str).unique()[:5]
        if len(dupes):
            problems.append(
                f"{path}: column '{column}' has duplicate values {list(dupes)}; ids must be unique."
            )
    if surge_column and surge_column in frame.columns:
        problem = _surge_problem(frame, path, surge_column, column, noun)
        if problem:
            problems.append(problem)
    frame.index = frame.index.rename("feature")
    return frame if usable else None


def _text(values: pd.Series) -> pd.Series:
    """`values` as stripped text, "" for null."""
    return values.astype(object).where(values.notna(), "").astype(str).str.strip()


def _surge_problem(
    frame: gpd.GeoDataFrame, path: Path, surge_column: str, id_column: str, noun: str
) -> str | None:
    """A problem line when the surge column holds values other than 0, 1 or empty (unknown)."""
    values = frame[surge_column]
    if pd.api.types.is_bool_dtype(values):
        return None
    text = _text(values)
    number = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad = ((text != "") & ~number.isin([0, 1])).to_numpy()
    if not bad.any():
        return None
    ids = (
        _text(frame[id_column])
        if id_column in frame.columns
        else pd.Series([""] * len(frame), index=frame.index)
    )
    named = [
        f"{i or f'feature {k + 1}'} ({v})"
        for k, i, v in zip(np.flatnonzero(bad), ids[bad], text[bad], strict=True)
    ]
    return (
        f"{path}: column '{surge_column}' (study.yaml surge_column) must hold 0, 1 or nothing "
        f"(unknown); {_count(int(bad.sum()), noun)} hold other values: {_first(named)}. Correct "
        "them, or set surge_column in study.yaml (null: no surge column)."
    )


def _validated(
    frame: gpd.GeoDataFrame,
    path: Path,
    grid: Grid,
    column: str,
    noun: str,
    glaciers: bool,
    problems: list[str],
) -> gpd.GeoDataFrame:
    """`frame` in the grid CRS with null/empty/non-polygonal features dropped and invalid ones
    repaired (warnings); glacier outlines outside the grid, overlapping or smaller than a pixel
    named."""
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
    elif glaciers and not inside.all():
        _warn(
            f"{path}: {_count((~inside).sum(), noun)} outside {where}, not measured: "
            f"{_first(labels[~inside])}."
        )
    if glaciers:
        _warn_overlaps(path, fixed[inside], labels[inside].tolist(), grid)
        _warn_pixelless(path, fixed[inside], labels[inside].tolist(), grid)
    return frame


def overlapping_pairs(
    geoms: np.ndarray, min_area_m2: float, min_share: float = OVERLAP_MIN_SHARE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs (i < j) of `geoms` whose overlap area is more than `min_area_m2` and more than
    `min_share` of the smaller of the two: (i, j, overlap area), in CRS units squared (m2).

    Candidates come from a spatial index (STRtree, bounding boxes); their interiors are tested
    (DE-9IM) before any intersection is computed, so neighbours that only share a border cost
    one relate each."""
    none = np.zeros(0, dtype=np.intp)
    if len(geoms) < 2:
        return none, none, np.zeros(0)
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    keep = i < j
    i, j = i[keep], j[keep]
    inner = shapely.relate_pattern(geoms[i], geoms[j], "T********")  # interiors meet
    i, j = i[inner], j[inner]
    overlap_m2 = shapely.area(shapely.intersection(geoms[i], geoms[j]))
    smaller_m2 = np.minimum(shapely.area(geoms[i]), shapely.area(geoms[j]))
    big = (overlap_m2 > min_area_m2) & (overlap_m2 > min_share * smaller_m2)
    return i[big], j[big], overlap_m2[big]


def _warn_overlaps(path: Path, geoms: np.ndarray, labels: list[str], grid: Grid) -> None:
    """One warning naming the overlapping pairs (largest overlap first), and who takes each."""
    i, j, overlap_m2 = overlapping_pairs(geoms, grid.res**2)
    if len(i) == 0:
        return
    area_m2 = shapely.area(geoms[i])
    pairs = []
    for k in np.argsort(-overlap_m2, kind="stable"):
        first, later = labels[i[k]], labels[j[k]]
        whole = f", all of {first}: it gets no pixel" if overlap_m2[k] >= 0.999 * area_m2[k] else ""
        pairs.append(f"{first} / {later} {overlap_m2[k] / 1e6:.3f} km2 (to {later}{whole})")
    _warn(
        f"{path}: {_count(len(pairs), 'pair')} of glacier outlines overlap by more than "
        f"{OVERLAP_MIN_SHARE:.0%} of the smaller and one pixel ({grid.res**2:g} m2); the later "
        "outline in the file takes the overlap and the earlier glacier loses those pixels; "
        f"largest first: {_first(pairs, SHOW_REPAIRED)}. Fix the outlines."
    )


def _warn_pixelless(path: Path, geoms: np.ndarray, labels: list[str], grid: Grid) -> None:
    """One warning naming the outlines smaller than a pixel that hold no pixel centre."""
    small = np.flatnonzero(shapely.area(geoms) < grid.res**2)
    empty = [labels[k] for k in small if not _holds_pixel(geoms[k], grid)]
    if empty:
        _warn(
            f"{path}: {_count(len(empty), 'glacier outline')} smaller than one grid pixel "
            f"({grid.res:g} m x {grid.res:g} m) hold no pixel centre, so get no pixel: their "
            f"mass balance will be NaN: {_first(empty)}. Use a finer grid (study.yaml "
            "grid.res_m) or leave them out."
        )


def _holds_pixel(geom: shapely.Geometry, grid: Grid) -> bool:
    """Whether `geom` holds the centre of a grid pixel (ingest burns a pixel whose centre lies
    inside an outline). A centre on the boundary counts, so that no outline is named wrongly;
    an outline spanning more than PIXEL_SEARCH_MAX pixel centres is taken to hold one."""
    left, bottom, right, top = shapely.bounds(geom)
    col0 = max(0, int(np.floor((left - grid.x0) / grid.res - 0.5)))
    col1 = min(grid.nx, int(np.ceil((right - grid.x0) / grid.res + 0.5)))
    row0 = max(0, int(np.floor((grid.y0 - top) / grid.res - 0.5)))
    row1 = min(grid.ny, int(np.ceil((grid.y0 - bottom) / grid.res + 0.5)))
    if col1 <= col0 or row1 <= row0:
        return False
    if (col1 - col0) * (row1 - row0) > PIXEL_SEARCH_MAX:
        return True
    x_m = grid.x0 + (np.arange(col0, col1) + 0.5) * grid.res
    y_m = grid.y0 - (np.arange(row0, row1) + 0.5) * grid.res
    xx, yy = np.meshgrid(x_m, y_m)
    return bool(shapely.intersects_xy(geom, xx.ravel(), yy.ravel()).any())


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
