"""The corrections step on the cube: dh_raw (insar) or co-registered DEM minus reference (dem)
-> datum, ramp, penetration, seasonal offset and outliers removed -> `dh_m` and `valid`, with
every per-scene parameter written beside them.

Per scene, one Dask graph over the tiles: the input blocks are read once and kept by the scheduler
while the small global reductions (robust quantiles and histograms, normal equations, per-group
moments) chain through delayed solves; then each corrected tile is written. The penetration table
is a static reduction, computed once per parameter set and stored in the group `penetration`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask._task_spec import DataNode, Task, TaskRef
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph

from mbcube import store as st
from mbcube.cluster import SceneJob, compute, compute_scenes
from mbcube.config import CorrectionsConfig
from mbcube.corrections import coregister, kernels, outliers, penetration, ramp, robust
from mbcube.corrections.bins import ELEV_MIN_M, bin_index, n_bins
from mbcube.corrections.datum import datum_from_histogram
from mbcube.corrections.errors import CorrectionsError
from mbcube.corrections.seasonal import seasonal_offset_m

STEP = "correct"
TABLE_ID = "_penetration_table"
#: The store group of the penetration table.
TABLE_GROUP = "penetration"


def _run(where: str, func: Callable[..., Any], *args: Any) -> Any:
    """func(*args), re-raising any error with the scene and tile it happened in (the file
    system's own errors, e.g. a full disk, pass unchanged: they name their file)."""
    try:
        return func(*args)
    except (CorrectionsError, OSError):
        raise
    except Exception as err:
        raise CorrectionsError(f"corrections, {where}: {type(err).__name__}: {err}") from err


#: Co-registration stops iterating once the shift moves by less than this (px).
COREG_TOLERANCE_PX = 0.01


def _task(where: str, func: Callable[..., Any], *args: Any) -> Delayed:
    # pure=False: keys without tokenizing the arguments (graph building stays cheap)
    return dask.delayed(_run, pure=False)(where, func, *args)


def _sum(*parts: np.ndarray) -> np.ndarray:
    return np.sum(np.stack(parts), axis=0)


def _tree_sum(parts: list[Delayed], fan_in: int = 8) -> Delayed:
    """Sum of the delayed arrays, as a tree of `fan_in`-way sums (bounded task memory)."""
    return _tree(parts, _sum, fan_in)


def _tree(parts: list[Delayed], merge: Callable[..., Any], fan_in: int = 8) -> Delayed:
    """merge(*parts) as a tree of `fan_in`-way merges (bounded task memory)."""
    while len(parts) > 1:
        parts = [
            dask.delayed(merge, pure=False)(*parts[i : i + fan_in])
            for i in range(0, len(parts), fan_in)
        ]
    return parts[0]


# ------------------------------------------------------------------------------ tile kernels
# Each runs one fused kernel (mbcube.corrections.kernels) over a tile. A tile's dh is kept as
# DhTile = (dh (m), quantile row of its stable-ground values) between the passes.

DhTile = tuple[np.ndarray, np.ndarray]


def _dem_q(
    dem_h: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    stable: np.ndarray,
    shift_m: np.ndarray,
    halo: int,
    res_m: float,
) -> np.ndarray:
    """Quantile row of the stable-ground dh of a DEM tile at p + shift."""
    _, values = kernels.dem_dh(
        dem_h, ref, void, stable, halo, kernels.shift_weights(shift_m, res_m, halo), False
    )
    return kernels.quantile_row(values)


def _dem_dh(
    dem_h: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    stable: np.ndarray,
    shift_m: np.ndarray,
    halo: int,
    res_m: float,
) -> DhTile:
    dh, values = kernels.dem_dh(
        dem_h, ref, void, stable, halo, kernels.shift_weights(shift_m, res_m, halo)
    )
    return dh, kernels.quantile_row(values)


def _insar_dh(
    raw: np.ndarray,
    ref: np.ndarray,
    void: np.ndarray,
    radar: np.ndarray,
    coh: np.ndarray,
    stable: np.ndarray,
    coherence_min: float,
) -> DhTile:
    raw, radar, coh = (a[0] if a.ndim == 3 else a for a in (raw, radar, coh))  # scene blocks
    dh, values = kernels.insar_dh(raw, ref, void, radar, coh, stable, coherence_min)
    return dh, kernels.quantile_row(values)


def _coreg_ne(
    dem_h: np.ndarray,
    ref_h: np.ndarray,
    void: np.ndarray,
    stable: np.ndarray,
    shift_m: np.ndarray,
    stats: tuple[float, float, float],
    halo: int,
    res_m: float,
    converged: bool = False,
    previous: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    quantiles: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tile's co-registration normal equations and the quantile row of its stable-ground
    dh, which seeds the next iteration's clip (NaN quantiles when `quantiles` is False: the
    last iteration has no next one)."""
    if converged and previous is not None:  # the shift stopped moving: this pass is skipped
        return previous
    sw = kernels.shift_weights(shift_m, res_m, halo)
    ata, atb, values = kernels.coreg_pass(
        dem_h, ref_h, void, stable, halo, sw, res_m, stats[0], stats[1]
    )
    if not quantiles:
        return ata, atb, np.array([float(values.size), np.nan, np.nan, np.nan])
    return ata, atb, kernels.quantile_row(values)


def _ramp_ne(
    dhq: DhTile,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    stats: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray]:
    return kernels.ramp_normal_equations(dhq[0], stable, xk, yk, model, stats[0], stats[1])


def _resid_hist(
    dhq: DhTile,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    hrange: tuple[float, float],
) -> np.ndarray:
    return kernels.residual_histogram(
        dhq[0], stable, xk, yk, model, hrange[0], hrange[1], robust.N_HIST_BINS
    )


def _resid_clipped(
    dhq: DhTile,
    stable: np.ndarray,
    xk: np.ndarray,
    yk: np.ndarray,
    model: np.ndarray,
    centre_half: tuple[float, float],
) -> np.ndarray:
    return kernels.residual_clipped_sum(
        dhq[0], stable, xk, yk, model, centre_half[0], centre_half[1]
    )


def _corr_groups(
    dhq: DhTile,
    xk: np.ndarray,
    yk: np.ndarray,
    params: dict[str, Any],
    pen: penetration.Table,
    region: np.ndarray,
    surface: np.ndarray,
    ref: np.ndarray,
    glacier: np.ndarray,
    width: float,
) -> kernels.CorrectedTile:
    """dh - datum - ramp, then on glacier pixels - penetration - seasonal (m), as float32, with
    each pixel's outlier group (per glacier, surface and bin on glaciers, per region, surface
    and bin elsewhere) and the groups' moments; made once, kept for the outlier passes."""
    tilt = params["ramp_coef"].copy()
    tilt[0] = 0.0
    dh = dhq[0]
    if pen.glacier_offset_m is not None:  # 'xband_glacier': each glacier's own refinement
        dh = dh - penetration.glacier_lookup(pen.glacier_offset_m, glacier, surface).astype(
            dh.dtype
        )
    return kernels.corrected_groups(
        dh,
        xk,
        yk,
        tilt,
        params["datum_offset_m"],
        pen.penetration_m,
        float(pen.bin_lo_m[0]),
        pen.width_m,
        params["seasonal_offset_applied_m"],
        region,
        surface,
        ref,
        glacier,
        width,
        n_bins(width),
    )


def _merge_moments(*parts: kernels.CorrectedTile | outliers.Moments) -> outliers.Moments:
    return outliers.merge_moments(
        *(
            outliers.Moments(p.keys, p.n, p.s, p.ss) if isinstance(p, kernels.CorrectedTile) else p
            for p in parts
        )
    )


def _zhist(ct: kernels.CorrectedTile, stats: outliers.GroupStats) -> outliers.SparseCounts:
    mean = outliers.per_group(stats.keys, stats.mean, ct.keys)
    std = outliers.per_group(stats.keys, stats.std, ct.keys)
    return outliers.SparseCounts(*kernels.z_histogram(ct.dh_m, ct.codes, ct.keys, mean, std))


def _final(
    ct: kernels.CorrectedTile, th: outliers.Thresholds
) -> tuple[np.ndarray, np.ndarray, outliers.SparseCounts]:
    lower = outliers.per_group(th.keys, th.lower, ct.keys)
    upper = outliers.per_group(th.keys, th.upper, ct.keys)
    out, ok, rejected = kernels.keep_final(ct.dh_m, ct.codes, lower, upper)
    nz = np.flatnonzero(rejected)
    return out[None], ok[None], outliers.SparseCounts(ct.keys[nz], rejected[nz])


