"""Binned statistics of dh and glacier hypsometry: per-tile numba kernels, a tree-sum map-reduce.

The statistics are per scene x glacier x elevation bin (of the reference DEM) x surface type:
count, sum and sum of squares of the valid dh (m), plus per scene the same over stable ground and a
histogram of stable dh (for a robust NMAD). They are small and additive, so everything later
(mass balance, regions, uncertainty) reads them instead of pixels.

How it is computed (measured in benchmarks/RESULTS-binning.md):

- a per-tile numba kernel reads the tile's glacier_id, surface, ref_dem_m, stable and dh_m once
  and returns a *partial*: the glaciers present in the tile, their (bin, surface) count/sum/sumsq,
  the stable-ground sums and histogram. Memory of a partial ~ glaciers in the tile x bins.
- partials are merged by a tree sum (`split_every` partials per task), so a scene's graph has
  ~ n_tiles * (1 + 1/(split_every - 1)) tasks: it grows with the number of tiles only.
- the final task scatters the merged partial into dense (glacier, bin, surface) arrays.

Engines (`binned_statistics(..., engine=...)`):

- "numba" (default): the map-reduce above; the fastest on every layout we measured.
- "flox": `flox.groupby_reduce(method="map-reduce")` on a combined integer key (invalid pixels get
  key -1, never labels outside `expected_groups`: flox 0.11.2 `method="cohorts"` returned wrong sums
  in that case). Slower (see the benchmark); kept as an independent check and for users who
  already build flox pipelines.

The elevation bin of a pixel is floor(ref_dem_m / bin_width_m) (float64 arithmetic); the bin
coordinate is the lower edge (m). The global bin axis runs from the bin of the lowest to the bin of
the highest glacier pixel with a valid reference DEM.

Stored groups (written by `bin_cube`):

- `hypsometry` (glacier, bin, surface): n_px, area_m2 over ALL glacier pixels with an elevation
  (measured or not): the reference DEM's (ref_dem_m, SRTM-C), or where it is void the X-band
  reference's (ref_dem_x_m, SRTM-X, when the cube has it: the two differ by a few m, against
  50 m bins), then one interpolated across the void (`mbcube.voids`, within
  void_fill_distance_m); (glacier): void_binned_px, the pixels binned that way, and void_px,
  void_area_m2 for glacier pixels without any, so the glacier area is complete (attribute
  void_elevation: the rule). Computed once; recomputed when the bin width or that rule
  changes.
- `stats` (scene, glacier, bin, surface): count, sum_dh_m, sumsq_dh_m2; (scene): stable_count,
  stable_sum_dh_m, stable_sumsq_dh_m2, stable_median_dh_m, stable_nmad_dh_m, binned (1 = written);
  (scene, stable_dh_bin): stable_hist. The coarse-scale stable statistic, per scene: the mean dh
  of stable-ground blocks of stable_block_side_px (attribute; round(autocorrelation_m / res))
  pixels square, blocks at least half valid stable ground: stable_block_count,
  stable_block_sum_dh_m, stable_block_sumsq_dh_m2 (of the block means), stable_block_px_sum,
  stable_block_inv_px_sum (sums of n and 1/n, n a block's pixels), stable_block_nmad_dh_m (NMAD
  of the block means, from (scene, stable_dh_bin) stable_block_hist). With the pixel spread it
  splits a scene's error into a white and a correlated part (`mbcube.uncertainty`). Blocks are
  squares of each tile counted from its first row and column (a tile's remainder is in no block),
  so they never straddle tiles. One region per scene: a new scene adds its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numba
import numpy as np
import xarray as xr
import zarr
from dask.delayed import Delayed

from mbcube.cluster import SceneJob, compute, compute_scenes
from mbcube.config import MassBalanceConfig
from mbcube.errors import StoreError
from mbcube.store import (
    grid_of,
    invalidate,
    is_current,
    open_cube,
    read_state,
    record_step,
    recorded_config,
    require_intact,
    require_static_intact,
    scene_index,
    scene_outputs,
    step_record,
    step_records,
    write_dataset,
    writes_store,
)
from mbcube.voids import void_filled

__all__ = [
    "NMAD_FACTOR",
    "STABLE_HIST_HALF_RANGE_M",
    "STABLE_HIST_WIDTH_M",
    "BinAxis",
    "BinningError",
    "Partial",
    "bin_axis",
    "bin_cube",
    "binned_statistics",
    "block_side_px",
    "elevation_range",
    "hypsometry",
    "hypsometry_tile",
    "merge_partials",
    "nmad_from_histogram",
    "stats_tile",
]

log = logging.getLogger(__name__)

SURFACES = (1, 2)  # clean ice, debris
NMAD_FACTOR = 1.4826
#: Stable-ground dh histogram: bins of this width (m) over +-STABLE_HIST_HALF_RANGE_M; values
#: beyond fall into the end bins (they still count for the median position).
STABLE_HIST_WIDTH_M = 0.02
STABLE_HIST_HALF_RANGE_M = 50.0
N_STABLE_HIST = round(2 * STABLE_HIST_HALF_RANGE_M / STABLE_HIST_WIDTH_M)
HYPSOMETRY_STEP = "hypsometry"
#: Glaciers per stored chunk of the statistics (scene x glacier x bin x surface): 4096 glaciers x
#: ~100 bins x 2 surfaces x 8 B = 6.5 MB, so reading some glaciers never loads all of them.
GLACIER_CHUNK = 4096
HYPSOMETRY_ALL = "_all"
#: The bin step's record of the `stats` group as a whole (written once the group is made).
STATS_ITEM = "_stats_group"


class BinningError(RuntimeError):
    """A per-tile binning kernel failed; the message names the scene and the tile."""


@dataclass(frozen=True)
class BinAxis:
    """The global elevation bin axis: bins [first_bin * w, (first_bin + n_bins) * w) of width w (m)."""

    bin_width_m: float
    first_bin: int
    n_bins: int

    @property
    def lower_edges_m(self) -> np.ndarray:
        """Lower edge of each bin (m)."""
        return (self.first_bin + np.arange(self.n_bins)) * self.bin_width_m


def bin_axis(min_elevation_m: float, max_elevation_m: float, bin_width_m: float = 50.0) -> BinAxis:
    """The bin axis from floor(min / w) * w to the bin holding the max (m)."""
    if not (np.isfinite(min_elevation_m) and np.isfinite(max_elevation_m)):
        raise ValueError(
            f"elevation range ({min_elevation_m}, {max_elevation_m}) is not finite: "
            "no glacier pixel has a valid reference DEM"
        )
    if bin_width_m <= 0:
        raise ValueError(f"bin_width_m must be > 0, got {bin_width_m}")
    first = int(np.floor(np.float64(min_elevation_m) / bin_width_m))
    last = int(np.floor(np.float64(max_elevation_m) / bin_width_m))
    if last < first:
        raise ValueError(f"max elevation {max_elevation_m} below min {min_elevation_m}")
    return BinAxis(float(bin_width_m), first, last - first + 1)


# ------------------------------------------------------------------ per-tile kernels (numpy in, out)


@numba.njit(nogil=True, cache=True)
def _grow(
    ids: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    cap = ids.shape[0]
    ids2 = np.empty(2 * cap, np.int32)
    ids2[:cap] = ids
    return ids2, _grow_one(a), _grow_one(b), _grow_one(c)


@numba.njit(nogil=True, cache=True)
def _grow_one(a: np.ndarray) -> np.ndarray:
    """A 3-D per-glacier array with twice the rows (the new ones zero)."""
    a2 = np.zeros((2 * a.shape[0], a.shape[1], a.shape[2]), a.dtype)
    a2[: a.shape[0]] = a
    return a2


@numba.njit(nogil=True, cache=True)
def _stats_kernel(
    gid: np.ndarray,
    surf: np.ndarray,
    ref: np.ndarray,
    dh: np.ndarray,
    stable: np.ndarray,
    first_bin: int,
    bin_width_m: float,
    n_bins: int,
    n_glaciers: int,
    hist_lo_m: float,
    hist_width_m: float,
    n_hist: int,
    block_px: int,
) -> tuple[
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
    np.ndarray,
]:
    ny, nx = gid.shape
    slot = np.full(n_glaciers + 1, -1, np.int32)
    ids = np.empty(8, np.int32)
    cnt = np.zeros((8, n_bins, 2), np.int64)
    s1 = np.zeros((8, n_bins, 2), np.float64)
    s2 = np.zeros((8, n_bins, 2), np.float64)
    n_local = 0
    st_n = np.zeros(1, np.int64)
    st = np.zeros(2, np.float64)
    hist = np.zeros(n_hist, np.int64)
    # stable-ground blocks: the tile's whole blocks of block_px x block_px pixels
    nby = ny // block_px if block_px >= 2 else 0
    nbx = nx // block_px if block_px >= 2 else 0
    blk_n = np.zeros((nby, nbx), np.int64)
    blk_s = np.zeros((nby, nbx), np.float64)
    for i in range(ny):
        for j in range(nx):
            v = np.float64(dh[i, j])
            if not np.isfinite(v):
                continue
            if stable[i, j] == 1:
                st_n[0] += 1
                st[0] += v
                st[1] += v * v
                h = np.floor((v - hist_lo_m) / hist_width_m)
                k = 0 if h < 0 else (n_hist - 1 if h >= n_hist else int(h))
                hist[k] += 1
                if nby > 0 and nbx > 0:
                    bi = i // block_px
                    bj = j // block_px
                    if bi < nby and bj < nbx:
                        blk_n[bi, bj] += 1
                        blk_s[bi, bj] += v
            g = gid[i, j]
            if g < 1 or g > n_glaciers:
                continue
            s = surf[i, j]
            if s != 1 and s != 2:
                continue
            z = np.float64(ref[i, j])
            if not np.isfinite(z):
                continue
            b = int(np.floor(z / bin_width_m)) - first_bin
            if b < 0 or b >= n_bins:
                continue
            r = slot[g]
            if r < 0:
                if n_local == ids.shape[0]:
                    ids, cnt, s1, s2 = _grow(ids, cnt, s1, s2)
                r = n_local
                slot[g] = r
                ids[r] = g
                n_local += 1
            cnt[r, b, s - 1] += 1
            s1[r, b, s - 1] += v
            s2[r, b, s - 1] += v * v
    # blocks at least half covered by valid stable pixels: count, then sums of their means m,
    # m^2, 1/n and n, and a histogram of m
    blk_count = np.zeros(1, np.int64)
    blk_sums = np.zeros(4, np.float64)
    blk_hist = np.zeros(n_hist, np.int64)
    min_px = (block_px * block_px + 1) // 2
    for bi in range(nby):
        for bj in range(nbx):
            n = blk_n[bi, bj]
            if n < min_px:
                continue
            m = blk_s[bi, bj] / n
            blk_count[0] += 1
            blk_sums[0] += m
            blk_sums[1] += m * m
            blk_sums[2] += 1.0 / n
            blk_sums[3] += n
            h = np.floor((m - hist_lo_m) / hist_width_m)
            k = 0 if h < 0 else (n_hist - 1 if h >= n_hist else int(h))
            blk_hist[k] += 1
    return (
        ids[:n_local],
        cnt[:n_local],
        s1[:n_local],
        s2[:n_local],
        st_n,
        st,
        hist,
        blk_count,
        blk_sums,
        blk_hist,
    )


@numba.njit(nogil=True, cache=True)
def _hypsometry_kernel(
    gid: np.ndarray,
    surf: np.ndarray,
    ref: np.ndarray,
    ref_x: np.ndarray,
    first_bin: int,
    bin_width_m: float,
    n_bins: int,
    n_glaciers: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ny, nx = gid.shape
    has_x = ref_x.shape[0] == ny and ref_x.shape[1] == nx
    slot = np.full(n_glaciers + 1, -1, np.int32)
    ids = np.empty(8, np.int32)
    n_px = np.zeros((8, n_bins, 2), np.int64)
    void = np.zeros((8, 1, 1), np.int64)
    outside = np.zeros((8, 1, 1), np.int64)
    void_binned = np.zeros((8, 1, 1), np.int64)
    n_local = 0
    for i in range(ny):
        for j in range(nx):
            g = gid[i, j]
            if g < 1 or g > n_glaciers:
                continue
            s = surf[i, j]
            if s != 1 and s != 2:
                continue
            r = slot[g]
            if r < 0:
                if n_local == ids.shape[0]:
                    ids, n_px, void, outside = _grow(ids, n_px, void, outside)
                    void_binned = _grow_one(void_binned)
                r = n_local
                slot[g] = r
                ids[r] = g
                n_local += 1
            z = np.float64(ref[i, j])
            if not np.isfinite(z):
                zx = np.float64(ref_x[i, j]) if has_x else np.float64(np.nan)
                if not np.isfinite(zx):
                    void[r, 0, 0] += 1
                    continue
                void_binned[r, 0, 0] += 1
                z = zx
            b = int(np.floor(z / bin_width_m)) - first_bin
            if b < 0 or b >= n_bins:
                outside[r, 0, 0] += 1
                continue
            n_px[r, b, s - 1] += 1
    return (
        ids[:n_local],
        n_px[:n_local],
        void[:n_local, 0, 0],
        outside[:n_local, 0, 0],
        void_binned[:n_local, 0, 0],
    )


@dataclass
class Partial:
    """Additive partial statistics of some pixels.

    glacier: the glacier numbers present (int32, k); per_glacier: arrays whose first axis follows
    `glacier`; totals: arrays summed as they are (stable-ground sums, histogram)."""

    glacier: np.ndarray
    per_glacier: tuple[np.ndarray, ...]
    totals: tuple[np.ndarray, ...]


def stats_tile(
    glacier_id: np.ndarray,
    surface: np.ndarray,
    ref_dem_m: np.ndarray,
    dh_m: np.ndarray,
    stable: np.ndarray,
    axis: BinAxis,
    n_glaciers: int,
    block_px: int = 0,
) -> Partial:
    """Partial dh statistics of one tile (2-D arrays of one shape).

    per_glacier = (count int64, sum_dh_m, sumsq_dh_m2), each (k, n_bins, 2 surfaces), over pixels
    with finite dh_m, glacier_id in 1..n_glaciers, surface 1|2 and ref_dem_m inside the axis;
    totals = (stable_count (1,), [stable_sum_dh_m, stable_sumsq_dh_m2], stable_hist) over pixels
    with stable == 1 and finite dh_m (whatever their glacier_id), then the stable-ground blocks:
    (block_count (1,), [sum of block means (m), of their squares (m2), of 1/n, of n],
    block_hist). A block is one of the tile's whole block_px x block_px squares (counted from the
    tile's first row and column; the rest of the tile is in no block) with at least half of its
    pixels valid stable ground; its mean is the mean dh of those pixels, n their number.
    block_px < 2: no blocks."""
    ids, cnt, s1, s2, st_n, st, hist, blk_n, blk_sums, blk_hist = _stats_kernel(
        glacier_id,
        surface,
        ref_dem_m,
        dh_m,
        stable,
        axis.first_bin,
        axis.bin_width_m,
        axis.n_bins,
        n_glaciers,
        -STABLE_HIST_HALF_RANGE_M,
        STABLE_HIST_WIDTH_M,
        N_STABLE_HIST,
        int(block_px),
    )
    return Partial(ids, (cnt, s1, s2), (st_n, st, hist, blk_n, blk_sums, blk_hist))


def hypsometry_tile(
    glacier_id: np.ndarray,
    surface: np.ndarray,
    ref_dem_m: np.ndarray,
    axis: BinAxis,
    n_glaciers: int,
    ref_dem_x_m: np.ndarray | None = None,
) -> Partial:
    """Partial hypsometry of one tile: per_glacier = (n_px (k, n_bins, 2), void_px (k,),
    outside_px (k,), void_binned_px (k,)) over glacier pixels (glacier_id in 1..n_glaciers,
    surface 1|2). A pixel is binned by ref_dem_m (m) or, where that is void (not finite), by
    ref_dem_x_m (m, when given and finite there; counted in void_binned_px too); void_px counts
    the pixels void in both, outside_px those whose elevation lies outside the axis (0 on the
    global axis)."""
    ref_x = np.empty((0, 0), np.float32) if ref_dem_x_m is None else ref_dem_x_m
    ids, n_px, void, outside, void_binned = _hypsometry_kernel(
        glacier_id,
        surface,
        ref_dem_m,
        ref_x,
        axis.first_bin,
        axis.bin_width_m,
        axis.n_bins,
        n_glaciers,
    )
    return Partial(ids, (n_px, void, outside, void_binned), ())


def merge_partials(*parts: Partial) -> Partial:
    """The sum of partials (glaciers united, their arrays added)."""
    if len(parts) == 1:
        return parts[0]
    glaciers = np.unique(np.concatenate([p.glacier for p in parts]))
    first = parts[0]
    per = [np.zeros((len(glaciers), *a.shape[1:]), a.dtype) for a in first.per_glacier]
    totals = [np.zeros_like(a) for a in first.totals]
    for part in parts:
        rows = np.searchsorted(glaciers, part.glacier)  # unique within a partial: += is exact
        for out, arr in zip(per, part.per_glacier, strict=True):
            out[rows] += arr
        for out, arr in zip(totals, part.totals, strict=True):
            out += arr
    return Partial(glaciers.astype(np.int32), tuple(per), tuple(totals))


def _dense(part: Partial, n_glaciers: int) -> list[np.ndarray]:
    """Per-glacier arrays scattered onto glaciers 1..n_glaciers (zeros where absent)."""
    out = []
    for arr in part.per_glacier:
        full = np.zeros((n_glaciers, *arr.shape[1:]), arr.dtype)
        full[part.glacier - 1] = arr
        out.append(full)
    return out


def nmad_from_histogram(
    hist: np.ndarray,
    lo_m: float = -STABLE_HIST_HALF_RANGE_M,
    width_m: float = STABLE_HIST_WIDTH_M,
) -> tuple[float, float]:
    """(median, NMAD) in m of the values binned in `hist` (bins [lo + i w, lo + (i+1) w)).

    The median is interpolated linearly inside its bin; the MAD is the weighted median of the bin
    centres' distances to it. Error at most about one bin width. (nan, nan) for an empty histogram."""
    hist = np.asarray(hist, dtype=np.float64)
    total = hist.sum()
    if total <= 0:
        return float("nan"), float("nan")
    cum = np.cumsum(hist)
    k = int(np.searchsorted(cum, total / 2.0))
    before = cum[k - 1] if k > 0 else 0.0
    median = lo_m + width_m * (k + (total / 2.0 - before) / hist[k])
    centres = lo_m + width_m * (np.arange(hist.size) + 0.5)
    dist = np.abs(centres - median)
    order = np.argsort(dist, kind="stable")
    dcum = np.cumsum(hist[order])
    mad = float(dist[order][int(np.searchsorted(dcum, total / 2.0))])
    return float(median), NMAD_FACTOR * mad


