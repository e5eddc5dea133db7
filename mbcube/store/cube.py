"""The cube's arrays: open, create variables, write regions, grow along scenes.

A cube is one Zarr v3 directory written through xarray (CF conventions, `spatial_ref` grid
mapping), so `xr.open_zarr(path)` reads it without mbcube. What makes it safe:

- zarr writes every chunk and metadata file atomically (temporary file, then rename);
- every array mbcube creates ends its codecs with a CRC-32C checksum of each chunk, so a chunk
  damaged on disk (truncated, bits flipped) fails to decode instead of reading as other numbers;
- a scene only counts once its `scene_state` is 1. That flag is written last, after all its
  tiles. A killed ingest leaves a scene at 0 (its unwritten chunks read as NaN, like real "no
  data"); `open_cube` hides such scenes, and the next ingest rewrites them. A scene whose row was
  removed from scenes.csv is 2 (removed) and hidden too.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from mbcube.errors import StoreError
from mbcube.store.state import check_schema, read_state, store_exists

SCENE_PENDING, SCENE_INGESTED, SCENE_REMOVED = 0, 1, 2
#: Per scene, the group OUTLIER_GROUP/<scene> holds the outlier thresholds of the corrections.
OUTLIER_GROUP = "outliers"


def checked_codecs(compressed: bool = True) -> list[Any]:
    """The bytes-to-bytes codecs of every array mbcube creates: zstd (unless not compressed)
    then a CRC-32C checksum of the chunk."""
    return [ZstdCodec(level=0), Crc32cCodec()] if compressed else [Crc32cCodec()]


def write_dataset(ds: xr.Dataset, path: Path, **to_zarr_kwargs: Any) -> Any:
    """`ds.to_zarr(path, ...)` keeping the store's root attributes (state) intact and a group's
    other attributes when writing into an existing group; variables it creates get the
    checksummed codecs (`checked_codecs`; an encoding's `compressors: None` keeps the checksum
    alone)."""
    group = to_zarr_kwargs.get("group")
    target = Path(path) / group if group else Path(path)
    overwrite = to_zarr_kwargs.get("mode") == "w"
    if (target / "zarr.json").exists() and not overwrite:
        ds = ds.copy()
        stored = zarr.open_group(str(target), mode="r").attrs.asdict()
        # The root's attributes hold the store state: only write_state changes them. A group's
        # attributes are its writer's: new values win, others are kept.
        ds.attrs = stored | ds.attrs if group else stored
    if "region" not in to_zarr_kwargs:
        encoding = dict(to_zarr_kwargs.get("encoding") or {})
        for name in ds.variables:  # data variables and coordinates
            if overwrite or not (target / str(name) / "zarr.json").exists():
                given = dict(encoding.get(str(name), {}))
                compressed = given.get("compressors", ()) is not None
                given["compressors"] = checked_codecs(compressed)
                encoding[str(name)] = given
        if encoding:
            to_zarr_kwargs["encoding"] = encoding
    to_zarr_kwargs.setdefault("zarr_format", 3)
    with _quiet_zarr():
        return ds.to_zarr(str(path), **to_zarr_kwargs)


def open_cube(path: Path | str, *, complete_only: bool = True) -> xr.Dataset:
    """Open a cube lazily. complete_only: hide scenes whose ingest has not finished (or that
    were removed from the study)."""
    path = Path(path)
    if not store_exists(path):
        raise StoreError(
            f"{path}: no cube here. Create one with `mbcube ingest STUDY --store {path}`."
        )
    state = read_state(path)
    check_schema(path, state)
    if not state.get("created"):
        raise StoreError(
            f"{path}: the cube's creation was interrupted; `mbcube ingest STUDY --store {path}` "
            "(or `mbcube run`) makes it again."
        )
    try:
        ds = xr.open_zarr(str(path), chunks={})
    except (KeyError, ValueError, OSError) as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # the file system's own error (permission, ...): said as it is
        raise StoreError(
            f"{path}: the cube's metadata does not open ({type(err).__name__}: {err}). "
            f"`mbcube verify {path}` names what is damaged."
        ) from err
    if complete_only and "scene" in ds.dims:
        states = scene_states(path)  # tiny: read, not computed
        ds = ds.isel(scene=np.flatnonzero(states == SCENE_INGESTED))
    return ds


def scene_states(path: Path) -> np.ndarray:
    """Each scene's state (SCENE_PENDING, SCENE_INGESTED, SCENE_REMOVED), in store order."""
    return np.asarray(zarr.open_array(str(Path(path) / "scene_state"), mode="r")[:])


