"""mbcube.voids: elevations interpolated across reference-DEM voids."""

from __future__ import annotations

import dask.array as da
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mbcube.voids import fill_voids, void_filled


def _plane(n: int = 64) -> np.ndarray:
    rows, cols = np.mgrid[0:n, 0:n].astype(np.float64)
    return 4200.0 + 12.5 * cols - 7.0 * rows  # m; 12.5 and -7 m per pixel


@settings(max_examples=30, deadline=None)
@given(r0=st.integers(1, 40), c0=st.integers(1, 40), h=st.integers(1, 20), w=st.integers(1, 20))
def test_a_void_in_a_plane_is_filled_exactly(r0: int, c0: int, h: int, w: int) -> None:
    """Linear interpolation is exact on a plane, whatever the void's place and shape."""
    truth = _plane()
    dem = truth.copy()
    dem[r0 : r0 + h, c0 : c0 + w] = np.nan
    dem[r0 + h // 2, c0 : c0 + w + 3] = np.nan  # not a rectangle
    filled = fill_voids(dem, fill_px=30)
    np.testing.assert_allclose(filled, truth, atol=1e-6)


def test_fill_distance_and_voids_not_enclosed() -> None:
    """Void pixels farther than fill_px from valid ground stay void, and so do those outside the
    valid border's hull (a void at the array's edge is not extrapolated)."""
    truth = _plane()
    dem = truth.copy()
    dem[10:31, 10:31] = np.nan  # centre 10 px from the border
    dem[:, 60:] = np.nan  # the edge: only one column of border, outside the hull
    filled = fill_voids(dem, fill_px=6)
    inner = np.zeros(dem.shape, bool)
    inner[16:25, 16:25] = True  # more than 6 px from valid ground
    assert np.isnan(filled[inner]).all()
    ring = np.isnan(dem) & ~inner
    ring[:, 60:] = False
    np.testing.assert_allclose(filled[ring], truth[ring], atol=1e-6)
    assert np.isnan(filled[:, 61:]).all()
    assert np.array_equal(filled[~np.isnan(dem)], dem[~np.isnan(dem)])  # valid ones untouched
    assert np.isnan(fill_voids(np.full((5, 5), np.nan), 3)).all()
    assert fill_voids(truth, 3) is truth
    np.testing.assert_array_equal(fill_voids(dem, 0), dem)


def test_tiles_with_a_halo_fill_as_the_whole_array() -> None:
    """A void across tile corners is filled tile by tile (halo fill_px) as in one array, also
    where the last tiles are narrower than the halo."""
    truth = _plane(96).astype(np.float32)
    dem = truth.copy()
    dem[33:50, 34:48] = np.nan  # across the corner of four tiles
    dem[85:93, 2:9] = np.nan  # in the last row of tiles, 16 px tall
    tiled = void_filled(da.from_array(dem, chunks=40), fill_px=20).compute()
    assert tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, fill_voids(dem, 20), atol=1e-3)
    np.testing.assert_allclose(tiled, truth, atol=1e-3)
