"""The HTML report (mbcube.report) on a tiny DEM study with results built in tests/test_figures."""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mbcube.figures import make_figures
from mbcube.report import format_value, write_report
from tests.test_figures import Results, build_results


@pytest.fixture(scope="module")
def results(tiny_dem_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Results:
    return build_results(tiny_dem_study, tmp_path_factory.mktemp("report"))


def _cells(page: str) -> list[str]:
    return [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", page)]


def test_format_value_units_and_missing() -> None:
    assert format_value("mb_mwe_yr", -0.20531) == "-0.205"
    assert format_value("mb_mwe_yr", -0.0001) == "0.000"
    assert format_value("area_km2", 2.646) == "2.646"
    assert format_value("coverage_frac", 0.8789) == "87.9 %"
    assert format_value("n_glaciers", np.int64(4)) == "4"
    assert format_value("mb_mwe_yr", float("nan")) == "–"
    assert format_value("volume_km3_yr", -0.00063912) == "-0.0006391"


def test_report_holds_tables_scenes_corrections_and_figures(
    results: Results, tmp_path: Path
) -> None:
    shutil.copytree(results.tables, tmp_path / "out")
    made = make_figures(results.store, tmp_path / "out", tmp_path / "out" / "figures", dpi=40)
    path = write_report(results.store, tmp_path / "out", tmp_path / "out")  # finds the figures
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text()
    cells = _cells(page)
    # every region row: its mass balance with uncertainty, and its area
    for row in results.regions.itertuples():
        assert f"{row.mb_mwe_yr:.3f} ± {row.mb_sigma_mwe_yr:.3f}" in cells
        assert f"{row.area_km2:.3f}" in cells
        assert f"{row.dhdt_m_yr:.3f}" in cells
    # every glacier's id and mass balance
    for row in results.glaciers.itertuples():
        assert row.RGIId in cells
    assert {f"{v:.3f}" for v in results.glaciers["mb_mwe_yr"]} <= set(cells)
    # scenes with dates, kind and coverage; corrections per scene as written by build_results
    for i, scene in enumerate(["S01_20131005", "S02_20111117", "S03_20121206"]):
        assert scene in cells
        assert f"{0.1 * (i + 1):.3f}" in cells  # datum_offset_m
        assert f"{1.5 * i:.4g}" in cells  # coreg shift x
    assert "2011-11-17" in cells and "dem" in cells
    assert "87.9 %" in cells  # S01's glacier coverage recorded at ingest
    for header in (
        "datum_offset_m",
        "ramp_coef[3]",
        "coreg_shift_m[east]",
        "seasonal_offset_applied_m",
    ):
        assert f">{header}<" in page
    # penetration summary: the constant table of build_results, per region and surface
    assert cells.count("1.250") >= 3 * 2 * 3
    assert "unwrap_unwrapped_frac" in page and "70.0 %" in cells
    # DEM scenes only: no phase, no cycle slips to report
    assert "<p>No InSAR scenes: no phase was unwrapped, so no cycle can slip.</p>" in page
    # parameters recorded in the store
    assert "massbalance.density_kg_m3" in cells and "850.0" in cells
    # the figures in out/figures, linked by relative path
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) == len(made) == 2 * results.regions["name"].nunique() + 2
    assert all(im.startswith("figures/") and (tmp_path / "out" / im).exists() for im in images)
    assert "http" not in page.split("<body>")[1].split("Study parameters")[0]


def test_report_headline_is_the_study_wide_row(results: Results, tmp_path: Path) -> None:
    tables = Path(shutil.copytree(results.tables, tmp_path / "tables"))
    regions = results.regions
    study = regions.iloc[[0, 1]].assign(name="all", mb_mwe_yr=[-0.4321, -0.5], area_km2=12.5)
    pd.concat([study, regions]).to_csv(tables / "regions.csv", index=False)
    page = write_report(results.store, tables, tmp_path / "out", figures=[]).read_text()
    sigma = study["mb_sigma_mwe_yr"].iloc[0]
    assert f"Study-wide mass balance: <b>-0.432 ± {sigma:.3f} m w.e./yr</b>" in page
    assert "over 12.500 km²" in page


def test_report_notes_missing_parts(results: Results, tmp_path: Path) -> None:
    store = Path(shutil.copytree(results.store, tmp_path / "cube.zarr"))
    for group in ("stats", "hypsometry", "penetration"):
        shutil.rmtree(store / group)
    out = tmp_path / "out"
    path = write_report(store, tmp_path / "no_tables", out, figures=[])
    page = path.read_text()
    assert page.count('class="note"') >= 4
    assert "No regions.csv" in page and "No glaciers.csv" in page
    assert "No penetration table" in page and "No figures" in page
    # without figures given or present, the report makes those its inputs allow: the maps
    page = write_report(store, tmp_path / "no_tables", tmp_path / "out2").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert images and all(im.startswith("figures/dhdt_map_") for im in images)
    assert "S01_20131005" in page  # the scenes are still reported
