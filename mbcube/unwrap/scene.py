"""Unwrap one scene lazily: tiles with a halo as Dask tasks (each unwrapped exactly once),
stitched by integer cycles over the tile-region graph, tied to stable ground, turned into dh.

Graph per scene (nothing is computed while it is built):

    tile (i, j) --unwrap_tile--> TileResult --summarize--> TileSummary --.
                      \\--edge_stats with each overlapping tile--> EdgeStats --> solve_scene
    TileResult + solution + h_amb core --finish_tile--> phase_unw_rad, component, dh_raw_m (core)

Tile results stay where they were computed until `finish_tile` consumes them; only the small
summaries, edge statistics and the solution travel. Memory per worker is bounded by the tile
window: the engine needs ~100 bytes/px, a kept tile result 8 bytes/px.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize

from mbcube.config import UnwrapConfig
from mbcube.unwrap.errors import TileUnwrapError, UnwrapInputError
from mbcube.unwrap.profiles import ProfileHistogram
from mbcube.unwrap.repair import (
    GLACIER_VARIABLES,
    RoundPlan,
    edge_again,
    glacier_flags,
    plan_round,
    repair_tile,
    summarize_again,
    tile_histogram,
    user_prior_rad,
)
from mbcube.unwrap.stitch import EdgeStats, edge_stats, solve_offsets
from mbcube.unwrap.tie import tie_cycles
from mbcube.unwrap.tiles import (
    TIE_BINS_PER_CYCLE,
    Tile,
    TileResult,
    TileSummary,
    overlapping_pairs,
    summarize,
    tile_layout,
    unwrap_tile,
)

QUALITY_VARIABLES: dict[str, tuple[str, str]] = {
    "unwrap_valid_frac": ("float32", "fraction of the scene's pixels unwrapped"),
    "unwrap_n_components": ("int32", "number of stitched components"),
    "unwrap_tied_frac": (
        "float32",
        "fraction of unwrapped pixels in components tied to stable ground",
    ),
    "unwrap_untied_px": ("int64", "unwrapped pixels in untied components (dh_raw_m is NaN there)"),
    "unwrap_loop_misfits": ("int32", "stitching loops whose cycle offsets do not close"),
    "unwrap_edge_agreement": (
        "float32",
        "fraction of shared tile-overlap pixels agreeing with their edge's cycle offset (NaN: one tile)",
    ),
}


@dataclass
class SceneSolution:
    """Per tile (flattened tile order) and region: the shift in cycles to add, the component id
    (1..N by decreasing size) and whether it is tied; and the scene's quality numbers."""

    shift_cycles: list[np.ndarray]
    component: list[np.ndarray]
    tied: list[np.ndarray]
    quality: dict[str, float]


def solve_scene(
    summaries: list[TileSummary],
    pairs: list[tuple[int, int]],
    edges: list[EdgeStats],
    *,
    min_stable_px_to_tie: int,
    min_edge_px: int,
    min_edge_agreement: float,
    min_component_px: int,
) -> SceneSolution:
    """Stitch (max spanning forest over the tile-region graph), number the components of at
    least min_component_px pixels (1..N by decreasing size; smaller ones get 0), tie them."""
    n_regions = np.array([s.n_regions for s in summaries], np.int64)
    base = np.concatenate(([0], np.cumsum(n_regions)))
    n_nodes = int(base[-1])

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    node_a = cat([base[a] + e.region_a for (a, _), e in zip(pairs, edges, strict=True)])
    node_b = cat([base[b] + e.region_b for (_, b), e in zip(pairs, edges, strict=True)])
    stitched = solve_offsets(
        n_nodes,
        node_a,
        node_b,
        cat([e.d_cycles for e in edges]),
        cat([e.n_agree for e in edges]),
        cat([e.n_shared for e in edges]),
        min_edge_px=min_edge_px,
        min_edge_agreement=min_edge_agreement,
    )
    k, tied, _ = tie_cycles(
        stitched.root,
        stitched.offset_cycles,
        cat([base[t] + s.hist_region for t, s in enumerate(summaries)]),
        cat([s.hist_bin for s in summaries]),
        cat([s.hist_count for s in summaries]),
        bins_per_cycle=TIE_BINS_PER_CYCLE,
        min_stable_px_to_tie=min_stable_px_to_tie,
    )
    shift = stitched.offset_cycles - k
    core_px = cat([s.core_px for s in summaries])
    px_of_root = np.bincount(stitched.root, weights=core_px, minlength=n_nodes)
    roots = np.flatnonzero(px_of_root >= max(1, min_component_px))
    ranked = roots[np.lexsort((roots, -px_of_root[roots]))]
    comp_of_root = np.zeros(n_nodes, np.int32)
    comp_of_root[ranked] = np.arange(1, ranked.size + 1, dtype=np.int32)
    component = comp_of_root[stitched.root] if n_nodes else np.zeros(0, np.int32)
    tied &= component > 0

    unwrapped = int(core_px[component > 0].sum()) if n_nodes else 0
    in_scene = sum(s.n_in_scene for s in summaries)
    tied_px = int(core_px[tied].sum()) if n_nodes else 0
    quality = {
        "unwrap_valid_frac": unwrapped / in_scene if in_scene else float("nan"),
        "unwrap_n_components": int(ranked.size),
        "unwrap_tied_frac": tied_px / unwrapped if unwrapped else float("nan"),
        "unwrap_untied_px": unwrapped - tied_px,
        "unwrap_loop_misfits": stitched.loop_misfits,
        "unwrap_edge_agreement": (
            stitched.n_agree_total / stitched.n_shared_total
            if stitched.n_shared_total
            else float("nan")
        ),
    }

    def per_tile(values: np.ndarray) -> list[np.ndarray]:
        return [values[base[t] : base[t + 1]] for t in range(len(summaries))]

    return SceneSolution(per_tile(shift), per_tile(component), per_tile(tied), quality)


