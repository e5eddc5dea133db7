"""The study report: one self-contained HTML page (report.html) beside the tables and figures.

It summarises what the store records: the grid and study parameters, the scenes (date, kind,
coverage), the corrections applied to each scene (datum offset, ramp, co-registration shift,
seasonal offset), the unwrapping quality of InSAR scenes and the glaciers whose phase cycle was
repaired or is in doubt, the penetration table, and the glacier and region tables with their
uncertainties; the figures are linked by relative path (figures/*.png). Glaciers whose phase
cycle is in doubt are named under the headline and marked wherever glaciers are listed or drawn.
A part whose input is absent (a step not run yet, a missing table) is replaced by a note; the
report never fails for that.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

import mbcube
from mbcube.errors import StoreError
from mbcube.store import open_cube, read_state, step_records
from mbcube.unwrap.profiles import FLAG_DOUBT, FLAG_NAMES, FLAG_REPAIRED

__all__ = ["format_value", "write_report"]

log = logging.getLogger(__name__)

#: Decimals by column-name ending (first match wins); others get 4 significant digits.
DECIMALS: tuple[tuple[str, int], ...] = (
    ("_mwe_yr", 3),
    ("_m_yr", 3),
    ("_km2", 3),
    ("_m2", 0),
    ("_m", 3),
    ("years", 2),
)
PERCENT_SUFFIX = "_frac"

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; white-space: nowrap; }
th { background: #f0f3f6; } td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
tr.doubt td { background: #fff7e6; } tr.doubt td:first-child { border-left: 3px solid #f0a000; }
.note { color: #8a5a00; background: #fff7e6; border-left: 3px solid #f0a000; padding: 4px 8px; }
.meta { color: #555; font-size: 0.9em; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; max-width: 900px; }
.scroll { overflow-x: auto; }
"""


# ---------------------------------------------------------------- formatting


