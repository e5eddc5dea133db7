"""Human-readable summaries of a cube (what `mbcube info` prints).

`info` is a reader: it takes no lock and never waits for a writer. Besides the grid and the
scenes it says which steps each scene went through, marks a step whose recorded files are
missing or changed size ("damaged"; `mbcube verify` also decodes every chunk) and who writes
the store now, or whether the last writer was interrupted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from mbcube.store import (
    SCENE_INGESTED,
    SCENE_REMOVED,
    damaged_outputs,
    grid_of,
    open_cube,
    read_state,
    size_on_disk_bytes,
    step_records,
    whole_records,
)
from mbcube.store.lock import writer_status

#: The per-scene steps, in order.
SCENE_STEPS = ("ingest", "unwrap", "correct", "bin")


def cube_summary(store: Path | str) -> str:
    """Grid, static layers, scenes (date, kind, state, coverage), steps and their integrity,
    the store's writer and size on disk."""
    store = Path(store)
    ds = open_cube(store, complete_only=False)
    state = read_state(store)
    grid = grid_of(state)
    records = {step: step_records(store, step) for step in SCENE_STEPS}
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
        f"writer    {writer_status(store) or 'none'}",
        f"store     {_whole_items(store)}",
        "",
        _scene_table(ds, records["ingest"]),
    ]
    steps = _steps_table(ds, store, records)
    if steps:
        lines += ["", steps]
    return "\n".join(lines)


def _whole_items(store: Path) -> str:
    """The whole-store records (static layers, hypsometry, penetration table, ...), each
    'ok' or 'damaged'."""
    found = []
    for key, record in sorted(whole_records(store).items()):
        ok = not damaged_outputs(store, record.get("outputs", {}))
        found.append(f"{key.replace('/_', ' ')} {'ok' if ok else 'DAMAGED'}")
    return ", ".join(found) or "nothing recorded"


def _scene_table(ds: xr.Dataset, ingested: dict[str, dict[str, Any]]) -> str:
    header = f"{'scene':<24} {'date':<10} {'month':>5} {'years':>6} {'kind':<5} {'state':<9} {'coverage':>8} {'on glaciers':>11}"
    rows = [header, "-" * len(header)]
    states = ds["scene_state"].values
    for i, scene in enumerate(ds["scene"].values):
        sid = str(scene)
        done = int(states[i]) == SCENE_INGESTED
        state = "ingested" if done else "removed" if states[i] == SCENE_REMOVED else "pending"
        info = ingested.get(sid, {}).get("run", {})
        date = np.datetime_as_string(ds["scene_date"].values[i], unit="D")
        rows.append(
            f"{sid:<24} {date:<10} {int(ds['scene_month'].values[i]):>5} {float(ds['scene_years'].values[i]):>6.2f} "
            f"{ds['scene_kind'].values[i]!s:<5} {state:<9} "
            f"{_pct(info.get('coverage_frac')) if done else '':>8} {_pct(info.get('glacier_coverage_frac')) if done else '':>11}"
        )
    n_done = int((states == SCENE_INGESTED).sum())
    n_removed = int((states == SCENE_REMOVED).sum())
    removed = f", {n_removed} removed from the study" if n_removed else ""
    rows.append(f"{n_done} of {ds.sizes['scene']} scene(s) ingested{removed}")
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


def _steps_table(ds: xr.Dataset, store: Path, records: dict[str, dict[str, Any]]) -> str:
    """Which steps each scene has been through (a step whose recorded files are missing or
    changed size is marked '!damaged'), with the unwrap quality and the datum offset."""
    steps = [s for s in SCENE_STEPS[1:] if records[s]]
    quality = [(v, h, f) for v, h, f in _QUALITY if v in ds]
    values = {v: ds[v].values for v, _, _ in quality}
    if "unwrap_flag" in ds:  # glaciers whose tongue slipped a cycle: repaired, or in doubt
        flags = ds["unwrap_flag"].values
        for code, name, heading in (
            (1, "unwrap_repaired", "glac fixed"),
            (2, "unwrap_doubt", "in doubt"),
        ):
            values[name] = (flags == code).sum(axis=1)
            quality.append((name, heading, "int"))
    if not steps and not quality:
        return ""
    header = f"{'scene':<24} {'steps':<28}" + "".join(f" {h:>10}" for _, h, _ in quality)
    rows = [header, "-" * len(header)]
    n_damaged = 0
    for i, scene in enumerate(ds["scene"].values):
        sid = str(scene)
        marks = []
        for step in SCENE_STEPS:
            record = records[step].get(sid)
            if record is None:
                continue
            if damaged_outputs(store, record.get("outputs", {})):
                n_damaged += 1
                marks.append(f"{step}!damaged")
            elif step != "ingest":  # the scene table shows the ingest
                marks.append(step)
        done = ",".join(marks) or "-"
        insar = str(ds["scene_kind"].values[i]) == "insar"
        cells = "".join(
            f" {_cell(values[v][i], f) if insar or not v.startswith('unwrap') else '':>10}"
            for v, _, f in quality
        )
        rows.append(f"{sid:<24} {done:<28}{cells}")
    if n_damaged:
        rows.append(
            f"{n_damaged} step record(s) with missing or changed files: `mbcube verify {store}` "
            "names them, `--repair` makes the next run redo them"
        )
    return "\n".join(rows)


def _cell(value: float, kind: str) -> str:
    if not np.isfinite(value):
        return ""
    if kind == "pct":
        return f"{100 * value:.2f} %"
    if kind == "int":
        return f"{int(value)}"
    return f"{value:+.3f}"
