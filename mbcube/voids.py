"""Elevations for the reference DEM's voids, so that glacier pixels there still get a bin.

The hypsometry bins a glacier pixel by the reference DEM (SRTM-C). Where that is void, by the
X-band reference (SRTM-X) where it has a value; else by an elevation interpolated linearly
(Delaunay triangles, `scipy.interpolate.griddata`) from the valid pixels bordering the void, for
void pixels within `fill_px` pixels of valid ground: the usual filling of SRTM voids by
interpolation, used here for the hypsometry only (no dh is measured there). Linear interpolation
is exact on planes; on a valley surface its error is a fraction of the 50 m bins, where the
glacier's mean (the rule without it) misses the void's own elevation band. Voids farther from
valid ground, or not enclosed by it within the tile and its halo, stay void (the glacier's
mean). Tile by tile with a halo of fill_px pixels (dask `map_overlap`).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from scipy import ndimage
from scipy.interpolate import griddata
from scipy.spatial import QhullError

__all__ = ["fill_voids", "void_filled"]


def fill_voids(elevation_m: np.ndarray, fill_px: int) -> np.ndarray:
    """`elevation_m` (m, 2-D, NaN = void) with the void pixels within `fill_px` pixels of a
    valid one interpolated linearly from the valid pixels bordering the voids; others NaN."""
    void = ~np.isfinite(elevation_m)
    if fill_px <= 0 or not void.any() or void.all():
        return elevation_m
    target = void & (ndimage.distance_transform_edt(void) <= fill_px)
    border = ndimage.binary_dilation(void, structure=np.ones((3, 3), bool)) & ~void
    rows, cols = np.nonzero(border)
    fill_rows, fill_cols = np.nonzero(target)
    if len(rows) < 3 or len(fill_rows) == 0:
        return elevation_m
    try:
        values = griddata(
            (rows, cols), elevation_m[rows, cols], (fill_rows, fill_cols), method="linear"
        )
    except QhullError:  # the border points on one line: nothing to interpolate across
        return elevation_m
    out = np.array(elevation_m, copy=True)
    out[fill_rows, fill_cols] = values  # NaN outside the border's hull
    return out


def void_filled(elevation_m: da.Array, fill_px: int) -> da.Array:
    """`fill_voids` on every tile with a halo of fill_px pixels (dask merges tiles smaller than
    the halo with their neighbours, so the result's chunks may differ from the input's)."""
    if fill_px <= 0:
        return elevation_m
    return elevation_m.map_overlap(
        fill_voids,
        depth=fill_px,
        boundary="none",
        dtype=elevation_m.dtype,
        meta=np.array((), dtype=elevation_m.dtype),
        fill_px=fill_px,
    )
