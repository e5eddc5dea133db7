"""Phase cycles in the report and figures (issue 14): on the `tongues` study run without repair,
the glaciers whose cycle is in doubt are listed with their numbers, named under the headline,
highlighted in the glacier table and marked in the figures; the tiny study finds no slips."""

from __future__ import annotations

import html
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mbcube import figures
from mbcube.errors import MbcubeWarning
from mbcube.pipeline import Pipeline, run
from mbcube.store import open_cube


def section(page: str, anchor: str) -> str:
    """The HTML of the report section with this anchor (up to the next heading)."""
    return page.split(f'<h2 id="{anchor}">')[1].split("</h2>", 1)[1].split("<h2 ")[0]


def rows(part: str) -> list[tuple[str, list[str]]]:
    """The body rows of the tables in `part`: (CSS class, cell texts)."""
    out = []
    for cls, body in re.findall(r'<tr(?: class="([^"]*)")?>(.*?)</tr>', part):
        cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", body)]
        if cells:
            out.append((cls, cells))
    return out


def headers(part: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r"<th(?: [^>]*)?>(.*?)</th>", part)]


@pytest.fixture(scope="module")
def tiny_run(tiny_study: Path, tiny_cube: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny insar study run to the end from its ingested cube; its results folder."""
    root = tmp_path_factory.mktemp("tiny_run")
    store = Path(shutil.copytree(tiny_cube, root / "cube.zarr"))
    pipeline = Pipeline(study=tiny_study, store=store, out=root / "out", cluster="threads")
    with warnings.catch_warnings():  # small regions: the penetration table pools (a warning)
        warnings.simplefilter("ignore", MbcubeWarning)
        run(pipeline)
    return pipeline.out


def test_the_report_lists_the_glaciers_in_doubt_with_their_numbers(
    tongues_plain: Pipeline,
) -> None:
    glaciers = pd.read_csv(tongues_plain.out / "glaciers.csv")
    regions = pd.read_csv(tongues_plain.out / "regions.csv")
    doubt = glaciers[glaciers["unwrap_flag"] == 2]
    assert len(doubt) >= 2 and (glaciers["unwrap_flag"] != 1).all()  # no repair: none repaired
    page = (tongues_plain.out / "report.html").read_text()
    cycles = section(page, "cycles")

    # counts, area and share of the glacier area
    total = glaciers["area_km2"].sum()
    area, in_doubt = doubt["area_km2"].sum(), doubt["unwrap_doubt_area_km2"].sum()
    assert "<b>0 glaciers repaired by a prior</b>." in cycles
    assert (
        f"<b>{len(doubt)} glaciers in doubt</b>: {area:.3f} km² ({100 * area / total:.1f} % of "
        f"the {total:.3f} km² of glaciers), {in_doubt:.3f} km² of it in doubt "
        f"({100 * in_doubt / total:.1f} %)."
    ) in cycles
    study = regions[(regions["name"] == "all") & (regions["glaciers"] == "all")].iloc[0]
    assert study["sigma_unwrap_mwe_yr"] > 0.1
    assert (
        f"Study-wide, σ unwrap is {study['sigma_unwrap_mwe_yr']:.3f} of the "
        f"{study['mb_sigma_mwe_yr']:.3f} m w.e./yr uncertainty."
    ) in cycles

    # exactly the flagged glaciers, largest area in doubt first, with their numbers
    listed = rows(cycles)
    expected = doubt.sort_values("unwrap_doubt_area_km2", ascending=False)
    assert [cells[0] for _, cells in listed] == list(expected["RGIId"])
    for (cls, cells), g in zip(listed, expected.itertuples(), strict=True):
        assert cls == "doubt"
        assert cells == [
            g.RGIId,
            g.region,
            "in doubt",
            "none",
            "0.000",
            f"{g.unwrap_doubt_area_km2:.3f}",
            f"{g.mb_mwe_yr:.3f} ± {g.mb_sigma_mwe_yr:.3f}",
            f"{g.sigma_unwrap_mwe_yr:.3f}",
        ]
    assert (doubt["sigma_unwrap_mwe_yr"] > 0.1).all()  # m w.e./yr: a cycle on the area in doubt

    # named under the headline, highlighted in the glacier table
    note = page.split("<h2 ")[0].split('<p class="note">')[1].split("</p>")[0]
    assert note.startswith(f"{len(doubt)} glaciers with a phase cycle in doubt (")
    assert all(i in note for i in doubt["RGIId"])
    table = rows(section(page, "glaciers"))
    assert len(table) == len(glaciers)
    marked = [cells for cls, cells in table if cls == "doubt"]
    assert sorted(c[0] for c in marked) == sorted(doubt["RGIId"])
    assert all(
        c[headers(section(page, "glaciers")).index("unwrap_flag")] == "in doubt" for c in marked
    )


def test_the_unwrap_quality_table_counts_glaciers_per_scene(tongues_plain: Pipeline) -> None:
    """One row per scene with its counts of glaciers, not a column per glacier."""
    part = section((tongues_plain.out / "report.html").read_text(), "unwrap")
    names = headers(part)
    assert not [h for h in names if h.startswith(("unwrap_flag", "unwrap_doubt_px"))]
    assert names[:3] == ["scene", "glaciers_repaired", "glaciers_in_doubt"]
    ds = open_cube(tongues_plain.store)
    per_scene = (ds["unwrap_flag"].values == 2).sum(axis=1)
    listed = rows(part)
    assert [cells[0] for _, cells in listed] == [str(s) for s in ds["scene"].values]
    assert [int(cells[2]) for _, cells in listed] == per_scene.tolist()
    assert per_scene.sum() >= 2


def test_the_figures_mark_the_glaciers_in_doubt(tongues_plain: Pipeline) -> None:
    glaciers = pd.read_csv(tongues_plain.out / "glaciers.csv")
    doubt = glaciers[glaciers["unwrap_flag"] == 2]
    ds = open_cube(tongues_plain.store)
    centroid = {
        str(k): (x / 1e3, y / 1e3)
        for k, x, y in zip(
            ds["glacier_rgi_id"].values,
            ds["glacier_centroid_x_m"].values,
            ds["glacier_centroid_y_m"].values,
            strict=True,
        )
    }
    inp = figures.FigureInputs(tongues_plain.store, tongues_plain.out)
    ax = figures.mass_balance_map(inp).axes[0]
    rings = next(c for c in ax.collections if c.get_gid() == "glaciers_in_doubt")
    np.testing.assert_allclose(
        sorted(map(tuple, rings.get_offsets())), sorted(centroid[i] for i in doubt["RGIId"])
    )
    ax = figures.transect(inp).axes[0]
    rings = next(c for c in ax.collections if c.get_gid() == "glaciers_in_doubt")
    assert len(rings.get_offsets()) == len(doubt)
    region = str(doubt["region"].mode()[0])
    ax = figures.dhdt_map(inp, region).axes[0]
    assert any(c.get_gid() == "outlines_in_doubt" for c in ax.collections)
    n = int((doubt["region"] == region).sum())
    (text,) = [t for t in figures.elevation_profile(inp, region).axes[0].texts if t.get_gid()]
    assert (
        text.get_text()
        == f"includes {n} glacier{'s' if n > 1 else ''} whose phase cycle is in doubt"
    )
    captions = re.findall(
        r"<figcaption>(.*?)</figcaption>", (tongues_plain.out / "report.html").read_text()
    )
    assert (
        sum("Ringed in orange: glaciers whose phase cycle is in doubt." in c for c in captions) == 2
    )


def test_the_tiny_study_finds_no_cycle_slips(tiny_run: Path) -> None:
    glaciers = pd.read_csv(tiny_run / "glaciers.csv")
    assert (glaciers["unwrap_flag"] == 0).all() and (glaciers["sigma_unwrap_mwe_yr"] == 0).all()
    page = (tiny_run / "report.html").read_text()
    assert section(page, "cycles").strip() == (
        "<p>No cycle slips were found: the glacier profiles of every InSAR scene, and the scenes "
        f"compared with each other, put all {len(glaciers)} glaciers on one phase cycle.</p>"
    )
    assert 'class="doubt"' not in page and "in doubt" not in page.split("<h2 ")[0]
    assert "orange" not in page