# ------------------------------------------------------------------ dask map-reduce


def _tree(parts: list[Any], split_every: int, name: str) -> Any:
    """Sum delayed partials in a tree: split_every partials per task."""
    level = 0
    while len(parts) > 1:
        parts = [
            dask.delayed(merge_partials, pure=True)(
                *parts[i : i + split_every],
                dask_key_name=(f"{name}-merge{level}", i // split_every),
            )
            for i in range(0, len(parts), split_every)
        ]
        level += 1
    return parts[0]


def _tile_task(func: Callable[..., Partial], where: str, row: int, col: int, *args: Any) -> Partial:
    try:
        return func(*args)
    except Exception as err:
        raise BinningError(f"binning {where}, tile ({row}, {col}): {err}") from err


def _map_tiles(
    func: Callable[..., Partial],
    arrays: Sequence[da.Array],
    extra: tuple[Any, ...],
    where: str,
    split_every: int,
) -> Delayed:
    """func(*blocks, *extra) on every tile, tree-summed into one delayed Partial."""
    arrays = da.core.unify_chunks(*[x for a in arrays for x in (a, "yx")])[1]
    blocks = [a.to_delayed(optimize_graph=False) for a in arrays]
    token = dask.base.tokenize(func.__name__, *arrays, extra, where)
    name = f"bin-{func.__name__}-{token}"
    parts = []
    for row in range(blocks[0].shape[0]):
        for col in range(blocks[0].shape[1]):
            parts.append(
                dask.delayed(_tile_task, pure=True)(
                    func,
                    where,
                    row,
                    col,
                    *[b[row, col] for b in blocks],
                    *extra,
                    dask_key_name=(name, row, col),
                )
            )
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    return _tree(parts, split_every, name)


def _scene_stats_arrays(part: Partial, n_glaciers: int) -> dict[str, np.ndarray]:
    count, s1, s2 = _dense(part, n_glaciers)
    st_n, st, hist, blk_n, blk_sums, blk_hist = part.totals
    median, nmad = nmad_from_histogram(hist)
    _, block_nmad = nmad_from_histogram(blk_hist)
    return {
        "count": count,
        "sum_dh_m": s1,
        "sumsq_dh_m2": s2,
        "stable_count": np.asarray(st_n[0], np.int64),
        "stable_sum_dh_m": np.asarray(st[0], np.float64),
        "stable_sumsq_dh_m2": np.asarray(st[1], np.float64),
        "stable_median_dh_m": np.asarray(median, np.float64),
        "stable_nmad_dh_m": np.asarray(nmad, np.float64),
        "stable_hist": hist,
        "stable_block_count": np.asarray(blk_n[0], np.int64),
        "stable_block_sum_dh_m": np.asarray(blk_sums[0], np.float64),
        "stable_block_sumsq_dh_m2": np.asarray(blk_sums[1], np.float64),
        "stable_block_inv_px_sum": np.asarray(blk_sums[2], np.float64),
        "stable_block_px_sum": np.asarray(blk_sums[3], np.float64),
        "stable_block_nmad_dh_m": np.asarray(block_nmad, np.float64),
        "stable_block_hist": blk_hist,
    }


STATS_ATTRS: dict[str, dict[str, str]] = {
    "count": {"long_name": "number of valid dh pixels"},
    "sum_dh_m": {"long_name": "sum of dh", "units": "m"},
    "sumsq_dh_m2": {"long_name": "sum of squared dh", "units": "m2"},
    "stable_count": {"long_name": "number of valid dh pixels on stable ground"},
    "stable_sum_dh_m": {"long_name": "sum of dh on stable ground", "units": "m"},
    "stable_sumsq_dh_m2": {"long_name": "sum of squared dh on stable ground", "units": "m2"},
    "stable_median_dh_m": {"long_name": "median dh on stable ground (histogram)", "units": "m"},
    "stable_nmad_dh_m": {
        "long_name": "NMAD (1.4826 MAD) of dh on stable ground (histogram)",
        "units": "m",
    },
    "stable_hist": {"long_name": "histogram of dh on stable ground (end bins hold the tails)"},
    "stable_block_count": {
        "long_name": "number of stable-ground blocks (stable_block_side_px squares, at least "
        "half valid stable ground)"
    },
    "stable_block_sum_dh_m": {"long_name": "sum of the blocks' mean dh", "units": "m"},
    "stable_block_sumsq_dh_m2": {"long_name": "sum of the blocks' squared mean dh", "units": "m2"},
    "stable_block_inv_px_sum": {"long_name": "sum over blocks of 1 / (pixels in the block)"},
    "stable_block_px_sum": {"long_name": "sum over blocks of the pixels in the block"},
    "stable_block_nmad_dh_m": {
        "long_name": "NMAD of the blocks' mean dh (histogram): the coarse-scale spread",
        "units": "m",
    },
    "stable_block_hist": {"long_name": "histogram of the blocks' mean dh (as stable_hist)"},
    "binned": {"long_name": "1 = the scene's statistics are written", "flag_values": "0 1"},
}


def _scene_dataset(
    final: Delayed, axis: BinAxis, n_glaciers: int, scene: Any, name: str
) -> xr.Dataset:
    """Lazy Dataset (scene=1, ...) of one scene's statistics from the delayed final Partial."""
    arrays = dask.delayed(_scene_stats_arrays, pure=True)(
        final, n_glaciers, dask_key_name=f"{name}-dense"
    )
    shape3 = (n_glaciers, axis.n_bins, 2)
    specs: dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]] = {
        "count": (("glacier", "bin", "surface"), shape3, np.int64),
        "sum_dh_m": (("glacier", "bin", "surface"), shape3, np.float64),
        "sumsq_dh_m2": (("glacier", "bin", "surface"), shape3, np.float64),
        "stable_count": ((), (), np.int64),
        "stable_sum_dh_m": ((), (), np.float64),
        "stable_sumsq_dh_m2": ((), (), np.float64),
        "stable_median_dh_m": ((), (), np.float64),
        "stable_nmad_dh_m": ((), (), np.float64),
        "stable_hist": (("stable_dh_bin",), (N_STABLE_HIST,), np.int64),
        "stable_block_count": ((), (), np.int64),
        "stable_block_sum_dh_m": ((), (), np.float64),
        "stable_block_sumsq_dh_m2": ((), (), np.float64),
        "stable_block_inv_px_sum": ((), (), np.float64),
        "stable_block_px_sum": ((), (), np.float64),
        "stable_block_nmad_dh_m": ((), (), np.float64),
        "stable_block_hist": (("stable_dh_bin",), (N_STABLE_HIST,), np.int64),
    }
    data = {}
    for key, (dims, shape, dtype) in specs.items():
        arr = da.from_delayed(arrays[key], shape=shape, dtype=dtype, name=f"{name}-{key}")
        data[key] = (("scene", *dims), arr[None], STATS_ATTRS[key])
    return xr.Dataset(data, coords=_stats_coords(axis, n_glaciers) | {"scene": [scene]})


