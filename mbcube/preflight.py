"""Everything a run needs, checked before any pixel work, in one pass that lists every problem.

The study's contract (`mbcube.study.load_study`: files, rows, fields, dates, h_amb, outlines),
where the cube and the results may be written (`mbcube.store.location`) and whether the disk
holds what the run will write (an estimate, `disk_needed_bytes`). One StudyError names every
problem, each on one line with its file, row or field, and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.warp import transform_bounds

from mbcube import store as st
from mbcube.errors import StudyError
from mbcube.grid import Grid
from mbcube.ingest import study_inputs
from mbcube.store.location import free_bytes, out_problems, store_problems
from mbcube.study import SceneSpec, Study, load_study

#: Bytes per covered pixel each scene kind adds to the cube, uncompressed (an upper bound: zstd
#: only shrinks them): ingest (phase, coherence, h_amb float32, mask uint8), unwrap (phase_unw,
#: dh_raw float32, component int32), correct (dh_m float32, valid uint8); dem: the scene DEM,
#: dh_m and valid.
SCENE_BYTES_PER_PX = {"insar": 4 + 4 + 4 + 1 + 4 + 4 + 4 + 4 + 1, "dem": 4 + 4 + 1}
#: Bytes per grid pixel of the static layers (two reference DEMs, the prior rate, glacier id,
#: surface, region, stable and void flags).
STATIC_BYTES_PER_PX = 4 + 4 + 4 + 4 + 1 + 2 + 1 + 1
#: Bytes per glacier x bin x surface cell of a scene's statistics (count, sum, sum of squares).
STATS_BYTES_PER_CELL = 3 * 8
#: Allowances for what does not grow with pixels: the store's metadata documents, penetration
#: table, hypsometry and caches (~1.3 MB on a 192 x 192 px study), and per scene its records,
#: outlier table and metadata (~100 kB there).
STORE_METADATA_BYTES, SCENE_METADATA_BYTES = 4 * 1024**2, 256 * 1024


def check_run(
    study_dir: Path,
    store: Path,
    out: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Study:
    """The validated study, once the study, the store, the output folder and the free disk
    space were all checked; raises one StudyError listing every problem found."""
    problems: list[str] = []
    study: Study | None = None
    try:
        study = load_study(study_dir, overrides)
    except StudyError as err:
        problems += problem_lines(err)
    root = study.root if study else Path(study_dir).resolve()
    inputs = study_inputs(study) if study else []
    problems += store_problems(store, root, inputs)
    if out is not None:
        problems += out_problems(out, store, root, inputs)
    if study is not None and not problems:
        problems += _disk_problems(study, store)
    if problems:
        head = f"{len(problems)} problem(s) found before any pixel work:"
        raise StudyError("\n  - ".join([head, *problems]))
    if study is None:  # unreachable: a study that failed to load left problems
        raise StudyError(f"{study_dir}: the study could not be read.")
    return study


def problem_lines(err: Exception) -> list[str]:
    """The problems an error lists (one per line), without its heading."""
    lines = [line.strip().removeprefix("- ") for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 1 and lines[0].endswith("problem(s):"):
        lines = lines[1:]
    return lines


def disk_needed_bytes(study: Study, store: Path) -> int:
    """An upper bound of the bytes a run adds to the cube: the static layers when the cube is
    new, and for each scene not yet in it its covered share of the grid times
    SCENE_BYTES_PER_PX and its binned statistics (STATS_BYTES_PER_CELL per glacier x 50 m bin x
    surface over the reference DEM's elevation range), uncompressed. Scenes already in the cube
    are rewritten in place."""
    grid = study.grid
    n_px = grid.ny * grid.nx
    made = st.is_cube(store) and bool(st.read_state(store).get("created"))
    known = set(st.scene_index(store)) if made else set()
    total = 0 if made else STATIC_BYTES_PER_PX * n_px + STORE_METADATA_BYTES
    cells = len(study.outlines) * _elevation_bins(study) * 2
    for scene in study.scenes:
        if scene.scene_id not in known:
            total += round(SCENE_BYTES_PER_PX[scene.kind] * n_px * _covered_share(scene, grid))
            total += STATS_BYTES_PER_CELL * cells + SCENE_METADATA_BYTES
    return total


def _elevation_bins(study: Study) -> int:
    """The number of elevation bins the reference DEM spans (read decimated)."""
    with rasterio.open(study.ref_dem) as src:
        shape = (min(src.height, 256), min(src.width, 256))
        values = src.read(1, out_shape=shape, masked=True).astype(float).filled(np.nan)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 1
    width = study.config.massbalance.bin_width_m
    return int((finite.max() - finite.min()) // width) + 3  # decimation may miss the extremes


def _disk_problems(study: Study, store: Path) -> list[str]:
    needed = disk_needed_bytes(study, store)
    free = free_bytes(store)
    if needed <= free:
        return []
    return [
        f"{Path(store).resolve()}: the run may write up to {_size(needed)} (uncompressed "
        f"estimate) but the file system has {_size(free)} free. Free space there, or give a "
        "--store on a larger disk."
    ]


def _size(n_bytes: int) -> str:
    """A size for people: GiB, MiB or kiB."""
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2)):
        if n_bytes >= size:
            return f"{n_bytes / size:.2f} {unit}"
    return f"{n_bytes / 1024:.0f} kiB"


def _covered_share(scene: SceneSpec, grid: Grid) -> float:
    """The share of the grid the scene's main raster covers (its bounds, in [0, 1])."""
    path = scene.dem if scene.kind == "dem" else scene.phase
    if path is None:
        return 1.0
    with rasterio.open(path) as src:
        left, bottom, right, top = transform_bounds(src.crs, grid.crs, *src.bounds)
    g_left, g_bottom, g_right, g_top = grid.bounds
    width = max(0.0, min(right, g_right) - max(left, g_left))
    height = max(0.0, min(top, g_top) - max(bottom, g_bottom))
    return min(1.0, width * height / ((g_right - g_left) * (g_top - g_bottom)))
