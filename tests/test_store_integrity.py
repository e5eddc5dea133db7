"""Nothing silent (issue 18): damaged stores found and repaired, every expected failure one line.

Probes that went wrong before: a deleted cache chunk gave all-NaN tables (exit 0), a deleted
dh_m chunk silently changed the numbers after a re-bin, a truncated chunk gave a 447-line zstd
traceback, `mbcube info` showed every step done on damaged stores; an unwritable output folder
or outlines off the grid were found only after all pixel steps, read-only and full disks gave
tracebacks of hundreds of lines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
import xarray as xr
from typer.testing import CliRunner

from mbcube.aggregate import CACHE_GROUP, aggregate
from mbcube.cli import app
from mbcube.errors import MbcubeWarning, StoreDamaged, StudyError
from mbcube.pipeline import Pipeline, run
from mbcube.store import invalidate, scene_index
from mbcube.store.lock import LOCK_NAME, writer_lock
from mbcube.verify import verify
from tests.storetools import copy_run, same_tables

CODE = "import sys; from mbcube.cli import app; sys.argv[0] = 'mbcube'; app()"

pytestmark = pytest.mark.filterwarnings("ignore:penetration:mbcube.MbcubeWarning")


def _cli(*args: str) -> tuple[int, str]:
    """`mbcube ARGS` in a child process: (exit code, stderr + stdout)."""
    done = subprocess.run([sys.executable, "-c", CODE, *args], capture_output=True, text=True)
    return done.returncode, done.stderr + done.stdout


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def _chunk(store: Path, array: str, scene: int) -> Path:
    """The first chunk file of scene index `scene` in a per-scene array."""
    return sorted(p for p in (store / array / "c" / str(scene)).rglob("*") if p.is_file())[0]


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ damage found, never trusted


def test_deleted_cache_chunk_gives_the_right_tables_not_nan(
    small_run: Pipeline, tmp_path: Path
) -> None:
    pipeline = copy_run(small_run, tmp_path)
    for chunk in (pipeline.store / CACHE_GROUP / "glacier_values" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    aggregate(pipeline.store, tmp_path / "out")
    same_tables(tmp_path / "out", small_run.out)
    assert verify(pipeline.store).ok  # the cache was made again, whole


def test_flipped_bit_in_the_cache_gives_the_right_tables(
    small_run: Pipeline, tmp_path: Path
) -> None:
    pipeline = copy_run(small_run, tmp_path)
    cells = next(
        p for p in (pipeline.store / CACHE_GROUP / "cells" / "c").rglob("*") if p.is_file()
    )
    _flip_a_bit(cells)  # same size: only its checksum tells
    lines = verify(pipeline.store).lines()
    assert f"{cells.relative_to(pipeline.store).as_posix()}: does not decode" in lines[1], lines
    aggregate(pipeline.store, tmp_path / "out")
    same_tables(tmp_path / "out", small_run.out)


def test_deleted_dh_chunk_is_named_refused_and_redone(small_run: Pipeline, tmp_path: Path) -> None:
    """Before: a re-bin silently used the missing chunk as NaN. Now `info` marks the scene's
    corrections damaged, `bin --force` refuses naming the file and the fix, `run` redoes that
    scene's corrections and the tables equal the clean run's."""
    pipeline = copy_run(small_run, tmp_path)
    scene = sorted(scene_index(pipeline.store), key=scene_index(pipeline.store).get)[1]
    _chunk(pipeline.store, "dh_m", 1).unlink()
    code, output = _cli("info", str(pipeline.store))
    assert code == 0 and f"{scene:<24} correct!damaged" in output, output
    code, output = _cli("bin", str(pipeline.store), "--force", "--cluster", "threads")
    assert code == 2 and len(_errors(output)) == 1, output
    assert "dh_m/c/1/" in output and f"mbcube correct {pipeline.store} --scene {scene}" in output
    report = run(pipeline)
    assert report.recomputed["correct"] == report.recomputed["bin"] == [scene]
    same_tables(pipeline.out, small_run.out)


def test_truncated_chunk_is_one_line_then_redone(small_run: Pipeline, tmp_path: Path) -> None:
    """A truncated chunk (before: a 447-line zstd traceback): its size tells; `run` redoes it."""
    pipeline = copy_run(small_run, tmp_path)
    chunk = _chunk(pipeline.store, "dh_m", 0)
    chunk.write_bytes(chunk.read_bytes()[:50])
    code, output = _cli("bin", str(pipeline.store), "--force", "--cluster", "threads")
    assert code == 2 and len(_errors(output)) == 1 and "Traceback" not in output, output
    code, output = _cli(
        "run", str(pipeline.study), "--store", str(pipeline.store), "--cluster", "threads"
    )
    assert code == 0, output
    same_tables(pipeline.out, small_run.out)


def test_flipped_bit_found_by_verify_repaired_by_the_next_run(
    small_run: Pipeline, tmp_path: Path
) -> None:
    """A chunk of the same size whose bytes changed: only its checksum tells. Reading it is one
    line naming verify; verify names the file, the step and the scene (exit 1); --repair makes
    the next run redo exactly that scene; then verify is clean and the tables equal."""
    pipeline = copy_run(small_run, tmp_path)
    scene = sorted(scene_index(pipeline.store), key=scene_index(pipeline.store).get)[2]
    chunk = _chunk(pipeline.store, "dh_m", 2)
    _flip_a_bit(chunk)
    code, output = _cli("bin", str(pipeline.store), "--force", "--cluster", "threads")
    assert code == 2 and len(_errors(output)) == 1 and "Traceback" not in output, output
    assert f"mbcube verify {pipeline.store}" in output
    # the copy's first run makes its report, reading the pixels: one line, no tracebacks
    code, output = _cli(
        "run", str(pipeline.study), "--store", str(pipeline.store), "--cluster", "threads"
    )
    assert code == 2 and len(_errors(output)) == 1 and "Traceback" not in output, output
    code, output = _cli("verify", str(pipeline.store))
    assert code == 1, output
    relative = chunk.relative_to(pipeline.store).as_posix()
    assert f"{relative}: does not decode" in output and f"for scene {scene}" in output
    assert "mbcube verify" in output and "--repair" in output
    code, output = _cli("verify", str(pipeline.store), "--repair")
    assert code == 0 and "redoes 1 item(s)" in output, output
    report = run(pipeline)
    assert report.recomputed["correct"] == report.recomputed["bin"] == [scene]
    assert verify(pipeline.store).ok
    same_tables(pipeline.out, small_run.out)


def _consolidated_shape(path: Path) -> None:
    """A digit changed in the root's consolidated copy of dh_m's shape (valid JSON)."""
    meta = json.loads(path.read_text())
    meta["consolidated_metadata"]["metadata"]["dh_m"]["shape"][1] += 7
    path.write_text(json.dumps(meta))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


@pytest.mark.parametrize(
    ("what", "damage"),
    [
        ("records/correct/c/1", _flip_a_bit),  # a step's record of a scene
        ("stats/binned/c/1", _flip_a_bit),  # a scene's flag
        ("scene_state/c/0", _flip_a_bit),  # every scene's ingest flag (one chunk)
        ("dh_m/zarr.json", _truncate),  # a step's layer: made again
        ("stats/zarr.json", _truncate),  # a step's group: made again
        ("stats/bin/c/0", _flip_a_bit),  # a coordinate of a step's group: made again
        ("scene_years/c/0", _flip_a_bit),  # the scenes' coordinates: every scene ingested again
        ("zarr.json", _consolidated_shape),  # the root's copy of a node's metadata
    ],
)
def test_damaged_records_flags_and_metadata_are_found_and_repaired(
    small_run: Pipeline, tmp_path: Path, what: str, damage: Callable[[Path], None]
) -> None:
    """Before: reading a damaged flag failed verify itself; damaged metadata left a store that
    failed every run with a traceback. Now verify names it (exit 1), --repair forgets or
    deletes what depends on it, the next run makes it again, equal to the clean run."""
    pipeline = copy_run(small_run, tmp_path)
    damage(pipeline.store / what)
    code, output = _cli("info", str(pipeline.store))
    assert "Traceback" not in output, output
    code, output = _cli("verify", str(pipeline.store))
    named = "consolidated copy of dh_m" if what == "zarr.json" else what.split("/c/")[0]
    assert code == 1 and named in output and "Traceback" not in output, output
    code, output = _cli("verify", str(pipeline.store), "--repair")
    assert code == 0 and "repaired" in output, output
    code, output = _cli(
        "run", str(pipeline.study), "--store", str(pipeline.store), "--cluster", "threads"
    )
    assert code == 0, output
    assert verify(pipeline.store).ok
    same_tables(pipeline.out, small_run.out)


def test_damaged_static_metadata_asks_for_a_new_store(small_run: Pipeline, tmp_path: Path) -> None:
    pipeline = copy_run(small_run, tmp_path)
    _truncate(pipeline.store / "ref_dem_m" / "zarr.json")
    code, output = _cli("verify", str(pipeline.store), "--repair")
    assert code == 1 and "Traceback" not in output and "repaired" not in output, output
    assert "ref_dem_m/zarr.json: does not parse" in output and "into a new store" in output
    assert verify(pipeline.store).damages  # left as it is: nothing made again from nothing
    pipeline = copy_run(small_run, tmp_path / "ids")
    _flip_a_bit(pipeline.store / "scene" / "c" / "0")  # the scene ids: known nowhere else
    code, output = _cli("verify", str(pipeline.store), "--repair")
    assert code == 1 and "scene/c/0: the scene ids do not decode" in output, output
    assert "into a new store" in output


def test_stats_group_left_half_made_is_made_again(small_run: Pipeline, tmp_path: Path) -> None:
    """The bin step killed while it made the `stats` group (before: every later run failed until
    --force): the group has no record of being whole, so the next run makes it again."""
    pipeline = copy_run(small_run, tmp_path)
    invalidate(pipeline.store, "bin", "_stats_group")  # as if killed before it was recorded...
    shutil.rmtree(pipeline.store / "stats" / "count")  # ...half-way through its arrays
    report = run(pipeline)
    assert len(report.recomputed["bin"]) == 3
    same_tables(pipeline.out, small_run.out)


def test_run_killed_as_the_cube_is_created_resumes(small_run: Pipeline, tmp_path: Path) -> None:
    """Killed within milliseconds of the cube's first file (before: a store mbcube would not
    touch again, or tracebacks): the next run completes it."""
    pipeline = copy_run(small_run, tmp_path, store=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CODE,
            "run",
            str(pipeline.study),
            "--store",
            str(pipeline.store),
            "--cluster",
            "threads",
            "--quiet",
        ],
    )
    while proc.poll() is None and not (pipeline.store / "zarr.json").exists():
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, output = _cli("info", str(pipeline.store))
    assert code in (0, 2) and "Traceback" not in output, output  # a one-line error at worst
    run(pipeline)
    same_tables(pipeline.out, small_run.out)


def test_readers_take_no_lock_write_nothing_and_warn_while_a_writer_works(
    small_run: Pipeline, tmp_path: Path
) -> None:
    import mbcube  # noqa: F401  (registers ds.mb)

    pipeline = copy_run(small_run, tmp_path)
    shutil.rmtree(pipeline.store / CACHE_GROUP)
    ds = xr.open_zarr(pipeline.store)
    first = str(ds.glacier_rgi_id.values[0])
    balance = float(ds.mb.mass_balance(glacier=first)["mb_mwe_yr"])
    glaciers = pd.read_csv(small_run.out / "glaciers.csv").set_index("RGIId")
    assert balance == pytest.approx(glaciers.loc[first, "mb_mwe_yr"], rel=1e-9)
    assert not (pipeline.store / CACHE_GROUP).exists()  # nothing written...
    assert not (pipeline.store / LOCK_NAME).exists()  # ...and no lock taken
    with writer_lock(pipeline.store), pytest.warns(MbcubeWarning, match="is being written"):
        ds.mb.mass_balance(glacier=first)


def test_deleted_stats_chunk_refused_by_aggregate_and_redone_by_run(
    small_run: Pipeline, tmp_path: Path
) -> None:
    pipeline = copy_run(small_run, tmp_path)
    shutil.rmtree(pipeline.store / CACHE_GROUP)  # aggregate must read the statistics
    _chunk(pipeline.store, "stats/count", 0).unlink()
    with pytest.raises(StoreDamaged, match=r"statistics of scene \S+ lost 1 file"):
        aggregate(pipeline.store, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no table written
    report = run(pipeline)
    assert len(report.recomputed["bin"]) == 1
    same_tables(pipeline.out, small_run.out)


def test_verify_of_a_sound_store_and_leftover_temporary_files(
    small_run: Pipeline, tmp_path: Path
) -> None:
    pipeline = copy_run(small_run, tmp_path)
    code, output = _cli("verify", str(pipeline.store))
    assert code == 0 and "ok" in output, output
    (pipeline.store / "dh_m" / "c" / "0" / "0" / "x.1234.partial").write_bytes(b"half")
    report = verify(pipeline.store, repair_it=True)
    assert report.ok and report.temporary_files == 1
    assert not (pipeline.store / "dh_m" / "c" / "0" / "0" / "x.1234.partial").exists()


# ------------------------------------------------------------------ found before any pixel work


def test_every_problem_listed_before_any_pixel_work(tiny_study: Path, tmp_path: Path) -> None:
    """A garbage date, a date one day after the reference, a negative h_amb, an unwritable
    output folder: one error listing the four, one line each, exit 2, no store made."""
    study = Path(shutil.copytree(tiny_study, tmp_path / "study"))
    scenes = pd.read_csv(study / "scenes.csv", dtype=str, keep_default_na=False)
    scenes.loc[0, "date"] = "2013-10-21garbage"
    scenes.loc[1, "date"] = "2000-02-17"
    scenes.loc[2, "h_amb"] = "-30"
    scenes.to_csv(study / "scenes.csv", index=False)
    (tmp_path / "a_file").write_text("not a folder")
    store = tmp_path / "cube.zarr"
    code, output = _cli(
        "run", str(study), "--store", str(store), "--out", str(tmp_path / "a_file" / "results")
    )
    assert code == 2, output
    assert "4 problem(s)" in output and "Traceback" not in output
    for text in ("2013-10-21garbage", "is only 1 day after", "field h_amb: -30", "is a file"):
        assert sum(text in line for line in output.splitlines()) == 1, (text, output)
    assert not store.exists()


def test_outlines_off_the_grid_refused_before_any_pixel_work(
    small_run: Pipeline, tmp_path: Path
) -> None:
    study = Path(shutil.copytree(small_run.study, tmp_path / "study"))
    outlines = gpd.read_file(study / "glaciers.gpkg")
    outlines.geometry = outlines.geometry.translate(xoff=500_000)  # another place
    outlines.to_file(study / "glaciers.gpkg")
    code, output = _cli("run", str(study), "--store", str(tmp_path / "cube.zarr"))
    assert code == 2 and "overlaps the grid" in output and "Traceback" not in output, output
    assert not (tmp_path / "cube.zarr").exists()


def test_warnings_print_one_line_without_source_paths(small_run: Pipeline, tmp_path: Path) -> None:
    study = Path(shutil.copytree(small_run.study, tmp_path / "study"))
    outlines = gpd.read_file(study / "glaciers.gpkg")
    x0, y0 = outlines.geometry.iloc[0].centroid.coords[0]
    bowtie = shapely.Polygon([(x0, y0), (x0 + 300, y0 + 300), (x0 + 300, y0), (x0, y0 + 300)])
    outlines.loc[0, "geometry"] = bowtie  # self-intersecting: repaired with a warning
    outlines.to_file(study / "glaciers.gpkg")
    code, output = _cli("ingest", str(study), "--store", str(tmp_path / "cube.zarr"))
    assert code == 0, output
    warned = [line for line in output.splitlines() if line.startswith("warning:")]
    assert warned and str(outlines.iloc[0]["RGIId"]) in warned[0], output
    assert ".py:" not in output and "warnings.warn" not in output


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["--debug", "run", str(tmp_path / "nowhere")])
    assert isinstance(result.exception, StudyError)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "neither a study folder" in result.output


# ------------------------------------------------------------------ full and read-only disks


def _mount(*args: str) -> None:
    """mount(8) with `args`: these tests need root (CI runs as root and sets
    MBCUBE_REQUIRE_MOUNTS=1, which turns a refused mount into a failure, not a skip)."""
    required = os.environ.get("MBCUBE_REQUIRE_MOUNTS") == "1"
    if os.geteuid() != 0 and not required:
        pytest.skip("mounting a small or read-only file system needs root")
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        (pytest.fail if required else pytest.skip)(f"mount {' '.join(args)}: {done.stderr}")


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB file system (tmpfs): less than the small study's cube takes (~2.7 MB)."""
    where = tmp_path / "tiny_disk"
    where.mkdir()
    _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where))
    yield where
    subprocess.run(["umount", str(where)], check=True)


