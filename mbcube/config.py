"""Typed study parameters (study.yaml). Defaults are the values of Lin et al. (2017).

Every model forbids unknown keys, so a typo in study.yaml fails loudly, naming the key.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mbcube.errors import StudyError

#: Surface height of a scene relative to February (m), by acquisition month (Lin et al. 2017's
#: table; its sign: `mbcube.corrections.seasonal`).
SEASONAL_OFFSET_M: dict[int, float] = {
    10: -0.28,
    11: -0.21,
    12: -0.14,
    1: -0.07,
    2: 0.0,
    3: 0.07,
    4: 0.14,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridConfig(_Strict):
    """The cube's common grid. Unset fields come from the reference DEM."""

    crs: str | None = Field(
        None,
        description="Grid CRS (metric), e.g. 'EPSG:32643'. "
        "Default: the reference DEM's CRS, or its UTM zone if geographic.",
    )
    res_m: float | None = Field(
        None, gt=0, description="Pixel size (m). Default: the reference DEM's."
    )
    bounds: tuple[float, float, float, float] | None = Field(
        None,
        description="(left, bottom, right, top) in the grid CRS. Default: the reference DEM's.",
    )
    tile_px: int = Field(1024, ge=64, le=8192, description="Tile (chunk) size in pixels.")


class UnwrapConfig(_Strict):
    """Phase unwrapping (minimum-cost flow)."""

    engine: Literal["snaphu"] = "snaphu"
    mode: Literal["auto", "whole", "tiled"] = Field(
        "auto", description="'auto' tiles scenes larger than whole_scene_max_px."
    )
    whole_scene_max_px: int = Field(2048 * 2048, gt=0)
    halo_px: int = Field(64, ge=8, description="Overlap between neighbouring tiles (px).")
    coherence_min: float = Field(0.3, ge=0, le=1, description="Pixels below are not unwrapped.")
    nlooks: float = Field(
        4.0, gt=0, description="Default number of looks (scenes.csv may override)."
    )
    min_stable_px_to_tie: int = Field(
        200, ge=1, description="A component needs this many stable pixels to be tied."
    )
    min_edge_px: int = Field(
        8,
        ge=1,
        description="A stitching edge between tiles needs this many shared pixels agreeing on "
        "the cycle offset ...",
    )
    min_edge_agreement: float = Field(
        0.9,
        gt=0.5,
        le=1,
        description="... and this fraction of its shared pixels agreeing on the cycle offset.",
    )
    min_component_px: int = Field(
        32,
        ge=1,
        description="Stitched components smaller than this (px) are left out (component 0): "
        "speckle fragments between masked pixels whose cycle cannot be known.",
    )
    repair: Literal["data", "none"] = Field(
        "data",
        description="Cycle slips on glaciers (a tongue thinning by more than h_amb / 2 at its "
        "outline): 'data' unwraps the tiles of a slipped glacier again with its own elevation "
        "profile as prior; 'none' only finds and flags them (mbcube.unwrap.profiles).",
    )
    repair_rounds: int = Field(
        2, ge=1, le=5, description="Rounds of unwrapping with the data prior (at most)."
    )
    profile_bin_m: float = Field(
        50.0, gt=0, description="Elevation bin of the glacier profiles that find slips (m)."
    )
    alias_min_px: int = Field(
        20, ge=1, description="A glacier counts as slipped (or in doubt) from this many pixels ..."
    )
    alias_min_frac: float = Field(
        0.01, ge=0, le=1, description="... and this fraction of its unwrapped pixels."
    )


