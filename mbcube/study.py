"""Read and validate a study folder (the public input contract, see README.md).

Everything is checked before any pixel work and before anything is written: all problems are
collected and raised as one StudyError whose lines each name the file, the row or field, and the
fix. The limits are study.yaml's `checks` (`mbcube.config.ChecksConfig`).

- Dates (scenes.csv `date`): ISO 8601 only, the whole field: a date `YYYY-MM-DD`, or a date-time
  such as `2013-10-21T05:12:00Z` (or with a space, seconds, fractions, an offset), of which the date
  as written is taken. A scene must be dated at least `checks.min_scene_span_days` after
  `reference_date` (dh / years over a shorter span, or a negative one, is noise and seasonal
  change, or has the wrong sign), and not after today.
- Height of ambiguity (scenes.csv `h_amb`, a number in metres or a raster of metres). The phase
  sign convention: dh_m = phase_unw_rad * h_amb_m / (2 pi), a positive phase meaning the surface
  is higher than the reference DEM; so h_amb_m > 0 always. A processor whose phase decreases with
  height (or whose h_amb carries the sign of the perpendicular baseline) is taken in by giving
  |h_amb| and negating the phase. h_amb must lie in [checks.h_amb_min_m, checks.h_amb_max_m]; a
  raster is read decimated (at most ~256 x 256 values) for that check, and ingest checks every
  tile with the same `h_amb_problem`.
- Phase and coherence rasters (scenes.csv `phase`, `coherence`) are read decimated likewise:
  finite phase must lie in [-pi, pi] (radians, wrapped) and coherence in [0, 1], to the tolerance
  ingest uses tile by tile (`VALUE_TOLERANCE`); every bad file is listed at once.
- scenes.csv is read as CSV (RFC 4180: a field holding a comma is quoted). A row with more fields
  than the header is a problem (e.g. h_amb written `62,9`), unless all the extra fields are empty:
  the trailing commas of spreadsheet exports are accepted (so are empty names at the end of the
  header). A row with fewer fields is a problem; rows of empty fields only are skipped. Rows are
  named by their line number in the file (the header is line 1).
- Scene ids (`scene_id_problem`) name the scene's records and store groups: non-empty, at most
  SCENE_ID_MAX_CHARS characters, printable, one path component (no '/' or '\\', not made of
  dots only), not starting with '_' (the store's own records; Zarr reserves '__'), not
  'zarr.json', and unique even ignoring case (case-insensitive file systems).
- Outlines and region polygons: `mbcube.outlines` (read once here; the validated frames in the
  grid CRS are `Study.outlines` and `Study.regions_frame`).
- The prior (`prior_problems`): study.yaml `files.prior_dhdt` (a rate raster, m/yr) or
  `files.prior_dem` with `prior_dem_date`, not both; the date at least
  `checks.min_scene_span_days` before or after `reference_date`, and not after today.

Each problem is one line: line breaks inside a message (from a library's error text or a value
holding one) are replaced by a space.
"""

from __future__ import annotations

import csv as csvlib
import datetime as dt
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import geopandas as gpd
import numpy as np
import rasterio
from pyproj import CRS
from rasterio.errors import RasterioIOError
from rasterio.warp import calculate_default_transform, transform_bounds

from mbcube.config import ChecksConfig, StudyConfig, load_study_config
from mbcube.errors import StudyError
from mbcube.grid import Grid, utm_crs_for
from mbcube.outlines import read_outlines, read_regions

