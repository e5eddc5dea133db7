"""Tiles with a halo: geometry, the per-tile kernel (mask, engine, regions) and the pieces
of a tile result that the stitching and the final assembly need."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import numpy as np

from mbcube.unwrap.engine import run_engine
from mbcube.unwrap.masks import check_inputs, region_labels, valid_mask

#: Resolution of the stable-ground histograms used by the tie: bins of 1/TIE_BINS_PER_CYCLE cycle.
TIE_BINS_PER_CYCLE = 64


@dataclass(frozen=True)
class Tile:
    """One tile: its core (the pixels it outputs) and its window (core plus halo), as
    half-open global pixel ranges; row/col is its position in the tile grid."""

    row: int
    col: int
    core_rows: tuple[int, int]
    core_cols: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def window(self) -> tuple[slice, slice]:
        return slice(*self.rows), slice(*self.cols)

    @property
    def core_in_window(self) -> tuple[slice, slice]:
        """The core as slices of the window's arrays."""
        r0, c0 = self.rows[0], self.cols[0]
        return (
            slice(self.core_rows[0] - r0, self.core_rows[1] - r0),
            slice(self.core_cols[0] - c0, self.core_cols[1] - c0),
        )

    @property
    def core_shape(self) -> tuple[int, int]:
        return self.core_rows[1] - self.core_rows[0], self.core_cols[1] - self.core_cols[0]

    def where(self) -> str:
        return (
            f"tile (row {self.row}, col {self.col}), pixels rows {self.rows[0]}:{self.rows[1]} "
            f"cols {self.cols[0]}:{self.cols[1]}"
        )


def tile_layout(
    row_chunks: tuple[int, ...], col_chunks: tuple[int, ...], halo_px: int
) -> list[list[Tile]]:
    """Tiles whose cores are the given chunks (px) and whose windows add `halo_px` on every side
    (clipped at the scene's edge)."""
    ny, nx = sum(row_chunks), sum(col_chunks)
    row_edges = [0, *accumulate(row_chunks)]
    col_edges = [0, *accumulate(col_chunks)]
    grid = []
    for i in range(len(row_chunks)):
        r0, r1 = row_edges[i], row_edges[i + 1]
        line = []
        for j in range(len(col_chunks)):
            c0, c1 = col_edges[j], col_edges[j + 1]
            line.append(
                Tile(
                    i,
                    j,
                    (r0, r1),
                    (c0, c1),
                    (max(0, r0 - halo_px), min(ny, r1 + halo_px)),
                    (max(0, c0 - halo_px), min(nx, c1 + halo_px)),
                )
            )
        grid.append(line)
    return grid


def overlapping_pairs(tiles: list[Tile]) -> list[tuple[int, int]]:
    """Index pairs (a < b) of tiles whose windows share pixels (neighbours, diagonals, and more
    when the halo is wider than a tile)."""
    pairs = []
    for a, ta in enumerate(tiles):
        for b in range(a + 1, len(tiles)):
            tb = tiles[b]
            if (
                ta.rows[0] < tb.rows[1]
                and tb.rows[0] < ta.rows[1]
                and ta.cols[0] < tb.cols[1]
                and tb.cols[0] < ta.cols[1]
            ):
                pairs.append((a, b))
    return pairs


@dataclass
class TileResult:
    """A tile unwrapped on its window: phase (rad, NaN where not valid) and region labels
    (int32, 0 = not valid, 1..n_regions: 4-connected regions of the valid mask)."""

    tile: Tile
    phase_rad: np.ndarray
    labels: np.ndarray
    n_regions: int
    n_in_scene: int  # core pixels with finite wrapped phase
    engine_called: bool
    #: unwrapped again in this round (False: the previous round's result, passed through)
    changed: bool = True


@dataclass
class TileSummary:
    """What the global solve needs from a tile (small): core pixels per region, and the
    stable-ground histogram per region (region, bin of phase / 2 pi in 1/64 cycle, count)."""

    n_regions: int
    n_in_scene: int
    core_px: np.ndarray  # (n_regions,) int64
    hist_region: np.ndarray  # int32, 0-based region
    hist_bin: np.ndarray  # int64
    hist_count: np.ndarray  # int64


def unwrap_tile(
    tile: Tile,
    phase_rad: np.ndarray,
    coherence: np.ndarray,
    h_amb_m: np.ndarray,
    radar_mask: np.ndarray | None,
    ref_void: np.ndarray | None,
    *,
    nlooks: float,
    coherence_min: float,
    engine: str = "snaphu",
    prior_rad: np.ndarray | None = None,
) -> TileResult:
    """Unwrap one tile window (all arrays are the window's). A window without valid pixels is
    not sent to the engine. With `prior_rad` (the phase of a prior dh, rad), the engine
    unwraps the wrapped residual phase - prior and the prior is added back: the result is
    still congruent to the phase modulo 2 pi, and jumps the prior predicts (a glacier tongue
    thinning by more than h_amb / 2 at its outline) are no longer in what the engine sees."""
    check_inputs(phase_rad, coherence, h_amb_m)
    valid = valid_mask(phase_rad, coherence, h_amb_m, radar_mask, ref_void, coherence_min)
    core = tile.core_in_window
    n_in_scene = int(np.count_nonzero(np.isfinite(phase_rad[core])))
    labels, n = region_labels(valid)
    if n == 0:
        return TileResult(
            tile, np.full(valid.shape, np.nan, np.float32), labels, 0, n_in_scene, False
        )
    if prior_rad is None:
        unw = run_engine(engine, phase_rad, coherence, valid, nlooks)
    else:
        residual = np.angle(np.exp(1j * (np.where(valid, phase_rad, 0.0) - prior_rad)))
        unw = run_engine(engine, residual, coherence, valid, nlooks) + prior_rad
    unw = np.where(valid, unw, np.nan).astype(np.float32)
    return TileResult(tile, unw, labels, n, n_in_scene, True)


def summarize(result: TileResult, stable: np.ndarray | None) -> TileSummary:
    """Core pixel counts per region and the per-region histogram of phase / 2 pi (cycles) on
    stable core pixels (`stable` is the window's stable-ground flag, 1 = stable)."""
    core = result.tile.core_in_window
    labels = result.labels[core]
    n = result.n_regions
    core_px = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int64)
    empty = np.zeros(0, np.int64)
    if stable is None or n == 0:
        return TileSummary(n, result.n_in_scene, core_px, empty.astype(np.int32), empty, empty)
    pick = (labels > 0) & (stable[core] == 1)
    region = labels[pick].astype(np.int64) - 1
    bins = np.floor(result.phase_rad[core][pick] / (2 * np.pi) * TIE_BINS_PER_CYCLE).astype(
        np.int64
    )
    if region.size == 0:
        return TileSummary(n, result.n_in_scene, core_px, empty.astype(np.int32), empty, empty)
    lo = bins.min()
    width = int(bins.max() - lo) + 1
    keys, counts = np.unique(region * width + (bins - lo), return_counts=True)
    return TileSummary(
        n,
        result.n_in_scene,
        core_px,
        (keys // width).astype(np.int32),
        keys % width + lo,
        counts.astype(np.int64),
    )
