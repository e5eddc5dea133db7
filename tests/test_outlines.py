"""Outlines and region polygons validated before any pixel work: repaired with a warning naming
the glacier and its area change, dropped when they hold no polygon, named when they miss the
grid, refused when all of them miss it."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from mbcube.errors import MbcubeWarning, StudyError
from mbcube.grid import Grid
from mbcube.outlines import polygonal_part, read_outlines, read_regions
from mbcube.study import load_study

CRS = "EPSG:32643"
GRID = Grid(CRS, 500000.0, 4000000.0, 30.0, 100, 100, 64)  # 3 x 3 km
X0, Y0 = 500000.0, 3997000.0  # lower-left corner of the grid


def _square(x_m: float, y_m: float, side_m: float = 300.0) -> shapely.Polygon:
    """A square whose lower-left corner is (x_m, y_m) from the grid's lower-left corner."""
    return shapely.box(X0 + x_m, Y0 + y_m, X0 + x_m + side_m, Y0 + y_m + side_m)


def _bow_tie(x_m: float, y_m: float, scale: float = 1.0) -> shapely.Polygon:
    """A self-intersecting ring of two lobes, 0.125 and 0.5 km2 at scale 1 (GEOS: 0.375 km2)."""
    ring = [(0, 0), (1500, 1000), (1500, 0), (0, 500)]
    return shapely.Polygon([(X0 + x_m + scale * a, Y0 + y_m + scale * b) for a, b in ring])


def _write(
    path: Path, ids: list[str], geoms: list[shapely.Geometry | None], crs: str = CRS
) -> Path:
    gpd.GeoDataFrame({"RGIId": ids}, geometry=geoms, crs=crs).to_file(path)
    return path


def _messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, MbcubeWarning)]


def test_self_intersecting_outline_repaired_with_id_and_area_change(tmp_path: Path) -> None:
    bow = _bow_tie(400, 100)  # apart from the squares: no overlap
    path = _write(tmp_path / "g.gpkg", ["G1", "G2", "G3"], [_square(0, 0), bow, _square(2000, 0)])
    with pytest.warns(MbcubeWarning) as record:
        out = read_outlines(path, GRID, "RGIId")
    (message,) = _messages(record.list)
    before_km2, after_km2 = bow.area / 1e6, shapely.make_valid(bow).area / 1e6
    assert (before_km2, after_km2) == pytest.approx((0.375, 0.625))  # |0.5 - 0.125|, 0.5 + 0.125
    assert f"G2 {before_km2:.3f} -> {after_km2:.3f} km2" in message
    assert "1 invalid glacier outline on the grid" in message and "G1" not in message
    assert out is not None
    assert list(out["RGIId"]) == ["G1", "G2", "G3"] and list(out.index) == [0, 1, 2]
    assert out.geometry.is_valid.all() and out.crs == CRS
    assert out.geometry.iloc[1].area == pytest.approx(625000.0)
    assert out.geometry.iloc[1].geom_type == "MultiPolygon"


def test_many_repairs_give_one_warning_largest_change_first(tmp_path: Path) -> None:
    scales = [0.2 + 0.01 * i for i in range(30)]
    geoms = [_bow_tie(0, 0, s) for s in scales]  # they overlap too: a warning of its own
    path = _write(tmp_path / "g.gpkg", [f"B{i:02d}" for i in range(30)], list(geoms))
    with pytest.warns(MbcubeWarning) as record:
        read_outlines(path, GRID, "RGIId")
    (message, overlap) = _messages(record.list)
    assert "435 pairs of glacier outlines overlap" in overlap  # 30 * 29 / 2: each in the next
    assert "30 invalid glacier outlines" in message and "(first 5 of 30)" in message
    change = 0.25 * scales[-1] ** 2  # the area change (km2) of the largest, B29
    assert change == pytest.approx((shapely.make_valid(geoms[-1]).area - geoms[-1].area) / 1e6)
    first = message.index("B29")
    assert first < message.index("B28") < message.index("B27")
    assert "B00" not in message


def test_self_touching_ring_repair_changes_nothing_and_is_silent(tmp_path: Path) -> None:
    """RGI files hold many rings touching themselves at a point: GEOS calls them invalid, the
    repair keeps the same area, and no warning is given (pytest turns one into an error)."""
    ring = [(0, 0), (1000, 0), (1000, 1000), (500, 1000), (600, 500), (400, 500), (500, 1000)]
    touching = shapely.Polygon([(X0 + a, Y0 + b) for a, b in [*ring, (0, 1000)]])
    assert shapely.is_valid_reason(touching).startswith("Ring Self-intersection")
    out = read_outlines(_write(tmp_path / "g.gpkg", ["T"], [touching]), GRID, "RGIId")
    assert out is not None and out.geometry.iloc[0].is_valid
    assert out.geometry.iloc[0].area == pytest.approx(touching.area) == 950000.0


