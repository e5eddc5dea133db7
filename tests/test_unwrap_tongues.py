"""Glacier tongues whose change exceeds h_amb / 2 at the outline (issue 14): slips found from
the glaciers' profiles, repaired with the data prior, flagged where nothing can repair them, and
an error term that covers what is left. Truth: the change each scene was made from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mbcube.config import UnwrapConfig
from mbcube.massbalance import cross_scene_doubt
from mbcube.pipeline import Pipeline
from mbcube.summary import cube_summary
from mbcube.uncertainty import unwrap_sigma_m_yr
from mbcube.unwrap import unwrap_numpy
from mbcube.unwrap.profiles import FLAG_DOUBT, FLAG_OK, FLAG_REPAIRED, PRIOR_DATA

H_AMB_M = 40.0


def tongue_scene(
    seed: int = 1, taper: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One glacier on a 256 px grid, elevation rising eastward, true dh -70 m at the tongue to
    +5 m at the head (a step into the ground at the outline unless `taper`), h_amb 40 m,
    coherence 0.6 on ice: phase, coherence, glacier id, elevation (m), true dh (m)."""
    rng = np.random.default_rng(seed)
    n = 256
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    z = 4000.0 + 6.0 * xx
    inside = ((xx - 140) / 100) ** 2 + ((yy - 128) / 35) ** 2
    glacier = (inside <= 1).astype(np.int32)
    zg = z[glacier == 1]
    dh = -70.0 + 75.0 * (z - zg.min()) / (zg.max() - zg.min())
    if taper:
        dh *= np.clip((1 - inside) * 4, 0, 1) * 0.3
    dh = np.where(glacier == 1, dh, 0.0)
    coherence = np.where(glacier == 1, 0.6, 0.85)
    sigma = np.sqrt(1 - coherence**2) / (coherence * np.sqrt(8))
    noise = sigma * rng.standard_normal((n, n))
    phase = np.angle(np.exp(1j * (2 * np.pi * dh / H_AMB_M + noise)))
    return phase, coherence, glacier, z, dh


def unwrapped(
    repair: str, radar_mask: np.ndarray | None = None, **scene: bool
) -> tuple[np.ndarray, np.ndarray, dict]:
    phase, coherence, glacier, z, truth = tongue_scene(**scene)
    _, _, dh, quality = unwrap_numpy(
        phase,
        coherence,
        H_AMB_M,
        radar_mask,
        (glacier == 0).astype(np.uint8),
        glacier_id=glacier,
        elevation_m=z,
        n_glaciers=1,
        config=UnwrapConfig(repair=repair),
    )
    on = (glacier == 1) & np.isfinite(dh)
    return (dh - truth)[on], on, quality


def test_a_tongue_beyond_half_a_cycle_is_found_and_repaired_by_the_data_prior() -> None:
    err, _, plain = unwrapped("none")
    slipped = int(np.count_nonzero(np.abs(err) > H_AMB_M / 2))
    assert slipped > 0.5 * err.size  # minimum-cost flow alone: most of the glacier one cycle off
    assert plain["unwrap_flag"][0] == FLAG_DOUBT
    assert abs(int(plain["unwrap_doubt_px"][0]) - slipped) <= 0.01 * err.size

    err, _, fixed = unwrapped("data")
    assert np.count_nonzero(np.abs(err) > H_AMB_M / 2) == 0
    assert abs(float(np.mean(err))) < 0.5  # m
    assert fixed["unwrap_flag"][0] == FLAG_REPAIRED
    assert fixed["unwrap_prior"][0] == PRIOR_DATA
    assert fixed["unwrap_doubt_px"][0] == 0
    assert abs(int(fixed["unwrap_repaired_px"][0]) - slipped) <= 0.01 * err.size


def test_a_tongue_cut_off_by_layover_cannot_be_repaired_and_is_flagged_in_doubt() -> None:
    """A layover band 240 m of elevation wide across the glacier: the profile cannot carry the
    cycle down to the tongue (no valid prior), so the tongue's pixels are in doubt."""
    _, _, glacier, _, _ = tongue_scene()
    xx = np.indices(glacier.shape)[1]
    band = ((xx >= 110) & (xx < 150)).astype(np.uint8)
    err, _, result = unwrapped("data", radar_mask=band)
    slipped = int(np.count_nonzero(np.abs(err) > H_AMB_M / 2))
    assert slipped > 0.3 * err.size
    assert result["unwrap_flag"][0] == FLAG_DOUBT
    assert int(result["unwrap_doubt_px"][0]) >= slipped


