"""The aggregation fast path: per-cell statistics (against the dense oracle), the store cache,
the glacier tables' record, a new region set from the cache alone, glaciers.gpkg, and the
scene statistics combined chunk by chunk."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st

import mbcube.aggregate as aggregate_module
from mbcube.aggregate import (
    CACHE_GROUP,
    TABLES_RECORD,
    CellStats,
    aggregate,
    load_stats,
    sum_cells,
)
from mbcube.config import MassBalanceConfig
from mbcube.massbalance import GlacierStats, sum_units
from mbcube.store import open_cube, read_state, record_step, write_dataset
from mbcube.unit_sums import Units
from tests.test_aggregate import Synthetic, _pixel_stats


@pytest.fixture(scope="module")
def recorded(
    tiny_cube: Path, tiny_study: Path, tmp_path_factory: pytest.TempPathFactory
) -> Synthetic:
    """Statistics from known pixels, each scene recorded as binned (so they are cacheable)."""
    store = tmp_path_factory.mktemp("fast") / "cube.zarr"
    shutil.copytree(tiny_cube, store)
    syn = _pixel_stats(store, tiny_study, seed=3)
    for scene in open_cube(store)["scene"].values:
        record_step(store, "bin", str(scene), {"params": {"bin_width_m": 50.0}})
    return syn


def _random_stats(seed: int, n_glaciers: int, n_scenes: int) -> GlacierStats:
    rng = np.random.default_rng(seed)
    shape = (n_glaciers, 7, 2)
    present = rng.random(shape) < 0.4
    count = np.where(present, rng.integers(0, 30, shape), 0).astype(float)
    area = np.where(present | (rng.random(shape) < 0.2), rng.uniform(1e3, 1e5, shape), 0.0)
    scene_px = rng.integers(0, 50, (n_scenes, n_glaciers)).astype(float)
    weight = rng.random((n_scenes, n_glaciers))
    n_px = np.round(area / 900.0)
    # the best scene's pixels: at most the cell's pixels and its count, 0 where nothing measured
    measured_bin_px = np.floor(np.minimum(count, n_px) * rng.uniform(0.3, 1.0, shape))
    return GlacierStats(
        count=count,
        weight=count,
        rate_sum=count * rng.normal(-0.5, 1.0, shape),
        dh_sum=count * rng.normal(-5.0, 3.0, shape),
        area_m2=area,
        n_px=n_px,
        measured_px=rng.integers(0, 500, n_glaciers).astype(float),
        scene_px=scene_px,
        scene_weight=weight / weight.sum(axis=0, keepdims=True),
        void_area_m2=rng.uniform(0, 1e4, n_glaciers),
        void_px=rng.integers(0, 10, n_glaciers).astype(float),
        measured_bin_px=measured_bin_px,
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_glaciers=st.integers(1, 25),
    n_units=st.integers(1, 6),
    min_px=st.integers(1, 20),
    chunk=st.sampled_from([1, 7, 1 << 18]),
)
def test_sum_cells_equals_dense_sum_units(
    seed: int, n_glaciers: int, n_units: int, min_px: int, chunk: int
) -> None:
    """Region sums from the non-empty cells (summed `chunk` cells at a time) equal
    massbalance.sum_units on the dense arrays, field by field and bin by bin; the cells hold the
    dense statistics exactly."""
    dense = _random_stats(seed, n_glaciers, 3)
    cells = CellStats.from_dense(dense)
    back = cells.dense()
    fields = ("count", "weight", "rate_sum", "dh_sum", "area_m2", "n_px", "measured_bin_px")
    for name in (*fields, "scene_weight"):
        np.testing.assert_array_equal(getattr(back, name), getattr(dense, name))
    membership = np.random.default_rng(seed + 1).random((n_units, n_glaciers)) < 0.5
    want = sum_units(dense, membership, min_px)
    saved = aggregate_module.CELL_CHUNK
    aggregate_module.CELL_CHUNK = chunk
    try:
        got = sum_cells(cells, Units.of(membership), min_px)
    finally:
        aggregate_module.CELL_CHUNK = saved
    for name in (*fields, "measured_px"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(got.scene_weight, want.scene_weight, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.void_area, want.void_area, rtol=1e-12)


def _strips(store: Path, path: Path, n: int) -> Path:
    cube = open_cube(store)
    x, y = cube["x"].values, cube["y"].values
    edges = np.linspace(x.min() - 50, x.max() + 50, n + 1)
    gpd.GeoDataFrame(
        {"name": [f"strip {i}" for i in range(n)]},
        geometry=[
            shapely.box(a, y.min() - 50, b, y.max() + 50) for a, b in itertools.pairwise(edges)
        ],
        crs="EPSG:32643",
    ).to_file(path, driver="GPKG")
    return path


def _lock(store: Path, group: str | None = None, coords: bool = True) -> int:
    """Corrupt every chunk of the (y, x) arrays, or of the per-glacier arrays of `group`."""
    locked = 0
    root = store / group if group else store
    for meta in root.glob("*/zarr.json"):
        dims = json.loads(meta.read_text()).get("dimension_names") or []
        if not coords and dims == [meta.parent.name]:
            continue
        if ("glacier" in dims) if group else ("y" in dims and "x" in dims):
            for chunk in (meta.parent / "c").rglob("*"):
                if chunk.is_file():
                    chunk.write_bytes(b"locked: not a chunk")
                    locked += 1
    return locked


def test_new_region_set_from_the_cache_alone(recorded: Synthetic, tmp_path: Path) -> None:
    """After one aggregate, a new region file is aggregated with the pixels AND the scene
    statistics and hypsometry locked: only the cache is read, the glacier tables stay as they
    are, and the region table equals the one computed from the statistics."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    strips = _strips(store, tmp_path / "strips.gpkg", 3)
    want_glaciers, want_regions = aggregate(recorded.store, tmp_path / "want", regions=strips)
    out = tmp_path / "out"
    aggregate(store, out)  # writes the cache and the glacier tables
    assert (store / CACHE_GROUP / "zarr.json").exists()
    before = (out / "glaciers.csv").stat().st_mtime_ns
    assert _lock(store) > 10
    assert _lock(store, "stats") > 3
    assert _lock(store, "hypsometry") > 1
    glaciers_csv, regions_csv = aggregate(store, out, regions=strips)
    assert (out / "glaciers.csv").stat().st_mtime_ns == before  # not rewritten
    pd.testing.assert_frame_equal(pd.read_csv(regions_csv), pd.read_csv(want_regions))
    pd.testing.assert_frame_equal(pd.read_csv(glaciers_csv), pd.read_csv(want_glaciers))
    members = pd.read_csv(out / "region_members.csv")
    assert set(members["region"]) <= {"strip 0", "strip 1", "strip 2"}
    table = pd.read_csv(regions_csv).set_index(["name", "glaciers"])
    counts = members["region"].value_counts()
    for name, n in counts.items():
        assert table.loc[(name, "all"), "n_glaciers"] == n