# ------------------------------------------------------------------------- small global steps


def _stats_from_quantiles(
    where: str, clip_nmad: float, min_px: int, *rows: np.ndarray
) -> tuple[float, float, float]:
    centre, scale, n = robust.combine_quantiles(list(rows))
    if n < min_px:
        raise CorrectionsError(
            f"{where}: only {n} valid pixels on stable ground (at least {min_px} needed to tie "
            "the scene's datum and ramp). Check the scene's footprint and masks, or leave it out."
        )
    scale = max(scale, 1e-3)
    return centre, clip_nmad * scale, scale


def _stats_from_hist(
    counts: np.ndarray, hrange: tuple[float, float], clip_nmad: float
) -> tuple[float, float, float]:
    med, nmad = robust.median_nmad(counts, *hrange)
    nmad = max(nmad, 1e-3)
    return med, clip_nmad * nmad, nmad


def _hist_range(
    stats: tuple[float, float, float], centre: float | None = None
) -> tuple[float, float]:
    return robust.hist_range(stats[0] if centre is None else centre, stats[2])


def _centred_range(model: np.ndarray, stats: tuple[float, float, float]) -> tuple[float, float]:
    return robust.hist_range(float(model[0]), stats[2])


def _solve_ramp(ne: tuple[np.ndarray, np.ndarray], order: int) -> np.ndarray:
    return ramp.solve(ne[0], ne[1], order)


def _add_shift(
    shift: np.ndarray,
    ne: tuple[np.ndarray, np.ndarray],
    halo: int,
    res: float,
    where: str,
    converged: bool = False,
) -> np.ndarray:
    if converged:
        return shift
    new = shift + coregister.shift_update_m(*ne)
    if np.max(np.abs(new)) / res + 1 > halo:
        raise CorrectionsError(
            f"{where}: co-registration shift {np.round(new, 2).tolist()} m exceeds the "
            f"{halo - 1} px the blocks can hold; the scene is probably not of this area."
        )
    return new


def _converged(before: np.ndarray, after: np.ndarray, res: float) -> bool:
    """The co-registration shift moved by less than COREG_TOLERANCE_PX in the last iteration."""
    return bool(np.max(np.abs(np.asarray(after) - np.asarray(before))) / res < COREG_TOLERANCE_PX)


def _sum_ne(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)  # type: ignore[return-value]


def _params(
    model: np.ndarray,
    counts: np.ndarray,
    hrange: tuple[float, float],
    clipped: np.ndarray | None,
    estimator: str,
    seasonal_m: float,
    shift_m: np.ndarray,
    n_stable: float,
) -> dict[str, Any]:
    datum = datum_from_histogram(counts, hrange[0], hrange[1], estimator, clipped)  # type: ignore[arg-type]
    _, nmad = robust.median_nmad(counts, *hrange)
    coef = model.copy()
    coef[0] = 0.0  # the constant is the datum, estimated robustly
    return {
        "datum_offset_m": datum,
        "ramp_coef": coef,
        "seasonal_offset_applied_m": seasonal_m,
        "coreg_shift_m": shift_m,
        "stable_nmad_m": nmad,
        "n_stable_px": n_stable,
    }


def _stats_from_ne(
    where: str, clip_nmad: float, min_px: int, *parts: tuple[np.ndarray, ...]
) -> tuple[float, float, float]:
    return _stats_from_quantiles(where, clip_nmad, min_px, *(p[2] for p in parts))


def _rejected_px(rejected: outliers.SparseCounts) -> np.ndarray:
    return np.array([int(rejected.counts.sum())], dtype=np.int64)


# ----------------------------------------------------------------------------- scene graph


@dataclass(frozen=True)
class SceneInputs:
    scene_id: str
    index: int
    kind: str
    month: int


def _haloed(halo: int, *blocks: np.ndarray | None) -> np.ndarray:
    """The centre block of a 3 x 3 neighbourhood (row-major: NW N NE W C E SW S SE; None
    beyond the grid; blocks may carry a leading length-1 scene axis) with a halo of `halo` px
    taken from its neighbours, NaN beyond the grid (or where a neighbour is narrower than
    the halo)."""
    nb = [None if b is None else (b[0] if b.ndim == 3 else b) for b in blocks]
    centre = nb[4]
    if centre is None:
        raise ValueError("the centre block of a halo neighbourhood is missing")
    ny, nx = centre.shape
    h = halo
    out = np.full((ny + 2 * h, nx + 2 * h), np.nan, dtype=np.result_type(centre.dtype, np.float32))
    rows = (slice(0, h), slice(h, h + ny), slice(h + ny, h + ny + h))
    cols = (slice(0, h), slice(h, h + nx), slice(h + nx, h + nx + h))
    for k, b in enumerate(nb):
        if b is None:
            continue
        r, c = divmod(k, 3)
        # the part of the neighbour next to the centre: its last / all / first h rows, cols
        rs = (
            slice(max(b.shape[0] - h, 0), None)
            if r == 0
            else (slice(None) if r == 1 else slice(0, h))
        )
        cs = (
            slice(max(b.shape[1] - h, 0), None)
            if c == 0
            else (slice(None) if c == 1 else slice(0, h))
        )
        part = b[rs, cs]
        tr, tc = rows[r], cols[c]
        # a neighbour narrower than the halo fills the part of the strip next to the centre
        r0 = tr.start if r != 0 else h - part.shape[0]
        c0 = tc.start if c != 0 else h - part.shape[1]
        out[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]] = part
    return out


def _halo_tasks(
    blocks: np.ndarray, halo: int, where: str, make: Callable[..., Any] = _task
) -> np.ndarray:
    """One task per tile building its haloed block from the 3 x 3 neighbourhood of `blocks`
    (an object array of delayed blocks over the tiles), made with make(where, func, *args)."""
    n_i, n_j = blocks.shape
    out = np.empty((n_i, n_j), dtype=object)
    for i in range(n_i):
        for j in range(n_j):
            nine = [
                blocks[i + di, j + dj] if 0 <= i + di < n_i and 0 <= j + dj < n_j else None
                for di in (-1, 0, 1)
                for dj in (-1, 0, 1)
            ]
            out[i, j] = make(f"{where} tile ({i}, {j})", _haloed, halo, *nine)
    return out


@dataclass
class CubeBlocks:
    """The delayed blocks of the cube's layers (object arrays over the tiles), made once per
    run and shared by the scenes' graphs: the static layers, the reference with a halo (for
    the co-registration's gradients), and the scene layers over (scene, tiles)."""

    ds: xr.Dataset
    halo: int
    ref: np.ndarray
    ref_h: np.ndarray
    void: np.ndarray
    stable: np.ndarray
    surface: np.ndarray
    region: np.ndarray
    glacier: np.ndarray
    scene_layers: dict[str, np.ndarray] = field(default_factory=dict)

    def scene_blocks(self, var: str, scene_id: str) -> np.ndarray:
        """The delayed (1, ny, nx) blocks of a scene layer for one scene."""
        if var not in self.scene_layers:
            self.scene_layers[var] = np.asarray(self.ds[var].data.to_delayed())
        pos = int(np.flatnonzero(self.ds.scene.values == scene_id)[0])
        return self.scene_layers[var][pos]


def cube_blocks(ds: xr.Dataset, halo: int) -> CubeBlocks:
    """CubeBlocks of the cube `ds` (open_cube). Nothing is computed."""

    def blocks(arr: da.Array) -> np.ndarray:
        return np.asarray(arr.to_delayed())

    ref = blocks(ds.ref_dem_m.data)
    return CubeBlocks(
        ds,
        halo,
        ref,
        _halo_tasks(ref, halo, "reference halo"),
        blocks(ds.ref_void.data),
        blocks(ds.stable.data),
        blocks(ds.surface.data),
        blocks(ds.region_id.data),
        blocks(ds.glacier_id.data),
    )


#: The static layers (reference, masks, labels, and the haloed reference) are read once and
#: kept in memory across the scenes of a run when they take at most this many bytes (in the
#: threads of the local scheduler, or on the workers of a cluster); larger cubes read them
#: again for each scene, so memory stays bounded by tiles x workers.
STATIC_CACHE_BYTES = 2**30


def static_nbytes(ds: xr.Dataset, halo: int) -> int:
    """Bytes of the static layers a run keeps in memory (CubeBlocks.persist)."""
    names = ("ref_dem_m", "ref_void", "stable", "surface", "region_id", "glacier_id")
    chunks = ds.ref_dem_m.data.chunks
    haloed = sum((a + 2 * halo) * (b + 2 * halo) for a in chunks[0] for b in chunks[1])
    return int(sum(ds[n].nbytes for n in names) + haloed * ds.ref_dem_m.dtype.itemsize)


