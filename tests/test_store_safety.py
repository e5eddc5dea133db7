"""Nothing lost (issue 18): where a cube may be made, one writer per store, provenance by content
(edited, removed and moved inputs), and runs killed or failed half-way, then rerun.

Every test here reproduces a probe that went wrong before: a store over other files deleted
them; two runs at once broke the store; an edited date or h_amb was ignored; a removed row
stayed in the results; a moved study made the cube unusable; a scene killed mid-write with a new
parameter was later taken as up to date."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml
from typer.testing import CliRunner

import mbcube.corrections.step as correct_step
from mbcube import store as st
from mbcube.cli import app
from mbcube.errors import StoreLocked
from mbcube.ingest import ingest
from mbcube.pipeline import Pipeline, load_pipeline, run
from mbcube.store.lock import LOCK_NAME, writer_lock, writer_status
from mbcube.verify import verify
from tests.storetools import copy_run, same_tables

CODE = "import sys; from mbcube.cli import app; sys.argv[0] = 'mbcube'; app()"

# this small study has too little X band for a table of its own per region and surface
pytestmark = pytest.mark.filterwarnings("ignore:penetration:mbcube.MbcubeWarning")


def _listing(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _scenes(study: Path) -> pd.DataFrame:
    return pd.read_csv(study / "scenes.csv", dtype=str, keep_default_na=False)


# ------------------------------------------------------------------ never destroy what is not ours


def test_store_over_other_files_is_refused_and_they_are_kept(
    small_run: Pipeline, tmp_path: Path
) -> None:
    mine = tmp_path / "thesis"
    (mine / "data").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "data" / "field.csv").write_text("a,b\n1,2\n")
    before = _listing(mine)
    code, output = _cli("ingest", str(small_run.study), "--store", str(mine))
    assert code == 2, output
    assert "never overwrites what it did not make" in output and "thesis.tex" in output
    assert _listing(mine) == before  # nothing deleted, nothing added (not even a lock file)
    code, output = _cli("run", str(small_run.study), "--store", str(mine), "--cluster", "threads")
    assert code == 2 and _listing(mine) == before


def test_store_in_or_around_the_study_is_refused(small_run: Pipeline, tmp_path: Path) -> None:
    """`mbcube run S --store S` deleted the study; a store inside the study or an input's folder,
    or results written into the study folder, are refused too, the study untouched."""
    study = copy_run(small_run, tmp_path, store=False).study
    before = _listing(study)
    for store in (study, study / "cube.zarr", study / "reference" / "cube.zarr"):
        code, output = _cli("run", str(study), "--store", str(store), "--cluster", "threads")
        assert code == 2, output
        assert str(store) in output, output
        assert _listing(study) == before
        assert not (study / "cube.zarr").exists()
    code, output = _cli("run", str(study), "--store", str(tmp_path / "c.zarr"), "--out", str(study))
    assert code == 2 and "--out is the study folder" in output, output
    assert _listing(study) == before and not (tmp_path / "c.zarr").exists()
    # a folder of the study's (here: the synthetic truth, tables named like the results)
    code, output = _cli(
        "run", str(study), "--store", str(tmp_path / "c.zarr"), "--out", str(study / "truth")
    )
    assert code == 2 and "holds files mbcube did not write" in output, output
    assert _listing(study) == before
    # `mbcube aggregate` knows the cube's study: the outlines' folder is refused too
    shutil.copytree(small_run.store, tmp_path / "cube.zarr")
    run(load_pipeline(study, store=tmp_path / "cube.zarr", cluster="threads"))
    code, output = _cli("aggregate", str(tmp_path / "cube.zarr"), "--out", str(study))
    assert code == 2 and "--out is the study folder" in output, output
    assert (study / "glaciers.gpkg").read_bytes() == before["glaciers.gpkg"]


def test_results_never_replace_files_mbcube_did_not_write(
    small_run: Pipeline, tmp_path: Path
) -> None:
    """An --out folder with the user's files is refused; in mbcube's own results folder, a file
    of the user's named like a figure stays (only the figures mbcube recorded are cleaned)."""
    mine = tmp_path / "mine"
    (mine / "figures").mkdir(parents=True)
    (mine / "glaciers.csv").write_text("my own table")
    code, output = _cli("aggregate", str(small_run.store), "--out", str(mine))
    assert code == 2 and "holds files mbcube did not write (figures, glaciers.csv)" in output
    assert (mine / "glaciers.csv").read_text() == "my own table"
    pipeline = copy_run(small_run, tmp_path / "copy")
    run(pipeline)
    own = pipeline.out / "figures" / "profile_my_own_glacier.png"
    own.write_bytes(b"mine")
    (pipeline.out / "glaciers.parquet").unlink()  # and one of mbcube's own files lost
    report = run(pipeline)  # not forced: the lost table is found and written again
    assert own.read_bytes() == b"mine"
    assert report.recomputed["aggregate"] and (pipeline.out / "glaciers.parquet").exists()


