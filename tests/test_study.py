"""The study contract: every bad input gives one clear error naming file, row and field,
before anything is written."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio

from mbcube.errors import StudyError
from mbcube.ingest import ingest
from mbcube.study import load_study


def _edit_scenes(study: Path, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    table = pd.read_csv(study / "scenes.csv", dtype=str, keep_default_na=False)
    edit(table).to_csv(study / "scenes.csv", index=False)


def _expect_error(study: Path, tmp_path: Path, *fragments: str) -> str:
    """Ingest must fail with a StudyError holding every fragment, and write nothing."""
    store = tmp_path / "cube.zarr"
    with pytest.raises(StudyError) as info:
        ingest(study, store)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert not store.exists(), "nothing may be written when the study is invalid"
    return message


def test_valid_study_reads(tiny_study: Path) -> None:
    study = load_study(tiny_study)
    assert [s.kind for s in study.scenes] == ["insar"] * 3
    assert (
        study.grid.shape == (320, 320) and study.grid.res == 30.0 and study.grid.crs == "EPSG:32643"
    )
    assert isinstance(study.scenes[1].h_amb_m, Path)  # the raster h_amb
    assert isinstance(study.scenes[0].h_amb_m, float)
    assert study.config.massbalance.density_kg_m3 == 850.0
    assert study.config.corrections.seasonal_offset_m[10] == -0.28


def test_missing_scenes_csv(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    (study / "scenes.csv").unlink()
    _expect_error(study, tmp_path, "scenes.csv: missing")


def test_missing_reference(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    (study / "reference" / "srtm_c.tif").unlink()
    _expect_error(study, tmp_path, "srtm_c.tif", "reference DEM file not found")


def test_unknown_study_yaml_key(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    (study / "study.yaml").write_text("massbalance:\n  densty_kg_m3: 900\n")
    _expect_error(
        study, tmp_path, "study.yaml", "massbalance.densty_kg_m3", "Extra inputs are not permitted"
    )


def test_bad_yaml_value(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    (study / "study.yaml").write_text("massbalance:\n  bin_width_m: -50\n")
    _expect_error(study, tmp_path, "study.yaml", "massbalance.bin_width_m")


def test_bad_date_wrong_kind_files_and_all_listed(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)

    def edit(t: pd.DataFrame) -> pd.DataFrame:
        t.loc[0, "date"] = "2012-13-45"
        t["dem"] = np.where(t.index == 1, t["phase"], t["dem"])  # an insar row with a DEM file
        t.loc[2, "kind"] = "optical"
        return t

    _edit_scenes(study, edit)
    message = _expect_error(
        study,
        tmp_path,
        "row 2, field date: '2012-13-45' is not an ISO 8601 date",
        "row 3, field dem: belongs to kind 'dem', not 'insar'",
        "row 4, field kind: 'optical' must be 'insar' or 'dem'",
    )
    assert "3 problem(s)" in message


def test_missing_required_file_field(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)

    def edit(t: pd.DataFrame) -> pd.DataFrame:
        t.loc[0, "coherence"] = ""
        t.loc[1, "h_amb"] = "0"
        return t

    _edit_scenes(study, edit)
    _expect_error(
        study,
        tmp_path,
        "row 2, field coherence: required for kind 'insar'",
        "row 3, field h_amb: 0 must be",
    )


def test_missing_and_unreadable_rasters(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    (study / "scenes" / "broken.tif").write_text("not a raster")

    def edit(t: pd.DataFrame) -> pd.DataFrame:
        t.loc[0, "phase"] = "scenes/nowhere.tif"
        t.loc[2, "coherence"] = "scenes/broken.tif"
        return t

    _edit_scenes(study, edit)
    _expect_error(
        study,
        tmp_path,
        "nowhere.tif (",
        "row 2): field phase file not found",
        "broken.tif (",
        "row 4): field coherence is not a raster rasterio can read",
    )


def test_raster_outside_grid(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    src = study / "scenes" / "S01_20111019_coh.tif"
    with rasterio.open(src) as ds:
        profile, data = ds.profile, ds.read()
    profile["transform"] = profile["transform"] @ rasterio.Affine.translation(
        0, -100000
    )  # 3000 km south
    with rasterio.open(study / "scenes" / "far.tif", "w", **profile) as ds:
        ds.write(data)
    _edit_scenes(
        study, lambda t: t.assign(coherence=np.where(t.index == 0, "scenes/far.tif", t.coherence))
    )
    _expect_error(
        study, tmp_path, "far.tif", "row 2): field coherence does not overlap the study grid"
    )


def test_unknown_column_and_duplicate_id(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    _edit_scenes(study, lambda t: t.rename(columns={"nlooks": "n_looks"}))
    _expect_error(study, tmp_path, "unknown column(s) ['n_looks']")
    _edit_scenes(
        study, lambda t: t.rename(columns={"n_looks": "nlooks"}).assign(scene_id=["a", "a", "b"])
    )
    _expect_error(study, tmp_path, "row 3, field scene_id: 'a' is used twice")
    _edit_scenes(study, lambda t: t.assign(scene_id=["a", "_static", "b"]))
    _expect_error(study, tmp_path, "row 3, field scene_id: '_static' starts with '_'")


def test_outline_id_column_missing(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    (study / "study.yaml").write_text("glacier_id_column: GLIMSId\n")
    _expect_error(study, tmp_path, "glaciers.gpkg", "id column 'GLIMSId' not found", "RGIId")


def test_files_section_points_at_files_elsewhere(
    tiny_study: Path, study_copy: Callable[[Path], Path], tmp_path: Path
) -> None:
    study = study_copy(tiny_study)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (study / "reference" / "srtm_c.tif").rename(elsewhere / "dem.tif")
    (study / "glaciers.gpkg").rename(elsewhere / "outlines.gpkg")
    (study / "study.yaml").write_text(
        (study / "study.yaml").read_text()
        + "files:\n  reference_dem: ../elsewhere/dem.tif\n  glaciers: ../elsewhere/outlines.gpkg\n"
    )
    loaded = load_study(study)
    assert loaded.ref_dem == (elsewhere / "dem.tif").resolve()
    assert loaded.glaciers == (elsewhere / "outlines.gpkg").resolve()
    assert loaded.ref_dem_x is not None  # the default location still applies to the rest

    (study / "study.yaml").write_text("files:\n  reference_dem: ../nowhere/dem.tif\n")
    _expect_error(study, tmp_path, "study.yaml, key files: ../nowhere/dem.tif not found")


# ---------------------------------------------------------------- dates, h_amb, all at once


def _load_error(study: Path) -> str:
    """load_study must refuse the study with one StudyError; its message."""
    with pytest.raises(StudyError) as info:
        load_study(study)
    return str(info.value)


def _set(row: int, **fields: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(t: pd.DataFrame) -> pd.DataFrame:
        for name, value in fields.items():
            t.loc[row, name] = value
        return t

    return edit


TODAY = dt.date.today()
LATER = (TODAY + dt.timedelta(days=30)).isoformat()
SPAN = (
    "a scene must be dated at least 365 days after it. Correct the date, or set "
    "reference_date / checks.min_scene_span_days (or checks.allow_scenes_before_reference, "
    "for a later reference DEM) in study.yaml."
)


@pytest.mark.parametrize(
    ("date", "expected"),
    [
        ("1999-12-16", f"1999-12-16 is 62 days before the reference date 2000-02-16; {SPAN}"),
        ("2000-02-16", f"2000-02-16 is on the reference date 2000-02-16; {SPAN}"),
        ("2000-02-17", f"2000-02-17 is only 1 day after the reference date 2000-02-16; {SPAN}"),
        ("2001-02-14", "2001-02-14 is only 364 days after the reference date 2000-02-16"),
        (LATER, f"{LATER} is after today ({TODAY}). Correct the date."),
        ("2013-10-21garbage", "'2013-10-21garbage' is not an ISO 8601 date (YYYY-MM-DD, or a"),
        ("2013-10-21T25:00", "'2013-10-21T25:00' is not an ISO 8601 date"),
        ("21/10/2013", "'21/10/2013' is not an ISO 8601 date"),
    ],
    ids=[
        "before-reference",
        "on-reference",
        "day-after",
        "364-days-after",
        "after-today",
        "garbage",
        "hour-25",
        "day-month-year",
    ],
)
def test_bad_scene_date_is_refused(
    tiny_study: Path, study_copy: Callable[[Path], Path], date: str, expected: str
) -> None:
    study = study_copy(tiny_study)
    _edit_scenes(study, _set(0, date=date))
    message = _load_error(study)
    assert f"scenes.csv row 2, field date: {expected}" in message
    assert "has 1 problem(s)" in message


def test_date_time_is_accepted_and_its_date_taken(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    study = study_copy(tiny_study)
    _edit_scenes(study, _set(0, date="2011-10-19T05:12:00Z"))
    _edit_scenes(study, _set(1, date="2012-11-16 23:59:59.250+05:30"))  # the date as written
    scenes = load_study(study).scenes
    assert [s.date for s in scenes] == [
        dt.date(2011, 10, 19),
        dt.date(2012, 11, 16),
        dt.date(2011, 12, 18),
    ]


def test_span_limit_and_reference_date_are_set_in_study_yaml(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """The fixes the message names work: a shorter span allowed, another reference date."""
    study = study_copy(tiny_study)
    _edit_scenes(study, _set(0, date="2000-03-17"))  # 30 days after the reference
    assert "is only 30 days after" in _load_error(study)
    yaml = (study / "study.yaml").read_text()
    (study / "study.yaml").write_text(yaml + "checks:\n  min_scene_span_days: 30\n")
    assert load_study(study).scenes[0].date == dt.date(2000, 3, 17)
    (study / "study.yaml").write_text(yaml + "reference_date: 2011-01-01\n")
    message = _load_error(study)
    assert "has 2 problem(s)" in message
    assert "row 2, field date: 2000-03-17 is 3942 days before the reference date 2011-01-01" in (
        message
    )
    assert "row 4, field date: 2011-12-18 is only 351 days after the reference date" in message


@pytest.mark.parametrize(
    ("h_amb", "expected"),
    [
        ("-30", "-30 must be > 0: mbcube takes dh = phase_unw * h_amb / (2 pi), a positive phase"),
        ("1e-9", "1e-9 must lie in [2, 2000] m (checks.h_amb_min_m, checks.h_amb_max_m)"),
        ("5000", "5000 must lie in [2, 2000] m"),
        ("nan", "nan must be a finite non-zero height of ambiguity (m)"),
    ],
    ids=["negative", "tiny", "huge", "nan"],
)
def test_bad_h_amb_is_refused(
    tiny_study: Path, study_copy: Callable[[Path], Path], h_amb: str, expected: str
) -> None:
    study = study_copy(tiny_study)
    _edit_scenes(study, _set(0, h_amb=h_amb))
    message = _load_error(study)
    assert f"scenes.csv row 2, field h_amb: {expected}" in message
    assert "has 1 problem(s)" in message
    if h_amb == "-30":
        assert "Give |h_amb|, and negate the phase if your processor's phase decreases" in message


def test_h_amb_limits_are_set_in_study_yaml(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    study = study_copy(tiny_study)
    _edit_scenes(study, _set(0, h_amb="5000"))
    (study / "study.yaml").write_text(
        (study / "study.yaml").read_text() + "checks:\n  h_amb_max_m: 6000\n"
    )
    assert load_study(study).scenes[0].h_amb_m == 5000.0


def test_h_amb_raster_with_negative_values_is_refused(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    study = study_copy(tiny_study)
    raster = study / "scenes" / "S02_20121116_hamb.tif"
    with rasterio.open(raster, "r+") as ds:
        values = ds.read(1)
        values[200:, :] *= -1  # the lower third of the scene negated
        ds.write(values, 1)
    low = float(np.nanmin(values))
    assert low < -40
    message = _load_error(study)
    assert f"scenes.csv row 3, field h_amb: {raster} has values " in message
    assert "m; they must be > 0: mbcube takes dh = phase_unw * h_amb / (2 pi)" in message
    shown_low = float(message.split("has values ")[1].split(" to ")[0])
    assert low <= shown_low < -40  # read decimated: the most negative value may be skipped


def test_h_amb_raster_out_of_range_is_refused(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    study = study_copy(tiny_study)
    raster = study / "scenes" / "S02_20121116_hamb.tif"
    with rasterio.open(raster, "r+") as ds:
        values = ds.read(1)
        ds.write(values / 1000, 1)  # metres written as km
    message = _load_error(study)
    assert f"field h_amb: {raster} has values " in message
    assert "m; they must lie in [2, 2000] m" in message
    low, high = (float(v) for v in message.split("has values ")[1].split(" m;")[0].split(" to "))
    true_low, true_high = float(np.nanmin(values)) / 1000, float(np.nanmax(values)) / 1000
    assert (true_low, true_high) == pytest.approx((0.04137, 0.04571), abs=1e-5)
    assert true_low <= low < high <= true_high and high - low > 0.95 * (true_high - true_low)


def test_several_problems_in_one_error(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """A garbage date, a negative h_amb, a scene before the reference and outlines off the grid:
    one StudyError lists all four, one line each."""
    study = study_copy(tiny_study)
    _edit_scenes(study, _set(0, date="2013-10-21garbage"))
    _edit_scenes(study, _set(1, date="1999-01-01"))
    _edit_scenes(study, _set(2, h_amb="-30"))
    outlines = gpd.read_file(study / "glaciers.gpkg")
    outlines.geometry = outlines.geometry.translate(2.0, 0.0)  # 2 degrees east: off the grid
    outlines.to_file(study / "glaciers.gpkg")
    message = _load_error(study)
    lines = message.splitlines()
    assert lines[0] == f"study {study} has 4 problem(s):"
    assert len(lines) == 5
    expected = [
        "glaciers.gpkg: none of the 12 glacier outlines overlaps the grid",
        "row 2, field date: '2013-10-21garbage' is not an ISO 8601 date",
        "row 3, field date: 1999-01-01 is 411 days before the reference date 2000-02-16",
        "row 4, field h_amb: -30 must be > 0",
    ]
    for line, fragment in zip(lines[1:], expected, strict=True):
        assert line.startswith("  - ") and fragment in line, (fragment, line)


def test_scenes_before_a_later_reference_only_when_allowed() -> None:
    """A study whose reference DEM is the later one (Exploradores: a 2000 DEM against a 2012
    reference) sets checks.allow_scenes_before_reference; the minimum span holds both ways."""
    from mbcube.config import ChecksConfig
    from mbcube.study import date_problem

    reference = dt.date(2012, 3, 18)
    before = dt.date(2000, 2, 11)
    assert "4419 days before" in str(date_problem(before, reference, ChecksConfig()))
    allowed = ChecksConfig(allow_scenes_before_reference=True)
    assert date_problem(before, reference, allowed) is None
    near = reference - dt.timedelta(days=100)
    assert "at least 365 days before or after it" in str(date_problem(near, reference, allowed))
