"""`mbcube run` end to end: the answer against the synthetic truth, and recomputing only what changed."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from typer.testing import CliRunner

from mbcube.cli import app
from mbcube.pipeline import Pipeline, load_pipeline, run
from mbcube.store import open_cube
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
    """Glaciers of this small study are ~1 km2: the reference DEM's correlated error (1 m,
    ~500 m, common to all scenes) alone gives them ~0.05 m w.e./yr errors, so the check here is
    that errors are of that size AND that the stated uncertainty is calibrated. The tighter
    accuracy bars of larger glaciers are measured in benchmarks/accuracy.py."""
    glaciers = pd.read_csv(finished.out / "glaciers.csv")
    regions = pd.read_csv(finished.out / "regions.csv")
    truth_glaciers, truth_regions = _truth(finished)
    both = glaciers.merge(truth_glaciers, on="RGIId", suffixes=("", "_true"))
    assert len(both) == len(truth_glaciers)
    covered = both[both.coverage_frac > 0.5]
    assert len(covered) >= 20
    error = (covered.mb_mwe_yr - covered.mb_mwe_yr_true).abs()
    assert error.median() < 0.06, covered[["RGIId", "mb_mwe_yr", "mb_mwe_yr_true"]]
    within_1_sigma = (error <= covered.mb_sigma_mwe_yr).mean()
    assert 0.5 <= within_1_sigma <= 0.95, f"1 sigma covers {within_1_sigma:.0%} of glaciers"
    assert (error <= 2 * covered.mb_sigma_mwe_yr).mean() >= 0.85

    merged = regions.merge(truth_regions, on=["name", "glaciers"], suffixes=("", "_true"))
    assert len(merged) == len(truth_regions)
    region_error = (merged.mb_mwe_yr - merged.mb_mwe_yr_true).abs()
    assert (region_error <= 2 * merged.mb_sigma_mwe_yr).all(), merged
    assert region_error.median() < 0.04, merged


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


def _run_killed_at(study: Path, store: Path, out: Path, step_line: str, nth: int) -> None:
    """`mbcube run` in a child process, SIGKILLed just after it says `step_line` for its nth scene
    (it says so while building that scene's graph, as the scene before it computes: the scenes
    before those two are done and recorded)."""
    code = "import sys; from mbcube.cli import app; sys.argv[0] = 'mbcube'; app()"
    args = ["run", str(study), "--store", str(store), "--out", str(out), "--cluster", "threads"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        match = re.search(rf"{step_line} (\S+)\s*$", line)
        if match and match.group(1) not in seen:
            seen.append(match.group(1))
            if len(seen) == nth:
                time.sleep(0.5)  # inside that scene's compute
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before '{step_line}' #{nth}: {seen}"


def test_run_killed_in_correct_then_in_bin_resumes_to_the_uninterrupted_result(
    finished: Pipeline, tmp_path: Path
) -> None:
    """Kill `mbcube run` inside the correct step, rerun and kill it inside the bin step, rerun to
    the end: the cube, its statistics and the tables equal those of one uninterrupted run, and
    the scenes finished before each kill are not recomputed."""
    store, out = tmp_path / "cube.zarr", tmp_path / "results"
    _run_killed_at(finished.study, store, out, "correct scene", nth=2)
    _run_killed_at(finished.study, store, out, "binning scene", nth=3)
    report = run(load_pipeline(finished.study, store=store, out=out, cluster="threads"))
    scenes = [str(s) for s in xr.open_zarr(finished.store)["scene"].values]
    assert report.recomputed["ingest"] == []
    assert report.recomputed["correct"] == []  # finished by the second run
    # the first scene was binned before the kill; the second may have been computing
    assert report.recomputed["bin"] in (scenes[1:], scenes[2:]), report.recomputed

    killed, reference = open_cube(store).load(), open_cube(finished.store).load()
    xr.testing.assert_identical(killed.drop_attrs(), reference.drop_attrs())
    stats = xr.open_zarr(store, group="stats").load()
    xr.testing.assert_identical(
        stats.drop_attrs(), xr.open_zarr(finished.store, group="stats").load().drop_attrs()
    )
    for table in ("glaciers.csv", "regions.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / table), pd.read_csv(finished.out / table))


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


# ------------------------------------------------------------------ querying the cube (ds.mb)


def _pixel_frame(pipeline: Pipeline, number: int) -> pd.DataFrame:
    """The glacier's corrected dh pixels with their scene and 50 m bin: the slow oracle."""
    ds = xr.open_zarr(pipeline.store)
    inside = (ds.glacier_id == number).values
    ref = ds.ref_dem_m.values[inside]
    rows = []
    for i, scene in enumerate(ds.scene.values):
        dh = ds.dh_m.isel(scene=i).values[inside]
        ok = np.isfinite(dh)
        rows.append(
            pd.DataFrame({"scene": str(scene), "bin": np.floor(ref[ok] / 50) * 50, "dh": dh[ok]})
        )
    return pd.concat(rows)


