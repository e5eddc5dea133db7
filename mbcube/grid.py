"""The common grid of a cube: CRS, north-up affine transform, shape and tiling. No I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from affine import Affine
from pyproj import CRS


@dataclass(frozen=True)
class Tile:
    """One tile of the grid: its index and its pixel slices (rows, columns)."""

    row: int
    col: int
    rows: slice
    cols: slice

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)

    @property
    def name(self) -> str:
        return f"tile({self.row},{self.col})"


@dataclass(frozen=True)
class Grid:
    """A north-up raster grid.

    x0, y0: map coordinates of the upper-left corner of the upper-left pixel (CRS units, m).
    res: pixel size (m); ny, nx: shape in pixels; tile: tile (chunk) size in pixels.
    """

    crs: str
    x0: float
    y0: float
    res: float
    ny: int
    nx: int
    tile: int = 1024

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ny, self.nx)

    @property
    def transform(self) -> Affine:
        return Affine(self.res, 0.0, self.x0, 0.0, -self.res, self.y0)

    @property
    def pyproj_crs(self) -> CRS:
        return CRS.from_user_input(self.crs)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in CRS units."""
        return (self.x0, self.y0 - self.ny * self.res, self.x0 + self.nx * self.res, self.y0)

    @property
    def pixel_area_m2(self) -> float:
        """Area of one pixel (m2); the grid CRS is metric, so it is the same everywhere."""
        return self.res * self.res

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask chunks (rows, columns) of the tiling."""
        return (_split(self.ny, self.tile), _split(self.nx, self.tile))

    @property
    def n_tiles(self) -> int:
        rows, cols = self.chunks
        return len(rows) * len(cols)

    def x_coords(self) -> np.ndarray:
        """Pixel-centre x coordinates (m)."""
        return self.x0 + (np.arange(self.nx) + 0.5) * self.res

    def y_coords(self) -> np.ndarray:
        """Pixel-centre y coordinates (m), decreasing (north-up)."""
        return self.y0 - (np.arange(self.ny) + 0.5) * self.res

    def tiles(self) -> Iterator[Tile]:
        """All tiles, row-major."""
        r0 = 0
        for i, nr in enumerate(self.chunks[0]):
            c0 = 0
            for j, nc in enumerate(self.chunks[1]):
                yield Tile(i, j, slice(r0, r0 + nr), slice(c0, c0 + nc))
                c0 += nc
            r0 += nr

    def tile_bounds(self, tile: Tile) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of a tile in CRS units."""
        left = self.x0 + tile.cols.start * self.res
        right = self.x0 + tile.cols.stop * self.res
        top = self.y0 - tile.rows.start * self.res
        bottom = self.y0 - tile.rows.stop * self.res
        return (left, bottom, right, top)

    def tile_transform(self, tile: Tile) -> Affine:
        return self.transform @ Affine.translation(tile.cols.start, tile.rows.start)

    def to_attrs(self) -> dict[str, object]:
        """A JSON-able description, stored in the cube."""
        return {
            "crs": self.crs,
            "x0": self.x0,
            "y0": self.y0,
            "res": self.res,
            "ny": self.ny,
            "nx": self.nx,
            "tile": self.tile,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, object]) -> Grid:
        return cls(
            crs=str(attrs["crs"]),
            x0=float(attrs["x0"]),  # type: ignore[arg-type]
            y0=float(attrs["y0"]),  # type: ignore[arg-type]
            res=float(attrs["res"]),  # type: ignore[arg-type]
            ny=int(attrs["ny"]),  # type: ignore[call-overload]
            nx=int(attrs["nx"]),  # type: ignore[call-overload]
            tile=int(attrs["tile"]),  # type: ignore[call-overload]
        )

    @classmethod
    def covering(
        cls,
        crs: str,
        bounds: tuple[float, float, float, float],
        res: float,
        tile: int = 1024,
    ) -> Grid:
        """The grid of pixel size `res` (m) whose pixels are aligned to multiples of `res`
        and that covers `bounds` (left, bottom, right, top)."""
        left, bottom, right, top = bounds
        x0 = np.floor(left / res) * res
        y0 = np.ceil(top / res) * res
        nx = int(np.ceil((right - x0) / res - 1e-9))
        ny = int(np.ceil((y0 - bottom) / res - 1e-9))
        return cls(crs=crs, x0=float(x0), y0=float(y0), res=float(res), ny=ny, nx=nx, tile=tile)


def _split(n: int, size: int) -> tuple[int, ...]:
    full, rest = divmod(n, size)
    return (size,) * full + ((rest,) if rest else ())


def utm_crs_for(lon: float, lat: float) -> str:
    """The WGS 84 / UTM zone CRS (as 'EPSG:326xx' or 'EPSG:327xx') containing lon, lat (degrees)."""
    zone = int(np.floor((lon + 180.0) / 6.0)) % 60 + 1
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"