def _stats_coords(axis: BinAxis, n_glaciers: int) -> dict[str, Any]:
    hist_edges = -STABLE_HIST_HALF_RANGE_M + STABLE_HIST_WIDTH_M * np.arange(N_STABLE_HIST)
    return {
        "glacier": ("glacier", np.arange(1, n_glaciers + 1, dtype=np.int32)),
        "bin": (
            "bin",
            axis.lower_edges_m,
            {"units": "m", "long_name": "lower edge of the elevation bin of ref_dem_m"},
        ),
        "surface": (
            "surface",
            np.array(SURFACES, dtype=np.int8),
            {"flag_values": "1 2", "flag_meanings": "clean_ice debris"},
        ),
        "stable_dh_bin": (
            "stable_dh_bin",
            hist_edges,
            {"units": "m", "long_name": "lower edge of the stable dh histogram bin"},
        ),
    }


def _require(ds: xr.Dataset, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in ds.variables]
    if missing:
        raise StoreError(f"binning needs the layers {missing}, which are missing")


def void_elevation(static: xr.Dataset, void_fill_px: int = 0) -> da.Array | None:
    """The elevation (m) glacier pixels void in ref_dem_m are binned by: ref_dem_x_m where it has
    a value, then (void_fill_px > 0) the reference interpolated across the voids within
    void_fill_px pixels (`mbcube.voids`); NaN where none. None when there is neither."""
    has_x = "ref_dem_x_m" in static
    if void_fill_px <= 0:
        return static["ref_dem_x_m"].data if has_x else None
    known = static["ref_dem_m"].data
    if has_x:
        known = da.where(da.isfinite(known), known, static["ref_dem_x_m"].data)
    return void_filled(known, void_fill_px)


