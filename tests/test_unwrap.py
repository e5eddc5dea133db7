"""Unwrapping: kernels against numpy oracles, a hard synthetic scene against its truth, tiled
against whole-scene, engine call counts, laziness, bad input, and the cube step vs the truth."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from mbcube.config import UnwrapConfig
from mbcube.ingest import ingest
from mbcube.store import open_cube, scene_index, write_scene_region
from mbcube.synth import generate_study
from mbcube.unwrap import (
    ENGINES,
    TileResult,
    TileUnwrapError,
    UnwrapInputError,
    edge_stats,
    finish_tile,
    region_labels,
    solve_offsets,
    solve_scene,
    summarize,
    tie_cycles,
    tile_layout,
    unwrap_numpy,
    unwrap_scene,
    valid_mask,
)
from mbcube.unwrap.step import scene_graph, unwrap_cube
from mbcube.unwrap.tiles import TIE_BINS_PER_CYCLE, overlapping_pairs
from tests.conftest import raise_if_dask_computes

TWO_PI = 2 * np.pi


# ---------------------------------------------------------------- a hard synthetic scene


@dataclass
class HardScene:
    """Layers of a hard scene (y, x) and its truth (dh_true_m, glacier, island, ring_inside)."""

    phase_rad: np.ndarray
    coherence: np.ndarray
    h_amb_m: np.ndarray
    radar_mask: np.ndarray
    stable: np.ndarray
    glacier: np.ndarray
    dh_true_m: np.ndarray
    island: np.ndarray
    ring_inside: np.ndarray
    ring_centre: tuple[float, float]


def _window(cy: float, cx: float, r: float, n: int) -> tuple[slice, slice]:
    """The pixels of an n x n grid within r of (cy, cx) along each axis (plus a margin)."""
    return (
        slice(max(0, int(cy - r) - 1), min(n, int(cy + r) + 2)),
        slice(max(0, int(cx - r) - 1), min(n, int(cx + r) + 2)),
    )


def make_hard_scene(n: int = 384, tile: int = 128, seed: int = 0, nlooks: float = 4.0) -> HardScene:
    """A scene built to be hard: low-coherence glaciers (0.40 +- 0.06, 4 looks) thinning by up
    to 75 m (~2 cycles at h_amb ~40 m, varying +-5 %), a ramp of ~2 cycles, many layover
    holes, one glacier on a tile corner, a glacier behind a masked ring that crosses the tile
    border at column 2 * tile, and an enclosed island (~110 px, +1.4 cycles) too small to tie.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n].astype(np.float64)
    s = n / 384.0

    def smooth(scale: float, amp: float) -> np.ndarray:
        out = np.zeros((n, n))
        for _ in range(6):
            kx, ky = rng.normal(0, 1 / (scale * s), 2)
            out += np.cos(TWO_PI * (kx * x + ky * y) + rng.uniform(0, TWO_PI))
        return amp * out / np.sqrt(3)

    h_amb = 40.0 * (1 + 0.05 * (x - n / 2) / (n / 2))
    dh = 50.0 * (x - n / 2) / n + 25.0 * (y - n / 2) / n + smooth(60, 6.0)
    glacier = np.zeros((n, n), bool)
    centres = [(tile + 8.0, tile + 8.0)]
    while len(centres) < max(4, int(6 * s * s)):
        centres.append(tuple(rng.uniform(0.1 * n, 0.9 * n, 2)))
    for cy, cx in centres:
        a, b = rng.uniform(18, 40, 2)
        w = _window(cy, cx, max(a, b), n)
        r2 = ((y[w] - cy) / a) ** 2 + ((x[w] - cx) / b) ** 2
        glacier[w] |= r2 < 1
        dh[w] += np.where(r2 < 1, -75.0 * (1 - r2), 0.0)
    coh = np.where(glacier, 0.4, 0.8) + smooth(30, 0.06) + 0.03 * rng.standard_normal((n, n))
    radar = np.zeros((n, n), bool)
    for _ in range(int(60 * s * s)):
        cy, cx = rng.uniform(0, n, 2)
        r = rng.uniform(2, 9)
        w = _window(cy, cx, r, n)
        radar[w] |= (y[w] - cy) ** 2 + (x[w] - cx) ** 2 < r * r
    cy, cx = 1.8 * tile, 2.0 * tile
    rr = np.hypot(y - cy, x - cx)
    radius = 0.38 * tile
    ring = (rr >= radius) & (rr < radius + 4)
    inside = rr < radius
    r2 = (np.hypot((y - cy) / 0.6, x - cx) / (0.5 * radius)) ** 2
    glacier |= r2 < 1
    dh += np.where(r2 < 1, -60.0 * (1 - r2), 0.0)
    ri = np.hypot(y - 0.5 * tile, x - 0.6 * tile)
    island = ri < 6
    dh += np.where(island, 56.0, 0.0)
    radar &= ~(island | inside)
    radar |= ring | ((ri >= 6) & (ri < 9))
    coh = np.clip(np.where(radar, 0.15, coh), 0.05, 0.97).astype(np.float32)
    sigma = np.sqrt(1 - coh.astype(np.float64) ** 2) / (coh * np.sqrt(2 * nlooks))
    noisy = TWO_PI * dh / h_amb + np.clip(sigma, 0, np.pi) * rng.standard_normal((n, n))
    return HardScene(
        np.angle(np.exp(1j * noisy)).astype(np.float32),
        coh,
        h_amb.astype(np.float32),
        radar.astype(np.uint8),
        (~glacier & ~radar).astype(np.uint8),
        glacier,
        dh.astype(np.float32),
        island,
        inside,
        (cy, cx),
    )


