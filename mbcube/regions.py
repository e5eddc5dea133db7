"""Regions of glaciers: sub-regions and basins from polygons, from an attribute, or from id lists.

A region set is a membership matrix (region x glacier); region statistics are the members'
statistics summed (`mbcube.massbalance.sum_units`), so a new region set costs a matrix product.

Assignment of a glacier to polygons (`region_assignment`):

- ``centroid``: the polygon holding the glacier's centroid (the paper's choice; cheap, needs only
  the centroids; a glacier whose centroid falls outside every polygon belongs to none).
- ``area_share``: the polygon holding the largest part of the glacier's outline (needs the
  outlines; robust for large glaciers straddling a boundary, whose centroid may lie off the ice).

Each glacier goes to at most one polygon of a set (the first, in file order, when polygons overlap).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import geopandas as gpd
import numpy as np
import shapely

from mbcube.errors import StudyError

__all__ = [
    "RegionSet",
    "from_attribute",
    "from_ids",
    "from_polygons",
    "name_column_of",
    "read_polygon_arrays",
    "read_polygons",
    "surge_free",
]

Assignment = Literal["centroid", "area_share"]
#: An attribute's missing values as text (None, float NaN and empty cells read from files).
MISSING_TEXT = ("", "nan", "None")


@dataclass(frozen=True)
class RegionSet:
    """Named groups of glaciers: membership[r, g] is True when glacier g belongs to region r."""

    names: list[str]
    membership: np.ndarray  # (R, G) bool

    def __post_init__(self) -> None:
        if self.membership.ndim != 2 or self.membership.shape[0] != len(self.names):
            raise ValueError(
                f"membership must be (regions, glaciers) with {len(self.names)} rows, "
                f"got shape {self.membership.shape}"
            )

    def region_of(self) -> np.ndarray:
        """The name of each glacier's (first) region, '' for none: (G,) object array."""
        names = np.array([*self.names, ""], dtype=object)
        member = self.membership
        first = np.where(member.any(axis=0), member.argmax(axis=0), len(self.names))
        return names[first]

    def with_all(self, name: str = "all") -> RegionSet:
        """This set preceded by one region holding every glacier."""
        everyone = np.ones((1, self.membership.shape[1]), dtype=bool)
        return RegionSet([name, *self.names], np.vstack([everyone, self.membership]))

    def __add__(self, other: RegionSet) -> RegionSet:
        """Both sets' regions (names kept unique: a repeated name gets a ' (2)' suffix)."""
        names = _add_names(list(self.names), other.names)
        return RegionSet(names, np.vstack([self.membership, other.membership]))

    @staticmethod
    def join(sets: Sequence[RegionSet], n_glaciers: int) -> RegionSet:
        """The regions of all `sets` in order, named as an empty set + each set in turn would
        name them, their rows stacked once."""
        names: list[str] = []
        for found in sets:
            names = _add_names(names, found.names)
        rows = [s.membership for s in sets]
        membership = np.vstack(rows) if rows else np.zeros((0, n_glaciers), dtype=bool)
        return RegionSet(names, membership)


def _add_names(names: list[str], new_names: Sequence[str]) -> list[str]:
    """`names` followed by `new_names`, each made unique against those before it (' (2)')."""
    for n in new_names:
        new, k = n, 2
        while new in names:
            new, k = f"{n} ({k})", k + 1
        names.append(new)
    return names


def _one_hot(index: np.ndarray, n_regions: int) -> np.ndarray:
    """(R, G) from each glacier's region position (-1 = none)."""
    return (index[None, :] == np.arange(n_regions)[:, None]) & (index[None, :] >= 0)


def from_polygons(
    polygons: gpd.GeoDataFrame,
    name_column: str = "name",
    *,
    centroids_xy: np.ndarray | None = None,
    outlines: gpd.GeoSeries | None = None,
    how: Assignment = "centroid",
) -> RegionSet:
    """Assign glaciers to polygons (all in one CRS): by centroid (centroids_xy (G, 2), m) or by
    the largest area share of the outlines."""
    if name_column not in polygons.columns:
        raise StudyError(
            f"region polygons have no column '{name_column}' (columns: {list(polygons.columns)})"
        )
    names = [str(n) for n in polygons[name_column]]
    geoms = np.asarray(polygons.geometry.values)
    return assign(names, geoms, centroids_xy=centroids_xy, outlines=outlines, how=how)