def format_value(column: str, value: Any) -> str:
    """A table cell as text: '–' for missing, integers as integers, fractions as percent,
    floats with the decimals of their unit (see DECIMALS), the rest as str."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "–"
        if column.endswith(PERCENT_SUFFIX):
            return f"{100 * v:.1f} %"
        for suffix, decimals in DECIMALS:
            if column.endswith(suffix):
                text = f"{v:.{decimals}f}"
                return text.lstrip("-") if float(text) == 0 else text
        if v == round(v) and abs(v) < 1e12 and column.startswith("n_"):
            return str(int(v))
        return f"{v:.4g}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(format_value(column, v) for v in np.asarray(value).ravel())
    return str(value)


def _esc(text: Any) -> str:
    return html.escape(str(text))


def html_table(
    frame: pd.DataFrame,
    *,
    formatters: dict[str, Callable[[Any], str]] | None = None,
    headers: dict[str, str] | None = None,
    row_classes: Sequence[str] | None = None,
) -> str:
    """A DataFrame as an HTML table, cells formatted by `format_value` (or `formatters`);
    row_classes: a CSS class per row ('' for none)."""
    formatters = formatters or {}
    headers = headers or {}
    text_cols = {str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])}
    head = "".join(
        f'<th class="{"text" if str(c) in text_cols else "num"}">{_esc(headers.get(str(c), c))}</th>'
        for c in frame.columns
    )
    rows = []
    classes = row_classes if row_classes is not None else [""] * len(frame)
    for record, row_class in zip(frame.itertuples(index=False, name=None), classes, strict=True):
        cells = []
        for column, value in zip(frame.columns, record, strict=True):
            name = str(column)
            shown = formatters[name](value) if name in formatters else format_value(name, value)
            cls = "text" if name in text_cols else "num"
            cells.append(f'<td class="{cls}">{_esc(shown)}</td>')
        attr = f' class="{_esc(row_class)}"' if row_class else ""
        rows.append(f"<tr{attr}>" + "".join(cells) + "</tr>")
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _note(text: str) -> str:
    return f'<p class="note">{_esc(text)}</p>'


def _section(title: str, body: str, anchor: str) -> str:
    return f'<h2 id="{anchor}">{_esc(title)}</h2>\n{body}\n'


# ---------------------------------------------------------------- parts


def _read_csv(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        log.warning("report: cannot read %s: %s", path, err)
        return None


def _group(store: Path, name: str) -> xr.Dataset | None:
    if not (store / name / "zarr.json").exists():
        return None
    return xr.open_zarr(str(store), group=name, chunks={})


def _header(ds: xr.Dataset | None, state: dict[str, Any], store: Path) -> str:
    config = state.get("study", {}).get("config", {})
    name = config.get("name") or store.parent.name
    grid = state.get("grid", {})
    lines = [
        f"<h1>mbcube report: {_esc(name)}</h1>",
        '<p class="meta">',
        f"Store <code>{_esc(store)}</code> (schema {_esc(state.get('schema_version', '?'))}, "
        f"made by mbcube {_esc(state.get('mbcube_version', '?'))}); report by mbcube "
        f"{_esc(mbcube.__version__)} on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.<br>",
    ]
    if grid:
        ny, nx, res = grid.get("ny"), grid.get("nx"), grid.get("res")
        lines.append(
            f"Grid {ny} x {nx} px of {res:g} m ({_esc(grid.get('crs'))}), "
            f"{(ny or 0) * (nx or 0) * (res or 0) ** 2 / 1e6:,.0f} km², tiles of "
            f"{grid.get('tile')} px.<br>"
        )
    if ds is not None:
        n_regions = int(ds.sizes.get("region", 0))
        lines.append(
            f"{int(ds.sizes.get('glacier', 0))} glacier outlines, {n_regions} region(s), "
            f"{int(ds.sizes.get('scene', 0))} complete scene(s); reference date "
            f"{_esc(config.get('reference_date', '?'))}."
        )
    lines.append("</p>")
    return "\n".join(lines)


def _study_row(regions: pd.DataFrame | None) -> pd.Series | None:
    """The study-wide row of regions.csv (name 'all', all glaciers), or None."""
    if regions is None or not {"name", "mb_mwe_yr"} <= set(regions.columns):
        return None
    rows = regions[regions["name"].astype(str) == "all"]
    if "glaciers" in rows.columns:
        rows = rows[rows["glaciers"].astype(str) == "all"]
    return None if rows.empty else rows.iloc[0]


def _plus_minus(mb: Any, sigma: Any) -> str:
    """A mass balance and its 1 sigma (m w.e./yr) as 'mb ± sigma'."""
    return f"{format_value('mb_mwe_yr', mb)} ± {format_value('mb_sigma_mwe_yr', sigma)}"


def _headline(regions: pd.DataFrame | None) -> str:
    """The study-wide result (regions.csv row 'all', all glaciers) in one sentence."""
    row = _study_row(regions)
    if row is None:
        return ""
    text = f"Study-wide mass balance: <b>{_esc(format_value('mb_mwe_yr', row['mb_mwe_yr']))}"
    if "mb_sigma_mwe_yr" in row:
        text += f" ± {_esc(format_value('mb_sigma_mwe_yr', row['mb_sigma_mwe_yr']))}"
    text += " m w.e./yr</b>"
    if "dhdt_m_yr" in row:
        text += f" (dh/dt {_esc(format_value('dhdt_m_yr', row['dhdt_m_yr']))} m/yr"
        if "area_km2" in row:
            text += f" over {_esc(format_value('area_km2', row['area_km2']))} km²"
        text += ")"
    if "mass_gt_yr" in row:
        text += f", {_esc(format_value('mass_gt_yr', row['mass_gt_yr']))} Gt/yr"
    return f"<p>{text}.</p>"


def _regions_part(regions: pd.DataFrame | None) -> str:
    if regions is None:
        return _note("No regions.csv in the tables folder: run `mbcube aggregate` first.")
    frame = regions.copy()
    if {"mb_mwe_yr", "mb_sigma_mwe_yr"} <= set(frame.columns):
        frame.insert(
            list(frame.columns).index("mb_mwe_yr"),
            "mass balance (m w.e./yr)",
            [
                _plus_minus(m, s)
                for m, s in zip(frame["mb_mwe_yr"], frame["mb_sigma_mwe_yr"], strict=True)
            ],
        )
    return (
        "<p>Mass balance rates in m w.e./yr, elevation change rates (dh/dt) in m/yr, areas in "
        "km², volume change in km³/yr, mass change in Gt/yr; σ columns are the uncertainty "
        "terms (1σ) and <i>mb_sigma</i> their combination. <i>glaciers</i>: all glaciers, or "
        "without surge-type glaciers.</p>" + html_table(frame)
    )


def _glaciers_part(glaciers: pd.DataFrame | None) -> str:
    if glaciers is None:
        return _note("No glaciers.csv in the tables folder: run `mbcube aggregate` first.")
    measured = glaciers["mb_mwe_yr"].notna().sum() if "mb_mwe_yr" in glaciers.columns else 0
    summary = f"<p>{len(glaciers)} glaciers, {measured} with a mass balance"
    n_doubt = len(_in_doubt(glaciers))
    if n_doubt:
        summary += (
            f"; {n_doubt} with a phase cycle in doubt (highlighted; "
            '<a href="#cycles">Phase cycles</a>)'
        )
    flagged = "unwrap_flag" in glaciers.columns
    table = html_table(
        glaciers,
        formatters={"unwrap_flag": _flag_words} if flagged else None,
        row_classes=[_row_class(f) for f in glaciers["unwrap_flag"]] if flagged else None,
    )
    return (
        summary
        + ".</p>"
        + f"<details><summary>Glacier table ({len(glaciers)} rows)</summary>"
        + table
        + "</details>"
    )


# ---------------------------------------------------------------- phase cycles (issue 14)

#: glaciers.csv columns the section reads: the cycle check (`mbcube.aggregate.UNWRAP_COLUMNS`),
#: its error term and the mass balance.
CYCLE_COLUMNS = (
    "unwrap_flag",
    "unwrap_prior",
    "unwrap_repaired_area_km2",
    "unwrap_doubt_area_km2",
    "sigma_unwrap_mwe_yr",
    "area_km2",
    "mb_mwe_yr",
    "mb_sigma_mwe_yr",
)
#: Ids of glaciers in doubt named in one sentence (the rest counted).
MAX_NAMED = 10


def _flag_words(flag: Any) -> str:
    """A glaciers.csv unwrap_flag (0, 1, 2) as words (`FLAG_NAMES`)."""
    try:
        return FLAG_NAMES.get(int(flag), str(flag))
    except (TypeError, ValueError):
        return "–"


def _row_class(flag: Any) -> str:
    return "doubt" if flag == FLAG_DOUBT else ""


def _in_doubt(glaciers: pd.DataFrame | None) -> pd.DataFrame:
    """The rows of glaciers.csv whose phase cycle is in doubt (none without unwrap_flag)."""
    if glaciers is None or "unwrap_flag" not in glaciers.columns:
        return pd.DataFrame()
    return glaciers[glaciers["unwrap_flag"] == FLAG_DOUBT]


def _doubt_note(glaciers: pd.DataFrame | None) -> str:
    """A warning under the headline naming the glaciers whose phase cycle is in doubt."""
    doubt = _in_doubt(glaciers)
    if doubt.empty:
        return ""
    ids = [str(i) for i in doubt.iloc[:, 0]]
    named = ", ".join(ids[:MAX_NAMED]) + (
        f" and {len(ids) - MAX_NAMED} more" if len(ids) > MAX_NAMED else ""
    )
    text = (
        f"{len(ids)} glacier{'s' if len(ids) != 1 else ''} with a phase cycle in doubt "
        f"({named}): part of {'their' if len(ids) != 1 else 'its'} area may sit a whole "
        "cycle off; the unwrapping error term covers it."
    )
    return f'<p class="note">{_esc(text)} See <a href="#cycles">Phase cycles</a>.</p>'


def _share(area_km2: float, total_km2: float) -> str:
    return format_value("_frac", area_km2 / total_km2) if total_km2 > 0 else "–"


def _cycles_part(
    ds: xr.Dataset | None, glaciers: pd.DataFrame | None, regions: pd.DataFrame | None
) -> str:
    """The glaciers whose phase cycle the unwrap step repaired or left in doubt: how many, their
    area, the study's unwrapping term and a table of them (`_cycle_table`); one sentence when
    there are none; nothing to say without InSAR scenes."""
    kinds = (
        [str(k) for k in ds["scene_kind"].values] if ds is not None and "scene_kind" in ds else []
    )
    if kinds and "insar" not in kinds:
        return "<p>No InSAR scenes: no phase was unwrapped, so no cycle can slip.</p>"
    if glaciers is None:
        return _note("No glaciers.csv in the tables folder: run `mbcube aggregate` first.")
    missing = [c for c in CYCLE_COLUMNS if c not in glaciers.columns]
    if missing:
        return _note(
            f"glaciers.csv has no {', '.join(missing)} (written by an earlier mbcube): run "
            "`mbcube aggregate` again."
        )
    if ds is not None and "unwrap_flag" not in ds:
        return _note(
            "The store records no cycle check per glacier (unwrapped by an earlier mbcube): the "
            "unwrap columns of glaciers.csv are zeros, not a finding. `mbcube unwrap --force` "
            "checks them."
        )
    flag = glaciers["unwrap_flag"]
    if not flag.isin([FLAG_REPAIRED, FLAG_DOUBT]).any():
        return (
            f"<p>No cycle slips were found: the glacier profiles of every InSAR scene, and the "
            f"scenes compared with each other, put all {len(glaciers)} glaciers on one phase "
            "cycle.</p>"
        )
    total = float(np.nansum(glaciers["area_km2"]))
    items = []
    for code, what, column, done in (
        (FLAG_REPAIRED, "repaired by a prior", "unwrap_repaired_area_km2", "repaired"),
        (FLAG_DOUBT, "in doubt", "unwrap_doubt_area_km2", "in doubt"),
    ):
        part = glaciers[flag == code]
        head = f"<li><b>{len(part)} {'glacier' if len(part) == 1 else 'glaciers'} {what}</b>"
        if part.empty:
            items.append(f"{head}.</li>")
            continue
        glacier_km2 = float(np.nansum(part["area_km2"]))
        flagged_km2 = float(np.nansum(part[column]))
        items.append(
            f"{head}: {format_value('area_km2', glacier_km2)} km² "
            f"({_share(glacier_km2, total)} of the {format_value('area_km2', total)} km² of "
            f"glaciers), {format_value('area_km2', flagged_km2)} km² of it {done} "
            f"({_share(flagged_km2, total)}).</li>"
        )
    text = (
        "<p>Where a glacier tongue thinned (or a surge front thickened) by more than half a "
        "height of ambiguity, the unwrapped phase can land a whole cycle off. Each glacier's "
        "elevation profile of the wrapped phase finds such slips in each InSAR scene: "
        "<i>repaired</i> glaciers were unwrapped again with a prior, <i>in doubt</i> are slips "
        "no prior repaired, parts of a profile whose cycle does not follow from above, or "
        "scenes that disagree by a cycle. The term σ unwrap (a whole cycle on the area in "
        "doubt) is part of each glacier's uncertainty.</p>"
        f"<ul>{''.join(items)}</ul>"
    )
    row = _study_row(regions)
    if row is not None and {"sigma_unwrap_mwe_yr", "mb_sigma_mwe_yr"} <= set(row.index):
        text += (
            f"<p>Study-wide, σ unwrap is "
            f"{_esc(format_value('sigma_unwrap_mwe_yr', row['sigma_unwrap_mwe_yr']))} of the "
            f"{_esc(format_value('mb_sigma_mwe_yr', row['mb_sigma_mwe_yr']))} m w.e./yr "
            "uncertainty.</p>"
        )
    return text + _cycle_table(glaciers[flag.isin([FLAG_REPAIRED, FLAG_DOUBT])])


def _cycle_table(flagged: pd.DataFrame) -> str:
    """The flagged rows of glaciers.csv (id column first) as a table: in doubt first, then
    repaired, each by its area in doubt / repaired (km2, largest first)."""
    in_doubt = flagged["unwrap_flag"] == FLAG_DOUBT
    area = flagged["unwrap_doubt_area_km2"].where(in_doubt, flagged["unwrap_repaired_area_km2"])
    order = flagged.assign(_area=area).sort_values(
        ["unwrap_flag", "_area"], ascending=False, kind="stable"
    )
    id_column = str(flagged.columns[0])
    table = pd.DataFrame(
        {
            id_column: order[id_column].astype(str),
            "region": order["region"].fillna("") if "region" in order.columns else "",
            "phase cycle": [_flag_words(f) for f in order["unwrap_flag"]],
            "prior": order["unwrap_prior"].astype(str),
            "unwrap_repaired_area_km2": order["unwrap_repaired_area_km2"],
            "unwrap_doubt_area_km2": order["unwrap_doubt_area_km2"],
            "mass balance (m w.e./yr)": [
                _plus_minus(m, s)
                for m, s in zip(order["mb_mwe_yr"], order["mb_sigma_mwe_yr"], strict=True)
            ],
            "sigma_unwrap_mwe_yr": order["sigma_unwrap_mwe_yr"],
        }
    )
    headers = {
        "unwrap_repaired_area_km2": "repaired (km²)",
        "unwrap_doubt_area_km2": "in doubt (km²)",
        "sigma_unwrap_mwe_yr": "σ unwrap (m w.e./yr)",
    }
    rows = [_row_class(f) for f in order["unwrap_flag"]]
    return html_table(table, headers=headers, row_classes=rows) + (
        '<p class="meta">Areas: the largest in one scene. <i>prior</i>: what was removed '
        "before unwrapping again (data: the glacier's own profile; user: a prior rate).</p>"
    )


def _scenes_part(ds: xr.Dataset | None, store: Path) -> str:
    if ds is None or ds.sizes.get("scene", 0) == 0:
        return _note("No complete scenes in the store.")
    recorded = {s: r.get("run", {}) for s, r in step_records(store, "ingest").items()}
    ids = [str(s) for s in ds["scene"].values]
    frame = pd.DataFrame({"scene": ids})
    if "scene_date" in ds.coords:
        frame["date"] = [np.datetime_as_string(d, unit="D") for d in ds["scene_date"].values]
    for coord, column in (
        ("scene_kind", "kind"),
        ("scene_month", "month"),
        ("scene_years", "years"),
    ):
        if coord in ds.coords:
            values = ds[coord].values
            frame[column] = [str(v) for v in values] if coord == "scene_kind" else values
    for key in ("coverage_frac", "glacier_coverage_frac"):
        frame[key] = [recorded.get(s, {}).get(key, np.nan) for s in ids]
    if "scene_h_amb_m" in ds.coords and "kind" in frame:
        frame["h_amb_m"] = np.where(
            frame["kind"] == "insar", ds["scene_h_amb_m"].values.astype(float), np.nan
        )
    if "scene_nlooks" in ds.coords and "kind" in frame:
        frame["n_looks"] = np.where(
            frame["kind"] == "insar", ds["scene_nlooks"].values.astype(float), np.nan
        )
    for step in ("unwrap", "correct", "bin"):
        done = step_records(store, step)
        if done:
            frame[f"{step} done"] = ["yes" if s in done else "no" for s in ids]
    return (
        "<p><i>years</i>: time since the reference DEM; <i>coverage</i>: fraction of the grid "
        "the scene covers; <i>glacier_coverage</i>: fraction of the glacier pixels; "
        "h_amb: height of ambiguity (m, InSAR scenes).</p>" + html_table(frame)
    )


def _per_scene_variables(ds: xr.Dataset, keep: Callable[[str], bool]) -> dict[str, xr.DataArray]:
    out = {}
    for name, var in ds.data_vars.items():
        key = str(name)
        if var.dims[:1] == ("scene",) and len(var.dims) <= 2 and keep(key):
            if "glacier" in var.dims:  # per scene and glacier: summarised where they are shown
                continue
            if key in ("scene_state",) or not np.issubdtype(var.dtype, np.number):
                continue
            out[key] = var
    return out


def _column_labels(name: str, var: xr.DataArray) -> list[str]:
    """Labels of the second dimension of a per-scene variable: its coordinate, the names in
    its `coef` attribute (ramp), east/north for a 2-vector shift, else the index."""
    dim = var.dims[1]
    size = var.sizes[dim]
    if dim in var.coords:
        return [str(v) for v in var[dim].values]
    names = str(var.attrs.get(str(dim), "")).split()
    if len(names) == size:
        units = str(var.attrs.get("units", "")).split()
        if len(units) == size:
            return [f"{n} ({u})" for n, u in zip(names, units, strict=True)]
        return names
    if name.startswith("coreg_shift") and size == 2:
        return ["east", "north"]
    return [str(i) for i in range(size)]


def _legend(variables: dict[str, xr.DataArray], names: Sequence[str]) -> str:
    """What each column means, from the variables' long_name / units / x_y attributes."""
    items = []
    for name in names:
        attrs = variables[name].attrs
        text = str(attrs.get("long_name", ""))
        if not text:
            continue
        units = attrs.get("units")
        if units and len(str(units).split()) == 1:
            text += f" ({units})"
        if "x_y" in attrs:
            text += f"; x, y: {attrs['x_y']}"
        items.append(f"<li><code>{_esc(name)}</code>: {_esc(text)}</li>")
    return f'<ul class="meta">{"".join(items)}</ul>' if items else ""