class CorrectionsConfig(_Strict):
    """Corrections of dh (all in metres)."""

    coherence_min: float = Field(
        0.3, ge=0, le=1, description="Valid pixels need coherence >= this."
    )
    datum_estimator: Literal["median", "nmad_mean"] = "median"
    ramp_order: Literal[0, 1, 2] = Field(
        1, description="0: none, 1: bilinear a + bx + cy + dxy, 2: adds x^2, y^2."
    )
    ramp_sigma_clip: float = Field(3.0, gt=0, description="Clip at this many NMAD when fitting.")
    ramp_iterations: int = Field(3, ge=1)
    penetration: Literal["xband", "xband_glacier", "constant", "none"] = Field(
        "xband",
        description="'xband': table per (region, surface, 50 m bin) from SRTM-X minus SRTM-C; "
        "'xband_glacier': the table, plus on each glacier (x surface) with enough SRTM-X pixels "
        "(penetration_min_px_per_bin, penetration_glacier_min_x_share) its own mean deviation "
        "from the table weighted by an empirical-Bayes k in [0, 1] (this also takes out most of "
        "the glacier's SRTM-C error, which that deviation carries as dh does; stored per glacier "
        "in the penetration group); 'constant': penetration_constant_m; 'none': 0.",
    )
    penetration_constant_m: float = Field(0.0, description="Used when penetration='constant'.")
    penetration_region_pooling: Literal["empirical_bayes", "none"] = Field(
        "empirical_bayes",
        description="'empirical_bayes': a glacier without enough X band of its own "
        "(penetration_glacier_min_x_share, penetration_min_px_per_bin) takes its sub-region's "
        "table drawn toward the table of all regions pooled, as far as the region's difference "
        "from it is what the few glaciers it was measured on explain (penetration.pool_regions; "
        "regions that really differ keep their own); glaciers with X band keep their region's "
        "table, of which they are part. 'none': every glacier its region's table, as Lin et al. "
        "(2017).",
    )
    penetration_min_px_per_bin: int = Field(
        100,
        ge=1,
        description="Table bins with fewer X-band pixels are filled along elevation; with "
        "'xband_glacier', also the fewest X-band pixels a glacier surface needs for its offset.",
    )
    penetration_glacier_min_x_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="penetration='xband_glacier': a glacier (x surface) is refined only when "
        "SRTM-X covers at least this share of its pixels with a C-band reference (and "
        "penetration_min_px_per_bin pixels); elsewhere the table alone.",
    )
    seasonal_offset_m: dict[int, float] = Field(
        default_factory=lambda: dict(SEASONAL_OFFSET_M),
        description="Surface offset relative to February (m), by month 1-12.",
    )
    seasonal_sign: Literal["surface_offset", "correction"] = Field(
        "surface_offset",
        description="'surface_offset': the table is the surface's height relative to February "
        "and is removed from dh (October +0.28 m: snow accumulates October to April); "
        "'correction': the table is added to dh as the paper's wording reads (October "
        "-0.28 m). Reasoning: mbcube.corrections.seasonal.",
    )
    outlier_nmad: float = Field(
        3.0, gt=0, description="Reject dh beyond this many NMAD of the bin."
    )
    coregister_dem_scenes: bool = Field(True, description="Nuth & Kaab shift for DEM-kind scenes.")
    coreg_iterations: int = Field(
        3,
        ge=1,
        description="Most Nuth & Kaab iterations (each resamples the scene at the shift found so "
        "far); they stop earlier once the shift moves by less than 0.01 px.",
    )
    coreg_halo_px: int = Field(
        8,
        ge=2,
        description="Halo of the tiles for the co-registration (px): the largest shift applied is "
        "coreg_halo_px - 1 pixels; a larger shift refuses the scene.",
    )
    min_stable_px: int = Field(
        100,
        ge=1,
        description="Fewest valid stable-ground pixels a scene needs (fewer: the scene is refused "
        "with a message naming it).",
    )
    bin_width_m: float = Field(
        50.0,
        gt=0,
        description="Elevation bin width (m) of the penetration table and of the outlier groups.",
    )
    outlier_band_quantile: float = Field(
        0.5,
        ge=0.0,
        le=0.5,
        description="Outliers are dh beyond [q(p) - outlier_nmad NMAD, q(1 - p) + outlier_nmad "
        "NMAD] of their group, q the group's quantiles: 0.5 is the median -+ outlier_nmad NMAD "
        "rule; smaller p keeps groups with two modes or a long tail (a surging tongue beside "
        "its margins, the thinning margin of a glacier) whole while far blunders still go.",
    )
    outlier_band_holds_zero: bool = Field(
        True,
        description="Widen each group's band to hold 0 (no change): dh between 0 and the group's "
        "typical change is never rejected. Margins, where change fades out towards the outline, "
        "and surging tongues beside their margins share a bin with their glacier's typical "
        "change; a narrow band (its spread small where most of the bin changes alike) rejected "
        "them and biased the bin away from 0. Blunders beyond the band still go.",
    )
    outlier_min_px: int = Field(
        20,
        ge=1,
        description="Outlier groups (glacier or region x surface x elevation bin) with fewer valid "
        "pixels are not filtered.",
    )
    penetration_corr_m: float = Field(
        500.0,
        gt=0,
        description="Correlation length (m) of the DEM noise in SRTM-X minus SRTM-C, for the "
        "standard error of each penetration-table bin (Rolstad et al. 2009). The spread of "
        "penetration between glaciers, which the paper's 2000 m stands for, is its own term "
        "(penetration_std_m, correlated over massbalance.autocorrelation_penetration_m): "
        "2000 m here would count it twice.",
    )

    @field_validator("seasonal_offset_m")
    @classmethod
    def _months(cls, table: dict[int, float]) -> dict[int, float]:
        bad = [m for m in table if not 1 <= m <= 12]
        if bad:
            raise ValueError(f"months must be 1-12, got {bad}")
        return table


