"""Read and validate a study folder (the public input contract, see README.md).

Everything is checked before anything is written: all problems are collected and raised as one
StudyError whose lines each name the file, the row or field, and the fix.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import rasterio
from pyproj import CRS
from rasterio.errors import RasterioIOError
from rasterio.warp import calculate_default_transform, transform_bounds

from mbcube.config import StudyConfig, load_study_config
from mbcube.errors import StudyError
from mbcube.grid import Grid, utm_crs_for

SceneKind = Literal["insar", "dem"]
SCENE_COLUMNS_REQUIRED = ("scene_id", "date", "kind")
SCENE_FILES: dict[str, tuple[str, ...]] = {
    "insar": ("phase", "coherence", "h_amb"),
    "dem": ("dem",),
}
SCENE_COLUMNS_OPTIONAL = ("phase", "coherence", "h_amb", "mask", "dem", "nlooks", "notes")
OUTLINE_NAMES = ("glaciers.gpkg", "glaciers.shp", "glaciers.geojson", "glaciers.json")
REGION_NAMES = ("regions.gpkg", "regions.shp", "regions.geojson", "regions.json")


@dataclass(frozen=True)
class SceneSpec:
    """One row of scenes.csv, validated. Paths are absolute; h_amb_m is a number or a raster."""

    scene_id: str
    date: dt.date
    kind: SceneKind
    row: int
    phase: Path | None = None
    coherence: Path | None = None
    h_amb_m: float | Path | None = None
    mask: Path | None = None
    dem: Path | None = None
    nlooks: float | None = None

    def input_files(self) -> dict[str, Path]:
        """The raster files of this scene, by field name."""
        files = {
            "phase": self.phase,
            "coherence": self.coherence,
            "mask": self.mask,
            "dem": self.dem,
            "h_amb": self.h_amb_m if isinstance(self.h_amb_m, Path) else None,
        }
        return {k: v for k, v in files.items() if v is not None}


@dataclass(frozen=True)
class Study:
    """A validated study folder."""

    root: Path
    config: StudyConfig
    scenes: tuple[SceneSpec, ...]
    ref_dem: Path
    ref_dem_x: Path | None
    glaciers: Path
    ndsi: Path | None
    clean_ice: Path | None
    regions: Path | None
    grid: Grid = field(repr=False)

    def static_inputs(self) -> dict[str, Path]:
        """The files the static layers are made from, by role."""
        files = {
            "ref_dem": self.ref_dem,
            "ref_dem_x": self.ref_dem_x,
            "glaciers": self.glaciers,
            "ndsi": self.ndsi,
            "clean_ice": self.clean_ice,
            "regions": self.regions,
        }
        return {k: v for k, v in files.items() if v is not None}


class _Problems:
    """Collects problems so that the user sees all of them at once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def raise_if_any(self, root: Path) -> None:
        if self.lines:
            head = f"study {root} has {len(self.lines)} problem(s):"
            raise StudyError("\n  - ".join([head, *self.lines]))


def load_study(root: Path | str, overrides: dict[str, Any] | None = None) -> Study:
    """Read and validate the study folder `root` (raises StudyError listing every problem).

    `overrides`: parameters merged over the folder's study.yaml (e.g. from a pipeline file)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise StudyError(f"{root}: study folder not found. Pass the folder holding scenes.csv.")
    problems = _Problems()
    config = load_study_config(root / "study.yaml", overrides)

    files = config.files

    def given(path: Path | None) -> Path | None:
        """A path set in study.yaml's `files`, which must exist."""
        if path is None:
            return None
        full = (root / path).resolve()
        if not full.exists():
            problems.add(f"{root}/study.yaml, key files: {path} not found (looked at {full}).")
        return full

    ref_dem = given(files.reference_dem) or root / "reference" / "srtm_c.tif"
    ref_crs = _check_raster(ref_dem, "reference DEM", problems)
    ref_dem_x = given(files.reference_dem_x) or _optional(root / "reference" / "srtm_x.tif")
    glaciers = given(files.glaciers) or _first_existing(root, OUTLINE_NAMES)
    if glaciers is None:
        problems.add(
            f"{root}/glaciers.gpkg: missing. Add the glacier outlines ({', '.join(OUTLINE_NAMES)})."
        )
    ndsi = given(files.ndsi) or (None if files.clean_ice else _optional(root / "ndsi.tif"))
    clean_ice = given(files.clean_ice) or (
        None if files.ndsi else _optional(root / "clean_ice.tif")
    )
    if ndsi is not None and clean_ice is not None:
        problems.add(f"{root}: both an NDSI raster and a clean-ice mask are given. Keep one.")
    regions = given(files.regions) or _first_existing(root, REGION_NAMES)
    problems.raise_if_any(root)

    grid = _grid_for(ref_dem, config, ref_crs)
    for path, role in [
        (ref_dem_x, "X-band reference DEM"),
        (ndsi, "NDSI"),
        (clean_ice, "clean-ice mask"),
    ]:
        if path is not None:
            _check_raster(path, role, problems, grid)
    if glaciers is not None:  # None was reported above
        _check_vector(glaciers, config.glacier_id_column, "id column", problems, unique=True)
    if regions is not None:
        _check_vector(
            regions, config.region_name_column, "region name column", problems, unique=True
        )
    scenes = _read_scenes(root, grid, problems)
    problems.raise_if_any(root)
    if glaciers is None:  # unreachable: reported and raised above
        raise StudyError(f"{root}: glacier outlines missing.")
    return Study(root, config, scenes, ref_dem, ref_dem_x, glaciers, ndsi, clean_ice, regions, grid)


