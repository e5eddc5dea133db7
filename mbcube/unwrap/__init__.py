"""Interferometric processing: unwrap scenes tile by tile (minimum-cost flow), stitch the tiles
by integer cycles, tie the components to stable ground, and turn phase into dh.

`unwrap_scene` builds the lazy result for one scene's arrays; `mbcube.unwrap.step.unwrap_cube`
runs it on a cube. The kernels (`unwrap_tile`, `edge_stats`, `solve_offsets`, `tie_cycles`) work
on numpy arrays.
"""

from mbcube.unwrap.engine import ENGINES, EngineName, run_engine
from mbcube.unwrap.errors import TileUnwrapError, UnwrapInputError
from mbcube.unwrap.masks import check_inputs, region_labels, valid_mask
from mbcube.unwrap.scene import (
    QUALITY_VARIABLES,
    SceneSolution,
    UnwrappedScene,
    finish_tile,
    solve_scene,
    unwrap_numpy,
    unwrap_scene,
)
from mbcube.unwrap.stitch import EdgeStats, Stitched, edge_stats, solve_offsets
from mbcube.unwrap.tie import tie_cycles
from mbcube.unwrap.tiles import Tile, TileResult, TileSummary, summarize, tile_layout, unwrap_tile

__all__ = [
    "ENGINES",
    "QUALITY_VARIABLES",
    "EdgeStats",
    "EngineName",
    "SceneSolution",
    "Stitched",
    "Tile",
    "TileResult",
    "TileSummary",
    "TileUnwrapError",
    "UnwrapInputError",
    "UnwrappedScene",
    "check_inputs",
    "edge_stats",
    "finish_tile",
    "region_labels",
    "run_engine",
    "solve_offsets",
    "solve_scene",
    "summarize",
    "tie_cycles",
    "tile_layout",
    "unwrap_numpy",
    "unwrap_scene",
    "unwrap_tile",
    "valid_mask",
]
