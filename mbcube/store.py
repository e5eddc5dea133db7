"""The cube's store: schema, open/create/write, per-scene state and provenance.

A cube is one Zarr v3 directory written through xarray (CF conventions, `spatial_ref` grid mapping),
so `xr.open_zarr(path)` reads it without mbcube. Two things make it safe to interrupt:

- zarr writes every chunk and metadata file atomically (temporary file, then rename);
- a scene only counts once its `scene_state` is 1. That flag is written last, after all its tiles.
  A killed ingest leaves a scene at 0 (its unwritten chunks read as NaN, like real "no data");
  `open_cube` hides such scenes, and the next ingest rewrites them.

Provenance (inputs with size and mtime, parameters, package version) is kept as JSON in the
root attribute `mbcube`. xarray replaces root attributes on every write, so all writes go
through `write_dataset`, which carries them along.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from mbcube.config import StudyConfig
from mbcube.errors import StoreError
from mbcube.grid import Grid

SCHEMA_VERSION = 1
STATE_ATTR = "mbcube"
SCENE_PENDING, SCENE_INGESTED = 0, 1


def file_fingerprint(path: Path) -> dict[str, Any]:
    """What identifies an input file's content cheaply: path, size (bytes) and mtime (ns)."""
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def store_exists(path: Path) -> bool:
    return (Path(path) / "zarr.json").exists()


def read_state(path: Path) -> dict[str, Any]:
    """The store's recorded state and provenance ({} for a store mbcube did not make).

    Read straight from the root `zarr.json` (a few ms, where opening the group through zarr
    takes ~70 ms: steps read it several times per scene)."""
    raw = _root_metadata(Path(path)).get("attributes", {}).get(STATE_ATTR)
    return json.loads(raw) if isinstance(raw, str) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the recorded state: the root `zarr.json` is rewritten to a temporary file, flushed
    to disk and renamed over the old one, so a kill at any moment leaves the old or the new
    state, never a torn file. (Only the mbcube process writes it; workers write chunks.)"""
    target = Path(path) / "zarr.json"
    meta = _root_metadata(Path(path))
    meta.setdefault("attributes", {})[STATE_ATTR] = json.dumps(state, sort_keys=True)
    tmp = target.with_name(f".zarr.json.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _root_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except FileNotFoundError as err:
        raise StoreError(f"{path}: no cube here (no zarr.json).") from err
    except json.JSONDecodeError as err:
        raise StoreError(f"{path}/zarr.json: not valid JSON ({err}).") from err
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "group":
        raise StoreError(f"{path}: not a Zarr v3 group (zarr.json says {meta.get('zarr_format')}).")
    return dict(meta)


def write_dataset(ds: xr.Dataset, path: Path, **to_zarr_kwargs: Any) -> Any:
    """`ds.to_zarr(path, ...)` keeping the store's root attributes (state) intact and a group's
    other attributes when writing into an existing group."""
    group = to_zarr_kwargs.get("group")
    target = Path(path) / group if group else Path(path)
    if (target / "zarr.json").exists() and to_zarr_kwargs.get("mode") != "w":
        ds = ds.copy()
        stored = zarr.open_group(str(target), mode="r").attrs.asdict()
        # The root's attributes hold the store state: only write_state changes them. A group's
        # attributes are its writer's: new values win, others are kept.
        ds.attrs = stored | ds.attrs if group else stored
    to_zarr_kwargs.setdefault("zarr_format", 3)
    with _quiet_zarr():
        return ds.to_zarr(str(path), **to_zarr_kwargs)


def open_cube(path: Path | str, *, complete_only: bool = True) -> xr.Dataset:
    """Open a cube lazily. complete_only: hide scenes whose ingest has not finished."""
    path = Path(path)
    if not store_exists(path):
        raise StoreError(
            f"{path}: no cube here. Create one with `mbcube ingest STUDY --store {path}`."
        )
    state = read_state(path)
    version = state.get("schema_version")
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"{path}: cube schema version {version!r}, this mbcube reads {SCHEMA_VERSION}. "
            "Re-ingest the study into a new store."
        )
    ds = xr.open_zarr(str(path), chunks={})
    if complete_only and "scene" in ds.dims:
        states = zarr.open_array(str(path / "scene_state"), mode="r")[:]  # tiny: read, not computed
        ds = ds.isel(scene=np.flatnonzero(states == SCENE_INGESTED))
    return ds


def grid_of(state: dict[str, Any]) -> Grid:
    return Grid.from_attrs(state["grid"])


def size_on_disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


class _quiet_zarr(warnings.catch_warnings):
    """Silence zarr's notice that consolidated metadata is not yet in the v3 spec (we rely on it
    so that plain `xr.open_zarr` opens the cube quickly and without warnings)."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")


# ------------------------------------------------------------------ layers written by later steps