def _optional(path: Path) -> Path | None:
    return path if path.exists() else None


def _first_existing(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).exists()), None)


def _check_raster(
    path: Path, role: str, problems: _Problems, grid: Grid | None = None, where: str = ""
) -> CRS | None:
    """Check that `path` is a readable raster with a CRS that overlaps `grid`; return its CRS."""
    label = f"{path}{where}"
    if not path.exists():
        problems.add(
            f"{label}: {role} file not found. Check the path (relative to the study folder)."
        )
        return None
    try:
        with rasterio.open(path) as src:
            crs, bounds = src.crs, src.bounds
    except RasterioIOError as err:
        problems.add(f"{label}: {role} is not a raster rasterio can read ({err}).")
        return None
    if crs is None:
        problems.add(
            f"{label}: {role} has no CRS. Write one into the file (e.g. gdal_edit.py -a_srs)."
        )
        return None
    if grid is not None:
        left, bottom, right, top = transform_bounds(crs, grid.crs, *bounds)
        g_left, g_bottom, g_right, g_top = grid.bounds
        if left >= g_right or right <= g_left or bottom >= g_top or top <= g_bottom:
            problems.add(
                f"{label}: {role} does not overlap the study grid {grid.bounds} ({grid.crs}). "
                "Check its CRS tag and extent."
            )
    return CRS.from_user_input(crs)


def _check_vector(path: Path, column: str, role: str, problems: _Problems, unique: bool) -> None:
    import pyogrio  # geospatial vector I/O, only needed here and in ingest

    try:
        info = pyogrio.read_info(path)
    except Exception as err:  # pyogrio raises several error types for unreadable files
        problems.add(f"{path}: not a vector file OGR can read ({err}).")
        return
    if info.get("crs") is None:
        problems.add(f"{path}: no CRS. Save the outlines with their CRS.")
    if column not in list(info["fields"]):
        problems.add(
            f"{path}: {role} '{column}' not found (columns: {', '.join(info['fields'])}). "
            "Set it in study.yaml (glacier_id_column / region_name_column)."
        )
        return
    if unique:
        values = pyogrio.read_dataframe(path, columns=[column], read_geometry=False)[column]
        dupes = values[values.duplicated()].astype(str).unique()[:5]
        if len(dupes):
            problems.add(
                f"{path}: column '{column}' has duplicate values {list(dupes)}; ids must be unique."
            )


def _read_scenes(root: Path, grid: Grid, problems: _Problems) -> tuple[SceneSpec, ...]:
    csv = root / "scenes.csv"
    if not csv.exists():
        problems.add(f"{csv}: missing. Add one row per scene: scene_id,date,kind and its files.")
        return ()
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        problems.add(f"{csv}: not a readable CSV ({err}).")
        return ()
    table.columns = [c.strip() for c in table.columns]
    missing = [c for c in SCENE_COLUMNS_REQUIRED if c not in table.columns]
    unknown = [c for c in table.columns if c not in SCENE_COLUMNS_REQUIRED + SCENE_COLUMNS_OPTIONAL]
    if missing:
        problems.add(f"{csv}: missing column(s) {missing}.")
    if unknown:
        problems.add(
            f"{csv}: unknown column(s) {unknown}; allowed: "
            f"{list(SCENE_COLUMNS_REQUIRED + SCENE_COLUMNS_OPTIONAL)}."
        )
    if missing or unknown:
        return ()
    scenes = []
    seen: set[str] = set()
    for index, values in table.iterrows():
        row = int(str(index)) + 2  # 1-based line number, after the header
        spec = _read_scene_row(
            root, csv, row, {str(k): str(v).strip() for k, v in values.items()}, grid, problems
        )
        if spec is None:
            continue
        if spec.scene_id in seen:
            problems.add(f"{csv} row {row}, field scene_id: '{spec.scene_id}' is used twice.")
        seen.add(spec.scene_id)
        scenes.append(spec)
    if not scenes and not problems.lines:
        problems.add(f"{csv}: no scenes. Add at least one row.")
    return tuple(scenes)