SceneKind = Literal["insar", "dem"]
SCENE_COLUMNS_REQUIRED = ("scene_id", "date", "kind")
SCENE_FILES: dict[str, tuple[str, ...]] = {
    "insar": ("phase", "coherence", "h_amb"),
    "dem": ("dem",),
}
SCENE_COLUMNS_OPTIONAL = ("phase", "coherence", "h_amb", "mask", "dem", "nlooks", "notes")
OUTLINE_NAMES = ("glaciers.gpkg", "glaciers.shp", "glaciers.geojson", "glaciers.json")
REGION_NAMES = ("regions.gpkg", "regions.shp", "regions.geojson", "regions.json")
#: Values of an h_amb, phase or coherence raster read for the up-front check: at most this
#: many rows and columns.
H_AMB_CHECK_PX = 256
#: The longest scene id (characters): it names the scene's store group (a file name).
SCENE_ID_MAX_CHARS = 128
#: Up-front value limits of scene rasters, by field: (low, high, the fix). Ingest checks every
#: tile against the same limits (`mbcube.ingest._checked`).
VALUE_LIMITS: dict[str, tuple[float, float, str]] = {
    "phase": (-math.pi, math.pi, "give the wrapped phase in radians (degrees x pi / 180)"),
    "coherence": (0.0, 1.0, "give coherence as a fraction in [0, 1] (a percentage / 100)"),
}
#: Relative tolerance of those limits for float rounding: values within
#: VALUE_TOLERANCE * max(|low|, |high|, 1) of [low, high] pass (as at ingest).
VALUE_TOLERANCE = 1e-4
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_DATE_TIME = re.compile(
    r"(\d{4}-\d{2}-\d{2})[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}(:?\d{2})?)?", re.ASCII
)


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
    #: The glacier outlines, validated (`mbcube.outlines.read_outlines`): grid CRS, file order less
    #: the features without a polygon, index = 0-based feature position in the file.
    outlines: gpd.GeoDataFrame = field(repr=False, compare=False)
    #: The region polygons, validated likewise (`mbcube.outlines.read_regions`), or None.
    regions_frame: gpd.GeoDataFrame | None = field(default=None, repr=False, compare=False)
    #: The prior: a rate raster (m/yr), or a DEM dated `config.prior_dem_date` (at most one).
    prior_dhdt: Path | None = None
    prior_dem: Path | None = None

    def static_inputs(self) -> dict[str, Path]:
        """The files the static layers are made from, by role."""
        files = {
            "ref_dem": self.ref_dem,
            "ref_dem_x": self.ref_dem_x,
            "glaciers": self.glaciers,
            "ndsi": self.ndsi,
            "clean_ice": self.clean_ice,
            "regions": self.regions,
            "prior_dhdt": self.prior_dhdt,
            "prior_dem": self.prior_dem,
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
            raise StudyError("\n  - ".join([head, *(_one_line(line) for line in self.lines)]))


def _one_line(text: str) -> str:
    """`text` with its line breaks (and the indentation around them) replaced by one space."""
    return re.sub(r"\s*[\r\n]+\s*", " ", text.strip())


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
    prior_dhdt, prior_dem = given(files.prior_dhdt), given(files.prior_dem)
    for line in prior_problems(config, prior_dhdt is not None, prior_dem is not None):
        problems.add(f"{root}/study.yaml, {line}")
    problems.raise_if_any(root)

    grid = _grid_for(ref_dem, config, ref_crs)
    for path, role in [
        (ref_dem_x, "X-band reference DEM"),
        (ndsi, "NDSI"),
        (clean_ice, "clean-ice mask"),
        (prior_dhdt, "prior rate (files.prior_dhdt)"),
        (prior_dem, "prior DEM (files.prior_dem)"),
    ]:
        if path is not None:
            _check_raster(path, role, problems, grid)
    outlines = regions_frame = None
    if glaciers is not None:  # None was reported above
        outlines = read_outlines(
            glaciers,
            grid,
            config.glacier_id_column,
            surge_column=config.surge_column,
            problems=problems.lines,
        )
    if regions is not None:
        regions_frame = read_regions(
            regions, grid, config.region_name_column, problems=problems.lines
        )
    scenes = _read_scenes(root, grid, config, problems)
    problems.raise_if_any(root)
    if glaciers is None or outlines is None:  # unreachable: reported and raised above
        raise StudyError(f"{root}: glacier outlines missing.")
    return Study(
        root,
        config,
        scenes,
        ref_dem,
        ref_dem_x,
        glaciers,
        ndsi,
        clean_ice,
        regions,
        grid,
        outlines,
        regions_frame,
        prior_dhdt,
        prior_dem,
    )


def prior_problems(config: StudyConfig, rate_given: bool, dem_given: bool) -> list[str]:
    """The problems of the study's prior (study.yaml `files.prior_dhdt`, or `files.prior_dem`
    with `prior_dem_date`), each the rest of a one-line message starting with the key."""
    date = config.prior_dem_date
    if rate_given and dem_given:
        return ["key files: both prior_dhdt and prior_dem are given. Keep one."]
    if date is None:
        if dem_given:
            return [
                "key prior_dem_date: missing, required with files.prior_dem. Add that DEM's "
                "date (YYYY-MM-DD)."
            ]
        return []
    if not dem_given:
        return ["key prior_dem_date: set without files.prior_dem. Add the DEM or remove it."]
    today = dt.date.today()
    if date > today:
        return [f"key prior_dem_date: {date} is after today ({today}). Correct the date."]
    days, minimum = abs((date - config.reference_date).days), config.checks.min_scene_span_days
    if days < minimum:
        return [
            f"key prior_dem_date: {date} is {days} day(s) from the reference date "
            f"{config.reference_date}; the prior DEM must be at least {minimum} days before or "
            "after it (checks.min_scene_span_days): its rate is dh / years. Correct the date, "
            "or give a DEM farther in time."
        ]
    return []


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
        problems.add(
            f"{label}: {role} is not a raster rasterio can read ({err}). Give a raster GDAL "
            "reads (e.g. a GeoTIFF)."
        )
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


def _read_scenes(
    root: Path, grid: Grid, config: StudyConfig, problems: _Problems
) -> tuple[SceneSpec, ...]:
    csv = root / "scenes.csv"
    if not csv.exists():
        problems.add(f"{csv}: missing. Add one row per scene: scene_id,date,kind and its files.")
        return ()
    table = _read_table(csv, problems)
    if table is None:
        return ()
    columns, rows = table
    missing = [c for c in SCENE_COLUMNS_REQUIRED if c not in columns]
    unknown = [c for c in columns if c not in SCENE_COLUMNS_REQUIRED + SCENE_COLUMNS_OPTIONAL]
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
    seen: dict[str, tuple[str, int]] = {}  # casefolded id -> (id, row)
    for row, text in rows:
        spec = _read_scene_row(root, csv, row, text, grid, config, problems)
        if spec is None:
            continue
        key = spec.scene_id.casefold()
        if key in seen:
            first, first_row = seen[key]
            if first == spec.scene_id:
                problems.add(f"{csv} row {row}, field scene_id: '{spec.scene_id}' is used twice.")
            else:
                problems.add(
                    f"{csv} row {row}, field scene_id: '{spec.scene_id}' differs from "
                    f"'{first}' (row {first_row}) only in case, which names the same store "
                    "group on case-insensitive file systems. Rename one."
                )
        seen.setdefault(key, (spec.scene_id, row))
        scenes.append(spec)
    if not scenes and not problems.lines:
        problems.add(f"{csv}: no scenes. Add at least one row.")
    return tuple(scenes)


def _read_table(
    csv: Path, problems: _Problems
) -> tuple[list[str], list[tuple[int, dict[str, str]]]] | None:
    """scenes.csv's column names and data rows (line number, values by column, stripped), or
    None when it cannot be used (problems listed).

    A row with more fields than the header is a problem unless every extra field is empty (the
    trailing commas of spreadsheet exports); so is a row with fewer fields. Empty names at the
    end of the header are dropped, rows of empty fields only skipped (both: spreadsheet exports)."""
    records: list[tuple[int, list[str]]] = []
    line = 0
    try:
        with csv.open(newline="", encoding="utf-8-sig") as file:  # -sig: Excel's BOM
            reader = csvlib.reader(file, skipinitialspace=True, strict=True)
            for record in reader:
                records.append((line + 1, record))  # the line the record starts on
                line = reader.line_num
    except UnicodeDecodeError as err:
        problems.add(f"{csv}: not UTF-8 text ({err}). Save it as UTF-8 CSV.")
        return None
    except (OSError, csvlib.Error) as err:
        problems.add(
            f"{csv}: not a readable CSV at line {line + 1} ({err}). Check the quotes of that "
            "line (a field holding a comma or a quote is quoted, and its quotes doubled)."
        )
        return None
    records = [(n, r) for n, r in records if any(v.strip() for v in r)]
    if not records:
        problems.add(
            f"{csv}: empty. Write the header scene_id,date,kind,... and one row per scene."
        )
        return None
    header_line, header = records[0]
    columns = [c.strip() for c in header]
    while columns and not columns[-1]:
        columns.pop()
    unnamed = [i + 1 for i, c in enumerate(columns) if not c]
    twice = sorted({c for c in columns if c and columns.count(c) > 1})
    if unnamed:
        problems.add(f"{csv} line {header_line}: column(s) {unnamed} of the header have no name.")
    if twice:
        problems.add(f"{csv} line {header_line}: column(s) {twice} appear more than once.")
    if unnamed or twice:
        return None
    n = len(columns)
    rows = []
    for row, record in records[1:]:
        values = [v.strip() for v in record]
        if any("\x00" in v for v in values):
            problems.add(f"{csv} row {row}: holds a NUL character. Save the file as UTF-8 text.")
            continue
        if len(values) > n and not any(values[n:]):
            values = values[:n]  # trailing commas
        if len(values) != n:
            more = len(values) > n
            fix = (
                'Quote a value holding a comma ("62,9"), write decimals with a point (62.9), '
                "and remove extra fields."
                if more
                else "Give every column a field, empty ones too (',,')."
            )
            problems.add(
                f"{csv} row {row}: {len(values)} fields, the header has {n} "
                f"({','.join(columns)}). {fix}"
            )
            continue
        rows.append((row, dict(zip(columns, values, strict=True))))
    return columns, rows


def _read_scene_row(
    root: Path,
    csv: Path,
    row: int,
    values: dict[str, str],
    grid: Grid,
    config: StudyConfig,
    problems: _Problems,
) -> SceneSpec | None:
    where = f"{csv} row {row}"
    n_before = len(problems.lines)
    scene_id = values["scene_id"]
    bad_id = scene_id_problem(scene_id)
    if bad_id is not None:
        problems.add(f"{where}, field scene_id: {bad_id}")
    date = parse_date(values["date"])
    if date is None:
        problems.add(
            f"{where}, field date: '{values['date']}' is not an ISO 8601 date (YYYY-MM-DD, or a "
            "date-time such as 2013-10-21T05:12:00Z). Correct it."
        )
        date = dt.date.min
    else:
        bad_date = date_problem(date, config.reference_date, config.checks)
        if bad_date is not None:
            problems.add(f"{where}, field date: {bad_date}")
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
            n_files = len(problems.lines)
            _check_raster(paths[name], f"field {name}", problems, grid, where=f" ({where})")
            if name in VALUE_LIMITS and len(problems.lines) == n_files:
                _check_value_raster(paths[name], where, name, problems)
    h_amb: float | Path | None = None
    if values.get("h_amb"):
        h_amb = _parse_h_amb(root, values["h_amb"], where, grid, config.checks, problems)
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
    root: Path, text: str, where: str, grid: Grid, checks: ChecksConfig, problems: _Problems
) -> float | Path | None:
    try:
        value = float(text)
    except ValueError:
        path = (root / text).resolve()
        n_before = len(problems.lines)
        _check_raster(path, "field h_amb", problems, grid, where=f" ({where})")
        if len(problems.lines) == n_before:
            _check_h_amb_raster(path, where, checks, problems)
        return path
    problem = h_amb_problem(value, value, checks)
    if problem is not None:
        problems.add(f"{where}, field h_amb: {text} {problem}")
        return None
    return value