def test_parameters_change_the_results_not_the_combination(
    recorded: Synthetic, tmp_path: Path
) -> None:
    """Another density reuses the cached cells (the scene statistics locked) and gives the same
    glacier table as a store without cache; the tables in the folder are rewritten."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    out = tmp_path / "out"
    aggregate(store, out)
    key = read_state(store)  # the cache's key is unchanged by parameters
    assert _lock(store, "stats", coords=False) >= 3  # count, sum_dh_m, sumsq_dh_m2
    dense = MassBalanceConfig(density_kg_m3=900.0)
    glaciers_csv, _ = aggregate(store, out, config=dense)
    assert json.loads((out / TABLES_RECORD).read_text())["results_key"] is not None
    fresh = tmp_path / "fresh.zarr"
    shutil.copytree(recorded.store, fresh)
    shutil.rmtree(fresh / CACHE_GROUP, ignore_errors=True)
    want, _ = aggregate(fresh, tmp_path / "want", config=dense)
    pd.testing.assert_frame_equal(pd.read_csv(glaciers_csv), pd.read_csv(want))
    got = pd.read_csv(glaciers_csv)
    ratio = got["mb_mwe_yr"] / got["dhdt_m_yr"]
    np.testing.assert_allclose(ratio[np.isfinite(ratio)], 0.9)
    assert read_state(store) == key


def test_rebinned_scene_recombines(recorded: Synthetic, tmp_path: Path) -> None:
    """A scene binned again (new token) invalidates the cache: the glacier tables follow."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    first = pd.read_csv(aggregate(store, tmp_path / "a")[0])
    scene = str(open_cube(store)["scene"].values[0])
    stats = load_stats(store)
    # the scene's statistics doubled (same rate per scene x 2 = double dh) and re-recorded
    import xarray as xr

    ds = xr.open_zarr(str(store), group="stats").load()
    ds["sum_dh_m"].loc[{"scene": scene}] = ds["sum_dh_m"].sel(scene=scene) * 2
    write_dataset(ds, store, group="stats", mode="w")
    record_step(store, "bin", scene, {"params": {"bin_width_m": 50.0}, "again": True})
    again = pd.read_csv(aggregate(store, tmp_path / "a")[0])
    assert not np.allclose(first["dhdt_m_yr"], again["dhdt_m_yr"], equal_nan=True)
    assert load_stats(store).results_key != stats.results_key