def persist_static(blocks: CubeBlocks) -> CubeBlocks:
    """`blocks` with its static layers computed and kept in memory (dask.persist: in the local
    scheduler's process, or on a cluster's workers), read once for all scenes."""
    names = ("ref", "ref_h", "void", "stable", "surface", "region", "glacier")
    arrays = [getattr(blocks, n) for n in names]
    flat = dask.persist(*(d for a in arrays for d in a.ravel()))
    kept, k = [], 0
    for a in arrays:
        block = np.empty(a.shape, dtype=object)
        block.ravel()[:] = flat[k : k + a.size]
        kept.append(block)
        k += a.size
    ref, ref_h, void, stable, surface, region, glacier = kept
    return dataclasses.replace(
        blocks,
        ref=ref,
        ref_h=ref_h,
        void=void,
        stable=stable,
        surface=surface,
        region=region,
        glacier=glacier,
    )


class _Graph:
    """A scene's tasks as one graph layer: a dict of dask Task specs keyed (name, n), built
    directly (a dask.delayed call merges the graphs of its arguments into a new layer each
    time: ~0.2 s of the main thread per 4096^2 scene). Delayed arguments (the cube's blocks)
    become references to their keys, and their graphs dependencies of the layer."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.layer: dict[Any, Any] = {}
        self.deps: dict[Any, Any] = {}  # key -> the Delayed it comes from

    def _arg(self, a: Any) -> Any:
        if isinstance(a, Delayed):
            self.deps.setdefault(a.key, a)
            return TaskRef(a.key)
        return a

    def call(self, func: Callable[..., Any], *args: Any) -> TaskRef:
        """func(*args) as a task; TaskRef and Delayed arguments are replaced by their values."""
        key = (self.name, len(self.layer))
        self.layer[key] = Task(key, func, *(self._arg(a) for a in args))
        return TaskRef(key)

    def task(self, where: str, func: Callable[..., Any], *args: Any) -> TaskRef:
        """`call` re-raising errors with `where` (scene and tile) in the text (see _run)."""
        return self.call(_run, where, func, *args)

    def value(self, value: Any) -> TaskRef:
        """A value that several tasks share: in the graph once (one key), not in each task."""
        key = (self.name, len(self.layer))
        self.layer[key] = DataNode(key, value)
        return TaskRef(key)

    def tree(self, parts: list[TaskRef], merge: Callable[..., Any], fan_in: int = 8) -> TaskRef:
        """merge(*parts) as a tree of `fan_in`-way merges (bounded task memory)."""
        while len(parts) > 1:
            parts = [self.call(merge, *parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
        return parts[0]

    def delayed(self, *refs: TaskRef) -> list[Delayed]:
        """Delayed objects of the given tasks, sharing the finished graph (add no task after)."""
        graph = HighLevelGraph.from_collections(
            self.name, self.layer, dependencies=list(self.deps.values())
        )
        return [Delayed(r.key, graph, layer=self.name) for r in refs]


@dataclass(frozen=True)
class _SceneTasks:
    """The reductions of one scene's graph: per tile its corrected tile and outlier groups
    (kernels.CorrectedTile), and the scene's outlier thresholds and parameters."""

    graph: _Graph
    corrected: dict[tuple[int, int], TaskRef]
    thresholds: TaskRef
    params: TaskRef
    chunks: tuple[tuple[int, ...], tuple[int, ...]]
    centre_m: tuple[float, float]


def _tile_slices(chunks: tuple[tuple[int, ...], tuple[int, ...]]) -> dict[tuple[int, int], Any]:
    """(row slice, column slice) of each tile (i, j) on the grid."""
    rows = np.concatenate([[0], np.cumsum(chunks[0])]).astype(int)
    cols = np.concatenate([[0], np.cumsum(chunks[1])]).astype(int)
    return {
        (i, j): (slice(int(rows[i]), int(rows[i + 1])), slice(int(cols[j]), int(cols[j + 1])))
        for i in range(len(chunks[0]))
        for j in range(len(chunks[1]))
    }


def _scene_tasks(
    ds: xr.Dataset,
    scene: SceneInputs,
    config: CorrectionsConfig,
    table: penetration.Table,
    static: CubeBlocks | None,
) -> _SceneTasks:
    """The scene's graph up to its outlier thresholds (see scene_graphs). Nothing is computed."""
    sid = scene.scene_id
    seasonal_m = seasonal_offset_m(scene.month, config.seasonal_offset_m, sid, config.seasonal_sign)
    res = float(abs(ds.x.values[1] - ds.x.values[0]))
    xs, ys = np.asarray(ds.x.values), np.asarray(ds.y.values)
    x0, y0 = _grid_centre(ds)
    xk_all, yk_all = (xs - x0) / 1000.0, (ys - y0) / 1000.0
    k_clip = config.ramp_sigma_clip
    halo = config.coreg_halo_px
    if static is None or static.halo != halo:
        static = cube_blocks(ds, halo)
    chunks = ds.ref_dem_m.data.chunks
    sb = static
    tiles = [(i, j) for i in range(len(chunks[0])) for j in range(len(chunks[1]))]
    g = _Graph(f"correct-{sid}-{uuid.uuid4().hex}")

    def blocks(var: str) -> np.ndarray:
        return sb.scene_blocks(var, sid)

    def where(i: int, j: int) -> str:
        return f"scene {sid} tile ({i}, {j})"

    # Arrays the tile tasks share go into the graph once (a key each), not into every task:
    # an 8192^2 scene's graph was ~10 MiB of repeated coordinates and tables.
    rows = np.concatenate([[0], np.cumsum(chunks[0])])
    cols = np.concatenate([[0], np.cumsum(chunks[1])])
    xk_once = [g.value(xk_all[cols[j] : cols[j + 1]].copy()) for j in range(len(cols) - 1)]
    yk_once = [g.value(yk_all[rows[i] : rows[i + 1]].copy()) for i in range(len(rows) - 1)]
    table_once = g.value(table)

    def xk(j: int) -> TaskRef:
        """The tile column's x coordinates (km from the grid centre), shared by its tasks."""
        return xk_once[j]

    def yk(i: int) -> TaskRef:
        """The tile row's y coordinates (km from the grid centre), shared by its tasks."""
        return yk_once[i]

    shift: Any = np.zeros(2)
    if scene.kind == "dem":
        if "dem_m" not in ds:
            raise CorrectionsError(f"scene {sid} is of kind 'dem' but the cube has no dem_m")
        dem_h = _halo_tasks(blocks("dem_m"), halo, f"scene {sid}", g.task)
        n_iter = config.coreg_iterations if config.coregister_dem_scenes else 0
        if n_iter:
            q = [
                g.task(
                    where(i, j),
                    _dem_q,
                    dem_h[i, j],
                    sb.ref[i, j],
                    sb.void[i, j],
                    sb.stable[i, j],
                    shift,
                    halo,
                    res,
                )
                for i, j in tiles
            ]
            stats = g.call(_stats_from_quantiles, f"scene {sid}", k_clip, config.min_stable_px, *q)
        # Iterations run in one static graph; once the shift stops moving, the later ones
        # return their blocks' previous sums without reading or resampling anything.
        converged: Any = False
        previous: list[Any] = [None] * len(tiles)
        for it in range(n_iter):
            last = it == n_iter - 1
            ne = [
                g.task(
                    where(i, j),
                    _coreg_ne,
                    dem_h[i, j],
                    sb.ref_h[i, j],
                    sb.void[i, j],
                    sb.stable[i, j],
                    shift,
                    stats,
                    halo,
                    res,
                    converged,
                    previous[k],
                    not last,
                )
                for k, (i, j) in enumerate(tiles)
            ]
            before = shift
            shift = g.call(
                _add_shift,
                shift,
                g.call(_sum_ne, *ne),
                halo,
                res,
                f"scene {sid} (co-registration iteration {it + 1})",
                converged,
            )
            converged = g.call(_converged, before, shift, res)
            previous = ne
            if not last:
                stats = g.call(_stats_from_ne, f"scene {sid}", k_clip, config.min_stable_px, *ne)
        dh = {
            (i, j): g.task(
                where(i, j),
                _dem_dh,
                dem_h[i, j],
                sb.ref[i, j],
                sb.void[i, j],
                sb.stable[i, j],
                shift,
                halo,
                res,
            )
            for i, j in tiles
        }
    else:
        if "dh_raw_m" not in ds:
            raise CorrectionsError(
                f"scene {sid}: the cube has no dh_raw_m; run the unwrap step first (`mbcube unwrap`)."
            )
        raw_b, radar_b, coh_b = blocks("dh_raw_m"), blocks("radar_mask"), blocks("coherence")
        dh = {
            (i, j): g.task(
                where(i, j),
                _insar_dh,
                raw_b[i, j],
                sb.ref[i, j],
                sb.void[i, j],
                radar_b[i, j],
                coh_b[i, j],
                sb.stable[i, j],
                config.coherence_min,
            )
            for i, j in tiles
        }

    # ramp (with its constant) by iterated sigma-clipped least squares, then the robust datum
    # only each tile's small quantile row travels to the task (not the dh tiles themselves)
    q_rows = [g.call(operator.getitem, dh[t], 1) for t in tiles]
    stats = g.call(_stats_from_quantiles, f"scene {sid}", k_clip, config.min_stable_px, *q_rows)
    model: Any = np.zeros(ramp.N_COEF)
    for _ in range(config.ramp_iterations):
        ne = [
            g.task(where(i, j), _ramp_ne, dh[i, j], sb.stable[i, j], xk(j), yk(i), model, stats)
            for i, j in tiles
        ]
        model = g.call(_solve_ramp, g.call(_sum_ne, *ne), config.ramp_order)
        hrange = g.call(_hist_range, stats, 0.0)
        hist = g.tree(
            [
                g.task(
                    where(i, j), _resid_hist, dh[i, j], sb.stable[i, j], xk(j), yk(i), model, hrange
                )
                for i, j in tiles
            ],
            _sum,
        )
        stats = g.call(_stats_from_hist, hist, hrange, k_clip)
    tilt = g.call(_zero_constant, model)
    hrange = g.call(_centred_range, model, stats)
    counts = g.tree(
        [
            g.task(where(i, j), _resid_hist, dh[i, j], sb.stable[i, j], xk(j), yk(i), tilt, hrange)
            for i, j in tiles
        ],
        _sum,
    )
    clipped: Any = None
    if config.datum_estimator == "nmad_mean":
        centre_half = g.call(_centre_half, counts, hrange)
        clipped = g.tree(
            [
                g.task(
                    where(i, j),
                    _resid_clipped,
                    dh[i, j],
                    sb.stable[i, j],
                    xk(j),
                    yk(i),
                    tilt,
                    centre_half,
                )
                for i, j in tiles
            ],
            _sum,
        )
    n_stable = g.call(_count, counts)
    params = g.call(
        _params, model, counts, hrange, clipped, config.datum_estimator, seasonal_m, shift, n_stable
    )

    # penetration + seasonal; outliers per (glacier, surface, bin) on glaciers and (region,
    # surface, bin) elsewhere, by sparse per-block reductions merged by group key
    width = config.bin_width_m
    cg = {
        (i, j): g.task(
            where(i, j),
            _corr_groups,
            dh[i, j],
            xk(j),
            yk(i),
            params,
            table_once,
            sb.region[i, j],
            sb.surface[i, j],
            sb.ref[i, j],
            sb.glacier[i, j],
            width,
        )
        for i, j in tiles
    }
    mom = g.tree([cg[t] for t in tiles], _merge_moments)
    gstats = g.call(outliers.mean_std, mom)
    zh = g.tree(
        [g.task(where(i, j), _zhist, cg[i, j], gstats) for i, j in tiles], outliers.merge_counts
    )
    th = g.call(
        outliers.thresholds,
        zh,
        gstats,
        config.outlier_nmad,
        config.outlier_min_px,
        config.outlier_band_quantile,
        config.outlier_band_holds_zero,
    )
    return _SceneTasks(g, cg, th, params, chunks, (x0, y0))