CORRECTIONS = ("datum_offset_m", "ramp_coef", "coreg_shift_m", "seasonal_offset_applied_m")


def _corrections_part(ds: xr.Dataset | None) -> str:
    if ds is None or ds.sizes.get("scene", 0) == 0:
        return _note("No complete scenes in the store.")
    variables = _per_scene_variables(ds, lambda n: not n.startswith("unwrap_"))
    if not variables:
        return _note("No per-scene correction parameters stored yet: run `mbcube correct`.")
    ordered = [n for n in CORRECTIONS if n in variables] + sorted(
        n for n in variables if n not in CORRECTIONS
    )
    frame = pd.DataFrame({"scene": [str(s) for s in ds["scene"].values]})
    if "scene_kind" in ds.coords:
        frame["kind"] = [str(k) for k in ds["scene_kind"].values]
    for name in ordered:
        arr = np.asarray(variables[name].values)
        if arr.ndim == 1:
            frame[name] = arr
        else:
            for j, label in enumerate(_column_labels(name, variables[name])):
                frame[f"{name}[{label}]"] = arr[:, j]
    missing = [n for n in CORRECTIONS if n not in variables]
    text = (
        "<p>Corrections removed from each scene's dh: the datum offset (m), the ramp's "
        "coefficients (units in brackets below), the DEM co-registration shift (m) and the "
        "seasonal offset relative to February (m).</p>"
    )
    if missing:
        text += _note(f"Not stored: {', '.join(missing)}.")
    return text + html_table(frame) + _legend(variables, ordered)