def test_a_glacier_without_slips_is_left_as_it_was() -> None:
    err_plain, _, plain = unwrapped("none", taper=True)
    err_data, _, data = unwrapped("data", taper=True)
    assert plain["unwrap_flag"][0] == data["unwrap_flag"][0] == FLAG_OK
    assert data["unwrap_repaired_px"][0] == data["unwrap_doubt_px"][0] == 0
    np.testing.assert_array_equal(err_plain, err_data)


def test_scenes_that_disagree_by_a_cycle_are_in_doubt_dem_scenes_never() -> None:
    """Two insar scenes and a DEM scene over one glacier's two cells; scene 1 slipped a cycle
    (40 m over 12 yr) in cell 0."""
    years = np.array([12.0, 12.0, 12.0])
    count = np.full((3, 1, 2, 1), 100.0)
    rate = np.array([[-2.0, 0.5], [-2.0 + 40.0 / 12.0, 0.5], [-2.0, 0.5]])
    sum_dh = (rate * years[:, None] * 100.0).reshape(3, 1, 2, 1)
    use = np.ones((3, 1), bool)
    h_amb = np.array([[40.0], [40.0], [np.nan]])
    doubt = cross_scene_doubt(count, sum_dh, years, use, h_amb, 10)
    np.testing.assert_array_equal(doubt[:, 0], [0.0, 100.0, 0.0])


def test_the_unwrap_term_counts_a_whole_cycle_on_the_area_in_doubt() -> None:
    """A quarter of a glacier in doubt in its only scene (h_amb 40 m, 10 yr): 1 m/yr."""
    sigma = unwrap_sigma_m_yr(
        np.array([[1.0]]), np.array([[250]]), np.array([[1000]]), np.array([[40.0]]), [10.0]
    )
    assert sigma[0] == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tongues(
    tongues_study: Path, tongues_plain: Pipeline, tongues_repaired: Pipeline
) -> dict[str, Any]:
    """The `tongues` study (10 glaciers, steps at the outline, steep balance gradients, 30 %
    surge-type) run with and without the data prior; glacier tables joined with the truth."""
    truth = pd.read_csv(tongues_study / "truth" / "glaciers.csv")
    tables = {}
    for repair, pipeline in (("none", tongues_plain), ("data", tongues_repaired)):
        table = pd.read_csv(pipeline.out / "glaciers.csv").merge(
            truth[["RGIId", "mb_mwe_yr"]], on="RGIId", suffixes=("", "_true")
        )
        table["error"] = table["mb_mwe_yr"] - table["mb_mwe_yr_true"]
        tables[repair] = table
        tables[f"{repair}_info"] = cube_summary(pipeline.store)
    return tables


def test_the_tongues_study_is_never_silently_wrong(tongues: dict[str, Any]) -> None:
    for repair in ("none", "data"):
        table = tongues[repair]
        z = table["error"].abs() / table["mb_sigma_mwe_yr"]
        silent = table[(z > 3) & (table["unwrap_flag"] == FLAG_OK)]
        assert silent.empty, (repair, silent)


def test_the_data_prior_repairs_the_tongues_study(tongues: dict[str, Any]) -> None:
    plain, data = tongues["none"], tongues["data"]
    slipped = plain["unwrap_flag"] == FLAG_DOUBT
    assert slipped.sum() >= 3
    assert plain.loc[slipped, "error"].abs().max() > 0.3  # m w.e./yr: what the prior repairs
    repaired = data["unwrap_flag"] == FLAG_REPAIRED
    assert repaired.sum() >= 2
    assert data.loc[repaired, "error"].abs().max() < 0.05
    assert (data.loc[repaired, "unwrap_prior"] == "data").all()
    # glaciers without slips: the same numbers
    same = (plain["unwrap_flag"] == FLAG_OK) & (data["unwrap_flag"] == FLAG_OK)
    assert same.sum() >= 5
    np.testing.assert_allclose(
        data.loc[same, "mb_mwe_yr"], plain.loc[same, "mb_mwe_yr"], atol=0.002
    )


def test_info_counts_the_glaciers_repaired_and_in_doubt_per_scene(tongues: dict[str, Any]) -> None:
    """The last two columns of `mbcube info`'s step table: glaciers repaired, in doubt."""
    for repair, column in (("none", -1), ("data", -2)):
        lines = tongues[f"{repair}_info"].splitlines()
        start = next(i for i, line in enumerate(lines) if line.endswith("in doubt"))
        rows = [line.split() for line in lines[start + 2 :] if line[:1] == "S"]
        assert len(rows) == 3
        assert sum(int(r[column]) for r in rows) >= 2, (repair, lines[start:])