def _grid_centre(ds: xr.Dataset) -> tuple[float, float]:
    """The grid centre (x, y) in m, the origin of the ramp's coordinates."""
    xs, ys = np.asarray(ds.x.values), np.asarray(ds.y.values)
    return float(0.5 * (xs[0] + xs[-1])), float(0.5 * (ys[0] + ys[-1]))


#: The per-scene parameters written beside dh_m: name -> (trailing dims, trailing shape).
PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "datum_offset_m": ((), ()),
    "ramp_coef": (("coef",), (ramp.N_COEF,)),
    "coreg_shift_m": (("shift_axis",), (2,)),
    "seasonal_offset_applied_m": ((), ()),
    "stable_nmad_m": ((), ()),
    "n_stable_px": ((), ()),
}


def scene_output_paths(scene_id: str, index: int) -> list[str]:
    """The store-relative paths the step writes for scene `index`: its chunks of dh_m, valid and
    the parameters, and its outlier group."""
    names = ["dh_m", "valid", *PARAMETERS, "outlier_rejected_px"]
    return [*st.scene_outputs(names, index), st.outlier_group_name(scene_id, index)]


def _output_attrs(centre_m: tuple[float, float]) -> dict[str, dict[str, Any]]:
    """The attributes of the variables the step writes (dh_m, valid, the parameters)."""
    x0, y0 = centre_m
    return {
        "dh_m": {"long_name": "corrected elevation change (scene minus reference)", "units": "m"},
        "valid": {"long_name": "valid dh_m: scene masks, reference, coherence and outliers"},
        "datum_offset_m": {
            "long_name": "stable-ground offset removed at the grid centre",
            "units": "m",
        },
        "ramp_coef": {
            "long_name": "ramp a + b x + c y + d x y + e x2 + f y2 removed (a = 0: in datum)",
            "coef": " ".join(ramp.COEF_NAMES),
            "units": " ".join(ramp.COEF_UNITS),
            "x_y": f"km from the grid centre ({x0:.3f}, {y0:.3f}) m, x east, y north",
        },
        "coreg_shift_m": {
            "long_name": "horizontal shift of the scene (east, north) removed",
            "units": "m",
        },
        "seasonal_offset_applied_m": {
            "long_name": "seasonal offset removed on glacier pixels",
            "units": "m",
        },
        "stable_nmad_m": {
            "long_name": "NMAD of stable-ground dh after datum and ramp",
            "units": "m",
        },
        "n_stable_px": {"long_name": "stable valid pixels used for the datum"},
        "outlier_rejected_px": {
            "long_name": "valid pixels rejected as outliers",
            "thresholds": f"per group in the group {st.OUTLIER_GROUP}/<scene> "
            "(read with mbcube.corrections.step.outlier_table)",
        },
    }


def _output_dataset(arrays: dict[str, da.Array], centre_m: tuple[float, float]) -> xr.Dataset:
    """The step's variables as a Dataset over (scene, ...) from their dask arrays."""
    attrs = _output_attrs(centre_m)
    grid = ("scene", "y", "x")
    dims: dict[str, tuple[str, ...]] = {"dh_m": grid, "valid": grid}
    dims |= {name: ("scene", *tail) for name, (tail, _) in PARAMETERS.items()}
    dims["outlier_rejected_px"] = ("scene",)
    return xr.Dataset({name: (dims[name], arrays[name], attrs[name]) for name in dims})


def scene_graph(
    ds: xr.Dataset,
    scene: SceneInputs,
    config: CorrectionsConfig,
    table: penetration.Table,
) -> xr.Dataset:
    """The corrected scene as a lazy Dataset (dims starting with a length-1 `scene`): dh_m, valid
    and the per-scene parameters. Nothing is computed. `ds` is the cube (open_cube)."""
    return scene_graphs(ds, scene, config, table)[0]


