"""The seasonal table's sign (mbcube.corrections.seasonal): the table is the surface's height
relative to February, removed from dh by default; 'correction' adds it as the paper's wording
reads. The synthetic truth is the generator's own (issue 15)."""

from __future__ import annotations

import ast
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mbcube.config import SEASONAL_OFFSET_M
from mbcube.corrections.seasonal import seasonal_offset_m
from mbcube.corrections.step import correct_cube
from mbcube.errors import MbcubeWarning
from mbcube.pipeline import Pipeline
from mbcube.store import recorded_config
from mbcube.synth.scenes import snow_surface_m

SYNTH = Path(__file__).resolve().parents[1] / "mbcube" / "synth"


def test_the_table_is_removed_by_default_and_added_as_a_correction() -> None:
    october = SEASONAL_OFFSET_M[10]
    assert october == -0.28
    assert seasonal_offset_m(10, SEASONAL_OFFSET_M, "S") == october  # removed: dh + 0.28
    assert seasonal_offset_m(10, SEASONAL_OFFSET_M, "S", "correction") == -october
    assert seasonal_offset_m(2, SEASONAL_OFFSET_M, "S", "correction") == 0.0


def test_the_synthetic_world_has_its_own_snow() -> None:
    """The generator's truth matches the paper's numbers in value (so the default is tested
    against it), but is its own: no module of mbcube.synth imports the pipeline's table or the
    corrections."""
    for month in (10, 11, 12, 1, 2, 3, 4):
        assert snow_surface_m(month) == pytest.approx(SEASONAL_OFFSET_M[month], abs=1e-12)
    assert snow_surface_m(7) == 0.0
    for path in SYNTH.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names}
                assert not node.module.startswith("mbcube.corrections"), path
                assert not (node.module == "mbcube.config" and "SEASONAL_OFFSET_M" in names), path


def test_the_sign_option_moves_glacier_dh_by_twice_the_table(
    small_run: Pipeline, tmp_path: Path
) -> None:
    """The same scenes corrected with the other sign: glacier dh moves by 2 x the table's month
    value, exactly; off-glacier dh does not move."""
    store = Path(shutil.copytree(small_run.store, tmp_path / "cube.zarr"))
    before = xr.open_zarr(store)
    dh_before = before["dh_m"].values
    config = recorded_config(store).corrections.model_copy(update={"seasonal_sign": "correction"})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "penetration", MbcubeWarning)
        assert correct_cube(store, config)  # every scene redone
    after = xr.open_zarr(store)
    glacier = after["glacier_id"].values > 0
    for s, month in enumerate(after["scene_month"].values):
        table = SEASONAL_OFFSET_M.get(int(month), 0.0)
        applied = float(after["seasonal_offset_applied_m"].values[s])
        assert applied == pytest.approx(-table)
        both = np.isfinite(dh_before[s]) & np.isfinite(after["dh_m"].values[s])
        moved = (after["dh_m"].values[s] - dh_before[s])[both & glacier]
        np.testing.assert_allclose(moved, 2 * table, atol=1e-4)
        still = (after["dh_m"].values[s] - dh_before[s])[both & ~glacier]
        np.testing.assert_allclose(still, 0.0, atol=1e-4)
