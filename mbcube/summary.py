"""Human-readable summaries of a cube (what `mbcube info` prints)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from mbcube.store import SCENE_INGESTED, grid_of, open_cube, read_state, size_on_disk_bytes


def cube_summary(store: Path | str) -> str:
    """Grid, static layers, scenes (date, kind, state, coverage) and size on disk."""
    store = Path(store)
    ds = open_cube(store, complete_only=False)
    state = read_state(store)
    grid = grid_of(state)
    lines = [
        f"cube      {store}  (schema {state['schema_version']}, made by mbcube {state['mbcube_version']})",
        f"grid      {grid.ny} x {grid.nx} px of {grid.res:g} m, {grid.crs}, {grid.n_tiles} tiles of {grid.tile} px",
        f"bounds    {tuple(round(b, 1) for b in grid.bounds)}",
        f"glaciers  {ds.sizes.get('glacier', 0)} outlines"
        + (
            f", regions: {', '.join(map(str, ds['region_name'].values))}"
            if "region_name" in ds
            else ""
        ),
        f"layers    {', '.join(sorted(str(v) for v in ds.data_vars if ds[v].dims == ('y', 'x')))}",
        f"size      {size_on_disk_bytes(store) / 1e6:.1f} MB on disk",
        "",
        _scene_table(ds, state),
    ]
    steps = _steps_table(ds, state)
    if steps:
        lines += ["", steps]
    return "\n".join(lines)


def _scene_table(ds: xr.Dataset, state: dict) -> str:
    header = f"{'scene':<24} {'date':<10} {'month':>5} {'years':>6} {'kind':<5} {'state':<9} {'coverage':>8} {'on glaciers':>11}"
    rows = [header, "-" * len(header)]
    recorded = state.get("scenes", {})
    for i, scene in enumerate(ds["scene"].values):
        sid = str(scene)
        done = int(ds["scene_state"].values[i]) == SCENE_INGESTED
        info = recorded.get(sid, {})
        date = np.datetime_as_string(ds["scene_date"].values[i], unit="D")
        rows.append(
            f"{sid:<24} {date:<10} {int(ds['scene_month'].values[i]):>5} {float(ds['scene_years'].values[i]):>6.2f} "
            f"{ds['scene_kind'].values[i]!s:<5} {'ingested' if done else 'pending':<9} "
            f"{_pct(info.get('coverage_frac')) if done else '':>8} {_pct(info.get('glacier_coverage_frac')) if done else '':>11}"
        )
    n_done = int((ds["scene_state"].values == SCENE_INGESTED).sum())
    rows.append(f"{n_done} of {ds.sizes['scene']} scene(s) ingested")
    return "\n".join(rows)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f} %"


#: Per-scene quality columns shown once a step has written them: (variable, heading, format).
_QUALITY = [
    ("unwrap_valid_frac", "unwrapped", "pct"),
    ("unwrap_tied_frac", "tied", "pct"),
    ("unwrap_n_components", "comps", "int"),
    ("unwrap_untied_px", "untied px", "int"),
    ("unwrap_loop_misfits", "misfits", "int"),
    ("unwrap_edge_agreement", "edges ok", "pct"),
    ("datum_offset_m", "datum m", "m"),
]


def _steps_table(ds: xr.Dataset, state: dict) -> str:
    """Which steps each scene has been through, with the unwrap quality and the datum offset."""
    steps = [s for s in ("unwrap", "correct", "bin") if state.get("steps", {}).get(s)]
    quality = [(v, h, f) for v, h, f in _QUALITY if v in ds]
    if not steps and not quality:
        return ""
    header = f"{'scene':<24} {'steps':<20}" + "".join(f" {h:>10}" for _, h, _ in quality)
    rows = [header, "-" * len(header)]
    values = {v: ds[v].values for v, _, _ in quality}
    for i, scene in enumerate(ds["scene"].values):
        sid = str(scene)
        done = ",".join(s for s in steps if sid in state["steps"][s]) or "-"
        insar = str(ds["scene_kind"].values[i]) == "insar"
        cells = "".join(
            f" {_cell(values[v][i], f) if insar or not v.startswith('unwrap') else '':>10}"
            for v, _, f in quality
        )
        rows.append(f"{sid:<24} {done:<20}{cells}")
    return "\n".join(rows)


def _cell(value: float, kind: str) -> str:
    if not np.isfinite(value):
        return ""
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "int":
        return f"{int(value)}"
    return f"{value:+.3f}"
