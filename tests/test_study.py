"""The study contract: every bad input gives one clear error naming file, row and field,
before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
        t.loc[1, "dem"] = t.loc[1, "phase"]  # an insar row with a DEM file
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