def test_accessor_profile_and_series_equal_the_pixels(finished: Pipeline) -> None:
    import mbcube  # noqa: F401  (registers ds.mb)

    ds = xr.open_zarr(finished.store)
    rgi_id = str(ds.glacier_rgi_id.values[4])
    number = ds.mb.glacier_index(rgi_id)
    assert number == 5
    profile = ds.mb.profile(glacier=rgi_id)
    assert profile["mean_dh_m"].chunks is not None  # lazy until asked
    pixels = _pixel_frame(finished, number)
    oracle = pixels.groupby(["scene", "bin"]).dh.agg(["count", "mean", "std"])
    got = profile.to_dataframe().reset_index()
    got = got[got["count"] > 0].set_index(["scene", "bin"])
    assert len(got) == len(oracle)
    np.testing.assert_array_equal(got["count"], oracle["count"].loc[got.index])
    np.testing.assert_allclose(
        got["mean_dh_m"], oracle["mean"].loc[got.index], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(got["std_dh_m"], oracle["std"].loc[got.index], rtol=1e-3, atol=1e-4)
    series = ds.mb.dh_series(glacier=number).compute()
    expected = pixels.groupby("scene").dh.mean()
    np.testing.assert_allclose(series.sel(scene=expected.index).values, expected.values, rtol=1e-5)
    assert int((ds.mb.pixels(glacier=number).glacier_id == number).sum()) == int(
        (ds.glacier_id == number).sum()
    )


def test_accessor_mass_balance_equals_the_tables(finished: Pipeline) -> None:
    import mbcube  # noqa: F401

    ds = xr.open_zarr(finished.store)
    glaciers = pd.read_csv(finished.out / "glaciers.csv").set_index("RGIId")
    regions = pd.read_csv(finished.out / "regions.csv").set_index(["name", "glaciers"])
    rgi_id = str(ds.glacier_rgi_id.values[2])
    one = ds.mb.mass_balance(glacier=rgi_id)
    assert float(one.mb_mwe_yr) == pytest.approx(glaciers.loc[rgi_id, "mb_mwe_yr"], rel=1e-6)
    assert one.mb_mwe_yr.attrs["units"] == "m w.e./yr"
    region = ds.mb.mass_balance(region="Western Pamir").sel(glaciers="all")
    row = regions.loc[("Western Pamir", "all")]
    assert float(region.mb_mwe_yr) == pytest.approx(row.mb_mwe_yr, rel=1e-6)
    assert float(region.mb_sigma_mwe_yr) == pytest.approx(row.mb_sigma_mwe_yr, rel=1e-6)
    members = glaciers.index[glaciers.region == "Western Pamir"]
    profile = ds.mb.profile(region="Western Pamir")
    hyps = xr.open_zarr(finished.store, group="hypsometry")
    numbers = [ds.mb.glacier_index(g) for g in members]
    assert float(profile.area_m2.sum()) == pytest.approx(
        float(hyps.area_m2.sel(glacier=numbers).sum())
    )
    with pytest.raises(KeyError, match="close ids"):
        ds.mb.profile(glacier=rgi_id[:-1] + "X")


def test_info_shows_steps_and_unwrap_quality(finished: Pipeline) -> None:
    result = CliRunner().invoke(app, ["info", str(finished.store)])
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(finished.store)
    insar = [i for i, k in enumerate(ds.scene_kind.values) if str(k) == "insar"]
    row = next(
        line
        for line in result.output.splitlines()[::-1]
        if line.startswith(str(ds.scene.values[insar[0]]))
    )
    assert "unwrap,correct,bin" in row
    assert f"{100 * float(ds.unwrap_valid_frac.values[insar[0]]):.2f} %" in row
    assert f"{float(ds.datum_offset_m.values[insar[0]]):+.3f}" in row


def test_readme_query_example_runs(finished: Pipeline) -> None:
    """The README's querying example, run as written on a finished study's store."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Querying the cube from xarray", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("stores/demo/cube.zarr", str(finished.store))
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    balance = namespace["balance"]
    glaciers = pd.read_csv(finished.out / "glaciers.csv").set_index("RGIId")
    first = str(namespace["first"])
    assert float(balance.mb_mwe_yr) == pytest.approx(glaciers.loc[first, "mb_mwe_yr"], rel=1e-6)
    assert namespace["rate"].dims == ("y", "x")


def test_surge_candidates_are_the_true_surge_glaciers(finished: Pipeline) -> None:
    glaciers = pd.read_csv(finished.out / "glaciers.csv").set_index("RGIId")
    truth = pd.read_csv(finished.study / "truth" / "glaciers.csv").set_index("RGIId")
    covered = glaciers.index[glaciers.coverage_frac > 0.5]
    assert truth.loc[covered, "surge"].sum() >= 1
    assert (glaciers.loc[covered, "surge_candidate"] == truth.loc[covered, "surge"]).all()


@pytest.mark.slow
def test_demo_command_reaches_the_region_table_and_figures(tmp_path: Path) -> None:
    """README's `make demo` runs `mbcube demo`: study generated, every step, tables, figures."""
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--cluster", "threads", "--quiet"])
    assert result.exit_code == 0, result.output
    regions = pd.read_csv(out / "results" / "regions.csv")
    truth = pd.read_csv(out / "study" / "truth" / "regions.csv")
    both = regions.merge(truth, on=["name", "glaciers"], suffixes=("", "_true"))
    assert len(both) == len(truth) >= 6
    assert ((both.mb_mwe_yr - both.mb_mwe_yr_true).abs() <= 3 * both.mb_sigma_mwe_yr).all(), both
    assert len(list((out / "results" / "figures").glob("*.png"))) >= 6
    assert (out / "results" / "report.html").stat().st_size > 10_000