def assign(
    names: list[str],
    geoms: np.ndarray,
    *,
    centroids_xy: np.ndarray | None = None,
    outlines: gpd.GeoSeries | None = None,
    how: Assignment = "centroid",
) -> RegionSet:
    """`from_polygons` on the polygons' names and shapely geometries (R,) (in the glaciers' CRS)."""
    if how == "centroid":
        if centroids_xy is None:
            raise ValueError("centroid assignment needs centroids_xy")
        x, y = np.asarray(centroids_xy, dtype=float).T
        index = np.full(len(x), -1)
        bounds = shapely.bounds(geoms)
        # centroids by x (NaN last): a polygon's x range is a slice, found by bisection
        order = np.argsort(x, kind="stable")
        x_sorted = x[order]
        for r in range(len(geoms) - 1, -1, -1):  # the first polygon wins where they overlap
            x0, y0, x1, y1 = bounds[r]
            lo = np.searchsorted(x_sorted, x0, side="left")
            hi = np.searchsorted(x_sorted, x1, side="right")
            near = order[lo:hi]
            near = near[(y[near] >= y0) & (y[near] <= y1)]
            shapely.prepare(geoms[r])
            index[near[shapely.intersects_xy(geoms[r], x[near], y[near])]] = r
        return RegionSet(names, _one_hot(index, len(names)))
    if how == "area_share":
        if outlines is None:
            raise ValueError("area_share assignment needs the glacier outlines")
        shapes = np.asarray(outlines.values)
        share = np.zeros((len(geoms), len(shapes)))
        tree = shapely.STRtree(shapes)
        for r, poly in enumerate(geoms):
            hits = tree.query(poly)
            if len(hits):
                share[r, hits] = shapely.area(shapely.intersection(shapes[hits], poly))
        index = np.where(share.max(axis=0) > 0, share.argmax(axis=0), -1)
        return RegionSet(names, _one_hot(index, len(names)))
    raise ValueError(f"region_assignment must be 'centroid' or 'area_share', got {how!r}")


def from_attribute(values: Sequence[object] | np.ndarray) -> RegionSet:
    """One region per distinct value of a glacier attribute (e.g. a basin column), sorted by name;
    empty / missing values (None, NaN, '', 'nan', 'None') belong to none."""
    import pandas as pd

    values = np.asarray(values, dtype=object).reshape(-1)
    if len(values) and pd.api.types.infer_dtype(values, skipna=False) == "string":
        # all text: the distinct values by hashing (equal as str iff equal), then sorted
        codes, distinct = pd.factorize(values)
        names, index = np.unique(
            np.array([str(v) for v in distinct], dtype=str), return_inverse=True
        )
        index = index[codes]
    else:
        names, index = np.unique(values.astype(str), return_inverse=True)  # sorted
    keep = ~np.isin(names, MISSING_TEXT)
    position = np.cumsum(keep) - 1  # each distinct value's row, missing ones excluded
    rows = np.where(keep[index], position[index], -1)
    return RegionSet([str(n) for n in names[keep]], _one_hot(rows, int(keep.sum())))


def from_ids(groups: Mapping[str, Sequence[str]], glacier_ids: Sequence[str]) -> RegionSet:
    """Regions given as lists of glacier ids; unknown ids are an error (StudyError naming them)."""
    ids = np.asarray([str(i) for i in glacier_ids], dtype=object)
    known = set(ids.tolist())
    rows = []
    for name, members in groups.items():
        unknown = sorted(set(map(str, members)) - known)
        if unknown:
            raise StudyError(f"region '{name}': unknown glacier ids {unknown[:5]}")
        rows.append(np.isin(ids, list(map(str, members))))
    return RegionSet(list(groups), np.array(rows, dtype=bool).reshape(len(rows), len(ids)))