def _unwrap_part(ds: xr.Dataset | None) -> str:
    if ds is None or ds.sizes.get("scene", 0) == 0:
        return _note("No complete scenes in the store.")
    variables = _per_scene_variables(ds, lambda n: n.startswith("unwrap_"))
    kinds = [str(k) for k in ds["scene_kind"].values] if "scene_kind" in ds.coords else []
    insar = [i for i, k in enumerate(kinds) if k == "insar"] if kinds else []
    if not variables:
        if kinds and not insar:
            return "<p>No InSAR scenes: nothing was unwrapped.</p>"
        return _note("No unwrapping quality recorded (run `mbcube unwrap`).")
    rows = insar if insar else list(range(ds.sizes["scene"]))
    ordered = sorted(variables)
    frame = pd.DataFrame({"scene": [str(ds["scene"].values[i]) for i in rows]})
    for name in ordered:
        arr = np.asarray(variables[name].values)
        if arr.ndim == 1:
            frame[name] = arr[rows]
        else:
            for j, label in enumerate(_column_labels(name, variables[name])):
                frame[f"{name}[{label}]"] = arr[rows, j]
    counts = ""
    if "unwrap_flag" in ds:  # glaciers whose tongue slipped a cycle in the scene
        flags = np.asarray(ds["unwrap_flag"].values)[rows]
        frame.insert(1, "glaciers_repaired", (flags == FLAG_REPAIRED).sum(axis=1))
        frame.insert(2, "glaciers_in_doubt", (flags == FLAG_DOUBT).sum(axis=1))
        counts = (
            '<p class="meta"><code>glaciers_repaired</code>, <code>glaciers_in_doubt</code>: '
            "glaciers whose phase cycle the scene's profiles found repaired by a prior, or in "
            'doubt (<a href="#cycles">Phase cycles</a> adds those whose scenes disagree by a '
            "cycle).</p>"
        )
    return html_table(frame) + _legend(variables, ordered) + counts