class MassBalanceConfig(_Strict):
    """Binning, hypsometric averaging and uncertainty."""

    bin_width_m: float = Field(
        50.0, gt=0, description="Elevation bin width (m) of the reference DEM."
    )
    min_px_per_bin: int = Field(10, ge=1, description="Bins with fewer measurements are filled.")
    min_measured_frac_per_bin: float = Field(
        0.2,
        ge=0,
        le=1,
        description="A bin (x surface) of a glacier counts as measured only when one scene "
        "measured at least this share of its pixels; otherwise it is filled along elevation "
        "(recorded in filled_frac). Partly measured bins are biased towards the part seen, but "
        "filling them is worse: on the synthetic studies 0.5 and 0.7 raised the rms error of "
        "glaciers > 5 km2 (0.057 -> 0.061 and 0.107 m w.e./yr with exact dh), 0-0.35 changed "
        "nothing. Their unmeasured part is in sigma_unmeasured_mwe_yr.",
    )
    void_fill_distance_m: float = Field(
        3000.0,
        ge=0,
        description="Glacier pixels void in both reference DEMs are binned by an elevation "
        "interpolated from the valid reference around the void when they lie within this "
        "distance (m) of it (`mbcube.voids`); farther ones, or all with 0, stay void and take "
        "their glacier's mean balance.",
    )
    density_kg_m3: float = Field(850.0, gt=0)
    density_sigma_kg_m3: float = Field(60.0, ge=0)
    autocorrelation_m: float = Field(
        500.0, gt=0, description="Range (m) of the DEMs' error correlation (random, datum terms)."
    )
    autocorrelation_penetration_m: float = Field(
        2000.0, gt=0, description="Range (m) of the penetration error's correlation."
    )
    reference_sigma_m: float | None = Field(
        None,
        gt=0,
        description="Upper bound (m, 1 sigma) of the reference DEM's error, the part of the "
        "random error common to all scenes. When set, it is used as given. None: the bound the "
        "corrections step measured (NMAD of SRTM-X minus SRTM-C on stable ground, stored as "
        "penetration/reference_sigma_m) where there is one, else the smallest correlated "
        "stable-ground spread among a glacier's scenes (also an upper bound).",
    )
    seasonal_sigma_m_per_month: float = Field(0.15, ge=0)
    scene_rule: Literal["count_weighted", "prefer_jan_mar"] = "count_weighted"
    region_assignment: Literal["centroid", "area_share"] = "centroid"