def test_results_beside_the_store_in_one_folder(small_run: Pipeline, tmp_path: Path) -> None:
    """--store OUT/cube.zarr --out OUT (the SLURM test's layout): the cube is mbcube's, so the
    results go beside it, on the first run and the next."""
    out = tmp_path / "results"
    out.mkdir()
    shutil.copytree(small_run.store, out / "cube.zarr")
    for _ in range(2):
        code, output = _cli(
            "run",
            str(small_run.study),
            "--store",
            str(out / "cube.zarr"),
            "--out",
            str(out),
            "--cluster",
            "threads",
            "--quiet",
        )
        assert code == 0, output
    same_tables(out, small_run.out)


def test_a_store_inside_another_cube_is_refused(small_run: Pipeline, tmp_path: Path) -> None:
    outer = Path(shutil.copytree(small_run.store, tmp_path / "cube.zarr"))
    code, output = _cli("ingest", str(small_run.study), "--store", str(outer / "inner.zarr"))
    assert code == 2 and f"inside the cube {outer}" in output, output
    assert not (outer / "inner.zarr").exists()


def test_empty_folder_takes_a_cube(small_run: Pipeline, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    report = ingest(small_run.study, tmp_path / "empty")
    assert report.created and len(report.written) == 3
    assert not (tmp_path / "empty" / LOCK_NAME).exists()  # released, removed


# ------------------------------------------------------------------ one writer per store


def test_lock_is_reentrant_and_refuses_another_process(tmp_path: Path) -> None:
    other = (
        "import sys; from mbcube.store.lock import writer_lock\n"
        "try:\n"
        "    with writer_lock(sys.argv[1]): print('got it')\n"
        "except Exception as err: print(type(err).__name__, err)\n"
    )

    def try_in_other_process() -> str:
        done = subprocess.run(
            [sys.executable, "-c", other, str(tmp_path)], capture_output=True, text=True
        )
        return done.stdout.strip()

    with writer_lock(tmp_path), writer_lock(tmp_path):  # re-entrant in this process
        refused = try_in_other_process()
        assert refused.startswith("StoreLocked") and f"pid {os.getpid()}" in refused
        assert "(writing)" in str(writer_status(tmp_path))
    assert try_in_other_process() == "got it"
    assert writer_status(tmp_path) is None and not (tmp_path / LOCK_NAME).exists()


def _start_run(pipeline: Pipeline, out: Path) -> subprocess.Popen[str]:
    args = ["run", str(pipeline.study), "--store", str(pipeline.store), "--out", str(out)]
    return subprocess.Popen(
        [sys.executable, "-c", CODE, *args, "--cluster", "threads"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def _wait_for(proc: subprocess.Popen[str], pattern: str) -> list[str]:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"the run ended before '{pattern}': {''.join(seen)}")


def test_two_runs_at_once_one_is_refused_the_store_stays_valid(
    small_run: Pipeline, tmp_path: Path
) -> None:
    """Two `mbcube run` on one store: the second is refused with one line (exit 2) while the
    first goes on; readers are not blocked; the store verifies and the tables equal a clean
    run's."""
    pipeline = copy_run(small_run, tmp_path, store=False)
    first = _start_run(pipeline, tmp_path / "a")
    _wait_for(first, r"^\[correct\] \.\.\.")  # the cube exists, pixel steps running
    second = subprocess.run(
        [
            sys.executable,
            "-c",
            CODE,
            "run",
            str(pipeline.study),
            "--store",
            str(pipeline.store),
            "--out",
            str(tmp_path / "b"),
            "--cluster",
            "threads",
        ],
        capture_output=True,
        text=True,
    )
    assert second.returncode == 2, second.stdout + second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "another mbcube process is writing" in lines[0], lines
    info = subprocess.run(
        [sys.executable, "-c", CODE, "info", str(pipeline.store)], capture_output=True, text=True
    )  # a reader: never blocked
    assert info.returncode == 0 and "(writing)" in info.stdout, info.stdout + info.stderr
    xr.open_zarr(pipeline.store)  # plain xarray: no lock either
    assert first.wait(timeout=600) == 0
    assert not (tmp_path / "b").exists()
    assert verify(pipeline.store).ok
    same_tables(tmp_path / "a", small_run.out)


def test_lock_of_a_killed_run_is_stale_and_the_next_run_resumes(
    small_run: Pipeline, tmp_path: Path
) -> None:
    pipeline = copy_run(small_run, tmp_path, store=False)
    proc = _start_run(pipeline, pipeline.out)
    _wait_for(proc, r"^\[correct\] \.\.\.")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (pipeline.store / LOCK_NAME).exists()  # left by the killed run...
    assert "interrupted" in str(writer_status(pipeline.store))  # ...and known as stale
    code, output = _cli("info", str(pipeline.store))
    assert code == 0 and "interrupted" in output
    run(pipeline)  # takes the stale lock over
    assert not (pipeline.store / LOCK_NAME).exists()
    assert verify(pipeline.store).ok
    same_tables(pipeline.out, small_run.out)


# ------------------------------------------------------------------ provenance of what matters


def test_moved_or_copied_study_is_up_to_date(small_run: Pipeline, tmp_path: Path) -> None:
    """Fingerprints are relative to the study and of the files' content: a study moved (mtimes
    kept) or copied (new mtimes) with its cube recomputes no pixel, and the outlines are found
    at the new place (glaciers.gpkg)."""
    for name, copy in (("moved", shutil.copy2), ("copied", shutil.copy)):
        study = Path(
            shutil.copytree(small_run.study, tmp_path / name / "study", copy_function=copy)
        )
        store = Path(shutil.copytree(small_run.store, tmp_path / name / "cube.zarr"))
        report = run(load_pipeline(study, store=store, cluster="threads"))
        for step in ("ingest", "unwrap", "correct", "bin"):
            assert report.recomputed[step] == [], (name, step, report.recomputed)
        out = tmp_path / name / "results"
        same_tables(out, small_run.out)
        assert (out / "glaciers.gpkg").exists()


def test_edited_date_redoes_that_scene_only(small_run: Pipeline, tmp_path: Path) -> None:
    """A scene's date edited in scenes.csv (before: ignored, even with --force)."""
    pipeline = copy_run(small_run, tmp_path)
    scenes = _scenes(pipeline.study)
    changed = scenes.scene_id.iloc[1]
    new_date = "2014-01-20"
    scenes.loc[1, "date"] = new_date
    scenes.to_csv(pipeline.study / "scenes.csv", index=False)
    report = run(pipeline)
    for step in ("ingest", "correct", "bin"):
        assert report.recomputed[step] == [changed], (step, report.recomputed)
    cube = st.open_cube(pipeline.store)
    date = cube.scene_date.sel(scene=changed).values
    assert np.datetime_as_string(date, unit="D") == new_date
    ref = np.datetime64(st.recorded_config(pipeline.store).reference_date.isoformat())
    years = float(cube.scene_years.sel(scene=changed))
    assert years == pytest.approx((np.datetime64(new_date) - ref).astype(int) / 365.25)
    assert int(cube.scene_month.sel(scene=changed)) == 1
    before = pd.read_csv(small_run.out / "glaciers.csv")
    after = pd.read_csv(pipeline.out / "glaciers.csv")
    assert not np.allclose(after.mb_mwe_yr, before.mb_mwe_yr, equal_nan=True)


def test_edited_h_amb_rewrites_that_scene(
    tiny_study: Path, tiny_cube: Path, tmp_path: Path
) -> None:
    study = Path(shutil.copytree(tiny_study, tmp_path / "study"))
    store = Path(shutil.copytree(tiny_cube, tmp_path / "cube.zarr"))
    assert ingest(study, store).recomputed == []  # a moved study: up to date
    scenes = _scenes(study)
    changed = scenes.scene_id.iloc[0]
    scenes.loc[0, "h_amb"] = "61.5"
    scenes.to_csv(study / "scenes.csv", index=False)
    report = ingest(study, store)
    assert report.changed == [changed] and len(report.skipped) == 2
    h_amb = st.open_cube(store).h_amb_m.sel(scene=changed).values
    assert np.nanmin(h_amb) == np.nanmax(h_amb) == np.float32(61.5)
    assert float(st.open_cube(store).scene_h_amb_m.sel(scene=changed)) == 61.5


def test_scene_changed_to_another_kind_keeps_nothing_of_the_old_one(
    tiny_study: Path, tiny_cube: Path, tmp_path: Path
) -> None:
    """A row rewritten from insar to dem: its insar layers leave the cube with its records."""
    study = Path(shutil.copytree(tiny_study, tmp_path / "study"))
    store = Path(shutil.copytree(tiny_cube, tmp_path / "cube.zarr"))
    scenes = _scenes(study)
    changed = scenes.scene_id.iloc[0]
    scenes.loc[0, ["kind", "phase", "coherence", "h_amb", "dem"]] = [
        "dem",
        "",
        "",
        "",
        "reference/srtm_c.tif",
    ]
    scenes.to_csv(study / "scenes.csv", index=False)
    assert ingest(study, store).changed == [changed]
    cube = st.open_cube(store).sel(scene=changed)
    assert str(cube.scene_kind.values) == "dem"
    assert np.isnan(cube.phase_rad.values).all() and np.isnan(cube.h_amb_m.values).all()
    assert np.isfinite(cube.dem_m.values).sum() > 0.9 * cube.dem_m.size
    assert not (store / "phase_rad" / "c" / "0").exists()
    assert set(st.step_record(store, "ingest", changed)["row"].items()) >= {("kind", "dem")}


def test_removed_row_leaves_the_results(small_run: Pipeline, tmp_path: Path) -> None:
    """A row deleted from scenes.csv: its scene leaves every table (equal to a cube made without
    it) and its pixels leave the cube; kept when study.yaml asks; a row put back is ingested
    again and the tables come back."""
    pipeline = copy_run(small_run, tmp_path)
    scenes = _scenes(pipeline.study)
    gone = scenes.scene_id.iloc[1]
    scenes.drop(index=1).to_csv(pipeline.study / "scenes.csv", index=False)
    report = run(pipeline)
    assert report.recomputed["ingest"] == [gone]
    assert report.recomputed["correct"] == report.recomputed["bin"] == []
    cube = st.open_cube(pipeline.store, complete_only=False)
    index = list(cube.scene.values).index(gone)
    assert int(cube.scene_state[index]) == st.SCENE_REMOVED
    assert gone not in list(st.open_cube(pipeline.store).scene.values)
    assert not (pipeline.store / "dh_m" / "c" / str(index)).exists()
    assert not (pipeline.store / "stats" / "count" / "c" / str(index)).exists()
    assert st.step_record(pipeline.store, "bin", gone) == {}
    # the same tables as a cube that never had that scene
    without = load_pipeline(
        pipeline.study, store=tmp_path / "without.zarr", out=tmp_path / "without", cluster="threads"
    )
    run(without)
    same_tables(pipeline.out, without.out)
    # put back: ingested again, the original tables
    scenes.to_csv(pipeline.study / "scenes.csv", index=False)
    report = run(pipeline)
    assert report.recomputed["ingest"] == report.recomputed["bin"] == [gone]
    same_tables(pipeline.out, small_run.out)


def test_removed_row_kept_in_the_cube_when_asked(small_run: Pipeline, tmp_path: Path) -> None:
    pipeline = copy_run(small_run, tmp_path)
    config = yaml.safe_load((pipeline.study / "study.yaml").read_text())
    config["keep_removed_scenes"] = True
    (pipeline.study / "study.yaml").write_text(yaml.safe_dump(config))
    scenes = _scenes(pipeline.study)
    gone = scenes.scene_id.iloc[0]
    scenes.drop(index=0).to_csv(pipeline.study / "scenes.csv", index=False)
    run(pipeline)
    kept = st.open_cube(pipeline.store, complete_only=False).sel(scene=gone)
    assert int(kept.scene_state) == st.SCENE_REMOVED
    assert np.isfinite(kept.dh_m.values).sum() > 1000  # its pixels are still there
    assert gone not in pd.read_csv(pipeline.out / "glaciers.csv").to_string()
    assert gone not in list(st.open_cube(pipeline.store).scene.values)


# ------------------------------------------------------------------ killed or failed half-way


def test_step_failed_mid_write_then_parameter_reverted_is_redone(
    small_run: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scene whose corrections stop half-way (here: its 5th tile write fails) with a new
    parameter, then the parameter reverted: before, the scene kept its old record over pixels
    written with the new parameter and counted as up to date (2,595 fewer valid pixels in the
    probe). Now its record was forgotten before the first write: it is redone, and the cube and
    tables equal the uninterrupted run's."""
    pipeline = copy_run(small_run, tmp_path)
    config = yaml.safe_load((pipeline.study / "study.yaml").read_text()) or {}
    original = (pipeline.study / "study.yaml").read_text()
    config.setdefault("corrections", {})["outlier_nmad"] = 1.0
    (pipeline.study / "study.yaml").write_text(yaml.safe_dump(config))
    writes = {"n": 0}
    real_write = correct_step._final_write

    def failing_write(*args: object, **kwargs: object) -> object:
        writes["n"] += 1
        if writes["n"] == 14:  # the second scene's 5th tile (9 tiles per scene)
            raise OSError("simulated failure mid-write")
        return real_write(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(correct_step, "_final_write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        run(pipeline)
    monkeypatch.setattr(correct_step, "_final_write", real_write)
    (pipeline.study / "study.yaml").write_text(original)
    report = run(pipeline)
    assert len(report.recomputed["correct"]) >= 2  # the first (rewritten) and the failed one
    reference = st.open_cube(small_run.store)[["dh_m", "valid"]].load().drop_attrs()
    got = st.open_cube(pipeline.store)[["dh_m", "valid"]].load().drop_attrs()
    xr.testing.assert_identical(got, reference)
    same_tables(pipeline.out, small_run.out)


def test_run_killed_then_parameter_reverted_gives_the_clean_result(
    small_run: Pipeline, tmp_path: Path
) -> None:
    """The same with a real SIGKILL of `mbcube run` while the corrections of its second scene
    compute with the new parameter."""
    pipeline = copy_run(small_run, tmp_path)
    original = (pipeline.study / "study.yaml").read_text()
    config = yaml.safe_load(original) or {}
    config.setdefault("corrections", {})["outlier_nmad"] = 1.0
    (pipeline.study / "study.yaml").write_text(yaml.safe_dump(config))
    proc = _start_run(pipeline, pipeline.out)
    _wait_for(proc, r"correct scene \S+")
    _wait_for(proc, r"correct scene \S+")  # the second scene's graph: the first computes
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (pipeline.study / "study.yaml").write_text(original)
    run(pipeline)
    reference = st.open_cube(small_run.store)[["dh_m", "valid"]].load().drop_attrs()
    got = st.open_cube(pipeline.store)[["dh_m", "valid"]].load().drop_attrs()
    xr.testing.assert_identical(got, reference)
    same_tables(pipeline.out, small_run.out)
    assert verify(pipeline.store).ok


def test_records_live_per_scene_outside_the_root_metadata(small_run: Pipeline) -> None:
    """The run state in the root zarr.json stays small: records are one chunk per scene."""
    state = json.loads(
        json.loads((small_run.store / "zarr.json").read_text())["attributes"]["mbcube"]
    )
    assert set(state) == {
        "schema_version",
        "mbcube_version",
        "grid",
        "study",
        "static_inputs",
        "static_files",
        "created",
    }
    chunks = sorted(p.name for p in (small_run.store / "records" / "correct" / "c").iterdir())
    assert chunks == ["0", "1", "2"]
    record = st.step_record(
        small_run.store, "correct", str(st.open_cube(small_run.store).scene.values[0])
    )
    assert record["outputs"]["dh_m/c/0"] and record["token"]


def test_refused_writer_error_names_the_holder(tmp_path: Path) -> None:
    with writer_lock(tmp_path):
        code = (
            "import sys; from mbcube.store.lock import writer_lock\n"
            "with writer_lock(sys.argv[1]): pass\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True
        )
    assert done.returncode != 0
    assert StoreLocked.__name__ in done.stderr and f"pid {os.getpid()}" in done.stderr
