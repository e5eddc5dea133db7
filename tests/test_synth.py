"""The synthetic generator: tile-independent, physically as documented, truth consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import rasterio
from typer.testing import CliRunner

from mbcube.cli import app
from mbcube.synth import generate_study
from mbcube.synth.scenes import snow_surface_m


def _read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _orbit_m(study: Path, scene: pd.Series) -> np.ndarray:
    """Datum + ramp of a scene on the grid, from the truth."""
    meta = json.loads((study / "truth" / "meta.json").read_text())
    with rasterio.open(study / "reference" / "srtm_c.tif") as src:
        rows, cols = np.indices(src.shape)
        x, y = rasterio.transform.xy(src.transform, rows.ravel(), cols.ravel())
        shape = src.shape
    xk = (np.reshape(x, shape) - meta["ramp_origin_m"][0]) / 1000.0
    yk = (np.reshape(y, shape) - meta["ramp_origin_m"][1]) / 1000.0
    return (
        scene.datum_m
        + scene.ramp_b_m_per_km * xk
        + scene.ramp_c_m_per_km * yk
        + scene.ramp_d_m_per_km2 * xk * yk
    )


def test_rasters_do_not_depend_on_the_tiling(tmp_path: Path) -> None:
    a = generate_study(
        tmp_path / "a", "tiny", size_px=200, tile_px=128, n_glaciers=6, other_crs=None
    )
    b = generate_study(
        tmp_path / "b", "tiny", size_px=200, tile_px=64, n_glaciers=6, other_crs=None
    )
    names = ["reference/srtm_c.tif", "ndsi.tif", "truth/dhdt_m_yr.tif"]
    names += [
        p for p in pd.read_csv(a / "scenes.csv")[["phase", "coherence", "mask"]].to_numpy().ravel()
    ]
    for name in names:
        np.testing.assert_array_equal(_read(a / name), _read(b / name), err_msg=name)
    pd.testing.assert_frame_equal(
        pd.read_csv(a / "truth/glaciers.csv"), pd.read_csv(b / "truth/glaciers.csv")
    )


def test_glacier_truth_is_the_mean_of_the_rate_raster(tiny_study: Path, tiny_cube: Path) -> None:
    import xarray as xr

    truth = pd.read_csv(tiny_study / "truth/glaciers.csv")
    rate = _read(tiny_study / "truth/dhdt_m_yr.tif")
    glacier_id = xr.open_zarr(tiny_cube)["glacier_id"].values
    sums = np.bincount(glacier_id.ravel(), weights=rate.ravel(), minlength=len(truth) + 1)[1:]
    np.testing.assert_allclose(truth["dhdt_m_yr"], sums / truth["n_px"], rtol=1e-5)
    np.testing.assert_allclose(truth["mb_mwe_yr"], truth["dhdt_m_yr"] * 0.85)
    assert (truth["area_km2"] > 0.3).all() and truth["dhdt_m_yr"].between(-4, 4).all()
    regions = pd.read_csv(tiny_study / "truth/regions.csv")
    for _, row in regions[regions["glaciers"] == "all"].iterrows():
        part = truth[truth["region"] == row["name"]]
        assert np.isclose(row["dhdt_m_yr"], np.average(part["dhdt_m_yr"], weights=part["area_km2"]))


def test_dem_scenes_follow_the_stated_physics(tmp_path: Path) -> None:
    """dem - srtm_c = rate * years + penetration(C - X) + seasonal + datum + ramp + noise."""
    study = generate_study(
        tmp_path / "s", "tiny", kind="dem", reference_sigma_m=0.0, seed=3, other_crs=None
    )
    srtm_c = _read(study / "reference/srtm_c.tif")
    rate = _read(study / "truth/dhdt_m_yr.tif")
    penetration = _read(study / "truth/penetration_m.tif")
    on_glacier = rate != 0
    scenes = pd.read_csv(study / "scenes.csv")
    truth = pd.read_csv(study / "truth/scenes.csv").set_index("scene_id")
    for _, row in scenes.iterrows():
        t = truth.loc[row.scene_id]
        dh = _read(study / row.dem) - srtm_c
        model = (
            rate * t.years
            + penetration
            + np.where(on_glacier, t.seasonal_offset_m, 0.0)
            + _orbit_m(study, t)
        )
        residual = (dh - model)[np.isfinite(dh)]
        assert abs(residual.mean()) < 0.15, row.scene_id  # scene noise 1 m, ~0.04 m on the mean
        assert 0.7 < residual.std() < 1.3, row.scene_id
        month = pd.Timestamp(row.date).month
        assert abs(t.seasonal_offset_m - snow_surface_m(month)) < 0.03 * 4 * 4  # within 4 sigma


def test_insar_phase_follows_the_stated_physics(tiny_study: Path) -> None:
    """phase = wrap(2 pi / h_amb * (dh + penetration + seasonal + datum + ramp) + noise(coherence))."""
    study = tiny_study
    rate = _read(study / "truth/dhdt_m_yr.tif")
    penetration = _read(study / "truth/penetration_m.tif")
    on_glacier = rate != 0
    scenes = pd.read_csv(study / "scenes.csv")
    truth = pd.read_csv(study / "truth/scenes.csv").set_index("scene_id")
    for _, row in scenes[truth.loc[scenes.scene_id, "crs"].to_numpy() == "EPSG:32643"].iterrows():
        t = truth.loc[row.scene_id]
        h_amb = _read(study / row.h_amb) if str(row.h_amb).endswith(".tif") else float(row.h_amb)
        dh = (
            rate * t.years
            + penetration
            + np.where(on_glacier, t.seasonal_offset_m, 0.0)
            + _orbit_m(study, t)
        )
        phase, coherence, mask = (_read(study / row[f]) for f in ("phase", "coherence", "mask"))
        good = np.isfinite(phase) & (coherence > 0.75) & (mask == 0)
        residual = np.angle(np.exp(1j * (phase - 2 * np.pi / h_amb * dh)))[good]
        assert abs(np.angle(np.mean(np.exp(1j * residual)))) < 0.05, row.scene_id
        assert np.quantile(np.abs(residual), 0.95) < 1.0, row.scene_id
        masked = (mask == 1)[np.isfinite(phase)]
        assert 0.005 < masked.mean() < 0.3, row.scene_id
        assert np.nanmean(coherence[(mask == 0) & ~on_glacier]) > np.nanmean(
            coherence[(mask == 0) & on_glacier]
        )


def test_cli_synth(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["synth", str(tmp_path / "s"), "--size", "128", "--glaciers", "3", "--kind", "mixed"]
    )
    assert result.exit_code == 0, result.output
    scenes = pd.read_csv(tmp_path / "s" / "scenes.csv")
    assert list(scenes["kind"]) == ["insar", "dem", "insar"]
    bad = runner.invoke(app, ["synth", str(tmp_path / "t"), "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.output