def expected_cycles(
    component: np.ndarray, stable: np.ndarray, dh_true_m: np.ndarray, h_amb_m: np.ndarray
) -> np.ndarray:
    """Oracle of the tie: per component, rint(median(true dh / h_amb)) on its stable pixels."""
    out = np.full(int(component.max()) + 1, np.nan)
    for c in range(1, out.size):
        sel = (component == c) & (stable == 1)
        if sel.any():
            out[c] = np.rint(np.median(dh_true_m[sel] / h_amb_m[sel]))
    return out


@pytest.fixture(scope="module")
def hard() -> HardScene:
    return make_hard_scene()


@pytest.fixture(scope="module")
def hard_results(hard: HardScene) -> dict[str, tuple]:
    out = {}
    for mode in ("whole", "tiled"):
        out[mode] = unwrap_numpy(
            hard.phase_rad,
            hard.coherence,
            hard.h_amb_m,
            hard.radar_mask,
            hard.stable,
            config=UnwrapConfig(mode=mode, halo_px=32),
            tile_px=128,
            scene_id="hard",
        )
    return out


@pytest.mark.parametrize("mode", ["whole", "tiled"])
def test_hard_scene_unwrapped_to_the_true_cycle(
    hard: HardScene, hard_results: dict[str, tuple], mode: str
) -> None:
    phase, comp, dh, quality = hard_results[mode]
    valid = valid_mask(hard.phase_rad, hard.coherence, hard.h_amb_m, hard.radar_mask)
    glacier = valid & hard.glacier & (comp > 0) & ~hard.island  # the island: checked below
    assert glacier.sum() > 0.9 * (valid & hard.glacier).sum()  # speckle fragments < 10 %
    cycles = np.rint((dh - hard.dh_true_m) / hard.h_amb_m)
    right = np.isfinite(dh) & (
        cycles == expected_cycles(comp, hard.stable, hard.dh_true_m, hard.h_amb_m)[comp]
    )
    assert right[glacier].mean() >= 0.995
    # dh is phase * h_amb / 2 pi wherever it is defined
    fin = np.isfinite(dh)
    np.testing.assert_allclose(dh[fin], phase[fin] * hard.h_amb_m[fin] / TWO_PI, rtol=1e-5)
    # the glacier behind the ring crosses the tile border (col 256): one component, tied, right
    behind = hard.ring_inside & valid & (comp > 0)
    cols = np.nonzero(behind)[1]
    assert cols.min() < 256 <= cols.max()
    assert np.unique(comp[behind]).size == 1
    assert comp[behind][0] != 1  # not the main component: reached only through its own tie
    assert right[behind & hard.glacier].mean() >= 0.995
    # the island is flagged (own component, untied: dh NaN), never mis-tied
    island = hard.island & valid & (comp > 0)
    assert island.sum() > 50
    assert np.isfinite(phase[island]).all()
    assert np.isnan(dh[hard.island]).all()
    assert 1 not in set(np.unique(comp[island]).tolist())
    assert quality["unwrap_untied_px"] == int((comp[island] > 0).sum())
    assert quality["unwrap_tied_frac"] == pytest.approx(
        1 - quality["unwrap_untied_px"] / (comp > 0).sum(), rel=1e-6
    )
    assert quality["unwrap_valid_frac"] == pytest.approx((comp > 0).mean(), rel=1e-6)
    assert quality["unwrap_n_components"] == np.unique(comp[comp > 0]).size
    assert quality["unwrap_loop_misfits"] == 0