def test_combination_does_not_depend_on_the_stats_chunks(
    recorded: Synthetic, tmp_path: Path
) -> None:
    """Statistics chunked along glacier (5 per chunk) give the same tables as one chunk."""
    import xarray as xr

    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    ds = xr.open_zarr(str(store), group="stats").load()
    big = [v for v in ds.data_vars if "glacier" in ds[v].dims]
    encoding = {v: {"chunks": (1, 5, ds.sizes["bin"], 2)} for v in big}
    write_dataset(
        ds.transpose("scene", "glacier", "bin", "surface"),
        store,
        group="stats",
        mode="w",
        encoding=encoding,
    )
    zarr_meta = json.loads((store / "stats" / "count" / "zarr.json").read_text())
    assert zarr_meta["chunk_grid"]["configuration"]["chunk_shape"][1] == 5
    got = pd.read_csv(aggregate(store, tmp_path / "a")[0])
    want = pd.read_csv(aggregate(recorded.store, tmp_path / "b")[0])
    pd.testing.assert_frame_equal(got, want)


def test_glaciers_gpkg_joins_outlines_and_table(recorded: Synthetic, tmp_path: Path) -> None:
    """glaciers.gpkg: the study's outlines (file order, CRS, id column) with the table."""
    out = tmp_path / "out"
    glaciers_csv, _ = aggregate(recorded.store, out)
    table = pd.read_csv(glaciers_csv)
    frame = gpd.read_file(out / "glaciers.gpkg")
    outlines = gpd.read_file(recorded.study / "glaciers.gpkg")
    assert frame.crs == outlines.crs
    assert list(frame.columns) == [*table.columns, "geometry"]
    pd.testing.assert_frame_equal(
        pd.DataFrame(frame.drop(columns="geometry")).fillna({"period": ""}),
        table.fillna({"period": ""}),
        check_dtype=False,
    )
    assert (frame["RGIId"].to_numpy() == outlines["RGIId"].to_numpy()).all()
    assert all(a.equals(b) for a, b in zip(frame.geometry, outlines.geometry, strict=True))
    assert json.loads((out / TABLES_RECORD).read_text())["gpkg"] == "written"