@pytest.fixture
def read_only(small_run: Pipeline, tmp_path: Path) -> Iterator[Path]:
    """A copy of the small study's store, mounted read-only."""
    source = Path(shutil.copytree(small_run.store, tmp_path / "source.zarr"))
    where = tmp_path / "ro.zarr"
    where.mkdir()
    _mount("--bind", str(source), str(where))
    subprocess.run(["mount", "-o", "remount,bind,ro", str(where)], check=True)
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_disk_too_small_refused_before_any_pixel_work(small_run: Pipeline, tiny_disk: Path) -> None:
    code, output = _cli("run", str(small_run.study), "--store", str(tiny_disk / "cube.zarr"))
    assert code == 2 and len(_errors(output)) == 1, output
    assert "1.00 MiB free" in output and "Traceback" not in output
    assert not (tiny_disk / "cube.zarr").exists()


def test_disk_full_while_writing_is_one_line(small_run: Pipeline, tiny_disk: Path) -> None:
    (tiny_disk / "filler").write_bytes(b"\0" * (1024 * 1024 - 4096))
    code, output = _cli("aggregate", str(small_run.store), "--out", str(tiny_disk / "out"))
    assert code == 2 and len(_errors(output)) == 1, output
    assert "disk full" in output and "Traceback" not in output
    assert str(tiny_disk / "out") in output  # the full disk is the output folder's