def _read_scene_row(
    root: Path, csv: Path, row: int, values: dict[str, str], grid: Grid, problems: _Problems
) -> SceneSpec | None:
    where = f"{csv} row {row}"
    n_before = len(problems.lines)
    scene_id = values["scene_id"]
    if not scene_id:
        problems.add(f"{where}, field scene_id: empty. Give every scene an id.")
    try:
        date = dt.date.fromisoformat(values["date"][:10])
    except ValueError:
        problems.add(
            f"{where}, field date: '{values['date']}' is not an ISO 8601 date (YYYY-MM-DD)."
        )
        date = dt.date.min
    kind = values["kind"]
    if kind not in SCENE_FILES:
        problems.add(f"{where}, field kind: '{kind}' must be 'insar' or 'dem'.")
        return None
    needed = SCENE_FILES[kind]
    other_kind = next(k for k in SCENE_FILES if k != kind)
    for name in needed:
        if not values.get(name):
            problems.add(f"{where}, field {name}: required for kind '{kind}'.")
    for name in SCENE_FILES[other_kind]:
        if values.get(name) and name not in needed:
            problems.add(
                f"{where}, field {name}: belongs to kind '{other_kind}', not '{kind}'. Remove it."
            )
    paths: dict[str, Path] = {}
    for name in ("phase", "coherence", "mask", "dem"):
        if values.get(name) and (name in needed or name == "mask"):
            paths[name] = (root / values[name]).resolve()
            _check_raster(paths[name], f"field {name}", problems, grid, where=f" ({where})")
    h_amb: float | Path | None = None
    if values.get("h_amb"):
        h_amb = _parse_h_amb(root, values["h_amb"], where, grid, problems)
    nlooks = None
    if values.get("nlooks"):
        try:
            nlooks = float(values["nlooks"])
            if not nlooks > 0:
                raise ValueError
        except ValueError:
            problems.add(f"{where}, field nlooks: '{values['nlooks']}' must be a positive number.")
    if len(problems.lines) > n_before:
        return None
    return SceneSpec(scene_id, date, kind, row, h_amb_m=h_amb, nlooks=nlooks, **paths)  # type: ignore[arg-type]


def _parse_h_amb(
    root: Path, text: str, where: str, grid: Grid, problems: _Problems
) -> float | Path | None:
    try:
        value = float(text)
    except ValueError:
        path = (root / text).resolve()
        _check_raster(path, "field h_amb", problems, grid, where=f" ({where})")
        return path
    if not math.isfinite(value) or value == 0:
        problems.add(
            f"{where}, field h_amb: {text} must be a finite non-zero height of ambiguity (m)."
        )
        return None
    return value


def _grid_for(ref_dem: Path, config: StudyConfig, ref_crs: CRS | None) -> Grid:
    """The study grid: study.yaml's settings, else the reference DEM's grid (its UTM zone if geographic)."""
    g = config.grid
    with rasterio.open(ref_dem) as src:
        src_bounds, src_res, src_w, src_h = src.bounds, src.res, src.width, src.height
    if ref_crs is None:
        raise StudyError(f"{ref_dem}: reference DEM has no CRS.")
    if g.crs is not None:
        crs = g.crs
    elif ref_crs.is_geographic:
        lon = (src_bounds.left + src_bounds.right) / 2
        lat = (src_bounds.bottom + src_bounds.top) / 2
        crs = utm_crs_for(lon, lat)
    else:
        crs = ref_crs.to_string()
    if not CRS.from_user_input(crs).is_projected:
        raise StudyError(f"study.yaml, key grid.crs: '{crs}' is not a metric (projected) CRS.")
    same_crs = CRS.from_user_input(crs) == ref_crs
    if g.res_m is not None:
        res = g.res_m
    elif same_crs:
        res = float(src_res[0])
    else:
        transform, _, _ = calculate_default_transform(ref_crs, crs, src_w, src_h, *src_bounds)
        res = float(round(abs(transform.a), 1))
    if g.bounds is not None:
        bounds = g.bounds
    elif same_crs and g.res_m is None:
        return Grid(crs, src_bounds.left, src_bounds.top, res, src_h, src_w, g.tile_px)
    else:
        bounds = transform_bounds(ref_crs, crs, *src_bounds)
    return Grid.covering(crs, bounds, res, g.tile_px)