def void_rule(static: xr.Dataset, void_fill_px: int = 0) -> str:
    """The rule `void_elevation` follows, as recorded with the hypsometry."""
    rule = ["ref_dem_x_m"] if "ref_dem_x_m" in static else []
    if void_fill_px > 0:
        rule.append(f"interpolated within {void_fill_px} px")
    return ", then ".join(rule) or "none"


def elevation_range(static: xr.Dataset, void_fill_px: int = 0) -> tuple[da.Array, da.Array]:
    """Lazy (min, max) of the elevation (m) the hypsometry bins glacier pixels by (glacier_id >
    0, surface 1|2): ref_dem_m, or `void_elevation` where ref_dem_m is void."""
    _require(static, ["ref_dem_m", "glacier_id", "surface"])
    ref = static["ref_dem_m"].data
    substitute = void_elevation(static, void_fill_px)
    if substitute is not None:
        ref = da.where(da.isfinite(ref), ref, substitute)
    on = (static["glacier_id"].data > 0) & (static["surface"].data > 0) & da.isfinite(ref)
    lo = da.where(on, ref, np.inf).min()
    hi = da.where(on, ref, -np.inf).max()
    return lo, hi


def _axis_and_count(
    static: xr.Dataset,
    bin_width_m: float,
    axis: BinAxis | None,
    n_glaciers: int | None,
    void_fill_px: int = 0,
) -> tuple[BinAxis, int]:
    if n_glaciers is None:
        n_glaciers = (
            static.sizes["glacier"]
            if "glacier" in static.dims
            else int(static["glacier_id"].max().compute())
        )
    if n_glaciers < 1:
        raise ValueError(f"n_glaciers must be >= 1, got {n_glaciers}")
    if axis is None:
        lo, hi = dask.compute(*elevation_range(static, void_fill_px))
        axis = bin_axis(float(lo), float(hi), bin_width_m)
    return axis, int(n_glaciers)