def test_read_only_store_is_one_line(small_run: Pipeline, read_only: Path, tmp_path: Path) -> None:
    for args in (
        ("run", str(small_run.study), "--store", str(read_only), "--out", str(tmp_path / "o")),
        ("correct", str(read_only), "--force", "--cluster", "threads"),
    ):
        code, output = _cli(*args)
        assert code == 2 and len(_errors(output)) == 1, output
        assert "read-only" in output and "Traceback" not in output
    code, output = _cli("info", str(read_only))  # readers work
    assert code == 0 and "ingested" in output, output
    code, output = _cli("aggregate", str(read_only), "--out", str(tmp_path / "tables"))
    assert code == 0, output  # reads, caches nothing
    code, output = _cli("verify", str(read_only))  # a check reads only
    assert code == 0 and "ok" in output, output
    same_tables(tmp_path / "tables", small_run.out)


def test_disk_estimate_bounds_what_the_run_writes(small_run: Pipeline, tmp_path: Path) -> None:
    """The disk estimate is an upper bound of what the run writes, not a guess below it: the
    small study's cube (mostly metadata and tables at this size) takes less than estimated."""
    from mbcube.preflight import disk_needed_bytes
    from mbcube.store import size_on_disk_bytes
    from mbcube.study import load_study

    estimate = disk_needed_bytes(load_study(small_run.study), tmp_path / "new.zarr")
    assert size_on_disk_bytes(small_run.store) < estimate < 20 * size_on_disk_bytes(small_run.store)
    assert np.isfinite(estimate)
