"""`mbcube run` end to end: the answer against the synthetic truth, and recomputing only what changed."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mbcube.cli import app
from mbcube.pipeline import Pipeline, load_pipeline, run
from mbcube.synth import generate_study

# Small studies have sub-regions with too little X-band debris to make their own penetration table.
pytestmark = pytest.mark.filterwarnings("ignore:penetration.*pooled table:mbcube.MbcubeWarning")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A small mixed (insar + dem) study, run once to the end on dask's threads."""
    root = tmp_path_factory.mktemp("pipeline")
    study = generate_study(
        root / "study", "tiny", size_px=448, n_glaciers=24, n_scenes=4, seed=5, kind="mixed"
    )
    pipeline = load_pipeline(study, cluster="threads")
    run(pipeline)
    return pipeline


def _truth(pipeline: Pipeline) -> tuple[pd.DataFrame, pd.DataFrame]:
    truth = pipeline.study / "truth"
    return pd.read_csv(truth / "glaciers.csv"), pd.read_csv(truth / "regions.csv")


def test_run_recovers_glacier_and_region_mass_balance(finished: Pipeline) -> None:
    glaciers = pd.read_csv(finished.out / "glaciers.csv")
    regions = pd.read_csv(finished.out / "regions.csv")
    truth_glaciers, truth_regions = _truth(finished)
    both = glaciers.merge(truth_glaciers, on="RGIId", suffixes=("", "_true"))
    assert len(both) == len(truth_glaciers)
    covered = both[both.coverage_frac > 0.5]
    assert len(covered) >= 10
    error = (covered.mb_mwe_yr - covered.mb_mwe_yr_true).abs()
    assert error.median() < 0.03, covered[["RGIId", "mb_mwe_yr", "mb_mwe_yr_true"]]
    inside = (error <= 2 * covered.mb_sigma_mwe_yr).mean()
    assert inside >= 0.8, f"2-sigma covers the truth for only {inside:.0%} of glaciers"

    merged = regions.merge(truth_regions, on=["name", "glaciers"], suffixes=("", "_true"))
    assert len(merged) == len(truth_regions)
    assert (merged.mb_mwe_yr - merged.mb_mwe_yr_true).abs().max() < 0.02, merged


def test_second_run_recomputes_nothing(finished: Pipeline) -> None:
    before = (finished.out / "glaciers.csv").read_bytes()
    report = run(finished)
    assert report.nothing_recomputed, report.recomputed
    assert (finished.out / "glaciers.csv").read_bytes() == before


def test_density_change_recomputes_only_the_tables(finished: Pipeline, tmp_path: Path) -> None:
    store = tmp_path / "cube.zarr"
    shutil.copytree(finished.store, store)
    changed = Pipeline(
        study=finished.study,
        store=store,
        out=tmp_path / "results",
        cluster="threads",
        overrides={"massbalance": {"density_kg_m3": 900.0}},
    )
    report = run(changed)
    assert {k for k, v in report.recomputed.items() if v} == {"aggregate", "report"}
    old = pd.read_csv(finished.out / "glaciers.csv").set_index("RGIId")
    new = pd.read_csv(changed.out / "glaciers.csv").set_index("RGIId")
    np.testing.assert_allclose(new.dhdt_m_yr, old.dhdt_m_yr)
    measured = old.mb_mwe_yr.notna()
    np.testing.assert_allclose(
        new.mb_mwe_yr[measured], old.mb_mwe_yr[measured] * 900 / 850, rtol=1e-9
    )


def test_added_scene_recomputes_only_that_scene(
    finished: Pipeline, tmp_path: Path, study_copy: Callable[[Path], Path]
) -> None:
    study = study_copy(finished.study)
    scenes = pd.read_csv(study / "scenes.csv", dtype=str, keep_default_na=False)
    scenes.iloc[:-1].to_csv(study / "scenes.csv", index=False)
    pipeline = load_pipeline(study, store=tmp_path / "cube.zarr", cluster="threads")
    run(pipeline)
    scenes.to_csv(study / "scenes.csv", index=False)
    report = run(pipeline)
    new_id = scenes.scene_id.iloc[-1]
    for step in ("ingest", "correct", "bin"):
        assert report.recomputed[step] == [new_id], (step, report.recomputed)
    assert report.recomputed["aggregate"]


def test_cli_runs_a_pipeline_file(finished: Pipeline, tmp_path: Path) -> None:
    config = {
        "study": str(finished.study),
        "store": "cube.zarr",
        "out": "results",
        "cluster": "threads",
    }
    shutil.copytree(finished.store, tmp_path / "cube.zarr")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "Western Pamir" in result.output  # the region table is printed
    assert (tmp_path / "results" / "regions.csv").exists()
    assert (tmp_path / "results" / "report.html").exists()


def test_bad_pipeline_file_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("study: x\nstorr: y\n")
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "storr" in result.output
