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


# ---------------------------------------------------------------- one pass, one line each


def _problems(message: str) -> list[str]:
    """The problem lines of a StudyError's message, checking that each problem is one line."""
    head, *lines = message.split("\n")
    count = int(head.split(" has ")[1].split(" problem")[0])
    assert len(lines) == count, f"{count} problems on {len(lines)} lines:\n{message}"
    assert all(line.startswith("  - ") and line.strip() != "-" for line in lines), message
    return [line[4:] for line in lines]


def _rewrite_csv(study: Path, edit: Callable[[list[str]], list[str]]) -> Path:
    csv = study / "scenes.csv"
    csv.write_text("\n".join(edit(csv.read_text().splitlines())) + "\n")
    return csv


def test_trailing_commas_of_spreadsheet_exports_are_accepted(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """A trailing comma on every data row (and on the header, or several, and a row of commas
    only) adds only empty fields: accepted, the same scenes as without them."""
    study = study_copy(tiny_study)
    expected = load_study(study).scenes
    _rewrite_csv(study, lambda lines: [lines[0], *(f"{line}," for line in lines[1:])])
    assert load_study(study).scenes == expected
    _rewrite_csv(study, lambda lines: [f"{line},," for line in lines] + [",,,,"])
    assert load_study(study).scenes == expected
    csv = study / "scenes.csv"  # Excel's UTF-8 CSV: a byte-order mark and CRLF line ends
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_text().replace("\n", "\r\n").encode())
    assert load_study(study).scenes == expected