def binned_statistics(
    dh_m: xr.DataArray,
    static: xr.Dataset,
    *,
    bin_width_m: float = 50.0,
    axis: BinAxis | None = None,
    n_glaciers: int | None = None,
    engine: Literal["numba", "flox"] = "numba",
    split_every: int = 8,
    block_px: int = 0,
) -> xr.Dataset:
    """Binned dh statistics (lazy) like `dh_m.groupby([glacier, elevation bin, surface])`.

    dh_m: (y, x) or (scene, y, x) dh (m); static: Dataset with ref_dem_m, glacier_id, surface and
    stable on the same (y, x) (e.g. the cube). Returns the `stats` schema (see module docstring)
    with dims (scene, glacier, bin, surface) (no scene dim for a 2-D dh_m).

    axis / n_glaciers: the bin axis and number of glaciers; when None they are taken from the data
    (the elevation range is then COMPUTED here: pass `axis` to build the graph only).
    engine: "numba" (per-tile kernel + tree sum, default, fastest) or "flox" (flox map-reduce on
    a combined key; no stable-ground histogram, so no stable median/NMAD, and no blocks).
    block_px: side (pixels) of the stable-ground blocks whose mean dh are summed (the
    `stable_block_*` variables, see `stats_tile`); < 2: none (the block variables are 0 / NaN)."""
    _require(static, ["ref_dem_m", "glacier_id", "surface", "stable"])
    if not {"y", "x"} <= set(dh_m.dims) or not set(dh_m.dims) <= {"scene", "y", "x"}:
        raise ValueError(f"dh_m must have dims (y, x) or (scene, y, x), got {dh_m.dims}")
    if split_every < 2:
        raise ValueError(f"split_every must be >= 2, got {split_every}")
    axis, n_glaciers = _axis_and_count(static, bin_width_m, axis, n_glaciers)
    flat = "scene" not in dh_m.dims
    dh = dh_m.expand_dims(scene=[None]) if flat else dh_m
    scenes = []
    for i in range(dh.sizes["scene"]):
        one = dh.isel(scene=i).transpose("y", "x")
        label = dh["scene"].values[i] if "scene" in dh.coords else i
        if engine == "numba":
            scenes.append(
                _scene_graph(
                    one.data, static, axis, n_glaciers, str(label), split_every, label, block_px
                )
            )
        elif engine == "flox":
            scenes.append(_flox_scene(one.data, static, axis, n_glaciers, label))
        else:
            raise ValueError(f"engine must be 'numba' or 'flox', got {engine!r}")
    out = xr.concat(scenes, dim="scene") if len(scenes) > 1 else scenes[0]
    return out.isel(scene=0, drop=True) if flat else out