def scene_id_problem(scene_id: str) -> str | None:
    """None when `scene_id` may name a scene, else the rest of a one-line message (what is wrong
    and the fix). A scene id names the scene's records and store groups (one path component of
    the store; `mbcube.store.outlier_group_name` maps ids with other characters to a safe name)."""
    if not scene_id:
        return "empty. Give every scene an id."
    shown = (
        repr(scene_id)
        if len(scene_id) <= 40
        else f"{scene_id[:40]!r}... ({len(scene_id)} characters)"
    )
    if len(scene_id) > SCENE_ID_MAX_CHARS:
        return f"{shown} is longer than {SCENE_ID_MAX_CHARS} characters. Use a shorter id."
    if not scene_id.isprintable():
        return f"{shown} holds a line break, tab or other control character. Remove it."
    if scene_id.startswith("_"):
        return (
            f"{shown} starts with '_', which names the store's own records (e.g. _static; Zarr "
            "reserves '__'). Rename the scene."
        )
    if "/" in scene_id or "\\" in scene_id:
        return f"{shown} holds '/' or '\\'; it must be one file name. Rename the scene."
    if not scene_id.strip("."):
        return f"{shown} is made of dots only, a relative path. Rename the scene."
    if scene_id.casefold() == "zarr.json":
        return f"{shown} is the name of Zarr's metadata file. Rename the scene."
    return None