def test_hard_scene_tiled_matches_whole(hard_results: dict[str, tuple]) -> None:
    _, comp_w, dh_w, q_w = hard_results["whole"]
    _, comp_t, dh_t, q_t = hard_results["tiled"]
    same = (np.isnan(dh_w) & np.isnan(dh_t)) | (np.abs(dh_w - dh_t) < 1.0)
    assert same.mean() >= 0.9999
    assert ((comp_w > 0) == (comp_t > 0)).mean() >= 0.9999
    assert np.isnan(q_w["unwrap_edge_agreement"])  # one tile: no stitching edges
    assert q_t["unwrap_edge_agreement"] > 0.99
    assert q_t["unwrap_n_components"] == q_w["unwrap_n_components"]


# ---------------------------------------------------------------- stitching and tie vs oracles


def _fake_results(
    phase_true: np.ndarray, valid: np.ndarray, tiles: list, rng: np.random.Generator
) -> list[TileResult]:
    """Tile results as an engine that is right up to a random whole cycle per region would give."""
    out = []
    for tile in tiles:
        labels, n = region_labels(valid[tile.window])
        jump = rng.integers(-5, 6, n + 1)
        phase = np.where(labels > 0, phase_true[tile.window] + TWO_PI * jump[labels], np.nan)
        out.append(TileResult(tile, phase.astype(np.float32), labels, n, int(valid.sum()), n > 0))
    return out


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(24, 80),
    tile=st.integers(8, 40),
    halo=st.integers(1, 12),
    density=st.floats(0.45, 0.9),
)
def test_stitching_recovers_global_regions_and_tie_matches_median(
    seed: int, n: int, tile: int, halo: int, density: float
) -> None:
    """Oracle: the 4-connected regions of the whole valid mask. Stitched tiles must give one
    component per global region, the true phase up to one whole cycle per component, and a tie
    that puts the median stable phase within half a cycle (+ one histogram bin) of 0."""
    rng = np.random.default_rng(seed)
    valid = ndimage.uniform_filter(rng.random((n, n)), 3) < density
    valid |= rng.random((n, n)) < 0.02
    stable = (rng.random((n, n)) < 0.7).astype(np.uint8)
    y, x = np.mgrid[0:n, 0:n]
    phase_true = TWO_PI * (0.11 * x - 0.07 * y + 0.2 * rng.standard_normal((n, n)))
    chunks = [tile] * (n // tile) + ([n % tile] if n % tile else [])
    tiles = [t for line in tile_layout(tuple(chunks), tuple(chunks), halo) for t in line]
    results = _fake_results(phase_true, valid, tiles, rng)
    pairs = overlapping_pairs(tiles)
    solution = solve_scene(
        [summarize(r, stable[r.tile.window]) for r in results],
        pairs,
        [edge_stats(results[a], results[b]) for a, b in pairs],
        min_stable_px_to_tie=5,
        min_edge_px=1,
        min_edge_agreement=0.9,
        min_component_px=1,
    )
    phase = np.full((n, n), np.nan)
    comp = np.zeros((n, n), np.int32)
    for t, r in enumerate(results):
        core = slice(*r.tile.core_rows), slice(*r.tile.core_cols)
        phase[core], comp[core], _ = finish_tile(r, solution, t, np.ones(r.tile.core_shape))
    truth, n_truth = ndimage.label(valid, structure=ndimage.generate_binary_structure(2, 1))
    assert ((comp > 0) == valid).all()
    assert solution.quality["unwrap_n_components"] == n_truth
    assert solution.quality["unwrap_loop_misfits"] == 0
    assert solution.quality["unwrap_edge_agreement"] in (1.0,) or np.isnan(
        solution.quality["unwrap_edge_agreement"]
    )
    for label in range(1, n_truth + 1):
        sel = truth == label
        assert np.unique(comp[sel]).size == 1
        cycles = np.rint((phase[sel] - phase_true[sel]) / TWO_PI)
        assert np.unique(cycles).size == 1
        on_stable = sel & (stable == 1)
        if on_stable.sum() >= 5:  # the tie uses the lower median of an even count
            values = np.sort(phase[on_stable] / TWO_PI)
            assert abs(values[(values.size - 1) // 2]) <= 0.5 + 1 / TIE_BINS_PER_CYCLE


def test_edge_stats_counts_agreement_and_mode() -> None:
    tiles = [t for line in tile_layout((10, 10), (10,), 3) for t in line]
    a, b = tiles
    shared_rows = (7, 13)
    base = np.zeros((20, 10))
    pa = base[a.window] + TWO_PI * 2
    pb = base[b.window].copy()
    pb[(slice(0, 2), slice(0, 3))] += TWO_PI  # 6 shared pixels of tile b one cycle off
    labels_a = np.ones(pa.shape, np.int32)
    labels_b = np.ones(pb.shape, np.int32)
    ra = TileResult(a, pa.astype(np.float32), labels_a, 1, 100, True)
    rb = TileResult(b, pb.astype(np.float32), labels_b, 1, 100, True)
    stats = edge_stats(ra, rb)
    n_shared = (shared_rows[1] - shared_rows[0]) * 10
    assert stats.n_shared.tolist() == [n_shared]
    assert stats.n_agree.tolist() == [n_shared - 6]
    assert stats.d_cycles.tolist() == [2]  # phase_a - phase_b = 2 cycles on most pixels


def test_solve_offsets_closes_loops_and_counts_misfits() -> None:
    # triangle 0-1-2: offsets 1-0 = 2, 2-1 = -1, 2-0 = 1 (consistent) ; then a bad 0-2 edge = 3
    a, b = np.array([0, 1, 0, 0]), np.array([1, 2, 2, 2])
    d = np.array([2, -1, 1, 3])
    agree = np.array([50, 40, 30, 20])
    res = solve_offsets(4, a, b, d, agree, agree, min_edge_px=8, min_edge_agreement=0.9)
    rel = res.offset_cycles - res.offset_cycles[0]
    assert rel[:3].tolist() == [0, 2, 1]
    assert res.n_edges_tree == 2
    assert res.loop_misfits == 1
    assert res.root[3] != res.root[0]  # node 3 has no edge: its own component
    # weak edges are dropped: too few agreeing pixels, or too small a fraction agreeing
    weak = solve_offsets(
        3,
        a[:2],
        b[:2],
        d[:2],
        np.array([7, 40]),
        np.array([7, 100]),
        min_edge_px=8,
        min_edge_agreement=0.9,
    )
    assert len(set(weak.root.tolist())) == 3


def test_tie_matches_numpy_median() -> None:
    rng = np.random.default_rng(3)
    cycles = [rng.normal(1.2, 0.2, 300), rng.normal(-2.1, 0.25, 250), rng.normal(0, 0.1, 50)]
    offsets = np.array([0, 3, -1])  # stitching offsets of the three nodes (cycles)
    root = np.array([0, 1, 2])
    nodes, bins, counts = [], [], []
    for node, values in enumerate(cycles):
        b, c = np.unique(np.floor(values * TIE_BINS_PER_CYCLE).astype(np.int64), return_counts=True)
        nodes.append(np.full(b.size, node))
        bins.append(b)
        counts.append(c)
    k, tied, n_stable = tie_cycles(
        root,
        offsets,
        np.concatenate(nodes),
        np.concatenate(bins),
        np.concatenate(counts),
        bins_per_cycle=TIE_BINS_PER_CYCLE,
        min_stable_px_to_tie=200,
    )
    oracle = [np.rint(np.median(v + o)) for v, o in zip(cycles, offsets, strict=True)]
    assert k[:2].tolist() == oracle[:2] == [1, 1]
    assert tied.tolist() == [True, True, False]
    assert k[2] == 0 and n_stable.tolist() == [300, 250, 50]


# ---------------------------------------------------------------- engine calls, laziness, errors


def _small_scene(n: int = 192, seed: int = 5) -> HardScene:
    return make_hard_scene(n, n // 3, seed)


def test_each_tile_unwrapped_once_and_empty_tiles_skipped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scene = _small_scene()
    phase = scene.phase_rad.copy()
    phase[0:64, 128:192] = np.nan  # an all-NaN tile
    calls: list[tuple[int, int]] = []
    real = ENGINES["snaphu"]

    def counting(p: np.ndarray, c: np.ndarray, v: np.ndarray, nl: float) -> np.ndarray:
        calls.append(p.shape)
        return real(p, c, v, nl)

    monkeypatch.setitem(ENGINES, "snaphu", counting)
    config = UnwrapConfig(mode="tiled", halo_px=16)
    out = unwrap_scene(
        phase,
        scene.coherence,
        scene.h_amb_m,
        scene.radar_mask,
        scene.stable,
        config=config,
        tile_px=64,
        scene_id="count",
    )
    with dask.config.set(scheduler="threads"):
        ph, comp, _, _ = dask.compute(out.phase_unw_rad, out.component, out.dh_raw_m, out.quality)
    # 9 tiles; the NaN tile's window still holds halo pixels of its neighbours, so it is
    # unwrapped too: every tile exactly once
    assert len(calls) == 9
    assert np.isnan(ph[0:64, 128:192]).all() and (comp[0:64, 128:192] == 0).all()

    calls.clear()
    whole = np.full((192, 192), np.nan, np.float32)
    whole[:, :40] = scene.phase_rad[:, :40]
    out = unwrap_scene(whole, scene.coherence, 40.0, config=config, tile_px=64)  # scalar h_amb
    ph, comp, dh, quality = dask.compute(
        out.phase_unw_rad, out.component, out.dh_raw_m, out.quality, scheduler="threads"
    )
    assert len(calls) == 3  # the other 6 windows have no phase at all: not sent to the engine
    assert (comp[:, 64:] == 0).all() and np.isfinite(ph[comp > 0]).all()
    # no stable ground given: nothing can be tied, so no dh at all (flagged, not guessed)
    assert np.isnan(dh).all() and quality["unwrap_tied_frac"] == 0


def test_graph_building_computes_nothing(tiny_cube: Path, tmp_path: Path) -> None:
    store = Path(shutil.copytree(tiny_cube, tmp_path / "cube.zarr"))
    scene_id = str(open_cube(store)["scene"].values[0])
    scene = _small_scene(96)
    with raise_if_dask_computes():
        unwrap_scene(
            scene.phase_rad,
            scene.coherence,
            scene.h_amb_m,
            scene.radar_mask,
            scene.stable,
            config=UnwrapConfig(mode="tiled"),
            tile_px=32,
        )
        graph = scene_graph(store, scene_id, UnwrapConfig(mode="tiled", halo_px=16))
        write_scene_region(store, graph, scene_index(store)[scene_id], compute=False)


def _errors_of(phase: np.ndarray, coherence: np.ndarray, h_amb: np.ndarray | float) -> str:
    with pytest.raises(UnwrapInputError) as info:
        unwrap_numpy(
            phase,
            coherence,
            h_amb,
            config=UnwrapConfig(mode="tiled", halo_px=8),
            tile_px=32,
            scene_id="BAD",
        )
    return str(info.value)


def test_bad_input_names_scene_and_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    scene = _small_scene(96)
    phase = scene.phase_rad.copy()
    phase[48, 80] = 4.0  # in tile (1, 2) and in no other tile's window
    msg = _errors_of(phase, scene.coherence, scene.h_amb_m)
    assert "scene BAD" in msg and "tile (row 1, col 2)" in msg and "[-pi, pi]" in msg
    coh = scene.coherence.copy()
    coh[5, 5] = 1.5
    msg = _errors_of(scene.phase_rad, coh, scene.h_amb_m)
    assert "tile (row 0, col 0)" in msg and "coherence" in msg
    msg = _errors_of(scene.phase_rad, scene.coherence, np.full((96, 96), np.nan, np.float32))
    assert "h_amb" in msg

    def broken(*args: object) -> np.ndarray:
        raise RuntimeError("engine exploded")

    monkeypatch.setitem(ENGINES, "snaphu", broken)
    with pytest.raises(
        TileUnwrapError, match=r"scene X, tile \(row \d, col \d\), pixels.*engine exploded"
    ):
        unwrap_numpy(
            scene.phase_rad,
            scene.coherence,
            scene.h_amb_m,
            config=UnwrapConfig(mode="tiled"),
            tile_px=48,
            scene_id="X",
        )


# ---------------------------------------------------------------- the cube step


def _truth_dh_m(study: Path, ds: object, scene_id: str) -> np.ndarray:
    """True scene-minus-reference dh (m) from study/truth: rate * years + C-X penetration +
    seasonal offset (glaciers) + datum + ramp. The reference DEM's noise (1 m) is not in it."""
    d = ds.sel(scene=scene_id)  # type: ignore[attr-defined]
    with rasterio.open(study / "truth/dhdt_m_yr.tif") as f:
        rate = f.read(1)
    with rasterio.open(study / "truth/penetration_m.tif") as f:
        pen = f.read(1)
    t = pd.read_csv(study / "truth/scenes.csv").set_index("scene_id").loc[scene_id]
    ox, oy = json.loads((study / "truth/meta.json").read_text())["ramp_origin_m"]
    xk, yk = np.meshgrid((d.x.values - ox) / 1000, (d.y.values - oy) / 1000)
    glacier = d.glacier_id.values > 0
    return (
        rate * float(d.scene_years)
        + pen
        + np.where(glacier, t.seasonal_offset_m, 0.0)
        + t.datum_m
        + t.ramp_b_m_per_km * xk
        + t.ramp_c_m_per_km * yk
        + t.ramp_d_m_per_km2 * xk * yk
    )


def test_unwrap_cube_matches_truth_and_skips_what_is_current(
    tiny_study: Path, tiny_cube: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Path(shutil.copytree(tiny_cube, tmp_path / "cube.zarr"))
    config = UnwrapConfig(mode="tiled", halo_px=32)
    messages: list[str] = []
    ds = open_cube(store)
    wanted = [str(s) for s in ds["scene"].values][1:]  # per-pixel h_amb; delivered in another CRS
    done = unwrap_cube(store, config, scenes=wanted, progress=messages.append)
    ds = open_cube(store).compute()
    assert done == wanted
    for scene_id in done:
        d = ds.sel(scene=scene_id)
        dh, comp = d["dh_raw_m"].values, d["component"].values
        assert d["phase_unw_rad"].dtype == np.float32 and comp.dtype == np.int32
        on_glacier = (d["glacier_id"].values > 0) & (comp > 0)
        assert on_glacier.sum() > 5000
        assert np.isfinite(dh[on_glacier]).mean() >= 0.995
        cycles = np.rint((dh - _truth_dh_m(tiny_study, ds, scene_id)) / d["h_amb_m"].values)
        assert (cycles[on_glacier] == 0).mean() >= 0.995
        in_scene = np.isfinite(d["phase_rad"].values).sum()
        assert float(d["unwrap_valid_frac"]) == pytest.approx((comp > 0).sum() / in_scene)
        assert float(d["unwrap_edge_agreement"]) > 0.99
        assert int(d["unwrap_loop_misfits"]) == 0
        assert int(d["unwrap_n_components"]) == np.unique(comp[comp > 0]).size
    # up to date: nothing recomputed, no engine call; force recomputes one scene
    monkeypatch.setitem(ENGINES, "snaphu", lambda *a: pytest.fail("engine called"))
    assert unwrap_cube(store, config, scenes=wanted, progress=messages.append) == []
    assert messages == [f"unwrap {s}: up to date" for s in wanted]
    monkeypatch.undo()
    # forced: each tile whose window holds a pixel to unwrap goes to the engine exactly once
    d = ds.sel(scene=done[0])
    valid = valid_mask(
        d["phase_rad"].values,
        d["coherence"].values,
        d["h_amb_m"].values,
        d["radar_mask"].values,
        d["ref_void"].values,
    )
    chunks = open_cube(store)["phase_rad"].chunks[1:]
    tiles = [t for line in tile_layout(*chunks, config.halo_px) for t in line]
    expected = sum(bool(valid[t.window].any()) for t in tiles)
    assert 4 <= expected <= 9
    calls = []
    real = ENGINES["snaphu"]
    monkeypatch.setitem(ENGINES, "snaphu", lambda *a: calls.append(1) or real(*a))
    assert unwrap_cube(store, config, scenes=[done[0]], force=True) == [done[0]]
    assert len(calls) == expected
    again = open_cube(store)["dh_raw_m"].sel(scene=done[0]).values
    np.testing.assert_array_equal(again, ds["dh_raw_m"].sel(scene=done[0]).values)


def test_unwrap_cube_skips_dem_scenes(tmp_path: Path) -> None:
    study = generate_study(
        tmp_path / "study",
        "tiny",
        kind="mixed",
        n_scenes=2,
        size_px=128,
        tile_px=64,
        n_glaciers=4,
        other_crs=None,
    )
    store = tmp_path / "cube.zarr"
    ingest(study, store)
    kinds = {
        str(s): str(k)
        for s, k in zip(
            open_cube(store)["scene"].values, open_cube(store)["scene_kind"].values, strict=True
        )
    }
    done = unwrap_cube(store)
    assert done == [s for s, k in kinds.items() if k == "insar"] and len(done) == 1
    ds = open_cube(store)
    dem = next(s for s, k in kinds.items() if k == "dem")
    assert np.isnan(ds["dh_raw_m"].sel(scene=dem).values).all()


def test_valid_mask_combines_every_reason() -> None:
    phase = np.array([[0.1, np.nan, 0.2, 0.3, 0.4, 0.5, 0.6]], np.float32)
    coh = np.array([[0.9, 0.9, 0.29, np.nan, 0.9, 0.9, 0.9]], np.float32)
    h_amb = np.array([[40, 40, 40, 40, np.nan, 40, 40]], np.float32)
    radar = np.array([[0, 0, 0, 0, 0, 1, 0]], np.uint8)
    void = np.array([[0, 0, 0, 0, 0, 0, 1]], np.uint8)
    got = valid_mask(phase, coh, h_amb, radar, void, coherence_min=0.3)
    assert got.tolist() == [[True, False, False, False, False, False, False]]
    assert valid_mask(phase, coh, h_amb, coherence_min=0.3).tolist() == [
        [True, False, False, False, False, True, True]
    ]
