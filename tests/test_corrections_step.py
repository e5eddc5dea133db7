"""The corrections step's write path: each tile's task writes its dh_m / valid chunks and one task
per scene writes the parameters and the outlier table (corrections.step._scene_write_graph). What
the step stores must equal, bitwise, what the lazy Dataset of the same scene graph computes
(scene_graphs), empty tiles must stay unwritten as zarr leaves them, and a rerun must write the
same bytes."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from mbcube.cluster import quiet
from mbcube.config import CorrectionsConfig
from mbcube.corrections import correct_cube
from mbcube.corrections.errors import CorrectionsError
from mbcube.corrections.step import (
    PARAMETERS,
    SceneInputs,
    _scene_write_graph,
    open_outputs,
    outlier_table,
    read_table,
    scene_graphs,
)
from mbcube.errors import MbcubeWarning
from mbcube.ingest import ingest
from mbcube.store import open_cube, read_state, scene_index
from tests.conftest import raise_if_dask_computes
from tests.storetools import rerecord

SCENE_VARS = ["dh_m", "valid", *PARAMETERS, "outlier_rejected_px"]
CONFIG = CorrectionsConfig(penetration="constant", penetration_constant_m=1.5)


@pytest.fixture(scope="module")
def raw_store(tiny_dem_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DEM study ingested, with the first scene's first tile blanked (no data)."""
    store = tmp_path_factory.mktemp("corr_step") / "raw.zarr"
    with quiet():
        ingest(tiny_dem_study, store)
    dem = zarr.open_array(str(store / "dem_m"), mode="r+")
    ny, nx = (int(c) for c in dem.chunks[1:])
    dem[0, :ny, :nx] = np.nan
    rerecord(store, "ingest", str(open_cube(store).scene.values[0]))
    return store


def _corrected(raw_store: Path, dest: Path) -> Path:
    store = dest / "cube.zarr"
    shutil.copytree(raw_store, store)
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", MbcubeWarning)
        assert len(correct_cube(store, CONFIG)) == 3
    return store


def _inputs(ds: xr.Dataset, store: Path, k: int) -> SceneInputs:
    sid = str(ds.scene.values[k])
    return SceneInputs(
        sid, scene_index(store)[sid], str(ds.scene_kind.values[k]), int(ds.scene_month.values[k])
    )


def test_written_scene_equals_the_lazy_graph_bitwise(raw_store: Path, tmp_path: Path) -> None:
    """dh_m, valid, every parameter and the outlier table as stored by the step equal the values
    of scene_graphs' lazy Dataset and delayed table (the same reductions, computed without the
    step's direct writes), bitwise; valid is 1 exactly where dh_m is finite."""
    store = _corrected(raw_store, tmp_path)
    ds = open_cube(store)
    table = read_table(store)
    for k in range(ds.sizes["scene"]):
        scene = _inputs(ds, store, k)
        lazy, lazy_table = scene_graphs(ds, scene, CONFIG, table)
        expected = lazy.compute()
        stored = ds[SCENE_VARS].isel(scene=[k]).load()
        for name in SCENE_VARS:
            got, want = stored[name].values, expected[name].values
            assert got.dtype == want.dtype, name
            assert np.array_equal(got, want, equal_nan=got.dtype.kind == "f"), (scene, name)
        assert np.array_equal(stored.valid.values == 1, np.isfinite(stored.dh_m.values))
        xr.testing.assert_identical(outlier_table(store, scene.scene_id), lazy_table.compute())
    assert int(ds.outlier_rejected_px.sum()) > 0  # the outlier path was exercised


def test_empty_tile_left_unwritten_and_rerun_writes_the_same_bytes(
    raw_store: Path, tmp_path: Path
) -> None:
    """The blanked tile of the first scene has no chunk of dh_m or valid on disk (zarr skips
    chunks holding only the fill value: they read as NaN / 0), its other tiles and the other
    scenes have theirs; `correct --force` rewrites every chunk, table and parameter with the
    same bytes."""
    store = _corrected(raw_store, tmp_path)
    dh = open_cube(store).dh_m
    values = dh.values
    rows = np.cumsum([0, *dh.chunks[1]])
    cols = np.cumsum([0, *dh.chunks[2]])
    with_data = {
        f"{k}/{i}/{j}"
        for k in range(values.shape[0])
        for i in range(len(rows) - 1)
        for j in range(len(cols) - 1)
        if np.isfinite(values[k, rows[i] : rows[i + 1], cols[j] : cols[j + 1]]).any()
    }
    assert "0/0/0" not in with_data and "1/0/0" in with_data
    for name in ("dh_m", "valid"):
        chunk_dir = store / name / "c"
        present = {p.relative_to(chunk_dir).as_posix() for p in chunk_dir.rglob("*") if p.is_file()}
        assert present == with_data, name

    def snapshot() -> dict[str, bytes]:
        paths = [
            p for n in [*SCENE_VARS, "outliers"] for p in (store / n).rglob("*") if p.is_file()
        ]
        return {p.relative_to(store).as_posix(): p.read_bytes() for p in paths}

    before = snapshot()
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", MbcubeWarning)
        assert len(correct_cube(store, CONFIG, force=True)) == 3
    after = snapshot()
    assert sorted(after) == sorted(before)
    assert all(after[p] == before[p] for p in before)


def test_scene_write_graph_is_lazy_and_one_layer(raw_store: Path, tmp_path: Path) -> None:
    """Building a scene's writes computes nothing and adds one graph layer for the scene (the
    cube's blocks come in as the layers of their own collections)."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(raw_store, store)
    ds = open_cube(store)
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", MbcubeWarning)
        correct_cube(store, CONFIG, scenes=[str(ds.scene.values[1])])  # makes the table
    outputs = open_outputs(store, ds, (0.0, 0.0))
    scene, table = _inputs(ds, store, 0), read_table(store)
    with raise_if_dask_computes():
        write = _scene_write_graph(ds, scene, CONFIG, table, None, outputs)
    graph = write.__dask_graph__()
    own = [name for name in graph.layers if name.startswith("correct-")]
    assert len(own) == 1
    n_tiles = len(ds.ref_dem_m.chunks[0]) * len(ds.ref_dem_m.chunks[1])
    assert n_tiles < len(graph.layers[own[0]]) < 60 * n_tiles  # tasks of the scene: tiles x passes


def test_stored_outputs_chunked_unlike_the_tiles_are_refused(
    raw_store: Path, tmp_path: Path
) -> None:
    """Tile tasks write whole chunks concurrently: a dh_m stored with chunks spanning two tiles
    would lose updates, so the step refuses it with the variable, its chunks and the fix."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(raw_store, store)
    dem = zarr.open_array(str(store / "dem_m"), mode="r")
    ny, nx = (int(c) for c in dem.chunks[1:])
    zarr.create_array(
        str(store / "dh_m"), shape=dem.shape, chunks=(1, 2 * ny, 2 * nx), dtype="float32"
    )
    with pytest.raises(CorrectionsError, match=r"dh_m.*chunks.*--force"):
        correct_cube(store, CONFIG)
    kept = zarr.open_array(str(store / "dh_m"), mode="r")
    assert kept.chunks == (1, 2 * ny, 2 * nx) and kept.nchunks_initialized == 0  # untouched
    recorded = read_state(store).get("steps", {}).get("correct", {})
    assert not set(recorded) & set(scene_index(store))  # no scene recorded as corrected