def _penetration_part(store: Path, ds: xr.Dataset | None) -> str:
    pen = _group(store, "penetration")
    if pen is None or "penetration_m" not in pen:
        return _note("No penetration table stored (run `mbcube correct` with penetration='xband').")
    pen = pen.compute()
    names: dict[int, str] = {}
    if ds is not None and "region_name" in ds:
        names = dict(
            zip(
                ds["region"].values.astype(int).tolist(),
                map(str, ds["region_name"].values),
                strict=True,
            )
        )
    surfaces = {1: "clean ice", 2: "debris"}
    value = pen["penetration_m"]
    n_px = pen["penetration_n_px"] if "penetration_n_px" in pen else xr.ones_like(value)
    sigma = pen.get("penetration_sigma_m")
    rows = []
    lead = [d for d in value.dims if d != "bin"]
    stacked = value.stack(_row=lead) if lead else value.expand_dims(_row=[0])
    n_stacked = n_px.stack(_row=lead) if lead else n_px.expand_dims(_row=[0])
    s_stacked = f_stacked = None
    if "penetration_filled" in pen:
        filled = pen["penetration_filled"]
        f_stacked = filled.stack(_row=lead) if lead else filled.expand_dims(_row=[0])
    if sigma is not None:
        s_stacked = sigma.stack(_row=lead) if lead else sigma.expand_dims(_row=[0])
    for k in range(stacked.sizes["_row"]):
        v = np.asarray(stacked.isel(_row=k).values, dtype=float)
        n = np.nan_to_num(np.asarray(n_stacked.isel(_row=k).values, dtype=float))
        ok = np.isfinite(v) & (n > 0)
        label: dict[str, Any] = {}
        for dim in lead:
            code = stacked["_row"].values[k]
            code_value = code[lead.index(dim)] if isinstance(code, tuple) else code
            if dim == "region":
                code_int = int(code_value)
                label["region"] = names.get(
                    code_int, "all regions, pooled" if code_int == 0 else str(code_value)
                )
            elif dim == "surface":
                label["surface"] = surfaces.get(int(code_value), str(code_value))
            else:
                label[str(dim)] = code_value
        row = label | {
            "n_bins": int(np.isfinite(v).sum()),
            "n_px": int(n[ok].sum()),
            "mean_penetration_m": float((v[ok] * n[ok]).sum() / n[ok].sum())
            if ok.any()
            else np.nan,
            "min_penetration_m": float(v[ok].min()) if ok.any() else np.nan,
            "max_penetration_m": float(v[ok].max()) if ok.any() else np.nan,
        }
        if f_stacked is not None:
            f = np.nan_to_num(np.asarray(f_stacked.isel(_row=k).values, dtype=float))
            row["n_bins_filled"] = int((f[np.isfinite(v)] > 0).sum())
        if s_stacked is not None:
            s = np.asarray(s_stacked.isel(_row=k).values, dtype=float)
            row["mean_sigma_m"] = float(np.nanmean(s[ok])) if ok.any() else np.nan
        rows.append(row)
    frame = pd.DataFrame(rows)
    return (
        "<p>Radar penetration (C band minus X band reference, m; subtracted from dh) per "
        "region and surface type: the pixel-weighted mean over the measured elevation bins and "
        "their range; <i>n_bins</i>: bins with a value, <i>n_bins_filled</i>: of those, bins "
        "with too few pixels, filled from their neighbours. "
        "The full table is the store's <code>penetration</code> group.</p>" + html_table(frame)
    )