def size_on_disk_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


class _quiet_zarr(warnings.catch_warnings):
    """Silence zarr's notice that consolidated metadata is not yet in the v3 spec (we rely on it
    so that plain `xr.open_zarr` opens the cube quickly and without warnings), and its notice of
    the writer's lock file (`mbcube.store.lock`), which is not a Zarr node."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        warnings.filterwarnings("ignore", message="Object at .mbcube.lock is not recognized")


# ------------------------------------------------------------------ layers written by later steps


def ensure_variables(path: Path, template: xr.Dataset) -> None:
    """Create the variables of `template` that the store lacks (metadata only, nothing computed).

    `template` holds lazy (dask) arrays with the final dims, dtypes and chunks; its coordinates
    are dropped (the store has them). Float layers on the (y, x) grid get NaN as fill value, so
    chunks never written read as NaN; they also carry the CF grid mapping.
    """
    existing = {p.name for p in Path(path).iterdir() if (p / "zarr.json").is_file()}
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
        consolidate(path)
    return grown


def consolidate(path: Path) -> None:
    """Rewrite the root's consolidated metadata (after arrays or groups changed outside
    xarray's writes), so that `xr.open_zarr` sees the store as it is."""
    with _quiet_zarr():
        zarr.consolidate_metadata(str(path))


def scene_index(path: Path) -> dict[str, int]:
    """Scene id -> its index along the store's `scene` dimension (all scenes, any state)."""
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


def outlier_group_name(scene_id: str, index: int) -> str:
    """The store group holding a scene's outlier table: outliers/<scene id>, or
    outliers/scene_<index> when the id is not a safe Zarr node and file name: safe is 1 to 128
    ASCII letters, digits, '.', '_' or '-', not dots only, not starting with '__' (reserved by
    Zarr) and not 'zarr.json' in any case (Zarr's metadata file, on case-insensitive file
    systems too)."""
    safe = (
        0 < len(scene_id) <= 128
        and scene_id.isascii()
        and all(c.isalnum() or c in "._-" for c in scene_id)
        and not scene_id.startswith("__")
        and scene_id.strip(".") != ""
        and scene_id.lower() != "zarr.json"
    )
    return f"{OUTLIER_GROUP}/{scene_id if safe else f'scene_{index}'}"


def static_arrays(path: Path) -> list[str]:
    """The root arrays without a `scene` dimension: static layers, coordinates, glacier and
    region tables."""
    found = []
    for array_dir in sorted(p for p in Path(path).iterdir() if (p / "zarr.json").is_file()):
        meta = json.loads((array_dir / "zarr.json").read_text())
        if meta.get("node_type") == "array" and "scene" not in (meta.get("dimension_names") or []):
            found.append(array_dir.name)
    return found


def delete_scene_chunks(path: Path, scene_id: str, index: int) -> list[str]:
    """Delete every chunk of scene `index` in the per-scene layers (arrays of the root and of
    `stats` whose first dimension is `scene`, chunked one scene at a time; not the scene
    coordinates) and its outlier group: the pixels and statistics of a scene removed from the
    study. Returns the arrays and groups touched."""
    touched = []
    outliers = Path(path) / outlier_group_name(scene_id, index)
    if outliers.is_dir():
        shutil.rmtree(outliers)
        touched.append(outlier_group_name(scene_id, index))
    for group in (Path(path), Path(path) / "stats"):
        if not (group / "zarr.json").is_file():
            continue
        for array_dir in sorted(p for p in group.iterdir() if (p / "zarr.json").is_file()):
            if not _per_scene_layer(array_dir):
                continue
            chunks = array_dir / "c" / str(index)
            if chunks.is_file():
                chunks.unlink()
            elif chunks.is_dir():
                shutil.rmtree(chunks)
            else:
                continue
            touched.append(array_dir.relative_to(path).as_posix())
    return touched


def _per_scene_layer(array_dir: Path) -> bool:
    meta = json.loads((array_dir / "zarr.json").read_text())
    dims = meta.get("dimension_names") or []
    if meta.get("node_type") != "array" or not dims or dims[0] != "scene":
        return False
    if array_dir.name == "scene" or array_dir.name.startswith("scene_"):
        return False  # the scene coordinates and flags
    chunks = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [])
    return bool(chunks) and chunks[0] == 1