def test_gpkg_not_written_when_the_outlines_are_gone(recorded: Synthetic, tmp_path: Path) -> None:
    """Outlines recorded at ingest but changed since: a warning, the other tables written."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    study = tmp_path / "study"
    shutil.copytree(recorded.study, study, ignore=shutil.ignore_patterns("scenes", "truth"))
    state = read_state(store)
    state["study"]["root"] = str(study)  # the study as if moved here...
    outlines = gpd.read_file(study / "glaciers.gpkg")
    outlines.iloc[1:].to_file(study / "glaciers.gpkg")  # ...and its outlines changed since
    from mbcube.errors import MbcubeWarning
    from mbcube.store import write_state

    write_state(store, state)
    with pytest.warns(MbcubeWarning, match="glaciers.gpkg not written"):
        aggregate(store, tmp_path / "out")
    assert (tmp_path / "out" / "glaciers.csv").exists()
    assert not (tmp_path / "out" / "glaciers.gpkg").exists()
    record = json.loads((tmp_path / "out" / TABLES_RECORD).read_text())
    assert record["gpkg"].startswith("not written")


def test_measured_share_rule_is_part_of_the_cache_key(recorded: Synthetic, tmp_path: Path) -> None:
    """Another min_measured_frac_per_bin combines the scenes again (cells measured on less than
    that share are dropped at combination): the cache's key changes and the tables equal those of
    a store without cache; the rule matters here (more of the area is filled)."""
    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)

    def cache_key() -> str:
        meta = json.loads((store / CACHE_GROUP / "zarr.json").read_text())
        return str(meta["attributes"]["key"])

    loose = pd.read_csv(aggregate(store, tmp_path / "a")[0])
    first = cache_key()
    strict = MassBalanceConfig(min_measured_frac_per_bin=0.9)
    got = pd.read_csv(aggregate(store, tmp_path / "b", config=strict)[0])
    assert cache_key() != first
    fresh = tmp_path / "fresh.zarr"
    shutil.copytree(recorded.store, fresh)
    shutil.rmtree(fresh / CACHE_GROUP, ignore_errors=True)
    want = pd.read_csv(aggregate(fresh, tmp_path / "want", config=strict)[0])
    pd.testing.assert_frame_equal(got, want)
    assert (got["filled_frac"] > loose["filled_frac"] + 1e-9).any()
    assert (got["filled_frac"] >= loose["filled_frac"] - 1e-12).all()


def test_stored_reference_bound_is_part_of_the_results_key(
    recorded: Synthetic, tmp_path: Path
) -> None:
    """A reference_sigma_m stored with the penetration table after the cache was written changes
    the results key: the glacier results are recomputed from the cached cells (the scene
    statistics locked), and the cache's fast path gives them back with the bound."""
    import xarray as xr

    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    first = load_stats(store)
    assert first.reference_sigma_m is None
    write_dataset(xr.Dataset({"reference_sigma_m": ((), 0.3)}), store, group="penetration")
    assert _lock(store, "stats", coords=False) >= 3
    second = load_stats(store)
    assert second.results_key != first.results_key
    assert second.reference_sigma_m == pytest.approx(0.3)
    # a smaller common part: most glaciers' random term drops (one whose scenes' own parts
    # average over smaller areas may rise, see the module docstring of mbcube.uncertainty)
    old, new = first.results["sigma_random_mwe_yr"], second.results["sigma_random_mwe_yr"]
    seen = np.isfinite(old)
    assert (new[seen] < old[seen]).mean() > 0.8
    cached = load_stats(store)  # fast path: everything from the cache
    assert cached.reference_sigma_m == pytest.approx(0.3)
    np.testing.assert_array_equal(
        cached.results["sigma_random_mwe_yr"], second.results["sigma_random_mwe_yr"]
    )
    np.testing.assert_array_equal(cached.stable_white_sigma_m, second.stable_white_sigma_m)


def test_recomputed_penetration_table_renews_the_results(
    recorded: Synthetic, tmp_path: Path
) -> None:
    """The results key follows the penetration table's record (its sigma and between-glacier
    spread enter the results): a recomputed table renews the results, not the cached cells."""
    from mbcube.corrections.step import STEP, TABLE_ID

    assert (STEP, TABLE_ID) == aggregate_module.PENETRATION_RECORD
    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    first = load_stats(store)
    assert load_stats(store).results_key == first.results_key
    record_step(store, STEP, TABLE_ID, {"params": {"penetration": "xband"}})
    assert _lock(store, "stats", coords=False) >= 3  # the combined cells come from the cache
    second = load_stats(store)
    assert second.results_key != first.results_key
    np.testing.assert_array_equal(second.results["mb_mwe_yr"], first.results["mb_mwe_yr"])