def test_empty_null_and_lineal_geometries_dropped_with_one_warning_each(tmp_path: Path) -> None:
    line = shapely.LineString([(X0 + 10, Y0 + 10), (X0 + 900, Y0 + 900)])
    path = _write(
        tmp_path / "g.gpkg",
        ["G1", "G2", "G3", "G4", "G5"],
        [_square(0, 0), shapely.Polygon(), None, line, _square(900, 900)],
    )
    with pytest.warns(MbcubeWarning) as record:
        out = read_outlines(path, GRID, "RGIId")
    empty, lineal = _messages(record.list)
    assert "2 glacier outlines without geometry (null or empty) dropped: G2, G3." in empty
    assert "1 glacier outline with no polygonal area" in lineal and "dropped: G4." in lineal
    assert out is not None
    assert list(out["RGIId"]) == ["G1", "G5"] and list(out.index) == [0, 4]  # file positions


def test_outlines_partly_outside_the_grid_are_named(tmp_path: Path) -> None:
    outside = [_square(4000 + 400 * i, 0) for i in range(11)] + [_square(-300, 0)]  # last: touches
    inside = [_square(0, 0), _square(-150, 1000)]  # the second crosses the west edge
    ids = [f"OUT{i:02d}" for i in range(12)] + ["IN0", "IN1"]
    path = _write(tmp_path / "g.gpkg", ids, outside + inside)
    with pytest.warns(MbcubeWarning) as record:
        out = read_outlines(path, GRID, "RGIId")
    (message,) = _messages(record.list)
    assert "12 glacier outlines outside the grid (500000.0, 3997000.0, 503000.0, 4000000.0)" in (
        message
    )
    assert ", ".join(ids[:10]) + ", ... (first 10 of 12)" in message
    assert "IN0" not in message and "IN1" not in message
    assert out is not None and len(out) == 14  # kept: ingest burns nothing for them


def test_outlines_all_outside_the_grid_are_an_error_naming_the_crs(tmp_path: Path) -> None:
    # metric coordinates tagged as lon/lat: the tag is wrong, the reprojection gives inf
    path = _write(
        tmp_path / "g.gpkg", ["A", "B", "C"], [_square(0, 0), _square(500, 0), _square(0, 500)]
    )
    wrong = gpd.read_file(path).set_crs("EPSG:4326", allow_override=True)
    wrong.to_file(tmp_path / "wrong.gpkg")
    with pytest.raises(StudyError) as info:
        read_outlines(tmp_path / "wrong.gpkg", GRID, "RGIId")
    assert "none of the 3 glacier outlines overlaps the grid (500000.0, 3997000.0, " in str(
        info.value
    )
    assert "in EPSG:32643 (file CRS EPSG:4326): check the CRS tag" in str(info.value)
    # far away in the right CRS: the same problem, appended to a list when one is given
    far = _write(tmp_path / "far.gpkg", ["A"], [_square(50000, 0)])
    problems: list[str] = []
    assert read_outlines(far, GRID, "RGIId", problems=problems) is None
    (line,) = problems
    assert line.startswith(f"{far}: none of the 1 glacier outline overlaps the grid")