def _scene_graph(
    dh: da.Array,
    static: xr.Dataset,
    axis: BinAxis,
    n_glaciers: int,
    where: str,
    split_every: int,
    scene: Any,
    block_px: int = 0,
) -> xr.Dataset:
    arrays = [_as_dask(static[k].data) for k in ("glacier_id", "surface", "ref_dem_m")] + [
        _as_dask(dh),
        _as_dask(static["stable"].data),
    ]
    final = _map_tiles(
        stats_tile, arrays, (axis, n_glaciers, int(block_px)), f"scene {where}", split_every
    )
    name = f"binstats-{dask.base.tokenize(final.key)}"
    return _scene_dataset(final, axis, n_glaciers, scene, name)


def _as_dask(arr: Any) -> da.Array:
    return arr if isinstance(arr, da.Array) else da.from_array(np.asarray(arr))


def _flox_scene(
    dh: da.Array, static: xr.Dataset, axis: BinAxis, n_glaciers: int, scene: Any
) -> xr.Dataset:
    """The same statistics by flox.groupby_reduce on a combined key (no stable histogram)."""
    import flox

    gid = _as_dask(static["glacier_id"].data)
    surf = _as_dask(static["surface"].data)
    ref = _as_dask(static["ref_dem_m"].data)
    stable = _as_dask(static["stable"].data)
    dh = _as_dask(dh)
    b = da.floor(ref.astype(np.float64) / axis.bin_width_m) - axis.first_bin
    ok = (
        (gid >= 1)
        & (gid <= n_glaciers)
        & ((surf == 1) | (surf == 2))
        & da.isfinite(b)
        & (b >= 0)
        & (b < axis.n_bins)
        & da.isfinite(dh)
    )
    key = ((gid.astype(np.int64) - 1) * axis.n_bins + da.where(ok, b, 0).astype(np.int64)) * 2
    key = da.where(ok, key + surf.astype(np.int64) - 1, -1)
    n_keys = n_glaciers * axis.n_bins * 2
    val = da.where(ok, dh, 0.0).astype(np.float64)
    results = []
    for func, values in (("sum", da.ones_like(val)), ("sum", val), ("sum", val * val)):
        res, *_ = flox.groupby_reduce(
            values,
            key,
            func=func,
            expected_groups=np.arange(n_keys),
            method="map-reduce",
            fill_value=0,
        )
        results.append(res.reshape(n_glaciers, axis.n_bins, 2))
    on_stable = (stable == 1) & da.isfinite(dh)
    sval = da.where(on_stable, dh, 0.0).astype(np.float64)
    data = {
        "count": (("glacier", "bin", "surface"), results[0].astype(np.int64)),
        "sum_dh_m": (("glacier", "bin", "surface"), results[1]),
        "sumsq_dh_m2": (("glacier", "bin", "surface"), results[2]),
        "stable_count": ((), on_stable.sum().astype(np.int64)),
        "stable_sum_dh_m": ((), sval.sum()),
        "stable_sumsq_dh_m2": ((), (sval * sval).sum()),
    }
    coords = _stats_coords(axis, n_glaciers)
    coords.pop("stable_dh_bin")
    ds = xr.Dataset({k: (dims, v, STATS_ATTRS[k]) for k, (dims, v) in data.items()}, coords=coords)
    return ds.expand_dims(scene=[scene])


def hypsometry(
    static: xr.Dataset,
    *,
    bin_width_m: float = 50.0,
    axis: BinAxis | None = None,
    n_glaciers: int | None = None,
    pixel_area_m2: float | None = None,
    split_every: int = 8,
    void_fill_px: int = 0,
) -> xr.Dataset:
    """Glacier x bin x surface hypsometry (lazy) over ALL glacier pixels with an elevation:
    n_px, area_m2 (glacier, bin, surface); void_px, void_area_m2 (glacier) where there is none;
    void_binned_px (glacier) the pixels binned by a substitute elevation.

    A glacier pixel is binned by ref_dem_m (SRTM-C), or, where that is void, by
    `void_elevation`: ref_dem_x_m (SRTM-X) where the Dataset has it with a value there (SRTM-X
    minus SRTM-C is the difference in radar penetration plus the two DEMs' errors, a few m at
    most, against 50 m bins), then, with void_fill_px > 0, the reference interpolated across
    the void (`mbcube.voids`). So a void enters the hypsometry at its own elevation and takes
    its bin's rate (mass balance) instead of the glacier's mean. Pixels without any stay void_px
    (the glacier's mean). pixel_area_m2 defaults to |dx * dy| of the x / y coordinates. With
    axis=None the elevation range (`elevation_range`, which includes the voids' substitute
    elevations) is computed here."""
    _require(static, ["ref_dem_m", "glacier_id", "surface"])
    axis, n_glaciers = _axis_and_count(static, bin_width_m, axis, n_glaciers, void_fill_px)
    if pixel_area_m2 is None:
        dx = float(abs(static["x"].values[1] - static["x"].values[0]))
        dy = float(abs(static["y"].values[1] - static["y"].values[0]))
        pixel_area_m2 = dx * dy
    arrays = [_as_dask(static[k].data) for k in ("glacier_id", "surface", "ref_dem_m")]
    func: Callable[..., Partial] = hypsometry_tile
    substitute = void_elevation(static, void_fill_px)
    if substitute is not None:
        arrays.append(_as_dask(substitute))
        func = _hypsometry_tile_x
    final = _map_tiles(func, arrays, (axis, n_glaciers), "hypsometry", split_every)
    name = f"hypsometry-{dask.base.tokenize(final.key)}"
    dense = dask.delayed(_dense, pure=True)(final, n_glaciers, dask_key_name=f"{name}-dense")
    shape3 = (n_glaciers, axis.n_bins, 2)
    n_px = da.from_delayed(dense[0], shape=shape3, dtype=np.int64, name=f"{name}-npx")
    void = da.from_delayed(dense[1], shape=(n_glaciers,), dtype=np.int64, name=f"{name}-void")
    void_binned = da.from_delayed(
        dense[3], shape=(n_glaciers,), dtype=np.int64, name=f"{name}-voidx"
    )
    coords = _stats_coords(axis, n_glaciers)
    coords.pop("stable_dh_bin")
    area = float(pixel_area_m2)
    ds = xr.Dataset(
        {
            "n_px": (("glacier", "bin", "surface"), n_px, {"long_name": "glacier pixels"}),
            "area_m2": (
                ("glacier", "bin", "surface"),
                n_px.astype(np.float64) * area,
                {"long_name": "glacier area", "units": "m2"},
            ),
            "void_px": (
                "glacier",
                void,
                {"long_name": "glacier pixels void in ref_dem_m and ref_dem_x_m (not binned)"},
            ),
            "void_area_m2": (
                "glacier",
                void.astype(np.float64) * area,
                {"long_name": "glacier area void in both references (not binned)", "units": "m2"},
            ),
            "void_binned_px": (
                "glacier",
                void_binned,
                {
                    "long_name": "glacier pixels void in ref_dem_m binned by a substitute "
                    "elevation (attribute void_elevation; in n_px)"
                },
            ),
        },
        coords=coords,
    )
    ds.attrs.update(
        {
            "bin_width_m": axis.bin_width_m,
            "first_bin": axis.first_bin,
            "pixel_area_m2": area,
            "void_elevation": void_rule(static, void_fill_px),
        }
    )
    return ds