def test_key_facts_are_read_again_only_when_their_arrays_change(
    recorded: Synthetic, tmp_path: Path
) -> None:
    """The scenes binned and the reference bound are kept with the cache, with a fingerprint of
    the files they are read from: untouched, those arrays are not read (here: unreadable, yet
    the cache is used); a binned flag reset (a scene being binned again) is noticed at once and
    the scene is left out, as it was before the memo; set back, the facts read again are kept
    with the unchanged cache."""
    import zarr

    store = tmp_path / "cube.zarr"
    shutil.copytree(recorded.store, store)
    aggregate(store, tmp_path / "a")
    scenes = list(load_stats(store).scene_ids)
    flags = store / "stats" / "binned"
    chunks = sorted(p for p in (flags / "c").rglob("*") if p.is_file())
    assert chunks and len(scenes) >= 2
    saved = {p: (p.read_bytes(), p.stat()) for p in chunks}
    for path, (_, info) in saved.items():  # unreadable, same size and mtime: not read
        path.write_bytes(b"x" * info.st_size)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert list(load_stats(store).scene_ids) == scenes
    for path, (data, info) in saved.items():
        path.write_bytes(data)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    array = zarr.open_array(str(flags), mode="r+")
    array[0] = 0  # the first scene's statistics are being rewritten
    assert list(load_stats(store).scene_ids) == scenes[1:]
    array[0] = 1
    assert list(load_stats(store).scene_ids) == scenes
    # the flag written again with its value: new files, same keys, so the cache stays and the
    # facts read once more are kept with it
    before = {p: p.stat().st_mtime_ns for p in (flags / "c").rglob("*") if p.is_file()}
    array[0] = 1
    chunks = sorted(p for p in (flags / "c").rglob("*") if p.is_file())
    assert any(p.stat().st_mtime_ns != before.get(p) for p in chunks)
    cache_key = json.loads((store / CACHE_GROUP / "zarr.json").read_text())["attributes"]["key"]
    assert list(load_stats(store).scene_ids) == scenes
    meta = json.loads((store / CACHE_GROUP / "zarr.json").read_text())["attributes"]
    assert meta["key"] == cache_key
    for path in chunks:
        info = path.stat()
        path.write_bytes(b"x" * info.st_size)
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert list(load_stats(store).scene_ids) == scenes