def test_outlines_in_lonlat_are_reprojected_to_the_grid(tmp_path: Path) -> None:
    squares = gpd.GeoSeries([_square(0, 0, 600), _square(1200, 900, 900)], crs=CRS)
    path = _write(tmp_path / "g.gpkg", ["A", "B"], list(squares.to_crs(4326)), "EPSG:4326")
    out = read_outlines(path, GRID, "RGIId")
    assert out is not None and out.crs == CRS
    expected = gpd.read_file(path).to_crs(CRS).area.to_numpy()
    np.testing.assert_allclose(out.area.to_numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(out.area.to_numpy(), [360000.0, 810000.0], rtol=1e-6)


def test_regions_outside_the_grid_are_expected_but_not_all_of_them(tmp_path: Path) -> None:
    path = tmp_path / "r.gpkg"
    gpd.GeoDataFrame(
        {"name": ["here", "elsewhere"]}, geometry=[_square(0, 0, 5000), _square(9000, 0)], crs=CRS
    ).to_file(path)
    out = read_regions(path, GRID, "name")  # no warning for "elsewhere"
    assert out is not None and list(out["name"]) == ["here", "elsewhere"]
    gpd.GeoDataFrame({"name": ["elsewhere"]}, geometry=[_square(9000, 0)], crs=CRS).to_file(path)
    with pytest.raises(StudyError, match="none of the 1 region polygon overlaps the grid"):
        read_regions(path, GRID, "name")


def test_file_problems_listed_together(tmp_path: Path) -> None:
    """No CRS and a repeated id: both named at once; an unreadable file is named too."""
    path = tmp_path / "g.gpkg"
    with pytest.warns(UserWarning, match="'crs' was not provided"):  # pyogrio, writing it
        gpd.GeoDataFrame({"RGIId": ["A", "B", "A"]}, geometry=[_square(0, 0)] * 3).to_file(path)
    problems: list[str] = []
    assert read_outlines(path, GRID, "RGIId", problems=problems) is None
    assert problems == [
        f"{path}: no CRS. Save the file with its CRS (e.g. ogr2ogr -a_srs).",
        f"{path}: column 'RGIId' has duplicate values ['A']; ids must be unique.",
    ]
    (tmp_path / "bad.gpkg").write_text("not a GeoPackage")
    with pytest.raises(StudyError, match=r"bad\.gpkg: not a vector file OGR can read"):
        read_regions(tmp_path / "bad.gpkg", GRID, "name")


def test_polygonal_part_keeps_polygons_only() -> None:
    a, b = shapely.box(0, 0, 1, 1), shapely.box(2, 0, 3, 1)
    mixed = shapely.GeometryCollection(
        [shapely.MultiPolygon([a, b]), shapely.LineString([(0, 0), (5, 5)]), shapely.Point(9, 9)]
    )
    part = polygonal_part(mixed)
    assert part.geom_type == "MultiPolygon" and part.area == 2.0 and part.equals(a.union(b))
    assert polygonal_part(shapely.LineString([(0, 0), (1, 1)])).is_empty
    assert polygonal_part(a) is a


def test_study_outline_repaired_before_any_pixel_work(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """A bow-tie added to the tiny study: load_study names it with its area change and holds the
    repaired outlines in the grid CRS and file order (ingest burns ids 1..N in that order)."""
    study = study_copy(tiny_study)
    frame = gpd.read_file(study / "glaciers.gpkg")
    tie = gpd.GeoSeries([_bow_tie(2000, 2000, 0.8)], crs=CRS).to_crs(frame.crs)
    row = frame.iloc[[0]].assign(RGIId="RGI60-99.99999", geometry=list(tie))
    frame = pd.concat([frame.iloc[:5], row, frame.iloc[5:]], ignore_index=True)
    frame.to_file(study / "glaciers.gpkg")
    written = gpd.read_file(study / "glaciers.gpkg").to_crs(CRS).geometry.iloc[5]
    before, after = written.area / 1e6, shapely.make_valid(written).area / 1e6
    assert (before, after) == pytest.approx((0.375 * 0.64, 0.625 * 0.64), rel=1e-3)
    with pytest.warns(MbcubeWarning) as record:
        loaded = load_study(study)
    (message,) = _messages(record.list)
    assert f"RGI60-99.99999 {before:.3f} -> {after:.3f} km2" in message
    assert str(study / "glaciers.gpkg") in message
    assert list(loaded.outlines["RGIId"]) == list(frame["RGIId"])
    assert loaded.outlines.crs == loaded.grid.crs and loaded.outlines.is_valid.all()


def test_tiny_studies_load_outlines_and_regions_without_warnings(
    tiny_study: Path, tiny_dem_study: Path
) -> None:
    for root in (tiny_study, tiny_dem_study):
        with warnings.catch_warnings():
            warnings.simplefilter("error", MbcubeWarning)
            study = load_study(root)
        file = gpd.read_file(study.glaciers)
        assert list(study.outlines["RGIId"]) == list(file["RGIId"])
        assert study.outlines.crs == study.grid.crs == CRS
        np.testing.assert_allclose(
            study.outlines.area.to_numpy(), file.to_crs(CRS).area.to_numpy(), rtol=1e-12
        )
        assert study.regions_frame is not None and len(study.regions_frame) == 3


# ---------------------------------------------------------------- ids, surge, overlaps, tiny ones


def _write_frame(
    path: Path, columns: dict[str, list[object]], geoms: list[shapely.Geometry]
) -> Path:
    gpd.GeoDataFrame(columns, geometry=geoms, crs=CRS).to_file(path)
    return path


def test_empty_and_null_ids_are_one_problem_naming_the_features(tmp_path: Path) -> None:
    """Two null ids and a blank one: one problem naming features 2, 3 and 5 (not 'duplicate
    values [nan]'); a real duplicate is still named on its own line."""
    squares = [_square(400 * i, 0) for i in range(6)]
    path = _write_frame(tmp_path / "g.gpkg", {"RGIId": ["A", None, None, "B", "  ", "B"]}, squares)
    problems: list[str] = []
    assert read_outlines(path, GRID, "RGIId", problems=problems) is None
    assert problems == [
        f"{path}: 3 glacier outlines with an empty or null id column 'RGIId', at feature(s) 2, "
        "3, 5 (1-based, in file order). Give every glacier outline its id.",
        f"{path}: column 'RGIId' has duplicate values ['B']; ids must be unique.",
    ]
    regions = _write_frame(tmp_path / "r.gpkg", {"name": ["west", ""]}, squares[:2])
    with pytest.raises(StudyError, match=r"1 region polygon with an empty or null region name "):
        read_regions(regions, GRID, "name")


def test_surge_values_other_than_0_1_or_empty_are_refused(tmp_path: Path) -> None:
    squares = [_square(400 * i, 0) for i in range(6)]
    ids = [f"G{i}" for i in range(1, 7)]
    good = _write_frame(
        tmp_path / "ok.gpkg", {"RGIId": ids, "surge": [0, 1, None, 1, 0, 0]}, squares
    )
    out = read_outlines(good, GRID, "RGIId", surge_column="surge")
    assert out is not None and len(out) == 6
    path = _write_frame(
        tmp_path / "g.gpkg", {"RGIId": ids, "surge": ["0", "1", "", "5", "yes", "1.0"]}, squares
    )
    problems: list[str] = []
    assert read_outlines(path, GRID, "RGIId", surge_column="surge", problems=problems) is None
    assert problems == [
        f"{path}: column 'surge' (study.yaml surge_column) must hold 0, 1 or nothing (unknown); "
        "2 glacier outlines hold other values: G4 (5), G5 (yes). Correct them, or set "
        "surge_column in study.yaml (null: no surge column)."
    ]
    assert read_outlines(path, GRID, "RGIId") is not None  # no surge column named: not read


def _burnt_pixels(out: gpd.GeoDataFrame) -> np.ndarray:
    """Pixels per glacier (1..N) when burnt as ingest burns them (file order, later wins)."""
    from mbcube.ingest import vector_layer

    ids = vector_layer(out.geometry, np.arange(1, len(out) + 1), GRID, "int32", "t").compute()
    return np.bincount(ids.ravel(), minlength=len(out) + 1)[1:]


def test_overlapping_outlines_named_with_area_and_who_takes_it(tmp_path: Path) -> None:
    """G1/G2 overlap by half of G1 (0.045 km2): named, G2 takes it; G3 lies inside the later G4:
    named, it gets no pixel. A 1 m sliver (300 m2 < one 900 m2 pixel) and 10 m along 1.5 km
    (15,000 m2 < 1 % of 2.25 km2) are silent. The claims are checked by burning the outlines."""
    geoms = [
        _square(0, 0),
        _square(150, 0),
        _square(600, 100, 100),
        _square(500, 0),
        _square(1000, 0),
        _square(1299, 0),
        shapely.box(X0, Y0 + 1500, X0 + 1500, Y0 + 3000),
        shapely.box(X0 + 1490, Y0 + 1500, X0 + 2990, Y0 + 3000),
    ]
    ids = ["G1", "G2", "G3", "G4", "S1", "S2", "B1", "B2"]
    path = _write(tmp_path / "g.gpkg", ids, geoms)
    with pytest.warns(MbcubeWarning) as record:
        out = read_outlines(path, GRID, "RGIId")
    (message,) = _messages(record.list)
    assert message == (
        f"{path}: 2 pairs of glacier outlines overlap by more than 1% of the smaller and one "
        "pixel (900 m2); the later outline in the file takes the overlap and the earlier glacier "
        "loses those pixels; largest first: G1 / G2 0.045 km2 (to G2), G3 / G4 0.010 km2 (to "
        "G4, all of G3: it gets no pixel). Fix the outlines."
    )
    assert out is not None
    pixels = dict(zip(ids, _burnt_pixels(out).tolist(), strict=True))
    assert pixels["G3"] == 0 and pixels["G4"] == 100  # 300 m x 300 m: 10 x 10 pixels
    assert pixels["G2"] == 100 and pixels["G1"] == 50  # G1 keeps the half G2 does not cover
    assert pixels["B1"] == pixels["B2"] == 50 * 50  # the 10 m overlap holds no pixel centre


def test_outlines_smaller_than_a_pixel_without_a_pixel_centre_are_named(tmp_path: Path) -> None:
    """Pixel centres are 15 m + k x 30 m from the grid's corner. T1 (26 m square between
    centres) and T2 (a 5 m x 100 m strip between columns) get no pixel: named, their mass
    balance NaN. T3 (20 m around a centre) gets one pixel and a result: silent."""
    geoms = [
        _square(0, 0, 600),
        _square(1017, 17, 26),
        shapely.box(X0 + 1518, Y0 + 10, X0 + 1523, Y0 + 110),
        _square(2005, 5, 20),
    ]
    ids = ["BIG", "T1", "T2", "T3"]
    path = _write(tmp_path / "g.gpkg", ids, geoms)
    with pytest.warns(MbcubeWarning) as record:
        out = read_outlines(path, GRID, "RGIId")
    (message,) = _messages(record.list)
    assert message == (
        f"{path}: 2 glacier outlines smaller than one grid pixel (30 m x 30 m) hold no pixel "
        "centre, so get no pixel: their mass balance will be NaN: T1, T2. Use a finer grid "
        "(study.yaml grid.res_m) or leave them out."
    )
    assert out is not None
    assert _burnt_pixels(out).tolist() == [400, 0, 0, 1]


def test_overlap_check_finds_pairs_as_a_brute_force_oracle() -> None:
    """overlapping_pairs (STRtree, relate, then intersection) against every pair intersected."""
    from mbcube.outlines import overlapping_pairs

    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 3000, (80, 2))
    geoms = shapely.buffer(shapely.points(centres), rng.uniform(20, 200, 80), quad_segs=4)
    i, j, area = overlapping_pairs(geoms, 900.0)
    found = {(int(a), int(b)): float(c) for a, b, c in zip(i, j, area, strict=True)}
    expected = {}
    for a in range(80):
        for b in range(a + 1, 80):
            overlap = geoms[a].intersection(geoms[b]).area
            if overlap > 900 and overlap > 0.01 * min(geoms[a].area, geoms[b].area):
                expected[(a, b)] = overlap
    assert len(expected) > 20 and found.keys() == expected.keys()
    np.testing.assert_allclose([found[k] for k in expected], list(expected.values()), rtol=1e-9)


def test_synthetic_studies_load_without_warnings(tmp_path: Path) -> None:
    """The mixed study and seed 7 with 30 glaciers (tiny and tiny --kind dem: above) have no
    overlapping or pixel-less outlines and surge values 0/1 only: no warning, no problem."""
    from mbcube.synth import generate_study

    for name, overrides in [("mixed", {"kind": "mixed"}), ("seed7", {"seed": 7, "n_glaciers": 30})]:
        root = generate_study(tmp_path / name, "tiny", **overrides)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MbcubeWarning)
            study = load_study(root)
        assert study.outlines["surge"].isin([0, 1]).all()


def test_pixel_centre_search_agrees_with_the_burn() -> None:
    """Random small triangles and squares (< one pixel, anywhere on the grid and across its
    edge): holding a pixel centre <=> rasterio burns at least one pixel of them (as ingest)."""
    import rasterio.features

    from mbcube.outlines import _holds_pixel

    rng = np.random.default_rng(11)
    held = 0
    for k in range(300):
        x, y = rng.uniform(-40, 3040, 2)
        size = rng.uniform(5, 40)
        geom = (
            shapely.box(X0 + x, Y0 + y, X0 + x + size, Y0 + y + size * 0.6)
            if k % 2
            else shapely.Polygon(
                [(X0 + x, Y0 + y), (X0 + x + size, Y0 + y), (X0 + x, Y0 + y + size)]
            )
        )
        burnt = rasterio.features.rasterize(
            [(geom, 1)], out_shape=GRID.shape, transform=GRID.transform, dtype="uint8"
        )
        assert _holds_pixel(geom, GRID) == bool(burnt.any()), geom.wkt
        held += bool(burnt.any())
    assert 50 < held < 250  # both cases well represented