def test_row_with_more_or_fewer_fields_is_one_line_naming_the_row(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """h_amb written with a decimal comma (62,9) gives row 2 one field too many; a row cut
    short has too few; a non-empty field after a trailing comma is too many as well."""
    study = study_copy(tiny_study)

    def edit(lines: list[str]) -> list[str]:
        lines[1] = lines[1].replace(",48.857,", ",62,9,")
        lines[2] = ",".join(lines[2].split(",")[:5])
        lines[3] = lines[3] + ",,x"
        return lines

    csv = _rewrite_csv(study, edit)
    problems = _problems(_load_error(study))
    assert problems == [
        f"{csv} row 2: 10 fields, the header has 9 (scene_id,date,kind,phase,coherence,h_amb,"
        'mask,dem,nlooks). Quote a value holding a comma ("62,9"), write decimals with a point '
        "(62.9), and remove extra fields.",
        f"{csv} row 3: 5 fields, the header has 9 (scene_id,date,kind,phase,coherence,h_amb,"
        "mask,dem,nlooks). Give every column a field, empty ones too (',,').",
        f"{csv} row 4: 11 fields, the header has 9 (scene_id,date,kind,phase,coherence,h_amb,"
        'mask,dem,nlooks). Quote a value holding a comma ("62,9"), write decimals with a point '
        "(62.9), and remove extra fields.",
    ]
    _rewrite_csv(
        study, lambda lines: [lines[0], lines[1].replace(",62,9,", ',"62.9",'), lines[3][:-3]]
    )
    assert [s.h_amb_m for s in load_study(study).scenes] == [62.9, 43.552]  # quoted: one field


def test_csv_syntax_errors_are_one_line(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """A quote never closed, a stray quote, a NUL byte and a header naming a column twice: one
    line each, naming the file (and line) and the fix; never a traceback."""
    study = study_copy(tiny_study)
    header, row, *rest = (study / "scenes.csv").read_text().splitlines()
    csv = _rewrite_csv(study, lambda _: [header, *rest, row.replace(",insar,", ',"insar,')])
    (line,) = _problems(_load_error(study))
    assert line.startswith(f"{csv}: not a readable CSV at line 4 (unexpected end of data)")
    assert line.endswith("its quotes doubled).")
    _rewrite_csv(study, lambda _: [header, row.replace(",insar,", ',"insar"x,'), *rest])
    (line,) = _problems(_load_error(study))
    assert "not a readable CSV at line 2 (',' expected after '\"')" in line
    _rewrite_csv(study, lambda _: [header, row.replace(",insar,", ",ins\0ar,"), *rest])
    assert _problems(_load_error(study)) == [
        f"{csv} row 2: holds a NUL character. Save the file as UTF-8 text."
    ]
    _rewrite_csv(study, lambda _: [header.replace("nlooks", "date"), row, *rest])
    assert _problems(_load_error(study)) == [
        f"{csv} line 1: column(s) ['date'] appear more than once."
    ]


def _write_yaml(study: Path, text: str) -> Path:
    (study / "study.yaml").write_text(text)
    return study / "study.yaml"


def test_yaml_value_error_is_one_line_naming_the_key(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """2000-02-30 is a YAML date whose day does not exist: YAML's own parser raised a bare
    ValueError (a 158-line traceback); now one line naming the key, its line and the fix."""
    study = study_copy(tiny_study)
    path = _write_yaml(study, "grid:\n  tile_px: 128\nreference_date: 2000-02-30\n")
    message = _load_error(study)
    assert message == (
        f"{path}: key 'reference_date' at line 3: value '2000-02-30' cannot be read (day is out "
        "of range for month). Correct it (dates as YYYY-MM-DD)."
    )
    _write_yaml(study, "corrections:\n  seasonal_offset_m:\n    10: 2001-13-01\n")
    assert "key 'corrections.seasonal_offset_m.10' at line 3: value '2001-13-01'" in (
        _load_error(study)
    )


def test_yaml_syntax_errors_are_one_line_with_line_and_column(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    study = study_copy(tiny_study)
    path = _write_yaml(study, "grid:\n  tile_px: 128\n   res_m: 30\n")
    assert _load_error(study) == (
        f"{path}: not valid YAML at line 3, column 9: mapping values are not allowed here. Fix "
        "the syntax there: indent with spaces, write 'key: value', quote values holding ': ' or "
        "' #'."
    )
    _write_yaml(study, "grid: {tile_px: 128\nreference_date: 2000-02-16\n")
    message = _load_error(study)
    assert "\n" not in message
    assert "not valid YAML at line 2, column 15: expected ',' or '}', but got ':', while " in (
        message
    )
    assert "parsing a flow mapping (line 1)" in message


def test_duplicate_yaml_keys_are_refused_naming_the_key(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """A key given twice (the last silently won) is refused at every level; a merge key (<<)
    may still be overridden, and everything else reads as yaml.safe_load reads it."""
    import yaml

    study = study_copy(tiny_study)
    path = _write_yaml(study, "reference_date: 2000-02-16\nreference_date: 2011-01-01\n")
    assert _load_error(study) == (
        f"{path}: key 'reference_date' is given twice (lines 1 and 2); YAML would silently keep "
        "the last. Keep one."
    )
    _write_yaml(study, "checks:\n  h_amb_max_m: 3000\n  h_amb_min_m: 1\n  h_amb_max_m: 6000\n")
    assert "key 'checks.h_amb_max_m' is given twice (lines 2 and 4)" in _load_error(study)
    text = (
        "grid: {tile_px: 128}\nchecks:\n  <<: {h_amb_max_m: 3000, h_amb_min_m: 1}\n"
        "  h_amb_max_m: 6000\nreference_date: 2000-02-16\n"
    )
    _write_yaml(study, text)
    config = load_study(study).config
    assert (config.checks.h_amb_min_m, config.checks.h_amb_max_m) == (1.0, 6000.0)
    assert yaml.safe_load(text)["checks"] == {"h_amb_max_m": 6000, "h_amb_min_m": 1}


@pytest.mark.parametrize(
    ("scene_id", "expected"),
    [
        ("zarr.json", "'zarr.json' is the name of Zarr's metadata file. Rename the scene."),
        ("ZARR.JSON", "'ZARR.JSON' is the name of Zarr's metadata file. Rename the scene."),
        ("__S01", "'__S01' starts with '_', which names the store's own records"),
        ("..", "'..' is made of dots only, a relative path. Rename the scene."),
        ("a/b", "'a/b' holds '/' or '\\'; it must be one file name. Rename the scene."),
        ("a\\b", "'a\\\\b' holds '/' or '\\'; it must be one file name. Rename the scene."),
        ("x" * 300, f"'{'x' * 40}'... (300 characters) is longer than 128 characters."),
        ('"a\nb"', "'a\\nb' holds a line break, tab or other control character. Remove it."),
    ],
    ids=["zarr-json", "zarr-json-upper", "dunder", "dot-dot", "slash", "backslash", "long", "nl"],
)
def test_unsafe_scene_ids_are_refused_in_the_study_check(
    tiny_study: Path, study_copy: Callable[[Path], Path], scene_id: str, expected: str
) -> None:
    study = study_copy(tiny_study)
    csv = _rewrite_csv(study, lambda lines: [lines[0], f"{scene_id}{lines[1][12:]}", *lines[2:]])
    (line,) = _problems(_load_error(study))
    assert line.startswith(f"{csv} row 2, field scene_id: {expected}"), line


def test_scene_ids_differing_only_in_case_are_refused(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    study = study_copy(tiny_study)
    _edit_scenes(study, lambda t: t.assign(scene_id=["S01", "s01", "é" * 128]))
    (line,) = _problems(_load_error(study))
    assert line.endswith(
        "row 3, field scene_id: 's01' differs from 'S01' (row 2) only in case, which names the "
        "same store group on case-insensitive file systems. Rename one."
    )


def test_outlier_groups_of_unusual_ids_get_safe_names() -> None:
    """Ids that are not safe as one Zarr node and file name map to scene_<index>: zarr.json (any
    case), 129+ characters (a 300-character one failed with 'File name too long'), non-ASCII
    letters (255 bytes hold fewer of them); the usual ids keep their name."""
    from mbcube.store import outlier_group_name

    assert outlier_group_name("S01_20111019", 0) == "outliers/S01_20111019"
    assert outlier_group_name("x" * 128, 1) == f"outliers/{'x' * 128}"
    for unusual in ["zarr.json", "Zarr.JSON", "x" * 129, "é" * 100, "...", "__a", "a b", ""]:
        assert outlier_group_name(unusual, 7) == "outliers/scene_7", unusual


def _scale_raster(path: Path, factor: float) -> tuple[float, float]:
    """Multiply a raster's values by `factor` in place; its finite min and max after."""
    with rasterio.open(path, "r+") as ds:
        values = ds.read(1) * factor
        ds.write(values, 1)
    return float(np.nanmin(values)), float(np.nanmax(values))


def test_phase_in_degrees_and_coherence_in_percent_listed_at_once(
    tiny_study: Path, study_copy: Callable[[Path], Path]
) -> None:
    """Both found up front by a decimated read, in one error, before anything is made (they
    were found one per run, after the cube was created)."""
    study = study_copy(tiny_study)
    phase = study / "scenes" / "S01_20111019_phase.tif"
    coherence = study / "scenes" / "S03_20111218_coh.tif"
    phase_deg = _scale_raster(phase, 180 / np.pi)
    coh_pct = _scale_raster(coherence, 100.0)
    assert phase_deg[0] < -170 and phase_deg[1] > 170 and coh_pct[1] > 90
    problems = _problems(_load_error(study))
    assert len(problems) == 2
    first, second = problems
    assert first.startswith(f"{study}/scenes.csv row 2, field phase: {phase} has values ")
    assert first.endswith(
        "outside [-3.142, 3.142]: give the wrapped phase in radians (degrees x pi / 180)."
    )
    low, high = (float(v) for v in first.split("has values ")[1].split(",")[0].split(" to "))
    assert phase_deg[0] - 0.05 <= low < -170 and 170 < high <= phase_deg[1] + 0.05  # 4 digits
    assert second.startswith(f"{study}/scenes.csv row 4, field coherence: {coherence} has ")
    assert second.endswith(
        "outside [0, 1]: give coherence as a fraction in [0, 1] (a percentage / 100)."
    )
    _scale_raster(phase, np.pi / 180)  # back to radians (float32 rounding stays in tolerance)
    _scale_raster(coherence, 0.01)
    assert len(load_study(study).scenes) == 3


def test_phase_check_reads_a_large_raster_decimated(tmp_path: Path) -> None:
    """A 1000 x 1000 phase raster is read at 250 x 250 (step 4, nearest pixels; nodata left
    out); values within the tolerance of +-pi pass, a bad quarter is found with its range."""
    from rasterio.transform import from_origin

    from mbcube.study import H_AMB_CHECK_PX, _check_value_raster, _decimated, _Problems

    values = np.zeros((1000, 1000), dtype="float32")
    values[:, :500] = 3.1416  # within the tolerance of pi
    values[:10] = -9999.0  # nodata
    path = tmp_path / "phase.tif"
    profile = {"driver": "GTiff", "width": 1000, "height": 1000, "count": 1, "dtype": "float32"}
    transform = from_origin(500000, 4000000, 1, 1)
    with rasterio.open(
        path, "w", **profile, crs="EPSG:32643", transform=transform, nodata=-9999.0
    ) as ds:
        ds.write(values, 1)
    assert H_AMB_CHECK_PX == 256  # so 250 x 250 values, less 2 or 3 rows of nodata:
    assert 250 * 247 <= _decimated(path).size <= 250 * 248
    found = _Problems()
    _check_value_raster(path, "row 2", "phase", found)
    assert found.lines == []
    values[500:, 500:] = -4.0
    with rasterio.open(path, "r+") as ds:
        ds.write(values, 1)
    _check_value_raster(path, "row 2", "phase", found)
    assert found.lines == [
        f"row 2, field phase: {path} has values -4 to 3.142, outside [-3.142, 3.142]: give the "
        "wrapped phase in radians (degrees x pi / 180)."
    ]
