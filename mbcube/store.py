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

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

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
    """The store's recorded state and provenance ({} for a store mbcube did not make)."""
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    raw = attrs.get(STATE_ATTR)
    return json.loads(raw) if isinstance(raw, str) else {}


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the recorded state (one atomic metadata write)."""
    group = zarr.open_group(str(path), mode="r+")
    with _quiet_zarr():
        group.attrs.update({STATE_ATTR: json.dumps(state, sort_keys=True)})


def write_dataset(ds: xr.Dataset, path: Path, **to_zarr_kwargs: Any) -> Any:
    """`ds.to_zarr(path, ...)` keeping the store's root attributes (state) intact."""
    if store_exists(path) and to_zarr_kwargs.get("mode") != "w":
        ds = ds.copy()
        ds.attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
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