def _decimated(path: Path) -> np.ndarray:
    """The finite values of band 1 of `path` (float64), read decimated to at most
    H_AMB_CHECK_PX rows and columns (nearest pixels; nodata and NaN left out). Raises
    RasterioIOError."""
    with rasterio.open(path) as src:
        step = max(1, math.ceil(max(src.height, src.width) / H_AMB_CHECK_PX))
        shape = (math.ceil(src.height / step), math.ceil(src.width / step))
        values = src.read(1, out_shape=shape, masked=True)
    finite = np.asarray(values.compressed(), dtype="float64")
    return finite[np.isfinite(finite)]


def _check_value_raster(path: Path, where: str, name: str, problems: _Problems) -> None:
    """Check that the finite values of a phase or coherence raster (field `name`) lie within
    VALUE_LIMITS, read decimated (`_decimated`); ingest checks every pixel, tile by tile."""
    low, high, fix = VALUE_LIMITS[name]
    label = f"{where}, field {name}: {path}"
    try:
        finite = _decimated(path)
    except RasterioIOError as err:
        problems.add(f"{label} cannot be read ({err}). Check the file.")
        return
    if finite.size == 0:
        return  # a scene that covers nothing: ingest records its coverage
    tolerance = VALUE_TOLERANCE * max(abs(low), abs(high), 1.0)
    found_low, found_high = float(finite.min()), float(finite.max())
    if found_low < low - tolerance or found_high > high + tolerance:
        problems.add(
            f"{label} has values {found_low:.4g} to {found_high:.4g}, outside [{low:.4g}, "
            f"{high:.4g}]: {fix}."
        )