def _flatten(prefix: str, value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), value[key])
    else:
        yield prefix, value


def _parameters_part(state: dict[str, Any]) -> str:
    config = state.get("study", {}).get("config")
    if not config:
        return _note("No study parameters recorded in the store.")
    frame = pd.DataFrame(
        [
            {"parameter": key, "value": "" if value is None else str(value)}
            for key, value in _flatten("", config)
        ]
    )
    return "<p>As recorded in the store (study.yaml with defaults filled in).</p>" + html_table(
        frame
    )


def _figures_part(paths: Sequence[Path], out: Path, n_doubt: int = 0) -> str:
    """The figures with captions; n_doubt: glaciers whose phase cycle is in doubt (marked)."""
    if not paths:
        return _note("No figures were made (their inputs are missing).")
    captions = {
        "dhdt_map": "Mean elevation change rate (m/yr) over the scenes, glacier outlines in "
        "black, hillshade of the reference DEM (Lin et al. 2017, Figs 2-6 style).",
        "mass_balance_map": "Glacier mass balance (m w.e./yr) at the glacier centroids, "
        "circle area proportional to glacier area; region means with 1σ (Fig 1 style).",
        "profile": "dh/dt per elevation bin, mean ± 1 std of the pixel rates, clean vs "
        "debris-covered ice, hypsometry as bars (Fig 7 style).",
        "transect": "dh/dt of accumulation area, ablation area and whole glaciers along "
        "longitude (Fig 8 style).",
    }
    order = ["dhdt_map", "mass_balance_map", "profile", "transect"]
    if n_doubt:
        marks = {
            "dhdt_map": "Outlined in orange",
            "mass_balance_map": "Ringed in orange",
            "transect": "Ringed in orange",
        }
        for key, mark in marks.items():
            captions[key] += f" {mark}: glaciers whose phase cycle is in doubt."
        captions["profile"] += " Counted in the corner: the glaciers in doubt it includes."

    def rank(path: Path) -> tuple[int, str]:
        hits = [i for i, key in enumerate(order) if path.stem.startswith(key)]
        return (hits[0] if hits else len(order), path.stem)

    items = []
    for path in sorted(paths, key=rank):
        rel = Path(os.path.relpath(path, out)).as_posix()
        key = next((k for k in order if path.stem.startswith(k)), "")
        items.append(
            f'<figure><a href="{_esc(rel)}"><img src="{_esc(rel)}" alt="{_esc(path.stem)}" '
            f'loading="lazy" width="900"></a><figcaption><b>{_esc(path.stem)}</b>: '
            f"{_esc(captions.get(key, ''))}</figcaption></figure>"
        )
    return "\n".join(items)