def _hypsometry_tile_x(
    glacier_id: np.ndarray,
    surface: np.ndarray,
    ref_dem_m: np.ndarray,
    void_elevation_m: np.ndarray,
    axis: BinAxis,
    n_glaciers: int,
) -> Partial:
    """`hypsometry_tile` with the voids' substitute elevation as a positional block."""
    return hypsometry_tile(glacier_id, surface, ref_dem_m, axis, n_glaciers, void_elevation_m)


# ------------------------------------------------------------------ the step on the cube


def _group_exists(store: Path, group: str) -> bool:
    return (Path(store) / group / "zarr.json").exists()


def _open_group(store: Path, group: str) -> xr.Dataset:
    return xr.open_zarr(str(store), group=group, chunks=None, consolidated=False)


def _axis_of(hyps: xr.Dataset) -> BinAxis:
    return BinAxis(
        float(hyps.attrs["bin_width_m"]), int(hyps.attrs["first_bin"]), hyps.sizes["bin"]
    )


def _ensure_hypsometry(
    store: Path,
    cube: xr.Dataset,
    bin_width_m: float,
    void_fill_px: int,
    force: bool,
    say: Callable[[str], None],
) -> tuple[BinAxis, str]:
    """The stored hypsometry's axis and token, (re)computed when missing, of another width or
    made with another rule for the voids' elevation."""
    record = {
        "params": {"bin_width_m": bin_width_m, "void_elevation": void_rule(cube, void_fill_px)}
    }
    current = _group_exists(store, "hypsometry") and is_current(
        store, HYPSOMETRY_STEP, HYPSOMETRY_ALL, record
    )
    if current and not force:
        token = step_record(store, HYPSOMETRY_STEP, HYPSOMETRY_ALL)["token"]
        return _axis_of(_open_group(store, "hypsometry")), str(token)
    say(f"hypsometry ({bin_width_m:g} m bins)")
    lo, hi = compute(*elevation_range(cube, void_fill_px), label="hypsometry: elevation range")
    axis = bin_axis(float(lo), float(hi), bin_width_m)
    res = grid_of(read_state(store)).res
    hyps = hypsometry(
        cube,
        axis=axis,
        n_glaciers=cube.sizes["glacier"],
        pixel_area_m2=float(res * res),
        void_fill_px=void_fill_px,
    )
    hyps = compute(hyps, label="hypsometry")[0]
    invalidate(store, HYPSOMETRY_STEP, HYPSOMETRY_ALL)
    write_dataset(hyps, store, group="hypsometry", mode="w")
    token = record_step(store, HYPSOMETRY_STEP, HYPSOMETRY_ALL, record, outputs=["hypsometry"])
    return axis, token


def _placeholder_stats(scene_ids: list[str], axis: BinAxis, n_glaciers: int) -> xr.Dataset:
    """Zero statistics (binned = 0) for these scenes, lazily, chunked one scene and up to
    GLACIER_CHUNK glaciers at a time."""
    n = len(scene_ids)
    shape3 = (n, n_glaciers, axis.n_bins, 2)
    chunks3 = (1, min(n_glaciers, GLACIER_CHUNK), axis.n_bins, 2)
    big = ("scene", "glacier", "bin", "surface")
    data: dict[str, Any] = {}
    for key, dtype in (("count", np.int64), ("sum_dh_m", np.float64), ("sumsq_dh_m2", np.float64)):
        data[key] = (big, da.zeros(shape3, dtype=dtype, chunks=chunks3), STATS_ATTRS[key])
    for key in (
        "stable_count",
        "stable_sum_dh_m",
        "stable_sumsq_dh_m2",
        "stable_median_dh_m",
        "stable_nmad_dh_m",
        "stable_block_count",
        "stable_block_sum_dh_m",
        "stable_block_sumsq_dh_m2",
        "stable_block_inv_px_sum",
        "stable_block_px_sum",
        "stable_block_nmad_dh_m",
    ):
        dtype = np.int64 if key.endswith("_count") else np.float64
        fill = np.nan if key.endswith(("_median_dh_m", "_nmad_dh_m")) else 0
        data[key] = ("scene", da.full((n,), fill, dtype=dtype, chunks=1), STATS_ATTRS[key])
    for key in ("stable_hist", "stable_block_hist"):
        data[key] = (
            ("scene", "stable_dh_bin"),
            da.zeros((n, N_STABLE_HIST), dtype=np.int64, chunks=(1, N_STABLE_HIST)),
            STATS_ATTRS[key],
        )
    data["binned"] = ("scene", da.zeros((n,), dtype=np.uint8, chunks=1), STATS_ATTRS["binned"])
    coords = _stats_coords(axis, n_glaciers) | {
        "scene": ("scene", np.array(scene_ids, dtype=object))
    }
    return xr.Dataset(data, coords=coords)


def _stats_attrs(axis: BinAxis, hyps_token: str, block_px: int) -> dict[str, Any]:
    return {
        "bin_width_m": axis.bin_width_m,
        "first_bin": axis.first_bin,
        "hypsometry_token": hyps_token,
        "stable_hist_width_m": STABLE_HIST_WIDTH_M,
        "stable_hist_half_range_m": STABLE_HIST_HALF_RANGE_M,
        "stable_block_side_px": int(block_px),
    }