class FilesConfig(_Strict):
    """Where the study's files are, relative to the study folder. Unset: the contract's layout
    (reference/srtm_c.tif, reference/srtm_x.tif if present, glaciers.gpkg|shp|geojson, ndsi.tif or
    clean_ice.tif, regions.gpkg|shp|geojson if present). Lets a study use files kept elsewhere.
    The prior (one of prior_dhdt, prior_dem) is only ever taken from here."""

    reference_dem: Path | None = None
    reference_dem_x: Path | None = None
    glaciers: Path | None = None
    ndsi: Path | None = None
    clean_ice: Path | None = None
    regions: Path | None = None
    prior_dhdt: Path | None = Field(
        None,
        description="Raster of a prior elevation-change rate (m/yr, any CRS, nodata = unknown): "
        "its dh is removed from every insar scene's phase before unwrapping and added back "
        "after (mbcube.unwrap), so glacier tongues thinning by more than h_amb / 2 land on "
        "their cycle. Not with prior_dem.",
    )
    prior_dem: Path | None = Field(
        None,
        description="A DEM dated prior_dem_date, the prior instead of prior_dhdt: rate = "
        "(prior_dem - reference DEM) / years from reference_date to prior_dem_date (m/yr).",
    )


class ChecksConfig(_Strict):
    """Limits of the up-front validation of a study's inputs. They are not step parameters:
    changing them recomputes nothing, it only lets other inputs through."""

    min_scene_span_days: int = Field(
        365,
        ge=1,
        description="A scene must be dated at least this many days after the reference date: "
        "dh/dt over a shorter span is dominated by seasonal change and noise (and a scene on "
        "the reference date has no span at all).",
    )
    allow_scenes_before_reference: bool = Field(
        False,
        description="Also accept scenes dated at least min_scene_span_days BEFORE the reference "
        "date (a study whose reference DEM is the later one, e.g. an old DEM differenced "
        "against a recent reference: the rate dh / span keeps its sign). Off by default: the "
        "paper's scenes all follow SRTM, and a date typed before the reference flips the sign "
        "of the result.",
    )
    h_amb_min_m: float = Field(
        2.0,
        gt=0,
        description="Smallest height of ambiguity accepted (m). Bistatic X band with the "
        "largest baselines flown gives ~4-5 m; below that the value is a unit or sign error.",
    )
    h_amb_max_m: float = Field(
        2000.0,
        gt=0,
        description="Largest height of ambiguity accepted (m): beyond it a cycle is so tall "
        "that the phase carries no usable height change.",
    )


class StudyConfig(_Strict):
    """Everything study.yaml may hold."""

    name: str | None = None
    reference_date: dt.date = Field(
        dt.date(2000, 2, 16), description="Date of the reference DEM (SRTM: 11-22 Feb 2000)."
    )
    glacier_id_column: str = "RGIId"
    surge_column: str | None = Field("surge", description="Optional 0/1 column in the outlines.")
    region_name_column: str = "name"
    ndsi_threshold: float = Field(0.4, description="Clean ice where NDSI > this.")
    grid: GridConfig = GridConfig()
    files: FilesConfig = FilesConfig()
    prior_dem_date: dt.date | None = Field(
        None,
        description="Date of files.prior_dem (ISO 8601), required with it; at least "
        "checks.min_scene_span_days before or after reference_date.",
    )
    unwrap: UnwrapConfig = UnwrapConfig()
    corrections: CorrectionsConfig = CorrectionsConfig()
    massbalance: MassBalanceConfig = MassBalanceConfig()
    checks: ChecksConfig = ChecksConfig()
    keep_removed_scenes: bool = Field(
        False,
        description="A scene whose row is removed from scenes.csv leaves the results at the next "
        "run. False: its pixels and statistics are deleted from the cube too. True: they are "
        "kept in the cube (scene_state 2, hidden from every step and table) for inspection.",
    )