def surge_free(surge: np.ndarray) -> np.ndarray:
    """Glaciers kept when excluding surge-type ones: surge flag != 1 (unknown -1 counts as not)."""
    return np.asarray(surge) != 1


def read_polygons(path: Path, crs: str, name_column: str | None = "name") -> gpd.GeoDataFrame:
    """Region polygons from a vector file, in `crs`, valid geometries (StudyError if unusable).

    name_column None: the file's `name` column, else its first attribute column (see
    `name_column_of`)."""
    if not Path(path).exists():
        raise StudyError(f"{path}: region file not found.")
    polygons = gpd.read_file(path)
    if polygons.crs is None:
        raise StudyError(f"{path}: no CRS.")
    name_column = name_column or name_column_of(polygons)
    if name_column not in polygons.columns:
        raise StudyError(
            f"{path}: no column '{name_column}' naming the regions "
            f"(columns: {[c for c in polygons.columns if c != 'geometry']})."
        )
    shapes = polygons.geometry.to_numpy()
    keep = ~shapely.is_missing(shapes) & ~shapely.is_empty(shapes)
    if not keep.all():
        polygons = polygons[keep].reset_index(drop=True)
    if not polygons.crs.equals(crs):
        polygons = polygons.to_crs(crs)
    if not polygons.geometry.is_valid.all():
        polygons["geometry"] = polygons.geometry.make_valid()
    return polygons


def read_polygon_arrays(
    path: Path, crs: str, name_column: str | None = "name"
) -> tuple[list[str], np.ndarray]:
    """(names as text, shapely geometries (R,)) of the region polygons in a vector file, as
    `read_polygons` then `from_polygons` take them (same rows, names and geometries).

    Read as plain arrays (pyogrio's raw reader and shapely: a third of the time of a
    GeoDataFrame) when the file's CRS is `crs`, its name column is text without a missing value
    (or whole numbers) and its geometries are valid; otherwise by `read_polygons` (missing
    names, reprojection, repair and its errors as there)."""
    import pyogrio.raw

    if Path(path).exists():
        try:
            meta, _, wkb, fields = pyogrio.raw.read(path)[:4]
        except Exception:  # unreadable here: read_polygons raises or reads it its own way
            meta = None
        if meta is not None:
            found = _plain_polygons(meta, wkb, fields, crs, name_column)
            if found is not None:
                return found
    polygons = read_polygons(path, crs, name_column)
    column = name_column or name_column_of(polygons)
    return [str(n) for n in polygons[column]], np.asarray(polygons.geometry.values)


def _plain_polygons(
    meta: dict[str, object],
    wkb: np.ndarray | None,
    fields: list[np.ndarray],
    crs: str,
    name_column: str | None,
) -> tuple[list[str], np.ndarray] | None:
    """`read_polygon_arrays` from pyogrio's raw arrays; None when `read_polygons` must read the
    file (another CRS, no CRS, missing or non-text names, invalid geometries, no name column)."""
    columns = [str(c) for c in np.asarray(meta.get("fields", []))]
    column = name_column or ("name" if "name" in columns or not columns else columns[0])
    if wkb is None or column not in columns or not meta.get("crs"):
        return None
    if str(meta["crs"]) != crs:
        from pyproj import CRS

        if not CRS.from_user_input(meta["crs"]).equals(crs):
            return None
    values = np.asarray(fields[columns.index(column)])
    if values.dtype.kind == "O":
        if not all(type(v) is str for v in values):
            return None
    elif values.dtype.kind not in "iu":
        return None
    shapes = shapely.from_wkb(wkb)
    keep = ~shapely.is_missing(shapes) & ~shapely.is_empty(shapes)
    if not keep.all():
        shapes, values = shapes[keep], values[keep]
    if not shapely.is_valid(shapes).all():
        return None
    return [str(v) for v in values], shapes


def name_column_of(polygons: gpd.GeoDataFrame) -> str:
    """The column naming the regions: `name`, else the first attribute column."""
    columns = [str(c) for c in polygons.columns if c != polygons.geometry.name]
    return "name" if "name" in columns or not columns else columns[0]