def test_plain_read_equals_zarr(tmp_path: Path) -> None:
    """_read_plain reads zarr's own bytes (checked by their CRC-32C, as mbcube writes them): one
    chunk (mapped read-only), several chunks with padded edge chunks, 1-D, 0-d, uint8, '.' chunk
    keys; a compressed array, one without checksum, a missing chunk (fill value) and a chunk
    file of another size are read by zarr, with the same values; a chunk whose bytes changed
    fails its checksum."""
    import zarr
    from zarr.codecs import Crc32cCodec

    from mbcube.errors import StoreDamaged

    rng = np.random.default_rng(0)
    cases = {
        "one": (rng.normal(size=(9, 50)), {"chunks": (9, 50)}),
        "edges": (rng.normal(size=(5, 23)), {"chunks": (2, 7)}),
        "line": (rng.integers(0, 255, 17).astype(np.uint8), {"chunks": (5,)}),
        "scalar": (np.array(3.5), {}),
        "ints": (rng.integers(-9, 9, (4, 6)), {"chunks": (4, 6)}),
        "compressed": (rng.normal(size=(3, 8)), {"chunks": (3, 4), "compressors": "auto"}),
        "dotted": (
            rng.normal(size=(4, 5)),
            {"chunks": (2, 5), "chunk_key_encoding": {"name": "default", "separator": "."}},
        ),
        "unchecked": (rng.normal(size=(3, 8)), {"chunks": (3, 8), "compressors": None}),
    }
    for name, (values, options) in cases.items():
        kwargs = {"compressors": [Crc32cCodec()], **options}
        if kwargs["compressors"] == "auto":
            del kwargs["compressors"]
        array = zarr.create_array(
            str(tmp_path / name), shape=values.shape, dtype=values.dtype, **kwargs
        )
        array[...] = values
        got = aggregate_module._read_plain(tmp_path / name, axis=-1 if values.ndim else 0)
        np.testing.assert_array_equal(got, values)
        assert got.dtype == values.dtype and got.shape == values.shape
    one = aggregate_module._read_plain(tmp_path / "one", axis=1)
    assert not one.flags.writeable  # mapped from the file
    # a chunk of zeros is not stored by zarr: its fill value, read by zarr
    holes = zarr.create_array(
        str(tmp_path / "holes"),
        shape=(6,),
        chunks=(3,),
        dtype="f8",
        compressors=[Crc32cCodec()],
        fill_value=-1.0,
    )
    holes[:3] = [1.0, 2.0, 3.0]
    np.testing.assert_array_equal(
        aggregate_module._read_plain(tmp_path / "holes"), [1, 2, 3, -1, -1, -1]
    )
    chunk = tmp_path / "one" / "c" / "0" / "0"
    flipped = bytearray(chunk.read_bytes())
    flipped[100] ^= 1
    chunk.write_bytes(bytes(flipped))  # same size, one bit changed: the mapped read checks
    with pytest.raises(StoreDamaged, match="checksum"):
        aggregate_module._read_plain(tmp_path / "one", axis=1)
    chunk.write_bytes(bytes(flipped)[:-8])  # not a chunk of this array: zarr's checksum error
    with pytest.raises(ValueError, match="checksum"):
        aggregate_module._read_plain(tmp_path / "one", axis=1)


def test_region_polygon_arrays_as_the_geodataframe_reader(tmp_path: Path) -> None:
    """read_polygon_arrays gives the names and shapes of read_polygons (+ from_polygons' name
    text): files in the grid CRS read by pyogrio's raw reader; reprojected, repaired, with a
    missing name, a first column of flags,
    3-D shapes or two layers through GDAL / read_polygons; empty shapes dropped either way."""
    from mbcube.regions import name_column_of, read_polygon_arrays, read_polygons

    crs = "EPSG:32643"
    bowtie = shapely.Polygon([(0, 0), (2000, 2000), (2000, 0), (0, 2000)])
    square, other = shapely.box(1000, -1000, 3000, 3000), shapely.box(0, 0, 10, 10)
    frames = {
        "plain": ({"name": ["a", "b, c", "d"]}, [square, shapely.Polygon(), other], crs),
        "first_column": ({"zone": [7, 8]}, [square, other], crs),
        "reprojected": ({"name": ["a", "b"]}, [square, other], "EPSG:4326"),
        "invalid": ({"name": ["a", "b"]}, [bowtie, other], crs),
        "missing_name": ({"name": ["a", None]}, [square, other], crs),
        "flags": ({"flag": [True, False], "name": ["a", "b"]}, [square, other], crs),
        "measured": ({"name": ["a", "b"]}, [shapely.force_3d(square, 5.0), other], crs),
        "two_layers": ({"name": ["a", "b"]}, [square, other], crs),
        "shapefile": ({"name": ["a", "b"]}, [square, other], crs),
    }
    for label, (columns, shapes, file_crs) in frames.items():
        path = tmp_path / (f"{label}.shp" if label == "shapefile" else f"{label}.gpkg")
        frame = gpd.GeoDataFrame(columns, geometry=shapes, crs=crs)
        frame.to_crs(file_crs).to_file(path)
        if label == "two_layers":  # GDAL's first layer
            frame.iloc[::-1].to_file(path, layer="again")
        several = label == "two_layers"  # GDAL says which layer it reads
        with pytest.warns(UserWarning, match="More than one layer") if several else nullcontext():
            names, geoms = read_polygon_arrays(path, crs, name_column=None)
        with pytest.warns(UserWarning, match="More than one layer") if several else nullcontext():
            polygons = read_polygons(path, crs, name_column=None)
        column = name_column_of(polygons)
        assert names == [str(n) for n in polygons[column]], label
        assert len(geoms) == len(polygons)
        assert all(
            shapely.equals_exact(a, b) for a, b in zip(geoms, polygons.geometry, strict=True)
        )
        assert all(shapely.is_valid(geoms)), label
        assert shapely.has_z(geoms).any() == (label == "measured"), label
    assert read_polygon_arrays(tmp_path / "plain.gpkg", crs)[0] == ["a", "d"]  # 'b, c' empty
    assert read_polygon_arrays(tmp_path / "missing_name.gpkg", crs)[0] == ["a", "nan"]
    with pytest.raises(Exception, match="no column 'region'"):
        read_polygon_arrays(tmp_path / "plain.gpkg", crs, name_column="region")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(["Indus", "Tarim", "", "nan", "None", "a", "é", "a b", None, 1, "1", 1.0]),
        max_size=30,
    )
)
def test_attribute_regions_as_sorted_distinct_text(values: list[object]) -> None:
    """from_attribute: one region per distinct text of the values (str(v)), sorted, missing
    ones in none; the hashing path (all text) and the other give the same as np.unique."""
    from mbcube.regions import MISSING_TEXT, from_attribute

    got = from_attribute(np.array(values, dtype=object))
    text = [str(v) for v in values]
    names = sorted(set(text) - set(MISSING_TEXT))
    assert got.names == names
    want = np.array([[t == n for t in text] for n in names], dtype=bool)
    want = want.reshape(len(names), len(text))
    np.testing.assert_array_equal(got.membership, want)