def ensure_variables(path: Path, template: xr.Dataset) -> None:
    """Create the variables of `template` that the store lacks (metadata only, nothing computed).

    `template` holds lazy (dask) arrays with the final dims, dtypes and chunks; its coordinates
    are dropped (the store has them). Float layers on the (y, x) grid get NaN as fill value, so
    chunks never written read as NaN; they also carry the CF grid mapping.
    """
    existing = set(zarr.open_group(str(path), mode="r").keys())
    missing = [str(n) for n in template.data_vars if str(n) not in existing]
    if not missing:
        return
    ds = template[missing].drop_vars(list(template.coords), errors="ignore")
    encoding: dict[str, dict[str, Any]] = {}
    for name, var in ds.data_vars.items():
        if var.dtype.kind == "f":
            encoding[str(name)] = {"_FillValue": np.nan}
        if {"y", "x"} <= set(var.dims):
            ds[name].encoding["coordinates"] = "spatial_ref"
    write_dataset(ds, path, mode="a", compute=False, encoding=encoding)


def extend_scene_dim(path: Path) -> list[str]:
    """Grow the store's arrays along `scene` to the length of its scene coordinate (after an
    ingest appended scenes); the new entries read as the arrays' fill value (NaN / 0), i.e. "not
    computed yet". Metadata only. Returns the names of the arrays grown."""
    root = zarr.open_group(str(path), mode="r+")
    n_scenes = zarr.open_array(str(Path(path) / "scene"), mode="r").shape[0]
    grown = []
    for name, array in root.arrays():
        dims = array.metadata.dimension_names or ()  # type: ignore[union-attr]
        if dims and dims[0] == "scene" and array.shape[0] < n_scenes:
            array.resize((n_scenes, *array.shape[1:]))
            grown.append(name)
    if grown:
        with _quiet_zarr():
            zarr.consolidate_metadata(str(path))
    return grown


def scene_index(path: Path) -> dict[str, int]:
    """Scene id -> its index along the store's `scene` dimension (all scenes, complete or not)."""
    ids = zarr.open_array(str(Path(path) / "scene"), mode="r")[:]
    return {str(s): i for i, s in enumerate(np.asarray(ids).ravel())}


def write_scene_region(path: Path, ds: xr.Dataset, index: int, compute: bool = True) -> Any:
    """Write the variables of `ds` (dims starting with `scene` of length 1) at scene `index`.

    Variables are created first when missing. Returns the delayed write when compute=False.
    """
    ds = ds.drop_vars(list(ds.coords), errors="ignore")
    ensure_variables(path, _full_length_template(path, ds))
    region: dict[str, slice] = {str(d): slice(None) for d in ds.dims}
    region["scene"] = slice(index, index + 1)
    return write_dataset(ds, path, region=region, compute=compute)


def _full_length_template(path: Path, ds: xr.Dataset) -> xr.Dataset:
    """`ds` with its scene dimension stretched to the store's, lazily (for `ensure_variables`)."""
    import dask.array as da

    n_scenes = len(scene_index(path))
    out = {}
    for name, var in ds.data_vars.items():
        shape = (n_scenes, *var.shape[1:])
        chunks = ((1,) * n_scenes, *(var.chunks[1:] if var.chunks else var.shape[1:]))
        fill = np.nan if var.dtype.kind == "f" else 0
        out[name] = (var.dims, da.full(shape, fill, dtype=var.dtype, chunks=chunks), var.attrs)
    return xr.Dataset(out)


def step_record(path: Path, step: str, scene_id: str) -> dict[str, Any]:
    """What step `step` recorded when it last finished scene `scene_id` ({} if never).

    Every record holds a `token` that changes each time the step rewrites the scene; the
    pseudo-step "ingest" is the ingest's own record of the scene.
    """
    state = read_state(path)
    if step == "ingest":
        record = dict(state.get("scenes", {}).get(scene_id, {}))
        if record:
            record["token"] = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
        return record
    return dict(state.get("steps", {}).get(step, {}).get(scene_id, {}))


def record_step(path: Path, step: str, scene_id: str, record: dict[str, Any]) -> str:
    """Record that `step` finished `scene_id` with `record` (JSON-able: its parameters and the
    tokens of its inputs). Returns the new token. Call it only after all its writes finished."""
    token = uuid.uuid4().hex
    state = read_state(path)
    state.setdefault("steps", {}).setdefault(step, {})[scene_id] = record | {"token": token}
    write_state(path, state)
    return token


def is_current(path: Path, step: str, scene_id: str, record: dict[str, Any]) -> bool:
    """True when `step` already finished `scene_id` with exactly this record (skip it)."""
    done = step_record(path, step, scene_id)
    done.pop("token", None)
    return bool(done) and done == json.loads(json.dumps(record, sort_keys=True))


def recorded_config(path: Path) -> StudyConfig:
    """The study parameters recorded in the store at ingest (or since updated)."""
    return StudyConfig.model_validate(read_state(path)["study"]["config"])
