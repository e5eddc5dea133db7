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