# ---------------------------------------------------------------- the report


def write_report(
    store: Path, tables: Path, out: Path, *, figures: Sequence[Path] | None = None
) -> Path:
    """Write out/report.html and return its path.

    figures: the PNG files to show (default: out/figures/*.png, made with
    `mbcube.figures.make_figures` when there are none). Parts whose inputs are absent are noted.
    """
    store, tables, out = Path(store), Path(tables), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = read_state(store)
    try:
        ds: xr.Dataset | None = open_cube(store)
    except StoreError as err:
        log.warning("report: %s", err)
        ds = None
    if figures is None:
        figures = sorted((out / "figures").glob("*.png"))
        if not figures and ds is not None:
            from mbcube.figures import make_figures

            figures = make_figures(store, tables, out / "figures")
    regions = _read_csv(tables / "regions.csv")
    glaciers = _read_csv(tables / "glaciers.csv")
    parts = [
        ("Regions", "regions", _regions_part(regions)),
        ("Figures", "figures", _figures_part(list(figures), out, len(_in_doubt(glaciers)))),
        ("Scenes", "scenes", _scenes_part(ds, store)),
        ("Corrections applied per scene", "corrections", _corrections_part(ds)),
        ("Penetration", "penetration", _penetration_part(store, ds)),
        ("Unwrapping quality", "unwrap", _unwrap_part(ds)),
        ("Phase cycles (unwrapping)", "cycles", _cycles_part(ds, glaciers, regions)),
        ("Glaciers", "glaciers", _glaciers_part(glaciers)),
        ("Study parameters", "parameters", _parameters_part(state)),
    ]
    contents = " · ".join(f'<a href="#{a}">{_esc(t)}</a>' for t, a, _ in parts)
    body = "\n".join(_section(t, b, a) for t, a, b in parts)
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>mbcube report</title><style>{CSS}</style></head><body>\n"
        f"{_header(ds, state, store)}\n{_headline(regions)}{_doubt_note(glaciers)}\n"
        f"<p>{contents}</p>\n{body}"
        "</body></html>\n"
    )
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