def scene_graphs(
    ds: xr.Dataset,
    scene: SceneInputs,
    config: CorrectionsConfig,
    table: penetration.Table,
    static: CubeBlocks | None = None,
) -> tuple[xr.Dataset, Delayed]:
    """`scene_graph`'s Dataset and the delayed outlier table of the scene (a small Dataset along
    `outlier_group`, see `_outlier_dataset`), sharing one graph. Nothing is computed. `static`:
    the cube's blocks (cube_blocks), made here when not given. (The step itself writes the
    tiles from their tasks, see `_scene_write_graph`; both compute the same values.)"""
    t = _scene_tasks(ds, scene, config, table, static)
    g, sid = t.graph, scene.scene_id
    finals = {
        (i, j): g.task(f"scene {sid} tile ({i}, {j})", _final, ct, t.thresholds)
        for (i, j), ct in t.corrected.items()
    }
    rejected = g.tree(
        [g.call(operator.getitem, f, 2) for f in finals.values()], outliers.merge_counts
    )
    table_ref = g.call(_outlier_dataset, t.thresholds, rejected, sid, config)
    parts = {
        (k, tile): g.call(operator.getitem, f, k) for tile, f in finals.items() for k in (0, 1)
    }
    params = {
        name: g.call(_param_array, t.params, name, shape) for name, (_, shape) in PARAMETERS.items()
    }
    n_rejected = g.call(_rejected_px, rejected)
    refs = [table_ref, n_rejected, *params.values(), *parts.values()]
    table_d, n_rejected_d, *rest = g.delayed(*refs)
    params_d = dict(zip(params, rest[: len(params)], strict=True))
    parts_d = dict(zip(parts, rest[len(params) :], strict=True))
    chunks = t.chunks

    def assemble(k: int, dtype: Any) -> da.Array:
        return da.block(
            [
                [
                    da.from_delayed(
                        parts_d[k, (i, j)], (1, chunks[0][i], chunks[1][j]), dtype=dtype
                    )
                    for j in range(len(chunks[1]))
                ]
                for i in range(len(chunks[0]))
            ]
        )

    arrays = {"dh_m": assemble(0, np.float32), "valid": assemble(1, np.uint8)}
    for name, (_, shape) in PARAMETERS.items():
        arrays[name] = da.from_delayed(params_d[name], (1, *shape), dtype=np.float64)
    arrays["outlier_rejected_px"] = da.from_delayed(n_rejected_d, (1,), dtype=np.int64)
    out = _output_dataset(arrays, t.centre_m)
    out.attrs["outlier_nmad"] = config.outlier_nmad
    return out, table_d


def _output_template(ds: xr.Dataset, n_scenes: int, centre_m: tuple[float, float]) -> xr.Dataset:
    """The step's variables over all `n_scenes` of the store, lazily (for st.ensure_variables:
    the same variables, dims, chunks and attributes write_scene_region would create)."""
    ny, nx = ds.ref_dem_m.data.chunks
    per_scene = (1,) * n_scenes

    def full(tail: tuple[Any, ...], dtype: Any) -> da.Array:
        shape = (n_scenes, *(sum(c) if isinstance(c, tuple) else c for c in tail))
        chunks = (per_scene, *tail)
        fill = np.nan if np.dtype(dtype).kind == "f" else 0
        return da.full(shape, fill, dtype=dtype, chunks=chunks)

    arrays = {"dh_m": full((ny, nx), np.float32), "valid": full((ny, nx), np.uint8)}
    for name, (_, shape) in PARAMETERS.items():
        arrays[name] = full(shape, np.float64)
    arrays["outlier_rejected_px"] = full((), np.int64)
    return _output_dataset(arrays, centre_m)


@dataclass(frozen=True)
class SceneOutputs:
    """Where the step writes: the store and its arrays of the step's variables (zarr.Array,
    opened once per run in the main thread after `ensure_variables`; each task writes the
    chunks of its own scene and tiles, never metadata). `filled`: dh_m and valid opened to
    write every chunk, for tiles known to hold data (zarr's own check whether a chunk holds
    only the fill value, to skip it, costs 4 ms of a 1024^2 uint8 chunk's 5.4 ms write)."""

    store: Path
    arrays: dict[str, Any]
    filled: dict[str, Any]


def open_outputs(store: Path, ds: xr.Dataset, centre_m: tuple[float, float]) -> SceneOutputs:
    """Create the step's variables in the store when missing (metadata only) and open them."""
    template = _output_template(ds, len(st.scene_index(store)), centre_m)
    with _STORE_LOCK:
        st.ensure_variables(store, template)
    arrays = {str(n): zarr.open_array(str(store / str(n)), mode="r+") for n in template.data_vars}
    # each tile task writes its own chunks: a stored chunk spanning two tiles would be
    # read-modified-written by both at once (a lost update), so the chunks must be the tiles
    tile = (1, *(int(c[0]) for c in ds["ref_dem_m"].data.chunks))
    for name in ("dh_m", "valid"):
        if tuple(arrays[name].chunks) != tile:
            raise CorrectionsError(
                f"{store / name}: stored with chunks {tuple(arrays[name].chunks)}, but the "
                f"corrections write one chunk per tile {tile}. Delete that variable's folder "
                "and rerun `mbcube correct --force`."
            )
    filled = {n: arrays[n].with_config({"write_empty_chunks": True}) for n in ("dh_m", "valid")}
    return SceneOutputs(store, arrays, filled)


def _final_write(
    ct: kernels.CorrectedTile,
    th: outliers.Thresholds,
    out: SceneOutputs,
    index: int,
    tile: tuple[slice, slice],
) -> outliers.SparseCounts:
    """The final tile (`_final`) written to dh_m and valid at (scene index, tile); returns its
    rejected pixels per group."""
    dh, ok, rejected = _final(ct, th)
    region = (slice(index, index + 1), *tile)
    # valid is 1 exactly where dh is finite: with a valid pixel neither chunk is all fill value
    # (NaN, 0), so writing it unchecked stores what zarr's checked write stores; without one,
    # the checked write skips both chunks (and removes a previous run's), as before
    arrays = out.filled if ok.any() else out.arrays
    arrays["dh_m"][region] = dh
    arrays["valid"][region] = ok
    return rejected


def _write_scene_results(
    out: SceneOutputs,
    index: int,
    scene_id: str,
    params: dict[str, Any],
    rejected: outliers.SparseCounts,
    th: outliers.Thresholds,
    config: CorrectionsConfig,
) -> None:
    """The scene's parameters (one chunk per array) and its outlier table."""
    at = slice(index, index + 1)
    for name, (_, shape) in PARAMETERS.items():
        out.arrays[name][at] = _param_array(params, name, shape)
    out.arrays["outlier_rejected_px"][at] = _rejected_px(rejected)
    table = _outlier_dataset(th, rejected, scene_id, config)
    _write_outlier_table(out.store, st.outlier_group_name(scene_id, index), table)


def _scene_write_graph(
    ds: xr.Dataset,
    scene: SceneInputs,
    config: CorrectionsConfig,
    table: penetration.Table,
    static: CubeBlocks | None,
    out: SceneOutputs,
) -> Delayed:
    """The delayed writes of one scene, as one task: each tile's task writes its dh_m and valid
    chunks, then one task writes the parameters and the outlier table. Nothing is computed."""
    t = _scene_tasks(ds, scene, config, table, static)
    g, sid = t.graph, scene.scene_id
    out_ref = g.value(out)
    slices = _tile_slices(t.chunks)
    rejected = g.tree(
        [
            g.task(
                f"scene {sid} tile {tile}",
                _final_write,
                ct,
                t.thresholds,
                out_ref,
                scene.index,
                slices[tile],
            )
            for tile, ct in t.corrected.items()
        ],
        outliers.merge_counts,
    )
    done = g.task(
        f"scene {sid} (parameters and outlier table)",
        _write_scene_results,
        out_ref,
        scene.index,
        sid,
        t.params,
        rejected,
        t.thresholds,
        config,
    )
    return g.delayed(done)[0]


def _zero_constant(model: np.ndarray) -> np.ndarray:
    out = model.copy()
    out[0] = 0.0
    return out


def _centre_half(counts: np.ndarray, hrange: tuple[float, float]) -> tuple[float, float]:
    med, nmad = robust.median_nmad(counts, *hrange)
    return med, 3.0 * nmad


def _count(counts: np.ndarray) -> float:
    return float(counts.sum())