def test_region_parquet_as_pandas(tmp_path: Path) -> None:
    """_write_parquet: pandas' column types (text as large_string), the same frame read back."""
    rng = np.random.default_rng(1)
    floats = rng.normal(size=40) * 10.0 ** rng.integers(-30, 30, 40)
    floats[:6] = [np.nan, np.inf, -np.inf, -0.0, 1e16, 1e-5]
    table = pd.DataFrame(
        {
            "name": [f'r{i}, "q"\n' if i % 7 == 0 else f"r{i}" for i in range(40)],
            "n": rng.integers(-5, 10**12, 40),
            "x": floats,
            "y": np.full(40, np.nan),
        }
    )
    # Parquet: pandas' column types (text as large_string) and the same frame read back
    import pyarrow.parquet as pq

    aggregate_module._write_parquet(table, tmp_path / "got.parquet")
    table.to_parquet(tmp_path / "want.parquet", index=False)
    got, want = pq.read_table(tmp_path / "got.parquet"), pq.read_table(tmp_path / "want.parquet")
    assert got.schema.remove_metadata() == want.schema.remove_metadata()
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "got.parquet"), pd.read_parquet(tmp_path / "want.parquet")
    )


def test_region_sets_joined_as_added_one_by_one() -> None:
    """RegionSet.join names and stacks the sets as an empty set plus each in turn (repeated
    names, also within one set, get ' (2)', ' (3)'); no set gives no region of G glaciers."""
    from mbcube.regions import RegionSet

    rng = np.random.default_rng(4)
    sets = [
        RegionSet(names, rng.random((len(names), 6)) < 0.5)
        for names in (["a", "b", "a"], ["b", "c"], [], ["a (2)", "a"])
    ]
    chained = RegionSet([], np.zeros((0, 6), dtype=bool))
    for s in sets:
        chained = chained + s
    joined = RegionSet.join(sets, 6)
    assert joined.names == chained.names == ["a", "b", "a (2)", "b (2)", "c", "a (2) (2)", "a (3)"]
    np.testing.assert_array_equal(joined.membership, chained.membership)
    assert RegionSet.join([], 6).membership.shape == (0, 6)