def finish_tile(
    result: TileResult, solution: SceneSolution, index: int, h_amb_m: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tile's core: stitched, tied phase (rad, NaN = not unwrapped), component (0 = not
    unwrapped) and dh = phase * h_amb / 2 pi (m; NaN also in untied components)."""
    core = result.tile.core_in_window
    labels = result.labels[core]
    shape = labels.shape
    if result.n_regions == 0:
        return (
            np.full(shape, np.nan, np.float32),
            np.zeros(shape, np.int32),
            np.full(shape, np.nan, np.float32),
        )
    node = np.where(labels > 0, labels - 1, 0)
    component = np.where(labels > 0, solution.component[index][node], 0).astype(np.int32)
    valid = component > 0
    shift = solution.shift_cycles[index][node]
    phase = np.where(valid, result.phase_rad[core] + 2 * np.pi * shift, np.nan)
    tied = valid & solution.tied[index][node]
    dh = np.where(tied, phase * h_amb_m / (2 * np.pi), np.nan)
    return phase.astype(np.float32), component, dh.astype(np.float32)


# ---------------------------------------------------------------- the lazy graph


@dataclass
class UnwrappedScene:
    """Lazy results of `unwrap_scene`: (y, x) dask arrays chunked like the input, and the
    quality numbers as 0-d dask arrays (see QUALITY_VARIABLES)."""

    phase_unw_rad: da.Array
    component: da.Array
    dh_raw_m: da.Array
    quality: dict[str, da.Array]
    #: per glacier (G,) arrays of `GLACIER_VARIABLES` (empty without glacier_id)
    glacier_flags: dict[str, da.Array]


ArrayLike = Any  # numpy or dask array


def _tile_task(
    scene_id: str,
    tile: Tile,
    phase_rad: np.ndarray,
    coherence: np.ndarray,
    h_amb_m: np.ndarray,
    radar_mask: np.ndarray | None,
    ref_void: np.ndarray | None,
    nlooks: float,
    coherence_min: float,
    engine: str,
    prior_rad: np.ndarray | None,
) -> TileResult:
    try:
        return unwrap_tile(
            tile,
            phase_rad,
            coherence,
            h_amb_m,
            radar_mask,
            ref_void,
            nlooks=nlooks,
            coherence_min=coherence_min,
            engine=engine,
            prior_rad=prior_rad,
        )
    except UnwrapInputError as err:
        raise UnwrapInputError(f"unwrap scene {scene_id}, {tile.where()}: {err}") from err
    except Exception as err:
        raise TileUnwrapError(
            f"unwrap scene {scene_id}, {tile.where()}: {type(err).__name__}: {err}"
        ) from err


def _as_dask(x: ArrayLike, chunks: Any) -> da.Array:
    return (
        x.rechunk(chunks)
        if isinstance(x, da.Array)
        else da.from_array(np.asarray(x), chunks=chunks)
    )


def unwrap_scene(
    phase_rad: ArrayLike,
    coherence: ArrayLike,
    h_amb_m: ArrayLike | float,
    radar_mask: ArrayLike | None = None,
    stable: ArrayLike | None = None,
    ref_void: ArrayLike | None = None,
    *,
    glacier_id: ArrayLike | None = None,
    elevation_m: ArrayLike | None = None,
    prior_dh_m: ArrayLike | None = None,
    n_glaciers: int | None = None,
    config: UnwrapConfig | None = None,
    nlooks: float | None = None,
    tile_px: int | None = None,
    scene_id: str = "scene",
) -> UnwrappedScene:
    """Unwrap a scene's wrapped phase (rad) into stitched, tied phase, component id and dh (m).

    Inputs are (y, x) numpy or dask arrays: coherence (0-1), h_amb_m (m; a number or per
    pixel), radar_mask (1 = layover/shadow), stable (1 = stable ground, for the tie), ref_void
    (1 = reference DEM void). Tiles are the chunks of `phase_rad` (or `tile_px` squares, for
    numpy input); config.mode "whole" unwraps the scene as one block, "tiled" tile by tile with
    config.halo_px of overlap, "auto" tiles scenes above config.whole_scene_max_px pixels.
    nlooks: the scene's number of looks (default config.nlooks).

    Glaciers: with glacier_id (int, 0 = off-glacier, 1..n_glaciers) and elevation_m (the
    reference DEM, m), each glacier's profile finds cycle slips and, with config.repair "data",
    unwraps the tiles of slipped glaciers again with their profile as prior
    (`mbcube.unwrap.repair`); the result holds per-glacier flags. prior_dh_m: a user's prior dh
    (m, NaN where unknown), removed before every unwrapping and added back after.
    Nothing is computed here.
    """
    config = config or UnwrapConfig()
    looks = float(nlooks if nlooks is not None and np.isfinite(nlooks) else config.nlooks)
    if isinstance(phase_rad, da.Array):
        chunks = phase_rad.chunks if tile_px is None else (tile_px, tile_px)
    else:
        chunks = (tile_px, tile_px) if tile_px else np.shape(phase_rad)
    phase = _as_dask(phase_rad, chunks)
    shape = phase.shape
    if len(shape) != 2:
        raise ValueError(f"unwrap_scene takes (y, x) arrays, got shape {shape}")
    chunks = phase.chunks
    h_amb = (
        da.full(shape, float(h_amb_m), dtype=np.float32, chunks=chunks)
        if np.ndim(h_amb_m) == 0
        else _as_dask(h_amb_m, chunks)
    )
    optional = {
        "radar_mask": radar_mask,
        "stable": stable,
        "ref_void": ref_void,
        "glacier_id": glacier_id,
        "elevation": elevation_m,
        "prior_dh": prior_dh_m,
    }
    layers: dict[str, da.Array | None] = {
        "coherence": _as_dask(coherence, chunks),
        "h_amb": h_amb,
        **{k: None if v is None else _as_dask(v, chunks) for k, v in optional.items()},
    }
    for name, layer in layers.items():
        if layer is not None and layer.shape != shape:
            raise ValueError(f"{name} has shape {layer.shape}, phase_rad {shape}")
    glaciers = layers["glacier_id"] is not None and layers["elevation"] is not None
    if glaciers and n_glaciers is None:
        raise ValueError("unwrap_scene: give n_glaciers with glacier_id")
    user_prior = (
        None
        if layers["prior_dh"] is None
        else da.map_blocks(user_prior_rad, layers["prior_dh"], h_amb, dtype=np.float64)
    )
    mode = config.mode
    if mode == "auto":
        mode = "whole" if shape[0] * shape[1] <= config.whole_scene_max_px else "tiled"
    tile_chunks = (shape[:1], shape[1:]) if mode == "whole" else chunks
    grid = tile_layout(tuple(tile_chunks[0]), tuple(tile_chunks[1]), config.halo_px)
    tiles = [t for line in grid for t in line]
    token = tokenize(
        phase.name,
        *(None if v is None else v.name for v in layers.values()),
        config.model_dump(),
        looks,
        mode,
        scene_id,
        n_glaciers,
    )

    def cut(layer: da.Array | None, w: tuple[slice, slice]) -> da.Array | None:
        return None if layer is None else layer[w]

    def window_inputs(tile: Tile) -> list[Any]:
        w = tile.window
        return [
            phase[w],
            cut(layers["coherence"], w),
            cut(layers["h_amb"], w),
            cut(layers["radar_mask"], w),
            cut(layers["ref_void"], w),
        ]

    results, summaries = [], []
    for t, tile in enumerate(tiles):
        result = dask.delayed(_tile_task, pure=True)(
            scene_id,
            tile,
            *window_inputs(tile),
            looks,
            config.coherence_min,
            config.engine,
            cut(user_prior, tile.window),
            dask_key_name=f"unwrap-tile-{token}-{t}",
        )
        results.append(result)
        summaries.append(
            dask.delayed(summarize, pure=True)(
                result,
                cut(layers["stable"], tile.window),
                dask_key_name=f"unwrap-summary-{token}-{t}",
            )
        )
    pairs = overlapping_pairs(tiles)
    edges = [
        dask.delayed(edge_stats, pure=True)(
            results[a], results[b], dask_key_name=f"unwrap-edge-{token}-{a}-{b}"
        )
        for a, b in pairs
    ]
    solve = {
        "min_stable_px_to_tie": config.min_stable_px_to_tie,
        "min_edge_px": config.min_edge_px,
        "min_edge_agreement": config.min_edge_agreement,
        "min_component_px": config.min_component_px,
    }
    solution = dask.delayed(solve_scene, pure=True)(
        summaries, pairs, edges, **solve, dask_key_name=f"unwrap-solve-{token}"
    )
    flags: dict[str, da.Array] = {}
    gid, elevation = layers["glacier_id"], layers["elevation"]
    if gid is not None and elevation is not None and n_glaciers is not None:
        cores = [(slice(*t.core_rows), slice(*t.core_cols)) for t in tiles]
        limits = (config.alias_min_px, config.alias_min_frac)

        def plan(solution: Any, previous: Any, name: str) -> Any:
            hists = [
                dask.delayed(_tile_histogram, pure=True)(
                    previous,
                    results[t],
                    solution,
                    t,
                    gid[cores[t]],
                    elevation[cores[t]],
                    config.profile_bin_m,
                    dask_key_name=f"unwrap-hist{name}-{token}-{t}",
                )
                for t in range(len(tiles))
            ]
            return dask.delayed(plan_round, pure=True)(
                hists, previous, *limits, dask_key_name=f"unwrap-plan{name}-{token}"
            )

        first = current = plan(solution, None, "0")
        rounds = config.repair_rounds if config.repair == "data" else 0
        for r in range(1, rounds + 1):
            results = [
                dask.delayed(repair_tile, pure=True)(
                    results[t],
                    current,
                    tile,
                    *window_inputs(tile),
                    gid[tile.window],
                    elevation[tile.window],
                    cut(user_prior, tile.window),
                    bin_m=config.profile_bin_m,
                    nlooks=looks,
                    coherence_min=config.coherence_min,
                    engine=config.engine,
                    dask_key_name=f"unwrap-tile{r}-{token}-{t}",
                )
                for t, tile in enumerate(tiles)
            ]
            summaries = [
                dask.delayed(summarize_again, pure=True)(
                    results[t],
                    summaries[t],
                    cut(layers["stable"], tile.window),
                    dask_key_name=f"unwrap-summary{r}-{token}-{t}",
                )
                for t, tile in enumerate(tiles)
            ]
            edges = [
                dask.delayed(edge_again, pure=True)(
                    results[a], results[b], edges[i], dask_key_name=f"unwrap-edge{r}-{token}-{i}"
                )
                for i, (a, b) in enumerate(pairs)
            ]
            solution = dask.delayed(_solve_again, pure=True)(
                current,
                solution,
                summaries,
                pairs,
                edges,
                solve,
                dask_key_name=f"unwrap-solve{r}-{token}",
            )
            current = plan(solution, current, str(r))
        covered = (
            da.zeros(0, dtype=np.int64)
            if user_prior is None
            else da.unique(da.where(da.isfinite(layers["prior_dh"]), gid, 0))
        )
        result_flags = dask.delayed(_flags, pure=True)(
            first, current, covered, n_glaciers, *limits, dask_key_name=f"unwrap-flags-{token}"
        )
        flags = {
            name: da.from_delayed(
                dask.delayed(operator.getitem, pure=True)(result_flags, name),
                (n_glaciers,),
                dtype=np.dtype(dtype),
            )
            for name, (dtype, _) in GLACIER_VARIABLES.items()
            if name != "unwrap_h_amb_m"
        }
        flags["unwrap_h_amb_m"] = _glacier_means(gid, h_amb, n_glaciers)
    blocks: list[list[list[Any]]] = [[[None] * len(grid[0]) for _ in grid] for _ in range(3)]
    for t, tile in enumerate(tiles):
        core = slice(*tile.core_rows), slice(*tile.core_cols)
        done = dask.delayed(finish_tile, pure=True, nout=3)(
            results[t], solution, t, h_amb[core], dask_key_name=f"unwrap-finish-{token}-{t}"
        )
        for k, dtype in enumerate((np.float32, np.int32, np.float32)):
            blocks[k][tile.row][tile.col] = da.from_delayed(done[k], tile.core_shape, dtype=dtype)
    arrays = [da.block(rows).rechunk(chunks) for rows in blocks]
    quality = {
        name: da.from_delayed(
            dask.delayed(_quality_value, pure=True)(solution, name, dtype),
            (),
            dtype=np.dtype(dtype),
        )
        for name, (dtype, _) in QUALITY_VARIABLES.items()
    }
    return UnwrappedScene(arrays[0], arrays[1], arrays[2], quality, flags)


def _glacier_means(gid: da.Array, values: da.Array, n_glaciers: int) -> da.Array:
    """(G,) mean of `values` over each glacier's pixels where finite (NaN: none), float32."""
    ids = gid.ravel().astype(np.int64)
    v = values.ravel().astype(np.float64)
    finite = da.isfinite(v)
    total = da.bincount(ids, weights=da.where(finite, v, 0.0), minlength=n_glaciers + 1)
    count = da.bincount(ids, weights=finite.astype(np.float64), minlength=n_glaciers + 1)
    return (total[1:] / da.where(count[1:] > 0, count[1:], np.nan)).astype(np.float32)