#: Parameters the static layers or scene coordinates are made from: changing them needs a new cube.
STATIC_KEYS = (
    "reference_date",
    "glacier_id_column",
    "surge_column",
    "region_name_column",
    "ndsi_threshold",
    "grid",
    "files",
    "prior_dem_date",
)


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


class _StudyYamlLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader (the same tags and types) that refuses a key given twice in one
    mapping (YAML's "the last wins" hides an edit) and turns a value error (`2000-02-30`) into a
    YAMLError naming the key path (e.g. 'massbalance.bin_width_m') and line. Merge keys (`<<`) may
    still be overridden, as YAML intends."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.key_paths: dict[int, str] = {}  # id(node) -> key path of the value it holds

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as err:  # e.g. a date's day out of range
            where = self.key_paths.get(id(node))
            key = f"key '{where}' " if where else ""
            raise yaml.YAMLError(
                f"{key}at line {node.start_mark.line + 1}: value {node.value!r} cannot be read "
                f"({err}). Correct it (dates as YYYY-MM-DD)."
            ) from err

    def construct_sequence(self, node: yaml.Node, deep: bool = False) -> list[Any]:
        parent = self.key_paths.get(id(node), "")
        for i, item in enumerate(node.value):
            self.key_paths[id(item)] = f"{parent}[{i}]"
        return super().construct_sequence(node, deep=deep)  # type: ignore[arg-type]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise yaml.constructor.ConstructorError(
                None, None, f"expected a mapping, found {node.id}", node.start_mark
            )
        parent = self.key_paths.get(id(node), "")
        own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        self.flatten_mapping(node)  # merged keys first, then the node's own keys
        mapping: dict[Any, Any] = {}
        seen: dict[Any, int] = {}  # the node's own keys -> line
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                return super().construct_mapping(node, deep=deep)  # raises its ConstructorError
            name = f"{parent}.{key}" if parent else str(key)
            line = key_node.start_mark.line + 1
            if id(key_node) in own:
                if key in seen:
                    raise yaml.YAMLError(
                        f"key '{name}' is given twice (lines {seen[key]} and {line}); YAML "
                        "would silently keep the last. Keep one."
                    )
                seen[key] = line
            self.key_paths[id(value_node)] = name
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


def read_yaml(path: Path) -> Any:
    """A YAML file read as `yaml.safe_load` does, except that a key given twice is refused; any
    problem is a one-line StudyError naming the file, the key or line, and the fix."""
    try:
        # a SafeLoader: yaml.safe_load's tags and types only
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_StudyYamlLoader)
    except (OSError, UnicodeDecodeError) as err:
        raise StudyError(f"{path}: cannot be read as UTF-8 text ({err}).") from err
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = ""
        if err.context:
            line = f" (line {err.context_mark.line + 1})" if err.context_mark else ""
            context = f", {err.context}{line}"
        raise StudyError(
            " ".join(
                f"{path}: not valid YAML{at}: {err.problem or err}{context}. Fix the syntax "
                "there: indent with spaces, write 'key: value', quote values holding ': ' "
                "or ' #'.".split()
            )
        ) from err
    except yaml.YAMLError as err:
        raise StudyError(" ".join(f"{path}: {err}".split())) from err


def load_study_config(path: Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    """Read study.yaml (a missing file gives the defaults) with `overrides` merged over it.

    Read as `yaml.safe_load` does, except that a key given twice is refused. A bad file, key or
    value gives a one-line StudyError naming the file, the key (or line) and the fix."""
    raw = (read_yaml(path) or {}) if path.exists() else {}
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: expected a mapping of keys to values at the top level.")
    try:
        return StudyConfig.model_validate(merged(raw, overrides or {}))
    except ValidationError as err:
        problems = "; ".join(
            f"key '{'.'.join(str(p) for p in e['loc'])}': {' '.join(e['msg'].split())}"
            for e in err.errors()
        )
        raise StudyError(f"{path}: {problems}. Fix or remove these keys.") from err