def _check_h_amb_raster(path: Path, where: str, checks: ChecksConfig, problems: _Problems) -> None:
    """Check the values of an h_amb raster (m), read decimated to at most H_AMB_CHECK_PX rows and
    columns (nearest pixels; nodata and NaN left out). Ingest checks every pixel, tile by tile."""
    label = f"{where}, field h_amb: {path}"
    try:
        finite = _decimated(path)
    except RasterioIOError as err:
        problems.add(f"{label} cannot be read ({err}). Check the file.")
        return
    if finite.size == 0:
        problems.add(f"{label} holds no finite value (all nodata or NaN). Check the file.")
        return
    low, high = float(finite.min()), float(finite.max())
    problem = h_amb_problem(low, high, checks)
    if problem is not None:
        fill = " Or, if 0 fills no-data pixels, set the file's nodata." if low == 0 else ""
        problems.add(f"{label} has values {low:.6g} to {high:.6g} m; they {problem}{fill}")


def h_amb_problem(value_min_m: float, value_max_m: float, checks: ChecksConfig) -> str | None:
    """None when heights of ambiguity from `value_min_m` to `value_max_m` (m) are acceptable,
    else the rest of a one-line message starting with "must" (what is wrong and the fix).

    Convention: dh_m = phase_unw_rad * h_amb_m / (2 pi), positive phase = surface above the
    reference DEM, so h_amb_m > 0; it must also lie in [checks.h_amb_min_m, checks.h_amb_max_m].
    Callers prefix what they checked, e.g. f"{file} row 3, field h_amb: -30 {problem}" or
    f"scene S01 tile (0, 1): h_amb values -31 to -29 m {problem}"."""
    if not (math.isfinite(value_min_m) and math.isfinite(value_max_m)) or value_min_m == 0:
        return "must be a finite non-zero height of ambiguity (m), > 0."
    if value_min_m < 0:
        return (
            "must be > 0: mbcube takes dh = phase_unw * h_amb / (2 pi), a positive phase meaning "
            "a surface above the reference DEM. Give |h_amb|, and negate the phase if your "
            "processor's phase decreases with height."
        )
    low, high = checks.h_amb_min_m, checks.h_amb_max_m
    if value_min_m < low or value_max_m > high:
        return (
            f"must lie in [{low:g}, {high:g}] m (checks.h_amb_min_m, checks.h_amb_max_m): check "
            "that it is the height of ambiguity in metres, or set those limits in study.yaml."
        )
    return None


def parse_date(text: str) -> dt.date | None:
    """The date of an ISO 8601 date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM[:SS[.f]][Z|+HH:MM],
    'T' or a space between); the date as written is taken (no change of time zone). None when
    `text` is anything else, in whole or in part."""
    try:
        if _DATE.fullmatch(text):
            return dt.date.fromisoformat(text)
        match = _DATE_TIME.fullmatch(text)
        if match:
            dt.datetime.fromisoformat(text)  # the time must be valid too
            return dt.date.fromisoformat(match.group(1))
    except ValueError:
        return None
    return None


def date_problem(
    date: dt.date, reference_date: dt.date, checks: ChecksConfig, today: dt.date | None = None
) -> str | None:
    """None when a scene of `date` may be used against a reference DEM of `reference_date`, else
    a one-line message (what is wrong and the fix). `today`: default the local date."""
    today = dt.date.today() if today is None else today
    if date > today:
        return f"{date} is after today ({today}). Correct the date."
    span_days = (date - reference_date).days
    minimum = checks.min_scene_span_days
    if span_days >= minimum or (checks.allow_scenes_before_reference and -span_days >= minimum):
        return None
    days = f"{abs(span_days)} day{'' if abs(span_days) == 1 else 's'}"
    if span_days < 0:
        how = f"is {days} before"
    elif span_days == 0:
        how = "is on"
    else:
        how = f"is only {days} after"
    side = "before or after" if checks.allow_scenes_before_reference else "after"
    return (
        f"{date} {how} the reference date {reference_date}; a scene must be dated at least "
        f"{minimum} days {side} it. Correct the date, or set reference_date / "
        "checks.min_scene_span_days (or checks.allow_scenes_before_reference, for a later "
        "reference DEM) in study.yaml."
    )


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