def _tile_histogram(
    previous: RoundPlan | None,
    result: TileResult,
    solution: SceneSolution,
    index: int,
    glacier_id: np.ndarray,
    elevation_m: np.ndarray,
    bin_m: float,
) -> ProfileHistogram:
    """The tile's profile histogram; nothing when the previous round repaired nothing (the
    scene is as it was: `plan_round` keeps the previous profiles)."""
    if previous is not None and previous.repair.size == 0:
        return ProfileHistogram.empty()
    return tile_histogram(
        result, solution.shift_cycles[index], solution.tied[index], glacier_id, elevation_m, bin_m
    )


def _solve_again(
    plan: RoundPlan,
    previous: SceneSolution,
    summaries: list[TileSummary],
    pairs: list[tuple[int, int]],
    edges: list[EdgeStats],
    solve: dict[str, Any],
) -> SceneSolution:
    """The scene stitched and tied again, or the previous solution when the round changed no
    tile."""
    if plan.repair.size == 0:
        return previous
    return solve_scene(summaries, pairs, edges, **solve)


def _flags(
    first: RoundPlan,
    final: RoundPlan,
    covered: np.ndarray,
    n_glaciers: int,
    min_px: int,
    min_frac: float,
) -> dict[str, np.ndarray]:
    return glacier_flags(first, final, covered[covered > 0], n_glaciers, min_px, min_frac)


def _quality_value(solution: SceneSolution, name: str, dtype: str) -> np.ndarray:
    return np.asarray(solution.quality[name], dtype=dtype)


def unwrap_numpy(
    phase_rad: np.ndarray,
    coherence: np.ndarray,
    h_amb_m: np.ndarray | float,
    radar_mask: np.ndarray | None = None,
    stable: np.ndarray | None = None,
    ref_void: np.ndarray | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """`unwrap_scene` computed at once (dask's synchronous scheduler): phase_unw_rad,
    component, dh_raw_m and the quality numbers (floats), with the per-glacier flags ((G,)
    arrays) when glacier_id is given. For tests and small arrays."""
    out = unwrap_scene(phase_rad, coherence, h_amb_m, radar_mask, stable, ref_void, **kwargs)
    phase, comp, dh, quality, flags = dask.compute(
        out.phase_unw_rad,
        out.component,
        out.dh_raw_m,
        out.quality,
        out.glacier_flags,
        scheduler="sync",
    )
    return phase, comp, dh, {**{k: v.item() for k, v in quality.items()}, **flags}