def _param_array(params: dict[str, Any], name: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(params[name], dtype=np.float64).reshape((1, *shape))


def _outlier_dataset(
    th: outliers.Thresholds,
    rejected: outliers.SparseCounts,
    scene_id: str,
    config: CorrectionsConfig,
) -> xr.Dataset:
    """The outlier thresholds of one scene as a table along `outlier_group` (the groups with
    finite dh in the scene), with the outlier settings of `config` as attributes."""
    width = config.bin_width_m
    labels = outliers.decode_keys(th.keys, n_bins(width))
    idx = np.searchsorted(th.keys, rejected.codes)
    n_rej = np.zeros(th.keys.size, dtype=np.int64)
    n_rej[idx] = rejected.counts
    dim = "outlier_group"
    return xr.Dataset(
        {
            "lower_m": (dim, th.lower, {"long_name": "dh below this was rejected", "units": "m"}),
            "upper_m": (dim, th.upper, {"long_name": "dh above this was rejected", "units": "m"}),
            "n_px": (dim, th.n.astype(np.int64), {"long_name": "pixels with a finite dh"}),
            "n_rejected": (dim, n_rej, {"long_name": "pixels rejected as outliers"}),
        },
        coords={
            "glacier": (
                dim,
                labels["glacier"].astype(np.int32),
                {"long_name": "glacier_id; 0: pixels grouped by region (off-glacier)"},
            ),
            "region": (
                dim,
                labels["region"].astype(np.int16),
                {"long_name": "region_id of a region group (0 outside any region); -1: glacier"},
            ),
            "surface": (
                dim,
                labels["surface"].astype(np.int8),
                {"long_name": "0 off-glacier, 1 clean ice, 2 debris"},
            ),
            "bin_lower_m": (
                dim,
                ELEV_MIN_M + width * labels["bin"].astype(np.float64),
                {"long_name": "lower edge of the reference-elevation bin", "units": "m"},
            ),
        },
        attrs={
            "scene": scene_id,
            "outlier_nmad": config.outlier_nmad,
            "outlier_band_quantile": config.outlier_band_quantile,
            "outlier_band_holds_zero": int(config.outlier_band_holds_zero),
            "min_px": config.outlier_min_px,
            "bin_width_m": width,
            "description": "dh outside [lower_m, upper_m] (the group's quantiles at "
            "outlier_band_quantile and 1 - outlier_band_quantile, widened by outlier_nmad NMAD; "
            "0.5: median -+ outlier_nmad NMAD; widened to hold 0 where outlier_band_holds_zero "
            "is 1) was rejected; NaN thresholds: fewer than min_px pixels or no spread, the "
            "group was not filtered",
        },
    )


#: Held around the store calls this module makes from two threads at once (the next scene's
#: write setup while the previous scene computes its outlier table, see
#: cluster.compute_scenes): both enter warnings.catch_warnings, which is not thread-safe.
_STORE_LOCK = threading.Lock()


def _write_outlier_table(store: Path, group: str, table: xr.Dataset) -> None:
    with _STORE_LOCK:
        # not consolidated: that would rewrite the root zarr.json (the store's state) from a task
        st.write_dataset(table, store, group=group, mode="w", consolidated=False)


def outlier_table(store: Path, scene_id: str) -> xr.Dataset:
    """The outlier thresholds the corrections step recorded for a scene (read without dask)."""
    group = st.outlier_group_name(scene_id, st.scene_index(store)[scene_id])
    return xr.open_zarr(str(store), group=group, chunks=None, consolidated=False)


# ----------------------------------------------------------------------- penetration (static)


def _diff_block(c: np.ndarray, x: np.ndarray, void: np.ndarray) -> np.ndarray:
    return kernels.xc_difference(c, x, void)


def _diff_quantiles(diff: np.ndarray, stable: np.ndarray) -> np.ndarray:
    return kernels.quantile_row(kernels.stable_values(diff, stable))


def _pen_hist(diff: np.ndarray, stable: np.ndarray, hrange: tuple[float, float]) -> np.ndarray:
    # the residual histogram about a zero ramp is the histogram of the values themselves
    zeros_y, zeros_x = np.zeros(diff.shape[0]), np.zeros(diff.shape[1])
    return kernels.residual_histogram(
        diff, stable, zeros_x, zeros_y, np.zeros(ramp.N_COEF), *hrange, robust.N_HIST_BINS
    )


def _pen_sums(
    diff: np.ndarray,
    region: np.ndarray,
    surface: np.ndarray,
    ref: np.ndarray,
    n_region: int,
    width: float,
) -> np.ndarray:
    return kernels.penetration_sums(diff, region, surface, ref, n_region, width, n_bins(width))


def _offset_nmad(
    stats: tuple[float, float, float], counts: np.ndarray, hrange: tuple[float, float]
) -> tuple[float, float]:
    """Median (the datum offset of X minus C) and NMAD of X minus C on stable ground (m)."""
    return robust.median_nmad(counts, *hrange)


def _glacier_moments(
    diff: np.ndarray,
    glacier: np.ndarray,
    region: np.ndarray,
    surface: np.ndarray,
    ref: np.ndarray,
    n_region: int,
    width: float,
) -> penetration.GlacierMoments:
    return penetration.glacier_moments_block(diff, glacier, region, surface, ref, n_region, width)


def _block_moments(diff: np.ndarray, stable: np.ndarray) -> np.ndarray:
    return penetration.block_moments(diff, stable)


def _quantile_stats(*rows: np.ndarray) -> tuple[float, float, float]:
    centre, scale, _ = robust.combine_quantiles(list(rows))
    return centre, 3.0 * scale, scale  # (centre, clip, scale) like the scene statistics


def _xband_graph(
    ds: xr.Dataset, n_region: int, width: float
) -> tuple[Delayed, Delayed, Delayed, Delayed]:
    """Delayed ((stable-ground median, NMAD) of X minus C (m), summed per-group moments, the
    per-(glacier, region, surface, bin) moments, the stable-ground block moments)."""
    c = np.asarray(ds.ref_dem_m.data.to_delayed())
    x = np.asarray(ds.ref_dem_x_m.data.to_delayed())
    void = np.asarray(ds.ref_void.data.to_delayed())
    stable = np.asarray(ds.stable.data.to_delayed())
    surf = np.asarray(ds.surface.data.to_delayed())
    reg = np.asarray(ds.region_id.data.to_delayed())
    gla = np.asarray(ds.glacier_id.data.to_delayed())
    tiles = list(np.ndindex(c.shape))

    def where(t: tuple[int, ...]) -> str:
        return f"penetration table, tile {t}"

    diff = {t: _task(where(t), _diff_block, c[t], x[t], void[t]) for t in tiles}
    q = [_task(where(t), _diff_quantiles, diff[t], stable[t]) for t in tiles]
    stats = dask.delayed(_quantile_stats, pure=True)(*q)
    hrange = dask.delayed(_hist_range, pure=True)(stats)
    counts = _tree_sum([_task(where(t), _pen_hist, diff[t], stable[t], hrange) for t in tiles])
    offset = dask.delayed(_offset_nmad, pure=True)(stats, counts, hrange)
    sums = _tree_sum(
        [_task(where(t), _pen_sums, diff[t], reg[t], surf[t], c[t], n_region, width) for t in tiles]
    )
    moments = _tree(
        [
            _task(
                where(t), _glacier_moments, diff[t], gla[t], reg[t], surf[t], c[t], n_region, width
            )
            for t in tiles
        ],
        penetration.merge_glacier_moments,
    )
    blocks = _tree_sum([_task(where(t), _block_moments, diff[t], stable[t]) for t in tiles])
    return offset, sums, moments, blocks


def _glacier_bins_graph(ds: xr.Dataset, width: float) -> Delayed:
    """Delayed count of glacier pixels per elevation bin (for a constant table's bin range)."""
    c = np.asarray(ds.ref_dem_m.data.to_delayed())
    surf = np.asarray(ds.surface.data.to_delayed())
    parts = [
        _task(f"penetration table, tile {t}", _bin_counts, c[t], surf[t], width)
        for t in np.ndindex(c.shape)
    ]
    return _tree_sum(parts)


def _bin_counts(ref: np.ndarray, surface: np.ndarray, width: float) -> np.ndarray:
    b = bin_index(ref, width)
    return np.bincount(b[(b >= 0) & (surface > 0)], minlength=n_bins(width)).astype(np.float64)


def table_dataset(
    table: penetration.Table,
    region_ids: np.ndarray,
    source: str,
    *,
    reference_sigma_m: float | None = None,
    spread: penetration.Spread | None = None,
    glacier: penetration.GlacierAdjustment | None = None,
    noise: penetration.NoiseCurve | None = None,
    pooling: penetration.RegionPooling | None = None,
) -> xr.Dataset:
    """The penetration table as the `penetration` group's Dataset; with the X-band statistics
    when given: `reference_sigma_m` (scalar), `penetration_std_m` (region, surface, bin), the
    per-glacier refinement `glacier_penetration_*` (glacier, surface) and the stable-ground
    noise curve `xc_noise_var_m2` (noise_area_m2)."""
    dims = ("region", "surface", "bin")
    data: dict[str, Any] = {
        "penetration_m": (
            dims,
            table.penetration_m.astype(np.float32),
            {"long_name": "C minus X penetration (ref_dem_x_m - ref_dem_m)", "units": "m"},
        ),
        "penetration_sigma_m": (
            dims,
            table.sigma_m.astype(np.float32),
            {"long_name": "1-sigma uncertainty of penetration_m", "units": "m"},
        ),
        "penetration_n_px": (dims, table.n_px.astype(np.int64)),
        "penetration_filled": (
            dims,
            table.filled.astype(np.uint8),
            {"long_name": "1: too few pixels, value interpolated or copied"},
        ),
    }
    coords: dict[str, Any] = {
        "region": (
            "region",
            np.concatenate([[0], region_ids]).astype(np.int16),
            {"long_name": "region_id; 0 = all regions pooled (used where region_id is 0)"},
        ),
        "surface": (
            "surface",
            np.array([1, 2], dtype=np.int8),
            {"long_name": "1 clean ice, 2 debris"},
        ),
        "bin": ("bin", table.bin_lo_m, {"long_name": "elevation bin lower edge", "units": "m"}),
    }
    attrs: dict[str, Any] = {"source": source, "bin_width_m": table.width_m}
    if reference_sigma_m is not None:
        data["reference_sigma_m"] = (
            (),
            np.float64(reference_sigma_m),
            {
                "long_name": "NMAD of ref_dem_x_m - ref_dem_m on stable ground (after the datum "
                "offset): a 1-sigma bound of the reference DEM's pixel error",
                "units": "m",
            },
        )
    if pooling is not None:
        pair = ("region", "surface")
        data["penetration_pooled_m"] = (
            dims,
            pooling.penetration_m.astype(np.float32),
            {
                "long_name": "penetration_m drawn toward the pooled table (region 0) by the "
                "weight penetration_region_weight: for glaciers without their own X band",
                "units": "m",
            },
        )
        data["penetration_region_weight"] = (
            pair,
            pooling.weight,
            {
                "long_name": "share of the region's own deviation from the pooled table kept "
                "(penetration.pool_regions; 1: its own table)"
            },
        )
        data["penetration_region_factor"] = (
            pair,
            pooling.factor,
            {"long_name": "the region's own table over the pooled table (NaN: none of its own)"},
        )
        data["penetration_region_factor_sigma"] = (
            pair,
            pooling.factor_sigma,
            {"long_name": "1-sigma sampling error of that factor from its glaciers' spread"},
        )
        data["penetration_region_spread"] = (
            ("surface",),
            pooling.between_sigma,
            {"long_name": "spread (1 sigma) of the factor between regions beyond sampling"},
        )
    if spread is not None:
        data["penetration_std_m"] = (
            dims,
            spread.std_m.astype(np.float32),
            {
                "long_name": "between-glacier spread (1 sigma) of the mean penetration of a "
                "glacier in the cell, DEM noise removed (penetration.between_glacier_spread): "
                "kappa x |penetration_m|",
                "units": "m",
            },
        )
        data["penetration_spread_kappa"] = (
            ("region", "surface"),
            spread.kappa,
            {"long_name": "relative between-glacier spread of penetration (1 sigma, ratio)"},
        )
        data["penetration_spread_n_glaciers"] = (
            ("region", "surface"),
            spread.n_glaciers,
            {"long_name": "glaciers with X band the spread of the region was estimated from"},
        )
        data["penetration_spread_own"] = (
            ("region", "surface"),
            spread.own.astype(np.uint8),
            {"long_name": "1: kappa estimated in the region; 0: the pooled (region 0) kappa"},
        )
    if noise is not None:
        coords["noise_area_m2"] = (
            "noise_area_m2",
            noise.area_m2,
            {"long_name": "mean area of the stable-ground blocks", "units": "m2"},
        )
        data["xc_noise_var_m2"] = (
            "noise_area_m2",
            noise.var_m2,
            {
                "long_name": "variance of the mean of X minus C over the area on stable ground "
                "(penetration.NoiseCurve)",
                "units": "m2",
            },
        )
        data["xc_noise_n_blocks"] = ("noise_area_m2", noise.n_blocks)
        attrs["xc_noise_measured"] = int(noise.measured)
    if glacier is not None:
        gdims = ("glacier", "surface")
        n_g = glacier.offset_m.shape[0] - 1
        coords["glacier"] = (
            "glacier",
            np.arange(1, n_g + 1, dtype=np.int32),
            {"long_name": "glacier_id of the cube"},
        )
        described = {
            "offset_m": (
                "penetration added to the table on the glacier: weight x raw, or on a glacier "
                "without its own X band the move to the pooled table (penetration_pooled_m)",
                "m",
            ),
            "raw_m": ("mean of X - C - datum offset - table over its X-band pixels", "m"),
            "weight": ("empirical-Bayes weight k of raw (0: table alone)", "1"),
            "x_share": ("share of its C-band pixels with X band", "1"),
            "n_x_px": ("pixels with both references", "1"),
            "noise_sigma_m": ("X - C noise of raw (1 sigma)", "m"),
            "prior_sigma_m": ("between-glacier spread of its mean penetration (tau)", "m"),
            "sigma_table_m": (
                "error (1 sigma) of its mean reference + penetration with the table alone",
                "m",
            ),
            "sigma_m": (
                "error (1 sigma) of its mean reference + penetration with offset_m applied",
                "m",
            ),
        }
        for name, (text, units) in described.items():
            values = np.asarray(getattr(glacier, name))[1:]
            data[f"glacier_penetration_{name}"] = (
                gdims,
                values,
                {"long_name": text, "units": units},
            )
        attrs["glacier_adjustment_applied"] = int(table.glacier_offset_m is not None)
    return xr.Dataset(data, coords=coords, attrs=attrs)


def read_table(store: Path) -> penetration.Table:
    """The stored penetration table (read without dask), with the per-glacier offsets when the
    store applies them (penetration 'xband_glacier')."""
    tab = xr.open_zarr(str(store), group=TABLE_GROUP, chunks=None)
    offsets = None
    if int(tab.attrs.get("glacier_adjustment_applied", 0)):
        stored = np.asarray(tab.glacier_penetration_offset_m.values, dtype=np.float64)
        offsets = np.concatenate([np.zeros((1, stored.shape[1])), stored])
    return penetration.Table(
        np.asarray(tab.bin.values, dtype=np.float64),
        np.asarray(tab.penetration_m.values, dtype=np.float64),
        np.asarray(tab.penetration_sigma_m.values, dtype=np.float64),
        np.asarray(tab.penetration_n_px.values),
        np.asarray(tab.penetration_filled.values).astype(bool),
        float(tab.attrs["bin_width_m"]),
        offsets,
    )


def table_digest(table: penetration.Table) -> str:
    """A digest of the penetration table's content (bins, values, sigmas, counts, fills, and the
    per-glacier offsets when applied)."""
    h = hashlib.sha1()
    arrays = [table.bin_lo_m, table.penetration_m, table.sigma_m, table.n_px, table.filled]
    if table.glacier_offset_m is not None:
        arrays.append(table.glacier_offset_m)
    for a in arrays:
        arr = np.ascontiguousarray(a)
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(arr.tobytes())
    h.update(repr(float(table.width_m)).encode())
    return h.hexdigest()


def _static_token(store: Path) -> str:
    """A digest of the static inputs' content (the table is made from the static layers)."""
    static = st.read_state(store).get("static_inputs", {})
    return hashlib.sha1(json.dumps(static, sort_keys=True).encode()).hexdigest()


def penetration_table(
    store: Path,
    config: CorrectionsConfig,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Compute (once per parameter set) and store the penetration table; return its token.

    With X band ('xband', 'xband_glacier') the group also holds `reference_sigma_m`,
    `penetration_std_m` and the per-glacier refinement (`glacier_penetration_*`, applied to the
    correction only with 'xband_glacier'); see `table_dataset`."""
    noise_corr_m = st.recorded_config(store).massbalance.autocorrelation_m
    record = {
        "params": {
            "penetration": config.penetration,
            "penetration_constant_m": config.penetration_constant_m,
            "penetration_min_px_per_bin": config.penetration_min_px_per_bin,
            "penetration_glacier_min_x_share": config.penetration_glacier_min_x_share,
            "bin_width_m": config.bin_width_m,
            "corr_m": config.penetration_corr_m,
            "noise_corr_m": noise_corr_m,
            "x_noise_variance_share": penetration.X_NOISE_VARIANCE_SHARE,
            "min_glaciers_for_spread": penetration.MIN_GLACIERS_FOR_SPREAD,
            "max_kappa": penetration.MAX_KAPPA,
        },
        "upstream": _static_token(store),
    }
    if not force and st.is_current(store, STEP, TABLE_ID, record):
        return str(st.step_record(store, STEP, TABLE_ID)["token"])
    import warnings

    from mbcube.errors import MbcubeWarning

    ds = st.open_cube(store)
    region_ids = (
        np.asarray(ds.region.values, dtype=np.int64) if "region" in ds.dims else np.zeros(0, int)
    )
    n_region = int(region_ids.max()) if region_ids.size else 0
    region_ids = np.arange(1, n_region + 1)
    res = float(abs(ds.x.values[1] - ds.x.values[0]))
    width = config.bin_width_m
    if progress:
        progress("correct: penetration table")
    table: penetration.Table | None = None
    extras: dict[str, Any] = {}
    source: str = config.penetration
    if config.penetration in ("xband", "xband_glacier"):
        if "ref_dem_x_m" not in ds:
            warnings.warn(
                f"{store}: penetration='{config.penetration}' but the study has no X-band "
                f"reference DEM; using the constant {config.penetration_constant_m} m "
                "(corrections.penetration_constant_m).",
                MbcubeWarning,
                stacklevel=2,
            )
            source = "constant (no X-band reference)"
        else:
            (offset, nmad), sums, moments, blocks = compute(
                *_xband_graph(ds, n_region, width), label="correct: penetration table"
            )
            if not np.isfinite(offset) or sums[0].sum() < config.penetration_min_px_per_bin:
                warnings.warn(
                    f"{store}: the X-band reference DEM does not overlap enough stable ground "
                    "and glacier pixels of the reference; using the constant "
                    f"{config.penetration_constant_m} m (corrections.penetration_constant_m).",
                    MbcubeWarning,
                    stacklevel=2,
                )
                source = "constant (X-band reference does not overlap)"
            else:
                table = penetration.finish_table(
                    sums,
                    float(offset),
                    width,
                    config.penetration_min_px_per_bin,
                    res,
                    config.penetration_corr_m,
                )
                noise = penetration.noise_curve(blocks, res, float(nmad), noise_corr_m)
                spread = penetration.between_glacier_spread(
                    moments, table, float(offset), noise, res
                )
                n_glaciers = int(ds.sizes["glacier"]) if "glacier" in ds.dims else 0
                n_glaciers = max(n_glaciers, int(moments.cells()[0].max(initial=0)))
                adjust = penetration.glacier_adjustment(
                    moments,
                    table,
                    float(offset),
                    spread,
                    noise,
                    res,
                    n_glaciers,
                    config.penetration_glacier_min_x_share,
                    config.penetration_min_px_per_bin,
                )
                applied: np.ndarray | None = adjust.offset_m
                if config.penetration != "xband_glacier":
                    # stored for inspection, not applied: its error is the table's
                    zero = np.zeros_like(adjust.offset_m)
                    adjust = dataclasses.replace(
                        adjust, offset_m=zero, weight=zero, sigma_m=adjust.sigma_table_m
                    )
                    applied = None
                pooling = None
                if config.penetration_region_pooling == "empirical_bayes":
                    # glaciers without X band of their own take their region's table drawn
                    # toward the pooled one; those with it stay part of their region's table
                    pooling = penetration.pool_regions(table, moments, spread.kappa[0])
                    moved = penetration.pooled_offsets(
                        moments, table, pooling.penetration_m, n_glaciers
                    )
                    moved = np.where(adjust.own_x, 0.0, moved)
                    applied = moved if applied is None else applied + moved
                    adjust = dataclasses.replace(adjust, offset_m=adjust.offset_m + moved)
                if applied is not None:
                    table = dataclasses.replace(table, glacier_offset_m=applied)
                extras = {
                    "reference_sigma_m": float(nmad),
                    "spread": spread,
                    "glacier": adjust,
                    "noise": noise,
                    "pooling": pooling,
                }
                source = (
                    f"{config.penetration} (stable-ground offset X minus C {float(offset):.3f} m)"
                )
    if table is None:
        (counts,) = compute(_glacier_bins_graph(ds, width), label="correct: glacier bins")
        keep = np.flatnonzero(counts > 0)
        if keep.size == 0:
            keep = np.array([0])
        bin_lo = ELEV_MIN_M + width * np.arange(keep[0], keep[-1] + 1)
        value = config.penetration_constant_m if config.penetration != "none" else 0.0
        table = penetration.constant_table(bin_lo, n_region, value, width)
        if config.penetration not in ("xband", "xband_glacier"):
            source = config.penetration
    dataset = table_dataset(table, region_ids, source, **extras)
    st.invalidate(store, STEP, TABLE_ID)
    st.write_dataset(dataset, store, group=TABLE_GROUP, mode="w")
    return st.record_step(store, STEP, TABLE_ID, record, outputs=[TABLE_GROUP])


# ------------------------------------------------------------------------------- the step


def _step_params(config: CorrectionsConfig) -> dict[str, Any]:
    """What a scene's record holds of the parameters: the config, and the outlier grouping (so
    that scenes filtered with another grouping recompute)."""
    return config.model_dump(mode="json") | {"outlier_groups": outliers.GROUPING}


@dataclass
class _RunState:
    """What the scenes of one run share, made by the first scene that needs it: the cube's
    blocks (static layers kept in memory when small) and the opened output arrays."""

    static: CubeBlocks | None = None
    outputs: SceneOutputs | None = None


@st.writes_store
def correct_cube(
    store: Path,
    config: CorrectionsConfig | None = None,
    *,
    scenes: Sequence[str] | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> list[str]:
    """Correct the scenes of the cube at `store` (all complete scenes by default), writing dh_m,
    valid and the per-scene parameters; skip scenes already corrected with the same parameters
    and inputs (unless force). Returns the ids of the scenes (re)computed.

    Every requested scene is checked first (seasonal month, upstream layers), so a refused scene
    stops the step before anything is written. Holds the store's writer lock."""
    config = config or st.recorded_config(store).corrections
    st.require_static_intact(store)
    ds = st.open_cube(store)
    meta = xr.open_zarr(str(store), chunks=None)
    ids = [str(s) for s in ds.scene.values]
    wanted = ids if scenes is None else list(scenes)
    unknown = [s for s in wanted if s not in ids]
    if unknown:
        raise CorrectionsError(f"{store}: no complete scene(s) {unknown} in the cube.")
    index = st.scene_index(store)
    inputs = []
    for sid in wanted:
        i = index[sid]
        kind = str(meta.scene_kind.values[i])
        month = int(meta.scene_month.values[i])
        seasonal_offset_m(month, config.seasonal_offset_m, sid)  # refuse before any write
        upstream_step = "unwrap" if kind == "insar" else "ingest"
        upstream = st.step_record(store, upstream_step, sid).get("token")
        if upstream is None:
            raise CorrectionsError(
                f"scene {sid}: step '{upstream_step}' has not finished it; run it first."
            )
        fix = (
            f"`mbcube unwrap {store} --scene {sid} --force`"
            if kind == "insar"
            else f"`mbcube ingest STUDY --store {store}`"
        )
        st.require_intact(store, upstream_step, sid, fix)  # before anything is written
        inputs.append((SceneInputs(sid, i, kind, month), upstream))
    penetration_table(store, config, force=force, progress=progress)
    table = read_table(store)
    # scenes depend on the table's content, not on when it was built: rebuilding the same
    # table (e.g. `correct --force --scene X`) leaves the other scenes current
    table_token = table_digest(table)
    run = _RunState()
    jobs = []
    for scene, upstream in inputs:
        record = {"params": _step_params(config), "upstream": upstream, "penetration": table_token}
        if not force and st.is_current(store, STEP, scene.scene_id, record):
            continue
        jobs.append(_scene_job(store, ds, scene, config, table, run, record, progress))
    return compute_scenes(jobs)


def _scene_job(
    store: Path,
    ds: xr.Dataset,
    scene: SceneInputs,
    config: CorrectionsConfig,
    table: Any,
    run: _RunState,
    record: dict[str, Any],
    progress: Callable[[str], None] | None,
) -> SceneJob:
    """Correcting one scene: its record forgotten, dh_m, valid, its parameters and its outlier
    table written, then the step recorded with the files it wrote."""

    def build() -> list[Any]:
        if progress:
            progress(f"correct scene {scene.scene_id}")
        st.invalidate(store, STEP, scene.scene_id)
        if run.static is None:
            blocks = cube_blocks(ds, config.coreg_halo_px)
            if static_nbytes(ds, config.coreg_halo_px) <= STATIC_CACHE_BYTES:
                blocks = persist_static(blocks)
            run.static = blocks
        if run.outputs is None:
            run.outputs = open_outputs(store, ds, _grid_centre(ds))
        return [_scene_write_graph(ds, scene, config, table, run.static, run.outputs)]

    def finish(_: list[Any]) -> None:
        outputs = scene_output_paths(scene.scene_id, scene.index)
        st.record_step(store, STEP, scene.scene_id, record, outputs=outputs)

    return SceneJob(scene.scene_id, f"correct scene {scene.scene_id}", build, finish)