def block_side_px(autocorrelation_m: float, res_m: float) -> int:
    """Side (pixels) of the stable-ground blocks: round(autocorrelation_m / res_m) (m / m)."""
    if autocorrelation_m <= 0 or res_m <= 0:
        raise ValueError(
            f"autocorrelation_m and res_m must be > 0, got {autocorrelation_m}, {res_m}"
        )
    return round(autocorrelation_m / res_m)


def _ensure_stats_group(
    store: Path, axis: BinAxis, n_glaciers: int, hyps_token: str, block_px: int
) -> None:
    """Create the `stats` group (all store scenes, zero) when missing, made on another bin axis,
    hypsometry or block size, or not finished (its record STATS_ITEM is written once it is
    whole); append zero placeholders for scenes the store gained since."""
    ids = sorted(scene_index(store), key=scene_index(store).__getitem__)
    attrs = _stats_attrs(axis, hyps_token, block_px)
    record = {"attrs": attrs}
    if _group_exists(store, "stats") and is_current(store, "bin", STATS_ITEM, record):
        have = [str(s) for s in _open_group(store, "stats")["scene"].values]
        if have == ids[: len(have)]:
            if len(have) < len(ids):
                invalidate(store, "bin", STATS_ITEM)  # a kill while appending: made again
                new = _placeholder_stats(ids[len(have) :], axis, n_glaciers)
                new = new.drop_vars(["glacier", "bin", "surface", "stable_dh_bin"])
                write_dataset(new, store, group="stats", mode="a", append_dim="scene")
                record_step(store, "bin", STATS_ITEM, record)
            return
    invalidate(store, "bin", STATS_ITEM)
    for scene_id in step_records(store, "bin"):  # every scene is binned again
        invalidate(store, "bin", scene_id)
    ds = _placeholder_stats(ids, axis, n_glaciers)
    ds.attrs = attrs
    write_dataset(ds, store, group="stats", mode="w")
    record_step(store, "bin", STATS_ITEM, record)


@writes_store
def bin_cube(
    store: Path,
    config: MassBalanceConfig | None = None,
    *,
    scenes: Sequence[str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Write the `hypsometry` group (once per bin width) and each scene's binned dh statistics
    into the `stats` group of the cube at `store`; return the ids of the scenes (re)computed.

    Uses dh_m written by the corrections step (upstream record 'correct'); a scene is skipped when
    its statistics were made from the same dh_m, bin width and hypsometry (unless force). Holds
    the store's writer lock."""
    cfg = config if config is not None else recorded_config(store).massbalance
    require_static_intact(store)
    say = progress or log.info
    cube = open_cube(store)
    _require(cube, ["dh_m", "glacier_id", "surface", "ref_dem_m", "stable"])
    complete = [str(s) for s in cube["scene"].values]
    wanted = complete if scenes is None else [str(s) for s in scenes]
    unknown = [s for s in wanted if s not in complete]
    if unknown:
        raise StoreError(f"{store}: scenes {unknown} are not (completely) ingested")
    upstream = {s: step_record(store, "correct", s).get("token") for s in wanted}
    missing = [s for s, tok in upstream.items() if tok is None]
    if missing:
        raise StoreError(
            f"{store}: scenes {missing} have no corrected dh yet. Run `mbcube correct {store}` first."
        )
    for scene_id in wanted:  # before anything is written
        fix = f"`mbcube correct {store} --scene {scene_id} --force`"
        require_intact(store, "correct", scene_id, fix)
    n_glaciers = cube.sizes["glacier"]
    # force redoes the hypsometry only with all scenes (a new one means rebinning every scene)
    res = grid_of(read_state(store)).res
    void_fill_px = round(cfg.void_fill_distance_m / res)
    axis, hyps_token = _ensure_hypsometry(
        store, cube, cfg.bin_width_m, void_fill_px, force and scenes is None, say
    )
    block_px = block_side_px(cfg.autocorrelation_m, res)
    _ensure_stats_group(store, axis, n_glaciers, hyps_token, block_px)
    binned = _open_group(store, "stats")["binned"].values
    index = scene_index(store)
    jobs = []
    for scene_id in wanted:
        record = {
            "params": {"bin_width_m": cfg.bin_width_m, "block_px": block_px},
            "upstream": upstream[scene_id],
            "hypsometry": hyps_token,
        }
        i = index[scene_id]
        if not force and binned[i] == 1 and is_current(store, "bin", scene_id, record):
            continue
        jobs.append(_scene_job(store, cube, axis, n_glaciers, scene_id, i, record, say, block_px))
    return compute_scenes(jobs)


def _scene_job(
    store: Path,
    cube: xr.Dataset,
    axis: BinAxis,
    n_glaciers: int,
    scene_id: str,
    index: int,
    record: dict[str, Any],
    say: Callable[[str], None],
    block_px: int,
) -> SceneJob:
    """Binning one scene: its record forgotten and its flag cleared, its statistics written at
    its index, then flagged binned and recorded with the files it wrote (a scene killed
    half-written has no record, stays flagged 0 and is binned again)."""
    outputs: list[str] = []

    def build() -> list[Any]:
        say(f"binning scene {scene_id}")
        dh = cube["dh_m"].sel(scene=scene_id).transpose("y", "x").data
        ds = _scene_graph(dh, cube, axis, n_glaciers, scene_id, 8, scene_id, block_px)
        ds = ds.drop_vars(list(ds.coords)).chunk({"glacier": GLACIER_CHUNK})
        region = {str(d): slice(None) for d in ds.dims}
        region["scene"] = slice(index, index + 1)
        invalidate(store, "bin", scene_id)
        _set_binned(store, index, 0)
        names = [f"stats/{n}" for n in ds.data_vars if n != "binned"] + ["stats/binned"]
        outputs.extend(scene_outputs(names, index))
        return [write_dataset(ds, store, group="stats", region=region, compute=False)]

    def finish(_: list[Any]) -> None:
        _set_binned(store, index, 1)
        record_step(store, "bin", scene_id, record, outputs=outputs)

    return SceneJob(scene_id, f"bin scene {scene_id}", build, finish)


def _set_binned(store: Path, index: int, value: int) -> None:
    """Flag scene `index` binned (1) or not (0): one chunk of `stats/binned` (one per scene)."""
    zarr.open_array(str(store / "stats" / "binned"), mode="r+")[index] = value
